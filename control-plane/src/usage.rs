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

/// Latency histograms are stored as BLOBs: one 9-byte entry per non-empty bucket,
/// the bucket number (`u8`) then its count (`u64`, big-endian), in ascending bucket
/// order. Fixed-width entries let plain SQL build one
/// (`unhex(group_concat(printf('%02X%016X', bucket, count), '' ORDER BY bucket))`).
const ENTRY_LEN: usize = 9;

/// A stored histogram that is not in the format above.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("corrupt latency histogram: {0}")]
pub struct HistogramError(&'static str);

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

/// Registers the SQL functions that build and merge stored histograms:
/// - aggregate `usage_histogram(h)`: the sum of the stored histograms `h` (NULL is
///   skipped);
/// - scalar `usage_histogram_add(a, b)`: the sum of two stored histograms.
pub fn register_sql_functions(conn: &rusqlite::Connection) -> rusqlite::Result<()> {
    use rusqlite::functions::FunctionFlags;
    let flags = FunctionFlags::SQLITE_UTF8
        | FunctionFlags::SQLITE_DETERMINISTIC
        | FunctionFlags::SQLITE_INNOCUOUS;
    conn.create_aggregate_function("usage_histogram", 1, flags, HistogramAggregate)?;
    conn.create_scalar_function("usage_histogram_add", 2, flags, |ctx| {
        let blob = |i| match ctx.get_raw(i) {
            rusqlite::types::ValueRef::Blob(b) => Ok(b),
            rusqlite::types::ValueRef::Null => Ok(&[][..]),
            _ => Err(rusqlite::Error::UserFunctionError(Box::new(
                HistogramError("not a histogram"),
            ))),
        };
        merge_encoded(blob(0)?, blob(1)?)
            .map_err(|e| rusqlite::Error::UserFunctionError(Box::new(e)))
    })
}

fn add_sql_value(h: &mut Histogram, value: rusqlite::types::ValueRef<'_>) -> rusqlite::Result<()> {
    use rusqlite::types::ValueRef;
    match value {
        ValueRef::Blob(bytes) => h
            .merge_encoded(bytes)
            .map_err(|e| rusqlite::Error::UserFunctionError(Box::new(e)))?,
        ValueRef::Null => {}
        ValueRef::Integer(_) | ValueRef::Real(_) | ValueRef::Text(_) => {
            return Err(rusqlite::Error::UserFunctionError(Box::new(
                HistogramError("not a histogram"),
            )));
        }
    }
    Ok(())
}

struct HistogramAggregate;

impl rusqlite::functions::Aggregate<Histogram, Vec<u8>> for HistogramAggregate {
    fn init(&self, _: &mut rusqlite::functions::Context<'_>) -> rusqlite::Result<Histogram> {
        Ok(Histogram::default())
    }

    fn step(
        &self,
        ctx: &mut rusqlite::functions::Context<'_>,
        h: &mut Histogram,
    ) -> rusqlite::Result<()> {
        add_sql_value(h, ctx.get_raw(0))
    }

    fn finalize(
        &self,
        _: &mut rusqlite::functions::Context<'_>,
        h: Option<Histogram>,
    ) -> rusqlite::Result<Vec<u8>> {
        Ok(h.unwrap_or_default().encode())
    }
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
    fn sql_functions_build_and_merge_histograms() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        register_sql_functions(&conn).unwrap();
        conn.execute_batch(
            "CREATE TABLE t (g INTEGER, h BLOB);
             INSERT INTO t VALUES (1, unhex('03' || '0000000000000002')), (1, NULL), (1, x''),
                                  (1, unhex('03' || '0000000000000001' || '09' || '0000000000000004')),
                                  (2, unhex('00' || '0000000000000001'));",
        )
        .unwrap();
        let sum: Vec<u8> = conn
            .query_row("SELECT usage_histogram(h) FROM t WHERE g = 1", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(sum, encode_buckets([(3, 3), (9, 4)]));
        let added: Vec<u8> = conn
            .query_row(
                "SELECT usage_histogram_add((SELECT h FROM t WHERE g = 2), ?1)",
                [&sum],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(added, encode_buckets([(0, 1), (3, 3), (9, 4)]));
        // Corrupt input is an SQL error, not a panic.
        assert!(
            conn.query_row("SELECT usage_histogram(x'0102')", [], |r| r
                .get::<_, Vec<u8>>(0))
                .is_err()
        );
        assert!(
            conn.query_row("SELECT usage_histogram_add('text', x'')", [], |r| r
                .get::<_, Vec<u8>>(0))
                .is_err()
        );
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
