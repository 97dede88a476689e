//! Request bodies from clients, parsed and rewritten as the proxy does (`parse`, then
//! `rewrite` to the upstream model, forcing `include_usage` for streams): parsing never
//! panics; a rewrite parses again with the new model, the same streaming choice and the usage
//! chunk asked for when streaming; and when the body is strict JSON, the rewrite is strict JSON
//! that changes only `model` and, for streams, `stream_options.include_usage`, keeping every
//! other field (other `stream_options` fields included).
//!
//! The same body parsed as received (`parse_received`) and sent to its own model, which the
//! proxy sends on as it came when nothing in it changes, reads as the rewrite reads.
//!
//! Bodies that are not strict JSON but that the parser takes (a lone UTF-16 surrogate
//! escape such as `"\ud800"`, which Python's `json` and so many upstreams accept) are
//! forwarded as they came, apart from the rewritten fields.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};

/// An upstream model name that needs escaping: a quote, a backslash, a control character,
/// non-ASCII.
const UPSTREAM: &str = "up\"stream\\model\u{7}-é";

fuzz_target!(|data: &[u8]| {
    let Ok(parsed) = sluice_proxy::request::parse(data) else {
        return;
    };
    let rewritten = parsed.rewrite(UPSTREAM, parsed.stream);
    let again = sluice_proxy::request::parse(&rewritten).expect("a rewrite parses again");
    assert_eq!(again.model, UPSTREAM);
    assert_eq!(again.stream, parsed.stream);
    assert_eq!(again.include_usage, parsed.stream || parsed.include_usage);

    let received = bytes::Bytes::copy_from_slice(data);
    let as_received =
        sluice_proxy::request::parse_received(&received).expect("parses as it did from bytes");
    let own = as_received.model.to_string();
    let sent = as_received.rewrite(&own, as_received.stream);
    let sent_again = sluice_proxy::request::parse(&sent).expect("what is sent parses again");
    assert_eq!(sent_again.model, own);
    assert_eq!(sent_again.stream, parsed.stream);
    assert_eq!(
        sent_again.include_usage,
        parsed.stream || parsed.include_usage
    );

    let Ok(Value::Object(mut original)) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let written: Value = serde_json::from_slice(&parsed.rewrite(&own, parsed.stream))
        .expect("a strict body's rewrite is strict JSON");
    assert_eq!(
        serde_json::from_slice::<Value>(&sent).expect("what is sent of a strict body is strict"),
        written,
        "a body sent as it came reads as its rewrite"
    );
    let out: Value =
        serde_json::from_slice(&rewritten).expect("a strict body's rewrite is strict JSON");
    let Value::Object(out) = out else {
        panic!("a rewrite is an object");
    };
    original.insert("model".into(), UPSTREAM.into());
    if parsed.stream {
        let mut options = match original.remove("stream_options") {
            Some(Value::Object(options)) => options,
            _ => Map::new(),
        };
        options.insert("include_usage".into(), true.into());
        original.insert("stream_options".into(), Value::Object(options));
    }
    assert_eq!(
        out, original,
        "only model and stream_options.include_usage change"
    );
});
