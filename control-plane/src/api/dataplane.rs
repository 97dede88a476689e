//! `DataPlaneService`: streams snapshots to replicas and takes their usage and
//! cooldown reports. Who is connected and who holds a share of the RPM limits is
//! [`crate::membership`]'s; budget allowances, which ride the snapshot stream, are
//! [`crate::allowance`]'s.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use sluice_domain::text::has_control;
use sluice_proto::limits::{ALLOWANCE_LEASE, MAX_ID_BYTES};
use sluice_proto::v1 as pb;
use sluice_proto::v1::data_plane_service_server::DataPlaneService;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

mod wire;

pub use wire::DataPlaneRoutes;
use wire::{Outbound, Outgoing, OutgoingStream};

use crate::allowance::{Allowances, Budget, Held, PaidIn, Replica, Want};
use crate::ingest::{Applied, UsageWriter, batch_of, cooldown_events};
use crate::membership::Membership;
use crate::snapshot::Publisher;
use crate::store::{NodeHello, Store};
use crate::time::{duration_ms, monotonic_ms, now_ms};

/// A replica's allowance lease when its hello names none, and the bounds of one it names.
const DEFAULT_ALLOWANCE_LEASE_MS: i64 = 60_000;
const ALLOWANCE_LEASE_MS: std::ops::RangeInclusive<i64> =
    (ALLOWANCE_LEASE.start().as_millis() as i64)..=(ALLOWANCE_LEASE.end().as_millis() as i64);

/// The service data planes call.
#[derive(Clone)]
pub struct DataPlaneApi {
    store: Store,
    publisher: Arc<Publisher>,
    membership: Membership,
    /// Usage batches from every stream, committed together.
    usage: UsageWriter,
    /// Budget granted to replicas. Asks read the key's spend and decide under this lock, and
    /// ingested records are charged under it, so no charge falls between the two.
    allowances: Arc<tokio::sync::Mutex<Allowances>>,
    /// Cancelled at shutdown: open streams end so the server can stop.
    stop: CancellationToken,
}

impl DataPlaneApi {
    pub fn new(
        store: Store,
        publisher: Arc<Publisher>,
        membership: Membership,
        stop: CancellationToken,
    ) -> Self {
        Self {
            usage: UsageWriter::start(store.clone()),
            membership,
            allowances: Arc::default(),
            store,
            publisher,
            stop,
        }
    }

    /// The budget allowances this service grants (what the admin API shows held).
    pub fn allowances(&self) -> Arc<tokio::sync::Mutex<Allowances>> {
        Arc::clone(&self.allowances)
    }

    async fn left(&self, hello: &NodeHello, replica: Option<&Replica>) {
        if let Some(replica) = replica {
            self.allowances.lock().await.left(replica, monotonic_ms());
        }
        self.membership
            .left(hello, now_ms(), self.stop.is_cancelled())
            .await;
    }

