//! The client's request body: only what routing needs is read (`model`, `stream`,
//! `stream_options`), and only `model` and `stream_options.include_usage` are rewritten.
//! Every other top-level field is forwarded as the exact bytes the client sent (tools,
//! images, fields this proxy has never heard of); only the whitespace between top-level
//! fields and escapes in their names and in `model` are normalised. A body parsed as
//! received ([`parse_received`]) in which nothing changes (its `model` is the upstream's and a
//! stream already asks for `include_usage`) is sent as it came, without a copy.

use std::borrow::Cow;
use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};
use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

/// Why a request body was refused (all 400s).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("We could not parse the JSON body of your request. ({0})")]
    InvalidJson(String),
    #[error("The request body must be a JSON object.")]
    NotAnObject,
    #[error("You must provide a model parameter.")]
    MissingModel,
    #[error("Invalid type for '{param}': expected {expected}.")]
    InvalidType {
        param: &'static str,
        expected: &'static str,
    },
    #[error("Duplicate key '{0}' in the request body.")]
    DuplicateKey(&'static str),
    #[error(
        "A key spelled as '{0}' in another case is not allowed in the request body: servers \
         that read keys regardless of case would read it as '{0}'."
    )]
    KeyInAnotherCase(&'static str),
    #[error(
        "'{0}' asks the provider to serve a model other than the one named, which Sluice \
         could neither check against the key's models nor price: name one model (Sluice \
         fails over between its own backends)."
    )]
    ChoosesModel(&'static str),
    #[error("The request body has more than {MAX_MEMBERS} top-level members.")]
    TooManyMembers,
}

impl RequestError {
    /// The request parameter at fault, for the error body's `param`.
    pub fn param(&self) -> Option<&'static str> {
        match self {
            Self::MissingModel => Some("model"),
            Self::InvalidType { param, .. }
            | Self::DuplicateKey(param)
            | Self::KeyInAnotherCase(param)
            | Self::ChoosesModel(param) => Some(param),
            Self::InvalidJson(_) | Self::NotAnObject | Self::TooManyMembers => None,
        }
    }

    /// A short machine-readable code for the error body's `code`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidJson(_) => "invalid_json",
            Self::NotAnObject | Self::TooManyMembers => "invalid_request_body",
            Self::MissingModel => "missing_required_parameter",
            Self::InvalidType { .. } => "invalid_type",
            Self::DuplicateKey(_) | Self::KeyInAnotherCase(_) => "duplicate_key",
            Self::ChoosesModel(_) => "unsupported_parameter",
        }
    }
}

/// A parsed request body, borrowing from the bytes it was parsed from.
#[derive(Debug)]
pub struct ParsedRequest<'a> {
    /// The body as received, when parsed with [`parse_received`].
    received: Option<&'a Bytes>,
    fields: Vec<(Key<'a>, &'a RawValue)>,
    /// The public model name the client asked for.
    pub model: Cow<'a, str>,
    /// `stream: true`.
    pub stream: bool,
    /// `stream_options.include_usage: true`: the client wants the usage chunk.
    pub include_usage: bool,
    /// The Responses API's `previous_response_id`, when a string (`null` counts as absent).
    pub previous_response_id: Option<Cow<'a, str>>,
    /// `prompt_cache_key` (chat completions and Responses), when a string that is not empty:
    /// the conversation the client says the request belongs to, which routes it
    /// ([`crate::router::order`]). Anything else is left for the upstream to judge.
    pub prompt_cache_key: Option<Cow<'a, str>>,
}

/// [`parse`] of a body as received, which [`ParsedRequest::rewrite_with`] then sends on as it
/// came (the same bytes, shared) when it would change nothing in it.
pub fn parse_received(body: &Bytes) -> Result<ParsedRequest<'_>, RequestError> {
    let mut parsed = parse(body)?;
    parsed.received = Some(body);
    Ok(parsed)
}

