//! The usage reporter against an in-process control plane: batching, acks, resending after a
//! broken stream without loss or duplicates, immediate backend events, and the final flush.

use crate::support;

use std::time::{Duration, SystemTime};

use sluice_proto::v1::{BackendEvent, UsageRecord};
use sluice_proxy::clock::timestamp;
use sluice_proxy::control::{self, NodeIdentity};
use sluice_proxy::usage::{UsageReporter, UsageSink};
use support::control_plane::{FakeControlPlane, TOKEN};
use tokio_util::sync::CancellationToken;

fn record(i: u64) -> UsageRecord {
    UsageRecord {
        request_id: format!("req-{i}"),
        model: "m".into(),
        prompt_tokens: i,
        ..Default::default()
    }
}

fn start(
    cp: &FakeControlPlane,
    sink: &UsageSink,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let client = control::usage_client(&cp.url(), Some(TOKEN), None).unwrap();
    let unacknowledged = BackendEvent {
        backend_id: "b1".into(),
        cooldown_until: Some(timestamp(SystemTime::now() + Duration::from_secs(60))),
        ..Default::default()
    };
    let reporter = UsageReporter::new(sink.clone(), client, NodeIdentity::new(Some("n1".into())))
        .resend_events_with(Box::new(move || vec![unacknowledged.clone()]));
    let stop = CancellationToken::new();
    let handle = tokio::spawn(reporter.run(stop.clone()));
    (stop, handle)
}

fn applied_sequences(cp: &FakeControlPlane) -> Vec<u64> {
    cp.with(|r| r.records().iter().map(|x| x.sequence).collect())
}

#[tokio::test]
async fn records_arrive_once_even_when_the_stream_breaks() {
    let cp = FakeControlPlane::start().await;
    let sink = UsageSink::new(100_000);
    let (stop, handle) = start(&cp, &sink);

    for i in 1..=2500 {
        sink.record(record(i));
    }
    cp.wait_for("2500 applied", |r| r.records().len() == 2500)
        .await;
    assert_eq!(applied_sequences(&cp), (1..=2500).collect::<Vec<_>>());

    // The control plane receives but never acks, then the stream breaks.
    cp.set_ack_usage(false);
    for i in 2501..=3000 {
        sink.record(record(i));
    }
    cp.wait_for("unacked batch received", |r| {
        r.received_sequences.contains(&3000)
    })
    .await;
    assert_eq!(sink.pending(), 500);
    cp.set_ack_usage(true);
    cp.kill_streams();

    cp.wait_for("3000 applied", |r| r.records().len() == 3000)
        .await;
    assert_eq!(applied_sequences(&cp), (1..=3000).collect::<Vec<_>>());
    cp.with(|r| {
        let resent = r.received_sequences.iter().filter(|s| **s == 3000).count();
        assert_eq!(resent, 2, "the unacked records were sent twice");
        let record = r.records()[41];
        assert_eq!(
            (record.request_id.as_str(), record.prompt_tokens),
            ("req-42", 42)
        );
        assert_eq!(r.applied.keys().next().unwrap().0, "n1");
    });
    stop.cancel();
    handle.await.unwrap();
}

/// Polls `condition` every 5 ms for up to 10 s.
async fn eventually(what: &str, condition: impl Fn() -> bool) {
    let wait = async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

#[tokio::test]
async fn an_idle_reporter_waits_without_its_timer_until_the_next_record_wakes_it() {
    let cp = FakeControlPlane::start().await;
    let sink = UsageSink::new(100);
    let (stop, handle) = start(&cp, &sink);

    sink.record(record(1));
    cp.wait_for("the first record", |r| r.records().len() == 1)
        .await;
    // Acked, nothing left to send: the reporter waits without its flush timer (and no ack
    // is on its way to wake it).
    eventually("an idle reporter", || {
        sink.pending() == 0 && sink.reporter_idle()
    })
    .await;

    // The next record wakes it, and goes out as the first did; then it is idle again.
    sink.record(record(2));
    cp.wait_for("the record after the idle spell", |r| {
        r.records().len() == 2
    })
    .await;
    eventually("an idle reporter again", || {
        sink.pending() == 0 && sink.reporter_idle()
    })
    .await;
    for i in 3..=5 {
        sink.record(record(i));
    }
    cp.wait_for("three records together", |r| r.records().len() == 5)
        .await;
    assert_eq!(applied_sequences(&cp), (1..=5).collect::<Vec<_>>());

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), handle)
        .await
        .unwrap()
        .unwrap();
}

