//! What each client key spent, per UTC day: the sum of the `cost_nanos` of its usage
//! records, added by the transaction that ingests them, so counted exactly once like all
//! usage. A budget period's spend is the sum over the days it holds (31 at most); a
//! lifetime's is kept whole beside them (`key_spend_total`, added in the same statement's
//! transaction), so it costs one row however long the key has spent.

use std::collections::BTreeMap;

use rusqlite::{Connection, OptionalExtension, Transaction, params};

use super::{Reader, Store, StoreError, WriteOp, nanos_to_db};
use crate::client_key::ClientKey;

/// Adds each (key id, UTC day, budget period that paid) → nano-units to `key_spend`,
/// saturating, under the day [`filed_day`] says. Returns whether a key's spend in its period
/// holding `now_ms` reached its budget with these additions: the snapshot then changes (the
/// key is refused from it on), so the caller bumps the version.
pub(super) fn add(
    tx: &Transaction<'_>,
    spent: &BTreeMap<(&str, i64, i64), u64>,
    now_ms: i64,
) -> Result<bool, StoreError> {
    let mut upsert = tx.prepare_cached(
        "INSERT INTO key_spend (client_key_id, day_start, spent_nanos) VALUES (?1, ?2, ?3)
         ON CONFLICT (client_key_id, day_start) DO UPDATE SET spent_nanos =
             CASE WHEN spent_nanos > 9223372036854775807 - excluded.spent_nanos
                  THEN 9223372036854775807 ELSE spent_nanos + excluded.spent_nanos END",
    )?;
    let mut upsert_total = tx.prepare_cached(
        "INSERT INTO key_spend_total (client_key_id, spent_nanos) VALUES (?1, ?2)
         ON CONFLICT (client_key_id) DO UPDATE SET spent_nanos =
             CASE WHEN spent_nanos > 9223372036854775807 - excluded.spent_nanos
                  THEN 9223372036854775807 ELSE spent_nanos + excluded.spent_nanos END",
    )?;
    // The map is ordered by key: each key's days are together, its budget read once.
    let mut keys: Vec<(&str, Option<ClientKey>, u64)> = Vec::new();
    let mut filed: BTreeMap<(&str, i64), u64> = BTreeMap::new();
    for (&(key_id, day, paid_by), &nanos) in spent {
        if keys.last().is_none_or(|(last, _, _)| *last != key_id) {
            keys.push((key_id, budgeted_key(tx, key_id)?, 0));
        }
        let Some((_, key, total)) = keys.last_mut() else {
            continue;
        };
        *total = total.saturating_add(nanos);
        let sum = filed
            .entry((key_id, filed_day(day, paid_by, key.as_ref())))
            .or_default();
        *sum = sum.saturating_add(nanos);
    }
    for (&(key, day), &nanos) in &filed {
        if nanos > 0 {
            upsert.execute(params![key, day, nanos_to_db(nanos)])?;
        }
    }
    for (key, _, nanos) in &keys {
        if *nanos > 0 {
            upsert_total.execute(params![key, nanos_to_db(*nanos)])?;
        }
    }
    let mut crossed = false;
    for (key_id, key, _) in keys {
        let Some(key) = key else {
            continue;
        };
        let since = key
            .budget_period
            .period_of(now_ms)
            .map_or(i64::MIN, |(start, _)| start);
        let in_period: u64 = filed
            .range((key_id, since)..=(key_id, i64::MAX))
            .fold(0u64, |sum, (_, &nanos)| sum.saturating_add(nanos));
        if in_period == 0 {
            continue;
        }
        let after = spent_in_period(tx, &key, now_ms)?;
        let before = after.saturating_sub(in_period);
        if before < key.max_budget_nanos && after >= key.max_budget_nanos {
            tracing::info!(client_key = %key.id, "client key spent its budget");
            crossed = true;
        }
    }
    Ok(crossed)
}

