//! A chat completions request in the shape the OpenAI SDKs and the agents built on them write
//! it, written as a Messages request straight from its text: [`chat_to_messages_in_shape`].
//!
//! The shape: messages of the system, developer, user, assistant and tool roles whose content
//! is a string, `null` or text parts (an assistant's also refusal parts; a text part's
//! `prompt_cache_breakpoint` too), the assistant's tool calls; the token limits, `temperature`, `top_p`, `stop`, `user`, `safety_identifier`, function tools,
//! `tool_choice`, `parallel_tool_calls`, `prompt_cache_key`, `prompt_cache_retention` and
//! `prompt_cache_options`.
//! Texts are copied as the client escaped them, tool descriptions and schemas and a call's
//! `arguments` (the JSON text inside the string, unescaped once) as the client wrote them (a
//! strict tool's parameters are parsed, to be rewritten as the translation rewrites them);
//! each is checked as the parse into values checks it ([`super::as_written`]). Anything else
//! (images, `n`, `logprobs`, `response_format`, an `allowed_tools` choice, `modalities`, `audio`,
//! a member of another type than the shape's) is `None`, left to [`super::chat_to_messages`], the translation that
//! decides; property tests in `request.rs` hold the two to the same Messages request.

use std::borrow::Cow;

use serde::Deserialize;
use serde::de::Error as _;
use serde_json::value::RawValue;

use super::as_written::{Copied, Written, checked, from_text, member, within_limit, written};
use crate::anthropic::{
    Call, Checked, Function, Names, Sampling, members, portable_tool_id, string,
};
use crate::request::Key;

