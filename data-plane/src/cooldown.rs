//! Per-backend cooldowns on this replica: the control plane's state from the last snapshot,
//! with this replica's own reports applied on top until a snapshot shows them. The rules are
//! `sluice_domain::cooldown`'s (the control plane applies the same ones to the same reports),
//! so once the reports are delivered and the snapshot is back, every replica holds the same
//! state as the control plane.
//!
//! # A request's life
//! [`CooldownTracker::check`] skips a backend that is cooling down, or returns the state the
//! request is sent at (its [`Basis`]). [`CooldownTracker::record`] takes the outcome with that
//! basis: a 429 (or a failure that counts) sent at the current state is a new overload and
//! starts a cooldown here at once; one sent at an older state is part of an overload already
//! counted (the fifty requests in flight when the first 429 came back), and only a longer
//! `Retry-After` matters. A success sent at the current state while the backend is on a
//! streak ends it. Each of these is returned as a [`BackendEvent`] for the control plane and
//! kept as *pending* until a snapshot shows what the control plane made of it.
//!
//! # Snapshots
//! [`CooldownTracker::observe_snapshot`] takes the control plane's state (its cooldown as a
//! remaining duration, turned into a deadline on this replica's monotonic clock, so that wall
//! clocks never matter). The snapshot says whose reports made the last changes and from which
//! epoch: if they are this replica's pending ones, those are applied and dropped, and the rest
//! stay; if the epoch moved on otherwise, every pending report will be (or was) absorbed into
//! someone else's change, and is dropped; if nothing moved, all stay. The pending ones are
//! applied again on top. After a reconnect, pending reports are sent again
//! ([`CooldownTracker::unacknowledged_events`]); one the control plane already applied changes
//! nothing the second time.

use std::collections::HashSet;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use sluice_domain::cooldown::{Applied, CooldownState, Kind, Report};
pub use sluice_domain::cooldown::{CooldownPolicy, MAX_RETRY_AFTER};
use sluice_proto::v1::{BackendEvent, BackendEventKind};
use tokio::time::Instant;

use crate::clock::{Now, proto_duration, timestamp};

/// Pending changes held at most per backend while no snapshot shows them (the control plane
/// unreachable through this many cooldowns). Beyond, this replica still cools the backend
/// down by its own count but reports no more until a snapshot comes.
const MAX_PENDING_CHANGES: usize = 256;

/// Who made a change, as a replica tells it apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Whose {
    /// This replica's own reports.
    Mine,
    Another,
}

/// A backend's cooldown state on this replica's monotonic clock.
pub type FleetCooldown = CooldownState<Instant, Whose>;

/// The state a request was sent at, to hand back with its outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Basis {
    /// The epoch of the last snapshot, or of the first pending change.
    epoch: u64,
    /// This replica's pending changes on top of `epoch`.
    position: u32,
}

/// What one attempt at a backend showed about its health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The backend answered, including with a 4xx other than 429 (the client's fault).
    Success,
    /// A stream's first event: the backend answers. It ends the backend's streak as a success
    /// does (a streak must end as soon as the backend serves again: ended only when a stream
    /// of tens of seconds ended, every fast failure meanwhile doubled the cooldown, and a
    /// backend serving streams stayed on its streak for good), but it leaves the count of
    /// consecutive failures off a streak to the stream's end, a success or a failure then.
    Answering,
    /// 429, with the upstream's `Retry-After` if it sent one.
    RateLimited { retry_after: Option<Duration> },
    /// 5xx (with the upstream's `Retry-After` if it sent one), connect error, or timeout
    /// before the first byte.
    Failure { retry_after: Option<Duration> },
}

#[derive(Debug, Default)]
struct Entry {
    /// The control plane's state, from the last snapshot.
    fleet: FleetCooldown,
    /// `fleet` with the pending reports applied: what this replica acts on.
    view: FleetCooldown,
    /// This replica's reports that no snapshot has shown yet, in the order sent.
    pending: Vec<Pending>,
    /// The epoch the pending changes are based on, and how many of them (from the first) a
    /// snapshot has shown applied.
    run: (u64, u32),
    /// Consecutive non-429 failures of requests sent at the current state.
    failures: u32,
}

impl Entry {
    fn changes_pending(&self) -> usize {
        self.pending.iter().filter(|p| p.change).count()
    }

