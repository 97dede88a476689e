//! Latency histograms (HdrHistogram, nanoseconds, three significant digits).

use std::time::Duration;

use hdrhistogram::Histogram;

use super::BenchError;

/// Highest recordable latency; longer ones are recorded as this.
const MAX_NANOS: u64 = 600_000_000_000;

/// A latency distribution with 0.1 % precision from 1 ns to 10 min.
#[derive(Clone, Debug)]
pub struct Latencies {
    hist: Histogram<u64>,
}

impl Latencies {
    pub fn new() -> Result<Self, BenchError> {
        Histogram::new_with_bounds(1, MAX_NANOS, 3)
            .map(|hist| Self { hist })
            .map_err(|e| BenchError::Histogram(format!("{e:?}")))
    }

    /// Adds one observation (clamped to the recordable range).
    pub fn record(&mut self, latency: Duration) {
        let nanos = u64::try_from(latency.as_nanos()).unwrap_or(MAX_NANOS);
        self.hist.saturating_record(nanos.clamp(1, MAX_NANOS));
    }

    /// Adds every observation of `other`.
    pub fn merge(&mut self, other: &Latencies) {
        // Both come from `new`, so they have the same bounds and the addition cannot fail.
        let _ = self.hist.add(&other.hist);
    }

    pub fn count(&self) -> u64 {
        self.hist.len()
    }

    /// The latency at quantile `q` (0.0 ..= 1.0); zero when empty.
    pub fn quantile(&self, q: f64) -> Duration {
        if self.hist.is_empty() {
            return Duration::ZERO;
        }
        Duration::from_nanos(self.hist.value_at_quantile(q))
    }

    pub fn max(&self) -> Duration {
        if self.hist.is_empty() {
            return Duration::ZERO;
        }
        Duration::from_nanos(self.hist.max())
    }

    pub fn p50(&self) -> Duration {
        self.quantile(0.50)
    }

    pub fn p99(&self) -> Duration {
        self.quantile(0.99)
    }

    pub fn p999(&self) -> Duration {
        self.quantile(0.999)
    }
}

/// `a − b` in milliseconds, signed: the overhead of a path over its baseline.
pub fn added_ms(a: Duration, b: Duration) -> f64 {
    ms(a) - ms(b)
}

/// A duration in (fractional) milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn percentiles_of_a_known_distribution() {
        let mut h = Latencies::new().unwrap();
        for us in 1..=1000 {
            h.record(Duration::from_micros(us));
        }
        let within =
            |d: Duration, us: u64| (d.as_nanos() as f64 / (us as f64 * 1000.0) - 1.0).abs() < 0.002;
        assert!(within(h.p50(), 500), "{:?}", h.p50());
        assert!(within(h.p99(), 990), "{:?}", h.p99());
        assert!(within(h.p999(), 999), "{:?}", h.p999());
        assert_eq!(h.count(), 1000);

        let mut other = Latencies::new().unwrap();
        other.record(Duration::from_secs(3600));
        h.merge(&other);
        assert_eq!(h.count(), 1001);
        assert!(h.max() >= Duration::from_secs(599));
        assert!(
            (added_ms(Duration::from_micros(1500), Duration::from_millis(1)) - 0.5).abs() < 1e-9
        );
    }

    #[test]
    fn empty_histograms_read_zero() {
        let h = Latencies::new().unwrap();
        assert_eq!(h.p99(), Duration::ZERO);
        assert_eq!(h.max(), Duration::ZERO);
    }
}
