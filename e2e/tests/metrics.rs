//! End to end: a data plane's `/metrics` and per-request log lines after real traffic
//! through the real processes (successes, a stream, a 429 that cools a backend down and
//! fails over, an upstream 429 passed on, Sluice's own 429s, refused requests).

use crate::common;

use std::time::Duration;

use common::{Cluster, Mock, http_client};
use serde_json::{Value, json};
use sluice_control::testing::metric_samples;
use sluice_e2e::mock::Fault;
use sluice_proto::v1 as pb;

const CHAT_PROMPT: &str = "say hello to me";
const STREAM_PROMPT: &str = "tell me a secret story";

#[tokio::test]
async fn metrics_and_request_logs_follow_the_traffic() {
    let cluster = Cluster::start().await;
    cluster.expose_backend_header(true).await;
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
    // One request a minute: the second one is refused by Sluice.
    let limited = cluster
        .admin()
        .await
        .create_client_key(pb::CreateClientKeyRequest {
            name: "limited".into(),
            allowed_models: vec![],
            rpm_limit: 1,
            expire_time: None,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let limited_key = limited.key;
    let proxy = cluster.proxy_with(&["--log-format", "json"]).await;

    // Every response's x-request-id, to match against the log lines.
    let mut request_ids = Vec::new();
    let mut sent = async |response: reqwest::Response, status: u16| -> reqwest::Response {
        assert_eq!(response.status(), status);
        let id = response.headers()["x-request-id"].to_str().unwrap();
        request_ids.push(id.to_owned());
        response
    };

    for _ in 0..3 {
        sent(proxy.chat(&key, "m").await, 200).await;
    }
    let stream = proxy
        .post(
            "/v1/chat/completions",
            &key,
            json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": STREAM_PROMPT}]}),
        )
        .await;
    let stream = sent(stream, 200).await;
    assert!(stream.text().await.unwrap().contains("[DONE]"));

    // One 429 from the primary: cooled down, the request fails over; the next one skips it.
    primary
        .set_faults(vec![Fault::rate_limited(60).times(1)])
        .await;
    for _ in 0..2 {
        let r = sent(proxy.chat(&key, "m").await, 200).await;
        assert_eq!(r.headers()["x-sluice-backend"], "fallback");
    }
    // Refused before routing: a wrong key, a model no route serves.
    sent(proxy.chat("sk-wrong", "m").await, 401).await;
    sent(proxy.chat(&key, "no-such-model").await, 404).await;
    // The fallback answers 429 too: with the primary cooling, the client gets it.
    fallback
        .set_faults(vec![Fault::rate_limited(60).times(1)])
        .await;
    let r = sent(proxy.chat(&key, "m").await, 429).await;
    assert_eq!(r.headers()["x-sluice-backend"], "fallback");
    // Both cooling: Sluice's own 429; then the limited key's second request: its own limit.
    sent(proxy.chat(&limited_key, "m").await, 429).await;
    sent(proxy.chat(&limited_key, "m").await, 429).await;

    // Scrape once the replica holds the control plane's newest snapshot (the cooldowns
    // make new ones) and the stream's relay has finished.
    let http = http_client();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let (text, latest) = loop {
        let planes = cluster
            .admin()
            .await
            .list_data_planes(pb::ListDataPlanesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .data_planes;
        let [plane] = planes.as_slice() else {
            panic!("one data plane expected: {planes:?}");
        };
        let response = http.get(proxy.url("/metrics")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert!(
            response.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/openmetrics-text")
        );
        let text = response.text().await.unwrap();
        let m = metric_samples(&text);
        if plane.acked_version == plane.latest_version
            && m.get("sluice_snapshot_version") == Some(&(plane.latest_version as f64))
            && m.get("sluice_requests_in_flight") == Some(&0.0)
        {
            break (text, plane.latest_version);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "metrics never settled: {plane:?}\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(latest > 0);
    assert!(text.ends_with("# EOF\n"), "{text}");
    let m = metric_samples(&text);
    let get = |name: &str| -> f64 {
        *m.get(name)
            .unwrap_or_else(|| panic!("{name} missing in\n{text}"))
    };
    let requests = |backend: &str, model: &str, class: &str| {
        get(&format!(
            r#"sluice_requests_total{{backend="{backend}",model="{model}",status_class="{class}"}}"#
        ))
    };
    assert_eq!(requests("primary", "m", "2xx"), 4.0);
    assert_eq!(requests("fallback", "m", "2xx"), 2.0);
    assert_eq!(requests("fallback", "m", "4xx"), 1.0);
    assert_eq!(requests("none", "none", "4xx"), 1.0, "the wrong key");
    assert_eq!(requests("none", "other", "4xx"), 1.0, "the unknown model");
    assert_eq!(requests("none", "m", "4xx"), 2.0, "Sluice's own 429s");
    let series = |prefix: &str| text.lines().filter(|l| l.starts_with(prefix)).count();
    assert_eq!(series("sluice_requests_total{"), 6, "{text}");

    let attempts = |backend: &str, outcome: &str| {
        get(&format!(
            r#"sluice_upstream_attempts_total{{backend="{backend}",outcome="{outcome}"}}"#
        ))
    };
    assert_eq!(attempts("primary", "ok"), 4.0);
    assert_eq!(attempts("primary", "rate_limited"), 1.0);
    assert_eq!(attempts("fallback", "ok"), 2.0);
    assert_eq!(attempts("fallback", "rate_limited"), 1.0);
    // Every attempt has a latency (the stream's recorded at its end); only the stream a TTFT.
    assert_eq!(
        get(r#"sluice_upstream_latency_seconds_count{backend="primary"}"#),
        5.0
    );
    assert_eq!(
        get(r#"sluice_upstream_latency_seconds_count{backend="fallback"}"#),
        3.0
    );
    assert_eq!(
        get(r#"sluice_upstream_ttft_seconds_count{backend="primary"}"#),
        1.0
    );
    assert_eq!(series(r#"sluice_upstream_ttft_seconds_count{"#), 1);
    assert_eq!(get("sluice_failovers_total"), 1.0);
    for backend in ["primary", "fallback"] {
        assert_eq!(
            get(&format!(
                r#"sluice_cooldown_events_total{{backend="{backend}",reason="rate_limited"}}"#
            )),
            1.0
        );
    }
    // The primary was passed over by the second failed-over request, the fallback's 429 and
    // the busy one; the fallback by the busy one.
    assert_eq!(
        get(r#"sluice_backend_skips_total{backend="primary",reason="cooling_down"}"#),
        3.0
    );
    assert_eq!(
        get(r#"sluice_backend_skips_total{backend="fallback",reason="cooling_down"}"#),
        1.0
    );
    assert_eq!(
        get(r#"sluice_rate_limited_requests_total{scope="backends"}"#),
        1.0
    );
    assert_eq!(
        get(r#"sluice_rate_limited_requests_total{scope="client_key"}"#),
        1.0
    );
    // Seven requests reached a backend (the six answered, the one with the fallback's 429).
    assert_eq!(get("sluice_gateway_overhead_seconds_count"), 7.0);
    let overhead = get("sluice_gateway_overhead_seconds_sum");
    assert!(
        overhead > 0.0 && overhead < 7.0,
        "overhead sum {overhead} s"
    );
    assert!(get("sluice_snapshot_age_seconds") >= 0.0);
    assert!(get("sluice_usage_queue_depth") >= 0.0);
    assert_eq!(get("sluice_usage_dropped_records_total"), 0.0);

    // One JSON log line per request, with the fields an operator needs and no secret. Lines
    // reach stderr in batches (every 20 ms): wait until as many have arrived as requests ran.
    let mut request_lines = 0;
    proxy
        .child
        .wait_for_line("a log line per request", Duration::from_secs(10), |l| {
            request_lines += usize::from(l.contains("\"sluice::request\""));
            (request_lines >= request_ids.len()).then_some(())
        })
        .await
        .unwrap();
    let lines = proxy.child.output();
    let finished: Vec<Value> = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["target"] == "sluice::request")
        .collect();
    assert!(
        finished
            .iter()
            .all(|v| v["fields"]["message"] == "request finished" && v["level"] == "INFO")
    );
    let mut logged: Vec<String> = finished
        .iter()
        .map(|v| v["fields"]["request_id"].as_str().unwrap().to_owned())
        .collect();
    logged.sort();
    request_ids.sort();
    assert_eq!(logged, request_ids, "{lines:#?}");

    let by_status = |status: u64| -> Vec<&Value> {
        finished
            .iter()
            .map(|v| &v["fields"])
            .filter(|f| f["status"] == status)
            .collect()
    };
    let routed = by_status(200);
    assert_eq!(routed.len(), 6);
    for f in &routed {
        assert_eq!(f["client_key"], key_row.id.as_str());
        assert_eq!(f["model"], "m");
        assert!(f["backend"] == "primary" || f["backend"] == "fallback");
        assert!(f["attempts"].as_u64().unwrap() >= 1);
        assert!(f["latency_ms"].is_u64());
        assert!(f["ttft_ms"].is_u64());
    }
    assert_eq!(
        routed.iter().filter(|f| f["attempts"] == 2).count(),
        1,
        "the failed-over request took two attempts"
    );
    assert_eq!(routed.iter().filter(|f| f["stream"] == true).count(), 1);
    let [unauthorized] = by_status(401)[..] else {
        panic!("one 401 line expected: {lines:#?}");
    };
    assert_eq!(unauthorized["attempts"], 0);
    assert!(unauthorized.get("client_key").is_none());
    let refused = by_status(429);
    assert_eq!(refused.len(), 3);
    assert_eq!(
        refused
            .iter()
            .filter(|f| f["client_key"] == limited.client_key.as_ref().unwrap().id.as_str())
            .count(),
        2
    );

    let secrets = [
        key.as_str(),
        limited_key.as_str(),
        "sk-wrong",
        primary.api_key.as_deref().unwrap(),
        fallback.api_key.as_deref().unwrap(),
    ];
    for line in &lines {
        for secret in secrets {
            assert!(!line.contains(secret), "a secret in the log: {line}");
        }
        for prompt in [CHAT_PROMPT, STREAM_PROMPT] {
            assert!(!line.contains(prompt), "prompt text in the log: {line}");
        }
    }
}

/// A data plane whose stderr nobody reads (a stalled log shipper) keeps serving: log lines
/// queue up to `--log-buffer-lines`, then are dropped and counted, never waited for. With a
/// blocking writer the pipe (64 KiB) fills after a few hundred request lines and every
/// request after that hangs.
#[tokio::test]
async fn a_stalled_stderr_drops_log_lines_instead_of_stalling_requests() {
    use tokio::io::{AsyncBufReadExt, BufReader};

    let cluster = Cluster::start().await;
    let upstream = Mock::start("upstream", &["m"]).await;
    cluster
        .add_backend("upstream", &upstream, pb::Pool::Primary, 0, &[("m", "m")])
        .await;
    let (_, key) = cluster.create_key("k", &[]).await;

    let mut child =
        tokio::process::Command::new(sluice_e2e::process::workspace_bin("sluice-proxy"))
            .args(["--control-plane", &cluster.control_url()])
            .args(["--listen", "127.0.0.1:0", "--log-buffer-lines", "100"])
            .env("SLUICE_DATAPLANE_TOKEN", common::DATAPLANE_TOKEN)
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
    // Read stderr only up to the listening line, then leave the pipe open and unread.
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let port = tokio::time::timeout(Duration::from_secs(30), async {
        let mut line = String::new();
        loop {
            line.clear();
            assert!(
                stderr.read_line(&mut line).await.unwrap() > 0,
                "stderr closed"
            );
            let line = sluice_e2e::process::strip_ansi(&line);
            if let Some(addr) = sluice_e2e::process::listening_addr(&line, "http") {
                return addr.port();
            }
        }
    })
    .await
    .unwrap();
    let proxy = common::Gateway::at(port);
    proxy.wait_ready().await;

    // Each request logs a line of about 250 bytes: 2,000 lines are far more than the pipe
    // and the queue hold together.
    let requests = 2_000;
    for i in 0..requests {
        let response = tokio::time::timeout(Duration::from_secs(5), proxy.chat(&key, "m"))
            .await
            .unwrap_or_else(|_| panic!("request {i} hung: the proxy waits on its stderr"));
        assert_eq!(response.status(), 200);
    }
    assert_eq!(upstream.stats().await.requests.chat_completions, requests);

    let text = proxy.metrics().await;
    let dropped = metric_samples(&text)["sluice_log_dropped_lines_total"];
    assert!(
        dropped > 0.0 && dropped < f64::from(requests as u32),
        "dropped {dropped} of about {requests} lines"
    );
    drop(stderr);
    child.kill().await.unwrap();
}
