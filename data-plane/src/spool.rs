//! The usage spool: every usage record on local disk until the control plane acks it, so
//! that a replica that dies (SIGKILL, OOM kill, panic) and comes back on the same data
//! directory sends again what the control plane never acknowledged, and the control plane
//! counts each record once. `docs/guarantees.md` states what holds for each kind of failure.
//!
//! - **What is written.** Before a request's first upstream call, a *start* (its record so
//!   far); when it finishes, a *finish* (its whole record with its sequence), written before
//!   the client gets the end of the answer. The request waits until its entry is written with
//!   a plain `write` into the page cache (one `write` for all the requests its thread serves
//!   in one pass of the scheduler: [`lane`]), so a process crash loses nothing a request went
//!   on after; a thread of the spool flushes the files with `fdatasync` every
//!   [`SpoolOptions::sync_interval`], and the reporter sends a record only once it is flushed,
//!   so a machine crash loses at most that interval and never a record the control plane has
//!   counted. Once everything is flushed and nothing is left to delete, the thread sleeps
//!   ([`IDLE_SYNC_INTERVAL`]) until the next write wakes it, which it flushes an interval
//!   later with the writes that followed: an idle replica's spool does not wake ten times a
//!   second, and a busy one still flushes at most once an interval.
//! - **Where.** `<data-dir>/usage-spool/<incarnation>/<lane>.<segment>.spool`: each serving
//!   thread (lane) appends to segment files of its own ([`lane`]), so threads never wait on
//!   each other; each entry is framed with its length and CRC-32 ([`frame`]), so a torn last
//!   write is detected and dropped, never misread.
//! - **Compaction.** A lane starts a new segment every [`SpoolOptions::segment_bytes`],
//!   copying in the starts of its requests still running; a closed segment is deleted once
//!   every finish in it is acked. A process that stops cleanly with everything acked deletes
//!   its directory.
//! - **Replay.** At start, each directory an earlier process left ([`replay`]) is sent again
//!   through the usage reporter under that process's node id, incarnation and sequences (the
//!   control plane skips what it already applied), plus one record per request that had
//!   started an upstream call and never finished, under `<incarnation>.interrupted`. The
//!   directory is deleted once the control plane has acked all of it.
//! - **Bounds.** The files together hold at most [`SpoolOptions::max_bytes`] (checked when a
//!   request starts; a finish whose start is on disk is always written); a request that finds
//!   the spool full (or its disk failing) is served without a start record, or refused with
//!   503, as [`OnFull`] says.
//! - **One process per directory.** A lock file (`flock`) refuses a second process.

pub mod entry;
pub mod frame;
mod lane;
pub mod replay;

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::control::{NodeIdentity, UsageClient};
use crate::usage::{UsageReporter, UsageSink};

pub use lane::{Lane, Refused, Written};
pub use replay::Replay;

/// Default bound on the spool's bytes on disk: about 190,000 requests, more than the usage
/// queue holds in memory. A restart reads all of it into memory to send it again (about
/// 400 bytes a record), so the bound also bounds that.
pub const DEFAULT_MAX_BYTES: u64 = 64 * 1024 * 1024;

/// Default interval between two flushes to disk.
pub const DEFAULT_SYNC_INTERVAL: Duration = Duration::from_millis(100);

/// Size at which a lane starts a new segment.
pub const DEFAULT_SEGMENT_BYTES: u64 = 4 * 1024 * 1024;

/// The spool's directory under the data directory.
pub const SPOOL_DIR: &str = "usage-spool";

/// Where a run's spool directory is moved before it is deleted (beside [`SPOOL_DIR`], never
/// replayed): a deletion cut short (a crash, an I/O error) then leaves nothing a later start
/// reads, where deleting in place left some of a run's files (starts whose finishes were
/// gone), counted a second time as interrupted. Emptied at every start.
const DISCARDED_DIR: &str = "usage-spool-discarded";

/// The lock file in the data directory.
pub const LOCK_FILE: &str = "sluice-proxy.lock";

/// Appended to an incarnation to name the sequence space of its interrupted requests.
pub const INTERRUPTED_SUFFIX: &str = ".interrupted";

/// Fewer bytes than any finish takes in a segment (its frame and the record's request id,
/// time and model): what bounds the records a spool of `max_bytes` holds.
const MIN_FINISH_BYTES: u64 = 64;

/// Least time between two warnings about failed spool writes or flushes.
const WARNING_INTERVAL: Duration = Duration::from_secs(10);

/// What a request does when the spool cannot take its start record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnFull {
    /// Serve it anyway: its usage is still reported, but a crash before the control plane
    /// acks it loses it (counted in `sluice_usage_spool_unwritten_records_total`).
    Serve,
    /// Refuse it with 503 before any upstream call, so that no request goes unrecorded.
    Refuse,
}

/// Why a record was not written to the spool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unwritten {
    /// The spool held its maximum size.
    Full,
    /// The write failed (the disk is full or failing).
    Failed,
}

impl std::fmt::Display for Unwritten {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Full => "the spool is full",
            Self::Failed => "writing to the spool failed",
        })
    }
}

/// How the spool is set up.
#[derive(Debug, Clone)]
pub struct SpoolOptions {
    /// The replica's data directory; the spool lives in its `usage-spool/`.
    pub data_dir: PathBuf,
    pub max_bytes: u64,
    pub on_full: OnFull,
    pub sync_interval: Duration,
    pub segment_bytes: u64,
}

impl SpoolOptions {
    /// The defaults, in `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            max_bytes: DEFAULT_MAX_BYTES,
            on_full: OnFull::Serve,
            sync_interval: DEFAULT_SYNC_INTERVAL,
            segment_bytes: DEFAULT_SEGMENT_BYTES,
        }
    }
}

/// Why the spool cannot start.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error(
        "the data directory {dir} is in use by another sluice-proxy{holder}: every replica needs a data directory of its own"
    )]
    Locked { dir: PathBuf, holder: String },
    #[error("cannot use the data directory: {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

impl SpoolError {
    /// Whether the disk failed rather than the setup: full (`ENOSPC`), read-only (`EROFS`,
    /// ext4 remounts so after an I/O error) or failing (`EIO`). A replica restarted on such
    /// a disk with `--usage-spool-full serve` starts without its spool, as a running one serves
    /// on when its writes fail, rather than crash-loop (every replica on one storage would be
    /// down for usage accounting alone); a path it may not use, or another process's
    /// directory, still stops it.
    pub fn disk_failing(&self) -> bool {
        use std::io::ErrorKind;
        match self {
            Self::Locked { .. } => false,
            Self::Io { source, .. } => {
                matches!(
                    source.kind(),
                    ErrorKind::StorageFull | ErrorKind::ReadOnlyFilesystem
                ) || source.raw_os_error() == Some(EIO)
            }
        }
    }
}

/// `EIO` on Linux and the BSDs.
const EIO: i32 = 5;

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError {
    let path = path.to_owned();
    move |source| SpoolError::Io { what, path, source }
}

