//! Values copied into a translated request as the client wrote them, and the checks that keep
//! such a copy as strict as the parse into values it stands in for.
//!
//! serde_json reads a value as written (a `RawValue`) checking its syntax, a string's escapes
//! and its control characters, but not that `\u` escapes pair their surrogates, not numbers'
//! range, and not the nesting limit the parse of a top-level member into values applies (128
//! levels from the member): [`checked`] checks those.

use serde::Deserialize;
use serde::de::Error as _;
use serde_json::value::RawValue;

use crate::anthropic::Checked;

pub(super) fn from_text<'a, T: Deserialize<'a>>(text: &'a str) -> Option<T> {
    serde_json::from_str(text).ok()
}

/// `,"name":`.
pub(super) fn member(out: &mut Vec<u8>, name: &str) {
    out.extend_from_slice(b",\"");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\":");
}

/// The levels of arrays and objects a parse into values takes from a top-level member: the
/// 128th is refused.
pub(super) const LEVELS: usize = 127;

/// How many levels of arrays and objects `text`, a JSON value as written, nests.
pub(super) fn nesting(text: &str) -> usize {
    // Without the plain checks the pass answers for every value as written.
    levels(text, false).unwrap_or_default()
}

/// Whether a parse of a top-level member into values takes `text`, a value as written
/// `depth` levels inside the member, as deep as it nests (see [`LEVELS`]).
pub(super) fn within_limit(text: &str, depth: usize) -> bool {
    depth + nesting(text) <= LEVELS
}

/// Whether `raw`, a value read as written `depth` levels inside a top-level member, is one a
/// parse of that member into values takes.
pub(super) fn checked(raw: &RawValue, depth: usize) -> bool {
    let text = raw.get();
    if text.starts_with('"') {
        return written(raw).is_some();
    }
    match plain_nesting(text) {
        Some(levels) => levels <= LEVELS.saturating_sub(depth),
        None => parsed_within(text, depth),
    }
}

/// [`checked`] by a parse of the value with the room left under the limit: what a parse into
/// values refuses in it, this refuses.
fn parsed_within(text: &str, depth: usize) -> bool {
    // A `RawValue` is one value and nothing after it: no need to check the end.
    let mut value = serde_json::Deserializer::from_str(text);
    serde::de::DeserializeSeed::deserialize(Room(LEVELS.saturating_sub(depth)), &mut value).is_ok()
}

/// How many levels of arrays and objects `text`, a JSON value as written (read as a
/// `RawValue`: its syntax, escapes and control characters checked), nests, when it holds
/// nothing else a parse into values could refuse: no `\u` escape (one may be a lone
/// surrogate), no exponent and no run of 300 digits (only those make a number out of `f64`'s
/// range, which reaches 309 digits). `None` when it holds one of those: [`parsed_within`]
/// decides. One pass over the bytes, where the parse visits every value.
fn plain_nesting(text: &str) -> Option<usize> {
    levels(text, true)
}

/// The levels `text` nests, in one pass, strings skipped from quote to quote by `memchr2`;
/// with `plain`, `None` as soon as it holds what [`plain_nesting`] leaves to the parse. `None`
/// also for a string that does not end (not a value as written).
fn levels(text: &str, plain: bool) -> Option<usize> {
    const LONGEST_PLAIN_NUMBER: usize = 300;
    let bytes = text.as_bytes();
    let (mut depth, mut deepest, mut digits) = (0usize, 0usize, 0usize);
    let mut at = 0;
    while let Some(&byte) = bytes.get(at) {
        match byte {
            b'"' => {
                // To the closing quote, past escapes.
                loop {
                    at += 1 + memchr::memchr2(b'"', b'\\', bytes.get(at + 1..)?)?;
                    if bytes[at] == b'"' {
                        break;
                    }
                    if plain && bytes.get(at + 1) == Some(&b'u') {
                        return None;
                    }
                    at += 1;
                }
            }
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b'0'..=b'9' if plain => {
                digits += 1;
                if digits >= LONGEST_PLAIN_NUMBER {
                    return None;
                }
            }
            // An exponent follows a digit; the `e` of `true` and `false` follows a letter. (In
            // JSON a separator always comes between a number and a string or a bracket.)
            b'e' | b'E' if digits > 0 => return None,
            _ => digits = 0,
        }
        at += 1;
    }
    Some(deepest)
}

