//! Whole (non-streamed) answers, both ways: a chat completion → an Anthropic `Message`
//! ([`completion_to_message`]), and the stop reasons and usage of each API, which the other
//! way (a `Message` → a chat completion, [`super::message`]) and the streams share.

use serde_json::{Value, json};

use super::{Checked, Untranslatable, Usage};

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
    UsageFigures {
        input: get("input_tokens"),
        output: get("output_tokens"),
        cache_read: get("cache_read_input_tokens"),
        cache_creation: get("cache_creation_input_tokens"),
    }
    .usage()
}

/// Reads the Anthropic `usage` value at the start of `text` (what follows it is not looked
/// at) as [`anthropic_usage`] reads it once parsed, without building the value: the figures
/// of an object (each 0 when missing or not an unsigned integer; a key given twice, its last
/// value; keys with escapes decoded), zeros for any other JSON value. `None` when `text`
/// does not start with a JSON value, or with one that parse would refuse (a number out of
/// `f64`'s range, a lone surrogate escape, nesting deeper than 128: each [`Checked`]). A whole
/// answer's `usage` is read this way: parsing the whole message into a `Value` cost about
/// 23,000 instructions for a short one.
pub fn anthropic_usage_in(text: &[u8]) -> Option<Usage> {
    use serde::Deserialize;
    let mut value = serde_json::Deserializer::from_slice(text);
    UsageFigures::deserialize(&mut value)
        .ok()
        .map(UsageFigures::usage)
}

/// The four figures of an Anthropic `usage`, as written.
#[derive(Default)]
pub(super) struct UsageFigures {
    input: u64,
    output: u64,
    cache_read: u64,
    cache_creation: u64,
}

impl UsageFigures {
    /// Anthropic's `input_tokens` leaves out the cached tokens; [`Usage::input`] counts them.
    pub(super) fn usage(self) -> Usage {
        Usage {
            input: self
                .input
                .saturating_add(self.cache_read)
                .saturating_add(self.cache_creation),
            output: self.output,
            cache_read: self.cache_read,
            cache_creation: self.cache_creation,
        }
    }
}

impl<'de> serde::Deserialize<'de> for UsageFigures {
    fn deserialize<D: serde::Deserializer<'de>>(value: D) -> Result<Self, D::Error> {
        value.deserialize_any(Lenient::<UsageFigures>::default())
    }
}

/// A figure of an Anthropic `usage`: its count when it is an unsigned integer, else 0.
#[derive(Default)]
struct Count(u64);

impl<'de> serde::Deserialize<'de> for Count {
    fn deserialize<D: serde::Deserializer<'de>>(value: D) -> Result<Self, D::Error> {
        value.deserialize_any(Lenient::<Count>::default())
    }
}

/// The keys of an Anthropic `usage` that hold the figures read.
enum FigureName {
    Input,
    Output,
    CacheRead,
    CacheCreation,
    Other,
}

impl<'de> serde::Deserialize<'de> for FigureName {
    fn deserialize<D: serde::Deserializer<'de>>(key: D) -> Result<Self, D::Error> {
        struct Name;
        impl serde::de::Visitor<'_> for Name {
            type Value = FigureName;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E>(self, key: &str) -> Result<FigureName, E> {
                Ok(match key {
                    "input_tokens" => FigureName::Input,
                    "output_tokens" => FigureName::Output,
                    "cache_read_input_tokens" => FigureName::CacheRead,
                    "cache_creation_input_tokens" => FigureName::CacheCreation,
                    _ => FigureName::Other,
                })
            }
        }
        key.deserialize_str(Name)
    }
}

/// Reads any JSON value as `T`, as `Value`'s lenient getters read it: an object or an
/// unsigned integer as `T` says ([`LenientKind`]), anything else as `T::default()`.
struct Lenient<T>(std::marker::PhantomData<T>);

impl<T> Default for Lenient<T> {
    fn default() -> Self {
        Self(std::marker::PhantomData)
    }
}

/// What a [`Lenient`] value makes of the kinds it reads.
trait LenientKind: Default {
    fn object<'de, A: serde::de::MapAccess<'de>>(map: A) -> Result<Self, A::Error> {
        drain(map).map(|()| Self::default())
    }
    fn unsigned(_: u64) -> Self {
        Self::default()
    }
}

impl LenientKind for UsageFigures {
    fn object<'de, A: serde::de::MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        let mut figures = Self::default();
        while let Some(name) = map.next_key::<FigureName>()? {
            let figure = match name {
                FigureName::Input => &mut figures.input,
                FigureName::Output => &mut figures.output,
                FigureName::CacheRead => &mut figures.cache_read,
                FigureName::CacheCreation => &mut figures.cache_creation,
                FigureName::Other => {
                    map.next_value::<Checked>()?;
                    continue;
                }
            };
            *figure = map.next_value::<Count>()?.0;
        }
        Ok(figures)
    }
}

