//! The Responses API through the proxy, against mock providers that keep response state:
//! ids that carry their backend, continuations and calls on a stored response pinned to it,
//! usage with cached and reasoning tokens, and the errors for ids and backends that cannot
//! be used.

use crate::support;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use serde_json::{Value, json};
use sluice_e2e::mock::{Fault, MockConfig, MockServer};
use sluice_proto::v1::{self as proto, ErrorKind};
use support::harness::*;

fn mock(name: &str) -> MockServer {
    MockServer::start_local(
        MockConfig::named(name)
            .with_api_key(format!("sk-upstream-{name}"))
            .with_chunk_count(3),
    )
    .unwrap()
}

async fn create(h: &Harness, body: Value) -> reqwest::Response {
    h.post("/v1/responses", KEY, &body).await
}

async fn on_stored(
    h: &Harness,
    method: reqwest::Method,
    path: &str,
    key: &str,
) -> reqwest::Response {
    h.http
        .request(method, h.url(path))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
}

async fn retrieve(h: &Harness, id: &str) -> reqwest::Response {
    on_stored(h, reqwest::Method::GET, &format!("/v1/responses/{id}"), KEY).await
}

async fn error_code(response: reqwest::Response, status: u16) -> (String, Value) {
    assert_eq!(response.status().as_u16(), status);
    let body: Value = response.json().await.unwrap();
    (
        body["error"]["code"].as_str().unwrap_or("").to_owned(),
        body,
    )
}

/// Two primaries of equal priority: requests spread over both.
async fn two_backends(a: &MockServer, b: &MockServer) -> Harness {
    Harness::start(snapshot(
        1,
        vec![
            backend("alpha", &a.base_url(), proto::Pool::Primary, 0),
            backend("beta", &b.base_url(), proto::Pool::Primary, 0),
        ],
    ))
    .await
}

#[tokio::test]
async fn a_created_response_carries_sluice_id_and_its_usage_is_recorded() {
    let alpha = mock("primary");
    let h = Harness::one_primary(&alpha.base_url()).await;
    let response = create(
        &h,
        json!({"model": MODEL, "input": "one two three", "reasoning": {"effort": "low"}}),
    )
    .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    let id = body["id"].as_str().unwrap();
    assert!(id.starts_with("resp_"));
    assert_eq!(body["model"], format!("{MODEL}-at-primary"));
    assert_eq!(
        body["output"][1]["content"][0]["text"],
        "[primary] tok1 tok2"
    );

    let record = h.records(1).await.remove(0);
    assert_eq!(record.endpoint, proto::Endpoint::Responses as i32);
    assert_eq!(record.backend_id, "primary");
    assert_eq!(record.model, MODEL);
    assert_eq!(record.status_code, 200);
    assert_eq!((record.prompt_tokens, record.completion_tokens), (3, 6));
    // Its cost is the replica's, 0 at this route's prices: not to be priced again.
    assert!(record.priced && record.cost_nanos == 0, "{record:?}");
    assert_eq!(
        (record.cached_prompt_tokens, record.reasoning_tokens),
        (0, 3)
    );

    // Retrieved through Sluice: the same object, the same id; no usage counted again.
    let got = retrieve(&h, id).await;
    assert_eq!(got.status(), 200);
    let got: Value = got.json().await.unwrap();
    assert_eq!(got, body);
    let records = h.records(2).await;
    assert_eq!(records[1].endpoint, proto::Endpoint::Responses as i32);
    assert_eq!(records[1].model, MODEL);
    assert_eq!(
        (records[1].prompt_tokens, records[1].completion_tokens),
        (0, 0)
    );
}

#[tokio::test]
async fn a_stream_is_relayed_event_by_event_with_sluice_ids() {
    let alpha = mock("primary");
    let h = Harness::one_primary(&alpha.base_url()).await;
    let response = create(
        &h,
        json!({"model": MODEL, "input": "hi there", "stream": true}),
    )
    .await;
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    let events: Vec<(String, Value)> = text
        .split_terminator("\n\n")
        .map(|frame| {
            let mut name = String::new();
            let mut data = String::new();
            for line in frame.lines() {
                if let Some(n) = line.strip_prefix("event: ") {
                    name = n.to_owned();
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data.push_str(d);
                }
            }
            (name, serde_json::from_str(&data).unwrap())
        })
        .collect();
    assert_eq!(events.first().unwrap().0, "response.created");
    assert_eq!(events.last().unwrap().0, "response.completed");
    let deltas: String = events
        .iter()
        .filter(|(n, _)| n == "response.output_text.delta")
        .map(|(_, d)| d["delta"].as_str().unwrap())
        .collect();
    assert_eq!(deltas, "[primary] tok1 tok2");
    let created = events[0].1["response"]["id"].as_str().unwrap();
    let completed = events.last().unwrap().1["response"]["id"].as_str().unwrap();
    assert_eq!(created, completed);
    // The id works for a later call.
    let got = retrieve(&h, completed).await;
    assert_eq!(got.status(), 200);
    let record = h.records(1).await.remove(0);
    assert!(record.stream);
    assert_eq!(record.error_kind, ErrorKind::Unspecified as i32);
    assert_eq!((record.prompt_tokens, record.completion_tokens), (2, 3));
}

#[tokio::test]
async fn continuations_and_stored_calls_go_to_the_backend_holding_the_response() {
    let alpha = mock("alpha");
    let beta = mock("beta");
    let h = two_backends(&alpha, &beta).await;
    // Enough creations that both backends hold some (weighted random over two equals).
    let mut ids = Vec::new();
    for _ in 0..16 {
        let body: Value = create(&h, json!({"model": MODEL, "input": "start"}))
            .await
            .json()
            .await
            .unwrap();
        let text = body["output"][0]["content"][0]["text"]
            .as_str()
            .unwrap()
            .to_owned();
        ids.push((body["id"].as_str().unwrap().to_owned(), text));
    }
    assert!(ids.iter().any(|(_, t)| t.starts_with("[alpha]")));
    assert!(ids.iter().any(|(_, t)| t.starts_with("[beta]")));
    for (id, text) in &ids {
        let holder = if text.starts_with("[alpha]") {
            "[alpha]"
        } else {
            "[beta]"
        };
        let next = create(
            &h,
            json!({"model": MODEL, "input": "go on", "previous_response_id": id}),
        )
        .await;
        assert_eq!(next.status(), 200);
        let next: Value = next.json().await.unwrap();
        assert!(
            next["output"][0]["content"][0]["text"]
                .as_str()
                .unwrap()
                .starts_with(holder)
        );
        // The client sees back exactly the id it sent; the earlier turn is cached input.
        assert_eq!(next["previous_response_id"], id.as_str());
        assert_eq!(next["usage"]["input_tokens_details"]["cached_tokens"], 4);
    }
    // Neither mock ever saw an id it did not create (no 404 from either).
    assert_eq!(alpha.stats().responses_with(404), 0);
    assert_eq!(beta.stats().responses_with(404), 0);

    let (id, _) = &ids[0];
    let items = on_stored(
        &h,
        reqwest::Method::GET,
        &format!("/v1/responses/{id}/input_items?order=asc&limit=5"),
        KEY,
    )
    .await;
    assert_eq!(items.status(), 200);
    let items: Value = items.json().await.unwrap();
    assert_eq!(items["data"][0]["content"][0]["text"], "start");
    let deleted = on_stored(
        &h,
        reqwest::Method::DELETE,
        &format!("/v1/responses/{id}"),
        KEY,
    )
    .await;
    assert_eq!(deleted.status(), 200);
    let deleted: Value = deleted.json().await.unwrap();
    assert_eq!(deleted["id"], id.as_str());
    assert_eq!(deleted["deleted"], true);
    // Gone at its backend: the upstream's 404, quoting the id the client knows.
    let (_, body) = error_code(retrieve(&h, id).await, 404).await;
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains(id.as_str()), "{message}");

    // Cancel: a background response.
    let queued: Value = create(
        &h,
        json!({"model": MODEL, "input": "later", "background": true}),
    )
    .await
    .json()
    .await
    .unwrap();
    let queued_id = queued["id"].as_str().unwrap();
    let cancelled = on_stored(
        &h,
        reqwest::Method::POST,
        &format!("/v1/responses/{queued_id}/cancel"),
        KEY,
    )
    .await;
    assert_eq!(cancelled.status(), 200);
    let cancelled: Value = cancelled.json().await.unwrap();
    assert_eq!(cancelled["status"], "cancelled");
    assert_eq!(cancelled["id"], queued_id);
}

