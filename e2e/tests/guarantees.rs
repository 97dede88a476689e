//! The promises of `docs/guarantees.md` tried from outside, with the real binaries, the way a
//! user (or a hostile client) would break them: usage accounting that a client cannot switch
//! off, replicas that follow a control plane restored from a backup, exactly-once usage
//! through a failed commit, and rate-limit shares across a control-plane restart.

use crate::common;

use std::time::Duration;

use common::{Bearer, Cluster, DATAPLANE_TOKEN, Mock, Relay, eventually};
use sluice_e2e::process::workspace_bin;
use sluice_proto::v1 as pb;
use sluice_proto::v1::data_plane_service_client::DataPlaneServiceClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// A few requests whose `model` is megabytes long (the body under `--max-body-bytes`) are
/// refused with 404; their usage records must not carry that name, so the next report
/// stays small and everything the replica serves afterwards still reaches the statistics.
#[tokio::test]
async fn a_huge_model_name_cannot_switch_off_usage_accounting() {
    let (cluster, mock, key) = Cluster::with_one_backend().await;
    let proxy = cluster.proxy().await;

    // 5 MiB of model name: one such record alone is past the control plane's 4 MiB limit
    // for a usage report.
    let huge = "x".repeat(5 << 20);
    for _ in 0..3 {
        let r = proxy
            .post(
                "/v1/chat/completions",
                &key,
                serde_json::json!({"model": huge, "messages": [{"role": "user", "content": "hi"}]}),
            )
            .await;
        assert_eq!(r.status(), 404);
    }
    for _ in 0..10 {
        assert_eq!(proxy.chat(&key, "m").await.status(), 200);
    }
    assert_eq!(mock.stats().await.requests.chat_completions, 10);

    eventually(
        Duration::from_secs(20),
        "all 13 requests reach the statistics",
        || async { cluster.totals().await.request_count == 13 },
    )
    .await;
    let totals = cluster.totals().await;
    assert_eq!(totals.error_count, 3);
    assert!(totals.prompt_tokens > 0);

    // The refused name is recorded as the placeholder, never as sent.
    let by_model = cluster
        .stats()
        .await
        .get_usage(pb::GetUsageRequest {
            group_by: pb::GroupBy::Model as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut models: Vec<String> = by_model
        .buckets
        .iter()
        .map(|p| p.group_key.clone())
        .collect();
    models.sort();
    models.dedup();
    assert_eq!(models, ["m", "other"]);
}

fn usage_record(sequence: u64) -> pb::UsageRecord {
    pb::UsageRecord {
        sequence,
        request_id: format!("r{sequence}"),
        backend_id: "b".into(),
        model: "m".into(),
        client_key_id: "k".into(),
        prompt_tokens: 3,
        completion_tokens: 5,
        status_code: 200,
        time: Some(sluice_proto::wkt::Timestamp {
            seconds: 1_764_000_000,
            nanos: 0,
        }),
        ..Default::default()
    }
}

/// A report of records `from..=to` as a replica sends it: `previous_sequence` is the record
/// it holds just before `from` (0 if none).
fn report(from: u64, to: u64, previous_sequence: u64) -> pb::ReportUsageRequest {
    pb::ReportUsageRequest {
        node_id: "replica-1".into(),
        incarnation: "inc-1".into(),
        records: (from..=to).map(usage_record).collect(),
        events: vec![],
        previous_sequence,
        database_id: String::new(),
    }
}

async fn usage_client(
    cluster: &Cluster,
) -> DataPlaneServiceClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>,
> {
    DataPlaneServiceClient::with_interceptor(
        cluster.channel().await,
        Bearer(DATAPLANE_TOKEN.into()),
    )
}

/// Two reports of one replica land in different group commits; the first commit fails (a
/// real SQLite failure: another connection holds the write lock, "database is locked") and
/// the second commits. When the replica resends both, the first must still be counted: the
/// high-water mark may not have skipped it.
#[tokio::test]
async fn a_failed_commit_before_a_later_one_loses_nothing() {
    let cluster = Cluster::start().await;
    let db = cluster.dir.path().join("data/sluice.db");
    let lock = rusqlite::Connection::open(&db).unwrap();
    // Holds the write lock: the control plane's next usage commit fails.
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();

    let (tx, rx) = mpsc::channel(4);
    let mut acks = usage_client(&cluster)
        .await
        .report_usage(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(report(1, 10, 0)).await.unwrap();
    let failed = acks.message().await.unwrap_err();
    assert_eq!(failed.code(), tonic::Code::Internal, "{failed:?}");
    lock.execute_batch("ROLLBACK").unwrap();
    // The replica had sent its next report before it read that answer: the control plane
    // still takes it, in a commit of its own.
    tx.send(report(11, 20, 10)).await.unwrap();
    // The failed commit is counted as failed, the second as a write.
    eventually(
        Duration::from_secs(20),
        "the second report was handled",
        || async {
            let metrics = cluster.control_metrics().await;
            let count = |name: &str| metrics.get(name).copied().unwrap_or_default();
            count("sluice_sqlite_write_failures_total{op=\"usage_ingest\"}") == 1.0
                && count("sluice_sqlite_write_seconds_count{op=\"usage_ingest\"}") >= 1.0
        },
    )
    .await;
    drop(tx);

    // The replica reconnects and resends everything it holds unacked.
    let mut acks = usage_client(&cluster)
        .await
        .report_usage(tokio_stream::iter(vec![
            report(1, 10, 0),
            report(11, 20, 10),
        ]))
        .await
        .unwrap()
        .into_inner();
    let mut acked = 0;
    while let Some(ack) = acks.message().await.unwrap() {
        acked = ack.acked_sequence;
    }
    assert_eq!(acked, 20);
    let totals = cluster.totals().await;
    assert_eq!(totals.request_count, 20, "every record counted once");
    assert_eq!(totals.prompt_tokens, 60);
}

/// Back up with `sluice-control backup` while the gateway serves (the control plane commits
/// usage all along), restore as docs/operating.md says, restart the control plane, add a
/// backend: a running replica must follow the restored control plane (its versions are lower
/// than the replica's) instead of refusing every snapshot.
#[tokio::test]
async fn replicas_follow_a_control_plane_restored_from_an_older_backup() {
    let mut cluster = Cluster::start().await;
    let mock = Mock::start("a", &["m", "m2"]).await;
    cluster
        .add_backend("a", &mock, pb::Pool::Primary, 0, &[("m", "m")])
        .await;
    let (created, key) = cluster.create_key("k", &[]).await;
    let proxy = cluster.proxy().await;
    assert_eq!(proxy.chat(&key, "m").await.status(), 200);

    let data = cluster.dir.path().join("data");
    let backup = cluster.dir.path().join("backup.db");
    let serving = async {
        for _ in 0..20 {
            assert_eq!(proxy.chat(&key, "m").await.status(), 200);
        }
    };
    let backing_up = tokio::process::Command::new(workspace_bin("sluice-control"))
        .arg("--data-dir")
        .arg(&data)
        .arg("backup")
        .arg(&backup)
        .output();
    let ((), output) = tokio::join!(serving, backing_up);
    let output = output.unwrap();
    assert!(output.status.success(), "{output:?}");
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(
        said.contains("backed up") && said.contains("master key"),
        "{said}"
    );
    // Changes after the backup take the replica's version well past the backup's: keys
    // created, and the backup's key revoked.
    let mut later = String::new();
    for i in 0..5 {
        later = cluster.create_key(&format!("later-{i}"), &[]).await.1;
    }
    cluster
        .admin()
        .await
        .revoke_client_key(pb::RevokeClientKeyRequest {
            id: created.id.clone(),
        })
        .await
        .unwrap();
    cluster.wait_replicas_current(1).await;
    assert_eq!(proxy.chat(&later, "m").await.status(), 200);
    assert_eq!(proxy.chat(&key, "m").await.status(), 401);

    cluster.stop_control().await;
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(data.join(format!("sluice.db{suffix}")));
    }
    std::fs::copy(&backup, data.join("sluice.db")).unwrap();
    cluster.start_control().await;

    cluster
        .add_backend("b", &mock, pb::Pool::Primary, 0, &[("m2", "m2")])
        .await;
    eventually(
        Duration::from_secs(15),
        "the replica serves the backend added after the restore",
        || async { proxy.chat(&key, "m2").await.status() == 200 },
    )
    .await;
    cluster.wait_replicas_current(1).await;
    // The replica runs the backup's keys, as guarantees.md says a restore means: a key created
    // after the backup is gone with it, and one revoked after it works again.
    assert_eq!(proxy.chat(&later, "m").await.status(), 401);
    assert_eq!(proxy.chat(&key, "m").await.status(), 200);
}

/// What a script does after an admin change: list the replicas until every one is current,
/// then rely on the change. A replica listed as current must run every change made before the
/// list — not be current with the snapshot before it, which the control plane has not yet
/// built when the admin call returns (the new key's 401, then). The snapshot is made large
/// enough that the moment is wide (below).
#[tokio::test]
async fn a_replica_listed_as_current_runs_every_change_made_before_the_list() {
    let cluster = Cluster::start().await;
    let mock = Mock::start("a", &["m"]).await;
    cluster
        .add_backend("a", &mock, pb::Pool::Primary, 0, &[("m", "m")])
        .await;
    let proxies = [cluster.proxy().await, cluster.proxy().await];
    let admin = cluster.admin().await;
    // 500 more keys make each snapshot take long enough to build (milliseconds) that the
    // moment between an admin call's commit and its snapshot is wide: a control plane that
    // listed the published version as the latest had a 401 within the first two keys.
    let fillers: Vec<_> = (0..500)
        .map(|j| {
            let mut admin = admin.clone();
            async move {
                admin
                    .create_client_key(pb::CreateClientKeyRequest {
                        name: format!("filler-{j}"),
                        ..Default::default()
                    })
                    .await
                    .unwrap();
            }
        })
        .collect();
    futures::future::join_all(fillers).await;
    cluster.wait_replicas_current(2).await;
    for i in 0..20 {
        let (_, key) = cluster.create_key(&format!("k{i}"), &[]).await;
        cluster.wait_replicas_current(proxies.len()).await;
        for proxy in &proxies {
            let answer = proxy.chat(&key, "m").await;
            assert_eq!(
                answer.status(),
                200,
                "key {i}: {}",
                answer.text().await.unwrap()
            );
        }
    }
}

/// Requests from `proxy` answered 200 out of `n` sent back to back.
async fn admitted(proxy: &common::Proxy, key: &str, n: usize) -> usize {
    let mut ok = 0;
    for _ in 0..n {
        let status = proxy.chat(key, "m").await.status();
        assert!(status == 200 || status == 429, "{status}");
        ok += usize::from(status == 200);
    }
    ok
}

/// Three replicas share a backend's 600 rpm (200 each, burst 20). The control plane restarts
/// while two of them cannot reach it (they keep serving on their share): the first replica
/// back must not take the whole limit (600, burst 60) while the other two still hold theirs.
#[tokio::test]
async fn after_a_control_plane_restart_the_first_replica_back_does_not_take_the_whole_limit() {
    let mut cluster = Cluster::start().await;
    let mock = Mock::start("a", &["m"]).await;
    let backend = cluster
        .add_backend("a", &mock, pb::Pool::Primary, 0, &[("m", "m")])
        .await;
    cluster
        .admin()
        .await
        .update_backend(pb::UpdateBackendRequest {
            backend: Some(pb::Backend {
                id: backend.id,
                rpm_limit: 600,
                ..Default::default()
            }),
            update_mask: Some(sluice_proto::wkt::FieldMask {
                paths: vec!["rpm_limit".into()],
            }),
            api_key: String::new(),
            ..Default::default()
        })
        .await
        .unwrap();
    let (_, key) = cluster.create_key("k", &[]).await;
    let control: std::net::SocketAddr = format!("127.0.0.1:{}", cluster.grpc_port).parse().unwrap();
    let relay = Relay::start(control).await;
    let first = cluster.proxy().await;
    let _second = cluster.proxy_via(&relay.url(), &[], &[]).await;
    let _third = cluster.proxy_via(&relay.url(), &[], &[]).await;
    cluster.wait_replicas_current(3).await;

    relay.cut();
    cluster.stop_control().await;
    cluster.start_control().await;
    eventually(
        Duration::from_secs(15),
        "the first replica is back and current",
        || async {
            cluster
                .data_planes()
                .await
                .iter()
                .any(|p| p.connected && p.acked_version == p.latest_version)
        },
    )
    .await;
    // Long enough for either bucket to fill: 20 tokens at 200/min, 60 at 600/min.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let ok = admitted(&first, &key, 45).await;
    // Its third of the limit: the 20 of its bucket and what trickles in meanwhile.
    assert!(
        ok <= 30,
        "{ok} of 45 admitted: the first replica back took more than its share"
    );
    assert!(ok >= 20, "{ok} of 45 admitted");
}
