//! Cooldowns: how long a backend rests after it answered 429 or kept failing, and how the
//! replicas and the control plane agree on it. The one definition of the rules; the control
//! plane runs [`CooldownState`] for the fleet, every replica runs the same type to predict
//! the fleet's state from its own reports until the next snapshot shows it.
//!
//! # The rules
//! - A backend's **streak** counts its overloads since its last success. An overload is a 429,
//!   or a failure (5xx, connect error, timeout before the first byte) once a replica has seen
//!   `failure_threshold` of them in a row or while the backend is already on a streak.
//! - Each counted overload starts a cooldown of [`CooldownPolicy::length`]:
//!   `min(cap, base · 2^(streak−1))`, never less than the upstream's `Retry-After` (itself
//!   capped at [`MAX_RETRY_AFTER`]), from the moment the replica saw it.
//! - **One overload counts once, fleet-wide.** Every change of the streak moves the `epoch`
//!   on (it never goes back). A replica's report names the state it knew when it sent the
//!   request: the epoch of its last snapshot (`basis`) and how many changes its own earlier
//!   reports had made on top (`position`). It counts only if that is still the state: the epoch
//!   is `basis + position` and, for `position > 0`, the last changes were that replica's own
//!   reports from the same basis (the state's `run`). Otherwise someone counted that overload
//!   already (or ended the streak) and the report can only lengthen the running cooldown to its
//!   own `Retry-After`. So a burst of 429s seen by any number of replicas before any of them
//!   heard of the others doubles once.
//! - **A success ends the streak everywhere** when its request was sent at the current state;
//!   the running cooldown (if any) still runs out. Replicas report a success only when the
//!   backend is on a streak, so a healthy backend costs no messages.
//! - An admin's reset ends the streak and the cooldown.

use std::ops::Add;
use std::time::Duration;

use sluice_proto::v1 as pb;

use crate::time::std_duration;

/// Longest `Retry-After` honoured; a longer one is read as this.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 60 * 60);

/// The cooldown part of the settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CooldownPolicy {
    pub base: Duration,
    pub cap: Duration,
    /// Consecutive non-429 failures that cool a backend; 0 disables.
    pub failure_threshold: u32,
}

impl CooldownPolicy {
    /// `min(cap, base · 2^(n−1))` for `n ≥ 1`; zero for `n = 0`.
    pub fn backoff(&self, n: u32) -> Duration {
        if n == 0 {
            return Duration::ZERO;
        }
        let factor = 1u32.checked_shl(n - 1).unwrap_or(u32::MAX);
        self.base
            .checked_mul(factor)
            .unwrap_or(self.cap)
            .min(self.cap)
    }

    /// The cooldown that the overload making the streak `streak` starts: the backoff, or the
    /// upstream's `Retry-After` if that is longer.
    pub fn length(&self, streak: u32, retry_after: Option<Duration>) -> Duration {
        self.backoff(streak)
            .max(retry_after.map_or(Duration::ZERO, |r| r.min(MAX_RETRY_AFTER)))
    }
}

/// What a replica saw that it reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The backend answered 429.
    RateLimited,
    /// A failure that counts (see the module docs).
    Failing,
    /// The backend answered, while on a streak.
    Recovered,
}

/// One replica's report about one backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    pub kind: Kind,
    /// The epoch of the last snapshot the replica had when it sent the request.
    pub basis: u64,
    /// How many changes the replica's own earlier reports had made on top of `basis` then.
    pub position: u32,
    /// The upstream's `Retry-After`, from the moment the replica saw it.
    pub retry_after: Option<Duration>,
}

impl From<Kind> for pb::BackendEventKind {
    fn from(kind: Kind) -> Self {
        match kind {
            Kind::RateLimited => pb::BackendEventKind::RateLimited,
            Kind::Failing => pb::BackendEventKind::Failing,
            Kind::Recovered => pb::BackendEventKind::Recovered,
        }
    }
}

/// A `BackendEvent` that is no [`Report`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotAReport {
    /// From a replica older than epochs: see [`CooldownState::apply_legacy`].
    #[error("no cooldown_epoch: a data plane older than cooldown epochs")]
    NoEpoch,
    #[error("unknown backend event kind {0}")]
    UnknownKind(i32),
}

impl TryFrom<&pb::BackendEvent> for Report {
    type Error = NotAReport;

