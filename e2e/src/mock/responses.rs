//! The Responses API (`/v1/responses`), with the state a real provider keeps: each mock
//! instance remembers the responses it created, so `previous_response_id`, retrieve, delete,
//! `input_items` and cancel work against the instance that created a response and answer 404
//! anywhere else, as a provider that never saw the id does.
//!
//! Usage follows OpenAI's rules: a follow-up (`previous_response_id`) is billed the whole
//! conversation so far as input, and that earlier part counts as cached
//! (`input_tokens_details.cached_tokens`); a request with `reasoning` spends
//! [`MockConfig::chunk_count`](super::MockConfig::chunk_count) reasoning tokens, which count in
//! `output_tokens` as OpenAI bills them (`output_tokens_details.reasoning_tokens`);
//! `input_tokens_details.cache_write_tokens`, which the API always sends, is 0.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use bytes::Bytes;
use http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::openai::{self, ApiError};

/// The token counts of one response, as `ResponseUsage` carries them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ResponseUsage {
    pub(crate) input: u64,
    pub(crate) cached: u64,
    /// Of `input`, written to the cache (always 0 here: the Responses API caches a
    /// conversation's earlier turns, read through `previous_response_id`).
    pub(crate) cache_write: u64,
    pub(crate) output: u64,
    pub(crate) reasoning: u64,
}

impl From<ResponseUsage> for openai::Usage {
    fn from(u: ResponseUsage) -> Self {
        Self {
            cached_tokens: u.cached,
            reasoning_tokens: u.reasoning,
            ..Self::new(u.input, u.output)
        }
    }
}

impl ResponseUsage {
    fn to_json(self) -> Value {
        json!({
            "input_tokens": self.input,
            // Required in the Responses API's `InputTokensDetails`, 0 or not.
            "input_tokens_details": {"cached_tokens": self.cached, "cache_write_tokens": self.cache_write},
            "output_tokens": self.output,
            "output_tokens_details": {"reasoning_tokens": self.reasoning},
            "total_tokens": self.input + self.output,
        })
    }
}

/// A `POST /v1/responses` body, as far as the mock reads it.
#[derive(Debug, Deserialize)]
pub(crate) struct CreateRequest {
    model: Option<Value>,
    #[serde(default)]
    input: Option<Value>,
    #[serde(default)]
    instructions: Option<Value>,
    #[serde(default)]
    previous_response_id: Option<String>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    background: Option<bool>,
    #[serde(default)]
    store: Option<bool>,
    #[serde(default)]
    reasoning: Option<Value>,
    #[serde(default)]
    max_output_tokens: Option<u64>,
    #[serde(default)]
    metadata: Option<Value>,
    #[serde(default)]
    service_tier: Option<String>,
    #[serde(default)]
    tools: Option<Vec<Value>>,
}

/// The built-in tools' calls an answer makes: one `web_search_call` for a `web_search` (or
/// `web_search_preview`) tool, one `file_search_call` for a `file_search` tool, in the order
/// the request lists them.
fn tool_calls(tools: &[Value], mut next_id: impl FnMut() -> u64) -> Vec<Value> {
    tools
        .iter()
        .filter_map(|tool| match tool.get("type").and_then(Value::as_str)? {
            "web_search" | "web_search_preview" => Some(json!({
                "id": format!("ws_{:032x}", next_id()),
                "type": "web_search_call",
                "status": "completed",
                "action": {"type": "search", "query": "mock"},
            })),
            "file_search" => Some(json!({
                "id": format!("fs_{:032x}", next_id()),
                "type": "file_search_call",
                "status": "completed",
                "queries": ["mock"],
                "results": null,
            })),
            _ => None,
        })
        .collect()
}

/// A parsed create request: the model (for counting) and the request or why it is refused.
pub(crate) struct ParsedCreate {
    pub(crate) model: Option<String>,
    pub(crate) request: Result<(String, CreateRequest), ApiError>,
}

