//! Budget periods: when a key's spend starts again from zero. Periods start at 00:00 UTC
//! by the control plane's clock (a day, a week from Monday, a month from the 1st), or never
//! (the key's lifetime). Spend is stored per UTC day, so a period's spend is the sum over
//! its days whichever period the key has now.

use chrono::{DateTime, Datelike as _, Days, Months, NaiveDate};
use sluice_proto::v1 as pb;

use crate::validation::ValidationError;

const DAY_MS: i64 = 86_400_000;

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

/// The UTC day (its 00:00, Unix ms) holding `at_ms`: the row of `key_spend` a cost goes to.
pub fn day_start(at_ms: i64) -> i64 {
    at_ms.div_euclid(DAY_MS) * DAY_MS
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
