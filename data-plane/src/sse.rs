//! An incremental parser for server-sent events from upstreams, fed chunk by chunk as they
//! arrive. It follows the WHATWG event-stream rules (`\n`, `\r\n` or `\r` line ends, `:`
//! comments, multi-line `data`, one optional space after the colon) and bounds every line and
//! event so upstream garbage cannot exhaust memory.

use bytes::{BufMut, Bytes, BytesMut};

/// Default bound on one line and on one event's data, in bytes.
pub const DEFAULT_MAX_BYTES: usize = 1024 * 1024;

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Event {
    /// The `event:` field, if any.
    pub event: Option<String>,
    /// The `data:` lines joined with `\n`.
    pub data: String,
    /// The `id:` field, if any.
    pub id: Option<String>,
}

impl Event {
    /// The event in wire form, ending with the blank line that dispatches it.
    pub fn to_bytes(&self) -> Bytes {
        let mut out = BytesMut::new();
        self.write_to(&mut out);
        out.freeze()
    }

    /// Appends the event in wire form to `out` (see [`Self::to_bytes`]). A writer that keeps
    /// `out` and splits each event off it reuses one allocation for event after event, once
    /// the earlier ones are sent and dropped.
    pub fn write_to(&self, out: &mut BytesMut) {
        let name = self.event.as_ref().map_or(0, |event| event.len() + 8);
        let id = self.id.as_ref().map_or(0, |id| id.len() + 5);
        out.reserve(name + id + self.data.len() + 16);
        if let Some(event) = &self.event {
            out.put_slice(b"event: ");
            out.put_slice(event.as_bytes());
            out.put_u8(b'\n');
        }
        if let Some(id) = &self.id {
            out.put_slice(b"id: ");
            out.put_slice(id.as_bytes());
            out.put_u8(b'\n');
        }
        // Split with memchr: `str::split` looks for the newline a byte at a time, and the data
        // of a chunk is one long line.
        let data = self.data.as_bytes();
        let mut start = 0;
        for end in memchr::memchr_iter(b'\n', data).chain([data.len()]) {
            out.put_slice(b"data: ");
            out.put_slice(&data[start..end]);
            out.put_u8(b'\n');
            start = end + 1;
        }
        out.put_u8(b'\n');
    }
}

/// The most a parser keeps of a buffer for the next line or event: one large event (an image
/// in a Responses stream, megabytes of base64) is held while it is read, not afterwards.
const KEPT_BUFFER_BYTES: usize = 64 * 1024;

/// What the parser yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    Event(Event),
    /// A `:` comment line (often a keep-alive), without the colon; comment lines in a row
    /// (no event dispatched between them) are one item, their texts joined by `\n:`, the
    /// lines as they are written.
    Comment(String),
}

/// Why a stream could not be parsed further.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    #[error("an event-stream line is longer than {0} bytes")]
    LineTooLong(usize),
    #[error("an event is larger than {0} bytes")]
    EventTooLarge(usize),
}

/// The UTF-8 byte order mark.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// `bytes` without the UTF-8 byte order mark they start with, if they do.
pub fn without_bom(bytes: &[u8]) -> &[u8] {
    bytes.strip_prefix(BOM).unwrap_or(bytes)
}

/// The parser state between chunks.
#[derive(Debug)]
pub struct SseParser {
    max_bytes: usize,
    line: Vec<u8>,
    /// The last chunk ended in `\r`: a `\n` starting the next one belongs to it.
    after_cr: bool,
    /// The stream's first bytes are past: a byte order mark is only dropped at its start.
    past_start: bool,
    /// Of a byte order mark at the stream's start, the bytes come so far (it may be cut
    /// across chunks).
    bom_bytes: usize,
    data: String,
    has_data: bool,
    event: Option<String>,
    id: Option<String>,
}

impl Default for SseParser {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_BYTES)
    }
}

impl SseParser {
    /// A parser refusing lines or events larger than `max_bytes`.
    pub fn new(max_bytes: usize) -> Self {
        Self {
            max_bytes,
            line: Vec::new(),
            after_cr: false,
            past_start: false,
            bom_bytes: 0,
            data: String::new(),
            has_data: false,
            event: None,
            id: None,
        }
    }