/// A backend event goes out at once, not at the records' flush: the other replicas hear of a
/// 429 as soon as the control plane can tell them. With records held for a minute, an event
/// recorded while the reporter waits (after a first one went out) arrives within the wait's
/// 10 s.
#[tokio::test]
async fn a_backend_event_does_not_wait_for_the_records_flush() {
    let cp = FakeControlPlane::start().await;
    let sink = UsageSink::new(100);
    let client = control::usage_client(&cp.url(), Some(TOKEN), None).unwrap();
    let reporter = UsageReporter::new(sink.clone(), client, NodeIdentity::new(Some("n1".into())))
        .flush_every(Duration::from_secs(60));
    let stop = CancellationToken::new();
    let handle = tokio::spawn(reporter.run(stop.clone()));
    cp.wait_for("usage stream", |r| r.usage_streams == 1).await;
    let event = |backend: &str| BackendEvent {
        backend_id: backend.into(),
        cooldown_until: Some(timestamp(SystemTime::now() + Duration::from_secs(60))),
        ..Default::default()
    };
    // The first may go with what waited for the stream; once it has, the reporter waits.
    sink.event(event("b1"));
    cp.wait_for("first event", |r| {
        r.events.iter().any(|e| e.backend_id == "b1")
    })
    .await;
    sink.event(event("b2"));
    cp.wait_for("second event", |r| {
        r.events.iter().any(|e| e.backend_id == "b2")
    })
    .await;
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), handle)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn backend_events_go_out_at_once_and_shutdown_flushes() {
    let cp = FakeControlPlane::start().await;
    let sink = UsageSink::new(100);
    let (stop, handle) = start(&cp, &sink);
    cp.wait_for("usage stream", |r| r.usage_streams == 1).await;

    // The unacknowledged cooldown is told on connect, and a new event at once.
    cp.wait_for("resent event", |r| {
        r.events.iter().any(|e| e.backend_id == "b1")
    })
    .await;
    sink.event(BackendEvent {
        backend_id: "b2".into(),
        cooldown_until: Some(timestamp(SystemTime::now() + Duration::from_secs(60))),
        ..Default::default()
    });
    cp.wait_for("event", |r| r.events.iter().any(|e| e.backend_id == "b2"))
        .await;

    // And again to a reconnected control plane; the one sent on the old stream is not.
    cp.kill_streams();
    cp.wait_for("event again", |r| {
        r.events.iter().filter(|e| e.backend_id == "b1").count() == 2
    })
    .await;
    assert_eq!(
        cp.with(|r| r.events.iter().filter(|e| e.backend_id == "b2").count()),
        1
    );

    for i in 1..=7 {
        sink.record(record(i));
    }
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), handle)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(applied_sequences(&cp), (1..=7).collect::<Vec<_>>());
    assert_eq!(sink.pending(), 0);
}

/// A backend event made while the control plane is away (a 429 during its restart) reaches
/// it with the age it has when sent, not the age it had when made: the control plane dates
/// the event by its age, and one taken as new started the cooldown the upstream asked for
/// long before over again, for every replica.
#[tokio::test]
async fn an_event_that_waited_for_the_control_plane_arrives_with_its_whole_age() {
    let cp = FakeControlPlane::start().await;
    let addr = cp.addr;
    cp.stop().await;
    let sink = UsageSink::new(100);
    sink.event(BackendEvent {
        backend_id: "b2".into(),
        age: Some(sluice_proto::wkt::Duration {
            seconds: 0,
            nanos: 0,
        }),
        ..Default::default()
    });
    let waited = std::time::Instant::now();
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let cp = FakeControlPlane::start_at(addr).await;
    let (stop, handle) = start(&cp, &sink);
    cp.wait_for("the event", |r| {
        r.events.iter().any(|e| e.backend_id == "b2")
    })
    .await;
    let age = cp.with(|r| {
        r.events
            .iter()
            .find(|e| e.backend_id == "b2")
            .and_then(|e| e.age)
            .unwrap()
    });
    let age = Duration::new(age.seconds as u64, age.nanos as u32);
    assert!(age >= Duration::from_millis(1500), "{age:?}");
    assert!(age <= waited.elapsed(), "{age:?}");
    stop.cancel();
    handle.await.unwrap();
}