    /// The basis of a request sent now: on top of the pending changes, or of the snapshot.
    fn basis(&self) -> Basis {
        if self.changes_pending() == 0 {
            return Basis {
                epoch: self.view.epoch,
                position: 0,
            };
        }
        let (epoch, _) = self.run;
        Basis {
            epoch,
            position: u32::try_from(self.view.epoch.saturating_sub(epoch)).unwrap_or(u32::MAX),
        }
    }
}

#[derive(Debug, Clone)]
struct Pending {
    report: Report,
    /// A change of the streak (counted or ended), not only a longer cooldown.
    change: bool,
    /// When the report was made.
    at: Instant,
    /// Until when a report that is no change matters: the end of the cooldown it lengthened.
    expires: Instant,
    /// The epoch of the snapshot this replica had when it made the report. A report that is
    /// no change is kept only while the snapshots stay at that epoch: once the control plane
    /// moved on it has applied the report (or reset what it lengthened), or will, and the
    /// snapshots carry the outcome.
    seen: u64,
    /// For the event: the wall-clock time, and the streak and end this replica expects
    /// (read by control planes older than epochs).
    wall: SystemTime,
    streak: u32,
    until_wall: Option<SystemTime>,
    reason: String,
}

impl Pending {
    /// The event telling the control plane, sent at `now`.
    fn event(&self, backend_id: &str, now: Instant) -> BackendEvent {
        BackendEvent {
            backend_id: backend_id.to_owned(),
            kind: BackendEventKind::from(self.report.kind) as i32,
            cooldown_until: self.until_wall.map(timestamp),
            consecutive_failures: self.streak,
            reason: self.reason.clone(),
            time: Some(timestamp(self.wall)),
            cooldown_epoch: Some(self.report.basis),
            cooldown_position: self.report.position,
            retry_after: self.report.retry_after.map(proto_duration),
            age: Some(proto_duration(now.saturating_duration_since(self.at))),
        }
    }
}

/// This replica's cooldown state by backend id. It outlives snapshots.
#[derive(Debug, Default)]
pub struct CooldownTracker {
    /// Looked up twice per request: hashed with foldhash, not SipHash. The ids are the
    /// control plane's, never a client's.
    entries: Mutex<foldhash::HashMap<String, Entry>>,
}

impl CooldownTracker {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, foldhash::HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `Err(until)` while the backend cools down; otherwise the state a request sent now is
    /// sent at, to hand back to [`CooldownTracker::record`].
    pub fn check(&self, backend_id: &str, now: Instant) -> Result<Basis, Instant> {
        let entries = self.lock();
        let Some(entry) = entries.get(backend_id) else {
            return Ok(Basis {
                epoch: 0,
                position: 0,
            });
        };
        match entry.view.cooling_until(now) {
            Some(until) => Err(until),
            None => Ok(entry.basis()),
        }
    }

    /// The backend's state as this replica acts on it.
    pub fn view(&self, backend_id: &str) -> FleetCooldown {
        self.lock()
            .get(backend_id)
            .map(|e| e.view)
            .unwrap_or_default()
    }

    /// Records the outcome of a request sent at `basis`; returns the event to report when it
    /// changed the backend's state (see the module docs).
    pub fn record(
        &self,
        backend_id: &str,
        basis: Basis,
        policy: &CooldownPolicy,
        outcome: Outcome,
        now: Now,
    ) -> Option<BackendEvent> {
        self.record_at(backend_id, basis, policy, outcome, || now)
    }

