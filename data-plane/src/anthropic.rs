//! Anthropic's Messages API, both ways, as pure translations over JSON: a chat completions
//! request for an Anthropic backend and its answer back ([`request`], [`message`],
//! [`stream`]), and a Messages request for an OpenAI-format backend and its answer back
//! ([`request`], [`response`], [`stream`]). Requests, answers and stream events in the shape
//! most are written in are read from their text and written without trees of values; any other
//! is parsed into values, the reading that decides (each shape is held to it by a property
//! test). The proxy only drives them; nothing here does I/O. Every mapping, and what a client
//! gets for what cannot be translated, is listed in `docs/anthropic.md`.

use std::borrow::Cow;

use serde_json::Value;
use serde_json::value::RawValue;

use crate::request::Key;

pub mod error;
pub mod message;
pub mod request;
pub mod response;
pub mod stream;

/// The `anthropic-version` sent to an Anthropic backend that names none: the one the current
/// official SDK sends.
pub const DEFAULT_VERSION: &str = "2026-10-21";

/// Whether a Messages request may carry the sampling parameters (`temperature`, `top_p`,
/// `top_k`): API version 2026-10-21 removed them, and a request under it that carries any is
/// refused (400, even at its default value). Versions are dates (`YYYY-MM-DD`), ordered as
/// text; one that is not a date is taken as newer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sampling {
    /// Versions before 2026-10-21 (2023-06-01): the parameters are sent as the client gave them.
    Taken,
    /// 2026-10-21 and later: they are left out of a translated request.
    Removed,
}

impl Sampling {
    /// The first `anthropic-version` without the sampling parameters.
    const REMOVED_IN: &[u8] = b"2026-10-21";

    /// What a backend sending `anthropic-version: version` takes.
    pub fn of_version(version: &[u8]) -> Self {
        if version < Self::REMOVED_IN {
            Self::Taken
        } else {
            Self::Removed
        }
    }
}

/// A request that cannot be translated: the client gets a 400 naming the parameter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Untranslatable {
    /// The request parameter at fault, e.g. `messages[2].tool_calls[0].function.arguments`.
    pub param: String,
    pub message: String,
}

impl Untranslatable {
    pub(crate) fn new(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            param: param.into(),
            message: message.into(),
        }
    }
}

/// Token counts read from either API's `usage`, as the usage record wants them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Every input token, cached or not.
    pub input: u64,
    pub output: u64,
    /// Input tokens read from the prompt cache (part of `input`).
    pub cache_read: u64,
    /// Input tokens written to the prompt cache (part of `input`).
    pub cache_creation: u64,
    /// Of `cache_creation`, written to the 1-hour cache (Anthropic's
    /// `cache_creation.ephemeral_1h_input_tokens`), which Anthropic bills at twice the input
    /// price where the 5-minute cache costs 1.25 times.
    pub cache_creation_1h: u64,
    /// Of `output`, the model's thinking (Anthropic's `output_tokens_details.thinking_tokens`,
    /// an OpenAI-format backend's `reasoning_tokens`).
    pub reasoning: u64,
    /// What an OpenAI-format `usage`'s `total_tokens` holds beyond its prompt and completion
    /// when it reports no reasoning ([`crate::usage::Tokens::unshown`]: Google's thoughts,
    /// charged as the usage record's rule for the backend says). Anthropic's usage has none.
    pub unshown: u64,
}

/// `T` read from a JSON object and nothing else. serde's derived structs also read an array,
/// its elements taken as the fields in order, where a parsed `Value` is no object at all: a
/// reading that stands in for a parse into values reads its structs through this.
pub(crate) struct Object<T>(pub T);

impl<'de, T: serde::Deserialize<'de>> serde::Deserialize<'de> for Object<T> {
    fn deserialize<D: serde::Deserializer<'de>>(value: D) -> Result<Self, D::Error> {
        struct Members<T>(std::marker::PhantomData<T>);
        impl<'de, T: serde::Deserialize<'de>> serde::de::Visitor<'de> for Members<T> {
            type Value = T;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            }
        }
        value
            .deserialize_map(Members(std::marker::PhantomData))
            .map(Object)
    }
}

