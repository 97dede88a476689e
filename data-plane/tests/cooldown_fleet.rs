//! The cooldown state machine across a fleet, by property: replicas (the real
//! `CooldownTracker`) send requests for one model, see 429s, failures, successes and answers
//! begun in any interleaving, each counted against the backend or the model (as a plain 429
//! cools the model alone and a 5xx the backend),
//! report to a control plane (the real rules of `sluice_domain::cooldown`) that receives the
//! reports late, twice (after reconnects) or not before the next snapshot, and take its
//! snapshots whenever. Checked on every step and once everything is delivered:
//! - every cooldown the control plane starts is the defined function of the streak, never
//!   past the cap unless the upstream's Retry-After asked for longer, never shorter than it;
//! - a replica never cools a backend for less than the Retry-After it was told;
//! - once every report is delivered and every replica holds the newest snapshot, every
//!   replica agrees with the control plane (epoch, streak, end of the cooldown) on the
//!   backend's state and on the model's, and a success the control plane accepted last has
//!   ended that streak everywhere.

use std::time::{Duration, SystemTime};

use proptest::prelude::*;
use sluice_domain::cooldown::{
    Applied, CooldownPolicy, CooldownState, MAX_RETRY_AFTER, Report, event_age,
};
use sluice_proto::v1::BackendEvent;
use sluice_proxy::clock::Now;
use sluice_proxy::cooldown::{Basis, CooldownTracker, FleetCooldown, Outcome, Scope, Whose};
use tokio::time::Instant;

const POLICY: CooldownPolicy = CooldownPolicy {
    base: Duration::from_secs(1),
    cap: Duration::from_secs(30),
    failure_threshold: 2,
};
const B: &str = "backend";
/// The model every request is for.
const M: &str = "m";

#[derive(Debug, Clone)]
enum Op {
    /// Replica `r` sends a request, if the backend is not cooling down there.
    Send {
        r: usize,
    },
    /// The `i`-th request in flight at replica `r` completes.
    Complete {
        r: usize,
        i: usize,
        outcome: Outcome,
    },
    /// The control plane receives replica `r`'s next `n` reports.
    Deliver {
        r: usize,
        n: usize,
    },
    /// Replica `r` takes the control plane's current state.
    Snapshot {
        r: usize,
    },
    /// Replica `r` reconnects and sends its unconfirmed reports again.
    Reconnect {
        r: usize,
    },
    /// An admin resets the cooldown: the backend's and its models'.
    Reset,
    /// An admin resets the model's cooldown alone.
    ResetModel,
    Advance {
        ms: u64,
    },
}

fn scope() -> impl Strategy<Value = Scope> {
    prop_oneof![Just(Scope::Backend), Just(Scope::Model)]
}

fn outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        4 => Just(Outcome::Success),
        2 => Just(Outcome::Answering),
        3 => scope().prop_map(|scope| Outcome::RateLimited { retry_after: None, scope }),
        2 => (0u64..40_000, scope()).prop_map(|(ms, scope)| Outcome::RateLimited { retry_after: Some(Duration::from_millis(ms)), scope }),
        2 => scope().prop_map(|scope| Outcome::Failure { retry_after: None, scope }),
        1 => (0u64..40_000, scope()).prop_map(|(ms, scope)| Outcome::Failure { retry_after: Some(Duration::from_millis(ms)), scope }),
    ]
}

fn op(replicas: usize) -> impl Strategy<Value = Op> {
    let r = 0..replicas;
    prop_oneof![
        6 => r.clone().prop_map(|r| Op::Send { r }),
        6 => (r.clone(), 0usize..8, outcome()).prop_map(|(r, i, outcome)| Op::Complete { r, i, outcome }),
        4 => (r.clone(), 1usize..4).prop_map(|(r, n)| Op::Deliver { r, n }),
        3 => r.clone().prop_map(|r| Op::Snapshot { r }),
        1 => r.prop_map(|r| Op::Reconnect { r }),
        1 => Just(Op::Reset),
        1 => Just(Op::ResetModel),
        4 => (0u64..20_000).prop_map(|ms| Op::Advance { ms }),
    ]
}

struct Replica {
    tracker: CooldownTracker,
    /// Bases of the requests in flight.
    in_flight: Vec<Basis>,
    /// Reports not yet received by the control plane, in order.
    outbox: Vec<BackendEvent>,
}

