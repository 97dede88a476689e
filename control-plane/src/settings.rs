//! The routing policy every data plane follows: attempts, timeouts, cooldown
//! backoff, and usage retention. Stored as one row; the defaults that fill unset
//! fields are `sluice_domain`'s, the data plane's too. Here: what an admin may
//! change and the bounds it must stay within.

use sluice_proto::v1 as pb;

use crate::time::duration_ms;
use crate::validation::ValidationError;

/// Fields of `Settings` that `UpdateSettings` may name in its mask.
pub const FIELDS: &[&str] = &[
    "max_attempts",
    "connect_timeout",
    "first_byte_timeout",
    "answer_timeout",
    "idle_stream_timeout",
    "request_timeout",
    "stream_timeout",
    "cooldown_base",
    "cooldown_cap",
    "failure_threshold",
    "retry_on_rate_limit",
    "retry_on_server_error",
    "retry_on_connect_error",
    "retry_on_timeout",
    "usage_retention_days",
    "usage_daily_retention_days",
    "expose_backend_header",
    "currency",
];

const HOUR_MS: i64 = 3_600_000;

pub use sluice_domain::settings::{defaults, with_defaults};

/// Copies the masked fields of `update` onto `current`, then checks the result.
pub fn apply_mask(
    current: &pb::Settings,
    update: &pb::Settings,
    paths: &[String],
) -> Result<pb::Settings, ValidationError> {
    let mut next = current.clone();
    for path in paths {
        match path.as_str() {
            "max_attempts" => next.max_attempts = update.max_attempts,
            "connect_timeout" => next.connect_timeout = update.connect_timeout,
            "first_byte_timeout" => next.first_byte_timeout = update.first_byte_timeout,
            "answer_timeout" => next.answer_timeout = update.answer_timeout,
            "idle_stream_timeout" => next.idle_stream_timeout = update.idle_stream_timeout,
            "request_timeout" => next.request_timeout = update.request_timeout,
            "stream_timeout" => next.stream_timeout = update.stream_timeout,
            "cooldown_base" => next.cooldown_base = update.cooldown_base,
            "cooldown_cap" => next.cooldown_cap = update.cooldown_cap,
            "failure_threshold" => next.failure_threshold = update.failure_threshold,
            "retry_on_rate_limit" => next.retry_on_rate_limit = update.retry_on_rate_limit,
            "retry_on_server_error" => next.retry_on_server_error = update.retry_on_server_error,
            "retry_on_connect_error" => next.retry_on_connect_error = update.retry_on_connect_error,
            "retry_on_timeout" => next.retry_on_timeout = update.retry_on_timeout,
            "usage_retention_days" => next.usage_retention_days = update.usage_retention_days,
            "usage_daily_retention_days" => {
                next.usage_daily_retention_days = update.usage_daily_retention_days
            }
            "expose_backend_header" => next.expose_backend_header = update.expose_backend_header,
            "currency" => next.currency = update.currency.trim().to_owned(),
            other => {
                return Err(ValidationError::new(
                    "update_mask",
                    format!(
                        "unknown field {:?}; known: {}",
                        sluice_domain::text::quoted(other),
                        FIELDS.join(", ")
                    ),
                ));
            }
        }
    }
    validate(&next)?;
    Ok(next)
}

