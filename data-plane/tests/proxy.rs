//! The proxy over real HTTP against the mock provider and an in-process control plane:
//! content, usage, rewriting, and every error a client can cause.

use crate::support;

use serde_json::{Value, json};
use sluice_e2e::mock::{Fault, MockConfig, MockServer};
use sluice_proto::v1::{self as proto, ErrorKind};
use support::harness::*;

fn mock(name: &str) -> MockServer {
    MockServer::start_local(MockConfig::named(name).with_api_key(format!("sk-upstream-{name}")))
        .unwrap()
}

/// Splits an SSE body into its `data:` payloads.
fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            e.lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .collect()
}

async fn assert_error(response: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(response.status().as_u16(), status);
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "application/json"
    );
    let body: Value = response.json().await.unwrap();
    let error = &body["error"];
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(error["type"].is_string(), "{body}");
    assert!(error.get("param").is_some(), "{body}");
    assert_eq!(error["code"], code, "{body}");
    body
}

#[tokio::test]
async fn non_streamed_chat_is_served_rewritten_and_counted() {
    let primary = mock("primary");
    let h = Harness::one_primary(&primary.base_url()).await;

    let response = h.chat(chat_body(false)).await;
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    assert_eq!(headers["x-sluice-backend"], "primary-name");
    assert_eq!(headers["x-sluice-attempts"], "1");
    let request_id = headers["x-request-id"].to_str().unwrap().to_owned();
    let parsed = uuid::Uuid::parse_str(&request_id).unwrap();
    assert_eq!(parsed.get_version_num(), 7);
    assert_eq!(request_id, parsed.to_string(), "hyphenated, lower case");
    let body: Value = response.json().await.unwrap();
    assert!(
        body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .contains("[primary]")
    );
    assert_eq!(body["model"], "gpt-4o-mini-at-primary");

    let stats = primary.stats();
    assert_eq!(stats.model_requests("gpt-4o-mini-at-primary"), 1);
    let record = h.records(1).await.remove(0);
    assert_eq!(record.request_id, request_id);
    assert_eq!(record.client_key_id, KEY_ID);
    assert_eq!(record.backend_id, "primary");
    assert_eq!(record.model, MODEL);
    assert_eq!(record.status_code, 200);
    assert_eq!(record.error_kind, ErrorKind::Unspecified as i32);
    assert_eq!(record.endpoint, proto::Endpoint::ChatCompletions as i32);
    assert_eq!(record.attempts, 1);
    assert!(!record.stream);
    assert_eq!(
        (record.prompt_tokens, record.completion_tokens),
        (stats.prompt_tokens, stats.completion_tokens)
    );
    assert!(record.prompt_tokens > 0 && record.completion_tokens > 0);
    assert_eq!(record.sequence, 1);

    let metrics = h.metrics().await;
    assert!(
        metrics.contains(&format!(
            "sluice_requests_total{{backend=\"primary-name\",model=\"{MODEL}\",status_class=\"2xx\"}} 1\n"
        )),
        "{metrics}"
    );
    assert!(metrics.contains("sluice_snapshot_version 1\n"));
}

/// Sends `request` on a connection of its own and reads the whole answer until the proxy
/// closes it (`Connection: close`): the head as text, and the body's bytes.
async fn exchange(h: &Harness, request: String) -> (String, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut connection = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    connection.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    connection.read_to_end(&mut answer).await.unwrap();
    let end = answer.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8(answer[..end].to_vec()).unwrap();
    (head.to_ascii_lowercase(), answer[end + 4..].to_vec())
}

/// A request as a client writes it, closing the connection after the answer.
fn request_text(method: &str, path: &str, key: &str, body: &str) -> String {
    format!(
        "{method} {path} HTTP/1.1\r\nhost: sluice\r\nauthorization: Bearer {key}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[tokio::test]
async fn whole_answers_carry_their_length_on_the_wire() {
    // The proxied endpoints are answered without axum's router, which set `Content-Length`
    // itself: hyper has to write it from the body's size, for answers and errors alike, and
    // the router's own answers (405, 404) keep it.
    let primary = mock("primary");
    let h = Harness::one_primary(&primary.base_url()).await;
    let chat = chat_body(false).to_string();
    for (method, path, key, body, status) in [
        ("POST", "/v1/chat/completions", KEY, chat.as_str(), "200"),
        ("POST", "/v1/chat/completions", KEY, "{\"model\":", "400"),
        (
            "POST",
            "/v1/chat/completions",
            "sk-nobody",
            chat.as_str(),
            "401",
        ),
        ("GET", "/v1/chat/completions", KEY, "", "405"),
        ("POST", "/v1/nowhere", KEY, chat.as_str(), "404"),
    ] {
        let (head, body) = exchange(&h, request_text(method, path, key, body)).await;
        let what = format!("{method} {path}: {head}");
        assert!(head.starts_with(&format!("http/1.1 {status} ")), "{what}");
        assert!(!head.contains("transfer-encoding"), "{what}");
        let length = head
            .lines()
            .find_map(|line| line.strip_prefix("content-length: "))
            .unwrap_or_else(|| panic!("no content-length: {what}"));
        assert_eq!(length.parse::<usize>().unwrap(), body.len(), "{what}");
        assert_eq!(head.matches("content-length").count(), 1, "{what}");
        let answer: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            answer.get("error").is_none(),
            status == "200",
            "{what}: {answer}"
        );
    }
}

#[tokio::test]
async fn a_whole_answer_passes_on_the_upstreams_content_type_and_no_other_header() {
    // The mock names itself and its request in headers of its own; of the upstream's headers
    // only `content-type` reaches the client, for an answer and for a 4xx passed on alike.
    let primary = mock("primary");
    let h = Harness::one_primary(&primary.base_url()).await;
    let chat = chat_body(false).to_string();
    for (status, fault) in [("200", None), ("400", Some(Fault::status(400).times(1)))] {
        if let Some(fault) = fault {
            primary.set_fault(fault);
        }
        let (head, _) =
            exchange(&h, request_text("POST", "/v1/chat/completions", KEY, &chat)).await;
        assert!(head.starts_with(&format!("http/1.1 {status} ")), "{head}");
        let mut names: Vec<&str> = head
            .lines()
            .skip(1)
            .filter_map(|line| line.split_once(": ").map(|(name, _)| name))
            .collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                // The request asked for it.
                "connection",
                "content-length",
                "content-type",
                "date",
                "x-request-id",
                "x-sluice-attempts",
                // The harness's snapshot shows the backend's name.
                "x-sluice-backend"
            ],
            "{head}"
        );
        assert!(head.contains("content-type: application/json"), "{head}");
        assert!(
            !head.contains("req_mock"),
            "the upstream's request id: {head}"
        );
    }
}

