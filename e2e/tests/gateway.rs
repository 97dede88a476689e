//! End to end: the real control plane, data plane and mock provider processes,
//! driven as an application and an operator would.

use crate::common;

use std::time::Duration;

use common::{Cluster, Mock, Proxy, eventually, sse_data};
use serde_json::{Value, json};
use sluice_e2e::mock::Fault;
use sluice_proto::v1 as pb;

#[tokio::test]
async fn chat_json_and_stream_carry_content_usage_and_gateway_headers() {
    let cluster = Cluster::start().await;
    cluster.expose_backend_header(true).await;
    let mock = Mock::start("mock-a", &["gpt-4o-mini-2024"]).await;
    cluster
        .add_backend(
            "primary-a",
            &mock,
            pb::Pool::Primary,
            10,
            &[("gpt-4o-mini", "gpt-4o-mini-2024")],
        )
        .await;
    let (_, key) = cluster.create_key("team-a", &[]).await;
    let proxy = cluster.proxy().await;

    let r = proxy.chat(&key, "gpt-4o-mini").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-sluice-backend"], "primary-a");
    assert!(!r.headers()["x-request-id"].is_empty());
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    // The client sees its own model name? OpenAI returns the served model; the mock echoes
    // the upstream name the gateway rewrote to.
    assert_eq!(body["model"], "gpt-4o-mini-2024");
    assert!(
        body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .starts_with("[mock-a]")
    );
    assert_eq!(body["usage"]["prompt_tokens"], 4);
    assert_eq!(body["usage"]["completion_tokens"], 5);

    // Streamed, without include_usage: the usage chunk the gateway asked for is not forwarded.
    let r = proxy
        .post(
            "/v1/chat/completions",
            &key,
            json!({"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let events = sse_data(&r.text().await.unwrap());
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(
        chunks
            .iter()
            .all(|c| c.get("usage").is_none_or(Value::is_null)),
        "{chunks:?}"
    );
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert!(text.starts_with("[mock-a]"), "{text}");

    // With include_usage the client gets it.
    let r = proxy
        .post(
            "/v1/chat/completions",
            &key,
            json!({"model": "gpt-4o-mini", "stream": true, "stream_options": {"include_usage": true},
                   "messages": [{"role": "user", "content": "hi there"}]}),
        )
        .await;
    let events = sse_data(&r.text().await.unwrap());
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["prompt_tokens"], 2);
    assert_eq!(usage["usage"]["completion_tokens"], 5);

    // Every token the mock served is accounted, streams included.
    let served = mock.stats().await;
    assert_eq!(served.requests.chat_completions, 3);
    eventually(
        Duration::from_secs(10),
        "usage totals reach the control plane",
        || async {
            let t = cluster.totals().await;
            t.request_count == 3
                && t.prompt_tokens == served.prompt_tokens
                && t.completion_tokens == served.completion_tokens
        },
    )
    .await;
    let t = cluster.totals().await;
    assert_eq!(t.stream_count, 2);
    assert!(
        (t.cost - (7.0 * 1.0 + 15.0 * 2.0) / 1e6).abs() < 1e-12,
        "{}",
        t.cost
    );
}

/// Prompt tokens an OpenAI-format backend reads from its cache
/// (`prompt_tokens_details.cached_tokens`, OpenAI's automatic prompt caching) are priced at the
/// route's cached price, and those it writes to it (`cache_write_tokens`, which GPT-5.6 and
/// later bill at 1.25 times the input price) at the route's cache-write price, through the
/// record, the control plane's totals and the key's spend, whole and streamed. (Most
/// deployments' backends are OpenAI-format; only the pieces were tested, apart.)
#[tokio::test]
async fn cached_prompt_tokens_of_an_openai_backend_are_priced_as_cached() {
    let cluster = Cluster::start().await;
    let mock = Mock::start("mock-a", &["m"]).await;
    let route = pb::ModelRoute {
        name: "m".into(),
        upstream_name: "m".into(),
        input_price_per_mtok: 1.0,
        output_price_per_mtok: 2.0,
        cached_input_price_per_mtok: Some(0.1),
        cache_write_price_per_mtok: Some(1.25),
        ..Default::default()
    };
    cluster.add_backend_routing("a", &mock, vec![route]).await;
    let (created, key) = cluster.create_key("k", &[]).await;
    let proxy = cluster.proxy().await;
    cluster.wait_replicas_current(1).await;
    // A conversation of 7 words, 6 of them before its last message: the first time, the
    // provider writes those 6 to its cache, the second it reads them from it. Whole answers
    // in one conversation, streams in another.
    let turn = |stream: bool| {
        let mut body = json!({"model": "m", "stream": stream,
               "prompt_cache_key": format!("conversation-{stream}"),
               "messages": [{"role": "user", "content": "one two three four"},
                            {"role": "assistant", "content": "five six"},
                            {"role": "user", "content": "seven"}]});
        if stream {
            body["stream_options"] = json!({"include_usage": true});
        }
        body
    };
    let details = |usage: &Value| {
        let d = &usage["prompt_tokens_details"];
        (
            d["cached_tokens"].as_u64(),
            d["cache_write_tokens"].as_u64(),
        )
    };
    for (cached, written) in [(0, 6), (6, 0)] {
        let whole: Value = proxy
            .post("/v1/chat/completions", &key, turn(false))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(
            details(&whole["usage"]),
            (Some(cached), Some(written)),
            "{whole}"
        );
        let events = sse_data(
            &proxy
                .post("/v1/chat/completions", &key, turn(true))
                .await
                .text()
                .await
                .unwrap(),
        );
        let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
        assert_eq!(
            details(&usage["usage"]),
            (Some(cached), Some(written)),
            "{usage}"
        );
    }

    eventually(Duration::from_secs(10), "4 requests recorded", || async {
        cluster.totals().await.request_count == 4
    })
    .await;
    let t = cluster.totals().await;
    assert_eq!(
        (
            t.prompt_tokens,
            t.cached_prompt_tokens,
            t.cache_write_prompt_tokens
        ),
        (28, 12, 12)
    );
    // Per token: 1,000 nano-units of input, 100 of cached input, 1,250 of input written to
    // the cache, 2,000 of output.
    let nanos = (28 - 12 - 12) * 1_000 + 12 * 100 + 12 * 1_250 + t.completion_tokens * 2_000;
    assert!(
        (t.cost - nanos as f64 / 1e9).abs() < 1e-12,
        "{} against {nanos}",
        t.cost
    );
    let spent = cluster
        .admin()
        .await
        .get_client_key(pb::GetClientKeyRequest { id: created.id })
        .await
        .unwrap()
        .into_inner()
        .client_key
        .unwrap();
    assert!(
        (spent.spend - nanos as f64 / 1e9).abs() < 1e-12,
        "{} against {nanos}",
        spent.spend
    );
}

#[tokio::test]
async fn embeddings_completions_and_model_listing() {
    let cluster = Cluster::start().await;
    let mock = Mock::start(
        "mock-a",
        &["text-embedding-3-small", "gpt-3.5-turbo-instruct", "gpt-4o"],
    )
    .await;
    cluster
        .add_backend(
            "a",
            &mock,
            pb::Pool::Primary,
            0,
            &[
                ("text-embedding-3-small", "text-embedding-3-small"),
                ("gpt-3.5-turbo-instruct", "gpt-3.5-turbo-instruct"),
                ("gpt-4o", "gpt-4o"),
            ],
        )
        .await;
    let (_, limited) = cluster
        .create_key(
            "limited",
            &["text-embedding-3-small", "gpt-3.5-turbo-instruct"],
        )
        .await;
    let proxy = cluster.proxy().await;

    let r = proxy
        .post(
            "/v1/embeddings",
            &limited,
            json!({"model": "text-embedding-3-small", "input": ["one two", "three"]}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["data"].as_array().unwrap().len(), 2);
    assert_eq!(body["usage"]["prompt_tokens"], 3);

    let r = proxy
        .post(
            "/v1/completions",
            &limited,
            json!({"model": "gpt-3.5-turbo-instruct", "prompt": "once upon"}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["object"], "text_completion");

    let r = proxy
        .http
        .get(proxy.url("/v1/models"))
        .bearer_auth(&limited)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["object"], "list");
    let mut ids: Vec<&str> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    ids.sort();
    assert_eq!(
        ids,
        ["gpt-3.5-turbo-instruct", "text-embedding-3-small"],
        "only the models the key may use"
    );
}

/// An embeddings answer names its `usage` after its vectors, which the proxy only searches on
/// the way to it: an answer of eight 1,536-dimension vectors (about 200 KB) is accounted to
/// the token, as the client and the upstream count it.
#[tokio::test]
async fn an_embeddings_answer_is_accounted_past_its_vectors() {
    let model = "text-embedding-3-small";
    let cluster = Cluster::start().await;
    let mock = Mock::start_with("mock-a", &[model], &["--embedding-dims", "1536"]).await;
    cluster
        .add_backend("a", &mock, pb::Pool::Primary, 0, &[(model, model)])
        .await;
    let (_, key) = cluster.create_key("embedder", &[model]).await;
    let proxy = cluster.proxy().await;

    let inputs: Vec<String> = (0..8)
        .map(|i| format!("the {i}th input, a few words long"))
        .collect();
    let r = proxy
        .post(
            "/v1/embeddings",
            &key,
            json!({"model": model, "input": inputs}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let body = r.bytes().await.unwrap();
    assert!(body.len() > 100_000, "{} bytes", body.len());
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["data"].as_array().unwrap().len(), 8);
    assert_eq!(body["data"][7]["embedding"].as_array().unwrap().len(), 1536);
    let answered = body["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(answered >= 8, "{body}");
    assert_eq!(mock.stats().await.prompt_tokens, answered);

    eventually(
        Duration::from_secs(10),
        "the answer's tokens reach the control plane",
        || async {
            let t = cluster.totals().await;
            t.request_count == 1 && t.prompt_tokens == answered
        },
    )
    .await;
    assert_eq!(cluster.totals().await.completion_tokens, 0);
}

fn assert_openai_error(body: &Value) {
    let error = &body["error"];
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(error["type"].is_string(), "{body}");
    assert!(
        error.get("param").is_some() && error.get("code").is_some(),
        "{body}"
    );
}

#[tokio::test]
async fn auth_and_model_errors_are_openai_shaped() {
    let cluster = Cluster::start().await;
    let mock = Mock::start("mock-a", &["gpt-4o-mini", "gpt-4o"]).await;
    cluster
        .add_backend(
            "a",
            &mock,
            pb::Pool::Primary,
            0,
            &[("gpt-4o-mini", "gpt-4o-mini"), ("gpt-4o", "gpt-4o")],
        )
        .await;
    let (_, key) = cluster.create_key("mini-only", &["gpt-4o-mini"]).await;
    let (_, any_model) = cluster.create_key("any-model", &[]).await;
    let (_, revoked) = cluster.create_key("revoked", &[]).await;
    cluster
        .admin()
        .await
        .revoke_client_key(pb::RevokeClientKeyRequest {
            id: "revoked".into(),
        })
        .await
        .unwrap();
    let proxy = cluster.proxy().await;
    // The revocation has reached the proxy once a request with the key is refused.
    eventually(Duration::from_secs(5), "revocation applied", || async {
        proxy.chat(&revoked, "gpt-4o-mini").await.status() == 401
    })
    .await;

    let cases = [
        (proxy.chat("sk-sluice-unknown", "gpt-4o-mini").await, 401),
        (
            proxy
                .http
                .post(proxy.url("/v1/chat/completions"))
                .json(&json!({"model": "gpt-4o-mini", "messages": []}))
                .send()
                .await
                .unwrap(),
            401,
        ),
        (proxy.chat(&key, "gpt-4o").await, 403),
        // A key limited to some models gets 403 for any other name, existing or not, so the
        // allow-list does not reveal which models exist; an unrestricted key gets 404.
        (proxy.chat(&key, "no-such-model").await, 403),
        (proxy.chat(&any_model, "no-such-model").await, 404),
        (
            proxy
                .http
                .post(proxy.url("/v1/chat/completions"))
                .bearer_auth(&key)
                .header("content-type", "application/json")
                .body("{not json")
                .send()
                .await
                .unwrap(),
            400,
        ),
        (
            proxy
                .post("/v1/chat/completions", &key, json!({"messages": []}))
                .await,
            400,
        ),
    ];
    for (response, status) in cases {
        assert_eq!(response.status(), status);
        let text = response.text().await.unwrap();
        assert!(
            !text.contains("sk-sluice-unknown"),
            "errors never echo keys: {text}"
        );
        assert_openai_error(&serde_json::from_str(&text).unwrap());
    }
    assert_eq!(
        mock.stats().await.requests.chat_completions,
        0,
        "nothing bad reached the upstream"
    );
}

/// Waits until `proxy` refuses `key` (401), within its `lifetime` and 20 s, checks that this
/// came no sooner than `expires_at`, and returns the body of a refusal.
async fn refused_as_expired(
    proxy: &Proxy,
    key: &str,
    expires_at: std::time::SystemTime,
    lifetime: Duration,
) -> Value {
    eventually(
        lifetime + Duration::from_secs(20),
        "the expired key is refused",
        || async { proxy.chat(key, "m").await.status() == 401 },
    )
    .await;
    // The control plane keeps an expiry to the millisecond (`expire_time_ms`): a key is due at
    // `expires_at` without its sub-millisecond part.
    let since_epoch = expires_at.duration_since(std::time::UNIX_EPOCH).unwrap();
    let due = std::time::UNIX_EPOCH + Duration::from_millis(since_epoch.as_millis() as u64);
    assert!(
        std::time::SystemTime::now() >= due,
        "refused before its expiry"
    );
    let r = proxy.chat(key, "m").await;
    assert_eq!(r.status(), 401);
    r.json().await.unwrap()
}

/// A replica cut off from the control plane (here: the control plane stopped) says so
/// (`sluice_control_plane_connected` 0), and cannot learn that a key expired from a snapshot; it refuses the key by its own clock, a minute
/// (`EXPIRY_GRACE`) past its expiry, so that a replica whose clock runs up to that much ahead
/// never refuses a key the control plane still takes. This replica's clock runs a minute ahead,
/// so that the minute passes within the test.
#[tokio::test]
async fn a_replica_cut_off_from_the_control_plane_refuses_a_key_past_its_expiry() {
    let (mut cluster, _mock, lasting) = Cluster::with_one_backend().await;
    let proxy = cluster.proxy_with(&["--wall-clock-offset=60s"]).await;
    let lifetime = Duration::from_secs(4);
    let expires_at = std::time::SystemTime::now() + lifetime;
    let expiring = cluster.create_key_expiring("short-lived", expires_at).await;
    cluster.wait_replicas_current(1).await;
    // Served while its expiry is ahead, by either clock.
    assert_eq!(proxy.chat(&expiring, "m").await.status(), 200);
    let connected = || async {
        let text = proxy.metrics().await;
        let line = text
            .lines()
            .find(|l| l.starts_with("sluice_control_plane_connected "))
            .unwrap_or_else(|| panic!("no connected gauge:\n{text}"))
            .to_owned();
        line == "sluice_control_plane_connected 1"
    };
    assert!(connected().await, "connected to the control plane");
    cluster.stop_control().await;
    // The replica says it is cut off.
    eventually(
        Duration::from_secs(20),
        "the replica's gauge says it is cut off",
        || async { !connected().await },
    )
    .await;
    // Nothing reaches the replica now; the key expires.
    let body = refused_as_expired(&proxy, &expiring, expires_at, lifetime).await;
    assert_eq!(body["error"]["code"], "api_key_expired", "{body}");
    // A key without an expiry is served on.
    assert_eq!(proxy.chat(&lasting, "m").await.status(), 200);
}

#[tokio::test]
async fn a_key_is_refused_as_expired_once_its_expiry_passes() {
    let (cluster, _mock, lasting) = Cluster::with_one_backend().await;
    let proxy = cluster.proxy().await;
    let lifetime = Duration::from_secs(6);
    let expires_at = std::time::SystemTime::now() + lifetime;
    let expiring = cluster.create_key_expiring("short-lived", expires_at).await;
    // Before the expiry it is served, once the replica has the snapshot with the key.
    let mut served = false;
    while !served && std::time::SystemTime::now() + Duration::from_secs(1) < expires_at {
        served = proxy.chat(&expiring, "m").await.status() == 200;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(served, "not served in the {lifetime:?} before its expiry");

    // After it: 401 saying so, through the real control plane's sweep and snapshot.
    let body = refused_as_expired(&proxy, &expiring, expires_at, lifetime).await;
    assert_eq!(body["error"]["code"], "api_key_expired");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("expired"),
        "{body}"
    );
    // Only that key: the other one is served, and an unknown key is still just unknown.
    assert_eq!(proxy.chat(&lasting, "m").await.status(), 200);
    let r = proxy.chat("sk-sluice-unknown", "m").await;
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_api_key");
    let listed = cluster
        .admin()
        .await
        .list_client_keys(pb::ListClientKeysRequest::default())
        .await
        .unwrap()
        .into_inner();
    let short = listed
        .client_keys
        .iter()
        .find(|k| k.name == "short-lived")
        .unwrap();
    assert!(short.expired && !short.revoked);

    // Extended in place, the same key is served again: no new key to hand out.
    let later = std::time::SystemTime::now() + Duration::from_secs(3_600);
    let since_epoch = later.duration_since(std::time::UNIX_EPOCH).unwrap();
    cluster
        .admin()
        .await
        .update_client_key(pb::UpdateClientKeyRequest {
            client_key: Some(pb::ClientKey {
                id: "short-lived".into(),
                expire_time: Some(sluice_proto::wkt::Timestamp {
                    seconds: since_epoch.as_secs() as i64,
                    nanos: 0,
                }),
                ..Default::default()
            }),
            update_mask: Some(sluice_proto::wkt::FieldMask {
                paths: vec!["expire_time".into()],
            }),
        })
        .await
        .unwrap();
    eventually(
        Duration::from_secs(10),
        "the extended key is served again",
        || async { proxy.chat(&expiring, "m").await.status() == 200 },
    )
    .await;
}

#[tokio::test]
async fn a_failing_primary_fails_over_to_the_fallback_pool() {
    let cluster = Cluster::start().await;
    cluster.expose_backend_header(true).await;
    let primary = Mock::start("primary", &["m"]).await;
    let fallback = Mock::start("fallback", &["m"]).await;
    cluster
        .add_backend("primary", &primary, pb::Pool::Primary, 0, &[("m", "m")])
        .await;
    cluster
        .add_backend("fallback", &fallback, pb::Pool::Fallback, 0, &[("m", "m")])
        .await;
    let (_, key) = cluster.create_key("k", &[]).await;
    let proxy = cluster.proxy().await;

    let r = proxy.chat(&key, "m").await;
    assert_eq!(r.headers()["x-sluice-backend"], "primary");

    for fault in [Fault::status(500), Fault::rate_limited(1)] {
        primary.set_faults(vec![fault.clone().always()]).await;
        let r = proxy.chat(&key, "m").await;
        assert_eq!(r.status(), 200, "{fault:?}");
        assert_eq!(r.headers()["x-sluice-backend"], "fallback", "{fault:?}");
        let body: Value = r.json().await.unwrap();
        assert!(
            body["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .starts_with("[fallback]")
        );
    }
    // A primary that refuses connections: stop it.
    drop(primary);
    let r = proxy.chat(&key, "m").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-sluice-backend"], "fallback");
}

#[tokio::test]
async fn a_new_backend_serves_within_a_second_without_restart() {
    let cluster = Cluster::start().await;
    cluster.expose_backend_header(true).await;
    let mock = Mock::start("mock-a", &["old", "new"]).await;
    cluster
        .add_backend("a", &mock, pb::Pool::Primary, 0, &[("old", "old")])
        .await;
    let (_, key) = cluster.create_key("k", &[]).await;
    let proxy = cluster.proxy().await;
    assert_eq!(proxy.chat(&key, "new").await.status(), 404);

    let mock_b = Mock::start("mock-b", &["new"]).await;
    cluster
        .add_backend("b", &mock_b, pb::Pool::Primary, 0, &[("new", "new")])
        .await;
    let added = tokio::time::Instant::now();
    eventually(
        Duration::from_secs(1),
        "the new backend serves within a second",
        || async { proxy.chat(&key, "new").await.status() == 200 },
    )
    .await;
    eprintln!(
        "new backend served {:?} after the admin call returned",
        added.elapsed()
    );
    let r = proxy.chat(&key, "new").await;
    assert_eq!(r.headers()["x-sluice-backend"], "b");
}

#[tokio::test]
async fn usage_totals_match_the_mock_across_a_control_plane_restart() {
    let mut cluster = Cluster::start().await;
    let mock = Mock::start("mock-a", &["m"]).await;
    cluster
        .add_backend("a", &mock, pb::Pool::Primary, 0, &[("m", "m")])
        .await;
    let (_, key) = cluster.create_key("k", &[]).await;
    let proxy = cluster.proxy().await;

    let send = |n: usize| {
        let proxy = &proxy;
        let key = key.clone();
        async move {
            for i in 0..n {
                let stream = i % 2 == 0;
                let r = proxy
                    .post(
                        "/v1/chat/completions",
                        &key,
                        json!({"model": "m", "stream": stream, "messages": [{"role": "user", "content": "a b c d"}]}),
                    )
                    .await;
                assert_eq!(r.status(), 200);
                r.bytes().await.unwrap();
            }
        }
    };
    send(20).await;
    // Stop the control plane; the data plane keeps serving on its snapshot and queues usage.
    cluster.stop_control().await;
    send(20).await;
    cluster.start_control().await;
    send(10).await;

    let served = mock.stats().await;
    assert_eq!(served.requests.chat_completions, 50);
    eventually(
        Duration::from_secs(15),
        "usage totals equal what the mock served",
        || async {
            let t = cluster.totals().await;
            t.request_count == 50
                && t.prompt_tokens == served.prompt_tokens
                && t.completion_tokens == served.completion_tokens
        },
    )
    .await;
    // And stay there once the replica holds nothing unacked (a resend still under way could
    // otherwise land after the check): nothing is counted twice after the resend.
    eventually(Duration::from_secs(15), "every record acked", || async {
        sluice_control::testing::metric_samples(&proxy.metrics().await)
            .get("sluice_usage_queue_depth")
            == Some(&0.0)
    })
    .await;
    let t = cluster.totals().await;
    assert_eq!(
        (t.request_count, t.prompt_tokens, t.completion_tokens),
        (50, served.prompt_tokens, served.completion_tokens)
    );
    // The key's spend is exactly those tokens at the route's prices ($1 in, $2 out per
    // million: 1 000 and 2 000 nano-units a token), each request's cost computed by the
    // replica and counted once across the restart and the resend.
    let key = cluster
        .admin()
        .await
        .get_client_key(pb::GetClientKeyRequest { id: "k".into() })
        .await
        .unwrap()
        .into_inner()
        .client_key
        .unwrap();
    let nanos = served.prompt_tokens * 1_000 + served.completion_tokens * 2_000;
    assert_eq!((key.spend * 1e9).round() as u64, nanos, "{key:?}");
}

#[tokio::test]
async fn upstream_calls_go_through_the_egress_proxy_the_environment_names() {
    let cluster = Cluster::start().await;
    // The mock plays the egress proxy: it answers the absolute-form request
    // (`POST http://provider.invalid/v1/chat/completions`) a client sends to an HTTP proxy.
    let egress = Mock::start("egress", &["m-up"]).await;
    // The provider's host does not exist: only the proxy can reach it.
    let route = pb::ModelRoute {
        name: "m".into(),
        upstream_name: "m-up".into(),
        ..Default::default()
    };
    cluster
        .add_backend_at(
            "behind-proxy",
            "http://provider.invalid/v1",
            &egress,
            vec![route],
        )
        .await;
    let (_, key) = cluster.create_key("k", &[]).await;
    let proxy_url = format!("http://{}", egress.addr);
    let proxy = cluster
        .proxy_with_env(&[], &[("HTTP_PROXY", &proxy_url)])
        .await;

    let r = proxy.chat(&key, "m").await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert_eq!(egress.stats().await.requests.chat_completions, 1);
    // The start says so, without the proxy's address (it may carry credentials).
    let output = proxy.child.output();
    assert!(
        output.iter().any(|l| l.contains("egress proxy")),
        "{output:#?}"
    );
    assert!(
        !output.iter().any(|l| l.contains(&egress.addr.to_string())),
        "{output:#?}"
    );
}

/// Google's Gemini endpoint counts a thinking model's thoughts in `total_tokens` alone (no
/// `reasoning_tokens`; `completion_tokens` is the visible text) and bills them as output: a
/// backend on Google's hosts is charged them as reasoning, in the totals and the cost. An
/// embeddings answer there that reports its total alone is its prompt, as anywhere: it
/// generated nothing (it was read as free thoughts). The mock plays both the egress proxy
/// and Google (the host is reached only through the proxy).
#[tokio::test]
async fn a_google_backends_thoughts_counted_in_its_total_are_charged_as_output() {
    let cluster = Cluster::start().await;
    let google = Mock::start("google", &["gemini-up"]).await;
    let whole = r#"{"choices":[{"finish_reason":"stop","index":0,"message":{"content":"1, 2","role":"assistant"}}],"created":1,"id":"x","model":"gemini-3-flash-preview","object":"chat.completion","usage":{"completion_tokens":3,"prompt_tokens":9,"total_tokens":105}}"#;
    let embedded = r#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.1]}],"model":"gemini-up","usage":{"total_tokens":7}}"#;
    google
        .set_faults(vec![
            Fault::Body {
                code: 200,
                body: whole.into(),
            }
            .times(1),
            Fault::Body {
                code: 200,
                body: embedded.into(),
            }
            .times(1),
        ])
        .await;
    let route = pb::ModelRoute {
        name: "gemini".into(),
        upstream_name: "gemini-up".into(),
        input_price_per_mtok: 1.0,
        output_price_per_mtok: 2.0,
        ..Default::default()
    };
    let base_url = "http://generativelanguage.googleapis.com/v1";
    cluster
        .add_backend_at("gemini", base_url, &google, vec![route])
        .await;
    let (_, key) = cluster.create_key("k", &[]).await;
    let proxy = cluster
        .proxy_with_env(&[], &[("HTTP_PROXY", &format!("http://{}", google.addr))])
        .await;
    let r = proxy.chat(&key, "gemini").await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    eventually(Duration::from_secs(10), "the request's usage", || async {
        cluster.totals().await.request_count == 1
    })
    .await;
    let t = cluster.totals().await;
    assert_eq!(
        (t.prompt_tokens, t.completion_tokens, t.reasoning_tokens),
        (9, 96, 93)
    );
    assert!(
        (t.cost - (9.0 * 1.0 + 96.0 * 2.0) / 1e6).abs() < 1e-12,
        "{t:?}"
    );
    let r = proxy
        .post(
            "/v1/embeddings",
            &key,
            serde_json::json!({"model": "gemini", "input": "embed me"}),
        )
        .await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    eventually(Duration::from_secs(10), "the embedding's usage", || async {
        cluster.totals().await.request_count == 2
    })
    .await;
    let t = cluster.totals().await;
    assert_eq!(
        (t.prompt_tokens, t.completion_tokens, t.reasoning_tokens),
        (9 + 7, 96, 93)
    );
}

/// Azure OpenAI's deployments: the deployment in the base URL's path, the API version in its
/// query, the key in `api-key` (the mock, as Azure, takes it nowhere else, and refuses a
/// deployment's path without `api-version`). Chat, whole and streamed, and embeddings are
/// served and accounted; with the key back in the format's own header (`Authorization`) the
/// same requests are refused upstream.
#[tokio::test]
async fn an_azure_deployment_gets_its_api_version_and_its_key_in_api_key() {
    let cluster = Cluster::start().await;
    let azure = Mock::start_with("azure", &["gpt-4o"], &["--key-header", "api-key"]).await;
    let backend = pb::Backend {
        name: "azure".into(),
        base_url: format!(
            "http://{}/openai/deployments/gpt-4o/?api-version=2024-10-21",
            azure.addr
        ),
        pool: pb::Pool::Primary as i32,
        weight: 1,
        enabled: true,
        models: vec![pb::ModelRoute {
            name: "gpt-4o".into(),
            input_price_per_mtok: 1.0,
            output_price_per_mtok: 2.0,
            ..Default::default()
        }],
        key_header: pb::KeyHeader::ApiKey as i32,
        ..Default::default()
    };
    let backend = cluster.create_backend_for(backend, &azure).await;
    assert_eq!(
        backend.base_url,
        format!(
            "http://{}/openai/deployments/gpt-4o?api-version=2024-10-21",
            azure.addr
        )
    );
    let (_, key) = cluster.create_key("k", &[]).await;
    let proxy = cluster.proxy().await;

    let r = proxy.chat(&key, "gpt-4o").await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let streamed = proxy
        .post(
            "/v1/chat/completions",
            &key,
            json!({"model": "gpt-4o", "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(streamed.status(), 200);
    let text = streamed.text().await.unwrap();
    assert!(
        text.contains("[azure]") && text.ends_with("data: [DONE]\n\n"),
        "{text}"
    );
    let r = proxy
        .post(
            "/v1/embeddings",
            &key,
            json!({"model": "gpt-4o", "input": "one two three"}),
        )
        .await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    eventually(
        Duration::from_secs(10),
        "the three requests' usage",
        || async { cluster.totals().await.request_count == 3 },
    )
    .await;
    let stats = azure.stats().await;
    assert_eq!(stats.requests.total(), 3, "{stats:?}");
    let totals = cluster.totals().await;
    assert_eq!(
        (totals.prompt_tokens, totals.completion_tokens),
        (stats.prompt_tokens, stats.completion_tokens)
    );

    // The format's own header: Azure's deployments refuse the key there.
    let mut back = backend.clone();
    back.key_header = pb::KeyHeader::Unspecified as i32;
    cluster.update_backend(back, &["key_header"]).await;
    eventually(
        Duration::from_secs(10),
        "the key refused upstream",
        || async { proxy.chat(&key, "gpt-4o").await.status() == 502 },
    )
    .await;
}

/// nginx terminating TLS in front of a mock, as the internet has providers: HTTP/2 offered
/// (ALPN), at most two streams a connection, the protocol of each request it took logged.
/// Stopped when dropped.
struct TlsFront {
    nginx: std::process::Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl TlsFront {
    /// In front of `mock`, with `certs`' `server.pem` and `server.key`.
    async fn start(mock: &Mock, certs: &std::path::Path) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = common::free_port();
        let (d, c) = (dir.path().display(), certs.display());
        let conf = format!(
            "worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n\
               log_format protocol '$server_protocol';\n\
               access_log {d}/access.log protocol;\n\
               client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;\n\
               fastcgi_temp_path {d}/fastcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
               server {{\n\
                 listen 127.0.0.1:{port} ssl http2;\n\
                 ssl_certificate {c}/server.pem;\n\
                 ssl_certificate_key {c}/server.key;\n\
                 http2_max_concurrent_streams 2;\n\
                 location / {{\n\
                   proxy_pass http://{mock};\n\
                   proxy_http_version 1.1;\n\
                   proxy_buffering off;\n\
                 }}\n\
               }}\n\
             }}\n",
            mock = mock.addr,
        );
        let path = dir.path().join("nginx.conf");
        std::fs::write(&path, conf).unwrap();
        let nginx = ["/usr/sbin/nginx", "nginx"]
            .into_iter()
            .find(|n| std::process::Command::new(n).arg("-v").output().is_ok())
            .expect("nginx (apt-get install nginx; e2e/test-all.sh does)");
        let child = std::process::Command::new(nginx)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&path)
            .args(["-g", "daemon off;"])
            .spawn()
            .unwrap();
        let front = Self {
            nginx: child,
            port,
            dir,
        };
        eventually(Duration::from_secs(10), "nginx listening", || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        })
        .await;
        front
    }

    fn base_url(&self) -> String {
        format!("https://127.0.0.1:{}/v1", self.port)
    }

    /// The protocol of each request it took, in order (`HTTP/1.1`, `HTTP/2.0`).
    fn protocols(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("access.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for TlsFront {
    /// SIGTERM, which nginx passes on to its worker (SIGKILL would leave the worker behind).
    fn drop(&mut self) {
        common::signal(self.nginx.id(), "TERM");
        let _ = self.nginx.wait();
    }
}

/// An `https://` backend behind a private CA is reached once `--upstream-ca` names the CA
/// (before, only the bundled Mozilla roots were trusted: no way to a model server inside the
/// company, nor through an egress proxy that intercepts TLS), and over HTTP/1.1 unless
/// `--upstream-http2`: the provider here caps its HTTP/2 connections at two streams and takes
/// a second an answer, and 24 requests at once all get theirs within the 3 s answer timeout. Over HTTP/2 a serving thread carried all its
/// requests to the host on one connection, so those past the cap waited their turn and
/// timed out as the backend's failures.
#[tokio::test]
async fn an_https_backend_behind_a_private_ca_takes_requests_past_its_stream_limit() {
    let certs = tempfile::tempdir().unwrap();
    sluice_e2e::certs::make_certificates(certs.path());
    let ca = certs.path().join("ca.pem");
    let ca = ca.to_str().unwrap();
    let mock = Mock::start_with("a", &["m"], &["--latency", "1s"]).await;
    let front = TlsFront::start(&mock, certs.path()).await;
    let cluster = Cluster::start().await;
    cluster
        .set_settings(
            pb::Settings {
                answer_timeout: Some(common::seconds(3)),
                ..Default::default()
            },
            &["answer_timeout"],
        )
        .await;
    cluster
        .add_backend_via(
            pb::ApiFormat::Openai,
            "tls",
            &mock,
            &front.base_url(),
            pb::Pool::Primary,
            0,
            &[("m", "m")],
        )
        .await;
    let (_, key) = cluster.create_key("k", &[]).await;

    // Without the CA the certificate is not trusted: nothing reaches the provider.
    let untrusting = cluster.proxy().await;
    let refused = untrusting.chat(&key, "m").await;
    assert_eq!(refused.status(), 502);
    assert!(front.protocols().is_empty(), "{:?}", front.protocols());
    drop(untrusting);

    let proxy = cluster.proxy_with(&["--upstream-ca", ca]).await;
    let answers = futures::future::join_all((0..24).map(|_| proxy.chat(&key, "m"))).await;
    let statuses: Vec<u16> = answers.iter().map(|a| a.status().as_u16()).collect();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    // nginx logs a request just after its answer's last bytes.
    eventually(
        Duration::from_secs(10),
        "nginx logged 24 requests",
        || async { front.protocols().len() == 24 },
    )
    .await;
    let protocols = front.protocols();
    assert!(protocols.iter().all(|p| p == "HTTP/1.1"), "{protocols:?}");
    drop(proxy);

    // Offered HTTP/2, the provider takes it.
    let proxy = cluster
        .proxy_with(&["--upstream-ca", ca, "--upstream-http2"])
        .await;
    assert_eq!(proxy.chat(&key, "m").await.status(), 200);
    eventually(
        Duration::from_secs(10),
        "nginx logged the request",
        || async { front.protocols().len() == 25 },
    )
    .await;
    assert_eq!(
        front.protocols().last().map(String::as_str),
        Some("HTTP/2.0")
    );
}

/// OpenAI says in each answer which processing tier served it (`service_tier`): `priority`
/// (GPT-5's at twice the standard price; also the answer to a request for "fast" mode),
/// `flex` (at half), `default`. A route lists what its tiers multiply its prices by
/// (`sluicectl backend add --tier`), and each request is charged at the tier its answer
/// reports, chat and Responses, whole and streamed, not at the one its request asked for:
/// the answer's may differ ("auto" served at a project's priority, flex at the standard tier
/// when capacity is short), and here the mock serves priority asked at the standard tier and
/// auto at priority. A tier taken off (`backend update --tier MODEL:TIER=1`, the model's
/// other tiers kept) is charged the route's prices.
#[tokio::test]
async fn each_answer_is_spent_at_the_price_tier_it_reports() {
    const TIERS: &str = r#"
import json, sys
from openai import OpenAI
base, key, tiers = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
c = OpenAI(base_url=base, api_key=key, max_retries=0)
hello = [{"role": "user", "content": "hello there"}]
out = []
for tier in tiers:
    r = c.chat.completions.create(model="gpt", messages=hello, service_tier=tier)
    out.append([r.service_tier, r.usage.prompt_tokens, r.usage.completion_tokens])
    usage, served = None, None
    for chunk in c.chat.completions.create(model="gpt", messages=hello, service_tier=tier,
                                           stream=True, stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        served = chunk.service_tier or served
    out.append([served, usage.prompt_tokens, usage.completion_tokens])
    r = c.responses.create(model="gpt", input="hello there", service_tier=tier)
    out.append([r.service_tier, r.usage.input_tokens, r.usage.output_tokens])
    with c.responses.stream(model="gpt", input="hello there", service_tier=tier) as s:
        r = s.get_final_response()
    out.append([r.service_tier, r.usage.input_tokens, r.usage.output_tokens])
print(json.dumps(out))
"#;
    let cluster = Cluster::start().await;
    let mock = Mock::start_with(
        "tiers",
        &["gpt-up"],
        &[
            "--serve-tier",
            "priority=default",
            "--serve-tier",
            "auto=priority",
        ],
    )
    .await;
    add_openai_with_sluicectl(
        &cluster,
        &mock,
        &[
            "--model",
            "gpt:gpt-up:1:10",
            "--tier",
            "gpt:priority=2",
            "--tier",
            "gpt:flex=0.5",
        ],
    )
    .await;
    let shown = cluster.sluicectl(&["backend", "get", "openai"]).await;
    assert!(shown.contains("priority=2,flex=0.5"), "{shown}");
    let (created, key) = cluster.create_key("tiered", &[]).await;
    let proxy = cluster.proxy().await;
    // $1 in, $10 out a million tokens: 1,000 and 10,000 nano-units a token, at each tier's
    // multiple.
    let bill = |answers: &Value, multiplier: &dyn Fn(&str) -> f64| -> u64 {
        answers
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                let tokens = a[1].as_u64().unwrap() * 1_000 + a[2].as_u64().unwrap() * 10_000;
                (tokens as f64 * multiplier(a[0].as_str().unwrap())).round() as u64
            })
            .sum()
    };
    let spent = |billed: u64| {
        let cluster = &cluster;
        let id = created.id.clone();
        async move {
            eventually(Duration::from_secs(30), "the key's spend is the bill", || {
                let id = id.clone();
                async move { (cluster.client_key(&id).await.spend * 1e9).round() as u64 == billed }
            })
            .await;
        }
    };
    let answers =
        common::python(TIERS, &[&proxy.url("/v1"), &key, "priority,flex,auto,fast"]).await;
    let served: Vec<&str> = answers
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a[0].as_str().unwrap())
        .collect();
    // Asked priority, flex, auto and fast (which OpenAI serves as priority).
    assert_eq!(
        served,
        [["default"; 4], ["flex"; 4], ["priority"; 4], ["default"; 4]].concat(),
        "{answers}"
    );
    let multiplier = |tier: &str| match tier {
        "priority" | "fast" => 2.0,
        "flex" => 0.5,
        _ => 1.0,
    };
    let tiered = bill(&answers, &multiplier);
    assert_ne!(tiered, bill(&answers, &|_| 1.0));
    // The bill of the tiers asked for, each answer's tokens at its request's tier.
    let mut asked = answers.clone();
    for (answer, tier) in asked.as_array_mut().unwrap().iter_mut().zip(
        ["priority", "flex", "auto", "fast"]
            .iter()
            .flat_map(|t| [t; 4]),
    ) {
        answer[0] = Value::from(*tier);
    }
    assert_ne!(tiered, bill(&asked, &multiplier));
    spent(tiered).await;

    // Priority taken off, flex kept: the model given without prices keeps them.
    let before = cluster.latest_version().await;
    cluster
        .sluicectl(&[
            "backend",
            "update",
            "openai",
            "--model",
            "gpt:gpt-up",
            "--tier",
            "gpt:priority=1",
        ])
        .await;
    let shown = cluster.sluicectl(&["backend", "get", "openai"]).await;
    assert!(
        shown.contains("PRICE TIERS")
            && shown.contains(" flex=0.5")
            && !shown.contains("priority="),
        "{shown}"
    );
    assert!(
        shown
            .lines()
            .any(|l| l.starts_with("gpt ") && l.split_whitespace().any(|cell| cell == "10")),
        "{shown}"
    );
    cluster.wait_replicas_past(1, before).await;
    let answers = common::python(TIERS, &[&proxy.url("/v1"), &key, "priority,flex"]).await;
    let flex_only = bill(&answers, &|tier| if tier == "flex" { 0.5 } else { 1.0 });
    spent(tiered + flex_only).await;
}

/// A provider bills a long request at a band of its own (GPT-5.4 past 272,000 prompt tokens at
/// twice the input price and 1.5 times the output price; Gemini 2.5 Pro past 200,000
/// likewise): a route's `--long-context` charges each request whose prompt passes the
/// threshold at the band, and one at or under it at the route's prices. Here the threshold is
/// 10 tokens (the mock counts a word a token).
#[tokio::test]
async fn a_long_request_is_spent_at_its_long_context_band() {
    let cluster = Cluster::start().await;
    let mock = Mock::start("long", &["gpt-up"]).await;
    add_openai_with_sluicectl(
        &cluster,
        &mock,
        &[
            "--model",
            "gpt:gpt-up:1:10",
            "--long-context",
            "gpt:10:2:1.5",
        ],
    )
    .await;
    let shown = cluster.sluicectl(&["backend", "get", "openai"]).await;
    assert!(
        shown.contains("LONG CONTEXT") && shown.contains("10:2:1.5"),
        "{shown}"
    );
    let (created, key) = cluster.create_key("long", &[]).await;
    let proxy = cluster.proxy().await;
    let mut billed = 0.0;
    let mut prompts = Vec::new();
    for words in [3, 10, 11, 40] {
        let content = vec!["word"; words].join(" ");
        let answer: Value = proxy
            .post(
                "/v1/chat/completions",
                &key,
                json!({"model": "gpt", "messages": [{"role": "user", "content": content}]}),
            )
            .await
            .json()
            .await
            .unwrap();
        let usage = &answer["usage"];
        let (prompt, completion) = (
            usage["prompt_tokens"].as_u64().unwrap(),
            usage["completion_tokens"].as_u64().unwrap(),
        );
        prompts.push(prompt);
        // $1 in and $10 out a million tokens: 1,000 and 10,000 nano-units a token.
        let (input, output) = if prompt > 10 { (2.0, 1.5) } else { (1.0, 1.0) };
        billed += prompt as f64 * 1_000.0 * input + completion as f64 * 10_000.0 * output;
    }
    assert_eq!(prompts, [3, 10, 11, 40], "the mock counts a word a token");
    let billed = billed.round() as u64;
    eventually(
        Duration::from_secs(30),
        "the key's spend is the bill",
        || async { (cluster.client_key(&created.id).await.spend * 1e9).round() as u64 == billed },
    )
    .await;
}

/// OpenAI bills the Responses API's built-in tools by the call, on top of the tokens: $10 per
/// 1,000 web searches, $2.50 per 1,000 file searches, one `web_search_call` or
/// `file_search_call` output item a call. A route that prices them (`sluicectl backend add
/// --call-price`) charges each answer its calls, whole and streamed (counted once, from
/// `response.completed`); a request without them pays its tokens alone.
#[tokio::test]
async fn each_answer_is_spent_its_built_in_tools_calls() {
    const SEARCHES: &str = r#"
import json, sys
from openai import OpenAI
base, key = sys.argv[1:3]
c = OpenAI(base_url=base, api_key=key, max_retries=0)
out = []
for tools in [[{"type": "web_search"}, {"type": "file_search", "vector_store_ids": ["vs_1"]}],
              [{"type": "web_search"}], []]:
    r = c.responses.create(model="gpt", input="hello there", tools=tools)
    calls = [item.type for item in r.output if item.type.endswith("_call")]
    out.append([calls, r.usage.input_tokens, r.usage.output_tokens])
    with c.responses.stream(model="gpt", input="hello there", tools=tools) as s:
        r = s.get_final_response()
    calls = [item.type for item in r.output if item.type.endswith("_call")]
    out.append([calls, r.usage.input_tokens, r.usage.output_tokens])
print(json.dumps(out))
"#;
    let cluster = Cluster::start().await;
    let mock = Mock::start("searches", &["gpt-up"]).await;
    add_openai_with_sluicectl(
        &cluster,
        &mock,
        &[
            "--model",
            "gpt:gpt-up:1:10",
            "--call-price",
            "gpt:web_search=10",
            "--call-price",
            "gpt:file_search=2.5",
        ],
    )
    .await;
    let shown = cluster.sluicectl(&["backend", "get", "openai"]).await;
    assert!(
        shown.contains("CALL PRICES /1K") && shown.contains("web_search=10,file_search=2.5"),
        "{shown}"
    );
    let (created, key) = cluster.create_key("searching", &[]).await;
    let proxy = cluster.proxy().await;
    let answers = common::python(SEARCHES, &[&proxy.url("/v1"), &key]).await;
    let answers = answers.as_array().unwrap();
    let both = json!(["web_search_call", "file_search_call"]);
    let calls: Vec<&Value> = answers.iter().map(|a| &a[0]).collect();
    assert_eq!(
        calls,
        [
            &both,
            &both,
            &json!(["web_search_call"]),
            &json!(["web_search_call"]),
            &json!([]),
            &json!([])
        ],
        "{answers:?}"
    );
    // $1 in, $10 out a million tokens; a web search a cent (10,000,000 nano-units), a file
    // search a quarter of one.
    let billed: u64 = answers
        .iter()
        .map(|a| {
            let tokens = a[1].as_u64().unwrap() * 1_000 + a[2].as_u64().unwrap() * 10_000;
            let calls: u64 = a[0]
                .as_array()
                .unwrap()
                .iter()
                .map(|call| match call.as_str().unwrap() {
                    "web_search_call" => 10_000_000,
                    "file_search_call" => 2_500_000,
                    other => panic!("{other}"),
                })
                .sum();
            tokens + calls
        })
        .sum();
    assert!(billed > 4 * 10_000_000 + 2 * 2_500_000, "{billed}");
    eventually(
        Duration::from_secs(30),
        "the key's spend is the bill",
        || async { (cluster.client_key(&created.id).await.spend * 1e9).round() as u64 == billed },
    )
    .await;
}

/// `sluicectl backend add --name openai` for `mock`, its provider key from the environment as an
/// operator gives it, with `args` (its routes, their prices, tiers and bands).
pub(crate) async fn add_openai_with_sluicectl(cluster: &Cluster, mock: &Mock, args: &[&str]) {
    let added = tokio::process::Command::new(sluice_e2e::process::workspace_bin("sluicectl"))
        .args([
            "--endpoint",
            &cluster.control_url(),
            "--token",
            common::ADMIN_TOKEN,
        ])
        .args([
            "backend",
            "add",
            "--name",
            "openai",
            "--base-url",
            &mock.base_url(),
        ])
        .args(["--api-key-env", "KEY"])
        .args(args)
        .env("KEY", mock.api_key.clone().unwrap())
        .output()
        .await
        .unwrap();
    assert!(added.status.success(), "{added:?}");
}