/// What the lanes, the sync thread and the replays share.
#[derive(Debug)]
pub(crate) struct Shared {
    /// This process's directory.
    dir: PathBuf,
    node_id: String,
    incarnation: String,
    options: SpoolOptions,
    on_full: OnFull,
    /// Bytes of every segment on disk, this process's and earlier ones'.
    bytes: AtomicU64,
    /// Requests with a start and no finish, over all lanes.
    in_flight: AtomicU64,
    unwritten_full: AtomicU64,
    unwritten_failed: AtomicU64,
    /// Flushes (`fdatasync` of a file or its directory) that failed.
    flush_failed: AtomicU64,
    /// Whether the last write of any lane failed: a finish appended then is not taken for
    /// one the spool holds ([`Written::holds_record`]).
    writes_failing: AtomicBool,
    torn: AtomicU64,
    resent: AtomicU64,
    last_warning: Mutex<Option<Instant>>,
    /// The queues of earlier runs' records being sent again.
    resending: Mutex<Vec<UsageSink>>,
    /// Wakes the sync thread from its idle sleep (see [`SyncWake`]).
    sync_wake: SyncWake,
}

impl Shared {
    fn has_room(&self, len: usize) -> bool {
        self.bytes.load(Ordering::Relaxed) + len as u64 <= self.options.max_bytes
    }

    /// Counts `records` not written for `why`.
    fn unwritten(&self, why: Unwritten, records: u64) {
        let counter = match why {
            Unwritten::Full => &self.unwritten_full,
            Unwritten::Failed => &self.unwritten_failed,
        };
        counter.fetch_add(records, Ordering::Relaxed);
        if why == Unwritten::Full && self.warning_due() {
            tracing::warn!(
                max_bytes = self.options.max_bytes,
                on_full = ?self.on_full,
                "usage spool full: new requests are not recorded on disk until the control plane acks older records"
            );
        }
    }

    /// Whether the last write of a lane failed (see [`Shared::writes_failing`]).
    pub(crate) fn writes_failing(&self) -> bool {
        self.writes_failing.load(Ordering::Relaxed)
    }

    fn write_failed(&self, err: &std::io::Error) -> Unwritten {
        self.writes_failing.store(true, Ordering::Relaxed);
        if self.warning_due() {
            tracing::error!(error = %err, dir = %self.dir.display(), "writing the usage spool failed");
        }
        Unwritten::Failed
    }

    /// True at most every [`WARNING_INTERVAL`].
    fn warning_due(&self) -> bool {
        let mut last = self
            .last_warning
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let due = last.is_none_or(|at| at.elapsed() >= WARNING_INTERVAL);
        if due {
            *last = Some(Instant::now());
        }
        due
    }

    fn resending_pending(&self) -> usize {
        self.resending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(UsageSink::pending)
            .sum()
    }
}

/// The counters and gauges of the spool, for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpoolStats {
    /// Records on disk not yet acked: requests in flight, finished records (`pending` from
    /// the live queue) and earlier runs' records being sent again.
    pub records: u64,
    /// Bytes of the spool's files.
    pub bytes: u64,
    /// Records an earlier run left torn or damaged, dropped at start.
    pub torn: u64,
    /// Records of earlier runs sent again and acked.
    pub resent: u64,
    pub unwritten_full: u64,
    pub unwritten_failed: u64,
    /// Flushes to disk that failed (the records they held were reported all the same).
    pub flush_failures: u64,
}

/// The spool of one data plane; see the module docs.
#[derive(Debug)]
pub struct Spool {
    shared: Arc<Shared>,
    lanes: Vec<Arc<Lane>>,
    replays: Mutex<Vec<Replay>>,
    sync: Mutex<Option<SyncThread>>,
    /// Acked segments whose deletion failed (path, bytes): tried again each round, their
    /// bytes counted in the spool until they are gone. Forgotten, a failed unlink kept its
    /// bytes counted for the rest of the process, and the spool looked full.
    undeleted: Mutex<Vec<(PathBuf, u64)>>,
    /// Held (locked) for the life of the process.
    _lock: File,
}

#[derive(Debug)]
struct SyncThread {
    handle: JoinHandle<()>,
}

/// The longest the sync thread sleeps while the spool is settled (everything written flushed,
/// nothing left to delete): a write wakes it sooner. What it still catches on waking is a
/// record that entered the usage queue after the round that flushed it (its thread held up
/// between its write and its entry), which would otherwise wait for the next write to be
/// marked durable and sent.
pub const IDLE_SYNC_INTERVAL: Duration = Duration::from_secs(1);

