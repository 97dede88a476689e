//! Streams, both ways, as state machines fed one server-sent event at a time and writing the
//! client's frames as they go (nothing is held back beyond the event at hand):
//! [`ChunksFromEvents`] turns an Anthropic event stream into chat completion chunks,
//! [`EventsFromChunks`] turns chat completion chunks into an Anthropic event stream, and
//! [`EventUsage`] only watches an Anthropic stream passed through as it is.

use std::borrow::Cow;
use std::sync::LazyLock;

use bytes::{BufMut, Bytes, BytesMut};
use memchr::memmem::Finder;
use serde_json::{Value, json};

use super::response::{
    UsageFigures, finish_reason, fresh_id, message_id, openai_usage, stop_reason_of,
};
use super::{Checked, First, Function, Names, Object, ToolNames, Usage, error, members};
use crate::request::Key;
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
    figures: UsageFigures,
    /// The sum of the last `iterations` reported ([`super::response::iterated`]).
    iterated: UsageFigures,
}

impl Counters {
    fn update(&mut self, usage: Option<&Value>) {
        let Some(usage) = usage else { return };
        let get = |k: &str| usage.get(k).and_then(Value::as_u64);
        let figures = &mut self.figures;
        if let Some(n) = get("input_tokens") {
            figures.input = n;
        }
        if let Some(n) = get("output_tokens") {
            figures.output = n;
        }
        if let Some(n) = get("cache_read_input_tokens") {
            figures.cache_read = n;
        }
        if let Some(n) = get("cache_creation_input_tokens") {
            figures.cache_creation = n;
        }
        if let Some(by_ttl) = usage.get("cache_creation") {
            figures.cache_creation_1h = super::response::one_hour_writes(Some(by_ttl));
        }
        if let Some(details) = usage.get("output_tokens_details") {
            figures.thinking = super::response::thinking_tokens(Some(details));
        }
        if let Some(iterations) = usage.get("iterations") {
            self.iterated = super::response::iterated(Some(iterations));
        }
    }

    fn usage(self) -> Usage {
        self.figures.at_least(self.iterated).usage()
    }
}

/// The JSON of an event, and its `type` (from the data, which every Anthropic event carries).
fn parse(event: &Event) -> Option<(Value, String)> {
    let value: Value = serde_json::from_str(&event.data).ok()?;
    let kind = value.get("type")?.as_str()?.to_owned();
    Some((value, kind))
}

/// Whether an event's data may be of a kind [`EventUsage`] watches (`message_start`,
/// `message_delta`, `message_stop`, `error`): false only when no JSON string in it can be one
/// of those names, because none is written plainly between quotes and nothing in it is written
/// with a `\u` escape (the only way JSON can spell a letter or `_` otherwise). A look at the
/// bytes, not a parse: a content delta is about 700 instructions here against about 7,500 to
/// parse it into a tree of values; an event that passes is parsed whole, as before.
fn may_be_watched(data: &str) -> bool {
    WATCHED_NAMES
        .iter()
        .any(|name| name.find(data.as_bytes()).is_some())
}

/// What a watched kind's name, or any escape, is written with (see [`may_be_watched`]); the
/// searchers are built once.
static WATCHED_NAMES: LazyLock<[Finder<'static>; 3]> =
    LazyLock::new(|| ["\"message_", "\"error\"", "\\u"].map(Finder::new));

/// Watches an Anthropic event stream passed through unchanged: its usage and its end.
#[derive(Debug, Default)]
pub struct EventUsage {
    counters: Counters,
    seen: bool,
}

impl EventUsage {
    /// Reads one event.
    ///
    /// Only four kinds of event bear on the usage or the end, one or two of each a stream; the
    /// rest (content deltas above all, pings, blocks' starts and stops) are passed over without
    /// the tree of values a whole parse builds when their bytes cannot name one of the four
    /// ([`may_be_watched`]).
    pub fn observe(&mut self, event: &Event) -> Flow {
        if !may_be_watched(&event.data) {
            return Flow::Continue;
        }
        self.observe_parsed(event)
    }

    /// Reads one event parsed whole.
    fn observe_parsed(&mut self, event: &Event) -> Flow {
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
    /// Each tool block so far.
    tools: Vec<Tool>,
    /// The bytes of the `given` inputs `tools` hold (until their blocks stop).
    given_bytes: usize,
    /// See [`Self::text_chunk`].
    text_suffix: Vec<u8>,
    /// Events in a row that gave the client nothing (see [`QUIET_EVENTS_PER_COMMENT`]).
    quiet: u32,
}

/// How many events in a row that give a chat client nothing (a thinking block's deltas,
/// signatures) are followed by an SSE comment, as is each of Anthropic's `ping`s: a model that
/// thinks for a minute, or a long prefill, sent the client no byte meanwhile, and an idle
/// timeout in front of it (a load balancer's 60 s) cut a stream both ends still served. The
/// OpenAI SDKs' SSE readers skip comment lines.
const QUIET_EVENTS_PER_COMMENT: u32 = 32;

/// An SSE comment: bytes on the wire that no SSE reader makes an event of.
const KEEP_ALIVE: &[u8] = b": ping\n\n";

/// A `content_block_delta` event with a text delta or a piece of a tool's input, in exactly
/// its shape (another member, or one twice, and it is parsed whole instead), read as an
/// [`Object`] at each level.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TextDelta<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    /// The block's index: which tool call a piece of input belongs to.
    index: u64,
    #[serde(borrow)]
    delta: Object<TextDeltaBody<'a>>,
}

/// A delta's type and its `text` (a text delta's) or `partial_json` (an input delta's).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TextDeltaBody<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow, default)]
    text: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    partial_json: Option<Cow<'a, str>>,
}

/// A tool block of an Anthropic stream, as the chat tool call it became.
#[derive(Debug)]
struct Tool {
    /// Its Anthropic content block index.
    block: u64,
    /// Its chat tool call index.
    call: usize,
    /// Whether a piece of its input (not empty) has been sent: one that got none is given
    /// `{}` at its end ([`ChunksFromEvents::push_parsed`]), or its input as its start gave it.
    input: bool,
    /// The input its `content_block_start` held when not empty (Anthropic's own streams start
    /// a tool with `{}` and stream its input; servers that make streams of whole answers put
    /// it there and send no delta).
    given: Option<String>,
}

impl ChunksFromEvents {
    /// The tool call that Anthropic content block `block` became, if it is a tool's.
    fn tool(&mut self, block: u64) -> Option<&mut Tool> {
        self.tools.iter_mut().find(|tool| tool.block == block)
    }

    pub fn new(created: u64, include_usage: bool) -> Self {
        let mut new = Self {
            id: String::new(),
            model: String::new(),
            created,
            include_usage,
            counters: Counters::default(),
            seen_usage: false,
            tools: Vec::new(),
            given_bytes: 0,
            text_suffix: Vec::new(),
            quiet: 0,
        };
        new.set_text_suffix();
        new
    }

    /// The tokens so far, if the stream reported any.
    pub fn usage(&self) -> Option<Usage> {
        self.seen_usage.then(|| self.counters.usage())
    }

