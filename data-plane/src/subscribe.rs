//! The snapshot stream: `StreamSnapshots` turned into a sequence of applied snapshots, with
//! an ack or nack for each, reconnecting with jittered backoff whenever the stream ends.
//! Whatever was applied last stays in force while the control plane is away.
//!
//! A refused snapshot is loud, every time: an error log line, a nack the control plane
//! records (`ListDataPlanes` shows it as the replica's last error), and
//! `sluice_snapshot_refusals_total{reason}`. That includes a snapshot larger than
//! [`limits::MAX_SNAPSHOT_BYTES`], which cannot even be decoded: it ends the stream, which is
//! opened again after the backoff, and refused again until the control plane sends one that
//! fits.

use sluice_proto::limits;
use sluice_proto::v1::{Snapshot, StreamSnapshotsRequest};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::control::{DataPlaneClient, NodeIdentity};

/// What the subscriber hands snapshots to. Any `FnMut(Snapshot) -> Result<(), String>` is one.
pub trait Receiver {
    /// `Ok` acks the snapshot; `Err(detail)` nacks it with that detail.
    fn apply(&mut self, snapshot: Snapshot) -> Result<(), String>;

    /// A snapshot larger than this replica accepts arrived and was dropped undecoded.
    fn too_large(&mut self, _detail: &str) {}
}

impl<F: FnMut(Snapshot) -> Result<(), String>> Receiver for F {
    fn apply(&mut self, snapshot: Snapshot) -> Result<(), String> {
        self(snapshot)
    }
}

/// Keeps a `StreamSnapshots` stream open until `shutdown`, passing every snapshot to
/// `receiver`. After the stream ends or fails it reconnects after `backoff`'s next delay; the
/// backoff resets whenever a snapshot arrives.
pub async fn run<R: Receiver>(
    mut client: DataPlaneClient,
    identity: NodeIdentity,
    mut backoff: Backoff,
    mut receiver: R,
    shutdown: CancellationToken,
) {
    loop {
        let outcome = tokio::select! {
            outcome = session(&mut client, &identity, &mut backoff, &mut receiver) => outcome,
            () = shutdown.cancelled() => return,
        };
        match outcome {
            Ok(()) => tracing::warn!("snapshot stream ended by the control plane; reconnecting"),
            Err(status) => tracing::warn!(
                code = ?status.code(),
                message = status.message(),
                "snapshot stream failed; reconnecting"
            ),
        }
        let delay = backoff.next_delay();
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

async fn session<R: Receiver>(
    client: &mut DataPlaneClient,
    identity: &NodeIdentity,
    backoff: &mut Backoff,
    receiver: &mut R,
) -> Result<(), tonic::Status> {
    let hello = StreamSnapshotsRequest {
        node_id: identity.node_id.clone(),
        hostname: identity.hostname.clone(),
        build_version: identity.build_version.clone(),
        ..Default::default()
    };
    let (tx, rx) = mpsc::channel(4);
    // Cannot fail: the receiver is alive and the buffer empty.
    let _ = tx.send(hello.clone()).await;
    let mut inbound = client
        .stream_snapshots(ReceiverStream::new(rx))
        .await?
        .into_inner();
    loop {
        let message = match inbound.message().await {
            Ok(Some(message)) => message,
            Ok(None) => return Ok(()),
            Err(status) if status.code() == tonic::Code::OutOfRange => {
                let detail = format!(
                    "snapshot larger than this replica accepts ({} MiB): {}",
                    limits::MAX_SNAPSHOT_BYTES >> 20,
                    status.message()
                );
                tracing::error!(error = %detail, "snapshot refused; keeping the current one");
                receiver.too_large(&detail);
                // Tell the control plane, if the call still carries it (version unknown).
                let _ = tx.try_send(StreamSnapshotsRequest {
                    error_detail: detail,
                    ..hello.clone()
                });
                return Err(status);
            }
            Err(status) => return Err(status),
        };
        backoff.reset();
        let Some(snapshot) = message.snapshot else {
            continue;
        };
        let version = snapshot.version;
        let nonce = snapshot.nonce.clone();
        let epoch = snapshot.epoch.clone();
        let error_detail = match receiver.apply(snapshot) {
            Ok(()) => String::new(),
            Err(detail) => {
                tracing::error!(version, %epoch, error = %detail, "snapshot refused; keeping the current one");
                detail
            }
        };
        let answer = StreamSnapshotsRequest {
            version,
            response_nonce: nonce,
            error_detail,
            ..hello.clone()
        };
        if tx.send(answer).await.is_err() {
            // The request stream is gone: the call is over.
            return Ok(());
        }
    }
}
