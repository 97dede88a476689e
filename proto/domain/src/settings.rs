//! The routing policy every data plane follows (attempts, timeouts, cooldown backoff, which
//! failures move on) and the defaults that fill whatever a stored or sent `Settings` leaves
//! unset. The control plane stores and serves `Settings`; the data plane turns them into a
//! [`Policy`]; both take their defaults from [`defaults`] and nowhere else.

use std::time::Duration;

use pbjson_types::Duration as ProtoDuration;
use sluice_proto::v1 as pb;

use crate::cooldown::CooldownPolicy;
use crate::time::{proto_duration, std_duration};

/// The policy of a new installation.
pub fn defaults() -> pb::Settings {
    let secs = |s: u64| Some(proto_duration(Duration::from_secs(s)));
    pb::Settings {
        max_attempts: 3,
        connect_timeout: secs(5),
        first_byte_timeout: secs(60),
        answer_timeout: secs(300),
        idle_stream_timeout: secs(300),
        request_timeout: secs(600),
        stream_timeout: secs(3600),
        cooldown_base: secs(1),
        cooldown_cap: secs(300),
        failure_threshold: 5,
        retry_on_rate_limit: true,
        retry_on_server_error: true,
        retry_on_connect_error: true,
        retry_on_timeout: true,
        usage_retention_days: 90,
        usage_daily_retention_days: 0,
        expose_backend_header: false,
        currency: DEFAULT_CURRENCY.to_owned(),
    }
}

/// The currency of prices when the operator has not named one.
pub const DEFAULT_CURRENCY: &str = "USD";

/// Fills what `settings` leaves unset (a row written by an older version, a message from an
/// older control plane) from [`defaults`]: unset or zero durations and a zero `max_attempts`.
/// An empty `currency` means [`DEFAULT_CURRENCY`]. The flags, `failure_threshold` and the
/// retentions are taken as they are: their zero values mean something.
pub fn with_defaults(mut settings: pb::Settings) -> pb::Settings {
    let d = defaults();
    for (field, default) in [
        (&mut settings.connect_timeout, d.connect_timeout),
        (&mut settings.first_byte_timeout, d.first_byte_timeout),
        (&mut settings.answer_timeout, d.answer_timeout),
        (&mut settings.idle_stream_timeout, d.idle_stream_timeout),
        (&mut settings.request_timeout, d.request_timeout),
        (&mut settings.stream_timeout, d.stream_timeout),
        (&mut settings.cooldown_base, d.cooldown_base),
        (&mut settings.cooldown_cap, d.cooldown_cap),
    ] {
        if field.is_none_or(|v| v.seconds == 0 && v.nanos == 0) {
            *field = default;
        }
    }
    if settings.max_attempts == 0 {
        settings.max_attempts = d.max_attempts;
    }
    if settings.currency.is_empty() {
        settings.currency = d.currency;
    }
    settings
}

/// A duration in `Settings` that is negative or malformed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("settings: {0} is negative or malformed")]
pub struct InvalidDuration(pub &'static str);

/// Retry, timeout and cooldown policy as a data plane applies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub max_attempts: u32,
    pub connect_timeout: Duration,
    /// A stream's wait for its head.
    pub first_byte_timeout: Duration,
    /// A whole answer's wait for its head (which comes once it is generated), and a stream's
    /// for its first event (which a reasoning model sends once it has thought).
    pub answer_timeout: Duration,
    /// The longest silence inside a stream (and between a whole answer's chunks).
    pub idle_stream_timeout: Duration,
    pub request_timeout: Duration,
    /// How long a stream may run from its request's arrival, once begun (never less than
    /// `request_timeout`: see [`Policy::stream_run`]).
    pub stream_timeout: Duration,
    pub cooldown: CooldownPolicy,
    pub retry_on_rate_limit: bool,
    pub retry_on_server_error: bool,
    pub retry_on_connect_error: bool,
    pub retry_on_timeout: bool,
    /// Answers carry `x-sluice-backend`.
    pub expose_backend_header: bool,
}

