//! Whole (non-streamed) answers, both ways: a chat completion → an Anthropic `Message`
//! ([`completion_to_message`]), and the stop reasons and usage of each API, which the other
//! way (a `Message` → a chat completion, [`super::message`]) and the streams share.

use std::borrow::Cow;

use serde_json::{Value, json};

use super::{
    Call, Checked, First, Names, Untranslatable, Usage, members, portable_tool_id, string,
};
use crate::request::Key;
use crate::usage::Tokens;

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

/// The `stop_reason` of an answer from its `finish_reason` and whether it called a tool:
/// `tool_use` when it did, for a backend may say `stop` after calls (Anthropic's clients run
/// the tools only on `tool_use`), except when it ran out of tokens (`length`), which is
/// `max_tokens` as Anthropic gives it: the last call may be cut off, and `max_tokens` is what
/// tells a client not to run it but to ask again with a larger `max_tokens`. A finish on tool
/// calls with no call written (vLLM's answer to `tool_choice: required`, what Anthropic's
/// `any` becomes, when it parsed none) is `end_turn`: Anthropic never says `tool_use` without
/// a `tool_use` block, and a client looking for the block fails.
pub fn stop_reason_of(finish_reason: Option<&str>, called: bool) -> &'static str {
    match finish_reason {
        Some("length") => "max_tokens",
        _ if called => "tool_use",
        Some("tool_calls" | "function_call") => "end_turn",
        finish_reason => finish_reason.map_or("end_turn", stop_reason),
    }
}

/// Reads an Anthropic `usage` object (a `Message`'s, or a `message_delta`'s cumulative one).
pub fn anthropic_usage(usage: &Value) -> Usage {
    figures_of(usage).usage()
}

/// The figures of an Anthropic `usage`, its `iterations` counted ([`iterated`]).
fn figures_of(usage: &Value) -> UsageFigures {
    let get = |k: &str| usage.get(k).and_then(Value::as_u64).unwrap_or(0);
    UsageFigures {
        input: get("input_tokens"),
        output: get("output_tokens"),
        cache_read: get("cache_read_input_tokens"),
        cache_creation: get("cache_creation_input_tokens"),
        cache_creation_1h: one_hour_writes(usage.get("cache_creation")),
        thinking: thinking_tokens(usage.get("output_tokens_details")),
    }
    .at_least(iterated(usage.get("iterations")))
}

/// The sum of the entries of a `usage`'s `iterations` (zeros when it is not a list).
///
/// Anthropic bills every sampling step of a request and, when there were several, lists each
/// in `iterations`; the top-level figures leave some out: a server-side compaction's step
/// ("to calculate total tokens consumed and billed for a request, sum across all entries in
/// the usage.iterations array"), an advisor model consulted, and with an on-demand
/// compaction they are zeros. A request's figures are each the top level's or the
/// iterations' sum, the larger (the top level counts the message's own steps, which the sum
/// holds too). An advisor's tokens are priced at the request's route, not at its model's.
pub(super) fn iterated(iterations: Option<&Value>) -> UsageFigures {
    iterations
        .and_then(Value::as_array)
        .map_or_else(UsageFigures::default, |entries| {
            entries
                .iter()
                .map(figures_of)
                .fold(UsageFigures::default(), UsageFigures::plus)
        })
}

/// The 1-hour cache writes of an Anthropic `usage`'s `cache_creation` breakdown (0 when it is
/// missing, not an object, or its figure not an unsigned integer).
pub(super) fn one_hour_writes(cache_creation: Option<&Value>) -> u64 {
    count_of::<OneHour>(cache_creation)
}

/// The thinking of an Anthropic `usage`'s `output_tokens_details` (part of `output_tokens`;
/// 0 as [`one_hour_writes`] reads its figure).
pub(super) fn thinking_tokens(output_details: Option<&Value>) -> u64 {
    count_of::<Thinking>(output_details)
}

/// `K`'s figure in an object (0 when it is missing, not an object, or the figure not an
/// unsigned integer).
fn count_of<K: CountKey>(object: Option<&Value>) -> u64 {
    object
        .and_then(|o| o.get(K::KEY))
        .and_then(Value::as_u64)
        .unwrap_or(0)
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

/// The figures of an Anthropic `usage`, as written.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct UsageFigures {
    pub(super) input: u64,
    pub(super) output: u64,
    pub(super) cache_read: u64,
    pub(super) cache_creation: u64,
    /// `cache_creation.ephemeral_1h_input_tokens`.
    pub(super) cache_creation_1h: u64,
    /// `output_tokens_details.thinking_tokens`.
    pub(super) thinking: u64,
}

impl UsageFigures {
    fn plus(self, other: Self) -> Self {
        Self {
            input: self.input.saturating_add(other.input),
            output: self.output.saturating_add(other.output),
            cache_read: self.cache_read.saturating_add(other.cache_read),
            cache_creation: self.cache_creation.saturating_add(other.cache_creation),
            cache_creation_1h: self
                .cache_creation_1h
                .saturating_add(other.cache_creation_1h),
            thinking: self.thinking.saturating_add(other.thinking),
        }
    }

    /// Each figure, at least `other`'s.
    pub(super) fn at_least(self, other: Self) -> Self {
        Self {
            input: self.input.max(other.input),
            output: self.output.max(other.output),
            cache_read: self.cache_read.max(other.cache_read),
            cache_creation: self.cache_creation.max(other.cache_creation),
            cache_creation_1h: self.cache_creation_1h.max(other.cache_creation_1h),
            thinking: self.thinking.max(other.thinking),
        }
    }

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
            // Part of the writes: never more than they are.
            cache_creation_1h: self.cache_creation_1h.min(self.cache_creation),
            // Part of the output, as well.
            reasoning: self.thinking.min(self.output),
            unshown: 0,
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
    /// `cache_creation`, the writes by cache lifetime.
    CacheCreationByTtl,
    /// `iterations`, each sampling step's figures ([`iterated`]).
    Iterations,
    /// `output_tokens_details`, the output by kind.
    OutputDetails,
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
                    "cache_creation" => FigureName::CacheCreationByTtl,
                    "iterations" => FigureName::Iterations,
                    "output_tokens_details" => FigureName::OutputDetails,
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
    fn list<'de, A: serde::de::SeqAccess<'de>>(mut seq: A) -> Result<Self, A::Error> {
        while seq.next_element::<Checked>()?.is_some() {}
        Ok(Self::default())
    }
}