/// Parses the fields routing needs and checks their types.
pub fn parse(bytes: &[u8]) -> Result<ParsedRequest<'_>, RequestError> {
    let Fields(fields) = top_level_fields(bytes).map_err(|e| {
        if e.to_string().starts_with(TOO_MANY_MEMBERS) {
            RequestError::TooManyMembers
        } else if e.is_data() {
            RequestError::NotAnObject
        } else {
            RequestError::InvalidJson(e.to_string())
        }
    })?;
    let mut model = None;
    let mut stream = None;
    let mut options = None;
    let mut previous = None;
    let mut cache_key = None;
    for (key, value) in &fields {
        let slot = match key.0.as_ref() {
            "model" => &mut model,
            "stream" => &mut stream,
            "stream_options" => &mut options,
            "previous_response_id" => &mut previous,
            // Only routes: a duplicate cannot make Sluice and the upstream read two different
            // requests, so it is the upstream's to judge (the last one, as JSON parsers keep).
            "prompt_cache_key" => {
                cache_key = Some(*value);
                continue;
            }
            // OpenRouter's fallback models (chat's `models`, its Messages' `fallbacks`),
            // Anthropic's (`fallbacks`, a beta) and LiteLLM's (`fallbacks`, and the member that
            // makes it take them at will): the provider serves and bills the one it falls back
            // to, which the key may not be allowed and Sluice would price as the model named.
            other => {
                // Given, not merely named: `null`, `false`, `[]` ask for nothing.
                if let Some(&name) = CHOOSE_MODELS.iter().find(|name| **name == other)
                    && !matches!(value.get().trim(), "null" | "false" | "[]" | "{}")
                {
                    return Err(RequestError::ChoosesModel(name));
                }
                match in_another_case(other, READ_NAMES) {
                    Some(name) => return Err(RequestError::KeyInAnotherCase(name)),
                    None => continue,
                }
            }
        };
        if slot.replace(*value).is_some() {
            return Err(RequestError::DuplicateKey(match key.0.as_ref() {
                "model" => "model",
                "stream" => "stream",
                "previous_response_id" => "previous_response_id",
                _ => "stream_options",
            }));
        }
    }
    let prompt_cache_key = cache_key
        .and_then(|raw| serde_json::from_str::<Key<'_>>(raw.get()).ok())
        .map(|Key(key)| key)
        .filter(|key| !key.is_empty());
    let previous_response_id = match previous {
        None => None,
        Some(raw) => serde_json::from_str::<Option<Key<'_>>>(raw.get())
            .map_err(|_| RequestError::InvalidType {
                param: "previous_response_id",
                expected: "a string",
            })?
            .map(|Key(id)| id),
    };
    let model = match model {
        None => return Err(RequestError::MissingModel),
        Some(raw) => {
            let model = match plain_string(raw) {
                Some(text) => Cow::Borrowed(text),
                None => {
                    serde_json::from_str::<Key<'_>>(raw.get())
                        .map_err(|_| RequestError::InvalidType {
                            param: "model",
                            expected: "a string",
                        })?
                        .0
                }
            };
            if model.is_empty() {
                return Err(RequestError::MissingModel);
            }
            model
        }
    };
    let stream = match stream {
        None => false,
        Some(raw) => serde_json::from_str::<Option<bool>>(raw.get())
            .map_err(|_| RequestError::InvalidType {
                param: "stream",
                expected: "a boolean",
            })?
            .unwrap_or(false),
    };
    let include_usage = match options {
        None => false,
        Some(raw) => {
            #[derive(Deserialize)]
            struct StreamOptions {
                include_usage: Option<bool>,
            }
            let invalid = RequestError::InvalidType {
                param: "stream_options",
                expected: "an object with a boolean include_usage",
            };
            // serde reads a struct from an array too (`[true]`), which OpenAI refuses: so
            // would the upstream, unless the rewrite made an object of it first.
            if raw.get().starts_with('[') {
                return Err(invalid);
            }
            if raw.get().starts_with('{') {
                // Valid JSON (the whole body parsed): only past its most members can it fail,
                // and then unchecked it would pass its members on unread.
                let Fields(members) = serde_json::from_str::<Fields<'_>>(raw.get())
                    .map_err(|_| RequestError::TooManyMembers)?;
                if let Some(name) = members
                    .iter()
                    .find_map(|(key, _)| in_another_case(&key.0, &["include_usage"]))
                {
                    return Err(RequestError::KeyInAnotherCase(name));
                }
            }
            serde_json::from_str::<Option<StreamOptions>>(raw.get())
                .map_err(|_| invalid)?
                .and_then(|o| o.include_usage)
                .unwrap_or(false)
        }
    };
    Ok(ParsedRequest {
        received: None,
        fields,
        model,
        stream,
        include_usage,
        previous_response_id,
        prompt_cache_key,
    })
}

/// Members that ask the provider to choose the model ([`RequestError::ChoosesModel`]).
const CHOOSE_MODELS: &[&str] = &[
    "models",
    "fallbacks",
    "context_window_fallbacks",
    "content_policy_fallbacks",
    "mock_testing_fallbacks",
];

/// The members Sluice reads or rewrites, whose other spellings are refused
/// ([`in_another_case`]).
const READ_NAMES: &[&str] = &[
    "model",
    "stream",
    "stream_options",
    "previous_response_id",
    "background",
];

