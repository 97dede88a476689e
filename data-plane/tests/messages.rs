//! Anthropic's Messages API in front (`/v1/messages`, `/v1/messages/count_tokens`), against the
//! strict Anthropic mock and the OpenAI mock: passed through byte for byte to an Anthropic
//! backend, translated for an OpenAI-format one, errors in Anthropic's shape, failover between
//! the two within one request, and usage records that say which API the client used.

use crate::support;

use serde_json::{Value, json};
use sluice_e2e::mock::{Fault, MockConfig, MockServer};
use sluice_proto::v1::{self as proto, ErrorKind};
use support::harness::*;

const VERSION: &str = "2023-06-01";
const BETA: &str = "context-management-2025-06-27,fine-grained-tool-streaming-2025-05-14";

fn mock(name: &str) -> MockServer {
    MockServer::start_local(
        MockConfig::named(name)
            .with_api_key(format!("sk-upstream-{name}"))
            .with_chunk_count(3),
    )
    .unwrap()
}

fn anthropic(id: &str, base_url: &str, pool: proto::Pool) -> proto::SnapshotBackend {
    proto::SnapshotBackend {
        api_format: proto::ApiFormat::Anthropic as i32,
        ..backend(id, base_url, pool, 0)
    }
}

/// `MODEL` on an Anthropic backend (`claude`), `gpt-only` on an OpenAI-format one (`gpt`).
fn claude_and_gpt_only(claude: &MockServer, gpt: &MockServer) -> proto::Snapshot {
    let mut snap = snapshot(
        1,
        vec![
            anthropic("claude", &claude.base_url(), proto::Pool::Primary),
            backend("gpt", &gpt.base_url(), proto::Pool::Primary, 0),
        ],
    );
    snap.backends[1].models[0].name = "gpt-only".into();
    snap
}

/// A Messages request as an Anthropic client sends it: `x-api-key`, its version and betas.
/// One Anthropic backend, `claude`.
fn claude_alone(claude: &MockServer) -> proto::Snapshot {
    snapshot(
        1,
        vec![anthropic(
            "claude",
            &claude.base_url(),
            proto::Pool::Primary,
        )],
    )
}

/// A data plane routing to one Anthropic backend, `claude`.
async fn claude_only(claude: &MockServer) -> Harness {
    Harness::start(claude_alone(claude)).await
}

async fn send(h: &Harness, path: &str, body: &str) -> reqwest::Response {
    h.http
        .post(h.url(path))
        .header("x-api-key", KEY)
        .header("anthropic-version", VERSION)
        .header("anthropic-beta", BETA)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap()
}

fn hello(stream: bool) -> String {
    json!({"model": MODEL, "max_tokens": 64, "stream": stream,
           "messages": [{"role": "user", "content": "hello there"}]})
    .to_string()
}

/// Claude Code names its session in `metadata.user_id`: every turn of a session goes to one
/// Anthropic backend, whichever replica takes it (Anthropic caches prompts per organisation:
/// a session spread over backends of two organisations writes its cache again at each
/// switch, at 1.25 times the input price), and different sessions still spread.
#[tokio::test]
async fn a_claude_code_session_keeps_to_one_backend_on_every_replica() {
    let (one, two) = (mock("one"), mock("two"));
    let pair = || {
        snapshot(
            1,
            vec![
                anthropic("one", &one.base_url(), proto::Pool::Primary),
                anthropic("two", &two.base_url(), proto::Pool::Primary),
            ],
        )
    };
    let replicas = [Harness::start(pair()).await, Harness::start(pair()).await];
    let mut holders = std::collections::BTreeSet::new();
    for n in 0..8 {
        let user_id =
            format!("user_5c1f_account_8d2e_session_0197c3aa-{n:04}-7d2e-9b8a-3f2c1e0d4b5a");
        let mut served_by = std::collections::BTreeSet::new();
        for turn in 0..6 {
            let body = json!({"model": MODEL, "max_tokens": 64, "stream": turn % 2 == 1,
                "metadata": {"user_id": user_id},
                "messages": [{"role": "user", "content": "hello there"}]});
            let response = send(&replicas[turn % 2], "/v1/messages", &body.to_string()).await;
            assert_eq!(response.status(), 200);
            served_by.insert(backend_name(&response));
        }
        assert_eq!(served_by.len(), 1, "{user_id}: {served_by:?}");
        holders.extend(served_by);
    }
    assert_eq!(holders.len(), 2, "{holders:?}");
}

/// A path or a method served nowhere, asked by an Anthropic client (it names an
/// `anthropic-version`), is answered in Anthropic's error shape, as its other errors are: the
/// SDKs showed OpenAI's whole JSON as the message.
#[tokio::test]
async fn paths_and_methods_served_nowhere_answer_anthropic_clients_in_their_shape() {
    let claude = mock("claude");
    let h = Harness::start(snapshot(
        1,
        vec![anthropic(
            "claude",
            &claude.base_url(),
            proto::Pool::Primary,
        )],
    ))
    .await;
    let ask = |method: reqwest::Method, path: &str| {
        h.http
            .request(method, h.url(path))
            .header("anthropic-version", "2023-06-01")
            .header("x-api-key", KEY)
            .send()
    };
    let (status, kind, _) =
        anthropic_error(ask(reqwest::Method::GET, "/v1/messages").await.unwrap()).await;
    assert_eq!((status, kind.as_str()), (405, "invalid_request_error"));
    let (status, kind, _) = anthropic_error(
        ask(reqwest::Method::POST, "/v1/messages/batches")
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, kind.as_str()), (404, "not_found_error"));
}

/// The Anthropic error a response carries, with its status.
async fn anthropic_error(response: reqwest::Response) -> (u16, String, Value) {
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["type"], "error", "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
    (
        status,
        body["error"]["type"].as_str().unwrap().to_owned(),
        body,
    )
}

/// The `event:` names of an Anthropic stream, in order.
fn event_names(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .map(str::to_owned)
        .collect()
}

fn event_data(body: &str) -> Vec<Value> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

