//! Usage accounting: one finished request as the store aggregates it, and (in
//! [`histogram`]) the latency histogram its percentiles come from.

pub mod histogram;

use sluice_domain::text::has_control;
use sluice_proto::limits::{MAX_ID_BYTES, MAX_MODEL_NAME_BYTES, OTHER_MODEL};
use sluice_proto::v1 as pb;

/// One finished request as the store aggregates it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct UsageRow {
    pub sequence: u64,
    pub backend_id: String,
    pub model: String,
    pub client_key_id: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Of `prompt_tokens`, read from the provider's prompt cache.
    pub cached_prompt_tokens: u64,
    /// Of `completion_tokens`, spent on reasoning.
    pub reasoning_tokens: u64,
    /// Of `prompt_tokens`, written to the provider's prompt cache.
    pub cache_write_prompt_tokens: u64,
    /// Of `prompt_tokens`, audio; of `completion_tokens`, audio.
    pub audio_prompt_tokens: u64,
    pub audio_completion_tokens: u64,
    /// `None` when unknown (a request its replica's crash cut off): counted in neither the
    /// latency sum nor its histogram, as a record without TTFT is not in those.
    pub latency_ms: Option<f64>,
    pub ttft_ms: Option<f64>,
    pub is_error: bool,
    pub stream: bool,
    /// Its tokens are the replica's estimate, not the provider's count
    /// ([`pb::UsageRecord::tokens_estimated`]).
    pub tokens_estimated: bool,
    pub time_ms: i64,
    /// What the replica computed the request cost, in nano-units (added to the key's spend).
    pub cost_nanos: u64,
    /// `cost_nanos` is the replica's price even at 0; unset, a 0 is a replica too old to
    /// price its records, whose tokens are priced at ingestion.
    pub priced: bool,
    /// The budget period whose allowance paid for it (Unix ms of its start); 0 for none
    /// ([`pb::UsageRecord::budget_period_start_ms`]).
    pub budget_period_start_ms: i64,
}

/// The most one record may add to a key's spend, in nano-units (a million in the currency):
/// a record past it is counted at it, which keeps every sum far from overflowing.
pub const MAX_COST_NANOS_PER_RECORD: u64 = 1_000_000 * 1_000_000_000;

/// A model name a usage row may carry: what a route could be named (at most
/// [`MAX_MODEL_NAME_BYTES`], no control characters).
fn model_within_bounds(model: &str) -> bool {
    model.len() <= MAX_MODEL_NAME_BYTES && !has_control(model)
}

/// An id a usage row may carry (at most [`MAX_ID_BYTES`], no control characters).
fn id_within_bounds(id: &str) -> bool {
    id.len() <= MAX_ID_BYTES && !has_control(id)
}

impl UsageRow {
    /// Replaces every value past its documented bound: a model name by [`OTHER_MODEL`], an
    /// id by the empty string. Returns whether anything was replaced. Data planes never
    /// send such a value (they record a model no route serves as `other`); an older or
    /// broken one is still counted, under the placeholder, rather than refused.
    pub fn clamp_to_bounds(&mut self) -> bool {
        let mut clamped = false;
        if !model_within_bounds(&self.model) {
            self.model = OTHER_MODEL.to_owned();
            clamped = true;
        }
        for id in [&mut self.backend_id, &mut self.client_key_id] {
            if !id_within_bounds(id) {
                id.clear();
                clamped = true;
            }
        }
        clamped
    }
}

