//! The mock's Anthropic Messages API: as strict as the real one, and read without complaint by
//! the official `anthropic` Python SDK (installed by `e2e/test-all.sh`).

use serde_json::{Value, json};
use sluice_e2e::mock::{Fault, MockConfig, MockServer};

async fn post(mock: &MockServer, headers: &[(&str, &str)], body: &Value) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .post(format!("http://{}/v1/messages", mock.addr()))
        .json(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

const GOOD: &[(&str, &str)] = &[("x-api-key", "sk-ant"), ("anthropic-version", "2023-06-01")];

fn hello() -> Value {
    json!({"model": "claude-x", "max_tokens": 64, "messages": [{"role": "user", "content": "hello there"}]})
}

#[tokio::test]
async fn the_mock_refuses_what_the_real_api_refuses() {
    let mock = MockServer::start_local(MockConfig::named("ant").with_api_key("sk-ant")).unwrap();
    let (status, body) = post(&mock, GOOD, &hello()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["type"], "message");
    assert_eq!(body["content"][0]["text"], "[ant] tok1 tok2 tok3 tok4 tok5");
    assert_eq!(body["usage"]["input_tokens"], 2);

    let (status, body) = post(&mock, &[("anthropic-version", "2023-06-01")], &hello()).await;
    assert_eq!(
        (status, body["error"]["type"].as_str()),
        (401, Some("authentication_error"))
    );
    let (status, body) = post(
        &mock,
        &[
            ("x-api-key", "sk-wrong"),
            ("anthropic-version", "2023-06-01"),
        ],
        &hello(),
    )
    .await;
    assert_eq!(
        (status, body["error"]["type"].as_str()),
        (401, Some("authentication_error"))
    );
    let (status, body) = post(&mock, &[("x-api-key", "sk-ant")], &hello()).await;
    assert_eq!(
        (status, body["error"]["type"].as_str()),
        (400, Some("invalid_request_error"))
    );
    let (status, _) = post(
        &mock,
        &[
            ("authorization", "Bearer sk-ant"),
            ("anthropic-version", "2023-06-01"),
        ],
        &hello(),
    )
    .await;
    assert_eq!(
        status, 200,
        "the newest SDKs send the key as a bearer token"
    );

    // Version 2026-10-21 removed the sampling parameters, even at their defaults; the older
    // version takes them.
    for name in ["temperature", "top_p", "top_k"] {
        let mut body = hello();
        body[name] = json!(1);
        let new = [("x-api-key", "sk-ant"), ("anthropic-version", "2026-10-21")];
        let (status, answer) = post(&mock, &new, &body).await;
        assert_eq!(
            (status, answer["error"]["message"].as_str()),
            (
                400,
                Some(&*format!("{name}: Extra inputs are not permitted"))
            )
        );
        let (status, answer) = post(&mock, GOOD, &body).await;
        assert_eq!(status, 200, "{answer}");
    }

    let user = |content: Value| json!({"role": "user", "content": content});
    for (body, why) in [
        (
            json!({"model": "m", "messages": [user(json!("hi"))]}),
            "max_tokens: Field required",
        ),
        (
            json!({"model": "m", "max_tokens": 0, "messages": [user(json!("hi"))]}),
            "max_tokens",
        ),
        (
            json!({"model": "m", "max_tokens": 5, "messages": [{"role": "tool", "content": "x"}]}),
            "role",
        ),
        (
            json!({"model": "m", "max_tokens": 5, "messages": [
                {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": "{\"a\":1}"}]},
            ]}),
            "input",
        ),
        (
            json!({"model": "m", "max_tokens": 5, "messages": [user(json!([{"type": "tool_result", "tool_use_id": "nope"}]))]}),
            "tool_use_id",
        ),
        (
            json!({"model": "m", "max_tokens": 5, "messages": [user(json!("hi"))], "tools": [{"name": "f"}]}),
            "input_schema",
        ),
        (
            json!({"model": "m", "max_tokens": 5, "messages": [user(json!("hi"))], "tool_choice": {"type": "required"}}),
            "tool_choice",
        ),
        (
            json!({"model": "m", "max_tokens": 5, "messages": []}),
            "messages: at least one message is required",
        ),
        (
            json!({"model": "m", "max_tokens": 5, "messages": [user(json!("hi")), {"role": "system", "content": "Be brief."}]}),
            "role 'system' is not supported on this model",
        ),
        (
            json!({"model": "claude-opus-4-8", "max_tokens": 5, "messages": [
                user(json!("hi")), {"role": "assistant", "content": "Hello"}, {"role": "system", "content": "Be brief."},
            ]}),
            "a system message must follow a user message",
        ),
        (
            json!({"model": "m", "max_tokens": 5, "messages": [
                user(json!("hi")), {"role": "assistant", "content": ""}, user(json!("again")),
            ]}),
            "messages.1: all messages must have non-empty content except for the optional final assistant message",
        ),
        (
            json!({"model": "m", "max_tokens": 5, "messages": [user(json!([]))]}),
            "non-empty content",
        ),
        (
            json!({"model": "m", "max_tokens": 5, "messages": [user(json!(" \n"))]}),
            "messages: text content blocks must contain non-whitespace text",
        ),
        (
            json!({"model": "m", "max_tokens": 5, "messages": [user(json!([{"type": "text", "text": "\n\n"}]))]}),
            "messages: text content blocks must contain non-whitespace text",
        ),
        (
            json!({"model": "m", "max_tokens": 5, "system": "  ", "messages": [user(json!("hi"))]}),
            "system: text content blocks must contain non-whitespace text",
        ),
        (
            json!({"model": "m", "max_tokens": 5, "messages": [user(json!([
                {"type": "image", "source": {"type": "base64", "media_type": "image/jpg", "data": "/9j/4AAQSkZJRg=="}},
            ]))]}),
            "media_type: Input should be 'image/jpeg'",
        ),
    ] {
        let (status, answer) = post(&mock, GOOD, &body).await;
        assert_eq!(status, 400, "{body} got {answer}");
        assert_eq!(answer["type"], "error");
        assert_eq!(answer["error"]["type"], "invalid_request_error");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains(why), "{message} should name {why}");
    }
    // System messages inside `messages` are valid on Claude Opus 4.8, right after a user
    // turn; a last assistant turn may be empty (a prefill of nothing).
    for body in [
        json!({"model": "claude-opus-4-8", "max_tokens": 5, "messages": [user(json!("hi")), {"role": "system", "content": "Be brief."}]}),
        json!({"model": "m", "max_tokens": 5, "messages": [user(json!("hi")), {"role": "assistant", "content": ""}]}),
    ] {
        let (status, answer) = post(&mock, GOOD, &body).await;
        assert_eq!(status, 200, "{body} got {answer}");
    }
}

