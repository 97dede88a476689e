//! Usage accounting: a bounded in-memory queue that the request path pushes to without ever
//! waiting, and a reporter task that ships it to the control plane on the `ReportUsage` stream.
//!
//! Records are numbered 1, 2, 3… per process (with the process's random incarnation) and stay
//! in the queue until the control plane acks a sequence at or above theirs; after a reconnect
//! everything unacked is sent again, in order, and the control plane skips what it already
//! applied. Each report names the record held just before its first one
//! (`previous_sequence`): the control plane applies it only once it has stored that one, so
//! a report sent after one whose commit failed is not applied past the gap, and the resend
//! of both counts each record once. When the queue is full the oldest record is dropped and
//! counted; with a spool, a record on disk is kept and the entering one dropped if the spool
//! does not hold it ([`UsageSink::record_spooled`]). Backend events
//! (cooldowns) skip the batching delay: other replicas learn of a 429 from the next snapshot.
//!
//! A record is encoded once, when it is recorded: the queue holds its bytes, which are also
//! what the spool writes, and reports carry them as they are ([`Report`]).
//!
//! A report holds at most [`BATCH_SIZE`] records and stays under
//! [`limits::MAX_USAGE_REPORT_BYTES`] encoded. A record that can never be delivered must not
//! hold back every record after it: one too large for any report is dropped when a batch is
//! made, and when the control plane refuses a report as too large (`OUT_OF_RANGE`; it never
//! refuses a record for its content), the next session sends the
//! oldest unacked record alone; refused again, that record is dropped. Both are logged and
//! counted ([`UsageSink::unsendable`]). Any other failure (the control plane away, its disk
//! failing) drops nothing: the records are sent again.
//!
//! With a spool ([`crate::spool`]) a record is written to disk between taking its number and
//! entering the queue, outside any shared lock, so two serving threads may enter their records
//! out of order: the queue holds back a record until every lower number has entered, and the
//! reporter sends only what the spool has flushed to disk ([`UsageSink::mark_durable`]), so
//! that a record the control plane counted is never lost from the spool by a machine crash.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use prost::Message as _;
use sluice_domain::time::{proto_duration, std_duration};
use sluice_proto::limits;
use sluice_proto::v1::{BackendEvent, UsageRecord};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::control::{NodeIdentity, Report, UsageClient};

/// Default queue capacity in records.
pub const DEFAULT_CAPACITY: usize = 100_000;

/// Least time between two "usage records dropped" warnings.
const DROP_WARNING_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct Queue {
    state: Mutex<State>,
    wake: Notify,
    /// The reporter waits without its flush timer, for a record it may send: the first one
    /// to enter wakes it (see [`UsageSink::enter`]).
    idle: AtomicBool,
    capacity: usize,
    /// The next sequence to hand out.
    next_sequence: AtomicU64,
    dropped: AtomicU64,
    unsendable: AtomicU64,
}

/// A numbered record in the queue, encoded.
#[derive(Debug, Clone, PartialEq)]
pub struct Queued {
    pub sequence: u64,
    /// The encoded `UsageRecord`.
    pub encoded: Bytes,
    /// Whether the spool holds the record (its finish was appended to a lane), so that a
    /// full queue keeps it: see [`UsageSink::record_spooled`].
    pub on_disk: bool,
}

impl Queued {
    /// Numbers `record` with `sequence` and encodes it.
    pub fn new(mut record: UsageRecord, sequence: u64) -> Self {
        record.sequence = sequence;
        // Borrowed already only if encoding panicked on this thread; gone only while the
        // thread exits.
        let mut record = Some(record);
        let cut = ENCODING
            .try_with(|encoding| {
                let mut encoding = encoding.try_borrow_mut().ok()?;
                let record = record.take()?;
                let encoded = encoding.cut(&record);
                encoding.keep(record);
                Some(encoded)
            })
            .ok()
            .flatten();
        // Not cut: the record is still here.
        let encoded = cut.unwrap_or_else(|| {
            record.map_or_else(Bytes::new, |record| record.encode_to_vec_by_hand().into())
        });
        Self {
            sequence,
            encoded,
            on_disk: false,
        }
    }
}

/// The strings of a record this thread queued earlier, emptied, for a request's record:
/// filling them in allocates nothing while they are long enough, where four new strings a
/// request were four allocations and, once the record was encoded, four frees. Empty
/// strings (no allocation) when there are none.
pub fn spare_strings() -> RecordStrings {
    ENCODING
        .try_with(|encoding| encoding.try_borrow_mut().ok()?.spare.pop())
        .ok()
        .flatten()
        .unwrap_or_default()
}

/// A record's strings (only these: the rest of a record is moved more cheaply as a new one).
#[derive(Debug, Default)]
pub struct RecordStrings {
    pub request_id: String,
    pub backend_id: String,
    pub model: String,
    pub client_key_id: String,
}

/// How many encoded records' strings a thread keeps for [`spare_strings`]: about as many as
/// it has requests in flight at once, past which they are freed.
const SPARE_RECORDS: usize = 64;

/// The size of the blocks that records' bytes are cut from.
const CHUNK_BYTES: usize = 32 * 1024;

thread_local! {
    static ENCODING: RefCell<Encoding> = RefCell::new(Encoding::default());
}

/// Where a thread encodes its records. Each record's bytes are held until the control plane
/// acknowledges it, so a block of its own for each, freed in another thread, took glibc's
/// allocator its slow path (about 400 instructions to allocate, as much again to free, and
/// a pass to count the exact length); instead a record is encoded into a buffer kept from
/// the last, and copied into the thread's current chunk, which it shares (counted
/// references) with the records cut from it before. A chunk is freed with the last of its
/// records; records leave the queue in sequence order (acked, or the oldest dropped when it
/// is full), so the queue's records hold at most their own bytes and two chunks' worth per
/// thread more (the oldest chunk, part acked, and the current one).
#[derive(Default)]
struct Encoding {
    record: Vec<u8>,
    chunk: BytesMut,
    /// The emptied strings of records encoded here (see [`spare_strings`]).
    spare: Vec<RecordStrings>,
}

impl Encoding {
    /// `record`'s bytes, cut from the chunk.
    fn cut(&mut self, record: &UsageRecord) -> Bytes {
        self.record.clear();
        record.encode_by_hand(&mut self.record);
        if self.chunk.capacity() < self.record.len() {
            self.chunk = BytesMut::with_capacity(CHUNK_BYTES.max(self.record.len()));
        }
        self.chunk.extend_from_slice(&self.record);
        self.chunk.split().freeze()
    }

    /// Keeps the strings of `record`, encoded, for [`spare_strings`].
    fn keep(&mut self, record: UsageRecord) {
        if self.spare.len() >= SPARE_RECORDS {
            return;
        }
        let UsageRecord {
            mut request_id,
            mut backend_id,
            mut model,
            mut client_key_id,
            ..
        } = record;
        for text in [
            &mut request_id,
            &mut backend_id,
            &mut model,
            &mut client_key_id,
        ] {
            text.clear();
        }
        self.spare.push(RecordStrings {
            request_id,
            backend_id,
            model,
            client_key_id,
        });
    }
}