    /// Parses `chunk`, appending every completed item to `out`. After an error the parser
    /// must not be fed again.
    pub fn push(&mut self, mut chunk: &[u8], out: &mut Vec<Item>) -> Result<(), SseError> {
        if chunk.is_empty() {
            return Ok(());
        }
        if !self.past_start {
            // The format's decoding drops one at the start, as browsers' `EventSource` do: a
            // server writing through a UTF-8 writer with one (.NET's) would otherwise have
            // its first line's field named `\u{FEFF}data`, and its first event lost.
            let rest = &BOM[self.bom_bytes..];
            let matched = rest.iter().zip(chunk).take_while(|(a, b)| a == b).count();
            if matched == chunk.len() && matched < rest.len() {
                // All of this chunk is the mark's next bytes: the rest may follow.
                self.bom_bytes += matched;
                return Ok(());
            }
            self.past_start = true;
            if matched == rest.len() {
                chunk = &chunk[matched..];
            } else if self.bom_bytes > 0 {
                // The bytes held were not a mark after all, but the stream's text.
                self.push(&BOM[..self.bom_bytes], out)?;
            }
        }
        if self.after_cr {
            self.after_cr = false;
            if let Some(rest) = chunk.strip_prefix(b"\n") {
                chunk = rest;
            }
        }
        while let Some(end) = memchr::memchr2(b'\n', b'\r', chunk) {
            if self.line.len() + end > self.max_bytes {
                return Err(SseError::LineTooLong(self.max_bytes));
            }
            if self.line.is_empty() {
                // The whole line is in this chunk: read it where it is.
                self.process_line(&chunk[..end], out)?;
            } else {
                self.line.extend_from_slice(&chunk[..end]);
                let line = std::mem::take(&mut self.line);
                self.process_line(&line, out)?;
                // Kept for the next line that spans chunks, unless one large line grew it:
                // a stream would hold that much for the rest of its life.
                if line.capacity() <= KEPT_BUFFER_BYTES {
                    self.line = line;
                    self.line.clear();
                }
            }
            let terminator_cr = chunk[end] == b'\r';
            chunk = &chunk[end + 1..];
            if terminator_cr {
                match chunk.first() {
                    Some(b'\n') => chunk = &chunk[1..],
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
        }
        if self.line.len() + chunk.len() > self.max_bytes {
            return Err(SseError::LineTooLong(self.max_bytes));
        }
        self.line.extend_from_slice(chunk);
        Ok(())
    }

    /// Parses `chunk` as [`Self::push`] does, and tells whether it was one whole event in
    /// the form [`Event::write_to`] writes (`event: …` if named, `data: …` and a blank line)
    /// that nothing buffered before it joined: then a relay can pass the chunk on as that
    /// event's frame instead of writing it again. Most upstreams send an event a chunk, in that
    /// form. Such a chunk is read without the line-by-line walk ([`Self::whole_parts`]); any
    /// other goes through [`Self::push`] and is answered `false`: one with an `id:` line or
    /// with its data on several lines, though written as `write_to` writes, is then written
    /// again by a relay, and the rest are not in that form (a line end other than `\n`, bytes
    /// that are not UTF-8, a line past the bound, bytes of an unfinished event before them).
    pub fn push_whole(&mut self, chunk: &[u8], out: &mut Vec<Item>) -> Result<bool, SseError> {
        if let Some((name, data)) = self.whole_parts(chunk) {
            self.past_start = true;
            let mut buffer = std::mem::take(&mut self.data);
            buffer.clear();
            buffer.push_str(data);
            out.push(Item::Event(Event {
                event: name.map(str::to_owned),
                data: buffer,
                id: None,
            }));
            return Ok(true);
        }
        self.push(chunk, out)?;
        Ok(false)
    }

    /// The data of `chunk` when it is one whole unnamed event (see [`Self::whole_parts`]).
    pub fn whole_data<'c>(&self, chunk: &'c [u8]) -> Option<&'c str> {
        match self.whole_parts(chunk)? {
            (None, data) => Some(data),
            (Some(_), _) => None,
        }
    }

