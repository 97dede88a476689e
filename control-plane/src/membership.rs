//! Which replicas are connected, and which hold a share of every RPM limit.
//!
//! A replica holds a share from the moment its snapshot stream opens until [`SHARE_LEASE`]
//! after its last stream closed: it may still be serving on its last snapshot (cut off,
//! reconnecting), so the others are not given its share before then. A control plane that
//! starts gives every replica that held a share when it stopped such a lease from the start.
//! The holders are stored with the replicas; every change of their number bumps the snapshot
//! version in the transaction that makes it, and a snapshot reads the number in its own read
//! transaction, so a snapshot's count always matches its version. Joins and leaves are
//! applied one at a time ([`Membership`]), so the connected registry and the stored shares
//! never disagree. The bound this gives on the sum of the shares is in `docs/guarantees.md`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluice_proto::v1 as pb;
use tokio_util::sync::CancellationToken;

use crate::store::{NodeHello, Store, StoreError};
use crate::time::{now_ms, timestamp};

/// How long a replica keeps its share after its last snapshot stream closed (or after a
/// control-plane start, for the replicas that held one when it stopped).
pub const SHARE_LEASE: Duration = Duration::from_secs(30);

fn lease_ms() -> i64 {
    SHARE_LEASE.as_millis() as i64
}

/// Why a replica is listed with an error when two processes use its node id.
const SHARED_NODE_ID: &str = "two replicas connected with this node id at once (or a restarted one while its old connection was still open): replicas sharing a node id take one replica's share of each limit each; give every replica its own --node-id";

/// Replicas with an open snapshot stream.
#[derive(Default)]
pub struct Registry {
    connected: Mutex<HashMap<String, Connected>>,
}

struct Connected {
    /// Open streams by the incarnation that opened them (empty: a replica too old to send
    /// one). More than one incarnation: two processes use this node id.
    streams: HashMap<String, u32>,
    hostname: String,
    peer_address: String,
    build_version: String,
    connect_time_ms: i64,
    acked_version: u64,
    last_error: String,
}