    /// [`Self::record`], reading the time from `now` only when the outcome changes something:
    /// the common case, a success on a healthy backend, needs no clock.
    pub fn record_at(
        &self,
        backend_id: &str,
        basis: Basis,
        policy: &CooldownPolicy,
        outcome: Outcome,
        now: impl FnOnce() -> Now,
    ) -> Option<BackendEvent> {
        let mut entries = self.lock();
        // The common case, a success on a healthy backend, neither allocates nor reports.
        if !entries.contains_key(backend_id) {
            if matches!(outcome, Outcome::Success | Outcome::Answering) {
                return None;
            }
            entries.insert(backend_id.to_owned(), Entry::default());
        }
        let entry = entries.get_mut(backend_id)?;
        let current = basis == entry.basis();
        let (kind, retry_after, reason) = match outcome {
            Outcome::Success => {
                if !current {
                    return None;
                }
                entry.failures = 0;
                if entry.view.streak == 0 {
                    return None;
                }
                (Kind::Recovered, None, "answered again".to_owned())
            }
            Outcome::Answering => {
                if !current || entry.view.streak == 0 {
                    return None;
                }
                entry.failures = 0;
                (Kind::Recovered, None, "answered again".to_owned())
            }
            Outcome::RateLimited { retry_after } => (
                Kind::RateLimited,
                retry_after.map(|wait| wait.min(MAX_RETRY_AFTER)),
                "429 from upstream".to_owned(),
            ),
            Outcome::Failure { retry_after } => {
                if !current || policy.failure_threshold == 0 {
                    return None;
                }
                entry.failures = entry.failures.saturating_add(1);
                if entry.view.streak == 0 && entry.failures < policy.failure_threshold {
                    return None;
                }
                let reason = format!("{} consecutive failures", entry.failures);
                (
                    Kind::Failing,
                    retry_after.map(|wait| wait.min(MAX_RETRY_AFTER)),
                    reason,
                )
            }
        };
        let now = now();
        let report = Report {
            kind,
            basis: basis.epoch,
            position: basis.position,
            retry_after,
        };
        let first_change = entry.changes_pending() == 0;
        let applied = entry.view.apply(&report, &Whose::Mine, policy, now.instant);
        let change = match applied {
            Applied::Counted { .. } | Applied::Ended => true,
            Applied::Absorbed { extended: true } => false,
            Applied::Absorbed { extended: false } | Applied::Ignored => return None,
        };
        if matches!(applied, Applied::Counted { .. }) {
            entry.failures = 0;
        }
        if change && first_change {
            entry.run = (report.basis, 0);
        }
        if change && entry.changes_pending() >= MAX_PENDING_CHANGES {
            // Cut off for this long: cool down by the local count, report no more.
            return None;
        }
        let expires = entry.view.until.unwrap_or(now.instant);
        let pending = Pending {
            report,
            change,
            at: now.instant,
            expires,
            seen: entry.fleet.epoch,
            wall: now.wall,
            streak: entry.view.streak,
            until_wall: (kind != Kind::Recovered).then(|| now.wall_at(expires)),
            reason,
        };
        let event = pending.event(backend_id, now.instant);
        entry.pending.push(pending);
        Some(event)
    }

    /// Events of the pending reports, to tell a reconnected control plane again (the old
    /// stream may have lost them). Those it already applied change nothing a second time.
    pub fn unacknowledged_events(&self, now: Instant) -> Vec<BackendEvent> {
        let entries = self.lock();
        entries
            .iter()
            .flat_map(|(id, e)| {
                e.pending
                    .iter()
                    .filter(move |p| p.change || p.expires > now)
                    .map(move |p| p.event(id, now))
            })
            .collect()
    }

    /// Takes a newly swapped-in snapshot's states (see the module docs). Backends no longer
    /// in the snapshot are forgotten.
    pub fn observe_snapshot<'a>(
        &self,
        backends: impl IntoIterator<Item = (&'a str, FleetCooldown)>,
        policy: &CooldownPolicy,
        now: Instant,
    ) {
        let mut entries = self.lock();
        let mut seen = HashSet::new();
        for (id, fleet) in backends {
            seen.insert(id);
            let entry = entries.entry(id.to_owned()).or_default();
            entry.fleet = fleet;
            settle_pending(entry);
            entry
                .pending
                .retain(|p| p.change || (p.expires > now && p.seen == fleet.epoch));
            let mut view = fleet;
            for p in &mut entry.pending {
                let applied = view.apply(&p.report, &Whose::Mine, policy, p.at);
                if !matches!(applied, Applied::Counted { .. } | Applied::Ended) {
                    // Neither will the control plane make it a change: at most it lengthens.
                    p.change = false;
                }
            }
            if view.epoch != entry.view.epoch {
                // A count, the end of a streak or a reset: failures before it are history.
                entry.failures = 0;
            }
            entry.view = view;
        }
        entries.retain(|id, _| seen.contains(id.as_str()));
    }
}