impl LenientKind for UsageFigures {
    fn object<'de, A: serde::de::MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        let mut figures = Self::default();
        let mut iterations = Self::default();
        while let Some(name) = map.next_key::<FigureName>()? {
            let figure = match name {
                FigureName::Input => &mut figures.input,
                FigureName::Output => &mut figures.output,
                FigureName::CacheRead => &mut figures.cache_read,
                FigureName::CacheCreation => &mut figures.cache_creation,
                FigureName::CacheCreationByTtl => {
                    figures.cache_creation_1h = map.next_value::<CountAt<OneHour>>()?.0;
                    continue;
                }
                FigureName::OutputDetails => {
                    figures.thinking = map.next_value::<CountAt<Thinking>>()?.0;
                    continue;
                }
                FigureName::Iterations => {
                    iterations = map.next_value::<Iterations>()?.0;
                    continue;
                }
                FigureName::Other => {
                    map.next_value::<Checked>()?;
                    continue;
                }
            };
            *figure = map.next_value::<Count>()?.0;
        }
        Ok(figures.at_least(iterations))
    }
}

/// A `usage`'s `iterations` read as [`iterated`] reads the parsed value: the sum of a list's
/// entries, each read as a `usage`; zeros for anything else.
#[derive(Default)]
struct Iterations(UsageFigures);

impl<'de> serde::Deserialize<'de> for Iterations {
    fn deserialize<D: serde::Deserializer<'de>>(value: D) -> Result<Self, D::Error> {
        value.deserialize_any(Lenient::<Iterations>::default())
    }
}

impl LenientKind for Iterations {
    fn list<'de, A: serde::de::SeqAccess<'de>>(mut seq: A) -> Result<Self, A::Error> {
        let mut sum = UsageFigures::default();
        while let Some(entry) = seq.next_element::<UsageFigures>()? {
            sum = sum.plus(entry);
        }
        Ok(Self(sum))
    }
}

impl LenientKind for Count {
    fn unsigned(count: u64) -> Self {
        Self(count)
    }
}

/// The key of a figure read from an object of a `usage` ([`CountAt`], [`count_of`]).
trait CountKey {
    const KEY: &'static str;
}

/// `cache_creation`'s 1-hour writes.
struct OneHour;

impl CountKey for OneHour {
    const KEY: &'static str = "ephemeral_1h_input_tokens";
}

/// `output_tokens_details`' thinking.
struct Thinking;

impl CountKey for Thinking {
    const KEY: &'static str = "thinking_tokens";
}

/// An object of a `usage` read for its `K` figure, as [`count_of`] reads the parsed value
/// (an object's last such key, 0 for anything else).
struct CountAt<K>(u64, std::marker::PhantomData<K>);

impl<K> Default for CountAt<K> {
    fn default() -> Self {
        Self(0, std::marker::PhantomData)
    }
}

impl<'de, K: CountKey> serde::Deserialize<'de> for CountAt<K> {
    fn deserialize<D: serde::Deserializer<'de>>(value: D) -> Result<Self, D::Error> {
        value.deserialize_any(Lenient::<CountAt<K>>::default())
    }
}

impl<K: CountKey> LenientKind for CountAt<K> {
    fn object<'de, A: serde::de::MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        let mut count = Self::default();
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if key == K::KEY {
                count.0 = map.next_value::<Count>()?.0;
            } else {
                map.next_value::<Checked>()?;
            }
        }
        Ok(count)
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
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<T, A::Error> {
        T::list(seq)
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

/// Reads an OpenAI `usage` object, as other providers write it too ([`Tokens::openai`]).
pub fn openai_usage(usage: &Value) -> Usage {
    let get = |at: &str| usage.pointer(at).and_then(Value::as_u64).unwrap_or(0);
    usage_of_openai_figures(OpenAiFigureValues {
        prompt: get("/prompt_tokens"),
        completion: get("/completion_tokens"),
        cached: get("/prompt_tokens_details/cached_tokens"),
        cache_write: get("/prompt_tokens_details/cache_write_tokens"),
        reasoning: get("/completion_tokens_details/reasoning_tokens"),
        total: get("/total_tokens"),
        cache_hit: get("/prompt_cache_hit_tokens").max(get("/cached_tokens")),
    })
}

/// An OpenAI `usage`'s figures (0 for any missing), as [`Tokens::openai`] takes them; the
/// cache hits are DeepSeek's or Moonshot's.
#[derive(Default)]
struct OpenAiFigureValues {
    prompt: u64,
    completion: u64,
    cached: u64,
    cache_write: u64,
    reasoning: u64,
    total: u64,
    cache_hit: u64,
}

/// The usage of an OpenAI `usage`'s figures: [`Tokens::openai`]'s rules for providers that
/// write them otherwise than OpenAI.
fn usage_of_openai_figures(figures: OpenAiFigureValues) -> Usage {
    let tokens = Tokens::openai(
        figures.prompt,
        figures.completion,
        figures.cached,
        figures.reasoning,
        Some(figures.total),
        Some(figures.cache_hit),
        figures.cache_write,
    );
    Usage {
        input: tokens.prompt,
        output: tokens.completion,
        cache_read: tokens.cached_prompt,
        cache_creation: tokens.cache_write,
        cache_creation_1h: 0,
        reasoning: tokens.reasoning,
        unshown: tokens.unshown,
    }
}

/// OpenAI's `usage` for these counts. The cache write is counted in `prompt_tokens` and also
/// given as `prompt_tokens_details.cache_write_tokens`, OpenAI's own name for it.
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
    cache_write_tokens: u64,
}

impl From<Usage> for OpenAiUsage {
    fn from(usage: Usage) -> Self {
        Self {
            prompt_tokens: usage.input,
            completion_tokens: usage.output,
            total_tokens: usage.input.saturating_add(usage.output),
            prompt_tokens_details: PromptDetails {
                cached_tokens: usage.cache_read,
                cache_write_tokens: usage.cache_creation,
            },
        }
    }
}

