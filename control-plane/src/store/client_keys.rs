//! Client keys: stored as SHA-256 hashes, revoked rather than deleted so usage
//! history keeps its names.

use rusqlite::{Connection, OptionalExtension as _, params};

use super::{
    Cursor, Reader, Store, StoreError, WriteOp, bump_version, nanos_to_db, new_id, unique_violation,
};
use crate::budget::BudgetPeriod;
use crate::client_key::{self, ClientKey, NewClientKey};
use crate::time::now_ms;
use crate::validation::ValidationError;

impl Store {
    /// Creates a key and returns it with its plaintext, which is not stored.
    pub async fn create_client_key(
        &self,
        new: NewClientKey,
    ) -> Result<(ClientKey, String, u64), StoreError> {
        let new = new.validated(now_ms())?;
        self.write(WriteOp::admin, move |conn, _| {
            let tx = conn.transaction()?;
            let plaintext = client_key::generate();
            let key = ClientKey {
                id: new_id(),
                name: new.name.clone(),
                key_prefix: client_key::shown_prefix(&plaintext),
                key_sha256: client_key::hash(&plaintext),
                allowed_models: new.allowed_models,
                rpm_limit: new.rpm_limit,
                revoked: false,
                create_time_ms: now_ms(),
                revoke_time_ms: None,
                expire_time_ms: new.expire_time_ms,
                max_budget_nanos: new.max_budget_nanos,
                budget_period: new.budget_period,
                tpm_limit: new.tpm_limit,
                max_parallel_requests: new.max_parallel_requests,
            };
            let models = serde_json::to_string(&key.allowed_models)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            tx.execute(
                "INSERT INTO client_keys (id, name, key_prefix, key_sha256, allowed_models, rpm_limit, create_time, expire_time,
                                          max_budget_nanos, budget_period, tpm_limit, max_parallel_requests)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                params![key.id, key.name, key.key_prefix, key.key_sha256, models, key.rpm_limit, key.create_time_ms, key.expire_time_ms,
                        nanos_to_db(key.max_budget_nanos), key.budget_period.to_db(), key.tpm_limit, key.max_parallel_requests],
            )
            .map_err(|e| unique_violation(e, || format!("a client key named {:?} already exists", new.name)))?;
            let version = bump_version(&tx)?;
            tx.commit()?;
            Ok((key, plaintext, version))
        })
        .await
    }

    /// Keys, oldest first: all of them, or the `limit` after `after` (a creation time and an
    /// id, the order key of the last key of the page before), revoked ones too unless
    /// `active_only`.
    pub async fn list_client_keys(
        &self,
        active_only: bool,
        after: Option<Cursor>,
        limit: Option<usize>,
    ) -> Result<Vec<ClientKey>, StoreError> {
        self.read(Reader::Admin, move |conn, _| {
            let Some(limit) = limit else {
                return load_keys(conn, active_only);
            };
            let (time, id) = after.map_or((i64::MIN, String::new()), |c| (c.start_ms, c.group_key));
            let revoked = if active_only { " AND revoked = 0" } else { "" };
            let mut stmt = conn.prepare_cached(&format!(
                "{SELECT_KEYS} WHERE (create_time, id) > (?1, ?2){revoked}
                 ORDER BY create_time, id LIMIT ?3"
            ))?;
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let rows = stmt.query_map(params![time, id, limit], key_row)?;
            rows.map(|row| row.map_err(StoreError::from).and_then(with_models))
                .collect()
        })
        .await
    }

    /// A key by id, or else by the name of an active key.
    pub async fn get_client_key(&self, id_or_name: String) -> Result<ClientKey, StoreError> {
        self.read(Reader::Admin, move |conn, _| {
            let id = resolve_key_id(conn, &id_or_name)?;
            load_key(conn, &id)
        })
        .await
    }

    /// Stores what `change` makes of the operator-set fields of an active key (it checks
    /// what it changes: [`NewClientKey::updated`]); the key itself stays the same. A changed expiry is published afresh
    /// when it passes, and one moved later un-expires the key from this version on.
    pub async fn update_client_key<F>(
        &self,
        id_or_name: String,
        change: F,
    ) -> Result<(ClientKey, u64), StoreError>
    where
        F: FnOnce(&NewClientKey) -> Result<NewClientKey, crate::validation::ValidationError>
            + Send
            + 'static,
    {
        self.write(WriteOp::admin, move |conn, _| {
            let tx = conn.transaction()?;
            let id = resolve_key_id(&tx, &id_or_name)?;
            let current = load_key(&tx, &id)?;
            if current.revoked {
                return Err(ValidationError::new(
                    "client_key.id",
                    format!("client key {id_or_name:?} is revoked; a revoked key cannot be changed"),
                )
                .into());
            }
            let fields = change(&NewClientKey::of(&current))?;
            let models = serde_json::to_string(&fields.allowed_models)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            // SET expressions read the row as it was: the sweep's mark is kept only for an
            // expiry that did not change.
            tx.execute(
                "UPDATE client_keys SET name = ?2, allowed_models = ?3, rpm_limit = ?4, expire_time = ?5,
                        expiry_published = CASE WHEN expire_time IS ?5 THEN expiry_published ELSE 0 END,
                        max_budget_nanos = ?6, budget_period = ?7, tpm_limit = ?8, max_parallel_requests = ?9
                 WHERE id = ?1",
                params![id, fields.name, models, fields.rpm_limit, fields.expire_time_ms,
                        nanos_to_db(fields.max_budget_nanos), fields.budget_period.to_db(),
                        fields.tpm_limit, fields.max_parallel_requests],
            )
            .map_err(|e| unique_violation(e, || format!("a client key named {:?} already exists", fields.name)))?;
            let version = bump_version(&tx)?;
            let key = load_key(&tx, &id)?;
            tx.commit()?;
            Ok((key, version))
        })
        .await
    }

    /// Revokes a key by id, or else by the name of an active key. Revoking twice is not an error.
    pub async fn revoke_client_key(&self, id_or_name: String) -> Result<u64, StoreError> {
        self.write(WriteOp::admin, move |conn, _| {
            let tx = conn.transaction()?;
            let id = resolve_key_id(&tx, &id_or_name)?;
            tx.execute(
                "UPDATE client_keys SET revoked = 1, revoke_time = ?2 WHERE id = ?1 AND revoked = 0",
                params![id, now_ms()],
            )?;
            let version = bump_version(&tx)?;
            tx.commit()?;
            Ok(version)
        })
        .await
    }

    /// When the next active key expires whose expiry no snapshot version has followed yet.
    pub async fn next_key_expiry(&self) -> Result<Option<i64>, StoreError> {
        self.read(Reader::Admin, |conn, _| {
            Ok(conn.query_row(
                "SELECT MIN(CASE expiry_published WHEN 0 THEN expire_time ELSE expire_time + ?1 END)
                 FROM client_keys
                 WHERE revoked = 0 AND expiry_published < 2 AND expire_time IS NOT NULL",
                params![EXPIRED_KEYS_KEPT_MS],
                |r| r.get(0),
            )?)
        })
        .await
    }

    /// Bumps the snapshot version once for the active keys that expired by `now`, so the
    /// data planes learn of it as of any other change, and once for those that expired
    /// [`EXPIRED_KEYS_KEPT_MS`] before it, which leave the snapshot then (and the room they
    /// took is free for new keys then, not at some later change); returns how many changed.
    /// Each step bumps the version once per key, however often this runs. `expiry_published`:
    /// 0 not yet, 1 published expired, 2 published left out.
    pub async fn publish_key_expiries(&self, now: i64) -> Result<usize, StoreError> {
        self.write(WriteOp::admin, move |conn, _| {
            let tx = conn.transaction()?;
            let left_out = tx.execute(
                "UPDATE client_keys SET expiry_published = 2
                 WHERE revoked = 0 AND expiry_published = 1 AND expire_time + ?2 <= ?1",
                params![now, EXPIRED_KEYS_KEPT_MS],
            )?;
            let expired = tx.execute(
                "UPDATE client_keys SET expiry_published = 1
                 WHERE revoked = 0 AND expiry_published = 0 AND expire_time <= ?1",
                params![now],
            )?;
            if expired + left_out > 0 {
                bump_version(&tx)?;
            }
            tx.commit()?;
            Ok(expired + left_out)
        })
        .await
    }
}

