//! Budget periods: when a key's spend starts again from zero. Periods start at 00:00 UTC
//! by the control plane's clock (a day, a week from Monday, a month from the 1st), or never
//! (the key's lifetime). Spend is stored per UTC day, so a period's spend is the sum over
//! its days whichever period the key has now.
//!
//! Tests and benchmarks can make periods short ([`shorten_periods`], the hidden
//! `--budget-period-length` of `sluice-control`), so that a budget resets many times a run.

use std::sync::atomic::{AtomicI64, Ordering};

use chrono::{DateTime, Datelike as _, Days, Months, NaiveDate};
use sluice_proto::v1 as pb;

use crate::validation::ValidationError;

const DAY_MS: i64 = 86_400_000;

/// The length of every periodic budget's period and of a spend row, when shortened; 0 (the
/// default) keeps UTC days, weeks and months.
static SHORT_PERIOD_MS: AtomicI64 = AtomicI64::new(0);

/// Makes every daily, weekly and monthly period `length_ms` long instead (aligned on the Unix
/// epoch), for the rest of the process: spend is then kept per such period and the reset
/// comes at the end of each. For tests and benchmarks only (the hidden
/// `--budget-period-length`, set once at start): a production control plane started with it
/// would reset every budget that often, so it warns at every start.
pub fn shorten_periods(length_ms: i64) {
    SHORT_PERIOD_MS.store(length_ms.max(0), Ordering::Relaxed);
}

fn short_period() -> Option<i64> {
    Some(SHORT_PERIOD_MS.load(Ordering::Relaxed)).filter(|&len| len > 0)
}

/// The `length`-long slot holding `at_ms`: its start and end.
fn slot_of(at_ms: i64, length: i64) -> (i64, i64) {
    let start = at_ms.div_euclid(length).saturating_mul(length);
    (start, start.saturating_add(length))
}

/// When the next period of any periodic budget starts after `now_ms`: the next UTC midnight
/// (the end of a shortened period when periods are short).
pub fn next_reset(now_ms: i64) -> i64 {
    next_reset_with(now_ms, short_period())
}

fn next_reset_with(now_ms: i64, short: Option<i64>) -> i64 {
    slot_of(now_ms, short.unwrap_or(DAY_MS)).1
}

/// When a key's spend starts again from zero.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BudgetPeriod {
    /// Never: the budget is for the key's lifetime.
    #[default]
    Lifetime,
    Daily,
    Weekly,
    Monthly,
}

impl BudgetPeriod {
    pub fn from_proto(value: i32) -> Result<Self, ValidationError> {
        match pb::BudgetPeriod::try_from(value) {
            Ok(pb::BudgetPeriod::Unspecified) => Ok(Self::Lifetime),
            Ok(pb::BudgetPeriod::Daily) => Ok(Self::Daily),
            Ok(pb::BudgetPeriod::Weekly) => Ok(Self::Weekly),
            Ok(pb::BudgetPeriod::Monthly) => Ok(Self::Monthly),
            Err(_) => Err(ValidationError::new(
                "budget_period",
                format!("unknown budget period {value}"),
            )),
        }
    }

    pub fn to_proto(self) -> pb::BudgetPeriod {
        match self {
            Self::Lifetime => pb::BudgetPeriod::Unspecified,
            Self::Daily => pb::BudgetPeriod::Daily,
            Self::Weekly => pb::BudgetPeriod::Weekly,
            Self::Monthly => pb::BudgetPeriod::Monthly,
        }
    }

    /// As stored in `client_keys.budget_period`.
    pub fn to_db(self) -> i64 {
        self.to_proto() as i64
    }

    pub fn from_db(value: i64) -> Self {
        i32::try_from(value)
            .ok()
            .and_then(|v| Self::from_proto(v).ok())
            .unwrap_or_default()
    }

    /// The period holding `at_ms` (Unix ms): its start and its end (the next reset), both
    /// at 00:00 UTC; `None` for the key's lifetime, which has neither.
    pub fn period_of(self, at_ms: i64) -> Option<(i64, i64)> {
        self.period_with(at_ms, short_period())
    }

