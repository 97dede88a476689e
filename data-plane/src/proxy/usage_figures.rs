//! The usage figures of an OpenAI answer (a chat completion, a chunk of its stream, an
//! embeddings body): its top-level `usage`, read without parsing the rest of the answer.
//!
//! Every non-streamed chat answer and every stream chunk with figures is read here, so the
//! reading is cheap: a plainly written `usage` is read by hand ([`PlainUsage`]), serde_json
//! reads any other `usage` value, and nothing else. A full serde parse of a 600-byte answer
//! cost about a tenth of the request's instructions.
//!
//! A stream's chunk is read by one pass over its bytes that finds where the top-level
//! object's `usage` and `choices` values start ([`usage_of`]); most chunks have no figures,
//! and say so last: `…,"usage":null}`. Those are told by their last bytes alone
//! ([`ends_with_null_usage`]); any other chunk is searched for the key ([`no_usage_figures`])
//! before the pass. A whole answer names `usage` after `choices` (or an embeddings' `data`),
//! which can be nearly all of its bytes: it is read from its first `"usage"` to its end
//! ([`usage_of_answer`]), its beginning only searched.

use std::sync::LazyLock;

use memchr::{memchr2, memmem};
use serde::Deserialize;
use smallvec::SmallVec;

use crate::usage::Tokens;

mod passing;
pub use passing::UsageInPassing;

/// The key [`no_usage_figures`] and [`usage_of_answer`] look for, quoted as it stands in JSON.
const USAGE_KEY: &[u8] = b"\"usage\"";

/// memchr's searcher for [`USAGE_KEY`] (SIMD), built once.
static USAGE_KEY_SEARCH: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(USAGE_KEY));

/// `usage` of an OpenAI response body or stream chunk, and whether the chunk is the
/// usage-only one that streams end with when `include_usage` is set: `choices: []`, or (some
/// servers) `null` or no `choices` at all, nothing a client that did not ask for usage reads.
///
/// For any JSON object it answers as parsing the whole text into `{usage, choices}` with
/// serde_json did (the test module keeps that parse as the oracle): `None` without a
/// top-level `usage`, with a null one, with one whose figures are not unsigned integers,
/// with `choices` neither an array nor null, with a top-level key twice; figures that are
/// null or missing, and missing details, count 0.
///
/// Text that is not JSON counts nothing, as before, when its quotes, brackets or top-level
/// object are out of order (cut off, unbalanced, mismatched, trailing text, a key without
/// its colon): the scan checks these. It does not check what lies outside the `usage` value
/// and between the brackets — literals, numbers, escapes, control characters in strings, the
/// commas of nested values — so such a text with a well-formed top-level `usage` is read
/// where the full parse refused it. That is harmless: the figures are those of the top-level
/// object's own `usage`, read strictly, never a nested `usage` or a string's content; the
/// upstream charged for them whatever else its answer got wrong. A top-level array, which
/// serde would have read as the fields in order, counts nothing.
pub fn usage_of(json: &str) -> Option<(Tokens, bool)> {
    if ends_with_null_usage(json.as_bytes()) {
        return None;
    }
    read_usage(json)
}

/// The figures of a whole (non-streamed) answer's top-level `usage`.
///
/// Providers write `usage` after `choices` (an embeddings answer after `data`), so walking the
/// answer from its start spends most of the reading on what comes before the key. Instead,
/// memchr's search finds the first `"usage"` that opens a string (not one inside a string:
/// its quote has no odd run of backslashes before it), and [`walk_to_the_end`] goes from
/// there to the end: strings skipped, brackets counted relative to that key's object. The
/// answer must end by closing its top-level object, so the lowest depth the walk reaches, at
/// the last byte, tells which of the `usage` keys it passed belong to that object.
///
/// For every JSON object it answers as serde reading the object's members and the one whose
/// key is written `"usage"` (the test module keeps that parse as the oracle): `None` without
/// such a member, with two, with a null one or one whose figures are not unsigned integers;
/// figures null or missing, and details missing, count 0. A key spelled with escapes
/// (`"us\u0061ge"`) is not `usage` here, as the search for figures in a stream has always
/// taken it; `choices` is not looked at (only a stream's last chunk is asked whether its
/// `choices` is empty).
///
/// Text that is not JSON counts nothing when what follows its first `"usage"` is out of order
/// (quotes or brackets unbalanced or mismatched, cut off, text after the closing brace). What
/// comes before that key is only searched, not checked: an answer whose beginning is not JSON
/// but whose end is a well-formed top-level `usage` and closing brace is read for those
/// figures, which the upstream charged whatever else its answer got wrong (the client receives
/// the answer as it is either way). Figures are only ever read from a `"usage":` value in the
/// text (test `figures_read_from_any_text_are_a_usage_value_in_it`).
pub fn usage_of_answer(json: &str) -> Option<Tokens> {
    let bytes = json.as_bytes();
    let key = walk_to_the_end(bytes, first_usage_key(bytes)?, PlainUsage::read)?;
    match key.read {
        Some(tokens) => tokens,
        None => {
            // What follows the value is the walk's business: it has checked it.
            let mut value = serde_json::Deserializer::from_slice(bytes.get(key.value..)?);
            Some(Option::<Usage>::deserialize(&mut value).ok()??.tokens())
        }
    }
}

/// The figures of an OpenAI `usage` value, its text alone (as [`UsageInPassing`] keeps it):
/// `None` for a null one or one whose figures are not unsigned integers, as
/// [`usage_of_answer`] reads the same value in its answer.
pub fn usage_of_value(value: &[u8]) -> Option<Tokens> {
    Some(
        serde_json::from_slice::<Option<Usage>>(value)
            .ok()??
            .tokens(),
    )
}

/// The text of a whole answer from its one top-level `usage`'s value on, that key found as
/// [`usage_of_answer`] finds it: for answers whose figures are not OpenAI's (an Anthropic
/// message), which the caller reads from the value's start (what follows the value is the
/// walk's business: it has checked it). `None` where [`usage_of_answer`] answers `None` for
/// want of that one key.
pub fn usage_value_of_answer(json: &[u8]) -> Option<&[u8]> {
    let key = walk_to_the_end(json, first_usage_key(json)?, |_, _| None::<((), usize)>)?;
    json.get(key.value..)
}

/// Where the first `"usage"` that opens a string stands in `json`.
fn first_usage_key(json: &[u8]) -> Option<usize> {
    USAGE_KEY_SEARCH
        .find_iter(json)
        .find(|&quote| opens_string(json, quote))
}

/// Whether the quote at `quote` delimits a string: in JSON one within a string is escaped, so
/// it follows an odd run of backslashes, and no backslash stands outside strings.
fn opens_string(json: &[u8], quote: usize) -> bool {
    let before = json.get(..quote).unwrap_or_default();
    before
        .iter()
        .rev()
        .take_while(|&&byte| byte == b'\\')
        .count()
        % 2
        == 0
}

/// A `usage` key the walk passed: its depth relative to the first one's, where its value
/// starts, and what the walk's reader made of the value, if it read it.
struct PassedKey<V> {
    depth: isize,
    value: usize,
    read: Option<V>,
}

/// The one `usage` key of the top-level object, walking from the string that opens at `first`
/// to the end of `json`: [`usage_of_answer`]'s walk. `read` is offered each `usage` value
/// passed (where it starts): what it reads, and the index just past the value, or `None` to
/// leave the value to the walk.
fn walk_to_the_end<'a, V>(
    json: &'a [u8],
    first: usize,
    read: impl Fn(&'a [u8], usize) -> Option<(V, usize)>,
) -> Option<PassedKey<V>> {
    let mut keys = SmallVec::<[PassedKey<V>; 2]>::new();
    // Depths relative to the object around `first`, and the brackets opened since that
    // are still open: a bracket opened before `first` is of a kind the walk does not know.
    let (mut depth, mut open) = (0isize, Brackets::default());
    // The lowest depth reached, and where.
    let mut lowest = (0isize, first);
    let mut at = first;
    while let Some(&byte) = json.get(at) {
        at += 1;
        match byte {
            b'"' => {
                // A name with escapes is never these bytes.
                let (end, _) = string_end(json, at)?;
                let named_usage = json.get(at..end) == Some(b"usage".as_slice());
                at = end + 1;
                let colon = skip_whitespace(json, at);
                if named_usage && json.get(colon) == Some(&b':') {
                    at = colon + 1;
                    let read = read(json, at).map(|(read, after)| {
                        at = after;
                        read
                    });
                    keys.push(PassedKey {
                        depth,
                        value: colon + 1,
                        read,
                    });
                }
            }
            b'{' | b'[' => {
                open.push(byte);
                depth += 1;
            }
            b'}' | b']' => {
                if open.depth() > 0 && !open.pop(byte) {
                    return None;
                }
                depth -= 1;
                if depth < lowest.0 {
                    lowest = (depth, at - 1);
                }
            }
            _ => {}
        }
    }
    // The top-level object closes last, and nothing but whitespace follows it.
    let (lowest, closing) = lowest;
    let last = skip_whitespace_back(json);
    if lowest >= 0 || Some(closing) != last || json.get(closing) != Some(&b'}') {
        return None;
    }
    let mut top_level = keys.into_iter().filter(|key| key.depth == lowest + 1);
    let key = top_level.next()?;
    top_level.next().is_none().then_some(key)
}

/// [`usage_of`] without the look at the last bytes.
fn read_usage(json: &str) -> Option<(Tokens, bool)> {
    if no_usage_figures(json) {
        return None;
    }
    scan_usage(json)
}

/// The scan: [`read_usage`] without the search for a `"usage"` key with figures.
fn scan_usage(json: &str) -> Option<(Tokens, bool)> {
    let bytes = json.as_bytes();
    let found = TopLevel::scan(bytes)?;
    let usage_at = found.usage?;
    let usage_only = match found.choices {
        Some(at) => empty_choices(bytes.get(at..)?)?,
        None => true,
    };
    let tokens = match found.plain_usage {
        Some(tokens) => tokens?,
        None => {
            // From a `str`, which serde need not check for UTF-8 again; `usage_at` follows a
            // colon. What follows the value is the scan's business: it has checked it.
            let mut value = serde_json::Deserializer::from_str(json.get(usage_at..)?);
            Option::<Usage>::deserialize(&mut value).ok()??.tokens()
        }
    };
    Some((tokens, usage_only))
}