/// An id, or the id of the active key of that name.
fn resolve_key_id(conn: &Connection, id_or_name: &str) -> Result<String, StoreError> {
    conn.query_row(
        "SELECT id FROM client_keys WHERE id = ?1
         UNION ALL SELECT id FROM client_keys WHERE name = ?1 AND revoked = 0 LIMIT 1",
        params![id_or_name],
        |r| r.get(0),
    )
    .optional()?
    .ok_or_else(|| StoreError::NotFound {
        kind: "client key",
        id: id_or_name.to_owned(),
    })
}

const SELECT_KEYS: &str = "SELECT id, name, key_prefix, key_sha256, allowed_models, rpm_limit, revoked, create_time, revoke_time, expire_time,
            max_budget_nanos, budget_period, tpm_limit, max_parallel_requests
     FROM client_keys";

pub(crate) fn load_keys(
    conn: &Connection,
    active_only: bool,
) -> Result<Vec<ClientKey>, StoreError> {
    let filter = if active_only {
        " WHERE revoked = 0"
    } else {
        ""
    };
    let mut stmt =
        conn.prepare_cached(&format!("{SELECT_KEYS}{filter} ORDER BY create_time, id"))?;
    let rows = stmt.query_map([], key_row)?;
    rows.map(|row| row.map_err(StoreError::from).and_then(with_models))
        .collect()
}

