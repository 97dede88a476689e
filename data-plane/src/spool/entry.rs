//! What one frame of a spool segment holds: a protobuf [`Entry`]. Its field tags are the
//! on-disk format, which a newer data plane must still read after an upgrade: never renumber
//! or retype a field; add new ones (and new kinds) under new tags.

use prost::Message;
use sluice_proto::v1::UsageRecord;

use super::frame;

/// One spool entry.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Entry {
    #[prost(oneof = "Kind", tags = "1, 2, 3")]
    pub kind: Option<Kind>,
}

/// The kinds of [`Entry`].
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Kind {
    /// The first entry of every segment: whose records follow.
    #[prost(message, tag = "1")]
    Header(Header),
    /// A request is about to call an upstream: its record so far (no sequence, no outcome).
    /// Written again, under the same request number, before each further attempt.
    #[prost(message, tag = "2")]
    Start(Mark),
    /// A request finished: its whole record, numbered with its sequence.
    #[prost(message, tag = "3")]
    Finish(Mark),
}

/// Names the process and the lane that wrote a segment.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Header {
    #[prost(string, tag = "1")]
    pub node_id: String,
    #[prost(string, tag = "2")]
    pub incarnation: String,
    /// The serving thread whose lane this is.
    #[prost(uint32, tag = "3")]
    pub lane: u32,
    /// The segment's number within its lane: 1, 2, …
    #[prost(uint64, tag = "4")]
    pub segment: u64,
    /// The seed of the checks of the frames after this one ([`frame`]'s docs); 0 (unseeded)
    /// in segments written before seeds existed.
    #[prost(uint32, tag = "5")]
    pub frame_seed: u32,
    /// The file held an earlier segment of the lane: past the last frame of this one it
    /// holds the rest of that one, which is where reading it ends, not damage.
    #[prost(bool, tag = "6")]
    pub reused_file: bool,
}

/// The frames of one segment file, read under the seed its header names.
#[derive(Debug)]
pub struct SegmentFrames<'a> {
    pub frames: frame::Frames<'a>,
    /// Its header says the file was used before: reading is expected to stop before the end
    /// of the file.
    pub reused_file: bool,
    /// The lane and segment number its header names (`None` without a header).
    pub named: Option<(u32, u64)>,
}

/// Reads the frames of a segment file: the header, then the frames under its seed.
pub fn decode_segment(bytes: &[u8]) -> SegmentFrames<'_> {
    let mut reused_file = false;
    let mut named = None;
    let frames = frame::decode_seeded(bytes, |first| match decode(first) {
        Ok(Entry {
            kind: Some(Kind::Header(header)),
        }) => {
            reused_file = header.reused_file;
            named = Some((header.lane, header.segment));
            header.frame_seed
        }
        _ => 0,
    });
    SegmentFrames {
        frames,
        reused_file,
        named,
    }
}

/// A start or finish of one request.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Mark {
    /// The request within its lane and incarnation: 1, 2, …; 0 on the finish of a request
    /// that never called an upstream (it has no start).
    #[prost(uint64, tag = "1")]
    pub request: u64,
    #[prost(message, optional, tag = "2")]
    pub record: Option<UsageRecord>,
}

/// Whether a [`Mark`] is a start or a finish (for [`frame_mark`]).
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Start,
    Finish,
}

/// Appends the frame of a [`Header`] to `out`.
pub fn frame_header(header: Header, out: &mut Vec<u8>) {
    frame::encode_message(
        &Entry {
            kind: Some(Kind::Header(header)),
        },
        out,
    );
}

/// Appends the frame of a start or finish of `record` to `out`, as prost encodes the entry:
/// the reference [`frame_start`] and [`frame_finish`] are tested against. The record moves
/// into the entry and back rather than being copied.
#[cfg(test)]
pub fn frame_mark(step: Step, request: u64, record: &mut UsageRecord, out: &mut Vec<u8>) {
    let mark = Mark {
        request,
        record: Some(std::mem::take(record)),
    };
    let entry = Entry {
        kind: Some(match step {
            Step::Start => Kind::Start(mark),
            Step::Finish => Kind::Finish(mark),
        }),
    };
    frame::encode_message(&entry, out);
    if let Some(Kind::Start(mark) | Kind::Finish(mark)) = entry.kind
        && let Some(taken) = mark.record
    {
        *record = taken;
    }
}

