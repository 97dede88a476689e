//! Group commit for usage reports: every `ReportUsage` stream hands its batches to one
//! writer task, which applies all the batches waiting at that moment, from any replica,
//! in one transaction (one fsync) and then answers each. Under load the batches pile up
//! while a commit is in flight, so the number of commits per second stays flat while
//! the records per commit grow; when idle a batch is committed alone, at once.
//! A report's contents reach the store through `batch_of` (its records) and
//! `cooldown_events` (its backend events).

use tokio::sync::{mpsc, oneshot};

use sluice_proto::v1 as pb;

use crate::store::{CooldownEvent, OutOfOrder, Reported, Store, StoreError, UsageBatch, UsageRow};
use crate::time::timestamp_ms;
use sluice_domain::cooldown::{NotAReport, Report, author, event_age};

/// Most records applied in one transaction; more wait for the next one.
const MAX_RECORDS_PER_COMMIT: usize = 50_000;
/// Batches waiting for the writer; a full queue slows the streams down (backpressure).
const QUEUE: usize = 256;

/// What a submitted batch gets back: its sender's new high-water mark, or why not.
pub type Applied = Result<u64, IngestError>;

#[derive(Debug, Clone, thiserror::Error)]
pub enum IngestError {
    /// The transaction failed; nothing of it was stored, so the sender resends.
    #[error("storing usage failed")]
    Store,
    /// The batch follows records not stored; the sender resends from its last ack.
    #[error(transparent)]
    OutOfOrder(#[from] OutOfOrder),
    #[error("the control plane is shutting down")]
    Closed,
}

/// The batch a `ReportUsage` message carries, as the store applies it.
pub fn batch_of(report: pb::ReportUsageRequest) -> UsageBatch {
    UsageBatch {
        rows: report.records.into_iter().map(UsageRow::from).collect(),
        node_id: report.node_id,
        incarnation: report.incarnation,
        previous_sequence: report.previous_sequence,
    }
}

/// The backend events a `ReportUsage` message carries, as the store applies them; events of
/// a kind this version does not know are left out.
pub fn cooldown_events(report: &pb::ReportUsageRequest) -> Vec<CooldownEvent> {
    report
        .events
        .iter()
        .filter_map(|e| cooldown_event(e, report))
        .collect()
}

fn cooldown_event(e: &pb::BackendEvent, batch: &pb::ReportUsageRequest) -> Option<CooldownEvent> {
    let report = match Report::try_from(e) {
        Ok(report) => Reported::Report(report),
        Err(NotAReport::NoEpoch) => Reported::Legacy {
            streak: e.consecutive_failures,
            until_ms: timestamp_ms(e.cooldown_until.as_ref()?),
        },
        Err(NotAReport::UnknownKind(_)) => return None,
    };
    Some(CooldownEvent {
        backend_id: e.backend_id.clone(),
        // Checked against the backend's models where it is applied.
        model: e.model.clone(),
        report,
        reason: e.reason.chars().take(200).collect(),
        reported_by: batch.node_id.clone(),
        // The node id is checked; an incarnation only comes checked with records.
        author: author(
            &batch.node_id,
            &batch.incarnation.chars().take(64).collect::<String>(),
        ),
        age: event_age(e),
    })
}

struct Job {
    batch: UsageBatch,
    done: oneshot::Sender<Applied>,
}

/// The handle streams submit to; cheap to clone. The writer task ends when the last
/// handle is dropped, after applying what was queued.
#[derive(Clone)]
pub struct UsageWriter {
    jobs: mpsc::Sender<Job>,
}

impl UsageWriter {
    /// Starts the writer task on the current runtime.
    pub fn start(store: Store) -> Self {
        let (jobs, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(store, rx));
        Self { jobs }
    }

    /// Queues `batch`; the receiver resolves once it is committed (or failed). Waits
    /// while the queue is full.
    pub async fn submit(&self, batch: UsageBatch) -> oneshot::Receiver<Applied> {
        let (done, rx) = oneshot::channel();
        if let Err(mpsc::error::SendError(job)) = self.jobs.send(Job { batch, done }).await {
            let _ = job.done.send(Err(IngestError::Closed));
        }
        rx
    }
}

async fn run(store: Store, mut rx: mpsc::Receiver<Job>) {
    while let Some(first) = rx.recv().await {
        let mut records = first.batch.rows.len();
        let mut jobs = vec![first];
        while records < MAX_RECORDS_PER_COMMIT {
            match rx.try_recv() {
                Ok(job) => {
                    records += job.batch.rows.len();
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
        let (batches, waiting): (Vec<_>, Vec<_>) =
            jobs.into_iter().map(|j| (j.batch, j.done)).unzip();
        let count = batches.len();
        match store.ingest_usage_batches(batches).await {
            Ok(outcomes) => {
                tracing::trace!(batches = count, records, "usage committed");
                for (done, outcome) in waiting.into_iter().zip(outcomes) {
                    let _ = done.send(outcome.map_err(IngestError::from));
                }
            }
            Err(err) => {
                log_failure(&err, count, records);
                for done in waiting {
                    let _ = done.send(Err(IngestError::Store));
                }
            }
        }
    }
}

fn log_failure(err: &StoreError, batches: usize, records: usize) {
    tracing::error!(error = %err, batches, records, "storing usage failed; the replicas will resend");
}