/// How long after its expiry a key stays in the snapshot, refused as expired (401
/// `api_key_expired`, which tells its user what happened); past it, a snapshot version leaves
/// it out ([`Store::publish_key_expiries`]) and it is refused as unknown. 30 days.
pub const EXPIRED_KEYS_KEPT_MS: i64 = 30 * 24 * 3_600_000;

/// The keys a routing snapshot holds, oldest first: active, and not left out by a version
/// 30 days past their expiry ([`Store::publish_key_expiries`]); each with whether a version has
/// published its expiry (then refused as expired whatever the clock says since, so that a step
/// back of the clock does not revive it). Read through the partial index
/// `client_keys_in_snapshot` (migration 20): a build reads these rows alone, not every key
/// ever issued.
pub(crate) fn snapshot_keys(conn: &Connection) -> Result<Vec<(ClientKey, bool)>, StoreError> {
    let mut stmt = conn.prepare_cached(&snapshot_keys_query())?;
    let rows = stmt.query_map([], |r| Ok((key_row(r)?, r.get::<_, i64>(14)? == 1)))?;
    rows.map(|row| {
        let (key, published) = row?;
        Ok((with_models(key)?, published))
    })
    .collect()
}

/// The query of [`snapshot_keys`]: the columns of `SELECT_KEYS` and `expiry_published`. Its
/// condition is the partial index's, as the index states it: SQLite uses the index only for a
/// query whose condition implies the index's.
fn snapshot_keys_query() -> String {
    let columns = SELECT_KEYS.replacen(
        " FROM client_keys",
        ", expiry_published FROM client_keys",
        1,
    );
    format!("{columns} WHERE revoked = 0 AND expiry_published < 2 ORDER BY create_time, id")
}

pub(super) fn load_key(conn: &Connection, id: &str) -> Result<ClientKey, StoreError> {
    let row = conn
        .prepare_cached(&format!("{SELECT_KEYS} WHERE id = ?1"))?
        .query_row(params![id], key_row)?;
    with_models(row)
}

/// A row of `SELECT_KEYS`, with the allowed models still as stored (JSON).
fn key_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(ClientKey, String)> {
    Ok((
        ClientKey {
            id: r.get(0)?,
            name: r.get(1)?,
            key_prefix: r.get(2)?,
            key_sha256: r.get(3)?,
            allowed_models: Vec::new(),
            rpm_limit: r.get(5)?,
            revoked: r.get(6)?,
            create_time_ms: r.get(7)?,
            revoke_time_ms: r.get(8)?,
            expire_time_ms: r.get(9)?,
            max_budget_nanos: r.get::<_, i64>(10)?.max(0) as u64,
            budget_period: BudgetPeriod::from_db(r.get(11)?),
            tpm_limit: r.get(12)?,
            max_parallel_requests: r.get(13)?,
        },
        r.get(4)?,
    ))
}

