//! A Messages request in the shape Anthropic's SDKs and coding agents write it, written as a
//! chat completions request straight from its text: [`messages_to_chat_in_shape`].
//!
//! The shape: turns of the user, assistant and system roles whose content is a string or
//! blocks of text, an earlier turn's thinking, the assistant's tool calls (`tool_use`) and the
//! user's tool results (`tool_result`, its content a string or text blocks); `system` as a
//! string or text blocks; custom tools; `tool_choice`; the sampling members, `stop_sequences`
//! and `metadata.user_id`. Texts are copied as the client escaped them (the contents of their
//! JSON strings, joined where the translation joins texts; only a turn's or `system`'s own
//! string, when it has escapes, is unescaped by serde and escaped again), tool descriptions
//! and schemas as the client wrote them; only a tool call's `input` is parsed into a value, to
//! become the call's `arguments` string as the translation writes it (and a strict tool's
//! schema, to tell whether OpenAI's strict mode takes it). Each value copied is checked as a
//! parse into values checks it (escapes, surrogates, numbers, nesting), so a body that parse
//! refuses is never written here. Anything else (images, server tools, a member of another
//! type than the shape's) is `None`, left to [`super::messages_to_chat`], the translation
//! that decides; a property test in `request.rs` holds the two to the same chat request.

use std::borrow::Cow;

use serde::Deserialize;
use serde::de::Error as _;
use serde_json::Value;
use serde_json::value::RawValue;

use super::as_written::{Copied, Written, from_text, member, within_limit, written};
use crate::anthropic::{Checked, Names, members, portable_tool_id, portable_tool_name, string};
use crate::request::Key;