/// The day a cost is filed under in its key's spend: its record's (`day`), unless the record
/// names the budget period that paid for it (`paid_by`, its start; 0 for none) and that day is
/// outside the period, as `key` has its budget now: then the period's first day (the record's
/// replica's clock behind this one's, or a request admitted on the new period's money that
/// arrived before the reset) or its last (the clock ahead). So the period whose allowance
/// paid counts the cost, once: filed by the replica's clock alone, it was counted in no live
/// period's spend after that replica's next hello, and the budget passed by as much (a
/// clock ahead: counted in the next period again).
fn filed_day(day: i64, paid_by: i64, key: Option<&ClientKey>) -> i64 {
    let period = key
        .filter(|_| paid_by > 0)
        .and_then(|key| key.budget_period.period_of(paid_by))
        // A key whose period changed since the grant (daily to monthly): its record's day.
        .filter(|(start, _)| *start == paid_by);
    match period {
        Some((start, end)) => day.clamp(start, crate::budget::day_start(end - 1)),
        None => day,
    }
}

/// The active key `id` if it has a budget.
fn budgeted_key(conn: &Connection, id: &str) -> Result<Option<ClientKey>, StoreError> {
    match super::client_keys::load_key(conn, id) {
        Ok(key) => Ok(Some(key).filter(|k| !k.revoked && k.max_budget_nanos > 0)),
        Err(StoreError::Sqlite(rusqlite::Error::QueryReturnedNoRows)) => Ok(None),
        Err(err) => Err(err),
    }
}

/// A key's lifetime spend.
const LIFETIME_SPEND: &str = "SELECT spent_nanos FROM key_spend_total WHERE client_key_id = ?1";

/// A key's days in a period.
const PERIOD_SPEND: &str = "SELECT spent_nanos FROM key_spend
     WHERE client_key_id = ?1 AND day_start >= ?2 AND day_start < ?3";

/// What `key` spent in its budget period holding `now_ms` (its lifetime for no period).
pub(crate) fn spent_in_period(
    conn: &Connection,
    key: &ClientKey,
    now_ms: i64,
) -> Result<u64, StoreError> {
    let Some((since, until)) = key.budget_period.period_of(now_ms) else {
        // Its lifetime: one row.
        let total: Option<i64> = conn
            .prepare_cached(LIFETIME_SPEND)?
            .query_row(params![key.id], |row| row.get(0))
            .optional()?;
        return Ok(total.map_or(0, |t| t.max(0) as u64));
    };
    // Rows of the period only, not those after it: a replica whose clock runs ahead files
    // its last costs before the reset in the next period's rows, which count there (once),
    // not also here.
    // Summed here rather than by SQLite, whose sum() fails past i64: one row a day.
    let mut stmt = conn.prepare_cached(PERIOD_SPEND)?;
    let mut rows = stmt.query(params![key.id, since, until])?;
    let mut spent = 0u64;
    while let Some(row) = rows.next()? {
        spent = spent.saturating_add(row.get::<_, i64>(0)?.max(0) as u64);
    }
    Ok(spent)
}

/// A key's budget and what it spent in its current period, as allowances are granted from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyBudget {
    pub max_nanos: u64,
    /// The start of the period (Unix ms); 0 for a lifetime budget.
    pub period_start_ms: i64,
    /// Its end, the next reset (Unix ms); `i64::MAX` for a lifetime budget.
    pub period_end_ms: i64,
    pub spent_nanos: u64,
    /// The usage high-water mark of each replica asked for, as of that spend (0: none).
    pub high_water: Vec<u64>,
}

impl Store {
    /// The budget of the active key `id` and what it spent in the period holding `now_ms`;
    /// `None` when the key is unknown, revoked or has no budget.
    pub async fn key_budget(
        &self,
        id: String,
        now_ms: i64,
        replicas: Vec<(String, String)>,
    ) -> Result<Option<KeyBudget>, StoreError> {
        self.read(Reader::Budgets, move |conn, _| {
            let tx = conn.transaction()?;
            let Some(key) = budgeted_key(&tx, &id)? else {
                return Ok(None);
            };
            let spent_nanos = spent_in_period(&tx, &key, now_ms)?;
            // In the same transaction as the spend: the records it counts are exactly those
            // at or below these marks.
            let mut high_water = Vec::with_capacity(replicas.len());
            let mut query = tx.prepare_cached(
                "SELECT sequence FROM usage_high_water WHERE node_id = ?1 AND incarnation = ?2",
            )?;
            for (node_id, incarnation) in &replicas {
                let mark: Option<i64> = query
                    .query_row(params![node_id, incarnation], |row| row.get(0))
                    .optional()?;
                high_water.push(mark.map_or(0, |m| m.max(0) as u64));
            }
            drop(query);
            let (period_start_ms, period_end_ms) =
                key.budget_period.period_of(now_ms).unwrap_or((0, i64::MAX));
            Ok(Some(KeyBudget {
                max_nanos: key.max_budget_nanos,
                period_start_ms,
                period_end_ms,
                spent_nanos,
                high_water,
            }))
        })
        .await
    }

