//! End to end: a data plane's `/metrics` and per-request log lines after real traffic
//! through the real processes (successes, a stream, a 429 that cools a backend down and
//! fails over, a skipped cooling backend, refused requests).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;

use common::{Cluster, Mock, http_client};
use serde_json::{Value, json};
use sluice_e2e::mock::Fault;
use sluice_proto::v1 as pb;

/// `name{labels} value` lines of an exposition, by everything before the value.
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

#[tokio::test]
async fn metrics_and_request_logs_follow_the_traffic() {
    let cluster = Cluster::start().await;
    let primary = Mock::start("primary", &["m-up"]).await;
    let fallback = Mock::start("fallback", &["m-up"]).await;
    cluster
        .add_backend("primary", &primary, pb::Pool::Primary, 0, &[("m", "m-up")])
        .await;
    cluster
        .add_backend(
            "fallback",
            &fallback,
            pb::Pool::Fallback,
            0,
            &[("m", "m-up")],
        )
        .await;
    let (key_row, key) = cluster.create_key("k", &[]).await;
    let proxy = cluster.proxy_with(&["--log-format", "json"]).await;

    for _ in 0..3 {
        assert_eq!(proxy.chat(&key, "m").await.status(), 200);
    }
    let stream = proxy
        .post(
            "/v1/chat/completions",
            &key,
            json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(stream.status(), 200);
    assert!(stream.text().await.unwrap().contains("[DONE]"));

    // One 429 from the primary: cooled down, the request fails over; the next one skips it.
    primary
        .set_faults(vec![Fault::rate_limited(30).times(1)])
        .await;
    for _ in 0..2 {
        let r = proxy.chat(&key, "m").await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-sluice-backend"], "fallback");
    }
    // Refused before routing: a wrong key, a model no route serves.
    assert_eq!(proxy.chat("sk-wrong", "m").await.status(), 401);
    assert_eq!(proxy.chat(&key, "no-such-model").await.status(), 404);

    let http = http_client();
    let response = http.get(proxy.url("/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    let text = response.text().await.unwrap();
    let m = samples(&text);
    let get = |name: &str| -> f64 {
        *m.get(name)
            .unwrap_or_else(|| panic!("{name} missing in\n{text}"))
    };
    assert_eq!(
        get(r#"sluice_requests_total{backend="primary",model="m",status_class="2xx"}"#),
        4.0
    );
    assert_eq!(
        get(r#"sluice_requests_total{backend="fallback",model="m",status_class="2xx"}"#),
        2.0
    );
    assert_eq!(
        get(r#"sluice_requests_total{backend="none",model="none",status_class="4xx"}"#),
        1.0
    );
    assert_eq!(
        get(r#"sluice_requests_total{backend="none",model="other",status_class="4xx"}"#),
        1.0
    );
    assert_eq!(
        get(r#"sluice_upstream_attempts_total{backend="primary",outcome="ok"}"#),
        4.0
    );
    assert_eq!(
        get(r#"sluice_upstream_attempts_total{backend="primary",outcome="rate_limited"}"#),
        1.0
    );
    assert_eq!(
        get(r#"sluice_upstream_attempts_total{backend="fallback",outcome="ok"}"#),
        2.0
    );
    // Every attempt has a latency (the stream's recorded at its end); only the stream a TTFT.
    assert_eq!(
        get(r#"sluice_upstream_latency_seconds_count{backend="primary"}"#),
        5.0
    );
    assert_eq!(
        get(r#"sluice_upstream_ttft_seconds_count{backend="primary"}"#),
        1.0
    );
    assert_eq!(get("sluice_failovers_total"), 1.0);
    assert_eq!(
        get(r#"sluice_cooldown_events_total{backend="primary",reason="rate_limited"}"#),
        1.0
    );
    assert_eq!(
        get(r#"sluice_backend_skips_total{backend="primary",reason="cooling_down"}"#),
        1.0
    );
    // Six requests were answered by an upstream.
    assert_eq!(get("sluice_gateway_overhead_seconds_count"), 6.0);
    assert_eq!(get("sluice_requests_in_flight"), 0.0);
    let ready = http
        .get(proxy.url("/readyz"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let version: f64 = ready.trim().rsplit(' ').next().unwrap().parse().unwrap();
    assert_eq!(get("sluice_snapshot_version"), version);
    assert!(get("sluice_snapshot_age_seconds") >= 0.0);
    assert!(get("sluice_usage_queue_depth") >= 0.0);
    assert_eq!(get("sluice_usage_dropped_records_total"), 0.0);

    // One JSON log line per request, with the fields an operator needs and no secret.
    let lines = proxy.child.output();
    let finished: Vec<Value> = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["fields"]["message"] == "request finished")
        .collect();
    assert_eq!(finished.len(), 8, "{lines:#?}");
    let routed: Vec<&Value> = finished
        .iter()
        .filter(|v| v["fields"]["status"] == 200)
        .collect();
    assert_eq!(routed.len(), 6);
    for line in &routed {
        let f = &line["fields"];
        assert_eq!(f["client_key"], key_row.id.as_str());
        assert_eq!(f["model"], "m");
        assert!(f["request_id"].as_str().is_some_and(|id| !id.is_empty()));
        assert!(f["backend"] == "primary" || f["backend"] == "fallback");
        assert!(f["attempts"].as_u64().unwrap() >= 1);
        assert!(f["latency_ms"].is_u64());
        assert!(f["ttft_ms"].is_u64());
    }
    assert_eq!(
        routed
            .iter()
            .filter(|v| v["fields"]["attempts"] == 2)
            .count(),
        1,
        "the failed-over request took two attempts"
    );
    let secrets = [key.as_str(), primary.api_key.as_deref().unwrap_or(&key)];
    for line in &lines {
        for secret in secrets {
            assert!(!line.contains(secret), "a secret in the log: {line}");
        }
        assert!(!line.contains("\"hi\""), "prompt text in the log: {line}");
    }
}
