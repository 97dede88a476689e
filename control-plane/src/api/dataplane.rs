//! `DataPlaneService`: streams snapshots to replicas and takes their usage and
//! cooldown reports. Also keeps the registry of connected replicas and which of them hold
//! a share of every RPM limit: a replica holds one from its connect until
//! [`SHARE_LEASE`] after its last stream closed (see `docs/guarantees.md`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures::Stream;
use sluice_proto::limits::MAX_ID_BYTES;
use sluice_proto::v1 as pb;
use sluice_proto::v1::data_plane_service_server::DataPlaneService;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::ingest::{Applied, UsageWriter};
use crate::snapshot::Publisher;
use crate::store::{CooldownEvent, NodeHello, Store, StoreError, UsageBatch, UsageRow};
use crate::time::{now_ms, timestamp, timestamp_ms};

/// How long a replica keeps its share of every RPM limit after its last snapshot stream
/// closed (and, after a control-plane restart, after the start): it may still be serving
/// on its last snapshot, cut off or reconnecting, so the others are not given its share
/// before then.
pub const SHARE_LEASE: std::time::Duration = std::time::Duration::from_secs(30);

fn lease_ms() -> i64 {
    SHARE_LEASE.as_millis() as i64
}

/// Replicas with an open snapshot stream.
#[derive(Default)]
pub struct Registry {
    connected: Mutex<HashMap<String, Connected>>,
}

