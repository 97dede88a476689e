//! Conversions between `std::time` and the protobuf well-known `Timestamp` and `Duration`,
//! for every Rust side of the API (the control plane's store keeps Unix milliseconds and has
//! its own helpers for that representation); and the wall-clock offset both servers take in
//! tests (`--wall-clock-offset`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pbjson_types::{Duration as ProtoDuration, Timestamp};

/// A protobuf `Timestamp` for `time` (before 1970 too: nanos stay non-negative, as protobuf
/// wants).
pub fn timestamp(time: SystemTime) -> Timestamp {
    let (seconds, nanos) = match time.duration_since(UNIX_EPOCH) {
        Ok(after) => (
            i64::try_from(after.as_secs()).unwrap_or(i64::MAX),
            after.subsec_nanos(),
        ),
        Err(before) => {
            let before = before.duration();
            let seconds = -i64::try_from(before.as_secs()).unwrap_or(i64::MAX);
            // -1.5 s is seconds -2, nanos 0.5e9.
            match before.subsec_nanos() {
                0 => (seconds, 0),
                nanos => (seconds - 1, 1_000_000_000 - nanos),
            }
        }
    };
    Timestamp {
        seconds,
        nanos: i32::try_from(nanos).unwrap_or(0),
    }
}

/// The `SystemTime` of a protobuf `Timestamp`; `None` when malformed or out of range.
pub fn system_time(timestamp: &Timestamp) -> Option<SystemTime> {
    let nanos = u32::try_from(timestamp.nanos)
        .ok()
        .filter(|n| *n < 1_000_000_000)?;
    let seconds = Duration::from_secs(timestamp.seconds.unsigned_abs());
    let whole = if timestamp.seconds >= 0 {
        UNIX_EPOCH.checked_add(seconds)?
    } else {
        UNIX_EPOCH.checked_sub(seconds)?
    };
    whole.checked_add(Duration::from_nanos(u64::from(nanos)))
}

/// A protobuf `Duration` (saturating at `i64::MAX` seconds).
pub fn proto_duration(d: Duration) -> ProtoDuration {
    ProtoDuration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// A duration flag's value (humantime: `30s`, `1m30s`, `250ms`) that must be more than zero:
/// for the timeouts and intervals whose zero would not mean "off" (as it does in Go's and
/// Node's servers) but break the server, closing every connection at once, cutting every
/// stream, or flushing without pause. clap prints the refusal with the flag's name.
pub fn positive_duration(text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text) {
        Ok(Duration::ZERO) => Err("must be more than 0 (there is no \"off\")".to_owned()),
        Ok(duration) => Ok(duration),
        Err(e) => Err(e.to_string()),
    }
}

/// A signed offset of a server's wall clock: `2s`, `-1500ms` (humantime, with an optional
/// sign). Tests give it to a server (`--wall-clock-offset`, a hidden option) so that its clock
/// reads as a host's skewed clock would.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WallOffset {
    Ahead(Duration),
    Behind(Duration),
}

impl WallOffset {
    /// The offset in milliseconds, negative when behind (saturating).
    pub fn as_millis(self) -> i64 {
        match self {
            Self::Ahead(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
            Self::Behind(d) => -i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        }
    }
}

impl std::str::FromStr for WallOffset {
    type Err = humantime::DurationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        match s.strip_prefix('-') {
            Some(rest) => humantime::parse_duration(rest).map(WallOffset::Behind),
            None => {
                humantime::parse_duration(s.strip_prefix('+').unwrap_or(s)).map(WallOffset::Ahead)
            }
        }
    }
}

/// The std duration of a protobuf `Duration`; `None` when negative or malformed.
pub fn std_duration(d: &ProtoDuration) -> Option<Duration> {
    let seconds = u64::try_from(d.seconds).ok()?;
    let nanos = u32::try_from(d.nanos).ok().filter(|n| *n < 1_000_000_000)?;
    Some(Duration::new(seconds, nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_parse_with_a_sign() {
        assert_eq!(
            "2s".parse::<WallOffset>(),
            Ok(WallOffset::Ahead(Duration::from_secs(2)))
        );
        assert_eq!(
            "+2s".parse::<WallOffset>(),
            Ok(WallOffset::Ahead(Duration::from_secs(2)))
        );
        assert_eq!(
            "-1500ms".parse::<WallOffset>(),
            Ok(WallOffset::Behind(Duration::from_millis(1500)))
        );
        assert!("-x".parse::<WallOffset>().is_err());
        assert_eq!(
            "-1500ms".parse::<WallOffset>().map(WallOffset::as_millis),
            Ok(-1500)
        );
    }

    #[test]
    fn timestamps_round_trip_before_and_after_1970() {
        for time in [
            UNIX_EPOCH,
            UNIX_EPOCH + Duration::new(1_738_281_600, 5),
            UNIX_EPOCH - Duration::from_millis(1500),
        ] {
            let ts = timestamp(time);
            assert!((0..1_000_000_000).contains(&ts.nanos));
            assert_eq!(system_time(&ts), Some(time));
        }
        assert_eq!(
            timestamp(UNIX_EPOCH - Duration::from_millis(1500)),
            Timestamp {
                seconds: -2,
                nanos: 500_000_000
            }
        );
        assert_eq!(
            system_time(&Timestamp {
                seconds: 1,
                nanos: -1
            }),
            None
        );
    }

    #[test]
    fn durations_round_trip_and_refuse_negative() {
        let d = Duration::from_millis(1500);
        assert_eq!(std_duration(&proto_duration(d)), Some(d));
        for bad in [(-1, 0), (0, -1), (0, 1_000_000_000)] {
            let bad = ProtoDuration {
                seconds: bad.0,
                nanos: bad.1,
            };
            assert_eq!(std_duration(&bad), None, "{bad:?}");
        }
    }
}
