//! Properties of the cooldown rules as the control plane applies them, for any sequence of
//! reports (current, stale or future epochs; with and without Retry-After; successes; resets).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use proptest::prelude::*;
use sluice_domain::cooldown::{
    Applied, CooldownPolicy, CooldownState, Kind, MAX_RETRY_AFTER, Report,
};

const POLICY: CooldownPolicy = CooldownPolicy {
    base: Duration::from_secs(1),
    cap: Duration::from_secs(60),
    failure_threshold: 2,
};

#[derive(Debug, Clone)]
enum Step {
    Report {
        kind: Kind,
        /// Which of three replicas reports.
        author: u8,
        /// 0: the current epoch; 1: continuing the last run (the author's, if it is); 2 and
        /// up: an older epoch, or a position off by one.
        staleness: u64,
        retry_after_ms: Option<u64>,
    },
    Reset,
}

fn step() -> impl Strategy<Value = Step> {
    let kind = prop_oneof![
        Just(Kind::RateLimited),
        Just(Kind::Failing),
        Just(Kind::Recovered)
    ];
    let retry_after = prop_oneof![
        3 => Just(None),
        2 => (0u64..120_000).prop_map(Some),
        1 => Just(Some(u64::MAX / 2)),
    ];
    prop_oneof![
        20 => (kind, 0u8..3, prop_oneof![3 => Just(0u64), 2 => Just(1u64), 2 => 2u64..5], retry_after).prop_map(
            |(kind, author, staleness, retry_after_ms)| Step::Report { kind, author, staleness, retry_after_ms }
        ),
        1 => Just(Step::Reset),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn the_rules_hold_for_any_sequence_of_reports(
        steps in prop::collection::vec((step(), 0u64..5_000), 1..80)
    ) {
        let mut state = CooldownState::<Duration, u8>::default();
        let mut now = Duration::from_secs(1_000);
        // Counted overloads since the last success or reset: what the streak must be.
        let mut counted_since_success = 0u32;
        for (step, dt_ms) in steps {
            now += Duration::from_millis(dt_ms);
            let before = state;
            // Whether this step changed the streak's hands: a count, an end, a reset.
            let transition = match step {
                Step::Reset => {
                    state.reset(now);
                    counted_since_success = 0;
                    prop_assert_eq!(state.epoch, before.epoch + 1);
                    prop_assert_eq!(state.cooling_until(now), None);
                    true
                }
                Step::Report { kind, author, staleness, retry_after_ms } => {
                    let (basis, position) = match (staleness, before.run) {
                        (0, _) => (before.epoch, 0),
                        (1, Some((_, basis))) => (basis, (before.epoch - basis) as u32),
                        (1, None) => (before.epoch, 1),
                        (n, _) if n % 2 == 0 => (before.epoch.saturating_sub(n / 2), 0),
                        (n, _) => (before.epoch.saturating_sub(n / 2), (n / 2) as u32 + 1),
                    };
                    let retry_after = retry_after_ms.map(Duration::from_millis);
                    let report = Report { kind, basis, position, retry_after };
                    let current = basis + u64::from(position) == before.epoch
                        && (position == 0 || before.run == Some((author, basis)));
                    prop_assert_eq!(current, before.is_current(&report, &author));
                    let applied = state.apply(&report, &author, &POLICY, now);
                    let wanted = retry_after.map(|r| r.min(MAX_RETRY_AFTER));
                    match applied {
                        Applied::Counted { length } => {
                            prop_assert!(current && kind != Kind::Recovered);
                            counted_since_success += 1;
                            // The defined function of the streak...
                            prop_assert_eq!(length, POLICY.length(state.streak, retry_after));
                            let backoff = POLICY.base
                                .saturating_mul(1u32.checked_shl(state.streak - 1).unwrap_or(u32::MAX))
                                .min(POLICY.cap);
                            prop_assert_eq!(length, backoff.max(wanted.unwrap_or_default()));
                            // ...never past the cap unless the upstream asked for longer.
                            prop_assert!(length <= POLICY.cap.max(wanted.unwrap_or_default()));
                            prop_assert!(state.cooling_until(now).unwrap() >= now + length);
                        }
                        Applied::Absorbed { .. } => {
                            prop_assert!(!current && kind != Kind::Recovered);
                        }
                        Applied::Ended => {
                            prop_assert!(current && kind == Kind::Recovered && before.streak > 0);
                            counted_since_success = 0;
                        }
                        Applied::Ignored => {
                            prop_assert!(kind == Kind::Recovered);
                            prop_assert!(!current || before.streak == 0);
                            prop_assert_eq!(state, before);
                        }
                    }
                    // A success at the current epoch always ends the streak.
                    if kind == Kind::Recovered && current {
                        prop_assert_eq!(state.streak, 0);
                    }
                    // Never shorter than the Retry-After (a 429's wait, however it counted).
                    if let Some(wait) = wanted.filter(|w| !w.is_zero() && kind != Kind::Recovered) {
                        prop_assert!(state.cooling_until(now).unwrap() >= now + wait);
                    }
                    // A report never shortens a running cooldown.
                    if let Some(until) = before.cooling_until(now) {
                        prop_assert!(state.until.unwrap() >= until);
                    }
                    let transition = matches!(applied, Applied::Counted { .. } | Applied::Ended);
                    if transition {
                        // The author's next report continues from here; no one else's does.
                        prop_assert_eq!(state.run, Some((author, basis)));
                    }
                    transition
                }
            };
            prop_assert_eq!(state.streak, counted_since_success);
            // The epoch moves on by one with each count, end or reset, and never goes back.
            prop_assert_eq!(state.epoch, before.epoch + u64::from(transition));
        }
    }
}
