//! What each data plane replica runs: recorded on connect and on every ack or nack. Also
//! which replicas hold a share of every RPM limit: a replica holds one from its connect
//! until a lease after its last stream closed. The count of holders is read in the same
//! read transaction as the rest of a snapshot, and every change of it bumps the snapshot
//! version in the transaction that makes it, so a snapshot's share always matches its
//! version.

use rusqlite::{Connection, OptionalExtension as _, params};

use super::{Reader, Store, StoreError, WriteOp, bump_version};
use crate::time::now_ms;

/// `share_until` of a replica with an open stream: its share lasts until it leaves.
const WHILE_CONNECTED: i64 = i64::MAX;

/// Who a connecting replica says it is.
#[derive(Debug, Clone)]
pub struct NodeHello {
    pub node_id: String,
    /// The process's incarnation (empty from a replica too old to send one).
    pub incarnation: String,
    pub hostname: String,
    pub peer_address: String,
    pub build_version: String,
}

#[cfg(test)]
impl NodeHello {
    /// A hello of `node_id` and `incarnation` (the other fields placeholders), for tests.
    pub(crate) fn of(node_id: &str, incarnation: &str) -> Self {
        Self {
            node_id: node_id.into(),
            incarnation: incarnation.into(),
            hostname: "h".into(),
            peer_address: "p".into(),
            build_version: "v".into(),
        }
    }
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
    /// A replica connected: it holds a share while connected, unless it is `leaving` (it
    /// stopped admitting requests: then it holds none). When that changes whether it holds
    /// one, the count of holders changes and the snapshot version is bumped in the same
    /// transaction. Returns the snapshot version its first snapshot must have at least.
    pub async fn record_connect(
        &self,
        hello: NodeHello,
        now: i64,
        leaving: bool,
    ) -> Result<u64, StoreError> {
        let share_until = (!leaving).then_some(WHILE_CONNECTED);
        self.write(WriteOp::data_plane, move |conn, _| {
            let tx = conn.transaction()?;
            let held: bool = tx
                .query_row(
                    "SELECT share_until IS NOT NULL FROM data_planes WHERE node_id = ?1",
                    params![hello.node_id],
                    |r| r.get(0),
                )
                .optional()?
                .unwrap_or(false);
            tx.execute(
                "INSERT INTO data_planes (node_id, hostname, peer_address, build_version, connect_time, last_seen_time, share_until)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?6)
                 ON CONFLICT (node_id) DO UPDATE SET hostname = excluded.hostname,
                     peer_address = excluded.peer_address, build_version = excluded.build_version,
                     connect_time = excluded.connect_time, last_seen_time = excluded.last_seen_time,
                     share_until = excluded.share_until",
                params![hello.node_id, hello.hostname, hello.peer_address, hello.build_version, now, share_until],
            )?;
            let version = if held == share_until.is_some() {
                super::read_version(&tx)?
            } else {
                bump_version(&tx)?
            };
            tx.commit()?;
            Ok(version)
        })
        .await
    }

    /// A replica's last stream closed at `now`: it keeps its share until `until` (it may
    /// still be serving on its last snapshot). The count does not change.
    pub async fn release_share(
        &self,
        node_id: String,
        now: i64,
        until: i64,
    ) -> Result<(), StoreError> {
        self.write(WriteOp::data_plane, move |conn, _| {
            conn.execute(
                "UPDATE data_planes SET last_seen_time = ?2, share_until = ?3
                 WHERE node_id = ?1 AND share_until IS NOT NULL",
                params![node_id, now, until],
            )?;
            Ok(())
        })
        .await
    }