#[derive(Debug)]
struct State {
    /// Unacked records, ascending by sequence, each with every lower sequence entered.
    pending: VecDeque<Queued>,
    /// Records entered before a lower sequence was (its thread is still writing it to the
    /// spool), by sequence. Almost always empty.
    early: BTreeMap<u64, Queued>,
    /// Every sequence up to this one has been entered.
    entered: u64,
    /// The reporter sends no record above this sequence (the spool's flushed watermark);
    /// `u64::MAX` without a spool.
    durable: u64,
    /// With a spool: how many records the queue holds at most when the one entering is on
    /// disk (see [`UsageSink::send_only_durable`]).
    on_disk_capacity: usize,
    acked: u64,
    /// Backend events not yet sent, with when each was queued (its `age` is as of then).
    events: VecDeque<(BackendEvent, Instant)>,
    last_drop_warning: Option<std::time::Instant>,
    dropped_since_warning: u64,
}

/// The request path's handle on the usage queue. Cloning is cheap; pushing never blocks.
#[derive(Debug, Clone)]
pub struct UsageSink {
    queue: Arc<Queue>,
}

impl UsageSink {
    /// An empty queue holding at most `capacity` unacked records (at least 1).
    pub fn new(capacity: usize) -> Self {
        Self::with_state(capacity, 1, VecDeque::new())
    }

    /// A queue holding `records` of an earlier run, under the sequences they already have
    /// (ascending), to be sent again: nothing is dropped and nothing new is numbered.
    pub fn replaying(mut records: Vec<UsageRecord>) -> Self {
        records.sort_by_key(|r| r.sequence);
        records.dedup_by_key(|r| r.sequence);
        let next = records.last().map_or(1, |r| r.sequence + 1);
        let capacity = records.len();
        let pending = records
            .into_iter()
            .map(|record| {
                let sequence = record.sequence;
                Queued::new(record, sequence)
            })
            .collect();
        Self::with_state(capacity, next, pending)
    }

    fn with_state(capacity: usize, next_sequence: u64, pending: VecDeque<Queued>) -> Self {
        Self {
            queue: Arc::new(Queue {
                state: Mutex::new(State {
                    pending,
                    early: BTreeMap::new(),
                    entered: next_sequence - 1,
                    durable: u64::MAX,
                    on_disk_capacity: 0,
                    acked: 0,
                    events: VecDeque::new(),
                    last_drop_warning: None,
                    dropped_since_warning: 0,
                }),
                wake: Notify::new(),
                idle: AtomicBool::new(false),
                capacity: capacity.max(1),
                next_sequence: AtomicU64::new(next_sequence),
                dropped: AtomicU64::new(0),
                unsendable: AtomicU64::new(0),
            }),
        }
    }

    /// Numbers the record and queues it; returns its sequence. When the queue is full the
    /// oldest record is dropped (counted in [`UsageSink::dropped`], logged at most every 10 s).
    pub fn record(&self, record: UsageRecord) -> u64 {
        self.record_with(record, |_| {})
    }

    /// [`UsageSink::record`], calling `spool` with the numbered, encoded record before it
    /// enters the queue (and so before it can be sent). `spool` runs outside the queue's
    /// lock; should it panic, the record still enters the queue, so no gap ever holds the
    /// reporter back.
    pub fn record_with(&self, record: UsageRecord, spool: impl FnOnce(&Queued)) -> u64 {
        self.record_spooled(record, |queued| {
            spool(queued);
            false
        })
    }

    /// [`UsageSink::record_with`] where `spool` says whether the spool now holds the record.
    /// A full queue keeps a record the spool holds and drops one it does not: dropping the
    /// oldest, as without a spool, would drop records already on disk, and once later
    /// records were acked their segments would be deleted with them, though a process that
    /// crashed instead would have sent them again.
    pub fn record_spooled(&self, record: UsageRecord, spool: impl FnOnce(&Queued) -> bool) -> u64 {
        let sequence = self.queue.next_sequence.fetch_add(1, Ordering::Relaxed);
        let mut entering = Entering {
            sink: self,
            record: Some(Queued::new(record, sequence)),
        };
        if let Some(record) = entering.record.as_mut() {
            record.on_disk = spool(record);
        }
        sequence
    }

    /// Puts a numbered record in the queue, in sequence order.
    fn enter(&self, record: Queued) {
        let mut state = self.lock();
        if record.sequence != state.entered + 1 {
            state.early.insert(record.sequence, record);
            return;
        }
        self.push(&mut state, record);
        loop {
            let next = state.entered + 1;
            let Some(record) = state.early.remove(&next) else {
                break;
            };
            self.push(&mut state, record);
        }
        let full_batch = state.pending.len().is_multiple_of(BATCH_SIZE);
        // Sendable now only without a spool; with one, `mark_durable` wakes the reporter.
        let sendable = state.entered <= state.durable;
        drop(state);
        if full_batch || (sendable && self.queue.idle.swap(false, Ordering::SeqCst)) {
            self.queue.wake.notify_one();
        }
    }

    /// The reporter is about to wait without its flush timer: whether a record it may send
    /// is waiting already (then it must not). A record entering after this wakes it.
    fn idle_unless_unsent(&self, sent_upto: u64) -> bool {
        self.queue.idle.store(true, Ordering::SeqCst);
        let unsent = self.unsent_after(sent_upto) > 0;
        if unsent {
            self.queue.idle.store(false, Ordering::SeqCst);
        }
        unsent
    }

    /// Whether the reporter waits without its flush timer (for tests and the docs' claim that
    /// an idle replica's reporter does not wake).
    pub fn reporter_idle(&self) -> bool {
        self.queue.idle.load(Ordering::SeqCst)
    }

    fn push(&self, state: &mut State, record: Queued) {
        state.entered = record.sequence;
        let held = state.pending.len();
        if held >= self.queue.capacity {
            if state.durable != u64::MAX {
                // With a spool: the records on disk stay (up to what the spool can hold),
                // and one it does not hold is the one dropped.
                if !(record.on_disk && held < state.on_disk_capacity) {
                    self.count_dropped(
                        state,
                        "usage queue full: dropped records the spool does not hold",
                    );
                    return;
                }
            } else {
                state.pending.pop_front();
                self.count_dropped(state, "usage queue full: dropped the oldest records");
            }
        }
        state.pending.push_back(record);
    }

    fn count_dropped(&self, state: &mut State, message: &'static str) {
        self.queue.dropped.fetch_add(1, Ordering::Relaxed);
        state.dropped_since_warning += 1;
        let due = state
            .last_drop_warning
            .is_none_or(|at| at.elapsed() >= DROP_WARNING_INTERVAL);
        if due {
            tracing::warn!(
                dropped = state.dropped_since_warning,
                dropped_total = self.queue.dropped.load(Ordering::Relaxed),
                capacity = self.queue.capacity,
                "{message}"
            );
            state.last_drop_warning = Some(std::time::Instant::now());
            state.dropped_since_warning = 0;
        }
    }

