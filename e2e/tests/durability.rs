//! `kill -9` of the control plane while it ingests usage: the database opens
//! clean, nothing acked is lost, and the resend after restart counts nothing twice.

use crate::common;

use std::time::Duration;

use common::{Bearer, Cluster, DATAPLANE_TOKEN};
use sluice_proto::v1 as pb;
use sluice_proto::v1::data_plane_service_client::DataPlaneServiceClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const TOTAL: u64 = 40_000;
const BATCH: u64 = 250;

fn record(seq: u64) -> pb::UsageRecord {
    pb::UsageRecord {
        sequence: seq,
        request_id: format!("r{seq}"),
        backend_id: "b".into(),
        model: "m".into(),
        client_key_id: "k".into(),
        prompt_tokens: 3,
        completion_tokens: 5,
        latency: Some(sluice_proto::wkt::Duration {
            seconds: 0,
            nanos: 2_000_000,
        }),
        status_code: 200,
        time: Some(sluice_proto::wkt::Timestamp {
            seconds: 1_764_000_000 + (seq as i64 % 7200),
            nanos: 0,
        }),
        ..Default::default()
    }
}

/// Sends every record above `from` in batches and returns the highest acked sequence
/// when the stream breaks or everything is acked.
async fn report(url: String, from: u64, acked_so_far: &std::sync::atomic::AtomicU64) -> u64 {
    let Ok(channel) = tonic::transport::Channel::from_shared(url)
        .unwrap()
        .connect()
        .await
    else {
        return from;
    };
    let mut client =
        DataPlaneServiceClient::with_interceptor(channel, Bearer(DATAPLANE_TOKEN.into()));
    let (tx, rx) = mpsc::channel(4);
    let Ok(response) = client.report_usage(ReceiverStream::new(rx)).await else {
        return from;
    };
    let mut acks = response.into_inner();
    let sender = tokio::spawn(async move {
        let mut next = from + 1;
        while next <= TOTAL {
            let end = (next + BATCH - 1).min(TOTAL);
            let batch = pb::ReportUsageRequest {
                node_id: "replica-1".into(),
                incarnation: "inc-1".into(),
                records: (next..=end).map(record).collect(),
                events: vec![],
                ..Default::default()
            };
            if tx.send(batch).await.is_err() {
                return;
            }
            next = end + 1;
        }
        // Keep the stream open until the acks are read.
        tx.closed().await;
    });
    let mut acked = from;
    while let Ok(Some(ack)) = acks.message().await {
        assert!(ack.acked_sequence >= acked, "acks never go backwards");
        acked = ack.acked_sequence;
        acked_so_far.store(acked, std::sync::atomic::Ordering::SeqCst);
        if acked == TOTAL {
            break;
        }
    }
    sender.abort();
    acked
}

#[tokio::test]
async fn kill_9_during_ingestion_loses_nothing_acked_and_counts_nothing_twice() {
    let mut cluster = Cluster::start().await;
    let acked = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));

    // Report in the background; kill the control plane once some batches are acked.
    let reporter = {
        let acked = acked.clone();
        let url = cluster.control_url();
        tokio::spawn(async move { report(url, 0, &acked).await })
    };
    common::eventually(Duration::from_secs(30), "some batches acked", || {
        let acked = acked.clone();
        async move { acked.load(std::sync::atomic::Ordering::SeqCst) >= 5 * BATCH }
    })
    .await;
    cluster.kill_control().await;
    let acked_before_kill = reporter.await.unwrap();
    assert!(acked_before_kill >= 5 * BATCH);

    let db = cluster.dir.path().join("data/sluice.db");
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        let check: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(check, "ok");
        let stored: i64 = conn
            .query_row(
                "SELECT coalesce(sum(request_count), 0) FROM usage_hourly",
                [],
                |r| r.get(0),
            )
            .unwrap();
        let high_water: i64 = conn
            .query_row(
                "SELECT sequence FROM usage_high_water WHERE node_id = 'replica-1'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert!(
            stored as u64 >= acked_before_kill,
            "acked records lost: {stored} < {acked_before_kill}"
        );
        assert_eq!(
            stored, high_water,
            "records and high-water mark commit together"
        );
    }

    // The replica resends everything above what it saw acked; duplicates are skipped.
    cluster.start_control().await;
    let done = report(cluster.control_url(), acked_before_kill, &acked).await;
    assert_eq!(done, TOTAL);
    let totals = cluster.totals().await;
    assert_eq!(totals.request_count, TOTAL);
    assert_eq!(totals.prompt_tokens, 3 * TOTAL);
    assert_eq!(totals.completion_tokens, 5 * TOTAL);
}
