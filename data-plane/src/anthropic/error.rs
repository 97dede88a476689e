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

/// The message inside an error body of either shape (or vLLM's, `{"object":"error",
/// "message":…}`), or the body itself when it has none.
fn message_of(body: &[u8]) -> String {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    parsed
        .as_ref()
        .and_then(|v| {
            v.pointer("/error/message")
                .filter(|m| m.is_string())
                .or_else(|| v.get("message"))
        })
        .and_then(Value::as_str)
        .map(str::to_owned)
        .unwrap_or_else(|| String::from_utf8_lossy(body).chars().take(1024).collect())
}

/// An Anthropic backend's error → the status and OpenAI-style body a chat client gets: the
/// message kept, Anthropic's error type as the `code`, 529 answered as 503; a prompt longer
/// than the model's context ("prompt is too long: …", "input is too long", or with the answer
/// asked for, "input length and `max_tokens` exceed context limit: …") has OpenAI's
/// `context_length_exceeded`, the code chat clients look for to trim or summarise their
/// history.
pub fn to_openai(status: StatusCode, body: &[u8]) -> (StatusCode, Bytes) {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let message = message_of(body);
    let too_long = status == StatusCode::BAD_REQUEST
        && [
            "prompt is too long",
            "input is too long",
            "input length and `max_tokens` exceed",
        ]
        .iter()
        .any(|words| message.starts_with(words));
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
    let message = message_of(body);
    if status == StatusCode::BAD_REQUEST
        && !message.starts_with("prompt is too long")
        && context_exceeded(body, &message)
    {
        return self::body(400, &format!("prompt is too long: {message}"));
    }
    self::body(status.as_u16(), &message)
}

/// Whether an OpenAI-format error says the prompt (with the answer asked for) does not fit
/// the model's context: OpenAI's code `context_length_exceeded`, or the words OpenAI, vLLM and
/// the servers compatible with them write it in.
fn context_exceeded(body: &[u8], message: &str) -> bool {
    let code = serde_json::from_slice::<Value>(body).ok().and_then(|v| {
        v.pointer("/error/code")
            .and_then(Value::as_str)
            .map(str::to_owned)
    });
    if code.as_deref() == Some("context_length_exceeded") {
        return true;
    }
    let message = message.to_ascii_lowercase();
    [
        "maximum context length",
        "context length exceeded",
        "prompt is too long",
    ]
    .iter()
    .any(|words| message.contains(words))
}