/// A call on a stored response (a retrieve, a delete, an item list, a cancel) takes nothing
/// from its backend's `rpm_limit`: a provider does not count it among the model's requests,
/// and a client polling a background response every second took 60 requests a minute from
/// the creates. Creates, continuations included, take from it as any request does.
#[tokio::test]
async fn calls_on_a_stored_response_take_nothing_from_the_backends_rpm_limit() {
    let alpha = mock("alpha");
    let mut limited = backend("alpha", &alpha.base_url(), proto::Pool::Primary, 0);
    limited.rpm_limit = 1;
    let h = Harness::start(snapshot(1, vec![limited])).await;
    let created = create(&h, json!({"model": MODEL, "input": "x"})).await;
    assert_eq!(created.status(), 200);
    let id = created.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    for _ in 0..3 {
        assert_eq!(retrieve(&h, &id).await.status(), 200);
    }
    let items = on_stored(
        &h,
        reqwest::Method::GET,
        &format!("/v1/responses/{id}/input_items"),
        KEY,
    )
    .await;
    assert_eq!(items.status(), 200);
    // The one request a minute went to the create: a continuation waits its turn.
    let (code, body) = error_code(
        create(
            &h,
            json!({"model": MODEL, "input": "y", "previous_response_id": id}),
        )
        .await,
        429,
    )
    .await;
    assert_eq!(code, "rate_limit_exceeded", "{body}");
}

#[tokio::test]
async fn altered_ids_other_keys_and_unreachable_backends_are_refused_clearly() {
    let alpha = mock("alpha");
    let mut snap = snapshot(
        1,
        vec![backend("alpha", &alpha.base_url(), proto::Pool::Primary, 0)],
    );
    snap.client_keys
        .push(client_key("key-2", "sk-sluice-other-key", &[], 0));
    let h = Harness::start(snap.clone()).await;
    let body: Value = create(&h, json!({"model": MODEL, "input": "x"}))
        .await
        .json()
        .await
        .unwrap();
    let id = body["id"].as_str().unwrap().to_owned();

    // One character changed: refused before any upstream call.
    let mut altered = id.clone().into_bytes();
    let last = altered.len() - 3;
    altered[last] = if altered[last] == b'A' { b'B' } else { b'A' };
    let altered = String::from_utf8(altered).unwrap();
    let before = alpha.stats().requests.responses;
    for (method, path) in [
        (reqwest::Method::GET, format!("/v1/responses/{altered}")),
        (reqwest::Method::DELETE, format!("/v1/responses/{altered}")),
        (
            reqwest::Method::GET,
            format!("/v1/responses/{altered}/input_items"),
        ),
        (
            reqwest::Method::POST,
            format!("/v1/responses/{altered}/cancel"),
        ),
    ] {
        let (code, body) = error_code(on_stored(&h, method, &path, KEY).await, 400).await;
        assert_eq!(code, "invalid_response_id", "{body}");
        assert_eq!(body["error"]["param"], "response_id");
    }
    let (code, body) = error_code(
        create(
            &h,
            json!({"model": MODEL, "input": "x", "previous_response_id": altered}),
        )
        .await,
        400,
    )
    .await;
    assert_eq!(code, "invalid_response_id");
    assert_eq!(body["error"]["param"], "previous_response_id");
    // The upstream's own id is not one of Sluice's either.
    let (code, _) = error_code(
        on_stored(&h, reqwest::Method::GET, "/v1/responses/resp_0123abcd", KEY).await,
        400,
    )
    .await;
    assert_eq!(code, "invalid_response_id");
    // Another client key cannot use this key's response.
    let (code, _) = error_code(
        on_stored(
            &h,
            reqwest::Method::GET,
            &format!("/v1/responses/{id}"),
            "sk-sluice-other-key",
        )
        .await,
        400,
    )
    .await;
    assert_eq!(code, "invalid_response_id");
    assert_eq!(alpha.stats().requests.responses, before);

    // Its backend cooling down: a clear 503 with Retry-After, and no other backend tried.
    let beta = mock("beta");
    let mut two = snapshot(
        2,
        vec![
            backend("alpha", &alpha.base_url(), proto::Pool::Primary, 0),
            backend("beta", &beta.base_url(), proto::Pool::Fallback, 0),
        ],
    );
    two.client_keys = snap.client_keys.clone();
    two.backends[0].cooldown_remaining = Some(sluice_proxy::clock::proto_duration(
        std::time::Duration::from_secs(30),
    ));
    h.publish(two.clone()).await;
    let response = create(
        &h,
        json!({"model": MODEL, "input": "x", "previous_response_id": id}),
    )
    .await;
    assert!(response.headers().contains_key("retry-after"));
    let (code, _) = error_code(response, 503).await;
    assert_eq!(code, "response_backend_cooling_down");
    assert_eq!(beta.stats().requests.total(), 0);

    // Its model cooling down at that backend (a 429 cools the model alone): the same answer,
    // not the 429 "every backend is busy" of a request any backend could take.
    let mut model_cools = two.clone();
    model_cools.version = 3;
    model_cools.backends[0].cooldown_remaining = None;
    model_cools.backends[0].model_cooldowns = vec![proto::ModelCooldown {
        model: format!("{MODEL}-at-alpha"),
        cooldown_epoch: 1,
        consecutive_failures: 1,
        cooldown_remaining: Some(sluice_proxy::clock::proto_duration(
            std::time::Duration::from_secs(30),
        )),
        ..Default::default()
    }];
    h.publish(model_cools).await;
    let response = create(
        &h,
        json!({"model": MODEL, "input": "x", "previous_response_id": id}),
    )
    .await;
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=30).contains(&retry_after), "{retry_after}");
    let (code, _) = error_code(response, 503).await;
    assert_eq!(code, "response_backend_cooling_down");
    assert_eq!(beta.stats().requests.total(), 0);
    // A new conversation is not pinned: the fallback takes it.
    let response = create(&h, json!({"model": MODEL, "input": "x"})).await;
    assert_eq!(response.status(), 200);
    assert_eq!(beta.stats().requests.total(), 1);

    // Its backend set to serve the Responses API no more: a continuation is told so, not
    // that the backend does not serve the model (it does; another model would not help).
    let mut off = two.clone();
    off.version = 4;
    off.backends[0].cooldown_remaining = None;
    off.backends[0].responses_api = Some(false);
    h.publish(off).await;
    let (code, body) = error_code(
        create(
            &h,
            json!({"model": MODEL, "input": "x", "previous_response_id": id}),
        )
        .await,
        404,
    )
    .await;
    assert_eq!(code, "response_backend_unavailable", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no longer serves the Responses API"),
        "{body}"
    );

    // Its backend disabled or deleted (not in the snapshot): 404 that says so.
    let mut gone = two;
    gone.version = 5;
    gone.backends.remove(0);
    h.publish(gone).await;
    let (code, body) = error_code(retrieve(&h, &id).await, 404).await;
    assert_eq!(code, "response_backend_unavailable");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("disabled, was deleted")
    );
    assert_eq!(beta.stats().requests.total(), 1);
}

