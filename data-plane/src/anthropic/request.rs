//! Requests, both ways: a chat completions body for an Anthropic backend
//! ([`chat_to_messages`]) and a Messages body for an OpenAI-format backend
//! ([`messages_to_chat`]), each from the body's parse into values; a body in the shape most are
//! is written straight from its members instead ([`chat_to_messages_in_shape`],
//! [`messages_to_chat_in_shape`]), held to the first by the property tests below.

use serde_json::{Map, Value, json};

use super::{Sampling, Untranslatable, portable_tool_id, portable_tool_name};

mod as_written;
mod to_chat;
mod to_messages;

pub use to_chat::messages_to_chat_in_shape;

/// The longest chat `user` written: OpenAI-compatible backends refuse longer ones (64 at
/// OpenAI and GitHub Copilot, 128 at OpenRouter), and Claude Code's `metadata.user_id` is
/// about 150 characters.
const MAX_CHAT_USER: usize = 64;

/// The longest Anthropic `metadata.user_id` written (Anthropic's limit).
const MAX_USER_ID: usize = 256;

/// The chat `user` for a Messages `metadata.user_id`: as it is, or its SHA-256 in hex (64
/// characters, as opaque and as stable) when it is longer than backends take.
pub(crate) fn chat_user(user_id: &str) -> std::borrow::Cow<'_, str> {
    if user_id.len() <= MAX_CHAT_USER {
        return user_id.into();
    }
    hex_sha256(user_id).into()
}

/// The Messages `metadata.user_id` for a chat `user`: as it is, or its SHA-256 in hex where
/// Anthropic would refuse it: past its length, or an e-mail address (it asks for opaque ids
/// and refuses identifying ones; chat applications often send the user's address).
pub(crate) fn messages_user_id(user: &str) -> std::borrow::Cow<'_, str> {
    if user.len() <= MAX_USER_ID && !user.contains('@') {
        return user.into();
    }
    hex_sha256(user).into()
}

fn hex_sha256(text: &str) -> String {
    use sha2::{Digest, Sha256};
    use std::fmt::Write as _;
    Sha256::digest(text.as_bytes())
        .iter()
        .fold(String::with_capacity(64), |mut hex, byte| {
            let _ = write!(hex, "{byte:02x}");
            hex
        })
}
pub use to_messages::chat_to_messages_in_shape;

/// What a translated request carries when its client asked for prompt caching
/// (`prompt_cache_key`, `prompt_cache_retention`, `prompt_cache_options` not in `explicit`
/// mode or a part marked with `prompt_cache_breakpoint`; [`CacheOptions::automatic`]): Anthropic's
/// automatic caching, a breakpoint at the prompt's last block that moves with the
/// conversation. Five minutes: a 1-hour write (what `"24h"` would ask for) is billed at twice
/// the input price, which a chat client's retention is not taken to ask. As written by the
/// in-shape writer; the
/// value translation writes the same (the property tests hold them together).
const CACHE_CONTROL: &[u8] = br#","cache_control":{"type":"ephemeral"}"#;

/// The most `cache_control` breakpoints Anthropic takes in a request (it refuses more); the
/// top-level automatic caching takes one of them.
const MAX_BREAKPOINTS: usize = 4;

/// What OpenAI's `prompt_cache_options` (`{mode, ttl}`, `prompt_cache_retention`'s successor)
/// asks of a translated request: whether it was given (an object), whether its `mode` is
/// `explicit` (caching only at the content parts marked with `prompt_cache_breakpoint`, no
/// implicit breakpoint; `implicit`, the default, adds one), and the Anthropic `ttl` its `ttl`
/// names, if any (`"5m"` or `"1h"`; OpenAI's own `"30m"` has no Anthropic equivalent, and is
/// left to Anthropic's default, five minutes).
#[derive(Clone, Copy, Default)]
struct CacheOptions {
    given: bool,
    explicit: bool,
    ttl: Option<&'static str>,
}

impl CacheOptions {
    fn of(options: &Value) -> Self {
        let Some(options) = options.as_object() else {
            return Self::default();
        };
        Self {
            given: true,
            explicit: options.get("mode").and_then(Value::as_str) == Some("explicit"),
            ttl: match options.get("ttl").and_then(Value::as_str) {
                Some("5m") => Some("5m"),
                Some("1h") => Some("1h"),
                _ => None,
            },
        }
    }

    /// Whether the translated request carries Anthropic's automatic caching (the top-level
    /// `cache_control`), given whether `prompt_cache_key` or `prompt_cache_retention` asked
    /// for the cache and how many blocks the client marked: any of those, or the options,
    /// ask, unless the mode is `explicit`, which caches at the marks alone, as OpenAI does.
    fn automatic(self, asked: bool, marks: usize) -> bool {
        !self.explicit && (asked || self.given || marks > 0)
    }

    /// How many of the client's marks are written, the latest ones: Anthropic's four, less
    /// the automatic caching's (OpenAI, likewise, writes the latest three in `implicit` mode
    /// and the latest four in `explicit`).
    fn kept(automatic: bool) -> usize {
        MAX_BREAKPOINTS - usize::from(automatic)
    }

    /// A mark's `cache_control` as written by the in-shape writer (the value translation
    /// writes the same).
    fn breakpoint(self) -> &'static [u8] {
        match self.ttl {
            Some("1h") => br#","cache_control":{"type":"ephemeral","ttl":"1h"}"#,
            Some(_) => br#","cache_control":{"type":"ephemeral","ttl":"5m"}"#,
            None => CACHE_CONTROL,
        }
    }

    fn breakpoint_value(self) -> Value {
        match self.ttl {
            Some(ttl) => json!({"type": "ephemeral", "ttl": ttl}),
            None => json!({"type": "ephemeral"}),
        }
    }
}

/// Whether a chat content part marks the end of a prefix to cache: its
/// `prompt_cache_breakpoint` (`{mode: "explicit"}`) is an object.
fn marked(part: &Value) -> bool {
    part.get("prompt_cache_breakpoint")
        .is_some_and(Value::is_object)
}

/// A marked part's block, until [`keep_breakpoints`] writes the marks kept.
fn mark(block: &mut Value) {
    block["cache_control"] = json!({"type": "ephemeral"});
}

/// The marked blocks of `system` and `turns`, in the order of the prompt: the latest
/// [`CacheOptions::kept`] keep their `cache_control` (as `options` write it), the others lose
/// it. Whether the request also carries the automatic caching is returned (`asked`: whether
/// `prompt_cache_key` or `prompt_cache_retention` asked for the cache).
fn keep_breakpoints(
    system: &mut [Value],
    turns: &mut [Value],
    options: CacheOptions,
    asked: bool,
) -> bool {
    let mut marks: Vec<&mut Map<String, Value>> = system
        .iter_mut()
        .chain(
            turns
                .iter_mut()
                .filter_map(|turn| turn.get_mut("content").and_then(Value::as_array_mut))
                .flatten(),
        )
        .filter_map(Value::as_object_mut)
        .filter(|block| block.contains_key("cache_control"))
        .collect();
    let automatic = options.automatic(asked, marks.len());
    let dropped = marks.len().saturating_sub(CacheOptions::kept(automatic));
    for (i, block) in marks.iter_mut().enumerate() {
        if i < dropped {
            block.remove("cache_control");
        } else {
            block.insert("cache_control".into(), options.breakpoint_value());
        }
    }
    automatic
}

/// A chat completions request → the Messages request for `model`. `default_max_tokens` fills
/// `max_tokens` when the client gave neither `max_tokens` nor `max_completion_tokens`
/// (Anthropic requires it). Anything the Messages API cannot express is an [`Untranslatable`].
pub fn chat_to_messages(
    chat: &Map<String, Value>,
    model: &str,
    default_max_tokens: u32,
    sampling: Sampling,
) -> Result<Map<String, Value>, Untranslatable> {
    let mut out = Map::new();
    out.insert("model".into(), Value::from(model));
    let max_tokens = match chat
        .get("max_completion_tokens")
        .filter(|v| !v.is_null())
        .or_else(|| chat.get("max_tokens").filter(|v| !v.is_null()))
    {
        Some(v) => v
            .as_u64()
            .ok_or_else(|| Untranslatable::new("max_tokens", "max_tokens must be an integer."))?,
        None => u64::from(default_max_tokens),
    };
    out.insert("max_tokens".into(), Value::from(max_tokens));
    let messages = chat
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| Untranslatable::new("messages", "messages must be an array."))?;
    let (mut system, mut turns) = chat_messages(messages)?;
    // Prompt caching: the client's marks (the latest Anthropic takes), and the automatic
    // caching when it asked for the cache.
    let asked = ["prompt_cache_key", "prompt_cache_retention"]
        .iter()
        .any(|key| chat.get(*key).is_some_and(Value::is_string));
    let options = chat
        .get("prompt_cache_options")
        .map(CacheOptions::of)
        .unwrap_or_default();
    if keep_breakpoints(&mut system, &mut turns, options, asked) {
        out.insert("cache_control".into(), json!({"type": "ephemeral"}));
    }
    if !system.is_empty() {
        out.insert("system".into(), Value::Array(system));
    }
    out.insert("messages".into(), Value::Array(turns));
    // Anthropic's current models take `temperature` or `top_p`, not both (400): with both,
    // `temperature` is sent (chat clients often send `top_p: 1` besides, a no-op). Versions
    // from 2026-10-21 take neither.
    let has_temperature = chat.get("temperature").is_some_and(|t| !t.is_null());
    let mut allowed_tools = None;
    for (key, value) in chat {
        match key.as_str() {
            "model" | "messages" => {}
            "temperature" | "top_p" if sampling == Sampling::Removed => {}
            "top_p" if has_temperature => {}
            "temperature" | "top_p" | "stream" if !value.is_null() => {
                out.insert(key.clone(), value.clone());
            }
            "stop" => match value {
                Value::Null => {}
                Value::String(s) if sendable_stop(s) => {
                    out.insert("stop_sequences".into(), json!([s]));
                }
                Value::Array(stops)
                    if stops.iter().all(|s| s.as_str().is_none_or(sendable_stop)) =>
                {
                    out.insert("stop_sequences".into(), value.clone());
                }
                Value::String(_) | Value::Array(_) => {
                    return Err(Untranslatable::new(
                        "stop",
                        "An Anthropic backend refuses a stop sequence that is empty or only \
                         whitespace.",
                    ));
                }
                _ => {
                    return Err(Untranslatable::new(
                        "stop",
                        "stop must be a string or an array.",
                    ));
                }
            },
            "tools" if !value.is_null() => {
                out.insert("tools".into(), chat_tools(value)?);
            }
            "tool_choice" if !value.is_null() => {
                let (choice, allowed) = chat_tool_choice(value)?;
                out.insert("tool_choice".into(), choice);
                allowed_tools = allowed;
            }
            "n" if value.as_u64().is_some_and(|n| n > 1) => {
                return Err(Untranslatable::new(
                    "n",
                    "An Anthropic backend returns one choice per request; n must be 1.",
                ));
            }
            "logprobs" if value.as_bool() == Some(true) => {
                return Err(Untranslatable::new(
                    "logprobs",
                    "An Anthropic backend does not return log probabilities.",
                ));
            }
            "response_format" => {
                if let Some(format) = output_format(value)? {
                    out.insert("output_config".into(), json!({ "format": format }));
                }
            }
            // The legacy tools: dropped, the model answered in prose, with a 200 and no call.
            "functions" | "function_call" if !value.is_null() => {
                return Err(Untranslatable::new(
                    key.clone(),
                    "An Anthropic backend takes tools as `tools` and `tool_choice`, not the \
                     legacy `functions` and `function_call`.",
                ));
            }
            "modalities" | "audio" if !value.is_null() && value != &json!(["text"]) => {
                return Err(Untranslatable::new(
                    key.clone(),
                    "An Anthropic backend answers with text only.",
                ));
            }
            _ => {}
        }
    }
    if let Some(allowed) = allowed_tools {
        keep_allowed_tools(&mut out, &allowed)?;
    }
    // The end user, for the provider's abuse detection: `user`, or `safety_identifier`, the
    // member OpenAI now asks for in its place (`user` wins when both are given).
    if let Some(user) = ["user", "safety_identifier"]
        .iter()
        .find_map(|key| chat.get(*key).and_then(Value::as_str))
    {
        out.insert(
            "metadata".into(),
            json!({ "user_id": messages_user_id(user) }),
        );
    }
    // One call at a time, under `auto` if no choice; nothing to say with no tools, or none
    // to call (Anthropic's `none` has no such member).
    if chat.get("parallel_tool_calls") == Some(&Value::Bool(false)) && out.contains_key("tools") {
        let choice = out
            .entry("tool_choice")
            .or_insert_with(|| json!({"type": "auto"}));
        if let Some(choice) = choice.as_object_mut()
            && choice.get("type") != Some(&Value::from("none"))
        {
            choice.insert("disable_parallel_tool_use".into(), Value::Bool(true));
        }
    }
    Ok(out)
}

/// A chat `response_format` → the Messages `output_config.format` (`None` for text, the
/// default): a `json_schema` format's schema as Anthropic's structured outputs take it
/// ([`anthropic_schema`]); its models answer with the JSON as their text, which is the
/// completion's content, as the SDKs' `parse` reads it. `json_object` names no schema:
/// refused.
fn output_format(format: &Value) -> Result<Option<Value>, Untranslatable> {
    match format.get("type").and_then(Value::as_str) {
        None | Some("text") => Ok(None),
        Some("json_schema") => {
            let schema = format
                .get("json_schema")
                .and_then(|s| s.get("schema"))
                .filter(|schema| schema.is_object())
                .ok_or_else(|| {
                    Untranslatable::new(
                        "response_format.json_schema.schema",
                        "A json_schema response_format needs its schema (an object).",
                    )
                })?;
            let schema = anthropic_schema(schema).ok_or_else(|| {
                Untranslatable::new(
                    "response_format.json_schema.schema",
                    "A schema Anthropic's structured outputs take needs a type, enum, anyOf, \
                     oneOf or allOf at every level.",
                )
            })?;
            Ok(Some(json!({"type": "json_schema", "schema": schema})))
        }
        _ => Err(Untranslatable::new(
            "response_format",
            "Only a json_schema (or text) response_format can be sent to an Anthropic backend.",
        )),
    }
}