    /// Queues a backend event and wakes the reporter to send it at once. While the control
    /// plane is away at most [`MAX_QUEUED_EVENTS`] wait, the newest: the cooldown tracker
    /// tells a reconnected control plane every report it has not seen applied anyway.
    pub fn event(&self, event: BackendEvent) {
        {
            let mut state = self.lock();
            if state.events.len() >= MAX_QUEUED_EVENTS {
                state.events.pop_front();
            }
            state.events.push_back((event, Instant::now()));
        }
        self.queue.wake.notify_one();
    }

    /// Records dropped because the queue was full, since start.
    pub fn dropped(&self) -> u64 {
        self.queue.dropped.load(Ordering::Relaxed)
    }

    /// Records dropped since start because they could not be delivered: too large for a
    /// report, or refused by the control plane when sent alone.
    pub fn unsendable(&self) -> u64 {
        self.queue.unsendable.load(Ordering::Relaxed)
    }

    /// Records not yet acked by the control plane.
    pub fn pending(&self) -> usize {
        let state = self.lock();
        state.pending.len() + state.early.len()
    }

    /// The highest sequence the control plane acked.
    pub fn acked(&self) -> u64 {
        self.lock().acked
    }

    /// The highest sequence acked, and the cost of the records after it by client key id:
    /// what the control plane has not counted yet (see `allowance`).
    /// Runs when a snapshot stream opens, not per request: the records are decoded again,
    /// outside the queue's lock.
    pub fn unacked_cost_by_key(&self) -> (u64, HashMap<String, u64>) {
        let (acked, unacked): (u64, Vec<Bytes>) = {
            let state = self.lock();
            let unacked = state
                .pending
                .iter()
                .chain(state.early.values())
                .filter(|r| r.sequence > state.acked)
                .map(|r| r.encoded.clone())
                .collect();
            (state.acked, unacked)
        };
        let mut costs: HashMap<String, u64> = HashMap::new();
        for encoded in unacked {
            // The queue encoded it: it decodes.
            let Ok(record) = UsageRecord::decode(encoded) else {
                continue;
            };
            if record.cost_nanos > 0 {
                let cost = costs.entry(record.client_key_id).or_default();
                *cost = cost.saturating_add(record.cost_nanos);
            }
        }
        (acked, costs)
    }

    /// From now on the reporter sends only records up to the sequence last given to
    /// [`UsageSink::mark_durable`], and a full queue keeps records on disk up to
    /// `on_disk_capacity` records (the most a spool can hold), dropping those that are not.
    pub fn send_only_durable(&self, on_disk_capacity: usize) {
        let mut state = self.lock();
        state.durable = state.entered;
        state.on_disk_capacity = on_disk_capacity;
    }

    /// Every record up to `sequence` is on disk: the reporter may send it.
    pub fn mark_durable(&self, sequence: u64) {
        let mut state = self.lock();
        if sequence > state.durable {
            state.durable = sequence;
            drop(state);
            self.queue.wake.notify_one();
        }
    }

    /// The highest sequence the reporter may send (the spool's flushed mark).
    #[cfg(test)]
    pub(crate) fn durable(&self) -> u64 {
        self.lock().durable
    }

    /// Whether records are sent only once a spool has flushed them ([`Self::mark_durable`]).
    fn spooled(&self) -> bool {
        self.lock().durable != u64::MAX
    }

    /// Every sequence up to this one has entered the queue (so has been spooled).
    pub fn entered(&self) -> u64 {
        self.lock().entered
    }

    /// Whether `other` is a handle on the same queue.
    pub fn same_queue(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.queue, &other.queue)
    }

    /// No record or event is waiting to be sent or acked.
    pub fn is_drained(&self) -> bool {
        let state = self.lock();
        state.pending.is_empty() && state.early.is_empty() && state.events.is_empty()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.queue
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Drops the records up to `sequence`: the control plane acked them.
    pub(crate) fn ack(&self, sequence: u64) {
        let mut state = self.lock();
        state.acked = state.acked.max(sequence);
        while state
            .pending
            .front()
            .is_some_and(|r| r.sequence <= sequence)
        {
            state.pending.pop_front();
        }
    }

    /// Up to `max` sendable records (up to the durable mark) after `sequence`, in order, whose
    /// encoding as the `records` of a report takes at most `max_bytes`. A record too large
    /// for `max_bytes` on its own is dropped from the queue and counted as unsendable.
    fn batch_after(&self, sequence: u64, max: usize, max_bytes: usize) -> Vec<Queued> {
        let mut state = self.lock();
        let start = state.pending.partition_point(|r| r.sequence <= sequence);
        let durable = state.durable;
        let mut batch = Vec::new();
        let mut bytes = 0;
        let mut i = start;
        while batch.len() < max {
            let Some(record) = state.pending.get(i).filter(|r| r.sequence <= durable) else {
                break;
            };
            let size = field_len(record.encoded.len());
            if size > max_bytes {
                let sequence = record.sequence;
                state.pending.remove(i);
                self.drop_unsendable(sequence, "larger than a usage report may be");
                continue;
            }
            if bytes + size > max_bytes {
                break;
            }
            bytes += size;
            batch.push(record.clone());
            i += 1;
        }
        batch
    }

    /// Drops the record `sequence` for good (if still held), logs it and counts it.
    fn drop_unsendable(&self, sequence: u64, why: &str) {
        self.queue.unsendable.fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            sequence,
            why,
            unsendable_total = self.unsendable(),
            "usage record dropped: it can never be delivered"
        );
    }

    /// Drops the oldest unacked record if it is `sequence`.
    fn drop_if_oldest(&self, sequence: u64, why: &str) -> bool {
        let mut state = self.lock();
        if state
            .pending
            .front()
            .is_some_and(|r| r.sequence == sequence)
        {
            state.pending.pop_front();
            drop(state);
            self.drop_unsendable(sequence, why);
            true
        } else {
            false
        }
    }

    /// The sequence of the record held just before `sequence` (0 if none): what the control
    /// plane must have stored before it applies a report starting at `sequence`.
    fn held_before(&self, sequence: u64) -> u64 {
        let state = self.lock();
        let at = state.pending.partition_point(|r| r.sequence < sequence);
        at.checked_sub(1)
            .and_then(|i| state.pending.get(i))
            .map_or(0, |r| r.sequence)
    }

    /// The oldest unacked record's sequence.
    fn oldest(&self) -> Option<u64> {
        self.lock().pending.front().map(|r| r.sequence)
    }

    /// How many records after `sequence` may be sent now (up to the durable mark).
    fn unsent_after(&self, sequence: u64) -> usize {
        let state = self.lock();
        let start = state.pending.partition_point(|r| r.sequence <= sequence);
        let end = state
            .pending
            .partition_point(|r| r.sequence <= state.durable);
        end.saturating_sub(start)
    }

    /// The queued events, each aged by the time it waited: the control plane dates an event
    /// by its age, and one that waited out an outage counted as new would start a cooldown
    /// the upstream asked for long ago over again, for the whole fleet.
    fn take_events(&self) -> Vec<BackendEvent> {
        let now = Instant::now();
        std::mem::take(&mut self.lock().events)
            .into_iter()
            .map(|(mut event, queued)| {
                let age = event
                    .age
                    .as_ref()
                    .and_then(std_duration)
                    .unwrap_or_default()
                    + now.saturating_duration_since(queued);
                event.age = Some(proto_duration(age));
                event
            })
            .collect()
    }
}

