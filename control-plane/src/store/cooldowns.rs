//! Cooldowns reported by data planes (or reset by an operator), stored per backend.

use rusqlite::{Connection, params};
use sluice_proto::v1 as pb;

use super::backends::resolve_backend_id;
use super::{Store, StoreError, WriteOp, bump_version};
use crate::time::now_ms;

/// A backend cooling down.
#[derive(Debug, Clone, PartialEq)]
pub struct CooldownRow {
    pub backend_id: String,
    pub backend_name: String,
    pub until_ms: i64,
    pub consecutive_failures: u32,
    pub reason: String,
    pub reported_by: String,
    pub create_time_ms: i64,
}

/// A data plane's report that it cooled a backend down.
#[derive(Debug, Clone)]
pub struct CooldownEvent {
    pub backend_id: String,
    pub until_ms: i64,
    pub consecutive_failures: u32,
    pub reason: String,
    pub reported_by: String,
}

impl Store {
    /// Cooldowns still in force at `now_ms`.
    pub async fn list_cooldowns(&self) -> Result<Vec<CooldownRow>, StoreError> {
        self.call(|conn, _| load_active_cooldowns(conn, now_ms()))
            .await
    }

    /// Clears a backend's cooldown. Returns the new snapshot version.
    pub async fn reset_cooldown(&self, backend: String) -> Result<u64, StoreError> {
        self.write(WriteOp::cooldown, move |conn, _| {
            let tx = conn.transaction()?;
            let id = resolve_backend_id(&tx, &backend)?;
            tx.execute("DELETE FROM cooldowns WHERE backend_id = ?1", params![id])?;
            let version = bump_version(&tx)?;
            tx.commit()?;
            Ok(version)
        })
        .await
    }

    /// Records cooldown events; a cooldown only ever extends. Returns the new
    /// snapshot version when anything changed.
    pub async fn record_cooldowns(
        &self,
        events: Vec<CooldownEvent>,
    ) -> Result<Option<u64>, StoreError> {
        self.write(WriteOp::cooldown, move |conn, _| {
            let tx = conn.transaction()?;
            let now = now_ms();
            let mut changed = 0;
            for e in &events {
                if e.until_ms <= now {
                    continue;
                }
                // Unknown (deleted) backends are ignored, not an error: the data plane
                // may run an older snapshot.
                changed += tx.execute(
                    "INSERT INTO cooldowns (backend_id, until_time, consecutive_failures, reason, reported_by, create_time)
                     SELECT ?1, ?2, ?3, ?4, ?5, ?6 WHERE EXISTS (SELECT 1 FROM backends WHERE id = ?1)
                     ON CONFLICT (backend_id) DO UPDATE SET
                         until_time = excluded.until_time,
                         consecutive_failures = max(consecutive_failures, excluded.consecutive_failures),
                         reason = excluded.reason,
                         reported_by = excluded.reported_by,
                         create_time = CASE WHEN until_time <= ?6 THEN excluded.create_time ELSE create_time END
                     WHERE excluded.until_time > until_time",
                    params![e.backend_id, e.until_ms, e.consecutive_failures, e.reason, e.reported_by, now],
                )?;
            }
            if changed == 0 {
                return Ok(None);
            }
            let version = bump_version(&tx)?;
            tx.commit()?;
            Ok(Some(version))
        })
        .await
    }
}

pub(crate) fn load_active_cooldowns(
    conn: &Connection,
    now_ms: i64,
) -> Result<Vec<CooldownRow>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT c.backend_id, b.name, c.until_time, c.consecutive_failures, c.reason, c.reported_by, c.create_time
         FROM cooldowns c JOIN backends b ON b.id = c.backend_id
         WHERE c.until_time > ?1 ORDER BY c.until_time",
    )?;
    let rows = stmt.query_map(params![now_ms], |r| {
        Ok(CooldownRow {
            backend_id: r.get(0)?,
            backend_name: r.get(1)?,
            until_ms: r.get(2)?,
            consecutive_failures: r.get(3)?,
            reason: r.get(4)?,
            reported_by: r.get(5)?,
            create_time_ms: r.get(6)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

impl CooldownRow {
    pub fn to_proto(&self) -> pb::Cooldown {
        pb::Cooldown {
            backend_id: self.backend_id.clone(),
            backend_name: self.backend_name.clone(),
            until: Some(crate::time::timestamp(self.until_ms)),
            consecutive_failures: self.consecutive_failures,
            reason: self.reason.clone(),
            create_time: Some(crate::time::timestamp(self.create_time_ms)),
            reported_by: self.reported_by.clone(),
        }
    }
}
