//! Time as the data plane needs it: a monotonic instant for deciding, a wall-clock time for
//! reporting, and the conversions to and from the protobuf well-known types.

use std::time::SystemTime;

pub use sluice_domain::time::{proto_duration, std_duration, system_time, timestamp};
use tokio::time::Instant;

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
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn instants_map_to_wall_and_back() {
        let now = Now::read();
        let later = now.wall + Duration::from_secs(30);
        assert_eq!(now.instant_at(later), now.instant + Duration::from_secs(30));
        assert_eq!(now.wall_at(now.instant + Duration::from_secs(30)), later);
    }
}