/// [`super::chat_to_messages`] of a request in the shape (see the module) with `stream` set
/// as given, written from its members as the client wrote them; `None` for any other request.
pub fn chat_to_messages_in_shape<'a>(
    members: impl Iterator<Item = (&'a str, &'a RawValue)>,
    model: &str,
    default_max_tokens: u32,
    sampling: Sampling,
    stream: bool,
) -> Option<Vec<u8>> {
    let (mut max_completion_tokens, mut max_tokens) = (None, None);
    let (mut temperature, mut top_p, mut user, mut safety) = (None, None, None, None);
    let (mut turns, mut stop, mut tools, mut choice, mut parallel) = (None, None, None, None, None);
    // Whether `prompt_cache_key` and `prompt_cache_retention` ask for the cache, and what
    // `prompt_cache_options` asks (the last of two of one name stands, as in the parse).
    let (mut size, mut cache, mut options) = (0, [false; 2], super::CacheOptions::default());
    for (key, value) in members {
        let text = value.get();
        size += text.len();
        match key {
            // Read (and checked) by `request::parse`: the model is the route's, `stream` given.
            "model" | "stream" => {}
            "max_completion_tokens" => max_completion_tokens = from_text::<Option<u64>>(text)?,
            "max_tokens" => max_tokens = from_text::<Option<u64>>(text)?,
            "temperature" | "top_p" => {
                from_text::<Checked>(text)?;
                let slot = if key == "temperature" {
                    &mut temperature
                } else {
                    &mut top_p
                };
                *slot = (text != "null").then_some(value);
            }
            "user" => user = from_text::<Option<Key<'a>>>(text)?,
            "safety_identifier" => safety = from_text::<Option<Key<'a>>>(text)?,
            "prompt_cache_key" | "prompt_cache_retention" => {
                let asked = from_text::<Option<Key<'a>>>(text)?.is_some();
                cache[usize::from(key == "prompt_cache_retention")] = asked;
            }
            "prompt_cache_options" => {
                from_text::<Checked>(text)?;
                options = super::CacheOptions::of(&serde_json::from_str(text).ok()?);
            }
            "messages" => turns = Some(from_text::<Turns<'a>>(text)?),
            "stop" => {
                // A string becomes the one stop sequence, an array is copied; one Anthropic
                // refuses (blank) is left to the translation that decides.
                stop = (text != "null").then_some(value);
                if stop.is_some()
                    && (!(text.starts_with('"') || text.starts_with('['))
                        || !checked(value, 0)
                        || !from_text::<Stops>(text)?.sendable())
                {
                    return None;
                }
            }
            "tools" => tools = from_text::<Option<Vec<Tool<'a>>>>(text)?,
            "tool_choice" => choice = from_text::<Option<ToolChoice<'a>>>(text)?,
            "parallel_tool_calls" => parallel = from_text::<Option<bool>>(text)?,
            "n" | "logprobs" | "response_format" | "modalities" | "audio" | "functions"
            | "function_call" => return None,
            _ => {
                from_text::<Checked>(text)?;
            }
        }
    }
    let Turns {
        system,
        turns,
        last_kept,
    } = turns?;
    // Nothing Anthropic would take, or a last assistant turn the client did not send last
    // (Anthropic would continue it): the translation that decides says why.
    if turns.is_empty() || (!last_kept && turns.last().is_some_and(|t| t.role == "assistant")) {
        return None;
    }
    // The client's marks: the latest Anthropic takes are written.
    let marks = system
        .iter()
        .chain(turns.iter().flat_map(|turn| &turn.blocks))
        .filter(|block| block.marked())
        .count();
    let automatic = options.automatic(cache.contains(&true), marks);
    let mut breakpoints = Breakpoints {
        dropped: marks.saturating_sub(super::CacheOptions::kept(automatic)),
        seen: 0,
        written: options.breakpoint(),
    };
    let mut out = Vec::with_capacity(size + 256);
    out.extend_from_slice(b"{\"model\":");
    string(&mut out, model);
    let max_tokens = max_completion_tokens
        .or(max_tokens)
        .unwrap_or(u64::from(default_max_tokens));
    out.extend_from_slice(format!(",\"max_tokens\":{max_tokens}").as_bytes());
    if !system.is_empty() {
        member(&mut out, "system");
        blocks(&mut out, &system, &mut breakpoints);
    }
    out.extend_from_slice(b",\"messages\":[");
    for (i, turn) in turns.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"role\":\"");
        out.extend_from_slice(turn.role.as_bytes());
        out.extend_from_slice(b"\",\"content\":");
        blocks(&mut out, &turn.blocks, &mut breakpoints);
        out.push(b'}');
    }
    out.push(b']');
    // Anthropic's current models take one of the two: `temperature` wins. Versions from
    // 2026-10-21 take neither.
    let top_p = top_p.filter(|_| temperature.is_none());
    for (name, value) in [("temperature", temperature), ("top_p", top_p)] {
        if let Some(value) = value.filter(|_| sampling == Sampling::Taken) {
            member(&mut out, name);
            out.extend_from_slice(value.get().as_bytes());
        }
    }
    if let Some(stop) = stop {
        member(&mut out, "stop_sequences");
        let text = stop.get();
        if text.starts_with('"') {
            out.push(b'[');
            out.extend_from_slice(text.as_bytes());
            out.push(b']');
        } else {
            out.extend_from_slice(text.as_bytes());
        }
    }
    if let Some(tools) = &tools {
        member(&mut out, "tools");
        out.push(b'[');
        for (i, tool) in tools.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            tool.write(&mut out);
        }
        out.push(b']');
    }
    // `parallel_tool_calls: false` asks for one call at a time, under `auto` if no choice;
    // nothing to say with no tools, nor to `none`.
    let serial = parallel == Some(false) && tools.is_some();
    if choice.is_some() || serial {
        let none = matches!(choice, Some(ToolChoice::Named("none")));
        member(&mut out, "tool_choice");
        match choice.unwrap_or(ToolChoice::Named("auto")) {
            ToolChoice::Named(kind) => {
                out.extend_from_slice(b"{\"type\":\"");
                out.extend_from_slice(kind.as_bytes());
                out.push(b'"');
            }
            ToolChoice::Tool(name) => {
                out.extend_from_slice(b"{\"type\":\"tool\",\"name\":");
                string(&mut out, &name);
            }
        }
        if serial && !none {
            out.extend_from_slice(b",\"disable_parallel_tool_use\":true");
        }
        out.push(b'}');
    }
    // `safety_identifier`, OpenAI's member in `user`'s place, as `user` (which wins).
    if let Some(Key(user)) = user.as_ref().or(safety.as_ref()) {
        out.extend_from_slice(b",\"metadata\":{\"user_id\":");
        string(&mut out, &super::messages_user_id(user));
        out.push(b'}');
    }
    if automatic {
        out.extend_from_slice(super::CACHE_CONTROL);
    }
    out.extend_from_slice(if stream {
        b",\"stream\":true}"
    } else {
        b",\"stream\":false}"
    });
    Some(out)
}