pub(crate) fn parse_create(body: &[u8]) -> ParsedCreate {
    let request: CreateRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            return ParsedCreate {
                model: None,
                request: Err(ApiError::invalid_json(&e)),
            };
        }
    };
    let model = match &request.model {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        Some(_) => {
            return ParsedCreate {
                model: None,
                request: Err(ApiError::invalid_request(
                    "Invalid type for 'model': expected a string.",
                    Some("model"),
                )),
            };
        }
        None => {
            return ParsedCreate {
                model: None,
                request: Err(ApiError::invalid_request(
                    "Missing required parameter: 'model'.",
                    Some("model"),
                )),
            };
        }
    };
    if request.input.is_none() && request.previous_response_id.is_none() {
        return ParsedCreate {
            model: Some(model),
            request: Err(ApiError::invalid_request(
                "Missing required parameter: 'input'.",
                Some("input"),
            )),
        };
    }
    if let Err(refused) = openai::served_tier(request.service_tier.as_deref()) {
        return ParsedCreate {
            model: Some(model),
            request: Err(refused),
        };
    }
    if request.background == Some(true) && request.store == Some(false) {
        return ParsedCreate {
            model: Some(model),
            request: Err(ApiError::invalid_request(
                "Background responses must be stored: 'store' cannot be false when 'background' is true.",
                Some("store"),
            )),
        };
    }
    if request.background == Some(true) && request.stream == Some(true) {
        // A simplification of the mock: background responses are polled, not streamed.
        return ParsedCreate {
            model: Some(model),
            request: Err(ApiError::invalid_request(
                "The mock provider does not stream background responses; poll them instead.",
                Some("stream"),
            )),
        };
    }
    ParsedCreate {
        model: Some(model.clone()),
        request: Ok((model, request)),
    }
}

/// One stored response.
struct Stored {
    /// The response object as last sent.
    response: Value,
    /// The items of its `input`, oldest first, as `input_items` lists them.
    input_items: Vec<Value>,
    /// Input and output tokens of the conversation up to and including this response: what a
    /// follow-up is billed as (cached) input.
    context_tokens: u64,
}

/// The responses one mock instance holds.
#[derive(Default)]
pub(crate) struct ResponseStore {
    stored: Mutex<HashMap<String, Stored>>,
}

/// What a create produced: the response object, the events of its stream, its usage.
pub(crate) struct Created {
    pub(crate) response: Bytes,
    /// `event: <type>\ndata: <json>\n\n` frames, `response.created` to `response.completed`.
    pub(crate) events: Vec<Bytes>,
    /// `None` for a background response (nothing generated yet).
    pub(crate) usage: Option<ResponseUsage>,
    pub(crate) stream: bool,
}

fn not_found(id: &str) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: format!("Response with id '{id}' not found."),
        kind: "invalid_request_error",
        param: None,
        code: None,
    }
}

/// Words in every text of `input` (a string, or items whose `content` is a string or parts
/// with `text`), at least 1.
fn input_words(input: Option<&Value>, instructions: Option<&Value>) -> u64 {
    fn words(value: &Value) -> u64 {
        match value {
            Value::String(s) => s.split_whitespace().count() as u64,
            Value::Array(items) => items.iter().map(words).sum(),
            Value::Object(map) => ["content", "text"]
                .iter()
                .filter_map(|k| map.get(*k))
                .map(words)
                .sum(),
            _ => 0,
        }
    }
    (input.map_or(0, words) + instructions.map_or(0, words)).max(1)
}

/// The input as items with ids, as `input_items` returns them.
fn input_items(input: Option<&Value>, next_id: &mut impl FnMut() -> u64) -> Vec<Value> {
    let message = |role: &Value, content: Value, id: String| json!({"id": id, "type": "message", "role": role, "status": "completed", "content": content});
    let text_parts = |text: &str| json!([{"type": "input_text", "text": text}]);
    match input {
        None => Vec::new(),
        Some(Value::String(text)) => vec![message(
            &json!("user"),
            text_parts(text),
            format!("msg_{:032x}", next_id()),
        )],
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| {
                let id = format!("msg_{:032x}", next_id());
                match item {
                    Value::Object(map) if map.get("type").is_none_or(|t| t == "message") => {
                        let role = map.get("role").cloned().unwrap_or(json!("user"));
                        let content = match map.get("content") {
                            Some(Value::String(text)) => text_parts(text),
                            Some(other) => other.clone(),
                            None => json!([]),
                        };
                        message(&role, content, id)
                    }
                    Value::Object(map) => {
                        let mut item = map.clone();
                        item.entry("id").or_insert(json!(id));
                        Value::Object(item)
                    }
                    other => message(&json!("user"), text_parts(&other.to_string()), id),
                }
            })
            .collect(),
        Some(other) => vec![message(
            &json!("user"),
            text_parts(&other.to_string()),
            format!("msg_{:032x}", next_id()),
        )],
    }
}

