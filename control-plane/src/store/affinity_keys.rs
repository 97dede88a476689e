//! The affinity keys: secrets every data plane shares to sign and check the response ids of
//! the Responses API (docs/responses.md). Stored encrypted under the master key like provider
//! keys; they leave the control plane only inside snapshots.

use rusqlite::{Connection, Transaction, params};
use sluice_proto::v1 as pb;

use super::StoreError;
use crate::crypto::MasterKey;
use crate::time::now_ms;

/// Associated data of key `id`'s ciphertext, so a ciphertext cannot be moved to another row.
fn aad(id: i64) -> Vec<u8> {
    format!("sluice:affinity-key:{id}").into_bytes()
}

/// Creates a key if none is active (a new database, or one from before affinity keys);
/// returns whether it did. Called when the store opens, before any snapshot is built, so the
/// version need not move.
pub(crate) fn ensure_active(tx: &Transaction<'_>, key: &MasterKey) -> Result<bool, StoreError> {
    let active: i64 = tx.query_row(
        "SELECT count(*) FROM affinity_keys WHERE retire_time IS NULL",
        [],
        |r| r.get(0),
    )?;
    if active > 0 {
        return Ok(false);
    }
    insert_new(tx, key)?;
    Ok(true)
}

/// Adds a new key, which signs from the next snapshot that carries it on; the others keep
/// verifying. The caller bumps the version if snapshots were already published.
pub(crate) fn insert_new(tx: &Transaction<'_>, key: &MasterKey) -> Result<i64, StoreError> {
    let id: i64 = tx.query_row(
        "SELECT coalesce(max(id), 0) + 1 FROM affinity_keys",
        [],
        |r| r.get(0),
    )?;
    let secret: [u8; 32] = rand::random();
    let sealed = key.encrypt(&secret, &aad(id))?;
    tx.execute(
        "INSERT INTO affinity_keys (id, secret_ciphertext, create_time) VALUES (?1, ?2, ?3)",
        params![id, sealed, now_ms()],
    )?;
    Ok(id)
}

/// A new signing key; of the active ones before it only the newest keeps verifying, the
/// others are retired. Returns the new key's id and how many were retired; the caller bumps
/// the version.
pub(crate) fn rotate(tx: &Transaction<'_>, key: &MasterKey) -> Result<(i64, usize), StoreError> {
    let previous: Option<i64> = tx.query_row(
        "SELECT max(id) FROM affinity_keys WHERE retire_time IS NULL",
        [],
        |r| r.get(0),
    )?;
    let retired = tx.execute(
        "UPDATE affinity_keys SET retire_time = ?1 WHERE retire_time IS NULL AND id < ?2",
        params![now_ms(), previous.unwrap_or(0)],
    )?;
    let id = insert_new(tx, key)?;
    Ok((id, retired))
}

/// The active keys, decrypted, newest first (the first signs).
pub(crate) fn load_active(
    conn: &Connection,
    key: &MasterKey,
) -> Result<Vec<pb::AffinityKey>, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT id, secret_ciphertext FROM affinity_keys WHERE retire_time IS NULL ORDER BY id DESC",
    )?;
    let rows: Vec<(i64, Vec<u8>)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    rows.into_iter()
        .map(|(id, sealed)| {
            let secret = key.decrypt(&sealed, &aad(id)).map_err(|_| {
                StoreError::Corrupt(format!("affinity key {id} cannot be decrypted"))
            })?;
            let id = u32::try_from(id)
                .map_err(|_| StoreError::Corrupt(format!("affinity key id {id} out of range")))?;
            Ok(pb::AffinityKey { id, secret })
        })
        .collect()
}

/// Re-encrypts every key under `new` (master-key rotation); returns how many.
pub(crate) fn reencrypt(
    tx: &Transaction<'_>,
    old: &MasterKey,
    new: &MasterKey,
) -> Result<usize, StoreError> {
    // A database not yet opened by a control plane with affinity keys has no table.
    let table: i64 = tx.query_row(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'affinity_keys'",
        [],
        |r| r.get(0),
    )?;
    if table == 0 {
        return Ok(0);
    }
    let rows: Vec<(i64, Vec<u8>)> = {
        let mut stmt = tx.prepare("SELECT id, secret_ciphertext FROM affinity_keys")?;
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?
    };
    for (id, sealed) in &rows {
        let plain = old
            .decrypt(sealed, &aad(*id))
            .map_err(|_| StoreError::Corrupt(format!("affinity key {id} cannot be decrypted")))?;
        tx.execute(
            "UPDATE affinity_keys SET secret_ciphertext = ?1 WHERE id = ?2",
            params![new.encrypt(&plain, &aad(*id))?, id],
        )?;
    }
    Ok(rows.len())
}

impl super::Store {
    /// [`rotate`] in one write transaction that bumps the snapshot version.
    pub async fn rotate_affinity_key(&self) -> Result<(u32, u32), StoreError> {
        self.write(super::WriteOp::admin, |conn, key| {
            let tx = conn.transaction()?;
            let (id, retired) = rotate(&tx, key)?;
            super::bump_version(&tx)?;
            tx.commit()?;
            Ok((
                u32::try_from(id).unwrap_or(u32::MAX),
                u32::try_from(retired).unwrap_or(u32::MAX),
            ))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::store::Store;

    #[test]
    fn a_database_gets_one_key_stored_encrypted_and_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sluice.db");
        let master = MasterKey::generate();
        let first = {
            let _ = Store::open(&path, master.clone()).unwrap();
            let conn = Connection::open(&path).unwrap();
            let keys = load_active(&conn, &master).unwrap();
            assert_eq!(keys.len(), 1);
            assert_eq!(keys[0].secret.len(), 32);
            let sealed: Vec<u8> = conn
                .query_row("SELECT secret_ciphertext FROM affinity_keys", [], |r| {
                    r.get(0)
                })
                .unwrap();
            assert!(
                !sealed.windows(32).any(|w| w == keys[0].secret.as_slice()),
                "the secret is stored encrypted"
            );
            keys
        };
        // Opened again: the same key, not a new one.
        let _ = Store::open(&path, master.clone()).unwrap();
        let conn = Connection::open(&path).unwrap();
        assert_eq!(load_active(&conn, &master).unwrap(), first);

        // A master-key rotation re-encrypts it: same secret under the new key.
        drop(conn);
        let new = MasterKey::generate();
        Store::rotate_master_key(&path, &master, &new).unwrap();
        let conn = Connection::open(&path).unwrap();
        assert_eq!(load_active(&conn, &new).unwrap(), first);
        assert!(load_active(&conn, &master).is_err());
    }

    #[tokio::test]
    async fn a_rotation_keeps_the_previous_key_verifying_and_retires_the_older_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sluice.db");
        let master = MasterKey::generate();
        let (store, _) = Store::open(&path, master.clone()).unwrap();
        let ids = |conn: &Connection| -> Vec<u32> {
            load_active(conn, &master)
                .unwrap()
                .into_iter()
                .map(|k| k.id)
                .collect()
        };
        let version = store.snapshot_version().await.unwrap();
        assert_eq!(store.rotate_affinity_key().await.unwrap(), (2, 0));
        assert!(store.snapshot_version().await.unwrap() > version);
        assert_eq!(ids(&Connection::open(&path).unwrap()), vec![2, 1]);
        assert_eq!(store.rotate_affinity_key().await.unwrap(), (3, 1));
        assert_eq!(ids(&Connection::open(&path).unwrap()), vec![3, 2]);
    }
}
