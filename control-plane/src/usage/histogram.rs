//! The latency histogram usage percentiles come from: fixed log-spaced buckets, a compact
//! stored form that plain SQL can build, merging, and quantiles.

/// Smallest latency the histogram tells apart, in milliseconds.
const HISTOGRAM_FLOOR_MS: f64 = 0.1;
/// Buckets per doubling of latency (each bucket is ~19 % wide).
const BUCKETS_PER_DOUBLING: f64 = 4.0;
/// The last bucket holds everything above ~47 minutes and reports ~56 (its upper bound).
/// Not widened for longer streams: an older control plane, rolled back to, refuses a stored
/// bucket past its last.
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

/// Latency histograms are stored as BLOBs: one 9-byte entry per non-empty bucket,
/// the bucket number (`u8`) then its count (`u64`, big-endian), in ascending bucket
/// order. Fixed-width entries let plain SQL build one
/// (`unhex(group_concat(printf('%02X%016X', bucket, count), '' ORDER BY bucket))`).
const ENTRY_LEN: usize = 9;

/// A stored histogram that is not in the format above.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("corrupt latency histogram: {0}")]
pub struct HistogramError(pub(crate) &'static str);

/// Bucket counts, dense; index = bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Histogram {
    counts: [u64; HISTOGRAM_BUCKETS as usize],
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: [0; HISTOGRAM_BUCKETS as usize],
        }
    }
}

impl Histogram {
    /// Counts `n` more requests in bucket `b` (clamped to the last bucket).
    pub fn add(&mut self, b: u32, n: u64) {
        let i = b.min(HISTOGRAM_BUCKETS - 1) as usize;
        if let Some(c) = self.counts.get_mut(i) {
            *c = c.saturating_add(n);
        }
    }

    /// Adds every count of a stored histogram.
    pub fn merge_encoded(&mut self, bytes: &[u8]) -> Result<(), HistogramError> {
        for_each_entry(bytes, |bucket, count| {
            if let Some(c) = self.counts.get_mut(usize::from(bucket)) {
                *c = c.saturating_add(count);
            }
        })
    }

    /// The stored form: non-empty buckets only, ascending.
    pub fn encode(&self) -> Vec<u8> {
        encode_buckets(
            (0..HISTOGRAM_BUCKETS)
                .zip(self.counts)
                .filter(|&(_, n)| n > 0),
        )
    }

    /// (bucket, count) of the non-empty buckets, ascending, as [`quantile`] takes them.
    pub fn buckets(&self) -> Vec<(u32, u64)> {
        (0..HISTOGRAM_BUCKETS)
            .zip(self.counts)
            .filter(|&(_, n)| n > 0)
            .collect()
    }

    pub fn quantile(&self, q: f64) -> f64 {
        quantile(&self.buckets(), q)
    }

    /// How many samples it holds.
    pub fn count(&self) -> u64 {
        self.counts
            .iter()
            .fold(0u64, |sum, n| sum.saturating_add(*n))
    }
}

/// The stored form of (bucket, count) pairs given in ascending bucket order
/// (buckets past the last are clamped to it).
pub fn encode_buckets(buckets: impl IntoIterator<Item = (u32, u64)>) -> Vec<u8> {
    let mut out = Vec::new();
    for (b, n) in buckets {
        out.push(b.min(HISTOGRAM_BUCKETS - 1) as u8);
        out.extend_from_slice(&n.to_be_bytes());
    }
    out
}

/// Calls `f` with each (bucket, count) of a stored histogram, checking the format.
fn for_each_entry(bytes: &[u8], mut f: impl FnMut(u8, u64)) -> Result<(), HistogramError> {
    if !bytes.len().is_multiple_of(ENTRY_LEN) {
        return Err(HistogramError("length is not a multiple of 9"));
    }
    let mut last = None;
    for entry in bytes.chunks_exact(ENTRY_LEN) {
        let (&bucket, count) = entry.split_first().ok_or(HistogramError("empty entry"))?;
        if u32::from(bucket) >= HISTOGRAM_BUCKETS {
            return Err(HistogramError("bucket out of range"));
        }
        if last.is_some_and(|last| last >= bucket) {
            return Err(HistogramError("buckets out of order"));
        }
        last = Some(bucket);
        let count: [u8; 8] = count
            .try_into()
            .map_err(|_| HistogramError("short entry"))?;
        f(bucket, u64::from_be_bytes(count));
    }
    Ok(())
}

/// The sum of two stored histograms, in the stored form.
pub fn merge_encoded(a: &[u8], b: &[u8]) -> Result<Vec<u8>, HistogramError> {
    let mut h = Histogram::default();
    h.merge_encoded(a)?;
    h.merge_encoded(b)?;
    Ok(h.encode())
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
    fn stored_histograms_round_trip_merge_and_refuse_corruption() {
        let mut a = Histogram::default();
        a.add(3, 2);
        a.add(100, 1);
        a.add(500, 1); // clamped to the last bucket
        let encoded = a.encode();
        assert_eq!(encoded.len(), 2 * ENTRY_LEN);
        let mut back = Histogram::default();
        back.merge_encoded(&encoded).unwrap();
        assert_eq!(back.buckets(), vec![(3, 2), (100, 2)]);

        let mut b = Histogram::default();
        b.add(3, u64::MAX);
        b.add(7, 5);
        let sum = merge_encoded(&encoded, &b.encode()).unwrap();
        let mut merged = Histogram::default();
        merged.merge_encoded(&sum).unwrap();
        assert_eq!(merged.buckets(), vec![(3, u64::MAX), (7, 5), (100, 2)]);
        assert_eq!(merge_encoded(&[], &[]).unwrap(), Vec::<u8>::new());

        // The format SQL builds in migration 0002: bucket byte, big-endian count.
        assert_eq!(
            encode_buckets([(5, 0x1234)]),
            vec![5, 0, 0, 0, 0, 0, 0, 0x12, 0x34]
        );
        for bad in [
            vec![1u8; 8],                     // short
            encode_buckets([(7, 1), (3, 1)]), // out of order
            encode_buckets([(3, 1), (3, 1)]), // repeated
            [&[101u8][..], &[0; 8]].concat(), // no such bucket
        ] {
            assert!(Histogram::default().merge_encoded(&bad).is_err(), "{bad:?}");
            assert!(merge_encoded(&encoded, &bad).is_err());
        }
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
