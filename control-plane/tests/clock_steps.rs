//! The control plane's own wall clock stepping (an NTP correction, a resume from suspend, a
//! start before the clock was set): what it decides by that clock (budget resets at UTC
//! midnight, key expiries) still happens once, when the clock says, and stays decided. A
//! test binary of its own: the clock offset ([`skew_wall_clock`]) is the whole process's, so
//! its steps run one after the other in one test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use sluice_control::budget::BudgetPeriod;
use sluice_control::client_key::NewClientKey;
use sluice_control::crypto::MasterKey;
use sluice_control::store::Store;
use sluice_control::time::{now_ms, skew_wall_clock};
use tokio_util::sync::CancellationToken;

const DAY: i64 = 86_400_000;

/// The offset that makes the wall clock read `at` (Unix ms) now.
fn offset_to(at: i64) -> i64 {
    skew_wall_clock(0);
    at - now_ms()
}

async fn a_new_version(store: &Store, after: u64, within: Duration) -> bool {
    let mut commits = store.commits();
    tokio::time::timeout(within, commits.wait_for(|v| *v > after))
        .await
        .is_ok()
}

#[tokio::test]
async fn decisions_by_the_wall_clock_survive_its_steps() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(&dir.path().join("t.db"), MasterKey::generate()).unwrap();
    store
        .create_client_key(NewClientKey {
            name: "daily".into(),
            max_budget_nanos: 1_000,
            budget_period: BudgetPeriod::Daily,
            ..NewClientKey::default()
        })
        .await
        .unwrap();

    // The budget reset: the task waits for a midnight two hours off, then the clock is
    // stepped forward to two seconds before it. The reset comes at midnight by the clock,
    // not two hours of timer later.
    let midnight = (now_ms().div_euclid(DAY) + 10) * DAY;
    let offset = offset_to(midnight - 2 * 3_600_000);
    skew_wall_clock(offset);
    let stop = CancellationToken::new();
    let resets = tokio::spawn(sluice_control::budget_resets::publish_budget_resets(
        store.clone(),
        stop.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = store.committed_version();
    skew_wall_clock(offset + 2 * 3_600_000 - 2_000);
    assert!(
        a_new_version(&store, before, Duration::from_secs(10)).await,
        "no reset published at midnight after the clock stepped forward"
    );
    stop.cancel();
    resets.await.unwrap();

    // An expiry: published once when the key's time passes; a later snapshot built after the
    // clock stepped back before it still has the key expired (nothing would publish it again).
    let (key, _, _) = store
        .create_client_key(NewClientKey {
            name: "expiring".into(),
            expire_time_ms: Some(now_ms() + 1_000),
            ..NewClientKey::default()
        })
        .await
        .unwrap();
    let at = key.expire_time_ms.unwrap();
    assert_eq!(store.publish_key_expiries(at).await.unwrap(), 1);
    let expired = |snapshot: &sluice_proto::v1::Snapshot| {
        snapshot
            .client_keys
            .iter()
            .find(|k| k.id == key.id)
            .unwrap()
            .expired
    };
    skew_wall_clock(offset_to(at + 1));
    assert!(expired(
        &sluice_control::snapshot::build(&store, "e").await.unwrap()
    ));
    skew_wall_clock(offset_to(at - 600_000));
    assert!(
        expired(&sluice_control::snapshot::build(&store, "e").await.unwrap()),
        "an expiry taken back by a step of the clock"
    );
    skew_wall_clock(0);
}
