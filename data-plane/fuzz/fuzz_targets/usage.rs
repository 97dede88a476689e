//! Upstream answers and stream chunks read for their usage (`usage_of`, a one-pass scan that
//! hands only the `usage` value to serde, or not even that). Whatever the bytes:
//! - it never panics;
//! - for every JSON object it answers as the full serde parse into `{usage, choices}` that it
//!   replaced (kept here as the oracle, with the `"usage"` search that ran before it);
//! - a text cut off before its end counts nothing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_proxy::proxy::{Tokens, usage_of};

#[derive(serde::Deserialize)]
struct PromptDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

#[derive(serde::Deserialize)]
struct CompletionDetails {
    #[serde(default)]
    reasoning_tokens: Option<u64>,
}

#[derive(serde::Deserialize)]
struct Usage {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
    #[serde(default)]
    prompt_tokens_details: Option<PromptDetails>,
    #[serde(default)]
    completion_tokens_details: Option<CompletionDetails>,
}

#[derive(serde::Deserialize)]
struct WithUsage {
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    choices: Option<Vec<serde::de::IgnoredAny>>,
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
    let usage = parsed.usage?;
    let tokens = Tokens {
        prompt: usage.prompt_tokens.unwrap_or(0),
        completion: usage.completion_tokens.unwrap_or(0),
        cached_prompt: usage
            .prompt_tokens_details
            .and_then(|d| d.cached_tokens)
            .unwrap_or(0),
        reasoning: usage
            .completion_tokens_details
            .and_then(|d| d.reasoning_tokens)
            .unwrap_or(0),
    };
    Some((tokens, parsed.choices.is_some_and(|c| c.is_empty())))
}

fuzz_target!(|data: &[u8]| {
    let Ok(json) = std::str::from_utf8(data) else {
        return;
    };
    let read = usage_of(json);
    if let Ok(serde_json::Value::Object(_)) = serde_json::from_str(json) {
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