/// Any JSON value, read as a parse into `Value` reads it, and left: every string's escapes,
/// every number's range and the nesting limit are checked as that parse checks them, but no
/// tree is built. A reading that stands in for that parse passes over members with this;
/// serde's `IgnoredAny` would let through what the parse refuses (a number out of `f64`'s
/// range, a lone surrogate escape, nesting deeper than 128).
pub(crate) struct Checked;

impl<'de> serde::Deserialize<'de> for Checked {
    fn deserialize<D: serde::Deserializer<'de>>(value: D) -> Result<Self, D::Error> {
        value.deserialize_any(Checked)
    }
}

impl<'de> serde::de::Visitor<'de> for Checked {
    type Value = Checked;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_str<E>(self, _: &str) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_unit<E>(self) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Checked, A::Error> {
        while seq.next_element::<Checked>()?.is_some() {}
        Ok(Checked)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Checked, A::Error> {
        while map.next_entry::<Checked, Checked>()?.is_some() {}
        Ok(Checked)
    }
}

/// A key as its place among `names` (`names.len()` for any other).
#[derive(Clone, Copy)]
pub(crate) struct Names(pub(crate) &'static [&'static str]);

impl<'de> serde::de::DeserializeSeed<'de> for Names {
    type Value = usize;
    fn deserialize<D: serde::Deserializer<'de>>(self, key: D) -> Result<usize, D::Error> {
        key.deserialize_str(self)
    }
}

impl serde::de::Visitor<'_> for Names {
    type Value = usize;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a key")
    }
    fn visit_str<E>(self, key: &str) -> Result<usize, E> {
        Ok(self
            .0
            .iter()
            .position(|name| *name == key)
            .unwrap_or(self.0.len()))
    }
}

/// The members of an object named in `names`, handed to `read` by place (one given twice,
/// read twice: the last stands, as in a parsed value); the others checked and passed over.
pub(crate) fn members<'de, A: serde::de::MapAccess<'de>>(
    mut map: A,
    names: Names,
    mut read: impl FnMut(usize, &mut A) -> Result<(), A::Error>,
) -> Result<(), A::Error> {
    while let Some(at) = map.next_key_seed(names)? {
        if at == names.0.len() {
            map.next_value::<Checked>()?;
        } else {
            read(at, &mut map)?;
        }
    }
    Ok(())
}

/// A tool call's `function` in a chat message or chunk: its name and arguments, each a string
/// (unescaped) or `null`; any other member checked and passed over.
pub(crate) struct Function<'a> {
    pub(crate) name: Option<Cow<'a, str>>,
    pub(crate) arguments: Option<Cow<'a, str>>,
}

impl<'de> serde::Deserialize<'de> for Function<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(value: D) -> Result<Self, D::Error> {
        struct Members;
        impl<'de> serde::de::Visitor<'de> for Members {
            type Value = Function<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a function")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Function<'de>, A::Error> {
                let (mut name, mut arguments) = (None, None);
                members(map, Names(&["name", "arguments"]), |at, map| {
                    let value = map.next_value::<Option<Key>>()?.map(|Key(text)| text);
                    match at {
                        0 => name = value,
                        _ => arguments = value,
                    }
                    Ok(())
                })?;
                Ok(Function { name, arguments })
            }
        }
        value.deserialize_map(Members)
    }
}

/// The most characters of a tool call's id OpenAI takes (`string too long. Expected a string
/// with maximum length 40`).
const MAX_TOOL_ID_CHARS: usize = 40;