    /// A malformed `retry_after` (negative) is read as none.
    fn try_from(event: &pb::BackendEvent) -> Result<Self, NotAReport> {
        let kind = match pb::BackendEventKind::try_from(event.kind) {
            Ok(pb::BackendEventKind::RateLimited) => Kind::RateLimited,
            Ok(pb::BackendEventKind::Failing) => Kind::Failing,
            Ok(pb::BackendEventKind::Recovered) => Kind::Recovered,
            Ok(pb::BackendEventKind::Unspecified) | Err(_) => {
                return Err(NotAReport::UnknownKind(event.kind));
            }
        };
        Ok(Report {
            kind,
            basis: event.cooldown_epoch.ok_or(NotAReport::NoEpoch)?,
            position: event.cooldown_position,
            retry_after: event
                .retry_after
                .as_ref()
                .and_then(std_duration)
                .map(|wait| wait.min(MAX_RETRY_AFTER)),
        })
    }
}

/// How a replica is named as the author of cooldown changes (`SnapshotBackend.cooldown_changed_by`):
/// its node id and its incarnation, so that a restarted replica never continues the run of the
/// process before it.
pub fn author(node_id: &str, incarnation: &str) -> String {
    format!("{node_id}/{incarnation}")
}

/// How long before it was sent the replica saw what a `BackendEvent` reports (zero when
/// unset or malformed; at most [`MAX_RETRY_AFTER`], beyond which no cooldown still runs).
pub fn event_age(event: &pb::BackendEvent) -> Duration {
    event
        .age
        .as_ref()
        .and_then(std_duration)
        .unwrap_or_default()
        .min(MAX_RETRY_AFTER)
}

/// What [`CooldownState::apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// A new overload: the streak grew and a cooldown of `length` began.
    Counted { length: Duration },
    /// An overload already counted, or reported against an older state: at most its
    /// `Retry-After` lengthened the running cooldown (`extended`).
    Absorbed { extended: bool },
    /// A success ended the streak.
    Ended,
    /// Nothing changed.
    Ignored,
}

/// A backend's cooldown state. `T` is a point in time: the control plane's wall clock there,
/// a replica's monotonic clock on a replica. `A` names a replica: its node id and incarnation
/// on the control plane, "this one or another" on a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CooldownState<T, A> {
    /// Moves on with every change of `streak`.
    pub epoch: u64,
    /// Overloads counted since the last success.
    pub streak: u32,
    /// When the last cooldown ends (or ended).
    pub until: Option<T>,
    /// When the last cooldown began; with no `until`, when an admin reset the backend.
    pub since: Option<T>,
    /// Whose reports made the last changes, and the basis they named: that replica's next
    /// report continues from there. `None` after a reset.
    pub run: Option<(A, u64)>,
    /// When an admin last reset it: a report of a 429 seen before then (sent late by a replica
    /// cut off when it came) starts or lengthens no cooldown, whatever ran since.
    pub reset_at: Option<T>,
}

impl<T, A> Default for CooldownState<T, A> {
    fn default() -> Self {
        Self {
            epoch: 0,
            streak: 0,
            until: None,
            since: None,
            run: None,
            reset_at: None,
        }
    }
}