    /// A replica stopped admitting requests at `now` (it drains what it took): its share ends
    /// at once, without a lease, the count of holders shrinking and the snapshot version
    /// bumped in the same transaction. Returns whether it held one.
    pub async fn end_share(&self, node_id: String, now: i64) -> Result<bool, StoreError> {
        self.write(WriteOp::data_plane, move |conn, _| {
            let tx = conn.transaction()?;
            let ended = tx.execute(
                "UPDATE data_planes SET last_seen_time = ?2, share_until = NULL
                 WHERE node_id = ?1 AND share_until IS NOT NULL",
                params![node_id, now],
            )?;
            if ended > 0 {
                bump_version(&tx)?;
            }
            tx.commit()?;
            Ok(ended > 0)
        })
        .await
    }

    /// Ends the shares whose lease ran out by `now`; if any did, the count of holders
    /// shrinks and the snapshot version is bumped in the same transaction. Returns how many
    /// ended.
    pub async fn expire_shares(&self, now: i64) -> Result<usize, StoreError> {
        self.write(WriteOp::data_plane, move |conn, _| {
            let tx = conn.transaction()?;
            let ended = tx.execute(
                "UPDATE data_planes SET share_until = NULL WHERE share_until <= ?1",
                params![now],
            )?;
            if ended > 0 {
                bump_version(&tx)?;
            }
            tx.commit()?;
            Ok(ended)
        })
        .await
    }

    /// Forgets the replicas last seen before `before` that hold no share (disconnected, their
    /// lease over): every start of a replica process is a row (its node id is the hostname
    /// and a random suffix by default), which every snapshot build and lease sweep read, so
    /// the table grew for as long as the control plane ran. Their usage high-water marks,
    /// which must outlive them, are another table's. Returns how many were forgotten.
    pub async fn forget_gone(&self, before: i64) -> Result<usize, StoreError> {
        self.write(WriteOp::data_plane, move |conn, _| {
            Ok(conn.execute(
                "DELETE FROM data_planes WHERE share_until IS NULL AND last_seen_time < ?1",
                params![before],
            )?)
        })
        .await
    }

    /// At start, no replica is connected yet, but those that were when the control plane
    /// stopped are still serving on their shares: each keeps its share until `until` (or
    /// its earlier lease), unless it reconnects first.
    pub async fn resume_shares(&self, until: i64) -> Result<(), StoreError> {
        self.write(WriteOp::data_plane, move |conn, _| {
            conn.execute(
                "UPDATE data_planes SET share_until = ?1 WHERE share_until > ?1",
                params![until],
            )?;
            Ok(())
        })
        .await
    }

    /// The replicas whose share is held while they are connected (not on a lease).
    pub async fn held_while_connected(&self) -> Result<Vec<String>, StoreError> {
        self.call(|conn, _| {
            let mut statement =
                conn.prepare("SELECT node_id FROM data_planes WHERE share_until = ?1")?;
            let rows = statement
                .query_map(params![WHILE_CONNECTED], |r| r.get(0))?
                .collect::<Result<Vec<String>, _>>()?;
            Ok(rows)
        })
        .await
    }

