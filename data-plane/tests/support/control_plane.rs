//! An in-process fake of the control plane's `DataPlaneService`: it publishes the snapshots a
//! test sets, records acks and nacks, applies usage with a high-water mark per
//! (node, incarnation) like the real one, and can cut every open stream on demand.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluice_proto::v1::data_plane_service_server::{DataPlaneService, DataPlaneServiceServer};
use sluice_proto::v1::{
    BackendEvent, ReportUsageRequest, ReportUsageResponse, Snapshot, StreamSnapshotsRequest,
    StreamSnapshotsResponse, UsageRecord,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

pub const TOKEN: &str = "dp-test-token-0123456789abcdef0123456789";

#[derive(Default)]
pub struct Recorded {
    /// Every StreamSnapshotsRequest received (hellos have version 0).
    pub snapshot_requests: Vec<StreamSnapshotsRequest>,
    /// Every record sequence received, duplicates included, in arrival order.
    pub received_sequences: Vec<u64>,
    /// The record sequences of each report received, in arrival order.
    pub reports: Vec<Vec<u64>>,
    /// Applied records by (node, incarnation) and sequence.
    pub applied: BTreeMap<(String, String), BTreeMap<u64, UsageRecord>>,
    pub events: Vec<BackendEvent>,
    pub rejected_auth: u64,
    pub usage_streams: u64,
    /// The `database_id` of each report received, in arrival order.
    pub report_databases: Vec<String>,
    /// The incarnations of the reports refused as served under another database than the
    /// snapshot's, as the control plane refuses them.
    pub refused_incarnations: Vec<String>,
}

impl Recorded {
    pub fn hellos(&self) -> usize {
        self.snapshot_requests
            .iter()
            .filter(|r| r.version == 0)
            .count()
    }

    pub fn acked(&self, version: u64) -> bool {
        self.snapshot_requests
            .iter()
            .any(|r| r.version == version && r.error_detail.is_empty())
    }

    pub fn nack(&self, version: u64) -> Option<&str> {
        self.snapshot_requests
            .iter()
            .find(|r| r.version == version && !r.error_detail.is_empty())
            .map(|r| r.error_detail.as_str())
    }

    /// All applied records, of every node and incarnation.
    pub fn records(&self) -> Vec<&UsageRecord> {
        self.applied.values().flat_map(|m| m.values()).collect()
    }
}

struct Shared {
    snapshot: watch::Sender<Option<Snapshot>>,
    recorded: Mutex<Recorded>,
    changed: watch::Sender<u64>,
    kill: watch::Sender<u64>,
    ack_usage: AtomicBool,
    stop: CancellationToken,
}

impl Shared {
    fn update(&self, f: impl FnOnce(&mut Recorded)) {
        f(&mut self.recorded.lock().unwrap());
        self.changed.send_modify(|n| *n += 1);
    }
}

#[derive(Clone)]
struct Service(Arc<Shared>);

fn check_auth<T>(shared: &Shared, request: &Request<T>) -> Result<(), Status> {
    let ok = request
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        == Some(&format!("Bearer {TOKEN}"));
    if ok {
        Ok(())
    } else {
        shared.update(|r| r.rejected_auth += 1);
        Err(Status::unauthenticated("bad data-plane token"))
    }
}

#[tonic::async_trait]
impl DataPlaneService for Service {
    type StreamSnapshotsStream = ReceiverStream<Result<StreamSnapshotsResponse, Status>>;
    type ReportUsageStream = ReceiverStream<Result<ReportUsageResponse, Status>>;

    async fn stream_snapshots(
        &self,
        request: Request<Streaming<StreamSnapshotsRequest>>,
    ) -> Result<Response<Self::StreamSnapshotsStream>, Status> {
        check_auth(&self.0, &request)?;
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let shared = Arc::clone(&self.0);
        tokio::spawn(async move {
            let mut snapshots = shared.snapshot.subscribe();
            let mut kill = shared.kill.subscribe();
            snapshots.mark_changed();
            loop {
                tokio::select! {
                    message = inbound.message() => match message {
                        Ok(Some(m)) => shared.update(|r| r.snapshot_requests.push(m)),
                        _ => return,
                    },
                    changed = snapshots.changed() => {
                        if changed.is_err() { return; }
                        let current = snapshots.borrow_and_update().clone();
                        if let Some(snapshot) = current {
                            let reply = StreamSnapshotsResponse { snapshot: Some(snapshot), allowances: None };
                            if tx.send(Ok(reply)).await.is_err() { return; }
                        }
                    }
                    _ = kill.changed() => {
                        let _ = tx.send(Err(Status::unavailable("killed by the test"))).await;
                        return;
                    }
                    () = shared.stop.cancelled() => return,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn report_usage(
        &self,
        request: Request<Streaming<ReportUsageRequest>>,
    ) -> Result<Response<Self::ReportUsageStream>, Status> {
        check_auth(&self.0, &request)?;
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let shared = Arc::clone(&self.0);
        shared.update(|r| r.usage_streams += 1);
        tokio::spawn(async move {
            let mut kill = shared.kill.subscribe();
            loop {
                tokio::select! {
                    message = inbound.message() => {
                        let batch = match message {
                            Ok(Some(batch)) => batch,
                            Ok(None) => return,
                            Err(status) => {
                                let _ = tx.send(Err(status)).await;
                                return;
                            }
                        };
                        // As the control plane: usage served under another database's
                        // snapshot is refused, and waits on the replica for that one.
                        let ours = shared
                            .snapshot
                            .borrow()
                            .as_ref()
                            .map(|s| s.database_id.clone())
                            .unwrap_or_default();
                        if !batch.database_id.is_empty() && !ours.is_empty() && batch.database_id != ours {
                            shared.update(|r| r.refused_incarnations.push(batch.incarnation.clone()));
                            let _ = tx
                                .send(Err(Status::failed_precondition("served under another database")))
                                .await;
                            return;
                        }
                        let ack = shared.ack_usage.load(Ordering::SeqCst);
                        let mut high_water = 0;
                        shared.update(|r| {
                            r.events.extend(batch.events.iter().cloned());
                            r.received_sequences.extend(batch.records.iter().map(|x| x.sequence));
                            r.reports.push(batch.records.iter().map(|x| x.sequence).collect());
                            r.report_databases.push(batch.database_id.clone());
                            if !ack { return; }
                            let applied = r
                                .applied
                                .entry((batch.node_id.clone(), batch.incarnation.clone()))
                                .or_default();
                            let hw = applied.keys().next_back().copied().unwrap_or(0);
                            for record in &batch.records {
                                if record.sequence > hw {
                                    applied.insert(record.sequence, record.clone());
                                }
                            }
                            high_water = applied.keys().next_back().copied().unwrap_or(0);
                        });
                        if ack
                            && tx
                                .send(Ok(ReportUsageResponse { acked_sequence: high_water }))
                                .await
                                .is_err()
                        {
                            return;
                        }
                    }
                    _ = kill.changed() => {
                        let _ = tx.send(Err(Status::unavailable("killed by the test"))).await;
                        return;
                    }
                    () = shared.stop.cancelled() => return,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

pub struct FakeControlPlane {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
    server: tokio::task::JoinHandle<()>,
}

impl FakeControlPlane {
    pub async fn start() -> Self {
        Self::start_at("127.0.0.1:0".parse().unwrap()).await
    }

    pub async fn start_at(addr: SocketAddr) -> Self {
        Self::start_with(addr, sluice_proto::limits::MAX_USAGE_REPORT_BYTES).await
    }

    /// A fake that refuses usage reports larger than `report_limit` bytes, as tonic refuses
    /// them (`OUT_OF_RANGE`), like a control plane with a smaller limit than the replica's.
    pub async fn start_with_report_limit(report_limit: usize) -> Self {
        Self::start_with("127.0.0.1:0".parse().unwrap(), report_limit).await
    }

    async fn start_with(addr: SocketAddr, report_limit: usize) -> Self {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            snapshot: watch::Sender::new(None),
            recorded: Mutex::new(Recorded::default()),
            changed: watch::Sender::new(0),
            kill: watch::Sender::new(0),
            ack_usage: AtomicBool::new(true),
            stop: CancellationToken::new(),
        });
        let stop = shared.stop.clone();
        let server = tokio::spawn({
            let service = DataPlaneServiceServer::new(Service(Arc::clone(&shared)))
                .max_decoding_message_size(report_limit);
            let stop = stop.clone();
            async move {
                tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_incoming_shutdown(
                        TcpListenerStream::new(listener),
                        stop.cancelled(),
                    )
                    .await
                    .unwrap();
            }
        });
        Self {
            addr,
            shared,
            stop,
            server,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Publishes a snapshot to every connected replica (and to later ones).
    pub fn publish(&self, snapshot: Snapshot) {
        self.shared.snapshot.send_replace(Some(snapshot));
    }

    /// Ends every open stream with an error.
    pub fn kill_streams(&self) {
        self.shared.kill.send_modify(|n| *n += 1);
    }

    /// Whether usage batches are applied and acked (`false`: received and forgotten).
    pub fn set_ack_usage(&self, ack: bool) {
        self.shared.ack_usage.store(ack, Ordering::SeqCst);
    }

    pub fn with<R>(&self, f: impl FnOnce(&Recorded) -> R) -> R {
        f(&self.shared.recorded.lock().unwrap())
    }

    /// Waits (at most 10 s, then panics) until `condition` holds.
    pub async fn wait_for(&self, what: &str, condition: impl Fn(&Recorded) -> bool) {
        let mut changed = self.shared.changed.subscribe();
        let wait = async {
            loop {
                if self.with(&condition) {
                    return;
                }
                changed.changed().await.unwrap();
            }
        };
        tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
    }

    /// Stops the server and cuts its streams and connections.
    pub async fn stop(mut self) {
        self.kill_streams();
        self.stop.cancel();
        if tokio::time::timeout(Duration::from_secs(2), &mut self.server)
            .await
            .is_err()
        {
            self.server.abort();
            let _ = (&mut self.server).await;
        }
    }
}