#[derive(serde::Deserialize)]
struct PromptDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
    #[serde(default)]
    cache_write_tokens: Option<u64>,
    /// Read leniently, as it was ignored before it was read.
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

/// The figures of `usage` that Sluice records; the others are ignored. `total_tokens`,
/// `prompt_cache_hit_tokens` and `cached_tokens` only adjust the others ([`Tokens::openai`])
/// and are read leniently: one that is not a count is as if absent, as it was before they
/// were read.
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
    /// Moonshot's (Kimi's) cache hits.
    #[serde(default, deserialize_with = "lenient_count")]
    cached_tokens: Option<u64>,
    #[serde(default)]
    prompt_tokens_details: Option<PromptDetails>,
    #[serde(default)]
    completion_tokens_details: Option<CompletionDetails>,
}

/// A count, or `None` for any other JSON value.
fn lenient_count<'de, D: serde::Deserializer<'de>>(value: D) -> Result<Option<u64>, D::Error> {
    Ok(serde_json::Value::deserialize(value)?.as_u64())
}

impl Usage {
    fn tokens(self) -> Tokens {
        let (cached, written, audio_prompt) =
            self.prompt_tokens_details.map_or((None, None, None), |d| {
                (d.cached_tokens, d.cache_write_tokens, d.audio_tokens)
            });
        let (reasoning, audio_completion) = self
            .completion_tokens_details
            .map_or((None, None), |d| (d.reasoning_tokens, d.audio_tokens));
        Tokens {
            audio_prompt: audio_prompt.unwrap_or(0),
            audio_completion: audio_completion.unwrap_or(0),
            ..Tokens::openai(
                self.prompt_tokens.unwrap_or(0),
                self.completion_tokens.unwrap_or(0),
                cached.unwrap_or(0),
                reasoning.unwrap_or(0),
                self.total_tokens,
                // `Option`'s order: the larger count, `None` when neither is one.
                self.prompt_cache_hit_tokens.max(self.cached_tokens),
                written.unwrap_or(0),
            )
        }
    }
}

/// True when `json` ends with `,"usage":null}` or `{"usage":null}` (then JSON whitespace, if
/// any), or with either followed by an `obfuscation` member before the `}`
/// ([`without_obfuscation`]): the last member of the top-level object is a null `usage`, as
/// OpenAI-format streams write every chunk with `include_usage` but the last, or the member
/// before OpenAI's padding is. Such a text has no figures for the reading: if the scan reads
/// it at all, that final `}` closes the top-level object, so the `"` before the colon ends a
/// key string, and that string starts at the quote before `usage` (a quote after `,` or `{`
/// is not escaped; were it the end of a string, the last quote would open one that never
/// ends). So the top-level `usage` is this null one, or the object names `usage` twice:
/// `None` either way. It looks at the last 15–50 bytes or so where [`no_usage_figures`]
/// searches the whole text.
fn ends_with_null_usage(json: &[u8]) -> bool {
    const TAIL: &[u8] = b"\"usage\":null";
    let end = skip_whitespace_back(json).map_or(0, |last| last + 1);
    json.get(..end)
        .and_then(|text| text.strip_suffix(b"}"))
        .map(without_obfuscation)
        .and_then(|text| text.strip_suffix(TAIL))
        .is_some_and(|head| matches!(head.last(), Some(b',' | b'{')))
}

/// `members` (an object's text up to its closing `}`) without its last member when that is
/// `,"obfuscation":"…"` whose value holds no `"` or `\`: the padding OpenAI ends each chunk
/// of a chat stream with (random letters and digits, unless the request's
/// `stream_options.include_obfuscation` is false), which comes after `usage`. Without a
/// backslash in the value its opening quote is the last `"` before its closing one, and that
/// quote follows a colon, so it is not escaped; the key before it is read as `usage`'s is in
/// [`ends_with_null_usage`]. Anything else is handed back as it was.
fn without_obfuscation(members: &[u8]) -> &[u8] {
    const KEY: &[u8] = b",\"obfuscation\":\"";
    let Some(value) = members.strip_suffix(b"\"") else {
        return members;
    };
    match memchr::memrchr2(b'"', b'\\', value) {
        Some(at) if value.get(at) == Some(&b'"') => value
            .get(..=at)
            .and_then(|head| head.strip_suffix(KEY))
            .unwrap_or(members),
        _ => members,
    }
}

/// True when `json` has no `"usage"` key or every one it has is `null`, so there are no
/// figures to read. With `include_usage`, which Sluice always asks for, every chunk of a
/// stream but the last says `"usage":null`; this spares each of them the scan.
/// The search is memchr's (SIMD, its searcher built once), which finds the same
/// non-overlapping occurrences as `str::match_indices` at a fraction of its cost.
fn no_usage_figures(json: &str) -> bool {
    USAGE_KEY_SEARCH.find_iter(json.as_bytes()).all(|at| {
        // `at` is the index of an ASCII `"`: a char boundary.
        json.get(at + USAGE_KEY.len()..)
            .unwrap_or_default()
            .trim_start()
            .strip_prefix(':')
            .is_some_and(|value| value.trim_start().starts_with("null"))
    })
}

/// Where the values of the top-level object's `usage` and `choices` start (just after
/// their colons), and the figures of a `usage` written plainly (see [`PlainUsage`]):
/// `Some(None)` when it is null.
#[derive(Default)]
struct TopLevel {
    usage: Option<usize>,
    choices: Option<usize>,
    plain_usage: Option<Option<Tokens>>,
}

/// What may come next in the top-level object.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Just after its `{`: a key or its `}`.
    FirstKey,
    /// After a comma: a key.
    Key,
    Colon,
    Value,
    /// After a value (or within a number or literal): a comma or its `}`.
    Comma,
}

/// The top-level keys whose values are read.
#[derive(Clone, Copy)]
enum Key {
    Usage,
    Choices,
    Other,
}

impl TopLevel {
    /// Walks `json` once: strings are skipped with memchr, brackets are counted (and their
    /// kinds matched), and in the top-level object keys, colons, values and commas must
    /// alternate. `None` when the text is not an object whose brackets close at its end
    /// (whitespace aside), or names `usage` or `choices` twice, as the full parse refused
    /// both.
    fn scan(json: &[u8]) -> Option<Self> {
        let mut found = Self::default();
        let mut open = Brackets::default();
        let mut expect = Expect::FirstKey;
        let mut key = Key::Other;
        let mut at = skip_whitespace(json, 0);
        if json.get(at) != Some(&b'{') {
            return None;
        }
        open.push(b'{');
        at += 1;
        while let Some(&byte) = json.get(at) {
            let top = open.depth() == 1;
            match byte {
                b' ' | b'\t' | b'\n' | b'\r' => {}
                b'"' => {
                    let (end, escaped) = string_end(json, at + 1)?;
                    if top {
                        expect = match expect {
                            Expect::FirstKey | Expect::Key => {
                                key = Key::named(json.get(at..=end)?, escaped)?;
                                Expect::Colon
                            }
                            Expect::Value => Expect::Comma,
                            Expect::Colon | Expect::Comma => return None,
                        };
                    }
                    at = end;
                }
                b':' if top => {
                    if expect != Expect::Colon {
                        return None;
                    }
                    expect = Expect::Value;
                    let twice = match key {
                        Key::Usage => found.usage.replace(at + 1).is_some(),
                        Key::Choices => found.choices.replace(at + 1).is_some(),
                        Key::Other => false,
                    };
                    if twice {
                        return None;
                    }
                    if let Key::Usage = key
                        && let Some((tokens, end)) = PlainUsage::read(json, at + 1)
                    {
                        found.plain_usage = Some(tokens);
                        expect = Expect::Comma;
                        at = end;
                        continue;
                    }
                }
                b',' if top => {
                    if expect != Expect::Comma {
                        return None;
                    }
                    expect = Expect::Key;
                }
                b'{' | b'[' => {
                    if top {
                        if expect != Expect::Value {
                            return None;
                        }
                        expect = Expect::Comma;
                    }
                    open.push(byte);
                }
                b'}' | b']' => {
                    if !open.pop(byte) {
                        return None;
                    }
                    if open.depth() == 0 {
                        let closes = matches!(expect, Expect::FirstKey | Expect::Comma);
                        let rest = json.get(at + 1..)?;
                        return (closes && skip_whitespace(rest, 0) == rest.len()).then_some(found);
                    }
                }
                _ if top => match expect {
                    Expect::Value => expect = Expect::Comma,
                    Expect::Comma => {}
                    Expect::FirstKey | Expect::Key | Expect::Colon => return None,
                },
                _ => {}
            }
            at += 1;
        }
        None
    }
}

impl Key {
    /// The key `quoted` (with its quotes) names; one with escapes is decoded first, as the
    /// full parse did (`"us\u0061ge"` is `usage`). `None` if its escapes are not JSON.
    fn named(quoted: &[u8], escaped: bool) -> Option<Self> {
        let key = |name: &[u8]| match name {
            b"usage" => Self::Usage,
            b"choices" => Self::Choices,
            _ => Self::Other,
        };
        if escaped {
            let name: String = serde_json::from_slice(quoted).ok()?;
            return Some(key(name.as_bytes()));
        }
        Some(key(quoted.get(1..quoted.len().saturating_sub(1))?))
    }
}

/// A `usage` value written plainly, as providers write it: null, or an object whose keys
/// have no escapes and whose values are counts (digits) or null, but for
/// `prompt_tokens_details` and `completion_tokens_details`, null or objects of the same
/// kind. Within these bounds serde's answer is plain, and reading the value by hand costs a
/// fraction of serde's; any other value (a key twice, a figure that is not a count, a
/// string, an array, …) is left to serde, which answers as it always has.
struct PlainUsage<'a> {
    json: &'a [u8],
    at: usize,
}

