//! One serving thread's writer into the spool: segment files of its own, so threads never
//! wait on each other, and a new segment every [`SpoolOptions::segment_bytes`] that carries
//! over the starts of requests still running, so that old segments can be deleted as acks
//! arrive.
//!
//! Group commit: a request appends its entry to the lane's batch and awaits [`Written`]
//! before it goes on (calls its upstream, or sends the end of its answer). The first request
//! to wait yields once, so that the other requests its thread serves in the same pass of the
//! scheduler append theirs; then it writes the whole batch with one plain `write` and wakes
//! them. Under load one system call carries many entries; a process crash still loses nothing
//! a request went on after. When no other request of the thread is in flight, nothing could
//! join the batch, and the first request writes at once without yielding.
//!
//! Reuse: a segment file deleted once acked would leave every new segment to grow a new file,
//! and growing a file costs the kernel more than the write itself (a page to allocate, blocks to
//! reserve and later allocate, pages to free at deletion: measured, 2.6 µs a 1 kB write against
//! 1.6 µs into a file's existing pages). So the spool's sync thread hands a lane the first
//! acked segment as its *spare* (`<lane>.spare`) instead of deleting it, and the lane's next
//! segment is written over it from the start, its pages still in the page cache and its blocks
//! on disk. The seeded checks of [`super::frame`] keep the earlier segment's frames left past
//! the new ones from being read.
//!
//! [`SpoolOptions::segment_bytes`]: super::SpoolOptions::segment_bytes

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

use sluice_proto::v1::UsageRecord;

/// The number a request's start is given when the spool had no room for it: no request has
/// it (requests count from 1), its later starts (a retry on another backend) are not tried
/// again, and the unwritten request is counted once
/// (`sluice_usage_spool_unwritten_records_total`), not again at each of them and at its finish.
pub const REFUSED_START: u64 = 0;

use super::entry::{self, Header};
use super::frame;
use super::{OnFull, Shared, Unwritten};
use crate::usage::Queued;

/// The spool could not take a request's start and the policy is to refuse the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the usage spool cannot record the request ({0})")]
pub struct Refused(pub Unwritten);

/// One segment file of a lane.
#[derive(Debug)]
pub(super) struct Segment {
    pub path: PathBuf,
    pub file: Arc<File>,
    pub bytes: u64,
    /// The highest sequence of a finish in it (0: none).
    pub max_sequence: u64,
    /// Every write to it has been handed to an fdatasync.
    pub synced: bool,
    /// The starts carried into it at its creation have not been handed to an fdatasync yet:
    /// until they have, the segment before it must stay.
    pub carrying: bool,
    /// The seed of its frames' checks.
    pub seed: u32,
    /// Its name came by renaming a spare file, and the directory has not been flushed since:
    /// until it is, a machine crash may bring the file back under the spare's name, which
    /// a replay ignores (a new file's name is flushed with the file, on ext4 and its kind).
    pub renamed: bool,
}

/// A serving thread's writer; see the module docs. Only its own thread uses it on the
/// request path, so its lock is not contended there (the spool's sync thread takes it
/// briefly every sync interval).
#[derive(Debug)]
pub struct Lane {
    index: u32,
    shared: Arc<Shared>,
    state: Mutex<LaneState>,
}

#[derive(Debug)]
struct LaneState {
    /// `None` after a failed write until a new segment can be opened.
    current: Option<Segment>,
    /// Closed segments, oldest first.
    closed: VecDeque<Segment>,
    /// An acked segment's file, for the next segment to be written over.
    spare_file: Option<PathBuf>,
    /// Requests started and not finished: the frame of their latest start, to carry into
    /// every new segment (in request order). Hashed with foldhash: an insert and a removal a
    /// request cost a fifth of a B-tree's (468 instructions a request with one).
    open: foldhash::HashMap<u64, Vec<u8>>,
    /// Buffers of finished starts, for the next starts to reuse (an allocation and a free
    /// less per request).
    spare: Vec<Vec<u8>>,
    next_request: u64,
    next_segment: u64,
    /// Frames appended and not written yet, in order.
    batch: Vec<u8>,
    /// Records in `batch`, and the highest finish sequence among them.
    batch_records: u64,
    batch_max_sequence: u64,
    /// Bytes appended since the lane opened: a frame's position is this after appending it.
    appended: u64,
    /// Bytes written (or whose write failed): frames up to here are done.
    done: u64,
    /// Positions of the latest batches whose write failed, as (after, through).
    failed: VecDeque<(u64, u64)>,
    /// The [`Written`] that will write the batch, by ticket.
    leader: Option<u64>,
    next_ticket: u64,
    /// Requests waiting for the batch to be written.
    waiting: Vec<Waker>,
}