/// [`super::messages_to_chat`] of a Messages request in the shape (see the module), written
/// from its members as the client wrote them; `None` for any other request.
pub fn messages_to_chat_in_shape<'a>(
    members: impl Iterator<Item = (&'a str, &'a RawValue)>,
    model: &str,
    limit: &str,
) -> Option<Vec<u8>> {
    let mut copied: [Option<&'a RawValue>; 5] = [None; 5];
    let (mut system, mut turns, mut user) = (None, None, None);
    let (mut tools, mut choice) = (None, None);
    let mut size = 0;
    for (key, value) in members {
        let text = value.get();
        size += text.len();
        let copy = match key {
            "max_tokens" => 0,
            "temperature" => 1,
            "top_p" => 2,
            "stream" => 3,
            "stop_sequences" => 4,
            // Read (and checked) by `request::parse`: the model is the route's.
            "model" => continue,
            "system" => {
                system = from_text::<Option<Joined<'a>>>(text)?.map(|Joined(texts)| texts);
                continue;
            }
            "messages" => {
                turns = Some(from_text::<ChatTurns<'a>>(text)?.0);
                continue;
            }
            "metadata" => {
                user = from_text::<Option<UserId<'a>>>(text)?.and_then(|UserId(user)| user);
                continue;
            }
            "tools" => {
                // OpenAI refuses an empty list: no tools is no member.
                tools = from_text::<Option<Vec<Tool<'a>>>>(text)?.filter(|t| !t.is_empty());
                continue;
            }
            // Structured output becomes `response_format`: the translation decides. Claude
            // Code sends `output_config` with `effort` alone on every request: dropped here as
            // there.
            "output_config" => {
                from_text::<Checked>(text)?;
                if from_text::<Option<OutputConfig>>(text)?.is_some_and(|c| c.format.is_some()) {
                    return None;
                }
                continue;
            }
            "output_format" if text != "null" => return None,
            "tool_choice" => {
                choice = from_text::<Option<ToolChoice<'a>>>(text)?;
                continue;
            }
            _ => {
                from_text::<Checked>(text)?;
                continue;
            }
        };
        from_text::<Checked>(text)?;
        copied[copy] = (text != "null").then_some(value);
    }
    let turns = turns?;
    if tools.is_none() {
        // OpenAI refuses a tool choice without tools.
        choice = None;
    }
    let [max_tokens, mut temperature, mut top_p, stream, mut stop] = copied;
    let reasoning = super::openai_reasoning(model, limit);
    if reasoning {
        // Its own sampling alone.
        (temperature, top_p) = (None, None);
    }
    if let Some(value) = stop {
        // Stop sequences the backend refuses are the translation's to refuse; an empty list
        // is none.
        let count = from_text::<Stops>(value.get())?.0;
        if super::stops_refused(count, model, limit).is_some() {
            return None;
        }
        if reasoning && count == 0 {
            stop = None;
        }
    }
    let mut out = Vec::with_capacity(size + 256);
    out.extend_from_slice(b"{\"model\":");
    string(&mut out, model);
    out.extend_from_slice(b",\"messages\":[");
    let mut first = true;
    if let Some(texts) = &system {
        turn_head(&mut out, &mut first, "system");
        text(&mut out, "", texts, BLANK_LINE);
        out.push(b'}');
    }
    for turn in &turns {
        turn.write(&mut out, &mut first);
    }
    out.push(b']');
    for (name, value) in [
        (limit, max_tokens),
        ("temperature", temperature),
        ("top_p", top_p),
        ("stop", stop),
        ("stream", stream),
    ] {
        if let Some(value) = value {
            member(&mut out, name);
            out.extend_from_slice(value.get().as_bytes());
        }
    }
    if let Some(user) = &user {
        member(&mut out, "user");
        string(&mut out, &super::chat_user(user));
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
    if let Some(choice) = &choice {
        member(&mut out, "tool_choice");
        match &choice.kind {
            Choice::Named(kind) => string(&mut out, kind),
            Choice::Tool(name) => {
                out.extend_from_slice(b"{\"type\":\"function\",\"function\":{\"name\":");
                string(&mut out, &portable_tool_name(Cow::Borrowed(name)));
                out.extend_from_slice(b"}}");
            }
        }
        if choice.serial {
            out.extend_from_slice(b",\"parallel_tool_calls\":false");
        }
    }
    if stream.map(RawValue::get) == Some("true") {
        out.extend_from_slice(b",\"stream_options\":{\"include_usage\":true}");
    }
    out.push(b'}');
    Some(out)
}

/// How many stop sequences `stop_sequences` holds, as the translation counts them: a list's
/// entries, one for anything else.
struct Stops(usize);

impl<'de> Deserialize<'de> for Stops {
    fn deserialize<D: serde::Deserializer<'de>>(value: D) -> Result<Self, D::Error> {
        struct Count;
        impl<'de> serde::de::Visitor<'de> for Count {
            type Value = Stops;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("stop sequences")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Stops, A::Error> {
                let mut count = 0;
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {
                    count += 1;
                }
                Ok(Stops(count))
            }
        }
        match value.deserialize_any(Count) {
            Ok(stops) => Ok(stops),
            Err(_) => Ok(Stops(1)),
        }
    }
}

/// The separator the translation joins a user's or system's texts with, as it is written
/// inside a JSON string; an assistant's texts are joined with nothing.
const BLANK_LINE: &str = "\\n\\n";

/// One JSON string of texts as written (each a JSON string's contents, escapes kept) after
/// `prefix`, joined by `separator` (itself as written inside a JSON string).
fn text(out: &mut Vec<u8>, prefix: &str, texts: &[Cow<'_, str>], separator: &str) {
    out.push(b'"');
    out.extend_from_slice(prefix.as_bytes());
    for (i, piece) in texts.iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(separator.as_bytes());
        }
        out.extend_from_slice(piece.as_bytes());
    }
    out.push(b'"');
}

/// `{"role":"…",` after a comma unless first; the content and the closing brace follow.
fn turn_head(out: &mut Vec<u8>, first: &mut bool, role: &str) {
    if !std::mem::take(first) {
        out.push(b',');
    }
    out.extend_from_slice(b"{\"role\":\"");
    out.extend_from_slice(role.as_bytes());
    out.extend_from_slice(b"\",\"content\":");
}

/// A turn's content, `system`, or a tool result's content, in the shape: a string (its
/// contents as written: escapes kept, or written anew where serde had to unescape it), or
/// blocks.
enum Content<'a> {
    Text(Cow<'a, str>),
    Blocks(Blocks<'a>),
}

/// The blocks of a content array in the shape, gathered by kind.
#[derive(Default)]
struct Blocks<'a> {
    texts: Vec<Cow<'a, str>>,
    thinking: bool,
    calls: Vec<Call<'a>>,
    results: Vec<ToolResult<'a>>,
}

/// A `tool_use` block as the chat tool call it becomes.
struct Call<'a> {
    id: Cow<'a, str>,
    name: Cow<'a, str>,
    /// The input as a parse into values writes it (`{}` when there is none).
    arguments: String,
}

