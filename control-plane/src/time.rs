//! Wall-clock helpers: the store keeps Unix milliseconds, the API speaks
//! `google.protobuf.Timestamp` and `Duration`.
//!
//! Every wall-clock reading of the control plane is [`now_ms`]: key expiries, budget periods
//! and their resets at UTC midnight, cooldown ends, shares' leases. Tests move that clock
//! with the hidden `--wall-clock-offset` (see [`skew_wall_clock`]), so that a real process
//! crosses a UTC midnight or an expiry when the test wants it to.

use std::sync::atomic::{AtomicI64, Ordering};

use pbjson_types::{Duration, Timestamp};

/// Added to every reading of the system clock: 0 unless `--wall-clock-offset` is given.
static WALL_OFFSET_MS: AtomicI64 = AtomicI64::new(0);

/// A point in time as the store keeps it: Unix milliseconds by the control plane's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct UnixMs(pub i64);

impl std::ops::Add<std::time::Duration> for UnixMs {
    type Output = UnixMs;

    fn add(self, d: std::time::Duration) -> UnixMs {
        UnixMs(
            self.0
                .saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        )
    }
}

/// The control plane's wall clock, in Unix milliseconds.
pub fn now_ms() -> i64 {
    chrono::Utc::now()
        .timestamp_millis()
        .saturating_add(WALL_OFFSET_MS.load(Ordering::Relaxed))
}

/// Milliseconds on the monotonic clock, since this process first read it: for what is timed
/// in memory only and must not move when the wall clock steps (an NTP correction, a resume
/// from suspend), as the data planes' own leases do not: the allowance engine's leases and
/// which replicas it counts as active.
pub fn monotonic_ms() -> i64 {
    static ORIGIN: std::sync::LazyLock<std::time::Instant> =
        std::sync::LazyLock::new(std::time::Instant::now);
    i64::try_from(ORIGIN.elapsed().as_millis()).unwrap_or(i64::MAX)
}

/// Makes [`now_ms`] read `offset_ms` ahead of the system clock (behind when negative) for
/// the rest of the process, as a host with a skewed clock would. For tests only (the hidden
/// `--wall-clock-offset` of `sluice-control`, set once at start): it moves every decision
/// made by the clock, so a production control plane started with it would expire keys and
/// reset budgets that much early or late; it logs a warning at start for that reason.
pub fn skew_wall_clock(offset_ms: i64) {
    WALL_OFFSET_MS.store(offset_ms, Ordering::Relaxed);
}

pub fn timestamp(ms: i64) -> Timestamp {
    Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

pub fn timestamp_ms(ts: &Timestamp) -> i64 {
    ts.seconds
        .saturating_mul(1000)
        .saturating_add(i64::from(ts.nanos) / 1_000_000)
}

pub fn duration_ms(d: &Duration) -> i64 {
    d.seconds
        .saturating_mul(1000)
        .saturating_add(i64::from(d.nanos) / 1_000_000)
}

pub fn duration(ms: i64) -> Duration {
    Duration {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}