/// A tool call's id as both APIs take it: Anthropic takes `[A-Za-z0-9_-]` only (a 400 for
/// Kimi's `functions.Bash:0`), OpenAI at most 40 characters (a 400 for vLLM's 46-character
/// `chatcmpl-tool-…`). An id that passes both is kept; any other is `toolu_` and 32 hex digits
/// of its SHA-256: the same for the same id, so a call and its result, translated apart (the
/// call in an answer, its result in the next request), still name each other. An empty id is
/// kept (each writer decides what to do without one).
pub(crate) fn portable_tool_id(id: Cow<'_, str>) -> Cow<'_, str> {
    let portable = id.len() <= MAX_TOOL_ID_CHARS
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if portable {
        return id;
    }
    use sha2::{Digest, Sha256};
    use std::fmt::Write as _;
    let digest = Sha256::digest(id.as_bytes());
    let mut mapped = String::with_capacity(38);
    mapped.push_str("toolu_");
    for byte in &digest[..16] {
        let _ = write!(mapped, "{byte:02x}");
    }
    Cow::Owned(mapped)
}

/// The most characters of a function's name OpenAI takes (openai-python's
/// `FunctionDefinition.name`: "Must be a-z, A-Z, 0-9, or contain underscores and dashes, with
/// a maximum length of 64").
const MAX_TOOL_NAME_CHARS: usize = 64;

/// Of a name made portable, the hex digits of its SHA-256 written after its kept start.
const TOOL_NAME_HASH_DIGITS: usize = 12;

/// A tool's name as OpenAI takes it. Anthropic takes names of up to 128 characters (Claude
/// Code names an MCP server's tools `mcp__<server>__<tool>`, past 64 with a server named by a
/// UUID), OpenAI 64 of `[A-Za-z0-9_-]` (a 400 for the whole request otherwise). A name that
/// passes is kept; any other is its first 51 characters (any outside that set written `_`), `_`
/// and 12 hex digits of its SHA-256: 64 characters, the same for the same name, so a request's
/// tools, its `tool_choice` and its earlier turns' calls still name one another, and two names
/// alike in their first 51 characters differ. The answer's calls name the client's tool again
/// ([`ToolNames`]). An empty name is kept.
pub(crate) fn portable_tool_name(name: Cow<'_, str>) -> Cow<'_, str> {
    let portable = name.len() <= MAX_TOOL_NAME_CHARS
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if portable {
        return name;
    }
    use sha2::{Digest, Sha256};
    use std::fmt::Write as _;
    let kept = MAX_TOOL_NAME_CHARS - TOOL_NAME_HASH_DIGITS - 1;
    let mut mapped: String = name
        .chars()
        .take(kept)
        .map(|c| match c.is_ascii_alphanumeric() || c == '-' {
            true => c,
            false => '_',
        })
        .collect();
    mapped.push('_');
    let digest = Sha256::digest(name.as_bytes());
    for byte in &digest[..TOOL_NAME_HASH_DIGITS / 2] {
        let _ = write!(mapped, "{byte:02x}");
    }
    Cow::Owned(mapped)
}

/// The tools of a Messages request whose names its chat translation made portable
/// ([`portable_tool_name`]), each by the name the backend was given: the calls of the answer
/// name them so, and the client gets its own names back. Empty for a request whose names all
/// pass as they are (almost every one).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ToolNames(Vec<(String, String)>);

impl ToolNames {
    /// Of a Messages request's top-level members as written: its `tools`' names (none when
    /// `tools` is missing or not a list of objects).
    pub fn of_request<'a>(mut members: impl Iterator<Item = (&'a str, &'a RawValue)>) -> Self {
        #[derive(serde::Deserialize)]
        struct Named {
            #[serde(default)]
            name: Option<String>,
        }
        let Some((_, tools)) = members.find(|(key, _)| *key == "tools") else {
            return Self::default();
        };
        let Ok(tools) = serde_json::from_str::<Vec<Named>>(tools.get()) else {
            return Self::default();
        };
        let mut names: Vec<(String, String)> = Vec::new();
        for name in tools.into_iter().filter_map(|t| t.name) {
            if let Cow::Owned(portable) = portable_tool_name(Cow::Borrowed(&name))
                && !names.iter().any(|(p, _)| *p == portable)
            {
                names.push((portable, name));
            }
        }
        Self(names)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The client's name for the tool the backend knows as `name`: `name` itself unless it
    /// was made portable.
    pub fn original<'a>(&'a self, name: &'a str) -> &'a str {
        self.made_portable(name).unwrap_or(name)
    }

    /// The client's name for the tool the backend knows as `name`, if that was made portable.
    fn made_portable(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(portable, _)| portable == name)
            .map(|(_, original)| original.as_str())
    }

    /// A chat completion's calls (`choices[].message.tool_calls[].function.name`) named as the
    /// client named its tools.
    pub fn restore(&self, completion: &mut Value) {
        let Some(choices) = completion.get_mut("choices").and_then(Value::as_array_mut) else {
            return;
        };
        for call in choices
            .iter_mut()
            .filter_map(|c| c.pointer_mut("/message/tool_calls"))
            .filter_map(Value::as_array_mut)
            .flatten()
        {
            if let Some(name) = call.pointer_mut("/function/name")
                && let Some(original) = name.as_str().and_then(|n| self.made_portable(n))
            {
                *name = Value::from(original.to_owned());
            }
        }
    }
}

/// A chat tool call (an assistant message's in a request, a completion's in an answer) as the
/// `tool_use` block it becomes: its id and name (strings), and its `arguments` unescaped once,
/// the JSON text of an object as written (`{}` when blank, `null` or absent). Arguments that
/// are not an object, or that a parse into values refuses, are refused here; so are a call
/// without an id or a name: the translations into values decide those.
pub(crate) struct Call<'a> {
    pub(crate) id: Cow<'a, str>,
    pub(crate) name: Cow<'a, str>,
    pub(crate) input: Cow<'a, str>,
}

