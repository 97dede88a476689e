//! The process's `tracing` output: one line per event on stderr, written by a thread of its
//! own.
//!
//! Every request logs a line, and a blocking `write(2)` to stderr on a runtime thread would
//! stall every request on that thread while the reader of stderr (a terminal, a container
//! runtime, a log shipper) is slow or stuck. Lines instead are appended to a shared buffer
//! that a writer thread empties every [`FLUSH_INTERVAL`] (sooner when it grows large), one
//! `write` per batch. Appending is a short critical section and, while lines keep coming,
//! never a system call or a thread wake-up: at thousands of requests per second, a wake-up
//! per line cost more CPU than formatting it. A writer that found a whole interval without a
//! line sleeps until the next line wakes it, so an idle process does not wake 50 times a
//! second for nothing. When the buffer holds `buffer_lines` lines, new lines are dropped, never
//! waited for: serving comes before logging, and `sluice_log_dropped_lines_total` says how
//! many were lost.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// How each line is written: plain text or one JSON object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Lines held for a slow stderr by default: about 15 MiB of typical request lines.
pub const DEFAULT_BUFFER_LINES: usize = 65_536;

/// The longest a line waits in the buffer while stderr keeps up.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(20);

/// A buffer this large is written at once instead of at the next interval.
const EARLY_FLUSH_BYTES: usize = 256 * 1024;

static DROPPED: AtomicU64 = AtomicU64::new(0);

#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    lines: usize,
    /// Set by [`LogGuard`]'s drop: write what is left and stop.
    closing: bool,
    /// The writer thread found a whole interval without a line and waits for one, without a
    /// timeout: the next line wakes it.
    asleep: bool,
}

struct Shared {
    pending: Mutex<Pending>,
    wake: Condvar,
    max_lines: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The `MakeWriter` handed to the subscriber: each event's formatted line arrives in one
/// `write` call.
#[derive(Clone)]
struct BatchWriter(Arc<Shared>);

impl Write for BatchWriter {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let mut pending = self.0.lock();
        if pending.lines >= self.0.max_lines {
            drop(pending);
            DROPPED.fetch_add(1, Ordering::Relaxed);
            return Ok(line.len());
        }
        pending.bytes.extend_from_slice(line);
        pending.lines += 1;
        let wake = pending.bytes.len() >= EARLY_FLUSH_BYTES || std::mem::take(&mut pending.asleep);
        drop(pending);
        if wake {
            self.0.wake.notify_one();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BatchWriter {
    type Writer = Self;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// Writes out the lines still buffered when dropped. Keep it until the process ends.
pub struct LogGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Empties the buffer into `out` every [`FLUSH_INTERVAL`] until closed; after an interval
/// without a line, sleeps until the next one. Write errors (a closed stderr) lose the batch:
/// there is nowhere left to report them.
fn write_batches(shared: &Shared, mut out: impl Write) {
    let mut batch = Vec::new();
    loop {
        let closing = {
            let mut pending = shared.lock();
            if pending.bytes.len() < EARLY_FLUSH_BYTES && !pending.closing {
                pending = shared
                    .wake
                    .wait_timeout(pending, FLUSH_INTERVAL)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            if pending.bytes.is_empty() && !pending.closing {
                // Idle: wait for a line, then an interval for the lines that follow it.
                pending.asleep = true;
                while pending.asleep && !pending.closing {
                    pending = shared
                        .wake
                        .wait(pending)
                        .unwrap_or_else(PoisonError::into_inner);
                }
                continue;
            }
            std::mem::swap(&mut pending.bytes, &mut batch);
            pending.lines = 0;
            pending.closing
        };
        if !batch.is_empty() {
            let _ = out.write_all(&batch).and_then(|()| out.flush());
            batch.clear();
            // Give back what one burst grew, not the steady-state capacity.
            batch.shrink_to(EARLY_FLUSH_BYTES * 2);
        }
        if closing {
            return;
        }
    }
}

/// Installs the global subscriber (filter from `RUST_LOG`, default `info`). Keep the guard
/// until the process ends: dropping it writes out the lines still buffered.
pub fn init(format: LogFormat, buffer_lines: usize) -> std::io::Result<LogGuard> {
    let shared = Arc::new(Shared {
        pending: Mutex::new(Pending::default()),
        wake: Condvar::new(),
        max_lines: buffer_lines.max(1),
    });
    let thread = std::thread::Builder::new()
        .name("sluice-log".to_owned())
        .spawn({
            let shared = Arc::clone(&shared);
            move || write_batches(&shared, std::io::stderr())
        })?;
    sluice_domain::logging::install(format == LogFormat::Json, BatchWriter(Arc::clone(&shared)));
    Ok(LogGuard {
        shared,
        thread: Some(thread),
    })
}

/// Lines dropped so far because the buffer for stderr was full.
pub fn dropped_lines() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::testing::eventually;

    /// A sink that records what reaches it and can be held shut like a stalled pipe.
    #[derive(Clone, Default)]
    struct Sink {
        written: Arc<Mutex<Vec<u8>>>,
        gate: Arc<Mutex<()>>,
    }

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let _open = self.gate.lock().unwrap();
            self.written.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn start(max_lines: usize, sink: &Sink) -> (BatchWriter, LogGuard) {
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending::default()),
            wake: Condvar::new(),
            max_lines,
        });
        let thread = std::thread::spawn({
            let (shared, sink) = (Arc::clone(&shared), sink.clone());
            move || write_batches(&shared, sink)
        });
        let guard = LogGuard {
            shared: Arc::clone(&shared),
            thread: Some(thread),
        };
        (BatchWriter(shared), guard)
    }

