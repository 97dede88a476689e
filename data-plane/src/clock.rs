//! Time as the data plane needs it: a monotonic instant for deciding, a wall-clock time for
//! reporting, and the conversions to and from the protobuf well-known types.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pbjson_types::{Duration as ProtoDuration, Timestamp};
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

/// A protobuf timestamp for a wall-clock time (times before 1970 become the epoch).
pub fn timestamp(time: SystemTime) -> Timestamp {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: i64::try_from(since.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(since.subsec_nanos()).unwrap_or(0),
    }
}

/// The wall-clock time of a protobuf timestamp; `None` when it is out of range.
pub fn system_time(ts: &Timestamp) -> Option<SystemTime> {
    let seconds = u64::try_from(ts.seconds).ok()?;
    let nanos = u32::try_from(ts.nanos)
        .ok()
        .filter(|n| *n < 1_000_000_000)?;
    UNIX_EPOCH.checked_add(Duration::new(seconds, nanos))
}

/// A protobuf duration.
pub fn proto_duration(d: Duration) -> ProtoDuration {
    ProtoDuration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// A std duration from a protobuf one; `None` when negative or malformed.
pub fn std_duration(d: &ProtoDuration) -> Option<Duration> {
    let seconds = u64::try_from(d.seconds).ok()?;
    let nanos = u32::try_from(d.nanos).ok().filter(|n| *n < 1_000_000_000)?;
    Some(Duration::new(seconds, nanos))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn timestamps_round_trip() {
        let t = UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789);
        assert_eq!(system_time(&timestamp(t)), Some(t));
        assert_eq!(
            system_time(&Timestamp {
                seconds: -1,
                nanos: 0
            }),
            None
        );
    }

    #[test]
    fn durations_reject_negative() {
        assert_eq!(
            std_duration(&proto_duration(Duration::from_millis(1500))),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            std_duration(&ProtoDuration {
                seconds: -1,
                nanos: 0
            }),
            None
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
