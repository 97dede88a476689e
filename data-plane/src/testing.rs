//! Helpers for the unit tests of the crate's threads.

use std::time::{Duration, Instant};

/// Polls `condition` every millisecond until it holds, for up to 10 s: for state another
/// thread (the log writer, the spool's sync thread) changes in its own time.
pub fn eventually(what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}
