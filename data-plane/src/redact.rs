//! Removing a backend's API key, and the provider account it belongs to, from the errors an
//! upstream sent back. Some providers quote the key they received in an error ("Incorrect
//! API key provided: sk-…"); relayed as it came, that body would hand the key to every client
//! of the gateway. And their rate-limit errors name the account: OpenAI's organization
//! ("in organization org-…"), Anthropic's organization's UUID ("(org: 9d50ef40-…"), Google's
//! project ("projects/123…"); any client can have one sent back with one oversized request.

use aho_corasick::{AhoCorasick, Input, MatchKind};
use bytes::{Bytes, BytesMut};

/// What stands where a key was.
pub const REDACTED: &[u8] = b"[REDACTED]";

/// Runs of this many characters of a key are removed wherever they appear (a provider may
/// quote a key cut short); a key this short or shorter is removed only whole.
const RUN: usize = 12;

/// `body` with every occurrence of `key`, and of any run of [`RUN`] or more of its characters,
/// replaced by [`REDACTED`]: as it is, and as JSON encoders write it (`/` as `\/`; `+` and
/// `/` as `\u002B` and `\u002F`, in either case), so a key quoted cut short and escaped is
/// found too. `body` itself, uncopied, when there is none. Linear in the body's length.
pub fn redact(body: Bytes, key: &[u8]) -> Bytes {
    if key.is_empty() || body.is_empty() {
        return body;
    }
    // Each form of the key, and the patterns: a whole form, then each run of RUN bytes of it
    // (a quoted key cut short). Leftmost-longest: where a whole form starts, it wins.
    let forms = written_forms(key);
    // The whole forms first: patterns from `whole` on are runs.
    let mut patterns: Vec<&[u8]> = forms.iter().map(Vec::as_slice).collect();
    let whole = patterns.len();
    for form in forms.iter().filter(|form| form.len() > RUN) {
        patterns.extend(form.windows(RUN));
    }
    let Ok(matcher) = AhoCorasick::builder()
        .match_kind(MatchKind::LeftmostLongest)
        .build(&patterns)
    else {
        // Cannot happen for a few hundred short patterns; refuse to pass the body on.
        return Bytes::from_static(REDACTED);
    };
    let mut out: Option<BytesMut> = None;
    let mut copied = 0;
    while let Some(found) = matcher.find(Input::new(&body[..]).range(copied..)) {
        let mut end = found.end();
        if found.pattern().as_usize() >= whole {
            // A run: it may go on beyond RUN bytes, in any form that has it (a run before
            // the first escaped character is in all of them): the longest.
            let run = &body[found.start()..found.end()];
            end += forms
                .iter()
                .flat_map(|form| {
                    form.windows(RUN)
                        .enumerate()
                        .filter(move |(_, w)| *w == run)
                        .map(move |(start, _)| &form[start + RUN..])
                })
                .map(|rest| {
                    rest.iter()
                        .zip(&body[end..])
                        .take_while(|(a, b)| a == b)
                        .count()
                })
                .max()
                .unwrap_or(0);
        }
        let out = out.get_or_insert_with(|| BytesMut::with_capacity(body.len()));
        out.extend_from_slice(&body[copied..found.start()]);
        out.extend_from_slice(REDACTED);
        copied = end;
    }
    match out {
        None => body,
        Some(mut out) => {
            out.extend_from_slice(&body[copied..]);
            out.freeze()
        }
    }
}

/// `key` as it is and as JSON encoders may write it: `/` as `\/` (PHP and others), `+` and
/// `/` as `\u002B` and `\u002F` (.NET's default encoder escapes `+`), upper or lower case.
/// Only the forms that differ from the key.
fn written_forms(key: &[u8]) -> Vec<Vec<u8>> {
    let escaped = |replace: &dyn Fn(u8) -> Option<&'static [u8]>| {
        let mut form = Vec::with_capacity(key.len() + 16);
        for &b in key {
            match replace(b) {
                Some(escape) => form.extend_from_slice(escape),
                None => form.push(b),
            }
        }
        form
    };
    let mut forms = vec![key.to_vec()];
    for form in [
        escaped(&|b| (b == b'/').then_some(&b"\\/"[..])),
        escaped(&|b| match b {
            b'/' => Some(&b"\\u002F"[..]),
            b'+' => Some(&b"\\u002B"[..]),
            _ => None,
        }),
        escaped(&|b| match b {
            b'/' => Some(&b"\\u002f"[..]),
            b'+' => Some(&b"\\u002b"[..]),
            _ => None,
        }),
    ] {
        if !forms.contains(&form) {
            forms.push(form);
        }
    }
    forms
}

/// An upstream's error body as a client may see it: without the backend's `key`
/// ([`redact`]) or the provider's account ids ([`scrub_accounts`]).
pub fn redact_error(body: Bytes, key: &[u8]) -> Bytes {
    scrub_accounts(redact(body, key))
}