#[tokio::test]
async fn an_anthropic_backend_gets_the_request_and_the_client_the_stream_as_they_came() {
    let claude = mock("claude");
    let h = claude_only(&claude).await;
    // Fields Sluice has no reason to know, in an order of the client's choosing, compact.
    let body = |stream: bool| {
        format!(
            r#"{{"max_tokens":64,"model":"{MODEL}","messages":[{{"role":"user","content":[{{"type":"text","text":"hello there","cache_control":{{"type":"ephemeral"}}}}]}}],"thinking":{{"type":"enabled","budget_tokens":1024}},"context_management":{{"edits":[{{"type":"clear_tool_uses_20250919"}}]}},"output_config":{{"effort":"high"}},"metadata":{{"user_id":"u-1"}},"stream":{stream}}}"#
        )
    };
    // The SDKs' beta clients post to `?beta=true`: the query goes along.
    for (n, (stream, path)) in [(false, "/v1/messages"), (true, "/v1/messages?beta=true")]
        .into_iter()
        .enumerate()
    {
        let sent = body(stream);
        let response = send(&h, path, &sent).await;
        assert_eq!(response.status(), 200, "stream {stream}");
        let content_type = response.headers()["content-type"]
            .to_str()
            .unwrap()
            .to_owned();
        assert_eq!(content_type.starts_with("text/event-stream"), stream);
        let received = response.text().await.unwrap();

        let upstream = claude.last_messages().unwrap();
        assert_eq!(upstream.path, path);
        // The body byte for byte, but for the model the route names.
        assert_eq!(
            upstream.body,
            sent.replace(
                &format!(r#""model":"{MODEL}""#),
                &format!(r#""model":"{MODEL}-at-claude""#)
            )
        );
        assert_eq!(upstream.header("anthropic-beta"), Some(BETA));
        assert_eq!(upstream.header("anthropic-version"), Some(VERSION));
        // The backend's key, never the client's.
        assert_eq!(upstream.header("x-api-key"), Some("sk-upstream-claude"));
        assert_eq!(upstream.header("authorization"), None);
        // The answer byte for byte.
        assert_eq!(received, upstream.answer, "stream {stream}");

        let record = h.records(n + 1).await.remove(n);
        assert_eq!(record.endpoint, proto::Endpoint::Messages as i32);
        assert_eq!(record.model, MODEL);
        assert_eq!(record.backend_id, "claude");
        assert_eq!(record.stream, stream);
        assert_eq!(record.status_code, 200);
        assert_eq!(record.error_kind, ErrorKind::Unspecified as i32);
        // The words of "hello there", and one token per word of the mock's three.
        assert_eq!((record.prompt_tokens, record.completion_tokens), (2, 3));
    }
    let stats = claude.stats();
    assert_eq!(stats.prompt_tokens, 4);
    assert_eq!(stats.completion_tokens, 6);
}

#[tokio::test]
async fn a_header_sent_on_several_lines_reaches_the_backend_whole() {
    let claude = mock("claude");
    let h = claude_only(&claude).await;
    let response = h
        .http
        .post(h.url("/v1/messages"))
        .header("x-api-key", KEY)
        .header("anthropic-version", VERSION)
        .header("anthropic-beta", "context-management-2025-06-27")
        .header("anthropic-beta", "fine-grained-tool-streaming-2025-05-14")
        .header("content-type", "application/json")
        .body(hello(false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let upstream = claude.last_messages().unwrap();
    let betas: Vec<&str> = upstream
        .headers
        .iter()
        .filter(|(n, _)| n == "anthropic-beta")
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(
        betas,
        [
            "context-management-2025-06-27",
            "fine-grained-tool-streaming-2025-05-14"
        ]
    );
    assert_eq!(upstream.header("anthropic-version"), Some(VERSION));
}

#[tokio::test]
async fn without_an_anthropic_version_the_backend_gets_its_configured_one() {
    let claude = mock("claude");
    let h = Harness::start(snapshot(
        1,
        vec![proto::SnapshotBackend {
            anthropic_version: "2099-01-01".into(),
            ..anthropic("claude", &claude.base_url(), proto::Pool::Primary)
        }],
    ))
    .await;
    // A client of the newest SDKs: the key as a bearer token, no version header.
    let response = h
        .post(
            "/v1/messages",
            KEY,
            &serde_json::from_str(&hello(false)).unwrap(),
        )
        .await;
    assert_eq!(response.status(), 200);
    let upstream = claude.last_messages().unwrap();
    assert_eq!(upstream.header("anthropic-version"), Some("2099-01-01"));
    assert_eq!(upstream.header("anthropic-beta"), None);
}

/// API version 2026-10-21 (the default, what the current SDKs send) refuses `temperature`,
/// `top_p` and `top_k`, even at their defaults (the mock as Anthropic: 400 "Extra inputs are
/// not permitted"). A chat client's sampling parameters, which most chat clients send, are left
/// out of its translated request there, and sent to a backend configured with an older
/// version, which takes them.
#[tokio::test]
async fn a_chat_clients_sampling_parameters_go_only_to_versions_that_take_them() {
    let claude = mock("claude");
    let chat = json!({"model": MODEL, "temperature": 0.2, "top_p": 1,
                      "messages": [{"role": "user", "content": "hi"}]});
    for (version, sent) in [("", None), ("2026-10-21", None), ("2023-06-01", Some(0.2))] {
        let h = Harness::start(snapshot(
            1,
            vec![proto::SnapshotBackend {
                anthropic_version: version.into(),
                ..anthropic("claude", &claude.base_url(), proto::Pool::Primary)
            }],
        ))
        .await;
        for stream in [false, true] {
            let mut body = chat.clone();
            body["stream"] = json!(stream);
            // Out of the shape too (`n: 1`): written through the values.
            for n in [None, Some(1)] {
                if let Some(n) = n {
                    body["n"] = json!(n);
                }
                let response = h.chat(body.clone()).await;
                assert_eq!(response.status(), 200, "{version} {stream} {n:?}");
                let _ = response.text().await.unwrap();
                let upstream = claude.last_messages().unwrap();
                let sent_body: Value = serde_json::from_str(&upstream.body).unwrap();
                assert_eq!(
                    upstream.header("anthropic-version"),
                    Some(if version.is_empty() {
                        "2026-10-21"
                    } else {
                        version
                    })
                );
                assert_eq!(sent_body["temperature"].as_f64(), sent, "{sent_body}");
                assert!(sent_body.get("top_p").is_none(), "{sent_body}");
            }
        }
    }
}

/// A chat client's history as the OpenAI API takes it reaches Claude as turns Claude takes
/// (the strict mock refuses what Anthropic refuses): a system message mid-conversation (only
/// Opus 4.8 takes `role: "system"` turns, and only after a user turn), an empty answer sent
/// back (Claude answers empty `end_turn`s after tool results, and the client keeps them), a
/// refusal sent back (`content: null`), whitespace alone. Each was a 400 at every later turn
/// of the conversation. Written from the text and through the values (`n: 1`) alike.
#[tokio::test]
async fn a_chat_clients_history_reaches_claude_as_turns_claude_takes() {
    let claude = mock("claude");
    let h = claude_only(&claude).await;
    let user = |text: &str| json!({"role": "user", "content": text});
    let hi_and = |answer: Value| vec![user("Hi"), answer, user("Again")];
    let calls = json!([{"id": "call_1", "type": "function",
                        "function": {"name": "ls", "arguments": "{}"}}]);
    let histories = [
        (
            "a system message mid-conversation",
            vec![
                user("Hi"),
                json!({"role": "assistant", "content": "Hello"}),
                json!({"role": "developer", "content": "Now answer in French."}),
                user("Bye"),
            ],
        ),
        (
            "an empty answer",
            hi_and(json!({"role": "assistant", "content": ""})),
        ),
        (
            "a refusal",
            hi_and(
                json!({"role": "assistant", "content": null, "refusal": "I can't help with that."}),
            ),
        ),
        (
            "whitespace alone",
            hi_and(json!({"role": "assistant", "content": "\n\n"})),
        ),
        (
            "a blank tool result",
            vec![
                user("List it."),
                json!({"role": "assistant", "content": null, "tool_calls": calls}),
                json!({"role": "tool", "tool_call_id": "call_1", "content": " "}),
                user(" "),
            ],
        ),
    ];
    for (case, messages) in histories {
        for n in [None, Some(1)] {
            let mut body = json!({"model": MODEL, "messages": messages});
            if let Some(n) = n {
                body["n"] = json!(n);
            }
            let response = h.chat(body).await;
            let status = response.status();
            let answer = response.text().await.unwrap();
            assert_eq!(status, 200, "{case} ({n:?}): {answer}");
            let sent: Value = serde_json::from_str(&claude.last_messages().unwrap().body).unwrap();
            let turns = sent["messages"].as_array().unwrap();
            assert!(
                turns.iter().all(|t| t["role"] != "system"),
                "{case}: {sent}"
            );
            match case {
                "a system message mid-conversation" => assert_eq!(
                    sent["system"],
                    json!([{"type": "text", "text": "Now answer in French."}]),
                    "{case}"
                ),
                "a refusal" => assert_eq!(
                    turns[1],
                    json!({"role": "assistant", "content": [{"type": "text", "text": "I can't help with that."}]}),
                    "{case}"
                ),
                _ => {}
            }
        }
    }

    // An image labelled as browsers label JPEGs (`image/jpg`), which Anthropic refuses, goes
    // with the type its bytes say.
    let image = json!({"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/jpg;base64,/9j/4AAQSkZJRgABAQ=="}},
    ]}]});
    let response = h.chat(image).await;
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    let sent: Value = serde_json::from_str(&claude.last_messages().unwrap().body).unwrap();
    assert_eq!(
        sent["messages"][0]["content"][0]["source"]["media_type"],
        "image/jpeg"
    );

    // Ending with a blank message after an assistant's: Anthropic would continue that
    // assistant message; refused by Sluice, from the text and through the values alike.
    for n in [None, Some(1)] {
        let mut body = json!({"model": MODEL, "messages": [user("Hi"),
            json!({"role": "assistant", "content": "Hello!"}), user(" ")]});
        if let Some(n) = n {
            body["n"] = json!(n);
        }
        let response = h.chat(body).await;
        assert_eq!(response.status(), 400, "{n:?}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["param"], "messages", "{error}");
    }

    // Nothing but system messages: nothing Anthropic takes, said by Sluice.
    let response = h
        .chat(
            json!({"model": MODEL, "messages": [{"role": "system", "content": "Write a haiku."}]}),
        )
        .await;
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("at least one user or assistant message"),
        "{error}"
    );
}

