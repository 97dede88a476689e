//! Text from outside made safe to print: control characters and Unicode format characters
//! (zero-width, bidirectional overrides…) escaped, so that a string a client invented can
//! neither start a new log line nor drive the terminal of whoever reads it. Both servers'
//! logs and `sluicectl`'s tables go through here.

use std::borrow::Cow;
use std::fmt::{self, Write};

use unicode_properties::{GeneralCategory, UnicodeGeneralCategory as _};

/// Whether `c` is a Unicode format character (general category Cf: zero-width spaces and
/// joiners, bidirectional overrides and isolates, the soft hyphen, tag characters…):
/// invisible, yet it changes how the text around it reads.
pub fn is_format(c: char) -> bool {
    !c.is_ascii() && c.general_category() == GeneralCategory::Format
}

/// Whether `c` must not reach a log line or a terminal as it is.
fn unsafe_to_print(c: char) -> bool {
    if c.is_ascii() {
        return c.is_ascii_control();
    }
    c.is_control() || is_format(c)
}

/// Whether `text` holds a control character (`char::is_control`: U+0000–U+001F and
/// U+007F–U+009F). Printable ASCII, what ids and model names are made of, is passed over 16
/// bytes at a time ([`prefix_len`]); from the first other byte on, a character at a time.
pub fn has_control(text: &str) -> bool {
    let plain = prefix_len(text.as_bytes(), printable_ascii);
    text.get(plain..)
        .is_some_and(|rest| rest.chars().any(char::is_control))
}

/// Writes `c` escaped: `\n`, `\r`, `\t`, or `\u{…}`.
fn write_escaped(out: &mut impl Write, c: char) -> fmt::Result {
    match c {
        '\n' => out.write_str("\\n"),
        '\r' => out.write_str("\\r"),
        '\t' => out.write_str("\\t"),
        c => write!(out, "\\u{{{:x}}}", u32::from(c)),
    }
}

/// `text` with every control and format character escaped; borrowed when there is none.
pub fn escape_control(text: &str) -> Cow<'_, str> {
    if !text.chars().any(unsafe_to_print) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    // Writing to a String cannot fail.
    let _ = EscapeControl(&mut out).write_str(text);
    Cow::Owned(out)
}

/// The length of the run of bytes at the start of `text` that `keep` accepts. Checked 16
/// bytes at a time without a branch per byte, which the compiler turns into a few vector
/// instructions a block: a log line is mostly such bytes, and a byte at a time cost about
/// seven instructions each.
#[inline]
pub(crate) fn prefix_len(text: &[u8], keep: impl Fn(u8) -> bool) -> usize {
    let (blocks, _) = text.as_chunks::<16>();
    let mut at = 0;
    for block in blocks {
        if !block.iter().fold(true, |all, &b| all & keep(b)) {
            break;
        }
        at += 16;
    }
    let rest = text.get(at..).unwrap_or_default();
    at + rest.iter().position(|&b| !keep(b)).unwrap_or(rest.len())
}

/// Whether `b` is printable ASCII (a space included).
#[inline]
pub(crate) fn printable_ascii(b: u8) -> bool {
    (0x20..0x7f).contains(&b)
}

/// A writer that passes text on with control and format characters escaped.
pub struct EscapeControl<W>(pub W);

impl<W: Write> Write for EscapeControl<W> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        // Printable ASCII needs no escaping and no look at its characters one by one.
        let plain = prefix_len(text.as_bytes(), printable_ascii);
        let (ascii, mut rest) = text.split_at(plain);
        self.0.write_str(ascii)?;
        while let Some((at, c)) = rest.char_indices().find(|&(_, c)| unsafe_to_print(c)) {
            self.0.write_str(&rest[..at])?;
            write_escaped(&mut self.0, c)?;
            rest = &rest[at + c.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

/// Formats a `Debug` value through [`EscapeControl`].
pub struct Escaped<'a>(pub &'a dyn fmt::Debug);

impl fmt::Debug for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(EscapeControl(f), "{:?}", self.0)
    }
}

/// The most characters of a client's text (a path, an id, a model name) an error quotes back.
pub const MAX_QUOTED: usize = 200;

/// A backend's or key's name as it is stored and looked up: without surrounding whitespace,
/// in Unicode's composed form (NFC). `café` typed as `é` and as `e` with a combining accent
/// (as some keyboards and a text copied from a macOS file name give it) are one name: stored as
/// given they were two keys listed alike, and `key revoke café` revoked whichever the terminal
/// happened to type. The control plane stores and looks names up so; `sluicectl`, comparing
/// names itself, composes them too.
pub fn canonical_name(name: &str) -> String {
    icu_normalizer::ComposingNormalizerBorrowed::new_nfc()
        .normalize(name.trim())
        .into_owned()
}

/// `text` as an error may quote it back to the client: at most [`MAX_QUOTED`] characters,
/// then `…`. A client's text can be megabytes (a model name up to the body limit, a path up
/// to the head limit), and an error that echoed it whole could be a large answer to a client
/// that holds its connection by never reading it.
pub fn quoted(text: &str) -> String {
    match text.char_indices().nth(MAX_QUOTED) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn the_block_scan_stops_where_a_byte_scan_stops(
            head in "[ -~]{0,70}",
            odd in any::<u8>(),
            tail in "[ -~]{0,20}",
        ) {
            let text = [head.as_bytes(), &[odd], tail.as_bytes()].concat();
            let keep = |b: u8| printable_ascii(b) && b != b'"';
            prop_assert_eq!(
                prefix_len(&text, keep),
                text.iter().position(|&b| !keep(b)).unwrap_or(text.len())
            );
        }
    }

    proptest! {
        #[test]
        fn has_control_agrees_with_the_characters_one_by_one(
            head in "[ -~]{0,40}",
            odd in any::<char>(),
            tail in any::<String>(),
        ) {
            let text = format!("{head}{odd}{tail}");
            prop_assert_eq!(has_control(&text), text.chars().any(char::is_control));
        }
    }

    #[test]
    fn has_control_finds_c0_del_and_c1_anywhere() {
        let long = "k".repeat(40);
        for control in ['\0', '\n', '\x1f', '\x7f', '\u{80}', '\u{9f}'] {
            for text in [
                format!("{control}{long}"),
                format!("{long}{control}"),
                format!("é{control}"),
            ] {
                assert!(has_control(&text), "{text:?}");
            }
        }
        for text in ["", "gpt-4o-mini", &long, "café", "\u{a0}", "\u{200b}"] {
            assert!(!has_control(text), "{text:?}");
        }
    }

    #[test]
    fn escapes_what_could_forge_a_line_or_paint_a_terminal() {
        assert!(matches!(
            escape_control("gpt-4o ünïcode ✓"),
            Cow::Borrowed(_)
        ));
        assert_eq!(
            escape_control("m\nINFO request finished\u{1b}[31mred\u{7}"),
            "m\\nINFO request finished\\u{1b}[31mred\\u{7}"
        );
        assert_eq!(escape_control("a\r\tb\u{85}"), "a\\r\\tb\\u{85}");
        assert_eq!(
            escape_control("x\u{202E}y\u{200B}z"),
            "x\\u{202e}y\\u{200b}z"
        );
        let long = format!("{}\u{1b}[31m{}", "a".repeat(40), "b".repeat(40));
        assert_eq!(
            escape_control(&long),
            format!("{}\\u{{1b}}[31m{}", "a".repeat(40), "b".repeat(40))
        );
        let debug = format!("{:?}", Escaped(&format_args!("{}", "a\nb")));
        assert_eq!(debug, "a\\nb");
    }
}