/// A Messages content block as it will be written.
enum Block<'a> {
    /// A text block: a JSON string's contents as written (never empty), and whether its part
    /// was marked with `prompt_cache_breakpoint`.
    Text(&'a str, bool),
    ToolUse {
        id: Cow<'a, str>,
        name: Cow<'a, str>,
        /// The call's arguments: the JSON text of an object (`{}` for none).
        input: Cow<'a, str>,
    },
    ToolResult {
        id: Cow<'a, str>,
        texts: Vec<&'a str>,
        /// Whether one of its parts was marked: the result is.
        marked: bool,
    },
}

impl Block<'_> {
    fn marked(&self) -> bool {
        matches!(
            self,
            Block::Text(_, true) | Block::ToolResult { marked: true, .. }
        )
    }
}

/// The client's marks as they are written: the first `dropped` in the prompt's order are
/// not (Anthropic takes four), the others are written as `written`.
struct Breakpoints {
    dropped: usize,
    seen: usize,
    written: &'static [u8],
}

impl Breakpoints {
    /// A marked block's `cache_control`, if it is kept, before its closing brace.
    fn write(&mut self, out: &mut Vec<u8>) {
        if self.seen >= self.dropped {
            out.extend_from_slice(self.written);
        }
        self.seen += 1;
    }
}

/// `[…]` of blocks.
fn blocks(out: &mut Vec<u8>, blocks: &[Block<'_>], breakpoints: &mut Breakpoints) {
    out.push(b'[');
    for (i, block) in blocks.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        match block {
            Block::Text(text, marked) => {
                text_block(out, text);
                if *marked {
                    out.pop();
                    breakpoints.write(out);
                    out.push(b'}');
                }
            }
            Block::ToolUse { id, name, input } => {
                out.extend_from_slice(b"{\"type\":\"tool_use\",\"id\":");
                string(out, id);
                out.extend_from_slice(b",\"name\":");
                string(out, name);
                out.extend_from_slice(b",\"input\":");
                out.extend_from_slice(input.as_bytes());
                out.push(b'}');
            }
            Block::ToolResult { id, texts, marked } => {
                out.extend_from_slice(b"{\"type\":\"tool_result\",\"tool_use_id\":");
                string(out, id);
                if !texts.is_empty() {
                    out.extend_from_slice(b",\"content\":[");
                    for (j, text) in texts.iter().enumerate() {
                        if j > 0 {
                            out.push(b',');
                        }
                        text_block(out, text);
                    }
                    out.push(b']');
                }
                if *marked {
                    breakpoints.write(out);
                }
                out.push(b'}');
            }
        }
    }
    out.push(b']');
}

/// Whether a JSON string's contents as written are blank once unescaped
/// ([`super::blank`]), read up to their first character that is not whitespace: most text
/// ends the look at once. Only a `\u` escape among whitespace is unescaped to tell.
fn blank(written: &str) -> bool {
    let mut chars = written.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some('n' | 'r' | 't' | 'f') => {}
                Some('u') => {
                    return serde_json::from_str::<String>(&format!("\"{written}\""))
                        .is_ok_and(|text| super::blank(&text));
                }
                _ => return false,
            },
            c if c.is_whitespace() => {}
            _ => return false,
        }
    }
    true
}

/// `{"type":"text","text":"…"}` of a JSON string's contents as written.
fn text_block(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(b"{\"type\":\"text\",\"text\":\"");
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(b"\"}");
}

/// A Messages turn: its role and blocks.
struct Turn<'a> {
    role: &'static str,
    blocks: Vec<Block<'a>>,
}

/// Chat `messages` in the shape, made into the top-level `system` blocks and the turns as
/// `chat_messages` makes them (every system message goes to `system`; a message with no block
/// is left out; turns of the same role in a row merge; a tool message is a user turn holding
/// its result).
struct Turns<'a> {
    system: Vec<Block<'a>>,
    turns: Vec<Turn<'a>>,
    /// Whether the last message is the last turn's (not left out, nor `system`).
    last_kept: bool,
}

