//! Anthropic's Messages API, as strict as the current API (written from the official `anthropic`
//! SDK's types): `POST /v1/messages` (JSON, or named SSE events `message_start`, `ping`,
//! `content_block_start`/`delta`/`stop`, `message_delta`, `message_stop`) and
//! `POST /v1/messages/count_tokens`.
//!
//! Refused with Anthropic's error shape `{"type":"error","error":{"type","message"}}`: a request
//! without an API key (`x-api-key`, or `Authorization: Bearer` as the newest SDKs send) or
//! without `anthropic-version` (401 / 400), a missing or non-positive `max_tokens`, a role other
//! than `user`, `assistant` or `system`, `temperature`, `top_p` or `top_k` under
//! `anthropic-version` 2026-10-21 or later (which removed them, even at their defaults), a `tool_use` whose `input` is not an object, a
//! `tool_result` answering no earlier `tool_use`, a tool without `input_schema` (server tools
//! carry a `type` instead), an unknown `tool_choice`.
//!
//! The answer: when the request offers tools (and `tool_choice` is not `none`) and its last
//! turn holds no `tool_result`, one `tool_use` of the chosen (or first) tool whose input fills
//! each property of its schema (`"mock"`, `1`, `true`); otherwise the text
//! `"[<name>] tok1 tok2 …"` of `chunk_count` words (fewer, with `stop_reason: max_tokens`, when
//! `max_tokens` is smaller), or for structured output (`output_config.format`, a JSON schema)
//! the JSON of an instance of the schema (each property filled as a tool's input is). Usage:
//! `input_tokens` = whitespace-separated words of every text. Server tools (`web_search_*`,
//! `web_fetch_*`) are never the tool called: each makes as many calls as its `max_uses` (1
//! without), counted in `usage.server_tool_use` (0 in `message_start`, then the total), each a
//! `server_tool_use` block and its result's block before the text.
//!
//! The prompt cache: a request whose system or message blocks carry `cache_control` has the
//! prompt up to its last such block (the prefix) cached, as Anthropic's is (without its
//! minimum length); a top-level `cache_control` (automatic caching) puts that block at the
//! prompt's end. The first request with a prefix writes it (`cache_creation_input_tokens`, and
//! `cache_creation.ephemeral_5m_input_tokens`, or `_1h_` for a `"ttl": "1h"`), each later one
//! reads it (`cache_read_input_tokens`); a request whose prefix is not cached reads the longest
//! cached prefix ending at one of the 20 blocks before it and writes the rest, as Anthropic's
//! lookback does, so a conversation's next turn reads the last one's. `input_tokens` counts
//! the rest.

use bytes::Bytes;
use http::{HeaderMap, StatusCode, header};
use serde_json::{Map, Value, json};

/// The last request to a Messages route (`/v1/messages` or its `count_tokens`) and what the
/// mock answered, for tests that check what passed through a gateway unchanged.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MessagesExchange {
    /// The request path, with its query string if any.
    pub path: String,
    /// The request's headers, names in lower case, in the order received.
    pub headers: Vec<(String, String)>,
    /// The request body as received.
    pub body: String,
    /// The answer's body as sent: the whole JSON, or every event of the stream; empty when a
    /// fault answered instead.
    pub answer: String,
}

impl MessagesExchange {
    /// The value of a request header (the first, if sent more than once).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// An Anthropic-shaped error.
#[derive(Debug, Clone)]
pub(crate) struct AnthropicError {
    pub(crate) status: StatusCode,
    kind: &'static str,
    message: String,
}

impl AnthropicError {
    fn invalid(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            message: message.into(),
        }
    }

    /// The error a [`Fault::Status`](super::Fault::Status) answers with on these routes.
    pub(crate) fn for_status(status: StatusCode) -> Self {
        let kind = match status.as_u16() {
            400 => "invalid_request_error",
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            529 => "overloaded_error",
            _ => "api_error",
        };
        let message = match kind {
            "overloaded_error" => "Overloaded".to_owned(),
            "rate_limit_error" => "This request would exceed your organization's rate limit of \
                                   30,000 input tokens per minute (org: \
                                   9d50ef40-6cc8-4ca6-9d35-1dc9cf26235c, model: \
                                   claude-sonnet-4-6). For details, refer to: \
                                   https://docs.claude.com/en/api/rate-limits."
                .to_owned(),
            _ => format!("mock error {}", status.as_u16()),
        };
        Self {
            status,
            kind,
            message,
        }
    }

