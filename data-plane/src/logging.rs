//! The process's `tracing` output: one line per event on stderr, written by a thread of its
//! own.
//!
//! Every request logs a line, and a blocking `write(2)` to stderr on a runtime thread would
//! stall every request on that thread while the reader of stderr (a terminal, a container
//! runtime, a log shipper) is slow or stuck. Lines instead go through a bounded queue to a
//! writer thread that batches them (`BufWriter`, flushed whenever the queue is empty). When
//! the queue is full, new lines are dropped, never waited for: serving comes before logging,
//! and `sluice_log_dropped_lines_total` says how many were lost.

use std::io::{BufWriter, IsTerminal};
use std::sync::OnceLock;

use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Lines held for a slow stderr by default: about 15 MiB of typical request lines.
pub const DEFAULT_BUFFER_LINES: usize = 65_536;

static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// Installs the global subscriber (filter from `RUST_LOG`, default `info`). Keep the guard
/// until the process ends: dropping it writes out the lines still queued.
pub fn init(format: LogFormat, buffer_lines: usize) -> WorkerGuard {
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(buffer_lines.max(1))
        .thread_name("sluice-log")
        .finish(BufWriter::new(std::io::stderr()));
    // A second init (never done by the binary) keeps the first counter.
    let _ = DROPPED.set(writer.error_counter());
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    guard
}

/// Lines dropped so far because the queue to stderr was full (0 when [`init`] was not used).
pub fn dropped_lines() -> u64 {
    DROPPED
        .get()
        .map_or(0, |c| u64::try_from(c.dropped_lines()).unwrap_or(u64::MAX))
}