impl<'a> PlainUsage<'a> {
    /// The figures of the plain `usage` value starting at `at` (after whitespace), `None` in
    /// them if it is null, and the index just past it; `None` if it is not plain.
    fn read(json: &'a [u8], at: usize) -> Option<(Option<Tokens>, usize)> {
        let mut plain = Self { json, at };
        plain.whitespace();
        if plain.literal_null() {
            return Some((None, plain.at));
        }
        let mut tokens = Tokens::default();
        let (mut total, mut cache_hit, mut kimi_hit) = (None, None, None);
        let mut seen = [false; 7];
        plain.object(USAGE_ORDER, |plain, key| {
            let (field, figure) = match key {
                Some(PROMPT_TOKENS) => (0, &mut tokens.prompt),
                Some(COMPLETION_TOKENS) => (1, &mut tokens.completion),
                Some(PROMPT_DETAILS) => {
                    let [cached, audio, written] = plain.details(PROMPT_DETAILS_ORDER)?;
                    tokens.cached_prompt = cached;
                    tokens.audio_prompt = audio;
                    tokens.cache_write = written;
                    return once(&mut seen[2]);
                }
                Some(COMPLETION_DETAILS) => {
                    let [reasoning, audio, _] = plain.details(COMPLETION_DETAILS_ORDER)?;
                    tokens.reasoning = reasoning;
                    tokens.audio_completion = audio;
                    return once(&mut seen[3]);
                }
                Some(TOTAL_TOKENS) => {
                    total = plain.count()?;
                    return once(&mut seen[4]);
                }
                Some(PROMPT_CACHE_HIT) => {
                    cache_hit = plain.count()?;
                    return once(&mut seen[5]);
                }
                Some(KIMI_CACHE_HIT) => {
                    kimi_hit = plain.count()?;
                    return once(&mut seen[6]);
                }
                // Any other key: a count or null, not read.
                _ => return plain.count().map(drop),
            };
            *figure = plain.count()?.unwrap_or(0);
            once(&mut seen[field])
        })?;
        let Tokens {
            prompt,
            completion,
            cached_prompt,
            reasoning,
            cache_write,
            cache_write_1h: _,
            audio_prompt,
            audio_completion,
            unshown: _,
        } = tokens;
        let tokens = Tokens {
            audio_prompt,
            audio_completion,
            ..Tokens::openai(
                prompt,
                completion,
                cached_prompt,
                reasoning,
                total,
                cache_hit.max(kimi_hit),
                cache_write,
            )
        };
        Some((Some(tokens), plain.at))
    }

    /// A details object's figures, those of the first three keys of `order` (0 when missing
    /// or null, or the whole is null); its keys are expected in `order` (see
    /// [`Self::object`]).
    fn details(&mut self, order: &[KeyName]) -> Option<[u64; 3]> {
        let mut figures = [0; 3];
        if self.literal_null() {
            return Some(figures);
        }
        let mut seen = [false; 3];
        self.object(order, |plain, key| {
            let count = plain.count()?;
            match key {
                Some(at) if at < figures.len() => {
                    figures[at] = count.unwrap_or(0);
                    once(&mut seen[at])
                }
                _ => Some(()),
            }
        })?;
        Some(figures)
    }

    /// An object: `{`, then for each key (read without escapes) `value` reads its value, told
    /// the key's index in `order` (`None` for a key not in it). Keys are expected in `order`,
    /// the order providers write them in (each name with its closing quote): a key that is
    /// the one expected next is known by one comparison, without a search for its string's
    /// end; any other is searched for and looked up in `order`, and the next expected is
    /// still looked for after it.
    fn object(
        &mut self,
        order: &[KeyName],
        mut value: impl FnMut(&mut Self, Option<usize>) -> Option<()>,
    ) -> Option<()> {
        self.byte(b'{')?;
        self.whitespace();
        if self.byte(b'}').is_some() {
            return Some(());
        }
        let mut next = 0;
        loop {
            self.whitespace();
            self.byte(b'"')?;
            let rest = self.json.get(self.at..)?;
            let key = match order.get(next) {
                // No quote or backslash in these names: the quote after one ends the string.
                Some(expected) if expected.starts(rest) => {
                    self.at += expected.quoted.len();
                    next += 1;
                    Some(next - 1)
                }
                _ => match string_end(self.json, self.at)? {
                    // serde decodes escapes: its business.
                    (_, true) => return None,
                    (end, false) => {
                        let name = self.json.get(self.at..end)?;
                        // serde refuses a raw control character in a string: so does this.
                        if name.iter().any(|&byte| byte < 0x20) {
                            return None;
                        }
                        self.at = end + 1;
                        order
                            .iter()
                            .position(|expected| expected.quoted.strip_suffix(b"\"") == Some(name))
                    }
                },
            };
            self.whitespace();
            self.byte(b':')?;
            self.whitespace();
            value(self, key)?;
            self.whitespace();
            if self.byte(b'}').is_some() {
                return Some(());
            }
            self.byte(b',')?;
        }
    }

    /// A count or null: digits without a leading zero, fraction or exponent, within `u64`.
    fn count(&mut self) -> Option<Option<u64>> {
        if self.literal_null() {
            return Some(None);
        }
        let start = self.at;
        let mut count = 0u64;
        while let Some(&digit @ b'0'..=b'9') = self.json.get(self.at) {
            count = count
                .checked_mul(10)?
                .checked_add(u64::from(digit - b'0'))?;
            self.at += 1;
        }
        let len = self.at - start;
        let leading_zero = len > 1 && self.json.get(start) == Some(&b'0');
        if len == 0 || leading_zero || matches!(self.json.get(self.at), Some(b'.' | b'e' | b'E')) {
            return None;
        }
        Some(Some(count))
    }

    /// `null` (followed by what may follow a value, which the caller checks).
    fn literal_null(&mut self) -> bool {
        let null = self
            .json
            .get(self.at..)
            .is_some_and(|rest| rest.starts_with(b"null"));
        if null {
            self.at += 4;
        }
        null
    }

    fn byte(&mut self, expected: u8) -> Option<()> {
        (self.json.get(self.at) == Some(&expected)).then(|| self.at += 1)
    }

    fn whitespace(&mut self) {
        self.at = skip_whitespace(self.json, self.at);
    }
}

/// The keys of `usage` and of its two details objects in the order OpenAI writes them, each
/// name with its closing quote, for [`PlainUsage::object`] to expect; a details object's
/// figure is its first key.
const USAGE_ORDER: &[KeyName] = &[
    KeyName::new(b"prompt_tokens\""),
    KeyName::new(b"completion_tokens\""),
    KeyName::new(b"total_tokens\""),
    KeyName::new(b"prompt_tokens_details\""),
    KeyName::new(b"completion_tokens_details\""),
    // DeepSeek's cache hits (it writes them before `total_tokens`: looked up, not expected).
    KeyName::new(b"prompt_cache_hit_tokens\""),
    // Moonshot's (Kimi's).
    KeyName::new(b"cached_tokens\""),
];
/// The indices in [`USAGE_ORDER`] of the keys read.
const PROMPT_TOKENS: usize = 0;
const COMPLETION_TOKENS: usize = 1;
const TOTAL_TOKENS: usize = 2;
const PROMPT_DETAILS: usize = 3;
const COMPLETION_DETAILS: usize = 4;
const PROMPT_CACHE_HIT: usize = 5;
const KIMI_CACHE_HIT: usize = 6;
/// Read: `cached_tokens` and `cache_write_tokens` (OpenAI writes it last, when at all).
const PROMPT_DETAILS_ORDER: &[KeyName] = &[
    KeyName::new(b"cached_tokens\""),
    KeyName::new(b"audio_tokens\""),
    KeyName::new(b"cache_write_tokens\""),
];
const COMPLETION_DETAILS_ORDER: &[KeyName] = &[
    KeyName::new(b"reasoning_tokens\""),
    KeyName::new(b"audio_tokens\""),
    KeyName::new(b"accepted_prediction_tokens\""),
    KeyName::new(b"rejected_prediction_tokens\""),
];

/// A key's name with its closing quote, as [`PlainUsage::object`] expects it next, and the
/// same bytes as two 16-byte words with a mask of their length: the text is compared with
/// it word by word, where a comparison of slices calls `memcmp` (about 20 instructions a key
/// of the 11 in an OpenAI `usage`).
struct KeyName {
    quoted: &'static [u8],
    words: [u128; 2],
    masks: [u128; 2],
}

impl KeyName {
    const WIDTH: usize = 32;

    /// `quoted` padded with zeros; it must be at most [`Self::WIDTH`] bytes (checked when the
    /// constant is built).
    const fn new(quoted: &'static [u8]) -> Self {
        assert!(
            quoted.len() <= Self::WIDTH,
            "a key name longer than KeyName::WIDTH"
        );
        let (mut words, mut masks) = ([[0u8; 16]; 2], [[0u8; 16]; 2]);
        let mut at = 0;
        while at < quoted.len() {
            words[at / 16][at % 16] = quoted[at];
            masks[at / 16][at % 16] = 0xff;
            at += 1;
        }
        Self {
            quoted,
            words: [u128::from_le_bytes(words[0]), u128::from_le_bytes(words[1])],
            masks: [u128::from_le_bytes(masks[0]), u128::from_le_bytes(masks[1])],
        }
    }

    /// Whether `text` starts with the name (and its quote).
    fn starts(&self, text: &[u8]) -> bool {
        let Some(head) = text.first_chunk::<{ Self::WIDTH }>() else {
            // Near the end of the text: as a slice.
            return text.starts_with(self.quoted);
        };
        let differ = |i: usize| {
            let mut word = [0; 16];
            word.copy_from_slice(&head[16 * i..16 * (i + 1)]);
            (u128::from_le_bytes(word) ^ self.words[i]) & self.masks[i]
        };
        differ(0) | differ(1) == 0
    }
}

/// Marks a field read: `None` if it was already, as serde refuses a field twice.
fn once(seen: &mut bool) -> Option<()> {
    (!std::mem::replace(seen, true)).then_some(())
}