impl<'de> serde::Deserialize<'de> for Call<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(value: D) -> Result<Self, D::Error> {
        struct Members;
        impl<'de> serde::de::Visitor<'de> for Members {
            type Value = Call<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a tool call")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Call<'de>, A::Error> {
                let (mut id, mut function) = (None, None);
                members(map, Names(&["id", "function"]), |at, map| {
                    match at {
                        0 => id = Some(map.next_value::<Key>()?.0),
                        _ => function = Some(map.next_value::<Function>()?),
                    }
                    Ok(())
                })?;
                let Function { name, arguments } =
                    function.ok_or_else(|| serde::de::Error::custom("no function"))?;
                // The arguments are the JSON text of an object, unescaped once; blank is none.
                let input = match arguments {
                    Some(arguments) if !arguments.trim().is_empty() => {
                        if !arguments.trim_start().starts_with('{')
                            || serde_json::from_str::<Checked>(&arguments).is_err()
                        {
                            return Err(serde::de::Error::custom(
                                "arguments that are not an object",
                            ));
                        }
                        arguments
                    }
                    _ => Cow::Borrowed("{}"),
                };
                Ok(Call {
                    id: portable_tool_id(id.ok_or_else(|| serde::de::Error::custom("no id"))?),
                    name: name.ok_or_else(|| serde::de::Error::custom("no name"))?,
                    input,
                })
            }
        }
        value.deserialize_map(Members)
    }
}

/// `text` as a JSON string, escaped as serde writes it (for the writers of translated
/// requests and answers).
pub(crate) fn string(out: &mut Vec<u8>, text: &str) {
    // Writing into a Vec<u8> cannot fail, nor can a str's serialisation.
    let _ = serde_json::to_writer(&mut *out, text);
}

/// The first element of an array, read by `seed` (`None` for an empty array); the others
/// checked and passed over: a chat answer's or chunk's `choices`, of which only the first is read.
pub(crate) struct First<S>(pub S);

impl<'de, S: serde::de::DeserializeSeed<'de>> serde::de::DeserializeSeed<'de> for First<S> {
    type Value = Option<S::Value>;
    fn deserialize<D: serde::Deserializer<'de>>(self, value: D) -> Result<Self::Value, D::Error> {
        value.deserialize_seq(self)
    }
}

impl<'de, S: serde::de::DeserializeSeed<'de>> serde::de::Visitor<'de> for First<S> {
    type Value = Option<S::Value>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an array")
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let first = seq.next_element_seed(self.0)?;
        while seq.next_element::<Checked>()?.is_some() {}
        Ok(first)
    }
}

#[cfg(test)]
mod tests {
    use super::Sampling;

    #[test]
    fn sampling_parameters_are_taken_by_the_versions_before_2026_10_21() {
        for (version, sampling) in [
            ("2023-01-01", Sampling::Taken),
            ("2023-06-01", Sampling::Taken),
            ("2026-10-20", Sampling::Taken),
            ("2026-10-21", Sampling::Removed),
            ("2027-01-01", Sampling::Removed),
            ("latest", Sampling::Removed),
        ] {
            assert_eq!(
                Sampling::of_version(version.as_bytes()),
                sampling,
                "{version}"
            );
        }
    }
}
