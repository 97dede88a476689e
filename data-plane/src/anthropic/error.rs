//! Error bodies, both ways: Anthropic's shape `{"type":"error","error":{"type","message"}}`
//! for clients of `/v1/messages`, and an Anthropic backend's errors in OpenAI's shape for
//! chat clients.

use bytes::Bytes;
use http::StatusCode;
use serde_json::{Value, json};

/// Anthropic's status for "overloaded": failover and failure counting treat it as a 503.
pub const OVERLOADED: u16 = 529;

/// Anthropic's error `type` for a status, as the official SDK reads it.
pub fn error_type(status: u16) -> &'static str {
    match status {
        400 | 405 | 408 | 422 => "invalid_request_error",
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        504 => "timeout_error",
        503 | OVERLOADED => "overloaded_error",
        _ => "api_error",
    }
}

/// An Anthropic-style error body.
pub fn body(status: u16, message: &str) -> Bytes {
    let body = json!({
        "type": "error",
        "error": {"type": error_type(status), "message": message},
    });
    Bytes::from(body.to_string())
}

/// An SSE `error` event in Anthropic's shape, ending an event stream.
pub fn event(status: u16, message: &str) -> Bytes {
    let mut out = b"event: error\ndata: ".to_vec();
    out.extend_from_slice(&body(status, message));
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

/// An error body's JSON: the object itself, or the first of a list of them, as Google's
/// OpenAI-compatible endpoint writes its errors (`[{"error":{…}}]`).
fn error_value(body: &[u8]) -> Option<Value> {
    match serde_json::from_slice(body).ok()? {
        Value::Array(mut errors) if !errors.is_empty() => Some(errors.swap_remove(0)),
        value => Some(value),
    }
}

/// The message inside an error body of either shape (or vLLM's, `{"object":"error",
/// "message":…}`, xAI's, `{"code":…,"error":"<message>"}`, or Google's list of one), or the
/// body itself when it has none.
fn message_of(parsed: Option<&Value>, body: &[u8]) -> String {
    parsed
        .and_then(|v| {
            v.pointer("/error/message")
                .filter(|m| m.is_string())
                .or_else(|| v.get("message"))
                .or_else(|| v.get("error").filter(|e| e.is_string()))
        })
        .and_then(Value::as_str)
        .map(str::to_owned)
        .unwrap_or_else(|| String::from_utf8_lossy(body).chars().take(1024).collect())
}

/// An Anthropic backend's error → the status and OpenAI-style body a chat client gets: the
/// message kept, Anthropic's error type as the `code`, 529 answered as 503; a prompt longer
/// than the model's context ([`context_exceeded`]: Anthropic's words, and those of the
/// Anthropic-compatible endpoints of other providers, DeepSeek's "maximum context length") has
/// OpenAI's `context_length_exceeded`, the code chat clients look for to trim or summarise
/// their history.
pub fn to_openai(status: StatusCode, body: &[u8]) -> (StatusCode, Bytes) {
    let parsed = error_value(body);
    let message = message_of(parsed.as_ref(), body);
    let too_long = status == StatusCode::BAD_REQUEST && context_exceeded(parsed.as_ref(), &message);
    let code = match too_long {
        true => "context_length_exceeded",
        false => parsed
            .as_ref()
            .and_then(|v| v.pointer("/error/type"))
            .and_then(Value::as_str)
            .unwrap_or_else(|| error_type(status.as_u16())),
    }
    .to_owned();
    let status = if status.as_u16() == OVERLOADED {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        status
    };
    let kind = if status.is_server_error() {
        "server_error"
    } else {
        "invalid_request_error"
    };
    let body = json!({"error": {
        "message": message,
        "type": kind,
        "param": too_long.then_some("messages"),
        "code": code,
    }});
    (status, Bytes::from(body.to_string()))
}

/// An OpenAI-format backend's error → the Anthropic-style body a Messages client gets (same
/// status). A prompt longer than the model's context is said in Anthropic's words, "prompt is
/// too long: …" (the backend's message after them): Claude Code and the agents built on
/// Anthropic's SDKs tell an overflow by them and compact the conversation; told in the
/// backend's words, a session on a model of a smaller context than Claude's failed at every
/// turn, `/compact` too.
pub fn to_anthropic(status: StatusCode, body: &[u8]) -> Bytes {
    let parsed = error_value(body);
    let message = message_of(parsed.as_ref(), body);
    if status == StatusCode::BAD_REQUEST
        && !message.starts_with("prompt is too long")
        && context_exceeded(parsed.as_ref(), &message)
    {
        return self::body(400, &format!("prompt is too long: {message}"));
    }
    self::body(status.as_u16(), &message)
}

/// The codes (`error.code`, or `error.type` where a server puts its code there) of an error
/// saying the prompt does not fit the model's context: OpenAI's (Groq's too), llama.cpp's
/// `llama-server`, GitHub Copilot's.
const CONTEXT_CODES: [&str; 3] = [
    "context_length_exceeded",
    "exceed_context_size_error",
    "model_max_prompt_tokens_exceeded",
];

/// Words of a message that says so, lowercased: each a list of parts that must all be in it.
const CONTEXT_WORDS: [&[&str]; 10] = [
    // OpenAI, vLLM, DeepSeek (its Anthropic endpoint too), Mistral.
    &["maximum context length"],
    &["context length exceeded"],
    // Anthropic.
    &["prompt is too long"],
    &["input is too long"],
    &["input length and `max_tokens` exceed"],
    // llama.cpp: "the request exceeds the available context size, try increasing it".
    &["exceeds the available context size"],
    // SGLang, Together: "The input (140210 tokens) is longer than the model's context length
    // (131072 tokens)."
    &["longer than the model's context length"],
    // xAI: "This model's maximum prompt length is 131072 but the request contains 537812
    // tokens".
    &["maximum prompt length is"],
    // Gemini: "The input token count (1300000) exceeds the maximum number of tokens allowed
    // (1048575)."
    &["input token count", "exceeds the maximum number of tokens"],
    // GitHub Copilot: "prompt token count of 200000 exceeds the limit of 128000".
    &["prompt token count of", "exceeds the limit"],
];

/// Whether an error (a 400, the caller checks) says the prompt, with the answer asked for,
/// does not fit the model's context: by its code ([`CONTEXT_CODES`]) or its words
/// ([`CONTEXT_WORDS`]), as each API and the servers compatible with them write it. One reading
/// for both ways: a Messages client is told in Anthropic's words, which Claude Code compacts
/// the conversation on, and a chat client gets OpenAI's code.
fn context_exceeded(parsed: Option<&Value>, message: &str) -> bool {
    let code = |at: &str| {
        parsed
            .and_then(|v| v.pointer(at))
            .and_then(Value::as_str)
            .is_some_and(|code| CONTEXT_CODES.contains(&code))
    };
    if code("/error/code") || code("/error/type") {
        return true;
    }
    let message = message.to_ascii_lowercase();
    CONTEXT_WORDS
        .iter()
        .any(|parts| parts.iter().all(|words| message.contains(words)))
}