/// String formats Anthropic's structured outputs take.
const SCHEMA_STRING_FORMATS: [&str; 10] = [
    "date-time",
    "time",
    "date",
    "duration",
    "email",
    "hostname",
    "uri",
    "ipv4",
    "ipv6",
    "uuid",
];

/// A JSON schema as Anthropic's structured outputs take it, rewritten as its own SDK does
/// before sending one (`transform_schema` in anthropic-sdk-python): every object closed
/// (`additionalProperties: false`), `oneOf` as `anyOf`, and the keywords it does not take
/// (`minimum`, `maxLength`, `pattern`, `minItems` past 1, a string format not its own, …)
/// moved into the `description` as `{key: value, …}`, so that the model may still follow
/// them. `None` for a schema (or a part of one) with none of `type`, `enum`, `anyOf`,
/// `oneOf`, `allOf` or `$ref`, which the SDK refuses too.
fn anthropic_schema(schema: &Value) -> Option<Value> {
    let mut rest = schema.as_object()?.clone();
    let mut out = Map::new();
    if let Some(defs) = rest.remove("$defs") {
        let defs = defs
            .as_object()?
            .iter()
            .map(|(name, def)| Some((name.clone(), anthropic_schema(def)?)))
            .collect::<Option<Map<_, _>>>()?;
        out.insert("$defs".into(), Value::Object(defs));
    }
    if let Some(reference) = rest.remove("$ref") {
        out.insert("$ref".into(), reference);
        return Some(Value::Object(out));
    }
    let kind = rest.remove("type");
    let variants = |list: &Value| -> Option<Value> {
        list.as_array()?
            .iter()
            .map(anthropic_schema)
            .collect::<Option<Vec<_>>>()
            .map(Value::Array)
    };
    let (enumeration, any_of, one_of, all_of) = (
        rest.remove("enum"),
        rest.remove("anyOf"),
        rest.remove("oneOf"),
        rest.remove("allOf"),
    );
    match (&enumeration, &any_of, &one_of, &all_of) {
        (Some(Value::Array(values)), ..) => {
            let values = values
                .iter()
                .map(|v| match v {
                    Value::Object(_) => anthropic_schema(v),
                    v => Some(v.clone()),
                })
                .collect::<Option<Vec<_>>>()?;
            out.insert("enum".into(), Value::Array(values));
        }
        (_, Some(list @ Value::Array(_)), ..) => {
            out.insert("anyOf".into(), variants(list)?);
        }
        (_, _, Some(list @ Value::Array(_)), _) => {
            out.insert("anyOf".into(), variants(list)?);
        }
        (_, _, _, Some(list @ Value::Array(_))) => {
            out.insert("allOf".into(), variants(list)?);
        }
        _ => {
            out.insert("type".into(), kind.clone()?);
        }
    }
    for key in ["description", "title"] {
        if let Some(value) = rest.remove(key) {
            out.insert(key.into(), value);
        }
    }
    match kind.as_ref().and_then(Value::as_str) {
        Some("object") => {
            let properties = match rest.remove("properties") {
                Some(Value::Object(properties)) => properties
                    .iter()
                    .map(|(name, property)| Some((name.clone(), anthropic_schema(property)?)))
                    .collect::<Option<Map<_, _>>>()?,
                _ => Map::new(),
            };
            out.insert("properties".into(), Value::Object(properties));
            rest.remove("additionalProperties");
            out.insert("additionalProperties".into(), Value::Bool(false));
            if let Some(required) = rest.remove("required") {
                out.insert("required".into(), required);
            }
        }
        Some("string") => {
            if let Some(format) = rest.remove("format") {
                if format
                    .as_str()
                    .is_some_and(|f| SCHEMA_STRING_FORMATS.contains(&f))
                {
                    out.insert("format".into(), format);
                } else {
                    rest.insert("format".into(), format);
                }
            }
        }
        Some("array") => {
            if let Some(items) = rest.remove("items") {
                out.insert("items".into(), anthropic_schema(&items)?);
            }
            if let Some(least) = rest.remove("minItems") {
                if matches!(least.as_u64(), Some(0 | 1)) {
                    out.insert("minItems".into(), least);
                } else {
                    rest.insert("minItems".into(), least);
                }
            }
        }
        _ => {}
    }
    if !rest.is_empty() {
        let unsupported = rest
            .iter()
            .map(|(key, value)| format!("{key}: {value}"))
            .collect::<Vec<_>>()
            .join(", ");
        let description = match out.get("description").and_then(Value::as_str) {
            Some(description) => format!("{description}\n\n{{{unsupported}}}"),
            None => format!("{{{unsupported}}}"),
        };
        out.insert("description".into(), Value::from(description));
    }
    Some(Value::Object(out))
}

/// Whether Anthropic takes `stop` as a stop sequence: it refuses one that is empty or only
/// whitespace (`stop: "\n"`, which completion-style clients send), the whole request with it.
pub(super) fn sendable_stop(stop: &str) -> bool {
    !stop.trim().is_empty()
}

/// The chat `messages` → (top-level `system` blocks, Messages turns with same-role turns merged).
///
/// Every `system` and `developer` message goes to the top-level `system`, wherever it stands:
/// Anthropic takes `role: "system"` turns from one model alone, and only right after a user
/// turn. A message left with no block (an empty answer, whitespace alone: Anthropic refuses
/// both, and a chat client sends back the empty answers Claude gives) is left out, its
/// neighbours merging when they are of one role; with no turn left, untranslatable, and so
/// when the turns would end with an assistant's that the client did not send last (Anthropic
/// continues a last assistant turn, a prefill, instead of answering).
fn chat_messages(messages: &[Value]) -> Result<(Vec<Value>, Vec<Value>), Untranslatable> {
    let mut system = Vec::new();
    let mut turns: Vec<(String, Vec<Value>)> = Vec::new();
    // Whether the client's last message is the last turn's (not left out, nor `system`).
    let mut last_kept = false;
    for (i, message) in messages.iter().enumerate() {
        last_kept = false;
        let at = |field: &str| format!("messages[{i}]{field}");
        let role = message
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| Untranslatable::new(at(".role"), "Each message needs a role."))?;
        let content = message.get("content").unwrap_or(&Value::Null);
        let (role, blocks) = match role {
            "system" | "developer" => {
                system.extend(text_blocks(content, &at(".content"))?);
                continue;
            }
            "user" => ("user", user_blocks(content, &at(".content"))?),
            "assistant" => ("assistant", assistant_blocks(message, &at)?),
            "tool" => {
                let id = message
                    .get("tool_call_id")
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        Untranslatable::new(
                            at(".tool_call_id"),
                            "A tool message needs a tool_call_id.",
                        )
                    })?;
                let mut result =
                    json!({"type": "tool_result", "tool_use_id": portable_tool_id(id.into())});
                let mut text = text_blocks(content, &at(".content"))?;
                // A mark on one of its parts marks the result: the end of its content.
                let mut marked = false;
                for block in text.iter_mut().filter_map(Value::as_object_mut) {
                    marked |= block.remove("cache_control").is_some();
                }
                if !text.is_empty() {
                    result["content"] = Value::Array(text);
                }
                if marked {
                    mark(&mut result);
                }
                ("user", vec![result])
            }
            other => {
                return Err(Untranslatable::new(
                    at(".role"),
                    format!(
                        "The role `{}` cannot be sent to an Anthropic backend.",
                        sluice_domain::text::quoted(other)
                    ),
                ));
            }
        };
        last_kept = !blocks.is_empty();
        match turns.last_mut() {
            _ if blocks.is_empty() => {}
            Some((last, merged)) if last == role => merged.extend(blocks),
            _ => turns.push((role.to_owned(), blocks)),
        }
    }
    if turns.is_empty() {
        return Err(Untranslatable::new("messages", NO_TURN));
    }
    if !last_kept && turns.last().is_some_and(|(role, _)| role == "assistant") {
        return Err(Untranslatable::new("messages", PREFILLED));
    }
    let turns = turns
        .into_iter()
        .map(|(role, content)| json!({"role": role, "content": content}))
        .collect();
    Ok((system, turns))
}

/// Why a chat request with no user or assistant message of any content cannot go to an
/// Anthropic backend, which refuses an empty `messages`.
const NO_TURN: &str = "An Anthropic backend needs at least one user or assistant message with content; every message here is a system message or empty.";

/// Why a chat request whose last messages are empty or system messages, after an assistant's,
/// cannot go to an Anthropic backend: it would continue that assistant message.
const PREFILLED: &str = "The last message is empty or a system message, after an assistant message: an Anthropic backend would continue that assistant message instead of answering. End with the user's message.";

/// Whether Anthropic refuses `text` as a text block's: empty, or whitespace alone ("text
/// content blocks must contain non-whitespace text"). Such text carries nothing and is left
/// out.
pub(super) fn blank(text: &str) -> bool {
    text.trim().is_empty()
}

/// String or text parts → text blocks (blank ones dropped: Anthropic refuses them).
fn text_blocks(content: &Value, at: &str) -> Result<Vec<Value>, Untranslatable> {
    match content {
        Value::Null => Ok(Vec::new()),
        Value::String(s) if blank(s) => Ok(Vec::new()),
        Value::String(s) => Ok(vec![json!({"type": "text", "text": s})]),
        Value::Array(parts) => {
            let mut blocks = Vec::new();
            for (j, part) in parts.iter().enumerate() {
                match part.get("type").and_then(Value::as_str) {
                    Some("text") => {
                        if let Some(text) = part.get("text").and_then(Value::as_str)
                            && !blank(text)
                        {
                            let mut block = json!({"type": "text", "text": text});
                            if marked(part) {
                                mark(&mut block);
                            }
                            blocks.push(block);
                        }
                    }
                    _ => {
                        return Err(Untranslatable::new(
                            format!("{at}[{j}]"),
                            "Only text parts are allowed here.",
                        ));
                    }
                }
            }
            Ok(blocks)
        }
        _ => Err(Untranslatable::new(
            at,
            "content must be a string or an array of parts.",
        )),
    }
}

fn user_blocks(content: &Value, at: &str) -> Result<Vec<Value>, Untranslatable> {
    let Value::Array(parts) = content else {
        return text_blocks(content, at);
    };
    let mut blocks = Vec::new();
    for (j, part) in parts.iter().enumerate() {
        let here = format!("{at}[{j}]");
        match part.get("type").and_then(Value::as_str) {
            Some("text") => blocks.extend(text_blocks(&json!([part]), &here)?),
            Some("image_url") => {
                let url = part
                    .get("image_url")
                    .and_then(|u| u.get("url").or(Some(u)))
                    .and_then(Value::as_str)
                    .ok_or_else(|| Untranslatable::new(&here, "An image part needs a url."))?;
                let mut block = json!({"type": "image", "source": image_source(url, &here)?});
                if marked(part) {
                    mark(&mut block);
                }
                blocks.push(block);
            }
            other => {
                return Err(Untranslatable::new(
                    here,
                    format!(
                        "Content parts of type `{}` cannot be sent to an Anthropic backend.",
                        sluice_domain::text::quoted(other.unwrap_or("(none)"))
                    ),
                ));
            }
        }
    }
    Ok(blocks)
}

/// The media type of a base64 image as Anthropic takes it: what the data's first bytes say
/// when they are one of its four types (OpenAI reads the bytes; Anthropic refuses an image
/// whose label is wrong, "Image does not match the provided media type", and a JPEG is often
/// labelled `image/png` by tools that screenshot), else the label with its parameters left
/// out and `image/jpg`, which browsers and pasteboards write and Anthropic refuses, read as
/// `image/jpeg`.
fn image_media_type<'a>(label: &'a str, data: &str) -> &'a str {
    use base64::Engine as _;
    // Twelve bytes say which of the four: JPEG's FF D8 FF, PNG's signature, GIF8, RIFF….WEBP.
    let mut head = [0u8; 12];
    let decoded = data.get(..16).is_some_and(|start| {
        base64::engine::general_purpose::STANDARD
            .decode_slice(start, &mut head)
            .is_ok()
    });
    if decoded {
        match head {
            [0xFF, 0xD8, 0xFF, ..] => return "image/jpeg",
            [0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A, ..] => return "image/png",
            [b'G', b'I', b'F', b'8', ..] => return "image/gif",
            [b'R', b'I', b'F', b'F', _, _, _, _, b'W', b'E', b'B', b'P'] => return "image/webp",
            _ => {}
        }
    }
    let label = label.split(';').next().unwrap_or(label).trim();
    if label.eq_ignore_ascii_case("image/jpg") {
        return "image/jpeg";
    }
    label
}

/// A `data:` URL → a base64 source with its media type; an http(s) URL → a url source.
fn image_source(url: &str, at: &str) -> Result<Value, Untranslatable> {
    if let Some(rest) = url.strip_prefix("data:") {
        let (media_type, data) = rest
            .split_once(";base64,")
            .ok_or_else(|| Untranslatable::new(at, "An image data URL must be base64 encoded."))?;
        let media_type = image_media_type(media_type, data);
        return Ok(json!({"type": "base64", "media_type": media_type, "data": data}));
    }
    if url.starts_with("https://") || url.starts_with("http://") {
        return Ok(json!({"type": "url", "url": url}));
    }
    Err(Untranslatable::new(
        at,
        "An image url must be a data: or http(s) URL.",
    ))
}