#[tokio::test]
async fn an_openai_backend_answers_a_messages_client_in_anthropic_shape() {
    let gpt = mock("gpt");
    let h = Harness::start(snapshot(
        1,
        vec![backend("gpt", &gpt.base_url(), proto::Pool::Primary, 0)],
    ))
    .await;

    let response = send(&h, "/v1/messages", &hello(false)).await;
    assert_eq!(response.status(), 200);
    let message: Value = response.json().await.unwrap();
    assert_eq!(message["type"], "message");
    assert_eq!(message["role"], "assistant");
    assert!(
        message["id"].as_str().unwrap().starts_with("msg_"),
        "{message}"
    );
    assert_eq!(
        message["content"],
        json!([{"type": "text", "text": "[gpt] tok1 tok2"}])
    );
    assert_eq!(message["stop_reason"], "end_turn");
    assert_eq!(message["usage"]["input_tokens"], 2);
    assert_eq!(message["usage"]["output_tokens"], 3);
    // It went to the chat completions endpoint, translated.
    assert_eq!(gpt.stats().requests.chat_completions, 1);

    let response = send(&h, "/v1/messages", &hello(true)).await;
    assert_eq!(response.status(), 200);
    let body = response.text().await.unwrap();
    let mut names = event_names(&body);
    names.dedup();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ],
        "{body}"
    );
    let data = event_data(&body);
    let text: String = data
        .iter()
        .filter_map(|d| d.pointer("/delta/text").and_then(Value::as_str))
        .collect();
    assert_eq!(text, "[gpt] tok1 tok2");
    let delta = &data[data.len() - 2];
    assert_eq!(delta["delta"]["stop_reason"], "end_turn");
    assert_eq!(delta["usage"]["output_tokens"], 3);
    assert_eq!(delta["usage"]["input_tokens"], 2);

    let records = h.records(2).await;
    for (record, stream) in records.iter().zip([false, true]) {
        assert_eq!(record.endpoint, proto::Endpoint::Messages as i32);
        assert_eq!(record.stream, stream);
        assert_eq!((record.prompt_tokens, record.completion_tokens), (2, 3));
    }
    let stats = gpt.stats();
    assert_eq!((stats.prompt_tokens, stats.completion_tokens), (4, 6));
}

/// Claude Code names an MCP server's tools `mcp__<server>__<tool>`: past OpenAI's 64
/// characters for a server named by a UUID, where Anthropic takes 128. Through an OpenAI
/// backend (the mock refuses such a name as OpenAI does, a 400 for the whole request), the
/// session works: the tool is called by the client's own name, whole and streamed, and the
/// next turn, which carries that call, goes through too.
#[tokio::test]
async fn a_tool_named_past_openais_64_characters_is_called_by_its_own_name() {
    let gpt = mock("gpt");
    let h = Harness::start(snapshot(
        1,
        vec![backend("gpt", &gpt.base_url(), proto::Pool::Primary, 0)],
    ))
    .await;
    let long = "mcp__8b383b1d-b46a-4b70-994c-c7c26b866287__check_domain_availability_and_price";
    let twin = "mcp__8b383b1d-b46a-4b70-994c-c7c26b866287__check_domain_availability_and_renew";
    let schema = json!({"type": "object", "properties": {"domain": {"type": "string"}}});
    let tools = json!([
        {"name": "Read", "input_schema": {"type": "object"}},
        {"name": twin, "input_schema": schema},
        {"name": long, "input_schema": schema},
    ]);
    let request = |stream: bool, messages: Value| {
        json!({"model": MODEL, "max_tokens": 64, "stream": stream, "tools": tools,
               "tool_choice": {"type": "tool", "name": long}, "messages": messages})
        .to_string()
    };
    let ask = json!([{"role": "user", "content": "Is example.com free?"}]);

    let response = send(&h, "/v1/messages", &request(false, ask.clone())).await;
    assert_eq!(response.status(), 200);
    let message: Value = response.json().await.unwrap();
    let call = &message["content"][0];
    assert_eq!(call["type"], "tool_use", "{message}");
    assert_eq!(call["name"], long, "{message}");
    assert_eq!(call["input"], json!({"domain": "mock"}));

    let response = send(&h, "/v1/messages", &request(true, ask.clone())).await;
    assert_eq!(response.status(), 200);
    let body = response.text().await.unwrap();
    let started: Vec<Value> = event_data(&body)
        .into_iter()
        .filter(|d| d["type"] == "content_block_start")
        .collect();
    assert_eq!(started.len(), 1, "{body}");
    assert_eq!(started[0]["content_block"]["type"], "tool_use", "{body}");
    assert_eq!(started[0]["content_block"]["name"], long, "{body}");

    // The next turn carries the call and its result.
    let id = call["id"].as_str().unwrap();
    let mut next = ask.as_array().unwrap().clone();
    next.push(json!({"role": "assistant", "content": [call]}));
    next.push(json!({"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": id, "content": "free"}]}));
    let response = send(&h, "/v1/messages", &request(false, Value::from(next))).await;
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    assert_eq!(gpt.stats().requests.chat_completions, 3);
}

/// Clients read the prompt's size from `message_start` alone (the AI SDK's `inputTokens`,
/// Claude Code's progress and context display) and only the output from `message_delta`. A
/// stream translated from an OpenAI-format backend says the input the backend's first chunk
/// reports, cache counts apart, when it reports one (Gemini's endpoint sends usage in every
/// chunk); else Sluice's estimate of the prompt (a token per 4 bytes of the body), not 0.
/// `message_delta` says the backend's figures either way.
#[tokio::test]
async fn a_translated_streams_message_start_says_the_input() {
    let gpt = mock("gpt");
    let h = Harness::start(snapshot(
        1,
        vec![backend("gpt", &gpt.base_url(), proto::Pool::Primary, 0)],
    ))
    .await;
    let start_and_delta = |body: &str| {
        let data = event_data(body);
        let start = data.iter().find(|d| d["type"] == "message_start").cloned();
        let delta = data.iter().find(|d| d["type"] == "message_delta").cloned();
        (
            start.unwrap()["message"]["usage"].clone(),
            delta.unwrap()["usage"].clone(),
        )
    };

    // The mock reports usage only at the end: the estimate.
    let request = hello(true);
    let response = send(&h, "/v1/messages", &request).await;
    assert_eq!(response.status(), 200);
    let (start, delta) = start_and_delta(&response.text().await.unwrap());
    let estimate = request.len().div_ceil(4) as u64;
    assert_eq!(start["input_tokens"], estimate, "{start}");
    assert_eq!(start["output_tokens"], 0, "{start}");
    assert_eq!(delta["input_tokens"], 2, "{delta}");

    // Usage in the first chunk: its input, less the cached prompt.
    let stream = concat!(
        r#"data: {"choices":[{"delta":{"content":"1","role":"assistant"},"index":0}],"id":"x","model":"g","object":"chat.completion.chunk","usage":{"completion_tokens":1,"prompt_tokens":900,"prompt_tokens_details":{"cached_tokens":600},"total_tokens":901}}"#,
        "\n\n",
        r#"data: {"choices":[{"delta":{"content":", 2"},"finish_reason":"stop","index":0}],"id":"x","model":"g","object":"chat.completion.chunk","usage":{"completion_tokens":3,"prompt_tokens":900,"prompt_tokens_details":{"cached_tokens":600},"total_tokens":903}}"#,
        "\n\n",
        "data: [DONE]\n\n",
    );
    gpt.set_faults(vec![
        Fault::Body {
            code: 200,
            body: stream.into(),
        }
        .times(1),
    ]);
    let response = send(&h, "/v1/messages", &request).await;
    assert_eq!(response.status(), 200);
    let (start, delta) = start_and_delta(&response.text().await.unwrap());
    assert_eq!(start["input_tokens"], 300, "{start}");
    assert_eq!(start["cache_read_input_tokens"], 600, "{start}");
    assert_eq!(start["output_tokens"], 1, "{start}");
    assert_eq!(
        (&delta["input_tokens"], &delta["output_tokens"]),
        (&json!(300), &json!(3)),
        "{delta}"
    );
}