/// The sync thread's waits: a round every sync interval, or, while the spool is settled, a
/// sleep that the next write ends ([`Shared::wrote`]), and then an interval before the round;
/// [`Spool::close`] ends either.
#[derive(Debug, Default)]
struct SyncWake {
    /// Whether the thread sleeps (or is about to): read by every write, written rarely.
    asleep: AtomicBool,
    flags: Mutex<SyncFlags>,
    changed: Condvar,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Waited {
    Elapsed,
    Woken,
    Stop,
}

#[derive(Debug, Default)]
struct SyncFlags {
    woken: bool,
    stopping: bool,
}

impl SyncWake {
    fn flags(&self) -> std::sync::MutexGuard<'_, SyncFlags> {
        self.flags.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits `timeout`, less if stopped or, when `wakeable` (the thread sleeps), woken. A wait
    /// that is not wakeable drops a wake-up: one that raced with the thread's decision not to
    /// sleep would otherwise end its next interval at once, and with it the rule of one round
    /// an interval.
    fn wait(&self, timeout: Duration, wakeable: bool) -> Waited {
        let deadline = Instant::now() + timeout;
        let mut flags = self.flags();
        loop {
            if flags.stopping {
                return Waited::Stop;
            }
            if std::mem::take(&mut flags.woken) && wakeable {
                return Waited::Woken;
            }
            let now = Instant::now();
            if now >= deadline {
                return Waited::Elapsed;
            }
            flags = self
                .changed
                .wait_timeout(flags, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    fn wake(&self) {
        if self.asleep.swap(false, Ordering::SeqCst) {
            self.flags().woken = true;
            self.changed.notify_one();
        }
    }

    fn stop(&self) {
        self.flags().stopping = true;
        self.changed.notify_one();
    }
}

impl Shared {
    /// A lane wrote: a sleeping sync thread wakes to flush it.
    pub(super) fn wrote(&self) {
        if self.sync_wake.asleep.load(Ordering::SeqCst) {
            self.sync_wake.wake();
        }
    }
}

impl Spool {
    /// Locks the data directory, reads what earlier runs left (cutting off torn writes),
    /// and opens a segment for each of `lanes` serving threads under `identity`.
    pub fn open(
        options: SpoolOptions,
        identity: &NodeIdentity,
        lanes: usize,
    ) -> Result<Self, SpoolError> {
        let data_dir = options.data_dir.clone();
        std::fs::create_dir_all(&data_dir).map_err(io_error("creating", &data_dir))?;
        let lock = lock(&data_dir)?;
        let root = data_dir.join(SPOOL_DIR);
        std::fs::create_dir_all(&root).map_err(io_error("creating", &root))?;
        let discarded = data_dir.join(DISCARDED_DIR);
        match std::fs::remove_dir_all(&discarded) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
                tracing::warn!(path = %discarded.display(), error = %err, "cannot delete the resent usage spool directories");
            }
            _ => {}
        }

        let mut replays = Vec::new();
        for entry in std::fs::read_dir(&root).map_err(io_error("reading", &root))? {
            let path = entry.map_err(io_error("reading", &root))?.path();
            if !path.is_dir() {
                tracing::warn!(path = %path.display(), "ignoring a file in the usage spool");
                continue;
            }
            let replay = replay::read(&path).map_err(io_error("reading", &path))?;
            if replay.is_empty() {
                discard(&data_dir, &path).map_err(io_error("removing", &path))?;
                continue;
            }
            tracing::info!(
                node_id = %replay.node_id,
                incarnation = %replay.incarnation,
                finished = replay.finished.len(),
                interrupted = replay.interrupted.len(),
                torn = replay.torn,
                "usage spool: an earlier run left records the control plane may not have; sending them again"
            );
            replays.push(replay);
        }

        let dir = root.join(&identity.incarnation);
        std::fs::create_dir(&dir).map_err(io_error("creating", &dir))?;
        let shared = Arc::new(Shared {
            dir: dir.clone(),
            node_id: identity.node_id.clone(),
            incarnation: identity.incarnation.clone(),
            on_full: options.on_full,
            bytes: AtomicU64::new(replays.iter().map(|r| r.bytes).sum()),
            in_flight: AtomicU64::new(0),
            unwritten_full: AtomicU64::new(0),
            unwritten_failed: AtomicU64::new(0),
            flush_failed: AtomicU64::new(0),
            writes_failing: AtomicBool::new(false),
            torn: AtomicU64::new(replays.iter().map(|r| r.torn).sum()),
            resent: AtomicU64::new(0),
            last_warning: Mutex::new(None),
            resending: Mutex::new(Vec::new()),
            sync_wake: SyncWake::default(),
            options,
        });
        let lanes = (0..lanes)
            .map(|index| {
                let index = u32::try_from(index).unwrap_or(u32::MAX);
                Lane::open(index, Arc::clone(&shared)).map(Arc::new)
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(io_error("creating a segment in", &dir))?;
        sync_dir(&root).map_err(io_error("flushing", &root))?;
        sync_dir(&dir).map_err(io_error("flushing", &dir))?;
        Ok(Self {
            shared,
            lanes,
            replays: Mutex::new(replays),
            sync: Mutex::new(None),
            undeleted: Mutex::new(Vec::new()),
            _lock: lock,
        })
    }

    /// The writer of serving thread `index`.
    pub fn lane(&self, index: usize) -> Option<Arc<Lane>> {
        self.lanes.get(index).cloned()
    }

    /// What earlier runs left, to send with [`Spool::resend`]; empty after the first call.
    pub fn take_replays(&self) -> Vec<Replay> {
        std::mem::take(&mut *self.replays.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Starts the thread that flushes the spool to disk every sync interval, then lets
    /// `sink` send what is flushed and deletes the segments `sink`'s acks have emptied.
    pub fn start_syncing(self: &Arc<Self>, sink: UsageSink) {
        sink.send_only_durable(self.on_disk_capacity());
        let spool = Arc::clone(self);
        let syncing = sink.clone();
        let spawned = std::thread::Builder::new()
            .name("sluice-spool".into())
            .spawn(move || {
                let interval = spool.shared.options.sync_interval;
                let wake = &spool.shared.sync_wake;
                let mut idle = false;
                loop {
                    let mut waited = if idle {
                        wake.wait(IDLE_SYNC_INTERVAL, true)
                    } else {
                        wake.wait(interval, false)
                    };
                    if idle && waited == Waited::Woken {
                        // A write ended the sleep: it and the writes after it are flushed
                        // one interval later, as in any round (at most one `fdatasync` an
                        // interval, however the writes come).
                        waited = wake.wait(interval, false);
                    }
                    let stopping = waited == Waited::Stop;
                    let entered = spool.sync_and_compact(&syncing, File::sync_data);
                    if stopping {
                        return;
                    }
                    // Asleep first, then the check: a write after the check sees the flag
                    // and wakes the thread; one before it leaves the spool unsettled.
                    wake.asleep.store(true, Ordering::SeqCst);
                    idle = syncing.entered() == entered
                        && spool.lanes.iter().all(|lane| lane.is_settled());
                    if !idle {
                        wake.asleep.store(false, Ordering::SeqCst);
                    }
                }
            });
        match spawned {
            Ok(handle) => {
                *self.sync.lock().unwrap_or_else(PoisonError::into_inner) =
                    Some(SyncThread { handle });
            }
            Err(err) => {
                // Without the thread nothing is flushed; send at once rather than never.
                tracing::error!(error = %err, "cannot start the usage spool's sync thread: usage is reported unflushed");
                sink.mark_durable(u64::MAX);
            }
        }
    }

    /// The most records the spool can hold, for the usage queue to keep them all while the
    /// control plane is away: a record's finish takes at least [`MIN_FINISH_BYTES`].
    fn on_disk_capacity(&self) -> usize {
        usize::try_from(self.shared.options.max_bytes / MIN_FINISH_BYTES).unwrap_or(usize::MAX)
    }

    /// One round of the sync thread: flush every file written since the last round (with
    /// `flush`: `File::sync_data` but in tests), let the reporter send what that made
    /// durable, delete the segments acks have emptied. Returns the last sequence it let the
    /// reporter send.
    ///
    /// A failed flush still lets its records go. Holding them back would make nothing
    /// durable: Linux reports a writeback error to a file once, so the next `fdatasync`
    /// passes whether or not the pages reached the disk, and the records would go one round
    /// later all the same. Sent, they are counted at once and a process crash loses none of
    /// them (the page cache keeps what `write` took). What the failure costs is a machine
    /// crash's promise: a request whose finish the disk lost but whose start it kept comes
    /// back at the next start as interrupted, a second record charged its prompt's estimate,
    /// as after a
    /// finish that could not be written (docs/guarantees.md, "Disk failing"). The failure is
    /// counted (`sluice_usage_spool_flush_failures_total`) and logged.
    fn sync_and_compact(&self, sink: &UsageSink, flush: fn(&File) -> std::io::Result<()>) -> u64 {
        // Every record up to `entered` was written before it entered the queue, so the
        // files collected next hold it.
        let entered = sink.entered();
        let mut renamed = false;
        for lane in &self.lanes {
            let (files, lane_renamed) = lane.take_unsynced();
            renamed |= lane_renamed;
            for file in files {
                if let Err(err) = flush(&file) {
                    self.flush_failed(&err, "flushing the usage spool to disk failed");
                }
            }
        }
        // A segment written over a spare file is durable under its own name only once the
        // directory holding the rename is.
        if renamed && let Err(err) = sync_dir(&self.shared.dir) {
            self.flush_failed(&err, "flushing the usage spool directory failed");
        }
        sink.mark_durable(entered);
        let acked = sink.acked();
        let mut removed = false;
        let mut undeleted = self
            .undeleted
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        undeleted.retain(|(path, bytes)| match std::fs::remove_file(path) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => true,
            _ => {
                self.shared.bytes.fetch_sub(*bytes, Ordering::Relaxed);
                removed = true;
                false
            }
        });
        for lane in &self.lanes {
            for segment in lane.take_compactable(acked) {
                // The lane's first acked segment becomes its spare, for its next segment to
                // be written over ([`lane`]'s docs); the others are deleted.
                if !lane.has_spare() {
                    let spare = self.shared.dir.join(spare_name(lane.index()));
                    if std::fs::rename(&segment.path, &spare).is_ok() {
                        self.shared
                            .bytes
                            .fetch_sub(segment.bytes, Ordering::Relaxed);
                        lane.give_spare(spare);
                        removed = true;
                        continue;
                    }
                }
                match std::fs::remove_file(&segment.path) {
                    Ok(()) => {
                        self.shared
                            .bytes
                            .fetch_sub(segment.bytes, Ordering::Relaxed);
                        removed = true;
                    }
                    Err(err) => {
                        tracing::warn!(path = %segment.path.display(), error = %err, "cannot delete an acked usage spool segment; will try again");
                        undeleted.push((segment.path, segment.bytes));
                    }
                }
            }
        }
        if removed && let Err(err) = sync_dir(&self.shared.dir) {
            tracing::warn!(error = %err, "flushing the usage spool directory failed");
        }
        entered
    }

    fn flush_failed(&self, err: &std::io::Error, message: &'static str) {
        self.shared.flush_failed.fetch_add(1, Ordering::Relaxed);
        if self.shared.warning_due() {
            tracing::error!(error = %err, dir = %self.shared.dir.display(), "{message}: the records it held are reported all the same, but a machine crash may now count a request twice (once more as interrupted, charged its prompt's estimate again)");
        }
    }

    /// Sends an earlier run's records again through the usage reporter, under its node id,
    /// incarnation and sequences, then deletes its directory. Runs until the control plane
    /// has acked everything (retrying as the reporter does); drop it to give up, leaving the
    /// directory for the next start.
    pub async fn resend(
        self: Arc<Self>,
        replay: Replay,
        client: UsageClient,
        identity: NodeIdentity,
    ) {
        let total = replay.len() as u64;
        let interrupted = replay.interrupted_incarnation();
        let Replay {
            dir,
            node_id,
            incarnation,
            finished,
            interrupted: unfinished,
            bytes,
            ..
        } = replay;
        let streams = [(incarnation.clone(), finished), (interrupted, unfinished)];
        for (incarnation, records) in streams {
            if records.is_empty() {
                continue;
            }
            let sink = UsageSink::replaying(records);
            self.resending().push(sink.clone());
            let sender = NodeIdentity {
                node_id: node_id.clone(),
                incarnation,
                ..identity.clone()
            };
            // Already stopped: the reporter sends everything, waits for the acks, returns.
            let stop = CancellationToken::new();
            stop.cancel();
            UsageReporter::new(sink.clone(), client.clone(), sender)
                .run(stop)
                .await;
            self.resending().retain(|s| !s.same_queue(&sink));
        }
        self.shared.resent.fetch_add(total, Ordering::Relaxed);
        // Its bytes leave the spool with the directory: once it is set aside, nothing reads
        // it again (its deletion there failing or not; what is left there goes at the next
        // start).
        match set_aside(&self.shared.options.data_dir, &dir) {
            Ok((aside, flushed)) => {
                self.shared.bytes.fetch_sub(bytes, Ordering::Relaxed);
                if let Err(err) = flushed.and_then(|()| std::fs::remove_dir_all(&aside)) {
                    tracing::warn!(path = %aside.display(), error = %err, "cannot delete a resent usage spool directory");
                }
            }
            Err(err) => {
                tracing::warn!(path = %dir.display(), error = %err, "cannot delete a resent usage spool directory");
            }
        }
        tracing::info!(
            %incarnation,
            records = total,
            "usage spool: the control plane acked every record of an earlier run"
        );
    }

    fn resending(&self) -> std::sync::MutexGuard<'_, Vec<UsageSink>> {
        self.shared
            .resending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The spool's figures now; `live` is the process's usage queue.
    pub fn stats(&self, live: &UsageSink) -> SpoolStats {
        let s = &self.shared;
        SpoolStats {
            records: s.in_flight.load(Ordering::Relaxed)
                + live.pending() as u64
                + s.resending_pending() as u64,
            bytes: s.bytes.load(Ordering::Relaxed),
            torn: s.torn.load(Ordering::Relaxed),
            resent: s.resent.load(Ordering::Relaxed),
            unwritten_full: s.unwritten_full.load(Ordering::Relaxed),
            unwritten_failed: s.unwritten_failed.load(Ordering::Relaxed),
            flush_failures: s.flush_failed.load(Ordering::Relaxed),
        }
    }

    /// Stops the sync thread after a last flush. When `drained` (the control plane acked
    /// every record of this process) and no request is left in flight, deletes this
    /// process's directory: there is nothing in it to send again.
    pub fn close(&self, drained: bool) {
        let sync = self
            .sync
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(SyncThread { handle }) = sync {
            self.shared.sync_wake.stop();
            let _ = handle.join();
        }
        let in_flight = self.shared.in_flight.load(Ordering::Relaxed);
        if drained && in_flight == 0 {
            if let Err(err) = std::fs::remove_dir_all(&self.shared.dir) {
                tracing::warn!(path = %self.shared.dir.display(), error = %err, "cannot delete the usage spool directory");
            }
        } else {
            tracing::warn!(
                path = %self.shared.dir.display(),
                in_flight,
                "usage spool kept: the next start on this data directory sends it again"
            );
        }
    }
}

/// Locks `<data_dir>/sluice-proxy.lock` for the life of the process and writes our pid in it.
fn lock(data_dir: &Path) -> Result<File, SpoolError> {
    let path = data_dir.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_error("opening", &path))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(&path)
                .ok()
                .map(|pid| pid.trim().to_owned())
                .filter(|pid| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
                .map(|pid| format!(" (pid {pid})"))
                .unwrap_or_default();
            return Err(SpoolError::Locked {
                dir: data_dir.to_owned(),
                holder,
            });
        }
        Err(std::fs::TryLockError::Error(err)) => return Err(io_error("locking", &path)(err)),
    }
    file.set_len(0).map_err(io_error("writing", &path))?;
    writeln!(file, "{}", std::process::id()).map_err(io_error("writing", &path))?;
    Ok(file)
}

/// Flushes a directory's entries (new and deleted files) to disk.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Deletes the spool directory `dir` of an earlier run: moved into [`DISCARDED_DIR`] first (one
/// rename, flushed), then deleted there.
fn discard(data_dir: &Path, dir: &Path) -> std::io::Result<()> {
    let (aside, flushed) = set_aside(data_dir, dir)?;
    flushed?;
    std::fs::remove_dir_all(aside)
}

/// Moves the spool directory `dir` of an earlier run into [`DISCARDED_DIR`], where no replay
/// reads it; returns where it is now, and whether the rename was flushed to disk.
fn set_aside(data_dir: &Path, dir: &Path) -> std::io::Result<(PathBuf, std::io::Result<()>)> {
    let discarded = data_dir.join(DISCARDED_DIR);
    std::fs::create_dir_all(&discarded)?;
    let name = dir
        .file_name()
        .ok_or_else(|| std::io::Error::other("a spool directory without a name"))?;
    let aside = discarded.join(name);
    std::fs::rename(dir, &aside)?;
    let flushed = dir.parent().map_or(Ok(()), sync_dir);
    Ok((aside, flushed))
}

/// `<lane>.<segment>.spool`.
fn segment_name(lane: u32, segment: u64) -> String {
    format!("{lane}.{segment:08}.spool")
}

/// `<lane>.spare`: an acked segment's file kept for the lane's next segment.
fn spare_name(lane: u32) -> String {
    format!("{lane}.spare")
}

/// The (lane, segment) of a segment file's name.
fn parse_segment_name(name: &str) -> Option<(u32, u64)> {
    let mut parts = name.strip_suffix(".spool")?.split('.');
    let lane = parts.next()?.parse().ok()?;
    let segment = parts.next()?.parse().ok()?;
    parts.next().is_none().then_some((lane, segment))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use sluice_proto::v1::{ErrorKind, UsageRecord};

    fn identity(incarnation: &str) -> NodeIdentity {
        NodeIdentity {
            node_id: "node-a".into(),
            hostname: "host".into(),
            build_version: "test".into(),
            incarnation: incarnation.into(),
        }
    }

    fn record(request_id: &str) -> UsageRecord {
        UsageRecord {
            request_id: request_id.into(),
            model: "m".into(),
            attempts: 1,
            ..Default::default()
        }
    }

    /// One request through `lane`: its start (charged as the accounting charges one its
    /// process's death interrupts: its prompt's estimate, 7, and its cost), then (if
    /// `finish`) its numbered finish.
    fn request(lane: &Arc<Lane>, sink: &UsageSink, id: &str, finish: bool) -> Option<u64> {
        let mut spooled = None;
        let mut rec = UsageRecord {
            prompt_tokens: 7,
            tokens_estimated: true,
            cost_nanos: 70,
            priced: true,
            ..record(id)
        };
        lane.start(&mut spooled, &mut rec).unwrap().now().unwrap();
        assert_eq!(rec.request_id, id, "the record comes back from the spool");
        if finish {
            rec.prompt_tokens = 3;
            rec.completion_tokens = 5;
            rec.tokens_estimated = false;
            rec.cost_nanos = 30;
            rec.status_code = 200;
            sink.record_with(rec, |r| lane.finish(spooled, r).now().unwrap());
        }
        spooled
    }

    fn ids(records: &[UsageRecord]) -> Vec<&str> {
        records.iter().map(|r| r.request_id.as_str()).collect()
    }

    /// The segment files in `dir` (not the spare), in order.
    /// The bytes the frames of the segment files in `dir` take.
    fn frame_bytes(dir: &Path) -> u64 {
        segments(dir)
            .iter()
            .filter(|p| p.is_file())
            .map(|p| {
                entry::decode_segment(&std::fs::read(p).unwrap())
                    .frames
                    .valid_len as u64
            })
            .sum()
    }

    /// A spool of one lane in `data` with segments of `segment_bytes`, its directory, and the
    /// lane holding `requests` finished requests `r0`, `r1`, ….
    fn small_segments(
        data: &Path,
        sink: &UsageSink,
        segment_bytes: u64,
        requests: usize,
    ) -> (Spool, PathBuf, Arc<Lane>) {
        let options = SpoolOptions {
            segment_bytes,
            ..SpoolOptions::new(data)
        };
        let spool = Spool::open(options, &identity("inc-1"), 1).unwrap();
        let lane = spool.lane(0).unwrap();
        for i in 0..requests {
            request(&lane, sink, &format!("r{i}"), true);
        }
        (spool, data.join(SPOOL_DIR).join("inc-1"), lane)
    }

    fn segments(dir: &Path) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "spool"))
            .collect();
        files.sort();
        files
    }