impl Connected {
    /// Streams of two incarnations are open: two processes with one node id.
    fn shared(&self) -> bool {
        self.streams.keys().filter(|i| !i.is_empty()).count() > 1
    }
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Connected>> {
        self.connected.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Returns the number of distinct connected replicas after the change.
    ///
    /// Replicas are told apart by node id: two live processes given the same one count as
    /// one, and each takes the share of every limit that one replica has (so together
    /// twice it). That is a configuration mistake the control plane cannot undo (a restarted
    /// replica must take over its own share, under a new incarnation), but it can say so: a
    /// stream of another incarnation while one is open is logged, and the replica is listed
    /// with that error while streams of both are open.
    fn connect(&self, hello: &NodeHello) -> u32 {
        let mut map = self.lock();
        let entry = map
            .entry(hello.node_id.clone())
            .or_insert_with(|| Connected {
                streams: HashMap::new(),
                hostname: hello.hostname.clone(),
                peer_address: hello.peer_address.clone(),
                build_version: hello.build_version.clone(),
                connect_time_ms: now_ms(),
                acked_version: 0,
                last_error: String::new(),
            });
        *entry.streams.entry(hello.incarnation.clone()).or_default() += 1;
        if entry.shared() {
            tracing::warn!(node_id = %hello.node_id, "{SHARED_NODE_ID}");
        }
        map.len() as u32
    }

    /// Returns whether that was the replica's last stream, and the number of distinct
    /// connected replicas after the change.
    fn disconnect(&self, node_id: &str, incarnation: &str) -> (bool, u32) {
        let mut map = self.lock();
        let mut last = false;
        if let Some(entry) = map.get_mut(node_id) {
            if let Some(streams) = entry.streams.get_mut(incarnation) {
                *streams = streams.saturating_sub(1);
                if *streams == 0 {
                    entry.streams.remove(incarnation);
                }
            }
            if entry.streams.is_empty() {
                map.remove(node_id);
                last = true;
            }
        }
        (last, map.len() as u32)
    }

    /// Records an ack (`error` empty) or a nack of `version` by a connected replica.
    pub fn record(&self, node_id: &str, version: u64, error: &str) {
        if let Some(entry) = self.lock().get_mut(node_id) {
            if error.is_empty() {
                entry.acked_version = entry.acked_version.max(version);
                entry.last_error.clear();
            } else {
                entry.last_error = error.to_owned();
            }
        }
    }

    /// Whether no stream of another incarnation than `hello`'s is open under its node id.
    fn alone(&self, hello: &NodeHello) -> bool {
        self.lock().get(&hello.node_id).is_none_or(|entry| {
            entry
                .streams
                .keys()
                .all(|incarnation| *incarnation == hello.incarnation)
        })
    }

    /// The node ids with a stream open.
    fn connected_ids(&self) -> std::collections::HashSet<String> {
        self.lock().keys().cloned().collect()
    }

    pub fn connected_count(&self) -> usize {
        self.lock().len()
    }

    /// Connected replicas, then those seen in the last 24 hours; `latest` is the newest
    /// published snapshot version.
    pub async fn list(&self, store: &Store, latest: u64) -> Result<Vec<pb::DataPlane>, StoreError> {
        let rows = store.list_data_planes(now_ms() - 24 * 3_600_000).await?;
        let now = now_ms();
        let mut out: Vec<pb::DataPlane> = {
            let map = self.lock();
            map.iter()
                .map(|(node_id, c)| pb::DataPlane {
                    node_id: node_id.clone(),
                    hostname: c.hostname.clone(),
                    peer_address: c.peer_address.clone(),
                    acked_version: c.acked_version,
                    latest_version: latest,
                    last_error: if c.shared() {
                        SHARED_NODE_ID.to_owned()
                    } else {
                        c.last_error.clone()
                    },
                    connect_time: Some(timestamp(c.connect_time_ms)),
                    // An open stream is a live replica: it is seen now.
                    last_seen_time: Some(timestamp(now)),
                    connected: true,
                    build_version: c.build_version.clone(),
                })
                .collect()
        };
        out.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        for row in rows {
            if out.iter().any(|d| d.node_id == row.node_id) {
                continue;
            }
            out.push(pb::DataPlane {
                node_id: row.node_id,
                hostname: row.hostname,
                peer_address: row.peer_address,
                acked_version: row.acked_version,
                latest_version: latest,
                last_error: row.last_error,
                connect_time: Some(timestamp(row.connect_time_ms)),
                last_seen_time: Some(timestamp(row.last_seen_time_ms)),
                connected: false,
                build_version: row.build_version,
            });
        }
        Ok(out)
    }
}

/// Joins and leaves, one at a time: the registry and the stored shares change together.
#[derive(Clone)]
pub struct Membership {
    store: Store,
    registry: Arc<Registry>,
    lock: Arc<tokio::sync::Mutex<()>>,
}

impl Membership {
    pub fn new(store: Store, registry: Arc<Registry>) -> Self {
        Self {
            store,
            registry,
            lock: Arc::default(),
        }
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// A replica's snapshot stream opened at `now`, the replica `leaving` or not (stopped
    /// admitting requests: then it holds no share, [`Membership::leaving`]). Returns the
    /// snapshot version its first snapshot must have at least: one that counts it among the
    /// share holders, or no longer does.
    pub async fn joined(
        &self,
        hello: &NodeHello,
        now: i64,
        leaving: bool,
    ) -> Result<u64, StoreError> {
        let _one_at_a_time = self.lock.lock().await;
        let version = self
            .store
            .record_connect(hello.clone(), now, leaving && self.registry.alone(hello))
            .await?;
        let count = self.registry.connect(hello);
        tracing::info!(node = %hello.node_id, peer = %hello.peer_address, replicas = count, leaving, "data plane connected");
        Ok(version)
    }

    /// A connected replica stopped admitting requests at `now` (its listener closed for a
    /// stop; it drains what it took): its share of every limit ends at once, without the lease
    /// of a replica gone from its stream, which may still be serving. A rollout or a scale-down
    /// otherwise had the replicas left enforce each limit as if the stopping ones served too,
    /// for their whole drain. Not while another process uses the node id: its share is that
    /// one's too.
    pub async fn leaving(&self, hello: &NodeHello, now: i64) {
        let _one_at_a_time = self.lock.lock().await;
        if !self.registry.alone(hello) {
            return;
        }
        match self.store.end_share(hello.node_id.clone(), now).await {
            Ok(ended) => {
                tracing::info!(node = %hello.node_id, ended, "data plane stopping: its share of the limits goes to the others")
            }
            Err(err) => tracing::error!(error = %err, "recording a replica's stop failed"),
        }
    }

    /// A replica's snapshot stream closed at `now`. After its last one the replica keeps its
    /// share for [`SHARE_LEASE`], unless the control plane is `stopping`: then it keeps it
    /// until the next start, which gives it a lease of its own.
    pub async fn left(&self, hello: &NodeHello, now: i64, stopping: bool) {
        let node_id = hello.node_id.as_str();
        let _one_at_a_time = self.lock.lock().await;
        let (last, count) = self.registry.disconnect(node_id, &hello.incarnation);
        tracing::info!(node = %node_id, replicas = count, "data plane disconnected");
        if !last {
            return;
        }
        let result = if stopping {
            self.store.record_seen(node_id.to_owned()).await
        } else {
            self.store
                .release_share(node_id.to_owned(), now, now + lease_ms())
                .await
        };
        if let Err(err) = result {
            tracing::error!(error = %err, "recording a replica's departure failed");
        }
    }
}

impl Membership {
    /// Puts on a lease every share stored as held while connected by a replica the registry
    /// has no stream of. A join cut off after its write committed (the replica gone before
    /// its first snapshot: its call was dropped while the write, which cannot be cancelled,
    /// went on) or a departure whose write failed left such a share: held for good, it made
    /// every snapshot count a replica too many, each replica taking a smaller share of every
    /// limit, until the control plane restarted. Under the join lock, so no join or leave is
    /// half done meanwhile; not once `stop` is cancelled (the control plane is stopping: its
    /// replicas' streams end, and they keep their shares until its next start).
    pub async fn release_orphans(&self, now: i64, stop: &CancellationToken) {
        let _one_at_a_time = self.lock.lock().await;
        if stop.is_cancelled() {
            return;
        }
        let holders = match self.store.held_while_connected().await {
            Ok(holders) => holders,
            Err(err) => {
                tracing::warn!(error = %err, "reading replica shares failed; will retry");
                return;
            }
        };
        let connected = self.registry.connected_ids();
        for node_id in holders.into_iter().filter(|n| !connected.contains(n)) {
            tracing::warn!(node = %node_id, "a replica held a share with no stream open (its join or departure was cut off); its share now ends after a lease");
            if let Err(err) = self
                .store
                .release_share(node_id, now, now + lease_ms())
                .await
            {
                tracing::warn!(error = %err, "releasing a replica's share failed; will retry");
            }
        }
    }
}

/// At a control-plane start at `now`: the replicas that held a share when it stopped are
/// still serving on it, so each keeps it for a lease from now unless it reconnects first.
pub async fn resume(store: &Store, now: i64) -> Result<(), StoreError> {
    store.resume_shares(now + lease_ms()).await
}

/// Ends the shares whose lease ran out, as they run out, until `stop`. Each that ends
/// re-divides every RPM limit among the replicas left (a new snapshot). At least once a lease
/// it also puts on a lease the shares held "while connected" by replicas with no stream open
/// ([`Membership::release_orphans`]).
pub async fn expire_shares(membership: Membership, stop: CancellationToken) {
    let store = membership.store.clone();
    loop {
        let wait = match store.next_share_expiry().await {
            Ok(Some(at)) => Duration::from_millis(at.saturating_sub(now_ms()).max(0) as u64),
            Ok(None) => SHARE_LEASE,
            Err(err) => {
                tracing::warn!(error = %err, "reading replica leases failed; will retry");
                Duration::from_secs(1)
            }
        };
        // A lease that starts meanwhile runs a full lease from now: waking at least once a
        // lease catches it.
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait.min(SHARE_LEASE)) => {}
        }
        membership.release_orphans(now_ms(), &stop).await;
        match store.expire_shares(now_ms()).await {
            Ok(0) => {}
            Ok(ended) => tracing::info!(ended, "replica shares lapsed; RPM limits re-divided"),
            Err(err) => tracing::warn!(error = %err, "ending replica leases failed; will retry"),
        }
        let before = now_ms().saturating_sub(FORGOTTEN_AFTER.as_millis() as i64);
        match store.forget_gone(before).await {
            Ok(0) => {}
            Ok(forgotten) => tracing::info!(forgotten, "forgot replicas gone for a week"),
            Err(err) => tracing::warn!(error = %err, "forgetting gone replicas failed; will retry"),
        }
    }
}