#[tokio::test]
async fn sluice_own_errors_reach_messages_clients_in_anthropic_shape() {
    let claude = mock("claude");
    let mut snap = claude_alone(&claude);
    snap.client_keys
        .push(client_key("limited", "sk-limited", &[], 1));
    let h = Harness::start(snap).await;

    // A bad key, by either header.
    let response = h
        .http
        .post(h.url("/v1/messages"))
        .header("x-api-key", "sk-wrong")
        .body(hello(false))
        .send()
        .await
        .unwrap();
    assert_eq!(anthropic_error(response).await.1, "authentication_error");
    let response = h
        .post(
            "/v1/messages",
            "sk-wrong",
            &serde_json::from_str(&hello(false)).unwrap(),
        )
        .await;
    let (status, kind, _) = anthropic_error(response).await;
    assert_eq!((status, kind.as_str()), (401, "authentication_error"));

    let cases = [
        ("{not json", 400, "invalid_request_error"),
        (r#"{"max_tokens": 5}"#, 400, "invalid_request_error"),
        (
            r#"{"model": "nope", "max_tokens": 5, "messages": []}"#,
            404,
            "not_found_error",
        ),
    ];
    for (body, status, kind) in cases {
        let (got, got_kind, error) = anthropic_error(send(&h, "/v1/messages", body).await).await;
        assert_eq!((got, got_kind.as_str()), (status, kind), "{body}: {error}");
    }

    // The key's own rate limit: 429 rate_limit_error with retry-after.
    let limited = |h: &Harness| {
        h.http
            .post(h.url("/v1/messages"))
            .header("x-api-key", "sk-limited")
            .body(hello(false))
            .send()
    };
    assert_eq!(limited(&h).await.unwrap().status(), 200);
    let response = limited(&h).await.unwrap();
    assert!(response.headers().contains_key("retry-after"));
    let (status, kind, _) = anthropic_error(response).await;
    assert_eq!((status, kind.as_str()), (429, "rate_limit_error"));

    // A spent budget: 429 rate_limit_error that the SDKs are told not to retry.
    let mut spent = client_key("spent", "sk-spent", &[], 0);
    spent.budget_spent = true;
    spent.max_budget = 5.0;
    let mut snap = snapshot(
        2,
        vec![proto::SnapshotBackend {
            rpm_limit: 1,
            ..anthropic("claude", &claude.base_url(), proto::Pool::Primary)
        }],
    );
    snap.client_keys.push(spent);
    h.publish(snap).await;
    let response = h
        .post(
            "/v1/messages",
            "sk-spent",
            &serde_json::from_str(&hello(false)).unwrap(),
        )
        .await;
    assert_eq!(response.headers()["x-should-retry"], "false");
    let (status, kind, error) = anthropic_error(response).await;
    assert_eq!(
        (status, kind.as_str()),
        (429, "rate_limit_error"),
        "{error}"
    );

    // Every backend out of rate tokens: 429 rate_limit_error with retry-after.
    let responses = [
        send(&h, "/v1/messages", &hello(false)).await,
        send(&h, "/v1/messages", &hello(false)).await,
    ];
    let [first, second] = responses;
    assert_eq!(first.status(), 200);
    assert!(second.headers().contains_key("retry-after"));
    let (status, kind, _) = anthropic_error(second).await;
    assert_eq!((status, kind.as_str()), (429, "rate_limit_error"));
}

#[tokio::test]
async fn upstream_errors_reach_messages_clients_in_anthropic_shape() {
    let claude = mock("claude");
    let gpt = mock("gpt");
    let mut snap = claude_and_gpt_only(&claude, &gpt);
    snap.settings.as_mut().unwrap().max_attempts = 1;
    let h = Harness::start(snap).await;

    // Anthropic's 529 reaches the client as it came: its SDK raises OverloadedError.
    claude.set_fault(Fault::status(529).times(1));
    let (status, kind, _) = anthropic_error(send(&h, "/v1/messages", &hello(false)).await).await;
    assert_eq!((status, kind.as_str()), (529, "overloaded_error"));

    // An OpenAI backend's 503 and 400 in Anthropic's shape.
    let to_gpt = |stream: bool| {
        json!({"model": "gpt-only", "max_tokens": 64, "stream": stream,
               "messages": [{"role": "user", "content": "hello there"}]})
        .to_string()
    };
    gpt.set_fault(Fault::status(503).times(1));
    let (status, kind, _) = anthropic_error(send(&h, "/v1/messages", &to_gpt(false)).await).await;
    assert_eq!((status, kind.as_str()), (503, "overloaded_error"));
    // A prompt past the model's context, in Anthropic's words, which Claude Code compacts
    // the conversation on; in OpenAI's code or in vLLM's words alike. Another 400 keeps its own.
    let overflow = "This model's maximum context length is 131072 tokens. However, you requested 140210 tokens (132210 in the messages, 8000 in the completion).";
    for body in [
        json!({"error": {"message": overflow, "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}}),
        json!({"object": "error", "message": overflow, "type": "BadRequestError", "param": null, "code": 400}),
    ] {
        gpt.set_fault(
            Fault::Body {
                code: 400,
                body: body.to_string(),
            }
            .times(1),
        );
        let (status, kind, error) =
            anthropic_error(send(&h, "/v1/messages", &to_gpt(false)).await).await;
        assert_eq!((status, kind.as_str()), (400, "invalid_request_error"));
        assert_eq!(
            error["error"]["message"].as_str(),
            Some(format!("prompt is too long: {overflow}").as_str()),
            "{error}"
        );
    }
    gpt.set_fault(
        Fault::Body {
            code: 400,
            body: json!({"error": {"message": "Invalid value for 'temperature'.", "type": "invalid_request_error", "param": "temperature", "code": "invalid_value"}}).to_string(),
        }
        .times(1),
    );
    let (status, _, error) = anthropic_error(send(&h, "/v1/messages", &to_gpt(false)).await).await;
    assert_eq!(status, 400);
    assert_eq!(
        error["error"]["message"],
        "Invalid value for 'temperature'."
    );

    // A stream the Anthropic backend breaks: its error event is passed on and ends it.
    claude.set_fault(Fault::CutAfterChunks(3).times(1));
    let response = send(&h, "/v1/messages", &hello(true)).await;
    assert_eq!(response.status(), 200);
    let body = response.text().await.unwrap();
    assert_eq!(event_names(&body).last().unwrap(), "error", "{body}");
    assert_eq!(
        event_data(&body).last().unwrap()["error"]["type"],
        "overloaded_error"
    );

    // A chat stream the OpenAI backend breaks: an Anthropic error event.
    gpt.set_fault(Fault::CutAfterChunks(2).times(1));
    let response = send(&h, "/v1/messages", &to_gpt(true)).await;
    assert_eq!(response.status(), 200);
    let body = response.text().await.unwrap();
    assert_eq!(event_names(&body).last().unwrap(), "error", "{body}");
    let last = event_data(&body).pop().unwrap();
    assert_eq!(last["type"], "error", "{body}");

    let records = h.records(7).await;
    assert!(
        records
            .iter()
            .all(|r| r.endpoint == proto::Endpoint::Messages as i32)
    );
    assert_eq!(records[5].error_kind, ErrorKind::StreamInterrupted as i32);
    assert_eq!(records[6].error_kind, ErrorKind::StreamInterrupted as i32);
}

/// Claude Code asks 32,000 or 64,000 output tokens, which gpt-4o (16,384 at most) refuses
/// with the whole request: a route's `max_output_tokens` lowers what a translated request
/// asks, both ways, and the answer ends at the cap as one cut by `max_tokens` does.
#[tokio::test]
async fn a_translated_request_asks_no_more_output_than_its_route_allows() {
    let claude = MockServer::start_local(
        MockConfig::named("claude")
            .with_api_key("sk-upstream-claude")
            .with_chunk_count(8),
    )
    .unwrap();
    let gpt = MockServer::start_local(
        MockConfig::named("gpt")
            .with_api_key("sk-upstream-gpt")
            .with_chunk_count(8),
    )
    .unwrap();
    let mut snap = claude_and_gpt_only(&claude, &gpt);
    snap.backends[0].models[0].max_output_tokens = 3;
    snap.backends[1].models[0].max_output_tokens = 3;
    let h = Harness::start(snap).await;
    let asked = json!({"model": "gpt-only", "max_tokens": 64_000,
        "messages": [{"role": "user", "content": "hello there"}]});
    let answer = send(&h, "/v1/messages", &asked.to_string()).await;
    assert_eq!(answer.status(), 200);
    let answer: Value = answer.json().await.unwrap();
    assert_eq!(answer["stop_reason"], "max_tokens", "{answer}");
    assert_eq!(answer["usage"]["output_tokens"], 3, "{answer}");
    let chat = h
        .chat(json!({"model": MODEL, "max_completion_tokens": 64_000,
            "messages": [{"role": "user", "content": "hello there"}]}))
        .await;
    assert_eq!(chat.status(), 200);
    let chat: Value = chat.json().await.unwrap();
    assert_eq!(chat["choices"][0]["finish_reason"], "length", "{chat}");
    assert_eq!(chat["usage"]["completion_tokens"], 3, "{chat}");
    // Asked less than the cap, as asked.
    let fewer = json!({"model": "gpt-only", "max_tokens": 2,
        "messages": [{"role": "user", "content": "hello there"}]});
    let answer: Value = send(&h, "/v1/messages", &fewer.to_string())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(answer["usage"]["output_tokens"], 2, "{answer}");
}

/// An OpenAI-format backend's whole answer a Messages client cannot be given (not JSON, or a
/// tool call whose arguments are not an object) is a 502 in Anthropic's shape, never a broken
/// message; the tokens its `usage` reports are recorded all the same, as the backend may have
/// charged for them; and the next answer is translated as ever.
#[tokio::test]
async fn an_answer_a_messages_client_cannot_be_given_is_a_502_and_its_usage_counts() {
    use sluice_e2e::mock::GarbageKind;
    let gpt = mock("gpt");
    let mut snap = snapshot(
        1,
        vec![backend("gpt", &gpt.base_url(), proto::Pool::Primary, 0)],
    );
    snap.settings.as_mut().unwrap().max_attempts = 1;
    let h = Harness::start(snap).await;

    for garbage in [GarbageKind::NotJson, GarbageKind::BadToolCall] {
        gpt.set_fault(Fault::Garbage(garbage).times(1));
        let response = send(&h, "/v1/messages", &hello(false)).await;
        // The backend generated it: the SDK is told not to ask again (each try billed, each
        // refused alike).
        assert_eq!(response.headers()["x-should-retry"], "false", "{garbage:?}");
        let (status, kind, body) = anthropic_error(response).await;
        assert_eq!(
            (status, kind.as_str()),
            (502, "api_error"),
            "{garbage:?}: {body}"
        );
    }
    let response = send(&h, "/v1/messages", &hello(false)).await;
    assert_eq!(response.status(), 200);
    let message: Value = response.json().await.unwrap();
    assert_eq!(message["type"], "message");

    let records = h.records(3).await;
    let statuses: Vec<u32> = records.iter().map(|r| r.status_code).collect();
    assert_eq!(statuses, [502, 502, 200]);
    let tokens: Vec<(u64, u64)> = records
        .iter()
        .map(|r| (r.prompt_tokens, r.completion_tokens))
        .collect();
    assert_eq!(tokens, [(0, 0), (5, 5), (2, 3)]);
    // The backend answered: the record says what went wrong, not that it could not be reached.
    let kinds: Vec<i32> = records.iter().map(|r| r.error_kind).collect();
    assert_eq!(
        kinds,
        [
            ErrorKind::UpstreamInvalid as i32,
            ErrorKind::UpstreamInvalid as i32,
            ErrorKind::Unspecified as i32
        ]
    );
}

#[tokio::test]
async fn an_overloaded_anthropic_backend_fails_over_to_an_openai_fallback_within_one_request() {
    let claude = mock("claude");
    claude.set_fault(Fault::status(529).always());
    let gpt = mock("gpt");
    let h = Harness::start(snapshot(
        1,
        vec![
            anthropic("claude", &claude.base_url(), proto::Pool::Primary),
            backend("gpt", &gpt.base_url(), proto::Pool::Fallback, 0),
        ],
    ))
    .await;
    for stream in [false, true] {
        let response = send(&h, "/v1/messages", &hello(stream)).await;
        assert_eq!(response.status(), 200, "stream {stream}");
        assert_eq!(response.headers()["x-sluice-backend"], "gpt-name");
        let body = response.text().await.unwrap();
        assert!(body.contains(&format!("{MODEL}-at-gpt")), "{body}");
        assert_eq!(body.contains("message_stop"), stream, "{body}");
    }
    assert!(claude.stats().responses_with(529) >= 1);
    assert_eq!(gpt.stats().requests.chat_completions, 2);
    let records = h.records(2).await;
    for record in &records {
        assert_eq!(record.endpoint, proto::Endpoint::Messages as i32);
        assert_eq!(record.backend_id, "gpt");
        assert_eq!((record.prompt_tokens, record.completion_tokens), (2, 3));
    }
    assert!(records[0].attempts >= 2, "{:?}", records[0]);
}

/// Anthropic answers an overloaded streamed request 200 and an `error` event, most often its
/// only one (what Claude Code, which always streams, meets of an overload). Nothing has
/// reached the client then: the attempt fails as a 529 does and the next backend answers,
/// for a Messages client and for a chat client alike. Committed at that event, the client
/// got the error and no other backend was tried. With no other backend, the client gets the
/// overload as the HTTP error it is (which the SDKs retry), not a 200 stream of one error.
/// Anthropic overloads one model while serving the others (an Opus outage, Sonnet and Haiku
/// answering): an overload counts towards that model's cooldown at the backend, as a 429
/// does, whether it is a 529 or a stream's first event. It cooled the whole backend, taking
/// its other models out, while the overloaded model was never skipped on its own.
#[tokio::test]
async fn an_overloaded_model_cools_that_model_alone_at_its_anthropic_backend() {
    let (claude, gpt) = (mock("claude"), mock("gpt"));
    let overloaded = format!("{MODEL}-at-claude");
    let mut snap = snapshot(
        1,
        vec![
            anthropic("claude", &claude.base_url(), proto::Pool::Primary),
            backend("gpt", &gpt.base_url(), proto::Pool::Fallback, 0),
        ],
    );
    // The Anthropic backend's other model, served there alone.
    snap.backends[0].models.push(proto::ModelRoute {
        name: "other".into(),
        upstream_name: "other-at-claude".into(),
        ..Default::default()
    });
    let h = Harness::start(snap).await;
    // Three overloads (the failure threshold), one of them a stream's first event, cool the
    // model at the Anthropic backend: the fourth request goes to the fallback at once.
    let first_event = Fault::CutAfterChunks(0);
    for (fault, stream, attempts) in [
        (Fault::status(529), false, "2"),
        (first_event, true, "2"),
        (Fault::status(529), false, "2"),
        (Fault::status(529), false, "1"),
    ] {
        claude.set_fault(fault.always().for_model(&overloaded));
        let response = send(&h, "/v1/messages", &hello(stream)).await;
        assert_eq!(response.status(), 200, "stream {stream}");
        assert_eq!(response.headers()["x-sluice-backend"], "gpt-name");
        assert_eq!(response.headers()["x-sluice-attempts"], attempts);
        let _ = response.text().await.unwrap();
    }
    // The backend's other model is still served there.
    for stream in [false, true] {
        let body = json!({"model": "other", "max_tokens": 64, "stream": stream,
                          "messages": [{"role": "user", "content": "hi"}]});
        let response = send(&h, "/v1/messages", &body.to_string()).await;
        assert_eq!(response.status(), 200, "stream {stream}");
        assert_eq!(response.headers()["x-sluice-backend"], "claude-name");
        assert_eq!(response.headers()["x-sluice-attempts"], "1");
        let _ = response.text().await.unwrap();
    }
}

#[tokio::test]
async fn a_stream_whose_first_event_is_an_overload_fails_over() {
    let busy = mock("busy");
    busy.set_fault(Fault::CutAfterChunks(0).always());
    let other = mock("other");
    let h = Harness::start(snapshot(
        1,
        vec![
            anthropic("busy", &busy.base_url(), proto::Pool::Primary),
            anthropic("other", &other.base_url(), proto::Pool::Fallback),
        ],
    ))
    .await;
    let response = send(&h, "/v1/messages", &hello(true)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-sluice-backend"], "other-name");
    let body = response.text().await.unwrap();
    let names = event_names(&body);
    assert_eq!(
        names.last().map(String::as_str),
        Some("message_stop"),
        "{body}"
    );
    assert!(!names.iter().any(|n| n == "error"), "{body}");
    let response = h.chat(chat_body(true)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-sluice-backend"], "other-name");
    let body = response.text().await.unwrap();
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
    assert!(!body.contains("error"), "{body}");
    for record in h.records(2).await {
        assert_eq!(record.backend_id, "other");
        assert_eq!(record.attempts, 2, "{record:?}");
        assert_eq!(record.error_kind, ErrorKind::Unspecified as i32);
    }
    assert_eq!(busy.stats().requests.total(), 2);

    let h = Harness::start(snapshot(
        2,
        vec![anthropic("busy", &busy.base_url(), proto::Pool::Primary)],
    ))
    .await;
    let (status, kind, body) = anthropic_error(send(&h, "/v1/messages", &hello(true)).await).await;
    assert_eq!((status, kind.as_str()), (529, "overloaded_error"), "{body}");
}

/// A chat request an Anthropic backend cannot take (`n: 2`: Anthropic answers one choice)
/// goes to the OpenAI-format backend serving the same model, in either order of the two;
/// only when no backend can take it is the answer the translation's 400.
#[tokio::test]
async fn a_request_one_api_cannot_take_goes_to_a_backend_of_the_other() {
    let claude = mock("claude");
    let gpt = mock("gpt");
    let two_choices = json!({"model": MODEL, "n": 2,
                             "messages": [{"role": "user", "content": "hi"}]});
    for gpt_pool in [proto::Pool::Fallback, proto::Pool::Primary] {
        let h = Harness::start(snapshot(
            1,
            vec![
                anthropic("claude", &claude.base_url(), proto::Pool::Primary),
                backend("gpt", &gpt.base_url(), gpt_pool, 1),
            ],
        ))
        .await;
        let response = h.chat(two_choices.clone()).await;
        assert_eq!(response.status(), 200, "{gpt_pool:?}");
        assert_eq!(response.headers()["x-sluice-backend"], "gpt-name");
    }
    assert_eq!(claude.stats().requests.total(), 0);

    let h = claude_only(&claude).await;
    let response = h.chat(two_choices).await;
    assert_eq!(response.status(), 400);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["param"], "n", "{body}");
}

/// Counting a prompt's tokens is free at Anthropic, and not counted against its rate limits:
/// it takes nothing from a key's or a backend's tokens per minute. Kept charged (its answer
/// tells no usage), a few counts of a long conversation, as coding agents make, left the key
/// refused and the backend skipped for every key for minutes.
#[tokio::test]
async fn a_token_count_takes_nothing_from_the_tokens_per_minute() {
    let claude = mock("claude");
    for limit_the_key in [true, false] {
        let mut snap = snapshot(
            1,
            vec![anthropic(
                "claude",
                &claude.base_url(),
                proto::Pool::Primary,
            )],
        );
        // 600 TPM on one replica: a burst of 60, far less than the count's 4 KB body.
        if limit_the_key {
            snap.client_keys[0].tpm_limit = 600;
        } else {
            snap.backends[0].tpm_limit = 600;
        }
        let h = Harness::start(snap).await;
        let long =
            json!({"model": MODEL, "messages": [{"role": "user", "content": "word ".repeat(800)}]});
        for _ in 0..2 {
            let counted = send(&h, "/v1/messages/count_tokens", &long.to_string()).await;
            assert_eq!(counted.status(), 200, "key limited: {limit_the_key}");
        }
        let short = json!({"model": MODEL, "max_tokens": 16,
                           "messages": [{"role": "user", "content": "hi"}]});
        let answered = send(&h, "/v1/messages", &short.to_string()).await;
        assert_eq!(
            answered.status(),
            200,
            "key limited: {limit_the_key}: {}",
            answered.text().await.unwrap()
        );
    }
}

#[tokio::test]
async fn count_tokens_is_forwarded_to_anthropic_and_refused_for_openai_backends() {
    let claude = mock("claude");
    let gpt = mock("gpt");
    let h = Harness::start(claude_and_gpt_only(&claude, &gpt)).await;
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "one two three"}],
                      "thinking": {"type": "enabled", "budget_tokens": 1024}})
    .to_string();
    let response = send(&h, "/v1/messages/count_tokens", &body).await;
    assert_eq!(response.status(), 200);
    let received = response.text().await.unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&received).unwrap(),
        json!({"input_tokens": 3})
    );
    let upstream = claude.last_messages().unwrap();
    assert_eq!(upstream.path, "/v1/messages/count_tokens");
    assert_eq!(upstream.header("anthropic-beta"), Some(BETA));
    assert_eq!(upstream.answer, received);

    let body = json!({"model": "gpt-only", "messages": [{"role": "user", "content": "hi"}]});
    let (status, kind, error) =
        anthropic_error(send(&h, "/v1/messages/count_tokens", &body.to_string()).await).await;
    assert_eq!((status, kind.as_str()), (400, "invalid_request_error"));
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("count_tokens"),
        "{error}"
    );
    assert_eq!(gpt.stats().requests.chat_completions, 0);

    let records = h.records(2).await;
    for record in &records {
        assert_eq!(record.endpoint, proto::Endpoint::MessagesCountTokens as i32);
        assert_eq!((record.prompt_tokens, record.completion_tokens), (0, 0));
        assert_eq!(record.cost_nanos, 0);
    }
    assert_eq!(records[0].status_code, 200);
    assert_eq!(records[1].status_code, 400);
}