/// A numbered record on its way into the queue; it enters when this drops, even while
/// unwinding.
struct Entering<'a> {
    sink: &'a UsageSink,
    record: Option<Queued>,
}

impl Drop for Entering<'_> {
    fn drop(&mut self) {
        if let Some(record) = self.record.take() {
            self.sink.enter(record);
        }
    }
}

/// Records per `ReportUsage` message at most.
pub const BATCH_SIZE: usize = 1000;

/// Bytes of records per report at most: the report limit less room for the rest of the
/// message (ids and backend events).
const MAX_RECORD_BYTES: usize = limits::MAX_USAGE_REPORT_BYTES - 256 * 1024;

/// Bytes of backend events per report at most (within the room records leave); more go in
/// the reports after.
const MAX_EVENT_BYTES: usize = 192 * 1024;

/// Backend events queued while the control plane is away, at most.
pub const MAX_QUEUED_EVENTS: usize = 4096;

/// The encoded size of a length-delimited field holding `len` bytes (tag of one byte).
fn field_len(len: usize) -> usize {
    1 + prost::length_delimiter_len(len) + len
}

/// Whether a failed report means the control plane will never take it as it was (too
/// large: tonic's `OUT_OF_RANGE` for a message past its decoding limit), rather than the
/// control plane being away or failing. Not `RESOURCE_EXHAUSTED`: the control plane answers
/// that to an address with too many failed authentications, before it reads the token, so
/// a replica sharing an address (a host, a NAT) with a client guessing tokens gets it for
/// reports that are fine, and read as "too large" it dropped one unacked record a retry.
fn refused_as_too_large(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::OutOfRange
}

/// Longest a record waits in the queue before it is sent.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);

/// The reporter's bookkeeping for one node and incarnation, without I/O: which report to
/// send next on the current stream, and what an ack or a failed stream means.
/// [`UsageReporter`] drives it over gRPC; the protocol simulation
/// (`e2e/tests/simulation.rs`) drives it directly.
pub struct Outbox {
    sink: UsageSink,
    node_id: String,
    incarnation: String,
    /// The database of the snapshot served, read at each report ([`Report::database_id`]).
    database: Option<DatabaseOf>,
    /// What the current stream has sent: every record up to this sequence.
    sent_upto: u64,
    /// After a report was refused as too large: the last record that report could have
    /// held. Records up to it go one per report, so the next refusal names its record.
    suspect_through: Option<u64>,
}

/// Reads the database of the snapshot a replica serves.
pub type DatabaseOf = Box<dyn Fn() -> String + Send + Sync>;

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("node_id", &self.node_id)
            .field("incarnation", &self.incarnation)
            .field("sent_upto", &self.sent_upto)
            .finish_non_exhaustive()
    }
}

impl Outbox {
    pub fn new(sink: UsageSink, node_id: String, incarnation: String) -> Self {
        Self {
            sink,
            node_id,
            incarnation,
            database: None,
            sent_upto: 0,
            suspect_through: None,
        }
    }

    pub fn sink(&self) -> &UsageSink {
        &self.sink
    }

    /// A new stream starts: everything not acked goes again, in order.
    pub fn restart(&mut self) {
        self.sent_upto = self.sink.acked();
    }

    /// The next report for the current stream: the first of `events` (as many as fit, taken
    /// out of it) and the records after what it has sent, all of them when `all`, else only
    /// a full batch. `None` when there is nothing to send.
    pub fn next_report(&mut self, all: bool, events: &mut Vec<BackendEvent>) -> Option<Report> {
        let limit = self.batch_limit();
        let unsent = self.sink.unsent_after(self.sent_upto);
        let send_records = unsent >= limit || (all && unsent > 0);
        if !send_records && events.is_empty() {
            return None;
        }
        let mut event_bytes = 0;
        let fit = events
            .iter()
            .take_while(|event| {
                event_bytes += field_len(event.encoded_len());
                event_bytes <= MAX_EVENT_BYTES
            })
            .count()
            .max(1)
            .min(events.len());
        let events: Vec<BackendEvent> = events.drain(..fit).collect();
        let records = if send_records {
            self.sink
                .batch_after(self.sent_upto, limit, MAX_RECORD_BYTES)
        } else {
            Vec::new()
        };
        if let Some(last) = records.last() {
            self.sent_upto = last.sequence;
        }
        let previous_sequence = records
            .first()
            .map_or(0, |first| self.sink.held_before(first.sequence));
        Some(Report {
            node_id: self.node_id.clone(),
            incarnation: self.incarnation.clone(),
            records: records.into_iter().map(|r| r.encoded).collect(),
            events,
            previous_sequence,
            database_id: self.database.as_ref().map(|of| of()).unwrap_or_default(),
        })
    }

    /// The control plane holds every record up to `sequence`.
    pub fn acked(&mut self, sequence: u64) {
        self.sink.ack(sequence);
    }

    /// The stream failed with `status`. A refusal as too large: the control plane acks in
    /// order, so the refused report starts at the oldest unacked record. Outside suspect
    /// mode, every record the stream sent becomes suspect and goes alone from now on; in
    /// suspect mode the refused report held that one record alone, which is dropped so the
    /// records after it can go. Any other failure changes nothing: the next stream sends
    /// everything unacked again.
    pub fn failed(&mut self, status: &tonic::Status) {
        if !refused_as_too_large(status) {
            return;
        }
        let oldest = self.sink.oldest();
        match self.suspect_through {
            Some(through) if oldest.is_some_and(|oldest| oldest <= through) => {
                if let Some(oldest) = oldest {
                    self.sink
                        .drop_if_oldest(oldest, "the control plane refused it on its own");
                }
            }
            _ if oldest.is_some() => self.suspect_through = Some(self.sent_upto),
            _ => self.suspect_through = None,
        }
    }

    /// Records in the next report at most: one while the next one is a suspect.
    fn batch_limit(&mut self) -> usize {
        match self.suspect_through {
            Some(through) if self.sink.acked() >= through => {
                self.suspect_through = None;
                BATCH_SIZE
            }
            Some(through) if self.sent_upto < through => 1,
            _ => BATCH_SIZE,
        }
    }
}