fn assistant_blocks(
    message: &Value,
    at: &dyn Fn(&str) -> String,
) -> Result<Vec<Value>, Untranslatable> {
    let mut blocks = Vec::new();
    match message.get("content").unwrap_or(&Value::Null) {
        Value::Array(parts) => {
            for (j, part) in parts.iter().enumerate() {
                // A refusal part takes no mark (OpenAI's type has none).
                let (text, marked) = match part.get("type").and_then(Value::as_str) {
                    Some("text") => (part.get("text"), marked(part)),
                    Some("refusal") => (part.get("refusal"), false),
                    _ => {
                        return Err(Untranslatable::new(
                            at(&format!(".content[{j}]")),
                            "Only text and refusal parts are allowed in an assistant message.",
                        ));
                    }
                };
                if let Some(text) = text.and_then(Value::as_str)
                    && !blank(text)
                {
                    let mut block = json!({"type": "text", "text": text});
                    if marked {
                        mark(&mut block);
                    }
                    blocks.push(block);
                }
            }
        }
        content => blocks.extend(text_blocks(content, &at(".content"))?),
    }
    // An answer refused (`content: null` beside it, as the chat API answers a refusal and a
    // client sends the message back): its text is the turn's.
    match message.get("refusal") {
        None | Some(Value::Null) => {}
        Some(Value::String(refusal)) => {
            if !blank(refusal) {
                blocks.push(json!({"type": "text", "text": refusal}));
            }
        }
        Some(_) => {
            return Err(Untranslatable::new(
                at(".refusal"),
                "refusal must be a string.",
            ));
        }
    }
    let calls = match message.get("tool_calls") {
        None | Some(Value::Null) => return Ok(blocks),
        Some(Value::Array(calls)) => calls,
        Some(_) => {
            return Err(Untranslatable::new(
                at(".tool_calls"),
                "tool_calls must be an array.",
            ));
        }
    };
    for (k, call) in calls.iter().enumerate() {
        let here = |field: &str| at(&format!(".tool_calls[{k}]{field}"));
        let id = call
            .get("id")
            .and_then(Value::as_str)
            .map(|id| portable_tool_id(id.into()))
            .ok_or_else(|| Untranslatable::new(here(".id"), "A tool call needs an id."))?;
        let function = call.get("function");
        let name = function
            .and_then(|f| f.get("name"))
            .and_then(Value::as_str)
            .ok_or_else(|| {
                Untranslatable::new(here(".function.name"), "A tool call needs a name.")
            })?;
        let arguments = function
            .and_then(|f| f.get("arguments"))
            .and_then(Value::as_str)
            .unwrap_or("");
        let input = if arguments.trim().is_empty() {
            json!({})
        } else {
            match serde_json::from_str::<Value>(arguments) {
                Ok(input @ Value::Object(_)) => input,
                Ok(_) => {
                    return Err(Untranslatable::new(
                        here(".function.arguments"),
                        "Tool call arguments must be a JSON object.",
                    ));
                }
                Err(e) => {
                    return Err(Untranslatable::new(
                        here(".function.arguments"),
                        format!("Tool call arguments are not valid JSON ({e})."),
                    ));
                }
            }
        };
        blocks.push(json!({"type": "tool_use", "id": id, "name": name, "input": input}));
    }
    Ok(blocks)
}

/// A chat function tool's `parameters` as the input schema of a strict Anthropic tool, when
/// its `strict` is `true`: rewritten as for `response_format` ([`anthropic_schema`]), since
/// Anthropic's strict mode takes the same subset of JSON Schema as its structured outputs.
/// `None` for a tool not strict, or a schema that cannot be rewritten so (sent as given, not
/// strict, as before).
fn strict_input_schema(strict: Option<&Value>, schema: &Value) -> Option<Value> {
    (strict == Some(&Value::Bool(true)))
        .then(|| anthropic_schema(schema))
        .flatten()
}

fn chat_tools(tools: &Value) -> Result<Value, Untranslatable> {
    let tools = tools
        .as_array()
        .ok_or_else(|| Untranslatable::new("tools", "tools must be an array."))?;
    let mut out = Vec::with_capacity(tools.len());
    for (i, tool) in tools.iter().enumerate() {
        let function = tool
            .get("function")
            .filter(|_| tool.get("type").and_then(Value::as_str) == Some("function"))
            .ok_or_else(|| {
                Untranslatable::new(
                    format!("tools[{i}]"),
                    "Only function tools can be sent to an Anthropic backend.",
                )
            })?;
        let name = function
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                Untranslatable::new(format!("tools[{i}].function.name"), "A tool needs a name.")
            })?;
        let mut converted = Map::new();
        converted.insert("name".into(), Value::from(name));
        if let Some(description) = function.get("description").filter(|d| !d.is_null()) {
            converted.insert("description".into(), description.clone());
        }
        let schema = function
            .get("parameters")
            .filter(|p| !p.is_null())
            .cloned()
            .unwrap_or_else(|| json!({"type": "object", "properties": {}}));
        match strict_input_schema(function.get("strict"), &schema) {
            Some(strict) => {
                converted.insert("input_schema".into(), strict);
                converted.insert("strict".into(), Value::Bool(true));
            }
            None => {
                converted.insert("input_schema".into(), schema);
            }
        }
        out.push(Value::Object(converted));
    }
    Ok(Value::Array(out))
}

/// A chat `tool_choice` → the Messages `tool_choice`, and for `allowed_tools` the names of the
/// tools it allows, which [`keep_allowed_tools`] keeps alone: Anthropic has no choice among
/// some tools, but a model offered those alone may call them alone.
fn chat_tool_choice(choice: &Value) -> Result<(Value, Option<Vec<String>>), Untranslatable> {
    match choice {
        Value::String(s) => match s.as_str() {
            "auto" => Ok((json!({"type": "auto"}), None)),
            "required" => Ok((json!({"type": "any"}), None)),
            "none" => Ok((json!({"type": "none"}), None)),
            _ => Err(Untranslatable::new("tool_choice", "Unknown tool_choice.")),
        },
        Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("allowed_tools") => {
            allowed_tool_choice(o.get("allowed_tools"))
                .map(|(choice, allowed)| (choice, Some(allowed)))
        }
        Value::Object(o) => o
            .get("function")
            .and_then(|f| f.get("name"))
            .and_then(Value::as_str)
            .map(|name| (json!({"type": "tool", "name": name}), None))
            .ok_or_else(|| Untranslatable::new("tool_choice", "tool_choice must name a function.")),
        _ => Err(Untranslatable::new("tool_choice", "Unknown tool_choice.")),
    }
}

/// `tool_choice: {type: "allowed_tools", allowed_tools: {mode, tools}}` → `auto` (mode
/// `auto`) or `any` (mode `required`), and the names of the function tools it lists.
fn allowed_tool_choice(allowed: Option<&Value>) -> Result<(Value, Vec<String>), Untranslatable> {
    const AT: &str = "tool_choice.allowed_tools";
    let choice = match allowed.and_then(|a| a.get("mode")).and_then(Value::as_str) {
        Some("auto") => json!({"type": "auto"}),
        Some("required") => json!({"type": "any"}),
        _ => {
            return Err(Untranslatable::new(
                format!("{AT}.mode"),
                "allowed_tools.mode must be auto or required.",
            ));
        }
    };
    let tools = allowed
        .and_then(|a| a.get("tools"))
        .and_then(Value::as_array)
        .ok_or_else(|| {
            Untranslatable::new(
                format!("{AT}.tools"),
                "allowed_tools.tools must be an array.",
            )
        })?;
    let names = tools
        .iter()
        .enumerate()
        .map(|(i, tool)| {
            tool.get("function")
                .filter(|_| tool.get("type").and_then(Value::as_str) == Some("function"))
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| {
                    Untranslatable::new(
                        format!("{AT}.tools[{i}]"),
                        "An allowed tool must name a function tool.",
                    )
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((choice, names))
}

/// The Messages `tools` of `out` restricted to those `allowed` names; a name that is not
/// among them, or no tools at all, is untranslatable (the choice would allow nothing).
fn keep_allowed_tools(
    out: &mut Map<String, Value>,
    allowed: &[String],
) -> Result<(), Untranslatable> {
    let tools = out
        .get_mut("tools")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| {
            Untranslatable::new(
                "tool_choice.allowed_tools",
                "allowed_tools needs the tools it allows in `tools`.",
            )
        })?;
    let name = |tool: &Value| tool.get("name").and_then(Value::as_str).map(str::to_owned);
    if let Some(i) = allowed
        .iter()
        .position(|allowed| !tools.iter().any(|t| name(t).as_ref() == Some(allowed)))
    {
        return Err(Untranslatable::new(
            format!("tool_choice.allowed_tools.tools[{i}]"),
            "An allowed tool must be one of `tools`.",
        ));
    }
    tools.retain(|tool| name(tool).is_some_and(|n| allowed.contains(&n)));
    if tools.is_empty() {
        return Err(Untranslatable::new(
            "tool_choice.allowed_tools.tools",
            "allowed_tools must allow at least one tool.",
        ));
    }
    Ok(())
}

/// How many stop sequences OpenAI's own API takes (openai-python's `stop`: "Up to 4
/// sequences"); other OpenAI-compatible servers take more.
const OPENAI_MAX_STOPS: usize = 4;

/// Whether a chat backend is OpenAI's own API or Azure OpenAI, told by the limit member it is
/// given: `max_completion_tokens` is theirs alone ([`crate::snapshot::completion_limit_member`]).
fn openai_api(limit: &str) -> bool {
    limit == "max_completion_tokens"
}

/// Whether `model` on OpenAI's own API (or Azure, by that name) is a reasoning model, which
/// refuses a `temperature` or `top_p` other than the default ("Only the default (1) value is
/// supported") and `stop` ("Not supported with latest reasoning models", openai-python's
/// `stop`; GPT-5 likewise): the o-series, GPT-5 and Codex models.
fn openai_reasoning(model: &str, limit: &str) -> bool {
    let model = model.to_ascii_lowercase();
    let o_series = model
        .strip_prefix('o')
        .and_then(|rest| rest.chars().next())
        .is_some_and(|c| c.is_ascii_digit());
    openai_api(limit) && (o_series || model.starts_with("gpt-5") || model.starts_with("codex-"))
}

/// Why a Messages request's `stop_sequences` cannot go to a chat backend (see
/// [`openai_reasoning`], [`OPENAI_MAX_STOPS`]), given how many it has; `None` if they can (an
/// empty list, which goes to no reasoning model, always can).
fn stops_refused(count: usize, model: &str, limit: &str) -> Option<&'static str> {
    if count > 0 && openai_reasoning(model, limit) {
        Some("OpenAI's reasoning models take no stop sequences.")
    } else if count > OPENAI_MAX_STOPS && openai_api(limit) {
        Some("OpenAI takes at most 4 stop sequences.")
    } else {
        None
    }
}

/// A Messages request → the chat completions request for `model`, its `max_tokens` named
/// `limit` (`max_tokens` or `max_completion_tokens`, as the backend takes it). A stream asks
/// for the usage chunk (the Anthropic client gets its usage in `message_delta`).
pub fn messages_to_chat(
    messages: &Map<String, Value>,
    model: &str,
    limit: &str,
) -> Result<Map<String, Value>, Untranslatable> {
    let mut out = Map::new();
    out.insert("model".into(), Value::from(model));
    let mut chat = Vec::new();
    match messages.get("system") {
        None | Some(Value::Null) => {}
        Some(system) => {
            chat.push(json!({"role": "system", "content": joined_text(system, "system")?}))
        }
    }
    let turns = messages
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| Untranslatable::new("messages", "messages must be an array."))?;
    for (i, turn) in turns.iter().enumerate() {
        messages_turn(turn, i, &mut chat)?;
    }
    out.insert("messages".into(), Value::Array(chat));
    let reasoning = openai_reasoning(model, limit);
    for (key, value) in messages {
        match key.as_str() {
            "max_tokens" if !value.is_null() => {
                out.insert(limit.to_owned(), value.clone());
            }
            // A reasoning model refuses any but the default: its own sampling.
            "temperature" | "top_p" if reasoning => {}
            "temperature" | "top_p" | "stream" if !value.is_null() => {
                out.insert(key.clone(), value.clone());
            }
            "stop_sequences" if !value.is_null() => {
                let count = value.as_array().map_or(1, Vec::len);
                if let Some(why) = stops_refused(count, model, limit) {
                    return Err(Untranslatable::new("stop_sequences", why));
                }
                if !(reasoning && count == 0) {
                    out.insert("stop".into(), value.clone());
                }
            }
            // OpenAI refuses an empty list (`empty_array`): no tools is no member. Anything
            // but a list is refused.
            "tools" if !value.is_null() && value.as_array().is_none_or(|t| !t.is_empty()) => {
                out.insert("tools".into(), messages_tools(value)?);
            }
            "tool_choice" if !value.is_null() => {
                let (choice, serial) = messages_tool_choice(value)?;
                if let Some(choice) = choice {
                    out.insert("tool_choice".into(), choice);
                }
                if serial {
                    out.insert("parallel_tool_calls".into(), Value::Bool(false));
                }
            }
            "metadata" => {
                if let Some(user) = value.get("user_id").and_then(Value::as_str) {
                    out.insert("user".into(), Value::from(chat_user(user)));
                }
            }
            // Structured output: the answer must be JSON of the schema.
            "output_config" => {
                if let Some(format) = value.get("format").filter(|f| !f.is_null()) {
                    out.insert(
                        "response_format".into(),
                        response_format(format, "output_config.format")?,
                    );
                }
            }
            _ => {}
        }
    }
    // The older top-level `output_format`, which Anthropic still takes (older SDKs send it);
    // `output_config.format` wins.
    if let Some(format) = messages.get("output_format").filter(|f| !f.is_null())
        && !out.contains_key("response_format")
    {
        out.insert(
            "response_format".into(),
            response_format(format, "output_format")?,
        );
    }
    if !out.contains_key("tools") {
        // OpenAI refuses a tool choice without tools.
        out.remove("tool_choice");
        out.remove("parallel_tool_calls");
    }
    if out.get("stream") == Some(&Value::Bool(true)) {
        out.insert("stream_options".into(), json!({"include_usage": true}));
    }
    Ok(out)
}

/// A string or text blocks → one string (blocks joined with a blank line).
fn joined_text(content: &Value, at: &str) -> Result<String, Untranslatable> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Array(blocks) => {
            let mut texts = Vec::with_capacity(blocks.len());
            for (j, block) in blocks.iter().enumerate() {
                match block.get("type").and_then(Value::as_str) {
                    Some("text") => {
                        texts.push(block.get("text").and_then(Value::as_str).unwrap_or(""));
                    }
                    _ => {
                        return Err(Untranslatable::new(
                            format!("{at}[{j}]"),
                            "Only text blocks are allowed here.",
                        ));
                    }
                }
            }
            Ok(texts.join("\n\n"))
        }
        _ => Err(Untranslatable::new(
            at,
            "content must be a string or an array of blocks.",
        )),
    }
}