    #[test]
    fn lines_arrive_in_order_within_an_interval_and_all_on_close() {
        let sink = Sink::default();
        let (mut writer, guard) = start(1000, &sink);
        writer.write_all(b"one\n").unwrap();
        // Written without more lines coming and without closing.
        eventually("the line written", || {
            sink.written.lock().unwrap().as_slice() == b"one\n"
        });
        for i in 0..500 {
            writer.write_all(format!("line {i}\n").as_bytes()).unwrap();
        }
        drop(guard);
        let written = String::from_utf8(sink.written.lock().unwrap().clone()).unwrap();
        let expected: String = std::iter::once("one\n".to_owned())
            .chain((0..500).map(|i| format!("line {i}\n")))
            .collect();
        assert_eq!(written, expected);
    }

    #[test]
    fn an_idle_writer_sleeps_until_the_next_line_wakes_it() {
        let sink = Sink::default();
        let (mut writer, guard) = start(1000, &sink);
        // A whole interval without a line: the thread waits without a timeout.
        eventually("an idle writer asleep", || writer.0.lock().asleep);
        writer.write_all(b"after a pause\n").unwrap();
        assert!(!writer.0.lock().asleep, "the line woke the writer");
        eventually("the line after a pause", || {
            sink.written.lock().unwrap().as_slice() == b"after a pause\n"
        });
        // Asleep again, and closing still writes what is left.
        eventually("an idle writer asleep", || writer.0.lock().asleep);
        writer.write_all(b"last\n").unwrap();
        drop(guard);
        assert_eq!(
            sink.written.lock().unwrap().as_slice(),
            b"after a pause\nlast\n"
        );
    }

    #[test]
    fn a_stalled_sink_drops_lines_beyond_the_limit_without_blocking() {
        let sink = Sink::default();
        let stalled = sink.gate.lock().unwrap();
        let (mut writer, guard) = start(10, &sink);
        writer.write_all(b"first\n").unwrap();
        // The writer thread takes "first" and blocks on the stalled sink.
        eventually("every line taken", || writer.0.lock().lines == 0);
        let before = dropped_lines();
        for i in 0..25 {
            writer.write_all(format!("{i}\n").as_bytes()).unwrap();
        }
        // Other tests may drop lines at the same time; at least these 15 were dropped here.
        assert!(dropped_lines() - before >= 15);
        drop(stalled);
        drop(guard);
        let written = String::from_utf8(sink.written.lock().unwrap().clone()).unwrap();
        let expected: String = std::iter::once("first\n".to_owned())
            .chain((0..10).map(|i| format!("{i}\n")))
            .collect();
        assert_eq!(written, expected);
    }
}
