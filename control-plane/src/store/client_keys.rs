//! Client keys: stored as SHA-256 hashes, revoked rather than deleted so usage
//! history keeps its names.

use rusqlite::{Connection, OptionalExtension as _, params};

use super::{Store, StoreError, WriteOp, bump_version, new_id, unique_violation};
use crate::client_key::{self, ClientKey, NewClientKey};
use crate::time::now_ms;

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
            };
            let models = serde_json::to_string(&key.allowed_models)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            tx.execute(
                "INSERT INTO client_keys (id, name, key_prefix, key_sha256, allowed_models, rpm_limit, create_time, expire_time)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![key.id, key.name, key.key_prefix, key.key_sha256, models, key.rpm_limit, key.create_time_ms, key.expire_time_ms],
            )
            .map_err(|e| unique_violation(e, || format!("a client key named {:?} already exists", new.name)))?;
            let version = bump_version(&tx)?;
            tx.commit()?;
            Ok((key, plaintext, version))
        })
        .await
    }

    pub async fn list_client_keys(&self) -> Result<Vec<ClientKey>, StoreError> {
        self.call(|conn, _| load_keys(conn, false)).await
    }

    /// Revokes a key by id, or else by the name of an active key. Revoking twice is not an error.
    pub async fn revoke_client_key(&self, id_or_name: String) -> Result<u64, StoreError> {
        self.write(WriteOp::admin, move |conn, _| {
            let tx = conn.transaction()?;
            let id: String = tx
                .query_row(
                    "SELECT id FROM client_keys WHERE id = ?1
                     UNION ALL SELECT id FROM client_keys WHERE name = ?1 AND revoked = 0 LIMIT 1",
                    params![id_or_name],
                    |r| r.get(0),
                )
                .optional()?
                .ok_or_else(|| StoreError::NotFound {
                    kind: "client key",
                    id: id_or_name.clone(),
                })?;
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
        self.call(|conn, _| {
            Ok(conn.query_row(
                "SELECT MIN(expire_time) FROM client_keys
                 WHERE revoked = 0 AND expiry_published = 0 AND expire_time IS NOT NULL",
                [],
                |r| r.get(0),
            )?)
        })
        .await
    }

    /// Bumps the snapshot version once for the active keys that expired by `now`, so the
    /// data planes learn of it as of any other change; returns how many expired. A key's
    /// expiry bumps the version once, however often this runs.
    pub async fn publish_key_expiries(&self, now: i64) -> Result<usize, StoreError> {
        self.write(WriteOp::admin, move |conn, _| {
            let tx = conn.transaction()?;
            let expired = tx.execute(
                "UPDATE client_keys SET expiry_published = 1
                 WHERE revoked = 0 AND expiry_published = 0 AND expire_time <= ?1",
                params![now],
            )?;
            if expired > 0 {
                bump_version(&tx)?;
            }
            tx.commit()?;
            Ok(expired)
        })
        .await
    }
}

pub(crate) fn load_keys(
    conn: &Connection,
    active_only: bool,
) -> Result<Vec<ClientKey>, StoreError> {
    let sql = if active_only {
        "SELECT id, name, key_prefix, key_sha256, allowed_models, rpm_limit, revoked, create_time, revoke_time, expire_time
         FROM client_keys WHERE revoked = 0 ORDER BY create_time, id"
    } else {
        "SELECT id, name, key_prefix, key_sha256, allowed_models, rpm_limit, revoked, create_time, revoke_time, expire_time
         FROM client_keys ORDER BY create_time, id"
    };
    let mut stmt = conn.prepare_cached(sql)?;
    let rows = stmt.query_map([], |r| {
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
            },
            r.get::<_, String>(4)?,
        ))
    })?;
    let mut keys = Vec::new();
    for row in rows {
        let (mut key, models) = row?;
        key.allowed_models = serde_json::from_str(&models)
            .map_err(|e| StoreError::Corrupt(format!("client key {}: {e}", key.id)))?;
        keys.push(key);
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    use crate::crypto::MasterKey;

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
        assert_eq!(store.next_key_expiry().await.unwrap(), None);
        let listed = store.list_client_keys().await.unwrap();
        assert!(listed[0].expired_at(at));
        assert!(!listed[0].expired_at(at - 1));
    }
}