    /// Answers a replica's asks for allowances, one grant each.
    async fn grant(
        &self,
        replica: &Replica,
        asks: Vec<pb::AllowanceRequest>,
    ) -> pb::AllowanceUpdate {
        let mut allowances = Vec::with_capacity(asks.len());
        let mut engine = self.allowances.lock().await;
        for ask in asks {
            let now = now_ms();
            // Replicas whose records the store may have committed and the engine not yet
            // charged: their high-water marks are read with the spend.
            let committing = engine.committing_replicas(&ask.client_key_id);
            let names = committing
                .iter()
                .map(|r| (r.node_id.clone(), r.incarnation.clone()))
                .collect();
            let budget = match self
                .store
                .key_budget(ask.client_key_id.clone(), now, names)
                .await
            {
                Ok(budget) => budget,
                Err(err) => {
                    // Nothing granted, not exhausted: the replica may ask again, and its
                    // request goes by its setting for a control plane away once its wait
                    // is over.
                    tracing::error!(error = %err, "reading a key's budget for an allowance failed");
                    allowances.push(pb::Allowance {
                        client_key_id: ask.client_key_id,
                        ..Default::default()
                    });
                    continue;
                }
            };
            let grant = match budget {
                Some(b) => {
                    let committed: Vec<(Replica, u64)> =
                        committing.into_iter().zip(b.high_water).collect();
                    engine.ask(
                        replica,
                        &ask.client_key_id,
                        Want {
                            nanos: ask.want_nanos,
                            debt: ask.debt_nanos,
                        },
                        Budget {
                            max_nanos: b.max_nanos,
                            period_start_ms: b.period_start_ms,
                            period_end_ms: b.period_end_ms,
                            spent_nanos: b.spent_nanos,
                        },
                        &committed,
                        monotonic_ms(),
                    )
                }
                // Revoked, or its budget removed: the next snapshot tells the replica.
                None => crate::allowance::Grant {
                    nanos: 0,
                    period_start_ms: 0,
                    exhausted: true,
                },
            };
            allowances.push(pb::Allowance {
                client_key_id: ask.client_key_id,
                granted_nanos: grant.nanos,
                period_start_ms: grant.period_start_ms,
                exhausted: grant.exhausted,
            });
        }
        pb::AllowanceUpdate { allowances }
    }
}

/// The records of a report that may be charged to allowances, and who sent them.
struct Charges {
    replica: Replica,
    /// (sequence, client key id, cost, what paid for it).
    records: Vec<(u64, String, u64, PaidIn)>,
}

impl Charges {
    fn of(report: &pb::ReportUsageRequest) -> Option<Self> {
        let records: Vec<(u64, String, u64, PaidIn)> = report
            .records
            .iter()
            // A request served outside any allowance took its cost from no pool: charged
            // to the replica's grants, it made them look spent while the replica still held
            // them (a budget removed and set again: the key could pass it by what the pools
            // held).
            .filter(|r| r.cost_nanos > 0 && !r.client_key_id.is_empty() && !r.unbudgeted)
            .map(|r| {
                // The period whose allowance paid for it, when the record names it; else the
                // record's own day (`UsageRow`'s time), whose period the store files it in.
                let paid = match r.budget_period_start_ms {
                    paid_by if paid_by > 0 => PaidIn::Period(paid_by),
                    // A lifetime budget's allowance: the grants of a lifetime ledger alone
                    // (by its day, a request in flight when the budget was made periodic was
                    // charged to the new period's grants, which its pool was never part of).
                    sluice_proto::LIFETIME_BUDGET_PERIOD => PaidIn::Period(0),
                    _ => PaidIn::Day(crate::budget::day_start(
                        r.time
                            .as_ref()
                            .map_or_else(crate::time::now_ms, crate::time::timestamp_ms),
                    )),
                };
                (r.sequence, r.client_key_id.clone(), r.cost_nanos, paid)
            })
            .collect();
        (!records.is_empty()).then(|| Self {
            replica: Replica {
                node_id: report.node_id.clone(),
                incarnation: report.incarnation.clone(),
            },
            records,
        })
    }
}

/// What a usage stream owes its replica, in the order the batches came.
enum Owed {
    Ack(oneshot::Receiver<Applied>, Option<Charges>),
    Error(Status),
}

/// Most held allowances a hello may name (one per budgeted key the replica used).
const MAX_HELD: usize = 100_000;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn check_id(field: &str, value: &str) -> Result<(), Status> {
    if value.is_empty() || value.len() > MAX_ID_BYTES || has_control(value) {
        return Err(Status::invalid_argument(format!(
            "{field}: must be 1 to {MAX_ID_BYTES} bytes without control characters"
        )));
    }
    Ok(())
}