#[tokio::test]
async fn a_full_queue_drops_the_oldest_while_the_control_plane_is_away() {
    let cp = FakeControlPlane::start().await;
    let addr = cp.addr;
    cp.stop().await;
    let sink = UsageSink::new(10);
    for i in 1..=15 {
        sink.record(record(i));
    }
    assert_eq!(sink.dropped(), 5);

    let cp = FakeControlPlane::start_at(addr).await;
    let (stop, handle) = start(&cp, &sink);
    cp.wait_for("the 10 kept records", |r| r.records().len() == 10)
        .await;
    assert_eq!(applied_sequences(&cp), (6..=15).collect::<Vec<_>>());
    stop.cancel();
    handle.await.unwrap();
}

/// A record the control plane refuses, with a backlog behind it: the records after it go
/// alone, many reports queued on the stream before the refusal comes back. The control plane's refusal
/// ends the stream while the reporter is still sending, so its sends fail; what the stream's
/// end says decides (it used to be taken for a dropped connection: nothing was dropped, and
/// every reconnect sent the same record again, for ever).
#[tokio::test]
async fn a_refused_record_with_a_backlog_behind_it_is_dropped_and_the_backlog_delivered() {
    let cp = FakeControlPlane::start_with_report_limit(256 * 1024).await;
    let sink = UsageSink::new(100_000);
    for i in 1..=5_000 {
        let mut r = record(i);
        if i == 12 {
            r.model = "x".repeat(512 * 1024);
        }
        sink.record(r);
    }
    let (stop, handle) = start(&cp, &sink);
    cp.wait_for("the backlog behind the refused record delivered", |r| {
        r.records().len() == 4_999
    })
    .await;
    let expected: Vec<u64> = (1..=5_000).filter(|&i| i != 12).collect();
    assert_eq!(applied_sequences(&cp), expected);
    assert_eq!(sink.unsendable(), 1);
    stop.cancel();
    handle.await.unwrap();
    assert_eq!(sink.pending(), 0);
}

/// A record the control plane refuses (here: too large for its decode limit, as tonic refuses
/// it) must not hold back the records after it: it is sent alone, refused again, dropped and
/// counted, and everything else arrives exactly once.
#[tokio::test]
async fn a_record_the_control_plane_refuses_is_dropped_and_the_rest_delivered() {
    let cp = FakeControlPlane::start_with_report_limit(16 * 1024).await;
    let sink = UsageSink::new(100_000);
    for i in 1..=30 {
        let mut r = record(i);
        if i == 12 {
            r.model = "x".repeat(64 * 1024);
        }
        sink.record(r);
    }
    let (stop, handle) = start(&cp, &sink);
    cp.wait_for("29 records applied", |r| r.records().len() == 29)
        .await;
    let expected: Vec<u64> = (1..=30).filter(|&i| i != 12).collect();
    assert_eq!(applied_sequences(&cp), expected);
    assert_eq!(sink.unsendable(), 1);
    // Batching resumes after the refused record: later records go in one report again.
    let streams = cp.with(|r| r.usage_streams);
    for i in 31..=40 {
        sink.record(record(i));
    }
    cp.wait_for("39 records applied", |r| r.records().len() == 39)
        .await;
    assert_eq!(
        cp.with(|r| r.usage_streams),
        streams,
        "no refusal, no reconnect"
    );
    let reports = cp.with(|r| {
        r.reports
            .iter()
            .filter(|report| report.iter().any(|&s| s > 30))
            .count()
    });
    assert!(
        reports < 10,
        "ten records recorded at once went in {reports} reports: one each"
    );
    stop.cancel();
    handle.await.unwrap();
    assert_eq!(sink.pending(), 0);
}
