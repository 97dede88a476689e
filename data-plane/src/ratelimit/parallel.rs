//! `max_parallel_requests`: how many requests of one client key a replica serves at once.
//! Each of n replicas admits `⌊P / n⌋`, and the replicas ranked below `P mod n` in the
//! snapshot's share holders one more, so all together P (at least one each: n when P < n).
//! One `AtomicU32` per key, shared by every serving thread without a lock.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

/// This replica's share of a key's `max_parallel_requests`. Cloning shares the count.
#[derive(Debug, Clone)]
pub struct ParallelLimit {
    /// The key's limit across all replicas, and this replica's share of it.
    total: u32,
    most: u32,
    in_flight: Arc<AtomicU32>,
}

/// One request counted in flight until it drops.
#[derive(Debug)]
pub struct InFlight {
    count: Arc<AtomicU32>,
}

impl ParallelLimit {
    /// The share of `max_parallel_requests` for `replica_count` replicas, this one ranked
    /// `rank` among them (`None`: not among them, the quotient only), counting the requests
    /// `previous` has in flight (a snapshot swap forgets none); `None` when the limit is 0
    /// (none).
    pub fn carry_over(
        previous: Option<&ParallelLimit>,
        max_parallel_requests: u32,
        replica_count: u32,
        rank: Option<u32>,
    ) -> Option<Self> {
        if max_parallel_requests == 0 {
            return None;
        }
        let n = replica_count.max(1);
        let remainder = rank.is_some_and(|r| r < max_parallel_requests % n);
        Some(Self {
            total: max_parallel_requests,
            most: (max_parallel_requests / n + u32::from(remainder)).max(1),
            in_flight: previous.map_or_else(Default::default, |p| Arc::clone(&p.in_flight)),
        })
    }

    /// The limit across all replicas.
    pub fn total(&self) -> u32 {
        self.total
    }

    /// The most this replica serves at once.
    pub fn most(&self) -> u32 {
        self.most
    }

    /// Counts one more request in flight, unless this replica's share is taken.
    pub fn try_enter(&self) -> Option<InFlight> {
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.most).then_some(n + 1)
            })
            .ok()
            .map(|_| InFlight {
                count: Arc::clone(&self.in_flight),
            })
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn each_replica_takes_its_share_and_at_least_one() {
        assert!(ParallelLimit::carry_over(None, 0, 3, None).is_none());
        assert_eq!(
            ParallelLimit::carry_over(None, 8, 3, None).unwrap().most(),
            2
        );
        assert_eq!(
            ParallelLimit::carry_over(None, 2, 3, None).unwrap().most(),
            1
        );
        assert_eq!(
            ParallelLimit::carry_over(None, 8, 0, None).unwrap().most(),
            8
        );
    }

    /// By their ranks the replicas' shares add up to the limit: the remainder of P / n went
    /// to none of them (P = 5 on three replicas admitted 3 at once), and still at least one
    /// each when P < n.
    #[test]
    fn the_replicas_shares_add_up_to_the_limit_by_rank() {
        let shares = |p: u32, n: u32| -> Vec<u32> {
            (0..n)
                .map(|rank| {
                    ParallelLimit::carry_over(None, p, n, Some(rank))
                        .unwrap()
                        .most()
                })
                .collect()
        };
        assert_eq!(shares(5, 3), [2, 2, 1]);
        assert_eq!(shares(6, 4), [2, 2, 1, 1]);
        assert_eq!(shares(9, 3), [3, 3, 3]);
        assert_eq!(shares(2, 3), [1, 1, 1]);
        for p in 1..40 {
            for n in 1..9 {
                let sum: u32 = shares(p, n).iter().sum();
                assert_eq!(sum, p.max(n), "{p} over {n}");
            }
        }
    }

    #[test]
    fn a_request_ending_frees_its_place_and_a_new_snapshot_forgets_none() {
        let limit = ParallelLimit::carry_over(None, 4, 2, None).unwrap();
        let first = limit.try_enter().unwrap();
        let second = limit.try_enter().unwrap();
        assert!(limit.try_enter().is_none());
        drop(first);
        let third = limit.try_enter().unwrap();
        // A replica left: the share grows to 4, the two in flight still count.
        let grown = ParallelLimit::carry_over(Some(&limit), 4, 1, None).unwrap();
        let held: Vec<_> = (0..2).map(|_| grown.try_enter().unwrap()).collect();
        assert!(grown.try_enter().is_none());
        drop((second, third, held));
        assert_eq!(grown.in_flight.load(Ordering::Acquire), 0);
    }

    #[test]
    fn threads_racing_never_hold_more_than_the_share() {
        let limit = ParallelLimit::carry_over(None, 3, 1, None).unwrap();
        let most = Arc::new(AtomicU32::new(0));
        std::thread::scope(|scope| {
            for _ in 0..8 {
                let (limit, most) = (limit.clone(), Arc::clone(&most));
                scope.spawn(move || {
                    for _ in 0..10_000 {
                        if let Some(held) = limit.try_enter() {
                            let now = limit.in_flight.load(Ordering::Acquire);
                            most.fetch_max(now, Ordering::AcqRel);
                            drop(held);
                        }
                    }
                });
            }
        });
        assert!(most.load(Ordering::Acquire) <= 3);
        assert_eq!(limit.in_flight.load(Ordering::Acquire), 0);
    }
}