    pub(crate) fn not_found_model(model: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            kind: "not_found_error",
            message: format!("model: {model}"),
        }
    }

    pub(crate) fn body(&self) -> Bytes {
        Bytes::from(
            json!({
                "type": "error",
                "error": {"type": self.kind, "message": self.message},
                "request_id": "req_mock",
            })
            .to_string(),
        )
    }

    /// The same error as a stream's `error` event.
    pub(crate) fn event(&self) -> Bytes {
        sse(
            "error",
            &json!({"type": "error", "error": {"type": self.kind, "message": self.message}}),
        )
    }
}

/// Checks the headers every Anthropic request needs: a key (the expected one, if configured;
/// in `key_header` alone when that is set) and `anthropic-version`.
pub(crate) fn check_headers(
    headers: &HeaderMap,
    expected: Option<&str>,
    key_header: Option<&str>,
) -> Result<(), AnthropicError> {
    let bearer = || {
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
    };
    let key = match key_header {
        Some("authorization") => bearer(),
        Some(name) => headers.get(name).and_then(|v| v.to_str().ok()),
        None => headers
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .or_else(bearer),
    };
    let unauthorized = |message: &str| AnthropicError {
        status: StatusCode::UNAUTHORIZED,
        kind: "authentication_error",
        message: message.to_owned(),
    };
    match (key, expected) {
        (None, _) => return Err(unauthorized("x-api-key header is required")),
        (Some(got), Some(expected)) if got != expected => {
            return Err(unauthorized("invalid x-api-key"));
        }
        _ => {}
    }
    if headers.get("anthropic-version").is_none() {
        return Err(AnthropicError::invalid(
            "anthropic-version: header is required",
        ));
    }
    Ok(())
}

/// A validated Messages request: what the answer needs.
#[derive(Debug, Clone)]
pub(crate) struct MessagesRequest {
    pub(crate) model: String,
    pub(crate) stream: bool,
    max_tokens: u64,
    pub(crate) input_tokens: u64,
    /// The tool to call, with its input, when the answer is a tool call.
    tool_call: Option<(String, Value)>,
    /// The prompt's prefix to its last `cache_control` block, when one has it.
    pub(crate) cache_prefix: Option<CachePrefix>,
    /// The answer's JSON when the request asks for structured output
    /// (`output_config.format`): an instance of its schema.
    structured: Option<Value>,
    /// The speed (`speed`: `standard`, or `fast` for fast mode) and the region
    /// (`inference_geo`: `global`, or `us` for US-only inference) it is served at, as its
    /// answer's `usage` reports them.
    speed: &'static str,
    inference_geo: &'static str,
    /// The searches and fetches its server tools make (`web_search_*`, `web_fetch_*` tools:
    /// as many as their `max_uses`, 1 without), as `usage.server_tool_use` counts them.
    server_tool_use: Option<ServerToolUse>,
}

/// Calls of Anthropic's server tools in one answer.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ServerToolUse {
    web_search_requests: u64,
    web_fetch_requests: u64,
}

/// The calls the server tools `tools` offers make: each `web_search_*` or `web_fetch_*` tool
/// as many as its `max_uses`, 1 without; `None` when it offers none.
fn server_tool_use(tools: &[Value]) -> Option<ServerToolUse> {
    let mut used: Option<ServerToolUse> = None;
    for tool in tools {
        let kind = tool.get("type").and_then(Value::as_str).unwrap_or("custom");
        let uses = tool.get("max_uses").and_then(Value::as_u64).unwrap_or(1);
        if kind.starts_with("web_search_") {
            used.get_or_insert_default().web_search_requests += uses;
        } else if kind.starts_with("web_fetch_") {
            used.get_or_insert_default().web_fetch_requests += uses;
        }
    }
    used
}