    /// What each of `keys` spent in its current budget period at `now_ms`, in order. On the
    /// admin reads' connection, as the keys themselves: a key list does not wait for a long
    /// statistics query.
    pub async fn key_spends(
        &self,
        keys: Vec<ClientKey>,
        now_ms: i64,
    ) -> Result<Vec<u64>, StoreError> {
        self.read(Reader::Admin, move |conn, _| {
            let tx = conn.transaction()?;
            keys.iter()
                .map(|key| spent_in_period(&tx, key, now_ms))
                .collect()
        })
        .await
    }

    /// A new snapshot version if any active key has a budget that resets by period (called
    /// at UTC midnight, when some period starts); returns whether it bumped.
    pub async fn publish_budget_resets(&self) -> Result<bool, StoreError> {
        self.write(WriteOp::admin, |conn, _| {
            let tx = conn.transaction()?;
            let periodic: bool = tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM client_keys
                 WHERE revoked = 0 AND max_budget_nanos > 0 AND budget_period != 0)",
                [],
                |r| r.get(0),
            )?;
            if periodic {
                super::bump_version(&tx)?;
            }
            tx.commit()?;
            Ok(periodic)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    use crate::budget::BudgetPeriod;
    use crate::client_key::NewClientKey;
    use crate::crypto::MasterKey;

    #[tokio::test]
    async fn a_reset_publishes_a_snapshot_only_when_a_periodic_budget_exists() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(&dir.path().join("t.db"), MasterKey::generate()).unwrap();
        let new = |name: &str, max_budget_nanos, budget_period| NewClientKey {
            name: name.into(),
            max_budget_nanos,
            budget_period,
            ..NewClientKey::default()
        };
        store
            .create_client_key(new("lifetime", 5, BudgetPeriod::Lifetime))
            .await
            .unwrap();
        store
            .create_client_key(new("no-budget", 0, BudgetPeriod::Daily))
            .await
            .unwrap();
        let before = *store.commits().borrow();
        assert!(!store.publish_budget_resets().await.unwrap());
        assert_eq!(*store.commits().borrow(), before, "nothing resets");
        store
            .create_client_key(new("monthly", 5, BudgetPeriod::Monthly))
            .await
            .unwrap();
        let before = *store.commits().borrow();
        assert!(store.publish_budget_resets().await.unwrap());
        assert!(*store.commits().borrow() > before, "a new snapshot version");
    }

    /// A key named `budgeted` with a budget of `max_budget_nanos` a `period`.
    async fn budgeted(
        store: &Store,
        max_budget_nanos: u64,
        budget_period: BudgetPeriod,
    ) -> crate::client_key::ClientKey {
        let new = NewClientKey {
            name: "budgeted".into(),
            max_budget_nanos,
            budget_period,
            ..NewClientKey::default()
        };
        store.create_client_key(new).await.unwrap().0
    }

    /// What the key `id` spent in its period holding `at`, as the allowance engine reads it.
    async fn spent_at(store: &Store, id: &str, at: i64) -> u64 {
        store
            .key_budget(id.to_owned(), at, Vec::new())
            .await
            .unwrap()
            .unwrap()
            .spent_nanos
    }

