//! Whole requests and answers translated between chat completions and Anthropic's Messages:
//! each written from its text in the shape most are written in (values copied as the client or
//! backend wrote them), against the translation through trees of values that decides every
//! other case. The input is read both as a client's body and as a backend's whole answer.
//! Whatever the bytes:
//! - nothing panics;
//! - wherever a shape answers, it writes JSON with the value the tree translation writes
//!   (copies compared as values: a schema or a call's input keeps the writer's spelling), and
//!   it never answers a body or an answer the tree refuses;
//! - a Messages answer translated for a chat client is JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use sluice_proxy::anthropic::{Sampling, message, request, response};

/// JSON however deep: a copied value may nest to the parse's limit below the levels the
/// translation writes above it.
fn deep(bytes: &[u8]) -> Value {
    let mut written = serde_json::Deserializer::from_slice(bytes);
    written.disable_recursion_limit();
    serde::Deserialize::deserialize(&mut written).expect("a translation writes JSON")
}

fuzz_target!(|data: &[u8]| {
    let stream = data.len() % 2 == 1;
    // A backend's API version with the sampling parameters, or one without them.
    let sampling = if data.len() % 4 < 2 {
        Sampling::Taken
    } else {
        Sampling::Removed
    };
    if let Ok(parsed) = sluice_proxy::request::parse(data) {
        let object = parsed.object().ok();
        if let Some(bytes) =
            request::chat_to_messages_in_shape(parsed.members(), "up", 4096, sampling, stream)
        {
            let whole = object
                .as_ref()
                .and_then(|chat| request::chat_to_messages(chat, "up", 4096, sampling).ok())
                .map(|mut messages| {
                    messages.insert("stream".into(), Value::Bool(stream));
                    Value::Object(messages)
                });
            assert_eq!(Some(deep(&bytes)), whole, "chat to Messages");
        }
        if let Some(bytes) =
            request::messages_to_chat_in_shape(parsed.members(), "up", "max_completion_tokens")
        {
            let whole = object
                .as_ref()
                .and_then(|messages| {
                    request::messages_to_chat(messages, "up", "max_completion_tokens").ok()
                })
                .map(Value::Object);
            assert_eq!(Some(deep(&bytes)), whole, "Messages to chat");
        }
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(bytes) = response::completion_to_message_in_shape(text) {
        // As the relay translates an answer outside the shape.
        let whole = serde_json::from_str::<Value>(text)
            .ok()
            .filter(|completion| completion.get("choices").is_some_and(Value::is_array))
            .and_then(|completion| response::completion_to_message(&completion).ok());
        assert_eq!(Some(deep(&bytes)), whole, "a completion to a Message");
    }
    if let Some((completion, _)) = message::completion_of(text, 0) {
        deep(&completion);
    }
});