    /// Translates one event, appending the client's frames to `out`.
    ///
    /// Most events of a stream are text deltas, or pieces of a tool call's input: one exactly
    /// in their shape is read into borrowed strings and its chunk written directly
    /// ([`TextDelta`]), the same bytes as [`Self::push_parsed`] writes for it from two trees of
    /// values (a translated stream's event 45,400 → 21,500 instructions in all:
    /// docs/benchmarks.md); every other event is parsed whole.
    ///
    /// An event that gives the client nothing counts towards an SSE comment that keeps its
    /// connection from looking idle ([`QUIET_EVENTS_PER_COMMENT`]); Anthropic's `ping` is one.
    pub fn push(&mut self, event: &Event, out: &mut Vec<Bytes>) -> Flow {
        let before = out.len();
        let flow = self.translate(event, out);
        if out.len() > before {
            self.quiet = 0;
        } else {
            self.quiet += 1;
            if self.quiet >= QUIET_EVENTS_PER_COMMENT || event.event.as_deref() == Some("ping") {
                self.quiet = 0;
                out.push(Bytes::from_static(KEEP_ALIVE));
            }
        }
        flow
    }

    fn translate(&mut self, event: &Event, out: &mut Vec<Bytes>) -> Flow {
        if let Ok(Object(delta)) = serde_json::from_str::<Object<TextDelta<'_>>>(&event.data)
            && let Object(body) = &delta.delta
            && delta.kind == "content_block_delta"
        {
            match (body.kind.as_ref(), &body.text, &body.partial_json) {
                ("text_delta", Some(text), _) => {
                    if !text.is_empty() {
                        out.push(self.text_chunk(text));
                    }
                    return Flow::Continue;
                }
                ("input_json_delta", _, Some(piece)) => {
                    // The first piece of a tool's input is often empty; a block that is no
                    // tool call's gets none.
                    if !piece.is_empty()
                        && let Some(tool) = self.tool(delta.index)
                    {
                        tool.input = true;
                        let call = tool.call;
                        out.push(self.arguments_chunk(call, piece));
                    }
                    return Flow::Continue;
                }
                _ => {}
            }
        }
        self.push_parsed(event, out)
    }