/// Drops the pending reports that `entry.fleet` shows applied, or that it shows will never
/// be (see the module docs).
fn settle_pending(entry: &mut Entry) {
    if entry.changes_pending() == 0 {
        return;
    }
    let (basis, shown) = entry.run;
    let fleet = &entry.fleet;
    let applied = match fleet.run {
        Some((Whose::Mine, run_basis)) if run_basis == basis && fleet.epoch > basis => {
            u32::try_from(fleet.epoch - basis).unwrap_or(u32::MAX)
        }
        // Nothing of this run applied yet, and nothing else either.
        _ if fleet.epoch == basis && shown == 0 => 0,
        _ if fleet.epoch == basis + u64::from(shown) && fleet.run == Some((Whose::Mine, basis)) => {
            shown
        }
        // Someone else changed the state: the rest of the run is absorbed wherever it lands.
        _ => {
            entry.pending.clear();
            entry.run = (fleet.epoch, 0);
            return;
        }
    };
    // Reports arrive in order, so everything up to the last change applied was applied.
    let mut newly = applied.saturating_sub(shown);
    let mut keep_from = 0;
    while newly > 0 && keep_from < entry.pending.len() {
        if entry.pending[keep_from].change {
            newly -= 1;
        }
        keep_from += 1;
    }
    entry.pending.drain(..keep_from);
    entry.run.1 = applied.max(shown);
    if entry.changes_pending() == 0 {
        entry.run = (fleet.epoch, 0);
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
    const LIMITED: Outcome = Outcome::RateLimited { retry_after: None };

    fn later(now: Now, d: Duration) -> Now {
        Now {
            instant: now.instant + d,
            wall: now.wall + d,
        }
    }

    /// The time left of the cooldown at `now`, zero when none runs.
    fn left(tracker: &CooldownTracker, now: Now) -> Duration {
        match tracker.check("b", now.instant) {
            Ok(_) => Duration::ZERO,
            Err(until) => until - now.instant,
        }
    }

    fn basis(tracker: &CooldownTracker, now: Now) -> Basis {
        tracker.check("b", now.instant).unwrap()
    }

    const FIRST: Basis = Basis {
        epoch: 0,
        position: 0,
    };

    /// Plays the control plane: applies `events`, all this replica's, to `state`.
    fn control_plane(state: &mut FleetCooldown, events: &[BackendEvent], now: Now) {
        for e in events {
            state.apply(
                &Report::try_from(e).unwrap(),
                &Whose::Mine,
                &POLICY,
                now.instant,
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limits_double_until_a_success() {
        let tracker = CooldownTracker::new();
        let mut now = Now::read();
        for (streak, expected) in [(1, 1), (2, 2), (3, 4), (4, 8)] {
            let ev = tracker
                .record("b", basis(&tracker, now), &POLICY, LIMITED, now)
                .unwrap();
            assert_eq!(ev.kind, BackendEventKind::RateLimited as i32);
            assert_eq!(ev.consecutive_failures, streak);
            assert_eq!(left(&tracker, now), Duration::from_secs(expected));
            now = later(now, Duration::from_secs(expected));
            assert_eq!(left(&tracker, now), Duration::ZERO);
        }
        let ev = tracker
            .record("b", basis(&tracker, now), &POLICY, Outcome::Success, now)
            .unwrap();
        assert_eq!(ev.kind, BackendEventKind::Recovered as i32);
        assert_eq!(ev.cooldown_until, None);
        // Off the streak, successes say nothing.
        let b = basis(&tracker, now);
        assert!(
            tracker
                .record("b", b, &POLICY, Outcome::Success, now)
                .is_none()
        );
        tracker.record("b", b, &POLICY, LIMITED, now).unwrap();
        assert_eq!(left(&tracker, now), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_a_floor_and_travels_with_the_events_age() {
        let tracker = CooldownTracker::new();
        let now = Now::read();
        let thirty = Outcome::RateLimited {
            retry_after: Some(Duration::from_secs(30)),
        };
        let ev = tracker.record("b", FIRST, &POLICY, thirty, now).unwrap();
        assert_eq!(left(&tracker, now), Duration::from_secs(30));
        assert_eq!(
            ev.retry_after,
            Some(proto_duration(Duration::from_secs(30)))
        );
        assert_eq!(ev.cooldown_epoch, Some(0));
        assert_eq!(
            ev.cooldown_until,
            Some(timestamp(now.wall + Duration::from_secs(30)))
        );
        assert_eq!(ev.age, Some(proto_duration(Duration::ZERO)));
        // Sent again 10 s later (after a reconnect): seen 10 s before.
        let resent = tracker.unacknowledged_events(now.instant + Duration::from_secs(10));
        assert_eq!(resent[0].retry_after, ev.retry_after);
        assert_eq!(resent[0].age, Some(proto_duration(Duration::from_secs(10))));
    }

    #[tokio::test(start_paused = true)]
    async fn requests_in_flight_when_a_cooldown_starts_count_once() {
        let tracker = CooldownTracker::new();
        let start = Now::read();
        let sent_at = basis(&tracker, start);
        let now = later(start, Duration::from_millis(50));
        assert!(
            tracker
                .record("b", sent_at, &POLICY, LIMITED, now)
                .is_some()
        );
        for _ in 0..9 {
            assert!(
                tracker
                    .record("b", sent_at, &POLICY, LIMITED, now)
                    .is_none()
            );
            assert!(
                tracker
                    .record(
                        "b",
                        sent_at,
                        &POLICY,
                        Outcome::Failure { retry_after: None },
                        now
                    )
                    .is_none()
            );
            // Nor does a success that was on its way: it says nothing about after the 429.
            assert!(
                tracker
                    .record("b", sent_at, &POLICY, Outcome::Success, now)
                    .is_none()
            );
        }
        assert_eq!(left(&tracker, now), Duration::from_secs(1));
        assert_eq!(tracker.view("b").streak, 1);
        // A longer Retry-After from one of them still lengthens it.
        let ev = tracker
            .record(
                "b",
                sent_at,
                &POLICY,
                Outcome::RateLimited {
                    retry_after: Some(Duration::from_secs(10)),
                },
                now,
            )
            .unwrap();
        assert_eq!(ev.consecutive_failures, 1);
        assert_eq!(left(&tracker, now), Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn failures_cool_down_at_the_threshold_and_on_a_streak_at_once() {
        let tracker = CooldownTracker::new();
        let mut now = Now::read();
        for _ in 0..2 {
            let b = basis(&tracker, now);
            assert!(
                tracker
                    .record("b", b, &POLICY, Outcome::Failure { retry_after: None }, now)
                    .is_none()
            );
        }
        assert_eq!(left(&tracker, now), Duration::ZERO);
        let ev = tracker
            .record(
                "b",
                basis(&tracker, now),
                &POLICY,
                Outcome::Failure { retry_after: None },
                now,
            )
            .unwrap();
        assert_eq!(ev.kind, BackendEventKind::Failing as i32);
        assert_eq!(ev.reason, "3 consecutive failures");
        assert_eq!(left(&tracker, now), Duration::from_secs(1));
        // Past the threshold, the next failure doubles.
        now = later(now, Duration::from_secs(1));
        let ev = tracker
            .record(
                "b",
                basis(&tracker, now),
                &POLICY,
                Outcome::Failure { retry_after: None },
                now,
            )
            .unwrap();
        assert_eq!(ev.consecutive_failures, 2);
        assert_eq!(left(&tracker, now), Duration::from_secs(2));
        let disabled = CooldownPolicy {
            failure_threshold: 0,
            ..POLICY
        };
        for _ in 0..10 {
            assert!(
                tracker
                    .record(
                        "c",
                        FIRST,
                        &disabled,
                        Outcome::Failure { retry_after: None },
                        now
                    )
                    .is_none()
            );
        }
    }

    /// A 503 saying when to come back (`Retry-After`) cools the backend that long once it
    /// counts, as a 429 does, where the backoff alone would send it requests again in a second.
    #[tokio::test(start_paused = true)]
    async fn a_failure_counted_with_a_retry_after_cools_down_that_long() {
        let tracker = CooldownTracker::new();
        let now = Now::read();
        let unavailable = Outcome::Failure {
            retry_after: Some(Duration::from_secs(60)),
        };
        for _ in 0..2 {
            let b = basis(&tracker, now);
            assert!(tracker.record("b", b, &POLICY, unavailable, now).is_none());
        }
        let ev = tracker
            .record("b", basis(&tracker, now), &POLICY, unavailable, now)
            .unwrap();
        assert_eq!(ev.kind, BackendEventKind::Failing as i32);
        assert_eq!(left(&tracker, now), Duration::from_secs(60));
        // And the control plane is told, so that every replica waits as long.
        assert_eq!(
            Report::try_from(&ev).unwrap().retry_after,
            Some(Duration::from_secs(60))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_snapshot_keeps_reports_it_has_not_seen_and_shows_the_rest_as_decided() {
        let tracker = CooldownTracker::new();
        let now = Now::read();
        let mut fleet = FleetCooldown::default();
        let ev = tracker.record("b", FIRST, &POLICY, LIMITED, now).unwrap();
        // Built before the control plane got the event: the local cooldown stays.
        tracker.observe_snapshot([("b", fleet)], &POLICY, now.instant);
        assert_eq!(left(&tracker, now), Duration::from_secs(1));
        assert_eq!(tracker.unacknowledged_events(now.instant).len(), 1);
        // Another replica's 429 of the same burst got there first; ours is absorbed.
        let other = later(now, Duration::from_millis(300));
        fleet.apply(
            &Report {
                kind: Kind::RateLimited,
                basis: 0,
                position: 0,
                retry_after: None,
            },
            &Whose::Another,
            &POLICY,
            other.instant,
        );
        control_plane(&mut fleet, &[ev], other);
        assert_eq!(fleet.run, Some((Whose::Another, 0)));
        tracker.observe_snapshot([("b", fleet)], &POLICY, other.instant);
        assert_eq!(tracker.view("b"), fleet, "the control plane's decision");
        assert!(tracker.unacknowledged_events(other.instant).is_empty());
        // An admin reset: the next snapshot has a new epoch and no cooldown.
        fleet.reset(other.instant);
        tracker.observe_snapshot([("b", fleet)], &POLICY, other.instant);
        assert_eq!(left(&tracker, other), Duration::ZERO);
        assert_eq!(tracker.view("b").streak, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_replica_cut_off_keeps_doubling_and_the_control_plane_follows_its_run() {
        let tracker = CooldownTracker::new();
        let mut now = Now::read();
        let mut fleet = FleetCooldown::default();
        let mut events = Vec::new();
        for expected in [1, 2, 4] {
            events.push(
                tracker
                    .record("b", basis(&tracker, now), &POLICY, LIMITED, now)
                    .unwrap(),
            );
            assert_eq!(left(&tracker, now), Duration::from_secs(expected));
            now = later(now, Duration::from_secs(expected));
        }
        let positions: Vec<u32> = events.iter().map(|e| e.cooldown_position).collect();
        assert_eq!(positions, [0, 1, 2]);
        // Back in touch: the first two arrive, then a snapshot.
        control_plane(&mut fleet, &events[..2], now);
        tracker.observe_snapshot([("b", fleet)], &POLICY, now.instant);
        assert_eq!(tracker.view("b").streak, 3, "the third is still pending");
        assert_eq!(tracker.unacknowledged_events(now.instant).len(), 1);
        control_plane(&mut fleet, &events[2..], now);
        tracker.observe_snapshot([("b", fleet)], &POLICY, now.instant);
        assert_eq!(tracker.view("b"), fleet);
        assert_eq!(fleet.streak, 3);
        assert!(tracker.unacknowledged_events(now.instant).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn the_fleets_streak_is_where_the_next_doubling_starts() {
        let tracker = CooldownTracker::new();
        let now = Now::read();
        let fleet = FleetCooldown {
            epoch: 7,
            streak: 4,
            until: Some(now.instant + Duration::from_secs(8)),
            since: None,
            run: Some((Whose::Another, 6)),
        };
        tracker.observe_snapshot([("b", fleet)], &POLICY, now.instant);
        assert_eq!(tracker.check("b", now.instant), Err(fleet.until.unwrap()));
        let after = later(now, Duration::from_secs(9));
        let ev = tracker
            .record("b", basis(&tracker, after), &POLICY, LIMITED, after)
            .unwrap();
        assert_eq!(ev.cooldown_epoch, Some(7));
        assert_eq!(ev.consecutive_failures, 5);
        assert_eq!(left(&tracker, after), Duration::from_secs(16));
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
