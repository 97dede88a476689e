//! Removing a backend's API key from what an upstream sent back. Some providers quote the
//! key they received in an error ("Incorrect API key provided: sk-…"); relayed as it came,
//! that body would hand the key to every client of the gateway.

use aho_corasick::{AhoCorasick, Input, MatchKind};
use bytes::{Bytes, BytesMut};

/// What stands where a key was.
pub const REDACTED: &[u8] = b"[REDACTED]";

/// Runs of this many characters of a key are removed wherever they appear (a provider may
/// quote a key cut short); a key this short or shorter is removed only whole.
const RUN: usize = 12;

/// `body` with every occurrence of `key`, of `key` with `/` written `\/` (as some JSON
/// encoders do), and of any run of [`RUN`] or more of its characters replaced by
/// [`REDACTED`]; `body` itself, uncopied, when there is none. Linear in the body's length.
pub fn redact(body: Bytes, key: &[u8]) -> Bytes {
    if key.is_empty() || body.is_empty() {
        return body;
    }
    // Patterns: the key, its escaped form, then each run of RUN bytes (pattern i + 2 starts
    // at byte i of the key). Leftmost-longest: where the whole key starts, it wins.
    let mut escaped = Vec::with_capacity(key.len() + 8);
    for &b in key {
        if b == b'/' {
            escaped.push(b'\\');
        }
        escaped.push(b);
    }
    let mut patterns: Vec<&[u8]> = vec![key, &escaped];
    if key.len() > RUN {
        patterns.extend(key.windows(RUN));
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
        if let Some(start) = found.pattern().as_usize().checked_sub(2) {
            // A run: it may go on beyond RUN bytes.
            end += key[start + RUN..]
                .iter()
                .zip(&body[end..])
                .take_while(|(a, b)| a == b)
                .count();
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use proptest::prelude::*;

    const KEY: &[u8] = b"sk-proj-4fG7hJ2kL9mN3pQ8rS1tU6vW";

    fn redacted(body: &str, key: &[u8]) -> String {
        String::from_utf8(redact(Bytes::copy_from_slice(body.as_bytes()), key).to_vec()).unwrap()
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