impl<'de> Deserialize<'de> for Turns<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(value: D) -> Result<Self, D::Error> {
        struct Each;
        impl<'de> serde::de::Visitor<'de> for Each {
            type Value = Turns<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("chat messages")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Turns<'de>, A::Error> {
                let mut made = Turns {
                    system: Vec::new(),
                    turns: Vec::new(),
                    last_kept: false,
                };
                while let Some(ChatMessage { role, blocks }) = seq.next_element()? {
                    made.last_kept = role != "system" && !blocks.is_empty();
                    if role == "system" {
                        made.system.extend(blocks);
                        continue;
                    }
                    match made.turns.last_mut() {
                        _ if blocks.is_empty() => {}
                        Some(last) if last.role == role => last.blocks.extend(blocks),
                        _ => made.turns.push(Turn { role, blocks }),
                    }
                }
                Ok(made)
            }
        }
        value.deserialize_seq(Each)
    }
}

/// A chat message of a role the shape takes, as the role of its Messages turn (`developer`
/// read as `system`, `tool` as `user`) and the blocks it makes.
struct ChatMessage<'a> {
    role: &'static str,
    blocks: Vec<Block<'a>>,
}

impl<'de> Deserialize<'de> for ChatMessage<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(value: D) -> Result<Self, D::Error> {
        const NAMES: Names = Names(&["role", "content", "tool_calls", "tool_call_id", "refusal"]);
        struct Message;
        impl<'de> serde::de::Visitor<'de> for Message {
            type Value = ChatMessage<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a chat message")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<ChatMessage<'de>, A::Error> {
                let (mut role, mut content, mut calls, mut result_of) = (None, None, None, None);
                let mut refusal = None;
                members(map, NAMES, |at, map| {
                    match at {
                        0 => role = Some(map.next_value::<Key>()?.0),
                        1 => content = Some(map.next_value::<Content>()?),
                        2 => calls = map.next_value::<Option<Vec<Call>>>()?,
                        3 => result_of = map.next_value::<Option<Key>>()?,
                        _ => refusal = map.next_value::<Option<Written>>()?,
                    }
                    Ok(())
                })?;
                let Content(parts) = content.unwrap_or(Content(Vec::new()));
                // Text parts only, unless the role takes others; each with its mark (a
                // refusal part takes none).
                let texts = |refusals: bool| {
                    parts
                        .iter()
                        .map(|part| match part {
                            Part::Text(text, marked) => Ok((*text, *marked)),
                            Part::Refusal(text) if refusals => Ok((*text, false)),
                            Part::Refusal(_) => Err(A::Error::custom("a refusal part")),
                        })
                        .filter(|text| text.as_ref().map_or(true, |(text, _)| !blank(text)))
                        .collect::<Result<Vec<(&'de str, bool)>, A::Error>>()
                };
                let text_blocks = |refusals: bool| {
                    texts(refusals).map(|texts| {
                        texts
                            .into_iter()
                            .map(|(text, marked)| Block::Text(text, marked))
                            .collect::<Vec<_>>()
                    })
                };
                let (role, blocks) =
                    match role.as_deref() {
                        Some("system" | "developer") => ("system", text_blocks(false)?),
                        Some("user") => ("user", text_blocks(false)?),
                        Some("assistant") => {
                            let mut blocks = text_blocks(true)?;
                            // An answer refused, sent back: its text is the turn's.
                            blocks.extend(
                                refusal
                                    .map(|Written(text)| text)
                                    .filter(|text| !blank(text))
                                    .map(|text| Block::Text(text, false)),
                            );
                            blocks.extend(calls.into_iter().flatten().map(
                                |Call { id, name, input }| Block::ToolUse { id, name, input },
                            ));
                            ("assistant", blocks)
                        }
                        Some("tool") => {
                            let id = portable_tool_id(
                                result_of
                                    .ok_or_else(|| A::Error::custom("no tool_call_id"))?
                                    .0,
                            );
                            let texts = texts(false)?;
                            let marked = texts.iter().any(|(_, marked)| *marked);
                            let texts = texts.into_iter().map(|(text, _)| text).collect();
                            ("user", vec![Block::ToolResult { id, texts, marked }])
                        }
                        _ => return Err(A::Error::custom("a role outside the shape")),
                    };
                Ok(ChatMessage { role, blocks })
            }
        }
        value.deserialize_map(Message)
    }
}