/// The records of two Messages requests passed through to `claude`, whose answers report
/// `usage`: a whole message, then a stream (`message_start`, one text block, `message_delta`
/// carrying `usage`, `message_stop`).
async fn records_of_answers_reporting(claude: &MockServer, usage: &str) -> Vec<proto::UsageRecord> {
    let h = Harness::start(claude_alone(claude)).await;
    let message = format!(
        r#"{{"id":"msg_1","type":"message","role":"assistant","model":"m","content":[{{"type":"text","text":"hi"}}],"stop_reason":"end_turn","stop_sequence":null,"usage":{usage}}}"#
    );
    let stream = format!(
        "event: message_start\ndata: {{\"type\":\"message_start\",\"message\":{{\"id\":\"msg_2\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"m\",\"content\":[],\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{{\"input_tokens\":10,\"output_tokens\":1}}}}}}\n\n\
         event: content_block_start\ndata: {{\"type\":\"content_block_start\",\"index\":0,\"content_block\":{{\"type\":\"text\",\"text\":\"\"}}}}\n\n\
         event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":\"hi\"}}}}\n\n\
         event: content_block_stop\ndata: {{\"type\":\"content_block_stop\",\"index\":0}}\n\n\
         event: message_delta\ndata: {{\"type\":\"message_delta\",\"delta\":{{\"stop_reason\":\"end_turn\",\"stop_sequence\":null}},\"usage\":{usage}}}\n\n\
         event: message_stop\ndata: {{\"type\":\"message_stop\"}}\n\n"
    );
    for (answer, stream) in [(message, false), (stream, true)] {
        claude.set_fault(
            Fault::Body {
                code: 200,
                body: answer,
            }
            .times(1),
        );
        let body = json!({"model": MODEL, "max_tokens": 8, "stream": stream,
                          "messages": [{"role": "user", "content": "hello there"}]});
        let response = send(&h, "/v1/messages", &body.to_string()).await;
        assert_eq!(response.status(), 200, "stream {stream}");
        response.text().await.unwrap();
    }
    let records = h.records(2).await;
    assert_eq!(
        records.iter().map(|r| r.stream).collect::<Vec<_>>(),
        [false, true]
    );
    records
}

