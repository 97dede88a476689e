//! How times read in a table: RFC 3339 in UTC, or relative to now ("in 12s", "3m ago").

use std::time::{Duration, SystemTime};

use sluice_proto::wkt;

pub use sluice_domain::time::{system_time as from_timestamp, timestamp as to_timestamp};

/// `2025-01-31T12:00:00Z`, or `-` when unset. A time RFC 3339 cannot write (past the year
/// 9999, which a server of another version might send) reads as its Unix seconds, `@<s>`.
pub fn absolute(timestamp: Option<&wkt::Timestamp>) -> String {
    use std::fmt::Write as _;
    let Some(time) = timestamp.and_then(from_timestamp) else {
        return "-".to_owned();
    };
    let mut text = String::new();
    match write!(text, "{}", humantime::format_rfc3339_seconds(time)) {
        Ok(()) => text,
        Err(_) => format!("@{}", timestamp.map_or(0, |t| t.seconds)),
    }
}

/// `in 12s`, `3m ago`, `just now`, or `-` when unset.
pub fn relative(timestamp: Option<&wkt::Timestamp>, now: SystemTime) -> String {
    let Some(time) = timestamp.and_then(from_timestamp) else {
        return "-".to_owned();
    };
    match time.duration_since(now) {
        Ok(ahead) if ahead.as_secs() >= 1 => format!("in {}", coarse(ahead)),
        Ok(_) => "just now".to_owned(),
        Err(behind) if behind.duration().as_secs() >= 1 => {
            format!("{} ago", coarse(behind.duration()))
        }
        Err(_) => "just now".to_owned(),
    }
}

/// One unit, rounded down: 59s, 3m, 5h, 12d.
fn coarse(span: Duration) -> String {
    let seconds = span.as_secs();
    match seconds {
        0..60 => format!("{seconds}s"),
        60..3600 => format!("{}m", seconds / 60),
        3600..172_800 => format!("{}h", seconds / 3600),
        _ => format!("{}d", seconds / 86_400),
    }
}

/// A protobuf `Duration` as `1m 30s`, or `-` when unset or negative.
pub fn duration(value: Option<&wkt::Duration>) -> String {
    match value.and_then(|value| Duration::try_from(*value).ok()) {
        Some(duration) => humantime::format_duration(duration).to_string(),
        None => "-".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use std::time::UNIX_EPOCH;

    #[test]
    fn relative_times_read_naturally() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let at = |offset: i64| {
            Some(wkt::Timestamp {
                seconds: 1_000_000 + offset,
                nanos: 0,
            })
        };
        assert_eq!(relative(at(12).as_ref(), now), "in 12s");
        assert_eq!(relative(at(-180).as_ref(), now), "3m ago");
        assert_eq!(relative(at(-7200).as_ref(), now), "2h ago");
        assert_eq!(relative(at(3 * 86_400).as_ref(), now), "in 3d");
        assert_eq!(relative(at(0).as_ref(), now), "just now");
        assert_eq!(relative(None, now), "-");
    }

    #[test]
    fn absolute_and_duration() {
        let timestamp = wkt::Timestamp {
            seconds: 1_738_281_600,
            nanos: 0,
        };
        assert_eq!(absolute(Some(&timestamp)), "2025-01-31T00:00:00Z");
        assert_eq!(absolute(None), "-");
        // The year 10000 has no RFC 3339 form: its seconds, not a panic.
        let far = wkt::Timestamp {
            seconds: 253_402_300_800,
            nanos: 0,
        };
        assert_eq!(absolute(Some(&far)), "@253402300800");
        let value = wkt::Duration {
            seconds: 90,
            nanos: 0,
        };
        assert_eq!(duration(Some(&value)), "1m 30s");
    }
}
