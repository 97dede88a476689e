//! Upstream answers and stream chunks read for their usage: a stream's chunk by `usage_of`, a
//! one-pass scan that hands only the `usage` value to serde, or not even that; a whole answer
//! by `usage_of_answer`, a walk from its first `"usage"` to its end. Whatever the bytes:
//! - neither panics;
//! - for every JSON object `usage_of` answers as the full serde parse into `{usage, choices}`
//!   that it replaced (kept here as the oracle, with the `"usage"` search that ran before it),
//!   and `usage_of_answer` as serde reading the object's one member named `usage` plainly;
//! - a text cut off before its end counts nothing for `usage_of`;
//! - the figures `usage_of_answer` reads are those of a `"usage":` value in the text;
//! - an Anthropic message's `usage` (`usage_value_of_answer`, then `anthropic_usage_in`) reads
//!   for every JSON object as the object's one member named `usage` plainly, parsed whole.
#![no_main]

use std::fmt;

use libfuzzer_sys::fuzz_target;
use serde::Deserialize;
use serde::de::{IgnoredAny, MapAccess, Visitor};
use sluice_proxy::anthropic::Usage as MessageUsage;
use sluice_proxy::anthropic::response::{anthropic_usage, anthropic_usage_in};
use sluice_proxy::proxy::{Tokens, usage_of, usage_of_answer, usage_value_of_answer};

#[derive(serde::Deserialize)]
struct PromptDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
    #[serde(default)]
    cache_write_tokens: Option<u64>,
    #[serde(default, deserialize_with = "lenient_count")]
    audio_tokens: Option<u64>,
}

#[derive(serde::Deserialize)]
struct CompletionDetails {
    #[serde(default)]
    reasoning_tokens: Option<u64>,
    #[serde(default, deserialize_with = "lenient_count")]
    audio_tokens: Option<u64>,
}

/// The figures of `usage` Sluice reads, as it reads them: `total_tokens`,
/// `prompt_cache_hit_tokens` (DeepSeek) and `cached_tokens` (Moonshot) only adjust the others,
/// and are read leniently.
#[derive(serde::Deserialize)]
struct Usage {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
    #[serde(default, deserialize_with = "lenient_count")]
    total_tokens: Option<u64>,
    #[serde(default, deserialize_with = "lenient_count")]
    prompt_cache_hit_tokens: Option<u64>,
    #[serde(default, deserialize_with = "lenient_count")]
    cached_tokens: Option<u64>,
    #[serde(default)]
    prompt_tokens_details: Option<PromptDetails>,
    #[serde(default)]
    completion_tokens_details: Option<CompletionDetails>,
}

fn lenient_count<'de, D: serde::Deserializer<'de>>(value: D) -> Result<Option<u64>, D::Error> {
    Ok(serde_json::Value::deserialize(value)?.as_u64())
}

#[derive(serde::Deserialize)]
struct WithUsage {
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    choices: Option<Vec<serde::de::IgnoredAny>>,
}

impl Usage {
    fn tokens(self) -> Tokens {
        let details = self.prompt_tokens_details;
        let cache_hit = match (self.prompt_cache_hit_tokens, self.cached_tokens) {
            (None, None) => None,
            (a, b) => Some(a.unwrap_or(0).max(b.unwrap_or(0))),
        };
        let completion = self.completion_tokens_details;
        Tokens {
            audio_prompt: details.as_ref().and_then(|d| d.audio_tokens).unwrap_or(0),
            audio_completion: completion
                .as_ref()
                .and_then(|d| d.audio_tokens)
                .unwrap_or(0),
            ..Tokens::openai(
                self.prompt_tokens.unwrap_or(0),
                self.completion_tokens.unwrap_or(0),
                details.as_ref().and_then(|d| d.cached_tokens).unwrap_or(0),
                completion.and_then(|d| d.reasoning_tokens).unwrap_or(0),
                self.total_tokens,
                cache_hit,
                details.and_then(|d| d.cache_write_tokens).unwrap_or(0),
            )
        }
    }
}

/// A key, and whether it is written `"usage"` without escapes: serde_json hands such a key
/// over borrowed from the text, and decodes one with escapes into a buffer.
struct NamedUsagePlainly(bool);