/// A search that failed (past the tool's `max_uses`, say) streams its `server_tool_use`
/// block but is not billed: Anthropic's final `message_delta` counts the searches billed
/// (`server_tool_use.web_search_requests`), and a stream that reached it is charged that
/// count, as its whole answer is. A stream cut before it is charged the searches it showed.
#[tokio::test]
async fn a_streams_searches_are_charged_as_its_final_usage_counts_them() {
    let claude = mock("claude");
    let mut snap = claude_alone(&claude);
    // $10 per 1,000 searches: $0.01, 10^7 nano-units, a search; no token is priced.
    snap.backends[0].models[0].call_prices = vec![proto::CallPrice {
        tool: "web_search".into(),
        price_per_thousand_calls: 10.0,
    }];
    let h = Harness::start(snap).await;
    let event = |kind: &str, data: Value| format!("event: {kind}\ndata: {data}\n\n");
    let start = event(
        "message_start",
        json!({"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant", "model": "m", "content": [], "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": 10, "output_tokens": 1}}}),
    );
    let search = |index: u32, result: Value| {
        let id = format!("srvtoolu_{index}");
        [
            event(
                "content_block_start",
                json!({"type": "content_block_start", "index": index * 2, "content_block": {"type": "server_tool_use", "id": id, "name": "web_search", "input": {}}}),
            ),
            event(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": index * 2, "delta": {"type": "input_json_delta", "partial_json": "{\"query\":\"rust\"}"}}),
            ),
            event(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": index * 2}),
            ),
            event(
                "content_block_start",
                json!({"type": "content_block_start", "index": index * 2 + 1, "content_block": {"type": "web_search_tool_result", "tool_use_id": id, "content": result}}),
            ),
            event(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": index * 2 + 1}),
            ),
        ]
        .concat()
    };
    let searches = search(
        0,
        json!([{"type": "web_search_result", "url": "https://www.rust-lang.org", "title": "Rust", "encrypted_content": "e"}]),
    ) + &search(
        1,
        json!({"type": "web_search_tool_result_error", "error_code": "max_uses_exceeded"}),
    );
    let end = event(
        "message_delta",
        json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"input_tokens": 10, "output_tokens": 20, "server_tool_use": {"web_search_requests": 1}}}),
    ) + &event("message_stop", json!({"type": "message_stop"}));
    let whole = format!("{start}{searches}{end}");
    let cut = format!("{start}{searches}");
    for answer in [whole, cut] {
        claude.set_fault(
            Fault::Body {
                code: 200,
                body: answer,
            }
            .times(1),
        );
        let body = json!({"model": MODEL, "max_tokens": 64, "stream": true,
                          "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 1}],
                          "messages": [{"role": "user", "content": "search twice"}]});
        let response = send(&h, "/v1/messages", &body.to_string()).await;
        assert_eq!(response.status(), 200);
        response.text().await.unwrap();
    }
    let records = h.records(2).await;
    let search = 10_000_000;
    assert_eq!(
        records.iter().map(|r| r.cost_nanos).collect::<Vec<_>>(),
        [search, 2 * search]
    );
}