/// A `tool_result` block as the `tool` message it becomes.
struct ToolResult<'a> {
    id: Cow<'a, str>,
    /// Its content's texts, as [`Content::joined`] gives them.
    texts: Vec<Cow<'a, str>>,
    error: bool,
}

impl<'a> Content<'a> {
    /// As `joined_text` makes it: the string, or the texts of blocks that are all text (to be
    /// joined with a blank line).
    fn joined(self) -> Option<Vec<Cow<'a, str>>> {
        match self {
            Self::Text(text) => Some(vec![text]),
            Self::Blocks(Blocks {
                texts,
                thinking: false,
                calls,
                results,
            }) if calls.is_empty() && results.is_empty() => Some(texts),
            Self::Blocks(_) => None,
        }
    }
}

/// A turn's content and `system` are read in place: a string's contents as written when it
/// has no escapes (serde hands over the text itself), else written anew from what serde
/// unescaped; blocks as they come.
impl<'de> Deserialize<'de> for Content<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(value: D) -> Result<Self, D::Error> {
        struct Either;
        impl<'de> serde::de::Visitor<'de> for Either {
            type Value = Content<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string or content blocks")
            }
            fn visit_borrowed_str<E>(self, text: &'de str) -> Result<Content<'de>, E> {
                Ok(Content::Text(Cow::Borrowed(text)))
            }
            fn visit_str<E>(self, text: &str) -> Result<Content<'de>, E> {
                // Escaped again as serde writes it, less the quotes.
                let mut written = serde_json::to_string(text).unwrap_or_default();
                written.pop();
                if !written.is_empty() {
                    written.remove(0);
                }
                Ok(Content::Text(Cow::Owned(written)))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                seq: A,
            ) -> Result<Content<'de>, A::Error> {
                Blocks::read(seq).map(Content::Blocks)
            }
        }
        value.deserialize_any(Either)
    }
}

/// A tool result's content, read as written: its string copied with its escapes (the texts
/// tools return, often kilobytes of code or output, are never unescaped and escaped again);
/// text blocks read from their text again.
struct ResultContent<'a>(Content<'a>);

/// Where a tool result's content starts: four levels inside `messages` (the array, the turn,
/// its content, the block).
const RESULT_DEPTH: usize = 4;

impl<'de> Deserialize<'de> for ResultContent<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(value: D) -> Result<Self, D::Error> {
        let raw = <&'de RawValue>::deserialize(value)?;
        let text = raw.get();
        if text.starts_with('"') {
            return written(raw)
                .map(|contents| ResultContent(Content::Text(Cow::Borrowed(contents))))
                .ok_or_else(|| D::Error::custom("not a string the parse takes"));
        }
        // The blocks are read from their text again, where the nesting limit counts from the
        // array: the levels above it are counted here.
        if text.starts_with('[') && within_limit(text, RESULT_DEPTH) {
            return serde_json::from_str(text)
                .map(|blocks| ResultContent(Content::Blocks(blocks)))
                .map_err(D::Error::custom);
        }
        Err(D::Error::custom("content outside the shape"))
    }
}

