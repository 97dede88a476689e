//! End to end: a daily budget starts again at UTC midnight by the control plane's clock, at
//! every replica. The real control plane and three real replicas run with their wall clocks
//! moved (`--wall-clock-offset`, hidden, tests only) so that a UTC midnight comes a few
//! seconds into the test; nothing else is stood in for.

use crate::common;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{Cluster, Mock, Proxy, eventually};
use serde_json::Value;
use sluice_proto::v1 as pb;

const DAY_MS: i64 = 86_400_000;
/// From the test's start to the control plane's midnight: enough to start four processes and
/// spend a budget on a busy machine. The test fails, saying so, if it was not.
const UNTIL_MIDNIGHT: Duration = Duration::from_secs(10);
/// Route prices: $1 in, $2 out per million tokens (the harness's `add_backend`).
const INPUT_NANOS_PER_TOKEN: u64 = 1_000;
const OUTPUT_NANOS_PER_TOKEN: u64 = 2_000;

/// What the mock has served, in nano-units at the route's prices.
async fn mock_nanos(mock: &Mock) -> u64 {
    let served = mock.stats().await;
    served.prompt_tokens * INPUT_NANOS_PER_TOKEN + served.completion_tokens * OUTPUT_NANOS_PER_TOKEN
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Asks `replica` with `key` until it answers `status`; when it did.
async fn until_status(replica: &Proxy, key: &str, status: u16, what: &str) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = replica.chat(key, "m").await;
        if r.status() == status {
            r.bytes().await.unwrap();
            return Instant::now();
        }
        let other = r.status();
        let body = r.text().await.unwrap();
        assert!(
            other == 429 || other == 200,
            "{what}: answered {other}: {body}"
        );
        assert!(Instant::now() < deadline, "{what}: still {other}: {body}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// A key named `daily` with a daily budget of `max_budget`; its secret.
async fn daily_key(cluster: &Cluster, max_budget: f64) -> String {
    cluster
        .admin()
        .await
        .create_client_key(pb::CreateClientKeyRequest {
            name: "daily".into(),
            max_budget,
            budget_period: pb::BudgetPeriod::Daily as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .key
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_daily_budget_is_served_again_at_every_replica_when_the_control_planes_clock_passes_midnight()
 {
    // Every clock of the test runs `offset` ahead, so that UTC midnight comes UNTIL_MIDNIGHT
    // from now: `midnight` by those clocks, `midnight_here` by this test's monotonic clock.
    let real_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let midnight_here = Instant::now() + UNTIL_MIDNIGHT;
    let at_midnight = real_ms + UNTIL_MIDNIGHT.as_millis() as i64;
    let midnight = (at_midnight.div_euclid(DAY_MS) + 1) * DAY_MS;
    let offset = format!("--wall-clock-offset={}ms", midnight - at_midnight);
    let cluster = Cluster::start_with(&[&offset]).await;
    let mock = Mock::start("a", &["m"]).await;
    cluster
        .add_backend("a", &mock, pb::Pool::Primary, 0, &[("m", "m")])
        .await;
    let mut replicas = Vec::new();
    for _ in 0..3 {
        // A busy test machine must not turn a slow answer to an allowance ask into a 503.
        replicas.push(cluster.proxy_with(&[&offset, "--allowance-wait=5s"]).await);
    }
    // A daily budget of a handful of requests (a mock answer costs about 0.000014).
    let max_budget = 0.000_1;
    let key = daily_key(&cluster, max_budget).await;
    cluster.wait_replicas_current(3).await;

    // The key spends its day's budget and every replica refuses it, naming the reset.
    let first = &replicas[0];
    let mut served = 0;
    let refused = loop {
        let r = first.chat(&key, "m").await;
        if r.status() == 429 {
            break r;
        }
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
        r.bytes().await.unwrap();
        served += 1;
        assert!(served < 200, "never refused");
    };
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "insufficient_quota", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("it resets at {}.", rfc3339(midnight))),
        "{message}"
    );
    for (i, replica) in replicas.iter().enumerate() {
        until_status(replica, &key, 429, &format!("replica {i} before midnight")).await;
    }
    // Refused once what remains no longer covers a request (about 14 000 nano-units): the
    // replicas spend the budget from allowances (docs/guarantees.md, Budgets).
    let old_period = mock_nanos(&mock).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let before = loop {
        let state = cluster.client_key("daily").await;
        if (state.spend * 1e9).round() as u64 == old_period {
            break state;
        }
        assert!(Instant::now() < deadline, "spend never counted: {state:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(before.remaining_budget < 0.000_03, "{before:?}");
    assert_eq!(
        before.budget_reset_time.map(|t| t.seconds * 1000),
        Some(midnight)
    );
    assert!(
        Instant::now() < midnight_here,
        "setting up took longer than {UNTIL_MIDNIGHT:?}: the budget was spent after midnight; \
         raise UNTIL_MIDNIGHT"
    );

    // Midnight passes by the control plane's clock: every replica serves the key again, none
    // before midnight (all three asked at once until each serves, so none goes unasked until
    // midnight). Each serves one request, which the new day's budget covers.
    let (first_at, second_at, third_at) = tokio::join!(
        until_status(&replicas[0], &key, 200, "replica 0 after midnight"),
        until_status(&replicas[1], &key, 200, "replica 1 after midnight"),
        until_status(&replicas[2], &key, 200, "replica 2 after midnight"),
    );
    let mut last = midnight_here;
    for (i, at) in [first_at, second_at, third_at].into_iter().enumerate() {
        assert!(
            at + Duration::from_millis(20) >= midnight_here,
            "replica {i} served the key {:?} before midnight",
            midnight_here - at
        );
        last = last.max(at);
    }
    eprintln!(
        "midnight → the key served at all 3 replicas: {:?} (polled every 2 ms)",
        last - midnight_here
    );

    // Spend is the new day's: the three requests served since midnight, nothing of before.
    let new_period = mock_nanos(&mock).await - old_period;
    assert!(new_period > 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    let after = loop {
        let state = cluster.client_key("daily").await;
        if (state.spend * 1e9).round() as u64 == new_period {
            break state;
        }
        assert!(
            Instant::now() < deadline,
            "the new day's spend is {} nano-units, not the {new_period} served since midnight: \
             {state:?}",
            (state.spend * 1e9).round()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(after.spend < max_budget, "{after:?}");
    assert!(
        (after.remaining_budget - (max_budget - after.spend)).abs() < 1e-12,
        "{after:?}"
    );
    assert_eq!(
        after.budget_reset_time.map(|t| t.seconds * 1000),
        Some(midnight + DAY_MS)
    );
}

/// A replica whose clock is a day behind the control plane's spends today's budget: its
/// records, dated yesterday by its clock, name the period whose allowance paid for them, and
/// are filed in today's spend. Filed by their date, they were counted in no live period, and
/// the control plane's restart (any reconnect of the replica) forgot the money they took:
/// the key was served its budget again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_a_day_behind_spends_the_budget_of_the_control_planes_day() {
    let mut cluster = Cluster::start().await;
    let mock = Mock::start("a", &["m"]).await;
    cluster
        .add_backend("a", &mock, pb::Pool::Primary, 0, &[("m", "m")])
        .await;
    let replica = cluster
        .proxy_with(&["--wall-clock-offset=-24h", "--allowance-wait=5s"])
        .await;
    let max_budget = 0.000_1;
    let key = daily_key(&cluster, max_budget).await;
    cluster.wait_replicas_current(1).await;
    until_status(&replica, &key, 429, "the budget spent").await;
    let served = mock_nanos(&mock).await;
    assert!(served > 0);
    eventually(
        Duration::from_secs(10),
        "today's spend to be what was served today",
        || async { (cluster.client_key("daily").await.spend * 1e9).round() as u64 == served },
    )
    .await;

    // The control plane restarts; the replica says hello again, holding what it holds now.
    cluster.stop_control().await;
    cluster.start_control().await;
    cluster.wait_replicas_current(1).await;
    for _ in 0..5 {
        let r = replica.chat(&key, "m").await;
        let status = r.status();
        let body = r.text().await.unwrap();
        assert_eq!(status, 429, "served past its spent budget: {body}");
    }
    assert_eq!(mock_nanos(&mock).await, served);
}
