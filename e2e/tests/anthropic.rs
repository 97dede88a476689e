//! Anthropic both ways with real processes and the official SDKs, unchanged: the `openai`
//! SDK against an Anthropic backend (chat, streaming with usage, tools, images, errors).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Cluster, Mock, eventually};
use serde_json::{Value, json};
use sluice_e2e::mock::Fault;
use sluice_proto::v1 as pb;

const OPENAI_SDK: &str = r#"
import json, sys, openai
from openai import OpenAI
base, key = sys.argv[1], sys.argv[2]
c = OpenAI(base_url=base, api_key=key, max_retries=0)
out = {}
hello = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]
r = c.chat.completions.create(model="claude", messages=hello)
out["chat"] = [r.choices[0].message.content, r.choices[0].finish_reason, r.usage.prompt_tokens, r.usage.completion_tokens]
parts, usage, finish = [], None, None
for chunk in c.chat.completions.create(model="claude", messages=hello, stream=True, stream_options={"include_usage": True}):
    if chunk.choices and chunk.choices[0].delta.content:
        parts.append(chunk.choices[0].delta.content)
    if chunk.choices and chunk.choices[0].finish_reason:
        finish = chunk.choices[0].finish_reason
    if chunk.usage:
        usage = [chunk.usage.prompt_tokens, chunk.usage.completion_tokens]
