//! Streams, both ways, as state machines fed one server-sent event at a time and writing the
//! client's frames as they go (nothing is held back beyond the event at hand):
//! [`ChunksFromEvents`] turns an Anthropic event stream into chat completion chunks,
//! [`EventsFromChunks`] turns chat completion chunks into an Anthropic event stream, and
//! [`EventUsage`] only watches an Anthropic stream passed through as it is.

use bytes::{BufMut, Bytes, BytesMut};
use serde_json::{Value, json};

use super::response::{finish_reason, message_id, openai_usage, stop_reason};
use super::{Usage, error};
use crate::sse::Event;

/// What an event meant for the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// The stream is complete; nothing may follow the frames just written.
    Done,
    /// The upstream ended the stream with an error (passed on in the client's shape).
    Failed,
}

/// Anthropic's usage counters as a stream reports them: `message_start` gives the first values,
/// each `message_delta` cumulative totals for the counters it names.
#[derive(Debug, Clone, Copy, Default)]
struct Counters {
    input: u64,
    output: u64,
    cache_read: u64,
    cache_creation: u64,
}

impl Counters {
    fn update(&mut self, usage: Option<&Value>) {
        let Some(usage) = usage else { return };
        let get = |k: &str| usage.get(k).and_then(Value::as_u64);
        if let Some(n) = get("input_tokens") {
            self.input = n;
        }
        if let Some(n) = get("output_tokens") {
            self.output = n;
        }
        if let Some(n) = get("cache_read_input_tokens") {
            self.cache_read = n;
        }
        if let Some(n) = get("cache_creation_input_tokens") {
            self.cache_creation = n;
        }
    }

    fn usage(self) -> Usage {
        Usage {
            input: self.input + self.cache_read + self.cache_creation,
            output: self.output,
            cache_read: self.cache_read,
            cache_creation: self.cache_creation,
        }
    }
}

/// The JSON of an event, and its `type` (from the data, which every Anthropic event carries).
fn parse(event: &Event) -> Option<(Value, String)> {
    let value: Value = serde_json::from_str(&event.data).ok()?;
    let kind = value.get("type")?.as_str()?.to_owned();
    Some((value, kind))
}

/// Watches an Anthropic event stream passed through unchanged: its usage and its end.
#[derive(Debug, Default)]
pub struct EventUsage {
    counters: Counters,
    seen: bool,
}

impl EventUsage {
    /// Reads one event.
    pub fn observe(&mut self, event: &Event) -> Flow {
        let Some((value, kind)) = parse(event) else {
            return Flow::Continue;
        };
        match kind.as_str() {
            "message_start" => {
                self.seen = true;
                self.counters.update(value.pointer("/message/usage"));
            }
            "message_delta" => {
                self.seen = true;
                self.counters.update(value.get("usage"));
            }
            "message_stop" => return Flow::Done,
            "error" => return Flow::Failed,
            _ => {}
        }
        Flow::Continue
    }

    /// The tokens so far, if the stream reported any.
    pub fn usage(&self) -> Option<Usage> {
        self.seen.then(|| self.counters.usage())
    }
}

/// An Anthropic event stream → chat completion chunks, then `[DONE]`.
#[derive(Debug)]
pub struct ChunksFromEvents {
    id: String,
    model: String,
    created: u64,
    /// The client asked for `stream_options.include_usage`.
    include_usage: bool,
    counters: Counters,
    seen_usage: bool,
    /// (Anthropic content block index, chat tool call index) of each tool block so far.
    tools: Vec<(u64, usize)>,
}

impl ChunksFromEvents {
    pub fn new(created: u64, include_usage: bool) -> Self {
        Self {
            id: String::new(),
            model: String::new(),
            created,
            include_usage,
            counters: Counters::default(),
            seen_usage: false,
            tools: Vec::new(),
        }
    }

    /// The tokens so far, if the stream reported any.
    pub fn usage(&self) -> Option<Usage> {
        self.seen_usage.then(|| self.counters.usage())
    }