/// Anthropic's `usage` for these counts (`input_tokens` excludes the cached ones).
pub fn anthropic_usage_value(usage: Usage) -> Value {
    json!({
        "input_tokens": usage.input.saturating_sub(usage.cache_read.saturating_add(usage.cache_creation)),
        "output_tokens": usage.output,
        "cache_read_input_tokens": usage.cache_read,
        "cache_creation_input_tokens": usage.cache_creation,
    })
}

/// A chat completion → an Anthropic `Message`: its first choice's text, then one `tool_use`
/// block per tool call. Arguments that are not a JSON object make the answer untranslatable
/// (the client gets a 502: the backend, not the client, is at fault), except in the last call
/// of an answer cut off by its token limit (`finish_reason: length`): those were cut off
/// mid-way, and the call is left out ([`cut_off`]).
pub fn completion_to_message(completion: &Value) -> Result<Value, Untranslatable> {
    let choice = completion.pointer("/choices/0");
    let reply = choice.and_then(|c| c.get("message"));
    let mut content = Vec::new();
    // Empty content is none: a refusal beside it is the answer (as a stream's would be).
    let said = reply
        .and_then(|m| m.get("content"))
        .and_then(content_text)
        .filter(|text| !text.is_empty());
    let refusal = reply
        .and_then(|m| m.get("refusal"))
        .and_then(Value::as_str)
        .filter(|refusal| !refusal.is_empty());
    // The model refused (OpenAI's structured outputs: `refusal` with `finish_reason: stop`).
    let refused = said.is_none() && refusal.is_some();
    let text = said
        .or_else(|| refusal.map(Cow::Borrowed))
        .unwrap_or_default();
    if !text.is_empty() {
        content.push(json!({"type": "text", "text": text}));
    }
    let calls = reply
        .and_then(|m| m.get("tool_calls"))
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let finish = choice
        .and_then(|c| c.get("finish_reason"))
        .and_then(Value::as_str);
    for (k, call) in calls.iter().enumerate() {
        let function = call.get("function");
        let (input, whole) = match function.and_then(|f| f.get("arguments")) {
            Some(Value::String(arguments)) => {
                let input = tool_input(arguments, k);
                let whole = input.is_ok() && !arguments.trim().is_empty();
                (input, whole)
            }
            // Written as the object itself, as some servers do.
            Some(object @ Value::Object(_)) => (Ok(object.clone()), true),
            None | Some(Value::Null) => (tool_input("", k), false),
            Some(_) => (tool_input("[]", k), false),
        };
        if cut_off(finish, k + 1 == calls.len(), whole) {
            continue;
        }
        content.push(json!({
            "type": "tool_use",
            "id": backend_tool_id(call).map_or_else(
                || fresh_id("toolu_"),
                |id| portable_tool_id(id.into()).into_owned()
            ),
            "name": function.and_then(|f| f.get("name")).cloned().unwrap_or(Value::Null),
            "input": input?,
        }));
    }
    let stop = match refused && calls.is_empty() {
        true => "refusal",
        false => stop_reason_of(finish, !calls.is_empty()),
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

/// Whether a tool call is one the backend stopped writing mid-way, and is left out of the
/// message: the last call of an answer cut off by its token limit (`finish_reason: length`),
/// when its arguments are not a whole JSON object (`whole`: blank, or the start of one). The
/// text and the calls before it, which the model finished, are kept, and `stop_reason` is
/// `max_tokens` ([`stop_reason_of`]).
///
/// Why not the block with `input: {}` (a whole `Message`'s `tool_use` must have an object):
/// a client that runs every `tool_use` it is given without looking at `stop_reason` would
/// then run the tool with none of the arguments the model meant, or with defaults in their
/// place, and a `{}` looks like a call that needs no arguments. Without the block, the worst
/// such a client does is take the answer for a turn without a call; one that reads
/// `max_tokens` asks again with a larger limit, as Anthropic's documentation tells it to.
/// (A stream cannot do this: the block was sent before its end was known, and `max_tokens`
/// alone tells the client.)
fn cut_off(finish_reason: Option<&str>, last: bool, whole: bool) -> bool {
    finish_reason == Some("length") && last && !whole
}

/// [`completion_to_message`] of a completion's text, written without trees of values when it
/// is in the shape OpenAI-format backends write one: its first choice's `message.content` (or
/// `refusal`), `tool_calls` and `finish_reason`, `id`, `model` and `usage` read (`usage` as
/// [`openai_usage`] reads it), every other member checked as a parse into values checks it and
/// passed over. A call's id and name are strings, and its arguments, the JSON text of an object
/// inside their string, are copied as the backend wrote them as the block's `input` ([`Call`]).
/// `None` for any other completion (a member of another type than that shape's, arguments that
/// are not an object, text that is not a completion), which is then parsed whole; a property
/// test holds the two to the same message (the same bytes, but for a call's input, which the
/// parse writes anew).
pub fn completion_to_message_in_shape(text: &str) -> Option<Vec<u8>> {
    let Completion {
        id,
        model,
        reply: Reply {
            text: reply,
            refused,
            calls,
        },
        finish,
        usage,
    } = serde_json::from_str(text).ok()?;
    // Cut off by the token limit: the last call's arguments may be blank because they were
    // cut (which [`Call`] cannot tell from blank ones), so the whole parse decides which calls
    // stay ([`cut_off`]); a rare answer.
    if finish.as_deref() == Some("length") && !calls.is_empty() {
        return None;
    }
    // Ids the backend left out are made fresh by the whole parse, which the property test
    // cannot compare byte for byte; an answer without them is rare.
    let message = backend_message_id(id.as_deref().unwrap_or(""))?;
    if calls.iter().any(|call| call.id.is_empty()) {
        return None;
    }
    let mut out = Vec::with_capacity(text.len() + 128);
    out.extend_from_slice(b"{\"content\":[");
    let reply = reply.filter(|t| !t.is_empty());
    if let Some(reply) = &reply {
        out.extend_from_slice(b"{\"text\":");
        string(&mut out, reply);
        out.extend_from_slice(b",\"type\":\"text\"}");
    }
    for (k, Call { id, name, input }) in calls.iter().enumerate() {
        if k > 0 || reply.is_some() {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"id\":");
        string(&mut out, id);
        out.extend_from_slice(b",\"input\":");
        out.extend_from_slice(input.as_bytes());
        out.extend_from_slice(b",\"name\":");
        string(&mut out, name);
        out.extend_from_slice(b",\"type\":\"tool_use\"}");
    }
    out.extend_from_slice(b"],\"id\":");
    string(&mut out, &message);
    out.extend_from_slice(b",\"model\":");
    match &model {
        Some(model) => string(&mut out, model),
        None => out.extend_from_slice(b"null"),
    }
    let stop = match refused && calls.is_empty() {
        true => "refusal",
        false => stop_reason_of(finish.as_deref(), !calls.is_empty()),
    };
    out.extend_from_slice(b",\"role\":\"assistant\",\"stop_reason\":\"");
    out.extend_from_slice(stop.as_bytes());
    out.extend_from_slice(b"\",\"stop_sequence\":null,\"type\":\"message\",\"usage\":");
    // Keys in the sorted order of `Value`'s map, as `anthropic_usage_value` gives them.
    for (key, figure) in [
        (
            &b"{\"cache_creation_input_tokens\":"[..],
            usage.cache_creation,
        ),
        (b",\"cache_read_input_tokens\":", usage.cache_read),
        (
            b",\"input_tokens\":",
            usage
                .input
                .saturating_sub(usage.cache_read.saturating_add(usage.cache_creation)),
        ),
        (b",\"output_tokens\":", usage.output),
    ] {
        out.extend_from_slice(key);
        // A u64 into a Vec<u8>: cannot fail.
        let _ = serde_json::to_writer(&mut out, &figure);
    }
    out.extend_from_slice(b"}}");
    Some(out)
}

/// What [`completion_to_message_in_shape`] reads of a completion.
#[derive(Default)]
struct Completion<'a> {
    id: Option<Cow<'a, str>>,
    model: Option<Cow<'a, str>>,
    reply: Reply<'a>,
    finish: Option<Cow<'a, str>>,
    usage: Usage,
}

/// What the first choice's `message` says: its `content`, else its `refusal` (`refused`: a
/// refusal with no content), and its calls.
#[derive(Default)]
struct Reply<'a> {
    text: Option<Cow<'a, str>>,
    refused: bool,
    calls: Vec<Call<'a>>,
}