/// A `tool_result`'s content blocks → its text blocks' text (joined with a blank line, and
/// saying where its images are) and its images as chat content parts, after a text part naming
/// the call `id` they are of (a turn's results may hold images each).
fn result_text_and_images(
    blocks: &[Value],
    id: &str,
    at: &str,
) -> Result<(String, Vec<Value>), Untranslatable> {
    let mut texts = Vec::with_capacity(blocks.len());
    let label = format!("The images of the result of tool call {id}:");
    let mut images = vec![json!({"type": "text", "text": label})];
    for (j, block) in blocks.iter().enumerate() {
        match block.get("type").and_then(Value::as_str) {
            Some("text") => texts.push(block.get("text").and_then(Value::as_str).unwrap_or("")),
            Some("image") => images.push(json!({
                "type": "image_url",
                "image_url": {"url": image_url(block.get("source"), &format!("{at}[{j}]"))?},
            })),
            _ => {
                return Err(Untranslatable::new(
                    format!("{at}[{j}]"),
                    "Only text and image blocks are allowed here.",
                ));
            }
        }
    }
    let mut text = texts.join("\n\n");
    if images.len() == 1 {
        images.clear();
    } else {
        if !text.is_empty() {
            text.push_str("\n\n");
        }
        // Quoted whole: a backend's chat template may not show the model the call's id.
        text.push_str(&format!(
            "(Its images are in the next user message, after \"{label}\")"
        ));
    }
    Ok((text, images))
}

fn messages_turn(turn: &Value, i: usize, chat: &mut Vec<Value>) -> Result<(), Untranslatable> {
    let at = |field: &str| format!("messages[{i}]{field}");
    let role = turn
        .get("role")
        .and_then(Value::as_str)
        .ok_or_else(|| Untranslatable::new(at(".role"), "Each message needs a role."))?;
    let content = turn.get("content").unwrap_or(&Value::Null);
    match role {
        "system" => {
            chat.push(json!({"role": "system", "content": joined_text(content, &at(".content"))?}));
        }
        "user" => {
            let Value::Array(blocks) = content else {
                chat.push(
                    json!({"role": "user", "content": joined_text(content, &at(".content"))?}),
                );
                return Ok(());
            };
            // Tool results become `tool` messages, which must follow the assistant's calls
            // directly; the rest of the turn comes after them.
            let mut parts = Vec::new();
            for (j, block) in blocks.iter().enumerate() {
                let here = at(&format!(".content[{j}]"));
                match block.get("type").and_then(Value::as_str) {
                    Some("text") => parts.push(json!({
                        "type": "text",
                        "text": block.get("text").and_then(Value::as_str).unwrap_or(""),
                    })),
                    Some("image") => parts.push(json!({
                        "type": "image_url",
                        "image_url": {"url": image_url(block.get("source"), &here)?},
                    })),
                    Some("tool_result") => {
                        let id = block
                            .get("tool_use_id")
                            .and_then(Value::as_str)
                            .map(|id| portable_tool_id(id.into()))
                            .ok_or_else(|| {
                                Untranslatable::new(&here, "A tool_result needs a tool_use_id.")
                            })?;
                        let id = id.as_ref();
                        let mut text = match block.get("content") {
                            None | Some(Value::Null) => String::new(),
                            // A `tool` message holds text: the result's images go with the
                            // rest of the turn, after the turn's tool messages.
                            Some(Value::Array(result)) => {
                                let (text, images) =
                                    result_text_and_images(result, id, &format!("{here}.content"))?;
                                parts.extend(images);
                                text
                            }
                            Some(c) => joined_text(c, &format!("{here}.content"))?,
                        };
                        if block.get("is_error") == Some(&Value::Bool(true)) {
                            text = format!("Error: {text}");
                        }
                        chat.push(json!({"role": "tool", "tool_call_id": id, "content": text}));
                    }
                    other => {
                        return Err(Untranslatable::new(
                            here,
                            format!(
                                "Content blocks of type `{}` cannot be sent to an OpenAI-format backend.",
                                sluice_domain::text::quoted(other.unwrap_or("(none)"))
                            ),
                        ));
                    }
                }
            }
            if !parts.is_empty() {
                let content = if parts.iter().all(|p| p["type"] == "text") {
                    let texts: Vec<&str> =
                        parts.iter().filter_map(|p| p["text"].as_str()).collect();
                    Value::from(texts.join("\n\n"))
                } else {
                    Value::Array(parts)
                };
                chat.push(json!({"role": "user", "content": content}));
            }
        }
        "assistant" => {
            let blocks = match content {
                Value::Array(blocks) => blocks.as_slice(),
                _ => {
                    chat.push(json!({"role": "assistant", "content": joined_text(content, &at(".content"))?}));
                    return Ok(());
                }
            };
            let mut text = String::new();
            let mut calls = Vec::new();
            for (j, block) in blocks.iter().enumerate() {
                match block.get("type").and_then(Value::as_str) {
                    Some("text") => {
                        text.push_str(block.get("text").and_then(Value::as_str).unwrap_or(""))
                    }
                    // Reasoning of an earlier turn: a chat backend has nowhere to take it.
                    Some("thinking" | "redacted_thinking") => {}
                    Some("tool_use") => {
                        let id = portable_tool_id(
                            block
                                .get("id")
                                .and_then(Value::as_str)
                                .unwrap_or_default()
                                .into(),
                        );
                        let name = portable_tool_name(
                            block
                                .get("name")
                                .and_then(Value::as_str)
                                .unwrap_or_default()
                                .into(),
                        );
                        let input = block.get("input").cloned().unwrap_or_else(|| json!({}));
                        calls.push(json!({
                            "id": id,
                            "type": "function",
                            "function": {"name": name, "arguments": input.to_string()},
                        }));
                    }
                    other => {
                        return Err(Untranslatable::new(
                            at(&format!(".content[{j}]")),
                            format!(
                                "Content blocks of type `{}` cannot be sent to an OpenAI-format backend.",
                                sluice_domain::text::quoted(other.unwrap_or("(none)"))
                            ),
                        ));
                    }
                }
            }
            // Nothing at all (`[]`, or thinking alone: Anthropic takes an empty last assistant
            // turn) is left out: OpenAI refuses an assistant message with neither content nor
            // calls.
            if text.is_empty() && calls.is_empty() {
                return Ok(());
            }
            let mut message = json!({"role": "assistant", "content": if text.is_empty() { Value::Null } else { Value::from(text) }});
            if !calls.is_empty() {
                message["tool_calls"] = Value::Array(calls);
            }
            chat.push(message);
        }
        other => {
            return Err(Untranslatable::new(
                at(".role"),
                format!("Unknown role `{}`.", sluice_domain::text::quoted(other)),
            ));
        }
    }
    Ok(())
}

fn image_url(source: Option<&Value>, at: &str) -> Result<String, Untranslatable> {
    let source = source.ok_or_else(|| Untranslatable::new(at, "An image needs a source."))?;
    match source.get("type").and_then(Value::as_str) {
        Some("base64") => {
            let media = source
                .get("media_type")
                .and_then(Value::as_str)
                .unwrap_or("image/png");
            let data = source.get("data").and_then(Value::as_str).unwrap_or("");
            Ok(format!("data:{media};base64,{data}"))
        }
        Some("url") => source
            .get("url")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| Untranslatable::new(at, "A url image source needs a url.")),
        _ => Err(Untranslatable::new(
            at,
            "Only base64 and url image sources can be sent to an OpenAI-format backend.",
        )),
    }
}

/// A Messages `output_config.format` → the chat `response_format`: its JSON schema, strict
/// where OpenAI's strict mode takes the schema (Anthropic's structured outputs keep to the
/// schema, as strict mode does), else not: strict mode refuses a schema with an optional
/// property, which the SDK's `messages.parse` makes of every field with a default.
fn response_format(format: &Value, at: &str) -> Result<Value, Untranslatable> {
    if format.get("type").and_then(Value::as_str) != Some("json_schema") {
        return Err(Untranslatable::new(
            at,
            "Only a json_schema output format can be sent to an OpenAI-format backend.",
        ));
    }
    let schema = format
        .get("schema")
        .filter(|schema| schema.is_object())
        .ok_or_else(|| Untranslatable::new(at, "A json_schema output format needs its schema."))?;
    Ok(json!({
        "type": "json_schema",
        "json_schema": {
            "name": "output",
            "schema": schema,
            "strict": openai_strict(schema),
        },
    }))
}

/// Whether OpenAI's strict mode takes `schema`: an object at the root (not a list, a union, a
/// `$ref`), and [`strict_ready`].
fn openai_strict(schema: &Value) -> bool {
    schema.get("type") == Some(&Value::from("object")) && strict_ready(schema)
}

/// Whether OpenAI's strict mode takes `schema` as far as objects go: each object schema in it
/// (wherever nested) names every property as required and allows no others.
fn strict_ready(schema: &Value) -> bool {
    match schema {
        Value::Object(members) => {
            let object_ready = match members.get("properties") {
                Some(Value::Object(properties)) => {
                    let required: Vec<&str> = members
                        .get("required")
                        .and_then(Value::as_array)
                        .map(|r| r.iter().filter_map(Value::as_str).collect())
                        .unwrap_or_default();
                    members.get("additionalProperties") == Some(&Value::Bool(false))
                        && properties.keys().all(|p| required.contains(&p.as_str()))
                }
                _ => true,
            };
            object_ready && members.values().all(strict_ready)
        }
        Value::Array(items) => items.iter().all(strict_ready),
        _ => true,
    }
}

fn messages_tools(tools: &Value) -> Result<Value, Untranslatable> {
    let tools = tools
        .as_array()
        .ok_or_else(|| Untranslatable::new("tools", "tools must be an array."))?;
    let mut out = Vec::with_capacity(tools.len());
    for (i, tool) in tools.iter().enumerate() {
        // Server tools (web search, code execution, …) carry a versioned `type`.
        if tool
            .get("type")
            .and_then(Value::as_str)
            .is_some_and(|t| t != "custom")
        {
            return Err(Untranslatable::new(
                format!("tools[{i}]"),
                "Server tools cannot be sent to an OpenAI-format backend.",
            ));
        }
        let name = tool.get("name").and_then(Value::as_str).ok_or_else(|| {
            Untranslatable::new(format!("tools[{i}].name"), "A tool needs a name.")
        })?;
        let mut function = Map::new();
        function.insert(
            "name".into(),
            Value::from(portable_tool_name(name.into()).into_owned()),
        );
        if let Some(description) = tool.get("description").filter(|d| !d.is_null()) {
            function.insert("description".into(), description.clone());
        }
        let schema = tool.get("input_schema").cloned().ok_or_else(|| {
            Untranslatable::new(
                format!("tools[{i}].input_schema"),
                "A tool needs an input_schema.",
            )
        })?;
        if tool.get("strict") == Some(&Value::Bool(true)) && openai_strict(&schema) {
            function.insert("strict".into(), Value::Bool(true));
        }
        function.insert("parameters".into(), schema);
        out.push(json!({"type": "function", "function": function}));
    }
    Ok(Value::Array(out))
}