/// A compaction's answer names no service tier; OpenAI bills it at the one the request asked
/// for (priority at twice the price): it is charged so. Charged the standard price, a
/// priority compaction cost half what the provider billed.
#[tokio::test]
async fn a_compaction_is_charged_at_the_tier_it_asked_for() {
    let alpha = mock("alpha");
    let mut snap = snapshot(
        1,
        vec![backend("alpha", &alpha.base_url(), proto::Pool::Primary, 0)],
    );
    let route = &mut snap.backends[0].models[0];
    route.input_price_per_mtok = 1.0;
    route.output_price_per_mtok = 4.0;
    route.tier_multipliers = vec![proto::TierMultiplier {
        tier: "priority".into(),
        multiplier: 2.0,
    }];
    let h = Harness::start(snap).await;
    let input = json!([{"role": "user", "content": "hello there, a long conversation"}]);
    // OpenAI's renamed "fast" is billed as priority, which the route lists (usage.md).
    for tier in [None, Some("priority"), Some("fast")] {
        let mut body = json!({"model": MODEL, "input": input});
        if let Some(tier) = tier {
            body["service_tier"] = json!(tier);
        }
        let answer = h.post("/v1/responses/compact", KEY, &body).await;
        assert_eq!(answer.status(), 200, "{tier:?}");
    }
    let records = h.records(3).await;
    let standard = &records[0];
    assert!(standard.cost_nanos > 0, "{standard:?}");
    for priority in &records[1..] {
        assert_eq!(
            (priority.prompt_tokens, priority.completion_tokens),
            (standard.prompt_tokens, standard.completion_tokens)
        );
        assert_eq!(priority.cost_nanos, 2 * standard.cost_nanos, "{priority:?}");
    }
    // Asked twice (the provider bills the last, which a client could make the dearer one):
    // refused, never priced at the first.
    let twice = format!(
        r#"{{"model":"{MODEL}","service_tier":"flex","service_tier":"priority","input":{input}}}"#
    );
    let refused = h
        .http
        .post(h.url("/v1/responses/compact"))
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .body(twice)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 400);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "duplicate_key", "{body}");
    assert_eq!(body["error"]["param"], "service_tier", "{body}");
    assert_eq!(alpha.stats().requests.total(), 3);
}

/// A compaction or a count of input tokens that meets a backend serving `POST /v1/responses`
/// without them (its 404) is asked of another backend of the model, as a token count or an
/// embedding is; before, the 404 was the client's, whichever backend the weights drew.
#[tokio::test]
async fn a_compaction_fails_over_from_a_backend_without_it() {
    let alpha = mock("alpha");
    let beta = mock("beta");
    let h = two_backends(&alpha, &beta).await;
    alpha.set_fault(
        Fault::Body {
            code: 404,
            body: r#"{"detail":"Not Found"}"#.into(),
        }
        .times(100),
    );
    let input = json!({"model": MODEL, "input": [{"role": "user", "content": "hello there"}]});
    // Twenty calls: alpha is drawn first for some (all to beta once in a million runs).
    for _ in 0..10 {
        for path in ["/v1/responses/compact", "/v1/responses/input_tokens"] {
            let answer = h.post(path, KEY, &input).await;
            assert_eq!(answer.status(), 200, "{path}");
            assert_eq!(answer.headers()["x-sluice-backend"], "beta-name", "{path}");
        }
    }
    assert!(alpha.stats().responses_with(404) > 0, "alpha was drawn");
}

/// `POST /v1/responses/compact` (the SDKs' `responses.compact`, the Agents SDK's compaction
/// session, the Codex CLI's remote compaction) and `POST /v1/responses/input_tokens` (the
/// SDKs' `responses.input_tokens.count`) are served as creates are: on a backend serving the
/// Responses API, pinned to the one holding the `previous_response_id` they continue. A
/// compaction is billed (its usage recorded, the context it read as cached input), a count is
/// free. Before, both were 405 `method_not_allowed`, and a long session could not shrink its
/// context.
#[tokio::test]
async fn compactions_and_input_token_counts_go_where_the_conversation_is() {
    let alpha = mock("alpha");
    let beta = mock("beta");
    let h = two_backends(&alpha, &beta).await;
    let mut served = Vec::new();
    for n in 0..8 {
        // Each conversation named, so where it starts is fixed and both backends hold some
        // (drawn at random, all eight fell on one once in 128 runs).
        let start: Value = create(
            &h,
            json!({"model": MODEL, "input": format!("start {n}"),
                "prompt_cache_key": format!("conversation-{n}")}),
        )
        .await
        .json()
        .await
        .unwrap();
        let holder = if start["output"][0]["content"][0]["text"]
            .as_str()
            .unwrap()
            .starts_with("[alpha]")
        {
            "alpha-name"
        } else {
            "beta-name"
        };
        let id = start["id"].as_str().unwrap().to_owned();
        let continued = json!({"model": MODEL, "previous_response_id": id,
            "input": [{"role": "user", "content": "and then"}]});

        let compacted = h.post("/v1/responses/compact", KEY, &continued).await;
        assert_eq!(compacted.status(), 200);
        assert_eq!(compacted.headers()["x-sluice-backend"], holder);
        let compacted: Value = compacted.json().await.unwrap();
        assert_eq!(compacted["object"], "response.compaction");
        let items = compacted["output"].as_array().unwrap();
        assert_eq!(items.last().unwrap()["type"], "compaction", "{compacted}");
        // The earlier turn is read as cached input: it is the same backend's.
        let usage = &compacted["usage"];
        assert!(
            usage["input_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap()
                > 0
        );

        let counted = h.post("/v1/responses/input_tokens", KEY, &continued).await;
        assert_eq!(counted.status(), 200);
        assert_eq!(counted.headers()["x-sluice-backend"], holder);
        let counted: Value = counted.json().await.unwrap();
        assert_eq!(counted["object"], "response.input_tokens");
        assert_eq!(counted["input_tokens"], usage["input_tokens"]);
        served.push((holder, usage.clone()));
    }
    assert!(served.iter().any(|(holder, _)| *holder == "alpha-name"));
    assert!(served.iter().any(|(holder, _)| *holder == "beta-name"));

    // Each create, compaction and count recorded once, under the Responses API: the
    // compaction with what its usage says, the count with nothing.
    let records = h.records(24).await;
    for (n, (_, usage)) in served.iter().enumerate() {
        let (compaction, count) = (&records[3 * n + 1], &records[3 * n + 2]);
        for record in [compaction, count] {
            assert_eq!(record.endpoint, proto::Endpoint::Responses as i32);
            assert_eq!(record.status_code, 200);
        }
        assert_eq!(
            (
                compaction.prompt_tokens,
                compaction.cached_prompt_tokens,
                compaction.completion_tokens
            ),
            (
                usage["input_tokens"].as_u64().unwrap(),
                usage["input_tokens_details"]["cached_tokens"]
                    .as_u64()
                    .unwrap(),
                usage["output_tokens"].as_u64().unwrap()
            )
        );
        assert_eq!((count.prompt_tokens, count.completion_tokens), (0, 0));
    }

    // Neither is a stored response's id: a GET of either path is not a retrieve.
    for path in ["/v1/responses/compact", "/v1/responses/input_tokens"] {
        let got = on_stored(&h, reqwest::Method::GET, path, KEY).await;
        let (code, body) = error_code(got, 405).await;
        assert_eq!(code, "method_not_allowed", "{body}");
    }
}

/// A client that names its conversation (`prompt_cache_key`: the Codex CLI sends its session's
/// id, the SDKs whatever the caller gives) has all its requests, chat and Responses, sent to
/// one backend, whichever replica takes them: the provider's prompt cache is per account, and
/// a stateless Responses client's `reasoning.encrypted_content` can be read only by the
/// account that wrote it (before, each turn drew a backend at random and one of another
/// account answered `400 invalid_encrypted_content`). Different conversations still spread.
#[tokio::test]
async fn a_conversation_keeps_to_one_backend_on_every_replica() {
    let alpha = mock("alpha");
    let beta = mock("beta");
    let replicas = [
        two_backends(&alpha, &beta).await,
        two_backends(&alpha, &beta).await,
    ];
    let mut holders = std::collections::BTreeSet::new();
    for n in 0..8 {
        let conversation = format!("019a-session-{n}");
        let mut served_by = std::collections::BTreeSet::new();
        for turn in 0..6 {
            let h = &replicas[turn % 2];
            let response = if turn % 3 == 0 {
                h.chat(json!({"model": MODEL, "prompt_cache_key": conversation,
                    "messages": [{"role": "user", "content": "hi"}]}))
                    .await
            } else {
                create(
                    h,
                    json!({"model": MODEL, "input": "go on", "store": false,
                        "prompt_cache_key": conversation, "stream": turn % 2 == 1}),
                )
                .await
            };
            assert_eq!(response.status(), 200);
            served_by.insert(backend_name(&response));
        }
        assert_eq!(served_by.len(), 1, "{conversation}: {served_by:?}");
        holders.extend(served_by);
    }
    assert_eq!(holders.len(), 2, "{holders:?}");
}

#[tokio::test]
async fn a_new_response_fails_over_before_the_first_byte() {
    let primary = mock("primary");
    let fallback = mock("fallback");
    primary.set_fault(Fault::times(
        Fault::Status {
            code: 500,
            retry_after: None,
        },
        1,
    ));
    let h = Harness::start(snapshot(
        1,
        vec![
            backend("primary", &primary.base_url(), proto::Pool::Primary, 0),
            backend("fallback", &fallback.base_url(), proto::Pool::Fallback, 0),
        ],
    ))
    .await;
    let response = create(&h, json!({"model": MODEL, "input": "x", "stream": true})).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-sluice-backend"], "fallback-name");
    let text = response.text().await.unwrap();
    assert!(text.contains("[fallback]"));
    let record = h.records(1).await.remove(0);
    assert_eq!(record.attempts, 2);
    assert_eq!(record.backend_id, "fallback");
}

#[tokio::test]
async fn only_backends_serving_the_responses_api_get_it_and_a_model_without_one_is_a_400() {
    let alpha = mock("alpha");
    let beta = mock("beta");
    let mut snap = snapshot(
        1,
        vec![
            backend("alpha", &alpha.base_url(), proto::Pool::Primary, 0),
            backend("beta", &beta.base_url(), proto::Pool::Primary, 1),
        ],
    );
    snap.backends[0].responses_api = Some(false);
    let h = Harness::start(snap.clone()).await;
    // alpha comes first for chat, but does not serve the Responses API.
    for _ in 0..3 {
        let response = create(&h, json!({"model": MODEL, "input": "x"})).await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-sluice-backend"], "beta-name");
    }
    assert_eq!(alpha.stats().requests.responses, 0);
    let chat = h.chat(chat_body(false)).await;
    assert_eq!(chat.headers()["x-sluice-backend"], "alpha-name");

    let mut only_alpha = snap;
    only_alpha.version = 2;
    only_alpha.backends.truncate(1);
    h.publish(only_alpha).await;
    let (code, body) =
        error_code(create(&h, json!({"model": MODEL, "input": "x"})).await, 400).await;
    assert_eq!(code, "responses_not_supported", "{body}");
    assert_eq!(body["error"]["param"], "model");
    assert_eq!(alpha.stats().requests.responses, 0);
}

/// A stream of `events`, the connection closed after them.
fn stream_answer(events: &str) -> String {
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n{events}"
    )
}