#[tokio::test]
async fn an_incoming_request_id_is_echoed() {
    let primary = mock("primary");
    let h = Harness::one_primary(&primary.base_url()).await;
    let response = h
        .http
        .post(h.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .header("x-request-id", "client-req-42")
        .json(&chat_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "client-req-42");
    let response = h
        .http
        .post(h.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .header("x-request-id", "bad id with spaces")
        .json(&chat_body(false))
        .send()
        .await
        .unwrap();
    assert_ne!(response.headers()["x-request-id"], "bad id with spaces");
    assert!(response.headers().get("request-id").is_none());
    // A Messages client's SDK reads it as `request-id`.
    let response = h
        .http
        .post(h.url("/v1/messages"))
        .bearer_auth(KEY)
        .header("anthropic-version", "2023-06-01")
        .header("x-request-id", "client-req-43")
        .json(&serde_json::json!({"model": MODEL, "max_tokens": 10,
                                  "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["request-id"], "client-req-43");
}

#[tokio::test]
async fn streamed_chat_hides_the_usage_chunk_unless_asked_and_counts_it() {
    let primary = mock("primary");
    let h = Harness::one_primary(&primary.base_url()).await;

    let response = h.chat(chat_body(true)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let events = sse_data(&response.text().await.unwrap());
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(
        chunks
            .iter()
            .all(|c| c["choices"].as_array().is_some_and(|a| !a.is_empty()))
    );
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert!(text.contains("[primary]"), "{text}");

    let record = h.records(1).await.remove(0);
    let stats = primary.stats();
    assert!(record.stream);
    assert_eq!(
        (record.prompt_tokens, record.completion_tokens),
        (stats.prompt_tokens, stats.completion_tokens)
    );
    assert!(record.completion_tokens > 0);
    assert!(record.time_to_first_token.is_some());

    // Asked for: the usage chunk is forwarded.
    let mut body = chat_body(true);
    body["stream_options"] = json!({"include_usage": true});
    let events = sse_data(&h.chat(body).await.text().await.unwrap());
    let usage_chunk: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert!(usage_chunk["usage"]["completion_tokens"].as_u64().unwrap() > 0);
}

/// A data plane whose one backend, `sse`, streams `chunks` to every request.
async fn sse_harness(chunks: Vec<Vec<u8>>) -> Harness {
    let upstream = SseUpstream::start(chunks).await;
    let backends = vec![backend(
        "sse",
        &upstream.base_url(),
        proto::Pool::Primary,
        0,
    )];
    Harness::start(snapshot(1, backends)).await
}

/// `events` (their data) as an upstream may frame them: an event a chunk as Sluice writes
/// them, and ways that are as valid but not that.
fn framings(events: &[String]) -> Vec<(&'static str, Vec<Vec<u8>>)> {
    let wire = |end: &str| -> Vec<Vec<u8>> {
        events
            .iter()
            .map(|e| format!("data: {e}{end}{end}").into_bytes())
            .collect()
    };
    let text = wire("\n").concat();
    vec![
        ("an event a chunk", wire("\n")),
        ("CRLF line ends", wire("\r\n")),
        ("all in one chunk", vec![text.clone()]),
        (
            "cut every 7 bytes",
            text.chunks(7).map(<[u8]>::to_vec).collect(),
        ),
        // Each event's blank line arriving with the next event.
        (
            "blank lines late",
            events
                .iter()
                .enumerate()
                .map(|(i, e)| format!("{}data: {e}\n", if i > 0 { "\n" } else { "" }))
                .map(String::into_bytes)
                .chain(std::iter::once(b"\n".to_vec()))
                .collect(),
        ),
    ]
}

/// A stream whose first event is its provider's failure (OpenAI's `server_error` chunk,
/// TGI's overload) fails over however the upstream cuts its bytes: a first read ending
/// inside `data: {"er` was taken for a chunk's start and the stream committed, the error
/// relayed to the client and no other backend tried.
#[tokio::test]
async fn a_first_event_that_is_the_providers_error_fails_over_however_it_is_cut() {
    let openai = r#"{"error":{"message":"The server had an error","type":"server_error","param":null,"code":null}}"#;
    let tgi = r#"{"error":{"message":"Model is overloaded","http_status_code":422}}"#;
    for error in [openai, tgi] {
        for (framing, chunks) in framings(&[error.to_owned()]) {
            let (upstream, fallback) = (SseUpstream::start(chunks).await, mock("fallback"));
            let backends = vec![
                backend("sse", &upstream.base_url(), proto::Pool::Primary, 0),
                backend("fallback", &fallback.base_url(), proto::Pool::Fallback, 0),
            ];
            let h = Harness::start(snapshot(1, backends)).await;
            let response = h.chat(chat_body(true)).await;
            assert_eq!(response.status(), 200, "{framing}");
            assert_eq!(
                response.headers()["x-sluice-backend"],
                "fallback-name",
                "{framing}: {error}"
            );
            let text = response.text().await.unwrap();
            assert!(!text.contains("\"error\""), "{framing}: {text}");
        }
    }
}

/// The usage chunk Sluice asked for is hidden from a client that did not ask for it however
/// the upstream writes its `choices`: empty, `null`, or left out (the last two reached the
/// client, whose code read `chunk.choices[0]`); it is counted all the same.
#[tokio::test]
async fn a_usage_chunk_without_choices_is_hidden_from_clients_that_did_not_ask() {
    let content = json!({"id": "c1", "object": "chat.completion.chunk", "created": 1,
        "model": "m", "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}]})
    .to_string();
    let usage = r#""usage":{"prompt_tokens":4,"completion_tokens":1,"total_tokens":5}"#;
    for choices in [r#""choices":[],"#, r#""choices":null,"#, ""] {
        let last = format!(r#"{{"id":"c1","object":"chat.completion.chunk",{choices}{usage}}}"#);
        let events = [content.clone(), last, "[DONE]".to_owned()];
        let h = sse_harness(framings(&events).remove(0).1).await;
        let relayed = sse_data(&h.chat(chat_body(true)).await.text().await.unwrap());
        assert_eq!(relayed, [content.clone(), "[DONE]".to_owned()], "{choices}");
        let record = h.records(1).await.remove(0);
        assert_eq!(
            (record.prompt_tokens, record.completion_tokens),
            (4, 1),
            "{choices}"
        );
    }
}

/// A chat stream whose upstream sends its own error event and then `[DONE]` (vLLM, when the
/// generation fails after the head; OpenRouter, whose error comes in a chunk among its `id`
/// and `choices`, `finish_reason: "error"`) was recorded as served: its client's SDK raised
/// the error all the same. It is now recorded as interrupted, charged what it streamed
/// (estimated), and relayed as it came. A chunk whose `error` is null, or whose text says
/// "error", is no error.
#[tokio::test]
async fn a_stream_carrying_its_upstreams_error_event_is_recorded_as_interrupted() {
    let content = json!({"id": "c1", "object": "chat.completion.chunk", "created": 1,
        "model": "m", "choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": null}]})
    .to_string();
    let vllm = r#"{"error": {"object": "error", "message": "boom", "type": "InternalServerError", "code": 500}}"#;
    let openrouter = json!({"id": "c1", "object": "chat.completion.chunk", "created": 1,
        "model": "m", "provider": "openai",
        "error": {"code": "server_error", "message": "Provider disconnected unexpectedly"},
        "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}]})
    .to_string();
    // OpenAI's: its error chunk alone, the body closed after it with no `[DONE]`: relayed and
    // ended by the `[DONE]` it left out, not by a second error of Sluice's.
    let openai = r#"{"error":{"message":"The server had an error","type":"server_error","param":null,"code":null}}"#;
    let done = "[DONE]".to_owned();
    for sent in [
        vec![content.clone(), vllm.to_owned(), done.clone()],
        vec![content.clone(), openrouter, done.clone()],
        vec![content.clone(), openai.to_owned()],
    ] {
        let mut events = sent.clone();
        if events.last() != Some(&done) {
            events.push(done.clone());
        }
        for (framing, chunks) in framings(&sent) {
            let h = sse_harness(chunks).await;
            let relayed = sse_data(&h.chat(chat_body(true)).await.text().await.unwrap());
            assert_eq!(relayed, events, "{framing}");
            let record = h.records(1).await.remove(0);
            assert_eq!(
                record.error_kind,
                ErrorKind::StreamInterrupted as i32,
                "{framing}: {events:?}"
            );
            assert!(record.tokens_estimated, "{framing}");
            assert_eq!(record.completion_tokens, 1, "{framing}");
        }
    }
    let says_error = json!({"id": "c1", "object": "chat.completion.chunk", "created": 1,
        "model": "m", "choices": [{"index": 0, "delta": {"content": "an \"error\": none"}, "finish_reason": null}]})
    .to_string();
    let null_error = json!({"id": "c1", "object": "chat.completion.chunk", "created": 1,
        "model": "m", "error": null,
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    .to_string();
    let events = [content.clone(), says_error, null_error, "[DONE]".to_owned()];
    let h = sse_harness(framings(&events).remove(0).1).await;
    let relayed = sse_data(&h.chat(chat_body(true)).await.text().await.unwrap());
    assert_eq!(relayed, events);
    let record = h.records(1).await.remove(0);
    assert_eq!(record.error_kind, ErrorKind::Unspecified as i32);
}

/// A stream whose body ends cleanly after its usage without `data: [DONE]` (Perplexity sends
/// none), or whose `[DONE]` lacks its blank line, is complete: it ends as `[DONE]` ends it,
/// for the client (no error event: the SDKs raise on one, after the whole answer) and in the
/// record, and for a Messages client whose stream is translated from it. Without usage, an
/// end before `[DONE]` is still an interruption (above).
#[tokio::test]
async fn a_stream_that_ends_cleanly_after_its_usage_without_done_is_complete() {
    let chunk = |content: &str, finish: Value| {
        json!({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish}]})
        .to_string()
    };
    let usage = json!({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
        "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 9, "total_tokens": 16}})
    .to_string();
    let events = [chunk("Hel", Value::Null), chunk("lo", json!("stop")), usage];
    let mut cases = framings(&events);
    // `[DONE]` without its blank line, then the end of the body.
    let mut done_unended = framings(&events).remove(0).1;
    done_unended.push(b"data: [DONE]\n".to_vec());
    cases.push(("[DONE] without its blank line", done_unended));
    for (framing, chunks) in cases {
        let h = sse_harness(chunks).await;
        let body = h.chat(chat_body(true)).await.text().await.unwrap();
        assert!(!body.contains("stream_interrupted"), "{framing}: {body}");
        assert!(body.ends_with("data: [DONE]\n\n"), "{framing}: {body}");
        assert_eq!(
            sse_data(&body).len(),
            3,
            "{framing}: the two chunks and [DONE]: {body}"
        );
        let record = h.records(1).await.remove(0);
        assert_eq!(
            record.error_kind,
            ErrorKind::Unspecified as i32,
            "{framing}"
        );
        assert_eq!(
            (
                record.prompt_tokens,
                record.completion_tokens,
                record.tokens_estimated
            ),
            (7, 9, false),
            "{framing}"
        );
        // The same stream translated for a Messages client ends as `[DONE]` ends it too: its
        // `message_delta` with the usage and its `message_stop`, no error event after the
        // whole answer.
        let messages = json!({"model": MODEL, "max_tokens": 64, "stream": true,
                              "messages": [{"role": "user", "content": "hi"}]});
        let body = h
            .post("/v1/messages", KEY, &messages)
            .await
            .text()
            .await
            .unwrap();
        let names: Vec<&str> = body
            .lines()
            .filter_map(|l| l.strip_prefix("event: "))
            .collect();
        assert!(!names.contains(&"error"), "{framing}: {body}");
        assert_eq!(
            names[names.len() - 2..],
            ["message_delta", "message_stop"],
            "{framing}: {body}"
        );
        assert!(body.contains(r#""output_tokens":9"#), "{framing}: {body}");
        let record = h.records(2).await.remove(1);
        assert_eq!(
            record.error_kind,
            ErrorKind::Unspecified as i32,
            "{framing}"
        );
        assert_eq!(
            (record.prompt_tokens, record.completion_tokens),
            (7, 9),
            "{framing}"
        );
    }
}

/// Usage in every chunk (Perplexity's, vLLM's with `continuous_usage_stats`): a body that ends
/// cleanly after the chunk with its `finish_reason` is complete (Perplexity sends no
/// `[DONE]`); one that ends after a chunk of the middle was cut (a server's own timeout, a
/// close-delimited body whose server died), however much usage it reported.
#[tokio::test]
async fn a_stream_with_usage_in_every_chunk_is_complete_only_at_its_finish() {
    let chunk = |content: &str, finish: Value, completion: u64| {
        json!({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish}],
            "usage": {"prompt_tokens": 7, "completion_tokens": completion,
                      "total_tokens": 7 + completion}})
        .to_string()
    };
    let finished = [chunk("Hel", Value::Null, 1), chunk("lo", json!("stop"), 2)];
    let cut = [chunk("Hel", Value::Null, 1), chunk("lo", Value::Null, 2)];
    for (events, complete) in [(finished, true), (cut, false)] {
        let h = sse_harness(framings(&events).remove(0).1).await;
        let body = h.chat(chat_body(true)).await.text().await.unwrap();
        assert_eq!(body.contains("stream_interrupted"), !complete, "{body}");
        assert_eq!(body.ends_with("data: [DONE]\n\n"), complete, "{body}");
        let record = h.records(1).await.remove(0);
        let kind = match complete {
            true => ErrorKind::Unspecified,
            false => ErrorKind::StreamInterrupted,
        };
        assert_eq!(record.error_kind, kind as i32, "{body}");
        assert_eq!(record.completion_tokens, 2, "{body}");
    }
}

/// A request refused before its body is read (a wrong or expired key, the memory for bodies
/// full, a path or method the data plane does not serve) gets its refusal while its client is
/// still uploading. The connection was closed with the upload unread, which resets it: a user
/// whose key had expired sent a long conversation and read "Connection error" (retried twice,
/// three uploads), never why; behind nginx (`max_fails=1`) the reset of an upload to a mistyped
/// path counted as the replica's failure, and a few such uploads took every replica out.
#[tokio::test]
async fn a_request_refused_before_its_body_is_read_gets_its_refusal_while_uploading() {
    let upstream = EchoUpstream::start().await;
    let h = Harness::start_with(one_primary_snapshot(&upstream.base_url()), |c| {
        c.max_buffered_body_bytes = 1 << 20;
    })
    .await;
    // Far larger than what the sockets' buffers take while the refusal goes out.
    let post = |key: &'static str, bytes: usize| {
        h.http
            .post(h.url("/v1/chat/completions"))
            .bearer_auth(key)
            .body(vec![b' '; bytes])
            .send()
    };
    for _ in 0..3 {
        let answer = post("sk-sluice-not-a-key", 12 << 20)
            .await
            .expect("the 401, not a reset connection");
        assert_error(answer, 401, "invalid_api_key").await;
    }
    for _ in 0..3 {
        let answer = post(KEY, 12 << 20)
            .await
            .expect("the 503, not a reset connection");
        assert_eq!(answer.headers()["retry-after"], "1");
        assert_error(answer, 503, "server_busy").await;
    }
    // The router's refusals: a path it does not serve (404), a method a path does not take
    // (405).
    for (path, status) in [
        ("/v1/chat/complete", 404),
        ("/healthz", 405),
        ("/v1/models", 405),
    ] {
        let answer = h
            .http
            .post(h.url(path))
            .bearer_auth(KEY)
            .body(vec![b' '; 12 << 20])
            .send()
            .await
            .unwrap_or_else(|err| panic!("{path}: the {status}, not a reset connection: {err}"));
        assert_eq!(answer.status(), status, "{path}");
    }
    assert!(upstream.seen().is_empty());
}

/// A request translated for a backend of the other API is read as a tree of JSON values, which
/// an array of small values makes many times its text (2 bytes an element in it, 32 to 64 in
/// the tree): one whose tree could not fit the memory for bodies is refused, 413, where
/// uncounted a handful of 16 MiB bodies translated at once took gigabytes; a body as large in
/// text, which holds room for its tree while it is translated, is served.
#[tokio::test]
async fn a_translated_requests_tree_of_values_is_held_in_the_bodies_memory() {
    let mock =
        MockServer::start_local(MockConfig::named("primary").with_api_key("sk-upstream-primary"))
            .unwrap();
    let mut snap = one_primary_snapshot(&mock.base_url());
    snap.backends[0].api_format = proto::ApiFormat::Anthropic as i32;
    let h = Harness::start_with(snap, |c| {
        c.max_body_bytes = 8 << 20;
        c.max_buffered_body_bytes = 16 << 20;
    })
    .await;
    // A million zeros: 2 MiB of text, tens of MiB of values.
    let zeros = vec![0u8; 1 << 20];
    let refused = h
        .chat(json!({"model": MODEL, "n": 1, "x": zeros,
                     "messages": [{"role": "user", "content": "hi"}]}))
        .await;
    assert_error(refused, 413, "request_too_large").await;
    let text = "a".repeat(6 << 20);
    let served = h
        .chat(json!({"model": MODEL, "n": 1,
                     "messages": [{"role": "user", "content": text}]}))
        .await;
    assert_eq!(served.status(), 200, "{}", served.text().await.unwrap());
    assert_eq!(mock.stats().requests.total(), 1);
}

/// `/metrics` takes no key, and its answer grows with the backends: past what an answer holds
/// uncounted (64 KiB) it takes the replica's own share of the answers' memory until its client
/// has read it. Uncounted on HTTP/1, clients that asked for it on thousands of connections
/// and read nothing held it each, outside every bound.
#[tokio::test]
async fn a_large_metrics_answer_counts_against_the_answers_memory() {
    let upstream = EchoUpstream::start().await;
    let backends: Vec<proto::SnapshotBackend> = (0..60)
        .map(|i| {
            let mut b = backend(
                &format!("b{i:02}"),
                &upstream.base_url(),
                proto::Pool::Primary,
                0,
            );
            b.models[0].name = format!("model-{i:02}");
            b
        })
        .collect();
    // Each backend's series, once it has served a request.
    let served = |tweak: fn(&mut sluice_proxy::Config)| {
        let backends = backends.clone();
        async move {
            let h = Harness::start_with(snapshot(1, backends), tweak).await;
            for i in 0..60 {
                let body = json!({"model": format!("model-{i:02}"),
                                  "messages": [{"role": "user", "content": "hi"}]});
                assert_eq!(h.chat(body).await.status(), 200);
            }
            h
        }
    };
    let roomy = served(|_| {}).await;
    let whole = roomy.metrics().await;
    assert!(whole.len() > 96 << 10, "{} bytes", whole.len());
    let tight = served(|c| {
        c.max_response_bytes = 64 << 10;
        c.max_buffered_answer_bytes = 96 << 10;
        c.max_buffered_answer_bytes_per_key = Some(96 << 10);
    })
    .await;
    let answer = tight.http.get(tight.url("/metrics")).send().await.unwrap();
    assert_error(answer, 503, "server_busy").await;
}

/// Usage reports name the database of the snapshot the replica serves: a control plane on
/// another database (started on an empty or wrong one) refuses them, and they wait here.
#[tokio::test]
async fn usage_reports_name_the_database_of_the_snapshot_served() {
    let upstream = EchoUpstream::start().await;
    let h = Harness::one_primary(&upstream.base_url()).await;
    assert_eq!(h.chat(chat_body(false)).await.status(), 200);
    h.records(1).await;
    let databases = h.cp.with(|r| r.report_databases.clone());
    assert!(
        !databases.is_empty() && databases.iter().all(|d| d == "database-1"),
        "{databases:?}"
    );
}

#[tokio::test]
async fn a_stream_framed_any_way_is_relayed_alike_and_its_usage_chunk_hidden_unless_asked() {
    let chunk = |delta: Value, finish: Value| {
        json!({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
        .to_string()
    };
    let usage = json!({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
        "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 9, "total_tokens": 16}})
    .to_string();
    let events = [
        chunk(json!({"role": "assistant", "content": ""}), Value::Null),
        chunk(json!({"content": "Hel"}), Value::Null),
        chunk(json!({"content": "lo"}), Value::Null),
        chunk(json!({}), json!("stop")),
        usage.clone(),
        "[DONE]".to_owned(),
    ];
    let without_usage: Vec<&String> = events.iter().filter(|e| **e != usage).collect();
    for (framing, chunks) in framings(&events) {
        let h = sse_harness(chunks).await;
        let relayed = sse_data(&h.chat(chat_body(true)).await.text().await.unwrap());
        assert_eq!(
            relayed.iter().collect::<Vec<_>>(),
            without_usage,
            "{framing}"
        );
        let mut asked = chat_body(true);
        asked["stream_options"] = json!({"include_usage": true});
        let relayed = sse_data(&h.chat(asked).await.text().await.unwrap());
        assert_eq!(relayed, events, "{framing}");
        for record in h.records(2).await {
            let tokens = (record.prompt_tokens, record.completion_tokens);
            assert_eq!(tokens, (7, 9), "{framing}");
            assert!(!record.tokens_estimated, "{framing}");
        }
    }
    // Cut off before its usage: charged a completion token for each of the two deltas with
    // text, however the events came.
    for (framing, chunks) in framings(&events[..4]) {
        let h = sse_harness(chunks).await;
        let body = h.chat(chat_body(true)).await.text().await.unwrap();
        assert!(body.contains("stream_interrupted"), "{framing}: {body}");
        let record = h.records(1).await.remove(0);
        assert!(record.tokens_estimated, "{framing}");
        assert_eq!(record.completion_tokens, 2, "{framing}");
    }
    // Cut off while the model reasons (DeepSeek's `reasoning_content`, OpenRouter's
    // `reasoning`, streamed before any content): each piece of reasoning is charged as
    // output, as the provider bills it (before, none was: the record had no completion).
    let thinking = [
        chunk(json!({"role": "assistant", "content": null}), Value::Null),
        chunk(
            json!({"content": null, "reasoning_content": "Let me"}),
            Value::Null,
        ),
        chunk(json!({"reasoning": " think"}), Value::Null),
        chunk(
            json!({"content": "", "reasoning_content": " more"}),
            Value::Null,
        ),
    ];
    let h = sse_harness(framings(&thinking).remove(0).1).await;
    let body = h.chat(chat_body(true)).await.text().await.unwrap();
    assert!(body.contains("stream_interrupted"), "{body}");
    let record = h.records(1).await.remove(0);
    assert!(record.tokens_estimated);
    assert_eq!(record.completion_tokens, 3);
}

#[tokio::test]
async fn the_body_passes_through_except_model_and_the_backend_key_replaces_the_clients() {
    let echo = EchoUpstream::start().await;
    let h = Harness::start(snapshot(
        1,
        vec![backend("echo", &echo.base_url(), proto::Pool::Primary, 0)],
    ))
    .await;
    let raw = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"data:image/png;base64,iVBORw0KGgo="}}]}],"tools":[{"type":"function","function":{"name":"get_weather","parameters":{"type":"object","properties":{"city":{"type":"string"}}}}}],"x_vendor_field":{"deep":[1,2.50,"\u00e9"]},"temperature":0.7}"#;
    let response = h
        .http
        .post(h.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .header("x-client-secret", "s3cret")
        .header("cookie", "session=s3cret")
        .body(raw)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let seen = echo.seen().remove(0);
    assert_eq!(seen.path, "/v1/chat/completions");
    assert_eq!(
        seen.authorization.as_deref(),
        Some("Bearer sk-upstream-echo")
    );
    assert_eq!(seen.content_type.as_deref(), Some("application/json"));
    // None of the client's headers but what the proxy sets itself.
    let mut names = seen.header_names.clone();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "accept-encoding",
            "authorization",
            "content-length",
            "content-type",
            "host"
        ]
    );
    let expected = raw.replace(
        r#""model":"gpt-4o-mini""#,
        r#""model":"gpt-4o-mini-at-echo""#,
    );
    assert_eq!(std::str::from_utf8(&seen.body).unwrap(), expected);
    let record = h.records(1).await.remove(0);
    assert_eq!((record.prompt_tokens, record.completion_tokens), (11, 22));

    // A backend without a key gets no Authorization header at all.
    let mut keyless = backend("echo", &echo.base_url(), proto::Pool::Primary, 0);
    keyless.api_key.clear();
    h.publish(snapshot(2, vec![keyless])).await;
    h.chat(chat_body(false)).await;
    assert_eq!(echo.seen()[1].authorization, None);
}

#[tokio::test]
async fn embeddings_and_completions_are_served() {
    let primary = mock("primary");
    let mut b = backend("primary", &primary.base_url(), proto::Pool::Primary, 0);
    b.models.push(proto::ModelRoute {
        name: "text-embedding-3-small".into(),
        upstream_name: "emb-up".into(),
        ..Default::default()
    });
    let h = Harness::start(snapshot(1, vec![b])).await;
    let response = h
        .post(
            "/v1/embeddings",
            KEY,
            &json!({"model": "text-embedding-3-small", "input": ["a", "b"]}),
        )
        .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["data"].as_array().unwrap().len(), 2);
    let response = h
        .post(
            "/v1/completions",
            KEY,
            &json!({"model": MODEL, "prompt": "Say hi"}),
        )
        .await;
    assert_eq!(response.status(), 200);
    let records = h.records(2).await;
    assert_eq!(records[0].endpoint, proto::Endpoint::Embeddings as i32);
    assert!(records[0].prompt_tokens > 0);
    assert_eq!(records[1].endpoint, proto::Endpoint::Completions as i32);
    let stats = primary.stats();
    assert_eq!(
        (stats.requests.embeddings, stats.requests.completions),
        (1, 1)
    );
    assert_eq!(stats.model_requests("emb-up"), 1);
}

/// An embeddings answer is billed for its prompt alone. A server that reports only its total
/// (Jina's `{"total_tokens": N}`) has it recorded as the prompt; one that reports no `usage`
/// (Google's OpenAI-compatible endpoint, OpenWebUI) has the prompt's estimate recorded, marked
/// as one, and priced: both were recorded as 0 tokens, and free.
#[tokio::test]
async fn an_embeddings_answer_is_counted_from_its_total_or_else_estimated() {
    let primary = mock("primary");
    let mut b = backend("primary", &primary.base_url(), proto::Pool::Primary, 0);
    b.models[0].input_price_per_mtok = 1_000_000.0;
    let h = Harness::start(snapshot(1, vec![b])).await;
    let request = json!({"model": MODEL, "input": ["a long enough text to embed", "and another"]});
    let vectors = r#""object":"list","data":[{"object":"embedding","index":0,"embedding":[0.1]},{"object":"embedding","index":1,"embedding":[0.2]}],"model":"m""#;
    for (i, (usage, prompt, estimated)) in [
        (r#","usage":{"total_tokens":7}"#, Some(7), false),
        ("", None, true),
    ]
    .into_iter()
    .enumerate()
    {
        primary.set_fault(
            Fault::Body {
                code: 200,
                body: format!("{{{vectors}{usage}}}"),
            }
            .times(1),
        );
        let response = h.post("/v1/embeddings", KEY, &request).await;
        assert_eq!(response.status(), 200);
        let record = h.records(i + 1).await.remove(i);
        assert_eq!(record.endpoint, proto::Endpoint::Embeddings as i32);
        match prompt {
            Some(prompt) => assert_eq!(record.prompt_tokens, prompt, "{usage}"),
            None => assert!(record.prompt_tokens > 0, "{record:?}"),
        }
        assert_eq!(record.completion_tokens, 0);
        assert_eq!(record.tokens_estimated, estimated, "{usage}");
        // A million per million tokens: a unit a token.
        assert_eq!(
            record.cost_nanos,
            record.prompt_tokens * 1_000_000_000,
            "{record:?}"
        );
    }
}

#[tokio::test]
async fn client_errors_get_openai_style_bodies() {
    let primary = mock("primary");
    let mut snap = one_primary_snapshot(&primary.base_url());
    snap.client_keys
        .push(client_key("key-2", "sk-sluice-narrow", &["other-model"], 0));
    let h = Harness::start_with(snap, |c| c.max_body_bytes = 4096).await;

    let missing = h
        .http
        .post(h.url("/v1/chat/completions"))
        .json(&chat_body(false))
        .send()
        .await
        .unwrap();
    assert_error(missing, 401, "invalid_api_key").await;
    let wrong = h
        .post(
            "/v1/chat/completions",
            "sk-sluice-WRONG-secret",
            &chat_body(false),
        )
        .await;
    let body = assert_error(wrong, 401, "invalid_api_key").await;
    assert!(!body.to_string().contains("WRONG"));
    let basic = h
        .http
        .post(h.url("/v1/chat/completions"))
        .basic_auth("user", Some(KEY))
        .json(&chat_body(false))
        .send()
        .await
        .unwrap();
    assert_error(basic, 401, "invalid_api_key").await;

    let forbidden = h
        .post(
            "/v1/chat/completions",
            "sk-sluice-narrow",
            &chat_body(false),
        )
        .await;
    let body = assert_error(forbidden, 403, "model_not_allowed").await;
    assert_eq!(body["error"]["param"], "model");
    let unknown = h.chat(json!({"model": "gpt-9", "messages": []})).await;
    assert_error(unknown, 404, "model_not_found").await;

    let raw = |body: &'static [u8]| {
        h.http
            .post(h.url("/v1/chat/completions"))
            .bearer_auth(KEY)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    assert_error(raw(b"{\"model\":").await.unwrap(), 400, "invalid_json").await;
    assert_error(raw(b"[]").await.unwrap(), 400, "invalid_request_body").await;
    assert_error(
        raw(b"{\"messages\":[]}").await.unwrap(),
        400,
        "missing_required_parameter",
    )
    .await;
    assert_error(raw(b"{\"model\":7}").await.unwrap(), 400, "invalid_type").await;
    assert_error(
        raw(b"{\"model\":\"gpt-4o-mini\",\"stream\":\"yes\"}")
            .await
            .unwrap(),
        400,
        "invalid_type",
    )
    .await;
    assert_error(
        raw(b"{\"model\":\"\xff\xfe\"}").await.unwrap(),
        400,
        "invalid_json",
    )
    .await;
    let huge = json!({"model": MODEL, "messages": [{"role": "user", "content": "x".repeat(5000)}]});
    assert_error(h.chat(huge).await, 413, "request_too_large").await;

    let nowhere = h.post("/v1/nowhere", KEY, &json!({})).await;
    let body = assert_error(nowhere, 404, "unknown_url").await;
    assert_eq!(body["error"]["message"], "Invalid URL (POST /v1/nowhere)");
    // A path of tens of kilobytes is quoted back in 200 characters: no client's choice makes
    // an error large (a large answer can hold a connection open while its client never reads).
    let long = format!("/v1/{}", "a".repeat(30_000));
    let body = assert_error(h.post(&long, KEY, &json!({})).await, 404, "unknown_url").await;
    let message = body["error"]["message"].as_str().unwrap();
    assert_eq!(message, format!("Invalid URL (POST {}…)", &long[..200]));
    // A head past 32 KiB is refused by the listener before any of Sluice's code reads it.
    let longer = format!("/v1/{}", "a".repeat(40_000));
    let refused = h.post(&longer, KEY, &json!({})).await;
    assert_eq!(refused.status(), 431);
    let get = h
        .http
        .get(h.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_error(get, 405, "method_not_allowed").await;

    // Nothing reached the upstream, and the proxy still serves.
    assert_eq!(primary.stats().requests.total(), 0);
    assert_eq!(h.chat(chat_body(false)).await.status(), 200);

    // Authenticated failures are accounted (missing/unknown keys cannot be).
    let records = h.records(10).await;
    let statuses: Vec<u32> = records.iter().map(|r| r.status_code).collect();
    assert_eq!(statuses, [403, 404, 400, 400, 400, 400, 400, 400, 413, 200]);
    assert_eq!(records[1].error_kind, ErrorKind::NoBackend as i32);
}

#[tokio::test]
async fn models_are_listed_per_key() {
    let primary = mock("primary");
    let mut b = backend("primary", &primary.base_url(), proto::Pool::Primary, 0);
    b.models.push(proto::ModelRoute {
        name: "org/other-model".into(),
        ..Default::default()
    });
    let mut snap = snapshot(1, vec![b]);
    snap.client_keys.push(client_key(
        "key-2",
        "sk-sluice-narrow",
        &["org/other-model"],
        0,
    ));
    let h = Harness::start(snap).await;

    let list = |key: &'static str| h.http.get(h.url("/v1/models")).bearer_auth(key).send();
    let all: Value = list(KEY).await.unwrap().json().await.unwrap();
    assert_eq!(all["object"], "list");
    let ids: Vec<&str> = all["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [MODEL, "org/other-model"]);
    assert_eq!(all["data"][0]["object"], "model");
    let narrow: Value = list("sk-sluice-narrow")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(narrow["data"].as_array().unwrap().len(), 1);

    let one = h
        .http
        .get(h.url("/v1/models/org/other-model"))
        .bearer_auth("sk-sluice-narrow")
        .send()
        .await
        .unwrap();
    assert_eq!(one.status(), 200);
    assert_eq!(one.json::<Value>().await.unwrap()["id"], "org/other-model");
    let hidden = h
        .http
        .get(h.url(&format!("/v1/models/{MODEL}")))
        .bearer_auth("sk-sluice-narrow")
        .send()
        .await
        .unwrap();
    assert_error(hidden, 404, "model_not_found").await;
    let anonymous = h.http.get(h.url("/v1/models")).send().await.unwrap();
    assert_error(anonymous, 401, "invalid_api_key").await;
}

/// A replica whose answers' memory, or a key's share of it, could never hold its largest
/// answer does not start, and says which flags to change.
#[tokio::test]
async fn answer_bounds_below_the_largest_answer_are_refused_at_start() {
    let config = |tweak: &dyn Fn(&mut sluice_proxy::Config)| {
        let mut config =
            sluice_proxy::Config::new("http://127.0.0.1:1", "127.0.0.1:0".parse().unwrap());
        config.max_response_bytes = 1000;
        tweak(&mut config);
        config
    };
    for (tweak, flag) in [
        (
            &(|c: &mut sluice_proxy::Config| c.max_buffered_answer_bytes = 999)
                as &dyn Fn(&mut sluice_proxy::Config),
            "--max-buffered-answer-bytes (999)",
        ),
        (
            &|c: &mut sluice_proxy::Config| c.max_buffered_answer_bytes_per_key = Some(999),
            "--max-buffered-answer-bytes-per-key (999)",
        ),
    ] {
        let refused = match sluice_proxy::Proxy::bind(config(tweak)).await {
            Ok(_) => panic!("started with {flag}"),
            Err(e) => e.to_string(),
        };
        assert!(refused.contains(flag), "{refused}");
        assert!(refused.contains("--max-response-bytes (1000)"), "{refused}");
    }
}

/// Before its first snapshot a replica answers only for itself (503 not ready), and on
/// HTTP/2 such an answer to a client that grants its stream no flow-control window is held by
/// the write timeout as every other held answer is: it held no deadline at all, so such
/// clients could keep the answers, and the pool they take, for the connection's life (a
/// replica started while its control plane is unreachable).
#[tokio::test]
async fn an_h2_answer_made_before_the_first_snapshot_is_held_no_longer_than_the_write_timeout() {
    let mut config =
        sluice_proxy::Config::new("http://127.0.0.1:1", "127.0.0.1:0".parse().unwrap());
    config.write_timeout = std::time::Duration::from_secs(1);
    config.dataplane_token = Some(sluice_proxy::config::Secret("t".repeat(32)));
    let proxy = sluice_proxy::Proxy::bind(config).await.unwrap();
    let addr = proxy.local_addr();
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(proxy.serve(async move {
        let _ = stopped.await;
    }));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, connection) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake::<_, bytes::Bytes>(tcp)
        .await
        .unwrap();
    let connection = tokio::spawn(connection);
    let mut send = send.ready().await.unwrap();
    let request = http::Request::get(format!("http://{addr}/v1/models"))
        .header("authorization", format!("Bearer {KEY}"))
        .body(())
        .unwrap();
    let (answer, _stream) = send.send_request(request, true).unwrap();
    let head = tokio::time::timeout(std::time::Duration::from_secs(10), answer)
        .await
        .expect("a head within 10 s")
        .unwrap();
    assert_eq!(head.status(), 503);
    // The write timeout (1 s) and the deadline's grace (1 s) pass: the replica closes the
    // connection holding the unread answer.
    tokio::time::timeout(std::time::Duration::from_secs(8), connection)
        .await
        .expect("the connection closed by the replica within 8 s")
        .unwrap()
        .ok();
    drop(head);
}

/// A request sent on an HTTP/2 connection that grants its streams no flow-control window:
/// the proxy holds the whole answer (once read from the upstream) while the stream lives.
async fn asked_and_unread(
    h: &Harness,
    path: &str,
    body: &str,
) -> (
    h2::client::SendRequest<bytes::Bytes>,
    h2::SendStream<bytes::Bytes>,
    http::Response<h2::RecvStream>,
) {
    let tcp = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let (send, connection) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake::<_, bytes::Bytes>(tcp)
        .await
        .unwrap();
    tokio::spawn(connection);
    let mut send = send.ready().await.unwrap();
    let request = http::Request::post(format!("http://{}{path}", h.addr))
        .header("authorization", format!("Bearer {KEY}"))
        .header("anthropic-version", "2023-06-01")
        .header("content-type", "application/json")
        .body(())
        .unwrap();
    let (answer, mut stream) = send.send_request(request, false).unwrap();
    stream
        .send_data(bytes::Bytes::from(body.to_owned()), true)
        .unwrap();
    // Every handle of the stream kept: h2 resets one whose handles are all dropped.
    let head = tokio::time::timeout(std::time::Duration::from_secs(10), answer)
        .await
        .expect("a head within 10 s")
        .unwrap();
    assert_eq!(head.status(), 200);
    (send, stream, head)
}

/// An answer refused for memory (503 `server_busy`) was generated and billed all the same:
/// its `usage` is read from the rest of it as that is thrown away, and the request's record
/// charges what it says, in each API and across them (before, nothing: the key was charged
/// only its prompt's reserve).
#[tokio::test]
async fn an_answer_refused_for_memory_is_charged_what_its_usage_says() {
    // About 620 KB an answer: one fits in the 1 MB held at most, two do not.
    const WORDS: usize = 70_000;
    let chat = json!({"model": MODEL, "max_tokens": 100_000,
                      "messages": [{"role": "user", "content": "hi there"}]});
    let messages = json!({"model": MODEL, "max_tokens": 100_000,
                          "messages": [{"role": "user", "content": "hi there"}]});
    let responses = json!({"model": MODEL, "input": "hi there"});
    for (case, anthropic, path, body) in [
        ("chat", false, "/v1/chat/completions", &chat),
        (
            "chat to an Anthropic backend",
            true,
            "/v1/chat/completions",
            &chat,
        ),
        ("Messages", true, "/v1/messages", &messages),
        (
            "Messages to an OpenAI backend",
            false,
            "/v1/messages",
            &messages,
        ),
        ("Responses", false, "/v1/responses", &responses),
    ] {
        let mock = MockServer::start_local(
            MockConfig::named("primary")
                .with_api_key("sk-upstream-primary")
                .with_chunk_count(WORDS),
        )
        .unwrap();
        let mut snap = one_primary_snapshot(&mock.base_url());
        if anthropic {
            snap.backends[0].api_format = proto::ApiFormat::Anthropic as i32;
        }
        let h = Harness::start_with(snap, |c| {
            c.max_response_bytes = 1_000_000;
            c.max_buffered_answer_bytes = 1_000_000;
        })
        .await;
        let body = body.to_string();
        let _held = asked_and_unread(&h, path, &body).await;
        let refused = h
            .http
            .post(h.url(path))
            .bearer_auth(KEY)
            .header("anthropic-version", "2023-06-01")
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status(), 503, "{case}");
        let records = h.records(2).await;
        let (served, refused) = (&records[0], &records[1]);
        assert_eq!(
            (served.status_code, refused.status_code),
            (200, 503),
            "{case}"
        );
        let tokens = |r: &proto::UsageRecord| {
            (
                r.prompt_tokens,
                r.completion_tokens,
                r.cached_prompt_tokens,
                r.reasoning_tokens,
            )
        };
        assert!(
            served.completion_tokens >= WORDS as u64,
            "{case}: {served:?}"
        );
        assert_eq!(tokens(refused), tokens(served), "{case}");
        assert!(!refused.tokens_estimated, "{case}");
        assert_eq!(refused.cost_nanos, served.cost_nanos, "{case}");
    }
}

/// An answer larger than `--max-response-bytes` (`n` choices with `logprobs` reach 64 MiB) is
/// not passed on, but the provider billed it: its `usage`, read from the rest of it, is
/// charged, as an answer refused for memory's is. Charged its prompt's reserve alone, a key
/// could have any number of such answers generated for next to nothing.
#[tokio::test]
async fn an_answer_too_large_to_pass_on_is_charged_its_usage() {
    const WORDS: usize = 3_000;
    let mock =
        MockServer::start_local(MockConfig::named("primary").with_chunk_count(WORDS)).unwrap();
    let mut snap = one_primary_snapshot(&mock.base_url());
    snap.backends[0].models[0].output_price_per_mtok = 10.0;
    let h = Harness::start_with(snap, |c| {
        c.max_response_bytes = 8 * 1024;
    })
    .await;
    let answer = h.chat(chat_body(false)).await;
    assert_eq!(answer.status(), 502);
    // Billed: the SDKs are told not to send it again (each time billed anew).
    assert_eq!(answer.headers()["x-should-retry"], "false");
    let record = &h.records(1).await[0];
    assert_eq!(record.status_code, 502, "{record:?}");
    assert_eq!(record.completion_tokens, WORDS as u64, "{record:?}");
    assert!(record.prompt_tokens > 0, "{record:?}");
    assert!(
        !record.tokens_estimated,
        "the provider's figures: {record:?}"
    );
    // $10 a million completion tokens: 10,000 nano-units each.
    assert_eq!(record.cost_nanos, WORDS as u64 * 10_000, "{record:?}");
}

#[tokio::test]
async fn ready_only_with_a_snapshot() {
    use support::control_plane::{FakeControlPlane, TOKEN};
    let cp = FakeControlPlane::start().await;
    let mut config = sluice_proxy::Config::new(cp.url(), "127.0.0.1:0".parse().unwrap());
    config.dataplane_token = Some(sluice_proxy::config::Secret(TOKEN.into()));
    let proxy = sluice_proxy::Proxy::bind(config).await.unwrap();
    let addr = proxy.local_addr();
    let store = proxy.store();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(proxy.serve(async move {
        let _ = rx.await;
    }));
    let http = reqwest::Client::new();
    let get = |path: &'static str| http.get(format!("http://{addr}{path}")).send();
    assert_eq!(get("/healthz").await.unwrap().status(), 200);
    assert_eq!(get("/readyz").await.unwrap().status(), 503);
    let not_ready = http
        .post(format!("http://{addr}/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&chat_body(false))
        .send()
        .await
        .unwrap();
    // The SDKs wait what it says before they try again, perhaps on another replica.
    assert_eq!(not_ready.headers()["retry-after"], "1");
    assert_error(not_ready, 503, "not_ready").await;

    cp.publish(snapshot(1, vec![]));
    let mut watch = store.watch();
    watch.wait_for(|v| *v == 1).await.unwrap();
    assert_eq!(get("/readyz").await.unwrap().status(), 200);
    tx.send(()).unwrap();
    server.await.unwrap().unwrap();
}

/// A replica that refuses a snapshot stays ready (every replica would refuse it: all out of
/// rotation would be an outage) but says on `/readyz` that it is behind, and why, until the
/// control plane sends one it accepts. The real binary against an in-process control plane.
#[tokio::test]
async fn readyz_says_a_replica_that_refused_a_snapshot_is_stale() {
    use support::control_plane::{FakeControlPlane, TOKEN};
    let cp = FakeControlPlane::start().await;
    cp.publish(snapshot(
        1,
        vec![backend(
            "b1",
            "http://127.0.0.1:1/v1",
            proto::Pool::Primary,
            0,
        )],
    ));
    let child = sluice_e2e::process::spawn(
        env!("CARGO_BIN_EXE_sluice-proxy"),
        ["--control-plane", &cp.url(), "--listen", "127.0.0.1:0"],
        [("SLUICE_DATAPLANE_TOKEN", TOKEN), ("RUST_LOG", "info")],
    )
    .unwrap();
    let addr = child
        .wait_for_listening("http", std::time::Duration::from_secs(30))
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let readyz = || async {
        let r = http
            .get(format!("http://{addr}/readyz"))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    };
    let until = |what: &'static str, want: fn(&(u16, String)) -> bool| async move {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let got = readyz().await;
            if want(&got) {
                return got;
            }
            assert!(tokio::time::Instant::now() < deadline, "{what}: {got:?}");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };
    let (_, body) = until("version 1 applied", |(s, b)| {
        *s == 200 && b.contains("version 1")
    })
    .await;
    assert!(!body.contains("stale"), "{body}");

    // Version 2 names one backend id twice: it does not validate.
    let twice = backend("b1", "http://127.0.0.1:1/v1", proto::Pool::Primary, 0);
    cp.publish(snapshot(2, vec![twice.clone(), twice]));
    let (status, body) = until("the refusal shown", |(_, b)| b.contains("stale")).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("refused snapshot version 2 (invalid)") && body.contains("serving version 1"),
        "{body}"
    );
    // No backend name or id leaks through the public port.
    assert!(!body.contains("b1"), "{body}");

    // A snapshot it accepts ends it.
    cp.publish(snapshot(
        3,
        vec![backend(
            "b1",
            "http://127.0.0.1:1/v1",
            proto::Pool::Primary,
            0,
        )],
    ));
    let (_, body) = until("version 3 applied", |(_, b)| b.contains("version 3")).await;
    assert!(!body.contains("stale"), "{body}");
}

#[tokio::test]
async fn a_corpus_of_hostile_requests_gets_4xx_and_the_proxy_keeps_serving() {
    let primary = mock("primary");
    let h = Harness::start_with(one_primary_snapshot(&primary.base_url()), |c| {
        c.max_body_bytes = 64 * 1024
    })
    .await;
    let url = h.url("/v1/chat/completions");
    let ok_body = serde_json::to_vec(&chat_body(false)).unwrap();

    // Authorization headers.
    let long_key = format!("Bearer sk-{}", "a".repeat(10_000));
    for value in [
        "Bearer",
        "Bearer ",
        "Token abc",
        "Basic Zm9vOmJhcg==",
        long_key.as_str(),
    ] {
        let r = h
            .http
            .post(&url)
            .header("authorization", value)
            .body(ok_body.clone())
            .send()
            .await
            .unwrap();
        assert_error(r, 401, "invalid_api_key").await;
    }
    let opaque = h
        .http
        .post(&url)
        .header(
            "authorization",
            reqwest::header::HeaderValue::from_bytes(b"Bearer \xff\xfe").unwrap(),
        )
        .body(ok_body.clone())
        .send()
        .await
        .unwrap();
    assert_error(opaque, 401, "invalid_api_key").await;
    let lowercase = h
        .http
        .post(&url)
        .header("authorization", format!("bearer {KEY}"))
        .body(ok_body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(lowercase.status(), 200);

    // Bodies.
    let bodies: &[(&[u8], &str)] = &[
        (b"", "invalid_json"),
        (b"null", "invalid_request_body"),
        (b"{}", "missing_required_parameter"),
        (b"{\"model\":null}", "invalid_type"),
        (b"{\"model\":[\"gpt-4o-mini\"]}", "invalid_type"),
        (
            b"{\"model\":\"gpt-4o-mini\",\"stream_options\":[]}",
            "invalid_type",
        ),
        (b"{\"model\":\"gpt-4o-mini\"} trailing", "invalid_json"),
        (b"\xef\xbb\xbf{\"model\":\"gpt-4o-mini\"}", "invalid_json"),
        // A model or a stream a case-blind server (Go's encoding/json) would read in place of
        // the one Sluice routes and prices by.
        (
            b"{\"model\":\"gpt-4o-mini\",\"Model\":\"gpt-4o\"}",
            "duplicate_key",
        ),
        (
            b"{\"model\":\"gpt-4o-mini\",\"Stream\":true}",
            "duplicate_key",
        ),
    ];
    for (body, code) in bodies {
        let r = h
            .http
            .post(&url)
            .bearer_auth(KEY)
            .body(*body)
            .send()
            .await
            .unwrap();
        assert_error(r, 400, code).await;
    }
    // A huge body without Content-Length is cut off at the limit.
    let chunks = futures::stream::iter(
        (0..100).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b' '; 4096]))),
    );
    let r = h
        .http
        .post(&url)
        .bearer_auth(KEY)
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_error(r, 413, "request_too_large").await;
    // Absurd parameters are the upstream's to judge: its 400 comes back as is.
    let absurd = h
        .chat(json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 1_000_000, "max_tokens": -5}))
        .await;
    assert_eq!(absurd.status(), 400);
    assert!(absurd.json::<Value>().await.unwrap()["error"]["message"].is_string());

    // Paths and methods.
    for path in [
        "/",
        "/v1",
        "/v1/images/generations",
        "/v2/chat/completions",
        "/v1/chat/completions/x",
    ] {
        let r = h
            .http
            .post(h.url(path))
            .bearer_auth(KEY)
            .body(ok_body.clone())
            .send()
            .await
            .unwrap();
        assert_error(r, 404, "unknown_url").await;
    }
    let r = h
        .http
        .delete(h.url("/v1/models"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_error(r, 405, "method_not_allowed").await;
    let r = h
        .http
        .put(h.url("/v1/embeddings"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_error(r, 405, "method_not_allowed").await;
    // A WebSocket handshake (the Codex CLI's first try at `/v1/responses`) gets 426, on which
    // Codex falls back to HTTP at once (on a 405 it retries five times first); without the
    // upgrade a GET there is still a 405.
    for (upgrade, status, code) in [
        (Some("websocket"), 426, "websocket_not_supported"),
        (None, 405, "method_not_allowed"),
    ] {
        let mut get = h.http.get(h.url("/v1/responses")).bearer_auth(KEY);
        if let Some(upgrade) = upgrade {
            get = get
                .header("connection", "Upgrade")
                .header("upgrade", upgrade)
                .header("sec-websocket-version", "13")
                .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==");
        }
        assert_error(get.send().await.unwrap(), status, code).await;
    }

    assert_eq!(h.chat(chat_body(true)).await.status(), 200);
}

/// `sluice_client_connections{thread}` per serving thread, read from `/metrics`.
async fn connections_per_thread(h: &Harness) -> Vec<u64> {
    let text = h.metrics().await;
    let mut open = vec![0; 2];
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("sluice_client_connections{thread=\"") {
            let (thread, value) = rest.split_once("\"} ").unwrap();
            open[thread.parse::<usize>().unwrap()] = value.parse().unwrap();
        }
    }
    open
}

/// Polls the per-thread connection counts until `done` holds for them (10 s at most).
async fn connections_until(h: &Harness, done: impl Fn(&[u64]) -> bool) -> Vec<u64> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let open = connections_per_thread(h).await;
        if done(&open) {
            return open;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "connections stayed at {open:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn connections_go_to_the_serving_thread_holding_the_fewest() {
    let upstream = mock("primary");
    let snap = snapshot(
        1,
        vec![backend(
            "primary",
            &upstream.base_url(),
            proto::Pool::Primary,
            0,
        )],
    );
    let h = Harness::start_with(snap, |c| c.serving_threads = 2).await;
    // The harness's own keep-alive connection (for /metrics) counts on one of the threads.
    let base = connections_until(&h, |o| o.iter().sum::<u64>() == 1).await;

    // Open connections one at a time and see which thread each lands on.
    let mut clients = Vec::new();
    let mut thread_of = Vec::new();
    let mut before = base.clone();
    for _ in 0..4 {
        clients.push(tokio::net::TcpStream::connect(h.addr).await.unwrap());
        let total = before.iter().sum::<u64>() + 1;
        let now = connections_until(&h, |o| o.iter().sum::<u64>() == total).await;
        thread_of.push(usize::from(now[1] > before[1]));
        before = now;
    }
    assert!(
        before[0].abs_diff(before[1]) <= 1,
        "5 connections dealt unevenly: {before:?}"
    );

    // Close every connection thread 0 got from us: the next ones go there until it is even.
    let mut kept = Vec::new();
    for (client, thread) in clients.into_iter().zip(&thread_of) {
        if *thread == 1 {
            kept.push(client);
        }
    }
    let closed = thread_of.iter().filter(|&&t| t == 0).count() as u64;
    let target = before[0] - closed;
    let after_close = connections_until(&h, |o| o[0] == target).await;
    let gap = after_close[1] - after_close[0];
    for _ in 0..gap {
        kept.push(tokio::net::TcpStream::connect(h.addr).await.unwrap());
    }
    let evened = connections_until(&h, |o| {
        o.iter().sum::<u64>() == after_close.iter().sum::<u64>() + gap
    })
    .await;
    assert_eq!(
        evened[0], evened[1],
        "new connections should fill thread 0 first: {after_close:?} then {evened:?}"
    );
    // Requests are served on both threads alike.
    assert_eq!(h.chat(chat_body(false)).await.status(), 200);
    drop(kept);
    h.shutdown().await.unwrap();
}

/// An h2 client that grants a whole answer's stream no flow-control window leaves the answer
/// in hyper's buffer with no write waiting on the socket, so the write timeout never starts:
/// the connection (up to 200 such answers held) is cut at the later of the request's deadline
/// and the write timeout from the answer's head instead.
#[tokio::test]
async fn an_h2_client_that_grants_a_whole_answer_no_window_is_cut_at_the_request_deadline() {
    use std::time::Duration;

    use http_body_util::Full;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let upstream = EchoUpstream::start().await;
    let mut snap = one_primary_snapshot(&upstream.base_url());
    snap.settings.as_mut().unwrap().request_timeout = Some(sluice_proxy::clock::proto_duration(
        Duration::from_millis(500),
    ));
    let h = Harness::start_with(snap, |c| c.write_timeout = Duration::from_millis(500)).await;
    let tcp = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(0)
        .handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    let connection = tokio::spawn(connection);
    let request = http::Request::post(h.url("/v1/chat/completions"))
        .header("authorization", format!("Bearer {KEY}"))
        .header("content-type", "application/json")
        .body(Full::new(bytes::Bytes::from(chat_body(false).to_string())))
        .unwrap();
    let answer = sender.send_request(request).await.unwrap();
    assert_eq!(answer.status(), 200);
    // The answer's body is never read: no window for it, ever.
    let closed = tokio::time::timeout(Duration::from_secs(10), connection).await;
    assert!(
        closed.is_ok(),
        "the connection still holds the answer after 10 s"
    );
    drop(answer);
}

/// Answers the replica makes itself (a 401 here, which anyone can have without a key), held on
/// HTTP/2 streams whose client grants them no flow-control window, count against the answers'
/// memory under one key's share: past it, new streams are reset at once, where each used to
/// hold its answer until the connection's deadline (200 a connection, 10,000 connections,
/// counted by nothing). A client that reads is served meanwhile, and once the holder has gone
/// its memory comes back.
#[tokio::test]
async fn own_answers_held_on_h2_streams_without_window_are_bounded() {
    use http_body_util::Full;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let upstream = EchoUpstream::start().await;
    let h = Harness::start_with(one_primary_snapshot(&upstream.base_url()), |c| {
        c.max_response_bytes = 32 * 1024;
        c.max_buffered_answer_bytes_per_key = Some(64 * 1024);
    })
    .await;
    let hold = async || {
        let tcp = tokio::net::TcpStream::connect(h.addr).await.unwrap();
        let (mut sender, connection) =
            hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                .initial_stream_window_size(0)
                .handshake(TokioIo::new(tcp))
                .await
                .unwrap();
        let connection = tokio::spawn(connection);
        let (mut held, mut reset) = (Vec::new(), 0);
        for _ in 0..100 {
            let request = http::Request::get(h.url("/v1/models"))
                .header("authorization", "Bearer sk-not-a-key")
                .body(Full::new(bytes::Bytes::new()))
                .unwrap();
            match sender.send_request(request).await {
                Ok(answer) => {
                    assert_eq!(answer.status(), 401);
                    held.push(answer);
                }
                Err(_) => reset += 1,
            }
        }
        (held, reset, sender, connection)
    };
    let (held, reset, sender, connection) = hold().await;
    // 64 KiB, at about 2.2 KiB an answer (its body and its stream).
    assert!((20..=32).contains(&held.len()), "{} held", held.len());
    assert_eq!(held.len() + reset, 100);
    assert_eq!(h.chat(chat_body(false)).await.status(), 200);
    drop((held, sender));
    connection.abort();
    let mut again = 0;
    for _ in 0..50 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let (held, ..) = hold().await;
        again = held.len();
        if again >= 20 {
            break;
        }
    }
    assert!(again >= 20, "{again} held after the holder left");
}

/// A client's model name is quoted back in an error at most 200 characters long: a key (even
/// one out of budget or past its rate limit, which are checked after the model) could
/// otherwise have any answer it likes echoed, as large as the request body limit, for free.
#[tokio::test]
async fn an_unknown_model_is_quoted_back_short() {
    let upstream = EchoUpstream::start().await;
    let h = Harness::one_primary(&upstream.base_url()).await;
    let model = "m".repeat(300_000);
    let answer = h
        .chat(json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}))
        .await;
    assert_eq!(answer.status(), 404);
    let body = answer.text().await.unwrap();
    assert!(body.len() < 2_000, "{} bytes", body.len());
    assert!(body.contains("mmm…"), "{body}");
    let listed = h
        .http
        .get(h.url(&format!("/v1/models/{}", &model[..10_000])))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(listed.status(), 404);
    assert!(listed.text().await.unwrap().len() < 2_000);
}

/// Mistral's API refuses `stream_options` (422 `extra_forbidden`), which Sluice adds to every
/// stream to have its usage counted, and sends the usage in the last chunk unasked. The first
/// stream it refuses is sent again at once without the member, and the serving thread sends
/// that backend's streams without it from then on, the client's own `stream_options` too:
/// every stream is served and its usage counted, a Messages client's (translated) too, and
/// the provider sees one refusal. Before, every stream to Mistral failed with its 422.
#[tokio::test]
async fn a_backend_that_refuses_stream_options_streams_without_it_and_is_charged() {
    let mistral = MockServer::start_local(
        MockConfig::named("mistral")
            .with_chunk_count(4)
            .refusing_stream_options(),
    )
    .unwrap();
    let h = Harness::start_with(one_primary_snapshot(&mistral.base_url()), |config| {
        config.serving_threads = 1;
    })
    .await;
    let asks_usage = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
        "stream": true, "stream_options": {"include_usage": true}});
    for body in [chat_body(true), chat_body(true), asks_usage] {
        let response = h.chat(body).await;
        assert_eq!(response.status(), 200);
        let text = response.text().await.unwrap();
        assert!(text.contains("[mistral]") || text.contains("tok"), "{text}");
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    }
    let messages = h
        .http
        .post(h.url("/v1/messages"))
        .header("x-api-key", KEY)
        .header("anthropic-version", "2023-06-01")
        .json(&json!({"model": MODEL, "max_tokens": 64, "stream": true,
            "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(messages.status(), 200);
    let events = messages.text().await.unwrap();
    assert!(events.contains("event: message_stop"), "{events}");
    assert!(events.contains("\"output_tokens\":4"), "{events}");

    let records = h.records(4).await;
    for record in &records {
        assert_eq!(record.status_code, 200, "{record:?}");
        assert_eq!(record.completion_tokens, 4, "{record:?}");
        assert!(record.prompt_tokens > 0, "{record:?}");
    }
    let stats = mistral.stats();
    assert_eq!(stats.responses_with(422), 1, "one refusal, then learned");
    assert_eq!(stats.responses_with(200), 4);
}

/// A backend that refuses `stream_options` in words of its own (Groq's "property
/// 'stream_options' is unsupported" until 2024, a strict decoder's "unknown field") is taken
/// at them when the member was Sluice's alone, which the client did not send: the stream is
/// sent again without it and served, and that backend's streams at that endpoint go without
/// it from then on. Before, only Mistral's and Azure's words were known, and every stream a
/// client sent such a backend failed with a 400 about a member it never sent.
#[tokio::test]
async fn a_refusal_of_stream_options_in_other_words_is_learnt_when_the_member_was_sluices() {
    let groq = MockServer::start_local(MockConfig::named("groq").with_chunk_count(4)).unwrap();
    let refusal = r#"{"error":{"message":"property 'stream_options' is unsupported, did you mean 'stream'?","type":"invalid_request_error"}}"#;
    groq.set_fault(
        Fault::Body {
            code: 400,
            body: refusal.into(),
        }
        .times(1),
    );
    let h = Harness::start_with(one_primary_snapshot(&groq.base_url()), |config| {
        config.serving_threads = 1;
    })
    .await;
    for _ in 0..2 {
        let response = h.chat(chat_body(true)).await;
        assert_eq!(response.status(), 200);
        let text = response.text().await.unwrap();
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    }
    let stats = groq.stats();
    assert_eq!(stats.responses_with(400), 1);
    assert_eq!(stats.responses_with(200), 2);
    // Both sent without the member (the second one learnt): their usage estimated.
    for record in h.records(2).await {
        assert_eq!(record.status_code, 200, "{record:?}");
        assert!(record.tokens_estimated, "{record:?}");
        assert_eq!(record.completion_tokens, 4, "{record:?}");
    }
}

/// A client cannot write a refusal of `stream_options` in its provider's error: OpenAI names
/// an unknown member of it in its 400 (`Unknown parameter: 'stream_options.<name>'`), so a
/// member named with the refusal's words made Sluice send the stream without the member,
/// charged an estimate (its reasoning and tier lost), and the serving thread ask that backend
/// for usage no more, for every key. The client's own members are left out instead, the
/// stream is served with its usage, and nothing is learnt.
#[tokio::test]
async fn a_clients_own_stream_options_cannot_pass_for_the_backends_refusal() {
    let openai = MockServer::start_local(MockConfig::named("openai").with_chunk_count(4)).unwrap();
    let h = Harness::start_with(one_primary_snapshot(&openai.base_url()), |config| {
        config.serving_threads = 1;
    })
    .await;
    let planted = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
        "stream": true, "stream_options": {"include_usage": true,
            "Unrecognized request argument supplied: stream_options": true}});
    for body in [planted, chat_body(true)] {
        let response = h.chat(body).await;
        assert_eq!(response.status(), 200);
        let text = response.text().await.unwrap();
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    }
    for record in h.records(2).await {
        assert_eq!(record.status_code, 200, "{record:?}");
        assert!(!record.tokens_estimated, "the provider's usage: {record:?}");
        assert_eq!(record.completion_tokens, 4, "{record:?}");
    }
    let stats = openai.stats();
    assert_eq!(
        stats.responses_with(400),
        1,
        "the planted member refused once"
    );
    assert_eq!(stats.responses_with(200), 2);
}

/// What an OpenAI chat answer says of its tokens beyond the three totals reaches the record,
/// whole and streamed, tool calls as text: the reasoning a `reasoning_effort` spends (inside
/// `completion_tokens`), and the prompt a `prompt_cache_key` writes to the provider's cache
/// and then reads from it (`cache_write_tokens`, `cached_tokens`), as the mock provider now
/// reports them as OpenAI does.
#[tokio::test]
async fn chat_reasoning_and_cache_writes_reach_the_record_tool_calls_included() {
    let primary = mock("primary");
    let h = Harness::start(one_primary_snapshot(&primary.base_url())).await;
    for stream in [false, true] {
        let response = h
            .chat(
                json!({"model": MODEL, "stream": stream, "reasoning_effort": "high",
                         "messages": [{"role": "user", "content": "think"}]}),
            )
            .await;
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap();
    }
    for record in h.records(2).await {
        // 5 words of answer, 5 tokens of reasoning.
        assert_eq!(
            (record.completion_tokens, record.reasoning_tokens),
            (10, 5),
            "{record:?}"
        );
        assert!(!record.tokens_estimated, "{record:?}");
    }

    let tool_turn = |stream: bool| {
        json!({"model": MODEL, "stream": stream, "prompt_cache_key": "conversation-1",
               "tools": [{"type": "function", "function": {"name": "lookup",
                          "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}],
               "messages": [{"role": "user", "content": "one two three"},
                            {"role": "assistant", "content": "four"},
                            {"role": "user", "content": "five"}]})
    };
    for stream in [false, true] {
        let response = h.chat(tool_turn(stream)).await;
        assert_eq!(response.status(), 200);
        let body = response.text().await.unwrap();
        assert!(body.contains("lookup"), "a tool call, {body}");
    }
    let records = h.records(4).await;
    // The first turn writes the 4 words before its last message; the second reads them.
    let figures: Vec<_> = records[2..]
        .iter()
        .map(|r| {
            (
                r.prompt_tokens,
                r.cached_prompt_tokens,
                r.cache_write_prompt_tokens,
            )
        })
        .collect();
    assert_eq!(figures, [(5, 0, 4), (5, 4, 0)], "{records:?}");

    // The Responses API's usage always names its writes (a required member of its type).
    let created: Value = h
        .post(
            "/v1/responses",
            KEY,
            &json!({"model": MODEL, "input": "hello"}),
        )
        .await
        .json()
        .await
        .unwrap();
    let details = &created["usage"]["input_tokens_details"];
    assert_eq!(details["cache_write_tokens"], 0, "{created}");
    assert_eq!(details["cached_tokens"], 0, "{created}");
}

/// No content coding is accepted from an upstream: a server may compress an answer to a
/// request that names none (RFC 9110, `Accept-Encoding`), and Sluice reads the answer for
/// its usage and passes it on with its media type alone: the client got compressed bytes
/// labelled `application/json`, and the usage went unread.
#[tokio::test]
async fn an_upstream_is_asked_for_no_content_coding() {
    let base = raw_upstream(|head| {
        let identity = head
            .lines()
            .any(|l| l.eq_ignore_ascii_case("accept-encoding: identity"));
        match identity {
            true => json_answer(
                r#"{"id":"c","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#,
            ),
            false => "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-encoding: gzip\r\ncontent-length: 8\r\n\r\nGZIPDATA"
                .to_owned(),
        }
    })
    .await;
    let h = Harness::one_primary(&base).await;
    let response = h.chat(chat_body(false)).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["usage"]["prompt_tokens"], 3, "{body}");
}