/// Failed batches remembered, so that a request waiting on one learns it failed.
const FAILURES_KEPT: usize = 16;

impl Lane {
    /// A lane with its first segment open (so a directory it cannot write to fails at start).
    pub(super) fn open(index: u32, shared: Arc<Shared>) -> std::io::Result<Self> {
        let mut state = LaneState {
            current: None,
            closed: VecDeque::new(),
            spare_file: None,
            open: foldhash::HashMap::default(),
            spare: Vec::new(),
            next_request: 1,
            next_segment: 1,
            batch: Vec::with_capacity(16 * 1024),
            batch_records: 0,
            batch_max_sequence: 0,
            appended: 0,
            done: 0,
            failed: VecDeque::new(),
            leader: None,
            next_ticket: 1,
            waiting: Vec::new(),
        };
        state.rotate(index, &shared)?;
        Ok(Self {
            index,
            shared,
            state: Mutex::new(state),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LaneState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends the start of a request about to call an upstream; the request calls it once
    /// the returned [`Written`] resolves. `request` is its number in this lane, given on its
    /// first start. When the spool is full the first start is not appended: the request goes
    /// on without it unless the policy refuses it.
    pub fn start(
        self: &Arc<Self>,
        request: &mut Option<u64>,
        record: &mut UsageRecord,
    ) -> Result<Written, Refused> {
        if *request == Some(REFUSED_START) {
            // Its first start found no room: it goes on without one (counted then, once).
            return Ok(Written::ready());
        }
        let mut state = self.lock();
        let first = request.is_none();
        let id = request.unwrap_or(state.next_request);
        let mut frame = state.spare.pop().unwrap_or_else(|| Vec::with_capacity(256));
        frame.clear();
        entry::frame_start(id, record, &mut frame);
        if first && !self.shared.has_room(frame.len()) {
            state.recycle(frame);
            self.shared.unwritten(Unwritten::Full, 1);
            *request = Some(REFUSED_START);
            return match self.shared.on_full {
                OnFull::Refuse => Err(Refused(Unwritten::Full)),
                OnFull::Serve => Ok(Written::ready()),
            };
        }
        if first {
            state.next_request += 1;
            *request = Some(id);
            self.shared.in_flight.fetch_add(1, Ordering::Relaxed);
        }
        let upto = state.append(&frame, 0);
        if let Some(earlier) = state.open.insert(id, frame) {
            state.recycle(earlier);
        }
        Ok(self.written(upto))
    }

    /// Appends the finish of a request (its numbered, encoded `record`; `request` if it had
    /// a start); the request sends the end of its answer once the returned [`Written`]
    /// resolves. A finish whose start is in the spool is always appended, even past the size
    /// bound, or a replay would count the request again as interrupted.
    pub fn finish(self: &Arc<Self>, request: Option<u64>, record: &Queued) -> Written {
        let mut state = self.lock();
        if let Some(id) = request
            && let Some(frame) = state.open.remove(&id)
        {
            state.recycle(frame);
            self.shared.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
        let at = state.batch.len();
        entry::frame_finish(request.unwrap_or(0), &record.encoded, &mut state.batch);
        let len = state.batch.len() - at;
        let startless = request.is_none_or(|id| id == REFUSED_START);
        if startless && !self.shared.has_room(len) {
            state.batch.truncate(at);
            // A request whose start was refused is counted already.
            if request.is_none() {
                self.shared.unwritten(Unwritten::Full, 1);
            }
            return Written::ready();
        }
        let upto = state.appended_in_place(len, record.sequence);
        self.written(upto)
    }

    fn written(self: &Arc<Self>, upto: u64) -> Written {
        Written {
            lane: Some(Arc::clone(self)),
            upto,
            ticket: None,
        }
    }

    /// Writes the batch under `state`, wakes whoever waits for it once the lock is released,
    /// and says whether the frame at `upto` was written.
    fn write_and_wake(
        &self,
        mut state: std::sync::MutexGuard<'_, LaneState>,
        upto: u64,
    ) -> Result<(), Unwritten> {
        let waiting = state.write_batch(self.index, &self.shared);
        let outcome = state.outcome(upto);
        drop(state);
        waiting.into_iter().for_each(Waker::wake);
        outcome
    }

    /// Writes the batch now, if there is one, and wakes whoever waits for it.
    fn write_batch(&self) {
        let waiting = self.lock().write_batch(self.index, &self.shared);
        waiting.into_iter().for_each(Waker::wake);
    }

    /// The files written since the last call (after writing the batch, so that every frame
    /// appended before the call is in them), for the sync thread to flush, and whether one of
    /// them was renamed (the directory is to be flushed too); from now on they count as synced.
    pub(super) fn take_unsynced(&self) -> (Vec<Arc<File>>, bool) {
        let mut state = self.lock();
        let waiting = state.write_batch(self.index, &self.shared);
        let LaneState {
            current, closed, ..
        } = &mut *state;
        let mut renamed = false;
        let files = closed
            .iter_mut()
            .chain(current.iter_mut())
            .filter(|segment| !segment.synced || segment.carrying || segment.renamed)
            .map(|segment| {
                segment.synced = true;
                segment.carrying = false;
                renamed |= std::mem::take(&mut segment.renamed);
                Arc::clone(&segment.file)
            })
            .collect();
        drop(state);
        waiting.into_iter().for_each(Waker::wake);
        (files, renamed)
    }

    /// Takes off the oldest closed segments that hold nothing the spool still needs: synced,
    /// every finish in them acked (at or below `acked`), and the starts they held carried
    /// into a synced successor. The caller deletes the files, oldest first.
    pub(super) fn take_compactable(&self, acked: u64) -> Vec<Segment> {
        let mut state = self.lock();
        let mut done = Vec::new();
        loop {
            let successor_carried = match (state.closed.get(1), &state.current) {
                (Some(next), _) | (None, Some(next)) => !next.carrying,
                (None, None) => false,
            };
            let Some(oldest) = state.closed.front() else {
                break;
            };
            if !(oldest.synced && oldest.max_sequence <= acked && successor_carried) {
                break;
            }
            done.extend(state.closed.pop_front());
        }
        done
    }

    /// Nothing for the sync thread to do until the lane writes again: every write flushed,
    /// no frame waiting to be written, no closed segment left to delete (acks alone cannot
    /// change that).
    pub(super) fn is_settled(&self) -> bool {
        let state = self.lock();
        state.batch.is_empty()
            && state.closed.is_empty()
            && state
                .current
                .as_ref()
                .is_none_or(|segment| segment.synced && !segment.carrying && !segment.renamed)
    }

    /// The serving thread whose lane this is.
    pub(super) fn index(&self) -> u32 {
        self.index
    }

    /// Whether the lane has a spare file (only the spool's sync thread gives it one).
    pub(super) fn has_spare(&self) -> bool {
        self.lock().spare_file.is_some()
    }

    /// Gives the lane `path`, an acked segment's file renamed to its spare name, for its next
    /// segment.
    pub(super) fn give_spare(&self, path: PathBuf) {
        self.lock().spare_file = Some(path);
    }

    /// Whether a request the spool cannot record is refused.
    pub fn refuses_unrecorded(&self) -> bool {
        self.shared.on_full == OnFull::Refuse
    }

    /// Requests with a start and no finish in this lane.
    pub fn in_flight(&self) -> usize {
        self.lock().open.len()
    }
}

/// Spare start buffers kept at most: about the requests one thread has in flight.
const SPARES_KEPT: usize = 1_024;

impl LaneState {
    /// Keeps a start's buffer for a later start, unless enough are kept (or it grew large).
    fn recycle(&mut self, frame: Vec<u8>) {
        if self.spare.len() < SPARES_KEPT && frame.capacity() <= 4 * 1024 {
            self.spare.push(frame);
        }
    }

    /// Appends a whole frame to the batch; returns its position.
    fn append(&mut self, frame: &[u8], sequence: u64) -> u64 {
        self.batch.extend_from_slice(frame);
        self.appended_in_place(frame.len(), sequence)
    }

    /// Counts a frame of `len` bytes already added to the batch; returns its position.
    fn appended_in_place(&mut self, len: usize, sequence: u64) -> u64 {
        // Records are finishes (a start carries no sequence): what a failed write loses.
        if sequence != 0 {
            self.batch_records += 1;
        }
        self.batch_max_sequence = self.batch_max_sequence.max(sequence);
        self.appended += len as u64;
        self.appended
    }

    /// Whether the frame at `position` was written, once done.
    fn outcome(&self, position: u64) -> Result<(), Unwritten> {
        let failed = self
            .failed
            .iter()
            .any(|&(after, through)| position > after && position <= through);
        if failed {
            Err(Unwritten::Failed)
        } else {
            Ok(())
        }
    }

    /// Writes the batch with one `write` into the current segment (a new one first when the
    /// current one is full, or broken by an earlier failed write). Returns the wakers of the
    /// requests waiting for it, to wake once the lock is released.
    #[must_use]
    fn write_batch(&mut self, lane: u32, shared: &Shared) -> Vec<Waker> {
        self.leader = None;
        if self.batch.is_empty() {
            return std::mem::take(&mut self.waiting);
        }
        let outcome = self.write_to_segment(lane, shared);
        if let Err(err) = outcome {
            shared.write_failed(&err);
            shared.unwritten(Unwritten::Failed, self.batch_records);
            if self.failed.len() == FAILURES_KEPT {
                self.failed.pop_front();
            }
            self.failed.push_back((self.done, self.appended));
        }
        self.done = self.appended;
        self.batch.clear();
        self.batch_records = 0;
        self.batch_max_sequence = 0;
        std::mem::take(&mut self.waiting)
    }

    fn write_to_segment(&mut self, lane: u32, shared: &Shared) -> std::io::Result<()> {
        let full = self
            .current
            .as_ref()
            .is_none_or(|segment| segment.bytes >= shared.options.segment_bytes);
        if full {
            self.rotate(lane, shared)?;
        }
        let Some(segment) = self.current.as_mut() else {
            return Err(std::io::Error::other("no segment open"));
        };
        let len = self.batch.len() as u64;
        frame::seed(&mut self.batch, segment.seed);
        match segment.file.write_all_at(&self.batch, segment.bytes) {
            Ok(()) => {
                // Read first: a store at every write would take the shared line from the
                // other serving threads' caches each time.
                if shared.writes_failing.load(Ordering::Relaxed) {
                    shared.writes_failing.store(false, Ordering::Relaxed);
                }
                segment.bytes += len;
                segment.synced = false;
                segment.max_sequence = segment.max_sequence.max(self.batch_max_sequence);
                shared.bytes.fetch_add(len, Ordering::Relaxed);
                shared.wrote();
                Ok(())
            }
            Err(err) => {
                // Cut a partial frame back off, and write nothing more behind it: a reader
                // stops at the first bad frame.
                let _ = segment.file.set_len(segment.bytes);
                self.close_current();
                Err(err)
            }
        }
    }

    /// Opens the next segment with its header and the starts of the requests still running,
    /// then closes the current one. The segment is written over the spare file when the lane
    /// has one, into a new file otherwise.
    fn rotate(&mut self, lane: u32, shared: &Shared) -> std::io::Result<()> {
        let number = self.next_segment;
        let path = shared.dir.join(super::segment_name(lane, number));
        // Segment numbers never repeat in a lane, so neither do seeds (a lane would need
        // 2^32 segments, 16 PiB, to come round).
        let seed = number as u32;
        let spare = self.spare_file.take().and_then(|spare| {
            match OpenOptions::new().write(true).open(&spare) {
                Ok(file) => Some((spare, file)),
                Err(_) => {
                    let _ = std::fs::remove_file(&spare);
                    None
                }
            }
        });
        // The header says whether the file held an earlier segment: a reader then expects
        // its reading to stop before the end of the file.
        let head = |reused_file: bool| {
            let mut head =
                Vec::with_capacity(128 + self.open.values().map(Vec::len).sum::<usize>());
            entry::frame_header(
                Header {
                    node_id: shared.node_id.clone(),
                    incarnation: shared.incarnation.clone(),
                    lane,
                    segment: number,
                    frame_seed: seed,
                    reused_file,
                },
                &mut head,
            );
            let carried = head.len();
            let mut running: Vec<_> = self.open.iter().collect();
            running.sort_unstable_by_key(|&(id, _)| *id);
            for (_, frame) in running {
                head.extend_from_slice(frame);
            }
            frame::seed(&mut head[carried..], seed);
            head
        };
        let reused = spare.and_then(|(spare, file)| {
            let head = head(true);
            reuse(&spare, file, &head, &path)
                .ok()
                .map(|file| (file, head))
        });
        let renamed = reused.is_some();
        let (file, head) = match reused {
            Some(reused) => reused,
            None => {
                let head = head(false);
                (create(&path, &head)?, head)
            }
        };
        self.next_segment += 1;
        shared.bytes.fetch_add(head.len() as u64, Ordering::Relaxed);
        self.close_current();
        self.current = Some(Segment {
            path,
            file: Arc::new(file),
            bytes: head.len() as u64,
            max_sequence: 0,
            synced: false,
            carrying: true,
            seed,
            renamed,
        });
        Ok(())
    }

    fn close_current(&mut self) {
        if let Some(segment) = self.current.take() {
            self.closed.push_back(segment);
        }
    }
}

/// A new segment file at `path` holding `head`.
fn create(path: &Path, head: &[u8]) -> std::io::Result<File> {
    let file = OpenOptions::new().write(true).create_new(true).open(path)?;
    if let Err(err) = file.write_all_at(head, 0) {
        drop(file);
        let _ = std::fs::remove_file(path);
        return Err(err);
    }
    Ok(file)
}

/// The spare file `spare` (open as `file`) as the segment at `path`: `head` written over its
/// start, then renamed, so that a file under a segment's name always begins with that
/// segment's header (a crash in between leaves a spare, which a replay ignores).
fn reuse(spare: &Path, file: File, head: &[u8], path: &Path) -> std::io::Result<File> {
    match file
        .write_all_at(head, 0)
        .and_then(|()| std::fs::rename(spare, path))
    {
        Ok(()) => Ok(file),
        Err(err) => {
            drop(file);
            let _ = std::fs::remove_file(spare);
            Err(err)
        }
    }
}

/// Resolves once a frame appended to a lane is written to its segment file (`Err` if the
/// write failed); see the module docs. Dropping it never strands other requests: a request
/// that was to write the batch and goes away first writes it on its way out.
#[must_use = "a request goes on only once its usage is written"]
#[derive(Debug)]
pub struct Written {
    /// `None` when there is nothing to wait for (no spool, nothing appended, or done).
    lane: Option<Arc<Lane>>,
    upto: u64,
    /// Set once this future took the job of writing the batch.
    ticket: Option<u64>,
}

impl Written {
    /// Nothing to wait for.
    pub fn ready() -> Self {
        Self {
            lane: None,
            upto: 0,
            ticket: None,
        }
    }

    /// Whether the spool holds (or is about to write) the frame: appended to its lane, not
    /// refused for room, while the lanes' writes succeed.
    pub fn holds_record(&self) -> bool {
        self.lane
            .as_ref()
            .is_some_and(|lane| !lane.shared.writes_failing())
    }

    /// Writes the frame now if it is not written yet, without waiting for other requests
    /// (for a request that has no later moment: its client went away).
    pub fn now(mut self) -> Result<(), Unwritten> {
        let Some(lane) = self.lane.take() else {
            return Ok(());
        };
        let state = lane.lock();
        if state.done >= self.upto {
            return state.outcome(self.upto);
        }
        lane.write_and_wake(state, self.upto)
    }
}

impl Future for Written {
    type Output = Result<(), Unwritten>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let Some(lane) = this.lane.clone() else {
            return Poll::Ready(Ok(()));
        };
        let mut state = lane.lock();
        if state.done >= this.upto {
            this.lane = None;
            return Poll::Ready(state.outcome(this.upto));
        }
        match (state.leader, this.ticket) {
            // Second poll of the writer: the requests ready in this pass have appended. Or no
            // other request of this thread is in flight to add to the batch, and waiting for
            // them would only cost another pass of the scheduler.
            (Some(leader), Some(ticket)) if leader == ticket => {
                this.lane = None;
                Poll::Ready(lane.write_and_wake(state, this.upto))
            }
            (None, _) if state.open.len() <= 1 => {
                this.lane = None;
                Poll::Ready(lane.write_and_wake(state, this.upto))
            }
            (None, _) => {
                // Take the job and let the other ready requests run first.
                let ticket = state.next_ticket;
                state.next_ticket += 1;
                state.leader = Some(ticket);
                this.ticket = Some(ticket);
                drop(state);
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            _ => {
                state.waiting.push(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl Drop for Written {
    fn drop(&mut self) {
        let (Some(lane), Some(ticket)) = (&self.lane, self.ticket) else {
            return;
        };
        let leading = lane.lock().leader == Some(ticket);
        if leading {
            lane.write_batch();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::control::NodeIdentity;
    use crate::spool::{Spool, SpoolOptions};

    fn spool(dir: &std::path::Path) -> Spool {
        Spool::open(
            SpoolOptions::new(dir),
            &NodeIdentity::new(Some("n".into())),
            1,
        )
        .unwrap()
    }

    fn segment_bytes(lane: &Lane) -> Vec<u8> {
        let path = lane.lock().current.as_ref().unwrap().path.clone();
        std::fs::read(path).unwrap()
    }

    fn contains(haystack: &[u8], needle: &str) -> bool {
        haystack
            .windows(needle.len())
            .any(|w| w == needle.as_bytes())
    }

    #[tokio::test(flavor = "current_thread")]
    async fn requests_ready_together_share_one_write_and_none_goes_on_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let spool = spool(dir.path());
        let lane = spool.lane(0).unwrap();
        // A request of the thread in flight already: the others may join a batch.
        let mut running = None;
        lane.start(&mut running, &mut UsageRecord::default())
            .unwrap()
            .now()
            .unwrap();
        let batches_before = lane.lock().next_ticket;
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let lane = Arc::clone(&lane);
                tokio::spawn(async move {
                    let mut spooled = None;
                    let mut record = UsageRecord {
                        request_id: format!("request-{i}"),
                        ..Default::default()
                    };
                    let written = lane.start(&mut spooled, &mut record).unwrap();
                    assert!(!contains(&segment_bytes(&lane), &record.request_id));
                    written.await.unwrap();
                    // Going on now: the start is in the file.
                    assert!(contains(&segment_bytes(&lane), &record.request_id));
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(
            lane.lock().next_ticket - batches_before,
            1,
            "eight requests ready in one pass, one write"
        );
        assert_eq!(lane.in_flight(), 9);
    }

    #[test]
    fn a_request_alone_on_its_thread_writes_without_yielding() {
        let dir = tempfile::tempdir().unwrap();
        let spool = spool(dir.path());
        let lane = spool.lane(0).unwrap();
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut spooled = None;
        let mut record = UsageRecord {
            request_id: "alone".into(),
            ..Default::default()
        };
        let mut written = lane.start(&mut spooled, &mut record).unwrap();
        assert_eq!(Pin::new(&mut written).poll(&mut cx), Poll::Ready(Ok(())));
        assert!(contains(&segment_bytes(&lane), "alone"));
        // Its finish: no other request in flight either.
        let mut written = lane.finish(spooled, &Queued::new(record, 1));
        assert_eq!(Pin::new(&mut written).poll(&mut cx), Poll::Ready(Ok(())));
        assert_eq!(lane.in_flight(), 0);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_writer_that_goes_away_still_writes_the_batch_for_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let spool = spool(dir.path());
        let lane = spool.lane(0).unwrap();
        let start = |id: &str| {
            let mut spooled = None;
            let mut record = UsageRecord {
                request_id: id.into(),
                ..Default::default()
            };
            lane.start(&mut spooled, &mut record).unwrap()
        };
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut writer = start("the-writer");
        let mut other = start("the-other");
        assert!(
            Pin::new(&mut writer).poll(&mut cx).is_pending(),
            "it yields first"
        );
        assert!(
            Pin::new(&mut other).poll(&mut cx).is_pending(),
            "it waits for the writer"
        );
        drop(writer);
        let bytes = segment_bytes(&lane);
        assert!(contains(&bytes, "the-writer") && contains(&bytes, "the-other"));
        assert_eq!(Pin::new(&mut other).poll(&mut cx), Poll::Ready(Ok(())));
    }

    #[test]
    fn now_writes_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let spool = spool(dir.path());
        let lane = spool.lane(0).unwrap();
        let record = UsageRecord {
            request_id: "cancelled".into(),
            ..Default::default()
        };
        let written = lane.finish(None, &Queued::new(record, 7));
        assert!(!contains(&segment_bytes(&lane), "cancelled"));
        written.now().unwrap();
        assert!(contains(&segment_bytes(&lane), "cancelled"));
        assert_eq!(lane.lock().current.as_ref().unwrap().max_sequence, 7);
    }
}
