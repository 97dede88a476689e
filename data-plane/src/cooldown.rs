//! Per-backend cooldowns: what this replica decided locally, merged with what the control
//! plane's snapshot says (which covers the other replicas' decisions and an admin's resets).
//!
//! # Local decisions
//! `n` counts a backend's consecutive failures (429, 5xx, connect errors, timeouts before the
//! first byte); a success resets it. A 429 cools the backend for
//! `min(cap, base · 2^(n−1))`, never less than the upstream's `Retry-After`/`retry-after-ms`
//! (itself capped at [`MAX_RETRY_AFTER`] so a hostile upstream cannot park a backend forever).
//! Reaching `failure_threshold` consecutive failures of the other kinds cools it for
//! `min(cap, base · 2^(n−threshold))`. Requests that were already in flight when a cooldown
//! started do not count again: fifty concurrent 429s are one overload, not fifty doublings.
//! Every local cooldown is applied at once and also returned as a [`BackendEvent`] for the
//! control plane, which persists it and publishes it to every replica.
//!
//! # Merge rule with snapshots
//! A request is blocked until the later of the local `until` and the snapshot's
//! `cooldown_until`. The snapshot is the truth for resets, but only once it has *seen* the
//! local cooldown: a snapshot built before the control plane received our event naturally
//! lacks it and must not clear it. So a local cooldown is marked *acknowledged* when a
//! snapshot carries a `cooldown_until` at or after it (within [`ACK_TOLERANCE`], because the
//! control plane may store coarser timestamps); a later snapshot without that cooldown (the
//! admin's `ResetCooldown`, or the control plane deciding otherwise) then clears it and resets
//! `n`. An unacknowledged cooldown simply runs out: when the event is lost the failure mode is
//! "this replica skips the backend until the cooldown ends", never "it hammers a backend that
//! answered 429" (and the reporter tells a reconnected control plane every unacknowledged
//! event again, see [`CooldownTracker::unacknowledged_events`]; an acknowledged one is never
//! resent, so a reset cannot be undone by a reconnect). While the snapshot shows an active
//! cooldown with a larger failure count (other replicas' failures), the local count catches
//! up to it, so the next backoff doubles from the fleet's count.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use sluice_proto::v1::{BackendEvent, BackendEventKind};
use tokio::time::Instant;

use crate::clock::{Now, timestamp};

pub use sluice_domain::cooldown::{CooldownPolicy, MAX_RETRY_AFTER};

/// How much earlier than our `until` the snapshot's `cooldown_until` may be and still count as
/// having seen our event.
pub const ACK_TOLERANCE: Duration = Duration::from_secs(1);

/// What one attempt at a backend showed about its health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The backend answered, including with a 4xx other than 429 (the client's fault).
    Success,
    /// 429, with the upstream's `Retry-After` if it sent one.
    RateLimited { retry_after: Option<Duration> },
    /// 5xx, connect error, or timeout before the first byte.
    Failure,
}

/// A backend's cooldown as a snapshot carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotCooldown {
    pub until: Option<SystemTime>,
    pub consecutive_failures: u32,
}

#[derive(Debug, Default)]
struct Entry {
    failures: u32,
    until: Option<Instant>,
    until_wall: Option<SystemTime>,
    /// When the current cooldown started; requests started earlier do not count again.
    cooled_at: Option<Instant>,
    /// A snapshot has shown this cooldown, so a snapshot without it is a reset.
    acknowledged: bool,
    /// The event reported for the current cooldown, kept until a snapshot acknowledges it.
    event: Option<BackendEvent>,
}

/// This replica's cooldown state by backend id. It outlives snapshots.
#[derive(Debug, Default)]
pub struct CooldownTracker {
    entries: Mutex<HashMap<String, Entry>>,
}

