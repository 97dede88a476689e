//! Anthropic both ways with real processes and the official SDKs, unchanged: the `openai`
//! SDK against an Anthropic backend (chat, streaming with usage, tools, images, errors), and
//! the `anthropic` SDK against `/v1/messages` routed to an Anthropic backend and to an
//! OpenAI-format one.

use crate::common;

use std::time::Duration;

use common::{Cluster, Mock, eventually, python};
use serde_json::json;
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
from pydantic import BaseModel
class Weather(BaseModel):
    city: str
    days: int
parse = getattr(c.chat.completions, "parse", None) or c.beta.chat.completions.parse
r = parse(model="claude", messages=ask, response_format=Weather)
out["parsed"] = [r.choices[0].finish_reason, r.choices[0].message.parsed.model_dump()]
with c.beta.chat.completions.stream(model="claude", messages=ask, response_format=Weather) as s:
    out["parsed_stream"] = s.get_final_completion().choices[0].message.parsed.model_dump()
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

/// The official `anthropic` SDK against `/v1/messages`, for one model (`argv[4]`) routed to an
/// Anthropic backend or an OpenAI-format one: both auth headers, create, stream, a tool round
/// trip (whole and streamed), count_tokens, and the SDK's error classes.
const ANTHROPIC_SDK: &str = r#"
import json, sys, anthropic
base, key, limited, model, busy = sys.argv[1:6]
bearer = anthropic.Anthropic(base_url=base, api_key=key, max_retries=0)
x_api_key = anthropic.Anthropic(base_url=base, api_key=key, max_retries=0,
                                default_headers={"x-api-key": key, "Authorization": anthropic.Omit()})
out = {}
hello = [{"role": "user", "content": "hello there"}]
def text_of(m):
    return "".join(b.text for b in m.content if b.type == "text")
for name, c in [("bearer", bearer), ("x_api_key", x_api_key)]:
    m = c.messages.create(model=model, max_tokens=64, system="Be brief.", messages=hello)
    out[name] = [text_of(m), m.stop_reason, m.usage.input_tokens, m.usage.output_tokens]
with bearer.messages.stream(model=model, max_tokens=64, system="Be brief.", messages=hello) as s:
    m = s.get_final_message()
out["stream"] = [text_of(m), m.stop_reason, m.usage.input_tokens, m.usage.output_tokens]
m = bearer.beta.messages.create(model=model, max_tokens=64, system="Be brief.", messages=hello,
                                betas=["context-management-2025-06-27"])