fn with_models((mut key, models): (ClientKey, String)) -> Result<ClientKey, StoreError> {
    key.allowed_models = serde_json::from_str(&models)
        .map_err(|e| StoreError::Corrupt(format!("client key {}: {e}", key.id)))?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    use crate::crypto::MasterKey;

    /// A snapshot's build reads the keys it holds through their own index, not every key
    /// ever issued: revoked keys are never deleted and keys issued to expire (a CI run's) pile
    /// up, so a scan of all of them made every build, the one a revocation waits for
    /// included, slower as history grew (1.4 s at 100,000 keys).
    #[tokio::test]
    async fn a_snapshot_reads_its_keys_alone_through_their_index() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(&dir.path().join("t.db"), MasterKey::generate()).unwrap();
        let plan = store
            .read(crate::store::Reader::Admin, |conn, _| {
                let mut stmt =
                    conn.prepare(&format!("EXPLAIN QUERY PLAN {}", snapshot_keys_query()))?;
                let rows = stmt.query_map([], |r| r.get::<_, String>(3))?;
                Ok(rows.collect::<Result<Vec<_>, _>>()?)
            })
            .await
            .unwrap();
        assert_eq!(
            plan,
            ["SCAN client_keys USING INDEX client_keys_in_snapshot"]
        );
    }

    #[tokio::test]
    async fn an_expiry_bumps_the_version_once_when_it_passes() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(&dir.path().join("t.db"), MasterKey::generate()).unwrap();
        let (key, _, created) = store
            .create_client_key(NewClientKey {
                name: "team-a".into(),
                allowed_models: Vec::new(),
                rpm_limit: 0,
                expire_time_ms: Some(now_ms() + 60_000),
                ..NewClientKey::default()
            })
            .await
            .unwrap();
        let at = key.expire_time_ms.unwrap();
        assert_eq!(store.next_key_expiry().await.unwrap(), Some(at));
        assert_eq!(store.publish_key_expiries(at - 1).await.unwrap(), 0);
        assert_eq!(
            *store.commits().borrow(),
            created,
            "nothing expired, no new version"
        );
        assert_eq!(store.publish_key_expiries(at).await.unwrap(), 1);
        let bumped = *store.commits().borrow();
        assert!(bumped > created);
        assert_eq!(store.publish_key_expiries(at + 10_000).await.unwrap(), 0);
        assert_eq!(*store.commits().borrow(), bumped, "an expiry bumps once");
        // Next: its leaving the snapshot, 30 days on (once, too).
        assert_eq!(
            store.next_key_expiry().await.unwrap(),
            Some(at + EXPIRED_KEYS_KEPT_MS)
        );
        assert_eq!(
            store
                .publish_key_expiries(at + EXPIRED_KEYS_KEPT_MS)
                .await
                .unwrap(),
            1
        );
        assert_eq!(
            store
                .publish_key_expiries(at + EXPIRED_KEYS_KEPT_MS + 1)
                .await
                .unwrap(),
            0
        );
        assert_eq!(store.next_key_expiry().await.unwrap(), None);
        let listed = store.list_client_keys(false, None, None).await.unwrap();
        assert!(listed[0].expired_at(at));
        assert!(!listed[0].expired_at(at - 1));
    }

    #[tokio::test]
    async fn an_expiry_moved_later_unexpires_the_key_and_is_published_again() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(&dir.path().join("t.db"), MasterKey::generate()).unwrap();
        let (key, _, _) = store
            .create_client_key(NewClientKey {
                name: "team-a".into(),
                allowed_models: Vec::new(),
                rpm_limit: 0,
                expire_time_ms: Some(now_ms() + 60_000),
                ..NewClientKey::default()
            })
            .await
            .unwrap();
        let first = key.expire_time_ms.unwrap();
        assert_eq!(store.publish_key_expiries(first).await.unwrap(), 1);

        // A change that leaves the expiry alone does not publish it again.
        store
            .update_client_key(key.id.clone(), |k| {
                Ok(NewClientKey {
                    rpm_limit: 5,
                    ..k.clone()
                })
            })
            .await
            .unwrap();
        assert_eq!(
            store.next_key_expiry().await.unwrap(),
            Some(first + EXPIRED_KEYS_KEPT_MS),
            "only its leaving the snapshot is ahead"
        );

        let later = first + 60_000;
        let (updated, version) = store
            .update_client_key("team-a".into(), move |k| {
                Ok(NewClientKey {
                    expire_time_ms: Some(later),
                    ..k.clone()
                })
            })
            .await
            .unwrap();
        assert_eq!(*store.commits().borrow(), version);
        assert!(
            !updated.expired_at(first + 1),
            "it works again until the new expiry"
        );
        assert_eq!(store.next_key_expiry().await.unwrap(), Some(later));
        assert_eq!(store.publish_key_expiries(later - 1).await.unwrap(), 0);
        assert_eq!(store.publish_key_expiries(later).await.unwrap(), 1);
        assert_eq!(
            updated.key_sha256, key.key_sha256,
            "the key is not re-issued"
        );
        assert_eq!(updated.rpm_limit, 5);
    }
}