    /// Translates one event, appending the client's frames to `out`.
    pub fn push(&mut self, event: &Event, out: &mut Vec<Bytes>) -> Flow {
        let Some((value, kind)) = parse(event) else {
            // Not Anthropic's: a stream that cannot be read further.
            out.push(openai_error_event(
                "The upstream sent an event that is not valid JSON.",
            ));
            return Flow::Failed;
        };
        match kind.as_str() {
            "message_start" => {
                let message = value.get("message");
                let text = |k: &str| {
                    message
                        .and_then(|m| m.get(k))
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned()
                };
                self.id = text("id");
                self.model = text("model");
                self.counters.update(message.and_then(|m| m.get("usage")));
                self.seen_usage = true;
                out.push(self.chunk(json!({"role": "assistant", "content": ""}), None));
            }
            "content_block_start" => {
                let index = value.get("index").and_then(Value::as_u64).unwrap_or(0);
                let block = value.get("content_block");
                match block.and_then(|b| b.get("type")).and_then(Value::as_str) {
                    Some("text") => {
                        let text = block
                            .and_then(|b| b.get("text"))
                            .and_then(Value::as_str)
                            .unwrap_or("");
                        if !text.is_empty() {
                            out.push(self.chunk(json!({"content": text}), None));
                        }
                    }
                    Some("tool_use") => {
                        let call = self.tools.len();
                        self.tools.push((index, call));
                        let field = |k: &str| block.and_then(|b| b.get(k)).cloned();
                        out.push(self.chunk(
                            json!({"tool_calls": [{
                                "index": call,
                                "id": field("id").unwrap_or(Value::Null),
                                "type": "function",
                                "function": {"name": field("name").unwrap_or(Value::Null), "arguments": ""},
                            }]}),
                            None,
                        ));
                    }
                    // thinking, redacted thinking, server tools: nothing a chat client reads.
                    _ => {}
                }
            }
            "content_block_delta" => {
                let index = value.get("index").and_then(Value::as_u64).unwrap_or(0);
                let delta = value.get("delta");
                let field = |k: &str| {
                    delta
                        .and_then(|d| d.get(k))
                        .and_then(Value::as_str)
                        .unwrap_or("")
                };
                match delta.and_then(|d| d.get("type")).and_then(Value::as_str) {
                    Some("text_delta") if !field("text").is_empty() => {
                        out.push(self.chunk(json!({"content": field("text")}), None));
                    }
                    // The first input_json_delta of a tool is often empty.
                    Some("input_json_delta") if !field("partial_json").is_empty() => {
                        if let Some(&(_, call)) = self.tools.iter().find(|(i, _)| *i == index) {
                            out.push(self.chunk(
                                json!({"tool_calls": [{
                                    "index": call,
                                    "function": {"arguments": field("partial_json")},
                                }]}),
                                None,
                            ));
                        }
                    }
                    _ => {}
                }
            }
            "message_delta" => {
                self.counters.update(value.get("usage"));
                self.seen_usage = true;
                if let Some(reason) = value.pointer("/delta/stop_reason").and_then(Value::as_str) {
                    out.push(self.chunk(json!({}), Some(finish_reason(reason))));
                }
            }
            "message_stop" => {
                if self.include_usage {
                    let usage = super::response::openai_usage_value(self.counters.usage());
                    out.push(data_frame(&json!({
                        "id": self.id,
                        "object": "chat.completion.chunk",
                        "created": self.created,
                        "model": self.model,
                        "choices": [],
                        "usage": usage,
                    })));
                }
                out.push(Bytes::from_static(b"data: [DONE]\n\n"));
                return Flow::Done;
            }
            "error" => {
                let message = value
                    .pointer("/error/message")
                    .and_then(Value::as_str)
                    .unwrap_or("The upstream stream failed.");
                out.push(openai_error_event(message));
                return Flow::Failed;
            }
            // ping, content_block_stop, and event types newer than this proxy.
            _ => {}
        }
        Flow::Continue
    }

    fn chunk(&self, delta: Value, finish: Option<&str>) -> Bytes {
        data_frame(&json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        }))
    }
}

fn data_frame(value: &Value) -> Bytes {
    let text = value.to_string();
    let mut out = BytesMut::with_capacity(text.len() + 8);
    out.put_slice(b"data: ");
    out.put_slice(text.as_bytes());
    out.put_slice(b"\n\n");
    out.freeze()
}

fn openai_error_event(message: &str) -> Bytes {
    data_frame(&json!({"error": {
        "message": message,
        "type": "server_error",
        "param": null,
        "code": "upstream_error",
    }}))
}

/// The content block open in an Anthropic stream being written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Open {
    Text,
    /// A tool call, by its chat tool call index.
    Tool(u64),
}

/// A tool call seen before its name: no block is opened for it until the name arrives, so
/// the client never sees an empty tool block.
#[derive(Debug, Default)]
struct Pending {
    index: u64,
    id: String,
    name: String,
    arguments: String,
}

/// Chat completion chunks → an Anthropic event stream with `content_block_start`/`stop`
/// framing, ended by `message_delta` (stop reason, usage) and `message_stop`.
#[derive(Debug, Default)]
pub struct EventsFromChunks {
    started: bool,
    open: Option<Open>,
    next_block: u64,
    pending: Option<Pending>,
    tool_used: bool,
    finish: Option<String>,
    usage: Option<Usage>,
}