out["beta"] = [text_of(m), m.stop_reason]
out["models"] = [model in [m.id for m in bearer.models.list()], x_api_key.models.retrieve(model).id]
tools = [{"name": "weather", "description": "Weather now",
          "input_schema": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"]}}]
ask = [{"role": "user", "content": "weather in Paris?"}]
m = bearer.messages.create(model=model, max_tokens=64, messages=ask, tools=tools, tool_choice={"type": "any"})
calls = [b for b in m.content if b.type == "tool_use"]
out["tools"] = [m.stop_reason, [[b.name, b.input] for b in calls], [b.type for b in m.content]]
with bearer.messages.stream(model=model, max_tokens=64, messages=ask, tools=tools) as s:
    streamed = s.get_final_message()
out["stream_tools"] = [streamed.stop_reason, [[b.type, getattr(b, "name", None), getattr(b, "input", None)] for b in streamed.content]]
turn = [*ask, {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in m.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": calls[0].id, "content": "sunny"}]}]
r = bearer.messages.create(model=model, max_tokens=64, messages=turn, tools=tools)
out["after_tool"] = [r.stop_reason, text_of(r)]
def error_of(f):
    try:
        f()
        return "no error"
    except anthropic.APIStatusError as e:
        kind = e.body.get("error", {}).get("type") if isinstance(e.body, dict) else None
        return [type(e).__name__, e.status_code, kind, isinstance(e, anthropic.InternalServerError)]
try:
    out["count_tokens"] = bearer.messages.count_tokens(model=model, messages=hello, system="Be brief.").input_tokens
except anthropic.APIStatusError as e:
    out["count_tokens"] = error_of(lambda: (_ for _ in ()).throw(e))
bad = anthropic.Anthropic(base_url=base, api_key="sk-wrong", max_retries=0)
bad_x = anthropic.Anthropic(base_url=base, api_key="sk-wrong", max_retries=0,
                            default_headers={"x-api-key": "sk-wrong", "Authorization": anthropic.Omit()})
create = lambda c, m=model: c.messages.create(model=m, max_tokens=8, messages=hello)
out["bad_key"] = [error_of(lambda: create(bad)), error_of(lambda: create(bad_x))]
out["unknown_model"] = error_of(lambda: create(bearer, "no-such-model"))
limited = anthropic.Anthropic(base_url=base, api_key=limited, max_retries=0)
create(limited)
out["rate_limited"] = error_of(lambda: create(limited))
out["overloaded"] = error_of(lambda: create(bearer, busy))
print(json.dumps(out))
"#;

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
    // Structured output (`parse`, whole and streamed): Anthropic's `output_config.format`,
    // the JSON of the schema read back into the SDK's model.
    assert_eq!(
        out["parsed"],
        json!(["stop", {"city": "mock", "days": 1}]),
        "{out}"
    );
    assert_eq!(
        out["parsed_stream"],
        json!({"city": "mock", "days": 1}),
        "{out}"
    );
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
    assert_eq!(stats.requests.messages, 8, "{stats:?}");
    assert_eq!(stats.requests.chat_completions, 0);
    assert_eq!(stats.responses_with(200), 8, "{stats:?}");
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
    // A Messages client likewise: the OpenAI backend answers it in Anthropic's shape.
    for stream in [false, true] {
        let response = proxy
            .http
            .post(proxy.url("/v1/messages"))
            .header("x-api-key", &key)
            .header("anthropic-version", "2023-06-01")
            .json(
                &json!({"model": "smart", "max_tokens": 32, "stream": stream,
                          "messages": [{"role": "user", "content": "hi"}]}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "stream {stream}");
        let body = response.text().await.unwrap();
        assert!(body.contains("gpt-up"), "stream {stream}: {body}");
        assert_eq!(body.contains("event: message_stop"), stream, "{body}");
    }
    // The first request tried the Anthropic backend first, which answered 529 (later ones
    // may find it cooling down already).
    assert!(claude.stats().await.responses_with(529) >= 1);
    assert_eq!(gpt.stats().await.requests.chat_completions, 4);
}

/// One model on an Anthropic backend, one on an OpenAI-format backend, and for each an
/// always-overloaded twin (529 from Anthropic, 503 from OpenAI).
async fn both_kinds(cluster: &Cluster) -> [Mock; 4] {
    let claude = Mock::start("claude", &["claude-up"]).await;
    let gpt = Mock::start("gpt", &["gpt-up"]).await;
    let claude_busy = Mock::start("claude-busy", &["claude-busy"]).await;
    claude_busy
        .set_faults(vec![Fault::status(529).always()])
        .await;
    let gpt_busy = Mock::start("gpt-busy", &["gpt-busy"]).await;
    gpt_busy.set_faults(vec![Fault::status(503).always()]).await;
    for (format, name, mock, model, upstream) in [
        (
            pb::ApiFormat::Anthropic,
            "anthropic",
            &claude,
            "claude",
            "claude-up",
        ),
        (pb::ApiFormat::Openai, "openai", &gpt, "gpt", "gpt-up"),
        (
            pb::ApiFormat::Anthropic,
            "anthropic-busy",
            &claude_busy,
            "claude-overloaded",
            "claude-busy",
        ),
        (
            pb::ApiFormat::Openai,
            "openai-busy",
            &gpt_busy,
            "gpt-overloaded",
            "gpt-busy",
        ),
    ] {
        cluster
            .add_backend_speaking(
                format,
                name,
                mock,
                pb::Pool::Primary,
                0,
                &[(model, upstream)],
            )
            .await;
    }
    [claude, gpt, claude_busy, gpt_busy]
}

async fn limited_key(cluster: &Cluster, name: &str) -> String {
    cluster
        .admin()
        .await
        .create_client_key(pb::CreateClientKeyRequest {
            name: name.into(),
            rpm_limit: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .key
}

#[tokio::test]
async fn the_anthropic_sdk_talks_to_both_kinds_of_backend_through_v1_messages() {
    let cluster = Cluster::start().await;
    let [claude, gpt, _claude_busy, _gpt_busy] = both_kinds(&cluster).await;
    let (_, key) = cluster.create_key("sdk", &[]).await;
    let limited_claude = limited_key(&cluster, "limited-claude").await;
    let limited_gpt = limited_key(&cluster, "limited-gpt").await;
    let proxy = cluster.proxy().await;
    let base = proxy.url("");
    let to_claude = python(
        ANTHROPIC_SDK,
        &[&base, &key, &limited_claude, "claude", "claude-overloaded"],
    )
    .await;
    let to_gpt = python(
        ANTHROPIC_SDK,
        &[&base, &key, &limited_gpt, "gpt", "gpt-overloaded"],
    )
    .await;

    // An Anthropic backend: the mock's own answers, passed through. "Be brief." and "hello
    // there": four words of input.
    let text = "[claude] tok1 tok2 tok3 tok4 tok5";
    for auth in ["bearer", "x_api_key"] {
        assert_eq!(
            to_claude[auth],
            json!([text, "end_turn", 4, 5]),
            "{to_claude}"
        );
    }
    assert_eq!(
        to_claude["stream"],
        json!([text, "end_turn", 4, 5]),
        "{to_claude}"
    );
    assert_eq!(to_claude["count_tokens"], 4, "{to_claude}");
    assert_eq!(to_claude["beta"], json!([text, "end_turn"]), "{to_claude}");
    assert_eq!(to_claude["models"], json!([true, "claude"]), "{to_claude}");
    // An OpenAI-format backend, translated both ways.
    let text = "[gpt] tok1 tok2 tok3 tok4";
    for auth in ["bearer", "x_api_key"] {
        assert_eq!(to_gpt[auth], json!([text, "end_turn", 4, 5]), "{to_gpt}");
    }
    assert_eq!(
        to_gpt["stream"],
        json!([text, "end_turn", 4, 5]),
        "{to_gpt}"
    );
    assert_eq!(to_gpt["beta"], json!([text, "end_turn"]), "{to_gpt}");
    assert_eq!(to_gpt["models"], json!([true, "gpt"]), "{to_gpt}");
    assert_eq!(
        to_gpt["count_tokens"],
        json!(["BadRequestError", 400, "invalid_request_error", false]),
        "{to_gpt}"
    );
    for out in [&to_claude, &to_gpt] {
        let input = json!({"city": "mock", "days": 1});
        assert_eq!(
            out["tools"],
            json!(["tool_use", [["weather", input]], ["tool_use"]]),
            "{out}"
        );
        // The streamed call: one tool block, never an empty one.
        assert_eq!(
            out["stream_tools"],
            json!(["tool_use", [["tool_use", "weather", input]]]),
            "{out}"
        );
        assert_eq!(out["after_tool"][0], "end_turn", "{out}");
        assert_eq!(
            out["bad_key"],
            json!([
                ["AuthenticationError", 401, "authentication_error", false],
                ["AuthenticationError", 401, "authentication_error", false]
            ]),
            "{out}"
        );
        assert_eq!(
            out["unknown_model"],
            json!(["NotFoundError", 404, "not_found_error", false]),
            "{out}"
        );
        assert_eq!(
            out["rate_limited"],
            json!(["RateLimitError", 429, "rate_limit_error", false]),
            "{out}"
        );
    }
    assert_eq!(
        to_claude["overloaded"],
        json!(["OverloadedError", 529, "overloaded_error", true]),
        "{to_claude}"
    );
    assert_eq!(
        to_gpt["overloaded"],
        json!(["ServiceUnavailableError", 503, "overloaded_error", true]),
        "{to_gpt}"
    );

    // The Anthropic backend got Messages calls only, the OpenAI one chat completions only,
    // and neither refused anything.
    let (claude, gpt) = (claude.stats().await, gpt.stats().await);
    assert_eq!(claude.requests.chat_completions, 0, "{claude:?}");
    assert_eq!(
        claude.responses_with(200),
        claude.requests.messages,
        "{claude:?}"
    );
    assert_eq!(gpt.requests.messages, 0, "{gpt:?}");
    assert_eq!(
        gpt.responses_with(200),
        gpt.requests.chat_completions,
        "{gpt:?}"
    );
    // Usage totals are what the backends served (a token count records none).
    eventually(
        Duration::from_secs(30),
        "the usage records hold the backends' tokens",
        || async {
            let t = cluster.totals().await;
            t.prompt_tokens == claude.prompt_tokens + gpt.prompt_tokens
                && t.completion_tokens == claude.completion_tokens + gpt.completion_tokens
        },
    )
    .await;
}

/// A Messages body reaches an Anthropic backend as the client's very bytes when its route
/// keeps the model's name (Sluice then has nothing to change in it), and with `model` alone
/// replaced when the route renames it.
#[tokio::test]
async fn a_messages_body_reaches_the_backend_as_sent_unless_its_model_is_renamed() {
    let cluster = Cluster::start().await;
    let claude = Mock::start("claude", &["claude-same", "claude-up"]).await;
    cluster
        .add_backend_speaking(
            pb::ApiFormat::Anthropic,
            "anthropic",
            &claude,
            pb::Pool::Primary,
            0,
            &[("claude-same", "claude-same"), ("claude", "claude-up")],
        )
        .await;
    let (_, key) = cluster.create_key("raw", &[]).await;
    let proxy = cluster.proxy().await;
    // Whitespace and an escaped key, which a rewrite writes anew.
    let body = |model: &str| {
        format!(
            "{{\n  \"model\" : \"{model}\",\n  \"max_tokens\": 16,\n  \
             \"mess\\u0061ges\": [ {{\"role\": \"user\", \"content\": \"hi\"}} ]\n}}\n"
        )
    };
    let send = |body: String| {
        proxy
            .http
            .post(proxy.url("/v1/messages"))
            .header("x-api-key", &key)
            .header("anthropic-version", "2023-06-01")
            .header("content-type", "application/json")
            .body(body)
            .send()
    };

    let sent = body("claude-same");
    let answer = send(sent.clone()).await.unwrap();
    assert_eq!(answer.status(), 200, "{}", answer.text().await.unwrap());
    assert_eq!(claude.last_messages().await.unwrap().body, sent);

    let sent = body("claude");
    let answer = send(sent.clone()).await.unwrap();
    assert_eq!(answer.status(), 200, "{}", answer.text().await.unwrap());
    let upstream = claude.last_messages().await.unwrap().body;
    assert_ne!(upstream, sent, "a renamed model's body is written anew");
    let mut expected: serde_json::Value = serde_json::from_str(&sent).unwrap();
    expected["model"] = json!("claude-up");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&upstream).unwrap(),
        expected
    );
}

/// A gateway in front of Anthropic's API that takes a bearer token only (OpenRouter's
/// Anthropic endpoint, as its Claude Code guide sets it up): registered with the format's own
/// header, `x-api-key`, every request is refused upstream; with `key_header` bearer, Messages
/// and translated chat requests are served, the key in `Authorization` and in no `x-api-key`.
#[tokio::test]
async fn an_anthropic_format_gateway_taking_bearer_tokens_only_is_served() {
    let cluster = Cluster::start().await;
    let relay = Mock::start_with("relay", &["claude-up"], &["--key-header", "authorization"]).await;
    let mut backend = cluster
        .add_backend_speaking(
            pb::ApiFormat::Anthropic,
            "relay",
            &relay,
            pb::Pool::Primary,
            0,
            &[("claude", "claude-up")],
        )
        .await;
    let (_, key) = cluster.create_key("k", &[]).await;
    let proxy = cluster.proxy().await;
    let messages = || {
        proxy.post(
            "/v1/messages",
            &key,
            json!({"model": "claude", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}),
        )
    };
    let r = messages().await;
    assert_eq!(r.status(), 502, "{}", r.text().await.unwrap());

    backend.key_header = pb::KeyHeader::Bearer as i32;
    cluster.update_backend(backend, &["key_header"]).await;
    eventually(Duration::from_secs(10), "Messages served", || async {
        messages().await.status() == 200
    })
    .await;
    let seen = relay.last_messages().await.unwrap();
    let header = |name: &str| {
        seen.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(
        header("authorization"),
        Some(format!("Bearer {}", relay.api_key.as_deref().unwrap()))
    );
    assert_eq!(header("x-api-key"), None);
    assert!(header("anthropic-version").is_some());
    let r = proxy.chat(&key, "claude").await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
}

/// Anthropic's prompt caching through the official SDK: a backend added with `sluicectl` and a
/// cache write price (`IN/CACHED/WRITE`, Claude Sonnet's $3, $0.30, $3.75 and $15 out), a
/// system prompt marked `cache_control` written to the cache by the first call and read by
/// the second (streamed); then two more written to the 1-hour cache (`"ttl": "1h"`, what
/// Claude Code asks for), whole and streamed, which Anthropic bills at twice the input price
/// (they were charged at the 5-minute write price, 38 % less). The key's spend is what the
/// provider bills for all that (each part at its price, exactly), and the statistics and
/// `sluicectl stats totals` count the written tokens.
#[tokio::test]
async fn prompt_cache_writes_are_spent_at_their_price_and_counted() {
    const CACHING: &str = r#"
import json, sys, anthropic
base, key = sys.argv[1:3]
c = anthropic.Anthropic(base_url=base, api_key=key, max_retries=0)
system = [{"type": "text", "text": "You answer questions about the weather in Paris, briefly.",
           "cache_control": {"type": "ephemeral"}}]
hello = [{"role": "user", "content": "hello there"}]
out = []
m = c.messages.create(model="claude", max_tokens=64, system=system, messages=hello)
out.append(m.usage.model_dump())
with c.messages.stream(model="claude", max_tokens=64, system=system, messages=hello) as s:
    out.append(s.get_final_message().usage.model_dump())
def hour(city):
    return [{"type": "text", "text": f"You answer questions about the weather in {city}, briefly.",
             "cache_control": {"type": "ephemeral", "ttl": "1h"}}]
m = c.messages.create(model="claude", max_tokens=64, system=hour("Lyon"), messages=hello)
out.append(m.usage.model_dump())
with c.messages.stream(model="claude", max_tokens=64, system=hour("Nice"), messages=hello) as s:
    out.append(s.get_final_message().usage.model_dump())
print(json.dumps(out))
"#;
    let cluster = Cluster::start().await;
    let claude = Mock::start("claude", &["claude-up"]).await;
    let (_, key) = cluster.create_key("cached", &[]).await;
    let key_id = cluster.client_key("cached").await.id;
    add_priced_claude(&cluster, &claude).await;
    let proxy = cluster.proxy().await;
    let usage = python(CACHING, &[&proxy.url(""), &key]).await;
    // Nine words of system prompt, cached; two of question; five of answer.
    let (write, read) = (&usage[0], &usage[1]);
    assert_eq!(
        (
            &write["input_tokens"],
            &write["cache_creation_input_tokens"],
            &write["cache_read_input_tokens"]
        ),
        (&json!(2), &json!(9), &json!(0)),
        "{usage}"
    );
    assert_eq!(
        (
            &read["input_tokens"],
            &read["cache_creation_input_tokens"],
            &read["cache_read_input_tokens"]
        ),
        (&json!(2), &json!(0), &json!(9)),
        "{usage}"
    );
    for hour in &usage.as_array().unwrap()[2..] {
        assert_eq!(
            hour["cache_creation"],
            json!({"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 9}),
            "{usage}"
        );
    }
    // In nano-units: 2 × 3,000 + 9 × 3,750 + 5 × 15,000, then 2 × 3,000 + 9 × 300 + 5 × 15,000,
    // then twice 2 × 3,000 + 9 × 6,000 (the 1-hour write, twice the input price) + 5 × 15,000.
    let billed =
        (6_000 + 33_750 + 75_000) + (6_000 + 2_700 + 75_000) + 2 * (6_000 + 54_000 + 75_000);
    let totals = spent(&cluster, &key_id, billed).await;
    assert_eq!(
        (
            totals.prompt_tokens,
            totals.cached_prompt_tokens,
            totals.cache_write_prompt_tokens
        ),
        (44, 9, 27)
    );
    assert!(
        (totals.cost * 1e9 - billed as f64).abs() < 1.0,
        "{totals:?}"
    );
    let shown = cluster.sluicectl(&["stats", "totals"]).await;
    assert!(
        shown
            .lines()
            .any(|l| l.contains("of them written to the cache") && l.trim_end().ends_with(" 27")),
        "{shown}"
    );
    let route = cluster.sluicectl(&["backend", "get", "claude"]).await;
    assert!(route.contains("CACHE WRITE /MTOK"), "{route}");
}

/// A chat client that names its conversation (`prompt_cache_key`, what OpenAI's automatic
/// cache is steered by) gets Anthropic's prompt cache on an Anthropic backend: the translated
/// request asks for automatic caching, so each turn writes the prompt to the cache and the next
/// reads what the last wrote; the openai SDK sees the reads as `cached_tokens`, and the key is
/// charged each part at its price. A request naming no conversation is not cached (writes cost
/// a quarter more than the input price).
#[tokio::test]
async fn a_chat_client_naming_its_conversation_gets_anthropics_prompt_cache() {
    const CONVERSATION: &str = r#"
import json, sys
from openai import OpenAI
base, key = sys.argv[1:3]
c = OpenAI(base_url=base, api_key=key, max_retries=0)
def tokens(u):
    details = u.prompt_tokens_details
    return [u.prompt_tokens, details.cached_tokens if details else 0, u.completion_tokens]
turn = [{"role": "system", "content": "You answer questions about the weather in Paris, briefly."},
        {"role": "user", "content": "hello there"}]
out = []
r = c.chat.completions.create(model="claude", messages=turn, prompt_cache_key="conversation-1")
out.append(tokens(r.usage))
turn += [{"role": "assistant", "content": r.choices[0].message.content},
         {"role": "user", "content": "and tomorrow?"}]
usage = None
for chunk in c.chat.completions.create(model="claude", messages=turn, stream=True,
                                       stream_options={"include_usage": True},
                                       prompt_cache_key="conversation-1"):
    usage = chunk.usage or usage
out.append(tokens(usage))
r = c.chat.completions.create(model="claude", messages=turn[:2])
out.append(tokens(r.usage))
print(json.dumps(out))
"#;
    let cluster = Cluster::start().await;
    let claude = Mock::start("claude", &["claude-up"]).await;
    let (_, key) = cluster.create_key("conversing", &[]).await;
    let key_id = cluster.client_key("conversing").await.id;
    add_priced_claude(&cluster, &claude).await;
    let proxy = cluster.proxy().await;
    let usage = python(CONVERSATION, &[&proxy.url("/v1"), &key]).await;
    // The first turn: nine words of system prompt and two of question, all written to the
    // cache; five of answer. The second adds the answer (six words) and three more: the first
    // turn's eleven are read, the eight after them written. The third, naming no
    // conversation, the first turn's prompt again: nothing cached.
    assert_eq!(
        usage,
        json!([[11, 0, 5], [19, 11, 5], [11, 0, 5]]),
        "{usage}"
    );
    let last = claude.last_messages().await.unwrap();
    let sent: serde_json::Value = serde_json::from_str(&last.body).unwrap();
    assert_eq!(sent.get("cache_control"), None, "{sent}");
    // In nano-units: 11 × 3,750 + 5 × 15,000; 11 × 300 + 8 × 3,750 + 5 × 15,000;
    // 11 × 3,000 + 5 × 15,000.
    let billed = (41_250 + 75_000) + (3_300 + 30_000 + 75_000) + (33_000 + 75_000);
    let totals = spent(&cluster, &key_id, billed).await;
    assert_eq!(
        (
            totals.prompt_tokens,
            totals.cached_prompt_tokens,
            totals.cache_write_prompt_tokens
        ),
        (41, 11, 19)
    );
}

/// Anthropic says in each answer's `usage` at which speed and where it ran: fast mode
/// (`speed: "fast"`, Claude Opus 4.6's at six times the price) and US-only inference
/// (`inference_geo: "us"`, at 1.1 times), both at once multiplied. A route's tiers, set on a
/// backend already priced (`backend update --model claude --tier ...`: the prices are kept),
/// charge each message at what its answer reports, whole and streamed (where the region comes
/// in `message_start` and the figures in `message_delta`).
#[tokio::test]
async fn fast_mode_and_us_inference_are_spent_at_their_tiers() {
    const SPEEDS: &str = r#"
import json, sys, anthropic
base, key = sys.argv[1:3]
c = anthropic.Anthropic(base_url=base, api_key=key, max_retries=0)
hello = [{"role": "user", "content": "hello there"}]
out = []
for extra in [{"speed": "fast", "inference_geo": "us"}, {"speed": "fast"}, {"inference_geo": "us"}, {}]:
    m = c.messages.create(model="claude", max_tokens=64, messages=hello, extra_body=extra)
    out.append([m.usage.model_dump().get("speed"), m.usage.model_dump().get("inference_geo"),
                m.usage.input_tokens, m.usage.output_tokens])
    with c.messages.stream(model="claude", max_tokens=64, messages=hello, extra_body=extra) as s:
        m = s.get_final_message()
    out.append([extra.get("speed", "standard"), extra.get("inference_geo", "global"),
                m.usage.input_tokens, m.usage.output_tokens])
print(json.dumps(out))
"#;
    let cluster = Cluster::start().await;
    let claude = Mock::start("claude", &["claude-up"]).await;
    let (_, key) = cluster.create_key("fast", &[]).await;
    let key_id = cluster.client_key("fast").await.id;
    add_priced_claude(&cluster, &claude).await;
    cluster
        .sluicectl(&[
            "backend",
            "update",
            "claude",
            "--model",
            "claude:claude-up",
            "--tier",
            "claude:fast=6",
            "--tier",
            "claude:us=1.1",
        ])
        .await;
    let proxy = cluster.proxy().await;
    let answers = python(SPEEDS, &[&proxy.url(""), &key]).await;
    let answers = answers.as_array().unwrap();
    assert_eq!(
        answers[0],
        json!(["fast", "us", 2, 5]),
        "the answer reports its tiers: {answers:?}"
    );
    // $3 in and $15 out a million tokens: 3,000 and 15,000 nano-units a token, at the
    // tiers' multiple.
    let billed: u64 = answers
        .iter()
        .map(|a| {
            let multiplier = match (a[0].as_str().unwrap(), a[1].as_str().unwrap()) {
                ("fast", "us") => 6.6,
                ("fast", _) => 6.0,
                (_, "us") => 1.1,
                _ => 1.0,
            };
            let tokens = a[2].as_u64().unwrap() * 3_000 + a[3].as_u64().unwrap() * 15_000;
            (tokens as f64 * multiplier).round() as u64
        })
        .sum();
    assert_eq!(billed, 2 * (534_600 + 486_000 + 89_100 + 81_000));
    spent(&cluster, &key_id, billed).await;
}

/// Anthropic bills its web search by the search, on top of the tokens ($10 per 1,000), and
/// counts them in `usage.server_tool_use.web_search_requests`. A route that prices the tool
/// (`backend update --call-price claude:web_search=10`) charges each message its searches,
/// whole and streamed (where `message_start` counts 0 and `message_delta` the total); web
/// fetches, priced at 0, are not stored and cost nothing; a message without server tools pays
/// its tokens alone.
#[tokio::test]
async fn web_searches_are_spent_at_their_price_per_search() {
    const SEARCHES: &str = r#"
import json, sys, anthropic
base, key = sys.argv[1:3]
c = anthropic.Anthropic(base_url=base, api_key=key, max_retries=0)
hello = [{"role": "user", "content": "hello there"}]
search = {"type": "web_search_20250305", "name": "web_search", "max_uses": 3}
fetch = {"type": "web_fetch_20250910", "name": "web_fetch", "max_uses": 2}
out = []
for tools in [[search, fetch], [fetch], []]:
    m = c.messages.create(model="claude", max_tokens=64, messages=hello, tools=tools)
    used = m.usage.server_tool_use
    out.append([used.web_search_requests if used else 0, m.usage.input_tokens, m.usage.output_tokens])
    with c.messages.stream(model="claude", max_tokens=64, messages=hello, tools=tools) as s:
        m = s.get_final_message()
    used = m.usage.server_tool_use
    out.append([used.web_search_requests if used else 0, m.usage.input_tokens, m.usage.output_tokens])
print(json.dumps(out))
"#;
    let cluster = Cluster::start().await;
    // Its text a word every 50 ms: a client can leave a stream before its last usage.
    let claude = Mock::start_with("claude", &["claude-up"], &["--chunk-interval", "50ms"]).await;
    let (_, key) = cluster.create_key("searching", &[]).await;
    let key_id = cluster.client_key("searching").await.id;
    add_priced_claude(&cluster, &claude).await;
    cluster
        .sluicectl(&[
            "backend",
            "update",
            "claude",
            "--model",
            "claude:claude-up",
            "--call-price",
            "claude:web_search=10",
            "--call-price",
            "claude:web_fetch=0",
        ])
        .await;
    let shown = cluster.sluicectl(&["backend", "get", "claude"]).await;
    assert!(
        shown.contains(" web_search=10") && !shown.contains("web_fetch"),
        "{shown}"
    );
    let proxy = cluster.proxy().await;
    let answers = python(SEARCHES, &[&proxy.url(""), &key]).await;
    let answers = answers.as_array().unwrap();
    let searches: Vec<u64> = answers.iter().map(|a| a[0].as_u64().unwrap()).collect();
    assert_eq!(searches, [3, 3, 0, 0, 0, 0], "{answers:?}");
    // $3 in and $15 out a million tokens; a search a cent (10,000,000 nano-units).
    let billed: u64 = answers
        .iter()
        .map(|a| {
            a[0].as_u64().unwrap() * 10_000_000
                + a[1].as_u64().unwrap() * 3_000
                + a[2].as_u64().unwrap() * 15_000
        })
        .sum();
    spent(&cluster, &key_id, billed).await;

    // A client that leaves its stream as the text starts, before the usage that counts the
    // searches, is charged the three its stream showed.
    const LEAVES: &str = r#"
import sys, anthropic
base, key = sys.argv[1:3]
c = anthropic.Anthropic(base_url=base, api_key=key, max_retries=0)
search = {"type": "web_search_20250305", "name": "web_search", "max_uses": 3}
with c.messages.stream(model="claude", max_tokens=64, tools=[search],
                       messages=[{"role": "user", "content": "hello there"}]) as s:
    for event in s:
        if event.type == "text":
            break
print("{}")
"#;
    let (_, leaving) = cluster.create_key("leaving", &[]).await;
    let leaving_id = cluster.client_key("leaving").await.id;
    python(LEAVES, &[&proxy.url(""), &leaving]).await;
    let spend = || async { (cluster.client_key(&leaving_id).await.spend * 1e9).round() as u64 };
    eventually(
        Duration::from_secs(30),
        "the stream left is charged",
        || async { spend().await > 0 },
    )
    .await;
    // Three searches, and its tokens (estimated: a few thousand nano-units each).
    let charged = spend().await;
    assert!(
        (3 * 10_000_000..3 * 10_000_000 + 1_000_000).contains(&charged),
        "{charged}"
    );
}

/// The usage totals, once the key `key_id` has been charged exactly `billed` nano-units (the
/// provider's bill for what the test sent).
async fn spent(cluster: &Cluster, key_id: &str, billed: u64) -> pb::GetTotalsResponse {
    eventually(
        Duration::from_secs(30),
        "the key's spend is the provider's bill",
        || async { (cluster.client_key(key_id).await.spend * 1e9).round() as u64 == billed },
    )
    .await;
    cluster.totals().await
}

/// The mock `claude` as an Anthropic backend added with `sluicectl`, its provider key from the
/// environment as an operator gives it, and Claude Sonnet's prices with a cache write price:
/// model `claude` at $3 in, $0.30 cached, $3.75 written to the cache and $15 out a million
/// tokens.
async fn add_priced_claude(cluster: &Cluster, claude: &Mock) {
    let added = tokio::process::Command::new(sluice_e2e::process::workspace_bin("sluicectl"))
        .args(["--endpoint", &cluster.control_url()])
        .args([
            "--token",
            common::ADMIN_TOKEN,
            "backend",
            "add",
            "--name",
            "claude",
        ])
        .args([
            "--base-url",
            &claude.base_url(),
            "--api-format",
            "anthropic",
        ])
        .args([
            "--model",
            "claude:claude-up:3/0.3/3.75:15",
            "--api-key-env",
            "KEY",
        ])
        .env("KEY", claude.api_key.clone().unwrap())
        .output()
        .await
        .unwrap();
    assert!(added.status.success(), "{added:?}");
}