    #[test]
    fn a_crash_leaves_finished_and_interrupted_requests_for_the_next_start() {
        let data = tempfile::tempdir().unwrap();
        let sink = UsageSink::new(100);
        {
            let spool = Spool::open(SpoolOptions::new(data.path()), &identity("inc-1"), 2).unwrap();
            let (a, b) = (spool.lane(0).unwrap(), spool.lane(1).unwrap());
            request(&a, &sink, "r1", true);
            request(&a, &sink, "r2-running", false);
            // A request refused before any upstream call: a finish without a start.
            sink.record_with(record("r3-refused"), |r| b.finish(None, r).now().unwrap());
            request(&b, &sink, "r4", true);
            request(&b, &sink, "r5-running", false);
            // The process dies: no close, nothing acked.
        }
        let spool = Spool::open(SpoolOptions::new(data.path()), &identity("inc-2"), 1).unwrap();
        let replays = spool.take_replays();
        assert_eq!(replays.len(), 1);
        let replay = &replays[0];
        assert_eq!(
            (replay.node_id.as_str(), replay.incarnation.as_str()),
            ("node-a", "inc-1")
        );
        assert_eq!(ids(&replay.finished), ["r1", "r3-refused", "r4"]);
        let sequences: Vec<u64> = replay.finished.iter().map(|r| r.sequence).collect();
        assert_eq!(
            sequences,
            [1, 2, 3],
            "finished records keep their sequences"
        );
        assert_eq!(replay.finished[0].prompt_tokens, 3);
        assert_eq!(ids(&replay.interrupted), ["r2-running", "r5-running"]);
        for (n, r) in replay.interrupted.iter().enumerate() {
            assert_eq!(r.sequence, n as u64 + 1);
            assert_eq!(r.error_kind, ErrorKind::DataPlaneCrashed as i32);
            // Charged what its start said: the prompt's estimate and its cost.
            assert_eq!(
                (r.prompt_tokens, r.completion_tokens, r.status_code),
                (7, 0, 0)
            );
            assert_eq!(
                (r.cost_nanos, r.priced, r.tokens_estimated),
                (70, true, true)
            );
            assert_eq!((r.model.as_str(), r.attempts), ("m", 1));
        }
        assert_eq!(replay.interrupted_incarnation(), "inc-1.interrupted");
        assert_eq!(replay.torn, 0);
        assert!(spool.take_replays().is_empty());
        // The new process writes its own directory beside the old one.
        assert!(data.path().join(SPOOL_DIR).join("inc-2").is_dir());
    }

