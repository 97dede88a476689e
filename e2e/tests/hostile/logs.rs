//! Client strings in logs and terminals: a `model` or a replica's nack holding a newline and
//! an ANSI escape neither forges a second log line (text or JSON) nor reaches the admin's
//! terminal raw through `sluicectl`.

use std::time::Duration;

use sluice_proto::v1 as pb;
use sluice_proto::v1::data_plane_service_client::DataPlaneServiceClient;

use crate::common::{Bearer, Cluster, DATAPLANE_TOKEN, Mock, eventually, report_cooldown};

/// A time stamp no real line of this test run has, starting the forged line.
const FORGED_AT: &str = "2001-01-01T00:00:00.000000Z";

fn forged_model() -> String {
    format!(
        "nope\n{FORGED_AT}  INFO sluice::request: request finished request_id=forged \
         status=200\u{1b}[31m"
    )
}

#[tokio::test]
async fn a_forged_model_stays_on_its_log_line_in_text_and_json() {
    let (cluster, _mock, key) = Cluster::with_one_backend().await;
    let text = cluster.proxy().await;
    let json = cluster.proxy_with(&["--log-format", "json"]).await;
    let model = forged_model();
    for proxy in [&text, &json] {
        let response = proxy
            .post(
                "/v1/chat/completions",
                &key,
                serde_json::json!({"model": model, "messages": []}),
            )
            .await;
        assert_eq!(response.status(), 404);
        let id = response.headers()["x-request-id"]
            .to_str()
            .unwrap()
            .to_owned();
        proxy
            .child
            .wait_for_line("its request finished line", Duration::from_secs(10), |l| {
                (l.contains("request finished") && l.contains(&id)).then_some(())
            })
            .await
            .unwrap();
    }
    let lines = text.child.output();
    assert!(
        !lines.iter().any(|l| l.starts_with(FORGED_AT)),
        "a forged line in the text log:\n{}",
        lines.join("\n")
    );
    for line in json.child.output() {
        assert!(!line.starts_with(FORGED_AT), "a forged line: {line}");
        serde_json::from_str::<serde_json::Value>(&line)
            .unwrap_or_else(|e| panic!("not one JSON object per line ({e}): {line}"));
    }
}

/// A replica's nack is logged by the control plane with its detail, text from outside.
#[tokio::test]
async fn a_forged_nack_stays_on_the_control_planes_log_line() {
    let cluster = Cluster::start().await;
    let mut replica = DataPlaneServiceClient::with_interceptor(
        cluster.channel().await,
        Bearer(DATAPLANE_TOKEN.into()),
    );
    let hello = pb::StreamSnapshotsRequest {
        node_id: "replica-forging".into(),
        ..Default::default()
    };
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tx.send(hello.clone()).await.unwrap();
    let mut snapshots = replica
        .stream_snapshots(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let snapshot = snapshots
        .message()
        .await
        .unwrap()
        .unwrap()
        .snapshot
        .unwrap();
    tx.send(pb::StreamSnapshotsRequest {
        version: snapshot.version,
        response_nonce: snapshot.nonce,
        error_detail: format!(
            "bad\n{FORGED_AT}  INFO sluice_control::api::admin: backend deleted \
             backend=all\u{1b}[31m"
        ),
        ..hello
    })
    .await
    .unwrap();
    let line = cluster
        .control()
        .wait_for_line("the nack's log line", Duration::from_secs(10), |l| {
            l.contains("refused a snapshot").then(|| l.to_owned())
        })
        .await
        .unwrap();
    // The harness strips ANSI sequences: one that reached the log raw would vanish here,
    // an escaped one stays readable.
    assert!(
        line.contains("bad\\n2001") && line.contains("\\u{1b}[31m"),
        "{line}"
    );
    let lines = cluster.control().output();
    assert!(
        !lines.iter().any(|l| l.starts_with(FORGED_AT)),
        "a forged line in the control plane's log:\n{}",
        lines.join("\n")
    );
    drop(tx);
}

#[tokio::test]
async fn sluicectl_tables_show_control_characters_escaped() {
    let cluster = Cluster::start().await;
    let mock = Mock::start("a", &["m"]).await;
    let backend = cluster
        .add_backend("a", &mock, pb::Pool::Primary, 0, &[("m", "m")])
        .await;
    let (_, key) = cluster.create_key("k", &[]).await;
    let proxy = cluster.proxy().await;
    let response = proxy
        .post(
            "/v1/chat/completions",
            &key,
            serde_json::json!({"model": forged_model(), "messages": []}),
        )
        .await;
    assert_eq!(response.status(), 404);
    eventually(
        Duration::from_secs(15),
        "the refused request counted",
        || async { cluster.totals().await.request_count == 1 },
    )
    .await;

    // A replica's report is text from outside too: a cooldown reason with an escape.
    report_cooldown(
        &cluster,
        &backend.id,
        &format!("429\n{FORGED_AT} \u{1b}]0;owned\u{7}\u{1b}[2J"),
    )
    .await;

    for args in [
        &["stats", "usage", "--by", "model"][..],
        &["cooldown", "list"][..],
    ] {
        let shown = cluster.sluicectl(args).await;
        assert!(
            !shown.contains('\u{1b}') && !shown.contains('\u{7}'),
            "{args:?} printed a raw escape: {shown:?}"
        );
        assert!(
            !shown.lines().any(|l| l.trim_start().starts_with(FORGED_AT)),
            "{args:?} printed a forged line: {shown}"
        );
    }
}