pub fn validate(s: &pb::Settings) -> Result<(), ValidationError> {
    if !(1..=10).contains(&s.max_attempts) {
        return Err(ValidationError::new(
            "settings.max_attempts",
            "must be between 1 and 10",
        ));
    }
    let durations = [
        ("connect_timeout", &s.connect_timeout, HOUR_MS),
        ("first_byte_timeout", &s.first_byte_timeout, HOUR_MS),
        ("answer_timeout", &s.answer_timeout, 24 * HOUR_MS),
        ("idle_stream_timeout", &s.idle_stream_timeout, HOUR_MS),
        ("request_timeout", &s.request_timeout, 24 * HOUR_MS),
        ("stream_timeout", &s.stream_timeout, 24 * HOUR_MS),
        ("cooldown_base", &s.cooldown_base, HOUR_MS),
        ("cooldown_cap", &s.cooldown_cap, 24 * HOUR_MS),
    ];
    for (name, value, max) in durations {
        let field = format!("settings.{name}");
        let Some(value) = value else {
            return Err(ValidationError::new(field, "must be set"));
        };
        // A protobuf Duration's nanos are within a second: past it, the stored JSON form
        // (pbjson) reads back as another duration, or not at all, which would leave the
        // settings row unreadable and no snapshot buildable.
        if !(0..1_000_000_000).contains(&value.nanos) {
            return Err(ValidationError::new(
                field,
                "nanos must be from 0 to 999,999,999 (whole seconds go in seconds)",
            ));
        }
        let ms = duration_ms(value);
        if value.seconds < 0 || ms < 1 {
            return Err(ValidationError::new(field, "must be at least 1ms"));
        }
        if ms > max {
            return Err(ValidationError::new(
                field,
                format!("must be at most {}s", max / 1000),
            ));
        }
    }
    if let (Some(base), Some(cap)) = (&s.cooldown_base, &s.cooldown_cap)
        && duration_ms(base) > duration_ms(cap)
    {
        return Err(ValidationError::new(
            "settings.cooldown_cap",
            "must not be shorter than cooldown_base",
        ));
    }
    if s.failure_threshold > 1000 {
        return Err(ValidationError::new(
            "settings.failure_threshold",
            "must be at most 1000 (0 disables)",
        ));
    }
    if !is_currency_code(&s.currency) {
        return Err(ValidationError::new(
            "settings.currency",
            "must be an ISO 4217 code of three capital letters, such as USD or EUR",
        ));
    }
    if s.usage_retention_days > 36_500 {
        return Err(ValidationError::new(
            "settings.usage_retention_days",
            "must be at most 36500 (0 keeps everything)",
        ));
    }
    let daily = s.usage_daily_retention_days;
    if daily != 0 {
        let least = s.usage_retention_days.max(MIN_DAILY_RETENTION_DAYS);
        if s.usage_retention_days == 0 || daily < least || daily > 36_500 {
            return Err(ValidationError::new(
                "settings.usage_daily_retention_days",
                format!(
                    "must be 0 (keeps everything) or from {least} to 36500, with \
                     usage_retention_days not 0: the hours a range reads from are never kept \
                     longer than the days, and a budget period's days are always kept"
                ),
            ));
        }
    }
    Ok(())
}

/// The shortest daily retention: longer than any budget period (a month), whose spend is
/// the sum of its days.
pub const MIN_DAILY_RETENTION_DAYS: u32 = 32;

/// Three capital ASCII letters: the shape of an ISO 4217 code. The list of codes is not
/// checked, so a new or private code (`XAU`, an internal unit) is taken as given.
fn is_currency_code(code: &str) -> bool {
    code.len() == 3 && code.bytes().all(|b| b.is_ascii_uppercase())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::time::duration;

    #[test]
    fn defaults_are_valid() {
        validate(&defaults()).unwrap();
    }

    #[test]
    fn masked_update_changes_only_named_fields() {
        let update = pb::Settings {
            max_attempts: 5,
            failure_threshold: 1,
            ..Default::default()
        };
        let next = apply_mask(&defaults(), &update, &["max_attempts".into()]).unwrap();
        assert_eq!(next.max_attempts, 5);
        assert_eq!(next.failure_threshold, defaults().failure_threshold);
        let err = apply_mask(&defaults(), &update, &["connect_timeout".into()]).unwrap_err();
        assert_eq!(err.field, "settings.connect_timeout");
        assert!(apply_mask(&defaults(), &update, &["nope".into()]).is_err());
    }

    #[test]
    fn a_currency_is_three_capital_letters() {
        let update = |code: &str| pb::Settings {
            currency: code.into(),
            ..Default::default()
        };
        let next = apply_mask(&defaults(), &update(" EUR "), &["currency".into()]).unwrap();
        assert_eq!(next.currency, "EUR");
        for bad in ["", "eur", "EURO", "€", "US"] {
            let err = apply_mask(&defaults(), &update(bad), &["currency".into()]).unwrap_err();
            assert_eq!(err.field, "settings.currency", "{bad:?}");
        }
    }

    /// Days are kept at least as long as hours (a range reads its whole days from the daily
    /// rows), and longer than a budget period (its spend is the sum of its days).
    #[test]
    fn daily_retention_is_at_least_the_hours_and_a_month() {
        let with = |hours: u32, days: u32| {
            let update = pb::Settings {
                usage_retention_days: hours,
                usage_daily_retention_days: days,
                ..Default::default()
            };
            let paths = ["usage_retention_days", "usage_daily_retention_days"].map(String::from);
            apply_mask(&defaults(), &update, &paths).map(|s| s.usage_daily_retention_days)
        };
        for (hours, days) in [(90, 0), (0, 0), (90, 90), (90, 365), (7, 32), (30, 36_500)] {
            assert_eq!(with(hours, days), Ok(days), "{hours} {days}");
        }
        for (hours, days) in [(90, 89), (7, 31), (0, 365), (90, 36_501)] {
            let err = with(hours, days).unwrap_err();
            assert_eq!(
                err.field, "settings.usage_daily_retention_days",
                "{hours} {days}"
            );
        }
    }

    #[test]
    fn cap_below_base_is_refused() {
        let update = pb::Settings {
            cooldown_cap: Some(duration(10)),
            ..Default::default()
        };
        let err = apply_mask(&defaults(), &update, &["cooldown_cap".into()]).unwrap_err();
        assert_eq!(err.field, "settings.cooldown_cap");
    }
}