/// → (the chat `tool_choice`, whether parallel tool calls are off).
fn messages_tool_choice(choice: &Value) -> Result<(Option<Value>, bool), Untranslatable> {
    let serial = choice.get("disable_parallel_tool_use") == Some(&Value::Bool(true));
    let converted = match choice.get("type").and_then(Value::as_str) {
        Some("auto") => Value::from("auto"),
        Some("any") => Value::from("required"),
        Some("none") => Value::from("none"),
        Some("tool") => {
            let name = choice.get("name").and_then(Value::as_str).ok_or_else(|| {
                Untranslatable::new("tool_choice.name", "tool_choice needs a name.")
            })?;
            json!({"type": "function", "function": {"name": portable_tool_name(name.into())}})
        }
        _ => {
            return Err(Untranslatable::new(
                "tool_choice",
                "Unknown tool_choice type.",
            ));
        }
    };
    Ok((Some(converted), serial))
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use proptest::prelude::*;

    /// The Messages request for a chat body both ways: written from its members in the shape
    /// (`None` outside it), and translated from its parse into values (`None` for a body
    /// refused), the `stream` member set as the proxy sets it.
    fn both_ways(body: &str, stream: bool) -> (Option<Value>, Option<Value>) {
        both_ways_under(body, Sampling::Taken, stream)
    }

    /// [`both_ways`] for a backend whose API version takes the sampling parameters or not.
    fn both_ways_under(
        body: &str,
        sampling: Sampling,
        stream: bool,
    ) -> (Option<Value>, Option<Value>) {
        let Ok(parsed) = crate::request::parse(body.as_bytes()) else {
            return (None, None);
        };
        let in_shape = chat_to_messages_in_shape(parsed.members(), "up", 4096, sampling, stream)
            .map(|bytes| deep(&bytes));
        let parsed_whole = parsed
            .object()
            .ok()
            .and_then(|chat| chat_to_messages(&chat, "up", 4096, sampling).ok())
            .map(|mut request| {
                request.insert("stream".into(), Value::Bool(stream));
                Value::Object(request)
            });
        (in_shape, parsed_whole)
    }

    /// A written request or message read into values, however deep: a tool's schema or a
    /// call's input may nest as deep as the parse takes it where it was read, with more levels
    /// above it where it is written.
    pub(crate) fn deep(bytes: &[u8]) -> Value {
        let mut written = serde_json::Deserializer::from_slice(bytes);
        written.disable_recursion_limit();
        serde::Deserialize::deserialize(&mut written).unwrap()
    }

    fn string() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => any::<String>().prop_map(|s| serde_json::to_string(&s).unwrap()),
            1 => Just("\"\"".to_owned()),
            1 => Just("\"a\\u0073\\n\"".to_owned()),
        ]
    }

    /// A chat message: the shape's roles with string or null content, and what is near them.
    fn chat_message() -> impl Strategy<Value = String> {
        let role = prop_oneof![
            8 => Just("\"user\""),
            8 => Just("\"assistant\""),
            4 => Just("\"system\""),
            2 => Just("\"developer\""),
            1 => Just("\"us\\u0065r\""),
            1 => Just("\"tool\""),
            1 => Just("\"function\""),
            1 => Just("7"),
        ];
        let content = prop_oneof![
            16 => string(),
            1 => Just("null".to_owned()),
            4 => prop::collection::vec(part(), 0..3).prop_map(|p| format!("[{}]", p.join(","))),
            1 => Just("5".to_owned()),
        ];
        let extra = prop_oneof![
            24 => Just("".to_owned()),
            1 => Just(",\"name\":\"ann\"".to_owned()),
            1 => Just(",\"tool_calls\":null".to_owned()),
            1 => Just(",\"tool_calls\":[]".to_owned()),
            4 => prop::collection::vec(tool_call(), 0..3).prop_map(|c| format!(",\"tool_calls\":[{}]", c.join(","))),
            2 => Just(",\"tool_call_id\":\"call_1\"".to_owned()),
            1 => Just(",\"tool_call_id\":\"functions.Bash:0\"".to_owned()),
            1 => Just(",\"tool_call_id\":7".to_owned()),
            1 => Just(",\"content\":\"twice\"".to_owned()),
            1 => Just(",\"refusal\":1e400".to_owned()),
        ];
        prop_oneof![
            40 => (role, content, extra).prop_map(|(role, content, extra)| {
                format!("{{\"role\":{role},\"content\":{content}{extra}}}")
            }),
            1 => Just("{\"content\":\"no role\"}".to_owned()),
            1 => Just("[\"user\",\"an array\"]".to_owned()),
        ]
    }

    /// A chat content part, in and near the shape.
    fn part() -> impl Strategy<Value = String> {
        prop_oneof![
            6 => string().prop_map(|t| format!("{{\"type\":\"text\",\"text\":{t}}}")),
            3 => (string(), breakpoint()).prop_map(|(t, b)| format!("{{\"type\":\"text\",\"text\":{t}{b}}}")),
            1 => breakpoint().prop_map(|b| format!("{{\"type\":\"refusal\",\"refusal\":\"no\"{b}}}")),
            1 => Just("{\"type\":\"text\"}".to_owned()),
            1 => Just("{\"type\":\"text\",\"text\":null}".to_owned()),
            1 => Just("{\"type\":\"text\",\"text\":3}".to_owned()),
            2 => string().prop_map(|t| format!("{{\"type\":\"refusal\",\"refusal\":{t}}}")),
            1 => Just("{\"type\":\"image_url\",\"image_url\":{\"url\":\"https://x/y.png\"}}".to_owned()),
            1 => Just(format!("{{\"type\":\"text\",\"text\":\"{}\"}}", "{[".repeat(70))),
            1 => (123..=124usize).prop_map(|levels| format!(
                "{{\"type\":\"text\",\"text\":\"x\",\"x\":{}{}}}",
                "[".repeat(levels),
                "]".repeat(levels)
            )),
        ]
        .boxed()
    }

    /// A part's `prompt_cache_breakpoint` member (with its comma), in and near the shape.
    fn breakpoint() -> impl Strategy<Value = &'static str> {
        prop_oneof![
            6 => Just(",\"prompt_cache_breakpoint\":{\"mode\":\"explicit\"}"),
            1 => Just(",\"prompt_cache_breakpoint\":{}"),
            1 => Just(",\"prompt_cache_breakpoint\":null"),
            1 => Just(",\"prompt_cache_breakpoint\":true"),
            1 => Just(",\"prompt_cache_breakpoint\":{\"m\":1e400}"),
            1 => Just(",\"prompt_cache_breakpoint\":{},\"prompt_cache_breakpoint\":null"),
        ]
    }

    /// A chat tool call (an assistant's in a request, a completion's in an answer), in and near
    /// the shape.
    pub(crate) fn tool_call() -> impl Strategy<Value = String> {
        let id = prop_oneof![
            6 => string().prop_map(|id| format!("\"id\":{id},")),
            1 => Just(String::new()),
            1 => Just("\"id\":7,".to_owned()),
        ];
        let name = prop_oneof![
            6 => Just("\"name\":\"Read\""),
            1 => Just("\"name\":\"R\\u0065ad\""),
            1 => Just("\"x\":1"),
            1 => Just("\"name\":null"),
        ];
        let arguments = prop_oneof![
            6 => Just(r#","arguments":"{\"file_path\":\"/a\\n.rs\",\"limit\":120, \"all\":[true,null,1.50]}""#.to_owned()),
            2 => Just(r#","arguments":"{}""#.to_owned()),
            2 => Just(r#","arguments":"""#.to_owned()),
            1 => Just(r#","arguments":" \n ""#.to_owned()),
            1 => Just(String::new()),
            1 => Just(r#","arguments":null"#.to_owned()),
            1 => Just(r#","arguments":{"a":1}"#.to_owned()),
            1 => Just(r#","arguments":"[1]""#.to_owned()),
            1 => Just(r#","arguments":"{\"a\":""#.to_owned()),
            1 => Just(r#","arguments":"{\"n\":1e400}""#.to_owned()),
            1 => Just(r#","arguments":"{\"s\":\"\\ud800\"}""#.to_owned()),
            1 => Just(r#","arguments":"\u00a0{}""#.to_owned()),
            1 => Just(r#","arguments":"{\"b\":1,\"b\":2} ""#.to_owned()),
            1 => (126..=127usize).prop_map(|levels| format!(
                r#","arguments":"{{\"a\":{}{}}}""#,
                "[".repeat(levels),
                "]".repeat(levels)
            )),
        ];
        (id, name, arguments).prop_map(|(id, name, arguments)| {
            format!("{{{id}\"type\":\"function\",\"function\":{{{name}{arguments}}}}}")
        })
    }

    /// A tool's `description` member (with its comma), in and near the shape.
    fn tool_description() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => string().prop_map(|d| format!(",\"description\":{d}")),
            1 => Just(String::new()),
            1 => Just(",\"description\":null".to_owned()),
            1 => Just(",\"description\":[\"a\", 1.0]".to_owned()),
            1 => Just(",\"description\":\"\\udc00\"".to_owned()),
        ]
    }

    /// A tool's schema as `member` (with its comma), in and near the shape: nested as deep as
    /// the parse takes it there (`deepest` levels) and one level deeper.
    fn tool_schema(member: &'static str, deepest: usize) -> impl Strategy<Value = String> {
        prop_oneof![
            6 => Just(format!(",\"{member}\":{{\"type\":\"object\",\"properties\":{{\"q\":{{\"type\":\"string\",\"description\":\"a\\tb\"}}}},\"required\":[\"q\"]}}")),
            1 => Just(format!(",\"{member}\":null")),
            2 => Just(String::new()),
            // Strict as OpenAI's strict mode takes it; with keywords Anthropic's does not take;
            // with a part Anthropic's cannot take at all.
            2 => Just(format!(",\"{member}\":{{\"type\":\"object\",\"properties\":{{\"n\":{{\"type\":\"integer\",\"minimum\":1}}}},\"required\":[\"n\"],\"additionalProperties\":false}}")),
            1 => Just(format!(",\"{member}\":{{\"type\":\"object\",\"properties\":{{\"s\":{{\"type\":\"string\",\"pattern\":\"^a\"}}}}}}")),
            1 => Just(format!(",\"{member}\":{{\"type\":\"object\",\"properties\":{{\"c\":{{\"const\":1}}}}}}")),
            1 => Just(format!(",\"{member}\":{{\"maximum\":1e400}}")),
            1 => Just(format!(",\"{member}\":{{\"properties\":{{\"\\ud800\":{{}}}}}}")),
            1 => (deepest..=deepest + 1).prop_map(move |levels| format!(
                ",\"{member}\":{}{}",
                "[".repeat(levels),
                "]".repeat(levels)
            )),
        ]
    }

    /// A tool's `strict` member, as either API writes it and near.
    fn strict() -> impl Strategy<Value = &'static str> {
        prop_oneof![
            4 => Just(",\"strict\":true"),
            1 => Just(",\"strict\":false"),
            1 => Just(",\"strict\":null"),
            1 => Just(",\"strict\":\"yes\""),
            2 => Just(""),
        ]
    }

    /// Chat `tools`, in and near the shape.
    fn chat_tools() -> impl Strategy<Value = String> {
        let kind = prop_oneof![
            8 => Just("\"type\":\"function\","),
            1 => Just("\"type\":\"web_search\","),
            1 => Just(""),
            1 => Just("\"type\":null,"),
        ];
        let description = tool_description();
        // Three levels above them in the request (tools, the tool, its function).
        let parameters = tool_schema("parameters", 124);
        let name = prop_oneof![
            6 => Just("\"name\":\"Read\""),
            1 => Just("\"name\":1"),
            1 => Just("\"x\":1"),
        ];
        let tool = (kind, name, description, parameters, strict())
            .prop_map(|(k, n, d, p, s)| format!("{{{k}\"function\":{{{n}{d}{p}{s}}}}}"));
        prop_oneof![
            8 => prop::collection::vec(tool, 0..3).prop_map(|t| format!("\"tools\":[{}]", t.join(","))),
            1 => Just("\"tools\":null".to_owned()),
            1 => Just("\"tools\":[{\"type\":\"function\"}]".to_owned()),
            1 => Just("\"tools\":[{\"type\":\"function\",\"function\":5}]".to_owned()),
        ]
        .boxed()
    }

    /// Chat `tool_choice`, `parallel_tool_calls` and `stop`, in and near the shape.
    fn chat_tool_member() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("\"tool_choice\":\"auto\""),
            Just("\"tool_choice\":\"required\""),
            Just("\"tool_choice\":\"none\""),
            Just("\"tool_choice\":\"n\\u006fne\""),
            Just("\"tool_choice\":\"sometimes\""),
            Just("\"tool_choice\":{\"type\":\"function\",\"function\":{\"name\":\"Read\"}}"),
            Just("\"tool_choice\":{\"type\":\"function\",\"function\":{}}"),
            Just("\"tool_choice\":{\"function\":5}"),
            Just("\"tool_choice\":{\"type\":\"allowed_tools\",\"allowed_tools\":{\"mode\":\"required\",\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"Read\"}}]}}"),
            Just("\"tool_choice\":null"),
            Just("\"tool_choice\":7"),
            Just("\"parallel_tool_calls\":false"),
            Just("\"parallel_tool_calls\":true"),
            Just("\"parallel_tool_calls\":null"),
            Just("\"parallel_tool_calls\":\"no\""),
            Just("\"stop\":\"END\\n\""),
            Just("\"stop\":[\"a\",\"b\"]"),
            Just("\"stop\":[]"),
            Just("\"stop\":null"),
            Just("\"stop\":5"),
            Just("\"stop\":[1e400]"),
            Just("\"stop\":\"\\n\""),
            Just("\"stop\":[\"END\",\" \\t\"]"),
            Just("\"stop\":[\"\"]"),
            Just("\"stop\":[\"\\u0020\",null]"),
            Just("\"n\":1"),
        ]
        .prop_map(str::to_owned)
    }

    /// A chat body's member: those of the shape and what is near them.
    fn member() -> impl Strategy<Value = String> {
        // The messages again (the last of two stands).
        let messages = prop::collection::vec(chat_message(), 0..3)
            .prop_map(|m| format!("\"messages\":[{}]", m.join(",")));
        let count = prop_oneof![
            Just("64"),
            Just("null"),
            Just("0"),
            Just("-1"),
            Just("2.5"),
            Just("\"9\""),
            Just("18446744073709551615"),
        ];
        let sampling = prop_oneof![
            Just("0.7"),
            Just("1"),
            Just("0.70"),
            Just("null"),
            Just("\"hot\""),
            Just("1e400"),
            Just("[1, 2]"),
        ];
        prop_oneof![
            4 => count.clone().prop_map(|c| format!("\"max_tokens\":{c}")),
            2 => count.prop_map(|c| format!("\"max_completion_tokens\":{c}")),
            4 => sampling.clone().prop_map(|s| format!("\"temperature\":{s}")),
            2 => sampling.prop_map(|s| format!("\"top_p\":{s}")),
            2 => string().prop_map(|s| format!("\"user\":{s}")),
            1 => Just("\"user\":7".to_owned()),
            2 => Just("\"stream\":true".to_owned()),
            1 => Just("\"stream_options\":{\"include_usage\":true,\"x\":1e400}".to_owned()),
            2 => Just("\"seed\":42".to_owned()),
            2 => string().prop_map(|s| format!("\"prompt_cache_key\":{s}")),
            1 => Just("\"prompt_cache_key\":null".to_owned()),
            1 => Just("\"prompt_cache_key\":5".to_owned()),
            1 => Just("\"prompt_cache_retention\":\"24h\"".to_owned()),
            1 => Just("\"prompt_cache_retention\":null".to_owned()),
            2 => Just("\"prompt_cache_options\":{\"mode\":\"explicit\"}".to_owned()),
            1 => Just("\"prompt_cache_options\":{\"mode\":\"implicit\",\"ttl\":\"30m\"}".to_owned()),
            1 => Just("\"prompt_cache_options\":{\"mode\":\"explicit\",\"ttl\":\"1h\"}".to_owned()),
            1 => Just("\"prompt_cache_options\":{\"ttl\":\"5m\"}".to_owned()),
            1 => Just("\"prompt_cache_options\":null".to_owned()),
            1 => Just("\"deep\":[[[[{\"a\":\"\\ud800\"}]]]]".to_owned()),
            1 => Just("\"n\":1".to_owned()),
            3 => chat_tool_member(),
            2 => chat_tools(),
            1 => messages,
        ]
    }

    proptest! {
        // A quarter of the bodies fall in the shape: more cases than the default.
        #![proptest_config(ProptestConfig::with_cases(1024))]

        /// Wherever a chat body is written in the shape, it is the request the parse into
        /// values makes; outside the shape it is left to that parse.
        #[test]
        fn a_chat_request_written_in_its_shape_is_the_one_parsed_whole(
            messages in prop::collection::vec(chat_message(), 0..6),
            members in prop::collection::vec(member(), 0..4),
            stream in any::<bool>(),
            removed in any::<bool>(),
        ) {
            let mut body = format!("{{\"model\":\"m\",\"messages\":[{}]", messages.join(","));
            for member in members {
                body = body + "," + &member;
            }
            body.push('}');
            let sampling = if removed { Sampling::Removed } else { Sampling::Taken };
            let (in_shape, parsed_whole) = both_ways_under(&body, sampling, stream);
            if in_shape.is_some() {
                prop_assert_eq!(in_shape, parsed_whole, "{}", body);
            }

        }
    }

    /// The chat request for a Messages body both ways: written from its members in the shape
    /// (`None` outside it), and translated from its parse into values (`None` for a body
    /// refused).
    fn both_ways_to_chat(body: &str) -> (Option<Value>, Option<Value>) {
        both_ways_to_chat_for(body, ("up", "max_completion_tokens"))
    }

    /// [`both_ways_to_chat`] for a backend's model and limit member.
    fn both_ways_to_chat_for(
        body: &str,
        (model, limit): (&str, &str),
    ) -> (Option<Value>, Option<Value>) {
        let Ok(parsed) = crate::request::parse(body.as_bytes()) else {
            return (None, None);
        };
        let in_shape =
            messages_to_chat_in_shape(parsed.members(), model, limit).map(|bytes| deep(&bytes));
        let parsed_whole = parsed
            .object()
            .ok()
            .and_then(|messages| messages_to_chat(&messages, model, limit).ok())
            .map(Value::Object);
        (in_shape, parsed_whole)
    }

    /// Content: strings and text blocks in the shape, and what is near them.
    fn content() -> impl Strategy<Value = String> {
        let block = prop_oneof![
            6 => string().prop_map(|t| format!("{{\"type\":\"text\",\"text\":{t}}}")),
            1 => Just("{\"type\":\"text\",\"text\":\"c\",\"cache_control\":{\"type\":\"ephemeral\"}}".to_owned()),
            1 => Just("{\"type\":\"text\"}".to_owned()),
            1 => Just("{\"type\":\"text\",\"text\":null}".to_owned()),
            1 => Just("{\"type\":\"thinking\",\"thinking\":\"hm\",\"signature\":\"s\"}".to_owned()),
            1 => Just("{\"type\":\"redacted_thinking\",\"data\":\"x\"}".to_owned()),
            3 => tool_use(),
            3 => tool_result(),
            1 => Just(format!("{{\"type\":\"text\",\"text\":\"{}\"}}", "{[".repeat(70))),
            1 => (123..=124usize).prop_map(|levels| format!(
                "{{\"type\":\"text\",\"text\":\"x\",\"cache_control\":{}{}}}",
                "[".repeat(levels),
                "]".repeat(levels)
            )),
            1 => Just("{\"type\":\"image\",\"source\":{\"type\":\"url\",\"url\":\"https://x/y.png\"}}".to_owned()),
            1 => Just("{\"text\":\"no type\"}".to_owned()),
            1 => Just("{\"type\":\"text\",\"text\":5}".to_owned()),
        ]
        .boxed();
        prop_oneof![
            4 => string(),
            4 => prop::collection::vec(block, 0..4).prop_map(|b| format!("[{}]", b.join(","))),
            1 => Just("null".to_owned()),
            1 => Just("7".to_owned()),
        ]
        .boxed()
    }

    /// A `tool_use` block, in and near the shape.
    fn tool_use() -> impl Strategy<Value = String> {
        let id = prop_oneof![
            4 => string().prop_map(|id| format!(",\"id\":{id}")),
            1 => Just(String::new()),
            1 => Just(",\"id\":null".to_owned()),
            1 => Just(",\"id\":7".to_owned()),
        ];
        let name = prop_oneof![
            4 => Just(",\"name\":\"Read\""),
            1 => Just(",\"name\":\"R\\u0065ad\""),
            // Past OpenAI's 64 characters, and outside its characters: made portable.
            1 => Just(",\"name\":\"mcp__8b383b1d-b46a-4b70-994c-c7c26b866287__check_domain_availability_and_price\""),
            1 => Just(",\"name\":\"mcp.read\""),
            1 => Just(""),
            1 => Just(",\"name\":[]"),
        ];
        let input = prop_oneof![
            4 => Just(",\"input\":{\"file_path\":\"/a\\n.rs\",\"limit\":120,\"all\":[true,null,1.50]}"),
            2 => Just(",\"input\":{}"),
            2 => Just(""),
            1 => Just(",\"input\":\"x\""),
            1 => Just(",\"input\":{\"n\":1e400}"),
            1 => Just(",\"input\":{\"b\":1,\"b\":2}"),
        ];
        (id, name, input)
            .prop_map(|(id, name, input)| format!("{{\"type\":\"tool_use\"{id}{name}{input}}}"))
    }

    /// A `tool_result` block, in and near the shape.
    fn tool_result() -> impl Strategy<Value = String> {
        let id = prop_oneof![
            4 => Just(",\"tool_use_id\":\"toolu_1\""),
            1 => Just(",\"tool_use_id\":\"functions.Bash:0\""),
            1 => Just(""),
            1 => Just(",\"tool_use_id\":5"),
        ];
        let block = prop_oneof![
            4 => string().prop_map(|t| format!("{{\"type\":\"text\",\"text\":{t}}}")),
            1 => Just("{\"type\":\"image\",\"source\":{\"type\":\"url\",\"url\":\"https://x\"}}".to_owned()),
            1 => Just("{\"type\":\"tool_result\",\"tool_use_id\":\"t\"}".to_owned()),
        ];
        let content = prop_oneof![
            4 => string().prop_map(|c| format!(",\"content\":{c}")),
            3 => prop::collection::vec(block, 0..3).prop_map(|b| format!(",\"content\":[{}]", b.join(","))),
            1 => Just(String::new()),
            1 => Just(",\"content\":null".to_owned()),
            1 => Just(",\"content\":7".to_owned()),
            1 => (121..=122usize).prop_map(|levels| format!(
                ",\"content\":[{{\"type\":\"text\",\"text\":\"x\",\"cache_control\":{}{}}}]",
                "[".repeat(levels),
                "]".repeat(levels)
            )),
        ];
        let error = prop_oneof![
            4 => Just(""),
            4 => Just(",\"is_error\":true"),
            1 => Just(",\"is_error\":false"),
            1 => Just(",\"is_error\":\"yes\""),
            1 => Just(",\"cache_control\":{\"type\":\"ephemeral\"}"),
        ];
        (id, content, error).prop_map(|(id, content, error)| {
            format!("{{\"type\":\"tool_result\"{id}{content}{error}}}")
        })
    }

    /// `tools`, in and near the shape.
    fn tools() -> impl Strategy<Value = String> {
        let kind = prop_oneof![
            6 => Just(""),
            1 => Just("\"type\":\"custom\","),
            1 => Just("\"type\":\"web_search_20250305\","),
            1 => Just("\"type\":null,"),
            1 => Just("\"type\":7,"),
        ];
        let description = tool_description();
        // Two levels above it in the request (tools, the tool).
        let schema = tool_schema("input_schema", 125);
        let name = prop_oneof![
            6 => Just("\"name\":\"Read\""),
            1 => Just("\"name\":\"\\u0052ead\""),
            1 => Just("\"name\":\"mcp__8b383b1d-b46a-4b70-994c-c7c26b866287__check_domain_availability_and_price\""),
            1 => Just("\"name\":1"),
            1 => Just("\"x\":1"),
        ];
        let tool = (kind, name, description, schema, strict()).prop_map(|(k, n, d, s, t)| {
            format!("{{{k}{n}{d}{s}{t},\"cache_control\":{{\"type\":\"ephemeral\"}}}}")
        });
        prop_oneof![
            6 => prop::collection::vec(tool, 0..3).prop_map(|t| format!("\"tools\":[{}]", t.join(","))),
            1 => Just("\"tools\":null".to_owned()),
            1 => Just("\"tools\":{}".to_owned()),
        ]
        .boxed()
    }

    /// `tool_choice`, in and near the shape.
    fn tool_choice() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("{\"type\":\"auto\"}"),
            Just("{\"type\":\"any\",\"disable_parallel_tool_use\":true}"),
            Just("{\"type\":\"auto\",\"disable_parallel_tool_use\":false}"),
            Just("{\"type\":\"none\"}"),
            Just("{\"type\":\"tool\",\"name\":\"Read\"}"),
            Just("{\"type\":\"tool\",\"name\":\"mcp__8b383b1d-b46a-4b70-994c-c7c26b866287__check_domain_availability_and_price\"}"),
            Just("{\"type\":\"tool\"}"),
            Just("{\"type\":\"auto\",\"name\":7}"),
            Just("{\"type\":\"auto\",\"disable_parallel_tool_use\":\"yes\"}"),
            Just("{\"type\":\"bogus\"}"),
            Just("\"auto\""),
            Just("null"),
        ]
        .prop_map(|choice| format!("\"tool_choice\":{choice}"))
    }

    /// A Messages turn: the shape's roles with content in and near the shape.
    fn turn() -> impl Strategy<Value = String> {
        let role = prop_oneof![
            8 => Just("\"user\""),
            8 => Just("\"assistant\""),
            2 => Just("\"system\""),
            1 => Just("\"developer\""),
            1 => Just("7"),
        ];
        let extra = prop_oneof![
            8 => Just(""),
            1 => Just(",\"content\":\"twice\""),
            1 => Just(",\"x\":1e400"),
        ];
        prop_oneof![
            20 => (role, content(), extra).prop_map(|(r, c, e)| format!("{{\"role\":{r},\"content\":{c}{e}}}")),
            1 => Just("{\"role\":\"user\"}".to_owned()),
            1 => Just("[\"user\",\"hi\"]".to_owned()),
        ]
        .boxed()
    }

    /// A Messages body's member, besides the turns.
    fn messages_member() -> impl Strategy<Value = String> {
        let number = prop_oneof![
            Just("64"),
            Just("0.5"),
            Just("null"),
            Just("\"x\""),
            Just("1e400")
        ];
        prop_oneof![
            3 => number.clone().prop_map(|n| format!("\"max_tokens\":{n}")),
            2 => number.clone().prop_map(|n| format!("\"temperature\":{n}")),
            1 => number.prop_map(|n| format!("\"top_p\":{n}")),
            2 => Just("\"stream\":true".to_owned()),
            1 => Just("\"stream\":false".to_owned()),
            2 => content().prop_map(|c| format!("\"system\":{c}")),
            1 => Just("\"stop_sequences\":[\"END\"]".to_owned()),
            1 => Just("\"stop_sequences\":null".to_owned()),
            1 => prop::sample::select(vec![
                r#""stop_sequences":[]"#,
                r#""stop_sequences":[ ]"#,
                r#""stop_sequences":["a","b","c","d"]"#,
                r#""stop_sequences":["a","b","c","d","e"]"#,
                r#""stop_sequences":"END""#,
                r#""stop_sequences":{"a":1}"#,
            ])
            .prop_map(str::to_owned),
            2 => string().prop_map(|u| format!("\"metadata\":{{\"user_id\":{u}}}")),
            1 => Just("\"metadata\":{}".to_owned()),
            1 => Just("\"metadata\":\"m\"".to_owned()),
            1 => Just("\"top_k\":5".to_owned()),
            1 => Just("\"thinking\":{\"type\":\"enabled\",\"budget_tokens\":1024}".to_owned()),
            3 => tools(),
            2 => tool_choice(),
            1 => Just("\"service_tier\":\"\\ud800\"".to_owned()),
            1 => prop::sample::select(vec![
                r#""output_config":{"effort":"high"}"#,
                r#""output_config":{"format":null}"#,
                r#""output_config":{}"#,
                r#""output_config":null"#,
                r#""output_config":"x""#,
                r#""output_config":{"format":{"type":"json_schema","schema":{"type":"object"}}}"#,
                r#""output_config":{"format":{"type":"grammar"}}"#,
                r#""output_config":{"format":"x"}"#,
                r#""output_format":{"type":"json_schema","schema":{"type":"object"}}"#,
                r#""output_format":null"#,
            ])
            .prop_map(str::to_owned),
        ]
        .boxed()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        /// Wherever a Messages body is written in the shape, it is the chat request the parse
        /// into values makes; outside the shape it is left to that parse.
        #[test]
        fn a_messages_request_written_in_its_shape_is_the_one_parsed_whole(
            turns in prop::collection::vec(turn(), 0..5),
            members in prop::collection::vec(messages_member(), 0..4),
            // Another server, OpenAI's API, a reasoning model there.
            backend in prop::sample::select(vec![
                ("up", "max_tokens"),
                ("up", "max_completion_tokens"),
                ("gpt-5-mini", "max_completion_tokens"),
                ("o3", "max_tokens"),
            ]),
        ) {
            let mut body = format!("{{\"model\":\"m\",\"messages\":[{}]", turns.join(","));
            for member in members {
                body = body + "," + &member;
            }
            body.push('}');
            let (in_shape, parsed_whole) = both_ways_to_chat_for(&body, backend);
            if in_shape.is_some() {
                prop_assert_eq!(in_shape, parsed_whole, "{}", body);
            }
        }
    }

    /// An agent's chat messages: the assistant's text and tool calls, each answered by tool
    /// messages, and the user's text, mostly in the shape.
    fn agent_chat_message() -> impl Strategy<Value = String> {
        let content = prop_oneof![
            4 => string(),
            1 => Just("null".to_owned()),
            2 => prop::collection::vec(part(), 1..3).prop_map(|p| format!("[{}]", p.join(","))),
        ];
        prop_oneof![
            3 => (content.clone(), prop::collection::vec(tool_call(), 1..3)).prop_map(|(c, calls)| {
                format!("{{\"role\":\"assistant\",\"content\":{c},\"tool_calls\":[{}]}}", calls.join(","))
            }),
            3 => content.clone().prop_map(|c| format!("{{\"role\":\"tool\",\"tool_call_id\":\"call_1\",\"content\":{c}}}")),
            1 => content.clone().prop_map(|c| format!("{{\"role\":\"tool\",\"tool_call_id\":\"functions.Bash:0\",\"content\":{c}}}")),
            1 => content.clone().prop_map(|c| format!("{{\"role\":\"user\",\"content\":{c}}}")),
            1 => content.prop_map(|c| format!("{{\"role\":\"system\",\"content\":{c}}}")),
        ]
        .boxed()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        /// Wherever an agent's chat request is written in the shape, it is the Messages
        /// request the parse into values makes.
        #[test]
        fn an_agent_chat_request_written_in_its_shape_is_the_one_parsed_whole(
            messages in prop::collection::vec(agent_chat_message(), 1..5),
            tools in chat_tools(),
            members in prop::collection::vec(chat_tool_member(), 0..3),
            stream in any::<bool>(),
            removed in any::<bool>(),
        ) {
            let mut body = format!("{{\"model\":\"m\",\"messages\":[{}],{tools}", messages.join(","));
            for member in members {
                body = body + "," + &member;
            }
            body.push('}');
            let sampling = if removed { Sampling::Removed } else { Sampling::Taken };
            let (in_shape, parsed_whole) = both_ways_under(&body, sampling, stream);
            if in_shape.is_some() {
                prop_assert_eq!(in_shape, parsed_whole, "{}", body);
            }
        }
    }

    /// A coding agent's turns: the assistant's text, thinking and tool calls, then the user's
    /// tool results and text, mostly in the shape.
    fn agent_turn() -> impl Strategy<Value = String> {
        let assistant = prop_oneof![
            3 => tool_use(),
            2 => string().prop_map(|t| format!("{{\"type\":\"text\",\"text\":{t}}}")),
            1 => Just("{\"type\":\"thinking\",\"thinking\":\"hm\",\"signature\":\"s\"}".to_owned()),
        ];
        let user = prop_oneof![
            4 => tool_result(),
            1 => string().prop_map(|t| format!("{{\"type\":\"text\",\"text\":{t},\"cache_control\":{{\"type\":\"ephemeral\"}}}}")),
        ];
        prop_oneof![
            prop::collection::vec(assistant, 1..4)
                .prop_map(|b| format!("{{\"role\":\"assistant\",\"content\":[{}]}}", b.join(","))),
            prop::collection::vec(user, 1..4)
                .prop_map(|b| format!("{{\"role\":\"user\",\"content\":[{}]}}", b.join(","))),
        ]
        .boxed()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        /// Wherever a coding agent's request is written in the shape, it is the chat request
        /// the parse into values makes.
        #[test]
        fn an_agent_request_written_in_its_shape_is_the_one_parsed_whole(
            turns in prop::collection::vec(agent_turn(), 1..4),
            tools in tools(),
            choice in prop::option::of(tool_choice()),
        ) {
            let mut body = format!("{{\"model\":\"m\",\"max_tokens\":8,\"messages\":[{}],{tools}", turns.join(","));
            if let Some(choice) = choice {
                body = body + "," + &choice;
            }
            body.push('}');
            let (in_shape, parsed_whole) = both_ways_to_chat(&body);
            if in_shape.is_some() {
                prop_assert_eq!(in_shape, parsed_whole, "{}", body);
            }
        }
    }

    /// The simple requests the Anthropic SDKs send, and a coding agent's, are written in the
    /// shape.
    #[test]
    fn simple_messages_requests_are_written_in_their_shape() {
        for body in [
            r#"{"model":"m","max_tokens":1024,"messages":[{"role":"user","content":"Hello, Claude"}]}"#,
            r#"{"model":"m","max_tokens":32000,"temperature":1,"system":[{"type":"text","text":"You are an agent.","cache_control":{"type":"ephemeral"}},{"type":"text","text":"Use the tools.\n"}],"tools":[{"name":"Read","description":"Reads a file.\n- Absolute paths only","input_schema":{"type":"object","properties":{"file_path":{"type":"string"},"limit":{"type":"number"}},"required":["file_path"],"additionalProperties":false,"$schema":"http://json-schema.org/draft-07/schema#"}}],"tool_choice":{"type":"auto"},"messages":[{"role":"user","content":[{"type":"text","text":"<system-reminder>\nctx\n</system-reminder>"},{"type":"text","text":"Fix the bug.","cache_control":{"type":"ephemeral"}}]},{"role":"assistant","content":[{"type":"thinking","thinking":"hm","signature":"s"},{"type":"text","text":"Reading it."},{"type":"tool_use","id":"toolu_01","name":"Read","input":{"limit":120,"file_path":"/a.rs"}}]},{"role":"user","content":[{"type":"tool_result","tool_use_id":"toolu_01","content":"     1\tfn main() {\n     2\t}","cache_control":{"type":"ephemeral"}}]},{"role":"assistant","content":[{"type":"tool_use","id":"toolu_02","name":"Read","input":{}}]},{"role":"user","content":[{"type":"tool_result","tool_use_id":"toolu_02","content":[{"type":"text","text":"no such file"}],"is_error":true},{"type":"text","text":"Go on."}]}],"metadata":{"user_id":"user_1"},"thinking":{"type":"enabled","budget_tokens":1024},"stream":true}"#,
            r#"{"model":"m","max_tokens":256,"system":[{"type":"text","text":"Be brief.","cache_control":{"type":"ephemeral"}}],"messages":[{"role":"user","content":[{"type":"text","text":"Hi"},{"type":"text","text":"there"}]},{"role":"assistant","content":[{"type":"thinking","thinking":"hm","signature":"s"},{"type":"text","text":"Hello!"}]},{"role":"user","content":"Again"}],"temperature":0.5,"stop_sequences":["END"],"stream":true,"metadata":{"user_id":"u-1"},"top_k":5}"#,
        ] {
            let (in_shape, parsed_whole) = both_ways_to_chat(body);
            assert!(in_shape.is_some(), "{body}");
            assert_eq!(in_shape, parsed_whole, "{body}");
        }
    }

    /// The request both writers make of `body`, which must agree where the shape writes it.
    fn to_chat_agreed(body: &str) -> Value {
        let (in_shape, parsed_whole) = both_ways_to_chat(body);
        let parsed_whole = parsed_whole.expect(body);
        if let Some(in_shape) = in_shape {
            assert_eq!(in_shape, parsed_whole, "{body}");
        }
        parsed_whole
    }

    /// [`to_chat_agreed`] the other way.
    fn to_messages_agreed(body: &str) -> Value {
        let (in_shape, parsed_whole) = both_ways(body, false);
        let parsed_whole = parsed_whole.expect(body);
        if let Some(in_shape) = in_shape {
            assert_eq!(in_shape, parsed_whole, "{body}");
        }
        parsed_whole
    }

    /// An empty last assistant turn, which Anthropic takes, is left out for a chat backend:
    /// OpenAI refuses an assistant message with neither content nor tool calls.
    #[test]
    fn an_empty_assistant_turn_is_left_out_for_a_chat_backend() {
        for last in [
            r#"{"role":"assistant","content":[]}"#,
            r#"{"role":"assistant","content":[{"type":"thinking","thinking":"hm","signature":"s"}]}"#,
        ] {
            let body = format!(
                r#"{{"model":"m","max_tokens":9,"messages":[{{"role":"user","content":"hi"}},{last}]}}"#
            );
            let chat = to_chat_agreed(&body);
            assert_eq!(
                chat["messages"],
                json!([{"role": "user", "content": "hi"}]),
                "{last}"
            );
        }
    }

    /// A chat client that names its conversation for OpenAI's cache (`prompt_cache_key`) or
    /// sets its retention asks an Anthropic backend for its automatic caching; one that does
    /// neither (the last of two members of one name standing) asks for nothing.
    #[test]
    fn a_client_asking_for_the_prompt_cache_gets_anthropics_automatic_caching() {
        let body = |members: &str| {
            format!(r#"{{"model":"m","messages":[{{"role":"user","content":"hi"}}]{members}}}"#)
        };
        for asked in [
            r#","prompt_cache_key":"conversation-1""#,
            r#","prompt_cache_retention":"24h""#,
            r#","prompt_cache_retention":"in_memory""#,
            r#","prompt_cache_key":null,"prompt_cache_retention":"24h""#,
            r#","prompt_cache_key":null,"prompt_cache_key":"c""#,
            r#","prompt_cache_options":{"mode":"implicit","ttl":"30m"}"#,
        ] {
            let request = to_messages_agreed(&body(asked));
            assert_eq!(
                request["cache_control"],
                json!({"type": "ephemeral"}),
                "{asked}"
            );
        }
        for not_asked in [
            "",
            r#","prompt_cache_key":null"#,
            r#","prompt_cache_key":"c","prompt_cache_key":null"#,
            r#","prompt_cache_key":5"#,
            r#","prompt_cache_options":null"#,
            r#","prompt_cache_options":{"mode":"explicit"}"#,
        ] {
            let request = to_messages_agreed(&body(not_asked));
            assert_eq!(request.get("cache_control"), None, "{not_asked}");
        }
    }

    /// A chat client's `prompt_cache_breakpoint` marks reach Anthropic as `cache_control` on
    /// the blocks made from the marked parts (a tool message's on its result), in both writers:
    /// with `mode: "explicit"` these are the only breakpoints, the latest four of them; in the
    /// default `implicit` mode the latest three, beside the automatic caching, as OpenAI writes
    /// them. Anthropic refuses a request with more than four.
    #[test]
    fn prompt_cache_breakpoints_become_cache_control_on_their_blocks() {
        const MARK: &str = r#","prompt_cache_breakpoint":{"mode":"explicit"}"#;
        let text = |text: &str, marked: bool| {
            let mark = if marked { MARK } else { "" };
            format!(r#"{{"type":"text","text":"{text}"{mark}}}"#)
        };
        let written = |messages: &str, members: &str| {
            let body = format!(r#"{{"model":"m","messages":[{messages}]{members}}}"#);
            let (in_shape, parsed_whole) = both_ways(&body, false);
            assert_eq!(in_shape, parsed_whole, "{body}");
            in_shape.expect(&body)
        };
        let ephemeral = json!({"type": "ephemeral"});
        // An agent's: the system prompt and the last tool result marked.
        let agent = format!(
            r#"{{"role":"system","content":[{}]}},{{"role":"user","content":"Fix it."}},{{"role":"assistant","content":[{}],"tool_calls":[{{"id":"c1","type":"function","function":{{"name":"Read","arguments":"{{}}"}}}}]}},{{"role":"tool","tool_call_id":"c1","content":[{},{}]}}"#,
            text("You are an agent.", true),
            text("Reading.", false),
            text("fn main() {}", false),
            text("EOF", true),
        );
        let request = written(
            &agent,
            r#","prompt_cache_options":{"mode":"explicit","ttl":"30m"}"#,
        );
        assert_eq!(request["system"][0]["cache_control"], ephemeral);
        let result = &request["messages"][2]["content"][0];
        assert_eq!(result["type"], "tool_result");
        assert_eq!(result["cache_control"], ephemeral);
        assert_eq!(result["content"][1].get("cache_control"), None);
        assert_eq!(
            request.get("cache_control"),
            None,
            "explicit: the marks alone"
        );
        // The marks are a request for the cache: in the default mode, with the automatic
        // caching, even with no prompt_cache_options.
        for members in ["", r#","prompt_cache_options":{"mode":"implicit"}"#] {
            let request = written(&agent, members);
            assert_eq!(request["cache_control"], ephemeral, "{members}");
            assert_eq!(
                request["system"][0]["cache_control"], ephemeral,
                "{members}"
            );
        }
        // Explicit wins over a prompt_cache_key: no automatic caching either.
        let request = written(
            &agent,
            r#","prompt_cache_key":"k","prompt_cache_options":{"mode":"explicit"}"#,
        );
        assert_eq!(request.get("cache_control"), None);
        // Anthropic's TTLs are taken as asked.
        let request = written(
            &agent,
            r#","prompt_cache_options":{"mode":"explicit","ttl":"1h"}"#,
        );
        assert_eq!(
            request["system"][0]["cache_control"],
            json!({"type": "ephemeral", "ttl": "1h"})
        );
        // Five marks: the latest four in explicit mode, three beside the automatic caching.
        let five = format!(
            r#"{{"role":"user","content":[{}]}}"#,
            ["a", "b", "c", "d", "e"].map(|t| text(t, true)).join(",")
        );
        for (members, kept) in [
            (r#","prompt_cache_options":{"mode":"explicit"}"#, 4),
            ("", 3),
        ] {
            let request = written(&five, members);
            let marks: Vec<bool> = request["messages"][0]["content"]
                .as_array()
                .unwrap()
                .iter()
                .map(|block| block.get("cache_control").is_some())
                .collect();
            let mut expected = vec![false; 5 - kept];
            expected.resize(5, true);
            assert_eq!(marks, expected, "{members}");
        }
        // A mark on a blank part (left out) or a refusal (OpenAI's type has none) marks
        // nothing; `null` is no mark.
        let none = format!(
            r#"{{"role":"user","content":[{},{{"type":"text","text":"x","prompt_cache_breakpoint":null}}]}},{{"role":"assistant","content":[{{"type":"refusal","refusal":"No."{MARK}}}]}},{{"role":"user","content":"y"}}"#,
            text(" ", true)
        );
        let request = written(&none, r#","prompt_cache_options":{"mode":"explicit"}"#);
        assert!(!request.to_string().contains("cache_control"), "{request}");
    }

    /// Claude Code's `metadata.user_id` (about 150 characters) is longer than OpenAI-compatible
    /// backends take as `user` (64): it goes as its SHA-256, the same for the same user; an
    /// e-mail address as a chat `user`, which Anthropic refuses as identifying, goes hashed too.
    #[test]
    fn user_ids_backends_would_refuse_go_as_their_hash() {
        let long = format!(r#"{{"device_id":"{}","session_id":"s"}}"#, "a".repeat(64));
        let body = |user: &str| {
            format!(
                r#"{{"model":"m","max_tokens":8,"messages":[{{"role":"user","content":"hi"}}],"metadata":{{"user_id":{}}}}}"#,
                Value::from(user)
            )
        };
        let hashed = to_chat_agreed(&body(&long))["user"].clone();
        assert_eq!(hashed.as_str().map(str::len), Some(64), "{hashed}");
        assert_eq!(to_chat_agreed(&body(&long))["user"], hashed, "stable");
        assert_ne!(to_chat_agreed(&body(&format!("{long}x")))["user"], hashed);
        assert_eq!(to_chat_agreed(&body("user_1"))["user"], "user_1");
        let chat = |user: &str| {
            format!(
                r#"{{"model":"m","messages":[{{"role":"user","content":"hi"}}],"user":{}}}"#,
                Value::from(user)
            )
        };
        let mail = to_messages_agreed(&chat("ann@example.com"))["metadata"]["user_id"].clone();
        assert_eq!(mail.as_str().map(str::len), Some(64), "{mail}");
        assert_eq!(
            to_messages_agreed(&chat("u-1"))["metadata"]["user_id"],
            "u-1"
        );
        // `safety_identifier`, OpenAI's member in `user`'s place: the same end user, `user`
        // winning when both are given.
        let safety = |extra: &str| {
            format!(
                r#"{{"model":"m","messages":[{{"role":"user","content":"hi"}}],"safety_identifier":"s-1"{extra}}}"#
            )
        };
        assert_eq!(
            to_messages_agreed(&safety(""))["metadata"]["user_id"],
            "s-1"
        );
        assert_eq!(
            to_messages_agreed(&safety(r#","user":"u-1""#))["metadata"]["user_id"],
            "u-1"
        );
    }

    /// OpenAI refuses `tools: []` and a tool choice without tools; Anthropic accepts both.
    #[test]
    fn no_tools_goes_as_no_tool_members() {
        let c = to_chat_agreed(
            r#"{"model":"m","max_tokens":8,"messages":[{"role":"user","content":"hi"}],"tools":[],"tool_choice":{"type":"auto","disable_parallel_tool_use":true}}"#,
        );
        for member in ["tools", "tool_choice", "parallel_tool_calls"] {
            assert!(c.get(member).is_none(), "{member}: {c}");
        }
        // Tools that are not a list are refused, as before, not dropped with a forced choice.
        let not_a_list = r#"{"model":"m","max_tokens":8,"messages":[{"role":"user","content":"hi"}],"tools":{},"tool_choice":{"type":"any"}}"#;
        assert_eq!(both_ways_to_chat(not_a_list), (None, None));
    }

    /// Anthropic's `none` has no `disable_parallel_tool_use`, and with no tools there is no
    /// choice to make: `parallel_tool_calls: false` (Zed's agent sends it with `none`) adds it
    /// only to a choice of tools.
    #[test]
    fn serial_tool_calls_are_asked_only_where_tools_may_be_called() {
        let tools = r#""tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}]"#;
        let hi = r#""messages":[{"role":"user","content":"hi"}]"#;
        let m = to_messages_agreed(&format!(
            r#"{{"model":"m",{hi},{tools},"tool_choice":"none","parallel_tool_calls":false}}"#
        ));
        assert_eq!(m["tool_choice"], json!({"type": "none"}));
        let m = to_messages_agreed(&format!(
            r#"{{"model":"m",{hi},"parallel_tool_calls":false}}"#
        ));
        assert!(m.get("tool_choice").is_none(), "{m}");
        let m = to_messages_agreed(&format!(
            r#"{{"model":"m",{hi},{tools},"parallel_tool_calls":false}}"#
        ));
        assert_eq!(
            m["tool_choice"],
            json!({"type": "auto", "disable_parallel_tool_use": true})
        );
    }

    /// Anthropic's current models refuse `temperature` and `top_p` together (400), which many
    /// chat clients send (`top_p: 1` besides): `temperature` goes; `top_p` alone still does.
    #[test]
    fn temperature_goes_without_top_p_and_top_p_alone() {
        let hi = r#""messages":[{"role":"user","content":"hi"}]"#;
        let m = to_messages_agreed(&format!(
            r#"{{"model":"m",{hi},"temperature":0.7,"top_p":1}}"#
        ));
        assert_eq!(
            (m["temperature"].clone(), m.get("top_p")),
            (json!(0.7), None)
        );
        let m = to_messages_agreed(&format!(r#"{{"model":"m",{hi},"top_p":0.9}}"#));
        assert_eq!(m["top_p"], 0.9);
    }

    /// API version 2026-10-21 refuses any sampling parameter (400, even at its default): for a
    /// backend sending it, a chat client's `temperature` and `top_p` are left out, whichever
    /// way the request is written; the rest of the request is the same.
    #[test]
    fn sampling_parameters_are_left_out_for_a_version_that_removed_them() {
        let hi = r#""messages":[{"role":"user","content":"hi"}]"#;
        for sampling in [
            r#""temperature":0.7,"top_p":1"#,
            r#""top_p":0.9"#,
            r#""temperature":0"#,
        ] {
            // In the shape, and out of it (a member the shape does not take: `n`).
            for extra in ["", r#","n":1"#] {
                let body = format!(r#"{{"model":"m",{hi},{sampling}{extra}}}"#);
                let (in_shape, whole) = both_ways_under(&body, Sampling::Removed, false);
                let whole = whole.expect(&body);
                if let Some(in_shape) = in_shape {
                    assert_eq!(in_shape, whole, "{body}");
                }
                assert!(
                    whole.get("temperature").is_none() && whole.get("top_p").is_none(),
                    "{body}"
                );
                let without = format!(r#"{{"model":"m",{hi}{extra}}}"#);
                assert_eq!(Some(whole), both_ways(&without, false).1, "{body}");
            }
        }
    }

    /// A tool's result may hold images (Claude Code's Read of a picture, a browser tool's
    /// screenshot): the `tool` message gets its text, the images follow in a user message,
    /// after the turn's tool messages, where a chat model sees them.
    #[test]
    fn a_tool_results_images_follow_its_tool_message() {
        let c = to_chat_agreed(
            r#"{"model":"m","max_tokens":8,"messages":[{"role":"user","content":"look"},{"role":"assistant","content":[{"type":"tool_use","id":"t1","name":"Read","input":{"p":"a.png"}},{"type":"tool_use","id":"t2","name":"Read","input":{"p":"b.png"}}]},{"role":"user","content":[{"type":"tool_result","tool_use_id":"t1","content":[{"type":"text","text":"a.png"},{"type":"image","source":{"type":"base64","media_type":"image/png","data":"AAAA"}}]},{"type":"tool_result","tool_use_id":"t2","content":[{"type":"image","source":{"type":"url","url":"https://x/b.png"}}]},{"type":"text","text":"what are they?"}]}]}"#,
        );
        let messages = c["messages"].as_array().unwrap();
        let next = |id: &str| {
            format!(
                "(Its images are in the next user message, after \"The images of the result of tool call {id}:\")"
            )
        };
        assert_eq!(
            messages[2],
            json!({"role": "tool", "tool_call_id": "t1", "content": format!("a.png\n\n{}", next("t1"))})
        );
        assert_eq!(
            messages[3],
            json!({"role": "tool", "tool_call_id": "t2", "content": next("t2")})
        );
        // Each result's images are named by their call.
        assert_eq!(
            messages[4],
            json!({"role": "user", "content": [
                {"type": "text", "text": "The images of the result of tool call t1:"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "text", "text": "The images of the result of tool call t2:"},
                {"type": "image_url", "image_url": {"url": "https://x/b.png"}},
                {"type": "text", "text": "what are they?"},
            ]})
        );
        let text_only = to_chat_agreed(
            r#"{"model":"m","max_tokens":8,"messages":[{"role":"user","content":[{"type":"tool_result","tool_use_id":"t1","content":[{"type":"text","text":"ok"}]}]}]}"#,
        );
        assert_eq!(
            text_only["messages"],
            json!([{"role": "tool", "tool_call_id": "t1", "content": "ok"}])
        );
        let document = r#"{"model":"m","max_tokens":8,"messages":[{"role":"user","content":[{"type":"tool_result","tool_use_id":"t1","content":[{"type":"document","source":{"type":"text","data":"x"}}]}]}]}"#;
        assert!(both_ways_to_chat(document).1.is_none(), "still refused");
    }

    /// Structured output (`output_config.format`, what the SDK's `messages.parse` sends)
    /// becomes a strict JSON-schema `response_format`; before, it was dropped and the client
    /// got free text its schema refused.
    #[test]
    fn structured_output_becomes_a_json_schema_response_format() {
        let schema = json!({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"], "additionalProperties": false});
        let c = to_chat_agreed(&format!(
            r#"{{"model":"m","max_tokens":8,"messages":[{{"role":"user","content":"hi"}}],"output_config":{{"format":{{"type":"json_schema","schema":{schema}}},"effort":"high"}}}}"#
        ));
        assert_eq!(
            c["response_format"],
            json!({"type": "json_schema", "json_schema": {"name": "output", "schema": schema, "strict": true}})
        );
        let other = r#"{"model":"m","max_tokens":8,"messages":[{"role":"user","content":"hi"}],"output_config":{"format":{"type":"grammar"}}}"#;
        assert!(both_ways_to_chat(other).1.is_none(), "refused, not dropped");
        // Claude Code's `effort` alone: dropped, and the request still written in its shape.
        let effort_only = r#"{"model":"m","max_tokens":8,"messages":[{"role":"user","content":"hi"}],"output_config":{"effort":"low"}}"#;
        assert!(to_chat_agreed(effort_only).get("response_format").is_none());
        assert!(both_ways_to_chat(effort_only).0.is_some(), "in its shape");
        // A property with a default is optional: OpenAI's strict mode would refuse the schema.
        let optional = json!({"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "integer", "default": 1}}, "required": ["a"], "additionalProperties": false});
        let nested = json!({"type": "object", "properties": {"a": {"type": "array", "items": optional}}, "required": ["a"], "additionalProperties": false});
        for loose in [&optional, &nested] {
            let c = to_chat_agreed(&format!(
                r#"{{"model":"m","max_tokens":8,"messages":[{{"role":"user","content":"hi"}}],"output_config":{{"format":{{"type":"json_schema","schema":{loose}}}}}}}"#
            ));
            assert_eq!(
                c["response_format"]["json_schema"]["strict"], false,
                "{loose}"
            );
        }
        // Strict mode takes an object at the root only: `list[X]`, a union, a `RootModel`.
        for root in [
            json!({"type": "array", "items": schema}),
            json!({"anyOf": [schema, {"type": "string"}]}),
            json!({"$ref": "#/$defs/A", "$defs": {"A": schema}}),
        ] {
            let c = to_chat_agreed(&format!(
                r#"{{"model":"m","max_tokens":8,"messages":[{{"role":"user","content":"hi"}}],"output_config":{{"format":{{"type":"json_schema","schema":{root}}}}}}}"#
            ));
            assert_eq!(
                c["response_format"]["json_schema"]["strict"], false,
                "{root}"
            );
        }
        // A refusal names the member the client sent.
        let parsed = crate::request::parse(
            br#"{"model":"m","max_tokens":8,"messages":[],"output_format":{"type":"grammar"}}"#,
        )
        .unwrap();
        let refused = messages_to_chat(&parsed.object().unwrap(), "up", "max_tokens").unwrap_err();
        assert!(
            format!("{refused:?}").contains("\"output_format\""),
            "{refused:?}"
        );
        // The older top-level `output_format`, which older SDKs send.
        let older = to_chat_agreed(&format!(
            r#"{{"model":"m","max_tokens":8,"messages":[{{"role":"user","content":"hi"}}],"output_format":{{"type":"json_schema","schema":{schema}}}}}"#
        ));
        assert_eq!(older["response_format"]["json_schema"]["schema"], schema);
    }

    /// The requests most clients send, and an agent's with tools, are written in the shape, not
    /// parsed into values.
    #[test]
    fn common_chat_requests_are_written_in_their_shape() {
        for body in [
            r#"{"model":"m","messages":[{"role":"user","content":"Say hello."}]}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"Hi"},{"role":"assistant","content":"","tool_calls":[{"id":"c","type":"function","function":{"name":"f","arguments":" \n "}}]},{"role":"tool","tool_call_id":"c","content":"done"}],"max_tokens":50,"max_completion_tokens":100}"#,
            r#"{"model":"m","messages":[{"role":"system","content":"You are an agent.\nUse the tools."},{"role":"user","content":"Fix the bug."},{"role":"assistant","content":null,"tool_calls":[{"id":"call_1","type":"function","function":{"name":"read","arguments":"{\"path\":\"/a.rs\",\"limit\":120}"}}]},{"role":"tool","tool_call_id":"call_1","content":"fn main() {\n}"},{"role":"assistant","content":"Reading the next.","tool_calls":[{"id":"call_2","type":"function","function":{"name":"read","arguments":""}}]},{"role":"tool","tool_call_id":"call_2","content":[{"type":"text","text":"no such file"}]},{"role":"user","content":[{"type":"text","text":"Go on."}]}],"tools":[{"type":"function","function":{"name":"read","description":"Reads a file.","parameters":{"type":"object","properties":{"path":{"type":"string"}},"required":["path"]},"strict":true}}],"tool_choice":"auto","parallel_tool_calls":false,"max_completion_tokens":4096,"temperature":0.2,"stop":["END"],"user":"u-1","stream":true,"stream_options":{"include_usage":true}}"#,
            r#"{"model":"m","messages":[{"role":"developer","content":"Be terse."},{"role":"user","content":"Hi"}],"max_tokens":50}"#,
            r#"{"model":"m","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Hi"},{"role":"assistant","content":"Hello!","refusal":null},{"role":"user","content":"Again"}],"max_completion_tokens":100,"temperature":0.2,"top_p":0.9,"stream":true,"stream_options":{"include_usage":true},"user":"u-1","seed":1}"#,
        ] {
            let (in_shape, parsed_whole) = both_ways(body, true);
            assert!(in_shape.is_some(), "{body}");
            assert_eq!(in_shape, parsed_whole, "{body}");
        }
    }
}
