//! The top-level `usage` of a whole answer read as its bytes pass, chunk by chunk, keeping
//! nothing else: how the figures of an answer refused for memory are learnt
//! (`forward::read_body`). The provider generated and billed that answer; the client gets
//! 503 instead of it, and the key is charged what the answer's `usage` says.
//!
//! [`super::usage_of_answer`] reads an answer held whole; this reads one that is not held. It
//! follows the top-level object's members with a little state (depth, in a string or not,
//! the current key) and keeps the value of the member whose key is written `usage` (without
//! escapes, as the whole-answer reading takes it). Strings are skipped with memchr, so the
//! completion's text costs little; the rest goes a byte at a time, which only this rare path
//! pays.

use memchr::memchr2;

/// The longest `usage` value kept (OpenAI's, with its details, is about 400 bytes): a longer
/// one is not read.
const MAX_VALUE_BYTES: usize = 64 * 1024;

/// What the top-level object is at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    /// Before the object's `{`.
    Start,
    /// Before a member's key, or in it.
    Key,
    /// After a key, before its colon.
    Colon,
    /// In a member's value.
    Value,
    /// After the object's `}`.
    End,
}

/// The top-level `usage` member of a JSON object fed to it in pieces.
#[derive(Debug)]
pub struct UsageInPassing {
    place: Place,
    /// Brackets open.
    depth: usize,
    in_string: bool,
    escaped: bool,
    /// While a top-level key is read: how many of its bytes matched `usage` so far, `None`
    /// once one did not.
    key: Option<Option<usize>>,
    /// The current member's key is `usage`.
    named_usage: bool,
    /// The current member's value is kept (it is `usage`'s).
    keeping: bool,
    value: Vec<u8>,
    /// `usage` members seen whole.
    found: usize,
    /// Not a JSON object's text as far as it was followed, or a `usage` value too long.
    broken: bool,
}

impl Default for UsageInPassing {
    fn default() -> Self {
        Self {
            place: Place::Start,
            depth: 0,
            in_string: false,
            escaped: false,
            key: None,
            named_usage: false,
            keeping: false,
            value: Vec::new(),
            found: 0,
            broken: false,
        }
    }
}

