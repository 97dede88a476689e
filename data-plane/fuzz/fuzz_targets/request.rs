//! Request bodies from clients: parsing never panics, and a rewrite changes only
//! `model` (and `stream_options.include_usage`), keeping every other field.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Ok(parsed) = sluice_proxy::request::parse(data) else {
        return;
    };
    let rewritten = parsed.rewrite("upstream-model", parsed.stream);
    let out: Value = serde_json::from_slice(&rewritten).expect("a rewrite is valid JSON");
    assert_eq!(out["model"], "upstream-model");
    let Ok(Value::Object(mut original)) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let Value::Object(mut out) = out else {
        panic!("a rewrite is an object");
    };
    original.remove("model");
    out.remove("model");
    if parsed.stream {
        assert_eq!(out["stream_options"]["include_usage"], true);
        original.remove("stream_options");
        out.remove("stream_options");
    }
    assert_eq!(original, out, "fields other than model and stream_options are kept");
});