impl LenientKind for Count {
    fn unsigned(count: u64) -> Self {
        Self(count)
    }
}

/// The rest of an object, read and left.
fn drain<'de, A: serde::de::MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
    while map.next_entry::<Checked, Checked>()?.is_some() {}
    Ok(())
}

impl<'de, T: LenientKind> serde::de::Visitor<'de> for Lenient<T> {
    type Value = T;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
        T::object(map)
    }
    fn visit_u64<E>(self, count: u64) -> Result<T, E> {
        Ok(T::unsigned(count))
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<T, A::Error> {
        while seq.next_element::<Checked>()?.is_some() {}
        Ok(T::default())
    }
    // Negative and fractional numbers (and integers past `u64`), strings, booleans, null.
    fn visit_i64<E>(self, _: i64) -> Result<T, E> {
        Ok(T::default())
    }
    fn visit_f64<E>(self, _: f64) -> Result<T, E> {
        Ok(T::default())
    }
    fn visit_str<E>(self, _: &str) -> Result<T, E> {
        Ok(T::default())
    }
    fn visit_bool<E>(self, _: bool) -> Result<T, E> {
        Ok(T::default())
    }
    fn visit_unit<E>(self) -> Result<T, E> {
        Ok(T::default())
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
    json!(OpenAiUsage::from(usage))
}

/// OpenAI's `usage`, as [`openai_usage_value`] gives it.
#[derive(serde::Serialize)]
pub(super) struct OpenAiUsage {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
    prompt_tokens_details: PromptDetails,
}

#[derive(serde::Serialize)]
struct PromptDetails {
    cached_tokens: u64,
    cache_creation_tokens: u64,
}

impl From<Usage> for OpenAiUsage {
    fn from(usage: Usage) -> Self {
        Self {
            prompt_tokens: usage.input,
            completion_tokens: usage.output,
            total_tokens: usage.input.saturating_add(usage.output),
            prompt_tokens_details: PromptDetails {
                cached_tokens: usage.cache_read,
                cache_creation_tokens: usage.cache_creation,
            },
        }
    }
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use proptest::prelude::*;

    /// Values a `usage` figure may hold: counts, and what is read as 0.
    fn figure() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec![
            "0",
            "7",
            "2006",
            "18446744073709551615",
            "18446744073709551616",
            "-3",
            "1.5",
            "1e2",
            "null",
            "true",
            "\"12\"",
            "[1,2]",
            "{\"input_tokens\":9}",
        ])
    }

    fn key() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec![
            "input_tokens",
            "output_tokens",
            "cache_read_input_tokens",
            "cache_creation_input_tokens",
            // Escaped names decode to the figures' own.
            "input\\u005ftokens",
            "\\u006futput_tokens",
            "cache_creation",
            "service_tier",
            "",
        ])
    }

    /// A `usage` value: mostly an object of figures (a key now and then twice), sometimes
    /// another kind of value.
    fn usage() -> impl Strategy<Value = String> {
        let object = prop::collection::vec((key(), figure()), 0..8).prop_map(|members| {
            let members: Vec<String> = members
                .iter()
                .map(|(key, value)| format!("\"{key}\" : {value}"))
                .collect();
            format!("{{{}}}", members.join(","))
        });
        prop_oneof![8 => object, 1 => figure().prop_map(str::to_owned)]
    }

    proptest! {
        /// Read from its text, a `usage` gives the figures its parsed value gives.
        #[test]
        fn a_usage_read_from_its_text_reads_as_its_value(usage in usage(), rest in "[ ,}\\]a]{0,3}") {
            let value: Value = serde_json::from_str(&usage).unwrap();
            let text = usage.clone() + &rest;
            prop_assert_eq!(anthropic_usage_in(text.as_bytes()), Some(anthropic_usage(&value)), "{}", usage);
        }
    }

    #[test]
    fn a_usage_that_is_not_json_reads_as_nothing() {
        for text in [
            "",
            "{\"input_tokens\":1",
            "{\"input_tokens\" 1}",
            "nul",
            "{\"a\":[}",
            // What the parse into a `Value` refuses, in members not read, too.
            "{\"input_tokens\":1,\"x\":1e400}",
            "{\"input_tokens\":1,\"x\":[\"\\ud800\"]}",
            "{\"input_tokens\":{\"x\":1e400}}",
            "[1e400]",
            &format!(
                "{{\"input_tokens\":1,\"x\":{}{}}}",
                "[".repeat(128),
                "]".repeat(128)
            ),
        ] {
            assert!(serde_json::from_str::<Value>(text).is_err(), "{text}");
            assert_eq!(anthropic_usage_in(text.as_bytes()), None, "{text}");
        }
        let figures = anthropic_usage_in(
            br#"{"input_tokens":3,"cache_read_input_tokens":4,"output_tokens":5}"#,
        );
        assert_eq!(
            figures,
            Some(Usage {
                input: 7,
                output: 5,
                cache_read: 4,
                cache_creation: 0
            })
        );
    }
}