impl<'de> Deserialize<'de> for Blocks<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(value: D) -> Result<Self, D::Error> {
        struct Each;
        impl<'de> serde::de::Visitor<'de> for Each {
            type Value = Blocks<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("content blocks")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                seq: A,
            ) -> Result<Blocks<'de>, A::Error> {
                Blocks::read(seq)
            }
        }
        value.deserialize_seq(Each)
    }
}

impl<'de> Blocks<'de> {
    fn read<A: serde::de::SeqAccess<'de>>(mut seq: A) -> Result<Self, A::Error> {
        let mut blocks = Blocks::default();
        while let Some(block) = seq.next_element::<Block<'de>>()? {
            match block {
                Block::Text(text) => blocks.texts.push(Cow::Borrowed(text)),
                Block::Thinking => blocks.thinking = true,
                Block::ToolUse(call) => blocks.calls.push(call),
                Block::ToolResult(result) => blocks.results.push(result),
            }
        }
        Ok(blocks)
    }
}

/// A content block in the shape: text (its `text`, `null` or missing read as empty),
/// thinking, a tool call or a tool result; any other is out of it.
enum Block<'a> {
    Text(&'a str),
    Thinking,
    ToolUse(Call<'a>),
    ToolResult(ToolResult<'a>),
}

impl<'de> Deserialize<'de> for Block<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(value: D) -> Result<Self, D::Error> {
        struct Members;
        impl<'de> serde::de::Visitor<'de> for Members {
            type Value = Block<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a content block")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Block<'de>, A::Error> {
                const NAMES: Names = Names(&[
                    "type",
                    "text",
                    "id",
                    "name",
                    "input",
                    "tool_use_id",
                    "content",
                    "is_error",
                ]);
                let (mut kind, mut text, mut id, mut name, mut input) =
                    (None, None, None, None, None);
                let (mut result_of, mut content, mut error) = (None, None, None);
                members(map, NAMES, |at, map| {
                    match at {
                        0 => kind = Some(map.next_value::<Key>()?.0),
                        1 => text = map.next_value::<Option<Written>>()?,
                        2 => id = map.next_value::<Option<Key>>()?,
                        3 => name = map.next_value::<Option<Key>>()?,
                        4 => input = Some(map.next_value::<Value>()?),
                        5 => result_of = Some(map.next_value::<Key>()?.0),
                        6 => content = map.next_value::<Option<ResultContent>>()?,
                        _ => error = map.next_value::<Option<bool>>()?,
                    }
                    Ok(())
                })?;
                match kind.as_deref() {
                    Some("text") => Ok(Block::Text(text.map_or("", |Written(text)| text))),
                    Some("thinking" | "redacted_thinking") => Ok(Block::Thinking),
                    Some("tool_use") => Ok(Block::ToolUse(Call {
                        id: portable_tool_id(id.map(|Key(id)| id).unwrap_or_default()),
                        name: name.map(|Key(name)| name).unwrap_or_default(),
                        arguments: input.map_or_else(|| "{}".to_owned(), |input| input.to_string()),
                    })),
                    Some("tool_result") => Ok(Block::ToolResult(ToolResult {
                        id: portable_tool_id(
                            result_of.ok_or_else(|| A::Error::custom("no tool_use_id"))?,
                        ),
                        texts: match content {
                            None => Vec::new(),
                            Some(ResultContent(content)) => content
                                .joined()
                                .ok_or_else(|| A::Error::custom("a result not of text"))?,
                        },
                        error: error == Some(true),
                    })),
                    _ => Err(A::Error::custom("a block outside the shape")),
                }
            }
        }
        value.deserialize_map(Members)
    }
}

/// `system` as `joined_text` makes it.
struct Joined<'a>(Vec<Cow<'a, str>>);

impl<'de> Deserialize<'de> for Joined<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(value: D) -> Result<Self, D::Error> {
        Content::deserialize(value)?
            .joined()
            .map(Joined)
            .ok_or_else(|| D::Error::custom("not text in system"))
    }
}

