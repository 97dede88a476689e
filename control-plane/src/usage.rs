//! Usage accounting: one finished request as the store aggregates it, and (in
//! [`histogram`]) the latency histogram its percentiles come from.

pub mod histogram;

use sluice_proto::v1 as pb;

/// One finished request as the store aggregates it.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageRow {
    pub sequence: u64,
    pub backend_id: String,
    pub model: String,
    pub client_key_id: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub latency_ms: f64,
    pub ttft_ms: Option<f64>,
    pub is_error: bool,
    pub stream: bool,
    pub time_ms: i64,
}

impl From<&pb::UsageRecord> for UsageRow {
    fn from(r: &pb::UsageRecord) -> Self {
        let ms = |d: &pbjson_types::Duration| d.seconds as f64 * 1000.0 + f64::from(d.nanos) / 1e6;
        Self {
            sequence: r.sequence,
            backend_id: r.backend_id.clone(),
            model: r.model.clone(),
            client_key_id: r.client_key_id.clone(),
            prompt_tokens: r.prompt_tokens,
            completion_tokens: r.completion_tokens,
            latency_ms: r.latency.as_ref().map_or(0.0, ms).max(0.0),
            ttft_ms: r.time_to_first_token.as_ref().map(ms).map(|v| v.max(0.0)),
            is_error: r.error_kind != pb::ErrorKind::Unspecified as i32 || r.status_code >= 400,
            stream: r.stream,
            time_ms: r
                .time
                .as_ref()
                .map_or_else(crate::time::now_ms, crate::time::timestamp_ms),
        }
    }
}
