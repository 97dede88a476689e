//! OpenAI-compatible servers that are not OpenAI, behind Sluice: their figures, their errors
//! and their refusals in their own shapes (Google's Gemini endpoint, TGI, Ollama, vLLM, Groq),
//! over real HTTP against the mock answering as each does.

use crate::support;

use serde_json::Value;
use sluice_e2e::mock::{Fault, MockConfig, MockServer};
use sluice_proto::v1::{self as proto, BackendEventKind};
use support::harness::*;

fn mock(name: &str) -> MockServer {
    MockServer::start_local(MockConfig::named(name)).unwrap()
}

/// A primary and a fallback backend, each serving [`MODEL`] and `other`.
fn pair(primary: &MockServer, fallback: &MockServer) -> Vec<proto::SnapshotBackend> {
    [
        ("primary", primary, proto::Pool::Primary),
        ("fallback", fallback, proto::Pool::Fallback),
    ]
    .into_iter()
    .map(|(id, server, pool)| {
        let mut b = backend(id, &server.base_url(), pool, 0);
        b.models.push(proto::ModelRoute {
            name: "other".into(),
            upstream_name: format!("other-at-{id}"),
            ..Default::default()
        });
        b
    })
    .collect()
}

fn chat_for(model: &str, stream: bool) -> Value {
    serde_json::json!({"model": model, "stream": stream,
                       "messages": [{"role": "user", "content": "hi"}]})
}

fn header(response: &reqwest::Response, name: &str) -> String {
    response.headers()[name].to_str().unwrap().to_owned()
}

/// The mock's answer: `body` with `code`, as the server it stands for writes it.
fn answer(code: u16, body: &str) -> Fault {
    Fault::Body {
        code,
        body: body.into(),
    }
}

/// The primary's name of [`MODEL`], which its faults apply to.
fn at_primary() -> String {
    format!("{MODEL}-at-primary")
}

/// Google's OpenAI-compatible endpoint counts a thinking model's thoughts in `total_tokens`
/// alone (no `reasoning_tokens`, `completion_tokens` the visible text) and bills them as
/// output; read so at Google's hosts alone (`snapshot::thoughts_in_total`, which the mock on
/// a loopback address is not). Elsewhere the excess of a total is charged nothing: other
/// servers' totals can hold input tokens there (LiteLLM's and Portkey's over Bedrock), which
/// as output would be charged several times over.
#[tokio::test]
async fn a_totals_excess_is_not_charged_as_output_off_googles_hosts() {
    let gemini = mock("gemini");
    let whole = r#"{"choices":[{"finish_reason":"length","index":0,"message":{"content":"1, 2","role":"assistant"}}],"created":1,"id":"x","model":"gemini-3-flash-preview","object":"chat.completion","usage":{"completion_tokens":3,"prompt_tokens":9,"total_tokens":105}}"#;
    let stream = concat!(
        r#"data: {"choices":[{"delta":{"content":"1","role":"assistant"},"index":0}],"created":1,"id":"x","model":"gemini-3-flash-preview","object":"chat.completion.chunk","usage":{"completion_tokens":1,"prompt_tokens":9,"total_tokens":103}}"#,
        "\n\n",
        r#"data: {"choices":[{"delta":{"content":", 2","role":"assistant"},"finish_reason":"length","index":0}],"created":1,"id":"x","model":"gemini-3-flash-preview","object":"chat.completion.chunk","usage":{"completion_tokens":3,"prompt_tokens":9,"total_tokens":105}}"#,
        "\n\n",
        "data: [DONE]\n\n",
    );
    gemini.set_faults(vec![
        answer(200, whole).times(1),
        answer(200, stream).times(1),
    ]);
    let h = Harness::start(one_primary_snapshot(&gemini.base_url())).await;
    let response = h.chat(chat_body(false)).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["usage"]["total_tokens"], 105, "passed on as it came");
    let response = h.chat(chat_body(true)).await;
    assert_eq!(response.status(), 200);
    assert!(response.text().await.unwrap().ends_with("data: [DONE]\n\n"));
    for record in h.records(2).await {
        assert_eq!(
            (
                record.prompt_tokens,
                record.completion_tokens,
                record.reasoning_tokens
            ),
            (9, 3, 0),
            "{record:?}"
        );
    }
}

