//! What each data plane replica runs: recorded on connect and on every ack or nack.

use rusqlite::params;

use super::{Store, StoreError, WriteOp};
use crate::time::now_ms;

/// Who a connecting replica says it is.
#[derive(Debug, Clone)]
pub struct NodeHello {
    pub node_id: String,
    pub hostname: String,
    pub peer_address: String,
    pub build_version: String,
}

/// A replica as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct DataPlaneRow {
    pub node_id: String,
    pub hostname: String,
    pub peer_address: String,
    pub build_version: String,
    pub acked_version: u64,
    pub last_error: String,
    pub connect_time_ms: i64,
    pub last_seen_time_ms: i64,
}

impl Store {
    pub async fn record_connect(&self, hello: NodeHello) -> Result<(), StoreError> {
        self.write(WriteOp::data_plane, move |conn, _| {
            let now = now_ms();
            conn.execute(
                "INSERT INTO data_planes (node_id, hostname, peer_address, build_version, connect_time, last_seen_time)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?5)
                 ON CONFLICT (node_id) DO UPDATE SET hostname = excluded.hostname,
                     peer_address = excluded.peer_address, build_version = excluded.build_version,
                     connect_time = excluded.connect_time, last_seen_time = excluded.last_seen_time",
                params![hello.node_id, hello.hostname, hello.peer_address, hello.build_version, now],
            )?;
            Ok(())
        })
        .await
    }

    /// Records an ack (`error` empty) or a nack of `version`.
    pub async fn record_ack(
        &self,
        node_id: String,
        version: u64,
        error: String,
    ) -> Result<(), StoreError> {
        self.write(WriteOp::data_plane, move |conn, _| {
            let now = now_ms();
            if error.is_empty() {
                conn.execute(
                    "UPDATE data_planes SET acked_version = max(acked_version, ?2), last_error = '', last_seen_time = ?3
                     WHERE node_id = ?1",
                    params![node_id, version as i64, now],
                )?;
            } else {
                conn.execute(
                    "UPDATE data_planes SET last_error = ?2, last_seen_time = ?3 WHERE node_id = ?1",
                    params![node_id, error, now],
                )?;
            }
            Ok(())
        })
        .await
    }

    pub async fn record_seen(&self, node_id: String) -> Result<(), StoreError> {
        self.write(WriteOp::data_plane, move |conn, _| {
            conn.execute(
                "UPDATE data_planes SET last_seen_time = ?2 WHERE node_id = ?1",
                params![node_id, now_ms()],
            )?;
            Ok(())
        })
        .await
    }

    /// Replicas seen since `since_ms`, most recently seen first.
    pub async fn list_data_planes(&self, since_ms: i64) -> Result<Vec<DataPlaneRow>, StoreError> {
        self.call(move |conn, _| {
            let mut stmt = conn.prepare_cached(
                "SELECT node_id, hostname, peer_address, build_version, acked_version, last_error,
                        connect_time, last_seen_time
                 FROM data_planes WHERE last_seen_time >= ?1 ORDER BY last_seen_time DESC, node_id",
            )?;
            let rows = stmt.query_map(params![since_ms], |r| {
                Ok(DataPlaneRow {
                    node_id: r.get(0)?,
                    hostname: r.get(1)?,
                    peer_address: r.get(2)?,
                    build_version: r.get(3)?,
                    acked_version: r.get::<_, i64>(4)?.max(0) as u64,
                    last_error: r.get(5)?,
                    connect_time_ms: r.get(6)?,
                    last_seen_time_ms: r.get(7)?,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }
}