    /// What a deletion of a resent run's directory cut short leaves (the directory moved
    /// aside, some of its files still there) is never replayed, and is gone after the next
    /// start.
    #[test]
    fn a_run_whose_deletion_was_cut_short_is_not_replayed() {
        let data = tempfile::tempdir().unwrap();
        {
            let spool = Spool::open(SpoolOptions::new(data.path()), &identity("inc-1"), 1).unwrap();
            let lane = spool.lane(0).unwrap();
            let mut spooled = None;
            lane.start(&mut spooled, &mut record("running"))
                .unwrap()
                .now()
                .unwrap();
        }
        let discarded = data.path().join(DISCARDED_DIR);
        std::fs::create_dir_all(&discarded).unwrap();
        std::fs::rename(
            data.path().join(SPOOL_DIR).join("inc-1"),
            discarded.join("inc-1"),
        )
        .unwrap();
        let spool = Spool::open(SpoolOptions::new(data.path()), &identity("inc-2"), 1).unwrap();
        assert!(spool.take_replays().is_empty());
        assert!(!discarded.exists());
        // And `discard` leaves nothing under the spool's root.
        let empty = data.path().join(SPOOL_DIR).join("inc-0");
        std::fs::create_dir(&empty).unwrap();
        std::fs::write(empty.join("0.00000001.spool"), b"x").unwrap();
        discard(data.path(), &empty).unwrap();
        assert!(!empty.exists());
    }

    #[test]
    fn only_a_failing_disk_is_one_a_replica_starts_without_its_spool_on() {
        use std::io::{Error, ErrorKind};
        let io = |source: Error| SpoolError::Io {
            what: "creating",
            path: "/data/usage-spool/x".into(),
            source,
        };
        for failing in [
            Error::from(ErrorKind::StorageFull),
            Error::from(ErrorKind::ReadOnlyFilesystem),
            Error::from_raw_os_error(EIO),
        ] {
            assert!(io(failing).disk_failing());
        }
        for setup in [
            Error::from(ErrorKind::PermissionDenied),
            Error::from(ErrorKind::NotFound),
        ] {
            assert!(!io(setup).disk_failing());
        }
        assert!(
            !SpoolError::Locked {
                dir: "/data".into(),
                holder: String::new()
            }
            .disk_failing()
        );
    }

