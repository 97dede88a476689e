//! Usage accounting shared by ingestion and statistics: the record the store
//! aggregates, and the fixed log-spaced latency histogram percentiles come from.

use sluice_proto::v1 as pb;

/// Smallest latency the histogram tells apart, in milliseconds.
const HISTOGRAM_FLOOR_MS: f64 = 0.1;
/// Buckets per doubling of latency (each bucket is ~19 % wide).
const BUCKETS_PER_DOUBLING: f64 = 4.0;
/// The last bucket holds everything above ~56 minutes.
pub const HISTOGRAM_BUCKETS: u32 = 101;

/// The histogram bucket of a latency: bucket `b` holds latencies in
/// `(upper(b − 1), upper(b)]`, bucket 0 everything up to the floor.
pub fn latency_bucket(latency_ms: f64) -> u32 {
    if !latency_ms.is_finite() || latency_ms <= HISTOGRAM_FLOOR_MS {
        return 0;
    }
    let b = (BUCKETS_PER_DOUBLING * (latency_ms / HISTOGRAM_FLOOR_MS).log2()).ceil();
    (b as u32).min(HISTOGRAM_BUCKETS - 1)
}

/// The upper bound of bucket `b`, in milliseconds; percentiles report it.
pub fn bucket_upper_ms(b: u32) -> f64 {
    HISTOGRAM_FLOOR_MS * 2f64.powf(f64::from(b) / BUCKETS_PER_DOUBLING)
}

/// The `q` quantile (0 < q ≤ 1) of a histogram given as (bucket, count) pairs
/// sorted by bucket: the upper bound of the bucket holding that rank.
pub fn quantile(histogram: &[(u32, u64)], q: f64) -> f64 {
    let total: u64 = histogram.iter().map(|(_, c)| c).sum();
    if total == 0 {
        return 0.0;
    }
    let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
    let mut seen = 0;
    for &(bucket, count) in histogram {
        seen += count;
        if seen >= rank {
            return bucket_upper_ms(bucket);
        }
    }
    histogram.last().map_or(0.0, |&(b, _)| bucket_upper_ms(b))
}

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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_bound_their_values() {
        let mut last = 0;
        for i in 1..200_000 {
            let ms = f64::from(i) * 0.05;
            let b = latency_bucket(ms);
            assert!(b >= last);
            assert!(ms <= bucket_upper_ms(b) * (1.0 + 1e-9), "{ms} in {b}");
            if b > 0 {
                assert!(ms > bucket_upper_ms(b - 1) * (1.0 - 1e-9), "{ms} in {b}");
            }
            last = b;
        }
        assert_eq!(latency_bucket(f64::NAN), 0);
        assert_eq!(latency_bucket(1e12), HISTOGRAM_BUCKETS - 1);
    }

    #[test]
    fn quantiles_land_in_the_right_bucket() {
        // 90 requests at 10 ms, 9 at 100 ms, 1 at 1 s.
        let mut h = std::collections::BTreeMap::new();
        for (ms, n) in [(10.0, 90u64), (100.0, 9), (1000.0, 1)] {
            *h.entry(latency_bucket(ms)).or_insert(0) += n;
        }
        let h: Vec<_> = h.into_iter().collect();
        let p50 = quantile(&h, 0.5);
        let p95 = quantile(&h, 0.95);
        let p99 = quantile(&h, 0.99);
        let p100 = quantile(&h, 1.0);
        assert!((10.0..10.0 * 1.19).contains(&p50), "{p50}");
        assert!((100.0..100.0 * 1.19).contains(&p95), "{p95}");
        assert!((100.0..100.0 * 1.19).contains(&p99), "{p99}");
        assert!((1000.0..1000.0 * 1.19).contains(&p100), "{p100}");
        assert_eq!(quantile(&[], 0.5), 0.0);
    }
}
