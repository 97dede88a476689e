//! The routing settings: one row holding the whole `Settings` message as JSON; fields a
//! row lacks (written by an older version) come from the defaults.

use rusqlite::{Connection, OptionalExtension as _, params};
use sluice_proto::v1 as pb;

use super::{Store, StoreError, WriteOp, bump_version};

impl Store {
    pub async fn get_settings(&self) -> Result<pb::Settings, StoreError> {
        self.call(|conn, _| load_settings(conn)).await
    }

    pub async fn put_settings(&self, settings: pb::Settings) -> Result<u64, StoreError> {
        crate::settings::validate(&settings)?;
        self.write(WriteOp::admin, move |conn, _| {
            let body = serde_json::to_string(&settings).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let tx = conn.transaction()?;
            tx.execute(
                "INSERT INTO settings (id, body) VALUES (1, ?1) ON CONFLICT (id) DO UPDATE SET body = excluded.body",
                params![body],
            )?;
            let version = bump_version(&tx)?;
            tx.commit()?;
            Ok(version)
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