    /// When the next lease runs out (`None`: no replica is on a lease).
    pub async fn next_share_expiry(&self) -> Result<Option<i64>, StoreError> {
        self.call(|conn, _| {
            Ok(conn.query_row(
                "SELECT min(share_until) FROM data_planes WHERE share_until < ?1",
                params![WHILE_CONNECTED],
                |r| r.get(0),
            )?)
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
        self.read(Reader::Admin, move |conn, _| {
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

/// The node ids of the replicas that hold a share, sorted, read inside the snapshot's
/// transaction (see `Snapshot.share_holders`).
pub(crate) fn share_holders(conn: &Connection) -> Result<Vec<String>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT node_id FROM data_planes WHERE share_until IS NOT NULL ORDER BY node_id",
    )?;
    let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn hello(node: &str) -> NodeHello {
        NodeHello::of(node, "")
    }

    mod division {
        use super::*;
        use proptest::prelude::*;

        const NODES: usize = 4;
        const CONNECTED: i64 = i64::MAX;

        #[derive(Debug, Clone)]
        enum Op {
            Connect(usize),
            /// Its last stream closes; it keeps its share for a lease of this many ms.
            Leave(usize, i64),
            /// Time passes (ms), then the sweep ends the leases that ran out.
            Sweep(i64),
            /// The control plane starts again: every holder keeps its share for a lease of
            /// this many ms from now, or its earlier one.
            Restart(i64),
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                3 => (0..NODES).prop_map(Op::Connect),
                2 => (0..NODES, 0i64..60_000).prop_map(|(n, lease)| Op::Leave(n, lease)),
                3 => (0i64..40_000).prop_map(Op::Sweep),
                1 => (0i64..60_000).prop_map(Op::Restart),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(64))]

            /// The count every RPM limit is divided by, for any sequence of joins, leaves,
            /// sweeps and control-plane restarts: it is the number of replicas connected or
            /// on their lease (at least 1), so no replica that may still serve on its share is
            /// divided away; and it never changes without the version moving on, so no
            /// snapshot pairs a version with a count another snapshot of it had not.
            #[test]
            fn the_count_that_divides_a_limit_is_the_holders_and_moves_the_version(
                ops in prop::collection::vec(op(), 1..40)
            ) {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async {
                    let dir = tempfile::tempdir().unwrap();
                    let (store, _) = Store::open(
                        &dir.path().join("t.db"),
                        crate::crypto::MasterKey::generate(),
                    )
                    .unwrap();
                    // Each node's share: None, connected, or until a time (ms).
                    let mut model: [Option<i64>; NODES] = [None; NODES];
                    let mut now = 1_000;
                    let (mut count, mut version) = holders(&store).await;
                    for op in ops {
                        match op {
                            Op::Connect(n) => {
                                let first = store
                                    .record_connect(hello(&format!("n{n}")), now, false)
                                    .await
                                    .unwrap();
                                prop_assert!(first >= version);
                                model[n] = Some(CONNECTED);
                            }
                            Op::Leave(n, lease) => {
                                if model[n] == Some(CONNECTED) {
                                    store
                                        .release_share(format!("n{n}"), now, now + lease)
                                        .await
                                        .unwrap();
                                    model[n] = Some(now + lease);
                                }
                            }
                            Op::Sweep(elapsed) => {
                                now += elapsed;
                                store.expire_shares(now).await.unwrap();
                                for share in &mut model {
                                    if share.is_some_and(|until| until <= now) {
                                        *share = None;
                                    }
                                }
                            }
                            Op::Restart(lease) => {
                                store.resume_shares(now + lease).await.unwrap();
                                for share in model.iter_mut().flatten() {
                                    *share = (*share).min(now + lease);
                                }
                            }
                        }
                        let (c, v) = holders(&store).await;
                        let expected = model.iter().flatten().count().max(1);
                        prop_assert_eq!(c as usize, expected, "after {:?}", op);
                        prop_assert!(v >= version);
                        if c != count {
                            prop_assert!(v > version, "the count moved {} → {} at version {}", count, c, v);
                        }
                        (count, version) = (c, v);
                    }
                    Ok(())
                })?;
            }
        }
    }

    async fn holders(store: &Store) -> (u32, u64) {
        store
            .read(super::super::Reader::Snapshot, |conn, _| {
                let tx = conn.transaction()?;
                Ok((
                    share_holders(&tx)?.len().max(1) as u32,
                    super::super::read_version(&tx)?,
                ))
            })
            .await
            .unwrap()
    }

    /// A replica gone for long enough that holds no share is forgotten; one still holding a share
    /// (connected, or on its lease) is not, however long ago it was seen.
    #[tokio::test]
    async fn replicas_gone_holding_no_share_are_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(
            &dir.path().join("t.db"),
            crate::crypto::MasterKey::generate(),
        )
        .unwrap();
        for node in ["gone", "leased", "connected"] {
            store
                .record_connect(hello(node), 1_000, false)
                .await
                .unwrap();
        }
        store
            .release_share("gone".into(), 2_000, 32_000)
            .await
            .unwrap();
        store.expire_shares(32_000).await.unwrap();
        store
            .release_share("leased".into(), 2_000, 1_000_000)
            .await
            .unwrap();
        assert_eq!(store.forget_gone(1_500).await.unwrap(), 0, "seen since");
        assert_eq!(store.forget_gone(500_000).await.unwrap(), 1);
        let listed: Vec<String> = store
            .list_data_planes(0)
            .await
            .unwrap()
            .into_iter()
            .map(|row| row.node_id)
            .collect();
        assert_eq!(listed.len(), 2, "{listed:?}");
        assert!(!listed.contains(&"gone".to_owned()), "{listed:?}");
    }