/// Whether `tool` is the client's own (a `custom` tool, or one without a `type`), which the
/// answer may call, rather than a server tool Anthropic runs itself.
fn is_client_tool(tool: &Value) -> bool {
    tool.get("type")
        .and_then(Value::as_str)
        .is_none_or(|kind| kind == "custom")
}

/// The part of a prompt the cache holds: its tokens, a hash of its texts (the cache's key),
/// and whether it is kept for an hour (`"ttl": "1h"`) rather than five minutes.
#[derive(Debug, Clone)]
pub(crate) struct CachePrefix {
    pub(crate) tokens: u64,
    pub(crate) hash: u64,
    one_hour: bool,
    /// The tokens and hash of the prompt to each of the (at most 20) blocks before it, latest
    /// last: where Anthropic looks for a cached prefix when this one is not cached.
    pub(crate) earlier: Vec<(u64, u64)>,
}

/// How many blocks before a cache breakpoint Anthropic looks back for a cached prefix.
const LOOKBACK_BLOCKS: usize = 20;

/// Counts a prompt's words, and where its cache prefix ends.
#[derive(Default)]
struct Prompt {
    words: u64,
    hasher: std::collections::hash_map::DefaultHasher,
    prefix: Option<CachePrefix>,
    /// The words and hash of the prompt after each block so far.
    boundaries: Vec<(u64, u64)>,
}

impl Prompt {
    fn text(&mut self, text: &str) {
        use std::hash::Hash;
        self.words += count(text);
        text.hash(&mut self.hasher);
    }

    /// After a block: the prefix ends here when it asks for the cache.
    fn block(&mut self, block: &Value) {
        self.boundary();
        if let Some(control) = block.get("cache_control") {
            self.cache_here(control);
        }
    }

    /// After a block, or a message whose content is a string (one block to Anthropic).
    fn boundary(&mut self) {
        use std::hash::Hasher;
        self.boundaries.push((self.words, self.hasher.finish()));
    }

    /// The prefix ends at the last block so far, if `control` is a cache control.
    fn cache_here(&mut self, control: &Value) {
        let Some(&(tokens, hash)) = self.boundaries.last().filter(|_| control.is_object()) else {
            return;
        };
        let before = &self.boundaries[..self.boundaries.len() - 1];
        self.prefix = Some(CachePrefix {
            tokens,
            hash,
            one_hour: control.get("ttl").and_then(Value::as_str) == Some("1h"),
            earlier: before[before.len().saturating_sub(LOOKBACK_BLOCKS)..].to_vec(),
        });
    }
}

/// Parses and validates a Messages (or count_tokens) body. `model` comes out even when the
/// rest is invalid, so it can be counted.
pub(crate) fn parse(
    body: &[u8],
    count_tokens: bool,
    version: Option<&str>,
) -> (Option<String>, Result<MessagesRequest, AnthropicError>) {
    let value: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            return (
                None,
                Err(AnthropicError::invalid(format!("invalid JSON: {e}"))),
            );
        }
    };
    let model = value
        .get("model")
        .and_then(Value::as_str)
        .map(str::to_owned);
    (
        model.clone(),
        validate(&value, model, count_tokens, version),
    )
}

/// The first API version without the sampling parameters.
const SAMPLING_REMOVED_IN: &str = "2026-10-21";