/// Ships the queue to the control plane; see the module docs.
pub struct UsageReporter {
    outbox: Outbox,
    client: UsageClient,
    backoff: Backoff,
    /// Events to tell a newly connected control plane again (those it may have missed).
    resend: Option<ResendEvents>,
    /// Longest a record waits before it is sent: [`FLUSH_INTERVAL`].
    flush_interval: Duration,
}

/// Produces the backend events to send again after a reconnect.
pub type ResendEvents = Box<dyn Fn() -> Vec<BackendEvent> + Send + Sync>;

impl UsageReporter {
    pub fn new(sink: UsageSink, client: UsageClient, identity: NodeIdentity) -> Self {
        Self {
            outbox: Outbox::new(sink, identity.node_id, identity.incarnation),
            client,
            backoff: Backoff::default(),
            resend: None,
            flush_interval: FLUSH_INTERVAL,
        }
    }

    /// Records wait at most `every` before they are sent, not [`FLUSH_INTERVAL`] (a test
    /// tells what goes at once from what waits for it).
    pub fn flush_every(mut self, every: Duration) -> Self {
        self.flush_interval = every;
        self
    }

    /// After every reconnect, also send the events `resend` returns (e.g. cooldowns no
    /// snapshot has acknowledged yet, which the old stream may have lost).
    pub fn resend_events_with(mut self, resend: ResendEvents) -> Self {
        self.resend = Some(resend);
        self
    }

    /// Names in every report the database of the snapshot served, as `database` reads it: a
    /// control plane on another one refuses the report, and the records wait for the right
    /// one.
    pub fn database_with(mut self, database: DatabaseOf) -> Self {
        self.outbox.database = Some(database);
        self
    }

    /// Runs until `stop` fires and everything queued has been acked. Bound the flush by
    /// dropping this future (e.g. with `tokio::time::timeout`); unacked records are then lost
    /// and [`UsageSink::pending`] tells how many.
    pub async fn run(mut self, stop: CancellationToken) {
        let mut flushing = false;
        loop {
            if stop.is_cancelled() && self.outbox.sink.is_drained() {
                return;
            }
            match self.session(&stop, &mut flushing).await {
                Ok(()) => return,
                Err(status) => {
                    tracing::warn!(
                        code = ?status.code(),
                        message = status.message(),
                        pending = self.outbox.sink.pending(),
                        "usage stream failed; reconnecting"
                    );
                    self.outbox.failed(&status);
                }
            }
            let delay = self.backoff.next_delay();
            if flushing {
                tokio::time::sleep(delay).await;
            } else {
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = stop.cancelled() => flushing = true,
                }
            }
        }
    }

    /// One `ReportUsage` call; `Ok` once stopped and drained, else how the call ended.
    async fn session(
        &mut self,
        stop: &CancellationToken,
        flushing: &mut bool,
    ) -> Result<(), tonic::Status> {
        let (tx, rx) = mpsc::channel(16);
        let mut inbound = self.client.report_usage(ReceiverStream::new(rx)).await?;
        match self.exchange(stop, flushing, &tx, &mut inbound).await {
            Ok(()) => Ok(()),
            Err(Ended::Status(status)) => Err(status),
            Err(Ended::Closed) => Err(self.why_closed(&mut inbound).await),
        }
    }

    /// A report could not be sent: the call has ended, and the control plane's answer says
    /// why (a refusal of a report as too large among them, which [`Outbox::failed`] acts on:
    /// taken for a dropped connection, the refused record would be sent again for ever).
    /// Acks that came before it are applied. A call whose answer does not end within a
    /// second counts as dropped.
    async fn why_closed(
        &mut self,
        inbound: &mut tonic::Streaming<sluice_proto::v1::ReportUsageResponse>,
    ) -> tonic::Status {
        let answer = async {
            loop {
                match inbound.message().await {
                    Ok(Some(ack)) => self.outbox.acked(ack.acked_sequence),
                    Ok(None) => {
                        return tonic::Status::unavailable(
                            "usage stream closed by the control plane",
                        );
                    }
                    Err(status) => return status,
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(1), answer)
            .await
            .unwrap_or_else(|_| tonic::Status::unavailable("usage stream closed"))
    }

    /// The reports and acks of one call.
    async fn exchange(
        &mut self,
        stop: &CancellationToken,
        flushing: &mut bool,
        tx: &mpsc::Sender<Report>,
        inbound: &mut tonic::Streaming<sluice_proto::v1::ReportUsageResponse>,
    ) -> Result<(), Ended> {
        self.outbox.restart();
        let mut resend = self.resend.as_ref().map(|f| f()).unwrap_or_default();
        while !resend.is_empty() {
            let Some(report) = self.outbox.next_report(false, &mut resend) else {
                break;
            };
            send(tx, report).await?;
        }
        // What waited for the stream goes at once; after that the flush timer runs only while
        // a record waits for it, so that an idle replica's reporter does not wake.
        self.send_unsent(tx, true).await?;
        let flush = tokio::time::sleep(self.flush_interval);
        tokio::pin!(flush);
        let mut armed = false;
        let wake = Arc::clone(&self.outbox.sink.queue);
        loop {
            if *flushing {
                if self.outbox.sink.is_drained() {
                    return Ok(());
                }
                self.send_unsent(tx, true).await?;
            }
            if !armed && (*flushing || self.outbox.sink.idle_unless_unsent(self.outbox.sent_upto)) {
                self.outbox.sink.queue.idle.store(false, Ordering::SeqCst);
                flush
                    .as_mut()
                    .reset(tokio::time::Instant::now() + self.flush_interval);
                armed = true;
            }
            tokio::select! {
                biased;
                message = inbound.message() => match message? {
                    Some(ack) => {
                        self.outbox.acked(ack.acked_sequence);
                        self.backoff.reset();
                    }
                    None => {
                        return Err(Ended::Status(tonic::Status::unavailable(
                            "usage stream closed by the control plane",
                        )));
                    }
                },
                () = stop.cancelled(), if !*flushing => *flushing = true,
                // A full batch, records the spool made durable, a backend event, or (while
                // idle) the first record. With a spool every durable record goes now: the
                // spool's sync interval batched them already. Without one, full batches and
                // events go now, the rest when the timer, armed at the top of the loop, fires.
                () = wake.wake.notified() => {
                    let all = self.outbox.sink.spooled();
                    self.send_unsent(tx, all).await?;
                }
                () = &mut flush, if armed => {
                    armed = false;
                    self.send_unsent(tx, true).await?;
                }
            }
        }
    }

    /// Sends queued events and the records not yet sent on this stream: all of them when
    /// `all`, else only full batches (events always).
    async fn send_unsent(&mut self, tx: &mpsc::Sender<Report>, all: bool) -> Result<(), Closed> {
        let mut events = self.outbox.sink.take_events();
        while let Some(report) = self.outbox.next_report(all, &mut events) {
            send(tx, report).await?;
        }
        Ok(())
    }
}

/// A report could not be sent: the call's request stream is closed.
struct Closed;

async fn send(tx: &mpsc::Sender<Report>, report: Report) -> Result<(), Closed> {
    tx.send(report).await.map_err(|_| Closed)
}

/// How a call's exchange ended early.
enum Ended {
    /// The call's answer ended it, with this status.
    Status(tonic::Status),
    /// A report could not be sent; the answer is still to be read ([`UsageReporter::why_closed`]).
    Closed,
}

impl From<tonic::Status> for Ended {
    fn from(status: tonic::Status) -> Self {
        Self::Status(status)
    }
}

impl From<Closed> for Ended {
    fn from(Closed: Closed) -> Self {
        Self::Closed
    }
}

/// Token counts from an upstream `usage` object (chat's or the Responses API's).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tokens {
    pub prompt: u64,
    pub completion: u64,
    /// Of `prompt`, read from the provider's prompt cache.
    pub cached_prompt: u64,
    /// Of `completion`, spent on reasoning.
    pub reasoning: u64,
    /// Of `prompt`, written to the provider's prompt cache (Anthropic's
    /// `cache_creation_input_tokens`; OpenAI's and OpenRouter's
    /// `prompt_tokens_details.cache_write_tokens`).
    pub cache_write: u64,
    /// Of `cache_write`, written to Anthropic's 1-hour cache (priced apart, not recorded
    /// apart).
    pub cache_write_1h: u64,
    /// Of `prompt` and of `completion`, audio (OpenAI's `prompt_tokens_details.audio_tokens`
    /// and `completion_tokens_details.audio_tokens`: priced apart, and recorded in the usage
    /// record's `audio_prompt_tokens` and `audio_completion_tokens`).
    pub audio_prompt: u64,
    pub audio_completion: u64,
    /// What an OpenAI-format `total_tokens` holds beyond prompt + completion when no reasoning
    /// is reported: Google's OpenAI-compatible endpoint counts a thinking model's thoughts
    /// there alone, and bills them as output. Counted, as reasoning, only for a backend on
    /// Google's hosts ([`Tokens::with_unshown_as_reasoning`]): other servers' totals can hold
    /// input tokens there (LiteLLM's and Portkey's over Bedrock: cache writes and reads).
    pub unshown: u64,
}