impl CooldownTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// The local cooldown's end if one is running at `now`.
    pub fn local_until(&self, backend_id: &str, now: Instant) -> Option<Instant> {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries
            .get(backend_id)
            .and_then(|e| e.until)
            .filter(|until| *until > now)
    }

    /// Records an attempt's outcome; returns the event to report when it started a cooldown
    /// (or lengthened one because of a longer `Retry-After`).
    pub fn record(
        &self,
        backend_id: &str,
        policy: &CooldownPolicy,
        outcome: Outcome,
        started: Instant,
        now: Now,
    ) -> Option<BackendEvent> {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = entries.entry(backend_id.to_owned()).or_default();
        let counted_already = entry.cooled_at.is_some_and(|at| started < at);
        match outcome {
            Outcome::Success => {
                if !counted_already {
                    entry.failures = 0;
                }
                None
            }
            Outcome::RateLimited { retry_after } => {
                let retry_after = retry_after.map(|d| d.min(MAX_RETRY_AFTER));
                if counted_already {
                    // Part of the overload already counted: only a longer Retry-After matters.
                    let wanted = now.instant + retry_after?;
                    if entry.until.is_some_and(|until| until >= wanted) {
                        return None;
                    }
                    entry.until = Some(wanted);
                } else {
                    entry.failures = entry.failures.saturating_add(1);
                    let delay = policy
                        .backoff(entry.failures)
                        .max(retry_after.unwrap_or_default());
                    entry.until = Some(now.instant + delay);
                    entry.cooled_at = Some(now.instant);
                }
                entry.acknowledged = false;
                let until = now.wall_at(entry.until.unwrap_or(now.instant));
                entry.until_wall = Some(until);
                let ev = event(
                    backend_id,
                    BackendEventKind::RateLimited,
                    until,
                    entry.failures,
                    "429 from upstream".to_owned(),
                    now.wall,
                );
                entry.event = Some(ev.clone());
                Some(ev)
            }
            Outcome::Failure => {
                if counted_already {
                    return None;
                }
                entry.failures = entry.failures.saturating_add(1);
                let threshold = policy.failure_threshold;
                if threshold == 0 || entry.failures < threshold {
                    return None;
                }
                let delay = policy.backoff(entry.failures - threshold + 1);
                let until = now.instant + delay;
                entry.until = Some(until);
                entry.cooled_at = Some(now.instant);
                entry.acknowledged = false;
                let until_wall = now.wall_at(until);
                entry.until_wall = Some(until_wall);
                let ev = event(
                    backend_id,
                    BackendEventKind::Failing,
                    until_wall,
                    entry.failures,
                    format!("{} consecutive failures", entry.failures),
                    now.wall,
                );
                entry.event = Some(ev.clone());
                Some(ev)
            }
        }
    }

    /// Events of running cooldowns that no snapshot has acknowledged yet: after a reconnect
    /// the control plane is told them again (an admin's reset is never undone this way,
    /// because a reset follows an acknowledgement).
    pub fn unacknowledged_events(&self, now: SystemTime) -> Vec<BackendEvent> {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries
            .values()
            .filter(|e| !e.acknowledged && e.until_wall.is_some_and(|until| until > now))
            .filter_map(|e| e.event.clone())
            .collect()
    }

    /// Merges a newly swapped-in snapshot (see the module docs for the rule). Backends that
    /// are no longer in the snapshot are forgotten.
    pub fn observe_snapshot<'a>(
        &self,
        backends: impl IntoIterator<Item = (&'a str, SnapshotCooldown)>,
        now: Now,
    ) {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let mut seen = HashMap::new();
        for (id, snap) in backends {
            seen.insert(id, ());
            let active = snap.until.is_some_and(|until| until > now.wall);
            let entry = entries.entry(id.to_owned()).or_default();
            if active {
                entry.failures = entry.failures.max(snap.consecutive_failures);
            }
            let Some(local_until) = entry.until_wall else {
                continue;
            };
            let covers = snap
                .until
                .is_some_and(|until| until + ACK_TOLERANCE >= local_until);
            if covers {
                entry.acknowledged = true;
                entry.event = None;
            } else if entry.acknowledged {
                // The control plane had our cooldown and no longer has it: a reset.
                *entry = Entry::default();
            }
        }
        entries.retain(|id, _| seen.contains_key(id.as_str()));
    }
}