/// The name among `names` that `key` is another spelling of, as a server reading keys
/// regardless of case reads it: Go's `encoding/json` (Ollama, Go relays) matches a key to a
/// field by simple case folding, `ſ` for `s` and the Kelvin sign for `k` included, and keeps
/// the last match. `{"model":"small","Model":"big"}` was routed and priced as `small`
/// and served as `big` there, `"Stream":true` streamed an answer Sluice read as a whole one,
/// with no usage in it. `None` for a name spelled exactly, or no such key.
fn in_another_case(key: &str, names: &[&'static str]) -> Option<&'static str> {
    // Nearly every key is ASCII: one of these names only in its letters' case, so of its
    // length (told first: a key of another length costs a comparison a name).
    if key.is_ascii() {
        return names.iter().copied().find(|name| {
            name.len() == key.len() && key != *name && key.eq_ignore_ascii_case(name)
        });
    }
    // The names are 5 to 20 bytes; `ſ` and `K` take one and two bytes more than their letters.
    if !(5..=26).contains(&key.len()) {
        return None;
    }
    let folds_to = |name: &str| {
        let mut chars = key.chars().map(|c| match c {
            'ſ' => 's',
            '\u{212A}' => 'k',
            c => c.to_ascii_lowercase(),
        });
        name.chars().all(|expected| chars.next() == Some(expected)) && chars.next().is_none()
    };
    names
        .iter()
        .copied()
        .find(|name| key != *name && folds_to(name))
}

/// The body's top-level members, each value's text as it came. Parsed from text when the body
/// is UTF-8, as nearly every one is: checked once here, it is not checked again for each key
/// and each raw value, as parsing from bytes does (about 500 instructions of a short chat
/// request's 2,700). A body that is not UTF-8 is parsed from bytes, for serde's own error.
/// Both accept the same bodies and read the same members (test `text_and_bytes_parse_alike`).
fn top_level_fields(bytes: &[u8]) -> serde_json::Result<Fields<'_>> {
    match crate::utf8::text(bytes) {
        Some(text) => serde_json::from_str(text),
        None => serde_json::from_slice(bytes),
    }
}

/// The text of a raw JSON string without escapes: what parsing it would give, without a
/// parser (the raw value was checked when it was read). `None` for any other value.
fn plain_string(raw: &RawValue) -> Option<&str> {
    let text = raw.get().strip_prefix('"')?.strip_suffix('"')?;
    (!text.contains('\\')).then_some(text)
}

impl ParsedRequest<'_> {
    /// The body to send upstream: `model` replaced by `upstream_model` and, when
    /// `force_include_usage`, `stream_options.include_usage` set to true (other
    /// `stream_options` fields kept). Everything else is copied byte for byte.
    pub fn rewrite(&self, upstream_model: &str, force_include_usage: bool) -> Bytes {
        self.rewrite_with(upstream_model, force_include_usage, None)
    }

    /// [`ParsedRequest::rewrite`], with `previous_response_id` replaced by
    /// `previous_response_id` when given (the upstream's own id for Sluice's). A body parsed
    /// with [`parse_received`] that this would not change but for whitespace and escapes is
    /// the received body itself: its `model` already the upstream's, `include_usage` already
    /// set if it is to be, no id to replace. Any JSON parser reads the two alike (the
    /// duplicate keys routing reads were refused by [`parse`]).
    pub fn rewrite_with(
        &self,
        upstream_model: &str,
        force_include_usage: bool,
        previous_response_id: Option<&str>,
    ) -> Bytes {
        if let Some(received) = self.received
            && previous_response_id.is_none()
            && (!force_include_usage || self.include_usage)
            && self.model == upstream_model
        {
            return received.clone();
        }
        let size: usize = self
            .fields
            .iter()
            .map(|(k, v)| k.0.len() + v.get().len() + 4)
            .sum();
        let mut out = BytesMut::with_capacity(size + upstream_model.len() + 48).writer();
        let mut first = true;
        let mut saw_options = false;
        let mut put_key = |out: &mut bytes::buf::Writer<BytesMut>, key: &str| {
            if !first {
                out.get_mut().put_u8(b',');
            }
            first = false;
            write_json_string(out, key);
            out.get_mut().put_u8(b':');
        };
        out.get_mut().put_u8(b'{');
        for (key, value) in &self.fields {
            let name = key.0.as_ref();
            put_key(&mut out, name);
            match name {
                "model" => write_json_string(&mut out, upstream_model),
                "previous_response_id" => match previous_response_id {
                    Some(id) => write_json_string(&mut out, id),
                    None => out.get_mut().put_slice(value.get().as_bytes()),
                },
                "stream_options" if force_include_usage => {
                    saw_options = true;
                    write_options_with_usage(&mut out, value);
                }
                _ => out.get_mut().put_slice(value.get().as_bytes()),
            }
        }
        if force_include_usage && !saw_options {
            put_key(&mut out, "stream_options");
            out.get_mut().put_slice(br#"{"include_usage":true}"#);
        }
        out.get_mut().put_u8(b'}');
        out.into_inner().freeze()
    }
}

impl ParsedRequest<'_> {
    /// The Responses API's `background`, in any member of that name (a parser upstream may
    /// read the last of repeated members) whose value is not `false` or `null`: OpenAI refuses
    /// a value that is not a boolean, but a lenient backend (vLLM's pydantic models) takes `1`
    /// or `"true"` as `true` and runs the response in the background.
    pub fn background(&self) -> bool {
        self.members().any(|(key, value)| {
            key == "background" && !matches!(value.get().trim(), "false" | "null")
        })
    }

    /// Anthropic's `metadata.user_id`, when a string that is not empty: Claude Code writes
    /// its session's id into it, so it names a conversation as `prompt_cache_key` does. Read
    /// only when asked (a Messages request's routing), not by [`parse`].
    pub fn metadata_user_id(&self) -> Option<Cow<'_, str>> {
        #[derive(Deserialize)]
        struct Metadata<'a> {
            #[serde(borrow)]
            user_id: Option<Cow<'a, str>>,
        }
        let (_, raw) = self
            .members()
            .filter(|(key, _)| *key == "metadata")
            .last()?;
        // serde reads a struct from an array too; Anthropic takes only an object.
        if !raw.get().starts_with('{') {
            return None;
        }
        let Metadata { user_id } = serde_json::from_str(raw.get()).ok()?;
        user_id.filter(|id| !id.is_empty())
    }

    /// The body's top-level members in order, each value's text as the client wrote it.
    pub fn members(&self) -> impl Iterator<Item = (&str, &RawValue)> {
        self.fields
            .iter()
            .map(|(key, value)| (key.0.as_ref(), *value))
    }

    /// The bytes of the body's members, keys and values as written.
    pub fn text_bytes(&self) -> usize {
        self.fields
            .iter()
            .map(|(key, value)| key.0.len() + value.get().len())
            .fold(0, usize::saturating_add)
    }

    /// At most how many bytes of memory [`Self::object`]'s tree of values takes, its strings
    /// included: a value is 32 bytes, an array's or an object's slot as much again (vectors
    /// grow by doubling, an object's entry holds its key), and every value but a top-level
    /// member's follows a `,` or opens after a `[` or a `{`, which are counted wherever they
    /// stand (a string's count too: an over-estimate). The text alone is a poor measure: an
    /// array of zeros is 2 bytes an element in it and 32 to 64 in the tree.
    pub fn tree_bytes(&self) -> usize {
        const PER_VALUE: usize = 64;
        self.fields
            .iter()
            .map(|(key, value)| {
                let text = value.get().as_bytes();
                let values = 1 + memchr::memchr3_iter(b',', b'[', b'{', text).count();
                key.0
                    .len()
                    .saturating_add(text.len())
                    .saturating_add(values.saturating_mul(PER_VALUE))
            })
            .fold(0, usize::saturating_add)
    }

    /// The whole body as a JSON object, for a backend that needs it translated (never on
    /// the OpenAI-to-OpenAI path, which copies the client's bytes).
    pub fn object(&self) -> Result<serde_json::Map<String, serde_json::Value>, RequestError> {
        let mut object = serde_json::Map::with_capacity(self.fields.len());
        for (key, value) in &self.fields {
            let value = serde_json::from_str(value.get())
                .map_err(|e| RequestError::InvalidJson(e.to_string()))?;
            object.insert(key.0.to_string(), value);
        }
        Ok(object)
    }
}

