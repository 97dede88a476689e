//! `DataPlaneService`: streams snapshots to replicas and takes their usage and
//! cooldown reports. Who is connected and who holds a share of the RPM limits is
//! [`crate::membership`]'s.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use sluice_proto::limits::MAX_ID_BYTES;
use sluice_proto::v1 as pb;
use sluice_proto::v1::data_plane_service_server::DataPlaneService;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::ingest::{Applied, UsageWriter, batch_of, cooldown_events};
use crate::membership::{Membership, Registry};
use crate::snapshot::Publisher;
use crate::store::{NodeHello, Store};
use crate::time::now_ms;

/// The service data planes call.
#[derive(Clone)]
pub struct DataPlaneApi {
    store: Store,
    publisher: Arc<Publisher>,
    membership: Membership,
    /// Usage batches from every stream, committed together.
    usage: UsageWriter,
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
            membership: Membership::new(store.clone(), registry),
            store,
            publisher,
            stop,
        }
    }

    async fn left(&self, node_id: &str) {
        self.membership
            .left(node_id, now_ms(), self.stop.is_cancelled())
            .await;
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
        let first_version = self.membership.joined(&hello, now_ms()).await?;

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
                        snapshot: Some(crate::snapshot::as_sent(&snapshot, now_ms())),
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
                            api.membership.registry().record(&node_id, m.version, &m.error_detail);
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
            self.store.record_cooldowns(cooldown_events(&batch)).await?;
        }
        if batch.records.is_empty() {
            return Ok(None);
        }
        check_id("incarnation", &batch.incarnation)?;
        let applied = self.usage.submit(batch_of(batch)).await;
        Ok(Some(applied))
    }
}