    #[test]
    fn a_retried_request_is_interrupted_at_its_last_attempt_and_counted_once() {
        let data = tempfile::tempdir().unwrap();
        {
            let spool = Spool::open(SpoolOptions::new(data.path()), &identity("inc-1"), 1).unwrap();
            let lane = spool.lane(0).unwrap();
            let mut spooled = None;
            let mut rec = record("retried");
            rec.backend_id = "b1".into();
            lane.start(&mut spooled, &mut rec).unwrap().now().unwrap();
            rec.backend_id = "b2".into();
            rec.attempts = 2;
            lane.start(&mut spooled, &mut rec).unwrap().now().unwrap();
            assert_eq!(lane.in_flight(), 1);
        }
        let spool = Spool::open(SpoolOptions::new(data.path()), &identity("inc-2"), 1).unwrap();
        let replay = spool.take_replays().remove(0);
        assert!(replay.finished.is_empty());
        assert_eq!(ids(&replay.interrupted), ["retried"]);
        assert_eq!(replay.interrupted[0].backend_id, "b2");
        assert_eq!(replay.interrupted[0].attempts, 2);
    }

    #[test]
    fn a_torn_last_write_is_cut_off_counted_and_never_read() {
        let data = tempfile::tempdir().unwrap();
        let sink = UsageSink::new(100);
        let dir = data.path().join(SPOOL_DIR).join("inc-1");
        {
            let spool = Spool::open(SpoolOptions::new(data.path()), &identity("inc-1"), 1).unwrap();
            let lane = spool.lane(0).unwrap();
            for i in 0..3 {
                request(&lane, &sink, &format!("r{i}"), true);
            }
        }
        let file = segments(&dir).remove(0);
        let whole = std::fs::read(&file).unwrap();
        let frames = entry::decode_segment(&whole).frames;
        let last = frames.payloads.last().unwrap().len() + frame::HEADER_BYTES;
        let last_start = whole.len() - last;
        // The last write is r2's finish: cut anywhere inside it, r2 is interrupted (its start
        // is whole), r0 and r1 are finished, and the cut frame is never read.
        for cut in last_start + 1..whole.len() {
            let data = tempfile::tempdir().unwrap();
            let dir = data.path().join(SPOOL_DIR).join("inc-1");
            std::fs::create_dir_all(&dir).unwrap();
            let copy = dir.join(file.file_name().unwrap());
            std::fs::write(&copy, &whole[..cut]).unwrap();
            let spool = Spool::open(SpoolOptions::new(data.path()), &identity("inc-2"), 1).unwrap();
            let replay = spool.take_replays().remove(0);
            assert_eq!(ids(&replay.finished), ["r0", "r1"], "cut at {cut}");
            assert_eq!(ids(&replay.interrupted), ["r2"], "cut at {cut}");
            assert_eq!(replay.torn, 1, "cut at {cut}");
            assert_eq!(spool.stats(&UsageSink::new(1)).torn, 1);
            assert_eq!(std::fs::metadata(&copy).unwrap().len(), last_start as u64);
            drop(spool);
            // Read again (a replay interrupted by another crash): the same records, no tear.
            let again = Spool::open(SpoolOptions::new(data.path()), &identity("inc-3"), 1).unwrap();
            let replays = again.take_replays();
            let first = replays.iter().find(|r| r.incarnation == "inc-1").unwrap();
            assert_eq!(ids(&first.finished), ["r0", "r1"]);
            assert_eq!(ids(&first.interrupted), ["r2"]);
            assert_eq!(first.torn, 0);
        }
    }

    #[test]
    fn rotation_carries_running_requests_and_acks_delete_old_segments() {
        let data = tempfile::tempdir().unwrap();
        let sink = UsageSink::new(10_000);
        let dir = data.path().join(SPOOL_DIR).join("inc-1");
        {
            let options = SpoolOptions {
                segment_bytes: 1024,
                ..SpoolOptions::new(data.path())
            };
            let spool = Spool::open(options, &identity("inc-1"), 1).unwrap();
            let lane = spool.lane(0).unwrap();
            request(&lane, &sink, "long-stream", false);
            for i in 0..60 {
                request(&lane, &sink, &format!("short-{i}"), true);
            }
            let before = segments(&dir).len();
            assert!(before >= 4, "{before} segments");
            // Nothing acked: nothing deleted.
            spool.sync_and_compact(&sink, File::sync_data);
            assert_eq!(segments(&dir).len(), before);
            // Everything acked: only the segments still needed stay.
            sink.ack(sink.entered());
            spool.sync_and_compact(&sink, File::sync_data);
            spool.sync_and_compact(&sink, File::sync_data);
            let after = segments(&dir).len();
            assert!(after <= 2, "{after} of {before} segments left");
            // The bytes the segments' own frames take (a file written over an acked one
            // holds more), the spare not counted.
            assert_eq!(spool.stats(&sink).bytes, frame_bytes(&dir));
            assert!(
                dir.join(spare_name(0)).exists(),
                "an acked segment kept as the spare"
            );
            assert_eq!(spool.stats(&sink).records, 1, "the long stream");
        }
        // The long stream's start was carried into the surviving segment; no finished
        // request comes back as interrupted.
        let spool = Spool::open(SpoolOptions::new(data.path()), &identity("inc-2"), 1).unwrap();
        let replay = spool.take_replays().remove(0);
        assert_eq!(ids(&replay.interrupted), ["long-stream"]);
        assert!(
            replay
                .finished
                .iter()
                .all(|r| r.request_id.starts_with("short-"))
        );
    }

    /// An acked segment whose deletion fails is tried again each round, and its bytes leave
    /// the spool's count when it is gone: forgotten, its bytes stayed counted for the rest of
    /// the process (a few failed unlinks made the spool look full, and with
    /// `--usage-spool-full refuse` every request was refused, on an empty disk).
    #[test]
    fn a_segment_whose_deletion_failed_is_deleted_later_and_uncounted() {
        let data = tempfile::tempdir().unwrap();
        let sink = UsageSink::new(10_000);
        let (spool, dir, _lane) = small_segments(data.path(), &sink, 1024, 60);
        let written = segments(&dir);
        assert!(written.len() >= 4, "{written:?}");
        // The second oldest (the oldest becomes the lane's spare) cannot be unlinked: a
        // directory holding a file stands where it was.
        let stuck = &written[1];
        std::fs::remove_file(stuck).unwrap();
        std::fs::create_dir(stuck).unwrap();
        std::fs::write(stuck.join("obstacle"), b"x").unwrap();
        sink.ack(sink.entered());
        spool.sync_and_compact(&sink, File::sync_data);
        spool.sync_and_compact(&sink, File::sync_data);
        assert!(stuck.exists());
        assert!(
            spool.stats(&sink).bytes > frame_bytes(&dir),
            "counted until it is gone"
        );
        std::fs::remove_dir_all(stuck).unwrap();
        spool.sync_and_compact(&sink, File::sync_data);
        assert_eq!(spool.stats(&sink).bytes, frame_bytes(&dir));
    }

    #[test]
    fn a_finish_in_a_deleted_segment_never_leaves_its_start_behind() {
        // Long requests finishing after several rotations, acked in between.
        let data = tempfile::tempdir().unwrap();
        let sink = UsageSink::new(10_000);
        {
            let options = SpoolOptions {
                segment_bytes: 700,
                ..SpoolOptions::new(data.path())
            };
            let spool = Spool::open(options, &identity("inc-1"), 1).unwrap();
            let lane = spool.lane(0).unwrap();
            let mut running = Vec::new();
            for i in 0..40 {
                let mut spooled = None;
                let mut rec = record(&format!("long-{i}"));
                lane.start(&mut spooled, &mut rec).unwrap().now().unwrap();
                running.push((spooled, rec));
                if i % 3 == 2 {
                    let (spooled, rec) = running.remove(0);
                    sink.record_with(rec, |r| lane.finish(spooled, r).now().unwrap());
                    sink.ack(sink.entered());
                    spool.sync_and_compact(&sink, File::sync_data);
                }
            }
            assert_eq!(lane.in_flight(), running.len());
        }
        let spool = Spool::open(SpoolOptions::new(data.path()), &identity("inc-2"), 1).unwrap();
        let replay = spool.take_replays().remove(0);
        let finished: std::collections::HashSet<&str> = ids(&replay.finished).into_iter().collect();
        // 13 finished and acked, 27 still running: exactly those come back as interrupted.
        assert_eq!(replay.interrupted.len(), 27);
        assert!(
            ids(&replay.interrupted)
                .iter()
                .all(|id| !finished.contains(id))
        );
    }

