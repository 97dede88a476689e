//! Event streams from upstreams. The input is the stream's bytes as they came (so the seeds
//! are plain event streams). For a tight bound that errors often and a loose one that does
//! not:
//! - however the bytes are cut into chunks (one cut anywhere, byte by byte with an empty
//!   chunk after each, pseudo-random sizes from 0 to 17), the parser yields the same items
//!   and stops with the same error as when fed them at once;
//! - fed through `push_whole`, as the relay feeds its chunks (cut at random, and cut after each
//!   blank line so that chunks are often one whole event), it yields the same as `push`, and a
//!   chunk it calls one whole event is that event as the relay would write it;
//! - no event's data outgrows the bound;
//! - the items written out as the relay writes them to the client parse back to the same
//!   items, so the client reads what the proxy read.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_proxy::sse::{Item, SseError, SseParser};

const LIMITS: [usize; 2] = [64, 64 * 1024];

/// Feeds `chunks` in order, stopping at the first error as the relay does; with `whole`,
/// through `push_whole` as the relay feeds them, checking each chunk it calls one whole event.
fn parse<'a>(
    limit: usize,
    chunks: impl IntoIterator<Item = &'a [u8]>,
    whole: bool,
) -> (Vec<Item>, Result<(), SseError>) {
    let mut parser = SseParser::new(limit);
    let mut items = Vec::new();
    for chunk in chunks {
        let before = items.len();
        let pushed = if whole {
            parser.push_whole(chunk, &mut items)
        } else {
            parser.push(chunk, &mut items).map(|()| false)
        };
        match pushed {
            Err(e) => return (items, Err(e)),
            Ok(true) => match &items[before..] {
                [Item::Event(event)] => assert_eq!(&event.to_bytes()[..], chunk),
                other => panic!("a whole event gave {other:?}"),
            },
            Ok(false) => {}
        }
    }
    (items, Ok(()))
}

/// `data` cut after each blank line (`\n\n`), as upstreams send an event a chunk.
fn event_chunks(data: &[u8]) -> Vec<&[u8]> {
    let mut chunks = Vec::new();
    let mut rest = data;
    while let Some(at) = rest.windows(2).position(|w| w == b"\n\n") {
        let (chunk, tail) = rest.split_at(at + 2);
        chunks.push(chunk);
        rest = tail;
    }
    chunks.push(rest);
    chunks
}

/// A hash of the input, so the cuts are reproducible from the input alone (FNV-1a).
fn hash(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Chunks of 0 to 17 bytes, sizes from splitmix64 seeded by `seed`.
fn random_chunks(data: &[u8], mut seed: u64) -> Vec<&[u8]> {
    let mut chunks = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        seed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = seed;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        let len = usize::try_from(z % 18).unwrap_or(0).min(rest.len());
        let (chunk, tail) = rest.split_at(len);
        chunks.push(chunk);
        rest = tail;
    }
    chunks
}

/// The bytes the relay sends the client for `items` (proxy/relay.rs).
fn relayed(items: &[Item]) -> Vec<u8> {
    let mut out = Vec::new();
    for item in items {
        match item {
            Item::Comment(text) => out.extend_from_slice(format!(":{text}\n\n").as_bytes()),
            Item::Event(event) => out.extend_from_slice(&event.to_bytes()),
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let seed = hash(data);
    let at = usize::try_from(seed % (data.len() as u64 + 1)).unwrap_or(0);
    for limit in LIMITS {
        let whole = parse(limit, [data], false);
        let one_cut = parse(limit, [&data[..at], &data[at..]], false);
        assert_eq!(one_cut, whole, "limit {limit}, cut at {at}");
        let bytes = parse(limit, data.chunks(1).flat_map(|b| [b, &[][..]]), false);
        assert_eq!(bytes, whole, "limit {limit}, byte by byte");
        let random = parse(limit, random_chunks(data, seed), false);
        assert_eq!(random, whole, "limit {limit}, random chunks");
        let random = parse(limit, random_chunks(data, seed), true);
        assert_eq!(random, whole, "limit {limit}, random chunks pushed whole");
        let events = parse(limit, event_chunks(data), true);
        assert_eq!(
            events, whole,
            "limit {limit}, an event a chunk pushed whole"
        );

        let (items, _) = whole;
        for item in &items {
            if let Item::Event(event) = item {
                assert!(event.data.len() <= limit, "event data within {limit}");
            }
        }
        let (again, result) = parse(usize::MAX, [relayed(&items).as_slice()], false);
        assert_eq!(result, Ok(()));
        assert_eq!(again, items, "the relayed stream parses to the same items");
    }
});