impl DataPlaneApi {
    /// `StreamSnapshots`: the messages to a replica, snapshots written as [`Publisher::sent`]
    /// writes them.
    async fn snapshot_stream(
        &self,
        request: Request<Streaming<pb::StreamSnapshotsRequest>>,
    ) -> Result<Response<OutgoingStream>, Status> {
        let peer = request
            .remote_addr()
            .map(|a: SocketAddr| a.to_string())
            .unwrap_or_default();
        let mut inbound = request.into_inner();
        let first = inbound.message().await?.ok_or_else(|| {
            Status::invalid_argument("the stream must start with a hello carrying node_id")
        })?;
        check_id("node_id", &first.node_id)?;
        let hello = NodeHello {
            node_id: first.node_id.clone(),
            // Only told apart from another's, never stored or shown.
            incarnation: first.incarnation.chars().take(MAX_ID_BYTES).collect(),
            hostname: first.hostname.chars().take(MAX_ID_BYTES).collect(),
            peer_address: peer,
            build_version: first.build_version.chars().take(64).collect(),
        };
        // A replica that spends budgets from allowances: what it holds is adopted.
        let replica = if first.accepts_allowances {
            check_id("incarnation", &first.incarnation)?;
            let replica = Replica {
                node_id: first.node_id.clone(),
                incarnation: first.incarnation.clone(),
            };
            let lease_ms = first
                .allowance_lease
                .as_ref()
                .map_or(DEFAULT_ALLOWANCE_LEASE_MS, duration_ms)
                .clamp(*ALLOWANCE_LEASE_MS.start(), *ALLOWANCE_LEASE_MS.end());
            let held: Vec<Held> = first
                .held_allowances
                .iter()
                .take(MAX_HELD)
                .filter(|h| check_id("client_key_id", &h.client_key_id).is_ok())
                .map(|h| Held {
                    client_key_id: h.client_key_id.clone(),
                    period_start_ms: h.period_start_ms,
                    nanos: h.held_nanos,
                })
                .collect();
            Some((replica, lease_ms, held))
        } else {
            None
        };
        let (acked, refused) = (first.usage_acked_sequence, refusal(first.error_detail));
        let mut leaving = first.leaving;

        let (tx, rx) = mpsc::channel(2);
        let (due, due_rx) = tokio::sync::watch::channel(None);
        let api = self.clone();
        let mut snapshots = self.publisher.subscribe();
        let node_id = hello.node_id.clone();
        // The replica's arrival (its allowances adopted, its join recorded) runs in the
        // stream's task, not in this call: a call dropped while it awaited the join's write
        // (the replica reset the stream, or its connection closed) left the allowance engine
        // counting the replica's grants as held, and the registry counting it as connected
        // (a refusal's write), until the control plane restarted. The task always ends in
        // `left`.
        tokio::spawn(async move {
            let replica = match replica {
                Some((replica, lease_ms, held)) => {
                    api.allowances.lock().await.hello(
                        &replica,
                        lease_ms,
                        acked,
                        &held,
                        monotonic_ms(),
                    );
                    Some((replica, lease_ms))
                }
                None => None,
            };
            let first_version = match api.membership.joined(&hello, now_ms(), leaving).await {
                Ok(version) => version,
                Err(err) => {
                    if let Some((replica, _)) = &replica {
                        api.allowances.lock().await.left(replica, monotonic_ms());
                    }
                    let _ = tx.send(Err(err.into())).await;
                    return;
                }
            };
            // A snapshot too large for the replica to decode ended its last stream: it says
            // so on this one's hello.
            if !refused.is_empty() {
                tracing::warn!(node = %hello.node_id, error = %refused, "data plane refused a snapshot");
                api.membership
                    .registry()
                    .record(&hello.node_id, 0, &refused);
                if let Err(err) = api
                    .store
                    .record_ack(hello.node_id.clone(), 0, refused)
                    .await
                {
                    tracing::error!(error = %err, "recording a refusal failed");
                }
            }
            // The first snapshot counts this replica among those sharing the RPM limits:
            // it may not be published yet.
            let published = async {
                snapshots
                    .wait_for(|s| s.version >= first_version)
                    .await
                    .map(|s| Arc::clone(&s))
                    .ok()
            };
            let first = tokio::select! {
                first = published => first,
                () = api.stop.cancelled() => None,
            };
            let (replica, lease_ms) = match replica {
                Some((replica, lease_ms)) => (Some(replica), lease_ms),
                None => (None, DEFAULT_ALLOWANCE_LEASE_MS),
            };
            // Before the first snapshot, so the replica knows this control plane grants
            // allowances before it serves anything (an older one sends a snapshot first).
            if replica.is_some() {
                let on = Outgoing::Allowances(pb::AllowanceUpdate::default());
                if tx.send(Ok(on)).await.is_err() {
                    return api.left(&hello, replica.as_ref()).await;
                }
            }
            let Some(first) = first else {
                return api.left(&hello, replica.as_ref()).await;
            };
            // Renews the replica's lease on its allowances while connected.
            let mut renew = tokio::time::interval(std::time::Duration::from_millis(
                (lease_ms / 3).max(1) as u64,
            ));
            renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // That one at once, then each newer one (written ahead of it, see [`Outbound`]).
            due.send_replace(Some(first));
            // The replica's acks are stored off this loop, so that a slow write (a large
            // commit before it, a disk's stalled fsync) delays neither the replica's grants
            // nor its next snapshot; acks that come while one is written are taken together,
            // the latest standing (the registry in memory has each at once).
            let mut unwritten: Option<(u64, String)> = None;
            let mut writing: Option<AckWrite> = None;
            loop {
                if writing.is_none()
                    && let Some((version, error)) = unwritten.take()
                {
                    writing = Some(write_ack(&api.store, &node_id, version, error));
                }
                tokio::select! {
                    written = async {
                        match writing.as_mut() {
                            Some(write) => write.await,
                            None => std::future::pending().await,
                        }
                    }, if writing.is_some() => {
                        writing = None;
                        log_ack_write(written);
                    }
                    changed = snapshots.changed() => {
                        if changed.is_err() { break; }
                        due.send_replace(Some(snapshots.borrow_and_update().clone()));
                    }
                    _ = renew.tick(), if replica.is_some() => {
                        let message = Outgoing::Allowances(pb::AllowanceUpdate::default());
                        if tx.send(Ok(message)).await.is_err() {
                            break;
                        }
                    }
                    message = inbound.message() => match message {
                        Ok(Some(mut m)) => {
                            // Stopped admitting: its share goes to the others now.
                            if m.leaving && !leaving {
                                leaving = true;
                                api.membership.leaving(&hello, now_ms()).await;
                                if m.version == 0 && m.response_nonce.is_empty() && m.allowance_requests.is_empty() {
                                    continue; // the word alone, no ack
                                }
                            }
                            let asks = std::mem::take(&mut m.allowance_requests);
                            if !asks.is_empty() {
                                if let Some(replica) = &replica {
                                    let update = api.grant(replica, asks).await;
                                    let message = Outgoing::Allowances(update);
                                    if tx.send(Ok(message)).await.is_err() {
                                        break;
                                    }
                                }
                                if m.version == 0 && m.response_nonce.is_empty() {
                                    continue; // asks only, no ack
                                }
                            }
                            let refused = refusal(m.error_detail);
                            if !refused.is_empty() {
                                tracing::warn!(node = %node_id, version = m.version, error = %refused, "data plane refused a snapshot");
                            }
                            api.membership.registry().record(&node_id, m.version, &refused);
                            unwritten = Some((m.version, refused));
                        }
                        Ok(None) => break,
                        Err(status) => {
                            tracing::debug!(node = %node_id, %status, "snapshot stream ended");
                            break;
                        }
                    },
                    () = tx.closed() => break,
                    () = api.stop.cancelled() => break,
                }
            }
            // The last ack is stored before the replica is marked gone.
            if let Some(write) = writing {
                log_ack_write(write.await);
            }
            if let Some((version, error)) = unwritten {
                log_ack_write(write_ack(&api.store, &node_id, version, error).await);
            }
            api.left(&hello, replica.as_ref()).await;
        });
        let outbound = Outbound::new(rx, due_rx, Arc::clone(&self.publisher));
        Ok(Response::new(Box::pin(outbound)))
    }
}

