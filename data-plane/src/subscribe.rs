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

use std::sync::Arc;

use sluice_proto::limits;
use sluice_proto::v1::{AllowanceRequest, Snapshot, StreamSnapshotsRequest};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::allowance::{Allowances, Ask};
use crate::backoff::Backoff;
use crate::control::{DataPlaneClient, NodeIdentity};

/// What the subscriber hands snapshots to. Any `FnMut(Snapshot) -> Result<(), String>` is one.
pub trait Receiver {
    /// `Ok` acks the snapshot; `Err(detail)` nacks it with that detail.
    fn apply(&mut self, snapshot: Snapshot) -> Result<(), String>;

    /// A snapshot larger than this replica accepts arrived and was dropped undecoded.
    fn too_large(&mut self, _detail: &str) {}

    /// The budget allowances this replica spends, if any: the stream then carries their
    /// asks and grants.
    fn allowances(&self) -> Option<Arc<Allowances>> {
        None
    }

    /// The control plane answered a stream (`true`), or the stream ended (`false`).
    fn connected(&mut self, _connected: bool) {}
}

/// How long a stopping replica waits for the control plane to close its snapshot stream after
/// closing its own end (the control plane reads what it was sent, then closes).
const FAREWELL: std::time::Duration = std::time::Duration::from_secs(1);

/// Most asks one message carries.
const ASKS_PER_MESSAGE: usize = 512;

/// Marks the stream closed for the allowances however the session ends.
struct Open(Option<Arc<Allowances>>);

impl Drop for Open {
    fn drop(&mut self) {
        if let Some(budgets) = &self.0 {
            budgets.connected(false);
        }
    }
}

/// The next queued ask, or never without allowances.
async fn next_ask(queued: &mut Option<tokio::sync::MutexGuard<'_, mpsc::Receiver<Ask>>>) -> Ask {
    match queued {
        Some(queued) => match queued.recv().await {
            Some(ask) => ask,
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

impl<F: FnMut(Snapshot) -> Result<(), String>> Receiver for F {
    fn apply(&mut self, snapshot: Snapshot) -> Result<(), String> {
        self(snapshot)
    }
}

/// Keeps a `StreamSnapshots` stream open until `shutdown`, passing every snapshot to
/// `receiver`. After the stream ends or fails it reconnects after `backoff`'s next delay; the
/// backoff resets whenever a snapshot arrives. Once `leaving` (the replica admits no more
/// requests: it is stopping) it tells the control plane so, which hands its share of the
/// rate limits to the other replicas at once.
pub async fn run<R: Receiver>(
    mut client: DataPlaneClient,
    identity: NodeIdentity,
    mut backoff: Backoff,
    mut receiver: R,
    leaving: CancellationToken,
    shutdown: CancellationToken,
) {
    // The refusal of a snapshot too large to decode, for the control plane: it ends the
    // stream it came on, so it goes on the next one's hello.
    let mut nack = None;
    loop {
        let outcome = session(
            &mut client,
            &identity,
            &mut backoff,
            &mut receiver,
            &mut nack,
            &leaving,
            &shutdown,
        )
        .await;
        if shutdown.is_cancelled() {
            return;
        }
        receiver.connected(false);
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
    nack: &mut Option<String>,
    leaving: &CancellationToken,
    shutdown: &CancellationToken,
) -> Result<(), tonic::Status> {
    let base = StreamSnapshotsRequest {
        node_id: identity.node_id.clone(),
        hostname: identity.hostname.clone(),
        build_version: identity.build_version.clone(),
        leaving: leaving.is_cancelled(),
        ..Default::default()
    };
    let budgets = receiver.allowances();
    let mut queued = match &budgets {
        Some(budgets) => Some(budgets.queued().await),
        None => None,
    };
    let mut hello = base.clone();
    if let Some(budgets) = &budgets {
        budgets.hello(&mut hello);
    }
    // The refusal of a snapshot too large to decode ended the last stream: said on this
    // one's hello, which the control plane reads before it sends anything.
    hello.error_detail = nack.clone().unwrap_or_default();
    let hello_only = hello;
    let mut hello = base;
    let (tx, rx) = mpsc::channel(4);
    // Cannot fail: the receiver is alive and the buffer empty.
    let _ = tx.send(hello_only).await;
    let mut inbound = tokio::select! {
        answered = client.stream_snapshots(ReceiverStream::new(rx)) => answered?.into_inner(),
        () = shutdown.cancelled() => return Ok(()),
    };
    // Answered: the control plane read the hello, and the refusal on it, before answering.
    *nack = None;
    receiver.connected(true);
    let _open = Open(budgets.clone());
    if let Some(budgets) = &budgets {
        budgets.connected(true);
    }
    let mut first_on_stream = true;
    loop {
        let message = tokio::select! {
            message = inbound.message() => message,
            () = leaving.cancelled(), if !hello.leaving => {
                hello.leaving = true;
                if tx.send(hello.clone()).await.is_err() {
                    return Ok(());
                }
                continue;
            }
            // The stream is closed from this end, after whatever was sent on it (the
            // `leaving` above all: said now if the stop came with it), and the control plane's
            // close awaited a moment: dropped at once, the call's reset could overtake the
            // messages still being written. (The control plane reads them, then sees the
            // end of the stream, then closes its own end.)
            () = shutdown.cancelled() => {
                if leaving.is_cancelled() && !hello.leaving {
                    hello.leaving = true;
                    let _ = tokio::time::timeout(FAREWELL, tx.send(hello.clone())).await;
                }
                drop(tx);
                let _ = tokio::time::timeout(FAREWELL, async {
                    while let Ok(Some(_)) = inbound.message().await {}
                })
                .await;
                return Ok(());
            }
            ask = next_ask(&mut queued) => {
                let mut asks = vec![ask];
                if let Some(queued) = &mut queued {
                    while asks.len() < ASKS_PER_MESSAGE {
                        match queued.try_recv() {
                            Ok(ask) => asks.push(ask),
                            Err(_) => break,
                        }
                    }
                }
                let message = StreamSnapshotsRequest {
                    allowance_requests: asks
                        .into_iter()
                        .map(|a| AllowanceRequest {
                            client_key_id: a.client_key_id,
                            want_nanos: a.want_nanos,
                            debt_nanos: a.debt_nanos,
                        })
                        .collect(),
                    ..hello.clone()
                };
                if tx.send(message).await.is_err() {
                    return Ok(());
                }
                continue;
            }
        };
        let message = match message {
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
                // The call is over: the control plane hears of it on the next one.
                *nack = Some(detail);
                return Err(status);
            }
            Err(status) => return Err(status),
        };
        if let Some(budgets) = &budgets {
            budgets.heard(message.allowances.as_ref(), first_on_stream);
        }
        first_on_stream = false;
        let Some(snapshot) = message.snapshot else {
            continue;
        };
        // A snapshot came whole: the stream works. (Not at any message: a control plane
        // sending one too large to decode after its first allowance message would otherwise
        // be asked for it again at once, 64 MiB each time.)
        backoff.reset();
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