/// A chat message made of a Messages turn.
enum ChatTurn<'a> {
    /// A message of `role` whose content is the texts joined by `separator`, or `null` when
    /// `texts` is `None`; with the assistant's tool calls.
    Text {
        role: &'static str,
        texts: Option<Vec<Cow<'a, str>>>,
        separator: &'static str,
        calls: Vec<Call<'a>>,
    },
    Tool(ToolResult<'a>),
}

impl ChatTurn<'_> {
    fn write(&self, out: &mut Vec<u8>, first: &mut bool) {
        match self {
            ChatTurn::Text {
                role,
                texts,
                separator,
                calls,
            } => {
                turn_head(out, first, role);
                match texts {
                    Some(texts) => text(out, "", texts, separator),
                    None => out.extend_from_slice(b"null"),
                }
                if !calls.is_empty() {
                    out.extend_from_slice(b",\"tool_calls\":[");
                    for (i, call) in calls.iter().enumerate() {
                        if i > 0 {
                            out.push(b',');
                        }
                        out.extend_from_slice(b"{\"id\":");
                        string(out, &call.id);
                        out.extend_from_slice(b",\"type\":\"function\",\"function\":{\"name\":");
                        string(out, &portable_tool_name(Cow::Borrowed(&call.name)));
                        out.extend_from_slice(b",\"arguments\":");
                        string(out, &call.arguments);
                        out.extend_from_slice(b"}}");
                    }
                    out.push(b']');
                }
            }
            ChatTurn::Tool(result) => {
                turn_head(out, first, "tool");
                let prefix = if result.error { "Error: " } else { "" };
                text(out, prefix, &result.texts, BLANK_LINE);
                out.extend_from_slice(b",\"tool_call_id\":");
                string(out, &result.id);
            }
        }
        out.push(b'}');
    }
}

/// Messages turns in the shape, as `messages_turn` makes them chat messages.
struct ChatTurns<'a>(Vec<ChatTurn<'a>>);

impl<'de> Deserialize<'de> for ChatTurns<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(value: D) -> Result<Self, D::Error> {
        struct Each;
        impl<'de> serde::de::Visitor<'de> for Each {
            type Value = ChatTurns<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("turns")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<ChatTurns<'de>, A::Error> {
                let mut turns = Vec::new();
                while let Some(MessagesTurn { role, content }) = seq.next_element()? {
                    let text = |role, texts, separator| ChatTurn::Text {
                        role,
                        texts,
                        separator,
                        calls: Vec::new(),
                    };
                    match (role, content) {
                        (_, Content::Text(content)) => {
                            turns.push(text(role, Some(vec![content]), BLANK_LINE));
                        }
                        ("assistant", Content::Blocks(blocks)) => {
                            if !blocks.results.is_empty() {
                                return Err(A::Error::custom("a tool result from the assistant"));
                            }
                            // Its texts run together; no text at all is a `null` content.
                            let empty = blocks.texts.iter().all(|text| text.is_empty());
                            // Nothing at all (`[]`, or thinking alone: Anthropic takes an empty
                            // last assistant turn) is left out: OpenAI refuses an assistant
                            // message with neither content nor calls.
                            if empty && blocks.calls.is_empty() {
                                continue;
                            }
                            turns.push(ChatTurn::Text {
                                role,
                                texts: (!empty).then_some(blocks.texts),
                                separator: "",
                                calls: blocks.calls,
                            });
                        }
                        ("user", Content::Blocks(blocks)) => {
                            if blocks.thinking || !blocks.calls.is_empty() {
                                return Err(A::Error::custom("not a user's blocks"));
                            }
                            // Tool results become `tool` messages, which must follow the
                            // assistant's calls directly; the turn's texts come after them.
                            turns.extend(blocks.results.into_iter().map(ChatTurn::Tool));
                            if !blocks.texts.is_empty() {
                                turns.push(text(role, Some(blocks.texts), BLANK_LINE));
                            }
                        }
                        (_, content) => {
                            let texts = content
                                .joined()
                                .ok_or_else(|| A::Error::custom("not text in system"))?;
                            turns.push(text(role, Some(texts), BLANK_LINE));
                        }
                    }
                }
                Ok(ChatTurns(turns))
            }
        }
        value.deserialize_seq(Each)
    }
}

