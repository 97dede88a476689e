//! Whole (non-streamed) answers, both ways: an Anthropic `Message` → a chat completion
//! ([`message_to_completion`]) and a chat completion → a `Message` ([`completion_to_message`]),
//! with the stop reasons and usage of each.

use serde_json::{Map, Value, json};

use super::{Untranslatable, Usage};

/// Anthropic's `stop_reason` → OpenAI's `finish_reason`.
pub fn finish_reason(stop_reason: &str) -> &'static str {
    match stop_reason {
        "max_tokens" | "model_context_window_exceeded" => "length",
        "tool_use" => "tool_calls",
        "refusal" => "content_filter",
        // end_turn, stop_sequence, pause_turn and reasons newer than this proxy.
        _ => "stop",
    }
}

/// OpenAI's `finish_reason` → Anthropic's `stop_reason`.
pub fn stop_reason(finish_reason: &str) -> &'static str {
    match finish_reason {
        "length" => "max_tokens",
        "tool_calls" | "function_call" => "tool_use",
        "content_filter" => "refusal",
        _ => "end_turn",
    }
}

/// Reads an Anthropic `usage` object (a `Message`'s, or a `message_delta`'s cumulative one).
pub fn anthropic_usage(usage: &Value) -> Usage {
    let get = |k: &str| usage.get(k).and_then(Value::as_u64).unwrap_or(0);
    let cache_read = get("cache_read_input_tokens");
    let cache_creation = get("cache_creation_input_tokens");
    Usage {
        input: get("input_tokens") + cache_read + cache_creation,
        output: get("output_tokens"),
        cache_read,
        cache_creation,
    }
}

/// Reads an OpenAI `usage` object.
pub fn openai_usage(usage: &Value) -> Usage {
    let get = |k: &str| usage.get(k).and_then(Value::as_u64).unwrap_or(0);
    Usage {
        input: get("prompt_tokens"),
        output: get("completion_tokens"),
        cache_read: usage
            .pointer("/prompt_tokens_details/cached_tokens")
            .and_then(Value::as_u64)
            .unwrap_or(0),
        cache_creation: 0,
    }
}

/// OpenAI's `usage` for these counts. The cache write has no OpenAI field: it is counted in
/// `prompt_tokens` and also given as `prompt_tokens_details.cache_creation_tokens`.
pub fn openai_usage_value(usage: Usage) -> Value {
    json!({
        "prompt_tokens": usage.input,
        "completion_tokens": usage.output,
        "total_tokens": usage.input + usage.output,
        "prompt_tokens_details": {
            "cached_tokens": usage.cache_read,
            "cache_creation_tokens": usage.cache_creation,
        },
    })
}

/// Anthropic's `usage` for these counts (`input_tokens` excludes the cached ones).
pub fn anthropic_usage_value(usage: Usage) -> Value {
    json!({
        "input_tokens": usage.input.saturating_sub(usage.cache_read + usage.cache_creation),
        "output_tokens": usage.output,
        "cache_read_input_tokens": usage.cache_read,
        "cache_creation_input_tokens": usage.cache_creation,
    })
}

