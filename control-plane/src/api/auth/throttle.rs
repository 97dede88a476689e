//! Slowing down guessing: per client address, a bucket of failed authentications. An address
//! may fail [`BURST`] times at once, then once per [`REFILL`]; while its bucket is empty every
//! request from it is refused before its token is looked at (a refusal that depended on the
//! token would tell a guesser when it guessed right). An address that has not failed (or is
//! no longer tracked) is always served: a guesser with many addresses cannot lock out the
//! holders of the right token, replicas reconnecting from new addresses included. Memory is
//! bounded: at most [`MAX_TRACKED`] addresses are tracked; when a new one fails with the table
//! full, those that have earned all their failures back are forgotten, else one of the others.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Failures an address may make at once.
pub const BURST: u32 = 10;
/// One more failure is allowed per this much time.
pub const REFILL: Duration = Duration::from_secs(2);
/// Addresses tracked at most (about 64 bytes each).
pub const MAX_TRACKED: usize = 4096;

/// A failed-authentication bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Failures still allowed, as of `at`.
    left: f64,
    at: Instant,
}

impl Bucket {
    fn full(now: Instant) -> Self {
        Self {
            left: f64::from(BURST),
            at: now,
        }
    }

    /// Tops the bucket up for the time passed since it was last looked at.
    fn refill(&mut self, now: Instant) {
        let earned = now.saturating_duration_since(self.at).as_secs_f64() / REFILL.as_secs_f64();
        self.left = (self.left + earned).min(f64::from(BURST));
        self.at = now;
    }

    fn is_full(&self, now: Instant) -> bool {
        let mut copy = *self;
        copy.refill(now);
        copy.left >= f64::from(BURST)
    }

    /// How long until one more failure is allowed (zero when it is now).
    fn wait(&self) -> Duration {
        if self.left >= 1.0 {
            Duration::ZERO
        } else {
            REFILL.mul_f64(1.0 - self.left)
        }
    }
}

/// Who a bucket belongs to: an IPv4 address, or the /64 an IPv6 address is in (one host
/// usually has a whole /64).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Source {
    V4(u32),
    V6(u64),
}

impl From<IpAddr> for Source {
    fn from(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Self::V4(u32::from(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self::V4(u32::from(v4)),
                None => Self::V6((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

/// Failed authentications per client address, for one token.
#[derive(Debug, Default)]
pub struct FailureThrottle {
    tracked: Mutex<HashMap<Source, Bucket>>,
}

impl FailureThrottle {
    /// `Err(wait)` when `peer` has used up its failures: refuse it for now.
    pub fn admit(&self, peer: IpAddr, now: Instant) -> Result<(), Duration> {
        let mut tracked = self.lock();
        let Some(bucket) = tracked.get_mut(&Source::from(peer)) else {
            // An address not seen failing.
            return Ok(());
        };
        bucket.refill(now);
        match bucket.wait() {
            Duration::ZERO => Ok(()),
            wait => Err(wait),
        }
    }

    /// Counts a failed authentication from `peer`; returns the failures it has left.
    pub fn failed(&self, peer: IpAddr, now: Instant) -> u32 {
        let mut tracked = self.lock();
        let source = Source::from(peer);
        if !tracked.contains_key(&source) && tracked.len() >= MAX_TRACKED {
            // Addresses that have earned all their failures back need no memory; failing
            // that, one of the others is forgotten (and gets its burst back): bounded memory
            // comes before a guesser with thousands of addresses, whose guesses at tokens of
            // 128 bits or more are hopeless at any rate.
            tracked.retain(|_, bucket| !bucket.is_full(now));
            if tracked.len() >= MAX_TRACKED
                && let Some(forgotten) = tracked.keys().next().copied()
            {
                tracked.remove(&forgotten);
            }
        }
        let bucket = tracked.entry(source).or_insert_with(|| Bucket::full(now));
        bucket.refill(now);
        bucket.left = (bucket.left - 1.0).max(0.0);
        bucket.left as u32
    }

    /// Addresses tracked now (for tests).
    pub fn tracked(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Source, Bucket>> {
        self.tracked.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_burst_then_one_failure_per_refill() {
        let throttle = FailureThrottle::default();
        let t0 = Instant::now();
        let a = ip("192.0.2.1");
        for _ in 0..BURST {
            assert!(throttle.admit(a, t0).is_ok());
            throttle.failed(a, t0);
        }
        let wait = throttle.admit(a, t0).unwrap_err();
        assert_eq!(wait, REFILL);
        // Another address is not held back.
        assert!(throttle.admit(ip("192.0.2.2"), t0).is_ok());
        // Half a refill later: half the wait.
        assert_eq!(throttle.admit(a, t0 + REFILL / 2).unwrap_err(), REFILL / 2);
        assert!(throttle.admit(a, t0 + REFILL).is_ok());
        throttle.failed(a, t0 + REFILL);
        assert!(throttle.admit(a, t0 + REFILL).is_err());
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        let throttle = FailureThrottle::default();
        let t0 = Instant::now();
        for i in 0..BURST {
            throttle.failed(ip(&format!("2001:db8:1:2::{i:x}")), t0);
        }
        assert!(throttle.admit(ip("2001:db8:1:2::ffff"), t0).is_err());
        assert!(throttle.admit(ip("2001:db8:1:3::1"), t0).is_ok());
        for _ in 0..BURST {
            throttle.failed(ip("::ffff:192.0.2.9"), t0);
        }
        assert!(throttle.admit(ip("192.0.2.9"), t0).is_err());
    }

    /// A guesser failing from more addresses than are tracked, each failing as fast as it
    /// may: memory stays bounded, and an address that never failed is still served (it used
    /// to share one emptied bucket with every untracked address, the right token's holders
    /// among them).
    #[test]
    fn memory_stays_bounded_and_an_address_that_never_failed_is_served_when_full() {
        let throttle = FailureThrottle::default();
        let t0 = Instant::now();
        for _ in 0..BURST {
            for i in 0..(MAX_TRACKED as u32 + 500) {
                throttle.failed(IpAddr::from(i.to_be_bytes()), t0);
            }
        }
        assert_eq!(throttle.tracked(), MAX_TRACKED);
        assert!(throttle.admit(ip("203.0.113.7"), t0).is_ok());
        // Most of the guesser's addresses are held back.
        let held = (0..(MAX_TRACKED as u32 + 500))
            .filter(|i| throttle.admit(IpAddr::from(i.to_be_bytes()), t0).is_err())
            .count();
        assert!(held > MAX_TRACKED / 2, "{held}");
        // Once the tracked ones have earned their failures back, they are forgotten.
        let later = t0 + REFILL * BURST;
        throttle.failed(ip("203.0.113.8"), later);
        assert_eq!(throttle.tracked(), 1);
    }
}