/// A backend that does not have the model it was routed (an Ollama node whose model was never
/// pulled, a vLLM server started under other `--served-model-name`s, a model Google retired)
/// answers 404 in its own words: the client asked for a model Sluice serves, so the request
/// fails over and the refusals cool that model alone at the backend, as OpenAI's
/// `model_not_found` does.
#[tokio::test]
async fn a_model_missing_at_a_compatible_server_fails_over_and_cools_that_model_alone() {
    let ollama = r#"{"error":{"message":"model 'gpt-4o-mini-at-primary' not found","type":"not_found_error","param":null,"code":null}}"#;
    let vllm = r#"{"object":"error","message":"The model `gpt-4o-mini-at-primary` does not exist.","type":"NotFoundError","param":null,"code":404}"#;
    let gemini = r#"[{"error":{"code":404,"message":"models/gpt-4o-mini-at-primary is not found for API version v1beta, or is not supported for generateContent.","status":"NOT_FOUND"}}]"#;
    let ollama_scheduled = r#"{"error":{"message":"model \"gpt-4o-mini-at-primary\" not found, try pulling it first","type":"not_found_error","param":null,"code":null}}"#;
    for body in [ollama, ollama_scheduled, vllm, gemini] {
        let (primary, fallback) = (mock("primary"), mock("fallback"));
        primary.set_fault(answer(404, body).always().for_model(&at_primary()));
        let h = Harness::start(snapshot(1, pair(&primary, &fallback))).await;
        // Three refusals (the failure threshold) cool the model at the primary.
        for attempts in ["2", "2", "2", "1"] {
            let response = h.chat(chat_for(MODEL, false)).await;
            assert_eq!(response.status(), 200, "{body}");
            assert_eq!(header(&response, "x-sluice-backend"), "fallback-name");
            assert_eq!(header(&response, "x-sluice-attempts"), attempts, "{body}");
        }
        // The primary's other model is served there.
        let response = h.chat(chat_for("other", false)).await;
        assert_eq!(header(&response, "x-sluice-backend"), "primary-name");
        assert_eq!(header(&response, "x-sluice-attempts"), "1", "{body}");
    }
}

/// A 404 that is not about the model (a client's own, in a shape like none of these) is passed
/// on as it came: nothing fails over, nothing cools.
#[tokio::test]
async fn another_404_is_passed_on() {
    let (primary, fallback) = (mock("primary"), mock("fallback"));
    let other =
        r#"{"error":{"message":"Not Found","type":"not_found_error","param":null,"code":null}}"#;
    primary.set_fault(answer(404, other).times(1));
    let h = Harness::start(snapshot(1, pair(&primary, &fallback))).await;
    let response = h.chat(chat_for(MODEL, false)).await;
    assert_eq!(response.status(), 404);
    assert_eq!(header(&response, "x-sluice-attempts"), "1");
    assert_eq!(response.text().await.unwrap(), other);
    assert_eq!(fallback.stats().requests.total(), 0);
}

/// Groq answers a request whose tokens alone pass the account's tokens per minute with 413
/// where OpenAI answers 429, in the same words: the request moves on to another backend (with
/// another account's room), and the backend that refused it does not cool down.
#[tokio::test]
async fn groqs_413_for_a_request_too_large_fails_over_and_cools_nothing() {
    let (primary, fallback) = (mock("primary"), mock("fallback"));
    let groq = r#"{"error":{"message":"Request too large for model `llama-3.3-70b-versatile` in organization `org_01` service tier `on_demand` on tokens per minute (TPM): Limit 12000, Requested 14137, please reduce your message size and try again.","type":"tokens","code":"rate_limit_exceeded"}}"#;
    primary.set_fault(answer(413, groq).times(3));
    let h = Harness::start(snapshot(1, pair(&primary, &fallback))).await;
    for _ in 0..3 {
        let response = h.chat(chat_for(MODEL, false)).await;
        assert_eq!(response.status(), 200);
        assert_eq!(header(&response, "x-sluice-backend"), "fallback-name");
        assert_eq!(header(&response, "x-sluice-attempts"), "2");
    }
    // Three refusals (the failure threshold) cooled nothing.
    let response = h.chat(chat_for(MODEL, false)).await;
    assert_eq!(header(&response, "x-sluice-backend"), "primary-name");
    assert_eq!(header(&response, "x-sluice-attempts"), "1");
    assert!(h.cp.with(|r| r.events.is_empty()));

    // Alone, the client gets Groq's answer as it came.
    let alone = mock("alone");
    alone.set_fault(answer(413, groq).times(1));
    let h = Harness::start(one_primary_snapshot(&alone.base_url())).await;
    let response = h.chat(chat_body(false)).await;
    assert_eq!(response.status(), 413);
    assert_eq!(response.text().await.unwrap(), groq);
}