impl<'de> Deserialize<'de> for NamedUsagePlainly {
    fn deserialize<D: serde::Deserializer<'de>>(key: D) -> Result<Self, D::Error> {
        struct Name;
        impl<'de> Visitor<'de> for Name {
            type Value = NamedUsagePlainly;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_borrowed_str<E>(self, key: &'de str) -> Result<Self::Value, E> {
                Ok(NamedUsagePlainly(key == "usage"))
            }
            fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
                Ok(NamedUsagePlainly(false))
            }
        }
        key.deserialize_str(Name)
    }
}

/// The values of a JSON object's members named `usage` plainly, each read as a `T`.
struct UsageMembers<T>(Vec<T>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for UsageMembers<T> {
    fn deserialize<D: serde::Deserializer<'de>>(object: D) -> Result<Self, D::Error> {
        struct Members<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for Members<T> {
            type Value = UsageMembers<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut values = Vec::new();
                while let Some(NamedUsagePlainly(usage)) = map.next_key()? {
                    if usage {
                        values.push(map.next_value::<T>()?);
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(UsageMembers(values))
            }
        }
        object.deserialize_map(Members(std::marker::PhantomData))
    }
}

/// What `usage_of_answer` answers for a JSON text: the one member named `usage` plainly.
fn answer_by_full_parse(json: &str) -> Option<Tokens> {
    let UsageMembers::<Option<Usage>>(values) = serde_json::from_str(json).ok()?;
    let [value] = <[_; 1]>::try_from(values).ok()?;
    Some(value?.tokens())
}

/// What an Anthropic message's `usage` reads as: the one member named `usage` plainly,
/// parsed whole and read by `anthropic_usage`.
fn message_usage_by_full_parse(json: &str) -> Option<MessageUsage> {
    let UsageMembers::<serde_json::Value>(values) = serde_json::from_str(json).ok()?;
    let [value] = <[_; 1]>::try_from(values).ok()?;
    Some(anthropic_usage(&value))
}

/// The figures serde reads from the value after every `"usage"` and a colon in `text`.
fn usage_values(text: &str) -> Vec<Tokens> {
    let bytes = text.as_bytes();
    (0..bytes.len())
        .filter(|&at| bytes[at..].starts_with(b"\"usage\""))
        .filter_map(|at| {
            let rest = &bytes[at + 7..];
            let colon = rest
                .iter()
                .position(|byte| !matches!(byte, b' ' | b'\t' | b'\n' | b'\r'))?;
            (rest[colon] == b':').then_some(())?;
            let mut value = serde_json::Deserializer::from_slice(&rest[colon + 1..]);
            Some(Option::<Usage>::deserialize(&mut value).ok()??.tokens())
        })
        .collect()
}

/// `usage_of` as it was before the scan.
fn by_full_parse(json: &str) -> Option<(Tokens, bool)> {
    let no_figures = json.match_indices("\"usage\"").all(|(at, key)| {
        json[at + key.len()..]
            .trim_start()
            .strip_prefix(':')
            .is_some_and(|value| value.trim_start().starts_with("null"))
    });
    if no_figures {
        return None;
    }
    let parsed: WithUsage = serde_json::from_str(json).ok()?;
    let tokens = parsed.usage?.tokens();
    Some((tokens, parsed.choices.is_none_or(|c| c.is_empty())))
}

fuzz_target!(|data: &[u8]| {
    let Ok(json) = std::str::from_utf8(data) else {
        return;
    };
    let read = usage_of(json);
    let answer = usage_of_answer(json);
    let message = usage_value_of_answer(data).and_then(anthropic_usage_in);
    if let Some(tokens) = answer {
        assert!(
            usage_values(json).contains(&tokens),
            "a whole answer's figures are a usage value in it"
        );
    }
    if let Ok(serde_json::Value::Object(_)) = serde_json::from_str(json) {
        assert_eq!(
            answer,
            answer_by_full_parse(json),
            "a whole JSON answer is read for its one member named usage"
        );
        assert_eq!(
            message,
            message_usage_by_full_parse(json),
            "a whole JSON message is read for its one member named usage"
        );
        assert_eq!(
            read,
            by_full_parse(json),
            "a JSON object is read as serde read it"
        );
        let whole = json.trim_end().len();
        for cut in (0..whole)
            .filter(|&cut| json.is_char_boundary(cut))
            .step_by(7)
        {
            assert_eq!(
                usage_of(&json[..cut]),
                None,
                "a cut-off answer counts nothing"
            );
        }
    }
});