/// Takes the record's strings rather than copying them: ingestion decodes tens of
/// thousands of records a second and has no other use for them.
impl From<pb::UsageRecord> for UsageRow {
    fn from(r: pb::UsageRecord) -> Self {
        let ms = |d: &pbjson_types::Duration| d.seconds as f64 * 1000.0 + f64::from(d.nanos) / 1e6;
        Self {
            sequence: r.sequence,
            backend_id: r.backend_id,
            model: r.model,
            client_key_id: r.client_key_id,
            prompt_tokens: r.prompt_tokens,
            completion_tokens: r.completion_tokens,
            // Parts of the counts above: never more than they are.
            cached_prompt_tokens: r.cached_prompt_tokens.min(r.prompt_tokens),
            reasoning_tokens: r.reasoning_tokens.min(r.completion_tokens),
            cache_write_prompt_tokens: r
                .cache_write_prompt_tokens
                .min(r.prompt_tokens - r.cached_prompt_tokens.min(r.prompt_tokens)),
            audio_prompt_tokens: r.audio_prompt_tokens.min(r.prompt_tokens),
            audio_completion_tokens: r.audio_completion_tokens.min(r.completion_tokens),
            // None for a request its replica's crash cut off: unknown, not 0 ms.
            latency_ms: r.latency.as_ref().map(ms).map(|v| v.max(0.0)),
            // Streams only: a whole answer's first byte is its last, its latency again, and
            // averaged in it made "time to first token" mostly the latency of non-streamed
            // answers in a mixed workload.
            ttft_ms: r
                .time_to_first_token
                .as_ref()
                .filter(|_| r.stream)
                .map(ms)
                .map(|v| v.max(0.0)),
            // A request its client left once answering (a user stopping a stream: its head,
            // 200, went out) is not an error of the backend that was answering; Prometheus
            // counts it by that status too. One left before any answer (499: a client that
            // gave up on a backend that hung) is.
            is_error: r.status_code >= 400
                || (r.error_kind != pb::ErrorKind::Unspecified as i32
                    && r.error_kind != pb::ErrorKind::ClientCancelled as i32),
            stream: r.stream,
            tokens_estimated: r.tokens_estimated,
            time_ms: r
                .time
                .as_ref()
                .map_or_else(crate::time::now_ms, crate::time::timestamp_ms),
            cost_nanos: r.cost_nanos.min(MAX_COST_NANOS_PER_RECORD),
            priced: r.priced,
            budget_period_start_ms: r.budget_period_start_ms.max(0),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn values_past_their_bound_are_replaced_not_stored() {
        let fine = pb::UsageRecord {
            model: "m".repeat(MAX_MODEL_NAME_BYTES),
            backend_id: "b".repeat(MAX_ID_BYTES),
            client_key_id: "k".into(),
            ..Default::default()
        };
        let mut row = UsageRow::from(fine.clone());
        assert!(!row.clamp_to_bounds());
        assert_eq!(row.model, fine.model);
        assert_eq!(row.backend_id, fine.backend_id);

        let mut huge = UsageRow::from(pb::UsageRecord {
            model: "m".repeat(5 << 20),
            ..fine.clone()
        });
        assert!(huge.clamp_to_bounds());
        assert_eq!(huge.model, "other");
        let mut forged = UsageRow::from(pb::UsageRecord {
            model: "m\nforged line".into(),
            client_key_id: "k".repeat(MAX_ID_BYTES + 1),
            ..fine.clone()
        });
        assert!(forged.clamp_to_bounds());
        assert_eq!(
            (forged.model.as_str(), forged.client_key_id.as_str()),
            ("other", "")
        );
        // A C1 control (U+0085, next line) after a long printable run.
        let mut forged = UsageRow::from(pb::UsageRecord {
            backend_id: format!("{}\u{85}", "b".repeat(40)),
            ..fine
        });
        assert!(forged.clamp_to_bounds());
        assert_eq!(forged.backend_id, "");
    }

    /// The parts of a record's counts (cached, written, reasoning, audio) are never more than
    /// the counts they are parts of, whatever a broken replica sends.
    #[test]
    fn a_records_parts_are_never_more_than_its_counts() {
        let row = UsageRow::from(pb::UsageRecord {
            prompt_tokens: 10,
            completion_tokens: 4,
            cached_prompt_tokens: 6,
            cache_write_prompt_tokens: 9,
            reasoning_tokens: 7,
            audio_prompt_tokens: 12,
            audio_completion_tokens: 5,
            ..Default::default()
        });
        assert_eq!(
            (
                row.cached_prompt_tokens,
                row.cache_write_prompt_tokens,
                row.reasoning_tokens,
                row.audio_prompt_tokens,
                row.audio_completion_tokens,
            ),
            (6, 4, 4, 10, 4)
        );
        let within = UsageRow::from(pb::UsageRecord {
            prompt_tokens: 10,
            completion_tokens: 4,
            audio_prompt_tokens: 3,
            audio_completion_tokens: 2,
            ..Default::default()
        });
        assert_eq!(
            (within.audio_prompt_tokens, within.audio_completion_tokens),
            (3, 2)
        );
    }

    /// "Time to first token" is a stream's: a whole answer's first byte is its last. A
    /// request its client left is not an error; a failure or an error status is.
    #[test]
    fn ttft_is_a_streams_and_a_client_leaving_is_no_error() {
        let ms = |ms: i64| {
            Some(pbjson_types::Duration {
                seconds: ms / 1000,
                nanos: i32::try_from(ms % 1000).unwrap() * 1_000_000,
            })
        };
        let record = |stream: bool, status_code: u32, kind: pb::ErrorKind| {
            UsageRow::from(pb::UsageRecord {
                stream,
                status_code,
                error_kind: kind as i32,
                latency: ms(8_000),
                time_to_first_token: ms(400),
                ..Default::default()
            })
        };
        let streamed = record(true, 200, pb::ErrorKind::Unspecified);
        assert_eq!((streamed.ttft_ms, streamed.is_error), (Some(400.0), false));
        let whole = record(false, 200, pb::ErrorKind::Unspecified);
        assert_eq!((whole.ttft_ms, whole.latency_ms), (None, Some(8_000.0)));
        for (status, kind, error) in [
            (200, pb::ErrorKind::ClientCancelled, false),
            (499, pb::ErrorKind::ClientCancelled, true),
            (200, pb::ErrorKind::StreamInterrupted, true),
            (502, pb::ErrorKind::UpstreamStatus, true),
            (400, pb::ErrorKind::Unspecified, true),
        ] {
            assert_eq!(
                record(true, status, kind).is_error,
                error,
                "{status} {kind:?}"
            );
        }
    }
}