    /// The name and data of `chunk` when it is `event: {name}` and a line feed (if named),
    /// then `data: {data}` and a blank line, with no other line end in either, both UTF-8 and
    /// within the line bound, and nothing is buffered: the event [`Self::push`] would dispatch
    /// for it, which leaves the parser as it was (holding nothing), read without its
    /// line-by-line walk (a line search and a field split for each line, another search and
    /// the dispatch for the blank one: about 900 instructions an event). `None` for anything
    /// else, which [`Self::push`] reads. A caller that takes the parts from here instead of
    /// pushing the chunk has read that event.
    pub fn whole_parts<'c>(&self, chunk: &'c [u8]) -> Option<(Option<&'c str>, &'c str)> {
        const NAME: &[u8] = b"event: ";
        const FIELD: &[u8] = b"data: ";
        if !self.is_fresh() {
            return None;
        }
        let (name, rest) = match chunk.strip_prefix(NAME) {
            Some(rest) => {
                let end = memchr::memchr2(b'\n', b'\r', rest)?;
                // `push`'s bound on the line, and its line end: a `\r` may have its `\n` next.
                if NAME.len() + end > self.max_bytes || rest[end] != b'\n' {
                    return None;
                }
                (Some(crate::utf8::text(&rest[..end])?), &rest[end + 1..])
            }
            None => (None, chunk),
        };
        let data = rest.strip_prefix(FIELD)?.strip_suffix(b"\n\n")?;
        // `push`'s bound on the line (`data: ` and the data), past which it answers with its
        // error; the event's data with its newline is shorter, so within its own bound too.
        let within = FIELD.len() + data.len() <= self.max_bytes;
        if !within || memchr::memchr2(b'\n', b'\r', data).is_some() {
            return None;
        }
        Some((name, crate::utf8::text(data)?))
    }

    /// Whether nothing is buffered, not even a `\r` whose `\n` may come next.
    fn is_fresh(&self) -> bool {
        // Bytes held as a byte order mark's first may yet be the stream's text.
        !self.has_partial() && !self.after_cr && (self.past_start || self.bom_bytes == 0)
    }

    /// Gives back the data of an event this parser dispatched, once read, for the next event
    /// to fill instead of a new allocation.
    pub fn recycle(&mut self, mut data: String) {
        // Not a large event's buffer: a stream would hold that much for the rest of its life.
        if self.data.capacity() == 0 && data.capacity() <= KEPT_BUFFER_BYTES {
            data.clear();
            self.data = data;
        }
    }

    /// The bytes this parser's buffers hold (their capacity): a line spanning chunks and the
    /// data of an event under way.
    pub fn held_bytes(&self) -> usize {
        self.line.capacity() + self.data.capacity()
    }

    /// The bytes of the unfinished line and event in those buffers.
    pub fn buffered_bytes(&self) -> usize {
        self.line.len() + self.data.len()
    }

    /// Whether bytes of an unfinished event are buffered (the stream ended mid-event if this
    /// is true at its end).
    pub fn has_partial(&self) -> bool {
        !self.line.is_empty() || self.has_data || self.event.is_some() || self.id.is_some()
    }

    /// Whether the unfinished event at a stream's end is one whose data is `data` alone, its
    /// last line taken as it stands: a stream that ended without the blank line after its
    /// last event (`data: [DONE]\n`), or without its line end.
    pub fn unfinished_data_is(&self, data: &str) -> bool {
        if self.line.is_empty() {
            return self.has_data && self.data == data;
        }
        let line = self.line.strip_suffix(b"\r").unwrap_or(&self.line);
        !self.has_data
            && line
                .strip_prefix(b"data:")
                .map(|value| value.strip_prefix(b" ").unwrap_or(value))
                .is_some_and(|value| value == data.as_bytes())
    }

    fn process_line(&mut self, line: &[u8], out: &mut Vec<Item>) -> Result<(), SseError> {
        if line.is_empty() {
            self.dispatch(out);
            return Ok(());
        }
        // The UTF-8 check first: it looks at many bytes a step, where the lossy conversion looks
        // at each byte; both give the same text for valid UTF-8.
        let text = match crate::utf8::text(line) {
            Some(text) => std::borrow::Cow::Borrowed(text),
            None => String::from_utf8_lossy(line),
        };
        if let Some(comment) = text.strip_prefix(':') {
            // A run of comments (a provider's keep-alives: `:\r`, two bytes each, are
            // thousands to a read) is one item of their lines, one frame for a relay, rather
            // than an item, a frame and an allocation of some 150 bytes for each.
            match out.last_mut() {
                Some(Item::Comment(run)) => {
                    run.push_str("\n:");
                    run.push_str(comment);
                }
                _ => out.push(Item::Comment(comment.to_owned())),
            }
            return Ok(());
        }
        let (field, value) = match text.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (text.as_ref(), ""),
        };
        match field {
            "data" => {
                if self.data.len() + value.len() + 1 > self.max_bytes {
                    return Err(SseError::EventTooLarge(self.max_bytes));
                }
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            "event" => self.event = Some(value.to_owned()),
            // An id with NUL is ignored, as the spec says.
            "id" if !value.contains('\0') => self.id = Some(value.to_owned()),
            _ => {}
        }
        Ok(())
    }

    fn dispatch(&mut self, out: &mut Vec<Item>) {
        let event = self.event.take();
        let id = self.id.take();
        if !self.has_data {
            return;
        }
        self.has_data = false;
        out.push(Item::Event(Event {
            event,
            data: std::mem::take(&mut self.data),
            id,
        }));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use proptest::prelude::*;

    /// A stream that ended inside its `[DONE]` event (without the blank line after it, or
    /// without its line end) is told from one that ended inside any other event.
    #[test]
    fn an_unfinished_last_event_is_told_by_its_data() {
        let unfinished = |text: &str| {
            let mut parser = SseParser::default();
            let mut items = Vec::new();
            parser.push(text.as_bytes(), &mut items).unwrap();
            parser.unfinished_data_is("[DONE]")
        };
        for ended in [
            "data: [DONE]\n",
            "data: [DONE]",
            "data:[DONE]\r\n",
            "data: [DONE]\r",
            "data: {}\n\ndata: [DONE]",
        ] {
            assert!(unfinished(ended), "{ended:?}");
        }
        for not in [
            "",
            "data: [DONE]\n\n",
            "data: [DO",
            "data: x\ndata: [DONE]\n",
            "data: x\ndata: [DONE]",
            "data: [DONE] \n",
            ": [DONE]\n",
        ] {
            assert!(!unfinished(not), "{not:?}");
        }
    }

    fn parse_all(chunks: &[&[u8]]) -> Result<Vec<Item>, SseError> {
        let mut parser = SseParser::default();
        let mut out = Vec::new();
        for chunk in chunks {
            parser.push(chunk, &mut out)?;
        }
        Ok(out)
    }

    fn data(s: &str) -> Item {
        Item::Event(Event {
            data: s.to_owned(),
            ..Default::default()
        })
    }

    #[test]
    fn parses_openai_style_stream() {
        let items = parse_all(&[b"data: {\"a\":1}\n\ndata: [DONE]\n\n"]).unwrap();
        assert_eq!(items, [data("{\"a\":1}"), data("[DONE]")]);
    }

    /// Comments in a row are one item of their lines: a flood of keep-alives costs a frame,
    /// not one for each.
    #[test]
    fn comments_in_a_row_are_one_item() {
        let items = parse_all(&[b":\r:\r: a\n\n:b\ndata: x\n\n: c\n\n"]).unwrap();
        assert_eq!(
            items,
            [
                Item::Comment("\n:\n: a\n:b".into()),
                data("x"),
                Item::Comment(" c".into())
            ]
        );
    }

    /// One byte order mark at the stream's start is dropped, as the format's decoding does;
    /// one anywhere else is text.
    #[test]
    fn a_byte_order_mark_at_the_start_is_dropped() {
        let items = parse_all(&[b"\xEF\xBB\xBFdata: {\"a\":1}\n\n", b"data: [DONE]\n\n"]).unwrap();
        assert_eq!(items, [data("{\"a\":1}"), data("[DONE]")]);
        let items = parse_all(&[b"data: a\n\n", b"\xEF\xBB\xBFdata: b\n\n"]).unwrap();
        assert_eq!(items, [data("a")]);
        // Cut across chunks, the mark is dropped all the same; the bytes of one that does
        // not come whole are the stream's.
        let items = parse_all(&[b"\xEF", b"", b"\xBB", b"\xBFdata: x\n\n"]).unwrap();
        assert_eq!(items, [data("x")]);
        let whole = parse_all(&[b"\xEF\xBBdata: y\n\n:c\n\n"]).unwrap();
        let cut = parse_all(&[b"\xEF", b"\xBBdata: y\n\n:c\n\n"]).unwrap();
        assert_eq!(cut, whole);
        assert_eq!(whole, [Item::Comment("c".into())]);
    }

    #[test]
    fn handles_crlf_cr_comments_and_multiline_data() {
        let items = parse_all(&[
            b": keep-alive\r\n",
            b"event: delta\r\ndata: one\r\ndata:two\r\rdata: x",
            b"\r",
            b"\n\n",
        ])
        .unwrap();
        assert_eq!(
            items,
            [
                Item::Comment(" keep-alive".into()),
                Item::Event(Event {
                    event: Some("delta".into()),
                    data: "one\ntwo".into(),
                    id: None
                }),
                data("x"),
            ]
        );
    }

    #[test]
    fn an_empty_chunk_between_cr_and_lf_changes_nothing() {
        let split = parse_all(&[b"data: a\r", b"", b"\ndata: b\n\n"]).unwrap();
        assert_eq!(split, parse_all(&[b"data: a\r\ndata: b\n\n"]).unwrap());
    }

    #[test]
    fn invalid_utf8_is_replaced_not_refused() {
        let items = parse_all(&[b"data: a\xffb\n", b"data: \xe2\x82\n\n"]).unwrap();
        assert_eq!(items, [data("a\u{FFFD}b\n\u{FFFD}")]);
    }

    /// One large event (an image in a Responses stream, or a hostile upstream's line) is held
    /// while it is read, not for the rest of the stream: a stream kept the buffers it grew to,
    /// several times the event, until it ended.
    #[test]
    fn a_large_event_leaves_no_large_buffer_behind() {
        let mut parser = SseParser::new(64 * 1024 * 1024);
        let mut items = Vec::new();
        let large = format!("data: {}\n\n", "x".repeat(4 * 1024 * 1024));
        for piece in large.as_bytes().chunks(64 * 1024) {
            parser.push(piece, &mut items).unwrap();
        }
        let Some(Item::Event(event)) = items.pop() else {
            panic!("the large event");
        };
        assert_eq!(event.data.len(), 4 * 1024 * 1024);
        parser.recycle(event.data);
        parser.push(b"data: {}\n\n", &mut items).unwrap();
        assert!(
            parser.line.capacity() <= KEPT_BUFFER_BYTES,
            "{}",
            parser.line.capacity()
        );
        assert!(
            parser.data.capacity() <= KEPT_BUFFER_BYTES,
            "{}",
            parser.data.capacity()
        );
    }

    #[test]
    fn recycled_data_never_mixes_into_an_event_under_way() {
        let mut parser = SseParser::default();
        let mut out = Vec::new();
        parser.push(b"data: first\n\ndata: sec", &mut out).unwrap();
        parser.push(b"ond\n", &mut out).unwrap();
        let Some(Item::Event(first)) = out.pop() else {
            panic!("one event")
        };
        // The next event's data is under way: what comes back must not replace it.
        parser.recycle(first.data);
        parser.push(b"\ndata: third\n\n", &mut out).unwrap();
        let mut given_back = String::with_capacity(64);
        given_back.push_str("stale");
        parser.recycle(given_back);
        parser.push(b"data: fourth\n\n", &mut out).unwrap();
        assert_eq!(out, [data("second"), data("third"), data("fourth")]);
    }

    #[test]
    fn frames_split_off_one_buffer_keep_their_own_bytes() {
        let events = [
            Event {
                event: Some("delta".into()),
                data: "{\"a\":1}".into(),
                id: Some("9".into()),
            },
            Event {
                data: "one\ntwo".into(),
                ..Event::default()
            },
            Event {
                data: "x".repeat(5000),
                ..Event::default()
            },
        ];
        let mut wire = BytesMut::new();
        let frames: Vec<Bytes> = events
            .iter()
            .map(|event| {
                event.write_to(&mut wire);
                wire.split().freeze()
            })
            .collect();
        for (event, frame) in events.iter().zip(&frames) {
            assert_eq!(*frame, event.to_bytes());
            assert_eq!(parse_all(&[frame]).unwrap(), [Item::Event(event.clone())]);
        }
    }

    #[test]
    fn events_without_data_are_not_dispatched() {
        assert_eq!(parse_all(&[b"event: ping\n\nid: 3\n\n"]).unwrap(), []);
    }

    #[test]
    fn an_unfinished_event_is_partial() {
        let mut parser = SseParser::default();
        let mut out = Vec::new();
        parser.push(b"data: {\"cut\":", &mut out).unwrap();
        assert!(out.is_empty());
        assert!(parser.has_partial());
        parser.push(b"1}\n\n", &mut out).unwrap();
        assert!(!parser.has_partial());
    }

    #[test]
    fn bounds_lines_and_events() {
        let mut parser = SseParser::new(16);
        let mut out = Vec::new();
        assert_eq!(
            parser.push(&[b'a'; 17], &mut out),
            Err(SseError::LineTooLong(16))
        );
        let mut parser = SseParser::new(16);
        let mut out = Vec::new();
        assert_eq!(
            parser.push(b"data: 0123456789\ndata: 0123456789\n", &mut out),
            Err(SseError::EventTooLarge(16))
        );
        // A long line fed byte by byte is caught too.
        let mut parser = SseParser::new(16);
        let result = (0..100).try_for_each(|_| parser.push(b"x", &mut out));
        assert_eq!(result, Err(SseError::LineTooLong(16)));
    }

    #[test]
    fn round_trips_through_to_bytes() {
        let event = Event {
            event: Some("e".into()),
            data: "a\nb".into(),
            id: Some("7".into()),
        };
        let items = parse_all(&[&event.to_bytes()]).unwrap();
        assert_eq!(items, [Item::Event(event)]);
    }

    #[test]
    fn a_chunk_is_one_whole_event_only_in_the_written_form() {
        let whole = |before: &[u8], chunk: &[u8]| {
            let mut parser = SseParser::default();
            let mut out = Vec::new();
            parser.push(before, &mut out).unwrap();
            parser.push_whole(chunk, &mut out).unwrap()
        };
        assert!(whole(b"", b"data: {\"a\":1}\n\n"));
        assert!(whole(b"data: x\n\n", b"data: {\"a\":1}\n\n"));
        assert!(whole(b"", b"event: e\ndata: {\"a\":1}\n\n"));
        assert!(whole(b"", b"event: \ndata: {}\n\n"));
        for chunk in [
            &b"data:{\"a\":1}\n\n"[..],
            b"data: {\"a\":1}\r\n\r\n",
            b"data: {\"a\":1}\n\ndata: {\"a\":1}\n\n",
            b"data: {\"a\":1}\n",
            b"data: a\ndata: b\n\n",
            b"event:e\ndata: {\"a\":1}\n\n",
            b"event: e\r\ndata: {\"a\":1}\n\n",
            // The same event as with `\n`, but not the form Sluice writes.
            b"event: e\rdata: {\"a\":1}\n\n",
            b"event: e\nid: 1\ndata: {\"a\":1}\n\n",
            b"event: \xff\ndata: {}\n\n",
            b"event: e\n\n",
            b": keep-alive\ndata: {}\n\n",
            // Not UTF-8: as long as the data read from it ("\u{fffd}\u{fffd}\n\u{fffd}").
            b"data: \xff\xff\ndata: \xff\n\n",
        ] {
            assert!(!whole(b"", chunk), "{}", String::from_utf8_lossy(chunk));
        }
        // The end of an event begun in an earlier chunk is not one whole.
        assert!(!whole(b"data: a\n", b"data: b\n\n"));
        assert!(!whole(b"event: e\n", b"data: b\n\n"));
        assert!(!whole(b"data: a", b"data: b\n\n"));
    }

    #[test]
    fn a_whole_chunk_is_held_to_the_line_bound_as_any_line() {
        let push_whole = |chunk: &[u8]| {
            let mut out = Vec::new();
            SseParser::new(10).push_whole(chunk, &mut out).map(|_| out)
        };
        assert_eq!(push_whole(b"data: abcd\n\n"), Ok(vec![data("abcd")]));
        assert_eq!(
            push_whole(b"data: abcde\n\n"),
            Err(SseError::LineTooLong(10))
        );
        let named = Item::Event(Event {
            event: Some("abc".into()),
            data: "x".into(),
            id: None,
        });
        assert_eq!(push_whole(b"event: abc\ndata: x\n\n"), Ok(vec![named]));
        assert_eq!(
            push_whole(b"event: abcd\ndata: x\n\n"),
            Err(SseError::LineTooLong(10))
        );
    }

    fn stream_bytes() -> impl Strategy<Value = Vec<u8>> {
        let line = prop_oneof![
            "data: [a-z{}\":, ]{0,20}".prop_map(|s| s.into_bytes()),
            "event: [a-z]{1,5}".prop_map(|s| s.into_bytes()),
            ": [a-z ]{0,8}".prop_map(|s| s.into_bytes()),
            "id: [0-9]{1,3}".prop_map(|s| s.into_bytes()),
            Just(Vec::new()),
            proptest::collection::vec(any::<u8>(), 0..12),
        ];
        let ending = prop_oneof![Just(&b"\n"[..]), Just(&b"\r\n"[..]), Just(&b"\r"[..])];
        proptest::collection::vec((line, ending), 0..40).prop_map(|lines| {
            let mut out = Vec::new();
            for (line, end) in lines {
                out.extend_from_slice(&line);
                out.extend_from_slice(end);
            }
            out
        })
    }

    /// What a parser read before a chunk: often nothing, as the chunks a relay takes whole
    /// come to a parser holding nothing, after its earlier events were dispatched.
    fn bytes_before_a_chunk() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![Just(Vec::new()), stream_bytes()]
    }

    /// A chunk: any stream's bytes, or one `data:` line and a blank one, with any bytes, line
    /// ends and non-ASCII in the data.
    fn chunk_bytes() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            stream_bytes(),
            proptest::collection::vec(any::<u8>(), 0..24).prop_map(|data| [
                &b"data: "[..],
                &data,
                b"\n\n"
            ]
            .concat()),
            "[a-z{}\": \r\n\u{e9}]{0,24}".prop_map(|data| format!("data: {data}\n\n").into_bytes()),
            ("[a-z_: \r\n\u{e9}]{0,12}", "[a-z{}\": \r\n]{0,12}")
                .prop_map(|(name, data)| format!("event: {name}\ndata: {data}\n\n").into_bytes()),
            (
                proptest::collection::vec(any::<u8>(), 0..8),
                "[a-z{}\":]{0,12}"
            )
                .prop_map(|(name, data)| [
                    &b"event: "[..],
                    &name,
                    b"\ndata: ",
                    data.as_bytes(),
                    b"\n\n"
                ]
                .concat()),
        ]
    }

    /// A parser's bound on a line: small ones, which the chunks above reach, and the default.
    fn max_bytes() -> impl Strategy<Value = usize> {
        prop_oneof![4usize..40, Just(DEFAULT_MAX_BYTES)]
    }

    proptest! {
        #[test]
        fn any_chunking_yields_the_same_items(
            bytes in stream_bytes(),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..10),
        ) {
            let whole = parse_all(&[&bytes]);
            let mut points: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
            points.sort_unstable();
            let mut chunks = Vec::new();
            let mut start = 0;
            for p in points {
                chunks.push(&bytes[start..p]);
                start = p;
            }
            chunks.push(&bytes[start..]);
            prop_assert_eq!(parse_all(&chunks), whole);
        }

        /// A chunk is taken for one whole event in wire form only when it is what writing
        /// that event gives, and always then if the parser held nothing before it and the
        /// event is data of one line.
        #[test]
        fn a_whole_event_is_told_exactly(
            before in stream_bytes(),
            bytes in stream_bytes(),
            data in "[a-z{}\": \n]{0,12}",
            name in proptest::option::of("[a-z_]{0,8}"),
        ) {
            for (before, chunk) in [(&before[..], &bytes[..]), (&[][..], &bytes[..])] {
                let mut parser = SseParser::default();
                let mut out = Vec::new();
                if parser.push(before, &mut out).is_err() {
                    continue;
                }
                out.clear();
                if parser.push_whole(chunk, &mut out) == Ok(true) {
                    let [Item::Event(event)] = &out[..] else {
                        return Err(TestCaseError::fail(format!("{out:?}")));
                    };
                    prop_assert_eq!(&event.to_bytes()[..], chunk);
                }
            }
            let event = Event { event: name, data, id: None };
            let mut out = Vec::new();
            let whole = SseParser::default().push_whole(&event.to_bytes(), &mut out);
            prop_assert_eq!(whole, Ok(!event.data.contains('\n')));
        }

        /// `push_whole` reads every chunk as `push` does, the chunks it takes without the
        /// line-by-line walk among them: the same items, the same errors at the same bounds,
        /// and a parser in the same state for what follows.
        #[test]
        fn a_chunk_pushed_whole_reads_as_pushed(
            before in bytes_before_a_chunk(),
            chunk in chunk_bytes(),
            after in stream_bytes(),
            max_bytes in max_bytes(),
        ) {
            let read = |whole: bool| {
                let mut parser = SseParser::new(max_bytes);
                let mut out = Vec::new();
                parser.push(&before, &mut out).ok()?;
                let pushed = if whole {
                    parser.push_whole(&chunk, &mut out).map(drop)
                } else {
                    parser.push(&chunk, &mut out)
                };
                // After an error the parser is not fed again.
                let then = pushed.clone().and_then(|()| parser.push(&after, &mut out));
                Some((out, pushed, then, parser.has_partial()))
            };
            prop_assert_eq!(read(true), read(false));
        }

        /// Taking a chunk's parts from `whole_parts` instead of pushing the chunk is reading the
        /// chunk: they are those of the one event `push` dispatches for it, and the parser,
        /// left as it was, reads what follows as one that pushed the chunk does.
        #[test]
        fn a_chunks_data_taken_whole_reads_as_pushed(
            before in bytes_before_a_chunk(),
            chunk in chunk_bytes(),
            after in stream_bytes(),
            max_bytes in max_bytes(),
        ) {
            let parser = || {
                let mut parser = SseParser::new(max_bytes);
                parser.push(&before, &mut Vec::new()).ok().map(|()| parser)
            };
            let (Some(mut taken), Some(mut pushed)) = (parser(), parser()) else {
                return Ok(());
            };
            let Some((name, data)) = taken.whole_parts(&chunk) else {
                return Ok(());
            };
            prop_assert_eq!(taken.whole_data(&chunk), name.is_none().then_some(data));
            let mut out = Vec::new();
            prop_assert_eq!(pushed.push(&chunk, &mut out), Ok(()));
            prop_assert_eq!(out, vec![Item::Event(Event {
                event: name.map(str::to_owned),
                data: data.to_owned(),
                id: None,
            })]);
            let (mut from_taken, mut from_pushed) = (Vec::new(), Vec::new());
            prop_assert_eq!(
                taken.push(&after, &mut from_taken),
                pushed.push(&after, &mut from_pushed)
            );
            prop_assert_eq!(from_taken, from_pushed);
            prop_assert_eq!(taken.has_partial(), pushed.has_partial());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let mut parser = SseParser::new(64);
            let mut out = Vec::new();
            let _ = parser.push(&bytes, &mut out);
        }
    }
}