    #[test]
    fn a_segment_written_over_an_acked_one_brings_back_none_of_its_records() {
        let data = tempfile::tempdir().unwrap();
        let sink = UsageSink::new(10_000);
        let dir = data.path().join(SPOOL_DIR).join("inc-1");
        {
            let options = SpoolOptions {
                segment_bytes: 1024,
                ..SpoolOptions::new(data.path())
            };
            let spool = Spool::open(options, &identity("inc-1"), 1).unwrap();
            let lane = spool.lane(0).unwrap();
            // First: requests running across several segments (their starts in each), then
            // finished and acked, so that the segments are compacted and one kept as spare.
            let mut running = Vec::new();
            for i in 0..10 {
                let mut spooled = None;
                let mut rec = record(&format!("old-long-{i}"));
                lane.start(&mut spooled, &mut rec).unwrap().now().unwrap();
                running.push((spooled, rec));
            }
            for i in 0..30 {
                request(&lane, &sink, &format!("old-short-{i}"), true);
            }
            for (spooled, rec) in running {
                sink.record_with(rec, |r| lane.finish(spooled, r).now().unwrap());
            }
            sink.ack(sink.entered());
            spool.sync_and_compact(&sink, File::sync_data);
            spool.sync_and_compact(&sink, File::sync_data);
            assert!(dir.join(spare_name(0)).exists());
            // Then: new requests, unacked, one of them still running at the crash, enough
            // to start the segment that is written over the spare.
            request(&lane, &sink, "new-running", false);
            for i in 0..12 {
                request(&lane, &sink, &format!("new-{i}"), true);
            }
            assert!(!dir.join(spare_name(0)).exists(), "the spare was used");
            // The rename is made durable by the next round, which flushes the directory as
            // well as the files (not only on ext4, where a file's flush may leave it out).
            let (_, renamed) = lane.take_unsynced();
            assert!(renamed, "the next round flushes the directory");
            request(&lane, &sink, "new-after", true);
            let (files, renamed) = lane.take_unsynced();
            assert_eq!((files.len(), renamed), (1, false), "and only that round");
        }
        let reused: Vec<_> = segments(&dir)
            .into_iter()
            .filter(|p| entry::decode_segment(&std::fs::read(p).unwrap()).reused_file)
            .collect();
        assert_eq!(reused.len(), 1);
        let bytes = std::fs::read(&reused[0]).unwrap();
        let frames = entry::decode_segment(&bytes).frames;
        assert!(
            frames.valid_len < bytes.len(),
            "the file still holds frames of its earlier segment past its own"
        );
        // What is read of it is its own segment's: only the new requests.
        let read: Vec<String> = frames
            .payloads
            .iter()
            .filter_map(|p| match entry::decode(p).unwrap().kind {
                Some(entry::Kind::Start(mark) | entry::Kind::Finish(mark)) => {
                    mark.record.map(|r| r.request_id)
                }
                _ => None,
            })
            .collect();
        assert!(!read.is_empty());
        assert!(read.iter().all(|id| id.starts_with("new-")), "{read:?}");
        let spool = Spool::open(SpoolOptions::new(data.path()), &identity("inc-2"), 1).unwrap();
        let replay = spool.take_replays().remove(0);
        assert_eq!(ids(&replay.interrupted), ["new-running"]);
        let finished = ids(&replay.finished);
        for i in 0..12 {
            assert!(finished.contains(&format!("new-{i}").as_str()), "new-{i}");
        }
        assert_eq!(
            replay.torn, 0,
            "the earlier segment's frames are not damage"
        );
    }

    #[test]
    fn every_segment_of_a_lane_checks_its_frames_under_a_seed_of_its_own() {
        // What keeps a reused file's earlier frames from being read (the property itself:
        // frame::tests::a_reused_file_reads_as_its_new_segment_only).
        let data = tempfile::tempdir().unwrap();
        let sink = UsageSink::new(10_000);
        let (_spool, dir, _lane) = small_segments(data.path(), &sink, 512, 40);
        let mut seeds = std::collections::HashSet::new();
        let files = segments(&dir);
        assert!(files.len() >= 5, "{} segments", files.len());
        for file in &files {
            let bytes = std::fs::read(file).unwrap();
            let frames = entry::decode_segment(&bytes).frames;
            assert_eq!(
                frames.valid_len,
                bytes.len(),
                "{}: read whole",
                file.display()
            );
            let Some(entry::Kind::Header(header)) = entry::decode(frames.payloads[0]).unwrap().kind
            else {
                panic!("{} does not start with its header", file.display());
            };
            assert_ne!(header.frame_seed, 0);
            assert!(
                seeds.insert(header.frame_seed),
                "seed {} twice",
                header.frame_seed
            );
        }
    }

    #[test]
    fn a_second_process_on_the_same_directory_is_refused() {
        let data = tempfile::tempdir().unwrap();
        let _first = Spool::open(SpoolOptions::new(data.path()), &identity("inc-1"), 1).unwrap();
        let err = Spool::open(SpoolOptions::new(data.path()), &identity("inc-2"), 1).unwrap_err();
        assert!(matches!(err, SpoolError::Locked { .. }), "{err}");
        let message = err.to_string();
        assert!(
            message.contains(&format!("(pid {})", std::process::id())),
            "{message}"
        );
        assert!(
            message.contains("in use by another sluice-proxy"),
            "{message}"
        );
    }

    #[test]
    fn a_full_spool_serves_or_refuses_as_configured() {
        for on_full in [OnFull::Serve, OnFull::Refuse] {
            let data = tempfile::tempdir().unwrap();
            let sink = UsageSink::new(100);
            let options = SpoolOptions {
                max_bytes: 600,
                on_full,
                ..SpoolOptions::new(data.path())
            };
            let spool = Spool::open(options, &identity("inc-1"), 1).unwrap();
            let lane = spool.lane(0).unwrap();
            let mut running = None;
            let mut rec = record("fits");
            lane.start(&mut running, &mut rec).unwrap().now().unwrap();
            // Requests until one finds no room for its start.
            let (result, mut spooled, refused) = loop {
                let mut spooled = None;
                let mut rec = record("filler");
                let result = lane
                    .start(&mut spooled, &mut rec)
                    .map(|written| written.now().unwrap());
                if spooled == Some(lane::REFUSED_START) {
                    break (result, spooled, rec);
                }
                sink.record_with(rec, |r| lane.finish(spooled, r).now().unwrap());
            };
            assert!(spool.stats(&sink).bytes > 500);
            match on_full {
                OnFull::Serve => assert_eq!(result, Ok(())),
                OnFull::Refuse => assert_eq!(result, Err(Refused(Unwritten::Full))),
            }
            assert_eq!(spool.stats(&sink).unwritten_full, 1);
            // Counted once: not again at a retry's start, nor at its finish, which finds no
            // room either (it was counted at each of them).
            let mut again = record("filler");
            lane.start(&mut spooled, &mut again).unwrap().now().unwrap();
            sink.record_with(refused, |r| {
                let written = lane.finish(spooled, r);
                assert!(!written.holds_record());
                written.now().unwrap()
            });
            assert_eq!(spool.stats(&sink).unwritten_full, 1);
            // The request already on disk still gets its finish, past the bound.
            let bytes = spool.stats(&sink).bytes;
            sink.record_with(rec, |r| lane.finish(running, r).now().unwrap());
            assert!(spool.stats(&sink).bytes > bytes);
            assert_eq!(lane.in_flight(), 0);
        }
    }