impl<T, A> CooldownState<T, A>
where
    T: Copy + Ord + Add<Duration, Output = T>,
    A: Clone + PartialEq,
{
    /// The end of the cooldown running at `now`, if one is.
    pub fn cooling_until(&self, now: T) -> Option<T> {
        self.until.filter(|until| *until > now)
    }

    /// Whether `author`'s report was made at this state (see the module docs).
    pub fn is_current(&self, report: &Report, author: &A) -> bool {
        let Some(expected) = report.basis.checked_add(u64::from(report.position)) else {
            return false;
        };
        self.epoch == expected
            && (report.position == 0
                || matches!(&self.run, Some((by, basis)) if by == author && *basis == report.basis))
    }

    /// Applies `author`'s report of what it saw at `at`.
    pub fn apply(
        &mut self,
        report: &Report,
        author: &A,
        policy: &CooldownPolicy,
        at: T,
    ) -> Applied {
        let current = self.is_current(report, author);
        let applied = match report.kind {
            Kind::RateLimited | Kind::Failing if current => {
                self.streak = self.streak.saturating_add(1);
                let length = policy.length(self.streak, report.retry_after);
                self.extend(at, at + length);
                Applied::Counted { length }
            }
            // A 429 seen before an admin's reset (reported late by a replica cut off when it
            // came) is history: the reset ended what it asked for, also once another
            // cooldown has run since.
            Kind::RateLimited | Kind::Failing => {
                let before_the_reset = self.reset_at.is_some_and(|reset| at < reset);
                let extended = match report.retry_after {
                    Some(wait) if !wait.is_zero() && !before_the_reset => {
                        self.extend(at, at + wait.min(MAX_RETRY_AFTER))
                    }
                    _ => false,
                };
                Applied::Absorbed { extended }
            }
            Kind::Recovered if current && self.streak > 0 => {
                self.streak = 0;
                Applied::Ended
            }
            Kind::Recovered => Applied::Ignored,
        };
        if matches!(applied, Applied::Counted { .. } | Applied::Ended) {
            self.epoch = self.epoch.wrapping_add(1);
            self.run = Some((author.clone(), report.basis));
        }
        applied
    }

    /// An admin's reset at `at`: no streak, no cooldown.
    pub fn reset(&mut self, at: T) {
        self.epoch = self.epoch.wrapping_add(1);
        self.streak = 0;
        self.until = None;
        self.since = Some(at);
        self.run = None;
        self.reset_at = Some(at);
    }

    /// A report from a replica older than epochs: its own count and its own end time, taken
    /// if larger (the rule before epochs; see docs/guarantees.md for rolling upgrades).
    /// Returns whether anything changed.
    pub fn apply_legacy(&mut self, streak: u32, until: T, now: T) -> bool {
        let mut changed = false;
        if streak > self.streak {
            self.streak = streak;
            self.epoch = self.epoch.wrapping_add(1);
            self.run = None;
            changed = true;
        }
        if until > now {
            changed |= self.extend(now, until);
        }
        changed
    }

    /// Lengthens the cooldown to end at `until`; whether that changed anything.
    fn extend(&mut self, now: T, until: T) -> bool {
        match self.cooling_until(now) {
            Some(running) if running >= until => false,
            Some(_) => {
                self.until = Some(until);
                true
            }
            None => {
                self.since = Some(now);
                self.until = Some(until);
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: CooldownPolicy = CooldownPolicy {
        base: Duration::from_secs(1),
        cap: Duration::from_secs(300),
        failure_threshold: 5,
    };

    /// Seconds for times; replicas by name.
    type State = CooldownState<Duration, &'static str>;
    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    fn report(kind: Kind, basis: u64, position: u32, retry_after: Option<u64>) -> Report {
        Report {
            kind,
            basis,
            position,
            retry_after: retry_after.map(s),
        }
    }

    fn limited(basis: u64, position: u32) -> Report {
        report(Kind::RateLimited, basis, position, None)
    }

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(POLICY.backoff(0), Duration::ZERO);
        assert_eq!(POLICY.backoff(1), s(1));
        assert_eq!(POLICY.backoff(2), s(2));
        assert_eq!(POLICY.backoff(9), s(256));
        assert_eq!(POLICY.backoff(10), POLICY.cap);
        assert_eq!(POLICY.backoff(200), POLICY.cap);
        assert_eq!(POLICY.length(1, Some(s(30))), s(30));
        assert_eq!(POLICY.length(1, Some(s(10 * 86_400))), MAX_RETRY_AFTER);
    }

    #[test]
    fn an_overload_counts_once_and_a_success_ends_the_streak() {
        let mut state = State::default();
        assert_eq!(
            state.apply(&limited(0, 0), &"a", &POLICY, s(100)),
            Applied::Counted { length: s(1) }
        );
        // The same burst, seen by another replica that knew epoch 0 too.
        assert_eq!(
            state.apply(&limited(0, 0), &"b", &POLICY, s(100)),
            Applied::Absorbed { extended: false }
        );
        assert_eq!((state.streak, state.until), (1, Some(s(101))));
        // After the cooldown, the next 429 doubles.
        assert_eq!(
            state.apply(&limited(1, 0), &"b", &POLICY, s(102)),
            Applied::Counted { length: s(2) }
        );
        // A success sent before that 429 was counted says nothing about after it.
        let recovered = |basis, position| report(Kind::Recovered, basis, position, None);
        assert_eq!(
            state.apply(&recovered(1, 0), &"a", &POLICY, s(102)),
            Applied::Ignored
        );
        assert_eq!(
            state.apply(&recovered(2, 0), &"a", &POLICY, s(105)),
            Applied::Ended
        );
        assert_eq!((state.epoch, state.streak), (3, 0));
        assert_eq!(
            state.apply(&limited(3, 0), &"c", &POLICY, s(106)),
            Applied::Counted { length: s(1) }
        );
    }

    #[test]
    fn a_replica_continues_its_own_run_and_no_one_else_can() {
        let mut state = State::default();
        // Replica a, cut off from snapshots, counts twice on top of epoch 0.
        state.apply(&limited(0, 0), &"a", &POLICY, s(10));
        assert_eq!(state.run, Some(("a", 0)));
        // b's report names the same state number but not a's run.
        assert!(!state.is_current(&limited(0, 1), &"b"));
        assert_eq!(
            state.apply(&limited(0, 1), &"a", &POLICY, s(20)),
            Applied::Counted { length: s(2) }
        );
        // Once another replica changed the state, a's run is over.
        state.apply(&limited(2, 0), &"b", &POLICY, s(30));
        assert_eq!(
            state.apply(&limited(0, 2), &"a", &POLICY, s(30)),
            Applied::Absorbed { extended: false }
        );
        assert_eq!((state.epoch, state.streak), (3, 3));
    }

    #[test]
    fn an_absorbed_report_only_lengthens_to_its_retry_after() {
        let mut state = State::default();
        state.apply(&limited(0, 0), &"a", &POLICY, s(10));
        assert_eq!(
            state.apply(
                &report(Kind::RateLimited, 0, 0, Some(30)),
                &"b",
                &POLICY,
                s(10)
            ),
            Applied::Absorbed { extended: true }
        );
        assert_eq!(
            (state.streak, state.since, state.until),
            (1, Some(s(10)), Some(s(40)))
        );
        assert_eq!(
            state.apply(&report(Kind::Failing, 0, 0, None), &"b", &POLICY, s(11)),
            Applied::Absorbed { extended: false }
        );
    }

    /// A 429 seen before an admin's reset and reported after it (by a replica cut off when it
    /// came) does not start the cooldown the reset ended again, however long its
    /// `Retry-After`, nor lengthen one that started after the reset; one seen after the reset
    /// does.
    #[test]
    fn a_429_seen_before_a_reset_starts_no_cooldown() {
        let mut state = State::default();
        let hour = |basis| report(Kind::RateLimited, basis, 0, Some(3600));
        state.apply(&hour(0), &"a", &POLICY, s(10));
        state.reset(s(20));
        assert_eq!(
            state.apply(&hour(0), &"b", &POLICY, s(15)),
            Applied::Absorbed { extended: false }
        );
        assert_eq!(state.cooling_until(s(21)), None);
        // An overload after the reset cools it for a second; a replica cut off since before
        // the reset sends its hour late: still history (findings-45-limits F-3: it lengthened
        // the running cooldown to the hour).
        let limited = report(Kind::RateLimited, state.epoch, 0, None);
        assert!(matches!(
            state.apply(&limited, &"c", &POLICY, s(25)),
            Applied::Counted { .. }
        ));
        assert_eq!(
            state.apply(&hour(0), &"d", &POLICY, s(15)),
            Applied::Absorbed { extended: false }
        );
        assert_eq!(state.cooling_until(s(27)), None);
        assert_eq!(
            state.apply(&hour(0), &"b", &POLICY, s(30)),
            Applied::Absorbed { extended: true }
        );
        assert_eq!(state.cooling_until(s(31)), Some(s(3630)));
    }

    #[test]
    fn events_become_reports() {
        let event = pb::BackendEvent {
            kind: pb::BackendEventKind::Recovered as i32,
            cooldown_epoch: Some(4),
            cooldown_position: 2,
            retry_after: Some(crate::time::proto_duration(s(3))),
            age: Some(crate::time::proto_duration(s(5))),
            ..Default::default()
        };
        assert_eq!(
            Report::try_from(&event),
            Ok(report(Kind::Recovered, 4, 2, Some(3)))
        );
        assert_eq!(event_age(&event), s(5));
        let legacy = pb::BackendEvent {
            cooldown_epoch: None,
            age: None,
            ..event.clone()
        };
        assert_eq!(Report::try_from(&legacy), Err(NotAReport::NoEpoch));
        assert_eq!(event_age(&legacy), Duration::ZERO);
        let unknown = pb::BackendEvent { kind: 9, ..event };
        assert_eq!(Report::try_from(&unknown), Err(NotAReport::UnknownKind(9)));
        assert_eq!(
            pb::BackendEventKind::from(Kind::Failing),
            pb::BackendEventKind::Failing
        );
    }

    #[test]
    fn reset_and_legacy_reports_move_the_epoch_on() {
        let mut state = State::default();
        assert!(state.apply_legacy(3, s(20), s(10)));
        assert_eq!(
            (state.epoch, state.streak, state.until),
            (1, 3, Some(s(20)))
        );
        assert!(!state.apply_legacy(2, s(15), s(10)));
        state.apply(&limited(1, 0), &"a", &POLICY, s(30));
        state.reset(s(40));
        assert_eq!(
            state,
            CooldownState {
                epoch: 3,
                streak: 0,
                until: None,
                since: Some(s(40)),
                run: None,
                reset_at: Some(s(40)),
            }
        );
    }
}
