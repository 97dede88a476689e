//! Budget periods reset at 00:00 UTC: at each UTC midnight (by the control plane's clock) a
//! new snapshot version is published if any active key has a periodic budget, so a key
//! refused for its spent budget is served again from the new period on, within the same
//! propagation time as any other change. No replica reads its own clock for this.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::store::Store;
use crate::time::now_ms;

/// How long after a failed write the reset is tried again.
const RETRY: Duration = Duration::from_secs(1);

/// Publishes a snapshot at each UTC midnight when a periodic budget resets, until `stop`.
pub async fn publish_budget_resets(store: Store, stop: CancellationToken) {
    loop {
        let now = now_ms();
        let midnight = crate::budget::next_reset(now);
        let wait = Duration::from_millis((midnight - now).max(0) as u64);
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        // Until the clock says so (a timer may fire a little early), in steps of what is left:
        // the reset's delay adds to its propagation time.
        while now_ms() < midnight {
            let left = Duration::from_millis((midnight - now_ms()).clamp(1, 10) as u64);
            tokio::select! {
                biased;
                () = stop.cancelled() => return,
                () = tokio::time::sleep(left) => {}
            }
        }
        // A failed write is tried again every second: left until the next midnight, keys
        // refused for a spent budget would stay refused a whole period too long.
        loop {
            match store.publish_budget_resets().await {
                Ok(false) => break,
                Ok(true) => {
                    tracing::info!("budget periods reset; new snapshot published");
                    break;
                }
                Err(err) => {
                    tracing::warn!(error = %err, "publishing budget resets failed; will retry")
                }
            }
            tokio::select! {
                biased;
                () = stop.cancelled() => return,
                () = tokio::time::sleep(RETRY) => {}
            }
        }
    }
}
