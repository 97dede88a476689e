//! End to end: budgets enforced by the real control plane and data plane. A key is refused
//! with 429 `insufficient_quota` once the control plane's accounting of its spend (what each
//! replica computed from the usage the mock provider reported) reaches its budget, never
//! before, and is served again when the budget is raised.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Cluster, eventually};
use serde_json::Value;
use sluice_proto::v1 as pb;

const PYTHON_SPENT: &str = r#"
import json, sys, openai
from openai import OpenAI
base, key = sys.argv[1], sys.argv[2]
try:
    OpenAI(base_url=base, api_key=key, max_retries=2).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "x"}])
    print(json.dumps("no error"))
except openai.APIStatusError as err:
    print(json.dumps([type(err).__name__, err.status_code, err.code]))
"#;

async fn key_state(cluster: &Cluster, name: &str) -> pb::ClientKey {
    cluster
        .admin()
        .await
        .get_client_key(pb::GetClientKeyRequest { id: name.into() })
        .await
        .unwrap()
        .into_inner()
        .client_key
        .unwrap()
}

#[tokio::test]
async fn a_key_is_refused_once_its_budget_is_spent_and_served_again_when_raised() {
    let (cluster, mock, _) = Cluster::with_one_backend().await;
    let proxy = cluster.proxy().await;
    // Route prices: $1 in, $2 out per million tokens. A mock answer costs a few hundredths
    // of a thousandth: the budget lasts a handful of requests.
    let max_budget = 0.000_2;
    let created = cluster
        .admin()
        .await
        .create_client_key(pb::CreateClientKeyRequest {
            name: "capped".into(),
            max_budget,
            budget_period: pb::BudgetPeriod::Monthly as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let key = created.key;

    let mut served = 0;
    let refused = loop {
        let r = proxy.chat(&key, "m").await;
        if r.status() == 429 {
            break r;
        }
        // Until the replica has the snapshot with the new key, it does not know it.
        if r.status() == 401 && served == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
        r.bytes().await.unwrap();
        served += 1;
        assert!(served < 500, "never refused");
    };
    assert!(refused.headers().get("retry-after").is_none());
    assert_eq!(refused.headers()["x-should-retry"], "false");
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["type"], "insufficient_quota", "{body}");
    assert_eq!(body["error"]["code"], "insufficient_quota", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("capped") && message.contains("0.00"),
        "{message}"
    );
    assert!(
        message.contains("resets at") && message.ends_with("-01T00:00:00Z."),
        "{message}"
    );

    // Refused only once the control plane counted the budget spent: no false rejection.
    let state = key_state(&cluster, "capped").await;
    assert!(
        state.spend >= max_budget,
        "refused at {} of {max_budget}",
        state.spend
    );
    assert_eq!(state.remaining_budget, 0.0);
    // What the mock served, at the route's prices, is what the key spent (all served
    // requests are ingested by now: the refusal came from a snapshot built after them).
    let mock_served = mock.stats().await;
    let mock_nanos = mock_served.prompt_tokens * 1_000 + mock_served.completion_tokens * 2_000;
    eventually(
        Duration::from_secs(10),
        "every served request is counted",
        || async { (key_state(&cluster, "capped").await.spend * 1e9).round() as u64 == mock_nanos },
    )
    .await;
    let per_request = mock_nanos as f64 / 1e9 / served as f64;
    eprintln!(
        "budget {max_budget}, served {served} requests, spend {} (overshoot {:.1} requests)",
        mock_nanos as f64 / 1e9,
        (mock_nanos as f64 / 1e9 - max_budget) / per_request
    );

    // The official Python SDK raises its usual class for a spent quota (and, with retries
    // allowed, does not retry it: `x-should-retry: false`).
    let output = tokio::process::Command::new("python3")
        .args(["-c", PYTHON_SPENT, &proxy.url("/v1"), &key])
        .output()
        .await
        .expect("python3 with the openai package (run e2e/test-all.sh)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let out: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(
        out,
        serde_json::json!(["RateLimitError", 429, "insufficient_quota"])
    );

    // Raised, the same key is served again.
    cluster
        .admin()
        .await
        .update_client_key(pb::UpdateClientKeyRequest {
            client_key: Some(pb::ClientKey {
                id: "capped".into(),
                max_budget: 1.0,
                ..Default::default()
            }),
            update_mask: Some(sluice_proto::wkt::FieldMask {
                paths: vec!["max_budget".into()],
            }),
        })
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "served again", || async {
        proxy.chat(&key, "m").await.status() == 200
    })
    .await;
}