/// [`parse`] then [`ParsedRequest::rewrite`]: the pure function the fuzz and property tests
/// drive.
pub fn rewrite_body(
    bytes: &[u8],
    upstream_model: &str,
    force_include_usage: bool,
) -> Result<Bytes, RequestError> {
    Ok(parse(bytes)?.rewrite(upstream_model, force_include_usage))
}

fn write_options_with_usage(out: &mut bytes::buf::Writer<BytesMut>, value: &RawValue) {
    let Ok(Fields(fields)) = serde_json::from_str::<Fields<'_>>(value.get()) else {
        // null (or anything else `parse` let through): just the flag.
        out.get_mut().put_slice(br#"{"include_usage":true}"#);
        return;
    };
    out.get_mut().put_u8(b'{');
    let mut first = true;
    let mut saw = false;
    for (key, value) in &fields {
        if !first {
            out.get_mut().put_u8(b',');
        }
        first = false;
        write_json_string(out, &key.0);
        out.get_mut().put_u8(b':');
        if key.0 == "include_usage" {
            saw = true;
            out.get_mut().put_slice(b"true");
        } else {
            out.get_mut().put_slice(value.get().as_bytes());
        }
    }
    if !saw {
        if !first {
            out.get_mut().put_u8(b',');
        }
        out.get_mut().put_slice(br#""include_usage":true"#);
    }
    out.get_mut().put_u8(b'}');
}

/// `s` as a JSON string, as serde_json writes it. Keys and model names almost never hold a
/// byte it escapes (`"`, `\`, controls): those are copied between quotes, without its
/// serializer (about 150 instructions each).
pub(crate) fn write_json_string(out: &mut bytes::buf::Writer<BytesMut>, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        let out = out.get_mut();
        out.put_u8(b'"');
        out.put_slice(s.as_bytes());
        out.put_u8(b'"');
    } else {
        // Serialising a &str into a Vec-backed writer cannot fail.
        let _ = serde_json::to_writer(out, s);
    }
}