/// An upstream with a stored response `resp_up1` (its create), whose stream resumed after
/// event 9 (`GET …?stream=true&starting_after=9`) sends events 10 and 11, after which the
/// connection closes mid-stream.
async fn upstream_resuming_after_nine() -> String {
    raw_upstream(|head| match head.starts_with("POST") {
        true => json_answer(
            r#"{"id":"resp_up1","object":"response","status":"completed","model":"m","output":[],"usage":{"input_tokens":1,"output_tokens":1,"total_tokens":2}}"#,
        ),
        false => {
            let event = |n: u64| {
                format!(
                    "event: response.output_text.delta\ndata: {{\"type\":\"response.output_text.delta\",\"sequence_number\":{n},\"delta\":\"x\"}}\n\n"
                )
            };
            stream_answer(&(event(10) + &event(11)))
        }
    })
    .await
}

/// An upstream with a background response `resp_up1` (its create), whose stream, streamed
/// again (`GET …?stream=true`), replays how it ended: `response.failed` with `server_error`.
async fn upstream_replaying_a_failure() -> String {
    raw_upstream(|head| match head.starts_with("POST") {
        true => json_answer(
            r#"{"id":"resp_up1","object":"response","status":"queued","background":true,"model":"m","output":[],"usage":null}"#,
        ),
        false => stream_answer(&format!(
            "event: response.failed\ndata: {}\n\n",
            r#"{"type":"response.failed","sequence_number":1,"response":{"id":"resp_up1","object":"response","status":"failed","model":"m","output":[],"error":{"code":"server_error","message":"The model failed."},"usage":null}}"#
        )),
    })
    .await
}

/// A background response that failed, streamed again (or resumed, which openai-python does
/// by streaming it all again) any number of times, tells of a failure of the past: it cools
/// nothing. Counted as the backend's failure each time, three such streams cooled the whole
/// backend, for every model, its other responses' polls refused too.
#[tokio::test]
async fn a_failure_replayed_by_a_retrieve_cools_nothing() {
    let h = Harness::one_primary(&upstream_replaying_a_failure().await).await;
    let created: Value = create(
        &h,
        json!({"model": MODEL, "input": "hi", "background": true}),
    )
    .await
    .json()
    .await
    .unwrap();
    let id = created["id"].as_str().unwrap();
    for _ in 0..5 {
        let text = on_stored(
            &h,
            reqwest::Method::GET,
            &format!("/v1/responses/{id}?stream=true"),
            KEY,
        )
        .await
        .text()
        .await
        .unwrap();
        assert!(text.contains("response.failed"), "{text}");
    }
    let again = create(&h, json!({"model": MODEL, "input": "hi"})).await;
    assert_eq!(again.status(), 200, "the backend is not cooling down");
}

/// A create answered whole with `"status": "failed"` and no usage is its provider's failure,
/// as the same `response.failed` in a stream is: a `server_error` fails over (nothing reached
/// the client), and counts for the backend's cooldown; a failure of the request's own
/// (`context_length_exceeded`) is the answer, passed on.
#[tokio::test]
async fn a_whole_create_that_failed_at_its_provider_fails_over() {
    let failed = |code: &str| {
        format!(
            r#"{{"id":"resp_x","object":"response","status":"failed","model":"m","error":{{"code":"{code}","message":"x"}},"output":[],"usage":null}}"#
        )
    };
    let (alpha, beta) = (mock("alpha"), mock("beta"));
    let h = Harness::start(snapshot(
        1,
        vec![
            backend("alpha", &alpha.base_url(), proto::Pool::Primary, 0),
            backend("beta", &beta.base_url(), proto::Pool::Fallback, 0),
        ],
    ))
    .await;
    let body = json!({"model": MODEL, "input": "hi"});
    alpha.set_fault(
        Fault::Body {
            code: 200,
            body: failed("server_error"),
        }
        .times(1),
    );
    let response = create(&h, body.clone()).await;
    assert_eq!(response.headers()["x-sluice-backend"], "beta-name");
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["status"], "completed", "{answer}");
    alpha.set_fault(
        Fault::Body {
            code: 200,
            body: failed("context_length_exceeded"),
        }
        .times(1),
    );
    let response = create(&h, body).await;
    assert_eq!(response.headers()["x-sluice-backend"], "alpha-name");
    let answer: Value = response.json().await.unwrap();
    assert_eq!(
        answer["error"]["code"], "context_length_exceeded",
        "{answer}"
    );
}