/// `body` with the ids of provider accounts replaced by [`REDACTED`]: `org-`, `proj_` or
/// `user-` and 16 or more letters and digits (OpenAI's organizations, projects and users),
/// `org_` or `user_` and as many (Groq's organizations, in its 429s and 413s; OpenRouter's
/// users and organizations),
/// a UUID (Anthropic's organizations), `projects/` or `project_number:` and digits (Google's
/// projects); each starting a word and ending one. `body` itself, uncopied, when there is
/// none. Linear in the body's length.
pub fn scrub_accounts(body: Bytes) -> Bytes {
    let mut out: Option<BytesMut> = None;
    let mut copied = 0;
    let mut at = 0;
    while at < body.len() {
        let starts_word = at == 0 || !body[at - 1].is_ascii_alphanumeric();
        match starts_word.then(|| account_id_at(&body[at..])).flatten() {
            Some(len) => {
                let out = out.get_or_insert_with(|| BytesMut::with_capacity(body.len()));
                out.extend_from_slice(&body[copied..at]);
                out.extend_from_slice(REDACTED);
                at += len;
                copied = at;
            }
            None => at += 1,
        }
    }
    match out {
        None => body,
        Some(mut out) => {
            out.extend_from_slice(&body[copied..]);
            out.freeze()
        }
    }
}