    #[tokio::test]
    async fn a_share_lasts_from_connect_until_a_lease_after_leaving_and_each_change_bumps() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(
            &dir.path().join("t.db"),
            crate::crypto::MasterKey::generate(),
        )
        .unwrap();
        let (_, v0) = holders(&store).await;
        // A join is a new holder: the version moves with the count.
        let v1 = store
            .record_connect(hello("a"), 1_000, false)
            .await
            .unwrap();
        assert_eq!(holders(&store).await, (1, v1));
        assert!(v1 > v0);
        let v2 = store
            .record_connect(hello("b"), 1_000, false)
            .await
            .unwrap();
        assert_eq!(holders(&store).await, (2, v2));
        // A reconnect of a holder changes nothing.
        assert_eq!(
            store
                .record_connect(hello("b"), 1_500, false)
                .await
                .unwrap(),
            v2
        );
        // b leaves at 2 s with a lease to 32 s: still counted until then.
        store
            .release_share("b".into(), 2_000, 32_000)
            .await
            .unwrap();
        assert_eq!(store.next_share_expiry().await.unwrap(), Some(32_000));
        assert_eq!(store.expire_shares(31_999).await.unwrap(), 0);
        assert_eq!(holders(&store).await, (2, v2));
        assert_eq!(store.expire_shares(32_000).await.unwrap(), 1);
        let (count, v3) = holders(&store).await;
        assert_eq!(count, 1);
        assert!(v3 > v2);
        assert_eq!(store.next_share_expiry().await.unwrap(), None);

        // The control plane restarts with a still connected: a keeps its share for a lease
        // from the start, and loses it if it does not come back.
        store.resume_shares(100_000).await.unwrap();
        assert_eq!(store.next_share_expiry().await.unwrap(), Some(100_000));
        assert_eq!(holders(&store).await.0, 1);
        assert_eq!(store.expire_shares(100_000).await.unwrap(), 1);
        // None left: the one who comes next is told it is alone.
        assert_eq!(holders(&store).await.0, 1);

        // A replica that stopped admitting gives its share up at once, no lease; one that
        // connects while stopping takes none.
        let v4 = store
            .record_connect(hello("c"), 200_000, false)
            .await
            .unwrap();
        let v5 = store
            .record_connect(hello("d"), 200_000, false)
            .await
            .unwrap();
        assert_eq!(holders(&store).await, (2, v5));
        assert!(store.end_share("c".into(), 201_000).await.unwrap());
        let (count, v6) = holders(&store).await;
        assert_eq!(count, 1);
        assert!(v6 > v5 && v5 > v4);
        assert!(!store.end_share("c".into(), 202_000).await.unwrap());
        assert_eq!(
            store
                .record_connect(hello("c"), 203_000, true)
                .await
                .unwrap(),
            v6
        );
        assert_eq!(holders(&store).await, (1, v6));
        // d, reconnecting while stopping, gives up the share it held.
        let v7 = store
            .record_connect(hello("d"), 204_000, true)
            .await
            .unwrap();
        assert!(v7 > v6);
        assert_eq!(holders(&store).await, (1, v7), "none left, counted as one");
    }
}