fn validate(
    v: &Value,
    model: Option<String>,
    count_tokens: bool,
    version: Option<&str>,
) -> Result<MessagesRequest, AnthropicError> {
    let o = v
        .as_object()
        .ok_or_else(|| AnthropicError::invalid("body must be an object"))?;
    // Version 2026-10-21 removed them: any of them is refused, even at its default value.
    if version.is_some_and(|v| v >= SAMPLING_REMOVED_IN) {
        for name in ["temperature", "top_p", "top_k"] {
            if o.contains_key(name) {
                return Err(AnthropicError::invalid(format!(
                    "{name}: Extra inputs are not permitted"
                )));
            }
        }
    }
    let model = model.ok_or_else(|| AnthropicError::invalid("model: Field required"))?;
    let max_tokens = match o.get("max_tokens") {
        None if count_tokens => 0,
        None => return Err(AnthropicError::invalid("max_tokens: Field required")),
        Some(m) => m.as_u64().filter(|m| *m >= 1).ok_or_else(|| {
            AnthropicError::invalid("max_tokens: Input should be greater than or equal to 1")
        })?,
    };
    let mut prompt = Prompt::default();
    match o.get("system") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => {
            if blank(s) {
                return Err(AnthropicError::invalid(blank_refused("system")));
            }
            prompt.text(s);
            prompt.boundary();
        }
        Some(Value::Array(blocks)) => {
            for b in blocks {
                prompt.text(text_of(b, "system")?);
                prompt.block(b);
            }
        }
        Some(_) => {
            return Err(AnthropicError::invalid(
                "system: Input should be a valid string or list",
            ));
        }
    }
    let messages = o
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| AnthropicError::invalid("messages: Field required"))?;
    if messages.is_empty() && !count_tokens {
        return Err(AnthropicError::invalid(
            "messages: at least one message is required",
        ));
    }
    let mut tool_uses: Vec<String> = Vec::new();
    let mut last_has_result = false;
    for (i, m) in messages.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("");
        if !matches!(role, "user" | "assistant" | "system") {
            return Err(AnthropicError::invalid(format!(
                "messages.{i}.role: Input should be 'user', 'assistant' or 'system'"
            )));
        }
        // Mid-conversation system messages: Claude Opus 4.8 alone takes them, and only right
        // after a user turn.
        if role == "system" {
            if !model.contains("opus-4-8") {
                return Err(AnthropicError::invalid(format!(
                    "messages.{i}.role: role 'system' is not supported on this model"
                )));
            }
            let after = (i > 0).then(|| messages[i - 1].get("role").and_then(Value::as_str));
            if after != Some(Some("user")) {
                return Err(AnthropicError::invalid(format!(
                    "messages.{i}: a system message must follow a user message"
                )));
            }
        }
        let last_assistant = role == "assistant" && i + 1 == messages.len();
        let empty = match m.get("content") {
            Some(Value::String(s)) => s.is_empty(),
            Some(Value::Array(blocks)) => blocks.is_empty(),
            _ => false,
        };
        if empty && !last_assistant {
            return Err(AnthropicError::invalid(format!(
                "messages.{i}: all messages must have non-empty content except for the optional final assistant message"
            )));
        }
        last_has_result = false;
        match m.get("content") {
            Some(Value::String(s)) => {
                if blank(s) && !s.is_empty() {
                    return Err(AnthropicError::invalid(blank_refused("messages")));
                }
                prompt.text(s);
                prompt.boundary();
            }
            Some(Value::Array(blocks)) => {
                for (j, b) in blocks.iter().enumerate() {
                    let at = format!("messages.{i}.content.{j}");
                    match b.get("type").and_then(Value::as_str) {
                        Some("text") => prompt.text(text_of(b, &at)?),
                        Some("image" | "document") if role == "user" => {
                            let Some(source) = b.get("source").filter(|s| s.is_object()) else {
                                return Err(AnthropicError::invalid(format!(
                                    "{at}.source: Field required"
                                )));
                            };
                            if b["type"] == "image"
                                && source["type"] == "base64"
                                && !IMAGE_TYPES
                                    .contains(&source["media_type"].as_str().unwrap_or(""))
                            {
                                return Err(AnthropicError::invalid(format!(
                                    "{at}.source.base64.media_type: Input should be 'image/jpeg', 'image/png', 'image/gif' or 'image/webp'"
                                )));
                            }
                        }
                        Some("tool_use") if role == "assistant" => {
                            let id = b.get("id").and_then(Value::as_str).ok_or_else(|| {
                                AnthropicError::invalid(format!("{at}.id: Field required"))
                            })?;
                            if b.get("name").and_then(Value::as_str).is_none() {
                                return Err(AnthropicError::invalid(format!(
                                    "{at}.name: Field required"
                                )));
                            }
                            if !b.get("input").is_some_and(Value::is_object) {
                                return Err(AnthropicError::invalid(format!(
                                    "{at}.input: Input should be a valid dictionary"
                                )));
                            }
                            tool_uses.push(id.to_owned());
                        }
                        Some("tool_result") if role == "user" => {
                            let id = b.get("tool_use_id").and_then(Value::as_str).unwrap_or("");
                            if !tool_uses.iter().any(|t| t == id) {
                                return Err(AnthropicError::invalid(format!(
                                    "{at}: unexpected `tool_use_id` found in `tool_result` blocks: {id}. Each `tool_result` block must have a corresponding `tool_use` block in the previous message."
                                )));
                            }
                            last_has_result = true;
                            match b.get("content") {
                                Some(Value::String(s)) => prompt.text(s),
                                Some(Value::Array(parts)) => {
                                    for p in parts {
                                        if p.get("type").and_then(Value::as_str) == Some("text") {
                                            prompt.text(text_of(p, &at)?);
                                        }
                                    }
                                }
                                _ => {}
                            }
                        }
                        Some("thinking" | "redacted_thinking") if role == "assistant" => {}
                        other => {
                            return Err(AnthropicError::invalid(format!(
                                "{at}.type: `{}` is not a valid block type for role `{role}`",
                                other.unwrap_or("")
                            )));
                        }
                    }
                    prompt.block(b);
                }
            }
            _ => {
                return Err(AnthropicError::invalid(format!(
                    "messages.{i}.content: Field required"
                )));
            }
        }
    }
    // Automatic caching: the breakpoint at the prompt's last block.
    if let Some(control) = o.get("cache_control") {
        prompt.cache_here(control);
    }
    let tools = match o.get("tools") {
        None | Some(Value::Null) => &[][..],
        Some(Value::Array(tools)) => tools.as_slice(),
        Some(_) => {
            return Err(AnthropicError::invalid(
                "tools: Input should be a valid list",
            ));
        }
    };
    for (i, t) in tools.iter().enumerate() {
        if t.get("name").and_then(Value::as_str).is_none() {
            return Err(AnthropicError::invalid(format!(
                "tools.{i}.name: Field required"
            )));
        }
        if is_client_tool(t) && !t.get("input_schema").is_some_and(Value::is_object) {
            return Err(AnthropicError::invalid(format!(
                "tools.{i}.custom.input_schema: Field required"
            )));
        }
    }
    let choice = o.get("tool_choice");
    let chosen = match choice.and_then(|c| c.get("type")).and_then(Value::as_str) {
        None if choice.is_none() => None,
        Some("auto" | "any") => None,
        Some("none") => Some(None),
        Some("tool") => Some(Some(
            choice
                .and_then(|c| c.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(|| AnthropicError::invalid("tool_choice.name: Field required"))?,
        )),
        _ => {
            return Err(AnthropicError::invalid(
                "tool_choice.type: Input tag is not one of 'auto', 'any', 'tool', 'none'",
            ));
        }
    };
    if let Some(stops) = o.get("stop_sequences")
        && !stops
            .as_array()
            .is_some_and(|a| a.iter().all(Value::is_string))
    {
        return Err(AnthropicError::invalid(
            "stop_sequences: Input should be a valid list of strings",
        ));
    }
    if let Some(t) = o.get("temperature")
        && !t.as_f64().is_some_and(|t| (0.0..=1.0).contains(&t))
    {
        return Err(AnthropicError::invalid(
            "temperature: Input should be less than or equal to 1",
        ));
    }
    // The answer calls a client tool; the server tools' calls are Anthropic's own (counted in
    // the usage; their blocks are not written).
    let client_tools: Vec<&Value> = tools.iter().filter(|t| is_client_tool(t)).collect();
    let tool_call = match chosen {
        Some(None) => None,
        _ if last_has_result || client_tools.is_empty() => None,
        Some(Some(name)) => client_tools
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some(name))
            .map(|t| (name.to_owned(), input_for(t.get("input_schema")))),
        None => client_tools.first().map(|t| {
            (
                t.get("name")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
                input_for(t.get("input_schema")),
            )
        }),
    };
    let structured = match o.get("output_config").and_then(|c| c.get("format")) {
        None | Some(Value::Null) => None,
        Some(format) => {
            if format.get("type").and_then(Value::as_str) != Some("json_schema") {
                return Err(AnthropicError::invalid(
                    "output_config.format.type: Input should be 'json_schema'",
                ));
            }
            let schema = format
                .get("schema")
                .filter(|s| s.is_object())
                .ok_or_else(|| {
                    AnthropicError::invalid("output_config.format.schema: Field required")
                })?;
            Some(input_for(Some(schema)))
        }
    };
    let speed = one_of(o, "speed", ["standard", "fast"])?;
    let inference_geo = one_of(o, "inference_geo", ["global", "us"])?;
    Ok(MessagesRequest {
        speed,
        inference_geo,
        server_tool_use: server_tool_use(tools),
        model,
        stream: o.get("stream").and_then(Value::as_bool).unwrap_or(false),
        max_tokens,
        input_tokens: prompt.words.max(1),
        tool_call,
        cache_prefix: prompt.prefix.filter(|p| p.tokens > 0 && !count_tokens),
        structured,
    })
}

