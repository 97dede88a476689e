//! Token buckets for requests-per-minute limits, one per backend and one per client key.
//!
//! Each replica enforces `rpm_limit / replica_count` (the control plane tells every replica how
//! many are connected). A bucket refills continuously at that share and holds at most
//! [`burst`] tokens, so in any window of `T` seconds one replica admits at most
//! `burst + share · T / 60` requests, and all replicas together at most
//! `rpm_limit · T / 60 + Σ burst`. For the 60 s window the documented overshoot is therefore
//! `Σ max(1, ⌊share / 10⌋)`: a tenth of the limit plus at most one request per replica.
//!
//! A limiter belongs to a snapshot (its rate comes from that snapshot) but its token state is
//! shared with the limiter of the same backend or key in the previous snapshot, so a snapshot
//! swap neither refills nor empties a bucket.
//!
//! Tokens per minute ([`TokenBucket`]) and requests in flight ([`ParallelLimit`]) are shared
//! the same way, without a lock.

mod parallel;
mod tokens;

pub use parallel::{InFlight, ParallelLimit};
pub use tokens::{Reservation, TokenBucket};

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// Tokens a bucket may hold for a per-replica share of `share_per_minute` requests per minute:
/// a tenth of a minute's share, at least one request.
pub fn burst(share_per_minute: f64) -> f64 {
    (share_per_minute / 10.0).floor().max(1.0)
}

/// A requests-per-minute token bucket. Cloning shares the bucket.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    per_second: f64,
    capacity: f64,
    bucket: Arc<Mutex<Bucket>>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    refilled_at: Instant,
}

impl RateLimiter {
    /// A full bucket for this replica's share of `rpm_limit`; `None` when the limit is 0 (none).
    pub fn new(rpm_limit: u32, replica_count: u32, now: Instant) -> Option<Self> {
        let (per_second, capacity) = Self::shape(rpm_limit, replica_count)?;
        Some(Self {
            per_second,
            capacity,
            bucket: Arc::new(Mutex::new(Bucket {
                tokens: capacity,
                refilled_at: now,
            })),
        })
    }

    /// A limiter with the new limit that keeps `previous`'s tokens (clamped to the new
    /// capacity on next use); a new full bucket when there was none.
    pub fn carry_over(
        previous: Option<&RateLimiter>,
        rpm_limit: u32,
        replica_count: u32,
        now: Instant,
    ) -> Option<Self> {
        let (per_second, capacity) = Self::shape(rpm_limit, replica_count)?;
        match previous {
            Some(previous) => Some(Self {
                per_second,
                capacity,
                bucket: Arc::clone(&previous.bucket),
            }),
            None => Self::new(rpm_limit, replica_count, now),
        }
    }

    fn shape(rpm_limit: u32, replica_count: u32) -> Option<(f64, f64)> {
        if rpm_limit == 0 {
            return None;
        }
        let share = f64::from(rpm_limit) / f64::from(replica_count.max(1));
        Some((share / 60.0, burst(share)))
    }

