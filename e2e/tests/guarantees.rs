//! The promises of `docs/guarantees.md` tried from outside, with the real binaries, the way a
//! user (or a hostile client) would break them: usage accounting that a client cannot switch
//! off, replicas that follow a control plane restored from a backup, exactly-once usage
//! through a failed commit, and rate-limit shares across a control-plane restart.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Cluster, Mock, eventually};
use sluice_proto::v1 as pb;

/// A few requests whose `model` is megabytes long (the body under `--max-body-bytes`) are
/// refused with 404; their usage records must not carry that name, so the next report
/// stays small and everything the replica serves afterwards still reaches the statistics.
#[tokio::test]
async fn a_huge_model_name_cannot_switch_off_usage_accounting() {
    let cluster = Cluster::start().await;
    let mock = Mock::start("a", &["m"]).await;
    cluster
        .add_backend("a", &mock, pb::Pool::Primary, 0, &[("m", "m")])
        .await;
    let (_, key) = cluster.create_key("k", &[]).await;
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