    /// [`Self::period_of`] with periods `short` long when given.
    fn period_with(self, at_ms: i64, short: Option<i64>) -> Option<(i64, i64)> {
        if let Some(length) = short {
            return (self != Self::Lifetime).then(|| slot_of(at_ms, length));
        }
        let day = DateTime::from_timestamp_millis(at_ms)?.date_naive();
        let (start, end) = match self {
            Self::Lifetime => return None,
            Self::Daily => (day, day.checked_add_days(Days::new(1))?),
            Self::Weekly => {
                let monday =
                    day.checked_sub_days(Days::new(day.weekday().num_days_from_monday().into()))?;
                (monday, monday.checked_add_days(Days::new(7))?)
            }
            Self::Monthly => {
                let first = day.with_day(1)?;
                (first, first.checked_add_months(Months::new(1))?)
            }
        };
        Some((midnight_ms(start), midnight_ms(end)))
    }
}

fn midnight_ms(day: NaiveDate) -> i64 {
    day.and_time(chrono::NaiveTime::MIN)
        .and_utc()
        .timestamp_millis()
}

/// The UTC day (its 00:00, Unix ms) holding `at_ms`: the row of `key_spend` a cost goes to
/// (the shortened period holding it, when periods are short).
pub fn day_start(at_ms: i64) -> i64 {
    slot_of(at_ms, short_period().unwrap_or(DAY_MS)).0
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn ms(rfc3339: &str) -> i64 {
        DateTime::parse_from_rfc3339(rfc3339)
            .unwrap()
            .timestamp_millis()
    }

    #[test]
    fn periods_start_and_end_at_utc_midnight() {
        // Wednesday 2027-03-31, late in the day.
        let at = ms("2027-03-31T23:59:59.999Z");
        assert_eq!(
            BudgetPeriod::Daily.period_of(at),
            Some((ms("2027-03-31T00:00:00Z"), ms("2027-04-01T00:00:00Z")))
        );
        assert_eq!(
            BudgetPeriod::Weekly.period_of(at),
            Some((ms("2027-03-29T00:00:00Z"), ms("2027-04-05T00:00:00Z")))
        );
        assert_eq!(
            BudgetPeriod::Monthly.period_of(at),
            Some((ms("2027-03-01T00:00:00Z"), ms("2027-04-01T00:00:00Z")))
        );
        // The boundary belongs to the new period.
        let boundary = ms("2027-04-01T00:00:00Z");
        assert_eq!(
            BudgetPeriod::Monthly.period_of(boundary).unwrap().0,
            boundary
        );
        // December rolls into the next year; a Monday is its own week's start.
        assert_eq!(
            BudgetPeriod::Monthly.period_of(ms("2027-12-15T12:00:00Z")),
            Some((ms("2027-12-01T00:00:00Z"), ms("2028-01-01T00:00:00Z")))
        );
        let monday = ms("2027-03-29T00:00:00Z");
        assert_eq!(BudgetPeriod::Weekly.period_of(monday).unwrap().0, monday);
        assert_eq!(BudgetPeriod::Lifetime.period_of(at), None);
        assert_eq!(day_start(at), ms("2027-03-31T00:00:00Z"));
    }

    #[test]
    fn short_periods_are_slots_of_their_length_and_reset_at_their_end() {
        let at = ms("2027-03-31T23:59:59.500Z");
        let short = Some(2_000);
        for period in [
            BudgetPeriod::Daily,
            BudgetPeriod::Weekly,
            BudgetPeriod::Monthly,
        ] {
            assert_eq!(
                period.period_with(at, short),
                Some((at - 1_500, at + 500)),
                "{period:?}"
            );
        }
        assert_eq!(BudgetPeriod::Lifetime.period_with(at, short), None);
        assert_eq!(next_reset_with(at, short), ms("2027-04-01T00:00:00Z"));
        assert_eq!(next_reset_with(at - 1_500, short), at + 500);
        // Not shortened: the next UTC midnight; a midnight itself starts a new day.
        assert_eq!(next_reset_with(at, None), ms("2027-04-01T00:00:00Z"));
        let midnight = ms("2027-04-01T00:00:00Z");
        assert_eq!(next_reset_with(midnight, None), midnight + DAY_MS);
    }

    #[test]
    fn periods_round_trip_through_proto_and_db() {
        for period in [
            BudgetPeriod::Lifetime,
            BudgetPeriod::Daily,
            BudgetPeriod::Weekly,
            BudgetPeriod::Monthly,
        ] {
            assert_eq!(
                BudgetPeriod::from_proto(period.to_proto() as i32).unwrap(),
                period
            );
            assert_eq!(BudgetPeriod::from_db(period.to_db()), period);
        }
        let err = BudgetPeriod::from_proto(9).unwrap_err();
        assert!(err.to_string().contains("budget_period"), "{err}");
    }
}