/// A backend cooling down (its account out of credit, say) still answers the calls on the
/// responses it holds: a retrieve generates nothing and no other backend holds the answer (a
/// background job's, finished and paid for, was out of reach for as long as the account
/// stayed empty). A continuation, which generates, is refused while it cools.
#[tokio::test]
async fn a_stored_response_is_reached_while_its_backend_cools_down() {
    let alpha = mock("alpha");
    let h = Harness::start(snapshot(
        1,
        vec![backend("alpha", &alpha.base_url(), proto::Pool::Primary, 0)],
    ))
    .await;
    let created: Value = create(&h, json!({"model": MODEL, "input": "hi"}))
        .await
        .json()
        .await
        .unwrap();
    let id = created["id"].as_str().unwrap();
    let out_of_credit = r#"{"error":{"message":"You exceeded your current quota, please check your plan and billing details.","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#;
    alpha.set_fault(
        Fault::Body {
            code: 429,
            body: out_of_credit.into(),
        }
        .times(1),
    );
    let refused = create(&h, json!({"model": MODEL, "input": "more"})).await;
    assert!(!refused.status().is_success(), "{}", refused.status());
    let cooling = create(&h, json!({"model": MODEL, "input": "more"})).await;
    assert_eq!(cooling.status(), 429, "the backend cools down");
    let got = retrieve(&h, id).await;
    assert_eq!(got.status(), 200);
    let got: Value = got.json().await.unwrap();
    assert_eq!(got["id"], id);
    let (code, _) = error_code(
        create(
            &h,
            json!({"model": MODEL, "input": "go on", "previous_response_id": id}),
        )
        .await,
        503,
    )
    .await;
    assert_eq!(code, "response_backend_cooling_down");
}

/// A 429 to a call on a stored response (a client polling a background response too
/// often) is passed on and cools nothing: a poll's limit says nothing of the model's
/// creates, which the backend goes on serving.
#[tokio::test]
async fn a_429_on_a_stored_response_cools_nothing() {
    let alpha = mock("alpha");
    let h = Harness::start(snapshot(
        1,
        vec![backend("alpha", &alpha.base_url(), proto::Pool::Primary, 0)],
    ))
    .await;
    let created: Value = create(&h, json!({"model": MODEL, "input": "hi"}))
        .await
        .json()
        .await
        .unwrap();
    alpha.set_fault(
        Fault::Status {
            code: 429,
            retry_after: Some(sluice_e2e::mock::RetryAfter::seconds(30)),
        }
        .times(1),
    );
    let polled = retrieve(&h, created["id"].as_str().unwrap()).await;
    assert_eq!(polled.status(), 429);
    let again = create(&h, json!({"model": MODEL, "input": "hi"})).await;
    assert_eq!(again.status(), 200, "the backend is not cooling down");
}