/// A message's content in the shape: a string (one part), `null` (none) or text and refusal
/// parts, each text as written.
struct Content<'a>(Vec<Part<'a>>);

enum Part<'a> {
    /// Its text, and whether it is marked with `prompt_cache_breakpoint`.
    Text(&'a str, bool),
    Refusal(&'a str),
}

/// Where a message's content starts: two levels inside `messages` (the array, the message).
const CONTENT_DEPTH: usize = 2;

impl<'de> Deserialize<'de> for Content<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(value: D) -> Result<Self, D::Error> {
        let raw = <&'de RawValue>::deserialize(value)?;
        let text = raw.get();
        if text == "null" {
            return Ok(Content(Vec::new()));
        }
        if text.starts_with('"') {
            return written(raw)
                .map(|text| Content(vec![Part::Text(text, false)]))
                .ok_or_else(|| D::Error::custom("not a string the parse takes"));
        }
        // The parts are read from their text again, where the nesting limit counts from the
        // array: the levels above it are counted here.
        if text.starts_with('[') && within_limit(text, CONTENT_DEPTH) {
            return serde_json::from_str::<Vec<PartOf>>(text)
                .map(|parts| Content(parts.into_iter().map(|PartOf(part)| part).collect()))
                .map_err(D::Error::custom);
        }
        Err(D::Error::custom("content outside the shape"))
    }
}

/// A content part in the shape: text (its `text`, missing or `null` read as empty, and its
/// `prompt_cache_breakpoint`: an object marks it, `null` does not, anything else is outside the
/// shape) or a refusal (its `refusal`, likewise).
struct PartOf<'a>(Part<'a>);

impl<'de> Deserialize<'de> for PartOf<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(value: D) -> Result<Self, D::Error> {
        struct Members;
        impl<'de> serde::de::Visitor<'de> for Members {
            type Value = PartOf<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a content part")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<PartOf<'de>, A::Error> {
                const NAMES: Names = Names(&["type", "text", "refusal", "prompt_cache_breakpoint"]);
                let (mut kind, mut text, mut refusal, mut marked) = (None, None, None, false);
                members(map, NAMES, |at, map| {
                    match at {
                        0 => kind = Some(map.next_value::<Key>()?.0),
                        1 => text = map.next_value::<Option<Written>>()?,
                        2 => refusal = map.next_value::<Option<Written>>()?,
                        _ => marked = map.next_value::<Mark>()?.0,
                    }
                    Ok(())
                })?;
                let read = |text: Option<Written<'de>>| text.map_or("", |Written(text)| text);
                match kind.as_deref() {
                    Some("text") => Ok(PartOf(Part::Text(read(text), marked))),
                    Some("refusal") => Ok(PartOf(Part::Refusal(read(refusal)))),
                    _ => Err(A::Error::custom("a part outside the shape")),
                }
            }
        }
        value.deserialize_map(Members)
    }
}

/// A part's `prompt_cache_breakpoint`: whether it marks the part (an object, checked as the
/// parse checks it) or not (`null`); any other value is an error, outside the shape.
struct Mark(bool);

impl<'de> Deserialize<'de> for Mark {
    fn deserialize<D: serde::Deserializer<'de>>(value: D) -> Result<Self, D::Error> {
        struct Either;
        impl<'de> serde::de::Visitor<'de> for Either {
            type Value = Mark;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object or null")
            }
            fn visit_unit<E>(self) -> Result<Mark, E> {
                Ok(Mark(false))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Mark, A::Error> {
                serde::de::Visitor::visit_map(Checked, map).map(|Checked| Mark(true))
            }
        }
        value.deserialize_any(Either)
    }
}