/// The index of the quote that ends the string whose content starts at `from`, and whether
/// the string has escapes. `None` if it does not end.
fn string_end(json: &[u8], mut from: usize) -> Option<(usize, bool)> {
    let mut escaped = false;
    loop {
        let at = from + memchr2(b'"', b'\\', json.get(from..)?)?;
        if json.get(at) == Some(&b'"') {
            return Some((at, escaped));
        }
        // The escaped byte is skipped, whatever it is: a quote or backslash there is text.
        escaped = true;
        from = at + 2;
    }
}

/// The index of the first byte at or after `from` that is not JSON whitespace.
fn skip_whitespace(json: &[u8], mut from: usize) -> usize {
    // Compact answers have none: the first test is usually the last.
    while let Some(b' ' | b'\t' | b'\n' | b'\r') = json.get(from) {
        from += 1;
    }
    from
}

/// The index of the last byte of `json` that is not JSON whitespace.
fn skip_whitespace_back(json: &[u8]) -> Option<usize> {
    json.iter()
        .rposition(|byte| !matches!(byte, b' ' | b'\t' | b'\n' | b'\r'))
}

/// Whether the `choices` value at the start of `value` holds no choice: `Some(true)` for an
/// empty array or `null`, `Some(false)` for an array with elements, `None` for anything else
/// (the full parse refused it).
fn empty_choices(value: &[u8]) -> Option<bool> {
    let at = skip_whitespace(value, 0);
    match value.get(at)? {
        b'[' => Some(value.get(skip_whitespace(value, at + 1)) == Some(&b']')),
        b'n' => value.get(at..)?.starts_with(b"null").then_some(true),
        _ => None,
    }
}

/// The kinds of the brackets open around the scan, innermost last: a bit each (set for `[`),
/// the innermost 128 in a word and any outer ones in `spilled` (real answers never need it).
#[derive(Default)]
struct Brackets {
    depth: usize,
    bits: u128,
    spilled: Vec<u128>,
}

impl Brackets {
    fn depth(&self) -> usize {
        self.depth
    }

    fn push(&mut self, open: u8) {
        if self.depth > 0 && self.depth.is_multiple_of(128) {
            self.spilled.push(std::mem::take(&mut self.bits));
        }
        self.bits = (self.bits << 1) | u128::from(open == b'[');
        self.depth += 1;
    }

    /// Closes the innermost bracket with `close`: false if none is open or it is of the
    /// other kind.
    fn pop(&mut self, close: u8) -> bool {
        if self.depth == 0 || (self.bits & 1 == 1) != (close == b']') {
            return false;
        }
        self.bits >>= 1;
        self.depth -= 1;
        if self.depth > 0 && self.depth.is_multiple_of(128) {
            self.bits = self.spilled.pop().unwrap_or_default();
        }
        true
    }
}

/// How common a byte is in JSON text, for memchr's searcher to pick the two bytes of a key
/// it looks for first: its default ranking, made for prose and code, takes the quote for the
/// rarest byte of `"content"`, so every `"c` of a chunk (`"chatcmpl-…"`, `"created"`,
/// `"choices"`, …) was a candidate to check. Here quotes and JSON's other punctuation and
/// digits are the most common bytes, and letters rank by their frequency in English.
pub(super) struct JsonRank;