/// One state the control plane keeps: the backend's, or the model's at it.
#[derive(Default)]
struct Kept {
    /// Replicas named by index.
    state: CooldownState<Instant, usize>,
    /// Whether the control plane's last change of the streak was a success ending it.
    last_was_end: bool,
    /// When an admin last reset it.
    reset_at: Option<Instant>,
}

impl Kept {
    fn reset(&mut self, now: Instant) {
        self.state.reset(now);
        self.reset_at = Some(now);
        self.last_was_end = false;
    }

    /// What a snapshot sent now carries, as replica `r` turns it into its own deadline.
    fn sent(&self, r: usize, now: Instant) -> FleetCooldown {
        FleetCooldown {
            epoch: self.state.epoch,
            streak: self.state.streak,
            until: self.state.cooling_until(now),
            since: None,
            reset_at: None,
            run: self
                .state
                .run
                .map(|(by, basis)| (if by == r { Whose::Mine } else { Whose::Another }, basis)),
        }
    }
}

struct Fleet {
    start: Instant,
    elapsed: Duration,
    /// The backend's state.
    backend: Kept,
    /// The model's state at the backend.
    model: Kept,
    replicas: Vec<Replica>,
}

impl Fleet {
    fn new(n: usize) -> Self {
        Self {
            start: Instant::now(),
            elapsed: Duration::ZERO,
            backend: Kept::default(),
            model: Kept::default(),
            replicas: (0..n)
                .map(|_| Replica {
                    tracker: CooldownTracker::new(),
                    in_flight: Vec::new(),
                    outbox: Vec::new(),
                })
                .collect(),
        }
    }

