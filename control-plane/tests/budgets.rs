//! Key budgets and spend over real gRPC: what replicas report as each request's cost is
//! added to the key's spend exactly once, per budget period, and shown with what remains
//! and when it resets.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use sluice_control::testing::{Bearer, TestControlPlane};
use sluice_proto::v1 as pb;
use sluice_proto::v1::admin_service_client::AdminServiceClient;
use sluice_proto::v1::data_plane_service_client::DataPlaneServiceClient;
use sluice_proto::wkt;
use tonic::Code;
use tonic::transport::Channel;

const DAY: i64 = 86_400_000;

async fn channel(cp: &TestControlPlane) -> Channel {
    Channel::from_shared(cp.grpc_url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn ts(ms: i64) -> Option<wkt::Timestamp> {
    Some(wkt::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    })
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn record(sequence: u64, key: &str, time_ms: i64, cost_nanos: u64) -> pb::UsageRecord {
    pb::UsageRecord {
        sequence,
        request_id: format!("req-{sequence}"),
        model: "m".into(),
        client_key_id: key.into(),
        prompt_tokens: 10,
        completion_tokens: 5,
        status_code: 200,
        time: ts(time_ms),
        cost_nanos,
        ..Default::default()
    }
}

/// A key with a lifetime budget of 0.001 (1,000,000 nano-units).
async fn capped_key(cp: &TestControlPlane) -> pb::ClientKey {
    AdminServiceClient::with_interceptor(channel(cp).await, Bearer(cp.admin_token.clone()))
        .create_client_key(pb::CreateClientKeyRequest {
            name: "capped".into(),
            max_budget: 0.001,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .client_key
        .unwrap()
}

type DataPlane =
    DataPlaneServiceClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>;

async fn data_plane(cp: &TestControlPlane) -> DataPlane {
    DataPlaneServiceClient::with_interceptor(channel(cp).await, Bearer(cp.dataplane_token.clone()))
}

/// Replica `r1` (incarnation `i1`)'s snapshot stream, accepting allowances, asking for
/// `key`'s.
struct Asking {
    tx: tokio::sync::mpsc::Sender<pb::StreamSnapshotsRequest>,
    stream: tonic::Streaming<pb::StreamSnapshotsResponse>,
    key: String,
}

impl Asking {
    async fn open(dp: &mut DataPlane, key: &str) -> Self {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(pb::StreamSnapshotsRequest {
            node_id: "r1".into(),
            incarnation: "i1".into(),
            accepts_allowances: true,
            allowance_lease: Some(wkt::Duration {
                seconds: 60,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap();
        let stream = dp
            .stream_snapshots(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        Self {
            tx,
            stream,
            key: key.into(),
        }
    }

    /// The stream's first snapshot, after the message saying the control plane grants
    /// allowances (sent first, alone).
    async fn first_snapshot(&mut self) -> pb::Snapshot {
        let on = self.stream.message().await.unwrap().unwrap();
        assert!(on.snapshot.is_none() && on.allowances.is_some(), "{on:?}");
        self.stream
            .message()
            .await
            .unwrap()
            .unwrap()
            .snapshot
            .unwrap()
    }

    /// Asks for `want_nanos`; the grant that answers it.
    async fn ask(&mut self, want_nanos: u64) -> pb::Allowance {
        self.tx
            .send(pb::StreamSnapshotsRequest {
                node_id: "r1".into(),
                allowance_requests: vec![pb::AllowanceRequest {
                    client_key_id: self.key.clone(),
                    want_nanos,
                    debt_nanos: 0,
                }],
                ..Default::default()
            })
            .await
            .unwrap();
        loop {
            let m = self.stream.message().await.unwrap().unwrap();
            if let Some(update) = m.allowances
                && let Some(grant) = update.allowances.into_iter().next()
            {
                return grant;
            }
        }
    }
}

/// Replica `r1` reports `records` (incarnation `i1`); returns once they are acked.
async fn report(dp: &mut DataPlane, records: Vec<pb::UsageRecord>) {
    let last = records.last().map_or(0, |r| r.sequence);
    let mut acks = dp
        .report_usage(tokio_stream::iter(vec![pb::ReportUsageRequest {
            node_id: "r1".into(),
            incarnation: "i1".into(),
            records,
            ..Default::default()
        }]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(acks.message().await.unwrap().unwrap().acked_sequence, last);
}

#[tokio::test]
async fn spend_is_the_reported_cost_counted_once_per_period_with_what_remains() {
    let dir = tempfile::tempdir().unwrap();
    let cp = TestControlPlane::start(dir.path()).await.unwrap();
    let channel = channel(&cp).await;
    let mut admin =
        AdminServiceClient::with_interceptor(channel.clone(), Bearer(cp.admin_token.clone()));
    let mut dp =
        DataPlaneServiceClient::with_interceptor(channel, Bearer(cp.dataplane_token.clone()));
    let create =
        |name: &str, max_budget: f64, period: pb::BudgetPeriod| pb::CreateClientKeyRequest {
            name: name.into(),
            max_budget,
            budget_period: period as i32,
            ..Default::default()
        };
    let team = admin
        .create_client_key(create("team-a", 1.0, pb::BudgetPeriod::Daily))
        .await
        .unwrap()
        .into_inner()
        .client_key
        .unwrap();
    assert_eq!(
        (team.max_budget, team.spend, team.remaining_budget),
        (1.0, 0.0, 1.0)
    );
    let free = admin
        .create_client_key(create("free", 0.0, pb::BudgetPeriod::Unspecified))
        .await
        .unwrap()
        .into_inner()
        .client_key
        .unwrap();

    // Today 0.3 + 0.2 of the currency, yesterday 0.4; the free key 5 nano-units. Sent twice
    // (a replica resending after a lost ack): counted once.
    let now = now_ms();
    let records = vec![
        record(1, &team.id, now, 300_000_000),
        record(2, &team.id, now, 200_000_000),
        record(3, &team.id, now - DAY, 400_000_000),
        record(4, &free.id, now, 5),
    ];
    for _ in 0..2 {
        let request = pb::ReportUsageRequest {
            node_id: "n1".into(),
            incarnation: "i1".into(),
            records: records.clone(),
            ..Default::default()
        };
        let mut acks = dp
            .report_usage(tokio_stream::iter(vec![request]))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(acks.message().await.unwrap().unwrap().acked_sequence, 4);
    }

    let get = |id: &str| pb::GetClientKeyRequest { id: id.into() };
    let team_now = admin
        .get_client_key(get("team-a"))
        .await
        .unwrap()
        .into_inner()
        .client_key
        .unwrap();
    assert_eq!(team_now.spend, 0.5, "today's spend only, and once");
    assert_eq!(team_now.remaining_budget, 0.5);
    assert_eq!(team_now.budget_period, pb::BudgetPeriod::Daily as i32);
    let tomorrow = (now.div_euclid(DAY) + 1) * DAY;
    assert_eq!(
        team_now.budget_reset_time,
        ts(tomorrow),
        "the next UTC midnight"
    );
    let listed = admin
        .list_client_keys(pb::ListClientKeysRequest::default())
        .await
        .unwrap()
        .into_inner();
    let free_now = listed
        .client_keys
        .iter()
        .find(|k| k.name == "free")
        .unwrap();
    assert_eq!(
        free_now.spend, 5e-9,
        "spend is counted for keys without a budget too"
    );
    assert_eq!(
        (free_now.remaining_budget, free_now.budget_reset_time),
        (0.0, None)
    );

    // The key's lifetime holds yesterday too; a budget below the spend leaves nothing.
    let changed = admin
        .update_client_key(pb::UpdateClientKeyRequest {
            client_key: Some(pb::ClientKey {
                id: "team-a".into(),
                max_budget: 0.75,
                budget_period: pb::BudgetPeriod::Unspecified as i32,
                ..Default::default()
            }),
            update_mask: Some(wkt::FieldMask {
                paths: vec!["max_budget".into(), "budget_period".into()],
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .client_key
        .unwrap();
    assert_eq!((changed.spend, changed.max_budget), (0.9, 0.75));
    assert_eq!(
        (changed.remaining_budget, changed.budget_reset_time),
        (0.0, None)
    );

    // Budgets that are not amounts, and periods that do not exist, are refused by name.
    for (max_budget, period, says) in [
        (-1.0, 0, "max_budget"),
        (f64::NAN, 0, "max_budget"),
        (2e9, 0, "max_budget"),
        (1.0, 9, "budget_period"),
    ] {
        let err = admin
            .create_client_key(pb::CreateClientKeyRequest {
                name: "bad".into(),
                max_budget,
                budget_period: period,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains(says), "{}", err.message());
    }
}

/// The allowance protocol over real gRPC: a replica that accepts allowances hears so before
/// its first snapshot, gets grants on its snapshot stream from what remains of the budget,
/// is told `exhausted` when that cannot cover its ask, and has its ingested records charged
/// to its grants (so what it spent is not counted twice); an older replica sees snapshots
/// only.
#[tokio::test]
async fn allowances_are_granted_on_the_snapshot_stream_from_what_remains() {
    let dir = tempfile::tempdir().unwrap();
    let cp = TestControlPlane::start(dir.path()).await.unwrap();
    let key = capped_key(&cp).await;
    let mut dp = data_plane(&cp).await;

    // An older replica: snapshots only.
    let (old_tx, old_rx) = tokio::sync::mpsc::channel(4);
    old_tx
        .send(pb::StreamSnapshotsRequest {
            node_id: "old".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut old = dp
        .stream_snapshots(tokio_stream::wrappers::ReceiverStream::new(old_rx))
        .await
        .unwrap()
        .into_inner();
    let first = old.message().await.unwrap().unwrap();
    assert!(first.snapshot.is_some() && first.allowances.is_none());

    let mut r1 = Asking::open(&mut dp, &key.id).await;
    let snapshot = r1.first_snapshot().await;
    let listed = snapshot
        .client_keys
        .iter()
        .find(|k| k.id == key.id)
        .unwrap();
    assert_eq!(
        listed.budget_period_start.as_ref().map(|t| t.seconds),
        Some(0),
        "a lifetime budget's period starts at the epoch: replicas void its money as the \
         grant engine does"
    );
    // 1/64 of the budget for the one replica asking.
    let grant = r1.ask(10).await;
    assert_eq!((grant.granted_nanos, grant.exhausted), (15_625, false));
    // More than remains after it: refused.
    let grant = r1.ask(984_376).await;
    assert_eq!((grant.granted_nanos, grant.exhausted), (0, true));

    // The replica spends its grant; once the record is ingested (acked), it no longer
    // counts as held, and what remains is exactly the budget less the spend.
    report(&mut dp, vec![record(1, &key.id, now_ms(), 15_625)]).await;
    let grant = r1.ask(984_375).await;
    assert_eq!((grant.granted_nanos, grant.exhausted), (984_375, false));
    assert!(r1.ask(1).await.exhausted, "everything is granted");
    drop(old_tx);
}

/// What a key shows (`GetClientKey`, so `sluicectl key get` and the dashboard) held by data
/// planes is what the grant engine counts as theirs and not seen spent: granted, it is
/// held; once the records spending it are ingested, it is not. A key refused with budget
/// left (the money held by other replicas) showed only "remaining" before, like a spent one.
#[tokio::test]
async fn a_key_shows_what_data_planes_hold_of_its_budget() {
    let dir = tempfile::tempdir().unwrap();
    let cp = TestControlPlane::start(dir.path()).await.unwrap();
    let key = capped_key(&cp).await;
    let mut dp = data_plane(&cp).await;
    let mut admin =
        AdminServiceClient::with_interceptor(channel(&cp).await, Bearer(cp.admin_token.clone()));
    let mut held = async || {
        let shown = admin
            .get_client_key(pb::GetClientKeyRequest { id: key.id.clone() })
            .await
            .unwrap()
            .into_inner()
            .client_key
            .unwrap();
        (
            (shown.held_by_data_planes * 1e9).round() as u64,
            shown.remaining_budget,
        )
    };
    assert_eq!(held().await.0, 0);
    let mut r1 = Asking::open(&mut dp, &key.id).await;
    r1.first_snapshot().await;
    assert_eq!(r1.ask(10).await.granted_nanos, 15_625);
    assert_eq!(held().await, (15_625, 0.001));
    report(&mut dp, vec![record(1, &key.id, now_ms(), 10_000)]).await;
    let (held_now, remaining) = held().await;
    assert_eq!(held_now, 5_625);
    assert!((remaining - 0.00099).abs() < 1e-12, "{remaining}");
    // A lowered budget voids the grants (the replica's pool, the engine's at its next ask):
    // shown held no more, though no ask has come yet.
    AdminServiceClient::with_interceptor(channel(&cp).await, Bearer(cp.admin_token.clone()))
        .update_client_key(pb::UpdateClientKeyRequest {
            client_key: Some(pb::ClientKey {
                id: key.id.clone(),
                max_budget: 0.0009,
                ..Default::default()
            }),
            update_mask: Some(wkt::FieldMask {
                paths: vec!["max_budget".into()],
            }),
        })
        .await
        .unwrap();
    assert_eq!(held().await.0, 0);
}

/// A replica's ack of a snapshot is stored off its stream: while another writer holds the
/// database (a long commit, a disk's stalled fsync, here an operator's shell), the replica's
/// next ask is answered at once, not after the ack's write (with the write awaited in the
/// stream's loop, the ask waited for the lock: a budgeted request past `--allowance-wait` got
/// 503 `budget_unavailable`). The ack is stored once the lock is released.
#[tokio::test]
async fn a_grant_does_not_wait_for_the_ack_before_it_to_be_stored() {
    let dir = tempfile::tempdir().unwrap();
    let cp = TestControlPlane::start(dir.path()).await.unwrap();
    let key = capped_key(&cp).await;
    let mut dp = data_plane(&cp).await;
    let mut r1 = Asking::open(&mut dp, &key.id).await;
    let snapshot = r1.first_snapshot().await;

    let holder = rusqlite::Connection::open(dir.path().join("sluice.db")).unwrap();
    holder.execute_batch("BEGIN IMMEDIATE").unwrap();
    r1.tx
        .send(pb::StreamSnapshotsRequest {
            node_id: "r1".into(),
            version: snapshot.version,
            response_nonce: snapshot.nonce.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let grant = tokio::time::timeout(std::time::Duration::from_secs(2), r1.ask(10))
        .await
        .expect("the ask was answered while the ack's write waited for the lock");
    assert_eq!((grant.granted_nanos, grant.exhausted), (15_625, false));
    holder.execute_batch("COMMIT").unwrap();

    let acked = || {
        holder
            .query_row(
                "SELECT acked_version FROM data_planes WHERE node_id = 'r1'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .unwrap()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while acked() != snapshot.version as i64 {
        assert!(
            std::time::Instant::now() < deadline,
            "the ack was never stored"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A request a replica served outside any allowance (its key had no budget when it was
/// admitted: a budget removed and set again, or set while it ran) counts in the key's spend
/// but took nothing from the replica's pool: it is not charged against the grants. Charged,
/// it made the replica's pool look spent while the replica still held it, and the key could
/// pass its budget by what the pools held.
#[tokio::test]
async fn a_request_served_outside_any_allowance_is_not_charged_to_the_grants() {
    let dir = tempfile::tempdir().unwrap();
    let cp = TestControlPlane::start(dir.path()).await.unwrap();
    let key = capped_key(&cp).await;
    let mut dp = data_plane(&cp).await;
    let mut r1 = Asking::open(&mut dp, &key.id).await;
    assert_eq!(r1.ask(10).await.granted_nanos, 15_625);
    // Served unbudgeted: 500,000 spent, none of it from the pool of 15,625 it still holds.
    let unbudgeted = pb::UsageRecord {
        unbudgeted: true,
        ..record(1, &key.id, now_ms(), 500_000)
    };
    report(&mut dp, vec![unbudgeted]).await;
    // What remains: the budget, less the spend, less the pool the replica still holds.
    assert!(r1.ask(484_376).await.exhausted);
    let grant = r1.ask(484_375).await;
    assert_eq!((grant.granted_nanos, grant.exhausted), (484_375, false));
}