/// A request Anthropic compacted server-side (`context_management`'s `compact_20260112`,
/// passed through untouched) is billed for the compaction's step too, which its top-level
/// `usage` leaves out and lists in `iterations`: every step is counted, whole or streamed
/// (only the top level was: 12 % of the bill in Anthropic's own example).
#[tokio::test]
async fn a_compacted_request_is_counted_with_its_compaction() {
    let usage = r#"{"input_tokens":23000,"output_tokens":1000,"iterations":[{"type":"compaction","input_tokens":180000,"output_tokens":3500},{"type":"message","input_tokens":23000,"output_tokens":1000}]}"#;
    for record in records_of_answers_reporting(&mock("claude"), usage).await {
        assert_eq!(
            (record.prompt_tokens, record.completion_tokens),
            (203_000, 4_500),
            "stream {}",
            record.stream
        );
        assert!(!record.tokens_estimated);
    }
}

/// Claude's thinking (`usage.output_tokens_details.thinking_tokens`, inside its output) is
/// recorded as the request's reasoning tokens, whole or streamed, as OpenAI's are: the
/// statistics showed none for Claude.
#[tokio::test]
async fn claudes_thinking_is_recorded_as_reasoning() {
    let usage =
        r#"{"input_tokens":10,"output_tokens":41,"output_tokens_details":{"thinking_tokens":34}}"#;
    for record in records_of_answers_reporting(&mock("claude"), usage).await {
        assert_eq!(
            (record.completion_tokens, record.reasoning_tokens),
            (41, 34),
            "stream {}",
            record.stream
        );
    }
}

/// Counting tokens bills nothing: a count whose attempt stalled is left to the SDKs' retries
/// (a 5xx after an attempt that may have been billed says `x-should-retry: false`).
#[tokio::test]
async fn a_stalled_count_is_left_to_the_sdks_retries() {
    let claude = mock("claude");
    let gpt = mock("gpt");
    let mut snap = claude_and_gpt_only(&claude, &gpt);
    let settings = snap.settings.get_or_insert_with(Default::default);
    settings.answer_timeout = Some(sluice_proxy::clock::proto_duration(
        std::time::Duration::from_millis(300),
    ));
    // The only candidate is waited for until the request's deadline.
    settings.request_timeout = Some(sluice_proxy::clock::proto_duration(
        std::time::Duration::from_secs(1),
    ));
    let h = Harness::start(snap).await;
    claude.set_fault(Fault::Stall.times(1));
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "one two"}]});
    let response = send(&h, "/v1/messages/count_tokens", &body.to_string()).await;
    assert!(response.status().is_server_error(), "{}", response.status());
    assert!(response.headers().get("x-should-retry").is_none());
    // A Messages request stalled the same way may have been billed.
    claude.set_fault(Fault::Stall.times(1));
    let body = json!({"model": MODEL, "max_tokens": 8,
                      "messages": [{"role": "user", "content": "one two"}]});
    let response = send(&h, "/v1/messages", &body.to_string()).await;
    assert!(response.status().is_server_error(), "{}", response.status());
    assert_eq!(response.headers().get("x-should-retry").unwrap(), "false");
}

#[tokio::test]
async fn anthropic_clients_list_models_in_anthropic_shape() {
    let claude = mock("claude");
    let gpt = mock("gpt");
    let mut snap = claude_and_gpt_only(&claude, &gpt);
    snap.client_keys
        .push(client_key("only-gpt", "sk-only-gpt", &["gpt-only"], 0));
    let h = Harness::start(snap).await;
    let get = |path: &str, key: &str| {
        h.http
            .get(h.url(path))
            .header("x-api-key", key)
            .header("anthropic-version", VERSION)
            .send()
    };
    let list: Value = get("/v1/models", KEY).await.unwrap().json().await.unwrap();
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["gpt-4o-mini", "gpt-only"], "{list}");
    assert_eq!(list["data"][0]["type"], "model");
    assert!(list["data"][0]["created_at"].is_string(), "{list}");
    // The current SDK's `ModelInfo` requires it.
    assert_eq!(list["data"][0]["lifecycle"], "active", "{list}");
    assert_eq!(list["has_more"], false);
    assert_eq!(list["first_id"], "gpt-4o-mini");
    assert_eq!(list["last_id"], "gpt-only");
    // Only the models the key may use.
    let list: Value = get("/v1/models", "sk-only-gpt")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["data"].as_array().unwrap().len(), 1, "{list}");

    let one: Value = get("/v1/models/gpt-only", KEY)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (one["type"].as_str(), one["id"].as_str()),
        (Some("model"), Some("gpt-only"))
    );
    let (status, kind, _) = anthropic_error(get("/v1/models/nope", KEY).await.unwrap()).await;
    assert_eq!((status, kind.as_str()), (404, "not_found_error"));
    let (status, kind, _) = anthropic_error(get("/v1/models", "sk-wrong").await.unwrap()).await;
    assert_eq!((status, kind.as_str()), (401, "authentication_error"));

    // An OpenAI client still gets OpenAI's shape.
    let list: Value = h
        .http
        .get(h.url("/v1/models"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["object"], "list", "{list}");
}