    /// Translates one event parsed whole.
    fn push_parsed(&mut self, event: &Event, out: &mut Vec<Bytes>) -> Flow {
        // The kind is the data's `type`, which every Anthropic event carries, else the event's
        // name (what the SDKs dispatch on). An event of neither, or a `ping` or a kind newer
        // than this proxy whose data is not JSON, is passed over, as the SDKs and the
        // passthrough do; only a kind read here that cannot be read ends the stream.
        let value = serde_json::from_str::<Value>(&event.data).ok();
        let kind = value
            .as_ref()
            .and_then(|value| value.get("type"))
            .and_then(Value::as_str)
            .or(event.event.as_deref())
            .map(str::to_owned);
        let (value, kind) = match (value, kind) {
            (Some(value), Some(kind)) => (value, kind),
            (None, Some(kind)) if READ_KINDS.contains(&kind.as_str()) => {
                out.push(openai_error_event(
                    "The upstream sent an event that is not valid JSON.",
                ));
                return Flow::Failed;
            }
            _ => return Flow::Continue,
        };
        match kind.as_str() {
            "message_start" => {
                let message = value.get("message");
                let text = |k: &str| {
                    let text = message
                        .and_then(|m| m.get(k))
                        .and_then(Value::as_str)
                        .unwrap_or_default();
                    capped(text, MAX_NAME_BYTES).to_owned()
                };
                self.id = text("id");
                self.model = text("model");
                self.set_text_suffix();
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
                        let given = block
                            .and_then(|b| b.get("input"))
                            .filter(|input| input.as_object().is_some_and(|o| !o.is_empty()))
                            .map(Value::to_string);
                        // Held until the block stops: an upstream that starts tool blocks and
                        // never stops them would grow this for as long as the stream lasts,
                        // unseen by the answers' memory (Anthropic's blocks come one after
                        // another, each stopped before the next starts).
                        self.given_bytes += given.as_ref().map_or(0, String::len);
                        if self.given_bytes > MAX_PENDING_BYTES || call >= MAX_TOOL_BLOCKS {
                            out.push(openai_error_event(
                                "The upstream started more tool calls than a stream may hold.",
                            ));
                            return Flow::Failed;
                        }
                        self.tools.push(Tool {
                            block: index,
                            call,
                            input: false,
                            given,
                        });
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
                        if let Some(tool) = self.tool(index) {
                            tool.input = true;
                            let call = tool.call;
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
            "content_block_stop" => {
                // A tool that takes no parameters streams only an empty piece of input (or
                // none): its call's arguments, joined by the client, would be `""`, which
                // clients parse as JSON (openai-python's stream helpers, openai-node's
                // runTools, LangChain) and fail on. `{}`, as the whole answer gives them; or
                // the input its start held, from a server that sends it there.
                let index = value.get("index").and_then(Value::as_u64).unwrap_or(0);
                if let Some(tool) = self.tool(index).filter(|tool| !tool.input) {
                    tool.input = true;
                    let call = tool.call;
                    let given = tool.given.take();
                    self.given_bytes -= given.as_ref().map_or(0, String::len);
                    let arguments = given.unwrap_or_else(|| "{}".to_owned());
                    out.push(self.chunk(
                        json!({"tool_calls": [{"index": call, "function": {"arguments": arguments}}]}),
                        None,
                    ));
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
            // ping, and event types newer than this proxy.
            _ => {}
        }
        Flow::Continue
    }

    /// [`Self::chunk`] of a delta `{"content": text}` with no finish reason, written without
    /// building it: the text escaped by the serializer `Value` uses, between the chunk's
    /// beginning and [`Self::text_suffix`] (`Value`'s map writes its keys sorted).
    fn text_chunk(&self, text: &str) -> Bytes {
        const START: &[u8] = b"data: {\"choices\":[{\"delta\":{\"content\":";
        let size = START.len() + text.len() + 2 + self.text_suffix.len();
        let mut out = BytesMut::with_capacity(size).writer();
        out.get_mut().put_slice(START);
        // Writing into memory cannot fail.
        let _ = serde_json::to_writer(&mut out, text);
        let mut out = out.into_inner();
        out.put_slice(&self.text_suffix);
        out.freeze()
    }

    /// [`Self::chunk`] of a delta that carries a piece of tool call `call`'s arguments, written
    /// as [`Self::text_chunk`] is.
    fn arguments_chunk(&self, call: usize, piece: &str) -> Bytes {
        const START: &[u8] =
            b"data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"function\":{\"arguments\":";
        const INDEX: &[u8] = b"},\"index\":";
        let size = START.len() + piece.len() + 2 + INDEX.len() + 22 + self.text_suffix.len();
        let mut out = BytesMut::with_capacity(size).writer();
        out.get_mut().put_slice(START);
        // Writing into memory cannot fail.
        let _ = serde_json::to_writer(&mut out, piece);
        out.get_mut().put_slice(INDEX);
        let _ = serde_json::to_writer(&mut out, &call);
        let mut out = out.into_inner();
        out.put_slice(b"}]");
        out.put_slice(&self.text_suffix);
        out.freeze()
    }

    /// What follows a text chunk's text, the same for every chunk once the message's id and
    /// model are known.
    fn set_text_suffix(&mut self) {
        let mut suffix = Vec::with_capacity(self.id.len() + self.model.len() + 128);
        suffix.extend_from_slice(
            b"},\"finish_reason\":null,\"index\":0,\"logprobs\":null}],\"created\":",
        );
        // Writing into memory cannot fail.
        let _ = serde_json::to_writer(&mut suffix, &self.created);
        suffix.extend_from_slice(b",\"id\":");
        let _ = serde_json::to_writer(&mut suffix, &self.id);
        suffix.extend_from_slice(b",\"model\":");
        let _ = serde_json::to_writer(&mut suffix, &self.model);
        suffix.extend_from_slice(b",\"object\":\"chat.completion.chunk\"}\n\n");
        self.text_suffix = suffix;
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

/// What a tool call may hold before its name arrives: an upstream that streams arguments
/// without ever naming the call would otherwise grow it for as long as the stream lasts (the
/// client is sent nothing meanwhile, so nothing slows the upstream down). OpenAI names a call
/// in its first chunk.
const MAX_PENDING_BYTES: usize = crate::sse::DEFAULT_MAX_BYTES;

/// The most tool blocks one Anthropic stream translated for a chat client may start: each is
/// kept, and looked up by every piece of its input.
const MAX_TOOL_BLOCKS: usize = 4_096;

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
    /// The id the upstream gave the tool call whose block is open (empty: none yet), which
    /// tells its pieces from another call's ([`same_call`]).
    open_id: String,
    next_block: u64,
    pending: Option<Pending>,
    tool_used: bool,
    /// A refusal's text was streamed (OpenAI's `delta.refusal`): the turn ends `refusal`.
    refused: bool,
    /// Chunks in a row since the message started that gave the client nothing (a reasoning
    /// model's `reasoning_content`, which a Messages client is not sent): see
    /// [`QUIET_CHUNKS_PER_PING`].
    quiet: u32,
    finish: Option<String>,
    usage: Option<Usage>,
    /// The request's tools whose names the backend was given portable
    /// ([`super::portable_tool_name`]): a call's block names the client's tool.
    names: ToolNames,
    /// Sluice's estimate of the request's prompt tokens: `message_start`'s `input_tokens` when
    /// the first chunk reports no usage.
    prompt_estimate: u64,
}

impl EventsFromChunks {
    /// The translation of the answer to a request whose tools' names were made portable as
    /// `names` says and whose prompt Sluice estimated at `prompt_estimate` tokens.
    pub fn new(names: ToolNames, prompt_estimate: u64) -> Self {
        Self {
            names,
            prompt_estimate,
            ..Self::default()
        }
    }

    /// The request's tools whose names the backend was given portable.
    pub fn names(&self) -> &ToolNames {
        &self.names
    }

    /// The tokens, once the usage chunk has arrived.
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// Translates one chat chunk (or `[DONE]`), appending the client's events to `out`.
    ///
    /// Once the message has started, most chunks carry a piece of text, or a piece of the
    /// arguments of the tool call whose block is open, and nothing else this translation
    /// reads: one in that shape ([`TextChunk`]) is read into borrowed strings and its event
    /// written directly ([`text_delta_frame`], [`arguments_delta_frame`]), the same bytes as
    /// [`Self::push_parsed`] writes for it from two trees of values; every other chunk (the
    /// first, a call's start, usage, errors, `[DONE]`, anything unexpected) is parsed whole.
    ///
    /// While the chunks give the client nothing (a reasoning model thinking aloud in
    /// `reasoning_content`), a `ping` event goes out every [`QUIET_CHUNKS_PER_PING`] of them,
    /// as Anthropic's own streams send `ping` while the model works: a client, or a load
    /// balancer before it, with an idle read timeout shorter than the reasoning would
    /// otherwise cut the stream.
    pub fn push(&mut self, event: &Event, out: &mut Vec<Bytes>) -> Flow {
        let before = out.len();
        let flow = self.translate(event, out);
        if out.len() > before || !self.started {
            self.quiet = 0;
        } else {
            self.quiet += 1;
            if self.quiet >= QUIET_CHUNKS_PER_PING {
                self.quiet = 0;
                out.push(Bytes::from_static(PING));
            }
        }
        flow
    }

    /// [`Self::push`] but for the pings.
    fn translate(&mut self, event: &Event, out: &mut Vec<Bytes>) -> Flow {
        if self.started
            && let Ok(TextChunk {
                text,
                arguments,
                finish,
            }) = serde_json::from_str(&event.data)
            // A piece of a call's arguments is read here only once its tool block is open, and
            // only with that call's id or none (an id the open call was not given yet is
            // taken by the whole parse).
            && arguments.as_ref().is_none_or(|piece| {
                self.open == Some(Open::Tool(piece.index))
                    && (piece.id.is_empty() || piece.id == self.open_id)
            })
        {
            if let Some(text) = text.filter(|t| !t.is_empty()) {
                self.open_text(out);
                out.push(text_delta_frame(self.next_block - 1, &text));
            }
            if let Some(piece) = arguments.filter(|piece| !piece.arguments.is_empty()) {
                out.push(arguments_delta_frame(self.next_block - 1, &piece.arguments));
            }
            if let Some(Key(reason)) = finish {
                self.finish = Some(reason.into_owned());
            }
            return Flow::Continue;
        }
        self.push_parsed(event, out)
    }

    fn push_parsed(&mut self, event: &Event, out: &mut Vec<Bytes>) -> Flow {
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
        // As the SDKs read a chunk: an `error` that is set (not null).
        if let Some(message) = chunk.get("error").filter(|e| !e.is_null()) {
            let message = message
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("The upstream stream failed.");
            out.push(error::event(500, message));
            return Flow::Failed;
        }
        let usage = chunk.get("usage").filter(|u| u.is_object());
        if !self.started
            && usage.is_none()
            && chunk
                .get("choices")
                .and_then(Value::as_array)
                .is_some_and(Vec::is_empty)
        {
            // Nothing to translate, and no message of its own: Azure OpenAI's first chunk
            // (its prompt filter's results, an empty id and model). The message starts with
            // the completion's first chunk.
            return Flow::Continue;
        }
        // Read first: the message's start says the input it reports.
        if let Some(usage) = usage {
            self.usage = Some(openai_usage(usage));
        }
        self.start(&chunk, out);
        let Some(choice) = chunk.pointer("/choices/0") else {
            return Flow::Continue;
        };
        let delta = choice.get("delta");
        // A refusal is the answer's text, as in a whole answer.
        let text = |member| {
            delta
                .and_then(|d| d.get(member))
                .and_then(super::response::content_text)
                .filter(|t| !t.is_empty())
        };
        let said = text("content");
        let refusal = said.is_none().then(|| text("refusal")).flatten();
        self.refused |= refusal.is_some();
        if let Some(text) = said.or(refusal) {
            self.open_text(out);
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
        if self
            .pending
            .as_ref()
            .is_some_and(|p| p.id.len() + p.name.len() + p.arguments.len() > MAX_PENDING_BYTES)
        {
            out.push(error::event(
                502,
                "The upstream streamed a tool call's arguments without its name.",
            ));
            return Flow::Failed;
        }
        if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
            self.finish = Some(reason.to_owned());
        }
        Flow::Continue
    }

    /// Opens a text block unless one is open.
    fn open_text(&mut self, out: &mut Vec<Bytes>) {
        if self.open != Some(Open::Text) {
            self.close(out);
            self.open_block(Open::Text, json!({"type": "text", "text": ""}), out);
        }
    }

    /// `message_start`, which clients (the AI SDK, LangChain, Claude Code's progress) read the
    /// prompt's size from, and only the output's from `message_delta`: the input the backend's
    /// usage reports, when the first chunk carries it (Gemini's and Perplexity's endpoints
    /// send usage in every chunk, vLLM's with `continuous_usage_stats`), with its cache counts;
    /// else Sluice's estimate of the prompt, as its limits and budgets take it. Anthropic's
    /// own `message_start` carries the real figure; `message_delta` carries the backend's.
    fn start(&mut self, chunk: &Value, out: &mut Vec<Bytes>) {
        if std::mem::replace(&mut self.started, true) {
            return;
        }
        let usage = match self.usage {
            Some(usage) => super::response::anthropic_usage_value(usage),
            None => json!({"input_tokens": self.prompt_estimate, "output_tokens": 0}),
        };
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
                "usage": usage,
            },
        })));
    }