/// A stream resumed after event 9 that the upstream breaks off ends with Sluice's error
/// event numbered after the last one relayed (12), not by how many this connection relayed
/// (2): a client that resumes by `sequence_number` must not see a number it already has.
#[tokio::test]
async fn an_error_event_ending_a_resumed_stream_takes_the_next_sequence_number() {
    let h = Harness::one_primary(&upstream_resuming_after_nine().await).await;
    let created: Value = create(&h, json!({"model": MODEL, "input": "hi"}))
        .await
        .json()
        .await
        .unwrap();
    let id = created["id"].as_str().unwrap();
    let text = on_stored(
        &h,
        reqwest::Method::GET,
        &format!("/v1/responses/{id}?stream=true&starting_after=9"),
        KEY,
    )
    .await
    .text()
    .await
    .unwrap();
    let numbers: Vec<u64> = text
        .lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .map(|data| {
            serde_json::from_str::<Value>(data).unwrap()["sequence_number"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(numbers, [10, 11, 12], "{text}");
    assert!(text.contains("stream_interrupted"), "{text}");
    // A retrieve counts no tokens, even cut short: the create counted them.
    let records = h.records(2).await;
    assert_eq!(records[1].completion_tokens, 0, "{:?}", records[1]);
    assert!(!records[1].tokens_estimated);
}

/// A background create whose connection was lost after it was sent may be queued at its
/// provider, where it runs to its end whatever became of the connection: failed over, a
/// second job ran on the other account, and the first's id, never given to anyone, could not
/// be polled or cancelled. It is answered 502 not to be sent again; a create in the
/// foreground still fails over, as does a background one its backend never received.
#[tokio::test]
async fn a_background_create_that_may_have_reached_its_provider_is_not_sent_again() {
    let (alpha, beta) = (mock("alpha"), mock("beta"));
    let h = Harness::start(snapshot(
        1,
        vec![
            backend("alpha", &alpha.base_url(), proto::Pool::Primary, 0),
            backend("beta", &beta.base_url(), proto::Pool::Fallback, 0),
        ],
    ))
    .await;
    let background = json!({"model": MODEL, "input": "research this", "background": true});
    alpha.set_fault(Fault::Reset.times(1));
    assert_connection_lost(create(&h, background.clone()).await).await;
    assert_eq!(beta.stats().requests.total(), 0, "sent once");
    alpha.set_fault(Fault::Reset.times(1));
    let response = create(&h, json!({"model": MODEL, "input": "now"})).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-sluice-backend"], "beta-name");
    alpha.set_fault(Fault::status(503).times(1));
    let response = create(&h, background).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-sluice-backend"], "beta-name");
}

/// A background response spends its tokens after the create returned, where Sluice sees
/// none of them (a retrieve is not counted: it would count on every poll): a key held to a
/// token limit or a number of requests in flight (or a budget: `e2e/tests/budgets.rs`) gets
/// a clear 400 for it, before anything reaches a backend; other keys are served.
#[tokio::test]
async fn a_key_held_to_limits_is_refused_background_responses() {
    let upstream = mock("alpha");
    for limit in ["tpm_limit", "max_parallel_requests"] {
        let mut snap = snapshot(
            1,
            vec![backend(
                "alpha",
                &upstream.base_url(),
                proto::Pool::Primary,
                0,
            )],
        );
        match limit {
            "tpm_limit" => snap.client_keys[0].tpm_limit = 1_000_000,
            _ => snap.client_keys[0].max_parallel_requests = 10,
        }
        let h = Harness::start(snap).await;
        // OpenAI refuses a `background` that is not a boolean; a lenient backend (vLLM) takes
        // `1` or `"true"` as `true`: refused alike.
        for background in [
            json!(true),
            json!(1),
            json!("true"),
            json!(false),
            json!(null),
        ] {
            let body = json!({"model": MODEL, "input": "later", "background": background});
            let answer = create(&h, body).await;
            if background != json!(false) && background != json!(null) {
                let (code, body) = error_code(answer, 400).await;
                assert_eq!(
                    code, "background_not_allowed",
                    "{limit} {background}: {body}"
                );
                assert_eq!(body["error"]["param"], "background");
            } else {
                assert_eq!(answer.status(), 200, "{limit} {background}");
            }
        }
        assert_eq!(
            upstream.stats().requests.total(),
            2,
            "{limit}: only the foreground creates reached the backend"
        );
        upstream.reset_stats();
    }

    let h = Harness::start(snapshot(
        1,
        vec![backend(
            "alpha",
            &upstream.base_url(),
            proto::Pool::Primary,
            0,
        )],
    ))
    .await;
    let queued = create(
        &h,
        json!({"model": MODEL, "input": "later", "background": true}),
    )
    .await;
    assert_eq!(queued.status(), 200, "a key without limits");
}

/// A Responses stream the provider ends with its `error` event after streaming output (or
/// with `response.failed` carrying no usage) was charged nothing, its budget reserve and
/// token reservations given back, while the same break in a chat or Messages stream is
/// charged what was streamed. It is charged what is known now: the prompt estimate and a
/// token per delta, marked as estimated.
#[tokio::test]
async fn a_stream_ended_by_the_providers_error_event_is_charged_what_was_streamed() {
    let delta = |n: u64| {
        format!(
            "event: response.output_text.delta\ndata: {{\"type\":\"response.output_text.delta\",\"sequence_number\":{n},\"item_id\":\"msg_1\",\"output_index\":0,\"content_index\":0,\"delta\":\"x\"}}\n\n"
        )
    };
    let created = "event: response.created\ndata: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\":\"resp_up1\",\"object\":\"response\",\"status\":\"in_progress\",\"model\":\"m\",\"output\":[],\"usage\":null}}\n\n";
    let endings = [
        "event: error\ndata: {\"type\":\"error\",\"sequence_number\":4,\"code\":\"server_error\",\"message\":\"boom\",\"param\":null}\n\n",
        "event: response.failed\ndata: {\"type\":\"response.failed\",\"sequence_number\":4,\"response\":{\"id\":\"resp_up1\",\"object\":\"response\",\"status\":\"failed\",\"model\":\"m\",\"output\":[],\"usage\":null,\"error\":{\"code\":\"server_error\",\"message\":\"boom\"}}}\n\n",
    ];
    for ending in endings {
        let upstream = sse_upstream(format!(
            "{created}{}{}{}{ending}",
            delta(1),
            delta(2),
            delta(3)
        ))
        .await;
        let h = Harness::one_primary(&upstream).await;
        let body = json!({"model": MODEL, "input": "hi", "stream": true});
        let text = create(&h, body.clone()).await.text().await.unwrap();
        assert_eq!(
            text.matches("response.output_text.delta").count(),
            6,
            "{text}"
        );
        let record = h.records(1).await.remove(0);
        assert!(record.tokens_estimated, "{ending}: {record:?}");
        assert_eq!(record.completion_tokens, 3, "{ending}");
        assert_eq!(
            record.prompt_tokens,
            (body.to_string().len() as u64).div_ceil(4),
            "{ending}"
        );
    }
}

/// `[DONE]` is no Responses event: a relay that ends every stream with it (as chat's) sends
/// it after an upstream's failure too, before any final event. The client is told the stream
/// was broken off, in the Responses API's own `error` event, not left to take the `[DONE]`
/// (at which openai-python stops) for the answer's end.
#[tokio::test]
async fn a_responses_stream_given_done_before_its_final_event_ends_with_an_error() {
    let created = "event: response.created\ndata: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\":\"resp_up1\",\"object\":\"response\",\"status\":\"in_progress\",\"model\":\"m\",\"output\":[],\"usage\":null}}\n\n";
    let delta = "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"sequence_number\":1,\"item_id\":\"msg_1\",\"output_index\":0,\"content_index\":0,\"delta\":\"x\"}\n\n";
    let upstream = sse_upstream(format!("{created}{delta}data: [DONE]\n\n")).await;
    let h = Harness::one_primary(&upstream).await;
    let body = json!({"model": MODEL, "input": "hi", "stream": true});
    let text = create(&h, body).await.text().await.unwrap();
    assert!(!text.contains("[DONE]"), "{text}");
    assert!(text.contains("event: error"), "{text}");
    assert!(text.contains("ended before its final event"), "{text}");
    let record = h.records(1).await.remove(0);
    assert_eq!(
        record.error_kind,
        proto::ErrorKind::StreamInterrupted as i32,
        "{record:?}"
    );
}

/// A Responses stream the provider ends with its own failure tells of the backend: its
/// `server_error` is the backend's failure (three in a row cool it, as three broken chat
/// streams do), its `rate_limit_exceeded` the model's rate limit, at once; a failure of the
/// request's own (`context_length_exceeded`) is the backend answering. Counted an answer
/// each, a backend failing or limited in every stream kept its traffic and never cooled.
#[tokio::test]
async fn a_responses_stream_ended_by_the_providers_failure_counts_for_its_cooldown() {
    // Its output begun (before it, such a failure fails over:
    // `a_responses_stream_limited_before_its_output_fails_over`).
    let created = "event: response.created\ndata: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\":\"resp_up1\",\"object\":\"response\",\"status\":\"in_progress\",\"model\":\"m\",\"output\":[],\"usage\":null}}\n\nevent: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"sequence_number\":1,\"item_id\":\"msg_1\",\"output_index\":0,\"content_index\":0,\"delta\":\"x\"}\n\n";
    let failed = |code: &str| {
        format!(
            "{created}event: response.failed\ndata: {{\"type\":\"response.failed\",\"sequence_number\":1,\"response\":{{\"id\":\"resp_up1\",\"object\":\"response\",\"status\":\"failed\",\"model\":\"m\",\"output\":[],\"usage\":null,\"error\":{{\"code\":\"{code}\",\"message\":\"x\"}}}}}}\n\n"
        )
    };
    let error_event = |code: &str| {
        format!(
            "{created}event: error\ndata: {{\"type\":\"error\",\"sequence_number\":1,\"code\":\"{code}\",\"message\":\"x\",\"param\":null}}\n\n"
        )
    };
    // As OpenAI's stream sends them: nested under `error`.
    let nested = |kind: &str, code: &str| {
        format!(
            "{created}event: error\ndata: {{\"type\":\"error\",\"sequence_number\":1,\"error\":{{\"type\":\"{kind}\",\"code\":\"{code}\",\"message\":\"x\",\"param\":null}}}}\n\n"
        )
    };
    let body = json!({"model": MODEL, "input": "hi", "stream": true});
    for (events, streams, kind) in [
        (
            failed("server_error"),
            3,
            Some(proto::BackendEventKind::Failing),
        ),
        (
            nested("too_many_requests", "too_many_requests"),
            1,
            Some(proto::BackendEventKind::RateLimited),
        ),
        (
            nested("insufficient_quota", "credit_balance_exhausted"),
            1,
            Some(proto::BackendEventKind::RateLimited),
        ),
        (
            error_event("server_error"),
            3,
            Some(proto::BackendEventKind::Failing),
        ),
        (
            failed("rate_limit_exceeded"),
            1,
            Some(proto::BackendEventKind::RateLimited),
        ),
        (failed("context_length_exceeded"), 3, None),
    ] {
        let h = Harness::one_primary(&sse_upstream(events.clone()).await).await;
        for _ in 0..streams {
            let response = create(&h, body.clone()).await;
            assert_eq!(response.status(), 200);
            response.text().await.unwrap();
        }
        h.records(streams).await;
        let events = h.cp.with(|r| r.events.clone());
        assert_eq!(
            events.first().map(|e| e.kind),
            kind.map(|k| k as i32),
            "{events:?}"
        );
    }
}

/// OpenAI reports a Responses stream's rate limit or empty account in the stream, after
/// `response.created` and `response.in_progress` and before any output. Committed at
/// `response.created`, the stream was never failed over (Codex CLI, which always streams,
/// failed its turns while another account stood by): the lifecycle events are now held until
/// the output begins, and such a failure moves on to the next backend, its client seeing one
/// `response.created`, the next backend's. A failure of the request's own, or one after the
/// output began, is relayed as it came; a stream whose output is slow to begin is committed,
/// not failed over (its provider is generating, and billing, it).
#[tokio::test]
async fn a_responses_stream_limited_before_its_output_fails_over() {
    let lifecycle = "event: response.created\ndata: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\":\"resp_up1\",\"object\":\"response\",\"status\":\"in_progress\",\"model\":\"m\",\"output\":[],\"usage\":null}}\n\nevent: response.in_progress\ndata: {\"type\":\"response.in_progress\",\"sequence_number\":1,\"response\":{\"id\":\"resp_up1\",\"object\":\"response\",\"status\":\"in_progress\",\"model\":\"m\",\"output\":[],\"usage\":null}}\n\n";
    let nested = |kind: &str, code: &str| {
        format!(
            "{lifecycle}event: error\ndata: {{\"type\":\"error\",\"sequence_number\":2,\"error\":{{\"type\":\"{kind}\",\"code\":\"{code}\",\"message\":\"Rate limit reached\",\"param\":null}}}}\n\n"
        )
    };
    let failed = |code: &str| {
        format!(
            "{lifecycle}event: response.failed\ndata: {{\"type\":\"response.failed\",\"sequence_number\":2,\"response\":{{\"id\":\"resp_up1\",\"object\":\"response\",\"status\":\"failed\",\"model\":\"m\",\"output\":[],\"usage\":null,\"error\":{{\"code\":\"{code}\",\"message\":\"x\"}}}}}}\n\n"
        )
    };
    let delta = "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"sequence_number\":2,\"item_id\":\"msg_1\",\"output_index\":0,\"content_index\":0,\"delta\":\"x\"}\n\n";
    let body = json!({"model": MODEL, "input": "hi", "stream": true});
    let pair = |a: &str, b: &MockServer| {
        snapshot(
            1,
            vec![
                backend("alpha", a, proto::Pool::Primary, 0),
                backend("beta", &b.base_url(), proto::Pool::Fallback, 0),
            ],
        )
    };
    for (events, moves_on) in [
        (nested("tokens", "rate_limit_exceeded"), true),
        (
            nested("insufficient_quota", "credit_balance_exhausted"),
            true,
        ),
        (failed("server_error"), true),
        (failed("context_length_exceeded"), false),
        (
            format!(
                "{lifecycle}{delta}{}",
                &nested("tokens", "rate_limit_exceeded")[lifecycle.len()..]
            ),
            false,
        ),
    ] {
        let (a, b) = (sse_upstream(events.clone()).await, mock("beta"));
        let h = Harness::start(pair(&a, &b)).await;
        let response = create(&h, body.clone()).await;
        assert_eq!(response.status(), 200);
        let served_by = response.headers()["x-sluice-backend"].clone();
        let text = response.text().await.unwrap();
        assert_eq!(text.matches("event: response.created").count(), 1, "{text}");
        if moves_on {
            assert_eq!(served_by, "beta-name", "{events}");
            assert!(text.contains("response.completed"), "{text}");
            assert!(!text.contains("Rate limit reached"), "{text}");
        } else {
            assert_eq!(served_by, "alpha-name", "{events}");
            assert!(!text.contains("response.completed"), "{text}");
        }
    }
    // A `response.created` past 64 KiB (it echoes the request's instructions and tools), in
    // reads of 16 KiB: held and served, or failed over, as a small one; its first bytes were
    // held to the 64 KiB of a stream's first event, and every attempt failed.
    let big = lifecycle.replacen(
        "\"model\":\"m\"",
        &format!(
            "\"model\":\"m\",\"instructions\":\"{}\"",
            "x".repeat(100 * 1024)
        ),
        1,
    );
    let limited = format!(
        "{big}{}",
        &nested("tokens", "rate_limit_exceeded")[lifecycle.len()..]
    );
    let served = format!("{big}{delta}{}", &failed("x")[lifecycle.len()..]);
    for (events, by) in [(limited, "beta-name"), (served, "alpha-name")] {
        let chunks = events
            .as_bytes()
            .chunks(16 * 1024)
            .map(<[u8]>::to_vec)
            .collect();
        let (a, b) = (SseUpstream::start(chunks).await, mock("beta"));
        let h = Harness::start(pair(&a.base_url(), &b)).await;
        let response = create(&h, body.clone()).await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-sluice-backend"], by);
    }
    // With no other backend, the client gets the limit as OpenAI answers a chat request's.
    let h =
        Harness::one_primary(&sse_upstream(nested("tokens", "rate_limit_exceeded")).await).await;
    let (code, error) = error_code(create(&h, body.clone()).await, 429).await;
    assert_eq!(code, "rate_limit_exceeded", "{error}");
    // Output slow to begin (a reasoning model thinking) is waited for past `answer_timeout`.
    let parts = [
        lifecycle.to_owned(),
        String::new(),
        format!("{delta}{}", &failed("x")[lifecycle.len()..]),
    ];
    let slow = axum::Router::new().fallback(move || {
        let frames = futures::stream::iter(parts.clone()).then(|part| async move {
            if part.is_empty() {
                tokio::time::sleep(Duration::from_millis(800)).await;
            }
            Ok::<_, std::convert::Infallible>(bytes::Bytes::from(part))
        });
        async move {
            (
                [(http::header::CONTENT_TYPE, "text/event-stream")],
                axum::body::Body::from_stream(frames),
            )
        }
    });
    let slow = format!("http://{}/v1", serve_locally(slow).await);
    let b = mock("beta");
    let mut snap = pair(&slow, &b);
    let settings = snap.settings.get_or_insert_with(Default::default);
    settings.answer_timeout = Some(sluice_proxy::clock::proto_duration(Duration::from_millis(
        300,
    )));
    settings.first_byte_timeout = Some(sluice_proxy::clock::proto_duration(Duration::from_millis(
        300,
    )));
    let h = Harness::start(snap).await;
    let response = create(&h, body).await;
    assert_eq!(response.headers()["x-sluice-backend"], "alpha-name");
    let text = response.text().await.unwrap();
    assert!(text.contains("output_text.delta"), "{text}");
}

/// An image generated in a Responses stream comes whole in one event (and again in
/// `response.completed`): megabytes of base64. Events were bounded at 1 MiB, so such a
/// stream always ended in `stream_interrupted`, the image lost and its output tokens never
/// charged. Events are bounded by the response size limit now, as whole answers are.
#[tokio::test]
async fn a_stream_carrying_a_generated_image_is_relayed_whole() {
    let image = "A".repeat(3 << 19);
    let item = format!(
        r#"{{"id":"ig_1","type":"image_generation_call","status":"completed","result":"{image}"}}"#
    );
    let events = format!(
        "event: response.created\ndata: {{\"type\":\"response.created\",\"sequence_number\":0,\"response\":{{\"id\":\"resp_up1\",\"object\":\"response\",\"status\":\"in_progress\",\"model\":\"m\",\"output\":[],\"usage\":null}}}}\n\n\
         event: response.output_item.done\ndata: {{\"type\":\"response.output_item.done\",\"sequence_number\":1,\"output_index\":0,\"item\":{item}}}\n\n\
         event: response.completed\ndata: {{\"type\":\"response.completed\",\"sequence_number\":2,\"response\":{{\"id\":\"resp_up1\",\"object\":\"response\",\"status\":\"completed\",\"model\":\"m\",\"output\":[{item}],\"usage\":{{\"input_tokens\":10,\"output_tokens\":1056,\"total_tokens\":1066}}}}}}\n\n"
    );
    let h = Harness::one_primary(&sse_upstream(events).await).await;
    let text = create(&h, json!({"model": MODEL, "input": "draw", "stream": true}))
        .await
        .text()
        .await
        .unwrap();
    assert!(!text.contains("stream_interrupted"), "{}", &text[..200]);
    assert!(text.contains("event: response.completed"));
    assert_eq!(text.matches(image.as_str()).count(), 2);
    let record = h.records(1).await.remove(0);
    assert_eq!((record.prompt_tokens, record.completion_tokens), (10, 1056));
    assert_eq!(record.error_kind, ErrorKind::Unspecified as i32);
}

/// The text of a streamed create asking for an image.
async fn draw(h: &Harness) -> String {
    let body = json!({"model": MODEL, "input": "draw", "stream": true});
    create(h, body).await.text().await.unwrap()
}

/// A Responses stream whose image event the answers' memory cannot hold (others' events hold
/// it) ends with an error event, and gives back what it held: without the count, dozens of
/// streams each reading such an event held it (up to `--max-response-bytes`, 64 MiB) outside
/// every memory bound, and a hostile upstream could exhaust the replica's memory.
#[tokio::test]
async fn a_streamed_event_the_answers_memory_cannot_hold_ends_its_stream() {
    let image_stream = |image: &str| {
        let item = format!(
            r#"{{"id":"ig_1","type":"image_generation_call","status":"completed","result":"{image}"}}"#
        );
        format!(
            "event: response.created\ndata: {{\"type\":\"response.created\",\"sequence_number\":0,\"response\":{{\"id\":\"resp_up1\",\"object\":\"response\",\"status\":\"in_progress\",\"model\":\"m\",\"output\":[],\"usage\":null}}}}\n\n\
             event: response.output_item.done\ndata: {{\"type\":\"response.output_item.done\",\"sequence_number\":1,\"output_index\":0,\"item\":{item}}}\n\n\
             event: response.completed\ndata: {{\"type\":\"response.completed\",\"sequence_number\":2,\"response\":{{\"id\":\"resp_up1\",\"object\":\"response\",\"status\":\"completed\",\"model\":\"m\",\"output\":[],\"usage\":{{\"input_tokens\":10,\"output_tokens\":1056,\"total_tokens\":1066}}}}}}\n\n"
        )
    };
    // Two streams, each paused inside an image of 1.5 MiB until the test lets them go on (its
    // semaphore closed): the first
    // holds it against the replica's 2 MiB for answers, the second cannot, and ends with an
    // error event; the first is relayed whole.
    let large = "A".repeat(3 << 19);
    let whole = image_stream(&large);
    let pause_at = whole.find(&large).unwrap() + large.len() * 3 / 4;
    let go_on = Arc::new(tokio::sync::Semaphore::new(0));
    let paused = {
        let (head, tail) = whole.split_at(pause_at);
        let (head, tail) = (head.as_bytes().to_vec(), tail.as_bytes().to_vec());
        let go_on = Arc::clone(&go_on);
        let app = axum::Router::new().fallback(move || {
            let (head, tail, go_on) = (head.clone(), tail.clone(), Arc::clone(&go_on));
            async move {
                let body = futures::stream::iter([(head, false), (tail, true)]).then(
                    move |(bytes, wait)| {
                        let go_on = Arc::clone(&go_on);
                        async move {
                            if wait && let Ok(permit) = go_on.acquire().await {
                                permit.forget();
                            }
                            Ok::<_, std::convert::Infallible>(bytes::Bytes::from(bytes))
                        }
                    },
                );
                (
                    [(http::header::CONTENT_TYPE, "text/event-stream")],
                    axum::body::Body::from_stream(body),
                )
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        format!("http://{addr}/v1")
    };
    let h = Harness::start_with(one_primary_snapshot(&paused), |c| {
        c.max_response_bytes = 2 << 20;
        c.max_buffered_answer_bytes = 2 << 20;
        c.max_buffered_answer_bytes_per_key = Some(2 << 20);
    })
    .await;
    // The first stream's head comes with its first event, the rest of the upstream's first
    // write (the image's first part) right behind it; the second is asked once the replica
    // holds that part, while the first waits inside the image.
    let body = json!({"model": MODEL, "input": "draw", "stream": true});
    let first = create(&h, body).await;
    let first = tokio::spawn(first.text());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let held: f64 = h
            .metrics()
            .await
            .lines()
            .find_map(|line| line.strip_prefix("sluice_answer_buffered_bytes "))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or(0.0);
        if held >= (1 << 20) as f64 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "held {held}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The second cannot take its event's first part, and ends, its upstream still waiting;
    // then both upstreams go on.
    let second = tokio::time::timeout(Duration::from_secs(30), draw(&h))
        .await
        .expect("the second stream ends while the first holds the memory");
    go_on.close();
    let at = second.find("event: error");
    let error = &second[at.unwrap_or_else(|| panic!("{}", &second[..second.len().min(300)]))..];
    assert!(error.contains("fill the memory it may hold"), "{error}");
    assert!(!second.contains(large.as_str()));
    let first = first.await.unwrap().unwrap();
    assert!(
        !first.contains("event: error"),
        "{}",
        &first[..first.len().min(300)]
    );
    assert_eq!(first.matches(large.as_str()).count(), 1);
    let records = h.records(2).await;
    assert!(
        records
            .iter()
            .any(|r| r.error_kind == ErrorKind::StreamInterrupted as i32),
        "{records:?}"
    );

    // What the cut stream held is given back, and the other's once it ended: alone, the same
    // image goes through whole.
    let third = draw(&h).await;
    assert!(
        !third.contains("event: error"),
        "{}",
        &third[..third.len().min(300)]
    );
    assert_eq!(third.matches(large.as_str()).count(), 1);
}

/// A path whose id (or model) decodes to bytes that are not UTF-8 got axum's plain-text
/// 400, outside the API: no OpenAI error body, no request id, no record. It is an id no
/// response has, and a model no route serves, answered as those are.
#[tokio::test]
async fn ids_and_models_that_are_not_utf8_get_the_apis_own_errors() {
    let upstream = mock("alpha");
    let h = Harness::one_primary(&upstream.base_url()).await;
    for path in ["/v1/responses/%FF", "/v1/responses/%C3%28/input_items"] {
        let answer = on_stored(&h, reqwest::Method::GET, path, KEY).await;
        assert!(answer.headers().contains_key("x-request-id"), "{path}");
        let (code, body) = error_code(answer, 400).await;
        assert_eq!(code, "invalid_response_id", "{path}: {body}");
    }
    let answer = on_stored(&h, reqwest::Method::GET, "/v1/models/gpt%FF", KEY).await;
    let (code, body) = error_code(answer, 404).await;
    assert_eq!(code, "model_not_found", "{body}");
    assert_eq!(upstream.stats().requests.total(), 0);
}

/// A server that sends Responses events without `event:` lines (the type is in the data, as
/// every event has it): a stream it breaks off is charged a token per text delta all the
/// same; read by the `event:` line, it was charged none.
#[tokio::test]
async fn deltas_without_event_lines_are_counted_when_the_stream_breaks() {
    let delta = |n: u64| {
        format!(
            "data: {{\"type\":\"response.output_text.delta\",\"sequence_number\":{n},\"item_id\":\"msg_1\",\"output_index\":0,\"content_index\":0,\"delta\":\"x\"}}\n\n"
        )
    };
    let created = "data: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\":\"resp_up1\",\"object\":\"response\",\"status\":\"in_progress\",\"model\":\"m\",\"output\":[],\"usage\":null}}\n\n";
    // Then the stream ends with no terminal event.
    let upstream = sse_upstream(format!("{created}{}{}{}", delta(1), delta(2), delta(3))).await;
    let h = Harness::one_primary(&upstream).await;
    let text = create(&h, json!({"model": MODEL, "input": "hi", "stream": true}))
        .await
        .text()
        .await
        .unwrap();
    // The error event's fields flat, as its schema has them, and nested, as OpenAI's
    // stream sends them and openai-python raises on.
    let last = text
        .lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .next_back()
        .map(|data| serde_json::from_str::<Value>(data).unwrap())
        .unwrap();
    assert_eq!(last["type"], "error", "{text}");
    assert_eq!(last["code"], "stream_interrupted");
    assert_eq!(last["error"]["code"], "stream_interrupted");
    assert_eq!(last["error"]["type"], "server_error");
    let record = h.records(1).await.remove(0);
    assert_eq!(record.error_kind, ErrorKind::StreamInterrupted as i32);
    assert!(record.tokens_estimated);
    assert_eq!(record.completion_tokens, 3);
}

/// The SDKs' beta Responses API (`client.beta.responses`) names the beta features a request
/// uses in `openai-beta`: it reaches the backend with a create, and with a call on the stored
/// response; a chat request's does not (only the Responses API's beta clients send it), and
/// neither does the client's key.
#[tokio::test]
async fn a_responses_clients_beta_header_reaches_the_backend() {
    let alpha = mock("primary");
    let h = Harness::one_primary(&alpha.base_url()).await;
    let beta = "responses_multi_agent=v1";
    let created = h
        .http
        .post(h.url("/v1/responses?beta=true"))
        .bearer_auth(KEY)
        .header("openai-beta", beta)
        .json(&json!({"model": MODEL, "input": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 200, "{:?}", created.text().await);
    let id = created.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let seen = alpha.last_responses_request().unwrap();
    assert_eq!(seen.header("openai-beta"), Some(beta), "{seen:?}");
    assert_eq!(
        seen.header("authorization"),
        Some("Bearer sk-upstream-primary"),
        "the backend's own key, not the client's"
    );

    let retrieved = h
        .http
        .get(h.url(&format!("/v1/responses/{id}?beta=true")))
        .bearer_auth(KEY)
        .header("openai-beta", beta)
        .send()
        .await
        .unwrap();
    assert_eq!(retrieved.status(), 200);
    let seen = alpha.last_responses_request().unwrap();
    assert_eq!(seen.header("openai-beta"), Some(beta), "{seen:?}");
    assert!(seen.path.ends_with("?beta=true"), "{seen:?}");

    // Without it, none.
    assert_eq!(retrieve(&h, &id).await.status(), 200);
    let seen = alpha.last_responses_request().unwrap();
    assert_eq!(seen.header("openai-beta"), None, "{seen:?}");
}