/// The member `name` of a request, one of `values` (the first when it is absent), as
/// Anthropic refuses any other.
fn one_of(
    request: &serde_json::Map<String, Value>,
    name: &str,
    values: [&'static str; 2],
) -> Result<&'static str, AnthropicError> {
    let Some(given) = request.get(name) else {
        return Ok(values[0]);
    };
    values
        .into_iter()
        .find(|value| given.as_str() == Some(value))
        .ok_or_else(|| {
            AnthropicError::invalid(format!(
                "{name}: Input should be '{}' or '{}'",
                values[0], values[1]
            ))
        })
}

/// A text block's text; Anthropic refuses one that is empty or whitespace alone, naming the
/// top-level member it is in (`messages`, `system`).
fn text_of<'a>(block: &'a Value, at: &str) -> Result<&'a str, AnthropicError> {
    let text = block
        .get("text")
        .and_then(Value::as_str)
        .ok_or_else(|| AnthropicError::invalid(format!("{at}.text: Field required")))?;
    if blank(text) {
        return Err(AnthropicError::invalid(blank_refused(
            at.split('.').next().unwrap_or(at),
        )));
    }
    Ok(text)
}

/// Anthropic's refusal of a blank text block, in `member`.
fn blank_refused(member: &str) -> String {
    format!("{member}: text content blocks must contain non-whitespace text")
}