    /// Takes one token, or says how long until one is available.
    pub fn try_acquire(&self, now: Instant) -> Result<(), Duration> {
        let mut bucket = self.bucket.lock().unwrap_or_else(PoisonError::into_inner);
        self.refill(&mut bucket, now);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(self.wait_for_one(bucket.tokens))
        }
    }

    /// How long until a token is available (zero when one is), without taking it.
    pub fn available_in(&self, now: Instant) -> Duration {
        let mut bucket = self.bucket.lock().unwrap_or_else(PoisonError::into_inner);
        self.refill(&mut bucket, now);
        if bucket.tokens >= 1.0 {
            Duration::ZERO
        } else {
            self.wait_for_one(bucket.tokens)
        }
    }

    /// Bucket capacity: the burst this replica admits after a quiet period.
    pub fn capacity(&self) -> f64 {
        self.capacity
    }

    /// This replica's share: the requests per minute its bucket refills by.
    pub fn share_per_minute(&self) -> f64 {
        self.per_second * 60.0
    }

    fn refill(&self, bucket: &mut Bucket, now: Instant) {
        let elapsed = now.saturating_duration_since(bucket.refilled_at);
        bucket.tokens =
            (bucket.tokens + elapsed.as_secs_f64() * self.per_second).min(self.capacity);
        bucket.refilled_at = bucket.refilled_at.max(now);
    }

    fn wait_for_one(&self, tokens: f64) -> Duration {
        let missing = (1.0 - tokens).max(0.0);
        // Round up to the millisecond so that waiting this long really yields a token.
        let millis = (missing / self.per_second * 1000.0).ceil();
        Duration::from_millis(millis.min(u64::MAX as f64) as u64)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn burst_is_a_tenth_of_the_share_and_at_least_one() {
        assert_eq!(burst(5.0), 1.0);
        assert_eq!(burst(60.0), 6.0);
        assert_eq!(burst(1000.0), 100.0);
    }

    #[tokio::test(start_paused = true)]
    async fn zero_limit_means_no_limiter() {
        assert!(RateLimiter::new(0, 1, Instant::now()).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn admits_burst_then_refills_at_the_share() {
        let start = Instant::now();
        // 600 rpm over 2 replicas: 300/min = 5/s each, burst 30.
        let limiter = RateLimiter::new(600, 2, start).unwrap();
        for _ in 0..30 {
            limiter.try_acquire(start).unwrap();
        }
        let wait = limiter.try_acquire(start).unwrap_err();
        assert_eq!(wait, Duration::from_millis(200));
        tokio::time::advance(Duration::from_millis(199)).await;
        assert!(limiter.try_acquire(Instant::now()).is_err());
        tokio::time::advance(Duration::from_millis(1)).await;
        limiter.try_acquire(Instant::now()).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn any_minute_stays_within_share_plus_burst() {
        // 60 rpm, 3 replicas: 20/min each, burst 2.
        let limiter = RateLimiter::new(60, 3, Instant::now()).unwrap();
        let mut admitted = Vec::new();
        // A client hammering every 100 ms for five minutes.
        for _ in 0..3000 {
            if limiter.try_acquire(Instant::now()).is_ok() {
                admitted.push(Instant::now());
            }
            tokio::time::advance(Duration::from_millis(100)).await;
        }
        for (i, first) in admitted.iter().enumerate() {
            let in_window = admitted[i..]
                .iter()
                .take_while(|t| t.duration_since(*first) < Duration::from_secs(60))
                .count();
            assert!(in_window <= 20 + 2, "{in_window} in one minute");
        }
        // It is a limit, not a trickle: close to the share over the run.
        assert!(admitted.len() >= 5 * 20, "{}", admitted.len());
    }

    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// The division: `replicas` replicas each running `RateLimiter::new(limit, replicas)`
        /// from a full bucket, whatever the clients send them in one minute (any replica, any
        /// moment, any number), and whether the count changes for a replica mid-minute (a
        /// snapshot with another count, tokens carried over): together they admit at most
        /// the limit plus each replica's largest burst, as the module docs and
        /// `docs/guarantees.md` state.
        #[test]
        fn all_replicas_together_admit_at_most_the_limit_plus_their_bursts(
            // On the scale of the arrivals, so that most cases refuse some (a limit above
            // them would pass a limiter that admits everything).
            limit in 1u32..2_000,
            replicas in 1u32..24,
            arrivals in proptest::collection::vec((0u32..24, 0u64..60_000), 0..3_000),
            change in proptest::option::of((0u32..24, 0u64..60_000, 1u32..24)),
        ) {
            let start = Instant::now();
            let mut limiters: Vec<RateLimiter> = (0..replicas)
                .map(|_| RateLimiter::new(limit, replicas, start).unwrap())
                .collect();
            let share = |n: u32| f64::from(limit) / f64::from(n);
            // Each replica's largest share and burst over the minute.
            let mut most: Vec<(f64, f64)> =
                vec![(share(replicas), burst(share(replicas))); replicas as usize];
            let mut arrivals = arrivals;
            arrivals.sort_by_key(|&(_, at)| at);
            let mut changed = false;
            let mut admitted = 0u64;
            for (replica, at) in arrivals {
                let now = start + Duration::from_millis(at);
                if let Some((who, when, count)) = change
                    && !changed && at >= when
                {
                    let who = (who % replicas) as usize;
                    limiters[who] = RateLimiter::carry_over(Some(&limiters[who]), limit, count, now).unwrap();
                    let (s, b) = &mut most[who];
                    *s = s.max(share(count));
                    *b = b.max(burst(share(count)));
                    changed = true;
                }
                let limiter = &limiters[(replica % replicas) as usize];
                admitted += u64::from(limiter.try_acquire(now).is_ok());
            }
            // Over 60 s a bucket refills at most its share; it starts with at most its burst.
            let bound: f64 = most.iter().map(|(s, b)| s + b).sum();
            prop_assert!(
                admitted as f64 <= bound + 1e-6,
                "{admitted} admitted, bound {bound}"
            );
            if change.is_none() {
                let plain = f64::from(limit) + f64::from(replicas) * burst(share(replicas));
                prop_assert!(admitted as f64 <= plain + 1e-6, "{admitted} > {plain}");
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn carry_over_keeps_tokens_and_applies_the_new_rate() {
        let now = Instant::now();
        let old = RateLimiter::new(120, 1, now).unwrap(); // 2/s, burst 12
        for _ in 0..12 {
            old.try_acquire(now).unwrap();
        }
        // A replica joined: the share halves, the empty bucket stays empty.
        let new = RateLimiter::carry_over(Some(&old), 120, 2, now).unwrap();
        assert!(new.try_acquire(now).is_err());
        assert_eq!(new.available_in(now), Duration::from_secs(1));
        tokio::time::advance(Duration::from_secs(60)).await;
        // Full again, but only up to the new, smaller capacity.
        let later = Instant::now();
        for _ in 0..6 {
            new.try_acquire(later).unwrap();
        }
        assert!(new.try_acquire(later).is_err());
        assert_eq!(new.capacity(), 6.0);
    }
}
