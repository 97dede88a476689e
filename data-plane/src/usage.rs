//! Usage accounting: a bounded in-memory queue that the request path pushes to without ever
//! waiting, and a reporter task that ships it to the control plane on the `ReportUsage` stream.
//!
//! Records are numbered 1, 2, 3… per process (with the process's random incarnation) and stay
//! in the queue until the control plane acks a sequence at or above theirs; after a reconnect
//! everything unacked is sent again, in order, and the control plane skips what it already
//! applied. When the queue is full the oldest record is dropped and counted. Backend events
//! (cooldowns) skip the batching delay: other replicas learn of a 429 from the next snapshot.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use sluice_proto::v1::{BackendEvent, ReportUsageRequest, UsageRecord};
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::control::{DataPlaneClient, NodeIdentity};

/// Default queue capacity in records.
pub const DEFAULT_CAPACITY: usize = 100_000;

/// Least time between two "usage records dropped" warnings.
const DROP_WARNING_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct Queue {
    state: Mutex<State>,
    wake: Notify,
    capacity: usize,
    dropped: AtomicU64,
}

#[derive(Debug)]
struct State {
    next_sequence: u64,
    /// Unacked records, ascending by sequence.
    pending: VecDeque<UsageRecord>,
    acked: u64,
    events: Vec<BackendEvent>,
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
        Self {
            queue: Arc::new(Queue {
                state: Mutex::new(State {
                    next_sequence: 1,
                    pending: VecDeque::new(),
                    acked: 0,
                    events: Vec::new(),
                    last_drop_warning: None,
                    dropped_since_warning: 0,
                }),
                wake: Notify::new(),
                capacity: capacity.max(1),
                dropped: AtomicU64::new(0),
            }),
        }
    }

    /// Numbers the record and queues it; returns its sequence. When the queue is full the
    /// oldest record is dropped (counted in [`UsageSink::dropped`], logged at most every 10 s).
    pub fn record(&self, mut record: UsageRecord) -> u64 {
        let mut state = self.lock();
        let sequence = state.next_sequence;
        state.next_sequence += 1;
        record.sequence = sequence;
        if state.pending.len() >= self.queue.capacity {
            state.pending.pop_front();
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
                    "usage queue full: dropped the oldest records"
                );
                state.last_drop_warning = Some(std::time::Instant::now());
                state.dropped_since_warning = 0;
            }
        }
        state.pending.push_back(record);
        let full_batch = state.pending.len().is_multiple_of(BATCH_SIZE);
        drop(state);
        if full_batch {
            self.queue.wake.notify_one();
        }
        sequence
    }

    /// Queues a backend event and wakes the reporter to send it at once.
    pub fn event(&self, event: BackendEvent) {
        self.lock().events.push(event);
        self.queue.wake.notify_one();
    }

    /// Records dropped because the queue was full, since start.
    pub fn dropped(&self) -> u64 {
        self.queue.dropped.load(Ordering::Relaxed)
    }

    /// Records not yet acked by the control plane.
    pub fn pending(&self) -> usize {
        self.lock().pending.len()
    }

    /// The highest sequence the control plane acked.
    pub fn acked(&self) -> u64 {
        self.lock().acked
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.queue
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn ack(&self, sequence: u64) {
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

    /// Up to `max` records after `sequence`, in order.
    fn batch_after(&self, sequence: u64, max: usize) -> Vec<UsageRecord> {
        let state = self.lock();
        let start = state.pending.partition_point(|r| r.sequence <= sequence);
        state.pending.range(start..).take(max).cloned().collect()
    }

    fn unsent_after(&self, sequence: u64) -> usize {
        let state = self.lock();
        state.pending.len() - state.pending.partition_point(|r| r.sequence <= sequence)
    }

    fn take_events(&self) -> Vec<BackendEvent> {
        std::mem::take(&mut self.lock().events)
    }

    fn is_drained(&self) -> bool {
        let state = self.lock();
        state.pending.is_empty() && state.events.is_empty()
    }
}

/// Records per `ReportUsage` message at most.
pub const BATCH_SIZE: usize = 1000;

/// Longest a record waits in the queue before it is sent.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);

/// Ships the queue to the control plane; see the module docs.
pub struct UsageReporter {
    sink: UsageSink,
    client: DataPlaneClient,
    identity: NodeIdentity,
    backoff: Backoff,
    /// Events to tell a newly connected control plane again (those it may have missed).
    resend: Option<ResendEvents>,
}

/// Produces the backend events to send again after a reconnect.
pub type ResendEvents = Box<dyn Fn() -> Vec<BackendEvent> + Send + Sync>;

impl UsageReporter {
    pub fn new(sink: UsageSink, client: DataPlaneClient, identity: NodeIdentity) -> Self {
        Self {
            sink,
            client,
            identity,
            backoff: Backoff::default(),
            resend: None,
        }
    }

    /// After every reconnect, also send the events `resend` returns (e.g. cooldowns no
    /// snapshot has acknowledged yet, which the old stream may have lost).
    pub fn resend_events_with(mut self, resend: ResendEvents) -> Self {
        self.resend = Some(resend);
        self
    }

    /// Runs until `stop` fires and everything queued has been acked. Bound the flush by
    /// dropping this future (e.g. with `tokio::time::timeout`); unacked records are then lost
    /// and [`UsageSink::pending`] tells how many.
    pub async fn run(mut self, stop: CancellationToken) {
        let mut flushing = false;
        loop {
            if stop.is_cancelled() && self.sink.is_drained() {
                return;
            }
            match self.session(&stop, &mut flushing).await {
                Ok(()) => return,
                Err(status) => tracing::warn!(
                    code = ?status.code(),
                    message = status.message(),
                    pending = self.sink.pending(),
                    "usage stream failed; reconnecting"
                ),
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

    /// One `ReportUsage` call; `Ok` once stopped and drained.
    async fn session(
        &mut self,
        stop: &CancellationToken,
        flushing: &mut bool,
    ) -> Result<(), tonic::Status> {
        let (tx, rx) = mpsc::channel(16);
        let mut inbound = self
            .client
            .report_usage(ReceiverStream::new(rx))
            .await?
            .into_inner();
        // Everything not acked goes again, in order.
        let mut sent_upto = self.sink.acked();
        let resend = self.resend.as_ref().map(|f| f()).unwrap_or_default();
        if !resend.is_empty() {
            self.send(&tx, Vec::new(), resend).await?;
        }
        let mut ticker = tokio::time::interval(FLUSH_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if *flushing {
                if self.sink.is_drained() {
                    return Ok(());
                }
                self.send_unsent(&tx, &mut sent_upto, true).await?;
            }
            tokio::select! {
                biased;
                message = inbound.message() => match message? {
                    Some(ack) => {
                        self.sink.ack(ack.acked_sequence);
                        self.backoff.reset();
                    }
                    None => return Err(tonic::Status::unavailable("usage stream closed by the control plane")),
                },
                () = stop.cancelled(), if !*flushing => *flushing = true,
                () = self.sink.queue.wake.notified() => {
                    self.send_unsent(&tx, &mut sent_upto, false).await?;
                }
                _ = ticker.tick() => {
                    self.send_unsent(&tx, &mut sent_upto, true).await?;
                }
            }
        }
    }

    /// Sends queued events and records after `sent_upto`: all of them when `all`, else only
    /// full batches (events always).
    async fn send_unsent(
        &mut self,
        tx: &mpsc::Sender<ReportUsageRequest>,
        sent_upto: &mut u64,
        all: bool,
    ) -> Result<(), tonic::Status> {
        let mut events = self.sink.take_events();
        loop {
            let unsent = self.sink.unsent_after(*sent_upto);
            let send_records = unsent >= BATCH_SIZE || (all && unsent > 0);
            if !send_records && events.is_empty() {
                return Ok(());
            }
            let records = if send_records {
                self.sink.batch_after(*sent_upto, BATCH_SIZE)
            } else {
                Vec::new()
            };
            if let Some(last) = records.last() {
                *sent_upto = last.sequence;
            }
            self.send(tx, records, std::mem::take(&mut events)).await?;
        }
    }

    async fn send(
        &self,
        tx: &mpsc::Sender<ReportUsageRequest>,
        records: Vec<UsageRecord>,
        events: Vec<BackendEvent>,
    ) -> Result<(), tonic::Status> {
        let request = ReportUsageRequest {
            node_id: self.identity.node_id.clone(),
            incarnation: self.identity.incarnation.clone(),
            records,
            events,
        };
        tx.send(request)
            .await
            .map_err(|_| tonic::Status::unavailable("usage stream closed"))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn numbers_records_and_drops_the_oldest_when_full() {
        let sink = UsageSink::new(3);
        for i in 1..=5 {
            assert_eq!(sink.record(UsageRecord::default()), i);
        }
        assert_eq!(sink.dropped(), 2);
        let batch = sink.batch_after(0, 10);
        let sequences: Vec<u64> = batch.iter().map(|r| r.sequence).collect();
        assert_eq!(sequences, [3, 4, 5]);
        assert_eq!(sink.batch_after(3, 1)[0].sequence, 4);
        sink.ack(4);
        assert_eq!(sink.pending(), 1);
        assert_eq!(sink.unsent_after(4), 1);
        assert_eq!(sink.acked(), 4);
        sink.ack(2);
        assert_eq!(sink.acked(), 4);
    }
}