/// A Messages turn of a role the shape takes, with content.
struct MessagesTurn<'a> {
    role: &'static str,
    content: Content<'a>,
}

impl<'de> Deserialize<'de> for MessagesTurn<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(value: D) -> Result<Self, D::Error> {
        struct Members;
        impl<'de> serde::de::Visitor<'de> for Members {
            type Value = MessagesTurn<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a turn")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<MessagesTurn<'de>, A::Error> {
                let (mut role, mut content) = (None, None);
                members(map, Names(&["role", "content"]), |at, map| {
                    match at {
                        0 => role = Some(map.next_value::<Key>()?.0),
                        _ => content = Some(map.next_value::<Content>()?),
                    }
                    Ok(())
                })?;
                let role = match role.as_deref() {
                    Some("system") => "system",
                    Some("user") => "user",
                    Some("assistant") => "assistant",
                    _ => return Err(A::Error::custom("a role outside the shape")),
                };
                let content = content.ok_or_else(|| A::Error::custom("no content"))?;
                Ok(MessagesTurn { role, content })
            }
        }
        value.deserialize_map(Members)
    }
}

/// Whether a Messages `output_config` asks for a `format` (structured output).
#[derive(Deserialize)]
struct OutputConfig {
    #[serde(default)]
    format: Option<serde::de::IgnoredAny>,
}

/// `metadata`'s `user_id` when a string (an object without one: none).
struct UserId<'a>(Option<Cow<'a, str>>);

impl<'de> Deserialize<'de> for UserId<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(value: D) -> Result<Self, D::Error> {
        struct Members;
        impl<'de> serde::de::Visitor<'de> for Members {
            type Value = UserId<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("metadata")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<UserId<'de>, A::Error> {
                let mut user = None;
                members(map, Names(&["user_id"]), |_, map| {
                    user = map.next_value::<Option<Key>>()?.map(|Key(user)| user);
                    Ok(())
                })?;
                Ok(UserId(user))
            }
        }
        value.deserialize_map(Members)
    }
}

/// Where a tool's members are: two levels inside `tools` (the array, the tool).
const TOOL_DEPTH: usize = 2;

/// A custom tool: its name, and its description and schema as written.
struct Tool<'a> {
    name: Cow<'a, str>,
    description: Option<&'a RawValue>,
    schema: &'a RawValue,
    /// `strict: true`, and OpenAI's strict mode takes the schema.
    strict: bool,
}

impl Tool<'_> {
    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"type\":\"function\",\"function\":{\"name\":");
        string(out, &portable_tool_name(Cow::Borrowed(&self.name)));
        if let Some(description) = self.description {
            out.extend_from_slice(b",\"description\":");
            out.extend_from_slice(description.get().as_bytes());
        }
        if self.strict {
            out.extend_from_slice(b",\"strict\":true");
        }
        out.extend_from_slice(b",\"parameters\":");
        out.extend_from_slice(self.schema.get().as_bytes());
        out.extend_from_slice(b"}}");
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
                const NAMES: Names =
                    Names(&["type", "name", "description", "input_schema", "strict"]);
                let (mut kind, mut name, mut description, mut schema) = (None, None, None, None);
                let mut strict = None;
                members(map, NAMES, |at, map| {
                    match at {
                        0 => kind = map.next_value::<Option<Key>>()?,
                        1 => name = Some(map.next_value::<Key>()?.0),
                        2 => description = Some(map.next_value::<Copied<TOOL_DEPTH>>()?.0),
                        3 => schema = Some(map.next_value::<Copied<TOOL_DEPTH>>()?.0),
                        _ => strict = map.next_value::<Option<bool>>()?,
                    }
                    Ok(())
                })?;
                // Server tools (web search, code execution, …) carry a versioned `type`.
                if kind.is_some_and(|Key(kind)| kind != "custom") {
                    return Err(A::Error::custom("a server tool"));
                }
                let schema = schema.ok_or_else(|| A::Error::custom("no input_schema"))?;
                // Strict where OpenAI's strict mode takes the schema (read from its text,
                // checked already), as the translation decides.
                let strict = strict == Some(true)
                    && serde_json::from_str(schema.get())
                        .is_ok_and(|schema| super::openai_strict(&schema));
                Ok(Tool {
                    name: name.ok_or_else(|| A::Error::custom("no name"))?,
                    description: description.filter(|d| d.get() != "null"),
                    schema,
                    strict,
                })
            }
        }
        value.deserialize_map(Members)
    }
}

