//! What each client key spent, per UTC day: the sum of the `cost_nanos` of its usage
//! records, added by the transaction that ingests them, so counted exactly once like all
//! usage. A budget period's spend is the sum over the days it holds.

use std::collections::BTreeMap;

use rusqlite::{Connection, Transaction, params};

use super::{Reader, Store, StoreError};
use crate::client_key::ClientKey;

/// Nano-units as SQLite stores them, saturating at `i64::MAX`.
pub(crate) fn nanos_to_db(nanos: u64) -> i64 {
    i64::try_from(nanos).unwrap_or(i64::MAX)
}

/// Adds each (key id, UTC day) → nano-units to `key_spend`, saturating.
pub(super) fn add(
    tx: &Transaction<'_>,
    spent: &BTreeMap<(&str, i64), u64>,
) -> Result<(), StoreError> {
    let mut upsert = tx.prepare_cached(
        "INSERT INTO key_spend (client_key_id, day_start, spent_nanos) VALUES (?1, ?2, ?3)
         ON CONFLICT (client_key_id, day_start) DO UPDATE SET spent_nanos =
             CASE WHEN spent_nanos > 9223372036854775807 - excluded.spent_nanos
                  THEN 9223372036854775807 ELSE spent_nanos + excluded.spent_nanos END",
    )?;
    for (&(key, day), &nanos) in spent {
        if nanos > 0 {
            upsert.execute(params![key, day, nanos_to_db(nanos)])?;
        }
    }
    Ok(())
}

/// What `key` spent in its budget period holding `now_ms` (its lifetime for no period).
fn spent_in_period(conn: &Connection, key: &ClientKey, now_ms: i64) -> Result<u64, StoreError> {
    let since = key
        .budget_period
        .period_of(now_ms)
        .map_or(i64::MIN, |(start, _)| start);
    // Summed here rather than by SQLite, whose sum() fails past i64: one row a day.
    let mut stmt = conn.prepare_cached(
        "SELECT spent_nanos FROM key_spend WHERE client_key_id = ?1 AND day_start >= ?2",
    )?;
    let mut rows = stmt.query(params![key.id, since])?;
    let mut spent = 0u64;
    while let Some(row) = rows.next()? {
        spent = spent.saturating_add(row.get::<_, i64>(0)?.max(0) as u64);
    }
    Ok(spent)
}

impl Store {
    /// What each of `keys` spent in its current budget period at `now_ms`, in order.
    pub async fn key_spends(
        &self,
        keys: Vec<ClientKey>,
        now_ms: i64,
    ) -> Result<Vec<u64>, StoreError> {
        self.read(Reader::Queries, move |conn, _| {
            let tx = conn.transaction()?;
            keys.iter()
                .map(|key| spent_in_period(&tx, key, now_ms))
                .collect()
        })
        .await
    }
}