impl EventsFromChunks {
    /// The tokens, once the usage chunk has arrived.
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// Translates one chat chunk (or `[DONE]`), appending the client's events to `out`.
    pub fn push(&mut self, event: &Event, out: &mut Vec<Bytes>) -> Flow {
        if event.data == "[DONE]" {
            self.finish(out);
            return Flow::Done;
        }
        let Ok(chunk) = serde_json::from_str::<Value>(&event.data) else {
            out.push(error::event(
                502,
                "The upstream sent a chunk that is not valid JSON.",
            ));
            return Flow::Failed;
        };
        if let Some(message) = chunk.get("error") {
            let message = message
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("The upstream stream failed.");
            out.push(error::event(500, message));
            return Flow::Failed;
        }
        self.start(&chunk, out);
        if let Some(usage) = chunk.get("usage").filter(|u| u.is_object()) {
            self.usage = Some(openai_usage(usage));
        }
        let Some(choice) = chunk.pointer("/choices/0") else {
            return Flow::Continue;
        };
        let delta = choice.get("delta");
        if let Some(text) = delta
            .and_then(|d| d.get("content"))
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
        {
            if self.open != Some(Open::Text) {
                self.close(out);
                self.open_block(Open::Text, json!({"type": "text", "text": ""}), out);
            }
            let index = self.next_block - 1;
            out.push(anthropic_frame(&json!({
                "type": "content_block_delta",
                "index": index,
                "delta": {"type": "text_delta", "text": text},
            })));
        }
        for call in delta
            .and_then(|d| d.get("tool_calls"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            self.tool_call(call, out);
        }
        if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
            self.finish = Some(reason.to_owned());
        }
        Flow::Continue
    }

    fn start(&mut self, chunk: &Value, out: &mut Vec<Bytes>) {
        if std::mem::replace(&mut self.started, true) {
            return;
        }
        let id = chunk.get("id").and_then(Value::as_str).unwrap_or("");
        out.push(anthropic_frame(&json!({
            "type": "message_start",
            "message": {
                "id": message_id(id),
                "type": "message",
                "role": "assistant",
                "model": chunk.get("model").cloned().unwrap_or(Value::from("")),
                "content": [],
                "stop_reason": null,
                "stop_sequence": null,
                "usage": {"input_tokens": 0, "output_tokens": 0},
            },
        })));
    }

    fn tool_call(&mut self, call: &Value, out: &mut Vec<Bytes>) {
        let index = call.get("index").and_then(Value::as_u64).unwrap_or(0);
        let text = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or("").to_owned();
        let id = text(call.get("id"));
        let function = call.get("function");
        let name = text(function.and_then(|f| f.get("name")));
        let arguments = text(function.and_then(|f| f.get("arguments")));
        if self.open == Some(Open::Tool(index)) {
            self.arguments(&arguments, out);
            return;
        }
        let pending = match &mut self.pending {
            Some(p) if p.index == index => p,
            _ => {
                self.close(out);
                self.pending.insert(Pending {
                    index,
                    ..Pending::default()
                })
            }
        };
        if pending.id.is_empty() {
            pending.id = id;
        }
        pending.name.push_str(&name);
        pending.arguments.push_str(&arguments);
        if pending.name.is_empty() {
            return;
        }
        let Some(pending) = self.pending.take() else {
            return;
        };
        let id = if pending.id.is_empty() {
            format!("toolu_{index}")
        } else {
            pending.id
        };
        self.tool_used = true;
        self.open_block(
            Open::Tool(index),
            json!({"type": "tool_use", "id": id, "name": pending.name, "input": {}}),
            out,
        );
        self.arguments(&pending.arguments, out);
    }

    fn arguments(&self, arguments: &str, out: &mut Vec<Bytes>) {
        if arguments.is_empty() {
            return;
        }
        out.push(anthropic_frame(&json!({
            "type": "content_block_delta",
            "index": self.next_block - 1,
            "delta": {"type": "input_json_delta", "partial_json": arguments},
        })));
    }

    fn open_block(&mut self, open: Open, block: Value, out: &mut Vec<Bytes>) {
        out.push(anthropic_frame(&json!({
            "type": "content_block_start",
            "index": self.next_block,
            "content_block": block,
        })));
        self.next_block += 1;
        self.open = Some(open);
    }

    fn close(&mut self, out: &mut Vec<Bytes>) {
        if self.open.take().is_some() {
            out.push(anthropic_frame(&json!({
                "type": "content_block_stop",
                "index": self.next_block - 1,
            })));
        }
    }

    fn finish(&mut self, out: &mut Vec<Bytes>) {
        self.start(&Value::Null, out);
        self.close(out);
        let stop = if self.tool_used {
            "tool_use"
        } else {
            self.finish.as_deref().map_or("end_turn", stop_reason)
        };
        let usage = self.usage.unwrap_or_default();
        out.push(anthropic_frame(&json!({
            "type": "message_delta",
            "delta": {"stop_reason": stop, "stop_sequence": null},
            "usage": super::response::anthropic_usage_value(usage),
        })));
        out.push(anthropic_frame(&json!({"type": "message_stop"})));
    }
}

/// An Anthropic event: `event: <type>` then its data (the SDKs dispatch on the event name).
fn anthropic_frame(value: &Value) -> Bytes {
    let kind = value.get("type").and_then(Value::as_str).unwrap_or("");
    let text = value.to_string();
    let mut out = BytesMut::with_capacity(text.len() + kind.len() + 16);
    out.put_slice(b"event: ");
    out.put_slice(kind.as_bytes());
    out.put_slice(b"\ndata: ");
    out.put_slice(text.as_bytes());
    out.put_slice(b"\n\n");
    out.freeze()
}
