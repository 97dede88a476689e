//! The usage spool through the whole data plane, in process: what one run leaves unacked the
//! next run on the same data directory sends again, under the first run's identity and
//! sequences; a full spool refuses requests when told to. (Crashes of real processes are in
//! `e2e/tests/usage_spool.rs`.)

use crate::support;

use std::time::Duration;

use sluice_proto::v1 as proto;
use support::control_plane::FakeControlPlane;
use support::harness::{EchoUpstream, Harness, backend, chat_body, snapshot};

fn echo_snapshot(upstream: &EchoUpstream) -> proto::Snapshot {
    snapshot(
        1,
        vec![backend("b1", &upstream.base_url(), proto::Pool::Primary, 0)],
    )
}

/// The value of an unlabelled metric line.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// A run on `dir` that serves `n` requests under `database-1` whose control plane never
/// commits them, stopped: its incarnation, the one directory left in the spool.
async fn a_run_left_unacked(upstream: &EchoUpstream, dir: &std::path::Path, n: usize) -> String {
    let cp = FakeControlPlane::start().await;
    cp.set_ack_usage(false);
    let run = Harness::start_on(cp, echo_snapshot(upstream), |c| {
        c.data_dir = Some(dir.to_owned());
        c.usage_flush_timeout = Duration::from_millis(300);
    })
    .await;
    for _ in 0..n {
        assert_eq!(run.chat(chat_body(false)).await.status(), 200);
    }
    run.cp
        .wait_for("its records received", |r| r.received_sequences.len() >= n)
        .await;
    run.shutdown().await.unwrap();
    let left: Vec<_> = std::fs::read_dir(dir.join("usage-spool"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(left.len(), 1, "the unacked run stays on disk: {left:?}");
    left[0].clone()
}

#[tokio::test]
async fn what_one_run_left_unacked_the_next_run_on_its_directory_sends_again() {
    let upstream = EchoUpstream::start().await;
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_owned();

    // The first run serves five requests; its control plane never commits them.
    let incarnation = a_run_left_unacked(&upstream, &dir, 5).await;

    // The next run, on the same directory, sends them under the first run's incarnation.
    let second = Harness::start_with(echo_snapshot(&upstream), |c| {
        c.data_dir = Some(dir.clone());
    })
    .await;
    assert_eq!(second.chat(chat_body(false)).await.status(), 200);
    second
        .cp
        .wait_for("the first run's records", |r| {
            r.applied
                .get(&("test-node".to_owned(), incarnation.clone()))
                .is_some_and(|m| m.len() == 5)
        })
        .await;
    let resent = second.cp.with(|r| {
        r.applied[&("test-node".to_owned(), incarnation.clone())]
            .values()
            .cloned()
            .collect::<Vec<_>>()
    });
    let sequences: Vec<u64> = resent.iter().map(|r| r.sequence).collect();
    assert_eq!(sequences, [1, 2, 3, 4, 5], "under their own sequences");
    assert!(
        resent
            .iter()
            .all(|r| (r.prompt_tokens, r.completion_tokens, r.status_code) == (11, 22, 200))
    );
    // The second run's own request, under its own incarnation; nothing else.
    second
        .cp
        .wait_for("6 records in all", |r| r.records().len() == 6)
        .await;
    let mut resent_metric = None;
    for _ in 0..200 {
        resent_metric = metric(
            &second.metrics().await,
            "sluice_usage_spool_resent_records_total",
        );
        if resent_metric == Some(5.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(resent_metric, Some(5.0));
    assert!(
        !dir.join("usage-spool").join(&incarnation).exists(),
        "an acked run's directory is deleted"
    );
    second.shutdown().await.unwrap();
    assert_eq!(
        std::fs::read_dir(dir.join("usage-spool")).unwrap().count(),
        0,
        "a clean stop with everything acked leaves nothing"
    );
}

/// A replica restarted takes the database of the control plane it finds (how an operator who
/// starts over, or restores an older backup, says so), and an earlier run's unacked usage on
/// its directory goes there with it: the control plane, which refuses usage served under
/// another database, takes a replay (it names none). Naming the earlier run's database (a
/// version of this session did) stranded that usage for good in the spool after every such
/// restart, its bytes counted against the spool's bound.
#[tokio::test]
async fn an_earlier_runs_usage_goes_to_the_database_the_restarted_replica_takes() {
    let upstream = EchoUpstream::start().await;
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_owned();
    let incarnation = a_run_left_unacked(&upstream, &dir, 3).await;
    let mut other = echo_snapshot(&upstream);
    other.database_id = "database-2".into();
    let second = Harness::start_with(other, |c| c.data_dir = Some(dir.clone())).await;
    let run = ("test-node".to_owned(), incarnation);
    second
        .cp
        .wait_for("the first run's records", |r| {
            r.applied.get(&run).is_some_and(|m| m.len() == 3)
        })
        .await;
    assert!(second.cp.with(|r| r.refused_incarnations.is_empty()));
    second.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_full_spool_refuses_requests_with_503_when_told_to_and_serves_them_otherwise() {
    let upstream = EchoUpstream::start().await;
    for (on_full, expected) in [
        (sluice_proxy::spool::OnFull::Refuse, 503u16),
        (sluice_proxy::spool::OnFull::Serve, 200u16),
    ] {
        let data = tempfile::tempdir().unwrap();
        let h = Harness::start_with(echo_snapshot(&upstream), |c| {
            c.data_dir = Some(data.path().to_owned());
            // Smaller than the segment headers written at start: full from the first request.
            c.usage_spool_max_bytes = 1;
            c.usage_spool_full = on_full;
        })
        .await;
        let seen_before = upstream.seen().len();
        let response = h.chat(chat_body(false)).await;
        assert_eq!(response.status(), expected, "{on_full:?}");
        if expected == 503 {
            assert_eq!(response.headers()["retry-after"], "1");
            let body: serde_json::Value = response.json().await.unwrap();
            assert_eq!(body["error"]["code"], "usage_unrecordable");
            assert_eq!(upstream.seen().len(), seen_before, "no upstream call");
        }
        let text = h.metrics().await;
        assert!(
            text.contains(r#"sluice_usage_spool_unwritten_records_total{reason="full"} 1"#),
            "the request, once (its finish finds no room either, and is not counted again): \
             {text}"
        );
        // Either way the control plane still hears of the request.
        let records = h.records(1).await;
        assert_eq!(records[0].status_code, u32::from(expected));
        h.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn a_full_usage_queue_keeps_the_records_its_spool_holds_until_the_control_plane_is_back() {
    let upstream = EchoUpstream::start().await;
    let data = tempfile::tempdir().unwrap();
    // The control plane takes nothing (it is away, as far as the replica can tell) while
    // three times the queue's capacity is served.
    let cp = FakeControlPlane::start().await;
    cp.set_ack_usage(false);
    let h = Harness::start_on(cp, echo_snapshot(&upstream), |c| {
        c.data_dir = Some(data.path().to_owned());
        c.usage_queue = 20;
    })
    .await;
    for _ in 0..60 {
        assert_eq!(h.chat(chat_body(false)).await.status(), 200);
    }
    // It comes back: every record goes, none was dropped from the queue while on disk.
    h.cp.set_ack_usage(true);
    h.cp.kill_streams();
    h.cp.wait_for("all 60 records applied", |r| r.records().len() == 60)
        .await;
    assert_eq!(
        metric(&h.metrics().await, "sluice_usage_dropped_records_total"),
        Some(0.0)
    );
    h.shutdown().await.unwrap();
}

/// What a request in flight is charged should its replica die now (a crash, an OOM kill) is
/// on disk before its upstream is called: its last attempt's start carries its prompt's
/// estimate at that attempt's route's prices, and the fee for the request itself of an
/// earlier attempt that may have been billed it (here a primary that timed out). A replay
/// reads that start as the interrupted request's record.
#[tokio::test]
async fn a_request_in_flight_is_on_disk_at_what_its_replicas_death_would_charge() {
    use sluice_e2e::mock::{Fault, MockConfig, MockServer};
    let primary = MockServer::start_local(MockConfig::named("primary")).unwrap();
    let fallback = MockServer::start_local(MockConfig::named("fallback")).unwrap();
    primary.set_fault(Fault::DelayMs(3_000).always());
    fallback.set_fault(Fault::DelayMs(30_000).always());
    let mut message = snapshot(
        1,
        vec![
            backend("primary", &primary.base_url(), proto::Pool::Primary, 0),
            backend("fallback", &fallback.base_url(), proto::Pool::Fallback, 0),
        ],
    );
    // The primary bills $30 a thousand requests; the fallback $2 a million prompt tokens.
    message.backends[0].models[0].call_prices = vec![proto::CallPrice {
        tool: "request".into(),
        price_per_thousand_calls: 30.0,
    }];
    message.backends[1].models[0].input_price_per_mtok = 2.0;
    let settings = message.settings.as_mut().unwrap();
    settings.answer_timeout = Some(sluice_proxy::clock::proto_duration(Duration::from_millis(
        300,
    )));
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_owned();
    let run = Harness::start_with(message, |c| c.data_dir = Some(dir.clone())).await;
    let url = run.url("/v1/chat/completions");
    let http = run.http.clone();
    let in_flight = tokio::spawn(async move {
        http.post(url)
            .bearer_auth(support::harness::KEY)
            .json(&chat_body(false))
            .send()
            .await
    });
    // The primary timed out; the fallback holds the request.
    for _ in 0..500 {
        if fallback.stats().faults_applied > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(fallback.stats().faults_applied, 1, "the fallback holds it");
    let spool = dir.join("usage-spool");
    let incarnation = std::fs::read_dir(&spool)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let replay = sluice_proxy::spool::replay::read(&incarnation).unwrap();
    assert!(replay.finished.is_empty());
    assert_eq!(replay.interrupted.len(), 1, "{replay:?}");
    let record = &replay.interrupted[0];
    let estimate = (serde_json::to_vec(&chat_body(false)).unwrap().len() as u64).div_ceil(4);
    assert_eq!(
        (
            record.backend_id.as_str(),
            record.attempts,
            record.prompt_tokens
        ),
        ("fallback", 2, estimate)
    );
    assert!(record.tokens_estimated && record.priced, "{record:?}");
    assert_eq!(
        record.cost_nanos,
        estimate * 2_000 + 30_000_000,
        "{record:?}"
    );
    assert_eq!(record.completion_tokens, 0);
    in_flight.abort();
    drop(run);
}