    fn tool_call(&mut self, call: &Value, out: &mut Vec<Bytes>) {
        let index = call.get("index").and_then(Value::as_u64).unwrap_or(0);
        let text = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or("").to_owned();
        let id = text(call.get("id"));
        let function = call.get("function");
        let name = text(function.and_then(|f| f.get("name")));
        let arguments = match function.and_then(|f| f.get("arguments")) {
            // Written as the object itself, as some servers do: its JSON text is the piece.
            Some(object @ Value::Object(_)) => object.to_string(),
            arguments => text(arguments),
        };
        if self.open == Some(Open::Tool(index)) && same_call(&self.open_id, &id) {
            if self.open_id.is_empty() {
                self.open_id = id;
            }
            self.arguments(&arguments, out);
            return;
        }
        let pending = match &mut self.pending {
            Some(p) if p.index == index && same_call(&p.id, &id) => p,
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
        self.open_id.clone_from(&pending.id);
        let id = if pending.id.is_empty() {
            fresh_id("toolu_")
        } else {
            super::portable_tool_id(pending.id.into()).into_owned()
        };
        self.tool_used = true;
        let name = self.names.original(&pending.name);
        let block = json!({"type": "tool_use", "id": id, "name": name, "input": {}});
        // Text may have started while the call waited for its name: blocks follow one
        // another, each stopped before the next starts.
        self.close(out);
        self.open_block(Open::Tool(index), block, out);
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
        // A call cut off by the token limit was sent as far as it came: `max_tokens`, not
        // `tool_use`, tells the client its input is not whole.
        let stop = match self.refused && !self.tool_used {
            true => "refusal",
            false => stop_reason_of(self.finish.as_deref(), self.tool_used),
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

/// Whether a piece of a tool call that brings `id` (empty: none) belongs to the call the
/// upstream gave `known` (empty: none yet), as far as ids tell: unless both are given and
/// differ. OpenAI names a call's id in its first piece only, and tells parallel calls apart by
/// `index`; Gemini's OpenAI-compatible endpoint sends each of parallel calls whole, with its
/// own id and the same index (or none), and those are as many calls, each its own block, not
/// one block with their arguments run together (which no client can parse).
fn same_call(known: &str, id: &str) -> bool {
    known.is_empty() || id.is_empty() || known == id
}

/// The `content_block_delta` event of a text delta, as [`anthropic_frame`] writes it from its
/// value (keys in the sorted order `Value`'s map writes).
fn text_delta_frame(index: u64, text: &str) -> Bytes {
    delta_frame(index, "text", text, "text_delta")
}

/// The `content_block_delta` event of a piece of a tool call's input, likewise.
fn arguments_delta_frame(index: u64, arguments: &str) -> Bytes {
    delta_frame(index, "partial_json", arguments, "input_json_delta")
}

/// `{"delta":{"<member>":<piece>,"type":"<kind>"},"index":<index>,"type":"content_block_delta"}`
/// as an event; `member` sorts before `type`, as in both deltas.
fn delta_frame(index: u64, member: &str, piece: &str, kind: &str) -> Bytes {
    const START: &[u8] = b"event: content_block_delta\ndata: {\"delta\":{\"";
    const END: &[u8] = b",\"type\":\"content_block_delta\"}\n\n";
    let size = START.len() + member.len() + piece.len() + kind.len() + 64 + END.len();
    let mut out = BytesMut::with_capacity(size).writer();
    let buffer = out.get_mut();
    buffer.put_slice(START);
    buffer.put_slice(member.as_bytes());
    buffer.put_slice(b"\":");
    // Writing to memory cannot fail.
    let _ = serde_json::to_writer(&mut out, piece);
    let buffer = out.get_mut();
    buffer.put_slice(b",\"type\":\"");
    buffer.put_slice(kind.as_bytes());
    buffer.put_slice(b"\"},\"index\":");
    let _ = serde_json::to_writer(&mut out, &index);
    out.get_mut().put_slice(END);
    out.into_inner().freeze()
}

/// A chat chunk that carries at most a piece of text or a piece of one tool call's arguments,
/// and a finish reason, in the shape OpenAI-format backends stream: its first choice's
/// `delta.content`, `delta.tool_calls` (one call: its `index` and `function.arguments`) and
/// `finish_reason` read, every other member checked as a parse into values would check it and
/// passed over. Not this shape (and parsed whole instead): a chunk with `usage` or `error`,
/// text and a call together, more than one call, a member of another type than that shape's,
/// anything that is not an object.
#[derive(Default)]
struct TextChunk<'a> {
    text: Option<Cow<'a, str>>,
    /// The call's piece.
    arguments: Option<Piece<'a>>,
    finish: Option<Key<'a>>,
}

/// A piece of a tool call in a [`TextChunk`]: the call's index (`null` or missing: 0), its id
/// (`null` or missing: empty) and its piece of arguments (empty when it has none).
struct Piece<'a> {
    index: u64,
    id: Cow<'a, str>,
    arguments: Cow<'a, str>,
}

impl<'de> serde::Deserialize<'de> for Piece<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(value: D) -> Result<Self, D::Error> {
        const CALL: Names = Names(&["index", "id", "function"]);
        struct Members;
        impl<'de> serde::de::Visitor<'de> for Members {
            type Value = Piece<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a tool call")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Piece<'de>, A::Error> {
                let (mut index, mut id, mut arguments) = (None, None, None);
                members(map, CALL, |at, map| {
                    match at {
                        0 => index = map.next_value::<Option<u64>>()?,
                        1 => id = map.next_value::<Option<Key>>()?.map(|Key(id)| id),
                        _ => {
                            arguments = map
                                .next_value::<Option<Function>>()?
                                .and_then(|f| f.arguments)
                        }
                    }
                    Ok(())
                })?;
                Ok(Piece {
                    index: index.unwrap_or(0),
                    id: id.unwrap_or_default(),
                    arguments: arguments.unwrap_or_default(),
                })
            }
        }
        value.deserialize_map(Members)
    }
}