impl Tokens {
    /// The tokens of an OpenAI-format `usage`'s figures, from providers that write them
    /// otherwise than OpenAI too. DeepSeek names its prompt cache's hits
    /// `prompt_cache_hit_tokens` and Moonshot (Kimi) a top-level `cached_tokens` (`cache_hit`,
    /// the larger of the two), and may leave `prompt_tokens_details` out: the larger of that
    /// and `cache_hit` is the cached prompt. `cache_write` is
    /// `prompt_tokens_details.cache_write_tokens` (OpenAI's GPT-5.6 and later bill writes at
    /// 1.25 times the input price; OpenRouter reports Claude's writes there). xAI counts reasoning outside
    /// `completion_tokens` but inside `total_tokens` (and bills it as output): where `total`
    /// is exactly prompt + completion + reasoning (which OpenAI's convention, reasoning inside
    /// the completion, never makes), the reasoning is added to the completion. A total above
    /// that is not xAI's: LiteLLM over Bedrock counts cache reads and writes in it and Claude's
    /// thinking inside the completion already, so adding the reasoning would charge it twice.
    /// What the total holds beyond prompt + completion when no reasoning is reported is kept
    /// apart ([`Tokens::unshown`]).
    pub fn openai(
        prompt: u64,
        completion: u64,
        cached: u64,
        reasoning: u64,
        total: Option<u64>,
        cache_hit: Option<u64>,
        cache_write: u64,
    ) -> Self {
        let shown = prompt.saturating_add(completion);
        let unshown = match total {
            Some(total) if reasoning == 0 => total.saturating_sub(shown),
            _ => 0,
        };
        let beside =
            reasoning > 0 && total.is_some_and(|total| total == shown.saturating_add(reasoning));
        Self {
            prompt,
            completion: if beside {
                completion.saturating_add(reasoning)
            } else {
                completion
            },
            cached_prompt: cached.max(cache_hit.unwrap_or(0)),
            reasoning,
            cache_write,
            cache_write_1h: 0,
            audio_prompt: 0,
            audio_completion: 0,
            unshown,
        }
    }

