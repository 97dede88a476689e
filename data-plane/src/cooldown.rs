//! Per-backend cooldowns on this replica, and per model at a backend: the control plane's
//! state from the last snapshot,
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
//!
//! # Backends and models
//! Providers limit each model apart (OpenAI, Anthropic, an Azure deployment per model), so a
//! 429 cools the model it was for at the backend, not the backend's other models; so does
//! the provider refusing a model to the backend's account, and a timeout of the model's
//! answer or its stream's silence (a model thinking or queued for too long). A 5xx, a
//! connection's failure or a stream's head that does not come is the backend's, and cools it
//! for every model. A backend and each model at it
//! have a state of their own, each by the rules above; a request is skipped while either it
//! needs is cooling, and its success ends both streaks.

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

/// The state a request was sent at, to hand back with its outcome: its backend's, and its
/// model's at the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Basis {
    backend: At,
    model: At,
}

/// One state a request was sent at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct At {
    /// The epoch of the last snapshot, or of the first pending change.
    epoch: u64,
    /// This replica's pending changes on top of `epoch`.
    position: u32,
}

/// Whose health a failure tells of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The backend's, for every model: a 5xx, a connection's failure, a stream's head that
    /// does not come, its key refused, a 429 for the whole account (`insufficient_quota`).
    Backend,
    /// The model's the request was for, at the backend: a 429 (providers limit each model
    /// apart), the model refused to the backend's account, a timeout of its answer or its
    /// stream's silence.
    Model,
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
    RateLimited {
        retry_after: Option<Duration>,
        scope: Scope,
    },
    /// 5xx (with the upstream's `Retry-After` if it sent one), connect error, or timeout
    /// before the first byte.
    Failure {
        retry_after: Option<Duration>,
        scope: Scope,
    },
}

impl Outcome {
    /// Whether it is of the model the request was for (not of the backend, nor an answer).
    pub fn of_model(self) -> bool {
        matches!(
            self,
            Self::RateLimited {
                scope: Scope::Model,
                ..
            } | Self::Failure {
                scope: Scope::Model,
                ..
            }
        )
    }
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
    fn basis(&self) -> At {
        if self.changes_pending() == 0 {
            return At {
                epoch: self.view.epoch,
                position: 0,
            };
        }
        let (epoch, _) = self.run;
        At {
            epoch,
            position: u32::try_from(self.view.epoch.saturating_sub(epoch)).unwrap_or(u32::MAX),
        }
    }

    /// Nothing to remember: the initial state, nothing pending.
    fn is_initial(&self) -> bool {
        self.view == FleetCooldown::default()
            && self.fleet == FleetCooldown::default()
            && self.pending.is_empty()
            && self.failures == 0
    }

    /// Records an outcome of a request sent at `basis` (see [`CooldownTracker::record`]).
    fn record(
        &mut self,
        backend_id: &str,
        model: &str,
        basis: At,
        policy: &CooldownPolicy,
        outcome: Outcome,
        now: &impl Fn() -> Now,
    ) -> Option<BackendEvent> {
        let entry = self;
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
            Outcome::RateLimited { retry_after, .. } => (
                Kind::RateLimited,
                retry_after.map(|wait| wait.min(MAX_RETRY_AFTER)),
                "429 from upstream".to_owned(),
            ),
            Outcome::Failure { retry_after, .. } => {
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
        let event = pending.event(backend_id, model, now.instant);
        entry.pending.push(pending);
        Some(event)
    }

    /// Takes the control plane's state `fleet` from a snapshot (see the module docs).
    fn observe(&mut self, fleet: FleetCooldown, policy: &CooldownPolicy, now: Instant) {
        let entry = self;
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

    /// The events of its pending reports still to tell (see
    /// [`CooldownTracker::unacknowledged_events`]).
    fn unacknowledged<'a>(
        &'a self,
        backend_id: &'a str,
        model: &'a str,
        now: Instant,
    ) -> impl Iterator<Item = BackendEvent> + 'a {
        self.pending
            .iter()
            .filter(move |p| p.change || p.expires > now)
            .map(move |p| p.event(backend_id, model, now))
    }
}

