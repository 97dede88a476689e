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

/// Held by each test: they all move the one clock of the process.
static CLOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

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
    let _clock = CLOCK.lock().await;
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
    let (waits, mut waiting) = tokio::sync::watch::channel(None);
    let resets = tokio::spawn(
        sluice_control::budget_resets::publish_budget_resets_telling(
            store.clone(),
            stop.clone(),
            move |midnight| {
                let _ = waits.send(Some(midnight));
            },
        ),
    );
    // The step comes once the task has read the clock and waits for that midnight: stepped
    // before, the test would pass without the fix.
    tokio::time::timeout(Duration::from_secs(10), waiting.wait_for(|w| w.is_some()))
        .await
        .expect("the reset task waits")
        .unwrap();
    assert_eq!(
        *waiting.borrow(),
        Some(midnight),
        "it waits for the midnight two hours off"
    );
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
    // Expired for 29 days it is still there, refused as expired; past 30, a version of its
    // own leaves it out (the room it took free at once, not at some later change), so that
    // keys issued to expire do not fill the snapshot for good; and a step back of the clock
    // does not bring it back.
    let left_out =
        |snapshot: &sluice_proto::v1::Snapshot| snapshot.client_keys.iter().all(|k| k.id != key.id);
    skew_wall_clock(offset_to(at + 29 * DAY));
    assert_eq!(store.publish_key_expiries(now_ms()).await.unwrap(), 0);
    assert!(expired(
        &sluice_control::snapshot::build(&store, "e").await.unwrap()
    ));
    assert_eq!(
        store.next_key_expiry().await.unwrap(),
        Some(at + 30 * DAY),
        "the publisher wakes when it leaves"
    );
    skew_wall_clock(offset_to(at + 31 * DAY));
    let before = store.committed_version();
    assert_eq!(store.publish_key_expiries(now_ms()).await.unwrap(), 1);
    assert!(store.committed_version() > before);
    assert!(
        left_out(&sluice_control::snapshot::build(&store, "e").await.unwrap()),
        "a key expired a month ago still in the snapshot"
    );
    skew_wall_clock(offset_to(at + 29 * DAY));
    assert!(left_out(
        &sluice_control::snapshot::build(&store, "e").await.unwrap()
    ));
    skew_wall_clock(0);
}

/// A replica cut off keeps spending what it holds for its lease, timed by its own monotonic
/// clock. The control plane timed that lease on its wall clock: a step forward past it
/// (here 2 minutes, a second after the replica left) dropped the replica's money from what is
/// outstanding and granted it again, the budget overspent by that much.
#[tokio::test]
async fn a_step_of_the_clock_does_not_end_a_cut_off_replicas_lease() {
    use sluice_control::testing::{Bearer, TestControlPlane};
    use sluice_proto::v1 as pb;
    use sluice_proto::v1::admin_service_client::AdminServiceClient;
    use sluice_proto::v1::data_plane_service_client::DataPlaneServiceClient;

    let _clock = CLOCK.lock().await;
    skew_wall_clock(0);
    let dir = tempfile::tempdir().unwrap();
    let cp = TestControlPlane::start(dir.path()).await.unwrap();
    let channel = tonic::transport::Channel::from_shared(cp.grpc_url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut admin =
        AdminServiceClient::with_interceptor(channel.clone(), Bearer(cp.admin_token.clone()));
    let key = admin
        .create_client_key(pb::CreateClientKeyRequest {
            name: "capped".into(),
            max_budget: 0.000_006_4, // 6,400 nano-units: grants of 100 at most
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .client_key
        .unwrap();
    let dp = DataPlaneServiceClient::with_interceptor(channel, Bearer(cp.dataplane_token.clone()));
    // One replica's allowance stream: its hello, then each ask answered by a grant.
    let replica = |node: &'static str, want_nanos: u64| {
        let mut dp = dp.clone();
        let key_id = key.id.clone();
        async move {
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            tx.send(pb::StreamSnapshotsRequest {
                node_id: node.into(),
                incarnation: "i".into(),
                accepts_allowances: true,
                allowance_lease: Some(sluice_proto::wkt::Duration {
                    seconds: 60,
                    nanos: 0,
                }),
                ..Default::default()
            })
            .await
            .unwrap();
            let mut stream = dp
                .stream_snapshots(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .unwrap()
                .into_inner();
            let mut ask = async move |want_nanos: u64| -> pb::Allowance {
                tx.send(pb::StreamSnapshotsRequest {
                    node_id: node.into(),
                    allowance_requests: vec![pb::AllowanceRequest {
                        client_key_id: key_id.clone(),
                        want_nanos,
                        debt_nanos: 0,
                    }],
                    ..Default::default()
                })
                .await
                .unwrap();
                loop {
                    let m = stream.message().await.unwrap().unwrap();
                    if let Some(update) = m.allowances
                        && let Some(grant) = update.allowances.into_iter().next()
                    {
                        return grant;
                    }
                }
            };
            let first = ask(want_nanos).await;
            (first, ask)
        }
    };
    {
        let (grant, _cut_off) = replica("r0", 10).await;
        assert_eq!((grant.granted_nanos, grant.exhausted), (100, false));
    }
    // Its stream closed: the control plane counts it as gone (and its lease as running) once
    // the registry says so.
    loop {
        let planes = admin
            .list_data_planes(pb::ListDataPlanesRequest {})
            .await
            .unwrap()
            .into_inner()
            .data_planes;
        if planes.iter().any(|p| p.node_id == "r0" && !p.connected) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    skew_wall_clock(120_000);
    // The whole budget: only if r0's 100 were forgotten.
    let (grant, _) = replica("r1", 6_400).await;
    skew_wall_clock(0);
    assert_eq!(
        (grant.granted_nanos, grant.exhausted),
        (0, true),
        "r0 still holds its 100 for its lease: 6,300 are left"
    );
}