    /// These tokens with [`Tokens::unshown`] read as reasoning, added to the completion: as
    /// Google reports a thinking model's thoughts, and bills them.
    pub fn with_unshown_as_reasoning(self) -> Self {
        if self.reasoning > 0 || self.unshown == 0 {
            return self;
        }
        Self {
            completion: self.completion.saturating_add(self.unshown),
            reasoning: self.unshown,
            unshown: 0,
            ..self
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// What a total holds beyond prompt + completion is reasoning only where no reasoning was
    /// reported, and only when asked (Google's backends): xAI's reasoning beside the
    /// completion is not counted twice.
    #[test]
    fn the_totals_excess_is_kept_apart_and_read_as_reasoning_when_asked() {
        let google = Tokens::openai(9, 3, 0, 0, Some(105), None, 0);
        assert_eq!(
            (google.completion, google.reasoning, google.unshown),
            (3, 0, 93)
        );
        let read = google.with_unshown_as_reasoning();
        assert_eq!((read.completion, read.reasoning, read.unshown), (96, 93, 0));
        let xai = Tokens::openai(10, 20, 0, 30, Some(60), None, 0);
        assert_eq!(xai.with_unshown_as_reasoning(), xai);
        assert_eq!((xai.completion, xai.reasoning, xai.unshown), (50, 30, 0));
        let openai = Tokens::openai(10, 20, 0, 5, Some(30), None, 0);
        assert_eq!(openai.with_unshown_as_reasoning(), openai);
        // LiteLLM over Bedrock: cache reads and writes in the total, Claude's thinking inside
        // the completion: the reasoning is not added again, the excess charged nothing.
        let litellm = Tokens::openai(41_500, 2_000, 40_000, 1_200, Some(46_500), None, 0);
        assert_eq!(
            (litellm.completion, litellm.reasoning, litellm.unshown),
            (2_000, 1_200, 0)
        );
        let short = Tokens::openai(10, 20, 0, 0, Some(25), None, 0);
        assert_eq!(short.with_unshown_as_reasoning(), short);
    }

    #[test]
    fn records_cut_from_a_shared_chunk_keep_their_own_bytes() {
        let record = |i: usize| UsageRecord {
            request_id: format!("req-{i}"),
            // Now and then one larger than a chunk, and many that cross a chunk's end.
            model: "m".repeat(if i.is_multiple_of(97) {
                CHUNK_BYTES + i
            } else {
                i % 300
            }),
            prompt_tokens: i as u64,
            ..Default::default()
        };
        let queued: Vec<Queued> = (1..2_000)
            .map(|i| Queued::new(record(i), i as u64))
            .collect();
        // Dropped out of order, as acks and full queues drop them.
        let mut kept = Vec::new();
        for (i, q) in queued.into_iter().enumerate() {
            if !i.is_multiple_of(3) {
                kept.push((i + 1, q));
            }
        }
        for (i, q) in kept {
            let mut expected = record(i);
            expected.sequence = i as u64;
            assert_eq!(q.encoded, expected.encode_to_vec(), "record {i}");
            assert_eq!(UsageRecord::decode(q.encoded).unwrap(), expected);
        }
    }

    #[test]
    fn an_encoded_records_strings_are_kept_emptied_for_the_next() {
        // On a thread of its own: the spare strings are per thread.
        std::thread::spawn(|| {
            let empty = spare_strings();
            assert_eq!(empty.request_id.capacity() + empty.model.capacity(), 0);
            let full = UsageRecord {
                request_id: "req-1".into(),
                backend_id: "b".into(),
                model: "gpt-4o".into(),
                client_key_id: "ck".into(),
                prompt_tokens: 1,
                ..Default::default()
            };
            let queued = Queued::new(full.clone(), 9);
            let mut expected = full;
            expected.sequence = 9;
            assert_eq!(queued.encoded, expected.encode_to_vec());
            let RecordStrings {
                request_id,
                backend_id,
                model,
                client_key_id,
            } = spare_strings();
            for (text, len) in [
                (request_id, 5),
                (backend_id, 1),
                (model, 6),
                (client_key_id, 2),
            ] {
                assert!(text.is_empty() && text.capacity() >= len, "{len}");
            }
            assert_eq!(spare_strings().model.capacity(), 0);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn numbers_records_and_drops_the_oldest_when_full() {
        let sink = UsageSink::new(3);
        for i in 1..=5 {
            assert_eq!(sink.record(UsageRecord::default()), i);
        }
        assert_eq!(sink.dropped(), 2);
        let batch = sink.batch_after(0, 10, usize::MAX);
        let sequences: Vec<u64> = batch.iter().map(|r| r.sequence).collect();
        assert_eq!(sequences, [3, 4, 5]);
        assert_eq!(sink.batch_after(3, 1, usize::MAX)[0].sequence, 4);
        sink.ack(4);
        assert_eq!(sink.pending(), 1);
        assert_eq!(sink.unsent_after(4), 1);
        assert_eq!(sink.acked(), 4);
        sink.ack(2);
        assert_eq!(sink.acked(), 4);
    }

    #[test]
    fn a_report_names_the_record_held_before_it() {
        let sink = UsageSink::new(3);
        for _ in 1..=5 {
            sink.record(UsageRecord::default());
        }
        // 1 and 2 were dropped (queue full): nothing is held before 3.
        assert_eq!(sink.held_before(3), 0);
        assert_eq!(sink.held_before(4), 3);
        assert_eq!(sink.held_before(5), 4);
        sink.ack(4);
        assert_eq!(sink.held_before(5), 0);
    }

    #[test]
    fn batches_stay_under_the_byte_limit_and_a_record_too_large_for_any_is_dropped() {
        let sink = UsageSink::new(100);
        let sized = |model_bytes: usize| UsageRecord {
            model: "m".repeat(model_bytes),
            ..Default::default()
        };
        for _ in 0..10 {
            sink.record(sized(100));
        }
        sink.record(sized(5000));
        sink.record(sized(100));
        let one = field_len(sink.batch_after(0, 1, usize::MAX)[0].encoded.len());
        // Three records' worth of bytes: three per batch.
        let batch = sink.batch_after(0, 100, 3 * one + 1);
        assert_eq!(batch.len(), 3);
        let report = Report {
            records: batch.into_iter().map(|r| r.encoded).collect(),
            ..Default::default()
        };
        assert!(report.encoded_len() <= 3 * one + 1);
        // The 5 kB record cannot go in any batch of 1 kB: it is dropped, the rest flows.
        let rest = sink.batch_after(3, 100, 1000);
        let sequences: Vec<u64> = rest.iter().map(|r| r.sequence).collect();
        assert_eq!(sequences, [4, 5, 6, 7, 8, 9, 10, 12]);
        assert_eq!(sink.unsendable(), 1);
        assert_eq!(sink.pending(), 11);
    }

    #[test]
    fn with_a_spool_a_full_queue_keeps_the_records_on_disk_and_drops_those_that_are_not() {
        let sink = UsageSink::new(3);
        sink.send_only_durable(5);
        let record = |on_disk: bool| sink.record_spooled(UsageRecord::default(), |_| on_disk);
        for _ in 0..4 {
            record(true);
        }
        assert_eq!(
            (sink.pending(), sink.dropped()),
            (4, 0),
            "past capacity, on disk"
        );
        record(false);
        assert_eq!(
            (sink.pending(), sink.dropped()),
            (4, 1),
            "not on disk: dropped"
        );
        record(true);
        record(true);
        assert_eq!(
            (sink.pending(), sink.dropped()),
            (5, 2),
            "no more than the spool can hold"
        );
        sink.mark_durable(7);
        assert_eq!(
            sequences(&sink.batch_after(0, 10, usize::MAX)),
            [1, 2, 3, 4, 6]
        );

        // Without a spool the oldest goes, as ever.
        let sink = UsageSink::new(3);
        for _ in 0..4 {
            sink.record(UsageRecord::default());
        }
        assert_eq!(sequences(&sink.batch_after(0, 10, usize::MAX)), [2, 3, 4]);
    }

    #[test]
    fn a_refusal_for_failed_authentications_from_the_address_drops_no_record() {
        let sink = UsageSink::new(100);
        for _ in 0..10 {
            sink.record(UsageRecord::default());
        }
        let mut outbox = Outbox::new(sink.clone(), "node-a".into(), "inc-1".into());
        assert_eq!(
            outbox
                .next_report(true, &mut Vec::new())
                .unwrap()
                .records
                .len(),
            10
        );
        // The control plane's throttle, on reconnects while a guesser shares the address.
        let throttled = tonic::Status::resource_exhausted(
            "too many failed data-plane authentications from this address; try again in 2 s",
        );
        for _ in 0..5 {
            outbox.failed(&throttled);
            outbox.restart();
            assert_eq!(outbox.batch_limit(), BATCH_SIZE, "no record made a suspect");
        }
        assert_eq!((sink.unsendable(), sink.pending()), (0, 10));
        // A report past the decoding limit is still told apart: its records go one by one.
        outbox.next_report(true, &mut Vec::new()).unwrap();
        outbox.failed(&tonic::Status::out_of_range(
            "Error, decoded message length too large",
        ));
        outbox.restart();
        assert_eq!(outbox.batch_limit(), 1);
    }

    fn sequences(records: &[Queued]) -> Vec<u64> {
        records.iter().map(|r| r.sequence).collect()
    }

    #[test]
    fn a_record_waits_for_every_lower_sequence_before_it_can_be_sent() {
        let sink = UsageSink::new(100);
        // Thread A takes 1 and is still spooling it while thread B takes and enters 2 and 3.
        let (a_spooling, a_go) = std::sync::mpsc::channel::<()>();
        let (b_done, b_wait) = std::sync::mpsc::channel::<()>();
        std::thread::scope(|scope| {
            let sink = &sink;
            let a = scope.spawn(move || {
                sink.record_with(UsageRecord::default(), |_| {
                    a_spooling.send(()).unwrap();
                    b_wait.recv().unwrap();
                })
            });
            a_go.recv().unwrap();
            assert_eq!(sink.record(UsageRecord::default()), 2);
            assert_eq!(sink.record(UsageRecord::default()), 3);
            assert_eq!(sink.pending(), 2);
            assert_eq!(sink.unsent_after(0), 0, "2 and 3 wait for 1");
            assert_eq!(sink.entered(), 0);
            b_done.send(()).unwrap();
            assert_eq!(a.join().unwrap(), 1);
        });
        assert_eq!(sequences(&sink.batch_after(0, 10, usize::MAX)), [1, 2, 3]);
        assert_eq!(sink.entered(), 3);
    }

    #[test]
    fn a_panicking_spool_write_still_enters_its_record() {
        let sink = UsageSink::new(100);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            sink.record_with(UsageRecord::default(), |_| panic!("disk on fire"));
        }));
        assert!(result.is_err());
        sink.record(UsageRecord::default());
        assert_eq!(sequences(&sink.batch_after(0, 10, usize::MAX)), [1, 2]);
    }

    #[test]
    fn only_records_marked_durable_are_sent() {
        let sink = UsageSink::new(100);
        sink.send_only_durable(0);
        for _ in 0..5 {
            sink.record(UsageRecord::default());
        }
        assert_eq!(sink.unsent_after(0), 0);
        sink.mark_durable(3);
        assert_eq!(sequences(&sink.batch_after(0, 10, usize::MAX)), [1, 2, 3]);
        assert_eq!(sink.unsent_after(3), 0);
        sink.mark_durable(2);
        assert_eq!(sink.unsent_after(0), 3, "the mark never goes back");
        sink.mark_durable(sink.entered());
        assert_eq!(sequences(&sink.batch_after(3, 10, usize::MAX)), [4, 5]);
    }

    /// Tens of thousands of backend events (a replica cut off for hours while many backends
    /// fail) go in as many reports as they need, each within the control plane's limit: one
    /// report of them all was refused, and with it every record after.
    #[test]
    fn backend_events_are_split_across_reports_that_fit() {
        let sink = UsageSink::new(100);
        for _ in 0..10 {
            sink.record(UsageRecord::default());
        }
        let mut outbox = Outbox::new(sink, "node-1".into(), "inc-1".into());
        outbox.restart();
        let mut events: Vec<BackendEvent> = (0..40_000)
            .map(|i| BackendEvent {
                backend_id: format!("0193a5f0-7c1e-7d2a-9b3c-{i:012}"),
                reason: "upstream answered 429 Too Many Requests".into(),
                age: Some(proto_duration(Duration::from_millis(1234))),
                ..Default::default()
            })
            .collect();
        let expected = events.clone();
        let mut sent = Vec::new();
        let mut reports = 0;
        while let Some(report) = outbox.next_report(true, &mut events) {
            assert!(
                report.encoded_len() <= limits::MAX_USAGE_REPORT_BYTES,
                "{} bytes",
                report.encoded_len()
            );
            sent.extend(report.events);
            reports += 1;
        }
        assert!(reports > 1);
        assert_eq!(sent, expected, "every event once, in order");
    }

    /// While the control plane is away the queue of events keeps the newest.
    #[test]
    fn the_queue_of_events_keeps_the_newest() {
        let sink = UsageSink::new(100);
        for i in 0..MAX_QUEUED_EVENTS + 10 {
            sink.event(BackendEvent {
                backend_id: i.to_string(),
                ..Default::default()
            });
        }
        let events = sink.take_events();
        assert_eq!(events.len(), MAX_QUEUED_EVENTS);
        assert_eq!(events[0].backend_id, "10");
    }

    #[test]
    fn a_report_is_read_by_the_control_plane_as_the_records_that_were_recorded() {
        use sluice_proto::v1::ReportUsageRequest;
        let sink = UsageSink::new(100);
        let recorded: Vec<UsageRecord> = (0..3)
            .map(|i| UsageRecord {
                request_id: format!("req-{i}"),
                model: "gpt-4o-mini".into(),
                prompt_tokens: 10 + i,
                completion_tokens: 20 + i,
                latency: Some(sluice_proto::wkt::Duration {
                    seconds: 1,
                    nanos: 5,
                }),
                cost_nanos: 1_000 * i,
                ..Default::default()
            })
            .collect();
        let mut spooled = Vec::new();
        for record in &recorded {
            sink.record_with(record.clone(), |queued| spooled.push(queued.clone()));
        }
        sink.ack(1);
        let mut outbox = Outbox::new(sink, "node-1".into(), "inc-1".into());
        outbox.restart();
        let event = BackendEvent {
            backend_id: "b1".into(),
            ..Default::default()
        };
        let report = outbox.next_report(true, &mut vec![event.clone()]).unwrap();
        let wire = ReportUsageRequest::decode(report.encode_to_vec().as_slice()).unwrap();
        let expected: Vec<UsageRecord> = recorded[1..]
            .iter()
            .zip(2..)
            .map(|(record, sequence)| UsageRecord {
                sequence,
                ..record.clone()
            })
            .collect();
        assert_eq!(
            wire,
            ReportUsageRequest {
                node_id: "node-1".into(),
                incarnation: "inc-1".into(),
                records: expected,
                events: vec![event],
                previous_sequence: 0,
                database_id: String::new(),
            }
        );
        assert_eq!(
            spooled[1].encoded, report.records[0],
            "the spool and the report hold the same bytes"
        );
    }

    #[test]
    fn what_the_control_plane_has_not_counted_is_summed_by_key() {
        let sink = UsageSink::new(100);
        let cost = |key: &str, cost_nanos| UsageRecord {
            client_key_id: key.into(),
            cost_nanos,
            ..Default::default()
        };
        sink.record(cost("a", 5));
        sink.record(cost("a", 7));
        sink.record(cost("b", 11));
        sink.record(cost("c", 0));
        sink.record(cost("b", 13));
        sink.ack(1);
        let (acked, costs) = sink.unacked_cost_by_key();
        assert_eq!(acked, 1);
        assert_eq!(
            costs,
            HashMap::from([("a".to_owned(), 7), ("b".to_owned(), 24)])
        );
    }

    #[test]
    fn a_replay_keeps_the_sequences_it_was_given() {
        let record = |sequence| UsageRecord {
            sequence,
            ..Default::default()
        };
        let sink = UsageSink::replaying(vec![record(9), record(4), record(7), record(4)]);
        assert_eq!(sequences(&sink.batch_after(0, 10, usize::MAX)), [4, 7, 9]);
        assert_eq!(sink.dropped(), 0);
        sink.ack(7);
        assert_eq!(sequences(&sink.batch_after(0, 10, usize::MAX)), [9]);
        sink.ack(9);
        assert!(sink.is_drained());
    }
}