impl Policy {
    /// How long a stream that has begun may run from its request's arrival: `stream_timeout`,
    /// never less than `request_timeout` (which bounded its beginning).
    pub fn stream_run(&self) -> Duration {
        self.stream_timeout.max(self.request_timeout)
    }
}

impl Default for Policy {
    /// The policy of [`defaults`].
    fn default() -> Self {
        let d = defaults();
        let secs = |d: Option<ProtoDuration>| d.as_ref().and_then(std_duration).unwrap_or_default();
        Self {
            max_attempts: d.max_attempts,
            connect_timeout: secs(d.connect_timeout),
            first_byte_timeout: secs(d.first_byte_timeout),
            answer_timeout: secs(d.answer_timeout),
            idle_stream_timeout: secs(d.idle_stream_timeout),
            request_timeout: secs(d.request_timeout),
            stream_timeout: secs(d.stream_timeout),
            cooldown: CooldownPolicy {
                base: secs(d.cooldown_base),
                cap: secs(d.cooldown_cap),
                failure_threshold: d.failure_threshold,
            },
            retry_on_rate_limit: d.retry_on_rate_limit,
            retry_on_server_error: d.retry_on_server_error,
            retry_on_connect_error: d.retry_on_connect_error,
            retry_on_timeout: d.retry_on_timeout,
            expose_backend_header: d.expose_backend_header,
        }
    }
}

impl TryFrom<&pb::Settings> for Policy {
    type Error = InvalidDuration;

    /// [`with_defaults`] first; a negative or malformed duration is refused.
    fn try_from(settings: &pb::Settings) -> Result<Self, InvalidDuration> {
        let s = with_defaults(settings.clone());
        let duration = |value: Option<ProtoDuration>, name: &'static str| {
            value
                .as_ref()
                .and_then(std_duration)
                .ok_or(InvalidDuration(name))
        };
        Ok(Self {
            max_attempts: s.max_attempts,
            connect_timeout: duration(s.connect_timeout, "connect_timeout")?,
            first_byte_timeout: duration(s.first_byte_timeout, "first_byte_timeout")?,
            answer_timeout: duration(s.answer_timeout, "answer_timeout")?,
            idle_stream_timeout: duration(s.idle_stream_timeout, "idle_stream_timeout")?,
            request_timeout: duration(s.request_timeout, "request_timeout")?,
            stream_timeout: duration(s.stream_timeout, "stream_timeout")?,
            cooldown: CooldownPolicy {
                base: duration(s.cooldown_base, "cooldown_base")?,
                cap: duration(s.cooldown_cap, "cooldown_cap")?,
                failure_threshold: s.failure_threshold,
            },
            retry_on_rate_limit: s.retry_on_rate_limit,
            retry_on_server_error: s.retry_on_server_error,
            retry_on_connect_error: s.retry_on_connect_error,
            retry_on_timeout: s.retry_on_timeout,
            expose_backend_header: s.expose_backend_header,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn the_default_policy_is_the_default_settings() {
        assert_eq!(Policy::try_from(&defaults()).unwrap(), Policy::default());
        assert_eq!(
            Policy::try_from(&pb::Settings::default()).unwrap(),
            Policy {
                // Zero values that mean something are taken as sent.
                retry_on_rate_limit: false,
                retry_on_server_error: false,
                retry_on_connect_error: false,
                retry_on_timeout: false,
                cooldown: CooldownPolicy {
                    failure_threshold: 0,
                    ..Policy::default().cooldown
                },
                ..Policy::default()
            }
        );
        assert_eq!(
            Policy::default().first_byte_timeout,
            Duration::from_secs(60)
        );
        assert_eq!(Policy::default().answer_timeout, Duration::from_secs(300));
    }

    #[test]
    fn negative_durations_are_refused() {
        let settings = pb::Settings {
            cooldown_cap: Some(ProtoDuration {
                seconds: -1,
                nanos: 0,
            }),
            ..defaults()
        };
        assert_eq!(
            Policy::try_from(&settings),
            Err(InvalidDuration("cooldown_cap"))
        );
    }
}