impl<'de> serde::Deserialize<'de> for Completion<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(value: D) -> Result<Self, D::Error> {
        const COMPLETION: Names = Names(&["id", "model", "choices", "usage"]);
        const CHOICE: Names = Names(&["message", "finish_reason"]);
        fn key<'de, A: serde::de::MapAccess<'de>>(
            map: &mut A,
        ) -> Result<Option<Cow<'de, str>>, A::Error> {
            Ok(map.next_value::<Option<Key<'de>>>()?.map(|Key(text)| text))
        }
        struct Members;
        impl<'de> serde::de::Visitor<'de> for Members {
            type Value = Completion<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a chat completion")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Completion<'de>, A::Error> {
                let mut read = Completion::default();
                let mut choices = false;
                members(map, COMPLETION, |at, map| {
                    match at {
                        0 => read.id = key(map)?,
                        1 => read.model = key(map)?,
                        2 => {
                            (read.reply, read.finish) =
                                map.next_value_seed(First(Choice))?.unwrap_or_default();
                            choices = true;
                        }
                        _ => read.usage = map.next_value::<OpenAiFigures>()?.0,
                    }
                    Ok(())
                })?;
                if !choices {
                    return Err(serde::de::Error::custom("no choices"));
                }
                Ok(read)
            }
        }
        struct Choice;
        impl<'de> serde::de::DeserializeSeed<'de> for Choice {
            type Value = (Reply<'de>, Option<Cow<'de, str>>);
            fn deserialize<D: serde::Deserializer<'de>>(
                self,
                value: D,
            ) -> Result<Self::Value, D::Error> {
                value.deserialize_map(self)
            }
        }
        impl<'de> serde::de::Visitor<'de> for Choice {
            type Value = (Reply<'de>, Option<Cow<'de, str>>);
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a choice")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Self::Value, A::Error> {
                let (mut reply, mut finish) = (Reply::default(), None);
                members(map, CHOICE, |at, map| {
                    match at {
                        0 => reply = map.next_value::<Option<Reply>>()?.unwrap_or_default(),
                        _ => finish = key(map)?,
                    }
                    Ok(())
                })?;
                Ok((reply, finish))
            }
        }
        value.deserialize_map(Members)
    }
}

impl<'de> serde::Deserialize<'de> for Reply<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(value: D) -> Result<Self, D::Error> {
        const MESSAGE: Names = Names(&["content", "refusal", "tool_calls"]);
        struct Members;
        impl<'de> serde::de::Visitor<'de> for Members {
            type Value = Reply<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a message")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Reply<'de>, A::Error> {
                let (mut content, mut refusal, mut calls) = (None, None, None);
                members(map, MESSAGE, |at, map| {
                    match at {
                        0 => content = map.next_value::<Option<Key>>()?,
                        1 => refusal = map.next_value::<Option<Key>>()?,
                        _ => calls = map.next_value::<Option<Vec<Call>>>()?,
                    }
                    Ok(())
                })?;
                let refusal = refusal.filter(|Key(refusal)| !refusal.is_empty());
                let content = content.filter(|Key(content)| !content.is_empty());
                Ok(Reply {
                    refused: content.is_none() && refusal.is_some(),
                    text: content.or(refusal).map(|Key(text)| text),
                    calls: calls.unwrap_or_default(),
                })
            }
        }
        value.deserialize_map(Members)
    }
}

/// An OpenAI `usage` read as [`openai_usage`] reads its value (any figure that is not an
/// unsigned integer, or any `usage` that is not an object, is 0), without building the value.
#[derive(Default)]
struct OpenAiFigures(Usage);

impl<'de> serde::Deserialize<'de> for OpenAiFigures {
    fn deserialize<D: serde::Deserializer<'de>>(value: D) -> Result<Self, D::Error> {
        value.deserialize_any(Lenient::<OpenAiFigures>::default())
    }
}