impl<'de> serde::Deserialize<'de> for TextChunk<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(value: D) -> Result<Self, D::Error> {
        const CHUNK: Names = Names(&["choices", "usage", "error"]);
        const CHOICE: Names = Names(&["delta", "finish_reason"]);
        const DELTA: Names = Names(&["content", "tool_calls", "refusal"]);
        fn out_of_shape<E: serde::de::Error>() -> E {
            E::custom("not a text chunk")
        }
        struct Choice;
        impl<'de> serde::de::DeserializeSeed<'de> for Choice {
            type Value = TextChunk<'de>;
            fn deserialize<D: serde::Deserializer<'de>>(
                self,
                value: D,
            ) -> Result<Self::Value, D::Error> {
                value.deserialize_map(self)
            }
        }
        impl<'de> serde::de::Visitor<'de> for Choice {
            type Value = TextChunk<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a choice")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<TextChunk<'de>, A::Error> {
                let mut choice = TextChunk::default();
                members(map, CHOICE, |at, map| {
                    match at {
                        0 => {
                            let delta = map.next_value::<Option<Delta>>()?.unwrap_or_default();
                            (choice.text, choice.arguments) = (delta.text, delta.arguments);
                        }
                        _ => choice.finish = map.next_value()?,
                    }
                    Ok(())
                })?;
                Ok(choice)
            }
        }
        /// A delta's text, or its one tool call's index and arguments.
        #[derive(Default)]
        struct Delta<'a> {
            text: Option<Cow<'a, str>>,
            arguments: Option<Piece<'a>>,
        }
        impl<'de> serde::Deserialize<'de> for Delta<'de> {
            fn deserialize<D: serde::Deserializer<'de>>(value: D) -> Result<Self, D::Error> {
                struct Members;
                impl<'de> serde::de::Visitor<'de> for Members {
                    type Value = Delta<'de>;
                    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                        f.write_str("a delta")
                    }
                    fn visit_map<A: serde::de::MapAccess<'de>>(
                        self,
                        map: A,
                    ) -> Result<Delta<'de>, A::Error> {
                        let mut delta = Delta::default();
                        members(map, DELTA, |at, map| {
                            match at {
                                0 => delta.text = map.next_value::<Option<Key>>()?.map(|Key(t)| t),
                                1 => {
                                    delta.arguments = map
                                        .next_value::<Option<OneCall>>()?
                                        .and_then(|OneCall(call)| call);
                                }
                                // A refusal's text goes to the whole parse.
                                _ => {
                                    if map
                                        .next_value::<Option<Key>>()?
                                        .is_some_and(|Key(refusal)| !refusal.is_empty())
                                    {
                                        return Err(out_of_shape());
                                    }
                                }
                            }
                            Ok(())
                        })?;
                        // Text and a call together go to the whole parse, which orders them.
                        if delta.arguments.is_some()
                            && delta.text.as_deref().is_some_and(|text| !text.is_empty())
                        {
                            return Err(out_of_shape());
                        }
                        Ok(delta)
                    }
                }
                value.deserialize_map(Members)
            }
        }
        /// `tool_calls` of at most one call, as its [`Piece`]; its `type` and `function.name`
        /// checked and passed over, as the translation does once the call's block is open.
        struct OneCall<'a>(Option<Piece<'a>>);
        impl<'de> serde::Deserialize<'de> for OneCall<'de> {
            fn deserialize<D: serde::Deserializer<'de>>(value: D) -> Result<Self, D::Error> {
                struct Each;
                impl<'de> serde::de::Visitor<'de> for Each {
                    type Value = OneCall<'de>;
                    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                        f.write_str("tool calls")
                    }
                    fn visit_seq<A: serde::de::SeqAccess<'de>>(
                        self,
                        mut seq: A,
                    ) -> Result<OneCall<'de>, A::Error> {
                        let call = seq.next_element::<Piece>()?;
                        if seq.next_element::<Checked>()?.is_some() {
                            return Err(out_of_shape());
                        }
                        Ok(OneCall(call))
                    }
                }
                value.deserialize_seq(Each)
            }
        }
        struct Members;
        impl<'de> serde::de::Visitor<'de> for Members {
            type Value = TextChunk<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a chat chunk")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<TextChunk<'de>, A::Error> {
                // No choices (or none): nothing to write, as for the whole parse.
                let mut chunk = TextChunk::default();
                members(map, CHUNK, |at, map| {
                    match at {
                        0 => chunk = map.next_value_seed(First(Choice))?.unwrap_or_default(),
                        1 if map.next_value::<Option<Checked>>()?.is_none() => {}
                        _ => return Err(out_of_shape()),
                    }
                    Ok(())
                })?;
                Ok(chunk)
            }
        }
        value.deserialize_map(Members)
    }
}

/// How many chunks in a row that give a Messages client nothing are followed by a `ping`:
/// a reasoning model streams tens of chunks a second, so a ping about every second.
const QUIET_CHUNKS_PER_PING: u32 = 32;

/// The kinds of event [`ChunksFromEvents`] reads: one of them whose data is not JSON ends the
/// translated stream.
const READ_KINDS: [&str; 7] = [
    "message_start",
    "content_block_start",
    "content_block_delta",
    "content_block_stop",
    "message_delta",
    "message_stop",
    "error",
];

/// The most of a `message_start`'s `id` or `model` a translated stream keeps: every chunk
/// repeats both, so an upstream's megabyte of either would be sent again with each piece of
/// text (Anthropic's are a few tens of bytes).
const MAX_NAME_BYTES: usize = 256;

/// `text` cut to at most `max` bytes, at a character's boundary.
fn capped(text: &str, max: usize) -> &str {
    let end = (0..=max.min(text.len()))
        .rev()
        .find(|&end| text.is_char_boundary(end))
        .unwrap_or(0);
    &text[..end]
}