/// Appends the frame of the start of request `request` (its record so far): the bytes
/// prost writes for the entry, with the record's length computed once rather than at each
/// level of nesting, and the record written by sluice-proto's encoder by hand (this runs
/// before every upstream call).
pub fn frame_start(request: u64, record: &UsageRecord, out: &mut Vec<u8>) {
    let len = record.encoded_len_by_hand();
    frame_mark_around(2, request, len, out, |out| record.encode_by_hand(out));
}

/// Appends the frame of the finish of a request whose record is already encoded (`record`,
/// an encoded `UsageRecord`): the bytes prost writes for the entry, without encoding the
/// record again.
pub fn frame_finish(request: u64, record: &[u8], out: &mut Vec<u8>) {
    frame_mark_around(3, request, record.len(), out, |out| {
        out.extend_from_slice(record)
    });
}

/// A message field holds its message's encoding as it is, so an entry is written by hand
/// around its record (`record_len` bytes, which `record` appends): `Entry.start` (2) or
/// `Entry.finish` (3) holding `Mark.request` (1, left out when 0, as proto3 does) and
/// `Mark.record` (2).
fn frame_mark_around(
    kind_tag: u32,
    request: u64,
    record_len: usize,
    out: &mut Vec<u8>,
    record: impl FnOnce(&mut Vec<u8>),
) {
    use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};
    let mut mark_len = key_len(2) + encoded_len_varint(record_len as u64) + record_len;
    if request != 0 {
        mark_len += key_len(1) + encoded_len_varint(request);
    }
    let at = out.len();
    out.extend_from_slice(&[0; frame::HEADER_BYTES]);
    encode_key(kind_tag, WireType::LengthDelimited, out);
    encode_varint(mark_len as u64, out);
    if request != 0 {
        encode_key(1, WireType::Varint, out);
        encode_varint(request, out);
    }
    encode_key(2, WireType::LengthDelimited, out);
    encode_varint(record_len as u64, out);
    let before = out.len();
    record(out);
    debug_assert_eq!(out.len() - before, record_len);
    frame::seal(at, out);
}

/// Decodes the payload of one frame.
pub fn decode(payload: &[u8]) -> Result<Entry, prost::DecodeError> {
    Entry::decode(payload)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn starts_and_finishes_framed_by_hand_are_the_entries_prost_writes() {
        let records = [
            UsageRecord::default(),
            UsageRecord {
                sequence: 300,
                request_id: "req-1".into(),
                model: "m".repeat(200),
                prompt_tokens: 12,
                completion_tokens: u64::MAX,
                ..Default::default()
            },
        ];
        for mut record in records {
            for request in [0, 1, 127, 128, 1 << 40] {
                let mut by_prost = vec![7];
                frame_mark(Step::Finish, request, &mut record, &mut by_prost);
                let mut by_hand = vec![7];
                frame_finish(request, &record.encode_to_vec(), &mut by_hand);
                assert_eq!(by_hand, by_prost, "finish of request {request}");
                let mut by_prost = vec![7];
                frame_mark(Step::Start, request, &mut record, &mut by_prost);
                let mut by_hand = vec![7];
                frame_start(request, &record, &mut by_hand);
                assert_eq!(by_hand, by_prost, "start of request {request}");
            }
        }
    }

    #[test]
    fn a_mark_round_trips_and_the_record_comes_back() {
        let mut record = UsageRecord {
            sequence: 7,
            request_id: "req-1".into(),
            model: "gpt-4o-mini".into(),
            prompt_tokens: 12,
            ..Default::default()
        };
        let original = record.clone();
        let mut out = Vec::new();
        frame_mark(Step::Finish, 3, &mut record, &mut out);
        assert_eq!(record, original, "the caller keeps its record");
        frame_header(
            Header {
                node_id: "n".into(),
                incarnation: "i".into(),
                lane: 1,
                segment: 2,
                ..Default::default()
            },
            &mut out,
        );
        let frames = frame::decode(&out);
        assert_eq!(frames.payloads.len(), 2);
        assert_eq!(
            decode(frames.payloads[0]).unwrap().kind,
            Some(Kind::Finish(Mark {
                request: 3,
                record: Some(original),
            }))
        );
        assert!(matches!(
            decode(frames.payloads[1]).unwrap().kind,
            Some(Kind::Header(Header {
                lane: 1,
                segment: 2,
                ..
            }))
        ));
    }
}