/// `tool_choice` as `messages_tool_choice` makes it.
struct ToolChoice<'a> {
    kind: Choice<'a>,
    /// `disable_parallel_tool_use: true`: the chat request's `parallel_tool_calls: false`.
    serial: bool,
}

enum Choice<'a> {
    /// `auto`, `required` or `none`.
    Named(&'static str),
    /// One tool, by name.
    Tool(Cow<'a, str>),
}

impl<'de> Deserialize<'de> for ToolChoice<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(value: D) -> Result<Self, D::Error> {
        struct Members;
        impl<'de> serde::de::Visitor<'de> for Members {
            type Value = ToolChoice<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("tool_choice")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<ToolChoice<'de>, A::Error> {
                const NAMES: Names = Names(&["type", "name", "disable_parallel_tool_use"]);
                let (mut kind, mut name, mut serial) = (None, None, None);
                members(map, NAMES, |at, map| {
                    match at {
                        0 => kind = Some(map.next_value::<Key>()?.0),
                        1 => name = map.next_value::<Option<Key>>()?,
                        _ => serial = map.next_value::<Option<bool>>()?,
                    }
                    Ok(())
                })?;
                let kind = match kind.as_deref() {
                    Some("auto") => Choice::Named("auto"),
                    Some("any") => Choice::Named("required"),
                    Some("none") => Choice::Named("none"),
                    Some("tool") => Choice::Tool(
                        name.map(|Key(name)| name)
                            .ok_or_else(|| A::Error::custom("no name"))?,
                    ),
                    _ => return Err(A::Error::custom("a tool_choice outside the shape")),
                };
                Ok(ToolChoice {
                    kind,
                    serial: serial == Some(true),
                })
            }
        }
        value.deserialize_map(Members)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// A tool result's blocks and a tool's schema nested as deep as the parse into values
    /// takes them are written in the shape; one level deeper they are left to that parse,
    /// which refuses them.
    #[test]
    fn values_nested_to_the_limit_are_written_in_the_shape_and_no_deeper() {
        let nested = |levels: usize| format!("{}{}", "[".repeat(levels), "]".repeat(levels));
        let request = |result: &str, schema: &str| {
            format!(
                r#"{{"model":"m","max_tokens":8,"messages":[{{"role":"assistant","content":[{{"type":"tool_use","id":"t","name":"f","input":{{}}}}]}},{{"role":"user","content":[{{"type":"tool_result","tool_use_id":"t","content":[{{"type":"text","text":"x","cache_control":{result}}}]}}]}}],"tools":[{{"name":"f","input_schema":{schema}}}]}}"#
            )
        };
        let written = |body: &str| {
            let parsed = crate::request::parse(body.as_bytes()).unwrap();
            let whole = parsed.object().is_ok();
            (
                messages_to_chat_in_shape(parsed.members(), "up", "max_tokens").is_some(),
                whole,
            )
        };
        // messages, turn, content, block, the result's content, its block: six levels above.
        assert_eq!(written(&request(&nested(121), "{}")), (true, true));
        assert_eq!(written(&request(&nested(122), "{}")), (false, false));
        // tools, the tool: two levels above.
        assert_eq!(written(&request("{}", &nested(125))), (true, true));
        assert_eq!(written(&request("{}", &nested(126))), (false, false));
    }
}
