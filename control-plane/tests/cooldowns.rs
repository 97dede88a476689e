//! The control plane applying data planes' cooldown reports, over real gRPC: one count per
//! overload and epoch, the end of a streak, resets, and its own clock for every time it
//! stores (docs/guarantees.md, "Cooldowns").
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sluice_control::testing::TestControlPlane;
use sluice_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const BASE: Duration = Duration::from_secs(10);

/// A control plane with one backend (cooldown base 10 s), a replica's snapshot stream and a
/// report stream to it.
struct Setup {
    _dir: tempfile::TempDir,
    cp: TestControlPlane,
    backend_id: String,
    snapshots: tonic::Streaming<pb::StreamSnapshotsResponse>,
    _hello: mpsc::Sender<pb::StreamSnapshotsRequest>,
    reports: mpsc::Sender<pb::ReportUsageRequest>,
    _report_acks: tonic::Streaming<pb::ReportUsageResponse>,
}

impl Setup {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let cp = TestControlPlane::start(dir.path()).await.unwrap();
        let mut admin = cp.admin_client().await.unwrap();
        let backend_id = admin
            .create_backend(pb::CreateBackendRequest {
                backend: Some(pb::Backend {
                    name: "a".into(),
                    base_url: "https://api.example.com/v1".into(),
                    enabled: true,
                    models: vec![pb::ModelRoute {
                        name: "m".into(),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                api_key: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .backend
            .unwrap()
            .id;
        admin
            .update_settings(pb::UpdateSettingsRequest {
                settings: Some(pb::Settings {
                    cooldown_base: Some(BASE.into()),
                    cooldown_cap: Some(Duration::from_secs(600).into()),
                    ..Default::default()
                }),
                update_mask: Some(sluice_proto::wkt::FieldMask {
                    paths: vec!["cooldown_base".into(), "cooldown_cap".into()],
                }),
            })
            .await
            .unwrap();
        let mut dp = cp.data_plane_client().await.unwrap();
        // The stream lasts as long as its requests do.
        let (hello, requests) = mpsc::channel(1);
        hello
            .send(pb::StreamSnapshotsRequest {
                node_id: "replica-1".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        let snapshots = dp
            .stream_snapshots(ReceiverStream::new(requests))
            .await
            .unwrap()
            .into_inner();
        let (reports, rx) = mpsc::channel(16);
        let report_acks = dp
            .report_usage(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        Self {
            _dir: dir,
            cp,
            backend_id,
            snapshots,
            _hello: hello,
            reports,
            _report_acks: report_acks,
        }
    }

    /// Sends `events` as replica `node` would.
    async fn report(&self, node: &str, events: Vec<pb::BackendEvent>) {
        self.reports
            .send(pb::ReportUsageRequest {
                node_id: node.into(),
                incarnation: "inc".into(),
                records: vec![],
                events,
                previous_sequence: 0,
                database_id: String::new(),
            })
            .await
            .unwrap();
    }

    fn event(&self, kind: pb::BackendEventKind, basis: u64) -> pb::BackendEvent {
        pb::BackendEvent {
            backend_id: self.backend_id.clone(),
            kind: kind as i32,
            cooldown_epoch: Some(basis),
            reason: "429 from upstream".into(),
            ..Default::default()
        }
    }

    /// An admin's `sluicectl cooldown reset a`.
    async fn reset(&self) {
        self.cp
            .admin_client()
            .await
            .unwrap()
            .reset_cooldown(pb::ResetCooldownRequest {
                backend_id: "a".into(),
                model: String::new(),
            })
            .await
            .unwrap();
    }

    /// The backend as the first snapshot whose backend satisfies `done` shows it.
    async fn until(&mut self, done: impl Fn(&pb::SnapshotBackend) -> bool) -> pb::SnapshotBackend {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let snapshot = self.snapshots.message().await.unwrap().unwrap();
                let backend = snapshot.snapshot.unwrap().backends.remove(0);
                if done(&backend) {
                    return backend;
                }
            }
        })
        .await
        .expect("the snapshot within 10 s")
    }

    /// `ListCooldowns`: (streak, until − create_time) of the backend, if it cools down.
    async fn listed(&self) -> Option<(u32, Duration)> {
        let list = self
            .cp
            .admin_client()
            .await
            .unwrap()
            .list_cooldowns(pb::ListCooldownsRequest {})
            .await
            .unwrap()
            .into_inner();
        let c = list.cooldowns.first()?;
        let ms =
            |t: &sluice_proto::wkt::Timestamp| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000;
        let length = ms(c.until.as_ref().unwrap()) - ms(c.create_time.as_ref().unwrap());
        Some((
            c.consecutive_failures,
            Duration::from_millis(length.try_into().unwrap()),
        ))
    }
}

fn left(b: &pb::SnapshotBackend) -> Duration {
    b.cooldown_remaining
        .map(|d| Duration::try_from(d).unwrap())
        .unwrap_or_default()
}

#[tokio::test]
async fn an_overload_counts_once_per_epoch_and_a_success_ends_the_streak() {
    use pb::BackendEventKind::{RateLimited, Recovered};
    let mut s = Setup::start().await;
    let first = s.until(|b| b.cooldown_epoch == 0).await;
    assert_eq!(
        (first.consecutive_failures, first.cooldown_remaining),
        (0, None)
    );

    // One burst, seen by two replicas that both knew epoch 0: one count.
    s.report("replica-1", vec![s.event(RateLimited, 0)]).await;
    s.report("replica-2", vec![s.event(RateLimited, 0)]).await;
    let b = s.until(|b| b.cooldown_epoch == 1).await;
    assert_eq!(b.consecutive_failures, 1);
    assert!(
        left(&b) <= BASE && left(&b) > BASE - Duration::from_secs(2),
        "{b:?}"
    );
    assert_eq!(s.listed().await, Some((1, BASE)));

    // A success sent before the count says nothing; the next overload doubles, or takes
    // the upstream's Retry-After when that is longer.
    s.report("replica-2", vec![s.event(Recovered, 0)]).await;
    let mut limited = s.event(RateLimited, 1);
    limited.retry_after = Some(Duration::from_secs(30).into());
    s.report("replica-2", vec![limited]).await;
    let b = s.until(|b| b.cooldown_epoch >= 2).await;
    assert_eq!((b.cooldown_epoch, b.consecutive_failures), (2, 2));
    assert!(left(&b) > Duration::from_secs(28), "{b:?}");
    // Listed from when the first cooldown began, which was still running.
    let (streak, length) = s.listed().await.unwrap();
    assert_eq!(streak, 2);
    assert!(length >= Duration::from_secs(30) && length < Duration::from_secs(31));

    // A success sent with the current epoch ends the streak; the cooldown runs out.
    s.report("replica-1", vec![s.event(Recovered, 2)]).await;
    let b = s.until(|b| b.cooldown_epoch == 3).await;
    assert_eq!(b.consecutive_failures, 0);
    assert!(left(&b) > Duration::from_secs(20), "{b:?}");
    let (streak, _) = s.listed().await.unwrap();
    assert_eq!(streak, 0);
}

#[tokio::test]
async fn the_control_plane_times_cooldowns_by_its_own_clock() {
    let mut s = Setup::start().await;
    s.until(|b| b.cooldown_epoch == 0).await;
    // A replica whose clock is an hour ahead: its own idea of the end is not taken.
    let ahead = SystemTime::now() + Duration::from_secs(3600);
    let mut event = s.event(pb::BackendEventKind::RateLimited, 0);
    event.cooldown_until = Some(sluice_domain::time::timestamp(ahead + BASE));
    event.time = Some(sluice_domain::time::timestamp(ahead));
    s.report("replica-1", vec![event]).await;
    let b = s.until(|b| b.cooldown_epoch == 1).await;
    assert!(left(&b) <= BASE, "{b:?}");
    let until = sluice_domain::time::system_time(b.cooldown_until.as_ref().unwrap()).unwrap();
    let by_our_clock = until.duration_since(UNIX_EPOCH).unwrap()
        - SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    assert!(by_our_clock <= BASE, "{by_our_clock:?}");
    assert_eq!(s.listed().await, Some((1, BASE)));
}

#[tokio::test]
async fn a_reset_moves_the_epoch_on_so_reports_sent_before_it_are_absorbed() {
    let mut s = Setup::start().await;
    s.until(|b| b.cooldown_epoch == 0).await;
    s.report(
        "replica-1",
        vec![s.event(pb::BackendEventKind::RateLimited, 0)],
    )
    .await;
    s.until(|b| b.cooldown_epoch == 1).await;
    s.reset().await;
    let b = s.until(|b| b.cooldown_epoch == 2).await;
    assert_eq!((b.consecutive_failures, b.cooldown_remaining), (0, None));
    assert_eq!(s.listed().await, None);
    // A 429 of a request sent before the reset: absorbed, and it had no Retry-After.
    s.report(
        "replica-2",
        vec![s.event(pb::BackendEventKind::RateLimited, 1)],
    )
    .await;
    // A later change shows that nothing happened meanwhile.
    s.report(
        "replica-2",
        vec![s.event(pb::BackendEventKind::RateLimited, 2)],
    )
    .await;
    let b = s.until(|b| b.cooldown_epoch >= 3).await;
    assert_eq!((b.cooldown_epoch, b.consecutive_failures), (3, 1));
    assert_eq!(s.listed().await, Some((1, BASE)));
}

/// A 429 seen before an admin's reset, reported late by a replica cut off across it, is
/// history also once another cooldown has started since: an Azure "retry after 3600" the
/// reset ended does not come back through a one-second overload after it (the reset's time
/// is kept in the database, apart from the cooldown's start).
#[tokio::test]
async fn a_429_seen_before_a_reset_lengthens_no_cooldown_begun_after_it() {
    use pb::BackendEventKind::RateLimited;
    let mut s = Setup::start().await;
    s.until(|b| b.cooldown_epoch == 0).await;
    s.report("replica-1", vec![s.event(RateLimited, 0)]).await;
    s.until(|b| b.cooldown_epoch == 1).await;
    s.reset().await;
    s.until(|b| b.cooldown_epoch == 2).await;
    s.report("replica-1", vec![s.event(RateLimited, 2)]).await;
    s.until(|b| b.cooldown_epoch == 3).await;
    // Seen a minute ago, before the reset, asking for an hour.
    let mut late = s.event(RateLimited, 0);
    late.retry_after = Some(Duration::from_secs(3600).into());
    late.age = Some(Duration::from_secs(60).into());
    s.report("replica-2", vec![late]).await;
    // A later change shows what the late report did: nothing.
    s.report("replica-1", vec![s.event(RateLimited, 3)]).await;
    let b = s.until(|b| b.cooldown_epoch >= 4).await;
    assert_eq!(b.consecutive_failures, 2);
    assert!(left(&b) <= BASE * 2, "{b:?}");
}

#[tokio::test]
async fn a_replica_continues_its_own_run_and_cooldowns_count_from_when_it_saw_them() {
    use pb::BackendEventKind::RateLimited;
    let mut s = Setup::start().await;
    s.until(|b| b.cooldown_epoch == 0).await;
    // Replica 1, without snapshots for a while, saw two overloads on top of epoch 0, the
    // second 8 s ago; replica 2 names a position on a run that is not its own.
    let first = s.event(RateLimited, 0);
    let mut second = s.event(RateLimited, 0);
    second.cooldown_position = 1;
    second.age = Some(Duration::from_secs(8).into());
    s.report("replica-1", vec![first, second.clone()]).await;
    s.report("replica-2", vec![second]).await;
    let b = s.until(|b| b.cooldown_epoch >= 2).await;
    assert_eq!((b.cooldown_epoch, b.consecutive_failures), (2, 2));
    assert!(b.cooldown_changed_by.starts_with("replica-1/"), "{b:?}");
    assert_eq!(b.cooldown_run_basis, 0);
    // 20 s for a streak of 2, from 8 s ago: at most 12 s left.
    assert!(
        left(&b) <= Duration::from_secs(12) && left(&b) > Duration::from_secs(10),
        "{b:?}"
    );
}

/// A 429 for one model cools that model alone at the backend (providers limit each model
/// apart): the snapshot carries it apart from the backend's own state, `ListCooldowns` names
/// the model, a report of a model the backend does not serve is dropped, and a reset can end
/// the one model's cooldown.
#[tokio::test]
async fn a_models_cooldown_is_its_own_and_a_reset_can_end_it_alone() {
    use pb::BackendEventKind::RateLimited;
    let mut s = Setup::start().await;
    s.until(|b| b.cooldown_epoch == 0).await;
    let of_model = |model: &str, basis: u64| pb::BackendEvent {
        model: model.into(),
        ..s.event(RateLimited, basis)
    };
    s.report(
        "replica-1",
        vec![of_model("m", 0), of_model("not-served", 0)],
    )
    .await;
    let b = s.until(|b| !b.model_cooldowns.is_empty()).await;
    // The backend itself is not cooling down.
    assert_eq!(
        (
            b.cooldown_epoch,
            b.consecutive_failures,
            b.cooldown_remaining
        ),
        (0, 0, None)
    );
    assert_eq!(b.model_cooldowns.len(), 1, "{b:?}");
    let m = &b.model_cooldowns[0];
    assert_eq!(
        (m.model.as_str(), m.cooldown_epoch, m.consecutive_failures),
        ("m", 1, 1)
    );
    let left = Duration::try_from(m.cooldown_remaining.unwrap()).unwrap();
    assert!(
        left <= BASE && left > BASE - Duration::from_secs(2),
        "{m:?}"
    );

    let mut admin = s.cp.admin_client().await.unwrap();
    let listed = admin
        .list_cooldowns(pb::ListCooldownsRequest {})
        .await
        .unwrap()
        .into_inner()
        .cooldowns;
    let models: Vec<&str> = listed.iter().map(|c| c.model.as_str()).collect();
    assert_eq!(models, ["m"]);
    assert_eq!(listed[0].backend_name, "a");

    // A model the backend does not serve has no cooldown to reset.
    let refused = admin
        .reset_cooldown(pb::ResetCooldownRequest {
            backend_id: "a".into(),
            model: "not-served".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::NotFound, "{refused:?}");
    admin
        .reset_cooldown(pb::ResetCooldownRequest {
            backend_id: "a".into(),
            model: "m".into(),
        })
        .await
        .unwrap();
    let b = s
        .until(|b| b.model_cooldowns.iter().any(|m| m.cooldown_epoch == 2))
        .await;
    let m = &b.model_cooldowns[0];
    assert_eq!((m.consecutive_failures, m.cooldown_remaining), (0, None));
    assert_eq!(b.cooldown_epoch, 0, "the backend's own state is untouched");
    assert!(
        admin
            .list_cooldowns(pb::ListCooldownsRequest {})
            .await
            .unwrap()
            .into_inner()
            .cooldowns
            .is_empty()
    );
}

/// A reset of the whole backend is a reset of each model it serves too, a model without a
/// state yet included: a 429 seen before the reset and reported after it (by a replica cut
/// off meanwhile) is absorbed, and starts no cooldown of its model.
#[tokio::test]
async fn a_backends_reset_absorbs_a_models_429_seen_before_it() {
    let mut s = Setup::start().await;
    s.until(|b| b.cooldown_epoch == 0).await;
    s.reset().await;
    s.until(|b| b.cooldown_epoch == 1).await;
    // Seen 30 s ago, before the reset, by a replica that knew epoch 0 of the model.
    let late = pb::BackendEvent {
        model: "m".into(),
        age: Some(Duration::from_secs(30).into()),
        ..s.event(pb::BackendEventKind::RateLimited, 0)
    };
    s.report("replica-1", vec![late]).await;
    // A later change of the backend shows the report was applied (or absorbed) meanwhile.
    s.report(
        "replica-2",
        vec![s.event(pb::BackendEventKind::RateLimited, 1)],
    )
    .await;
    let b = s.until(|b| b.cooldown_epoch >= 2).await;
    let m = b.model_cooldowns.iter().find(|m| m.model == "m");
    assert!(
        m.is_some_and(|m| m.consecutive_failures == 0 && m.cooldown_remaining.is_none()),
        "{b:?}"
    );
}