/// A function tool: its name, its description and parameters as written, and whether it is
/// `strict`.
struct Tool<'a> {
    name: Cow<'a, str>,
    description: Option<&'a RawValue>,
    parameters: Option<&'a RawValue>,
    strict: bool,
}

/// Where a function's members are: three levels inside `tools` (the array, the tool, its
/// function).
const FUNCTION_DEPTH: usize = 3;

impl Tool<'_> {
    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"name\":");
        string(out, &self.name);
        if let Some(description) = self.description {
            out.extend_from_slice(b",\"description\":");
            out.extend_from_slice(description.get().as_bytes());
        }
        out.extend_from_slice(b",\"input_schema\":");
        let parameters = self
            .parameters
            .map_or(r#"{"type":"object","properties":{}}"#, RawValue::get);
        // A strict tool's schema rewritten as the translation rewrites it (read from its
        // text, checked already); else copied.
        let strict = self
            .strict
            .then(|| serde_json::from_str(parameters).ok())
            .flatten()
            .and_then(|schema| super::strict_input_schema(Some(&true.into()), &schema));
        match strict.and_then(|schema| serde_json::to_vec(&schema).ok()) {
            Some(schema) => {
                out.extend_from_slice(&schema);
                out.extend_from_slice(b",\"strict\":true");
            }
            None => out.extend_from_slice(parameters.as_bytes()),
        }
        out.push(b'}');
    }
}

impl<'de> Deserialize<'de> for Tool<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(value: D) -> Result<Self, D::Error> {
        struct Members;
        impl<'de> serde::de::Visitor<'de> for Members {
            type Value = Tool<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a tool")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Tool<'de>, A::Error> {
                let (mut kind, mut function) = (None, None);
                members(map, Names(&["type", "function"]), |at, map| {
                    match at {
                        0 => kind = map.next_value::<Option<Key>>()?,
                        _ => function = Some(map.next_value::<FunctionTool>()?),
                    }
                    Ok(())
                })?;
                match (kind, function) {
                    (Some(Key(kind)), Some(FunctionTool(tool))) if kind == "function" => Ok(tool),
                    _ => Err(A::Error::custom("not a function tool")),
                }
            }
        }
        value.deserialize_map(Members)
    }
}

/// A function tool's `function`.
struct FunctionTool<'a>(Tool<'a>);

impl<'de> Deserialize<'de> for FunctionTool<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(value: D) -> Result<Self, D::Error> {
        struct Members;
        impl<'de> serde::de::Visitor<'de> for Members {
            type Value = FunctionTool<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a function")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<FunctionTool<'de>, A::Error> {
                const NAMES: Names = Names(&["name", "description", "parameters", "strict"]);
                let (mut name, mut description, mut parameters) = (None, None, None);
                let mut strict = None;
                members(map, NAMES, |at, map| {
                    match at {
                        0 => name = Some(map.next_value::<Key>()?.0),
                        1 => description = Some(map.next_value::<Copied<FUNCTION_DEPTH>>()?.0),
                        2 => parameters = Some(map.next_value::<Copied<FUNCTION_DEPTH>>()?.0),
                        _ => strict = map.next_value::<Option<bool>>()?,
                    }
                    Ok(())
                })?;
                let given = |value: Option<&'de RawValue>| value.filter(|v| v.get() != "null");
                Ok(FunctionTool(Tool {
                    name: name.ok_or_else(|| A::Error::custom("no name"))?,
                    description: given(description),
                    parameters: given(parameters),
                    strict: strict == Some(true),
                }))
            }
        }
        value.deserialize_map(Members)
    }
}

