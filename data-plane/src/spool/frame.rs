//! The framing of a spool segment: each entry is `length (u32 LE) | check (u32 LE) | payload`,
//! where the check is the CRC-32 of the payload, XORed with the segment's *seed* in every frame
//! but the first (the segment's header, which names the seed). A reader takes frames while they
//! are whole and their check matches, and stops at the first one that is not: a crash can only
//! tear the last write of a segment (the writer starts a new segment after any failed write), so
//! whatever follows a bad frame was never written whole and is never read as data.
//!
//! The seed is what lets a segment file be used again: a file reused for a later segment still
//! holds, past the new frames, the frames of its earlier use, whole and with good CRCs. Each
//! segment of a lane has a seed of its own, so the checks of those frames, made under another
//! seed, do not match, and reading ends where the new frames end.

/// Bytes before each payload: its length and its checksum.
pub const HEADER_BYTES: usize = 8;

/// Largest payload a frame may carry. A usage record is a few hundred bytes; a length above
/// this is garbage (a torn or zeroed header), not a record to allocate for.
pub const MAX_PAYLOAD: usize = 1 << 20;

/// Appends one frame holding `payload` to `out`.
pub fn encode(payload: &[u8], out: &mut Vec<u8>) {
    debug_assert!(payload.len() <= MAX_PAYLOAD);
    // MAX_PAYLOAD fits a u32; a longer payload is refused by the reader, never misread.
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    out.reserve(HEADER_BYTES + payload.len());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// Appends one frame holding the encoding of `message` to `out`, encoding in place.
pub fn encode_message(message: &impl prost::Message, out: &mut Vec<u8>) {
    let at = out.len();
    out.extend_from_slice(&[0; HEADER_BYTES]);
    // Encoding into a Vec cannot run out of room.
    let _ = message.encode(out);
    seal(at, out);
}

/// Fills in the header of the frame that starts at `at` and runs to the end of `out`, whose
/// payload was appended after [`HEADER_BYTES`] placeholder bytes.
pub fn seal(at: usize, out: &mut [u8]) {
    let payload = &out[at + HEADER_BYTES..];
    let len = u32::try_from(payload.len())
        .unwrap_or(u32::MAX)
        .to_le_bytes();
    let crc = crc32fast::hash(payload).to_le_bytes();
    out[at..at + 4].copy_from_slice(&len);
    out[at + 4..at + HEADER_BYTES].copy_from_slice(&crc);
}

/// XORs the check of every frame in `frames` (whole frames, back to back, none of them a
/// segment's header) with `seed`: done once, as they are written into the segment they are
/// for.
pub fn seed(frames: &mut [u8], seed: u32) {
    if seed == 0 {
        return;
    }
    let mut at = 0;
    while let Some(header) = frames.get_mut(at..at + HEADER_BYTES) {
        let (len, check) = header.split_at_mut(4);
        let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
        let seeded = u32::from_le_bytes([check[0], check[1], check[2], check[3]]) ^ seed;
        check.copy_from_slice(&seeded.to_le_bytes());
        at += HEADER_BYTES + len;
    }
    debug_assert_eq!(at, frames.len(), "whole frames only");
}

/// Why reading a segment stopped before its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The last frame is incomplete: a write cut short.
    Torn,
    /// A whole frame whose checksum does not match, or whose length is impossible.
    Corrupt,
}

/// The frames of a segment: the payloads of the whole, intact frames from the start, and
/// where and why reading stopped if it did not reach the end.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Frames<'a> {
    pub payloads: Vec<&'a [u8]>,
    /// Bytes of intact frames from the start: the length to cut a damaged segment back to.
    pub valid_len: usize,
    pub stop: Option<Stop>,
}

/// Reads the frames of `bytes`, none of them seeded; see [`Frames`].
pub fn decode(bytes: &[u8]) -> Frames<'_> {
    decode_seeded(bytes, |_| 0)
}