fn blank(text: &str) -> bool {
    text.trim().is_empty()
}

/// The media types of base64 images Anthropic takes.
const IMAGE_TYPES: [&str; 4] = ["image/jpeg", "image/png", "image/gif", "image/webp"];

fn count(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

/// A tool input that fills each property of the schema.
pub(crate) fn input_for(schema: Option<&Value>) -> Value {
    let mut input = Map::new();
    if let Some(properties) = schema
        .and_then(|s| s.get("properties"))
        .and_then(Value::as_object)
    {
        for (name, property) in properties {
            let value = match property.get("type").and_then(Value::as_str) {
                Some("integer" | "number") => json!(1),
                Some("boolean") => json!(true),
                _ => json!("mock"),
            };
            input.insert(name.clone(), value);
        }
    }
    Value::Object(input)
}

/// The counts of an answer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MessageUsage {
    /// Every prompt token, read from or written to the cache or neither.
    pub(crate) input: u64,
    pub(crate) output: u64,
    pub(crate) cache_read: u64,
    pub(crate) cache_write: u64,
    speed: &'static str,
    inference_geo: &'static str,
    server_tool_use: Option<ServerToolUse>,
}

impl MessageUsage {
    /// `usage.server_tool_use` when the request offered server tools: the calls so far.
    fn server_tool_use(&self, done: bool) -> Value {
        match self.server_tool_use {
            None => Value::Null,
            Some(used) => {
                let counted = |n| if done { n } else { 0 };
                json!({
                    "web_search_requests": counted(used.web_search_requests),
                    "web_fetch_requests": counted(used.web_fetch_requests),
                })
            }
        }
    }