/// The contents of `raw` (escapes kept) when it is a string a parse into values takes.
pub(super) fn written(raw: &RawValue) -> Option<&str> {
    let text = raw.get();
    let contents = text.strip_prefix('"')?.strip_suffix('"')?;
    // Only a `\u` escape can be one the parse refuses (a lone surrogate).
    (!contents.contains("\\u") || from_text::<Checked>(text).is_some()).then_some(contents)
}

/// The contents of a JSON string as written (escapes kept), checked as a parse into values
/// checks it.
pub(super) struct Written<'a>(pub(super) &'a str);

impl<'de> Deserialize<'de> for Written<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(value: D) -> Result<Self, D::Error> {
        let raw = <&'de RawValue>::deserialize(value)?;
        written(raw)
            .map(Written)
            .ok_or_else(|| D::Error::custom("not a string the parse takes"))
    }
}

/// A value copied as written, checked as a parse into values checks it `DEPTH` levels inside
/// its top-level member (a tool's schema: `tools[i].input_schema` is two levels inside).
pub(super) struct Copied<'a, const DEPTH: usize>(pub(super) &'a RawValue);

impl<'de, const DEPTH: usize> Deserialize<'de> for Copied<'de, DEPTH> {
    fn deserialize<D: serde::Deserializer<'de>>(value: D) -> Result<Self, D::Error> {
        let raw = <&'de RawValue>::deserialize(value)?;
        if checked(raw, DEPTH) {
            Ok(Copied(raw))
        } else {
            Err(D::Error::custom("a value the parse refuses"))
        }
    }
}

/// [`Checked`] for a value with room for this many more levels of nesting: one nested
/// deeper is refused, as the parse of the whole member refuses it.
#[derive(Clone, Copy)]
struct Room(usize);

impl<'de> serde::de::DeserializeSeed<'de> for Room {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, value: D) -> Result<(), D::Error> {
        value.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Room {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let inside = self.inside()?;
        while seq.next_element_seed(inside)?.is_some() {}
        Ok(())
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let inside = self.inside()?;
        while map.next_key::<Checked>()?.is_some() {
            map.next_value_seed(inside)?;
        }
        Ok(())
    }
}

