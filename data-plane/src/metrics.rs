//! Prometheus metrics of the data plane, in the text exposition format at `GET /metrics`.
//! Labels come from small fixed sets (status class, outcome); never request ids or keys.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use sluice_proto::v1::ErrorKind;

use crate::snapshot::SnapshotStore;
use crate::usage::UsageSink;

/// `ErrorKind` values 0..=8.
const KINDS: usize = 9;
/// Status classes 1xx..5xx, and 0 for anything else.
const CLASSES: usize = 6;

/// Counters the request path bumps; cheap atomics.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: [[AtomicU64; KINDS]; CLASSES],
    attempts: AtomicU64,
    failed_attempts: AtomicU64,
    cooldowns: AtomicU64,
}

impl Metrics {
    /// One finished (accounted) request.
    pub fn request(&self, status: u16, kind: ErrorKind) {
        let class = usize::from(status / 100).min(CLASSES - 1);
        let kind = usize::try_from(kind as i32).unwrap_or(0).min(KINDS - 1);
        self.requests[class][kind].fetch_add(1, Ordering::Relaxed);
    }

    pub fn attempt(&self, failed: bool) {
        self.attempts.fetch_add(1, Ordering::Relaxed);
        if failed {
            self.failed_attempts.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn cooldown(&self) {
        self.cooldowns.fetch_add(1, Ordering::Relaxed);
    }

    /// The exposition text.
    pub fn render(&self, store: &SnapshotStore, usage: &UsageSink) -> String {
        let mut out = String::with_capacity(2048);
        out.push_str(
            "# HELP sluice_requests_total Proxied requests by status class and outcome.\n\
             # TYPE sluice_requests_total counter\n",
        );
        for (class, kinds) in self.requests.iter().enumerate() {
            for (kind, count) in kinds.iter().enumerate() {
                let count = count.load(Ordering::Relaxed);
                if count == 0 {
                    continue;
                }
                let class = if class == 0 {
                    "other".to_owned()
                } else {
                    format!("{class}xx")
                };
                let outcome = ErrorKind::try_from(kind as i32)
                    .map(|k| {
                        k.as_str_name()
                            .trim_start_matches("ERROR_KIND_")
                            .to_lowercase()
                    })
                    .unwrap_or_default();
                let _ = writeln!(
                    out,
                    "sluice_requests_total{{status_class=\"{class}\",outcome=\"{outcome}\"}} {count}"
                );
            }
        }
        let counter = |out: &mut String, name: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        };
        let gauge = |out: &mut String, name: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        };
        counter(
            &mut out,
            "sluice_upstream_attempts_total",
            "Requests sent to upstream backends.",
            self.attempts.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "sluice_upstream_failed_attempts_total",
            "Upstream attempts that failed (429, 5xx, connect error, timeout).",
            self.failed_attempts.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "sluice_cooldowns_total",
            "Backend cooldowns this replica started.",
            self.cooldowns.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "sluice_usage_dropped_records_total",
            "Usage records dropped because the queue was full.",
            usage.dropped(),
        );
        gauge(
            &mut out,
            "sluice_usage_pending_records",
            "Usage records not yet acked by the control plane.",
            usage.pending() as u64,
        );
        gauge(
            &mut out,
            "sluice_snapshot_version",
            "Version of the snapshot in force (0: none yet).",
            store.load().map_or(0, |s| s.version),
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_by_class_and_outcome() {
        let metrics = Metrics::default();
        metrics.request(200, ErrorKind::Unspecified);
        metrics.request(200, ErrorKind::Unspecified);
        metrics.request(429, ErrorKind::RateLimited);
        metrics.attempt(true);
        let text = metrics.render(&SnapshotStore::default(), &UsageSink::new(10));
        assert!(
            text.contains(
                "sluice_requests_total{status_class=\"2xx\",outcome=\"unspecified\"} 2\n"
            )
        );
        assert!(
            text.contains(
                "sluice_requests_total{status_class=\"4xx\",outcome=\"rate_limited\"} 1\n"
            )
        );
        assert!(text.contains("sluice_upstream_failed_attempts_total 1\n"));
        assert!(text.contains("sluice_snapshot_version 0\n"));
    }
}