/// Anthropic's `ping` event.
const PING: &[u8] = b"event: ping\ndata: {\"type\":\"ping\"}\n\n";

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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    use proptest::prelude::*;

    /// An event's data: Anthropic's kinds and others, their type written plainly, with an
    /// escape, twice, or not as a string, usage figures in place and elsewhere, nesting,
    /// and text that is not one JSON object.
    fn data() -> impl Strategy<Value = String> {
        let kind = prop_oneof![
            Just("message_start"),
            Just("message_delta"),
            Just("message_stop"),
            Just("error"),
            Just("content_block_delta"),
            Just("ping"),
            Just("message_stopped"),
        ];
        let written = prop_oneof![
            kind.clone().prop_map(|k| format!("\"{k}\"")),
            // `_` escaped: the same string to serde.
            kind.clone()
                .prop_map(|k| format!("\"{}\"", k.replace('_', "\\u005f"))),
            Just("7".to_owned()),
            Just("null".to_owned()),
            Just("[\"message_stop\"]".to_owned()),
        ];
        let member = prop_oneof![
            written.clone().prop_map(|w| format!("\"type\":{w}")),
            written.prop_map(|w| format!("\"typ\\u0065\":{w}")),
            Just("\"usage\":{\"input_tokens\":5,\"output_tokens\":9}".to_owned()),
            Just(
                "\"message\":{\"usage\":{\"input_tokens\":3,\"cache_read_input_tokens\":2}}"
                    .to_owned()
            ),
            Just("\"delta\":{\"type\":\"message_stop\",\"text\":\"error\"}".to_owned()),
            Just("\"big\":1e400".to_owned()),
            Just("\"index\":0".to_owned()),
        ];
        prop_oneof![
            8 => proptest::collection::vec(member, 0..5)
                .prop_map(|members| format!("{{{}}}", members.join(","))),
            1 => "[a-z{}\\[\\]\":, 0-9]{0,30}",
            1 => Just("[{\"type\":\"message_stop\"}]".to_owned()),
        ]
    }

    /// A `content_block_delta`'s data: text deltas in their shape with any text, and what is
    /// near it (another member, a key twice or escaped, another delta type, an index that is
    /// not an unsigned integer).
    fn delta_data() -> impl Strategy<Value = String> {
        let text = prop_oneof![
            6 => any::<String>().prop_map(|t| serde_json::to_string(&t).unwrap_or_default()),
            1 => Just("\"\"".to_owned()),
        ];
        // Mostly the shape itself, so that most cases take the fast path.
        let index = prop_oneof![
            4 => Just("0"),
            4 => Just("3"),
            1 => Just("-1"),
            1 => Just("1.5"),
            1 => Just("1e400"),
        ];
        // The delta's type and the member its piece is in: a text delta's `text`, an input
        // delta's `partial_json`, and the other way round.
        let delta_kind = prop_oneof![
            6 => Just(("\"text_delta\"", "text")),
            5 => Just(("\"input_json_delta\"", "partial_json")),
            2 => Just(("\"input_json_delta\"", "text")),
            2 => Just(("\"text_delta\"", "partial_json")),
            1 => Just(("\"text\\u005fdelta\"", "text")),
        ];
        let extra = prop_oneof![
            6 => Just(""),
            1 => Just(",\"extra\":1"),
            1 => Just(",\"text\":\"twice\""),
            1 => Just(",\"type\":\"ping\""),
        ];
        let shape = (text.clone(), index, delta_kind, extra.clone(), extra).prop_map(
            |(text, index, (delta_kind, field), inner, outer)| {
                format!(
                    "{{\"type\":\"content_block_delta\",\"index\":{index},\"delta\":{{\"type\":{delta_kind},\"{field}\":{text}{inner}}}{outer}}}"
                )
            },
        );
        // Its members in order in an array, which serde's derived structs would also read.
        let array = (text, any::<bool>()).prop_map(|(text, outer)| {
            let delta = format!("[\"text_delta\",{text}]");
            if outer {
                format!("[\"content_block_delta\",0,{delta}]")
            } else {
                format!("{{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{delta}}}")
            }
        });
        // A tool block's start, for the input deltas to belong to.
        let tool = prop_oneof![Just("0"), Just("3"), Just("4")].prop_map(|index| {
            format!("{{\"type\":\"content_block_start\",\"index\":{index},\"content_block\":{{\"type\":\"tool_use\",\"id\":\"toolu_{index}\",\"name\":\"f\",\"input\":{{}}}}}}")
        });
        prop_oneof![8 => shape, 1 => array, 3 => tool]
    }

    proptest! {
        // A piece of input in the shape needs its tool's start earlier: more cases than the
        // default.
        #![proptest_config(ProptestConfig::with_cases(1024))]

        /// A text delta or a piece of a tool's input read in its shape gives the client the
        /// bytes the whole parse gives, and every other event goes to the whole parse: the same
        /// frames and flow, event after event, after a `message_start` with any id and model.
        #[test]
        fn text_deltas_read_in_their_shape_translate_as_parsed_whole(
            id in any::<String>(),
            model in any::<String>(),
            created in any::<u64>(),
            include_usage in any::<bool>(),
            events in proptest::collection::vec(prop_oneof![delta_data(), data()], 0..8),
        ) {
            let start = json!({"type": "message_start", "message": {"id": id, "model": model,
                "usage": {"input_tokens": 3}}}).to_string();
            let (mut fast, mut whole) = (
                ChunksFromEvents::new(created, include_usage),
                ChunksFromEvents::new(created, include_usage),
            );
            for data in std::iter::once(start).chain(events) {
                let event = Event { event: None, data, id: None };
                let (mut a, mut b) = (Vec::new(), Vec::new());
                prop_assert_eq!(fast.push(&event, &mut a), whole.push_parsed(&event, &mut b));
                prop_assert_eq!(a, b, "{:?}", event);
            }
        }

        /// Passing over the events that cannot be watched changes nothing: after every event of
        /// any sequence, the same flow and the same usage as parsing each one whole (as
        /// `observe` did before it passed any over).
        #[test]
        fn events_passed_over_are_read_as_if_parsed_whole(
            events in proptest::collection::vec(
                (proptest::option::of("[a-z_]{1,20}"), data()),
                0..12,
            ),
        ) {
            let (mut usage, mut oracle) = (EventUsage::default(), EventUsage::default());
            for (name, data) in events {
                let event = Event { event: name, data, id: None };
                prop_assert_eq!(
                    usage.observe(&event),
                    oracle.observe_parsed(&event),
                    "{:?}", event
                );
                prop_assert_eq!(usage.usage(), oracle.usage());
            }
        }
    }

    /// A chat chunk: text chunks in the shape OpenAI-format backends stream them, and what is
    /// near them (other members, tool calls, usage, errors, choices of other kinds, values
    /// the parse refuses, text that is not a chunk).
    fn chat_chunk() -> impl Strategy<Value = String> {
        let text = prop_oneof![
            6 => any::<String>().prop_map(|t| serde_json::to_string(&t).unwrap()),
            1 => Just("\"\"".to_owned()),
            1 => Just("null".to_owned()),
            1 => Just("5".to_owned()),
        ];
        let delta = prop_oneof![
            8 => text.clone().prop_map(|t| format!("{{\"content\":{t}}}")),
            1 => text.clone().prop_map(|t| format!("{{\"role\":\"assistant\",\"content\":{t},\"refusal\":null}}")),
            1 => Just("{}".to_owned()),
            1 => Just("null".to_owned()),
            1 => Just("\"text\"".to_owned()),
            1 => Just("{\"content\":\"a\",\"tool_calls\":[{\"index\":0,\"id\":\"c\",\"function\":{\"name\":\"f\",\"arguments\":\"{}\"}}]}".to_owned()),
            // A call's start, then pieces of its arguments (and of another's), and near them.
            3 => (0..2u64).prop_map(|i| format!("{{\"tool_calls\":[{{\"index\":{i},\"id\":\"call_{i}\",\"type\":\"function\",\"function\":{{\"name\":\"f\",\"arguments\":\"\"}}}}]}}")),
            // Calls whole, each with its own id and no index (Gemini's), and a piece that
            // brings an id, the open call's or another's.
            2 => (0..3u64).prop_map(|i| format!("{{\"tool_calls\":[{{\"id\":\"fc_{i}\",\"type\":\"function\",\"function\":{{\"name\":\"g\",\"arguments\":\"{{}}\"}}}}]}}")),
            2 => (0..3u64, text.clone()).prop_map(|(i, t)| format!("{{\"tool_calls\":[{{\"index\":0,\"id\":\"fc_{i}\",\"function\":{{\"arguments\":{t}}}}}]}}")),
            8 => (0..2u64, text.clone()).prop_map(|(i, t)| format!("{{\"tool_calls\":[{{\"index\":{i},\"function\":{{\"arguments\":{t}}}}}]}}")),
            1 => text.clone().prop_map(|t| format!("{{\"content\":\"\",\"tool_calls\":[{{\"index\":0,\"function\":{{\"arguments\":{t}}}}}]}}")),
            3 => text.clone().prop_map(|t| format!("{{\"content\":null,\"tool_calls\":[{{\"function\":{{\"arguments\":{t}}},\"type\":\"function\"}}]}}")),
            3 => (0..2u64, text).prop_map(|(i, t)| format!("{{\"content\":\"a\",\"tool_calls\":[{{\"index\":{i},\"function\":{{\"arguments\":{t}}}}}]}}")),
            1 => Just("{\"tool_calls\":[{\"index\":0,\"id\":null,\"function\":{\"name\":\"g\",\"arguments\":\"z\"}}]}".to_owned()),
            2 => Just("{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"x\"}},{\"index\":1,\"id\":\"c1\",\"function\":{\"name\":\"g\",\"arguments\":\"y\"}}]}".to_owned()),
            1 => Just("{\"tool_calls\":[{\"index\":\"0\",\"function\":{\"arguments\":\"x\"}}]}".to_owned()),
            1 => Just("{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":5}}]}".to_owned()),
            1 => Just("{\"tool_calls\":[{\"index\":0,\"function\":null}]}".to_owned()),
            1 => Just("{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"x\",\"n\":1e400}}]}".to_owned()),
            1 => Just("{\"tool_calls\":[]}".to_owned()),
            1 => Just("{\"content\":\"a\",\"tool_calls\":null}".to_owned()),
            1 => Just("{\"content\":\"a\",\"content\":\"b\"}".to_owned()),
            1 => Just("{\"cont\\u0065nt\":\"escaped key\"}".to_owned()),
            1 => Just("{\"content\":\"a\",\"x\":\"\\ud800\"}".to_owned()),
        ];
        let finish = prop_oneof![
            8 => Just("null"),
            1 => Just("\"stop\""),
            1 => Just("\"length\""),
            1 => Just("\"tool_calls\""),
            1 => Just("7"),
        ];
        let choice = (delta, finish).prop_map(|(d, f)| {
            format!("{{\"index\":0,\"delta\":{d},\"logprobs\":null,\"finish_reason\":{f}}}")
        });
        let choices = prop_oneof![
            8 => choice.clone().prop_map(|c| format!("[{c}]")),
            1 => (choice.clone(), choice.clone()).prop_map(|(a, b)| format!("[{a},{b}]")),
            1 => Just("[]".to_owned()),
            1 => Just("[null]".to_owned()),
            1 => choice.prop_map(|c| format!("{{\"0\":{c}}}")),
            1 => Just("5".to_owned()),
        ];
        let extra = prop_oneof![
            8 => Just(""),
            1 => Just(",\"usage\":null"),
            1 => Just(",\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}"),
            1 => Just(",\"usage\":7"),
            1 => Just(",\"error\":{\"message\":\"boom\"}"),
            1 => Just(",\"error\":null"),
            1 => Just(",\"obfuscation\":1e400"),
            1 => Just(",\"choices\":[]"),
            1 => Just(",\"service_tier\":\"default\",\"system_fingerprint\":\"fp\""),
        ];
        prop_oneof![
            12 => (choices, extra).prop_map(|(c, e)| format!(
                "{{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":{c}{e}}}"
            )),
            1 => Just("[DONE]".to_owned()),
            1 => Just("[{\"choices\":[]}]".to_owned()),
            1 => "[a-z{}\\[\\]\":, 0-9]{0,20}",
        ]
    }

    /// Frames as text with the ids Sluice made fresh ([`fresh_id`]: a prefix and 32 hex
    /// digits) as the prefix and `*`, which two translations of one stream give alike.
    fn without_fresh_ids(frames: &[Bytes]) -> Vec<String> {
        frames
            .iter()
            .map(|frame| {
                let mut text = String::from_utf8_lossy(frame).into_owned();
                for prefix in ["\"msg_", "\"toolu_"] {
                    let mut from = 0;
                    while let Some(at) =
                        text[from..].find(prefix).map(|at| from + at + prefix.len())
                    {
                        let fresh = text.as_bytes()[at..]
                            .iter()
                            .take_while(|b| b.is_ascii_hexdigit())
                            .count()
                            == 32
                            && text.as_bytes().get(at + 32) == Some(&b'"');
                        if fresh {
                            text.replace_range(at..at + 32, "*");
                        }
                        from = at;
                    }
                }
                text
            })
            .collect()
    }

    proptest! {
        /// A text chunk read in its shape gives the Anthropic client the events the whole
        /// parse gives, and every other chunk goes to the whole parse: the same events, flow
        /// and usage, chunk after chunk.
        #[test]
        fn text_chunks_read_in_their_shape_translate_as_parsed_whole(
            chunks in proptest::collection::vec(chat_chunk(), 0..10),
        ) {
            let (mut fast, mut whole) = (EventsFromChunks::default(), EventsFromChunks::default());
            for data in chunks {
                let event = Event { event: None, data, id: None };
                let (mut a, mut b) = (Vec::new(), Vec::new());
                prop_assert_eq!(fast.push(&event, &mut a), whole.push_parsed(&event, &mut b));
                prop_assert_eq!(without_fresh_ids(&a), without_fresh_ids(&b), "{:?}", event);
                prop_assert_eq!(fast.usage(), whole.usage());
            }
        }
    }

    /// The events a Messages client is sent for `chunks` (each chunk's JSON), `[DONE]` last.
    fn translated(chunks: &[Value]) -> Vec<Value> {
        let mut translation = EventsFromChunks::default();
        let mut frames = Vec::new();
        for chunk in chunks
            .iter()
            .map(Value::to_string)
            .chain(["[DONE]".to_owned()])
        {
            let event = Event {
                event: None,
                data: chunk,
                id: None,
            };
            translation.push(&event, &mut frames);
        }
        frames
            .iter()
            .map(|frame| {
                let text = std::str::from_utf8(frame).unwrap();
                let data = text.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
                serde_json::from_str(data).unwrap()
            })
            .collect()
    }

    /// A reasoning model's chunks, which a Messages client is not sent, are followed by a
    /// `ping` every 32, as Anthropic pings while its model works; the answer after them is
    /// sent as ever.
    #[test]
    fn a_reasoning_models_silence_is_broken_by_pings() {
        let chunk = |delta: Value| {
            json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                   "choices": [{"index": 0, "delta": delta, "finish_reason": null}]})
        };
        let mut chunks = vec![chunk(json!({"role": "assistant", "content": ""}))];
        chunks.extend((0..100).map(|_| chunk(json!({"reasoning_content": "hmm"}))));
        chunks.push(chunk(json!({"content": "Yes."})));
        let events = translated(&chunks);
        let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(
            kinds.iter().filter(|k| **k == "ping").count(),
            3,
            "{kinds:?}"
        );
        assert_eq!(kinds[0], "message_start");
        assert!(kinds.ends_with(&["content_block_stop", "message_delta", "message_stop"]));
        assert!(kinds.contains(&"content_block_delta"));
    }

    /// A streamed refusal (`delta.refusal`) ends the turn `refusal`, as Anthropic's does;
    /// arguments a server streams as the object itself reach the client as its JSON.
    #[test]
    fn a_streamed_refusal_ends_as_one_and_object_arguments_are_sent() {
        let chunk = |delta: Value, finish: Value| {
            json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
        };
        let events = translated(&[
            chunk(
                json!({"role": "assistant", "content": null, "refusal": ""}),
                Value::Null,
            ),
            chunk(json!({"refusal": "I can't"}), Value::Null),
            chunk(json!({"refusal": " help."}), json!("stop")),
        ]);
        let stop = events
            .iter()
            .find(|e| e["type"] == "message_delta")
            .unwrap();
        assert_eq!(stop["delta"]["stop_reason"], "refusal", "{events:?}");

        let events = translated(&[chunk(
            json!({"role": "assistant", "tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                   "function": {"name": "Read", "arguments": {"path": "a.txt"}}}]}),
            json!("tool_calls"),
        )]);
        let input: String = events
            .iter()
            .filter(|e| e["delta"]["type"] == "input_json_delta")
            .map(|e| e["delta"]["partial_json"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            serde_json::from_str::<Value>(&input).unwrap(),
            json!({"path": "a.txt"}),
            "{events:?}"
        );
    }

    /// Text deltas and pieces of a tool's input as Anthropic streams them are read in their
    /// shape, and the piece written as the chunk of the call its block started.
    #[test]
    fn deltas_as_anthropic_writes_them_are_read_in_their_shape() {
        for data in [
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hello"}}"#,
            r#"{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"city\": \"Par"}}"#,
        ] {
            assert!(
                serde_json::from_str::<Object<TextDelta<'_>>>(data).is_ok(),
                "{data}"
            );
        }
        let mut chunks = ChunksFromEvents::new(7, false);
        let mut out = Vec::new();
        for data in [
            r#"{"type":"message_start","message":{"id":"msg_1","model":"claude"}}"#,
            r#"{"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_1","name":"weather","input":{}}}"#,
            r#"{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"city\": \"Par"}}"#,
        ] {
            chunks.push(
                &Event {
                    event: None,
                    data: data.to_owned(),
                    id: None,
                },
                &mut out,
            );
        }
        let last: Value = serde_json::from_slice(&out[2][6..]).unwrap();
        assert_eq!(
            last["choices"][0]["delta"],
            json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\": \"Par"}}]})
        );
    }

    /// Events the SDKs pass over are passed over here too: a `ping` whose data is not JSON, an
    /// event whose data names no type, an unknown kind's; only a kind read here whose data
    /// cannot be read ends the stream.
    #[test]
    fn events_the_sdks_pass_over_do_not_end_a_translated_stream() {
        let event = |name: Option<&str>, data: &str| Event {
            event: name.map(str::to_owned),
            data: data.to_owned(),
            id: None,
        };
        let mut chunks = ChunksFromEvents::new(7, false);
        let mut out = Vec::new();
        for passed_over in [
            event(Some("ping"), ""),
            event(Some("ping"), "{}"),
            event(None, "{}"),
            event(None, ""),
            event(Some("something_new"), "not json"),
        ] {
            assert_eq!(
                chunks.push(&passed_over, &mut out),
                Flow::Continue,
                "{passed_over:?}"
            );
        }
        // Typeless data under a kind's name is read as that kind.
        let flow = chunks.push(
            &event(
                Some("content_block_delta"),
                r#"{"index":0,"delta":{"type":"text_delta","text":"Hi"}}"#,
            ),
            &mut out,
        );
        assert_eq!(flow, Flow::Continue);
        let text: Value = serde_json::from_slice(&out.last().unwrap()[6..]).unwrap();
        assert_eq!(text["choices"][0]["delta"]["content"], "Hi", "{out:?}");
        assert_eq!(
            chunks.push(&event(Some("message_delta"), "not json"), &mut out),
            Flow::Failed
        );
    }

    /// A `message_start`'s `id` and `model`, which every chunk repeats, are kept to a few
    /// hundred bytes: an upstream's megabyte of either is not sent again with each piece.
    #[test]
    fn a_message_starts_names_are_capped() {
        let event = |data: String| Event {
            event: None,
            data,
            id: None,
        };
        let long = "é".repeat(500_000);
        let mut chunks = ChunksFromEvents::new(7, false);
        let mut out = Vec::new();
        chunks.push(
            &event(
                json!({"type": "message_start", "message": {"id": long, "model": long}})
                    .to_string(),
            ),
            &mut out,
        );
        chunks.push(
            &event(r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}"#.to_owned()),
            &mut out,
        );
        let text: Value = serde_json::from_slice(&out.last().unwrap()[6..]).unwrap();
        assert_eq!(text["choices"][0]["delta"]["content"], "Hi");
        let id = text["id"].as_str().unwrap();
        assert!(
            id.len() <= MAX_NAME_BYTES && id.starts_with("éé"),
            "{}",
            id.len()
        );
        assert!(
            out.last().unwrap().len() < 1024,
            "{}",
            out.last().unwrap().len()
        );
    }

    /// Tool blocks whose input their start gives are held until they stop: an upstream that
    /// starts them and never stops them fails its stream once they hold more than an event
    /// may, rather than grow it unseen; one that stops each goes on for as long as it likes.
    #[test]
    fn tool_blocks_never_stopped_fail_their_stream_past_a_bound() {
        let event = |data: String| Event {
            event: None,
            data,
            id: None,
        };
        let input = "x".repeat(64 * 1024);
        let start = |index: usize| {
            event(format!(
                r#"{{"type":"content_block_start","index":{index},"content_block":{{"type":"tool_use","id":"t{index}","name":"f","input":{{"a":"{input}"}}}}}}"#
            ))
        };
        let stop = |index: usize| {
            event(format!(
                r#"{{"type":"content_block_stop","index":{index}}}"#
            ))
        };
        for stopped in [true, false] {
            let mut chunks = ChunksFromEvents::new(7, false);
            let mut out = Vec::new();
            let mut failed_at = None;
            for index in 0..200 {
                if let Flow::Failed = chunks.push(&start(index), &mut out) {
                    failed_at = Some(index);
                    break;
                }
                if stopped {
                    chunks.push(&stop(index), &mut out);
                }
            }
            match stopped {
                true => assert_eq!(failed_at, None),
                // The one that takes them past an event's bound (`{"a":"…"}` is 8 bytes more).
                false => assert_eq!(failed_at, Some(MAX_PENDING_BYTES / (input.len() + 8))),
            }
        }
    }

    /// The text chunks OpenAI-format backends stream, and the pieces of a tool call's
    /// arguments, are read in their shape.
    #[test]
    fn a_text_chunk_as_backends_write_it_is_read_in_its_shape() {
        for data in [
            r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","service_tier":"default","system_fingerprint":"fp","choices":[{"index":0,"delta":{"content":" tok1"},"logprobs":null,"finish_reason":null}],"usage":null,"obfuscation":"x1"}"#,
            r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}]}"#,
            r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","service_tier":"default","system_fingerprint":"fp","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"path"}}]},"logprobs":null,"finish_reason":null}],"usage":null,"obfuscation":"x1"}"#,
        ] {
            assert!(
                serde_json::from_str::<TextChunk<'_>>(data).is_ok(),
                "{data}"
            );
        }
    }

    #[test]
    fn only_data_that_cannot_name_a_watched_kind_is_passed_over() {
        for data in [
            r#"{"type":"message_stop"}"#,
            r#"{"type":"error","error":{"type":"overloaded_error"}}"#,
            r#"{"type":"message\u005fdelta","usage":{"output_tokens":3}}"#,
            // Passed on to the parse, which finds nothing: a content delta that says "error".
            r#"{"type":"content_block_delta","delta":{"type":"text_delta","text":"error"}}"#,
        ] {
            assert!(may_be_watched(data), "{data}");
        }
        for data in [
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":" error\n"}}"#,
            r#"{"type":"ping"}"#,
            r#"{"type":"content_block_stop","index":0}"#,
        ] {
            assert!(!may_be_watched(data), "{data}");
        }
    }
}