/// A backend's cooldown states on this replica: its own, and its models'.
#[derive(Debug, Default)]
struct Cooling {
    backend: Entry,
    /// By the model's name at the provider. Only models with a state other than the
    /// initial one: most backends have none.
    models: foldhash::HashMap<String, Entry>,
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
    fn event(&self, backend_id: &str, model: &str, now: Instant) -> BackendEvent {
        BackendEvent {
            backend_id: backend_id.to_owned(),
            model: model.to_owned(),
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

/// This replica's cooldown state by backend id, and by model at a backend. It outlives
/// snapshots.
#[derive(Debug, Default)]
pub struct CooldownTracker {
    /// Looked up twice per request: hashed with foldhash, not SipHash. The ids are the
    /// control plane's, never a client's, and the models those of its routes.
    entries: Mutex<foldhash::HashMap<String, Cooling>>,
    /// Whether the control plane keeps no cooldown per model (the last snapshot's
    /// `model_cooldowns` unset): under such a one a model's 429 is reported, and kept, as the
    /// backend's, as that control plane applies every report to the backend.
    models_together: std::sync::atomic::AtomicBool,
}

/// A model's cooldown state at a backend, as a snapshot carries it.
pub type ModelCooldown<'a> = (&'a str, FleetCooldown);

impl CooldownTracker {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, foldhash::HashMap<String, Cooling>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `Err(until)` while the backend, or `model` at it, cools down; otherwise the state a
    /// request sent now is sent at, to hand back to [`CooldownTracker::record`]. `model` is
    /// the model's name at the provider; empty for a request of no one model (a stored
    /// response's), which checks the backend alone.
    pub fn check(&self, backend_id: &str, model: &str, now: Instant) -> Result<Basis, Instant> {
        let entries = self.lock();
        let Some(cooling) = entries.get(backend_id) else {
            return Ok(Basis::default());
        };
        let of_model = match cooling.models.is_empty() {
            true => None,
            false => cooling.models.get(model),
        };
        let until = [Some(&cooling.backend), of_model]
            .into_iter()
            .flatten()
            .filter_map(|e| e.view.cooling_until(now))
            .max();
        match until {
            Some(until) => Err(until),
            None => Ok(Basis {
                backend: cooling.backend.basis(),
                model: of_model.map(Entry::basis).unwrap_or_default(),
            }),
        }
    }

    /// The state a stream sent at `before` is judged at once its first event has come (which
    /// may have ended a streak): each of the backend's and the model's states as it is now,
    /// unless that one cools down (then as `before`: the stream's end is no news of a state
    /// that others' failures have moved on). Each apart: a 429 for the model an instant
    /// later must not take the backend's back to before the first event.
    pub fn restate(&self, backend_id: &str, model: &str, before: Basis, now: Instant) -> Basis {
        let entries = self.lock();
        let Some(cooling) = entries.get(backend_id) else {
            return before;
        };
        let now_or_before = |entry: Option<&Entry>, before: At| match entry {
            Some(entry) if entry.view.cooling_until(now).is_none() => entry.basis(),
            Some(_) => before,
            None => At::default(),
        };
        Basis {
            backend: now_or_before(Some(&cooling.backend), before.backend),
            model: now_or_before(cooling.models.get(model), before.model),
        }
    }

    /// The backend's own state as this replica acts on it.
    pub fn view(&self, backend_id: &str) -> FleetCooldown {
        self.lock()
            .get(backend_id)
            .map(|c| c.backend.view)
            .unwrap_or_default()
    }

    /// `model`'s state at the backend as this replica acts on it.
    pub fn model_view(&self, backend_id: &str, model: &str) -> FleetCooldown {
        self.lock()
            .get(backend_id)
            .and_then(|c| c.models.get(model))
            .map(|e| e.view)
            .unwrap_or_default()
    }

    /// Records the outcome of a request for `model` sent at `basis`; returns the event to
    /// report when it changed a state: the backend's or the model's by the outcome's
    /// [`Scope`] (a success may end both streaks: then the backend's event is returned, and
    /// [`CooldownTracker::record_at`] returns both).
    pub fn record(
        &self,
        backend_id: &str,
        model: &str,
        basis: Basis,
        policy: &CooldownPolicy,
        outcome: Outcome,
        now: Now,
    ) -> Option<BackendEvent> {
        self.record_at(backend_id, model, basis, policy, outcome, || now)
            .into_iter()
            .next()
    }

    /// [`Self::record`], reading the time from `now` only when the outcome changes something
    /// (the common case, a success on a healthy backend, needs no clock), and returning every
    /// event: the backend's first.
    pub fn record_at(
        &self,
        backend_id: &str,
        model: &str,
        basis: Basis,
        policy: &CooldownPolicy,
        outcome: Outcome,
        now: impl Fn() -> Now,
    ) -> Vec<BackendEvent> {
        let mut entries = self.lock();
        let scope = match outcome {
            Outcome::Success | Outcome::Answering => None,
            // A failure of the model of a call that names none (a call on a stored Responses
            // object): a model thinking past the idle timeout on a streamed retrieve, a model
            // timeout. No one's: taken as the backend's, three of them took every model out.
            // (Its 429, the model's, is not recorded at all: `forward_call`.)
            Outcome::Failure {
                scope: Scope::Model,
                ..
            } if model.is_empty() => return Vec::new(),
            Outcome::RateLimited { scope, .. } | Outcome::Failure { scope, .. } => Some(scope),
        };
        match scope {
            // The common case, a success on a healthy backend, neither allocates nor reports.
            None => {
                let Some(cooling) = entries.get_mut(backend_id) else {
                    return Vec::new();
                };
                let mut events = Vec::new();
                events.extend(cooling.backend.record(
                    backend_id,
                    "",
                    basis.backend,
                    policy,
                    outcome,
                    &now,
                ));
                if let Some(entry) = cooling.models.get_mut(model) {
                    events.extend(entry.record(
                        backend_id,
                        model,
                        basis.model,
                        policy,
                        outcome,
                        &now,
                    ));
                }
                events
            }
            Some(scope) => {
                let models_apart = !self
                    .models_together
                    .load(std::sync::atomic::Ordering::Relaxed);
                let cooling = entries.entry(backend_id.to_owned()).or_default();
                let (entry, model, basis) = match scope {
                    Scope::Model if models_apart && !model.is_empty() => (
                        cooling.models.entry(model.to_owned()).or_default(),
                        model,
                        basis.model,
                    ),
                    _ => (&mut cooling.backend, "", basis.backend),
                };
                entry
                    .record(backend_id, model, basis, policy, outcome, &now)
                    .into_iter()
                    .collect()
            }
        }
    }

    /// Events of the pending reports, to tell a reconnected control plane again (the old
    /// stream may have lost them). Those it already applied change nothing a second time.
    pub fn unacknowledged_events(&self, now: Instant) -> Vec<BackendEvent> {
        let entries = self.lock();
        entries
            .iter()
            .flat_map(|(id, c)| {
                c.backend.unacknowledged(id, "", now).chain(
                    c.models
                        .iter()
                        .flat_map(move |(model, e)| e.unacknowledged(id, model, now)),
                )
            })
            .collect()
    }

    /// Takes a newly swapped-in snapshot's states, each backend's with those of its models
    /// (see the module docs), from a control plane that keeps models' states (`models_apart`)
    /// or not. Backends no longer in the snapshot are forgotten, and so are models a backend
    /// no longer `serves` (their reports dropped: the control plane drops them too); a model's
    /// state the snapshot leaves out is the initial one.
    pub fn observe_snapshot<'a, M>(
        &self,
        models_apart: bool,
        backends: impl IntoIterator<Item = (&'a str, FleetCooldown, M)>,
        serves: impl Fn(&str, &str) -> bool,
        policy: &CooldownPolicy,
        now: Instant,
    ) where
        M: IntoIterator<Item = ModelCooldown<'a>>,
    {
        self.models_together
            .store(!models_apart, std::sync::atomic::Ordering::Relaxed);
        let mut entries = self.lock();
        let mut seen = HashSet::new();
        for (id, fleet, models) in backends {
            seen.insert(id);
            let cooling = entries.entry(id.to_owned()).or_default();
            cooling.backend.observe(fleet, policy, now);
            if !models_apart {
                // A control plane keeping no models' states (one rolled back to): nothing it
                // would ever confirm, and its cooldowns are the backends'.
                cooling.models.clear();
            }
            let mut shown = HashSet::new();
            for (model, fleet) in models {
                shown.insert(model);
                cooling
                    .models
                    .entry(model.to_owned())
                    .or_default()
                    .observe(fleet, policy, now);
            }
            for (model, entry) in &mut cooling.models {
                if !shown.contains(model.as_str()) {
                    entry.observe(FleetCooldown::default(), policy, now);
                }
            }
            cooling
                .models
                .retain(|model, entry| !entry.is_initial() && serves(id, model));
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
    const LIMITED: Outcome = Outcome::RateLimited {
        retry_after: None,
        scope: Scope::Backend,
    };

    fn later(now: Now, d: Duration) -> Now {
        Now {
            instant: now.instant + d,
            wall: now.wall + d,
        }
    }

    /// The time left of the cooldown at `now`, zero when none runs.
    fn left(tracker: &CooldownTracker, now: Now) -> Duration {
        match tracker.check("b", "", now.instant) {
            Ok(_) => Duration::ZERO,
            Err(until) => until - now.instant,
        }
    }

    fn basis(tracker: &CooldownTracker, now: Now) -> Basis {
        tracker.check("b", "", now.instant).unwrap()
    }

    const FIRST: Basis = Basis {
        backend: At {
            epoch: 0,
            position: 0,
        },
        model: At {
            epoch: 0,
            position: 0,
        },
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
                .record("b", "", basis(&tracker, now), &POLICY, LIMITED, now)
                .unwrap();
            assert_eq!(ev.kind, BackendEventKind::RateLimited as i32);
            assert_eq!(ev.consecutive_failures, streak);
            assert_eq!(left(&tracker, now), Duration::from_secs(expected));
            now = later(now, Duration::from_secs(expected));
            assert_eq!(left(&tracker, now), Duration::ZERO);
        }
        let ev = tracker
            .record(
                "b",
                "",
                basis(&tracker, now),
                &POLICY,
                Outcome::Success,
                now,
            )
            .unwrap();
        assert_eq!(ev.kind, BackendEventKind::Recovered as i32);
        assert_eq!(ev.cooldown_until, None);
        // Off the streak, successes say nothing.
        let b = basis(&tracker, now);
        assert!(
            tracker
                .record("b", "", b, &POLICY, Outcome::Success, now)
                .is_none()
        );
        tracker.record("b", "", b, &POLICY, LIMITED, now).unwrap();
        assert_eq!(left(&tracker, now), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_a_floor_and_travels_with_the_events_age() {
        let tracker = CooldownTracker::new();
        let now = Now::read();
        let thirty = Outcome::RateLimited {
            retry_after: Some(Duration::from_secs(30)),
            scope: Scope::Backend,
        };
        let ev = tracker
            .record("b", "", FIRST, &POLICY, thirty, now)
            .unwrap();
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
                .record("b", "", sent_at, &POLICY, LIMITED, now)
                .is_some()
        );
        for _ in 0..9 {
            assert!(
                tracker
                    .record("b", "", sent_at, &POLICY, LIMITED, now)
                    .is_none()
            );
            assert!(
                tracker
                    .record(
                        "b",
                        "",
                        sent_at,
                        &POLICY,
                        Outcome::Failure {
                            retry_after: None,
                            scope: Scope::Backend
                        },
                        now
                    )
                    .is_none()
            );
            // Nor does a success that was on its way: it says nothing about after the 429.
            assert!(
                tracker
                    .record("b", "", sent_at, &POLICY, Outcome::Success, now)
                    .is_none()
            );
        }
        assert_eq!(left(&tracker, now), Duration::from_secs(1));
        assert_eq!(tracker.view("b").streak, 1);
        // A longer Retry-After from one of them still lengthens it.
        let ev = tracker
            .record(
                "b",
                "",
                sent_at,
                &POLICY,
                Outcome::RateLimited {
                    retry_after: Some(Duration::from_secs(10)),
                    scope: Scope::Backend,
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
                    .record(
                        "b",
                        "",
                        b,
                        &POLICY,
                        Outcome::Failure {
                            retry_after: None,
                            scope: Scope::Backend
                        },
                        now
                    )
                    .is_none()
            );
        }
        assert_eq!(left(&tracker, now), Duration::ZERO);
        let ev = tracker
            .record(
                "b",
                "",
                basis(&tracker, now),
                &POLICY,
                Outcome::Failure {
                    retry_after: None,
                    scope: Scope::Backend,
                },
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
                "",
                basis(&tracker, now),
                &POLICY,
                Outcome::Failure {
                    retry_after: None,
                    scope: Scope::Backend,
                },
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
                        "",
                        FIRST,
                        &disabled,
                        Outcome::Failure {
                            retry_after: None,
                            scope: Scope::Backend
                        },
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
            scope: Scope::Backend,
        };
        for _ in 0..2 {
            let b = basis(&tracker, now);
            assert!(
                tracker
                    .record("b", "", b, &POLICY, unavailable, now)
                    .is_none()
            );
        }
        let ev = tracker
            .record("b", "", basis(&tracker, now), &POLICY, unavailable, now)
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
        let ev = tracker
            .record("b", "", FIRST, &POLICY, LIMITED, now)
            .unwrap();
        // Built before the control plane got the event: the local cooldown stays.
        tracker.observe_snapshot(true, [("b", fleet, [])], |_, _| true, &POLICY, now.instant);
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
        tracker.observe_snapshot(
            true,
            [("b", fleet, [])],
            |_, _| true,
            &POLICY,
            other.instant,
        );
        assert_eq!(tracker.view("b"), fleet, "the control plane's decision");
        assert!(tracker.unacknowledged_events(other.instant).is_empty());
        // An admin reset: the next snapshot has a new epoch and no cooldown.
        fleet.reset(other.instant);
        tracker.observe_snapshot(
            true,
            [("b", fleet, [])],
            |_, _| true,
            &POLICY,
            other.instant,
        );
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
                    .record("b", "", basis(&tracker, now), &POLICY, LIMITED, now)
                    .unwrap(),
            );
            assert_eq!(left(&tracker, now), Duration::from_secs(expected));
            now = later(now, Duration::from_secs(expected));
        }
        let positions: Vec<u32> = events.iter().map(|e| e.cooldown_position).collect();
        assert_eq!(positions, [0, 1, 2]);
        // Back in touch: the first two arrive, then a snapshot.
        control_plane(&mut fleet, &events[..2], now);
        tracker.observe_snapshot(true, [("b", fleet, [])], |_, _| true, &POLICY, now.instant);
        assert_eq!(tracker.view("b").streak, 3, "the third is still pending");
        assert_eq!(tracker.unacknowledged_events(now.instant).len(), 1);
        control_plane(&mut fleet, &events[2..], now);
        tracker.observe_snapshot(true, [("b", fleet, [])], |_, _| true, &POLICY, now.instant);
        assert_eq!(tracker.view("b"), fleet);
        assert_eq!(fleet.streak, 3);
        assert!(tracker.unacknowledged_events(now.instant).is_empty());
    }

    /// A replica cut off through more cooldowns than it holds unconfirmed changes for keeps
    /// cooling the backend by its own count but reports no more; the reports it held reach the
    /// control plane, and once a snapshot shows them it reports again.
    #[tokio::test(start_paused = true)]
    async fn a_replica_cut_off_past_its_unconfirmed_changes_cools_down_but_reports_no_more() {
        let tracker = CooldownTracker::new();
        let mut now = Now::read();
        let mut events = Vec::new();
        let mut unreported = 0;
        for _ in 0..MAX_PENDING_CHANGES + 10 {
            match tracker.record("b", "", basis(&tracker, now), &POLICY, LIMITED, now) {
                Some(event) => events.push(event),
                None => unreported += 1,
            }
            // Cooling down by its own count all along, up to the cap.
            assert!(left(&tracker, now) > Duration::ZERO);
            now = later(now, left(&tracker, now));
        }
        assert_eq!((events.len(), unreported), (MAX_PENDING_CHANGES, 10));
        assert_eq!(tracker.view("b").streak as usize, MAX_PENDING_CHANGES + 10);
        assert_eq!(
            tracker.unacknowledged_events(now.instant).len(),
            MAX_PENDING_CHANGES
        );
        // Back in touch: what it held goes in, and the snapshot that shows it frees it.
        let mut fleet = FleetCooldown::default();
        control_plane(&mut fleet, &events, now);
        assert_eq!(fleet.streak as usize, MAX_PENDING_CHANGES);
        tracker.observe_snapshot(true, [("b", fleet, [])], |_, _| true, &POLICY, now.instant);
        assert!(tracker.unacknowledged_events(now.instant).is_empty());
        assert_eq!(tracker.view("b"), fleet);
        now = later(now, left(&tracker, now));
        let next = tracker
            .record("b", "", basis(&tracker, now), &POLICY, LIMITED, now)
            .expect("reported again once a snapshot came");
        assert_eq!(next.consecutive_failures as usize, MAX_PENDING_CHANGES + 1);
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
            reset_at: None,
            run: Some((Whose::Another, 6)),
        };
        tracker.observe_snapshot(true, [("b", fleet, [])], |_, _| true, &POLICY, now.instant);
        assert_eq!(
            tracker.check("b", "", now.instant),
            Err(fleet.until.unwrap())
        );
        let after = later(now, Duration::from_secs(9));
        let ev = tracker
            .record("b", "", basis(&tracker, after), &POLICY, LIMITED, after)
            .unwrap();
        assert_eq!(ev.cooldown_epoch, Some(7));
        assert_eq!(ev.consecutive_failures, 5);
        assert_eq!(left(&tracker, after), Duration::from_secs(16));
    }

    /// A call that names no model (on a stored Responses object): a failure of its model
    /// (a thinking model's silence on a streamed retrieve) is no one's and cools nothing,
    /// however many; its 429 cools the backend, as a 429 of a call of no one model does.
    #[tokio::test(start_paused = true)]
    async fn a_model_failure_of_a_call_naming_no_model_cools_nothing() {
        let tracker = CooldownTracker::new();
        let now = Now::read();
        let silent = Outcome::Failure {
            retry_after: None,
            scope: Scope::Model,
        };
        for _ in 0..POLICY.failure_threshold + 2 {
            let basis = tracker.check("b", "", now.instant).unwrap();
            assert!(
                tracker
                    .record_at("b", "", basis, &POLICY, silent, || now)
                    .is_empty()
            );
        }
        assert!(tracker.check("b", "", now.instant).is_ok());
        assert_eq!(tracker.view("b"), FleetCooldown::default());
        let limited = Outcome::RateLimited {
            retry_after: Some(Duration::from_secs(5)),
            scope: Scope::Model,
        };
        let basis = tracker.check("b", "", now.instant).unwrap();
        tracker
            .record("b", "", basis, &POLICY, limited, now)
            .unwrap();
        assert!(tracker.check("b", "m", now.instant).is_err());
    }

    /// A model's 429 cools that model alone at the backend; a success for it ends both its
    /// streak and the backend's; its state comes and goes with the snapshots as the
    /// backend's does, and its reports are told again after a reconnect.
    #[tokio::test(start_paused = true)]
    async fn a_models_cooldown_is_apart_from_its_backends() {
        let tracker = CooldownTracker::new();
        let now = Now::read();
        let of_model = Outcome::RateLimited {
            retry_after: Some(Duration::from_secs(30)),
            scope: Scope::Model,
        };
        let basis = tracker.check("b", "m", now.instant).unwrap();
        let ev = tracker
            .record("b", "m", basis, &POLICY, of_model, now)
            .unwrap();
        assert_eq!((ev.backend_id.as_str(), ev.model.as_str()), ("b", "m"));
        assert_eq!(
            tracker.check("b", "m", now.instant),
            Err(now.instant + Duration::from_secs(30))
        );
        // The backend's other models, and calls of no one model, are served.
        assert!(tracker.check("b", "n", now.instant).is_ok());
        assert!(tracker.check("b", "", now.instant).is_ok());
        assert_eq!(tracker.view("b"), FleetCooldown::default());
        assert_eq!(tracker.model_view("b", "m").streak, 1);
        let resent = tracker.unacknowledged_events(now.instant);
        assert_eq!(resent.len(), 1);
        assert_eq!(resent[0].model, "m");

        // The backend fails too: on its own streak, as before.
        let failing = Outcome::RateLimited {
            retry_after: None,
            scope: Scope::Backend,
        };
        let then = later(now, Duration::from_secs(31));
        let basis = tracker.check("b", "m", then.instant).unwrap();
        tracker
            .record("b", "m", basis, &POLICY, failing, then)
            .unwrap();
        assert_eq!(tracker.view("b").streak, 1);
        assert!(tracker.check("b", "n", then.instant).is_err());
        // A success for the model, after both cooldowns: both streaks end, one event each.
        let after = later(then, Duration::from_secs(2));
        let basis = tracker.check("b", "m", after.instant).unwrap();
        let events = tracker.record_at("b", "m", basis, &POLICY, Outcome::Success, || after);
        let ended: Vec<(&str, i32)> = events.iter().map(|e| (e.model.as_str(), e.kind)).collect();
        assert_eq!(
            ended,
            [
                ("", BackendEventKind::Recovered as i32),
                ("m", BackendEventKind::Recovered as i32)
            ]
        );

        // The control plane's state of the model, from a snapshot: taken as the backend's is.
        let fleet = FleetCooldown {
            epoch: 9,
            streak: 3,
            until: Some(after.instant + Duration::from_secs(40)),
            since: None,
            reset_at: None,
            run: Some((Whose::Another, 8)),
        };
        tracker.observe_snapshot(
            true,
            [("b", FleetCooldown::default(), [("m", fleet)])],
            |_, _| true,
            &POLICY,
            after.instant,
        );
        assert_eq!(tracker.model_view("b", "m"), fleet);
        assert_eq!(
            tracker.check("b", "m", after.instant),
            Err(fleet.until.unwrap())
        );
        // Left out of a snapshot (a reset to the initial state, the model taken off the
        // backend): forgotten.
        tracker.observe_snapshot(
            true,
            [("b", FleetCooldown::default(), [])],
            |_, _| true,
            &POLICY,
            after.instant,
        );
        assert_eq!(tracker.model_view("b", "m"), FleetCooldown::default());
        assert!(tracker.check("b", "m", after.instant).is_ok());
    }

    /// Under a control plane that keeps no state per model (its snapshots do not say
    /// `model_cooldowns`), a model's 429 is the backend's, as that control plane applies it;
    /// and a model a backend no longer serves is forgotten with its reports, which the
    /// control plane drops too.
    #[tokio::test(start_paused = true)]
    async fn a_models_429_is_the_backends_under_an_older_control_plane() {
        let tracker = CooldownTracker::new();
        let now = Now::read();
        let of_model = Outcome::RateLimited {
            retry_after: None,
            scope: Scope::Model,
        };
        tracker.observe_snapshot(
            false,
            [("b", FleetCooldown::default(), [])],
            |_, _| true,
            &POLICY,
            now.instant,
        );
        let basis = tracker.check("b", "m", now.instant).unwrap();
        let ev = tracker
            .record("b", "m", basis, &POLICY, of_model, now)
            .unwrap();
        assert_eq!(ev.model, "");
        assert!(tracker.check("b", "n", now.instant).is_err());

        let tracker = CooldownTracker::new();
        let basis = tracker.check("b", "m", now.instant).unwrap();
        tracker
            .record("b", "m", basis, &POLICY, of_model, now)
            .unwrap();
        tracker.observe_snapshot(
            true,
            [("b", FleetCooldown::default(), [])],
            |_, model| model != "m",
            &POLICY,
            now.instant,
        );
        assert_eq!(tracker.model_view("b", "m"), FleetCooldown::default());
        assert!(tracker.unacknowledged_events(now.instant).is_empty());

        // Rolled back to a control plane that keeps no models' states: they are let go.
        let basis = tracker.check("b", "m", now.instant).unwrap();
        tracker
            .record("b", "m", basis, &POLICY, of_model, now)
            .unwrap();
        assert!(tracker.check("b", "m", now.instant).is_err());
        tracker.observe_snapshot(
            false,
            [("b", FleetCooldown::default(), [])],
            |_, _| true,
            &POLICY,
            now.instant,
        );
        assert!(tracker.check("b", "m", now.instant).is_ok());
        assert!(tracker.unacknowledged_events(now.instant).is_empty());
    }

    /// A stream's end is judged at the state its first event left, each of the backend's and
    /// the model's apart: the model cooling an instant after the first event (another
    /// request's 429) leaves the backend's state as the first event left it, so the stream
    /// breaking then still counts against the backend.
    #[tokio::test(start_paused = true)]
    async fn a_streams_end_is_judged_at_the_state_its_first_event_left() {
        let policy = CooldownPolicy {
            failure_threshold: 1,
            ..POLICY
        };
        let tracker = CooldownTracker::new();
        let start = Now::read();
        let limited = Outcome::RateLimited {
            retry_after: None,
            scope: Scope::Backend,
        };
        let basis = tracker.check("b", "m", start.instant).unwrap();
        tracker
            .record("b", "m", basis, &policy, limited, start)
            .unwrap();
        let now = later(start, Duration::from_secs(2));
        let before = tracker.check("b", "m", now.instant).unwrap();
        // The stream's first event ends the backend's streak ...
        let ended = tracker.record_at("b", "m", before, &policy, Outcome::Answering, || now);
        assert_eq!(ended.len(), 1);
        // ... and another request's 429 for the model cools the model.
        let of_model = Outcome::RateLimited {
            retry_after: None,
            scope: Scope::Model,
        };
        tracker
            .record("b", "m", before, &policy, of_model, now)
            .unwrap();
        assert!(tracker.check("b", "m", now.instant).is_err());
        // The stream breaks: the backend's failure, at the state its first event left.
        let at = tracker.restate("b", "m", before, now.instant);
        let broken = Outcome::Failure {
            retry_after: None,
            scope: Scope::Backend,
        };
        let event = tracker.record("b", "m", at, &policy, broken, now).unwrap();
        assert_eq!(event.kind, BackendEventKind::Failing as i32);
        assert!(tracker.check("b", "n", now.instant).is_err());
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