    /// The answer's `usage`, as Anthropic writes it: `input_tokens` without the cache's; the
    /// server tools' calls once `done` (0 in `message_start`).
    fn json(&self, output: u64, one_hour: bool, done: bool) -> Value {
        let (five_minutes, hour) = if one_hour {
            (0, self.cache_write)
        } else {
            (self.cache_write, 0)
        };
        json!({
            "input_tokens": self.input - self.cache_read - self.cache_write,
            "output_tokens": output,
            "cache_creation_input_tokens": self.cache_write,
            "cache_read_input_tokens": self.cache_read,
            "cache_creation": {
                "ephemeral_5m_input_tokens": five_minutes,
                "ephemeral_1h_input_tokens": hour,
            },
            "service_tier": "standard",
            "speed": self.speed,
            "inference_geo": self.inference_geo,
            "server_tool_use": self.server_tool_use(done),
        })
    }
}

/// The answer to a valid request: a whole `Message` JSON, or its event stream. `cache_read`:
/// the tokens of its cache prefix, if it has one, that were in the cache.
pub(crate) fn answer(
    name: &str,
    id: u64,
    config: &super::MockConfig,
    req: &MessagesRequest,
    cache_read: u64,
) -> (Bytes, Vec<Bytes>, MessageUsage) {
    let chunk_count = config.chunk_count;
    let id = format!("msg_mock{id:016x}");
    let (words, stop) = match &req.tool_call {
        Some(_) => (0, "tool_use"),
        None if req.max_tokens < chunk_count as u64 => (req.max_tokens as usize, "max_tokens"),
        None => (chunk_count, "end_turn"),
    };
    // The text in the pieces a stream sends: `[name]`, ` tok1`, … or, for structured
    // output, the JSON cut in `chunk_count` pieces.
    let pieces: Vec<String> = match &req.structured {
        Some(json) if req.tool_call.is_none() => super::in_pieces(&json.to_string(), chunk_count)
            .into_iter()
            .map(str::to_owned)
            .collect(),
        _ if words == 0 => Vec::new(),
        _ => std::iter::once(format!("[{name}]"))
            .chain((1..=words).map(|i| format!(" tok{i}")))
            .collect(),
    };
    let text = pieces.concat();
    let output = match &req.tool_call {
        Some(_) => chunk_count.max(1) as u64,
        None => words as u64,
    };
    let cached = req.cache_prefix.as_ref().map_or(0, |p| p.tokens);
    let usage = MessageUsage {
        input: req.input_tokens,
        output,
        cache_read,
        cache_write: cached - cache_read,
        speed: req.speed,
        inference_geo: req.inference_geo,
        server_tool_use: req.server_tool_use,
    };
    let one_hour = req.cache_prefix.as_ref().is_some_and(|p| p.one_hour);
    // Each server tool call is a `server_tool_use` block and its result's block, before the
    // text, as Anthropic writes them.
    let server_blocks: Vec<(Value, Value)> = req
        .server_tool_use
        .map(|used| {
            let searches = (0..used.web_search_requests).map(|n| ("web_search", n));
            let fetches = (0..used.web_fetch_requests).map(|n| ("web_fetch", n));
            searches
                .chain(fetches)
                .map(|(tool, n)| server_blocks(&id, tool, n))
                .collect()
        })
        .unwrap_or_default();
    let mut content = Vec::new();
    for (call, result) in &server_blocks {
        content.push(call.clone());
        content.push(result.clone());
    }
    if !text.is_empty() {
        content.push(json!({"type": "text", "text": text}));
    }
    if let Some((tool, input)) = &req.tool_call {
        content.push(
            json!({"type": "tool_use", "id": format!("toolu_{id}"), "name": tool, "input": input}),
        );
    }
    let message = json!({
        "id": id, "type": "message", "role": "assistant", "model": req.model,
        "content": content, "stop_reason": stop, "stop_sequence": null,
        "usage": usage.json(usage.output, one_hour, true),
    });
    let mut events = vec![
        sse(
            "message_start",
            &json!({"type": "message_start", "message": {
                "id": id, "type": "message", "role": "assistant", "model": req.model,
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": usage.json(1, one_hour, false),
            }}),
        ),
        sse("ping", &json!({"type": "ping"})),
    ];
    let mut index = 0;
    for (call, result) in &server_blocks {
        // The call's input comes in a delta, as a tool use's does; the result whole.
        let mut start = call.clone();
        start["input"] = json!({});
        events.push(sse(
            "content_block_start",
            &json!({"type": "content_block_start", "index": index, "content_block": start}),
        ));
        events.push(sse("content_block_delta", &json!({"type": "content_block_delta", "index": index, "delta": {"type": "input_json_delta", "partial_json": call["input"].to_string()}})));
        events.push(sse(
            "content_block_stop",
            &json!({"type": "content_block_stop", "index": index}),
        ));
        events.push(sse(
            "content_block_start",
            &json!({"type": "content_block_start", "index": index + 1, "content_block": result}),
        ));
        events.push(sse(
            "content_block_stop",
            &json!({"type": "content_block_stop", "index": index + 1}),
        ));
        index += 2;
    }
    if !text.is_empty() {
        events.push(sse("content_block_start", &json!({"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}})));
        for piece in pieces {
            events.push(sse("content_block_delta", &json!({"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": piece}})));
        }
        events.push(sse(
            "content_block_stop",
            &json!({"type": "content_block_stop", "index": index}),
        ));
        index += 1;
    }
    if let Some((tool, input)) = &req.tool_call {
        events.push(sse("content_block_start", &json!({"type": "content_block_start", "index": index, "content_block": {"type": "tool_use", "id": format!("toolu_{id}"), "name": tool, "input": {}}})));
        // As the real API does: an empty first delta, then the JSON in pieces.
        let json = input.to_string();
        let parts = super::in_pieces(&json, config.tool_call_pieces);
        for part in std::iter::once("").chain(parts) {
            events.push(sse("content_block_delta", &json!({"type": "content_block_delta", "index": index, "delta": {"type": "input_json_delta", "partial_json": part}})));
        }
        events.push(sse(
            "content_block_stop",
            &json!({"type": "content_block_stop", "index": index}),
        ));
    }
    // The delta's usage is cumulative, input and cache counts included, as the current API
    // writes it (`MessageDeltaUsage`).
    events.push(sse("message_delta", &json!({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": null}, "usage": {
        "input_tokens": usage.input - usage.cache_read - usage.cache_write,
        "cache_creation_input_tokens": usage.cache_write,
        "cache_read_input_tokens": usage.cache_read,
        "output_tokens": usage.output,
        "server_tool_use": usage.server_tool_use(true),
    }})));
    events.push(sse("message_stop", &json!({"type": "message_stop"})));
    (Bytes::from(message.to_string()), events, usage)
}

/// A server tool's call `n` in message `id` and its result, as Anthropic writes the blocks.
fn server_blocks(id: &str, tool: &str, n: u64) -> (Value, Value) {
    let call_id = format!("srvtoolu_{id}_{tool}_{n}");
    let (input, result) = match tool {
        "web_search" => (
            json!({"query": "mock"}),
            json!({"type": "web_search_tool_result", "tool_use_id": call_id, "content": [{
                "type": "web_search_result", "url": "https://example.com/", "title": "Mock",
                "encrypted_content": "mock", "page_age": null,
            }]}),
        ),
        _ => (
            json!({"url": "https://example.com/"}),
            json!({"type": "web_fetch_tool_result", "tool_use_id": call_id, "content": {
                "type": "web_fetch_result", "url": "https://example.com/", "retrieved_at": null,
                "content": {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "mock"}, "title": "Mock", "citations": null},
            }}),
        ),
    };
    (
        json!({"type": "server_tool_use", "id": call_id, "name": tool, "input": input}),
        result,
    )
}

/// `count_tokens`' answer.
pub(crate) fn count_tokens_json(req: &MessagesRequest) -> Bytes {
    Bytes::from(json!({"input_tokens": req.input_tokens}).to_string())
}

fn sse(event: &str, data: &Value) -> Bytes {
    Bytes::from(format!("event: {event}\ndata: {data}\n\n"))
}
