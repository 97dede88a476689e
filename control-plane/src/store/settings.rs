//! The routing settings: one row holding the whole `Settings` message as JSON; fields a
//! row lacks (written by an older version) come from the defaults.

use rusqlite::{Connection, OptionalExtension as _, params};
use sluice_proto::v1 as pb;

use super::{Store, StoreError, WriteOp, bump_version};
use crate::validation::ValidationError;

impl Store {
    pub async fn get_settings(&self) -> Result<pb::Settings, StoreError> {
        self.call(|conn, _| load_settings(conn)).await
    }

    pub async fn put_settings(&self, settings: pb::Settings) -> Result<u64, StoreError> {
        self.update_settings(move |_| Ok(settings))
            .await
            .map(|(_, version)| version)
    }

    /// Replaces the settings with what `change` makes of the current ones, read in the same
    /// write transaction: two changes at once each see the other's (a read, then a separate
    /// write, let the later writer put back what the earlier had changed). Returns the new
    /// settings and the snapshot version that carries them.
    pub async fn update_settings<F>(&self, change: F) -> Result<(pb::Settings, u64), StoreError>
    where
        F: FnOnce(&pb::Settings) -> Result<pb::Settings, ValidationError> + Send + 'static,
    {
        self.write(WriteOp::admin, move |conn, _| {
            let tx = conn.transaction()?;
            let next = change(&load_settings(&tx)?)?;
            crate::settings::validate(&next)?;
            let body = serde_json::to_string(&next).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            tx.execute(
                "INSERT INTO settings (id, body) VALUES (1, ?1) ON CONFLICT (id) DO UPDATE SET body = excluded.body",
                params![body],
            )?;
            let version = bump_version(&tx)?;
            tx.commit()?;
            Ok((next, version))
        })
        .await
    }
}

pub(crate) fn load_settings(conn: &Connection) -> Result<pb::Settings, StoreError> {
    let body: Option<String> = conn
        .query_row("SELECT body FROM settings WHERE id = 1", [], |r| r.get(0))
        .optional()?;
    match body {
        None => Ok(sluice_domain::settings::defaults()),
        Some(body) => {
            let stored: pb::Settings = serde_json::from_str(&body)
                .map_err(|e| StoreError::Corrupt(format!("settings: {e}")))?;
            Ok(sluice_domain::settings::with_defaults(stored))
        }
    }
}