    fn now(&self) -> Now {
        Now {
            instant: self.start + self.elapsed,
            wall: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000) + self.elapsed,
        }
    }

    /// Replica `r` takes the control plane's current states (a model's is sent only once it
    /// differs from the initial one, as the control plane sends it).
    fn observe(&self, r: usize) {
        let now = self.now().instant;
        let model =
            (self.model.state != CooldownState::default()).then(|| (M, self.model.sent(r, now)));
        self.replicas[r].tracker.observe_snapshot(
            true,
            [(B, self.backend.sent(r, now), model)],
            |_, _| true,
            &POLICY,
            now,
        );
    }

    fn deliver(&mut self, r: usize, n: usize) -> Result<(), TestCaseError> {
        let now = self.now().instant;
        let n = n.min(self.replicas[r].outbox.len());
        for event in self.replicas[r].outbox.drain(..n).collect::<Vec<_>>() {
            let report = Report::try_from(&event).unwrap();
            let at = now - event_age(&event);
            let kept = match event.model.as_str() {
                "" => &mut self.backend,
                _ => &mut self.model,
            };
            let applied = kept.state.apply(&report, &r, &POLICY, at);
            if let Applied::Counted { length } = applied {
                let wanted = report.retry_after.unwrap_or_default().min(MAX_RETRY_AFTER);
                prop_assert_eq!(length, POLICY.length(kept.state.streak, report.retry_after));
                prop_assert!(length <= POLICY.cap.max(wanted));
            }
            // Every Retry-After is honoured, but a 429's seen before an admin's reset (the
            // reset ended what it asked for).
            if let Some(wait) = report.retry_after.filter(|w| !w.is_zero())
                && kept.reset_at.is_none_or(|reset| at >= reset)
            {
                prop_assert!(kept.state.until.unwrap() >= at + wait);
            }
            match applied {
                Applied::Counted { .. } => kept.last_was_end = false,
                Applied::Ended => {
                    kept.last_was_end = true;
                    prop_assert_eq!(kept.state.streak, 0);
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn run(&mut self, op: Op) -> Result<(), TestCaseError> {
        let now = self.now();
        match op {
            Op::Send { r } => {
                if let Ok(basis) = self.replicas[r].tracker.check(B, M, now.instant) {
                    self.replicas[r].in_flight.push(basis);
                }
            }
            Op::Complete { r, i, outcome } => {
                let replica = &mut self.replicas[r];
                if replica.in_flight.is_empty() {
                    return Ok(());
                }
                let basis = replica.in_flight.remove(i % replica.in_flight.len());
                let before = replica.tracker.view(B);
                let current = replica.tracker.check(B, M, now.instant) == Ok(basis);
                let events = replica
                    .tracker
                    .record_at(B, M, basis, &POLICY, outcome, || now);
                if outcome == Outcome::Success && current && before.streak > 0 {
                    // A success on a streak ends it here at once, and is reported.
                    prop_assert_eq!(replica.tracker.view(B).streak, 0);
                    prop_assert!(events.iter().any(|e| e.model.is_empty()));
                }
                replica.outbox.extend(events);
                if let Outcome::RateLimited {
                    retry_after: Some(wait),
                    ..
                } = outcome
                    && !wait.is_zero()
                {
                    let until = replica.tracker.check(B, M, now.instant).unwrap_err();
                    prop_assert!(
                        until >= now.instant + wait,
                        "a replica honours its Retry-After"
                    );
                }
            }
            Op::Deliver { r, n } => self.deliver(r, n)?,
            Op::Snapshot { r } => self.observe(r),
            Op::Reconnect { r } => {
                let again = self.replicas[r].tracker.unacknowledged_events(now.instant);
                self.replicas[r].outbox.extend(again);
            }
            Op::Reset => {
                self.backend.reset(now.instant);
                self.model.reset(now.instant);
            }
            Op::ResetModel => self.model.reset(now.instant),
            Op::Advance { ms } => self.elapsed += Duration::from_millis(ms),
        }
        Ok(())
    }

    /// Delivers everything, then sends every replica the newest snapshot.
    fn settle(&mut self) -> Result<(), TestCaseError> {
        for r in 0..self.replicas.len() {
            self.deliver(r, usize::MAX)?;
        }
        for r in 0..self.replicas.len() {
            self.observe(r);
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn replicas_and_the_control_plane_agree_once_everything_is_delivered(
        (replicas, ops) in (1usize..5).prop_flat_map(|n| (Just(n), prop::collection::vec(op(n), 1..120)))
    ) {
        let mut fleet = Fleet::new(replicas);
        for op in ops {
            fleet.run(op)?;
        }
        fleet.settle()?;
        let now = fleet.now().instant;
        for (r, replica) in fleet.replicas.iter().enumerate() {
            for (view, kept, whose) in [
                (replica.tracker.view(B), &fleet.backend, "backend"),
                (replica.tracker.model_view(B, M), &fleet.model, "model"),
            ] {
                let control = &kept.state;
                prop_assert_eq!(
                    (view.epoch, view.streak, view.cooling_until(now)),
                    (control.epoch, control.streak, control.cooling_until(now)),
                    "replica {} disagrees with the control plane on the {}", r, whose
                );
                if kept.last_was_end {
                    prop_assert_eq!(view.streak, 0, "the success ended the {} streak everywhere", whose);
                }
            }
        }
    }
}

const LIMITED: Outcome = Outcome::RateLimited {
    retry_after: None,
    scope: Scope::Backend,
};

impl Fleet {
    /// Replica `r` sends one request and it completes with `outcome`.
    fn request(&mut self, r: usize, outcome: Outcome) {
        self.run(Op::Send { r }).unwrap();
        let i = self.replicas[r].in_flight.len() - 1;
        self.run(Op::Complete { r, i, outcome }).unwrap();
    }

    /// The control plane's cooldown is the first of a streak, and every replica knows.
    fn assert_first_of_a_streak(&mut self) {
        self.settle().unwrap();
        let now = self.now().instant;
        assert_eq!(self.backend.state.streak, 1);
        assert_eq!(
            self.backend.state.cooling_until(now),
            Some(now + POLICY.base)
        );
        for replica in &self.replicas {
            assert_eq!(replica.tracker.view(B).streak, 1);
        }
    }
}

#[test]
fn a_success_at_one_replica_ends_the_streak_at_every_replica() {
    let mut fleet = Fleet::new(3);
    for _ in 0..3 {
        fleet.request(0, LIMITED);
        fleet.settle().unwrap();
        fleet.run(Op::Advance { ms: 10_000 }).unwrap();
    }
    assert_eq!(fleet.replicas[2].tracker.view(B).streak, 3);
    fleet.request(1, Outcome::Success);
    fleet.settle().unwrap();
    for replica in &fleet.replicas {
        assert_eq!(replica.tracker.view(B).streak, 0);
    }
    // The next 429 anywhere starts over at the base.
    fleet.request(2, LIMITED);
    fleet.assert_first_of_a_streak();
}

#[test]
fn one_burst_seen_by_every_replica_counts_once() {
    let mut fleet = Fleet::new(4);
    for r in 0..4 {
        fleet.run(Op::Send { r }).unwrap();
    }
    for r in 0..4 {
        fleet
            .run(Op::Complete {
                r,
                i: 0,
                outcome: LIMITED,
            })
            .unwrap();
    }
    fleet.assert_first_of_a_streak();
}