/// The length of the account id `text` starts with, if it does (see [`scrub_accounts`]).
fn account_id_at(text: &[u8]) -> Option<usize> {
    // OpenAI's, then Groq's and OpenRouter's.
    const OPENAI: [&[u8]; 5] = [b"org-", b"proj_", b"user-", b"org_", b"user_"];
    const GOOGLE: [&[u8]; 2] = [b"projects/", b"project_number:"];
    let ends_word = |len: usize| text.get(len).is_none_or(|b| !b.is_ascii_alphanumeric());
    let run = |from: usize, of: fn(&u8) -> bool| text[from..].iter().take_while(|b| of(b)).count();
    let first = *text.first()?;
    if let Some(prefix) = OPENAI.iter().find(|p| text.starts_with(p)) {
        let len = prefix.len() + run(prefix.len(), u8::is_ascii_alphanumeric);
        return (len - prefix.len() >= 16).then_some(len);
    }
    if let Some(prefix) = GOOGLE.iter().find(|p| text.starts_with(p)) {
        let len = prefix.len() + run(prefix.len(), u8::is_ascii_digit);
        return (len > prefix.len() && ends_word(len)).then_some(len);
    }
    // A UUID: 8-4-4-4-12 hex digits.
    if !first.is_ascii_hexdigit() || text.len() < 36 {
        return None;
    }
    let uuid = text[..36].iter().enumerate().all(|(i, b)| match i {
        8 | 13 | 18 | 23 => *b == b'-',
        _ => b.is_ascii_hexdigit(),
    });
    (uuid && ends_word(36)).then_some(36)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use proptest::prelude::*;

    const KEY: &[u8] = b"sk-proj-4fG7hJ2kL9mN3pQ8rS1tU6vW";

    fn redacted(body: &str, key: &[u8]) -> String {
        String::from_utf8(redact(Bytes::copy_from_slice(body.as_bytes()), key).to_vec()).unwrap()
    }

    fn scrubbed(body: &str) -> String {
        String::from_utf8(scrub_accounts(Bytes::copy_from_slice(body.as_bytes())).to_vec()).unwrap()
    }

    /// Providers name the account behind a key in their errors (OpenAI's organization and
    /// project ids, Anthropic's organization's UUID, Google's project number); the rest of
    /// the message stays.
    #[test]
    fn provider_accounts_are_scrubbed_and_the_message_kept() {
        for (body, scrubbed_body) in [
            (
                "Request too large for gpt-4o in organization org-Mk7vQ2xR9pLw4ZtB8nYc3HdF on tokens per min (TPM): Limit 30000, Requested 61337.",
                "Request too large for gpt-4o in organization [REDACTED] on tokens per min (TPM): Limit 30000, Requested 61337.",
            ),
            (
                "rate limit of 30,000 input tokens per minute (org: 9d50ef40-6cc8-4ca6-9d35-1dc9cf26235c, model: claude-sonnet-4-6)",
                "rate limit of 30,000 input tokens per minute (org: [REDACTED], model: claude-sonnet-4-6)",
            ),
            (
                "for your organization (A22CF6E6-A940-4A4E-9F2B-0123456789AB) of 1,000,000",
                "for your organization ([REDACTED]) of 1,000,000",
            ),
            (
                r#"{"reason":"RATE_LIMIT_EXCEEDED","metadata":{"consumer":"projects/123456789012","quota_limit":"x"}}"#,
                r#"{"reason":"RATE_LIMIT_EXCEEDED","metadata":{"consumer":"[REDACTED]","quota_limit":"x"}}"#,
            ),
            (
                "Quota exceeded for quota metric 'x' of service 'y' for consumer 'project_number:123456789012'.",
                "Quota exceeded for quota metric 'x' of service 'y' for consumer '[REDACTED]'.",
            ),
            (
                "project proj_AbCdEfGh12345678IjKl and user user-AbCdEfGh12345678IjKlMnOp",
                "project [REDACTED] and user [REDACTED]",
            ),
            (
                "Rate limit reached for model `llama-3.3-70b-versatile` in organization `org_01hqr4x3w7f5wb7t5vm9zjmmhy` service tier `on_demand` on tokens per minute (TPM)",
                "Rate limit reached for model `llama-3.3-70b-versatile` in organization `[REDACTED]` service tier `on_demand` on tokens per minute (TPM)",
            ),
            (
                r#"{"error":{"message":"Key limit exceeded","code":403,"metadata":{"user_id":"user_2vXq8LmN4pR7sT1wY3zA6bC9dE0"}}}"#,
                r#"{"error":{"message":"Key limit exceeded","code":403,"metadata":{"user_id":"[REDACTED]"}}}"#,
            ),
        ] {
            assert_eq!(scrubbed(body), scrubbed_body);
        }
        // Words that only look like a prefix, and short or embedded ids, are left alone.
        for kept in [
            "a user-provided value for an org-level setting",
            "org-mock",
            r#"{"user_id":"u1","org_id":"o2"}"#,
            "xorg-Mk7vQ2xR9pLw4ZtB8nYc3HdF",
            "9d50ef40-6cc8-4ca6-9d35-1dc9cf26235cz",
            "projects/abc",
        ] {
            assert_eq!(scrubbed(kept), kept);
        }
        let body = Bytes::from_static(b"nothing to scrub here");
        assert_eq!(
            scrub_accounts(body.clone()).as_ptr(),
            body.as_ptr(),
            "not copied"
        );
    }

    #[test]
    fn removes_the_key_whole_cut_short_or_escaped() {
        let key = std::str::from_utf8(KEY).unwrap();
        assert_eq!(
            redacted(
                &format!(r#"{{"message":"Incorrect API key provided: {key}."}}"#),
                KEY
            ),
            r#"{"message":"Incorrect API key provided: [REDACTED]."}"#
        );
        assert_eq!(
            redacted(&format!("{key}{key}"), KEY),
            "[REDACTED][REDACTED]"
        );
        // A provider that shows the first 20 characters.
        assert_eq!(
            redacted(&format!("key {}…", &key[..20]), KEY),
            "key [REDACTED]…"
        );
        // One that masks the middle leaves no more than the hint Sluice shows itself.
        assert_eq!(redacted("sk-proj-****tU6vW", KEY), "sk-proj-****tU6vW");
        let slashed = b"abc/def/ghi/jkl/mno";
        assert_eq!(
            redacted(r"x abc\/def\/ghi\/jkl\/mno y", slashed),
            "x [REDACTED] y"
        );
        assert_eq!(redacted("short key ab", b"ab"), "short key [REDACTED]");
        // No escaped character in its first run: the run goes on in the escaped form.
        assert_eq!(
            redacted(
                r#"{"m":"ABSKabcdefghijkl\/mnop\/qrst"}"#,
                b"ABSKabcdefghijkl/mnop/qrst/uvwx"
            ),
            r#"{"m":"[REDACTED]"}"#
        );
        // Cut short and escaped, as a JSON encoder writes `/` (PHP) or `+` (.NET).
        assert_eq!(
            redacted(
                r#"{"m":"sk-ab\/cd\/ef\/gh\/ij"}"#,
                b"sk-ab/cd/ef/gh/ij/kl/mn/op/qr"
            ),
            r#"{"m":"[REDACTED]"}"#
        );
        assert_eq!(
            redacted(
                r#"{"m":"key ABSKab\u002Bcd\u002Bef\u002Bgh..."}"#,
                b"ABSKab+cd+ef+gh+ij+kl+mn"
            ),
            r#"{"m":"key [REDACTED]..."}"#
        );
        assert_eq!(
            redacted(
                r#"{"m":"ABSKab\u002fcd\u002fef\u002fgh\u002fij"}"#,
                b"ABSKab/cd/ef/gh/ij"
            ),
            r#"{"m":"[REDACTED]"}"#
        );
        // Nothing to remove: the same bytes, not a copy.
        let body = Bytes::from_static(b"{\"error\":{\"message\":\"overloaded\"}}");
        let same = redact(body.clone(), KEY);
        assert_eq!(same.as_ptr(), body.as_ptr());
    }

    proptest! {
        #[test]
        fn no_run_of_the_key_survives(
            key in "[A-Za-z0-9_/+-]{13,64}",
            parts in proptest::collection::vec(("[ -~]{0,40}", 0usize..64, 12usize..64), 0..4),
            tail in "[ -~]{0,40}",
        ) {
            let key = key.as_bytes();
            let mut body = Vec::new();
            for (text, from, len) in &parts {
                body.extend_from_slice(text.as_bytes());
                let from = from % key.len();
                let to = (from + len).min(key.len());
                body.extend_from_slice(&key[from..to]);
            }
            body.extend_from_slice(tail.as_bytes());
            let out = redact(Bytes::from(body), key);
            for window in key.windows(RUN) {
                prop_assert!(
                    !out.windows(RUN).any(|w| w == window),
                    "{:?}",
                    String::from_utf8_lossy(&out)
                );
            }
        }
    }
}