/// A prompt Anthropic caches (`cache_control`) is written to the cache by its first request
/// and read by the next: the record counts each apart and prices the write at the route's
/// cache write price (Claude Sonnet's: $3 input, $0.30 reads, $3.75 writes, $15 output),
/// for a whole answer and a stream alike.
#[tokio::test]
async fn prompt_tokens_written_to_the_cache_are_counted_and_priced_apart() {
    let claude = mock("claude");
    let mut snap = claude_alone(&claude);
    let route = &mut snap.backends[0].models[0];
    route.input_price_per_mtok = 3.0;
    route.cached_input_price_per_mtok = Some(0.3);
    route.cache_write_price_per_mtok = Some(3.75);
    route.output_price_per_mtok = 15.0;
    let h = Harness::start(snap).await;
    // A system prompt of ten words, cached, and a question of two.
    let ask = |stream: bool| {
        json!({"model": MODEL, "max_tokens": 64, "stream": stream,
               "system": [{"type": "text", "text": "one two three four five six seven eight nine ten",
                           "cache_control": {"type": "ephemeral"}}],
               "messages": [{"role": "user", "content": "hello there"}]})
        .to_string()
    };
    let first = send(&h, "/v1/messages", &ask(false)).await;
    assert_eq!(first.status(), 200);
    let answer: Value = first.json().await.unwrap();
    assert_eq!(
        (
            &answer["usage"]["input_tokens"],
            &answer["usage"]["cache_creation_input_tokens"]
        ),
        (&json!(2), &json!(10)),
        "{answer}"
    );
    let second = send(&h, "/v1/messages", &ask(true)).await;
    assert_eq!(second.status(), 200);
    assert!(
        second
            .text()
            .await
            .unwrap()
            .contains("\"cache_read_input_tokens\":10")
    );
    let records = h.records(2).await;
    let counts = |r: &proto::UsageRecord| {
        (
            r.prompt_tokens,
            r.cached_prompt_tokens,
            r.cache_write_prompt_tokens,
            r.completion_tokens,
        )
    };
    assert_eq!(counts(&records[0]), (12, 0, 10, 3));
    // 2 × 3,000 + 10 × 3,750 + 3 × 15,000 nano-units (10 × 3,000 at the input price).
    assert_eq!(records[0].cost_nanos, 88_500);
    assert_eq!(counts(&records[1]), (12, 10, 0, 3));
    // 2 × 3,000 + 10 × 300 + 3 × 15,000.
    assert_eq!(records[1].cost_nanos, 54_000);
}

/// A compatible server's failure named in its own words as a stream's first event (vLLM's
/// Messages endpoint: `internal_error`) fails over, as Anthropic's `api_error` does: nothing has
/// reached the client yet.
#[tokio::test]
async fn a_first_event_internal_error_fails_over() {
    let (primary, fallback) = (mock("primary"), mock("fallback"));
    let failed = "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"internal_error\",\"message\":\"engine dead\"}}\n\n";
    primary.set_fault(
        Fault::Body {
            code: 200,
            body: failed.into(),
        }
        .times(1),
    );
    let h = Harness::start(snapshot(
        1,
        vec![
            anthropic("primary", &primary.base_url(), proto::Pool::Primary),
            anthropic("fallback", &fallback.base_url(), proto::Pool::Fallback),
        ],
    ))
    .await;
    let response = send(&h, "/v1/messages", &hello(true)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-sluice-backend"], "fallback-name");
    assert_eq!(response.headers()["x-sluice-attempts"], "2");
    let text = response.text().await.unwrap();
    assert!(
        text.contains("message_stop") && !text.contains("engine dead"),
        "{text}"
    );
}

/// A Messages stream whose first event is an error of the client's own request (a compatible
/// server refusing its parameters after the 200 head) is passed on, and its end counts for the
/// backend's cooldown neither way: the same client sending it again and again does not cool
/// the backend for everyone (the failure threshold is 3).
#[tokio::test]
async fn a_first_event_error_of_the_clients_own_cools_nothing() {
    let claude = mock("claude");
    let refused = "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"invalid_request_error\",\"message\":\"top_p: must be below 1\"}}\n\n";
    claude.set_fault(
        Fault::Body {
            code: 200,
            body: refused.into(),
        }
        .times(4),
    );
    let h = claude_only(&claude).await;
    for _ in 0..4 {
        let response = send(&h, "/v1/messages", &hello(true)).await;
        assert_eq!(response.status(), 200);
        assert!(response.text().await.unwrap().contains("top_p"));
    }
    let response = send(&h, "/v1/messages", &hello(true)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-sluice-attempts"], "1");
    assert!(response.text().await.unwrap().contains("message_stop"));
    assert!(h.cp.with(|r| r.events.is_empty()));
}

/// Token counts are limited apart from the model's answers (Anthropic's: "separate and
/// independent" limits), so they have no say in the model's cooldown: a count's 429 cools
/// nothing and the model's Messages still go to the backend, and a count answered does not
/// end the model's 429 streak (Claude Code counts often: its counts kept a model's backoff at
/// its base, and took the model out for every Messages request when they hit their own limit).
#[tokio::test]
async fn a_token_count_has_no_say_in_its_models_cooldown() {
    let (primary, fallback) = (mock("primary"), mock("fallback"));
    let mut message = snapshot(
        1,
        vec![
            anthropic("primary", &primary.base_url(), proto::Pool::Primary),
            anthropic("fallback", &fallback.base_url(), proto::Pool::Fallback),
        ],
    );
    message.settings.as_mut().unwrap().failure_threshold = 1;
    let h = Harness::start(message).await;
    let count =
        json!({"model": MODEL, "messages": [{"role": "user", "content": "one two"}]}).to_string();
    primary.set_fault(Fault::rate_limited(30).times(1));
    let response = send(&h, "/v1/messages/count_tokens", &count).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-sluice-backend"], "fallback-name");
    let response = send(&h, "/v1/messages", &hello(false)).await;
    assert_eq!(response.headers()["x-sluice-backend"], "primary-name");
    assert!(
        h.cp.with(|r| r.events.is_empty()),
        "a count's 429 cooled nothing"
    );

    // A Messages 429: the model cools (its streak's first), for a second.
    primary.set_fault(Fault::rate_limited(1).times(1));
    let response = send(&h, "/v1/messages", &hello(false)).await;
    assert_eq!(response.headers()["x-sluice-backend"], "fallback-name");
    let cooled = h.first_cooldown_event().await;
    let until = sluice_proxy::clock::system_time(cooled.cooldown_until.as_ref().unwrap()).unwrap();
    tokio::time::sleep(
        until
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default()
            + std::time::Duration::from_millis(200),
    )
    .await;
    // Its cooldown over, a count answered there, then another Messages 429: the streak goes
    // on (the count did not end it), and the cooldown doubles.
    let response = send(&h, "/v1/messages/count_tokens", &count).await;
    assert_eq!(response.headers()["x-sluice-backend"], "primary-name");
    primary.set_fault(Fault::rate_limited(1).times(1));
    let response = send(&h, "/v1/messages", &hello(false)).await;
    assert_eq!(response.headers()["x-sluice-backend"], "fallback-name");
    h.cp.wait_for("the second cooldown", |r| r.events.len() >= 2)
        .await;
    let streaks: Vec<u32> =
        h.cp.with(|r| r.events.iter().map(|e| e.consecutive_failures).collect());
    assert_eq!(streaks, [1, 2], "the streak goes on");
}

/// A server that serves Messages without `count_tokens` (Ollama's answers gin's plain
/// `404 page not found`) does not end a count another Anthropic backend of the model can
/// make: it fails over, cools nothing, and when no backend counts, the client gets the 404.
#[tokio::test]
async fn count_tokens_fails_over_from_a_backend_without_it() {
    let (primary, fallback) = (mock("primary"), mock("fallback"));
    primary.set_fault(
        Fault::Body {
            code: 404,
            body: "404 page not found".into(),
        }
        .always(),
    );
    let h = Harness::start(snapshot(
        1,
        vec![
            anthropic("primary", &primary.base_url(), proto::Pool::Primary),
            anthropic("fallback", &fallback.base_url(), proto::Pool::Fallback),
        ],
    ))
    .await;
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "one two three"}]})
        .to_string();
    for _ in 0..4 {
        let response = send(&h, "/v1/messages/count_tokens", &body).await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-sluice-backend"], "fallback-name");
        assert_eq!(response.headers()["x-sluice-attempts"], "2");
    }
    // Nothing cooled: Messages still go to the primary first.
    let response = send(&h, "/v1/messages", &hello(false)).await;
    assert_eq!(response.headers()["x-sluice-backend"], "primary-name");
    assert!(h.cp.with(|r| r.events.is_empty()));

    let alone = vec![anthropic(
        "primary",
        &primary.base_url(),
        proto::Pool::Primary,
    )];
    let h = Harness::start(snapshot(1, alone)).await;
    let response = send(&h, "/v1/messages/count_tokens", &body).await;
    let status = response.status();
    let text = response.text().await.unwrap();
    assert_eq!(
        (status.as_u16(), text.as_str()),
        (404, "404 page not found")
    );
}
