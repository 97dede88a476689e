//! The mock provider over real HTTP, as the gateway and the OpenAI SDKs see it.

use std::time::{Duration, SystemTime};

use base64::Engine as _;
use futures::StreamExt as _;
use serde_json::{Value, json};
use sluice_e2e::mock::{Fault, GarbageKind, MockConfig, MockServer, MockStats, RetryAfter};
use sluice_e2e::process;

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

fn chat(model: &str, text: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": text}]})
}

async fn post(mock: &MockServer, path: &str, body: &Value) -> reqwest::Response {
    client()
        .post(format!("{}{path}", mock.base_url()))
        .json(body)
        .send()
        .await
        .unwrap()
}

/// Splits an SSE body into its `data:` payloads, checking the framing on the way.
fn sse_events(body: &str) -> Vec<String> {
    assert!(
        body.ends_with("\n\n"),
        "stream not terminated by a blank line: {body:?}"
    );
    body.split_terminator("\n\n")
        .map(|event| {
            let data = event
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not a data event: {event:?}"));
            assert!(!data.contains('\n'), "multi-line event {event:?}");
            data.to_owned()
        })
        .collect()
}

#[tokio::test]
async fn json_chat_echoes_the_model_and_reports_usage() {
    let mock = MockServer::start_local(MockConfig::named("alpha")).unwrap();
    let resp = post(
        &mock,
        "/chat/completions",
        &chat("upstream-4o", "say hi to me"),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-mock-name"], "alpha");
    assert_eq!(resp.headers()["content-type"], "application/json");
    // Indented as OpenAI writes a whole answer, `usage` after `choices`.
    let text = resp.text().await.unwrap();
    assert!(text.starts_with("{\n  \"id\": \"chatcmpl-"), "{text}");
    assert!(
        text.contains("\n  \"usage\": {\n    \"prompt_tokens\": 4,\n"),
        "{text}"
    );
    let (choices, usage) = (text.find("\"choices\""), text.find("\"usage\""));
    assert!(choices.unwrap() < usage.unwrap(), "{text}");
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "upstream-4o");
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "[alpha] tok1 tok2 tok3 tok4"
    );
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["usage"]["prompt_tokens"], 4);
    assert_eq!(body["usage"]["completion_tokens"], 5);
    assert_eq!(body["usage"]["total_tokens"], 9);

    let stats = mock.stats();
    assert_eq!(stats.requests.chat_completions, 1);
    assert_eq!(stats.responses_with(200), 1);
    assert_eq!((stats.prompt_tokens, stats.completion_tokens), (4, 5));
    assert_eq!(stats.model_requests("upstream-4o"), 1);
}

#[tokio::test]
async fn max_tokens_and_n_shape_the_answer() {
    let mock = MockServer::start_local(MockConfig::default()).unwrap();
    let mut req = chat("m", "a b");
    req["max_tokens"] = json!(2);
    req["n"] = json!(3);
    let body: Value = post(&mock, "/chat/completions", &req)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["choices"].as_array().unwrap().len(), 3);
    assert_eq!(body["choices"][2]["index"], 2);
    assert_eq!(body["choices"][0]["message"]["content"], "[mock] tok1");
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["usage"]["completion_tokens"], 6);
    assert_eq!(mock.stats().completion_tokens, 6);
}