/// Google overloads one model (Pro) while serving the others (Flash): its 503 "The model is
/// overloaded" cools that model at the backend, not the backend.
#[tokio::test]
async fn googles_overload_cools_that_model_alone() {
    let (primary, fallback) = (mock("primary"), mock("fallback"));
    let overloaded = r#"[{"error":{"code":503,"message":"The model is overloaded. Please try again later.","status":"UNAVAILABLE"}}]"#;
    primary.set_fault(answer(503, overloaded).always().for_model(&at_primary()));
    let h = Harness::start(snapshot(1, pair(&primary, &fallback))).await;
    for attempts in ["2", "2", "2", "1"] {
        let response = h.chat(chat_for(MODEL, false)).await;
        assert_eq!(response.status(), 200);
        assert_eq!(header(&response, "x-sluice-attempts"), attempts);
    }
    for _ in 0..3 {
        let response = h.chat(chat_for("other", false)).await;
        assert_eq!(header(&response, "x-sluice-backend"), "primary-name");
        assert_eq!(header(&response, "x-sluice-attempts"), "1");
    }
    let event = h.first_cooldown_event().await;
    assert_eq!(
        (event.backend_id.as_str(), event.model.as_str()),
        ("primary", at_primary().as_str())
    );
}

/// TGI answers a streamed request it has no room for 200, then its overload as the stream's
/// first event (a whole answer gets a 429): nothing has reached the client, so the attempt
/// fails over as a 429 of its model would, and the model cools at that backend.
#[tokio::test]
async fn tgis_overload_streamed_after_its_head_fails_over() {
    let (primary, fallback) = (mock("primary"), mock("fallback"));
    let overloaded = concat!(
        r#"data: {"error":{"message":"Model is overloaded","http_status_code":422}}"#,
        "\n\ndata: [DONE]\n\n"
    );
    primary.set_fault(answer(200, overloaded).times(1));
    let h = Harness::start(snapshot(1, pair(&primary, &fallback))).await;
    let response = h.chat(chat_for(MODEL, true)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-sluice-backend"), "fallback-name");
    assert_eq!(header(&response, "x-sluice-attempts"), "2");
    let text = response.text().await.unwrap();
    assert!(!text.contains("overloaded"), "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let event = h.first_cooldown_event().await;
    assert_eq!(event.kind, BackendEventKind::RateLimited as i32);
    assert_eq!(event.model, at_primary());

    // Any other error as the first event (TGI's validation of the client's own parameters,
    // after its 200 head) is the client's answer, passed on as it came, and counts for the
    // backend's cooldown neither way: a client sending `top_p: 1` again and again (the failure
    // threshold is 3) does not take the backend out for everyone.
    let alone = mock("alone");
    let invalid = concat!(
        r#"data: {"error":{"message":"Input validation error: `top_p` must be > 0.0 and < 1.0","http_status_code":422}}"#,
        "\n\ndata: [DONE]\n\n"
    );
    alone.set_fault(answer(200, invalid).times(4));
    let h = Harness::start(one_primary_snapshot(&alone.base_url())).await;
    for _ in 0..4 {
        let response = h.chat(chat_body(true)).await;
        assert_eq!(response.status(), 200);
        assert!(response.text().await.unwrap().contains("top_p"));
    }
    let response = h.chat(chat_body(true)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-sluice-attempts"), "1");
    assert!(response.text().await.unwrap().ends_with("data: [DONE]\n\n"));
    assert!(h.cp.with(|r| r.events.is_empty()));
}

/// OpenRouter answers 200 once a model has started and puts a later failure in the body:
/// `{"error":{"code":502,…}}`, no choice. Nothing has reached the client: the attempt fails
/// over as that status would, and counts against that model at the backend alone (its other
/// models answer on). It was passed on as a success, a 200 the SDKs raise nothing on, and
/// ended the model's streak of failures. Answers that only look like one (an `error` that is
/// null, a choice ending `finish_reason: "error"`, OpenRouter's partial answer, which is not
/// looked for: the search cost every answer hundreds of instructions) are passed on as they
/// came.
#[tokio::test]
async fn openrouters_errors_in_a_200_fail_over_and_cool_that_model_alone() {
    let (primary, fallback) = (mock("primary"), mock("fallback"));
    let provider_failed = r#"{"error":{"code":502,"message":"Provider returned error","metadata":{"provider_name":"x"}},"user_id":"u"}"#;
    primary.set_fault(
        answer(200, provider_failed)
            .times(3)
            .for_model(&at_primary()),
    );
    let h = Harness::start(snapshot(1, pair(&primary, &fallback))).await;
    for _ in 0..3 {
        let response = h.chat(chat_for(MODEL, false)).await;
        assert_eq!(response.status(), 200);
        assert_eq!(header(&response, "x-sluice-backend"), "fallback-name");
        assert_eq!(header(&response, "x-sluice-attempts"), "2");
        let answer: Value = response.json().await.unwrap();
        assert_eq!(answer["choices"][0]["finish_reason"], "stop", "{answer}");
    }
    // The primary's other model answers on.
    let response = h.chat(chat_for("other", false)).await;
    assert_eq!(header(&response, "x-sluice-backend"), "primary-name");
    let records = h.records(4).await;
    assert!(
        records[..3].iter().all(|r| r.status_code == 200),
        "{records:?}"
    );
    // Three failures in a row (the threshold): the model cools at the primary.
    let event = h.first_cooldown_event().await;
    assert_eq!(
        (event.backend_id.as_str(), event.model.as_str()),
        ("primary", at_primary().as_str())
    );

    // Alone, the client gets the error as its status says, not a 200.
    let alone = mock("alone");
    alone.set_fault(answer(200, provider_failed).times(1));
    let h = Harness::start(one_primary_snapshot(&alone.base_url())).await;
    let response = h.chat(chat_body(false)).await;
    assert_eq!(response.status(), 502);
    // Answers that only look like one.
    for body in [
        r#"{"error":null,"id":"x","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"the word \"error\""},"finish_reason":"stop"}]}"#,
        r#"{"id":"gen-1","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"Half an ans"},"finish_reason":"error"}],"usage":{"prompt_tokens":null,"completion_tokens":null,"total_tokens":0}}"#,
    ] {
        alone.set_fault(answer(200, body).times(1));
        let response = h.chat(chat_body(false)).await;
        assert_eq!(response.status(), 200, "{body}");
        assert_eq!(response.text().await.unwrap(), body);
    }
}

/// Google says when to come back from a 429 in its body alone (`RetryInfo.retryDelay`, no
/// `Retry-After`): the model cools that long, and a client left with no backend is told so.
#[tokio::test]
async fn googles_retry_delay_in_its_body_is_the_cooldown() {
    let gemini = mock("gemini");
    let exhausted = r#"[{"error":{"code":429,"message":"You exceeded your current quota, please check your plan and billing details.","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaMetric":"generativelanguage.googleapis.com/generate_content_free_tier_requests"}]},{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"41s"}]}}]"#;
    gemini.set_fault(answer(429, exhausted).times(1));
    let h = Harness::start(one_primary_snapshot(&gemini.base_url())).await;
    let first = h.chat(chat_body(false)).await;
    assert_eq!(first.status(), 429);
    assert_eq!(header(&first, "x-sluice-attempts"), "1");
    // The backend is not asked again: its model cools for the 41 s Google asked.
    let second = h.chat(chat_body(false)).await;
    assert_eq!(second.status(), 429);
    assert_eq!(header(&second, "x-sluice-attempts"), "0");
    let retry_after: u64 = header(&second, "retry-after").parse().unwrap();
    assert!((40..=41).contains(&retry_after), "{retry_after}");
    assert_eq!(gemini.stats().requests.chat_completions, 1);
}