/// An Anthropic `Message` → a chat completion: text blocks joined into `content`, `tool_use`
/// blocks into `tool_calls` (input → arguments string), thinking blocks left out.
pub fn message_to_completion(message: &Value, created: u64) -> Value {
    let mut text = String::new();
    let mut calls = Vec::new();
    for block in message
        .get("content")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        match block.get("type").and_then(Value::as_str) {
            Some("text") => text.push_str(block.get("text").and_then(Value::as_str).unwrap_or("")),
            Some("tool_use") => calls.push(json!({
                "id": block.get("id").cloned().unwrap_or(Value::Null),
                "type": "function",
                "function": {
                    "name": block.get("name").cloned().unwrap_or(Value::Null),
                    "arguments": block.get("input").map_or_else(|| "{}".to_owned(), Value::to_string),
                },
            })),
            _ => {}
        }
    }
    let refused = message.get("stop_reason").and_then(Value::as_str) == Some("refusal");
    let mut reply = Map::new();
    reply.insert("role".into(), Value::from("assistant"));
    let (content, refusal) = if refused {
        (
            Value::Null,
            Some(text).filter(|t| !t.is_empty()).map(Value::from),
        )
    } else if text.is_empty() && !calls.is_empty() {
        (Value::Null, None)
    } else {
        (Value::from(text), None)
    };
    reply.insert("content".into(), content);
    reply.insert("refusal".into(), refusal.unwrap_or(Value::Null));
    if !calls.is_empty() {
        reply.insert("tool_calls".into(), Value::Array(calls));
    }
    let finish = message
        .get("stop_reason")
        .and_then(Value::as_str)
        .map_or("stop", finish_reason);
    let usage = message
        .get("usage")
        .map(anthropic_usage)
        .unwrap_or_default();
    json!({
        "id": message.get("id").cloned().unwrap_or(Value::Null),
        "object": "chat.completion",
        "created": created,
        "model": message.get("model").cloned().unwrap_or(Value::Null),
        "choices": [{
            "index": 0,
            "message": reply,
            "logprobs": null,
            "finish_reason": finish,
        }],
        "usage": openai_usage_value(usage),
    })
}

/// A chat completion → an Anthropic `Message`: its first choice's text, then one `tool_use`
/// block per tool call. Arguments that are not a JSON object make the answer untranslatable
/// (the client gets a 502: the backend, not the client, is at fault).
pub fn completion_to_message(completion: &Value) -> Result<Value, Untranslatable> {
    let choice = completion.pointer("/choices/0");
    let reply = choice.and_then(|c| c.get("message"));
    let mut content = Vec::new();
    let text = reply
        .and_then(|m| m.get("content"))
        .and_then(Value::as_str)
        .or_else(|| reply.and_then(|m| m.get("refusal")).and_then(Value::as_str))
        .unwrap_or("");
    if !text.is_empty() {
        content.push(json!({"type": "text", "text": text}));
    }
    let calls = reply
        .and_then(|m| m.get("tool_calls"))
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    for (k, call) in calls.iter().enumerate() {
        let function = call.get("function");
        let arguments = function
            .and_then(|f| f.get("arguments"))
            .and_then(Value::as_str)
            .unwrap_or("");
        content.push(json!({
            "type": "tool_use",
            "id": call.get("id").cloned().unwrap_or(Value::Null),
            "name": function.and_then(|f| f.get("name")).cloned().unwrap_or(Value::Null),
            "input": tool_input(arguments, k)?,
        }));
    }
    let stop = if calls.is_empty() {
        choice
            .and_then(|c| c.get("finish_reason"))
            .and_then(Value::as_str)
            .map_or("end_turn", stop_reason)
    } else {
        "tool_use"
    };
    let usage = completion
        .get("usage")
        .map(openai_usage)
        .unwrap_or_default();
    let id = completion.get("id").and_then(Value::as_str).unwrap_or("");
    Ok(json!({
        "id": message_id(id),
        "type": "message",
        "role": "assistant",
        "model": completion.get("model").cloned().unwrap_or(Value::Null),
        "content": content,
        "stop_reason": stop,
        "stop_sequence": null,
        "usage": anthropic_usage_value(usage),
    }))
}

/// A chat completion's id as a Message id (`msg_…`, as Anthropic clients expect).
pub fn message_id(chat_id: &str) -> String {
    let bare = chat_id.strip_prefix("chatcmpl-").unwrap_or(chat_id);
    format!("msg_{bare}")
}

/// A tool call's arguments string → a `tool_use` input object (empty → `{}`).
pub fn tool_input(arguments: &str, index: usize) -> Result<Value, Untranslatable> {
    if arguments.trim().is_empty() {
        return Ok(json!({}));
    }
    match serde_json::from_str::<Value>(arguments) {
        Ok(input @ Value::Object(_)) => Ok(input),
        _ => Err(Untranslatable::new(
            format!("choices[0].message.tool_calls[{index}].function.arguments"),
            "The backend's tool call arguments are not a JSON object.",
        )),
    }
}