fn event(
    backend_id: &str,
    kind: BackendEventKind,
    until: SystemTime,
    failures: u32,
    reason: String,
    now: SystemTime,
) -> BackendEvent {
    BackendEvent {
        backend_id: backend_id.to_owned(),
        kind: kind as i32,
        cooldown_until: Some(timestamp(until)),
        consecutive_failures: failures,
        reason,
        time: Some(timestamp(now)),
    }
}

/// The upstream's requested wait: `retry-after-ms` (milliseconds) if present, else
/// `retry-after` as delta-seconds or an HTTP date (relative to `now`). Malformed values are
/// ignored.
pub fn retry_after(headers: &http::HeaderMap, now: SystemTime) -> Option<Duration> {
    let ms = headers
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|ms| ms.is_finite() && *ms >= 0.0);
    if let Some(ms) = ms {
        return Some(Duration::from_secs_f64(
            (ms / 1000.0).min(MAX_RETRY_AFTER.as_secs_f64()),
        ));
    }
    let value = headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds).min(MAX_RETRY_AFTER));
    }
    if let Ok(seconds) = value.parse::<f64>()
        && seconds.is_finite()
        && seconds >= 0.0
    {
        return Some(Duration::from_secs_f64(
            seconds.min(MAX_RETRY_AFTER.as_secs_f64()),
        ));
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(
        date.duration_since(now)
            .unwrap_or_default()
            .min(MAX_RETRY_AFTER),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    const POLICY: CooldownPolicy = CooldownPolicy {
        base: Duration::from_secs(1),
        cap: Duration::from_secs(300),
        failure_threshold: 3,
    };

    fn later(now: Now, d: Duration) -> Now {
        Now {
            instant: now.instant + d,
            wall: now.wall + d,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limits_double_and_success_resets() {
        let tracker = CooldownTracker::new();
        let mut now = Now::read();
        let limited = Outcome::RateLimited { retry_after: None };
        for expected in [1, 2, 4, 8] {
            let ev = tracker
                .record("b", &POLICY, limited, now.instant, now)
                .unwrap();
            assert_eq!(ev.kind, BackendEventKind::RateLimited as i32);
            let until = tracker.local_until("b", now.instant).unwrap();
            assert_eq!(until - now.instant, Duration::from_secs(expected));
            now = later(now, Duration::from_secs(expected));
            assert_eq!(tracker.local_until("b", now.instant), None);
        }
        tracker.record("b", &POLICY, Outcome::Success, now.instant, now);
        tracker.record("b", &POLICY, limited, now.instant, now);
        assert_eq!(
            tracker.local_until("b", now.instant).unwrap() - now.instant,
            Duration::from_secs(1)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_a_floor() {
        let tracker = CooldownTracker::new();
        let now = Now::read();
        let ev = tracker
            .record(
                "b",
                &POLICY,
                Outcome::RateLimited {
                    retry_after: Some(Duration::from_secs(30)),
                },
                now.instant,
                now,
            )
            .unwrap();
        assert_eq!(
            tracker.local_until("b", now.instant).unwrap() - now.instant,
            Duration::from_secs(30)
        );
        assert_eq!(
            ev.cooldown_until,
            Some(timestamp(now.wall + Duration::from_secs(30)))
        );
        assert_eq!(ev.consecutive_failures, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_failures_count_once() {
        let tracker = CooldownTracker::new();
        let start = Now::read();
        let now = later(start, Duration::from_millis(50));
        let limited = Outcome::RateLimited { retry_after: None };
        assert!(
            tracker
                .record("b", &POLICY, limited, start.instant, now)
                .is_some()
        );
        // Nine more answers to requests sent before the cooldown started.
        for _ in 0..9 {
            assert!(
                tracker
                    .record("b", &POLICY, limited, start.instant, now)
                    .is_none()
            );
        }
        assert_eq!(
            tracker.local_until("b", now.instant).unwrap() - now.instant,
            Duration::from_secs(1)
        );
        // A longer Retry-After from one of them still lengthens it.
        let ev = tracker.record(
            "b",
            &POLICY,
            Outcome::RateLimited {
                retry_after: Some(Duration::from_secs(10)),
            },
            start.instant,
            now,
        );
        assert_eq!(ev.unwrap().consecutive_failures, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_cool_down_at_the_threshold() {
        let tracker = CooldownTracker::new();
        let now = Now::read();
        assert!(
            tracker
                .record("b", &POLICY, Outcome::Failure, now.instant, now)
                .is_none()
        );
        assert!(
            tracker
                .record("b", &POLICY, Outcome::Failure, now.instant, now)
                .is_none()
        );
        assert_eq!(tracker.local_until("b", now.instant), None);
        let ev = tracker
            .record("b", &POLICY, Outcome::Failure, now.instant, now)
            .unwrap();
        assert_eq!(ev.kind, BackendEventKind::Failing as i32);
        assert_eq!(ev.reason, "3 consecutive failures");
        assert_eq!(
            tracker.local_until("b", now.instant).unwrap() - now.instant,
            Duration::from_secs(1)
        );
        let disabled = CooldownPolicy {
            failure_threshold: 0,
            ..POLICY
        };
        for _ in 0..10 {
            assert!(
                tracker
                    .record("c", &disabled, Outcome::Failure, now.instant, now)
                    .is_none()
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn snapshot_without_the_event_does_not_clear_it_until_it_has_seen_it() {
        let tracker = CooldownTracker::new();
        let now = Now::read();
        let ev = tracker
            .record(
                "b",
                &POLICY,
                Outcome::RateLimited {
                    retry_after: Some(Duration::from_secs(60)),
                },
                now.instant,
                now,
            )
            .unwrap();
        let none = SnapshotCooldown {
            until: None,
            consecutive_failures: 0,
        };
        // Built before the control plane got our event: keeps the local cooldown.
        tracker.observe_snapshot([("b", none)], now);
        assert!(tracker.local_until("b", now.instant).is_some());
        // The control plane stored it with whole seconds: still counts as seen.
        let stored = crate::clock::system_time(ev.cooldown_until.as_ref().unwrap()).unwrap()
            - Duration::from_millis(400);
        tracker.observe_snapshot(
            [(
                "b",
                SnapshotCooldown {
                    until: Some(stored),
                    consecutive_failures: 1,
                },
            )],
            now,
        );
        assert!(tracker.local_until("b", now.instant).is_some());
        assert!(tracker.unacknowledged_events(now.wall).is_empty());
        // An admin reset: the next snapshot lacks it, so it is gone here too.
        tracker.observe_snapshot([("b", none)], now);
        assert_eq!(tracker.local_until("b", now.instant), None);
        assert!(tracker.unacknowledged_events(now.wall).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn fleet_failures_raise_the_local_count() {
        let tracker = CooldownTracker::new();
        let now = Now::read();
        let snap = SnapshotCooldown {
            until: Some(now.wall + Duration::from_secs(8)),
            consecutive_failures: 4,
        };
        tracker.observe_snapshot([("b", snap)], now);
        let after = later(now, Duration::from_secs(9));
        let ev = tracker
            .record(
                "b",
                &POLICY,
                Outcome::RateLimited { retry_after: None },
                after.instant,
                after,
            )
            .unwrap();
        assert_eq!(ev.consecutive_failures, 5);
        assert_eq!(
            tracker.local_until("b", after.instant).unwrap() - after.instant,
            Duration::from_secs(16)
        );
    }

    #[test]
    fn retry_after_forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut headers = http::HeaderMap::new();
        assert_eq!(retry_after(&headers, now), None);
        headers.insert("retry-after", "7".parse().unwrap());
        assert_eq!(retry_after(&headers, now), Some(Duration::from_secs(7)));
        headers.insert(
            "retry-after",
            httpdate::fmt_http_date(now + Duration::from_secs(20))
                .parse()
                .unwrap(),
        );
        assert_eq!(retry_after(&headers, now), Some(Duration::from_secs(20)));
        headers.insert("retry-after", "garbage".parse().unwrap());
        assert_eq!(retry_after(&headers, now), None);
        headers.insert("retry-after", "99999999999".parse().unwrap());
        assert_eq!(retry_after(&headers, now), Some(MAX_RETRY_AFTER));
        headers.insert("retry-after-ms", "1500".parse().unwrap());
        assert_eq!(
            retry_after(&headers, now),
            Some(Duration::from_millis(1500))
        );
    }
}
