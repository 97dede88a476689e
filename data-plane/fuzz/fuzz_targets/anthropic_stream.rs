//! Anthropic event streams from upstreams, translated to chat completion chunks (and chat
//! chunks translated to Anthropic events). The input is the stream's bytes as they came (the
//! seeds are plain event streams). Whatever the bytes:
//! - neither translation panics, and each stops at its first `Done` or `Failed` as the relay
//!   does;
//! - every frame written for the client is whole server-sent events that parse back, each
//!   `data` being JSON (or `[DONE]`, last), so a client never reads a broken event;
//! - an Anthropic client's stream names each event after its `type`, as the SDKs dispatch.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_proxy::anthropic::stream::{ChunksFromEvents, EventUsage, EventsFromChunks, Flow};
use sluice_proxy::sse::{Event, Item, SseParser};

fn events(bytes: &[u8]) -> Vec<Event> {
    let mut parser = SseParser::new(64 * 1024);
    let mut items = Vec::new();
    let _ = parser.push(bytes, &mut items);
    items
        .into_iter()
        .filter_map(|i| match i {
            Item::Event(e) => Some(e),
            Item::Comment(_) => None,
        })
        .collect()
}

/// The frames parse back to events with JSON data; `[DONE]` only last.
fn check_frames<B: AsRef<[u8]>>(frames: &[B], anthropic: bool) {
    let mut all = Vec::new();
    for frame in frames {
        let frame = frame.as_ref();
        assert!(frame.ends_with(b"\n\n"), "a frame is whole events");
        all.extend(events(frame));
    }
    for (i, event) in all.iter().enumerate() {
        if event.data == "[DONE]" {
            assert!(!anthropic, "no [DONE] in an Anthropic stream");
            assert_eq!(i + 1, all.len(), "[DONE] is last");
            continue;
        }
        let value: serde_json::Value =
            serde_json::from_str(&event.data).expect("every data is JSON");
        if anthropic {
            let kind = value.get("type").and_then(|t| t.as_str());
            assert_eq!(event.event.as_deref(), kind, "named after its type");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let input = events(data);

    let mut to_chat = ChunksFromEvents::new(0, data.first().is_some_and(|b| b & 1 == 1));
    let mut usage = EventUsage::default();
    let mut frames = Vec::new();
    for event in &input {
        let _ = usage.observe(event);
        if to_chat.push(event, &mut frames) != Flow::Continue {
            break;
        }
    }
    check_frames(&frames, false);

    let mut to_events = EventsFromChunks::default();
    let mut frames = Vec::new();
    for event in &input {
        if to_events.push(event, &mut frames) != Flow::Continue {
            break;
        }
    }
    check_frames(&frames, true);
});