    /// A replica whose clock runs ahead files costs in the next period's rows: they count in
    /// that period, not in this one as well (nor do rows of an earlier period).
    #[tokio::test]
    async fn a_period_counts_only_its_own_days() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let (store, _) = Store::open(&path, MasterKey::generate()).unwrap();
        let key = budgeted(&store, 1_000, BudgetPeriod::Daily).await;
        let day = 86_400_000i64;
        let today = 20_000 * day;
        let db = Connection::open(&path).unwrap();
        for (day_start, spent) in [(today - day, 1), (today, 20), (today + day, 300)] {
            db.execute(
                "INSERT INTO key_spend (client_key_id, day_start, spent_nanos) VALUES (?1, ?2, ?3)",
                params![key.id, day_start, spent],
            )
            .unwrap();
        }
        let spent = |at| spent_at(&store, &key.id, at);
        assert_eq!(spent(today + 5).await, 20);
        assert_eq!(spent(today + day + 5).await, 300);
    }

    /// A cost whose record names the budget period that paid for it is filed in that period
    /// whatever its replica's clock dated it: a day behind, on the period's first day; a day
    /// ahead, on its last; inside it, on its own day. A record naming no period, or one the
    /// key's budget no longer has (its period changed since), is filed by its date.
    #[tokio::test]
    async fn a_cost_is_filed_in_the_period_that_paid_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let (store, _) = Store::open(&path, MasterKey::generate()).unwrap();
        let key = budgeted(&store, 1_000_000, BudgetPeriod::Daily).await;
        let day = 86_400_000i64;
        let today = 20_000 * day;
        let mut db = Connection::open(&path).unwrap();
        let tx = db.transaction().unwrap();
        let spent: BTreeMap<(&str, i64, i64), u64> = [
            ((key.id.as_str(), today - day, today), 1),
            ((key.id.as_str(), today + day, today), 20),
            ((key.id.as_str(), today, today), 300),
            ((key.id.as_str(), today - day, 0), 4_000),
        ]
        .into_iter()
        .collect();
        add(&tx, &spent, today).unwrap();
        tx.commit().unwrap();
        let spent = |at| spent_at(&store, &key.id, at);
        assert_eq!(spent(today + 5).await, 321);
        assert_eq!(spent(today - day + 5).await, 4_000);
        assert_eq!(spent(today + day + 5).await, 0);

        let weekly = ClientKey {
            budget_period: BudgetPeriod::Weekly,
            ..key.clone()
        };
        let (monday, next_monday) = BudgetPeriod::Weekly.period_of(today).unwrap();
        let paid = Some(&weekly);
        assert_eq!(filed_day(monday + 2 * day, monday, paid), monday + 2 * day);
        assert_eq!(filed_day(monday - day, monday, paid), monday);
        assert_eq!(filed_day(next_monday, monday, paid), next_monday - day);
        // Paid by a daily period (not a week's start): the key's budget changed since.
        assert_eq!(filed_day(monday - day, monday + day, paid), monday - day);
        assert_eq!(filed_day(monday - day, monday, None), monday - day);
    }

    /// The allowance engine reads a key's budget while it holds every replica's grants,
    /// ingest and acks: a stats query of seconds on the same connection would stall them all.
    #[tokio::test]
    async fn a_budget_read_does_not_wait_for_a_stats_query() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(&dir.path().join("t.db"), MasterKey::generate()).unwrap();
        let key = budgeted(&store, 5, BudgetPeriod::Monthly).await;
        // A stats query holds its connection (the lock a long query holds while it runs).
        let stats = crate::store::Held::hold(&store, Some(Reader::Queries)).await;
        let budget = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            store.key_budget(key.id.clone(), 0, Vec::new()),
        )
        .await
        .expect("the budget read waited for the stats query")
        .unwrap()
        .unwrap();
        assert_eq!(budget.max_nanos, 5);
        // Nor does a key list's spend (the dashboard asks every 5 s).
        let spends = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            store.key_spends(vec![key.clone()], 0),
        )
        .await
        .expect("the key list's spend waited for the stats query")
        .unwrap();
        assert_eq!(spends, vec![0]);
        stats.release().await;
    }

    /// Adds `days` of spend (`nanos` each, from day 0 on) to `key` as an ingest does.
    fn spend(db: &mut Connection, key: &str, days: i64, nanos: u64) {
        let day = 86_400_000i64;
        let tx = db.transaction().unwrap();
        let spent: BTreeMap<(&str, i64, i64), u64> =
            (0..days).map(|d| ((key, d * day, 0), nanos)).collect();
        add(&tx, &spent, days * day).unwrap();
        tx.commit().unwrap();
    }

    /// SQLite's virtual machine steps `read` takes on `db` in the spend queries (which it
    /// prepares cached, so the statements counted are the ones it runs).
    fn steps<T>(db: &Connection, read: impl FnOnce(&Connection) -> T) -> (T, u64) {
        let count = || -> u64 {
            [LIFETIME_SPEND, PERIOD_SPEND]
                .iter()
                .map(|sql| {
                    let stmt = db.prepare_cached(sql).unwrap();
                    stmt.get_status(rusqlite::StatementStatus::VmStep) as u64
                })
                .sum()
        };
        let before = count();
        let value = read(db);
        (value, count() - before)
    }

    /// A lifetime budget's spend is read from one row, not summed over every day the key
    /// ever spent: a key list, each snapshot and each ingest read it for every key, and a key
    /// of two years summed 730 rows each time.
    #[tokio::test]
    async fn a_lifetime_spend_reads_one_row_however_long_the_key_spent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let (store, _) = Store::open(&path, MasterKey::generate()).unwrap();
        let new = |name: &str| NewClientKey {
            name: name.into(),
            max_budget_nanos: 1_000_000,
            budget_period: BudgetPeriod::Lifetime,
            ..NewClientKey::default()
        };
        let young = store.create_client_key(new("young")).await.unwrap().0;
        let old = store.create_client_key(new("old")).await.unwrap().0;
        let mut db = Connection::open(&path).unwrap();
        spend(&mut db, &young.id, 1, 7);
        spend(&mut db, &old.id, 1_000, 7);
        let now = 1_000 * 86_400_000;
        let (young_spent, young_steps) = steps(&db, |db| spent_in_period(db, &young, now).unwrap());
        let (old_spent, old_steps) = steps(&db, |db| spent_in_period(db, &old, now).unwrap());
        assert_eq!((young_spent, old_spent), (7, 7_000));
        assert!(
            old_steps <= young_steps + 10,
            "a key of 1,000 days took {old_steps} steps, of one day {young_steps}"
        );
        // And the spend the API shows is the same.
        assert_eq!(store.key_spends(vec![old], now).await.unwrap(), vec![7_000]);
    }

    /// The lifetime total saturates as the daily rows do, in an ingest and in the migration
    /// that makes it from the days stored before it.
    #[test]
    fn the_lifetime_total_saturates_and_is_made_from_the_days_stored_before_it() {
        use rusqlite_migration::{M, Migrations};
        let dir = tempfile::tempdir().unwrap();
        let mut db = Connection::open(dir.path().join("m.db")).unwrap();
        super::super::sql_functions::register(&db).unwrap();
        let migrations = Migrations::new(
            super::super::MIGRATIONS
                .iter()
                .map(|sql| M::up(sql))
                .collect(),
        );
        migrations.to_version(&mut db, 15).unwrap();
        let max = i64::MAX;
        db.execute_batch(&format!(
            "INSERT INTO key_spend VALUES
                 ('a', 0, 1999999999), ('a', 86400000, 3000000001), ('a', 172800000, 5),
                 ('big', 0, {max}), ('big', 86400000, 1),
                 ('near', 0, {near}), ('near', 86400000, 999999999);",
            near = max - 999_999_999,
        ))
        .unwrap();
        migrations.to_latest(&mut db).unwrap();
        let total = |db: &Connection, key: &str| -> i64 {
            db.query_row(
                "SELECT spent_nanos FROM key_spend_total WHERE client_key_id = ?1",
                [key],
                |r| r.get(0),
            )
            .unwrap()
        };
        assert_eq!(total(&db, "a"), 5_000_000_005);
        assert_eq!(total(&db, "big"), max);
        assert_eq!(total(&db, "near"), max);
        spend(&mut db, "a", 2, u64::MAX / 2);
        assert_eq!(total(&db, "a"), max);
    }
}