impl LenientKind for OpenAiFigures {
    fn object<'de, A: serde::de::MapAccess<'de>>(map: A) -> Result<Self, A::Error> {
        const NAMES: Names = Names(&[
            "prompt_tokens",
            "completion_tokens",
            "prompt_tokens_details",
            "completion_tokens_details",
            "total_tokens",
            "prompt_cache_hit_tokens",
            "cached_tokens",
        ]);
        let mut figures = [0u64; 7];
        let mut cache_write = 0;
        members(map, NAMES, |at, map| {
            figures[at] = match at {
                2 => {
                    let [cached, written] = map.next_value::<DetailsFigures<CachedNames>>()?.0;
                    cache_write = written;
                    cached
                }
                3 => map.next_value::<DetailsFigures<ReasoningName>>()?.0[0],
                _ => map.next_value::<Count>()?.0,
            };
            Ok(())
        })?;
        let [
            prompt,
            completion,
            cached,
            reasoning,
            total,
            deepseek_hit,
            kimi_hit,
        ] = figures;
        Ok(Self(usage_of_openai_figures(OpenAiFigureValues {
            prompt,
            completion,
            cached,
            cache_write,
            reasoning,
            total,
            cache_hit: deepseek_hit.max(kimi_hit),
        })))
    }
}

/// The figures of a details object that are read (`N`'s names: `prompt_tokens_details`'s
/// `cached_tokens` and `cache_write_tokens`, `completion_tokens_details`'s
/// `reasoning_tokens`), leniently as [`OpenAiFigures`] are.
struct DetailsFigures<N>([u64; 2], std::marker::PhantomData<N>);

impl<N> Default for DetailsFigures<N> {
    fn default() -> Self {
        Self([0; 2], std::marker::PhantomData)
    }
}

/// The names of the figures a [`DetailsFigures`] reads (two at most).
trait DetailsName {
    const NAMES: Names;
}

struct CachedNames;
impl DetailsName for CachedNames {
    const NAMES: Names = Names(&["cached_tokens", "cache_write_tokens"]);
}

struct ReasoningName;
impl DetailsName for ReasoningName {
    const NAMES: Names = Names(&["reasoning_tokens"]);
}

impl<'de, N: DetailsName> serde::Deserialize<'de> for DetailsFigures<N> {
    fn deserialize<D: serde::Deserializer<'de>>(value: D) -> Result<Self, D::Error> {
        value.deserialize_any(Lenient::<DetailsFigures<N>>::default())
    }
}

impl<N: DetailsName> LenientKind for DetailsFigures<N> {
    fn object<'de, A: serde::de::MapAccess<'de>>(map: A) -> Result<Self, A::Error> {
        let mut figures = [0; 2];
        members(map, N::NAMES, |at, map| {
            figures[at] = map.next_value::<Count>()?.0;
            Ok(())
        })?;
        Ok(Self(figures, std::marker::PhantomData))
    }
}

/// The text of a chat message's (or delta's) `content`: a string, or a list of parts whose
/// `text` parts are joined, as Mistral's reasoning models write it
/// (`[{"type":"thinking",…},{"type":"text","text":"…"}]`: its thinking is left out, as other
/// servers' `reasoning_content` is). `None` for anything else.
pub(crate) fn content_text(content: &Value) -> Option<Cow<'_, str>> {
    match content {
        Value::String(text) => Some(Cow::Borrowed(text)),
        Value::Array(parts) => Some(Cow::Owned(
            parts
                .iter()
                .filter(|part| part.get("type").and_then(Value::as_str) == Some("text"))
                .filter_map(|part| part.get("text").and_then(Value::as_str))
                .collect(),
        )),
        _ => None,
    }
}

/// A chat completion's id as a Message id (`msg_…`, as Anthropic clients expect); a fresh one
/// when the backend gave none ([`backend_message_id`]).
pub fn message_id(chat_id: &str) -> String {
    backend_message_id(chat_id).unwrap_or_else(|| fresh_id("msg_"))
}

/// A chat completion's id as a Message id, `None` when it is empty (some OpenAI-compatible
/// servers write `""`, or no `id` at all).
fn backend_message_id(chat_id: &str) -> Option<String> {
    let bare = chat_id.strip_prefix("chatcmpl-").unwrap_or(chat_id);
    (!bare.is_empty()).then(|| format!("msg_{bare}"))
}

/// A call's id as the backend wrote it, when it wrote one (a string, not empty).
fn backend_tool_id(call: &Value) -> Option<&str> {
    call.get("id")
        .and_then(Value::as_str)
        .filter(|id| !id.is_empty())
}