/// A replica's ack being stored.
type AckWrite = Pin<Box<dyn Future<Output = Result<(), crate::store::StoreError>> + Send>>;

/// The most characters of a replica's refusal of a snapshot kept: it is logged on each
/// ack, stored and shown to admins (`ListDataPlanes`), and a message may carry megabytes.
const MAX_REFUSAL_CHARS: usize = 4096;

/// A replica's refusal text (`error_detail`), cut at [`MAX_REFUSAL_CHARS`].
fn refusal(mut detail: String) -> String {
    if let Some((cut, _)) = detail.char_indices().nth(MAX_REFUSAL_CHARS) {
        detail.truncate(cut);
        detail.push('…');
    }
    detail
}

fn write_ack(store: &Store, node_id: &str, version: u64, error: String) -> AckWrite {
    let (store, node_id) = (store.clone(), node_id.to_owned());
    Box::pin(async move { store.record_ack(node_id, version, error).await })
}

fn log_ack_write(written: Result<(), crate::store::StoreError>) {
    if let Err(err) = written {
        tracing::error!(error = %err, "recording an ack failed");
    }
}

#[tonic::async_trait]
impl DataPlaneService for DataPlaneApi {
    type StreamSnapshotsStream = BoxStream<pb::StreamSnapshotsResponse>;
    type ReportUsageStream = BoxStream<pb::ReportUsageResponse>;

