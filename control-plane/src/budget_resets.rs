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

/// How often the wall clock is read while waiting for midnight. A timer runs on the
/// monotonic clock, which a step of the wall clock (an NTP correction, a resume from suspend)
/// does not move: one timer to a midnight hours away would fire that step late, keys refused
/// for yesterday's spent budget refused as long.
const RECHECK: Duration = Duration::from_secs(1);

/// Publishes a snapshot at each UTC midnight when a periodic budget resets, until `stop`.
pub async fn publish_budget_resets(store: Store, stop: CancellationToken) {
    publish_budget_resets_telling(store, stop, |_| {}).await
}

/// [`publish_budget_resets`], telling `waiting` the midnight (Unix ms) it waits for each time
/// it has read the clock and is about to wait: tests step the clock once it waits.
pub async fn publish_budget_resets_telling(
    store: Store,
    stop: CancellationToken,
    waiting: impl Fn(i64) + Send,
) {
    loop {
        let midnight = crate::budget::next_reset(now_ms());
        // Until the clock says so, in steps of what is left (at most `RECHECK`): the reset's
        // delay adds to its propagation time.
        loop {
            let left = midnight.saturating_sub(now_ms());
            if left <= 0 {
                break;
            }
            let wait = Duration::from_millis(left as u64).min(RECHECK);
            waiting(midnight);
            tokio::select! {
                biased;
                () = stop.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
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