/// An id of Sluice's for a message or `tool_use` block the backend wrote none for: `prefix`
/// (`msg_`, `toolu_`) and 32 random hex digits. Unique, not derived from the call's place in
/// the answer: a client sends every `tool_use` of a conversation back in later turns, and
/// Anthropic refuses a conversation in which two of them share an id ("tool_use ids must be
/// unique"), which `toolu_0` in every turn would make the moment a later turn went to an
/// Anthropic backend.
pub fn fresh_id(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::new_v4().simple())
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
    use crate::anthropic::request::tests::{deep, tool_call};
    use proptest::prelude::*;

    /// `tool_use` only with a `tool_use` block: vLLM finishes on `tool_calls` with none when
    /// `tool_choice: required` parsed no call.
    #[test]
    fn a_finish_on_tool_calls_without_a_call_is_the_end_of_the_turn() {
        for body in [
            json!({"id": "c", "model": "m", "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi", "tool_calls": []}, "finish_reason": "tool_calls"}]}),
            json!({"id": "c", "model": "m", "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "tool_calls"}]}),
        ] {
            let message = completion_to_message(&body).unwrap();
            assert_eq!(message["stop_reason"], "end_turn", "{body}");
            assert_eq!(message["content"], json!([{"type": "text", "text": "hi"}]));
        }
        assert_eq!(stop_reason_of(Some("tool_calls"), true), "tool_use");
        assert_eq!(stop_reason_of(Some("stop"), true), "tool_use");
        assert_eq!(stop_reason_of(Some("length"), true), "max_tokens");
    }

    /// A refusal with no content (OpenAI's structured outputs: `finish_reason: stop`) ends the
    /// turn as Anthropic's does, `refusal`, whole or read in its shape; a refusal beside
    /// content is not one.
    #[test]
    fn a_refusal_ends_the_turn_as_a_refusal() {
        let refused = r#"{"id":"chatcmpl-9","object":"chat.completion","created":1,"model":"gpt-4o","choices":[{"index":0,"message":{"role":"assistant","content":null,"refusal":"I can't help with that."},"finish_reason":"stop"}]}"#;
        let message = completion_to_message(&serde_json::from_str(refused).unwrap()).unwrap();
        assert_eq!(message["stop_reason"], "refusal");
        assert_eq!(
            message["content"],
            json!([{"type": "text", "text": "I can't help with that."}])
        );
        let in_shape: Value =
            serde_json::from_slice(&completion_to_message_in_shape(refused).unwrap()).unwrap();
        assert_eq!(in_shape, message);
        // Empty content is no content: the refusal is the answer.
        let empty = refused.replace(r#""content":null"#, r#""content":"""#);
        let message = completion_to_message(&serde_json::from_str(&empty).unwrap()).unwrap();
        assert_eq!(message["stop_reason"], "refusal");
        let in_shape: Value =
            serde_json::from_slice(&completion_to_message_in_shape(&empty).unwrap()).unwrap();
        assert_eq!(in_shape, message);
        let answered = refused.replace(r#""content":null"#, r#""content":"Sure.""#);
        let message = completion_to_message(&serde_json::from_str(&answered).unwrap()).unwrap();
        assert_eq!(message["stop_reason"], "end_turn");
    }

    /// Arguments written as the object itself, as some servers write them, are the block's
    /// input, not `{}`; any other value that is not a string is refused.
    #[test]
    fn arguments_written_as_an_object_are_the_input() {
        let call = |arguments: Value| {
            json!({"id": "c", "model": "m", "choices": [{"index": 0, "message": {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "Read", "arguments": arguments}}
            ]}, "finish_reason": "tool_calls"}]})
        };
        let message = completion_to_message(&call(json!({"path": "a.txt"}))).unwrap();
        assert_eq!(message["content"][0]["input"], json!({"path": "a.txt"}));
        assert_eq!(message["stop_reason"], "tool_use");
        assert!(completion_to_message(&call(json!([1]))).is_err());
        assert_eq!(
            completion_to_message(&call(Value::Null)).unwrap()["content"][0]["input"],
            json!({})
        );
    }

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
            // What `cache_creation` holds, and what of it is read as no 1-hour writes.
            "{\"ephemeral_1h_input_tokens\":40,\"ephemeral_5m_input_tokens\":3}",
            "{\"ephemeral\\u005f1h_input_tokens\":12}",
            "{\"ephemeral_1h_input_tokens\":5,\"ephemeral_1h_input_tokens\":1e2}",
            "{\"ephemeral_1h_input_tokens\":{\"a\":[1]}}",
            // What `iterations` holds, and near it.
            "[{\"type\":\"compaction\",\"input_tokens\":180000,\"output_tokens\":3500},{\"type\":\"message\",\"input_tokens\":23,\"output_tokens\":10,\"cache_read_input_tokens\":4}]",
            "[]",
            "[1,{\"output_tokens\":3},null,[2]]",
            "[{\"iterations\":[{\"input_tokens\":7}]}]",
            "[{\"cache_creation_input_tokens\":9,\"cache_creation\":{\"ephemeral_1h_input_tokens\":9}}]",
            // What `output_tokens_details` holds.
            "{\"thinking_tokens\":34}",
            "{\"thinking_tokens\":\"34\",\"thinking_tokens\":5}",
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
            "iterations",
            "output_tokens_details",
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

    /// The 1-hour cache's writes are read from `cache_creation`, whole or streamed, and are
    /// never more than the writes.
    #[test]
    fn one_hour_cache_writes_are_read_from_the_breakdown() {
        let usage = r#"{"input_tokens":2,"cache_creation_input_tokens":50,"cache_read_input_tokens":0,"cache_creation":{"ephemeral_5m_input_tokens":10,"ephemeral_1h_input_tokens":40},"output_tokens":5}"#;
        let read = anthropic_usage_in(usage.as_bytes()).unwrap();
        assert_eq!((read.cache_creation, read.cache_creation_1h), (50, 40));
        assert_eq!(read, anthropic_usage(&serde_json::from_str(usage).unwrap()));
        let confused = r#"{"cache_creation_input_tokens":5,"cache_creation":{"ephemeral_1h_input_tokens":40}}"#;
        assert_eq!(
            anthropic_usage_in(confused.as_bytes())
                .unwrap()
                .cache_creation_1h,
            5
        );
    }

    /// A request's steps listed in `iterations` are all billed: a server-side compaction's,
    /// which the top-level figures leave out, and an on-demand compaction's, with zeros at
    /// the top level. The message's own steps, in both, count once.
    #[test]
    fn every_iteration_of_a_request_is_counted() {
        // Anthropic's documented answer of a request that compacted.
        let compacted = r#"{"input_tokens":23000,"output_tokens":1000,"iterations":[{"type":"compaction","input_tokens":180000,"output_tokens":3500},{"type":"message","input_tokens":23000,"output_tokens":1000}]}"#;
        let read = anthropic_usage_in(compacted.as_bytes()).unwrap();
        assert_eq!((read.input, read.output), (203_000, 4_500));
        assert_eq!(
            read,
            anthropic_usage(&serde_json::from_str(compacted).unwrap())
        );
        let on_demand = r#"{"input_tokens":0,"output_tokens":0,"iterations":[{"type":"compaction","input_tokens":5000,"cache_read_input_tokens":1000,"output_tokens":700}]}"#;
        let read = anthropic_usage_in(on_demand.as_bytes()).unwrap();
        assert_eq!(
            (read.input, read.cache_read, read.output),
            (6_000, 1_000, 700)
        );
        // Without iterations, as before.
        let plain = r#"{"input_tokens":23,"output_tokens":10}"#;
        let read = anthropic_usage_in(plain.as_bytes()).unwrap();
        assert_eq!((read.input, read.output), (23, 10));
    }

    /// Claude's thinking, part of its output (`output_tokens_details.thinking_tokens`), is its
    /// reasoning, never more than the output.
    #[test]
    fn claudes_thinking_is_read_as_its_reasoning() {
        for (usage, reasoning) in [
            (
                r#"{"input_tokens":3,"output_tokens":41,"output_tokens_details":{"thinking_tokens":34}}"#,
                34,
            ),
            (
                r#"{"output_tokens":4,"output_tokens_details":{"thinking_tokens":34}}"#,
                4,
            ),
            (r#"{"output_tokens":41}"#, 0),
        ] {
            let read = anthropic_usage_in(usage.as_bytes()).unwrap();
            assert_eq!(read.reasoning, reasoning, "{usage}");
            assert_eq!(read, anthropic_usage(&serde_json::from_str(usage).unwrap()));
        }
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

    /// What the whole parse makes of a completion's text (as the relay does it).
    fn message_parsed_whole(text: &str) -> Option<Vec<u8>> {
        let completion: Value = serde_json::from_str(text).ok()?;
        completion.get("choices").filter(|c| c.is_array())?;
        Some(
            completion_to_message(&completion)
                .ok()?
                .to_string()
                .into_bytes(),
        )
    }

    fn string() -> impl Strategy<Value = String> {
        prop_oneof![
            6 => any::<String>().prop_map(|s| serde_json::to_string(&s).unwrap()),
            1 => Just("\"\"".to_owned()),
            1 => Just("\"chatcmpl-\\u0041\"".to_owned()),
            1 => Just("null".to_owned()),
            1 => Just("7".to_owned()),
        ]
    }

    /// A chat completion: text answers in the shape backends write them, and what is near
    /// them (tool calls, members missing, doubled, of other types or refused by the parse,
    /// choices of other kinds, usage of every kind).
    fn completion() -> impl Strategy<Value = String> {
        let reply = prop_oneof![
            6 => string().prop_map(|c| format!("{{\"role\":\"assistant\",\"content\":{c},\"refusal\":null}}")),
            1 => string().prop_map(|r| format!("{{\"role\":\"assistant\",\"content\":null,\"refusal\":{r}}}")),
            1 => Just("{\"content\":\"\",\"refusal\":\"no\"}".to_owned()),
            1 => Just("{\"content\":\"a\",\"content\":\"b\"}".to_owned()),
            1 => Just("{\"content\":\"a\",\"tool_calls\":null}".to_owned()),
            1 => Just("{\"content\":\"a\",\"tool_calls\":[]}".to_owned()),
            1 => Just("{\"content\":null,\"tool_calls\":[{\"id\":\"c\",\"type\":\"function\",\"function\":{\"name\":\"f\",\"arguments\":\"{\\\"a\\\":1}\"}}]}".to_owned()),
            6 => (string(), prop::collection::vec(tool_call(), 1..3)).prop_map(|(c, calls)| format!(
                "{{\"role\":\"assistant\",\"content\":{c},\"refusal\":null,\"tool_calls\":[{}]}}",
                calls.join(",")
            )),
            1 => tool_call().prop_map(|call| format!("{{\"content\":null,\"tool_calls\":{call}}}")),
            1 => tool_call().prop_map(|call| format!("{{\"tool_calls\":[{call}],\"tool_calls\":null}}")),
            1 => Just("{\"content\":\"a\",\"annotations\":[1e400]}".to_owned()),
            1 => Just("null".to_owned()),
            1 => Just("{}".to_owned()),
        ].boxed();
        let finish = prop_oneof![
            4 => Just("\"stop\""),
            1 => Just("\"length\""),
            1 => Just("\"content_filter\""),
            1 => Just("\"tool_calls\""),
            1 => Just("null"),
            1 => Just("3"),
        ]
        .boxed();
        let choice = (reply, finish)
            .prop_map(|(m, f)| {
                format!("{{\"index\":0,\"message\":{m},\"logprobs\":null,\"finish_reason\":{f}}}")
            })
            .boxed();
        let choices = prop_oneof![
            8 => choice.clone().prop_map(|c| format!("\"choices\":[{c}]")),
            1 => (choice.clone(), choice.clone()).prop_map(|(a, b)| format!("\"choices\":[{a},{b}]")),
            1 => Just("\"choices\":[]".to_owned()),
            1 => Just("\"choices\":[null]".to_owned()),
            1 => choice.prop_map(|c| format!("\"choices\":{{\"0\":{c}}}")),
        ].boxed();
        let usage = prop_oneof![
            4 => (0..1000u64, 0..1000u64, 0..100u64).prop_map(|(p, c, k)| format!(
                "\"usage\":{{\"prompt_tokens\":{p},\"completion_tokens\":{c},\"total_tokens\":0,\"prompt_tokens_details\":{{\"cached_tokens\":{k},\"audio_tokens\":0}}}}"
            )),
            // DeepSeek's cache hits, xAI's reasoning beside the completion.
            1 => (0..1000u64, 0..1000u64, 0..100u64, 0..2000u64).prop_map(|(p, c, k, r)| format!(
                "\"usage\":{{\"prompt_tokens\":{p},\"completion_tokens\":{c},\"total_tokens\":{},\"prompt_cache_hit_tokens\":{k},\"completion_tokens_details\":{{\"reasoning_tokens\":{r}}}}}",
                p + c + r
            )),
            // OpenAI's cache writes, Moonshot's cache hits.
            1 => (0..1000u64, 0..1000u64, 0..100u64, 0..100u64).prop_map(|(p, c, k, w)| format!(
                "\"usage\":{{\"prompt_tokens\":{p},\"completion_tokens\":{c},\"cached_tokens\":{k},\"prompt_tokens_details\":{{\"cache_write_tokens\":{w},\"cached_tokens\":1}}}}"
            )),
            1 => Just("\"usage\":null".to_owned()),
            1 => Just("\"usage\":{\"prompt_tokens\":-1,\"completion_tokens\":2.5,\"prompt_tokens_details\":[1]}".to_owned()),
            1 => Just("\"usage\":{\"prompt_tokens\":1,\"prompt_tokens\":2,\"prompt_tokens_details\":{\"cached_tokens\":{}}}".to_owned()),
            1 => Just("\"usage\":{\"x\":1e400}".to_owned()),
            1 => Just("\"usage\":5".to_owned()),
        ].boxed();
        let member = prop_oneof![
            2 => string().prop_map(|s| format!("\"id\":{s}")),
            2 => string().prop_map(|s| format!("\"model\":{s}")),
            1 => Just("\"object\":\"chat.completion\"".to_owned()),
            1 => Just("\"service_tier\":\"default\"".to_owned()),
            1 => Just("\"system_fingerprint\":\"\\ud800\"".to_owned()),
            2 => usage.clone(),
            2 => choices.clone(),
        ]
        .boxed();
        let written = (
            string(),
            string(),
            choices,
            usage,
            prop::collection::vec(member, 0..3),
        )
            .prop_map(|(id, model, choices, usage, more)| {
                let mut members = vec![
                    format!("\"id\":{id}"),
                    "\"object\":\"chat.completion\"".to_owned(),
                    "\"created\":1".to_owned(),
                    format!("\"model\":{model}"),
                    choices,
                    usage,
                ];
                members.extend(more);
                format!("{{{}}}", members.join(","))
            });
        prop_oneof![
            8 => written,
            1 => "[a-z{}\\[\\]\":, 0-9]{0,30}",
            1 => Just("{\"id\":\"x\"}".to_owned()),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]
        /// Whatever the text, a completion written without trees is the message the whole
        /// parse gives, and the reading in the shape gives up rather than answer otherwise.
        #[test]
        fn a_completion_read_in_its_shape_translates_as_parsed_whole(text in completion()) {
            if let Some(message) = completion_to_message_in_shape(&text) {
                let whole = message_parsed_whole(&text);
                prop_assert!(whole.is_some(), "{}", text);
                let whole = whole.unwrap();
                // A call's input nests as deep as its arguments, below the message's levels.
                let value = deep(&message);
                prop_assert_eq!(&value, &deep(&whole), "{}", text);
                // A call's input is copied as written, which the parse writes anew; all else
                // is the same bytes.
                if value["stop_reason"] != "tool_use" {
                    prop_assert_eq!(message, whole, "{}", text);
                }
            }
        }
    }

    /// The text answers backends write are read in their shape.
    #[test]
    fn a_text_completion_as_backends_write_it_is_read_in_its_shape() {
        for text in [
            r#"{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"gpt-4o","choices":[{"index":0,"message":{"role":"assistant","content":"Hello \"there\"","refusal":null,"annotations":[]},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":3,"total_tokens":12,"prompt_tokens_details":{"cached_tokens":4,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0}},"service_tier":"default","system_fingerprint":"fp_1"}"#,
            r#"{"id":"chatcmpl-2","object":"chat.completion","created":1,"model":"gpt-4o","choices":[{"index":0,"message":{"role":"assistant","content":null,"refusal":"I can't help with that."},"logprobs":null,"finish_reason":"content_filter"}],"usage":null}"#,
        ] {
            let message = completion_to_message_in_shape(text);
            assert!(message.is_some(), "{text}");
            assert_eq!(message, message_parsed_whole(text));
        }
    }

    /// A tool call answer as backends write it is read in its shape: its input copied as
    /// written, the rest the bytes the parse writes.
    #[test]
    fn a_tool_call_completion_as_backends_write_it_is_read_in_its_shape() {
        let text = r##"{"id":"chatcmpl-3","object":"chat.completion","created":1,"model":"gpt-4o","choices":[{"index":0,"message":{"role":"assistant","content":"Writing it.","refusal":null,"tool_calls":[{"id":"call_1","type":"function","function":{"name":"Write","arguments":"{\"file_path\":\"report.md\",\"content\":\"# Report\\n\\u00e9t\u00e9\"}"}},{"id":"call_2","type":"function","function":{"name":"Read","arguments":" "}}],"annotations":[]},"logprobs":null,"finish_reason":"tool_calls"}],"usage":{"prompt_tokens":9,"completion_tokens":3,"total_tokens":12,"prompt_tokens_details":{"cached_tokens":4,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0}},"system_fingerprint":"fp_1"}"##;
        let message = completion_to_message_in_shape(text).expect("in the shape");
        assert_eq!(
            String::from_utf8(message).unwrap(),
            r##"{"content":[{"text":"Writing it.","type":"text"},{"id":"call_1","input":{"file_path":"report.md","content":"# Report\n\u00e9té"},"name":"Write","type":"tool_use"},{"id":"call_2","input":{},"name":"Read","type":"tool_use"}],"id":"msg_3","model":"gpt-4o","role":"assistant","stop_reason":"tool_use","stop_sequence":null,"type":"message","usage":{"cache_creation_input_tokens":0,"cache_read_input_tokens":4,"input_tokens":5,"output_tokens":3}}"##
        );
        let whole: Value = serde_json::from_slice(&message_parsed_whole(text).unwrap()).unwrap();
        assert_eq!(
            serde_json::from_slice::<Value>(&completion_to_message_in_shape(text).unwrap())
                .unwrap(),
            whole
        );
    }

    /// A call's arguments are parsed on their own: nested to the parse's limit they are read
    /// in the shape, one level deeper they are left to the whole parse, which refuses them.
    #[test]
    fn arguments_nested_to_the_limit_are_read_in_the_shape_and_no_deeper() {
        let completion = |levels: usize| {
            let arguments = format!("{{\"a\":{}{}}}", "[".repeat(levels), "]".repeat(levels));
            let arguments = serde_json::to_string(&arguments).unwrap();
            format!(
                r#"{{"id":"chatcmpl-1","model":"m","choices":[{{"index":0,"message":{{"role":"assistant","content":null,"tool_calls":[{{"id":"c","type":"function","function":{{"name":"f","arguments":{arguments}}}}}]}},"finish_reason":"tool_calls"}}]}}"#
            )
        };
        let deepest = completion(126);
        let message = completion_to_message_in_shape(&deepest).expect("in the shape");
        assert_eq!(
            deep(&message),
            deep(&message_parsed_whole(&deepest).unwrap())
        );
        let deeper = completion(127);
        assert_eq!(completion_to_message_in_shape(&deeper), None);
        assert_eq!(message_parsed_whole(&deeper), None);
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
                ..Usage::default()
            })
        );
    }
}