impl UsageInPassing {
    /// Follows the answer's next bytes.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !self.broken {
            if self.in_string && !self.escaped && !self.keeping && self.key.is_none() {
                // A string's text counts for nothing: on to its next quote or backslash.
                match memchr2(b'"', b'\\', bytes) {
                    Some(at) => bytes = &bytes[at..],
                    None => return,
                }
            } else if !self.in_string && self.depth > 1 && !self.keeping {
                // Within a nested value only strings and brackets count: an embeddings
                // answer's numbers are passed over in a tight loop.
                match bytes
                    .iter()
                    .position(|b| matches!(b, b'"' | b'{' | b'}' | b'[' | b']'))
                {
                    Some(at) => bytes = &bytes[at..],
                    None => return,
                }
            }
            let Some((&byte, rest)) = bytes.split_first() else {
                return;
            };
            bytes = rest;
            if self.in_string {
                self.string_byte(byte);
            } else {
                self.structure_byte(byte);
            }
        }
    }

    /// Whether what has passed already rules out any figures: not an object's text, or a
    /// `usage` value too long, or a second `usage` member.
    pub fn hopeless(&self) -> bool {
        self.broken || self.found > 1
    }

    /// The `usage` value's text, once the whole object has passed with exactly one member
    /// named `usage`; `None` otherwise (no such member or two, the text not an object's as
    /// far as it was followed, or cut short).
    pub fn value(&self) -> Option<&[u8]> {
        (!self.broken && self.place == Place::End && self.found == 1)
            .then(|| self.value.trim_ascii())
    }

    fn string_byte(&mut self, byte: u8) {
        if self.keeping {
            self.keep(byte);
        }
        if self.escaped {
            self.escaped = false;
            self.key_byte(byte);
            return;
        }
        match byte {
            b'"' => {
                self.in_string = false;
                if let Some(matched) = self.key.take() {
                    self.named_usage = matched == Some(b"usage".len());
                    self.place = Place::Colon;
                }
            }
            b'\\' => {
                self.escaped = true;
                self.key_byte(byte);
            }
            _ => self.key_byte(byte),
        }
    }

    /// A byte of a key: a key spelled with escapes (`"us\u0061ge"`) is not `usage`, as
    /// [`super::usage_of_answer`] takes it.
    fn key_byte(&mut self, byte: u8) {
        if let Some(matched) = &mut self.key {
            *matched = matched
                .filter(|&n| b"usage".get(n) == Some(&byte))
                .map(|n| n + 1);
        }
    }

    fn structure_byte(&mut self, byte: u8) {
        match byte {
            b' ' | b'\t' | b'\n' | b'\r' => {
                if self.keeping {
                    self.keep(byte);
                }
            }
            // Outside the object: only its opening brace, and only before it.
            _ if self.depth == 0 => {
                if byte == b'{' && self.place == Place::Start {
                    self.depth = 1;
                    self.place = Place::Key;
                } else {
                    self.broken = true;
                }
            }
            // Within a member's value.
            _ if self.depth > 1 => {
                if self.keeping {
                    self.keep(byte);
                }
                match byte {
                    b'"' => self.in_string = true,
                    b'{' | b'[' => self.depth += 1,
                    b'}' | b']' => self.depth -= 1,
                    _ => {}
                }
            }
            // The top-level object's own.
            b'"' if self.place == Place::Key => {
                self.in_string = true;
                self.key = Some(Some(0));
            }
            b':' if self.place == Place::Colon => {
                self.place = Place::Value;
                if self.named_usage {
                    self.keeping = true;
                    self.value.clear();
                }
            }
            b',' if self.place == Place::Value => {
                self.end_value();
                self.place = Place::Key;
            }
            b'}' if matches!(self.place, Place::Key | Place::Value) => {
                self.end_value();
                self.depth = 0;
                self.place = Place::End;
            }
            _ if self.place == Place::Value => {
                if self.keeping {
                    self.keep(byte);
                }
                match byte {
                    b'"' => self.in_string = true,
                    b'{' | b'[' => self.depth += 1,
                    _ => {}
                }
            }
            _ => self.broken = true,
        }
    }

    fn end_value(&mut self) {
        if std::mem::take(&mut self.keeping) {
            self.found += 1;
        }
    }

    fn keep(&mut self, byte: u8) {
        if self.value.len() == MAX_VALUE_BYTES {
            self.broken = true;
        } else {
            self.value.push(byte);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn fed(pieces: &[&str]) -> Option<String> {
        let mut passing = UsageInPassing::default();
        for piece in pieces {
            passing.feed(piece.as_bytes());
        }
        passing
            .value()
            .map(|v| String::from_utf8(v.to_vec()).unwrap())
    }

    #[test]
    fn the_top_level_usage_is_kept_wherever_the_pieces_split() {
        let answer = r#"{"id":"x","choices":[{"message":{"content":"a \"usage\": {\"n\":1}","usage":{"prompt_tokens":99}}}],"usage" : {"prompt_tokens":3,"completion_tokens":[1,{"x":"}"}]} ,"z":null}"#;
        let want = r#"{"prompt_tokens":3,"completion_tokens":[1,{"x":"}"}]}"#;
        assert_eq!(fed(&[answer]).as_deref(), Some(want));
        for at in 0..=answer.len() {
            let (a, b) = answer.split_at(at);
            assert_eq!(fed(&[a, b]).as_deref(), Some(want), "split at {at}");
        }
        let bytes: Vec<String> = answer.chars().map(String::from).collect();
        let bytes: Vec<&str> = bytes.iter().map(String::as_str).collect();
        assert_eq!(fed(&bytes).as_deref(), Some(want));
    }

    #[test]
    fn no_figures_without_exactly_one_usage_in_a_whole_object() {
        assert_eq!(fed(&[r#"{"usage":1,"usage":2}"#]), None, "twice");
        assert_eq!(fed(&[r#"{"us\u0061ge":1}"#]), None, "escaped");
        assert_eq!(fed(&[r#"{"usages":1,"usag":2}"#]), None, "other names");
        assert_eq!(fed(&[r#"{"usage":1"#]), None, "cut short");
        assert_eq!(fed(&[r#"[{"usage":1}]"#]), None, "an array");
        assert_eq!(fed(&[r#"{"usage":1} x"#]), None, "text after it");
        assert_eq!(fed(&[r#"{"a":{"usage":1}}"#]), None, "nested");
        assert_eq!(fed(&[" {\"usage\":null}\n"]).as_deref(), Some("null"));
    }

    /// An answer whose figures are already ruled out is not read on for them.
    #[test]
    fn what_rules_out_figures_is_told_before_the_end() {
        let hopeless = |text: &str| {
            let mut passing = UsageInPassing::default();
            passing.feed(text.as_bytes());
            passing.hopeless()
        };
        assert!(hopeless("<html>"), "not JSON");
        assert!(hopeless(r#"{"usage":1,"usage":2,"#), "two usage members");
        assert!(!hopeless(r#"{"usage":1,"data":[1,2,"#), "one so far");
        assert!(
            !hopeless(r#"{"data":[[0.1,-2e3],{"a":"]"}],"#),
            "no usage yet"
        );
    }

    #[test]
    fn a_usage_value_past_its_bound_is_not_read() {
        let long = format!(r#"{{"usage":"{}"}}"#, "x".repeat(MAX_VALUE_BYTES));
        assert_eq!(fed(&[&long]), None);
        let fits = format!(r#"{{"usage":"{}"}}"#, "x".repeat(MAX_VALUE_BYTES - 2));
        assert!(fed(&[&fits]).is_some());
    }
}
