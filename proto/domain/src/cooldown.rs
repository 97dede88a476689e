//! Cooldowns: how long a backend rests after it answered 429 or kept failing.

use std::time::Duration;

/// Longest `Retry-After` honoured; a longer one is read as this.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 60 * 60);

/// The cooldown part of the settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CooldownPolicy {
    pub base: Duration,
    pub cap: Duration,
    /// Consecutive non-429 failures that cool a backend; 0 disables.
    pub failure_threshold: u32,
}

impl CooldownPolicy {
    /// `min(cap, base · 2^(n−1))` for `n ≥ 1`; zero for `n = 0`.
    pub fn backoff(&self, n: u32) -> Duration {
        if n == 0 {
            return Duration::ZERO;
        }
        let factor = 1u32.checked_shl(n - 1).unwrap_or(u32::MAX);
        self.base
            .checked_mul(factor)
            .unwrap_or(self.cap)
            .min(self.cap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let policy = CooldownPolicy {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(300),
            failure_threshold: 5,
        };
        assert_eq!(policy.backoff(0), Duration::ZERO);
        assert_eq!(policy.backoff(1), Duration::from_secs(1));
        assert_eq!(policy.backoff(2), Duration::from_secs(2));
        assert_eq!(policy.backoff(9), Duration::from_secs(256));
        assert_eq!(policy.backoff(10), policy.cap);
        assert_eq!(policy.backoff(200), policy.cap);
    }
}