#[tokio::test]
async fn chat_stream_is_framed_like_openai() {
    let mock = MockServer::start_local(MockConfig::named("beta").with_chunk_count(3)).unwrap();

    // Without include_usage: no usage anywhere.
    let mut req = chat("gpt-x", "one two");
    req["stream"] = json!(true);
    let resp = post(&mock, "/chat/completions", &req).await;
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let events = sse_events(&resp.text().await.unwrap());
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks.len(), 1 + 3 + 1);
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["model"], "gpt-x");
        assert!(c.get("usage").is_none());
    }
    // Each chunk ends with OpenAI's padding, letters and digits.
    for event in &events[..events.len() - 1] {
        assert!(padding_last(event).is_some(), "{event}");
    }
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let content: String = chunks[1..4]
        .iter()
        .map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(content, "[beta] tok1 tok2");
    assert!(
        chunks[..4]
            .iter()
            .all(|c| c["choices"][0]["finish_reason"].is_null())
    );
    assert_eq!(chunks[4]["choices"][0]["finish_reason"], "stop");
    assert_eq!(chunks[4]["choices"][0]["delta"], json!({}));
    assert_eq!(
        (mock.stats().prompt_tokens, mock.stats().completion_tokens),
        (0, 0)
    );

    // With include_usage: every chunk has `usage: null`, then one usage chunk without choices.
    req["stream_options"] = json!({"include_usage": true});
    let events = sse_events(
        &post(&mock, "/chat/completions", &req)
            .await
            .text()
            .await
            .unwrap(),
    );
    assert_eq!(events.len(), 1 + 3 + 1 + 1 + 1);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(
        chunks[..5]
            .iter()
            .all(|c| c["usage"].is_null() && c.get("usage").is_some())
    );
    // Written as OpenAI writes them: the null `usage`, then the padding, last.
    for event in &events[..5] {
        let head = padding_last(event).unwrap();
        assert!(head.ends_with(r#","usage":null"#), "{event}");
    }
    assert!(padding_last(&events[5]).is_some(), "{}", events[5]);
    let usage_chunk = &chunks[5];
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"]["prompt_tokens"], 2);
    assert_eq!(usage_chunk["usage"]["completion_tokens"], 3);
    assert_eq!(usage_chunk["usage"]["total_tokens"], 5);

    let stats = mock.stats();
    assert_eq!(
        (
            stats.streams_started,
            stats.streams_completed,
            stats.streams_cut
        ),
        (2, 2, 0)
    );
    assert_eq!((stats.prompt_tokens, stats.completion_tokens), (2, 3));

    // `include_obfuscation: false` leaves the padding out.
    req["stream_options"] = json!({"include_usage": true, "include_obfuscation": false});
    let body = post(&mock, "/chat/completions", &req)
        .await
        .text()
        .await
        .unwrap();
    let events = sse_events(&body);
    assert_eq!(events.len(), 1 + 3 + 1 + 1 + 1);
    assert!(!body.contains("obfuscation"), "{body}");
    assert!(events[0].ends_with(r#","usage":null}"#), "{}", events[0]);
}

/// A chunk's text before its last member when that is `"obfuscation"` holding 1–16 letters
/// and digits, as OpenAI pads each chunk of a chat stream.
fn padding_last(chunk: &str) -> Option<&str> {
    let (head, value) = chunk
        .strip_suffix("\"}")?
        .rsplit_once(r#","obfuscation":""#)?;
    let padded =
        (1..=16).contains(&value.len()) && value.bytes().all(|b| b.is_ascii_alphanumeric());
    padded.then_some(head)
}

#[tokio::test]
async fn legacy_completions_json_and_stream() {
    let mock = MockServer::start_local(MockConfig::named("gamma").with_chunk_count(2)).unwrap();
    let body: Value = post(
        &mock,
        "/completions",
        &json!({"model": "davinci", "prompt": ["a b", "c"]}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(body["object"], "text_completion");
    assert_eq!(body["model"], "davinci");
    assert_eq!(body["choices"][0]["text"], "[gamma] tok1");
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5})
    );

    let req = json!({"model": "davinci", "prompt": "x", "stream": true, "stream_options": {"include_usage": true}});
    let events = sse_events(
        &post(&mock, "/completions", &req)
            .await
            .text()
            .await
            .unwrap(),
    );
    assert_eq!(events.len(), 2 + 1 + 1 + 1);
    let chunks: Vec<Value> = events[..4]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["object"], "text_completion");
    assert_eq!(chunks[0]["choices"][0]["text"], "[gamma]");
    assert_eq!(chunks[1]["choices"][0]["text"], " tok1");
    assert_eq!(chunks[2]["choices"][0]["finish_reason"], "stop");
    assert_eq!(chunks[3]["choices"], json!([]));
    assert_eq!(chunks[3]["usage"]["completion_tokens"], 2);
    assert_eq!(events[4], "[DONE]");
    let stats = mock.stats();
    assert_eq!(stats.requests.completions, 2);
    assert_eq!(
        (stats.prompt_tokens, stats.completion_tokens),
        (3 + 1, 2 + 2)
    );
}

#[tokio::test]
async fn embeddings_float_and_base64_are_the_same_vectors() {
    let mock = MockServer::start_local(MockConfig::default().with_embedding_dims(16)).unwrap();
    let req = json!({"model": "emb", "input": ["hello world", "bye"]});
    let float: Value = post(&mock, "/embeddings", &req).await.json().await.unwrap();
    assert_eq!(float["object"], "list");
    assert_eq!(float["model"], "emb");
    assert_eq!(
        float["usage"],
        json!({"prompt_tokens": 3, "total_tokens": 3})
    );
    let data = float["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    assert_eq!(data[1]["index"], 1);
    let floats: Vec<Vec<f32>> = data
        .iter()
        .map(|d| {
            d["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect();
    assert_eq!(floats[0].len(), 16);
    assert_ne!(floats[0], floats[1]);

    let mut req64 = req.clone();
    req64["encoding_format"] = json!("base64");
    let b64: Value = post(&mock, "/embeddings", &req64)
        .await
        .json()
        .await
        .unwrap();
    for (i, expected) in floats.iter().enumerate() {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64["data"][i]["embedding"].as_str().unwrap())
            .unwrap();
        let decoded: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        assert_eq!(&decoded, expected);
    }

    // Token ids, nested token ids, a single string, and `dimensions`.
    let tokens: Value = post(
        &mock,
        "/embeddings",
        &json!({"model": "emb", "input": [[1, 2, 3], [4]]}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(tokens["usage"]["prompt_tokens"], 4);
    assert_eq!(tokens["data"].as_array().unwrap().len(), 2);
    let single: Value = post(
        &mock,
        "/embeddings",
        &json!({"model": "emb", "input": "hello world", "dimensions": 4}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(single["data"][0]["embedding"].as_array().unwrap().len(), 4);
    assert_eq!(mock.stats().prompt_tokens, 3 + 3 + 4 + 2);
}

#[tokio::test]
async fn models_are_listed_and_unknown_ones_are_404() {
    let mock = MockServer::start_local(MockConfig::default().with_models(["m1", "m2"])).unwrap();
    let list: Value = client()
        .get(format!("{}/models", mock.base_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["object"], "list");
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["m1", "m2"]);
    let one = client()
        .get(format!("{}/models/m2", mock.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(one.status(), 200);
    assert_eq!(one.json::<Value>().await.unwrap()["object"], "model");
    let missing = client()
        .get(format!("{}/models/nope", mock.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    assert_eq!(mock.stats().requests.models, 3);
}

fn error_of(body: &Value) -> (&str, Option<&str>, Option<&str>) {
    let e = &body["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    (
        e["type"].as_str().unwrap(),
        e["param"].as_str(),
        e["code"].as_str(),
    )
}

#[tokio::test]
async fn errors_are_openai_shaped() {
    let mock = MockServer::start_local(
        MockConfig::default()
            .with_models(["m1"])
            .with_api_key("sk-right"),
    )
    .unwrap();
    let url = format!("{}/chat/completions", mock.base_url());

    for auth in [None, Some("Bearer sk-wrong")] {
        let mut req = client().post(&url).json(&chat("m1", "hi"));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 401);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(
            error_of(&body),
            ("invalid_request_error", None, Some("invalid_api_key"))
        );
        assert!(
            !body.to_string().contains("sk-wrong"),
            "the key is echoed: {body}"
        );
    }

    let authed = |body: Value| {
        client()
            .post(&url)
            .bearer_auth("sk-right")
            .json(&body)
            .send()
    };
    let resp = authed(chat("m9", "hi")).await.unwrap();
    assert_eq!(resp.status(), 404);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        error_of(&body),
        ("invalid_request_error", None, Some("model_not_found"))
    );

    let resp = client()
        .post(&url)
        .bearer_auth("sk-right")
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(
        error_of(&resp.json().await.unwrap()).0,
        "invalid_request_error"
    );

    let resp = authed(json!({"model": "m1"})).await.unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(error_of(&resp.json().await.unwrap()).1, Some("messages"));
    let resp = authed(json!({"messages": [{"role": "user", "content": "x"}]}))
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(error_of(&resp.json().await.unwrap()).1, Some("model"));

    let resp = client()
        .post(format!("{}/nope", mock.base_url()))
        .bearer_auth("sk-right")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let resp = client()
        .get(&url)
        .bearer_auth("sk-right")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 405);

    let stats = mock.stats();
    assert_eq!(
        (
            stats.responses_with(401),
            stats.responses_with(404),
            stats.responses_with(400)
        ),
        (2, 2, 3)
    );
    assert_eq!((stats.prompt_tokens, stats.completion_tokens), (0, 0));
}

#[tokio::test]
async fn rate_limit_fault_sends_retry_after_then_heals() {
    let mock = MockServer::start_local(MockConfig::default()).unwrap();
    mock.set_fault(
        Fault::Status {
            code: 429,
            retry_after: Some(RetryAfter::seconds(7).with_millis(6500)),
        }
        .times(2),
    );
    for _ in 0..2 {
        let resp = post(&mock, "/chat/completions", &chat("m", "hi")).await;
        assert_eq!(resp.status(), 429);
        assert_eq!(resp.headers()["retry-after"], "7");
        assert_eq!(resp.headers()["retry-after-ms"], "6500");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(error_of(&body).2, Some("rate_limit_exceeded"));
    }
    assert_eq!(mock.faults()[0].remaining, Some(0));
    let resp = post(&mock, "/chat/completions", &chat("m", "hi")).await;
    assert_eq!(resp.status(), 200);

    mock.set_fault(Fault::Status {
        code: 429,
        retry_after: Some(RetryAfter::http_date(120)),
    });
    let resp = post(&mock, "/chat/completions", &chat("m", "hi")).await;
    let date = httpdate::parse_http_date(resp.headers()["retry-after"].to_str().unwrap()).unwrap();
    let ahead = date.duration_since(SystemTime::now()).unwrap();
    assert!(
        ahead > Duration::from_secs(100) && ahead <= Duration::from_secs(120),
        "{ahead:?}"
    );

    mock.set_fault(Fault::status(503).always());
    let resp = post(&mock, "/embeddings", &json!({"model": "e", "input": "x"})).await;
    assert_eq!(resp.status(), 503);
    assert_eq!(error_of(&resp.json().await.unwrap()).0, "server_error");
    mock.clear_faults();
    assert_eq!(
        post(&mock, "/embeddings", &json!({"model": "e", "input": "x"}))
            .await
            .status(),
        200
    );

    let stats = mock.stats();
    assert_eq!(
        (
            stats.responses_with(429),
            stats.responses_with(503),
            stats.responses_with(200)
        ),
        (3, 1, 2)
    );
    assert_eq!(stats.faults_applied, 4);
    assert_eq!(stats.model_requests("m"), 4);
}

/// As a provider does, the mock checks the key before anything else: a request it refuses
/// meets no planned fault (a test of a wrong key during an outage sees the 401), and the fault
/// is left for the next request.
#[tokio::test]
async fn a_refused_key_meets_no_fault() {
    let mock = MockServer::start_local(MockConfig::default().with_api_key("sk-right")).unwrap();
    mock.set_fault(Fault::status(503).times(1));
    let send = |key: &'static str| {
        client()
            .post(format!("{}/chat/completions", mock.base_url()))
            .bearer_auth(key)
            .json(&chat("m", "hi"))
            .send()
    };
    assert_eq!(send("sk-wrong").await.unwrap().status(), 401);
    assert_eq!(send("sk-right").await.unwrap().status(), 503);
    assert_eq!(send("sk-right").await.unwrap().status(), 200);
}

/// The I/O error kind somewhere in an error's source chain.
fn io_error_kind(err: &(dyn std::error::Error + 'static)) -> Option<std::io::ErrorKind> {
    let mut source = Some(err);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return Some(io.kind());
        }
        source = e.source();
    }
    None
}

#[tokio::test]
async fn reset_is_a_connection_error() {
    let mock = MockServer::start_local(MockConfig::default()).unwrap();
    mock.set_fault(Fault::Reset.times(1));
    let err = client()
        .post(format!("{}/chat/completions", mock.base_url()))
        .json(&chat("m", "hi"))
        .send()
        .await
        .expect_err("a reset connection must not produce a response");
    assert!(err.status().is_none() && !err.is_timeout(), "{err:?}");
    assert!(
        io_error_kind(&err) == Some(std::io::ErrorKind::ConnectionReset),
        "not a TCP reset: {err:?}"
    );
    let stats = mock.stats();
    assert_eq!(
        (stats.resets, stats.responses.values().sum::<u64>()),
        (1, 0)
    );
    assert_eq!(
        post(&mock, "/chat/completions", &chat("m", "hi"))
            .await
            .status(),
        200
    );
}

#[tokio::test]
async fn cut_stream_ends_without_done() {
    let mock = MockServer::start_local(MockConfig::default()).unwrap();
    mock.set_fault(Fault::CutAfterChunks(2).times(1));
    let mut req = chat("m", "hi");
    req["stream"] = json!(true);
    req["stream_options"] = json!({"include_usage": true});
    let resp = post(&mock, "/chat/completions", &req).await;
    assert_eq!(resp.status(), 200);
    let mut received = Vec::new();
    let mut stream = resp.bytes_stream();
    let mut failed = false;
    while let Some(item) = stream.next().await {
        match item {
            Ok(bytes) => received.extend_from_slice(&bytes),
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    assert!(
        failed,
        "a cut stream must end in an error, got {:?}",
        String::from_utf8_lossy(&received)
    );
    let events = sse_events(std::str::from_utf8(&received).unwrap());
    assert_eq!(events.len(), 2);
    assert!(!events.iter().any(|e| e == "[DONE]"));
    let stats = mock.stats();
    assert_eq!(
        (
            stats.streams_started,
            stats.streams_cut,
            stats.streams_completed
        ),
        (1, 1, 0)
    );
    assert_eq!(stats.completion_tokens, 0, "no usage reached the client");

    // A non-streamed answer is cut in the middle of its JSON.
    mock.set_fault(Fault::CutAfterChunks(0).times(1));
    let resp = post(&mock, "/chat/completions", &chat("m", "hi")).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.bytes().await.is_err());
    assert_eq!(mock.stats().completion_tokens, 0);

    // And the next stream is whole.
    let events = sse_events(
        &post(&mock, "/chat/completions", &req)
            .await
            .text()
            .await
            .unwrap(),
    );
    assert_eq!(events.last().unwrap(), "[DONE]");
}

#[tokio::test]
async fn stall_holds_until_the_client_gives_up() {
    let mock = MockServer::start_local(MockConfig::default()).unwrap();
    mock.set_fault(Fault::Stall.times(1));
    let err = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap()
        .post(format!("{}/chat/completions", mock.base_url()))
        .json(&chat("m", "hi"))
        .send()
        .await
        .expect_err("a stalled request must not be answered");
    assert!(err.is_timeout(), "{err:?}");
    assert_eq!(mock.stats().stalls, 1);
    assert_eq!(
        post(&mock, "/chat/completions", &chat("m", "hi"))
            .await
            .status(),
        200
    );
}

#[tokio::test]
async fn a_delay_answers_late_and_a_client_gone_meanwhile_is_charged_nothing() {
    let mock = MockServer::start_local(MockConfig::default()).unwrap();
    mock.set_fault(Fault::DelayMs(400).times(2));
    // The first client gives up during the delay.
    let err = reqwest::Client::builder()
        .timeout(Duration::from_millis(100))
        .build()
        .unwrap()
        .post(format!("{}/chat/completions", mock.base_url()))
        .json(&chat("m", "one two three"))
        .send()
        .await
        .expect_err("not answered within the delay");
    assert!(err.is_timeout(), "{err:?}");
    // The second waits and gets a normal answer.
    let start = std::time::Instant::now();
    let response = post(&mock, "/chat/completions", &chat("m", "one two three")).await;
    assert_eq!(response.status(), 200);
    assert!(start.elapsed() >= Duration::from_millis(400));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["usage"]["prompt_tokens"], 3);
    // The first one's delay, which began earlier, is over too: only the answer was charged.
    let stats = mock.stats();
    assert_eq!(stats.requests.chat_completions, 2);
    assert_eq!(stats.faults_applied, 2);
    assert_eq!((stats.prompt_tokens, stats.responses_with(200)), (3, 1));
}

#[tokio::test]
async fn garbage_bodies() {
    let mock = MockServer::start_local(MockConfig::default()).unwrap();
    mock.set_faults(vec![
        Fault::Garbage(GarbageKind::NotJson).times(1),
        Fault::Garbage(GarbageKind::InvalidSse).times(1),
        Fault::Garbage(GarbageKind::GiantLine).times(1),
    ]);
    let resp = post(&mock, "/chat/completions", &chat("m", "hi")).await;
    assert_eq!(resp.status(), 200);
    assert!(serde_json::from_slice::<Value>(&resp.bytes().await.unwrap()).is_err());

    let text = post(&mock, "/chat/completions", &chat("m", "hi"))
        .await
        .text()
        .await
        .unwrap();
    assert!(!text.contains("[DONE]"));
    assert!(
        text.lines()
            .any(|l| !l.is_empty() && !l.starts_with("data:") && !l.starts_with("event:"))
    );

    let body = post(&mock, "/chat/completions", &chat("m", "hi"))
        .await
        .bytes()
        .await
        .unwrap();
    assert_eq!(body.len(), 8 * 1024 * 1024 + "data: ".len());
    assert!(!body.contains(&b'\n'));
    assert_eq!(mock.stats().faults_applied, 3);
}

#[tokio::test]
async fn latency_delays_the_answer() {
    let latency = Duration::from_millis(150);
    let mock = MockServer::start_local(MockConfig::default().with_latency(latency)).unwrap();
    let start = std::time::Instant::now();
    assert_eq!(
        post(&mock, "/chat/completions", &chat("m", "hi"))
            .await
            .status(),
        200
    );
    assert!(start.elapsed() >= latency);
}

#[tokio::test]
async fn counters_equal_the_usage_clients_received() {
    let mock = MockServer::start_local(MockConfig::default().with_chunk_count(4)).unwrap();
    let (mut prompt, mut completion) = (0, 0);
    let mut add = |usage: &Value| {
        prompt += usage["prompt_tokens"].as_u64().unwrap();
        completion += usage["completion_tokens"].as_u64().unwrap_or(0);
    };
    for i in 0..6 {
        let text = "word ".repeat(i + 1);
        let body: Value = post(&mock, "/chat/completions", &chat("m", &text))
            .await
            .json()
            .await
            .unwrap();
        add(&body["usage"]);
        let mut req = chat("m", &text);
        req["stream"] = json!(true);
        req["stream_options"] = json!({"include_usage": true});
        req["max_tokens"] = json!(i + 1);
        let events = sse_events(
            &post(&mock, "/chat/completions", &req)
                .await
                .text()
                .await
                .unwrap(),
        );
        let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
        add(&usage["usage"]);
        let body: Value = post(&mock, "/embeddings", &json!({"model": "e", "input": text}))
            .await
            .json()
            .await
            .unwrap();
        add(&body["usage"]);
    }
    let stats = mock.stats();
    assert_eq!(
        (stats.prompt_tokens, stats.completion_tokens),
        (prompt, completion)
    );
    assert!(prompt > 0 && completion > 0);
    mock.reset_stats();
    assert_eq!(mock.stats(), MockStats::default());
}

#[tokio::test]
async fn shutdown_closes_the_port() {
    let mock = MockServer::start_local(MockConfig::default()).unwrap();
    let addr = mock.addr();
    mock.shutdown().await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn the_binary_is_steered_through_the_control_api() {
    let child = process::spawn(
        env!("CARGO_BIN_EXE_sluice-mock"),
        [
            "--listen",
            "127.0.0.1:0",
            "--name",
            "proc",
            "--model",
            "m1,m2",
            "--api-key",
            "sk-mock",
        ],
        [("RUST_LOG", "info")],
    )
    .unwrap();
    let addr = child
        .wait_for_listening("http", Duration::from_secs(20))
        .await
        .unwrap();
    let base = format!("http://{addr}");
    let http = client();
    let chat_once = || {
        http.post(format!("{base}/v1/chat/completions"))
            .bearer_auth("sk-mock")
            .json(&chat("m1", "a b c"))
            .send()
    };

    let resp = chat_once().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-mock-name"], "proc");

    let plan: Value = http
        .post(format!("{base}/_mock/faults"))
        .json(
            &json!({"fault": {"status": {"code": 429, "retry_after": {"seconds": 3}}}, "count": 1}),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        plan,
        json!([{"fault": {"status": {"code": 429, "retry_after": {"seconds": 3}}}, "remaining": 1}])
    );
    let resp = chat_once().await.unwrap();
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "3");
    assert_eq!(chat_once().await.unwrap().status(), 200);

    let bad = http
        .post(format!("{base}/_mock/faults"))
        .body("{\"fault\":\"explode\"}")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);

    http.post(format!("{base}/_mock/faults"))
        .json(&json!({"fault": "reset"}))
        .send()
        .await
        .unwrap();
    assert!(chat_once().await.is_err());
    assert!(
        chat_once().await.is_err(),
        "no count: the fault stays until cleared"
    );
    assert_eq!(
        http.delete(format!("{base}/_mock/faults"))
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    assert_eq!(chat_once().await.unwrap().status(), 200);

    let stats: MockStats = http
        .get(format!("{base}/_mock/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats.requests.chat_completions, 6);
    assert_eq!(
        (
            stats.responses_with(200),
            stats.responses_with(429),
            stats.resets
        ),
        (3, 1, 2)
    );
    assert_eq!((stats.prompt_tokens, stats.completion_tokens), (9, 15));
    assert_eq!(stats.model_requests("m1"), 6);

    assert_eq!(
        http.post(format!("{base}/_mock/reset"))
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    let stats: MockStats = http
        .get(format!("{base}/_mock/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats, MockStats::default());

    let mut child = child;
    child.terminate().await.unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
}

#[test]
#[should_panic(expected = "run `cargo build --workspace --bins` first")]
fn workspace_bin_names_the_fix_when_missing() {
    process::workspace_bin("no-such-binary");
}

#[test]
fn workspace_bin_finds_the_mock() {
    let path = process::workspace_bin("sluice-mock");
    assert_eq!(
        path,
        std::path::Path::new(env!("CARGO_BIN_EXE_sluice-mock"))
    );
}

async fn send(mock: &MockServer, method: reqwest::Method, path: &str) -> (u16, Value) {
    let resp = client()
        .request(method, format!("{}{path}", mock.base_url()))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

#[tokio::test]
async fn responses_keep_state_per_instance_like_a_provider() {
    let alpha = MockServer::start_local(MockConfig::named("alpha").with_chunk_count(3)).unwrap();
    let beta = MockServer::start_local(MockConfig::named("beta")).unwrap();

    let first = post(
        &alpha,
        "/responses",
        &json!({"model": "m", "input": "tell me a story"}),
    )
    .await;
    assert_eq!(first.status(), 200);
    let first: Value = first.json().await.unwrap();
    let id = first["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("resp_"), "{id}");
    assert_eq!(first["object"], "response");
    assert_eq!(first["status"], "completed");
    assert_eq!(first["output"][0]["type"], "message");
    assert_eq!(
        first["output"][0]["content"][0]["text"],
        "[alpha] tok1 tok2"
    );
    assert_eq!(first["usage"]["input_tokens"], 4);
    assert_eq!(first["usage"]["output_tokens"], 3);
    assert_eq!(first["usage"]["input_tokens_details"]["cached_tokens"], 0);
    assert_eq!(
        first["usage"]["output_tokens_details"]["reasoning_tokens"],
        0
    );

    // A follow-up is billed the conversation so far, which counts as cached; reasoning
    // tokens count in the output.
    let second: Value = post(
        &alpha,
        "/responses",
        &json!({"model": "m", "input": [{"role": "user", "content": "and then?"}],
                "previous_response_id": id, "reasoning": {"effort": "low"}}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(second["previous_response_id"], id.as_str());
    assert_eq!(second["output"][0]["type"], "reasoning");
    assert_eq!(second["usage"]["input_tokens"], 7 + 2);
    assert_eq!(second["usage"]["input_tokens_details"]["cached_tokens"], 7);
    assert_eq!(second["usage"]["output_tokens"], 3 + 3);
    assert_eq!(
        second["usage"]["output_tokens_details"]["reasoning_tokens"],
        3
    );
    let stats = alpha.stats();
    assert_eq!(stats.requests.responses, 2);
    assert_eq!(
        (stats.prompt_tokens, stats.completion_tokens),
        (4 + 9, 3 + 6)
    );
    assert_eq!((stats.cached_tokens, stats.reasoning_tokens), (7, 3));

    // Only the instance that created a response knows it.
    let elsewhere = post(
        &beta,
        "/responses",
        &json!({"model": "m", "input": "x", "previous_response_id": id}),
    )
    .await;
    assert_eq!(elsewhere.status(), 404);
    let error: Value = elsewhere.json().await.unwrap();
    assert_eq!(error["error"]["param"], "previous_response_id");
    assert_eq!(error["error"]["code"], "previous_response_not_found");
    let (status, _) = send(&beta, reqwest::Method::GET, &format!("/responses/{id}")).await;
    assert_eq!(status, 404);

    let (status, got) = send(&alpha, reqwest::Method::GET, &format!("/responses/{id}")).await;
    assert_eq!((status, &got), (200, &first));
    let (status, items) = send(
        &alpha,
        reqwest::Method::GET,
        &format!("/responses/{id}/input_items?order=asc"),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(items["object"], "list");
    assert_eq!(items["data"][0]["role"], "user");
    assert_eq!(items["data"][0]["content"][0]["text"], "tell me a story");
    assert_eq!(items["has_more"], false);

    // Cancel applies to background responses only.
    let (status, _) = send(
        &alpha,
        reqwest::Method::POST,
        &format!("/responses/{id}/cancel"),
    )
    .await;
    assert_eq!(status, 400);
    let queued: Value = post(
        &alpha,
        "/responses",
        &json!({"model": "m", "input": "later", "background": true}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(queued["status"], "queued");
    assert_eq!(queued["usage"], Value::Null);
    let queued_id = queued["id"].as_str().unwrap();
    let (status, cancelled) = send(
        &alpha,
        reqwest::Method::POST,
        &format!("/responses/{queued_id}/cancel"),
    )
    .await;
    assert_eq!(
        (status, cancelled["status"].as_str()),
        (200, Some("cancelled"))
    );

    let (status, deleted) =
        send(&alpha, reqwest::Method::DELETE, &format!("/responses/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(
        deleted,
        json!({"id": id, "object": "response", "deleted": true})
    );
    let (status, error) = send(&alpha, reqwest::Method::GET, &format!("/responses/{id}")).await;
    assert_eq!(status, 404);
    assert_eq!(
        error["error"]["message"],
        format!("Response with id '{id}' not found.")
    );
}

#[tokio::test]
async fn a_responses_stream_is_named_events_ending_with_the_completed_response() {
    let mock = MockServer::start_local(MockConfig::named("alpha").with_chunk_count(3)).unwrap();
    let resp = post(
        &mock,
        "/responses",
        &json!({"model": "m", "input": "hi there", "stream": true, "reasoning": {"effort": "high"}}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let body = resp.text().await.unwrap();
    assert!(
        !body.contains("[DONE]"),
        "the Responses API sends no [DONE]"
    );
    let events: Vec<(String, Value)> = body
        .split_terminator("\n\n")
        .map(|frame| {
            let (name, data) = frame.split_once('\n').unwrap();
            let name = name.strip_prefix("event: ").unwrap().to_owned();
            let data: Value = serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
            assert_eq!(data["type"], name.as_str());
            (name, data)
        })
        .collect();
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.first(), Some(&"response.created"));
    assert_eq!(names.last(), Some(&"response.completed"));
    for (i, (_, data)) in events.iter().enumerate() {
        assert_eq!(data["sequence_number"], i);
    }
    let text: String = events
        .iter()
        .filter(|(n, _)| n == "response.output_text.delta")
        .map(|(_, d)| d["delta"].as_str().unwrap())
        .collect();
    assert_eq!(text, "[alpha] tok1 tok2");
    let created = &events[0].1["response"];
    let completed = &events.last().unwrap().1["response"];
    assert_eq!(created["id"], completed["id"]);
    assert_eq!(created["usage"], Value::Null);
    assert_eq!(
        completed["usage"]["output_tokens_details"]["reasoning_tokens"],
        3
    );
    assert_eq!(completed["usage"]["output_tokens"], 6);
    // The streamed response is stored like any other.
    let id = completed["id"].as_str().unwrap();
    let (status, got) = send(&mock, reqwest::Method::GET, &format!("/responses/{id}")).await;
    assert_eq!((status, &got), (200, completed));
    let stats = mock.stats();
    assert_eq!((stats.streams_started, stats.streams_completed), (1, 1));
    assert_eq!(stats.reasoning_tokens, 3);
}

#[tokio::test]
async fn chat_with_tools_is_answered_with_a_call_whole_and_streamed() {
    let mock = MockServer::start_local(MockConfig::named("tools").with_chunk_count(2)).unwrap();
    let tools = json!([
        {"type": "function", "function": {"name": "first", "parameters": {"type": "object"}}},
        {"type": "function", "function": {"name": "weather", "parameters": {"type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}, "hot": {"type": "boolean"}}}}}
    ]);
    let ask = |extra: Value| {
        let mut body = chat("m", "weather in Paris?");
        body["tools"] = tools.clone();
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let chosen = json!({"type": "function", "function": {"name": "weather"}});
    let r: Value = post(
        &mock,
        "/chat/completions",
        &ask(json!({"tool_choice": chosen})),
    )
    .await
    .json()
    .await
    .unwrap();
    let choice = &r["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(choice["message"]["content"], Value::Null);
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "weather");
    let arguments: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(arguments, json!({"city": "mock", "days": 1, "hot": true}));
    assert_eq!(r["usage"]["completion_tokens"], 2);

    // Streamed: the id and name first, the arguments in pieces that join to the same JSON.
    let body = post(
        &mock,
        "/chat/completions",
        &ask(json!({"tool_choice": chosen, "stream": true, "stream_options": {"include_usage": true}})),
    )
    .await
    .text()
    .await
    .unwrap();
    let events = sse_events(&body);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let deltas: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c.pointer("/choices/0/delta/tool_calls/0"))
        .collect();
    assert_eq!(deltas[0]["function"]["name"], "weather");
    assert!(deltas[0]["id"].is_string());
    let joined: String = deltas
        .iter()
        .filter_map(|d| d.pointer("/function/arguments").and_then(Value::as_str))
        .collect();
    assert_eq!(serde_json::from_str::<Value>(&joined).unwrap(), arguments);
    let finish = chunks.iter().find_map(|c| {
        c.pointer("/choices/0/finish_reason")
            .and_then(Value::as_str)
    });
    assert_eq!(finish, Some("tool_calls"));
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 2);
    // As OpenAI writes a call's chunks: a null `usage` on each but the usage chunk, and the
    // padding last on all.
    let (usage_chunk, calls) = events[..events.len() - 1].split_last().unwrap();
    for event in calls {
        assert!(
            padding_last(event).is_some_and(|head| head.ends_with(r#","usage":null"#)),
            "{event}"
        );
    }
    assert!(padding_last(usage_chunk).is_some(), "{usage_chunk}");

    // No call: after a tool result, with tool_choice none, or without tools.
    let mut answered = ask(json!({}));
    answered["messages"] = json!([
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": null, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": "sunny"}
    ]);
    for body in [
        answered,
        ask(json!({"tool_choice": "none"})),
        chat("m", "hi"),
    ] {
        let r: Value = post(&mock, "/chat/completions", &body)
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(r["choices"][0]["finish_reason"], "stop", "{body}");
        assert!(r["choices"][0]["message"]["tool_calls"].is_null(), "{r}");
    }
}