impl memchr::arch::all::packedpair::HeuristicFrequencyRank for JsonRank {
    fn rank(&self, byte: u8) -> u8 {
        const ENGLISH: &[u8; 26] = b"etaoinshrdlcumwfgypbvkjxqz";
        match byte {
            b'"' | b':' | b',' | b'{' | b'}' | b'[' | b']' | b' ' | b'0'..=b'9' => 255,
            b'a'..=b'z' => {
                let place = ENGLISH.iter().position(|&c| c == byte).unwrap_or(25);
                // 250 for `e` down to 200 for `z`.
                250 - 2 * u8::try_from(place).unwrap_or(25)
            }
            _ => 100,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use proptest::prelude::*;

    /// `usage_of` as it was: the whole text parsed by serde_json into `{usage, choices}`.
    /// What the scan must answer for every JSON text.
    fn by_full_parse(json: &str) -> Option<(Tokens, bool)> {
        #[derive(serde::Deserialize)]
        struct WithUsage {
            #[serde(default)]
            usage: Option<Usage>,
            #[serde(default)]
            choices: Option<Vec<serde::de::IgnoredAny>>,
        }
        if no_usage_figures(json) {
            return None;
        }
        let parsed: WithUsage = serde_json::from_str(json).ok()?;
        let usage_only = parsed.choices.is_none_or(|c| c.is_empty());
        Some((parsed.usage?.tokens(), usage_only))
    }

    /// What [`usage_of_answer`] must answer for every JSON text: serde reads the top-level
    /// object's members and keeps the values of those whose key is written `"usage"` without
    /// escapes (serde_json hands such a key over borrowed from the text, and decodes one with
    /// escapes into a buffer); the one such value is the figures.
    fn answer_by_full_parse(json: &str) -> Option<Tokens> {
        use serde::de::{IgnoredAny, MapAccess, Visitor};
        use std::fmt;

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
        struct UsageMembers(Vec<Option<Usage>>);
        impl<'de> Deserialize<'de> for UsageMembers {
            fn deserialize<D: serde::Deserializer<'de>>(object: D) -> Result<Self, D::Error> {
                struct Members;
                impl<'de> Visitor<'de> for Members {
                    type Value = UsageMembers;
                    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                        f.write_str("an object")
                    }
                    fn visit_map<A: MapAccess<'de>>(
                        self,
                        mut map: A,
                    ) -> Result<Self::Value, A::Error> {
                        let mut values = Vec::new();
                        while let Some(NamedUsagePlainly(usage)) = map.next_key()? {
                            if usage {
                                values.push(map.next_value::<Option<Usage>>()?);
                            } else {
                                map.next_value::<IgnoredAny>()?;
                            }
                        }
                        Ok(UsageMembers(values))
                    }
                }
                object.deserialize_map(Members)
            }
        }
        let UsageMembers(values) = serde_json::from_str(json).ok()?;
        let [value] = <[_; 1]>::try_from(values).ok()?;
        Some(value?.tokens())
    }

    /// The figures serde reads from the value after every `"usage"` followed by a colon in
    /// `text`, wherever it stands (overlapping occurrences too).
    fn usage_values(text: &str) -> Vec<Tokens> {
        let bytes = text.as_bytes();
        (0..bytes.len())
            .filter(|&at| bytes[at..].starts_with(USAGE_KEY))
            .filter_map(|at| {
                let colon = skip_whitespace(bytes, at + USAGE_KEY.len());
                (bytes.get(colon) == Some(&b':')).then_some(())?;
                let mut value = serde_json::Deserializer::from_slice(&bytes[colon + 1..]);
                Some(Option::<Usage>::deserialize(&mut value).ok()??.tokens())
            })
            .collect()
    }

    /// A JSON value as the generator builds it: objects keep their keys' order and may
    /// repeat a key, as a text can.
    #[derive(Debug, Clone)]
    enum Json {
        Null,
        Bool(bool),
        Number(&'static str),
        Text(String),
        Array(Vec<Json>),
        Object(Vec<(String, Json)>),
    }

    /// Writes a [`Json`] as text, with whitespace between its tokens and some characters of
    /// its strings escaped, both as the given picks say.
    struct Writer<'a> {
        out: String,
        spaces: &'a [u8],
        escapes: &'a [bool],
        picked: usize,
    }

    impl Writer<'_> {
        fn write(value: &Json, spaces: &[u8], escapes: &[bool]) -> String {
            let mut writer = Writer {
                out: String::new(),
                spaces,
                escapes,
                picked: 0,
            };
            writer.value(value);
            writer.out
        }

        fn pick(&mut self) -> usize {
            self.picked += 1;
            self.picked
        }

        fn space(&mut self) {
            let at = self.pick() % self.spaces.len().max(1);
            let space = match self.spaces.get(at).copied().unwrap_or(0) {
                0..=3 => "",
                4 => " ",
                5 => "\n",
                6 => "\t",
                7 => "\r\n  ",
                // Indentation as OpenAI's whole answers have it, deeper, and mixed.
                8 => "\n      ",
                9 => "\n            ",
                _ => "  \t         \n ",
            };
            self.out.push_str(space);
        }

        fn escape(&mut self) -> bool {
            let at = self.pick() % self.escapes.len().max(1);
            self.escapes.get(at).copied().unwrap_or(false)
        }

        fn string(&mut self, text: &str) {
            self.out.push('"');
            for c in text.chars() {
                match c {
                    '"' => self.out.push_str("\\\""),
                    '\\' => self.out.push_str("\\\\"),
                    c if c < ' ' => self.out.push_str(&format!("\\u{:04x}", c as u32)),
                    c if self.escape() => {
                        let mut units = [0; 2];
                        for unit in c.encode_utf16(&mut units) {
                            self.out.push_str(&format!("\\u{unit:04X}"));
                        }
                    }
                    c => self.out.push(c),
                }
            }
            self.out.push('"');
        }

        fn value(&mut self, value: &Json) {
            self.space();
            match value {
                Json::Null => self.out.push_str("null"),
                Json::Bool(b) => self.out.push_str(if *b { "true" } else { "false" }),
                Json::Number(n) => self.out.push_str(n),
                Json::Text(text) => self.string(text),
                Json::Array(items) => {
                    self.out.push('[');
                    for (i, item) in items.iter().enumerate() {
                        if i > 0 {
                            self.out.push(',');
                        }
                        self.value(item);
                    }
                    self.space();
                    self.out.push(']');
                }
                Json::Object(fields) => {
                    self.out.push('{');
                    for (i, (key, value)) in fields.iter().enumerate() {
                        if i > 0 {
                            self.out.push(',');
                        }
                        self.space();
                        self.string(key);
                        self.space();
                        self.out.push(':');
                        self.value(value);
                    }
                    self.space();
                    self.out.push('}');
                }
            }
            self.space();
        }
    }

    /// Keys of answers and of their nested objects, the quoted `usage` among them, and
    /// `usage` in other keys.
    fn key() -> impl Strategy<Value = String> {
        prop::sample::select(vec![
            "usage",
            "choices",
            "id",
            "index",
            "message",
            "delta",
            "content",
            "prompt_tokens",
            "completion_tokens",
            "prompt_tokens_details",
            "cached_tokens",
            "reasoning_tokens",
            "x\"usage",
            "usage\\",
            "\"usage\"",
            "usagé",
            "",
        ])
        .prop_map(String::from)
    }

    /// Strings holding what looks like keys, brackets and escapes, and non-ASCII text.
    fn text() -> impl Strategy<Value = String> {
        prop::collection::vec(
            prop::sample::select(vec![
                "usage",
                "\"usage\":{\"prompt_tokens\":1}",
                "\"usage\":null",
                "\\",
                "\"",
                "{",
                "}",
                "[",
                "]",
                ",",
                ":",
                " ",
                "\u{e9}",
                "\u{2028}",
                "\u{1F600}",
                "\n",
                "\u{1}",
                "[mock] tok1",
            ]),
            0..6,
        )
        .prop_map(|pieces| pieces.concat())
    }

    fn number() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec![
            "0",
            "2",
            "7",
            "2006",
            "-3",
            "1.5",
            "1e3",
            "18446744073709551615",
            "18446744073709551616",
        ])
    }

    fn any_json() -> impl Strategy<Value = Json> {
        let leaf = prop_oneof![
            Just(Json::Null),
            any::<bool>().prop_map(Json::Bool),
            number().prop_map(Json::Number),
            text().prop_map(Json::Text),
        ];
        leaf.prop_recursive(4, 32, 5, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(Json::Array),
                prop::collection::vec((key(), inner), 0..5).prop_map(Json::Object),
            ]
        })
    }

    /// A token count: mostly a count, sometimes null or not a count at all.
    fn figure() -> impl Strategy<Value = Json> {
        prop_oneof![
            12 => prop::sample::select(vec!["0", "2", "5", "2006", "18446744073709551615"])
                .prop_map(Json::Number),
            1 => Just(Json::Null),
            1 => number().prop_map(Json::Number),
        ]
    }

    fn details(figure_name: &'static str) -> impl Strategy<Value = Json> {
        prop_oneof![
            4 => prop::collection::vec(
                (prop::sample::select(vec![figure_name, "audio_tokens", "usage"]), figure()),
                0..3,
            )
            .prop_map(|fields| {
                Json::Object(fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
            }),
            1 => Just(Json::Null),
            1 => any_json(),
        ]
    }

    /// A `usage` value: mostly an object of figures in any order, among other fields.
    fn usage_value() -> impl Strategy<Value = Json> {
        let field = prop_oneof![
            figure().prop_map(|v| ("prompt_tokens".to_owned(), v)),
            figure().prop_map(|v| ("completion_tokens".to_owned(), v)),
            figure().prop_map(|v| ("total_tokens".to_owned(), v)),
            figure().prop_map(|v| ("prompt_cache_hit_tokens".to_owned(), v)),
            details("cached_tokens").prop_map(|v| ("prompt_tokens_details".to_owned(), v)),
            details("reasoning_tokens").prop_map(|v| ("completion_tokens_details".to_owned(), v)),
            (key(), any_json()),
        ];
        prop_oneof![
            6 => prop::collection::vec(field, 0..6).prop_map(Json::Object),
            1 => Just(Json::Null),
            1 => any_json(),
        ]
    }

    /// A choice: an object whose fields may be a `usage` of their own.
    fn choice() -> impl Strategy<Value = Json> {
        let value = prop_oneof![any_json(), usage_value()];
        prop::collection::vec((key(), value), 0..5).prop_map(Json::Object)
    }

    fn choices_value() -> impl Strategy<Value = Json> {
        prop_oneof![
            2 => Just(Json::Array(Vec::new())),
            4 => prop::collection::vec(choice(), 1..3).prop_map(Json::Array),
            1 => Just(Json::Null),
            1 => any_json(),
        ]
    }

    /// An answer: mostly a `usage` and `choices` among other fields, in any order (and now
    /// and then a key twice, as the others' keys may be either).
    fn answer() -> impl Strategy<Value = Json> {
        (
            prop::option::weighted(0.9, usage_value()),
            prop::option::weighted(0.8, choices_value()),
            prop::collection::vec((key(), any_json()), 0..5),
        )
            .prop_map(|(usage, choices, mut fields)| {
                fields.extend(usage.map(|v| ("usage".to_owned(), v)));
                fields.extend(choices.map(|v| ("choices".to_owned(), v)));
                fields
            })
            .prop_shuffle()
            .prop_map(Json::Object)
    }

    fn written() -> impl Strategy<Value = String> {
        (
            answer(),
            prop::collection::vec(0u8..11, 1..16),
            prop::collection::vec(prop::bool::weighted(0.1), 1..16),
        )
            .prop_map(|(answer, spaces, escapes)| Writer::write(&answer, &spaces, &escapes))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        /// For every JSON answer the scan reads what the full parse read.
        #[test]
        fn the_scan_answers_as_the_full_parse(json in written()) {
            prop_assert!(serde_json::from_str::<serde_json::Value>(&json).is_ok(), "{json}");
            prop_assert_eq!(usage_of(&json), by_full_parse(&json), "{}", json);
        }

        /// An answer followed in pieces, as one refused for memory is, keeps the `usage`
        /// value the whole answer's reading reads, wherever the pieces split.
        #[test]
        fn an_answer_followed_in_pieces_is_read_as_a_whole_one(
            json in written(),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
        ) {
            let mut at: Vec<usize> = cuts.iter().map(|c| c.index(json.len() + 1)).collect();
            at.sort_unstable();
            let mut passing = UsageInPassing::default();
            let mut from = 0;
            for to in at.into_iter().chain([json.len()]) {
                passing.feed(&json.as_bytes()[from..to]);
                from = to;
            }
            prop_assert_eq!(
                passing.value().and_then(usage_of_value),
                usage_of_answer(&json),
                "{}", json
            );
        }

        /// For every JSON answer, a whole answer's walk from its first `"usage"` reads what
        /// serde reads as the top-level object's member named `usage`.
        #[test]
        fn a_whole_answer_is_read_as_serde_reads_its_usage_member(json in written()) {
            prop_assert_eq!(usage_of_answer(&json), answer_by_full_parse(&json), "{}", json);
        }

        /// Whatever the text (an answer, pieces, an answer's end after pieces that are not
        /// JSON, an answer cut off), the figures a whole answer is read for are those of a
        /// `"usage":` value in it: never made up, never a string's content.
        #[test]
        fn figures_read_from_any_text_are_a_usage_value_in_it(
            json in written(),
            pieces in prop::collection::vec(fragment(), 0..24),
            cut in any::<prop::sample::Index>(),
        ) {
            let at = cut.index(json.len() + 1);
            let (head, tail) = (json.get(..at), json.get(at..));
            let texts = [
                Some(pieces.concat()),
                tail.map(|tail| pieces.concat() + tail),
                head.map(str::to_owned),
                Some(json),
            ];
            for text in texts.into_iter().flatten() {
                if let Some(tokens) = usage_of_answer(&text) {
                    prop_assert!(usage_values(&text).contains(&tokens), "{}", text);
                }
            }
        }

        /// An answer cut off anywhere before its closing brace counts nothing.
        #[test]
        fn a_cut_off_answer_counts_nothing(json in written(), cut in any::<prop::sample::Index>()) {
            let whole = json.trim_end().len();
            if let Some(part) = json.get(..cut.index(whole)) {
                prop_assert_eq!(usage_of(part), None);
            }
        }
    }

    /// The check as it was written with `str::match_indices`: what the memchr search must
    /// agree with on every input.
    fn no_usage_figures_by_match_indices(json: &str) -> bool {
        json.match_indices("\"usage\"").all(|(at, key)| {
            json[at + key.len()..]
                .trim_start()
                .strip_prefix(':')
                .is_some_and(|value| value.trim_start().starts_with("null"))
        })
    }

    /// Pieces of chunks and bodies: keys, nulls, figures, overlapping and escaped quotes,
    /// ASCII and non-ASCII whitespace (which `trim_start` skips too).
    fn fragment() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec![
            "\"usage\"",
            "\"usage\"usage\"",
            ":",
            " ",
            "\n",
            "\u{a0}",
            "\u{2028}",
            "null",
            "nul",
            "{",
            "}",
            "[",
            "]",
            ",",
            "\"",
            "\\\"",
            "\"prompt_tokens\":3",
            "\"choices\":[]",
            "\"content\":\"",
            "usage",
            "\u{e9}",
            "0",
        ])
    }

    proptest! {
        /// The memchr search skips the same inputs as `match_indices` did.
        #[test]
        fn the_usage_key_search_agrees_with_match_indices(
            pieces in prop::collection::vec(fragment(), 0..24),
        ) {
            let json = pieces.concat();
            prop_assert_eq!(no_usage_figures(&json), no_usage_figures_by_match_indices(&json));
        }

        /// Whatever the pieces make, JSON or not, the scan never panics, and where they make
        /// JSON it answers as the full parse did.
        #[test]
        fn any_text_is_read_without_panic(pieces in prop::collection::vec(fragment(), 0..24)) {
            let json = pieces.concat();
            let read = usage_of(&json);
            if serde_json::from_str::<serde_json::Value>(&json).is_ok() {
                prop_assert_eq!(read, by_full_parse(&json));
            }
        }

        /// Whatever the pieces make, following them never panics, and where they make JSON
        /// it reads what the whole answer's reading reads.
        #[test]
        fn any_text_is_followed_without_panic(pieces in prop::collection::vec(fragment(), 0..24)) {
            let mut passing = UsageInPassing::default();
            for piece in &pieces {
                passing.feed(piece.as_bytes());
            }
            let json = pieces.concat();
            if serde_json::from_str::<serde_json::Value>(&json).is_ok() {
                prop_assert_eq!(passing.value().and_then(usage_of_value), usage_of_answer(&json));
            }
        }
    }

    /// Every name [`PlainUsage::object`] expects.
    fn key_names() -> impl Iterator<Item = &'static KeyName> {
        USAGE_ORDER
            .iter()
            .chain(PROMPT_DETAILS_ORDER)
            .chain(COMPLETION_DETAILS_ORDER)
    }

    proptest! {
        /// The word-wise comparison answers as the slice's: texts made of names, their
        /// prefixes, near misses and quotes, long and short (the last 32 bytes of a text are
        /// compared as a slice).
        #[test]
        fn a_key_name_is_told_as_starts_with_tells_it(
            pieces in prop::collection::vec(
                prop::sample::select(vec![
                    "prompt_tokens\"", "prompt_tokens", "prompt_tokens_details\"", "completion_",
                    "tokens\"", "reasoning_tokens\"", "cached_tokens\"", "audio_tokens\"",
                    "accepted_prediction_tokens\"", "rejected_prediction_tokens\"",
                    "total_tokens\"", "_details\"", "\"", ":", "0,", "Prompt", "x", "\\u0000",
                ]),
                0..8,
            ),
        ) {
            let text = pieces.concat();
            for name in key_names() {
                prop_assert_eq!(
                    name.starts(text.as_bytes()),
                    text.as_bytes().starts_with(name.quoted),
                    "{:?} in {:?}", String::from_utf8_lossy(name.quoted), text
                );
            }
        }
    }

    /// `text` with its top-level object's last member a null `usage`, written compactly as
    /// streams write it; `None` unless it ends with an object's `}`.
    fn with_null_usage_last(text: &str) -> Option<String> {
        let head = text.trim_end().strip_suffix('}')?.trim_end();
        let comma = if head.ends_with('{') { "" } else { "," };
        Some(format!(r#"{head}{comma}"usage":null}}"#))
    }

    /// `text` ended as [`with_null_usage_last`] ends it, then padded as OpenAI pads a chunk:
    /// `"obfuscation"` after `usage`.
    fn with_null_usage_and_padding_last(text: &str, padding: &str) -> Option<String> {
        let json = with_null_usage_last(text)?;
        let head = json.strip_suffix('}')?;
        Some(format!(r#"{head},"obfuscation":"{padding}"}}"#))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        /// An answer whose last member is a null `usage` counts nothing, as for the full
        /// parse: its `usage` is that null one, or it names `usage` twice.
        #[test]
        fn a_null_usage_last_is_read_as_the_full_parse(
            json in written(),
            padding in "[A-Za-z0-9]{0,16}",
        ) {
            let endings = [
                with_null_usage_last(&json),
                with_null_usage_and_padding_last(&json, &padding),
            ];
            for json in endings.into_iter().flatten() {
                prop_assert!(ends_with_null_usage(json.as_bytes()), "{json}");
                prop_assert_eq!(usage_of(&json), by_full_parse(&json), "{}", json);
                prop_assert_eq!(usage_of(&json), None);
            }
        }

        /// Any text, JSON or not, that ends in a null `usage` is answered as the search and
        /// the scan answered it.
        #[test]
        fn the_look_at_the_end_agrees_with_the_search_and_scan(
            pieces in prop::collection::vec(fragment(), 0..24),
            tail in prop::sample::select(vec![
                r#","usage":null}"#,
                r#"{"usage":null}"#,
                r#"\","usage":null}"#,
                r#""usage":null}"#,
                r#"\"usage":null}"#,
                r#","usage":null} "#,
                r#","usage":null}}"#,
                r#","usage": null}"#,
                r#","usage":null,"obfuscation":"Ab3"}"#,
                r#"{"usage":null,"obfuscation":""}"#,
                r#","usage":null,"obfuscation":"Ab3"} "#,
                r#","usage":null,"obfuscation":"Ab3"}}"#,
                r#""usage":null,"obfuscation":"Ab3"}"#,
                r#"","usage":null,"obfuscation":"Ab3"}"#,
                r#","usage":null,"obfuscation":"A"b"}"#,
                r#","usage":null,"obfuscation":"A\"}"#,
                r#","usage":null,"obfuscation":Ab3"}"#,
                r#","usage":null,"obfuscation":"Ab3}"#,
                r#","usage":null ,"obfuscation":"Ab3"}"#,
                r#","usage":null,"obfuscation": "Ab3"}"#,
                r#","usage":null,"obfuscation":"x","obfuscation":"y"}"#,
                r#","usage":null,"other":"Ab3"}"#,
                r#","usage":null,"obfuscation":"a","usage":null}"#,
                r#","obfuscation":"Ab3"}"#,
            ]),
        ) {
            let json = pieces.concat() + tail;
            prop_assert_eq!(usage_of(&json), read_usage(&json), "{}", json);
        }
    }

    #[test]
    fn a_chunk_ending_in_a_null_usage_is_told_by_its_end() {
        for (json, told) in [
            (
                r#"{"choices":[{"delta":{"content":"x"}}],"usage":null}"#,
                true,
            ),
            ("{\"usage\":null}\r\n", true),
            (r#"{"usage":{"prompt_tokens":1},"usage":null}"#, true),
            // Not the top-level object's last member, or not a key of its own.
            (r#"{"choices":[{"usage":null}]}"#, false),
            (r#"{"a":{"usage":null}}"#, false),
            (r#"{"a":"x\"usage":null}"#, false),
            (r#"{"usage": null}"#, false),
            (r#"{"usage":{"prompt_tokens":1}}"#, false),
            // OpenAI's padding after the null `usage`.
            (
                r#"{"choices":[{"delta":{"content":"x"}}],"usage":null,"obfuscation":"Ab3"}"#,
                true,
            ),
            (r#"{"usage":null,"obfuscation":""}"#, true),
            // A padding with a quote or backslash in it, another key, or not after `usage`.
            (r#"{"usage":null,"obfuscation":"a"b"}"#, false),
            (r#"{"usage":null,"obfuscation":"a\"}"#, false),
            (r#"{"usage":null,"other":"Ab3"}"#, false),
            (r#"{"a":{"usage":null,"obfuscation":"Ab3"}}"#, false),
            (
                r#"{"usage":null,"obfuscation":"x","obfuscation":"y"}"#,
                false,
            ),
            (r#"{"a":"x"usage":null,"obfuscation":"Ab3"}"#, false),
        ] {
            assert_eq!(ends_with_null_usage(json.as_bytes()), told, "{json}");
        }
        // A key that only ends in `usage` hides nothing.
        let other_key = r#"{"usage":{"prompt_tokens":1},"a\"usage":null}"#;
        assert_eq!(usage_of(other_key), Some((tokens(1, 0), true)));
        assert_eq!(usage_of(other_key), by_full_parse(other_key));
        // A null `usage` last does not hide figures from a reading that finds them: there are
        // none to find.
        let twice = r#"{"usage":{"prompt_tokens":1},"usage":null}"#;
        assert_eq!(read_usage(twice), None);
        assert_eq!(by_full_parse(twice), None);
    }

    #[test]
    fn usage_in_the_order_providers_write_it_and_in_any_other_reads_the_same() {
        let openai = r#"{"prompt_tokens":11,"completion_tokens":5,"total_tokens":16,"prompt_tokens_details":{"cached_tokens":3,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":2,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}"#;
        let reordered = r#"{"total_tokens":16,"completion_tokens_details":{"audio_tokens":0,"reasoning_tokens":2},"prompt_tokens":11,"x":"prompt_tokens\"","prompt_tokens_details":{"audio_tokens":0,"cached_tokens":3},"completion_tokens":5}"#;
        // A name that only begins as the expected one does, or is it with escapes.
        let near = r#"{"prompt_tokens_x":1,"prompt_tokens":11,"completion_tokens":5,"prompt_tokens_details":{"cached_tokens":3},"completion_tokens_details":{"reasoning_tokens":2}}"#;
        let escaped = r#"{"prompt\u005ftokens":11}"#;
        let expected = Tokens {
            prompt: 11,
            completion: 5,
            cached_prompt: 3,
            reasoning: 2,
            ..Tokens::default()
        };
        for usage in [openai, reordered, near] {
            let answer = format!(r#"{{"choices":[],"usage":{usage}}}"#);
            assert_eq!(usage_of_answer(&answer), Some(expected), "{usage}");
            assert_eq!(usage_of(&answer), by_full_parse(&answer), "{usage}");
        }
        let answer = format!(r#"{{"usage":{escaped},"x":{{"usage":1}}}}"#);
        assert_eq!(usage_of(&answer), by_full_parse(&answer));
    }

    #[test]
    fn a_messages_answer_s_usage_value_is_found_as_a_chat_answer_s() {
        let message = r#"{"id":"msg_1","type":"message","content":[{"type":"tool_use","input":{"usage":{"input_tokens":99}}}],"usage":{"input_tokens":12,"cache_creation":{"ephemeral_5m_input_tokens":0},"output_tokens":5} }"#;
        let value = usage_value_of_answer(message.as_bytes()).unwrap();
        assert!(value.starts_with(br#"{"input_tokens":12,"#), "{value:?}");
        for json in [
            // Only nested, twice, cut off, or not at the end of the text.
            r#"{"content":[{"input":{"usage":{"input_tokens":99}}}]}"#,
            r#"{"usage":{"input_tokens":1},"usage":{"input_tokens":2}}"#,
            r#"{"usage":{"input_tokens":1}"#,
            r#"{"usage":{"input_tokens":1}} {}"#,
        ] {
            assert_eq!(usage_value_of_answer(json.as_bytes()), None, "{json}");
        }
    }

    #[test]
    fn a_whole_answer_reads_only_a_usage_key_written_plainly() {
        // Spelled with escapes, the key is not `usage` to a whole answer (nor to a stream's
        // search for figures, which finds none here).
        let escaped = r#"{"\u0075sage":{"prompt_tokens":1}}"#;
        assert_eq!(usage_of(escaped), None);
        assert_eq!(usage_of_answer(escaped), None);
        let nested_plain = r#"{"\u0075sage":{"prompt_tokens":1},"x":{"usage":{}}}"#;
        assert_eq!(usage_of_answer(nested_plain), None);
        // Beside the plain one, it is not a second `usage`.
        let both = r#"{"\u0075sage":{"prompt_tokens":1},"usage":{"prompt_tokens":2}}"#;
        assert_eq!(usage_of_answer(both), Some(tokens(2, 0)));
        for json in [escaped, nested_plain, both] {
            assert_eq!(usage_of_answer(json), answer_by_full_parse(json), "{json}");
        }
        // The plain name, as providers write it.
        let plain = r#"{"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":3}}"#;
        assert_eq!(usage_of_answer(plain), Some(tokens(2, 3)));
    }

    #[test]
    fn a_whole_answer_is_read_from_its_first_usage_to_its_end() {
        let mock = r#"{"id":"chatcmpl-1","object":"chat.completion","created":1764633600,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"say \"usage\": {\"prompt_tokens\": 9} [","refusal":null,"annotations":[]},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":2,"completion_tokens":5,"total_tokens":7,"prompt_tokens_details":{"cached_tokens":1,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":3,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}},"service_tier":"default","system_fingerprint":"fp_sluice_mock"}"#;
        let expected = Tokens {
            prompt: 2,
            completion: 5,
            cached_prompt: 1,
            reasoning: 3,
            ..Tokens::default()
        };
        assert_eq!(usage_of_answer(mock), Some(expected));
        // Cut off anywhere, it counts nothing: the top-level object never closes.
        for cut in 0..mock.len() {
            assert_eq!(usage_of_answer(&mock[..cut]), None, "cut at {cut}");
        }
        // An embeddings answer: its vectors come first, and are only searched.
        let vector = vec!["-0.0123456789"; 1536].join(",");
        let embeddings = format!(
            r#"{{"object":"list","data":[{{"object":"embedding","index":0,"embedding":[{vector}]}}],"model":"text-embedding-3-small","usage":{{"prompt_tokens":8,"total_tokens":8}}}}"#
        );
        assert_eq!(usage_of_answer(&embeddings), Some(tokens(8, 0)));
        // A `usage` nested before the top-level one (a tool's arguments, say) is passed by.
        let nested_first = r#"{"choices":[{"x":{"usage":{"prompt_tokens":1}}},{"usage":7}],"usage":{"prompt_tokens":4}}"#;
        assert_eq!(usage_of_answer(nested_first), Some(tokens(4, 0)));
        let nested_only = r#"{"choices":[{"usage":{"prompt_tokens":1}}],"model":"m"}"#;
        assert_eq!(usage_of_answer(nested_only), None);
        // A key that only ends in `usage` (its quote escaped) is not one.
        let quoted = r#"{"say \"usage":{"prompt_tokens":1}}"#;
        assert_eq!(usage_of_answer(quoted), None);
        // `choices` is not looked at; a whole answer never asks whether it is empty.
        let odd_choices = r#"{"choices":"none","choices":{},"usage":{"prompt_tokens":3}}"#;
        assert_eq!(usage_of_answer(odd_choices), Some(tokens(3, 0)));
        for json in [
            mock,
            &embeddings,
            nested_first,
            nested_only,
            quoted,
            odd_choices,
        ] {
            assert_eq!(usage_of_answer(json), answer_by_full_parse(json), "{json}");
        }
        // What follows the first `"usage"` is checked as the scan checks it.
        for json in [
            r#"{"usage":{"prompt_tokens":1},"usage":{"prompt_tokens":2}}"#,
            r#"{"usage":{"prompt_tokens":1},"x":{"a":[1,2}],"b":2}"#,
            r#"{"usage":{"prompt_tokens":1}}}"#,
            r#"{"usage":{"prompt_tokens":1}} x"#,
            r#"{"usage":{"prompt_tokens":1}}{}"#,
            r#"{"usage":{"prompt_tokens":1},"content":"unterminated}"#,
            r#"{"usage":{"prompt_tokens":1}]"#,
            r#"[{"usage":{"prompt_tokens":1}}]"#,
            r#"{"usage":"{\"prompt_tokens\":1}"}"#,
            r#"{"usage":{"prompt_tokens":-1}}"#,
            r#"{"usage":null}"#,
        ] {
            assert_eq!(usage_of_answer(json), None, "{json}");
        }
        // What comes before it is only searched: a beginning that is not JSON, which the
        // client receives as it is, does not stop the figures its end gives from counting.
        let garbled = r#"{"id":"x",[[}"choices":[{"#.to_owned() + r#""usage":{"prompt_tokens":5}}"#;
        assert_eq!(usage_of_answer(&garbled), Some(tokens(5, 0)));
    }

    fn tokens(prompt: u64, completion: u64) -> Tokens {
        Tokens {
            prompt,
            completion,
            ..Tokens::default()
        }
    }

    #[test]
    fn null_usage_is_skipped_but_figures_anywhere_are_parsed() {
        assert!(no_usage_figures(r#"{"choices":[{}]}"#));
        assert!(no_usage_figures(r#"{"choices":[{}],"usage" : null}"#));
        assert!(no_usage_figures(
            r#"{"choices":[{"delta":{"content":"\"usage\""}}]}"#
        ));
        assert!(!no_usage_figures(r#"{"usage":{"prompt_tokens":1}}"#));
        // A null somewhere else does not hide the real figures.
        let both = r#"{"choices":[{"delta":{"usage":null}}],"usage":{"prompt_tokens":1,"completion_tokens":2}}"#;
        assert!(!no_usage_figures(both));
        assert_eq!(usage_of(both), Some((tokens(1, 2), false)));
    }

    #[test]
    fn cached_prompt_tokens_are_read_from_the_prompt_details() {
        let body = r#"{"choices":[],"usage":{"prompt_tokens":2006,"completion_tokens":300,
            "prompt_tokens_details":{"cached_tokens":1920,"audio_tokens":0}}}"#;
        let expected = Tokens {
            cached_prompt: 1920,
            ..tokens(2006, 300)
        };
        assert_eq!(usage_of(body), Some((expected, true)));
        let details_null =
            r#"{"usage":{"prompt_tokens":3,"completion_tokens":1,"prompt_tokens_details":null}}"#;
        assert_eq!(usage_of(details_null).unwrap().0.cached_prompt, 0);
    }

    /// OpenAI's audio models count a prompt's audio and a spoken answer's in the details
    /// (priced apart when the route says): read in OpenAI's order and any other, as the whole
    /// parse reads them; a count that is not one is none, as the key was before it was read.
    #[test]
    fn audio_tokens_are_read_from_the_details() {
        let openai = r#"{"choices":[],"usage":{"prompt_tokens":30,"completion_tokens":50,"total_tokens":80,"prompt_tokens_details":{"cached_tokens":4,"audio_tokens":20},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":40,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}"#;
        let reordered = r#"{"choices":[],"usage":{"completion_tokens_details":{"audio_tokens":40},"prompt_tokens_details":{"audio_tokens":20,"cached_tokens":4},"prompt_tokens":30,"completion_tokens":50}}"#;
        let expected = Tokens {
            cached_prompt: 4,
            audio_prompt: 20,
            audio_completion: 40,
            ..tokens(30, 50)
        };
        for body in [openai, reordered] {
            assert_eq!(usage_of(body), Some((expected, true)), "{body}");
            assert_eq!(by_full_parse(body), Some((expected, true)), "{body}");
        }
        let odd = r#"{"choices":[],"usage":{"prompt_tokens":30,"completion_tokens":50,"prompt_tokens_details":{"audio_tokens":"20"}}}"#;
        assert_eq!(usage_of(odd).unwrap().0, tokens(30, 50));
    }

    /// Providers that write `usage` otherwise than OpenAI are read for what they bill.
    /// DeepSeek's cache hits are `prompt_cache_hit_tokens` (priced at the cached price, not
    /// the full one); xAI counts reasoning beside `completion_tokens`, inside `total_tokens`
    /// (billed as output: before, it went unpriced), Google's in the total alone (kept apart:
    /// see `Tokens::unshown`). OpenAI's own reasoning, inside the completion, is not counted
    /// twice; each read as the whole parse reads it.
    #[test]
    fn other_providers_cache_hits_and_reasoning_are_read_for_what_they_bill() {
        let deepseek = r#"{"choices":[],"usage":{"completion_tokens":5,"prompt_tokens":1000,"prompt_cache_hit_tokens":990,"prompt_cache_miss_tokens":10,"total_tokens":1005,"completion_tokens_details":{"reasoning_tokens":0}}}"#;
        let xai = r#"{"choices":[],"usage":{"prompt_tokens":10120,"completion_tokens":1499,"total_tokens":14428,"prompt_tokens_details":{"text_tokens":10120,"audio_tokens":0,"image_tokens":0,"cached_tokens":7},"completion_tokens_details":{"reasoning_tokens":2809,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}"#;
        let openai = r#"{"choices":[],"usage":{"prompt_tokens":100,"completion_tokens":500,"total_tokens":600,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":300,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}"#;
        // OpenAI's GPT-5.6 and later, and OpenRouter, report the prompt tokens written to the
        // cache (billed at the route's write price); Moonshot (Kimi) its cache hits at the top.
        let writes = r#"{"choices":[],"usage":{"prompt_tokens":10000,"completion_tokens":2,"total_tokens":10002,"prompt_tokens_details":{"cached_tokens":1000,"audio_tokens":0,"cache_write_tokens":8000}}}"#;
        let writes_first = r#"{"choices":[],"usage":{"prompt_tokens":10000,"completion_tokens":2,"prompt_tokens_details":{"cache_write_tokens":8000,"cached_tokens":1000}}}"#;
        let kimi = r#"{"choices":[],"usage":{"prompt_tokens":19,"completion_tokens":13,"total_tokens":32,"cached_tokens":12}}"#;
        // Google's OpenAI-compatible endpoint: a thinking model's thoughts only in the total
        // (billed as output), whole and on a stream's chunk.
        let gemini = r#"{"choices":[],"usage":{"completion_tokens":3,"prompt_tokens":9,"total_tokens":105}}"#;
        let gemini_chunk = r#"{"choices":[{"delta":{"content":", ","role":"assistant"},"index":0}],"created":1,"id":"x","model":"gemini-3-flash-preview","object":"chat.completion.chunk","usage":{"completion_tokens":3,"prompt_tokens":9,"total_tokens":105}}"#;
        // The excess is kept apart, read as reasoning only for Google's backends (where
        // other servers' totals can hold input tokens).
        let thought = Tokens {
            unshown: 93,
            ..tokens(9, 3)
        };
        assert_eq!(
            thought.with_unshown_as_reasoning(),
            Tokens {
                reasoning: 93,
                ..tokens(9, 96)
            }
        );
        assert_eq!(usage_of(gemini_chunk), Some((thought, false)));
        assert_eq!(by_full_parse(gemini_chunk), Some((thought, false)));
        let written = Tokens {
            cached_prompt: 1000,
            cache_write: 8000,
            ..tokens(10000, 2)
        };
        for (body, expected) in [
            (writes, written),
            (writes_first, written),
            (
                kimi,
                Tokens {
                    cached_prompt: 12,
                    ..tokens(19, 13)
                },
            ),
            (
                deepseek,
                Tokens {
                    cached_prompt: 990,
                    ..tokens(1000, 5)
                },
            ),
            (
                xai,
                Tokens {
                    cached_prompt: 7,
                    reasoning: 2809,
                    ..tokens(10120, 1499 + 2809)
                },
            ),
            (
                openai,
                Tokens {
                    reasoning: 300,
                    ..tokens(100, 500)
                },
            ),
            (gemini, thought),
        ] {
            assert_eq!(usage_of(body), Some((expected, true)), "{body}");
            assert_eq!(by_full_parse(body), Some((expected, true)), "{body}");
        }
        // Figures that are not counts are as if absent, as before they were read.
        let odd = r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":"4","prompt_cache_hit_tokens":-1}}"#;
        assert_eq!(usage_of(odd), Some((tokens(3, 1), true)));
    }

    #[test]
    fn finds_usage_in_bodies_and_chunks() {
        let body = r#"{"id":"x","choices":[{"index":0}],"usage":{"prompt_tokens":9,"completion_tokens":12,"total_tokens":21}}"#;
        assert_eq!(usage_of(body), Some((tokens(9, 12), false)));
        let chunk = r#"{"id":"x","choices":[ ],"usage":{"prompt_tokens":3,"completion_tokens":5}}"#;
        assert_eq!(usage_of(chunk), Some((tokens(3, 5), true)));
        let embeddings = r#"{"data":[],"usage":{"prompt_tokens":4,"total_tokens":4}}"#;
        // No choice: as a stream's chunk, the usage chunk.
        assert_eq!(usage_of(embeddings), Some((tokens(4, 0), true)));
        assert_eq!(usage_of(r#"{"choices":[{}],"usage":null}"#), None);
        assert_eq!(usage_of(r#"{"choices":[{}]}"#), None);
        assert_eq!(usage_of("not json \"usage\""), None);
    }

    #[test]
    fn the_mock_answer_is_read_whole() {
        let body = r#"{"id":"chatcmpl-1","object":"chat.completion","created":1764633600,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"[mock] tok1 tok2 tok3 tok4","refusal":null,"annotations":[]},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":2,"completion_tokens":5,"total_tokens":7,"prompt_tokens_details":{"cached_tokens":1,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":3,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}},"service_tier":"default","system_fingerprint":"fp_sluice_mock"}"#;
        let expected = Tokens {
            prompt: 2,
            completion: 5,
            cached_prompt: 1,
            reasoning: 3,
            ..Tokens::default()
        };
        assert_eq!(usage_of(body), Some((expected, false)));
        assert_eq!(usage_of(body), by_full_parse(body));
        // Indented, as OpenAI writes a whole answer (and the mock now does).
        let indented =
            serde_json::to_string_pretty(&serde_json::from_str::<serde_json::Value>(body).unwrap())
                .unwrap();
        assert!(
            indented.contains("\n    \"prompt_tokens\": 2,\n"),
            "{indented}"
        );
        assert_eq!(usage_of_answer(&indented), Some(expected));
        assert_eq!(usage_of(&indented), Some((expected, false)));
    }

    #[test]
    fn only_the_top_level_usage_counts() {
        // A `usage` inside a choice, or in a key or a string that holds the word, is not it.
        for json in [
            r#"{"choices":[{"usage":{"prompt_tokens":1}}]}"#,
            r#"{"choices":[{"usage":{"prompt_tokens":1}}],"usage":null}"#,
            r#"{"x\"usage":{"prompt_tokens":1},"choices":[{"usage":{"prompt_tokens":1}}]}"#,
            r#"{"content":"\",\"usage\":{\"prompt_tokens\":1}","choices":[{"usage":{}}]}"#,
        ] {
            assert_eq!(usage_of(json), None, "{json}");
            assert_eq!(by_full_parse(json), None, "{json}");
        }
        // A key spelled with escapes is the key it decodes to, as for any JSON reader.
        let escaped =
            r#"{"us\u0061ge":{"prompt_tokens":4},"choices":[{"usage":{"prompt_tokens":1}}]}"#;
        assert_eq!(usage_of(escaped), Some((tokens(4, 0), false)));
        assert_eq!(by_full_parse(escaped), usage_of(escaped));
    }

    #[test]
    fn what_the_full_parse_refused_counts_nothing() {
        for json in [
            // `usage` or `choices` twice.
            r#"{"usage":{"prompt_tokens":1},"usage":{"prompt_tokens":2}}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":1},"choices":[]}"#,
            // `choices` neither an array nor null; figures that are not counts.
            r#"{"choices":{},"usage":{"prompt_tokens":1}}"#,
            r#"{"choices":"[]","usage":{"prompt_tokens":1}}"#,
            r#"{"usage":{"prompt_tokens":-1}}"#,
            r#"{"usage":{"prompt_tokens":1.5}}"#,
            r#"{"usage":"{\"prompt_tokens\":1}"}"#,
            // Cut off, trailing text, unbalanced or mismatched brackets, a missing colon.
            r#"{"usage":{"prompt_tokens":1}"#,
            r#"{"usage":{"prompt_tokens":1}}}"#,
            r#"{"usage":{"prompt_tokens":1}} x"#,
            r#"{"usage":{"prompt_tokens":1}}{}"#,
            r#"{"a":[1}, "usage":{"prompt_tokens":1}, "b":{]}"#,
            r#"{"a" "usage":{"prompt_tokens":1}}"#,
            r#"{"a":1 "usage":{"prompt_tokens":1}}"#,
            r#"{"usage":{"prompt_tokens":1},}"#,
            r#"{"content":"unterminated, "usage":{"prompt_tokens":1}}"#,
            // A key whose escapes are not JSON.
            r#"{"us\u00":{"prompt_tokens":1},"usage":{"prompt_tokens":1}}"#,
        ] {
            assert_eq!(usage_of(json), None, "{json}");
        }
        // The one JSON text read differently: serde read an array as the fields in order.
        let array = r#"[{"prompt_tokens":1,"usage":{"prompt_tokens":1}},[]]"#;
        assert_eq!(by_full_parse(array), Some((tokens(1, 0), true)));
        assert_eq!(usage_of(array), None);
    }

    #[test]
    fn a_plain_usage_is_read_by_hand_and_any_other_by_serde() {
        let plain = |usage: &str| PlainUsage::read(usage.as_bytes(), 0).map(|(t, _)| t);
        let mock = r#"{"prompt_tokens":2,"completion_tokens":5,"total_tokens":7,
            "prompt_tokens_details":{"cached_tokens":1,"audio_tokens":0},
            "completion_tokens_details":{"reasoning_tokens":3,"audio_tokens":null}}"#;
        let expected = Tokens {
            prompt: 2,
            completion: 5,
            cached_prompt: 1,
            reasoning: 3,
            ..Tokens::default()
        };
        assert_eq!(plain(mock), Some(Some(expected)));
        assert_eq!(plain(" null"), Some(None));
        assert_eq!(plain("{}"), Some(Some(Tokens::default())));
        for usage in [
            r#"{"prompt_tokens":1.0}"#,
            r#"{"prompt_tokens":1e2}"#,
            r#"{"prompt_tokens":-1}"#,
            r#"{"prompt_tokens":01}"#,
            r#"{"prompt_tokens":"1"}"#,
            r#"{"prompt_tokens":18446744073709551616}"#,
            r#"{"prompt_tokens":1,"prompt_tokens":2}"#,
            r#"{"prompt_tokens_details":{"cached_tokens":1,"cached_tokens":1}}"#,
            r#"{"pr\u006fmpt_tokens":1}"#,
            r#"{"total_tokens":[1]}"#,
            // A raw control character, which serde refuses in a string.
            "{\"queue\u{1}_time\":1}",
            "[1,2]",
        ] {
            assert_eq!(plain(usage), None, "{usage}");
            // serde decides these: some it reads, the others count nothing.
            let answer = format!(r#"{{"choices":[],"usage":{usage}}}"#);
            assert_eq!(usage_of(&answer), by_full_parse(&answer), "{answer}");
        }
        let escaped = r#"{"choices":[],"usage":{"pr\u006fmpt_tokens":4}}"#;
        assert_eq!(usage_of(escaped), Some((tokens(4, 0), true)));
    }

    #[test]
    fn nesting_deeper_than_a_word_of_brackets_is_followed() {
        let deep = |depth: usize| {
            format!(
                r#"{{"choices":[{}{}],"usage":{{"prompt_tokens":6}}}}"#,
                "[{\"a\":".repeat(depth) + "0",
                "}]".repeat(depth)
            )
        };
        for depth in [0, 62, 63, 64, 127, 128, 300] {
            let json = deep(depth);
            assert_eq!(
                usage_of(&json),
                Some((tokens(6, 0), false)),
                "depth {depth}"
            );
            assert_eq!(usage_of(&json), by_full_parse(&json));
        }
        let mismatched = deep(200).replacen("}]}]", "]}]}", 1);
        assert_eq!(usage_of(&mismatched), None);
    }
}
