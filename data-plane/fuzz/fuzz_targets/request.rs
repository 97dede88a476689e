//! Request bodies from clients: parsing never panics; a rewrite parses again with the
//! new model and the same streaming choice; and when the body is strict JSON, the
//! rewrite is strict JSON that changes only `model` (and `stream_options.include_usage`
//! for streams), keeping every other field.
//!
//! Bodies that are not strict JSON but that the parser takes (a lone UTF-16 surrogate
//! escape such as `"\ud800"`, which Python's `json` and so many upstreams accept) are
//! forwarded as they came, apart from the rewritten fields.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Ok(parsed) = sluice_proxy::request::parse(data) else {
        return;
    };
    let rewritten = parsed.rewrite("upstream-model", parsed.stream);
    let again = sluice_proxy::request::parse(&rewritten).expect("a rewrite parses again");
    assert_eq!(again.model, "upstream-model");
    assert_eq!(again.stream, parsed.stream);

    let Ok(Value::Object(mut original)) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let out: Value = serde_json::from_slice(&rewritten).expect("a strict body's rewrite is strict JSON");
    let Value::Object(mut out) = out else {
        panic!("a rewrite is an object");
    };
    assert_eq!(out["model"], "upstream-model");
    original.remove("model");
    out.remove("model");
    if parsed.stream {
        assert_eq!(out["stream_options"]["include_usage"], true);
        original.remove("stream_options");
        out.remove("stream_options");
    }
    assert_eq!(original, out, "fields other than model and stream_options are kept");
});
