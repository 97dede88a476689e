//! Client keys that expire: when a key's `expire_time` passes (by the control plane's clock),
//! a new snapshot version marks it expired, so every replica refuses it within the same
//! propagation time as any other admin change. No replica reads its own clock for this.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::store::Store;
use crate::time::now_ms;

/// How long the sweep sleeps at most with no expiry ahead.
const IDLE: Duration = Duration::from_secs(60);
/// How long after a failed read or write the sweep tries again.
const RETRY: Duration = Duration::from_secs(1);

/// Publishes each key's expiry as it passes, until `stop`. Wakes at the next expiry and
/// after every commit (a key created or changed with an expiry sooner than the one awaited).
pub async fn publish_key_expiries(store: Store, stop: CancellationToken) {
    let mut commits = store.commits();
    // At start, for the keys that expired while the control plane was down.
    let mut failed = !publish_due(&store).await;
    loop {
        let wait = match store.next_key_expiry().await {
            // After a failed write the expiry is still due: retry in a second, not at once.
            Ok(Some(_)) if failed => RETRY,
            Ok(Some(at)) => Duration::from_millis(at.saturating_sub(now_ms()).max(0) as u64),
            Ok(None) => IDLE,
            Err(err) => {
                tracing::warn!(error = %err, "reading key expiries failed; will retry");
                RETRY
            }
        };
        // A commit only re-reads the next expiry (a read); the write happens when one is due.
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            changed = commits.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            () = tokio::time::sleep(wait.min(IDLE)) => failed = !publish_due(&store).await,
        }
    }
}

/// Publishes the expiries due now; false when the write failed.
async fn publish_due(store: &Store) -> bool {
    match store.publish_key_expiries(now_ms()).await {
        Ok(0) => true,
        Ok(expired) => {
            tracing::info!(
                expired,
                "client keys expired (or, expired 30 days ago, left out of the snapshot)"
            );
            true
        }
        Err(err) => {
            tracing::warn!(error = %err, "publishing key expiries failed; will retry");
            false
        }
    }
}
