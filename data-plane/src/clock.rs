//! Time as the data plane needs it: a monotonic instant for deciding, a wall-clock time for
//! reporting, and the conversions to and from the protobuf well-known types.

use std::time::{Duration, SystemTime};

pub use sluice_domain::time::{WallOffset, proto_duration, std_duration, system_time, timestamp};
use tokio::time::Instant;

/// Where the data plane reads the time. The system's clocks, except that tests can make the
/// wall clock run ahead or behind (`--wall-clock-offset`), as a host with a skewed clock would.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Clock {
    /// Added to every wall-clock reading.
    ahead: Duration,
    /// Subtracted from every wall-clock reading.
    behind: Duration,
}

impl Clock {
    /// The system's clocks, skewed by `offset` (negative: behind).
    pub fn with_wall_offset(offset: WallOffset) -> Self {
        match offset {
            WallOffset::Ahead(d) => Self {
                ahead: d,
                behind: Duration::ZERO,
            },
            WallOffset::Behind(d) => Self {
                ahead: Duration::ZERO,
                behind: d,
            },
        }
    }

    /// The wall clock alone, as usage records are dated by it.
    pub fn wall(&self) -> SystemTime {
        SystemTime::now() + self.ahead - self.behind
    }

    /// Reads both clocks. Under `tokio::time::pause()` the instant is the paused one.
    pub fn now(&self) -> Now {
        let now = Now::read();
        Now {
            instant: now.instant,
            wall: now.wall + self.ahead - self.behind,
        }
    }
}

/// One reading of both clocks, taken together so that a wall-clock time from the control
/// plane can be turned into a monotonic deadline (and back).
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub instant: Instant,
    pub wall: SystemTime,
}

impl Now {
    /// Reads both clocks. Under `tokio::time::pause()` the instant is the paused one.
    pub fn read() -> Self {
        Self {
            instant: Instant::now(),
            wall: SystemTime::now(),
        }
    }

    /// The monotonic instant matching a wall-clock time; times in the past map to `self.instant`
    /// minus the difference (saturating at `self.instant`'s representable range).
    pub fn instant_at(&self, wall: SystemTime) -> Instant {
        match wall.duration_since(self.wall) {
            Ok(ahead) => self.instant + ahead,
            Err(behind) => self
                .instant
                .checked_sub(behind.duration())
                .unwrap_or(self.instant),
        }
    }

    /// The wall-clock time matching a monotonic instant.
    pub fn wall_at(&self, instant: Instant) -> SystemTime {
        if instant >= self.instant {
            self.wall + (instant - self.instant)
        } else {
            self.wall - (self.instant - instant)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_skewed_clock_moves_only_the_wall_reading() {
        let behind = Clock::with_wall_offset(WallOffset::Behind(Duration::from_secs(2))).now();
        let ahead = Clock::with_wall_offset(WallOffset::Ahead(Duration::from_secs(2))).now();
        assert_eq!(behind.instant, ahead.instant);
        let skew = ahead.wall.duration_since(behind.wall).unwrap();
        assert!(
            skew >= Duration::from_secs(4) && skew < Duration::from_secs(5),
            "{skew:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn instants_map_to_wall_and_back() {
        let now = Now::read();
        let later = now.wall + Duration::from_secs(30);
        assert_eq!(now.instant_at(later), now.instant + Duration::from_secs(30));
        assert_eq!(now.wall_at(now.instant + Duration::from_secs(30)), later);
    }
}