/// A JSON string that borrows from the input unless it contains escapes.
#[derive(Debug)]
pub(crate) struct Key<'a>(pub(crate) Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

/// A JSON object's members in their original order, values unparsed; at most
/// [`MAX_MEMBERS`] of them.
pub(crate) struct Fields<'a>(pub(crate) Vec<(Key<'a>, &'a RawValue)>);

/// The most members a [`Fields`] takes: far more than any API's request or answer object has
/// (OpenAI's and Anthropic's requests have fewer than 60), far fewer than a body of nothing
/// but members could hold. Each takes 40 bytes beside the body: a 16 MiB body of 3 million
/// empty members made a list of 168 MB, counted in no memory bound, held for the whole call.
pub(crate) const MAX_MEMBERS: usize = 4096;

/// The error a [`Fields`] past [`MAX_MEMBERS`] fails with.
const TOO_MANY_MEMBERS: &str = "an object of more than 4096 members";

impl<'de> Deserialize<'de> for Fields<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FieldsVisitor;
        impl<'de> Visitor<'de> for FieldsVisitor {
            type Value = Fields<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields<'de>, A::Error> {
                let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(8).min(64));
                while let Some(entry) = map.next_entry::<Key<'de>, &'de RawValue>()? {
                    if fields.len() == MAX_MEMBERS {
                        return Err(de::Error::custom(TOO_MANY_MEMBERS));
                    }
                    fields.push(entry);
                }
                Ok(Fields(fields))
            }
        }
        deserializer.deserialize_map(FieldsVisitor)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use proptest::prelude::*;
    use serde_json::{Value, json};

    fn rewritten(body: &str, model: &str, force: bool) -> Value {
        serde_json::from_slice(&rewrite_body(body.as_bytes(), model, force).unwrap()).unwrap()
    }

    /// A body of more top-level members than any API's object has is refused as they are
    /// collected, each 40 bytes beside the body.
    #[test]
    fn a_body_of_more_members_than_any_api_has_is_refused_before_they_are_collected() {
        let body = |members: usize| {
            let mut text = String::from("{\"model\":\"m\"");
            for _ in 1..members {
                text.push_str(",\"\":0");
            }
            text.push('}');
            text
        };
        assert!(parse(body(MAX_MEMBERS).as_bytes()).is_ok());
        let refused = parse(body(MAX_MEMBERS + 1).as_bytes()).unwrap_err();
        assert_eq!(refused, RequestError::TooManyMembers);
        assert_eq!(refused.code(), "invalid_request_body");
        assert_eq!(
            TOO_MANY_MEMBERS,
            format!("an object of more than {MAX_MEMBERS} members")
        );
    }

    /// `prompt_cache_key` is read for routing when it is a string that is not empty; any other
    /// value, and a duplicate, are the upstream's to judge (the last one is read, as JSON
    /// parsers keep), not refused here.
    #[test]
    fn a_prompt_cache_key_is_read_when_a_string() {
        let key = |body: &str| {
            parse(body.as_bytes())
                .unwrap()
                .prompt_cache_key
                .map(Cow::into_owned)
        };
        assert_eq!(
            key(r#"{"model":"m","prompt_cache_key":"s-1"}"#).as_deref(),
            Some("s-1")
        );
        assert_eq!(
            key(r#"{"prompt_cache_key":"a\u0042","model":"m"}"#).as_deref(),
            Some("aB")
        );
        assert_eq!(
            key(r#"{"model":"m","prompt_cache_key":"a","prompt_cache_key":"b"}"#).as_deref(),
            Some("b")
        );
        for other in ["\"\"", "null", "7", "[\"a\"]", "{\"a\":1}"] {
            let body = format!(r#"{{"model":"m","prompt_cache_key":{other}}}"#);
            assert_eq!(key(&body), None, "{body}");
        }
        assert_eq!(key(r#"{"model":"m"}"#), None);
    }

    /// `metadata.user_id` is read when a string that is not empty, from the last `metadata`;
    /// anything else is none, never an error.
    #[test]
    fn metadata_user_id_is_read_when_a_string() {
        let user = |body: &str| {
            parse(body.as_bytes())
                .unwrap()
                .metadata_user_id()
                .map(Cow::into_owned)
        };
        assert_eq!(
            user(r#"{"model":"m","metadata":{"user_id":"u_1_session_2"}}"#).as_deref(),
            Some("u_1_session_2")
        );
        assert_eq!(
            user(r#"{"model":"m","metadata":{"x":1,"user_id":"a\u0042"}}"#).as_deref(),
            Some("aB")
        );
        assert_eq!(
            user(r#"{"model":"m","metadata":{"user_id":"a"},"metadata":{"user_id":"b"}}"#)
                .as_deref(),
            Some("b")
        );
        for other in [
            "null",
            "{}",
            "{\"user_id\":\"\"}",
            "{\"user_id\":7}",
            "[\"a\"]",
            "\"u\"",
        ] {
            let body = format!(r#"{{"model":"m","metadata":{other}}}"#);
            assert_eq!(user(&body), None, "{body}");
        }
    }

    #[test]
    fn rewrites_model_and_keeps_everything_else_verbatim() {
        let body = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}}]}],"tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}],"x_unknown":{"n":1.50e3,"s":"\u00e9"},"temperature":0.70}"#;
        let out = rewrite_body(body.as_bytes(), "gpt-4o-mini-2024-07-18", false).unwrap();
        let expected = body.replace(
            r#""model":"gpt-4o-mini""#,
            r#""model":"gpt-4o-mini-2024-07-18""#,
        );
        assert_eq!(std::str::from_utf8(&out).unwrap(), expected);
    }

    /// Found by the `request` fuzz target: a lone UTF-16 surrogate escape is not strict JSON,
    /// but Python's `json` (and so many upstreams) takes it, so it is forwarded as it came.
    #[test]
    fn forwards_a_lone_surrogate_escape_as_it_came() {
        let body = r#"{"model":"m","messages":[{"role":"user","content":"a\ude00b"}]}"#;
        assert!(serde_json::from_str::<serde_json::Value>(body).is_err());
        let out = rewrite_body(body.as_bytes(), "u", false).unwrap();
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"model":"u","messages":[{"role":"user","content":"a\ude00b"}]}"#
        );
        assert_eq!(parse(&out).unwrap().model, "u");
    }

    /// OpenAI refuses `stream_options` that is not an object; serde alone would read the
    /// array `[false]` as one (and the rewrite then made an object of it).
    #[test]
    fn stream_options_must_be_an_object() {
        for options in ["[false]", "[true]", "[]", "1", "\"x\""] {
            let body = format!(r#"{{"model":"m","stream":true,"stream_options":{options}}}"#);
            assert!(parse(body.as_bytes()).is_err(), "{options}");
        }
        let body = r#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#;
        assert!(parse(body.as_bytes()).unwrap().include_usage);
    }

    #[test]
    fn forces_include_usage_for_streams() {
        assert_eq!(
            rewritten(r#"{"model":"m","stream":true}"#, "u", true),
            json!({"model":"u","stream":true,"stream_options":{"include_usage":true}})
        );
        assert_eq!(
            rewritten(
                r#"{"stream_options":{"x":1,"include_usage":false},"model":"m","stream":true}"#,
                "u",
                true
            ),
            json!({"model":"u","stream":true,"stream_options":{"x":1,"include_usage":true}})
        );
        assert_eq!(
            rewritten(r#"{"model":"m","stream_options":null}"#, "u", true),
            json!({"model":"u","stream_options":{"include_usage":true}})
        );
        assert_eq!(
            rewritten(r#"{"model":"m","stream_options":{}}"#, "u", true),
            json!({"model":"u","stream_options":{"include_usage":true}})
        );
    }

    #[test]
    fn reads_stream_and_include_usage() {
        let p = parse(br#"{"model":"a\"b","stream":true,"stream_options":{"include_usage":true}}"#)
            .unwrap();
        assert_eq!(
            (p.model.as_ref(), p.stream, p.include_usage),
            ("a\"b", true, true)
        );
        let p = parse(br#"{"model":"m","stream":null}"#).unwrap();
        assert!(!p.stream && !p.include_usage);
    }

    #[test]
    fn refuses_what_routing_cannot_read() {
        let cases: &[(&[u8], RequestError)] = &[
            (b"{", RequestError::InvalidJson(String::new())),
            (b"[1,2]", RequestError::NotAnObject),
            (b"\"model\"", RequestError::NotAnObject),
            (b"{}", RequestError::MissingModel),
            (br#"{"model":""}"#, RequestError::MissingModel),
            (
                br#"{"model":42}"#,
                RequestError::InvalidType {
                    param: "model",
                    expected: "a string",
                },
            ),
            (
                br#"{"model":"m","stream":"yes"}"#,
                RequestError::InvalidType {
                    param: "stream",
                    expected: "a boolean",
                },
            ),
            (
                br#"{"model":"m","stream_options":{"include_usage":1}}"#,
                RequestError::InvalidType {
                    param: "stream_options",
                    expected: "an object with a boolean include_usage",
                },
            ),
            (
                br#"{"model":"a","model":"b"}"#,
                RequestError::DuplicateKey("model"),
            ),
            (
                b"{\"model\":\"\xff\"}",
                RequestError::InvalidJson(String::new()),
            ),
        ];
        for (body, expected) in cases {
            let err = parse(body).unwrap_err();
            match (expected, &err) {
                (RequestError::InvalidJson(_), RequestError::InvalidJson(_)) => {}
                _ => assert_eq!(&err, expected, "{}", String::from_utf8_lossy(body)),
            }
        }
    }

    /// A member asking the provider to serve another model than the one named is refused,
    /// on every endpoint: OpenRouter and LiteLLM serve and bill the model they fall back to.
    #[test]
    fn a_member_choosing_another_model_at_the_provider_is_refused() {
        for (body, name) in [
            (
                r#"{"model":"cheap","models":["anthropic/claude-opus-4.1"]}"#,
                "models",
            ),
            (
                r#"{"model":"cheap","fallbacks":["gpt-5-pro"]}"#,
                "fallbacks",
            ),
            (
                r#"{"model":"cheap","mock_testing_fallbacks":true}"#,
                "mock_testing_fallbacks",
            ),
            (
                r#"{"model":"cheap","context_window_fallbacks":[{"cheap":["big"]}]}"#,
                "context_window_fallbacks",
            ),
            (r#"{"model":"cheap","m\u006fdels":["big"]}"#, "models"),
        ] {
            let refused = parse(body.as_bytes()).unwrap_err();
            assert_eq!(refused, RequestError::ChoosesModel(name), "{body}");
            assert_eq!(refused.code(), "unsupported_parameter");
        }
        assert!(parse(br#"{"model":"m","metadata":{"models":["x"]}}"#).is_ok());
        for nothing in ["null", "false", "[]"] {
            let body = format!(r#"{{"model":"m","fallbacks":{nothing}}}"#);
            assert!(parse(body.as_bytes()).is_ok(), "{body}");
        }
    }

    /// A key another spelling of one Sluice reads, as a server reading keys regardless of
    /// case (Go's `encoding/json`) reads it, is refused; keys merely like them are not.
    #[test]
    fn a_read_key_in_another_case_is_refused() {
        for (body, name) in [
            (r#"{"model":"small","Model":"big"}"#, "model"),
            (r#"{"MODEL":"big","model":"small"}"#, "model"),
            (r#"{"model":"m","Stream":true}"#, "stream"),
            (r#"{"model":"m","ſtream":true}"#, "stream"),
            (
                r#"{"model":"m","stream":true,"Stream_Options":{}}"#,
                "stream_options",
            ),
            (r#"{"model":"m","backgrounD":true}"#, "background"),
            (r#"{"model":"m","bac\u212Aground":true}"#, "background"),
            (
                r#"{"model":"m","Previous_Response_Id":"resp_1"}"#,
                "previous_response_id",
            ),
            (
                r#"{"model":"m","stream":true,"stream_options":{"include_usage":true,"Include_usage":false}}"#,
                "include_usage",
            ),
        ] {
            assert_eq!(
                parse(body.as_bytes()).unwrap_err(),
                RequestError::KeyInAnotherCase(name),
                "{body}"
            );
        }
        // Past the most members an object may have, `stream_options` is not passed on unread.
        let mut options = String::from(r#"{"include_usage":true"#);
        for i in 0..MAX_MEMBERS {
            options.push_str(&format!(r#","o{i}":0"#));
        }
        options.push_str(r#","Include_usage":false}"#);
        let body = format!(r#"{{"model":"m","stream":true,"stream_options":{options}}}"#);
        assert_eq!(
            parse(body.as_bytes()).unwrap_err(),
            RequestError::TooManyMembers
        );
        for body in [
            r#"{"model":"m","modelo":["x"],"streams":1,"modal":"x","stream":true}"#,
            r#"{"model":"m","stream":true,"stream_options":{"include_usage":true,"include_obfuscation":false}}"#,
            r#"{"model":"m","background":false,"metadata":{"Model":"x"}}"#,
        ] {
            assert!(parse(body.as_bytes()).is_ok(), "{body}");
        }
    }

    #[test]
    fn deep_nesting_is_forwarded_not_a_crash() {
        let mut body = String::from(r#"{"model":"m","x":"#);
        body.push_str(&"[".repeat(100_000));
        body.push_str(&"]".repeat(100_000));
        body.push('}');
        // Values are skipped, not parsed, so nesting cannot overflow the stack.
        let out = rewrite_body(body.as_bytes(), "u", false).unwrap();
        assert_eq!(out.len(), body.len());
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            ".*".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::btree_map(".{0,6}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn only_model_and_usage_change(
            extra in proptest::collection::btree_map("[a-z_]{1,8}", json_value(), 0..6),
            model in ".{1,20}",
            upstream in ".{1,20}",
            stream in any::<bool>(),
            force in any::<bool>(),
        ) {
            let mut body = serde_json::Map::new();
            for (k, v) in &extra {
                if !matches!(k.as_str(), "model" | "stream" | "stream_options") {
                    body.insert(k.clone(), v.clone());
                }
            }
            body.insert("model".into(), Value::String(model.clone()));
            body.insert("stream".into(), Value::Bool(stream));
            let bytes = serde_json::to_vec(&Value::Object(body.clone())).unwrap();
            let parsed = parse(&bytes).unwrap();
            prop_assert_eq!(parsed.model.as_ref(), model.as_str());
            prop_assert_eq!(parsed.stream, stream);

            let out: Value = serde_json::from_slice(&rewrite_body(&bytes, &upstream, force).unwrap()).unwrap();
            let mut expected = body;
            expected.insert("model".into(), Value::String(upstream));
            if force {
                expected.insert("stream_options".into(), json!({"include_usage": true}));
            }
            prop_assert_eq!(out, Value::Object(expected));
        }

        /// A body parsed as received is sent on as the rewrite would send it, read as JSON:
        /// the received bytes themselves (shared, not copied) exactly when the rewrite would
        /// change nothing but whitespace and escapes.
        #[test]
        fn a_body_sent_as_it_came_reads_as_the_rewritten_one(
            extra in proptest::collection::btree_map("[a-z_]{1,8}", json_value(), 0..6),
            model in prop_oneof!["gpt-4o-mini", ".{1,8}"],
            same_model in any::<bool>(),
            options in prop_oneof![
                Just(None),
                Just(Some(json!({"include_usage": true}))),
                Just(Some(json!({"include_usage": false, "x": 1}))),
                Just(Some(Value::Null)),
            ],
            force in any::<bool>(),
            previous in proptest::option::of("resp_[a-z]{1,4}"),
            pretty in any::<bool>(),
        ) {
            let mut body = serde_json::Map::new();
            for (k, v) in &extra {
                if !matches!(k.as_str(), "model" | "stream" | "stream_options" | "previous_response_id") {
                    body.insert(k.clone(), v.clone());
                }
            }
            body.insert("model".into(), Value::String(model.clone()));
            if let Some(options) = &options {
                body.insert("stream_options".into(), options.clone());
            }
            if previous.is_some() {
                body.insert("previous_response_id".into(), json!("resp_sluice"));
            }
            let body = Value::Object(body);
            let text = if pretty {
                serde_json::to_string_pretty(&body)
            } else {
                serde_json::to_string(&body)
            };
            let received = Bytes::from(text.unwrap());
            let upstream = if same_model { model.clone() } else { format!("{model}-up") };

            let sent = parse_received(&received)
                .unwrap()
                .rewrite_with(&upstream, force, previous.as_deref());
            let rewritten = parse(&received)
                .unwrap()
                .rewrite_with(&upstream, force, previous.as_deref());
            prop_assert_eq!(
                serde_json::from_slice::<Value>(&sent).unwrap(),
                serde_json::from_slice::<Value>(&rewritten).unwrap()
            );
            let asks_usage = options == Some(json!({"include_usage": true}));
            let unchanged = same_model && (!force || asks_usage) && previous.is_none();
            prop_assert_eq!(sent.as_ptr() == received.as_ptr(), unchanged);
        }

        #[test]
        fn text_and_bytes_parse_alike(
            text in prop_oneof![
                ".{0,40}",
                r#"\{("[a-z\\"é]{0,4}":("[a-z\\"é]{0,4}"|[0-9. ]{1,3}|\[\]|null|true|\{\})[, ]{0,2}){0,4}\}"#,
            ],
        ) {
            let debug = |fields: serde_json::Result<Fields<'_>>| match fields {
                Ok(Fields(fields)) => format!("{fields:?}"),
                Err(e) => e.to_string(),
            };
            let bytes = text.as_bytes();
            prop_assert_eq!(debug(top_level_fields(bytes)), debug(serde_json::from_slice(bytes)));
        }

        #[test]
        fn a_plain_model_string_reads_as_the_parser_reads_it(model in ".{0,12}") {
            let body = serde_json::to_string(&json!({"model": model})).unwrap();
            let fields = top_level_fields(body.as_bytes()).unwrap().0;
            let raw = fields[0].1;
            let parsed: String = serde_json::from_str(raw.get()).unwrap();
            if let Some(plain) = plain_string(raw) {
                prop_assert_eq!(plain, parsed.as_str());
            } else {
                prop_assert!(raw.get().contains('\\'));
            }
        }

        #[test]
        fn json_strings_are_written_as_serde_json_writes_them(
            text in prop_oneof![".{0,12}", "[a-z\"\\\\\\x00-\\x1f\\x7f é]{0,12}"],
        ) {
            let mut out = BytesMut::new().writer();
            write_json_string(&mut out, &text);
            let written = out.into_inner();
            prop_assert_eq!(std::str::from_utf8(&written).unwrap(), serde_json::to_string(&text).unwrap());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = rewrite_body(&bytes, "m", true);
        }
    }
}