out["stream"] = ["".join(parts), finish, usage]
tools = [{"type": "function", "function": {"name": "weather", "description": "Weather now",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"]}}}]
ask = [{"role": "user", "content": "weather in Paris?"}]
r = c.chat.completions.create(model="claude", messages=ask, tools=tools, tool_choice="required")
call = r.choices[0].message.tool_calls[0]
out["tools"] = [r.choices[0].finish_reason, call.function.name, json.loads(call.function.arguments)]
calls = {}
for chunk in c.chat.completions.create(model="claude", messages=ask, tools=tools, stream=True):
    for d in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
        entry = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
        if d.id: entry["id"] = d.id
        if d.function and d.function.name: entry["name"] += d.function.name
        if d.function and d.function.arguments: entry["arguments"] += d.function.arguments
out["stream_tools"] = [[v["name"], json.loads(v["arguments"]), v["id"] is not None] for _, v in sorted(calls.items())]
turn = [*ask, {"role": "assistant", "content": None, "tool_calls": [{"id": call.id, "type": "function",
        "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
r = c.chat.completions.create(model="claude", messages=turn, tools=tools)
out["after_tool"] = [r.choices[0].finish_reason, r.choices[0].message.content]
r = c.chat.completions.create(model="claude", messages=[{"role": "user", "content": [
    {"type": "text", "text": "what is in these?"},
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
    {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}])
out["images"] = [r.choices[0].finish_reason, r.usage.prompt_tokens]
def error_of(f):
    try:
        f()
        return "no error"
    except openai.APIStatusError as e:
        return [type(e).__name__, e.status_code, e.body.get("code") if isinstance(e.body, dict) else None]
bad = [{"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{oops"}}]}]
out["bad_arguments"] = error_of(lambda: c.chat.completions.create(model="claude", messages=bad))
out["embeddings"] = error_of(lambda: c.embeddings.create(model="claude", input="x"))
out["overloaded"] = error_of(lambda: c.chat.completions.create(model="claude-overloaded", messages=ask))
print(json.dumps(out))
"#;

async fn python(script: &str, args: &[&str]) -> Value {
    let output = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .await
        .expect("python3 with the openai and anthropic packages (run e2e/test-all.sh)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "SDK script failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

#[tokio::test]
async fn the_openai_sdk_talks_to_an_anthropic_backend() {
    let cluster = Cluster::start().await;
    let claude = Mock::start("claude", &["claude-up", "claude-busy"]).await;
    cluster
        .add_backend_speaking(
            pb::ApiFormat::Anthropic,
            "anthropic",
            &claude,
            pb::Pool::Primary,
            0,
            &[("claude", "claude-up")],
        )
        .await;
    // Its own backend, always overloaded (529).
    let busy = Mock::start("busy", &["claude-busy"]).await;
    busy.set_faults(vec![Fault::status(529).always()]).await;
    cluster
        .add_backend_speaking(
            pb::ApiFormat::Anthropic,
            "anthropic-busy",
            &busy,
            pb::Pool::Primary,
            0,
            &[("claude-overloaded", "claude-busy")],
        )
        .await;
    let (_, key) = cluster.create_key("sdk", &[]).await;
    let proxy = cluster.proxy().await;
    let out = python(OPENAI_SDK, &[&proxy.url("/v1"), &key]).await;

    let text = "[claude] tok1 tok2 tok3 tok4 tok5";
    // "Be brief." and "hello there": four words of input.
    assert_eq!(out["chat"], json!([text, "stop", 4, 5]), "{out}");
    assert_eq!(out["stream"], json!([text, "stop", [4, 5]]), "{out}");
    assert_eq!(
        out["tools"],
        json!(["tool_calls", "weather", {"city": "mock", "days": 1}]),
        "{out}"
    );
    assert_eq!(
        out["stream_tools"],
        json!([["weather", {"city": "mock", "days": 1}, true]]),
        "{out}"
    );
    assert_eq!(out["after_tool"], json!(["stop", text]), "{out}");
    assert_eq!(out["images"][0], "stop", "{out}");
    assert_eq!(
        out["bad_arguments"],
        json!(["BadRequestError", 400, "untranslatable"]),
        "{out}"
    );
    assert_eq!(
        out["embeddings"],
        json!(["BadRequestError", 400, "unsupported_endpoint"]),
        "{out}"
    );
    assert_eq!(
        out["overloaded"],
        json!(["InternalServerError", 503, "overloaded_error"]),
        "{out}"
    );
    // Every call that reached the backend went to its Messages API, which refuses what the
    // real API refuses: nothing was rejected there.
    let stats = claude.stats().await;
    assert_eq!(stats.requests.messages, 6, "{stats:?}");
    assert_eq!(stats.requests.chat_completions, 0);
    assert_eq!(stats.responses_with(200), 6, "{stats:?}");
    // The usage records carry the tokens the Anthropic backend reported, streams included.
    eventually(
        Duration::from_secs(30),
        "the usage records hold the backend's tokens",
        || async {
            let t = cluster.totals().await;
            t.prompt_tokens == stats.prompt_tokens && t.completion_tokens == stats.completion_tokens
        },
    )
    .await;
}

#[tokio::test]
async fn an_overloaded_anthropic_backend_fails_over_to_an_openai_fallback_in_one_request() {
    let cluster = Cluster::start().await;
    let claude = Mock::start("claude", &["claude-up"]).await;
    claude.set_faults(vec![Fault::status(529).always()]).await;
    cluster
        .add_backend_speaking(
            pb::ApiFormat::Anthropic,
            "anthropic",
            &claude,
            pb::Pool::Primary,
            0,
            &[("smart", "claude-up")],
        )
        .await;
    let gpt = Mock::start("gpt", &["gpt-up"]).await;
    cluster
        .add_backend(
            "openai",
            &gpt,
            pb::Pool::Fallback,
            0,
            &[("smart", "gpt-up")],
        )
        .await;
    let (_, key) = cluster.create_key("client", &[]).await;
    let proxy = cluster.proxy().await;
    for stream in [false, true] {
        let response = proxy
            .post(
                "/v1/chat/completions",
                &key,
                json!({"model": "smart", "stream": stream, "messages": [{"role": "user", "content": "hi"}]}),
            )
            .await;
        assert_eq!(response.status(), 200, "stream {stream}");
        let body = response.text().await.unwrap();
        assert!(body.contains("[gpt]"), "stream {stream}: {body}");
        assert_eq!(body.contains("[DONE]"), stream, "{body}");
    }
    // The first request tried the Anthropic backend first, which answered 529 (the second
    // may find it cooling down already).
    assert!(claude.stats().await.responses_with(529) >= 1);
    assert_eq!(gpt.stats().await.requests.chat_completions, 2);
}