    /// Served as [`DataPlaneRoutes`] serves it, decoding each snapshot it writes: for a
    /// server that serves the generated service alone.
    async fn stream_snapshots(
        &self,
        request: Request<Streaming<pb::StreamSnapshotsRequest>>,
    ) -> Result<Response<Self::StreamSnapshotsStream>, Status> {
        use futures::StreamExt as _;
        let outgoing = self.snapshot_stream(request).await?.into_inner();
        Ok(Response::new(Box::pin(
            outgoing.map(|message| message.and_then(Outgoing::into_message)),
        )))
    }

    async fn report_usage(
        &self,
        request: Request<Streaming<pb::ReportUsageRequest>>,
    ) -> Result<Response<Self::ReportUsageStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        // Batches go to the writer as they arrive, without waiting for the previous
        // commit; their acks go back in order from a second task.
        let (pending_tx, mut pending) = mpsc::channel::<Owed>(64);
        let allowances = Arc::clone(&self.allowances);
        tokio::spawn(async move {
            while let Some(owed) = pending.recv().await {
                let reply = match owed {
                    Owed::Ack(applied, charges) => match applied.await {
                        Ok(Ok(acked_sequence)) => {
                            // Before the ack: a record the replica sees acked is charged.
                            if let Some(c) = charges {
                                allowances.lock().await.ingested(
                                    &c.replica,
                                    c.records
                                        .iter()
                                        .map(|(q, k, n, d)| (*q, k.as_str(), *n, *d)),
                                    acked_sequence,
                                );
                            }
                            Ok(pb::ReportUsageResponse { acked_sequence })
                        }
                        Ok(Err(err)) => Err(Status::from(err)),
                        Err(_) => Err(Status::unavailable("the control plane is shutting down")),
                    },
                    Owed::Error(status) => Err(status),
                };
                let failed = reply.is_err();
                if tx.send(reply).await.is_err() || failed {
                    break;
                }
            }
        });
        let api = self.clone();
        tokio::spawn(async move {
            loop {
                // A batch already handed to the writer is committed before stopping;
                // only waiting for the next one stops.
                let message = tokio::select! {
                    message = inbound.message() => message,
                    () = api.stop.cancelled() => break,
                };
                let batch = match message {
                    Ok(Some(batch)) => batch,
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(%status, "usage stream ended");
                        // After the acks owed: a report refused as too large tells the
                        // replica which one it was (the first it holds unacked).
                        let _ = pending_tx.send(Owed::Error(status)).await;
                        break;
                    }
                };
                match api.apply(batch).await {
                    Ok(Some((applied, charges))) => {
                        if pending_tx.send(Owed::Ack(applied, charges)).await.is_err() {
                            break;
                        }
                    }
                    Ok(None) => {}
                    Err(status) => {
                        // After the acks already owed, so none is lost.
                        let _ = pending_tx.send(Owed::Error(status)).await;
                        break;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Sequences the store can hold: SQLite's integers are signed, and a high-water mark past
/// `i64::MAX` would read back as 0, letting every record of that replica be counted again.
/// Data planes number records from 1, one a request.
fn check_sequences(batch: &pb::ReportUsageRequest) -> Result<(), Status> {
    let too_large = |sequence: u64| i64::try_from(sequence).is_err();
    if too_large(batch.previous_sequence) || batch.records.iter().any(|r| too_large(r.sequence)) {
        return Err(Status::invalid_argument(format!(
            "usage record sequences must be at most {}",
            i64::MAX
        )));
    }
    Ok(())
}

impl DataPlaneApi {
    /// Cooldown events first, so other replicas learn of a 429 without waiting
    /// for the usage write; then hands the records to the writer, which stores them
    /// and the high-water mark together. Returns where their ack will come from.
    async fn apply(
        &self,
        batch: pb::ReportUsageRequest,
    ) -> Result<Option<(oneshot::Receiver<Applied>, Option<Charges>)>, Status> {
        check_id("node_id", &batch.node_id)?;
        // Usage (and cooldowns) of requests served under another database's snapshot
        // belong to that one: a replica refusing this control plane's snapshots (it was
        // started on an empty or wrong database) keeps them until the right one is back.
        let ours = &self.publisher.latest().database_id;
        if !batch.database_id.is_empty() && !ours.is_empty() && batch.database_id != *ours {
            return Err(Status::failed_precondition(format!(
                "this usage was served under database {}, not this control plane's {ours}: \
                 kept by the data plane for the right one",
                batch.database_id
            )));
        }
        if !batch.events.is_empty() {
            self.store.record_cooldowns(cooldown_events(&batch)).await?;
        }
        if batch.records.is_empty() {
            return Ok(None);
        }
        check_id("incarnation", &batch.incarnation)?;
        check_sequences(&batch)?;
        let charges = Charges::of(&batch);
        if let Some(c) = &charges {
            // Before the store may commit them: an ask that reads a spend including them
            // must know they are no longer outstanding.
            self.allowances.lock().await.committing(
                &c.replica,
                c.records
                    .iter()
                    .map(|(q, k, n, d)| (*q, k.as_str(), *n, *d)),
            );
        }
        let applied = self.usage.submit(batch_of(batch)).await;
        Ok(Some((applied, charges)))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// What a record says paid for it reaches the grant engine as the period it names: a
    /// lifetime budget's allowance (-1) as the lifetime ledger's, and a record naming none (0:
    /// served away, or from an older replica) by its day.
    #[test]
    fn a_record_is_charged_to_the_allowance_it_names() {
        const DAY: i64 = 86_400_000;
        let record = |sequence, budget_period_start_ms| pb::UsageRecord {
            sequence,
            client_key_id: "k".into(),
            cost_nanos: 10,
            budget_period_start_ms,
            time: Some(crate::time::timestamp(3 * DAY + 5)),
            ..Default::default()
        };
        let report = pb::ReportUsageRequest {
            node_id: "n".into(),
            incarnation: "i".into(),
            records: vec![
                record(1, 2 * DAY),
                record(2, sluice_proto::LIFETIME_BUDGET_PERIOD),
                record(3, 0),
            ],
            ..Default::default()
        };
        let paid: Vec<PaidIn> = Charges::of(&report)
            .unwrap()
            .records
            .into_iter()
            .map(|(_, _, _, paid)| paid)
            .collect();
        assert_eq!(
            paid,
            [
                PaidIn::Period(2 * DAY),
                PaidIn::Period(0),
                PaidIn::Day(3 * DAY)
            ]
        );
    }
}