/// `tool_choice` as `chat_tool_choice` makes it.
enum ToolChoice<'a> {
    /// `auto`, `any` or `none`.
    Named(&'static str),
    /// One tool, by name.
    Tool(Cow<'a, str>),
}

impl<'de> Deserialize<'de> for ToolChoice<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(value: D) -> Result<Self, D::Error> {
        struct Either;
        impl<'de> serde::de::Visitor<'de> for Either {
            type Value = ToolChoice<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("tool_choice")
            }
            fn visit_str<E: serde::de::Error>(self, choice: &str) -> Result<ToolChoice<'de>, E> {
                match choice {
                    "auto" => Ok(ToolChoice::Named("auto")),
                    "required" => Ok(ToolChoice::Named("any")),
                    "none" => Ok(ToolChoice::Named("none")),
                    _ => Err(E::custom("an unknown tool_choice")),
                }
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<ToolChoice<'de>, A::Error> {
                let mut function = None;
                members(map, Names(&["function"]), |_, map| {
                    function = Some(map.next_value::<Function>()?);
                    Ok(())
                })?;
                match function {
                    Some(Function {
                        name: Some(name), ..
                    }) => Ok(ToolChoice::Tool(name)),
                    _ => Err(A::Error::custom("a tool_choice without a function's name")),
                }
            }
        }
        value.deserialize_any(Either)
    }
}

/// A `stop` value, for [`super::sendable_stop`]: a string, or an array whose strings are
/// looked at (anything else in it is the translation's to refuse).
#[derive(Deserialize)]
#[serde(untagged)]
enum Stops<'a> {
    One(#[serde(borrow)] Cow<'a, str>),
    Many(#[serde(borrow)] Vec<Option<Stop<'a>>>),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop<'a> {
    Text(#[serde(borrow)] Cow<'a, str>),
    Other(serde::de::IgnoredAny),
}

impl Stops<'_> {
    fn sendable(&self) -> bool {
        match self {
            Self::One(stop) => super::sendable_stop(stop),
            Self::Many(stops) => stops.iter().all(|stop| match stop {
                Some(Stop::Text(stop)) => super::sendable_stop(stop),
                _ => true,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// A part's member, a function's parameters and a call's arguments nested as deep as the
    /// parse into values takes them are written in the shape; one level deeper they are left
    /// to that parse, which refuses them.
    #[test]
    fn values_nested_to_the_limit_are_written_in_the_shape_and_no_deeper() {
        let nested = |levels: usize| format!("{}{}", "[".repeat(levels), "]".repeat(levels));
        let request = |part: &str, parameters: &str, arguments: &str| {
            let arguments = serde_json::to_string(&format!("{{\"a\":{arguments}}}")).unwrap();
            format!(
                r#"{{"model":"m","messages":[{{"role":"user","content":[{{"type":"text","text":"x","x":{part}}}]}},{{"role":"assistant","content":null,"tool_calls":[{{"id":"c","type":"function","function":{{"name":"f","arguments":{arguments}}}}}]}}],"tools":[{{"type":"function","function":{{"name":"f","parameters":{parameters}}}}}]}}"#
            )
        };
        let written = |body: &str| {
            let parsed = crate::request::parse(body.as_bytes()).unwrap();
            let whole = parsed.object().is_ok_and(|chat| {
                super::super::chat_to_messages(&chat, "up", 8, Sampling::Taken).is_ok()
            });
            let in_shape =
                chat_to_messages_in_shape(parsed.members(), "up", 8, Sampling::Taken, false);
            (in_shape.is_some(), whole)
        };
        // messages, the message, its content, the part: four levels above.
        assert_eq!(written(&request(&nested(123), "{}", "1")), (true, true));
        assert_eq!(written(&request(&nested(124), "{}", "1")), (false, false));
        // tools, the tool, its function: three levels above.
        assert_eq!(written(&request("1", &nested(124), "1")), (true, true));
        assert_eq!(written(&request("1", &nested(125), "1")), (false, false));
        // The arguments are parsed on their own: one level (the object) above.
        assert_eq!(written(&request("1", "{}", &nested(126))), (true, true));
        assert_eq!(written(&request("1", "{}", &nested(127))), (false, false));
    }

    /// Text as written is blank as its unescaped text is: whitespace and escapes of it, a
    /// `\u` escape told by unescaping; anything else is not.
    #[test]
    fn blank_is_read_through_escapes() {
        for text in [
            "",
            " ",
            "\\n",
            " \\r\\n\\t\\f",
            "\\u0020",
            "\\u00a0\\n",
            "\u{a0}",
        ] {
            assert!(blank(text), "{text}");
        }
        for text in [
            "a", " a", "\\n.", "\\u0041", "\\\\", "\\\"", "\\b", "\\u0020x",
        ] {
            assert!(!blank(text), "{text}");
        }
    }
}
