//! Jittered exponential backoff for reconnecting to the control plane.

use std::time::Duration;

use rand::Rng;

/// Delays that double from `base` up to `max`, each drawn uniformly from the upper half of
/// its step (`[d/2, d]`) so that replicas which lost the control plane together do not all
/// come back in the same millisecond.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max,
            attempt: 0,
        }
    }

    /// The delay before the next reconnect; each call without a `reset` doubles the step.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.delay_for(self.attempt, rand::rng().random::<f64>());
        self.attempt = self.attempt.saturating_add(1);
        delay
    }

    /// Back to `base`: the connection worked.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The delay for `attempt` with `jitter` in `[0, 1)`.
    pub fn delay_for(&self, attempt: u32, jitter: f64) -> Duration {
        let factor = 1u32.checked_shl(attempt).unwrap_or(u32::MAX);
        let step = self
            .base
            .checked_mul(factor)
            .unwrap_or(self.max)
            .min(self.max);
        step / 2 + step.mul_f64(jitter.clamp(0.0, 1.0) / 2.0)
    }
}

impl Default for Backoff {
    /// 100 ms doubling to 10 s, as used for both control-plane streams.
    fn default() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(10))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_within_jitter_bounds_and_caps() {
        let b = Backoff::default();
        assert_eq!(b.delay_for(0, 0.0), Duration::from_millis(50));
        assert_eq!(b.delay_for(0, 1.0), Duration::from_millis(100));
        assert_eq!(b.delay_for(3, 0.0), Duration::from_millis(400));
        assert_eq!(b.delay_for(3, 1.0), Duration::from_millis(800));
        assert_eq!(b.delay_for(20, 1.0), Duration::from_secs(10));
        assert_eq!(b.delay_for(u32::MAX, 0.0), Duration::from_secs(5));
    }

    #[test]
    fn next_delay_grows_and_reset_starts_over() {
        let mut b = Backoff::default();
        let delays: Vec<Duration> = (0..10).map(|_| b.next_delay()).collect();
        for (i, d) in delays.iter().enumerate() {
            let step = (Duration::from_millis(100) * (1 << i)).min(Duration::from_secs(10));
            assert!(*d >= step / 2 && *d <= step, "attempt {i}: {d:?}");
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