/// Reads the frames of a segment whose first frame is unseeded and names the seed of the
/// others: `seed_of` reads it from the first frame's payload.
pub fn decode_seeded(bytes: &[u8], seed_of: impl FnOnce(&[u8]) -> u32) -> Frames<'_> {
    let mut frames = Frames::default();
    let mut seed = 0;
    let mut seed_of = Some(seed_of);
    let mut at = 0;
    while at < bytes.len() {
        let Some(header) = bytes.get(at..at + HEADER_BYTES) else {
            frames.stop = Some(Stop::Torn);
            break;
        };
        let (len, crc) = header.split_at(4);
        let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
        let crc = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
        if len == 0 || len > MAX_PAYLOAD {
            frames.stop = Some(Stop::Corrupt);
            break;
        }
        let start = at + HEADER_BYTES;
        let Some(payload) = bytes.get(start..start + len) else {
            frames.stop = Some(Stop::Torn);
            break;
        };
        if crc32fast::hash(payload) ^ seed != crc {
            // The last frame with a bad checksum is a write the kernel had only partly made
            // durable; earlier, it is damage. Either way nothing after it is trusted.
            frames.stop = Some(if start + len == bytes.len() {
                Stop::Torn
            } else {
                Stop::Corrupt
            });
            break;
        }
        if let Some(seed_of) = seed_of.take() {
            seed = seed_of(payload);
        }
        frames.payloads.push(payload);
        at = start + len;
        frames.valid_len = at;
    }
    frames
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use proptest::prelude::*;

    fn segment(payloads: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for p in payloads {
            encode(p, &mut out);
        }
        out
    }

    #[test]
    fn reads_back_what_was_written_in_order() {
        let bytes = segment(&[b"one", b"two", b"three"]);
        let frames = decode(&bytes);
        assert_eq!(frames.payloads, [&b"one"[..], b"two", b"three"]);
        assert_eq!(frames.valid_len, bytes.len());
        assert_eq!(frames.stop, None);
        assert_eq!(decode(&[]), Frames::default());
    }

    #[test]
    fn a_write_torn_at_any_offset_drops_only_the_last_frame() {
        let whole = segment(&[b"first record", b"second record", b"the last record"]);
        let last_start = whole.len() - (HEADER_BYTES + b"the last record".len());
        for cut in last_start + 1..whole.len() {
            let frames = decode(&whole[..cut]);
            assert_eq!(
                frames.payloads,
                [&b"first record"[..], b"second record"],
                "cut at {cut}"
            );
            assert_eq!(frames.valid_len, last_start, "cut at {cut}");
            assert_eq!(frames.stop, Some(Stop::Torn), "cut at {cut}");
        }
        // Cut exactly between frames: nothing is torn.
        let frames = decode(&whole[..last_start]);
        assert_eq!(frames.payloads.len(), 2);
        assert_eq!(frames.stop, None);
    }

    #[test]
    fn a_cut_anywhere_never_yields_a_frame_that_was_not_written() {
        let payloads: [&[u8]; 4] = [b"a", b"bb", b"ccc", b"dddd"];
        let whole = segment(&payloads);
        for cut in 0..=whole.len() {
            let frames = decode(&whole[..cut]);
            assert_eq!(
                frames.payloads[..],
                payloads[..frames.payloads.len()],
                "cut at {cut}"
            );
            assert_eq!(
                frames.stop.is_none(),
                frames.valid_len == cut,
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn a_checksum_mismatch_stops_reading_there() {
        let mut bytes = segment(&[b"good", b"flipped", b"after"]);
        let second = HEADER_BYTES + 4;
        bytes[second + HEADER_BYTES] ^= 0x01;
        let frames = decode(&bytes);
        assert_eq!(frames.payloads, [&b"good"[..]]);
        assert_eq!(frames.valid_len, second);
        assert_eq!(frames.stop, Some(Stop::Corrupt));

        // In the last frame it is a torn write.
        let mut bytes = segment(&[b"good", b"last"]);
        let end = bytes.len() - 1;
        bytes[end] ^= 0xff;
        assert_eq!(decode(&bytes).stop, Some(Stop::Torn));
    }

    #[test]
    fn zeroed_or_absurd_lengths_are_not_records() {
        let mut bytes = segment(&[b"good"]);
        let valid = bytes.len();
        bytes.extend_from_slice(&[0; 64]);
        let frames = decode(&bytes);
        assert_eq!((frames.payloads.len(), frames.valid_len), (1, valid));
        assert_eq!(frames.stop, Some(Stop::Corrupt));

        let mut bytes = segment(&[b"good"]);
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        bytes.extend_from_slice(&[0; 12]);
        assert_eq!(decode(&bytes).stop, Some(Stop::Corrupt));
    }

    /// A segment as a lane writes it: an unseeded first frame, then `payloads` seeded.
    fn seeded_segment(first: &[u8], payloads: &[&[u8]], seed: u32) -> Vec<u8> {
        let mut out = segment(&[first]);
        let at = out.len();
        for p in payloads {
            encode(p, &mut out);
        }
        super::seed(&mut out[at..], seed);
        out
    }

    #[test]
    fn seeded_frames_read_back_only_under_their_seed() {
        let bytes = seeded_segment(b"header", &[b"one", b"two"], 7);
        let frames = decode_seeded(&bytes, |first| {
            assert_eq!(first, b"header");
            7
        });
        assert_eq!(frames.payloads, [&b"header"[..], b"one", b"two"]);
        assert_eq!(frames.stop, None);
        let frames = decode_seeded(&bytes, |_| 8);
        assert_eq!(frames.payloads, [&b"header"[..]]);
        assert_eq!(frames.stop, Some(Stop::Corrupt));
    }

    proptest! {
        /// A file reused for a later segment: the new frames are written over the old ones
        /// from the start, and what is left of the old ones past them is never read.
        #[test]
        fn a_reused_file_reads_as_its_new_segment_only(
            old in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..60), 0..12),
            new in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..60), 0..12),
            old_seed in 1u32..1000,
            step in 1u32..1000,
        ) {
            let new_seed = old_seed + step;
            let old: Vec<&[u8]> = old.iter().map(Vec::as_slice).collect();
            let new: Vec<&[u8]> = new.iter().map(Vec::as_slice).collect();
            let mut file = seeded_segment(b"old header", &old, old_seed);
            let written = seeded_segment(b"new header", &new, new_seed);
            if file.len() < written.len() {
                file.resize(written.len(), 0);
            }
            file[..written.len()].copy_from_slice(&written);
            let frames = decode_seeded(&file, |_| new_seed);
            let mut expected = vec![&b"new header"[..]];
            expected.extend_from_slice(&new);
            prop_assert_eq!(frames.payloads, expected);
            prop_assert_eq!(frames.valid_len, written.len());
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_and_stay_within_bounds(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let frames = decode(&bytes);
            prop_assert!(frames.valid_len <= bytes.len());
            let read: usize = frames.payloads.iter().map(|p| p.len() + HEADER_BYTES).sum();
            prop_assert_eq!(read, frames.valid_len);
        }

        #[test]
        fn a_flipped_bit_in_a_whole_segment_never_passes_as_the_original(
            payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..40), 1..6),
            flip in any::<proptest::sample::Index>(),
            bit in 0u8..8,
        ) {
            let refs: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
            let mut bytes = segment(&refs);
            let at = flip.index(bytes.len());
            bytes[at] ^= 1 << bit;
            let frames = decode(&bytes);
            // Every frame read is one that was written, in its place, and the damaged one is not.
            prop_assert!(frames.payloads.len() < refs.len());
            prop_assert!(frames.stop.is_some());
            for (read, written) in frames.payloads.iter().zip(&refs) {
                prop_assert_eq!(read, written);
            }
        }
    }
}