struct Connected {
    streams: u32,
    hostname: String,
    peer_address: String,
    build_version: String,
    connect_time_ms: i64,
    acked_version: u64,
    last_error: String,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Connected>> {
        self.connected.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Returns the number of distinct connected replicas after the change.
    fn connect(&self, hello: &NodeHello) -> u32 {
        let mut map = self.lock();
        let entry = map
            .entry(hello.node_id.clone())
            .or_insert_with(|| Connected {
                streams: 0,
                hostname: hello.hostname.clone(),
                peer_address: hello.peer_address.clone(),
                build_version: hello.build_version.clone(),
                connect_time_ms: now_ms(),
                acked_version: 0,
                last_error: String::new(),
            });
        entry.streams += 1;
        map.len() as u32
    }

    /// Returns whether that was the replica's last stream, and the number of distinct
    /// connected replicas after the change.
    fn disconnect(&self, node_id: &str) -> (bool, u32) {
        let mut map = self.lock();
        let mut last = false;
        if let Some(entry) = map.get_mut(node_id) {
            entry.streams = entry.streams.saturating_sub(1);
            if entry.streams == 0 {
                map.remove(node_id);
                last = true;
            }
        }
        (last, map.len() as u32)
    }

    fn record(&self, node_id: &str, version: u64, error: &str) {
        if let Some(entry) = self.lock().get_mut(node_id) {
            if error.is_empty() {
                entry.acked_version = entry.acked_version.max(version);
                entry.last_error.clear();
            } else {
                entry.last_error = error.to_owned();
            }
        }
    }

    pub fn connected_count(&self) -> usize {
        self.lock().len()
    }

    /// Connected replicas, then those seen in the last 24 hours.
    pub async fn list(
        &self,
        store: &Store,
        publisher: &Publisher,
    ) -> Result<Vec<pb::DataPlane>, StoreError> {
        let latest = publisher.latest().version;
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
                    last_error: c.last_error.clone(),
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

/// The service data planes call.
#[derive(Clone)]
pub struct DataPlaneApi {
    store: Store,
    publisher: Arc<Publisher>,
    registry: Arc<Registry>,
    /// Usage batches from every stream, committed together.
    usage: UsageWriter,
    /// Held while a replica joins or leaves: the registry and the stored shares change
    /// together, one replica at a time.
    membership: Arc<tokio::sync::Mutex<()>>,
    /// Cancelled at shutdown: open streams end so the server can stop.
    stop: CancellationToken,
}

impl DataPlaneApi {
    pub fn new(
        store: Store,
        publisher: Arc<Publisher>,
        registry: Arc<Registry>,
        stop: CancellationToken,
    ) -> Self {
        Self {
            usage: UsageWriter::start(store.clone()),
            store,
            publisher,
            registry,
            membership: Arc::default(),
            stop,
        }
    }

    /// A replica's stream ended. Its last one: the replica keeps its share for the lease,
    /// unless the control plane is stopping (then it keeps it until the next start, which
    /// gives it a lease of its own).
    async fn left(&self, node_id: &str) {
        let _membership = self.membership.lock().await;
        let (last, count) = self.registry.disconnect(node_id);
        tracing::info!(node = %node_id, replicas = count, "data plane disconnected");
        if !last {
            return;
        }
        let now = now_ms();
        let result = if self.stop.is_cancelled() {
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

/// Ends the shares whose lease ran out, as they run out, until `stop`. Each that ends
/// re-divides every RPM limit among the replicas left (a new snapshot).
pub async fn expire_shares(store: Store, stop: CancellationToken) {
    loop {
        let wait = match store.next_share_expiry().await {
            Ok(Some(at)) => {
                std::time::Duration::from_millis(at.saturating_sub(now_ms()).max(0) as u64)
            }
            Ok(None) => SHARE_LEASE,
            Err(err) => {
                tracing::warn!(error = %err, "reading replica leases failed; will retry");
                std::time::Duration::from_secs(1)
            }
        };
        // Also wakes for leases that start meanwhile: they run a full lease from now.
        tokio::select! {
            () = tokio::time::sleep(wait.min(SHARE_LEASE)) => {}
            () = stop.cancelled() => return,
        }
        match store.expire_shares(now_ms()).await {
            Ok(0) => {}
            Ok(ended) => tracing::info!(ended, "replica shares lapsed; RPM limits re-divided"),
            Err(err) => tracing::warn!(error = %err, "ending replica leases failed; will retry"),
        }
    }
}

/// What a usage stream owes its replica, in the order the batches came.
enum Owed {
    Ack(oneshot::Receiver<Applied>),
    Error(Status),
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn check_id(field: &str, value: &str) -> Result<(), Status> {
    if value.is_empty() || value.len() > MAX_ID_BYTES || value.chars().any(char::is_control) {
        return Err(Status::invalid_argument(format!(
            "{field}: must be 1 to {MAX_ID_BYTES} bytes without control characters"
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl DataPlaneService for DataPlaneApi {
    type StreamSnapshotsStream = BoxStream<pb::StreamSnapshotsResponse>;
    type ReportUsageStream = BoxStream<pb::ReportUsageResponse>;

    async fn stream_snapshots(
        &self,
        request: Request<Streaming<pb::StreamSnapshotsRequest>>,
    ) -> Result<Response<Self::StreamSnapshotsStream>, Status> {
        let peer = request
            .remote_addr()
            .map(|a: SocketAddr| a.to_string())
            .unwrap_or_default();
        let mut inbound = request.into_inner();
        let first = inbound.message().await?.ok_or_else(|| {
            Status::invalid_argument("the stream must start with a hello carrying node_id")
        })?;
        check_id("node_id", &first.node_id)?;
        let hello = NodeHello {
            node_id: first.node_id.clone(),
            hostname: first.hostname.chars().take(MAX_ID_BYTES).collect(),
            peer_address: peer,
            build_version: first.build_version.chars().take(64).collect(),
        };
        let first_version = {
            let _membership = self.membership.lock().await;
            let version = self.store.record_connect(hello.clone(), now_ms()).await?;
            let count = self.registry.connect(&hello);
            tracing::info!(node = %hello.node_id, peer = %hello.peer_address, replicas = count, "data plane connected");
            version
        };

        let (tx, rx) = mpsc::channel(2);
        let api = self.clone();
        let mut snapshots = self.publisher.subscribe();
        let node_id = hello.node_id;
        tokio::spawn(async move {
            // The first snapshot counts this replica among those sharing the RPM limits:
            // it may not be published yet.
            let published = async {
                snapshots
                    .wait_for(|s| s.version >= first_version)
                    .await
                    .map(|s| Arc::clone(&s))
                    .ok()
            };
            let first = tokio::select! {
                first = published => first,
                () = api.stop.cancelled() => None,
            };
            let Some(first) = first else {
                return api.left(&node_id).await;
            };
            // That one at once, then each newer one.
            let mut pending = Some(first);
            loop {
                if let Some(snapshot) = pending.take() {
                    let message = pb::StreamSnapshotsResponse {
                        snapshot: Some((*snapshot).clone()),
                    };
                    if tx.send(Ok(message)).await.is_err() {
                        break;
                    }
                }
                tokio::select! {
                    changed = snapshots.changed() => {
                        if changed.is_err() { break; }
                        pending = Some(snapshots.borrow_and_update().clone());
                    }
                    message = inbound.message() => match message {
                        Ok(Some(m)) => {
                            if !m.error_detail.is_empty() {
                                tracing::warn!(node = %node_id, version = m.version, error = %m.error_detail, "data plane refused a snapshot");
                            }
                            api.registry.record(&node_id, m.version, &m.error_detail);
                            if let Err(err) = api.store.record_ack(node_id.clone(), m.version, m.error_detail).await {
                                tracing::error!(error = %err, "recording an ack failed");
                            }
                        }
                        Ok(None) => break,
                        Err(status) => {
                            tracing::debug!(node = %node_id, %status, "snapshot stream ended");
                            break;
                        }
                    },
                    () = tx.closed() => break,
                    () = api.stop.cancelled() => break,
                }
            }
            api.left(&node_id).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn report_usage(
        &self,
        request: Request<Streaming<pb::ReportUsageRequest>>,
    ) -> Result<Response<Self::ReportUsageStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        // Batches go to the writer as they arrive, without waiting for the previous
        // commit; their acks go back in order from a second task.
        let (pending_tx, mut pending) = mpsc::channel::<Owed>(64);
        tokio::spawn(async move {
            while let Some(owed) = pending.recv().await {
                let reply = match owed {
                    Owed::Ack(applied) => match applied.await {
                        Ok(Ok(acked_sequence)) => Ok(pb::ReportUsageResponse { acked_sequence }),
                        Ok(Err(err)) => Err(Status::from(err)),
                        Err(_) => Err(Status::unavailable("the control plane is shutting down")),
                    },
                    Owed::Error(status) => Err(status),
                };
                let failed = reply.is_err();
                if tx.send(reply).await.is_err() || failed {
                    break;
                }
            }
        });
        let api = self.clone();
        tokio::spawn(async move {
            loop {
                // A batch already handed to the writer is committed before stopping;
                // only waiting for the next one stops.
                let message = tokio::select! {
                    message = inbound.message() => message,
                    () = api.stop.cancelled() => break,
                };
                let batch = match message {
                    Ok(Some(batch)) => batch,
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(%status, "usage stream ended");
                        // After the acks owed: a report refused as too large tells the
                        // replica which one it was (the first it holds unacked).
                        let _ = pending_tx.send(Owed::Error(status)).await;
                        break;
                    }
                };
                match api.apply(batch).await {
                    Ok(Some(applied)) => {
                        if pending_tx.send(Owed::Ack(applied)).await.is_err() {
                            break;
                        }
                    }
                    Ok(None) => {}
                    Err(status) => {
                        // After the acks already owed, so none is lost.
                        let _ = pending_tx.send(Owed::Error(status)).await;
                        break;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

impl DataPlaneApi {
    /// Cooldown events first, so other replicas learn of a 429 without waiting
    /// for the usage write; then hands the records to the writer, which stores them
    /// and the high-water mark together. Returns where their ack will come from.
    async fn apply(
        &self,
        batch: pb::ReportUsageRequest,
    ) -> Result<Option<oneshot::Receiver<Applied>>, Status> {
        check_id("node_id", &batch.node_id)?;
        if !batch.events.is_empty() {
            let events = batch
                .events
                .iter()
                .filter_map(|e| {
                    Some(CooldownEvent {
                        backend_id: e.backend_id.clone(),
                        until_ms: timestamp_ms(e.cooldown_until.as_ref()?),
                        consecutive_failures: e.consecutive_failures,
                        reason: e.reason.chars().take(200).collect(),
                        reported_by: batch.node_id.clone(),
                    })
                })
                .collect();
            self.store.record_cooldowns(events).await?;
        }
        if batch.records.is_empty() {
            return Ok(None);
        }
        check_id("incarnation", &batch.incarnation)?;
        let rows: Vec<UsageRow> = batch.records.iter().map(UsageRow::from).collect();
        let applied = self
            .usage
            .submit(UsageBatch {
                node_id: batch.node_id,
                incarnation: batch.incarnation,
                rows,
                previous_sequence: batch.previous_sequence,
            })
            .await;
        Ok(Some(applied))
    }
}