impl Room {
    /// The room inside an array or object that takes one level of this one.
    fn inside<E: serde::de::Error>(self) -> Result<Room, E> {
        match self.0.checked_sub(1) {
            Some(left) => Ok(Room(left)),
            None => Err(E::custom("nested past the limit")),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use proptest::prelude::*;
    use serde_json::Value;

    use super::*;

    /// The nesting counted as serde_json counts it, strings' brackets and escaped quotes
    /// included.
    #[test]
    fn nesting_counts_levels_not_brackets_in_strings() {
        for (text, levels) in [
            ("1", 0),
            ("\"[{\"", 0),
            ("[]", 1),
            ("[[1],{\"a\":[2]}]", 3),
            ("[\"\\\"[[[\",{}]", 2),
            ("{\"a\\\\\":[\"]\"]}", 2),
            // What the plain pass leaves to the parse is counted here.
            ("[\"\\u0041\",1e5,[2]]", 2),
        ] {
            assert_eq!(nesting(text), levels, "{text}");
        }
    }

    /// JSON values as clients write them and what is near the parse's limits: numbers of every
    /// form (exponents, out of range, long runs of digits), strings with escapes (surrogates
    /// paired and alone, an escaped backslash before a `u`), `true` and `false` beside numbers,
    /// whitespace, nested to and past the limit.
    fn value() -> impl Strategy<Value = String> {
        let leaf = prop_oneof![
            Just("null".to_owned()),
            Just("true".to_owned()),
            Just("false".to_owned()),
            any::<i64>().prop_map(|n| n.to_string()),
            any::<f64>().prop_map(|f| serde_json::to_string(&f).unwrap()),
            "-?[0-9]{1,3}(\\.[0-9]{1,3})?[eE][+-]?[0-9]{1,3}",
            "[1-9][0-9]{295,315}(\\.[0-9]{1,3})?",
            "0\\.[0-9]{295,305}",
            any::<String>().prop_map(|s| serde_json::to_string(&s).unwrap()),
            "\"[a-z e1\\[\\]{}]{0,8}\"",
            prop::sample::select(vec![
                "\"\\ud800\"",
                "\"\\ud83d\\ude00\"",
                "\"\\udc00x\"",
                "\"a\\\\u\"",
                "\"\\\\\\ud800\"",
                "\"\\\"1e9\"",
                "\"\\n\\t\\/\"",
            ])
            .prop_map(str::to_owned),
        ];
        let nested = leaf.prop_recursive(6, 48, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4)
                    .prop_map(|items| format!("[{}]", items.join(","))),
                prop::collection::vec(("\"[a-z\\\\u0-9]{0,4}\"", inner), 0..4).prop_map(
                    |members| {
                        let members: Vec<String> = members
                            .into_iter()
                            .map(|(k, v)| format!("{k} : {v}"))
                            .collect();
                        format!("{{ {} }}", members.join(" ,\n"))
                    }
                ),
            ]
        });
        (
            nested,
            prop_oneof![6 => Just(0usize), 1 => 0..8usize, 1 => 118..130usize],
        )
            .prop_map(|(value, levels)| {
                format!("{}{value}{}", "[".repeat(levels), "]".repeat(levels))
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]
        /// Whatever the value, the pass over its bytes takes it exactly where the parse with
        /// the room left under the limit takes it, at every depth.
        #[test]
        fn a_value_passed_over_is_checked_as_the_parse_checks_it(text in value()) {
            // Texts that are not one JSON value (an escape the generator cut wrong) are not
            // copied as written: a `RawValue` refuses them first.
            if let Ok(raw) = RawValue::from_string(text.clone()) {
                for depth in [0, 1, 2, 5, 64, 120, 126, 127, 128] {
                    prop_assert_eq!(
                        checked(&raw, depth),
                        parsed_within(&text, depth),
                        "{} at {}",
                        text,
                        depth
                    );
                }
            }
        }
    }

    /// The values tools' schemas and calls' inputs are made of are told by the pass over
    /// their bytes, without the parse.
    #[test]
    fn plain_values_are_checked_without_the_parse() {
        for (text, levels) in [
            ("null", 0),
            ("-12.50", 0),
            ("[1, true, 2.5, false, null, \"e1\"]", 1),
            (
                r#"{"type":"object","properties":{"n":{"type":"integer","minimum":-1,"maximum":1.5}},"required":["n"]}"#,
                3,
            ),
            (r#"{"a\"[":"\\[\n","b":[[{}]]}"#, 4),
        ] {
            assert_eq!(plain_nesting(text), Some(levels), "{text}");
        }
        for text in ["1e5", "[2E-3]", "\"\\u00e9\"", &"9".repeat(300)] {
            assert_eq!(plain_nesting(text), None, "{text}");
        }
    }

    /// A value copied as written is taken exactly where a parse of its member into values
    /// takes it: at the nesting limit, with a lone surrogate, with a number out of range.
    #[test]
    fn a_value_copied_is_checked_as_the_parse_checks_it() {
        let at = |depth: usize, levels: usize| {
            let text = format!("{}{}", "[".repeat(levels), "]".repeat(levels));
            let raw = RawValue::from_string(text.clone()).unwrap();
            let member = format!("{}{text}{}", "[".repeat(depth), "]".repeat(depth));
            let parsed = serde_json::from_str::<Value>(&member).is_ok();
            assert_eq!(checked(&raw, depth), parsed, "{depth} + {levels}");
            parsed
        };
        assert!(at(2, 125));
        assert!(!at(2, 126));
        assert!(at(0, 127));
        assert!(!at(0, 128));
        for (text, takes) in [
            ("\"\\ud800\"", false),
            ("\"\\ud83d\\ude00\"", true),
            ("\"\\\\ud800\"", true),
            ("[1e400]", false),
            ("{\"a\":\"\\udc00\"}", false),
            ("{\"a\":[1.5, \"x\"]}", true),
        ] {
            let raw = RawValue::from_string(text.to_owned()).unwrap();
            assert_eq!(checked(&raw, 2), takes, "{text}");
        }
    }
}