fn event(kind: &str, sequence: &mut u64, mut body: Value) -> Bytes {
    if let Value::Object(map) = &mut body {
        map.insert("type".to_owned(), json!(kind));
        map.insert("sequence_number".to_owned(), json!(*sequence));
    }
    *sequence += 1;
    let data = serde_json::to_string(&body).unwrap_or_default();
    Bytes::from(format!("event: {kind}\ndata: {data}\n\n"))
}

impl ResponseStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Stored>> {
        self.stored.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Creates a response for `model` (the mock's `name` starts its text).
    pub(crate) fn create(
        &self,
        config: &super::MockConfig,
        model: &str,
        request: &CreateRequest,
        mut next_id: impl FnMut() -> u64,
    ) -> Result<Created, ApiError> {
        let (name, chunk_count) = (config.name.as_str(), config.chunk_count);
        let previous = match &request.previous_response_id {
            None => None,
            Some(id) => match self.lock().get(id) {
                Some(stored) => Some(stored.context_tokens),
                None => {
                    return Err(ApiError {
                        status: StatusCode::NOT_FOUND,
                        message: format!("Previous response with id '{id}' not found."),
                        kind: "invalid_request_error",
                        param: Some("previous_response_id".into()),
                        code: Some("previous_response_not_found"),
                    });
                }
            },
        };
        let background = request.background == Some(true);
        let stream = request.stream == Some(true);
        let mut text_tokens = chunk_count as u64;
        let mut status = "completed";
        let mut incomplete = Value::Null;
        if let Some(max) = request.max_output_tokens
            && max > 0
            && max < text_tokens
        {
            text_tokens = max;
            status = "incomplete";
            incomplete = json!({"reason": "max_output_tokens"});
        }
        let reasoning = request
            .reasoning
            .as_ref()
            .is_some_and(|r| !r.is_null() && r.get("effort").is_none_or(|e| e != "none"));
        let cached = previous.unwrap_or(0);
        let usage = ResponseUsage {
            input: cached + input_words(request.input.as_ref(), request.instructions.as_ref()),
            cached,
            output: text_tokens + if reasoning { chunk_count as u64 } else { 0 },
            reasoning: if reasoning { chunk_count as u64 } else { 0 },
            ..ResponseUsage::default()
        };
        let id = format!("resp_{:032x}{:016x}", rand::random::<u128>(), next_id());
        let message_id = format!("msg_{:032x}", next_id());
        let reasoning_id = format!("rs_{:032x}", next_id());
        let created_at = openai::now_secs();
        let text = openai::full_text(name, text_tokens);
        let message = |text: &str, done: bool| {
            json!({
                "id": message_id,
                "type": "message",
                "role": "assistant",
                "status": if done { "completed" } else { "in_progress" },
                "content": if done || !text.is_empty() {
                    json!([{"type": "output_text", "text": text, "annotations": [], "logprobs": []}])
                } else {
                    json!([])
                },
            })
        };
        let reasoning_item = json!({"id": reasoning_id, "type": "reasoning", "summary": []});
        let calls = tool_calls(request.tools.as_deref().unwrap_or_default(), &mut next_id);
        let response = |status: &str, output: Vec<Value>, usage: Option<ResponseUsage>| {
            json!({
                "id": id,
                "object": "response",
                "created_at": created_at,
                "status": status,
                "background": background,
                "error": null,
                "incomplete_details": if status == "incomplete" { incomplete.clone() } else { Value::Null },
                "instructions": request.instructions.clone().unwrap_or(Value::Null),
                "max_output_tokens": request.max_output_tokens,
                "model": model,
                "output": output,
                "parallel_tool_calls": true,
                "previous_response_id": request.previous_response_id,
                "reasoning": request.reasoning.clone().unwrap_or(json!({"effort": null, "summary": null})),
                "store": request.store.unwrap_or(true),
                "temperature": 1.0,
                "text": {"format": {"type": "text"}},
                "tool_choice": "auto",
                "tools": request.tools.clone().unwrap_or_default(),
                "top_p": 1.0,
                "truncation": "disabled",
                "usage": usage.map(ResponseUsage::to_json),
                "user": null,
                "metadata": request.metadata.clone().unwrap_or(json!({})),
                "service_tier": config.serves(openai::served_tier(request.service_tier.as_deref()).unwrap_or("default")),
            })
        };
        let mut output = Vec::new();
        if reasoning {
            output.push(reasoning_item.clone());
        }
        output.extend(calls.iter().cloned());
        output.push(message(&text, true));
        let (finished, usage) = if background {
            (response("queued", Vec::new(), None), None)
        } else {
            (response(status, output, Some(usage)), Some(usage))
        };
        let mut events = Vec::new();
        if stream {
            let mut seq = 0;
            let begun = response("in_progress", Vec::new(), None);
            if background {
                events.push(event(
                    "response.queued",
                    &mut seq,
                    json!({"response": finished}),
                ));
            } else {
                events.push(event(
                    "response.created",
                    &mut seq,
                    json!({"response": begun}),
                ));
                events.push(event(
                    "response.in_progress",
                    &mut seq,
                    json!({"response": begun}),
                ));
                let mut index = 0;
                if reasoning {
                    events.push(event(
                        "response.output_item.added",
                        &mut seq,
                        json!({"output_index": 0, "item": reasoning_item}),
                    ));
                    events.push(event(
                        "response.output_item.done",
                        &mut seq,
                        json!({"output_index": 0, "item": reasoning_item}),
                    ));
                    index = 1;
                }
                for call in &calls {
                    for kind in ["response.output_item.added", "response.output_item.done"] {
                        events.push(event(
                            kind,
                            &mut seq,
                            json!({"output_index": index, "item": call}),
                        ));
                    }
                    index += 1;
                }
                let at = json!({"item_id": message_id, "output_index": index, "content_index": 0});
                let with = |mut base: Value, extra: Value| {
                    if let (Value::Object(b), Value::Object(e)) = (&mut base, extra) {
                        b.extend(e);
                    }
                    base
                };
                events.push(event(
                    "response.output_item.added",
                    &mut seq,
                    json!({"output_index": index, "item": message("", false)}),
                ));
                events.push(event(
                    "response.content_part.added",
                    &mut seq,
                    with(
                        at.clone(),
                        json!({"part": {"type": "output_text", "text": "", "annotations": []}}),
                    ),
                ));
                for k in 0..text_tokens {
                    events.push(event(
                        "response.output_text.delta",
                        &mut seq,
                        with(
                            at.clone(),
                            json!({"delta": openai::piece(name, k), "logprobs": []}),
                        ),
                    ));
                }
                events.push(event(
                    "response.output_text.done",
                    &mut seq,
                    with(at.clone(), json!({"text": text, "logprobs": []})),
                ));
                events.push(event(
                    "response.content_part.done",
                    &mut seq,
                    with(
                        at,
                        json!({"part": {"type": "output_text", "text": text, "annotations": []}}),
                    ),
                ));
                events.push(event(
                    "response.output_item.done",
                    &mut seq,
                    json!({"output_index": index, "item": message(&text, true)}),
                ));
                let last = if status == "incomplete" {
                    "response.incomplete"
                } else {
                    "response.completed"
                };
                events.push(event(last, &mut seq, json!({"response": finished})));
            }
        }
        if request.store != Some(false) {
            let items = input_items(request.input.as_ref(), &mut next_id);
            self.lock().insert(
                id.clone(),
                Stored {
                    response: finished.clone(),
                    input_items: items,
                    context_tokens: usage.map_or(cached, |u| u.input + u.output),
                },
            );
        }
        Ok(Created {
            response: openai::json_bytes(&finished),
            events,
            usage,
            stream,
        })
    }

    /// The context a request continues: the stored response's conversation tokens (0 without
    /// `previous_response_id`), or OpenAI's 404 for an id this mock does not hold.
    fn context(&self, previous: Option<&String>) -> Result<u64, ApiError> {
        match previous {
            None => Ok(0),
            Some(id) => self
                .lock()
                .get(id)
                .map(|stored| stored.context_tokens)
                .ok_or_else(|| ApiError {
                    status: StatusCode::NOT_FOUND,
                    message: format!("Previous response with id '{id}' not found."),
                    kind: "invalid_request_error",
                    param: Some("previous_response_id".into()),
                    code: Some("previous_response_not_found"),
                }),
        }
    }

    /// `POST /v1/responses/compact`: the conversation (the input, after the stored one it
    /// continues) as its user messages and one `compaction` item, billed as OpenAI bills it:
    /// the context read as input (what it continues, cached), a compaction's worth of output.
    pub(crate) fn compact(
        &self,
        request: &CreateRequest,
        mut next_id: impl FnMut() -> u64,
    ) -> Result<(Bytes, ResponseUsage), ApiError> {
        let cached = self.context(request.previous_response_id.as_ref())?;
        let usage = ResponseUsage {
            input: cached + input_words(request.input.as_ref(), request.instructions.as_ref()),
            cached,
            output: 5,
            ..ResponseUsage::default()
        };
        let mut output: Vec<Value> = input_items(request.input.as_ref(), &mut next_id)
            .into_iter()
            .filter(|item| item["role"] == "user")
            .collect();
        output.push(json!({
            "id": format!("cmp_{:032x}", next_id()),
            "type": "compaction",
            "encrypted_content": "gAAAAAmock-compaction",
        }));
        let body = openai::json_bytes(&json!({
            "id": format!("resp_{:032x}{:016x}", rand::random::<u128>(), next_id()),
            "object": "response.compaction",
            "created_at": openai::now_secs(),
            "output": output,
            "usage": usage.to_json(),
        }));
        Ok((body, usage))
    }

    /// `POST /v1/responses/input_tokens`: the input counted (a word a token, as everywhere in
    /// the mock), with the context it continues.
    pub(crate) fn input_tokens(&self, request: &CreateRequest) -> Result<Bytes, ApiError> {
        let context = self.context(request.previous_response_id.as_ref())?;
        let input = input_words(request.input.as_ref(), request.instructions.as_ref());
        Ok(openai::json_bytes(&json!({
            "object": "response.input_tokens",
            "input_tokens": context + input,
        })))
    }

    /// `GET /v1/responses/{id}`.
    pub(crate) fn retrieve(&self, id: &str) -> Result<Bytes, ApiError> {
        self.lock()
            .get(id)
            .map(|s| openai::json_bytes(&s.response))
            .ok_or_else(|| not_found(id))
    }

    /// `DELETE /v1/responses/{id}`.
    pub(crate) fn delete(&self, id: &str) -> Result<Bytes, ApiError> {
        self.lock()
            .remove(id)
            .map(|_| openai::json_bytes(&json!({"id": id, "object": "response", "deleted": true})))
            .ok_or_else(|| not_found(id))
    }

    /// `POST /v1/responses/{id}/cancel`: only a background response that has not finished.
    pub(crate) fn cancel(&self, id: &str) -> Result<Bytes, ApiError> {
        let mut stored = self.lock();
        let Some(entry) = stored.get_mut(id) else {
            return Err(not_found(id));
        };
        if entry.response.get("background") != Some(&json!(true)) {
            return Err(ApiError::invalid_request(
                "Only responses created with background=true can be cancelled.",
                None,
            ));
        }
        if let Value::Object(map) = &mut entry.response
            && matches!(
                map.get("status").and_then(Value::as_str),
                Some("queued" | "in_progress")
            )
        {
            map.insert("status".to_owned(), json!("cancelled"));
        }
        Ok(openai::json_bytes(&entry.response))
    }

    /// `GET /v1/responses/{id}/input_items` with `order` (default `desc`), `limit` (1–100,
    /// default 20) and `after`, in OpenAI's cursor page shape.
    pub(crate) fn input_items(&self, id: &str, query: Option<&str>) -> Result<Bytes, ApiError> {
        let mut order_desc = true;
        let mut limit = 20usize;
        let mut after = None;
        for (key, value) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            match key.as_ref() {
                "order" => order_desc = value != "asc",
                "limit" => {
                    limit = value
                        .parse()
                        .ok()
                        .filter(|n| (1..=100).contains(n))
                        .ok_or_else(|| {
                            ApiError::invalid_request(
                                format!(
                                    "Invalid 'limit': integer below minimum value. Expected a value >= 1 and <= 100, but got {value} instead."
                                ),
                                Some("limit"),
                            )
                        })?;
                }
                "after" => after = Some(value.into_owned()),
                _ => {}
            }
        }
        let stored = self.lock();
        let entry = stored.get(id).ok_or_else(|| not_found(id))?;
        let mut items: Vec<&Value> = entry.input_items.iter().collect();
        if order_desc {
            items.reverse();
        }
        if let Some(after) = &after
            && let Some(at) = items
                .iter()
                .position(|i| i.get("id") == Some(&json!(after)))
        {
            items.drain(..=at);
        }
        let has_more = items.len() > limit;
        items.truncate(limit);
        let id_of = |i: Option<&&Value>| i.and_then(|v| v.get("id")).cloned();
        Ok(openai::json_bytes(&json!({
            "object": "list",
            "data": items,
            "first_id": id_of(items.first()),
            "last_id": id_of(items.last()),
            "has_more": has_more,
        })))
    }
}