const PYTHON: &str = r#"
import json, sys, anthropic
base, key = sys.argv[1], sys.argv[2]
c = anthropic.Anthropic(base_url=base, api_key=key, max_retries=0)
out = {}
m = c.messages.create(model="claude-x", max_tokens=100, messages=[{"role": "user", "content": "hello there"}])
out["create"] = [m.content[0].text, m.stop_reason, m.usage.input_tokens, m.usage.output_tokens]
with c.messages.stream(model="claude-x", max_tokens=100, messages=[{"role": "user", "content": "hi"}]) as s:
    text = "".join(s.text_stream)
    final = s.get_final_message()
out["stream"] = [text, final.content[0].text, final.stop_reason, final.usage.output_tokens]
tools = [{"name": "weather", "description": "Weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
with c.messages.stream(model="claude-x", max_tokens=100, tools=tools, messages=[{"role": "user", "content": "weather?"}]) as s:
    final = s.get_final_message()
call = [b for b in final.content if b.type == "tool_use"][0]
out["tool"] = [final.stop_reason, call.name, call.input]
done = c.messages.create(model="claude-x", max_tokens=100, tools=tools, messages=[
    {"role": "user", "content": "weather?"},
    {"role": "assistant", "content": [{"type": "tool_use", "id": call.id, "name": call.name, "input": call.input}]},
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny"}]},
])
out["after_tool"] = [done.stop_reason, done.content[0].type]
out["count"] = c.messages.count_tokens(model="claude-x", messages=[{"role": "user", "content": "one two three"}]).input_tokens
print(json.dumps(out))
"#;

const PYTHON_ERRORS: &str = r#"
import json, sys, anthropic
base, key = sys.argv[1], sys.argv[2]
c = anthropic.Anthropic(base_url=base, api_key=key, max_retries=0)
out = []
for _ in range(2):
    try:
        c.messages.create(model="claude-x", max_tokens=10, messages=[{"role": "user", "content": "x"}])
        out.append("no error")
    except anthropic.APIStatusError as e:
        out.append([type(e).__name__, e.status_code])
try:
    with c.messages.stream(model="claude-x", max_tokens=10, messages=[{"role": "user", "content": "x"}]) as s:
        s.get_final_message()
    out.append("no error")
except anthropic.APIStatusError as e:
    out.append([type(e).__name__, "mid-stream"])
print(json.dumps(out))
"#;

async fn python(script: &str, base: &str, key: &str) -> Value {
    let output = tokio::process::Command::new("python3")
        .args(["-c", script, base, key])
        .output()
        .await
        .expect("python3 with the anthropic package (run e2e/test-all.sh)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "SDK script failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap()
}

#[tokio::test]
async fn the_official_anthropic_sdk_reads_the_mock() {
    let mock = MockServer::start_local(MockConfig::named("ant").with_api_key("sk-ant")).unwrap();
    let base = format!("http://{}", mock.addr());
    let out = python(PYTHON, &base, "sk-ant").await;
    assert_eq!(
        out["create"],
        json!(["[ant] tok1 tok2 tok3 tok4 tok5", "end_turn", 2, 5])
    );
    assert_eq!(
        out["stream"],
        json!([
            "[ant] tok1 tok2 tok3 tok4 tok5",
            "[ant] tok1 tok2 tok3 tok4 tok5",
            "end_turn",
            5
        ])
    );
    assert_eq!(
        out["tool"],
        json!(["tool_use", "weather", {"city": "mock"}])
    );
    assert_eq!(out["after_tool"], json!(["end_turn", "text"]));
    assert_eq!(out["count"], 3);

    mock.set_faults(vec![
        Fault::status(529).times(1),
        Fault::rate_limited(1).times(1),
        Fault::CutAfterChunks(3).times(1),
    ]);
    let out = python(PYTHON_ERRORS, &base, "sk-ant").await;
    assert_eq!(
        out,
        // A mid-stream `error` event arrives on a 200: the SDK raises its base status error.
        json!([
            ["OverloadedError", 529],
            ["RateLimitError", 429],
            ["APIStatusError", "mid-stream"]
        ])
    );
}

/// The mock's prompt cache: the prompt up to its last `cache_control` block is written by the
/// first request that has it (the 5-minute or the 1-hour cache, by its `ttl`) and read by the
/// next; a token count writes nothing; `input_tokens` counts what is neither.
#[tokio::test]
async fn the_mock_caches_prompts_as_anthropic_reports_it() {
    let mock = MockServer::start_local(MockConfig::named("ant").with_api_key("sk-ant")).unwrap();
    let cached = |ttl: Option<&str>| {
        let mut control = json!({"type": "ephemeral"});
        if let Some(ttl) = ttl {
            control["ttl"] = json!(ttl);
        }
        json!({"model": "claude-x", "max_tokens": 64,
               "system": [{"type": "text", "text": format!("be brief {}", ttl.unwrap_or("")), "cache_control": control}],
               "messages": [{"role": "user", "content": [
                   {"type": "text", "text": "one two three", "cache_control": control},
                   {"type": "text", "text": "and four"}]}]})
    };
    let usage = |body: &Value| {
        let u = &body["usage"];
        [
            &u["input_tokens"],
            &u["cache_creation_input_tokens"],
            &u["cache_read_input_tokens"],
            &u["cache_creation"]["ephemeral_5m_input_tokens"],
            &u["cache_creation"]["ephemeral_1h_input_tokens"],
        ]
        .map(|n| n.as_u64().unwrap())
    };
    let count = reqwest::Client::new()
        .post(format!("http://{}/v1/messages/count_tokens", mock.addr()))
        .header("x-api-key", "sk-ant")
        .header("anthropic-version", "2023-06-01")
        .json(&cached(None))
        .send()
        .await
        .unwrap();
    assert_eq!(count.status(), 200);
    // Five words to the last breakpoint (the system prompt's two, the first text block's
    // three), two after it.
    let (_, first) = post(&mock, GOOD, &cached(None)).await;
    assert_eq!(usage(&first), [2, 5, 0, 5, 0], "{first}");
    let (_, again) = post(&mock, GOOD, &cached(None)).await;
    assert_eq!(usage(&again), [2, 0, 5, 0, 0], "{again}");
    let (_, hour) = post(&mock, GOOD, &cached(Some("1h"))).await;
    assert_eq!(usage(&hour), [2, 6, 0, 0, 6], "{hour}");
    let (_, plain) = post(&mock, GOOD, &hello()).await;
    assert_eq!(usage(&plain), [2, 0, 0, 0, 0], "{plain}");
}
