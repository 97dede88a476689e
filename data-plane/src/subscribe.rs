//! The snapshot stream: `StreamSnapshots` turned into a sequence of applied snapshots, with
//! an ack or nack for each, reconnecting with jittered backoff whenever the stream ends.
//! Whatever was applied last stays in force while the control plane is away.

use sluice_proto::v1::{Snapshot, StreamSnapshotsRequest};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::control::{DataPlaneClient, NodeIdentity};

/// Keeps a `StreamSnapshots` stream open until `shutdown`, passing every snapshot to `apply`.
/// `Ok` acks the snapshot; `Err(detail)` nacks it with that detail. After the stream ends or
/// fails it reconnects after `backoff`'s next delay; the backoff resets whenever a snapshot
/// arrives.
pub async fn run<F>(
    mut client: DataPlaneClient,
    identity: NodeIdentity,
    mut backoff: Backoff,
    mut apply: F,
    shutdown: CancellationToken,
) where
    F: FnMut(Snapshot) -> Result<(), String>,
{
    loop {
        let outcome = tokio::select! {
            outcome = session(&mut client, &identity, &mut backoff, &mut apply) => outcome,
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

async fn session<F>(
    client: &mut DataPlaneClient,
    identity: &NodeIdentity,
    backoff: &mut Backoff,
    apply: &mut F,
) -> Result<(), tonic::Status>
where
    F: FnMut(Snapshot) -> Result<(), String>,
{
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
    while let Some(message) = inbound.message().await? {
        backoff.reset();
        let Some(snapshot) = message.snapshot else {
            continue;
        };
        let version = snapshot.version;
        let nonce = snapshot.nonce.clone();
        let error_detail = match apply(snapshot) {
            Ok(()) => String::new(),
            Err(detail) => {
                tracing::warn!(version, error = %detail, "snapshot refused");
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
    Ok(())
}