/// How long after it was last seen a replica holding no share is forgotten (no longer listed
/// by `ListDataPlanes`).
const FORGOTTEN_AFTER: Duration = Duration::from_secs(7 * 24 * 3600);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn hello(node: &str) -> NodeHello {
        NodeHello::of(node, "i1")
    }

    /// A join whose call was dropped after its write committed (the replica gone before its
    /// first snapshot) leaves a share held "while connected" with no stream to end it; so does
    /// a departure whose write failed. Each made every snapshot count a replica too many,
    /// dividing every limit among one replica more, until the control plane restarted.
    #[tokio::test]
    async fn a_share_held_with_no_stream_open_is_put_on_a_lease_and_ends() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(
            &dir.path().join("t.db"),
            crate::crypto::MasterKey::generate(),
        )
        .unwrap();
        let members = Membership::new(store.clone(), Arc::default());
        members.joined(&hello("live"), 1_000, false).await.unwrap();
        // The write of a join whose call was dropped: no stream, no registry entry.
        store
            .record_connect(hello("ghost"), 1_000, false)
            .await
            .unwrap();
        let mut held = store.held_while_connected().await.unwrap();
        held.sort();
        assert_eq!(held, ["ghost", "live"]);

        let running = CancellationToken::new();
        members.release_orphans(2_000, &running).await;
        assert_eq!(store.held_while_connected().await.unwrap(), ["live"]);
        assert_eq!(
            store.next_share_expiry().await.unwrap(),
            Some(2_000 + lease_ms())
        );
        assert_eq!(store.expire_shares(2_000 + lease_ms()).await.unwrap(), 1);
        // The connected replica keeps its share; a second sweep finds nothing more.
        members.release_orphans(3_000 + lease_ms(), &running).await;
        assert_eq!(store.held_while_connected().await.unwrap(), ["live"]);
        assert_eq!(store.next_share_expiry().await.unwrap(), None);
    }
}
