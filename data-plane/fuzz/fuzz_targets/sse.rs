//! Event streams from upstreams: the parser never panics, bounds what it holds,
//! and any split of the same bytes yields the same events.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_proxy::sse::SseParser;

const LIMIT: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let at = usize::from(split) * rest.len() / 256;
    let mut whole = SseParser::new(LIMIT);
    let mut whole_items = Vec::new();
    let whole_result = whole.push(rest, &mut whole_items);

    let mut parts = SseParser::new(LIMIT);
    let mut part_items = Vec::new();
    let first = parts.push(&rest[..at], &mut part_items);
    let second = if first.is_ok() { parts.push(&rest[at..], &mut part_items) } else { first.clone() };
    assert_eq!(whole_result.is_ok(), second.is_ok(), "split at {at}");
    if whole_result.is_ok() {
        assert_eq!(whole_items, part_items, "split at {at}");
    }
});