    #[test]
    fn a_spare_renamed_whose_new_header_was_lost_brings_back_none_of_its_records() {
        let data = tempfile::tempdir().unwrap();
        let sink = UsageSink::new(100);
        let dir = data.path().join(SPOOL_DIR).join("inc-1");
        {
            let spool = Spool::open(SpoolOptions::new(data.path()), &identity("inc-1"), 1).unwrap();
            let lane = spool.lane(0).unwrap();
            request(&lane, &sink, "r1", true);
            request(&lane, &sink, "r2-running", false);
        }
        // Segment 1, acked and kept as the spare, renamed to segment 2 by a rotation; a
        // machine crash kept the rename and lost the header written over the file's start.
        std::fs::rename(dir.join(segment_name(0, 1)), dir.join(segment_name(0, 2))).unwrap();
        let spool = Spool::open(SpoolOptions::new(data.path()), &identity("inc-2"), 1).unwrap();
        let replays = spool.take_replays();
        let records: Vec<&str> = replays
            .iter()
            .flat_map(|r| ids(&r.finished).into_iter().chain(ids(&r.interrupted)))
            .collect();
        assert!(
            records.is_empty(),
            "an acked segment's records came back: {records:?}"
        );
        assert!(!dir.exists(), "nothing left to send: the directory is gone");
    }

    #[test]
    fn a_failed_flush_is_counted_and_its_records_still_reach_the_control_plane() {
        use crate::usage::Outbox;
        let data = tempfile::tempdir().unwrap();
        let sink = UsageSink::new(100);
        sink.send_only_durable(0);
        let spool = Spool::open(SpoolOptions::new(data.path()), &identity("inc-1"), 2).unwrap();
        let (a, b) = (spool.lane(0).unwrap(), spool.lane(1).unwrap());
        request(&a, &sink, "r1", true);
        request(&b, &sink, "r2", true);
        let mut outbox = Outbox::new(sink.clone(), "node-a".into(), "inc-1".into());
        assert!(
            outbox.next_report(true, &mut Vec::new()).is_none(),
            "nothing goes before a flush"
        );

        fn failing(_: &File) -> std::io::Result<()> {
            Err(std::io::Error::from_raw_os_error(5)) // EIO
        }
        spool.sync_and_compact(&sink, failing);
        assert_eq!(
            spool.stats(&sink).flush_failures,
            2,
            "one failure per lane's file"
        );
        let report = outbox
            .next_report(true, &mut Vec::new())
            .expect("the records go all the same");
        assert_eq!(report.records.len(), 2);

        // A later round with nothing new to flush fails nothing more; the files stay whole.
        spool.sync_and_compact(&sink, failing);
        assert_eq!(spool.stats(&sink).flush_failures, 2);
        drop((a, b, spool));
        let spool = Spool::open(SpoolOptions::new(data.path()), &identity("inc-2"), 1).unwrap();
        assert_eq!(ids(&spool.take_replays()[0].finished), ["r1", "r2"]);
    }

    #[test]
    fn a_settled_spools_sync_thread_sleeps_until_a_write_wakes_it() {
        use crate::testing::eventually;
        let data = tempfile::tempdir().unwrap();
        let sink = UsageSink::new(100);
        let spool =
            Arc::new(Spool::open(SpoolOptions::new(data.path()), &identity("inc-1"), 1).unwrap());
        spool.start_syncing(sink.clone());
        let lane = spool.lane(0).unwrap();
        let asleep = || spool.shared.sync_wake.asleep.load(Ordering::SeqCst);
        // The first segment's head flushed, nothing else written: the thread sleeps.
        eventually("a sleeping sync thread", asleep);

        // A write wakes it (before the write returns), and the record it flushes may be sent.
        request(&lane, &sink, "r1", true);
        assert!(!asleep(), "the write woke the sync thread");
        eventually("r1 flushed", || sink.durable() >= 1);
        eventually("asleep again", asleep);

        // A request still running keeps nothing awake once its start is flushed; its finish
        // wakes the thread again.
        request(&lane, &sink, "r2-running", false);
        assert!(!asleep());
        eventually("asleep with a request running", asleep);
        sink.record_with(record("r3"), |r| lane.finish(None, r).now().unwrap());
        assert!(!asleep());
        eventually("r3 flushed", || sink.durable() >= 2);
        spool.close(false);
    }

    #[test]
    fn a_wake_up_ends_only_a_sleep_and_a_stop_ends_any_wait() {
        let wake = SyncWake::default();
        // A wake-up that raced with the decision not to sleep: the thread's next interval is
        // waited whole, not cut short (two rounds, two flushes, back to back).
        wake.asleep.store(true, Ordering::SeqCst);
        wake.wake();
        let started = Instant::now();
        assert_eq!(wake.wait(Duration::from_millis(50), false), Waited::Elapsed);
        assert!(started.elapsed() >= Duration::from_millis(50));
        // The wake-up was dropped with it: a sleep after it waits for a new one.
        assert_eq!(wake.wait(Duration::from_millis(10), true), Waited::Elapsed);

        // A wake-up ends a sleep at once, however long the sleep.
        wake.asleep.store(true, Ordering::SeqCst);
        wake.wake();
        assert!(!wake.asleep.load(Ordering::SeqCst));
        let started = Instant::now();
        assert_eq!(wake.wait(Duration::from_secs(60), true), Waited::Woken);
        assert!(started.elapsed() < Duration::from_secs(30));

        // A wake-up while the thread is awake is no wake-up at all.
        wake.wake();
        assert_eq!(wake.wait(Duration::from_millis(10), true), Waited::Elapsed);

        // A stop ends either kind of wait.
        wake.stop();
        assert_eq!(wake.wait(Duration::from_secs(60), false), Waited::Stop);
        assert_eq!(wake.wait(Duration::from_secs(60), true), Waited::Stop);
    }

    #[test]
    fn a_clean_stop_with_everything_acked_leaves_nothing_to_send_again() {
        let data = tempfile::tempdir().unwrap();
        let sink = UsageSink::new(100);
        let spool =
            Arc::new(Spool::open(SpoolOptions::new(data.path()), &identity("inc-1"), 1).unwrap());
        spool.start_syncing(sink.clone());
        request(&spool.lane(0).unwrap(), &sink, "r1", true);
        sink.ack(1);
        spool.close(sink.pending() == 0);
        assert!(!data.path().join(SPOOL_DIR).join("inc-1").exists());
        drop(spool);
        let next = Spool::open(SpoolOptions::new(data.path()), &identity("inc-2"), 1).unwrap();
        assert!(next.take_replays().is_empty());
    }

    #[test]
    fn segment_names_round_trip() {
        assert_eq!(parse_segment_name(&segment_name(3, 12)), Some((3, 12)));
        assert_eq!(parse_segment_name("3.12.spool.tmp"), None);
        assert_eq!(parse_segment_name("x.1.spool"), None);
        assert_eq!(parse_segment_name("1.2.3.spool"), None);
    }
}
