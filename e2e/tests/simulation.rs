//! A deterministic simulation of the control-plane ⇄ data-plane protocol, explored by seed.
//!
//! It drives the real protocol code, without its transport: on the control-plane side the
//! SQLite store (snapshot versions, usage ingestion with its high-water marks, the replica
//! shares, backends' cooldown states), [`Membership`] (joins and leaves), the [`Publisher`]
//! (epochs, newest-only publishing), snapshots as sent ([`as_sent`]: what is left of each
//! cooldown) and the conversion of reports; on the data-plane side [`SnapshotStore`] (which
//! snapshots a replica takes), its [`CooldownTracker`](sluice_proxy::cooldown::CooldownTracker)
//! (requests sent at a state, their 429s, failures and successes, the reports they make and
//! resend after a reconnect) and the usage [`Outbox`] (what a replica sends, and what acks and
//! refusals mean). What gRPC would do in between is the simulation's: messages in
//! flight on each replica's link, delivered in order within a stream and in any order across
//! streams, links cut and healed, reports delivered twice, group commits that fail, replicas
//! and the control plane killed and restarted, the database restored from a backup, the
//! control plane noticing a dead stream late, and every replica's wall clock skewed. Time is
//! simulated: nothing sleeps. Every choice comes from one seeded RNG, so a seed replays
//! exactly.
//!
//! Checked after every step (no record counted twice: before every restore and at the end,
//! which sees every double count there was, as only a restore lowers a count):
//! - no usage record is counted twice;
//! - a replica never takes a snapshot older than one it took from the same control-plane
//!   start (epoch);
//! - every replica that runs the newest snapshot is among those it counts, so the shares of
//!   the replicas running it add up to at most the limit (the bound of `docs/guarantees.md`
//!   adds the shares of replicas on an older snapshot, as those counted them);
//! - a replica holds its share while connected and for the lease after it left (or after a
//!   control-plane start), restores aside;
//! - a replica told `Retry-After: w` by the backend skips it for at least w.
//!
//! And at the end of each run, after the network heals and the faults stop: every replica
//! runs the newest snapshot, and every record a replica got an ack for is counted exactly
//! once (except those acked between a backup and its restore, which the restore takes back,
//! as documented), as is every record still held when the run ends; and every replica, its
//! wall clock skewed or not, holds the control plane's cooldown state (epoch and streak), and
//! cools the backend down exactly while the control plane does, longer by at most the time
//! its last snapshot travelled.
//!
//! `cargo test -p sluice-e2e --test e2e simulation::` runs 256 seeds (`SLUICE_SIM_SEEDS=N` for more,
//! `SLUICE_SIM_FIRST_SEED=S` to start elsewhere); a failure names its seed, and
//! `SLUICE_SIM_SEEDS=1 SLUICE_SIM_FIRST_SEED=S` replays it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sluice_control::backend::{BackendSpec, ModelRoute, Pool};
use sluice_control::client_key::NewClientKey;
use sluice_control::crypto::MasterKey;
use sluice_control::ingest::{batch_of, cooldown_events};
use sluice_control::membership::{self, Membership, Registry, SHARE_LEASE};
use sluice_control::snapshot::{Publisher, as_sent};
use sluice_control::store::{NodeHello, Store};
use sluice_domain::cooldown::author;
use sluice_proto::v1 as pb;
use sluice_proxy::clock::Now;
use sluice_proxy::control::Report;
use sluice_proxy::cooldown::{Basis, Outcome, Scope};
use sluice_proxy::snapshot::{Applied, SnapshotStore};
use sluice_proxy::usage::{Outbox, UsageSink};
use std::time::{Duration, UNIX_EPOCH};
use tokio::time::Instant;

/// Seeds run by `cargo test` (each takes about a tenth of a second in a debug build).
const DEFAULT_SEEDS: u64 = 256;
const REPLICAS: usize = 3;
/// Steps with faults, then at most this many more to settle once they stop.
const STEPS: usize = 400;
const SETTLE_STEPS: usize = 3_000;
/// The backend's limit the shares divide.
const RPM_LIMIT: u32 = 600;
/// The control plane's simulated wall clock at the start of a run, in Unix ms.
const START_MS: i64 = 1_764_000_000_000;

fn lease_ms() -> i64 {
    SHARE_LEASE.as_millis() as i64
}

/// The seeds are shared out to one thread per core: each run is single-threaded and owns its
/// world (its directory, its RNG, its simulated clocks), so the order they run in changes
/// nothing but the wall time.
#[test]
fn the_protocol_keeps_its_promises_under_faults_explored_by_seed() {
    let seeds: u64 = env_number("SLUICE_SIM_SEEDS").unwrap_or(DEFAULT_SEEDS);
    let first: u64 = env_number("SLUICE_SIM_FIRST_SEED").unwrap_or(0);
    let dir = scratch_dir();
    let started = std::time::Instant::now();
    let next = AtomicU64::new(first);
    let failed = AtomicBool::new(false);
    let totals = Mutex::new(Totals::default());
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(usize::try_from(seeds).unwrap_or(usize::MAX))
        .max(1);
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                while !failed.load(Ordering::Relaxed) {
                    let seed = next.fetch_add(1, Ordering::Relaxed);
                    if seed >= first + seeds {
                        break;
                    }
                    let path = dir.path().join(format!("seed-{seed}"));
                    std::fs::create_dir_all(&path).unwrap();
                    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        runtime.block_on(World::run(seed, &path))
                    }));
                    match outcome {
                        Ok(run) => totals.lock().unwrap().add(&run),
                        Err(panic) => {
                            failed.store(true, Ordering::Relaxed);
                            eprintln!(
                                "simulation seed {seed} failed; replay with \
                                 SLUICE_SIM_SEEDS=1 SLUICE_SIM_FIRST_SEED={seed} cargo test -p sluice-e2e --test e2e simulation::"
                            );
                            std::panic::resume_unwind(panic);
                        }
                    }
                    let _ = std::fs::remove_dir_all(&path);
                }
            });
        }
    });
    eprintln!(
        "simulation: {seeds} seeds ({first}..{}) on {workers} threads in {:.1} s: {}",
        first + seeds,
        started.elapsed().as_secs_f64(),
        totals.lock().unwrap()
    );
}

fn env_number(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name} must be a number, got {v:?}"))
    })
}

/// On tmpfs when there is one: fsync is the slow part of a commit and proves nothing here.
fn scratch_dir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir()
        && let Ok(dir) = tempfile::tempdir_in(shm)
    {
        return dir;
    }
    tempfile::tempdir().unwrap()
}

/// What the runs went through, to show the faults were really explored.
#[derive(Debug, Default, Clone)]
struct Totals {
    records: u64,
    acked: u64,
    commits: u64,
    failed_commits: u64,
    refused_reports: u64,
    duplicates: u64,
    cuts: u64,
    replica_restarts: u64,
    control_restarts: u64,
    restores: u64,
    snapshots_taken: u64,
    requests: u64,
    skipped_cooling: u64,
    overloads: u64,
    cooldown_reports: u64,
    cooldown_resets: u64,
}

impl Totals {
    fn add(&mut self, other: &Totals) {
        self.records += other.records;
        self.acked += other.acked;
        self.commits += other.commits;
        self.failed_commits += other.failed_commits;
        self.refused_reports += other.refused_reports;
        self.duplicates += other.duplicates;
        self.cuts += other.cuts;
        self.replica_restarts += other.replica_restarts;
        self.control_restarts += other.control_restarts;
        self.restores += other.restores;
        self.snapshots_taken += other.snapshots_taken;
        self.requests += other.requests;
        self.skipped_cooling += other.skipped_cooling;
        self.overloads += other.overloads;
        self.cooldown_reports += other.cooldown_reports;
        self.cooldown_resets += other.cooldown_resets;
    }
}

impl std::fmt::Display for Totals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} records ({} acked), {} group commits ({} failed), {} reports refused out of \
             order, {} reports delivered twice, {} link cuts, {} replica and {} control-plane \
             restarts, {} restores, {} snapshots taken; {} requests ({} skipped while \
             cooling, {} overloaded), {} cooldown reports, {} cooldown resets",
            self.records,
            self.acked,
            self.commits,
            self.failed_commits,
            self.refused_reports,
            self.duplicates,
            self.cuts,
            self.replica_restarts,
            self.control_restarts,
            self.restores,
            self.snapshots_taken,
            self.requests,
            self.skipped_cooling,
            self.overloads,
            self.cooldown_reports,
            self.cooldown_resets
        )
    }
}

/// A message on a replica's link.
#[derive(Debug, Clone)]
enum Message {
    /// Data plane → control plane.
    Hello,
    Report(pb::ReportUsageRequest),
    /// Control plane → data plane: a snapshot as sent (see `as_sent`) at a time (ms).
    Snapshot(Arc<pb::Snapshot>, i64),
    Ack(u64),
    Refused(tonic::Code),
}

impl Message {
    fn summary(&self) -> String {
        match self {
            Message::Hello => "hello".into(),
            Message::Report(r) => format!(
                "report {}/{} {}..={} after {}, events {:?}",
                r.node_id,
                r.incarnation,
                r.records.first().map_or(0, |x| x.sequence),
                r.records.last().map_or(0, |x| x.sequence),
                r.previous_sequence,
                r.events
                    .iter()
                    .map(|e| (e.kind, e.cooldown_epoch, e.cooldown_position))
                    .collect::<Vec<_>>()
            ),
            Message::Snapshot(s, _) => format!(
                "snapshot {} of {} (n={}, cooldown epoch {} streak {} left {:?})",
                s.version,
                &s.epoch[..6],
                s.replica_count,
                s.backends.first().map_or(0, |b| b.cooldown_epoch),
                s.backends.first().map_or(0, |b| b.consecutive_failures),
                s.backends
                    .first()
                    .and_then(|b| b.cooldown_remaining.as_ref())
                    .map(|d| d.seconds * 1000 + i64::from(d.nanos) / 1_000_000)
            ),
            Message::Ack(m) => format!("ack {m}"),
            Message::Refused(c) => format!("refused {c:?}"),
        }
    }
}

#[derive(Debug, Clone)]
struct Envelope {
    replica: usize,
    /// The stream it travels on: streams are numbered per world, never reused.
    stream: u64,
    to_control: bool,
    message: Message,
}

/// A data plane process.
struct Replica {
    node_id: String,
    /// Counts this node's processes: each restart is a new incarnation.
    incarnation: u32,
    store: SnapshotStore,
    outbox: Outbox,
    /// Minutes this replica's wall clock is off.
    skew_ms: i64,
    snapshot_stream: Option<u64>,
    usage_stream: Option<u64>,
    /// The (epoch, version) of every snapshot it took, in order.
    taken: Vec<(String, u64)>,
    /// Sequence → the unique model name of each record it made (this incarnation).
    made: BTreeMap<u64, String>,
    /// The records it still holds unacked, as the sink does: the oracle's own count.
    held: BTreeSet<u64>,
    /// Requests sent to the backend and not yet answered, with the state each was sent at.
    requests: Vec<Basis>,
    /// Backend events made and not yet handed to a report (the sink's queue of them), with
    /// when each was made: aged by their wait when sent, as the sink ages them.
    events: Vec<(pb::BackendEvent, Instant)>,
    /// How long (ms) the last snapshot it took travelled.
    last_transit_ms: i64,
}

impl Replica {
    fn new(index: usize, incarnation: u32, rng: &mut StdRng) -> Self {
        let node_id = format!("node-{index}");
        let incarnation_id = format!("inc-{incarnation}");
        // Now and then a small queue, so that records are dropped when it is full.
        let capacity = if rng.random_bool(0.2) { 20 } else { 100_000 };
        let sink = UsageSink::new(capacity);
        Self {
            store: SnapshotStore::default().with_author(author(&node_id, &incarnation_id)),
            outbox: Outbox::new(sink, node_id.clone(), incarnation_id),
            node_id,
            incarnation,
            skew_ms: rng.random_range(-300_000..=300_000),
            snapshot_stream: None,
            usage_stream: None,
            taken: Vec::new(),
            made: BTreeMap::new(),
            held: BTreeSet::new(),
            requests: Vec::new(),
            events: Vec::new(),
            last_transit_ms: 0,
        }
    }

    fn sink(&self) -> &UsageSink {
        self.outbox.sink()
    }
}

/// A running control plane: the real store and publisher, and what its streams hold.
struct Control {
    store: Store,
    publisher: Publisher,
    membership: Membership,
    /// Open snapshot streams: stream → (replica, the (epoch, version) last sent on it).
    snapshot_streams: BTreeMap<u64, (usize, Option<(String, u64)>)>,
    /// Open usage streams: stream → replica. A stream that failed is removed: later
    /// outcomes of its batches have nowhere to go.
    usage_streams: BTreeMap<u64, usize>,
    /// Reports received and not yet committed, in order, with their stream.
    queued: Vec<(u64, pb::ReportUsageRequest)>,
    /// Usage streams it answered with an error: it reads nothing more from them.
    closed: BTreeSet<u64>,
}

/// A backup of the database, and the step it was taken at.
struct Backup {
    path: PathBuf,
    taken_at: usize,
}

struct World {
    seed: u64,
    rng: StdRng,
    /// Simulated wall clock of the control plane, in ms.
    now: i64,
    /// The replicas' monotonic clock at `START_MS`: theirs reads `base + (now - START_MS)`.
    base: Instant,
    dir: PathBuf,
    key: MasterKey,
    control: Option<Control>,
    replicas: Vec<Replica>,
    links_up: Vec<bool>,
    in_flight: Vec<Envelope>,
    next_stream: u64,
    /// Snapshot streams the control plane has not yet noticed are dead: (replica, stream).
    unnoticed: Vec<(usize, u64)>,
    /// Per replica: the control plane must count it until then (None: no such duty).
    must_count_until: Vec<Option<i64>>,
    backup: Option<Backup>,
    /// Records that must be counted exactly once (acked, and not taken back by a
    /// restore): model name → the step it was first acked at.
    acked_at: BTreeMap<String, usize>,
    /// Windows of steps (backup taken, restored) whose acks a restore took back.
    restored_windows: Vec<(usize, usize)>,
    totals: Totals,
    step: usize,
    /// `SLUICE_SIM_TRACE=1`: print every step (for replaying one seed).
    trace: bool,
    /// The oracle's own connection to the database (opened again when a restore replaces
    /// the file): it reads what is stored and injects failures.
    side: Option<rusqlite::Connection>,
}

impl World {
    async fn run(seed: u64, dir: &Path) -> Totals {
        let mut world = World {
            seed,
            rng: StdRng::seed_from_u64(seed),
            now: START_MS,
            base: Instant::now(),
            dir: dir.to_owned(),
            key: MasterKey::from_bytes([7; 32]),
            control: None,
            replicas: Vec::new(),
            links_up: vec![true; REPLICAS],
            in_flight: Vec::new(),
            next_stream: 1,
            unnoticed: Vec::new(),
            must_count_until: vec![None; REPLICAS],
            backup: None,
            acked_at: BTreeMap::new(),
            restored_windows: Vec::new(),
            totals: Totals::default(),
            step: 0,
            trace: std::env::var_os("SLUICE_SIM_TRACE").is_some(),
            side: None,
        };
        world.start_control().await;
        world.seed_configuration().await;
        for i in 0..REPLICAS {
            let replica = Replica::new(i, 0, &mut world.rng);
            world.replicas.push(replica);
        }
        for _ in 0..STEPS {
            world.step += 1;
            world.random_step().await;
            world.check().await;
        }
        world.settle().await;
        world.check().await;
        world.check_counted_once_at_most();
        world.check_converged().await;
        world.totals.clone()
    }

    fn db(&self) -> PathBuf {
        self.dir.join("sluice.db")
    }

    /// Opens the oracle's connection if it is not open.
    fn open_side(&mut self) {
        if self.side.is_none() {
            let conn = rusqlite::Connection::open(self.db()).unwrap();
            conn.busy_timeout(std::time::Duration::from_secs(5))
                .unwrap();
            self.side = Some(conn);
        }
    }

    fn side(&self) -> &rusqlite::Connection {
        self.side.as_ref().expect("the oracle's connection is open")
    }

    fn trace(&self, what: impl FnOnce() -> String) {
        if self.trace {
            eprintln!("[{} @{}] {}", self.step, self.now, what());
        }
    }

    fn fail(&self, what: impl std::fmt::Display) -> ! {
        panic!("seed {} step {}: {what}", self.seed, self.step);
    }

    // ---- the control plane -------------------------------------------------------------

    async fn start_control(&mut self) {
        self.trace(|| "start control plane".into());
        let (store, _) = Store::open(&self.db(), self.key.clone()).unwrap();
        membership::resume(&store, self.now).await.unwrap();
        // Replicas that held a share when it stopped keep it for a lease from now, or until
        // the lease they were on runs out, whichever is first.
        let lease = self.now + lease_ms();
        for duty in &mut self.must_count_until {
            *duty = duty.map(|until| until.min(lease));
        }
        let publisher = Publisher::unstarted(store.clone()).await.unwrap();
        let membership = Membership::new(store.clone(), Arc::new(Registry::default()));
        self.control = Some(Control {
            store,
            publisher,
            membership,
            snapshot_streams: BTreeMap::new(),
            usage_streams: BTreeMap::new(),
            queued: Vec::new(),
            closed: BTreeSet::new(),
        });
    }

    /// A backend with a limit and a client key, so snapshots carry something to divide.
    async fn seed_configuration(&mut self) {
        let store = &self.control.as_ref().unwrap().store;
        store
            .create_backend(
                BackendSpec {
                    anthropic_version: Default::default(),
                    api_format: Default::default(),
                    key_header: Default::default(),
                    name: "b".into(),
                    base_url: "http://127.0.0.1:9/v1".into(),
                    pool: Pool::Primary,
                    priority: 0,
                    weight: 1,
                    models: vec![ModelRoute {
                        default_max_tokens: Default::default(),
                        max_output_tokens: Default::default(),
                        name: "m".into(),
                        upstream_name: "m".into(),
                        input_price_per_mtok: 1.0,
                        output_price_per_mtok: 2.0,
                        ..Default::default()
                    }],
                    rpm_limit: RPM_LIMIT,
                    tpm_limit: 0,
                    enabled: true,
                    responses_api: None,
                },
                "sk-sim".into(),
            )
            .await
            .unwrap();
        self.publish().await;
    }

    /// The control plane stops (killed: what it had not committed is gone). Every stream
    /// dies with it.
    fn kill_control(&mut self) {
        self.trace(|| "kill control plane".into());
        self.control = None;
        self.unnoticed.clear();
        self.in_flight.clear();
        for replica in &mut self.replicas {
            replica.snapshot_stream = None;
            if replica.usage_stream.take().is_some() {
                replica
                    .outbox
                    .failed(&tonic::Status::unavailable("control plane gone"));
            }
        }
    }

    async fn publish(&mut self) {
        let Some(control) = &mut self.control else {
            return;
        };
        control.publisher.rebuild().await.unwrap();
        let latest = control.publisher.latest();
        let newest = (latest.epoch.clone(), latest.version);
        let as_sent_now = Arc::new(as_sent(&latest, self.now));
        let mut sends = Vec::new();
        for (&stream, (replica, sent)) in &mut control.snapshot_streams {
            if sent.as_ref() != Some(&newest) {
                *sent = Some(newest.clone());
                sends.push(Envelope {
                    replica: *replica,
                    stream,
                    to_control: false,
                    message: Message::Snapshot(Arc::clone(&as_sent_now), self.now),
                });
            }
        }
        self.in_flight.extend(sends);
    }

    /// A group commit of what is queued (all of it, or the oldest part), failing now and
    /// then as a full disk would.
    async fn commit(&mut self) {
        let fail = self.rng.random_bool(0.25);
        let take = {
            let Some(control) = &self.control else { return };
            if control.queued.is_empty() {
                return;
            }
            self.rng.random_range(1..=control.queued.len())
        };
        self.open_side();
        let side = self.side.as_ref().unwrap();
        let control = self.control.as_mut().unwrap();
        let jobs: Vec<(u64, pb::ReportUsageRequest)> = control.queued.drain(..take).collect();
        let batches = jobs.iter().map(|(_, r)| batch_of(r.clone())).collect();
        if fail {
            inject_failure(side, true);
        }
        let outcome = control.store.ingest_usage_batches(batches).await;
        if fail {
            inject_failure(side, false);
        }
        if self.trace {
            eprintln!(
                "[{} @{}] commit{} {:?} → {:?}",
                self.step,
                self.now,
                if fail { " (failing)" } else { "" },
                jobs.iter()
                    .map(|(st, r)| format!("{st}:{}", Message::Report(r.clone()).summary()))
                    .collect::<Vec<_>>(),
                outcome.as_ref().map_err(|e| e.to_string())
            );
        }
        self.totals.commits += 1;
        let replies: Vec<(u64, Result<u64, tonic::Code>)> = match outcome {
            Ok(outcomes) => jobs
                .iter()
                .zip(outcomes)
                .map(|((stream, _), o)| (*stream, o.map_err(|_| tonic::Code::Aborted)))
                .collect(),
            Err(_) => {
                self.totals.failed_commits += 1;
                jobs.iter()
                    .map(|(stream, _)| (*stream, Err(tonic::Code::Internal)))
                    .collect()
            }
        };
        for (stream, reply) in replies {
            if reply == Err(tonic::Code::Aborted) {
                self.totals.refused_reports += 1;
            }
            // A stream that already failed gets nothing more.
            let Some(&replica) = control.usage_streams.get(&stream) else {
                continue;
            };
            let message = match reply {
                Ok(mark) => Message::Ack(mark),
                Err(code) => {
                    control.usage_streams.remove(&stream);
                    control.closed.insert(stream);
                    Message::Refused(code)
                }
            };
            self.in_flight.push(Envelope {
                replica,
                stream,
                to_control: false,
                message,
            });
        }
        self.publish().await;
    }

    async fn admin_change(&mut self) {
        let Some(control) = &self.control else { return };
        let n = self.rng.random_range(0..1_000_000);
        control
            .store
            .create_client_key(NewClientKey {
                name: format!("key-{n}"),
                allowed_models: vec![],
                rpm_limit: 0,
                expire_time_ms: None,
                ..Default::default()
            })
            .await
            .unwrap();
        self.publish().await;
    }

    async fn sweep_leases(&mut self) {
        let Some(control) = &self.control else { return };
        if control.store.expire_shares(self.now).await.unwrap() > 0 {
            self.publish().await;
        }
    }

    /// The control plane notices, late (keep-alive), that a snapshot stream is dead.
    async fn notice_dead_stream(&mut self) {
        if self.unnoticed.is_empty() {
            return;
        }
        let (replica, stream) = self
            .unnoticed
            .remove(self.rng.random_range(0..self.unnoticed.len()));
        let Some(control) = &mut self.control else {
            return;
        };
        if control.snapshot_streams.remove(&stream).is_none() {
            return;
        }
        control
            .membership
            .left(&hello(&self.replicas[replica].node_id), self.now, false)
            .await;
        // Its last stream: the share lasts a lease from now (another open stream keeps it).
        let still_open = control
            .snapshot_streams
            .values()
            .any(|(r, _)| *r == replica);
        if !still_open {
            self.must_count_until[replica] = Some(self.now + lease_ms());
        }
        self.publish().await;
    }

    async fn deliver_to_control(&mut self, envelope: Envelope) {
        let Some(control) = &mut self.control else {
            return;
        };
        let replica = envelope.replica;
        match envelope.message {
            Message::Hello => {
                let hello = hello(&self.replicas[replica].node_id);
                let first = control
                    .membership
                    .joined(&hello, self.now, false)
                    .await
                    .unwrap();
                control
                    .snapshot_streams
                    .insert(envelope.stream, (replica, None));
                self.must_count_until[replica] = Some(i64::MAX);
                self.publish().await;
                let latest = self.control.as_ref().unwrap().publisher.latest();
                if latest.version < first {
                    self.fail(format!(
                        "the first snapshot for {replica} ({}) does not count it ({first})",
                        latest.version
                    ));
                }
            }
            Message::Report(report) => {
                if control.closed.contains(&envelope.stream) {
                    return;
                }
                // A stream is opened by its first report.
                control
                    .usage_streams
                    .entry(envelope.stream)
                    .or_insert(replica);
                // Cooldown events at once, before the records wait for their group commit.
                let changed = if report.events.is_empty() {
                    None
                } else {
                    control
                        .store
                        .record_cooldowns_at(cooldown_events(&report), self.now)
                        .await
                        .unwrap()
                };
                control.queued.push((envelope.stream, report));
                if changed.is_some() {
                    self.publish().await;
                }
            }
            _ => unreachable!("only data planes send to the control plane"),
        }
    }

    // ---- the data planes ---------------------------------------------------------------

    fn new_stream(&mut self) -> u64 {
        self.next_stream += 1;
        self.next_stream
    }

    fn connect(&mut self, i: usize) {
        if !self.links_up[i] || self.control.is_none() {
            return;
        }
        if self.replicas[i].snapshot_stream.is_none() {
            let stream = self.new_stream();
            self.replicas[i].snapshot_stream = Some(stream);
            self.in_flight.push(Envelope {
                replica: i,
                stream,
                to_control: true,
                message: Message::Hello,
            });
        }
        if self.replicas[i].usage_stream.is_none() {
            let stream = self.new_stream();
            self.trace(|| format!("replica {i} opens usage stream {stream}"));
            let now = self.replica_now(i);
            let replica = &mut self.replicas[i];
            replica.usage_stream = Some(stream);
            replica.outbox.restart();
            // As the reporter does: cooldown reports no snapshot has shown yet go first.
            let mut resend = replica.store.cooldowns().unacknowledged_events(now.instant);
            while !resend.is_empty()
                && let Some(report) = replica.outbox.next_report(false, &mut resend)
            {
                let report = on_the_wire(&report);
                self.in_flight.push(Envelope {
                    replica: i,
                    stream,
                    to_control: true,
                    message: Message::Report(report),
                });
            }
        }
    }

    /// Replica `i`'s clocks: its monotonic clock, and its wall clock, skewed.
    fn replica_now(&self, i: usize) -> Now {
        let elapsed = Duration::from_millis(u64::try_from(self.now - START_MS).unwrap());
        let wall_ms = u64::try_from(self.now + self.replicas[i].skew_ms).unwrap();
        Now {
            instant: self.base + elapsed,
            wall: UNIX_EPOCH + Duration::from_millis(wall_ms),
        }
    }

    /// Replica `i` sends a request (or a few) to the backend, unless it is cooling down there.
    fn request(&mut self, i: usize) {
        let now = self.replica_now(i);
        let replica = &mut self.replicas[i];
        let Some(snapshot) = replica.store.load() else {
            return;
        };
        let backend = &snapshot.backends()[0].id;
        for _ in 0..self.rng.random_range(1..=4) {
            self.totals.requests += 1;
            match replica.store.cooldowns().check(backend, "", now.instant) {
                Ok(basis) => replica.requests.push(basis),
                Err(_) => self.totals.skipped_cooling += 1,
            }
        }
    }

    /// A request in flight at replica `i` is answered: a success, a 429 (with or without
    /// `Retry-After`) or a failure.
    fn complete(&mut self, i: usize) {
        if self.replicas[i].requests.is_empty() {
            return;
        }
        let now = self.replica_now(i);
        let pick = self.rng.random_range(0..self.replicas[i].requests.len());
        let outcome = match self.rng.random_range(0..10) {
            0..=4 => Outcome::Success,
            5..=7 => Outcome::RateLimited {
                retry_after: self
                    .rng
                    .random_bool(0.5)
                    .then(|| Duration::from_millis(self.rng.random_range(0..5_000))),
                scope: Scope::Backend,
            },
            _ => Outcome::Failure {
                retry_after: None,
                scope: Scope::Backend,
            },
        };
        let replica = &mut self.replicas[i];
        let basis = replica.requests.swap_remove(pick);
        let snapshot = replica
            .store
            .load()
            .expect("it sent the request by a snapshot");
        let backend = &snapshot.backends()[0].id;
        let cooldowns = replica.store.cooldowns();
        let event = cooldowns.record(backend, "", basis, &snapshot.policy.cooldown, outcome, now);
        if outcome != Outcome::Success {
            self.totals.overloads += 1;
        }
        if let Outcome::RateLimited {
            retry_after: Some(wait),
            scope: Scope::Backend,
        } = outcome
            && !wait.is_zero()
        {
            let until = cooldowns.check(backend, "", now.instant).err();
            if until.is_none_or(|until| until < now.instant + wait) {
                self.fail(format!(
                    "replica {i} told Retry-After {wait:?} skips the backend for {:?}",
                    until.map(|until| until - now.instant)
                ));
            }
        }
        if let Some(event) = event {
            self.trace(|| format!("replica {i}: {outcome:?} → event {event:?}"));
            self.totals.cooldown_reports += 1;
            let made = self.replica_now(i).instant;
            self.replicas[i].events.push((event, made));
        }
    }

    /// An operator resets the backend's cooldown.
    async fn reset_cooldown(&mut self) {
        let Some(control) = &self.control else { return };
        self.trace(|| "reset cooldown".into());
        control
            .store
            .reset_cooldown("b".into(), String::new())
            .await
            .unwrap();
        self.totals.cooldown_resets += 1;
        self.publish().await;
    }

    /// Requests finish on replica `i`: usage records.
    fn record(&mut self, i: usize) {
        let n = self.rng.random_range(1..=12);
        let now = self.now;
        let replica = &mut self.replicas[i];
        for _ in 0..n {
            let at = now + replica.skew_ms;
            let model = format!(
                "r{i}-{}-{}",
                replica.incarnation,
                replica.made.len() as u64 + 1
            );
            let record = pb::UsageRecord {
                request_id: model.clone(),
                backend_id: "b".into(),
                model: model.clone(),
                client_key_id: "k".into(),
                prompt_tokens: 3,
                completion_tokens: 5,
                status_code: 200,
                time: Some(sluice_proto::wkt::Timestamp {
                    seconds: at.div_euclid(1000),
                    nanos: 0,
                }),
                ..Default::default()
            };
            let dropped = replica.sink().dropped();
            let sequence = replica.sink().record(record);
            if replica.sink().dropped() > dropped {
                // A full queue drops its oldest record.
                replica.held.pop_first();
            }
            replica.held.insert(sequence);
            replica.made.insert(sequence, model);
            self.totals.records += 1;
        }
    }

    /// Replica `i` sends what its outbox has for the current stream.
    fn pump(&mut self, i: usize) {
        let Some(stream) = self.replicas[i].usage_stream else {
            return;
        };
        let all = self.rng.random_bool(0.7);
        let now = self.replica_now(i).instant;
        let mut events: Vec<pb::BackendEvent> = std::mem::take(&mut self.replicas[i].events)
            .into_iter()
            .map(|(mut event, made)| {
                let age = event
                    .age
                    .as_ref()
                    .and_then(sluice_domain::time::std_duration)
                    .unwrap_or_default()
                    + now.saturating_duration_since(made);
                event.age = Some(sluice_domain::time::proto_duration(age));
                event
            })
            .collect();
        while let Some(report) = self.replicas[i].outbox.next_report(all, &mut events) {
            let report = on_the_wire(&report);
            self.trace(|| {
                format!(
                    "replica {i} sends on {stream}: {}",
                    Message::Report(report.clone()).summary()
                )
            });
            self.in_flight.push(Envelope {
                replica: i,
                stream,
                to_control: true,
                message: Message::Report(report),
            });
        }
    }

    fn deliver_to_replica(&mut self, envelope: Envelope) {
        let i = envelope.replica;
        let now = self.replica_now(i);
        let replica = &mut self.replicas[i];
        match envelope.message {
            Message::Snapshot(snapshot, sent_at) => {
                if replica.snapshot_stream != Some(envelope.stream) {
                    return;
                }
                let taken = (snapshot.epoch.clone(), snapshot.version);
                match replica.store.apply_at((*snapshot).clone(), now) {
                    Ok(applied) => {
                        // The cooldown deadlines come from the snapshot it swapped in.
                        if matches!(applied, Applied::Swapped) {
                            replica.last_transit_ms = self.now - sent_at;
                        }
                        if let Some(last) = replica
                            .taken
                            .iter()
                            .rev()
                            .find(|(epoch, _)| *epoch == taken.0)
                            && last.1 > taken.1
                        {
                            let message = format!(
                                "replica {i} took version {} after {} of the same epoch",
                                taken.1, last.1
                            );
                            self.fail(message);
                        }
                        self.totals.snapshots_taken += 1;
                        self.replicas[i].taken.push(taken);
                    }
                    // The control plane never sends an older version of one epoch, nor an
                    // invalid snapshot.
                    Err(err) => self.fail(format!("replica {i} refused a snapshot: {err}")),
                }
            }
            Message::Ack(mark) => {
                if replica.usage_stream != Some(envelope.stream) {
                    return;
                }
                replica.outbox.acked(mark);
                let newly: Vec<u64> = replica.held.range(..=mark).copied().collect();
                let newly: Vec<String> = newly
                    .into_iter()
                    .map(|sequence| {
                        replica.held.remove(&sequence);
                        replica.made[&sequence].clone()
                    })
                    .collect();
                for model in newly {
                    self.totals.acked += 1;
                    self.acked_at.entry(model).or_insert(self.step);
                }
            }
            Message::Refused(code) => {
                if replica.usage_stream != Some(envelope.stream) {
                    return;
                }
                replica.usage_stream = None;
                replica.outbox.failed(&tonic::Status::new(code, "refused"));
            }
            _ => unreachable!("only the control plane sends to data planes"),
        }
    }

    /// Delivers one message: the oldest of a random stream (a stream keeps its order).
    async fn deliver(&mut self) {
        if self.in_flight.is_empty() {
            return;
        }
        let pick = self.rng.random_range(0..self.in_flight.len());
        let (stream, to_control) = (self.in_flight[pick].stream, self.in_flight[pick].to_control);
        let head = self
            .in_flight
            .iter()
            .position(|e| e.stream == stream && e.to_control == to_control)
            .unwrap();
        let envelope = self.in_flight.remove(head);
        if !self.links_up[envelope.replica] {
            return;
        }
        self.trace(|| {
            format!(
                "deliver {} replica {} stream {}: {}",
                if envelope.to_control {
                    "→cp"
                } else {
                    "→dp"
                },
                envelope.replica,
                envelope.stream,
                envelope.message.summary()
            )
        });
        // Now and then a report arrives twice (a retried write, a resend racing the
        // original): the second copy comes later, on a stream of its own.
        if let Message::Report(_) = &envelope.message
            && self.rng.random_bool(0.05)
        {
            let ghost = self.new_stream();
            self.totals.duplicates += 1;
            self.in_flight.push(Envelope {
                stream: ghost,
                ..envelope.clone()
            });
        }
        if envelope.to_control {
            self.deliver_to_control(envelope).await;
        } else {
            self.deliver_to_replica(envelope);
        }
    }

    /// Replica `i`'s link fails: its streams die at once on its side, in flight messages
    /// are lost, and the control plane notices later.
    fn cut(&mut self, i: usize) {
        self.trace(|| format!("cut replica {i}"));
        self.links_up[i] = false;
        self.totals.cuts += 1;
        self.drop_streams(i);
    }

    fn drop_streams(&mut self, i: usize) {
        self.in_flight.retain(|e| e.replica != i);
        let replica = &mut self.replicas[i];
        if let Some(stream) = replica.snapshot_stream.take() {
            self.unnoticed.push((i, stream));
        }
        if let Some(stream) = replica.usage_stream.take() {
            replica
                .outbox
                .failed(&tonic::Status::unavailable("link cut"));
            if let Some(control) = &mut self.control {
                control.usage_streams.remove(&stream);
            }
        }
    }

    /// Replica `i` is killed and started again: a new incarnation, an empty queue.
    fn restart_replica(&mut self, i: usize) {
        self.trace(|| format!("restart replica {i}"));
        self.totals.replica_restarts += 1;
        self.drop_streams(i);
        // What it held unacked is lost with it (a spool would keep it; none here).
        let incarnation = self.replicas[i].incarnation + 1;
        self.replicas[i] = Replica::new(i, incarnation, &mut self.rng);
    }

    async fn restart_control(&mut self) {
        self.totals.control_restarts += 1;
        self.kill_control();
        self.start_control().await;
        self.publish().await;
    }

    /// Copies the database as `sqlite3 … ".backup"` would (a consistent copy while running).
    fn take_backup(&mut self) {
        if self.control.is_none() {
            return;
        }
        let path = self.dir.join("backup.db");
        let _ = std::fs::remove_file(&path);
        let conn = rusqlite::Connection::open(self.db()).unwrap();
        conn.execute("VACUUM INTO ?1", [path.display().to_string()])
            .unwrap();
        self.trace(|| "backup".into());
        self.backup = Some(Backup {
            path,
            taken_at: self.step,
        });
    }

    async fn restore(&mut self) {
        let Some(backup) = self.backup.take() else {
            return;
        };
        self.check_counted_once_at_most();
        self.totals.restores += 1;
        self.trace(|| "restore".into());
        self.kill_control();
        self.side = None;
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(self.dir.join(format!("sluice.db{suffix}")));
        }
        std::fs::rename(&backup.path, self.db()).unwrap();
        self.restored_windows.push((backup.taken_at, self.step));
        // The backup decides who holds a share until each replica reconnects (documented).
        self.must_count_until = vec![None; REPLICAS];
        self.start_control().await;
        self.publish().await;
    }

    // ---- the schedule ------------------------------------------------------------------

    async fn random_step(&mut self) {
        let i = self.rng.random_range(0..REPLICAS);
        match self.rng.random_range(0..1250) {
            1000..=1079 => self.request(i),
            1080..=1239 => self.complete(i),
            1240..=1242 => self.reset_cooldown().await,
            1243..=1249 => self.now += self.rng.random_range(10..3_000),
            0..=349 => self.deliver().await,
            350..=429 => self.record(i),
            430..=479 => {
                // A burst: several reports on one stream before any commit.
                for _ in 0..self.rng.random_range(2..5) {
                    self.record(i);
                    self.pump(i);
                }
            }
            480..=609 => self.pump(i),
            610..=729 => self.commit().await,
            730..=789 => self.connect(i),
            790..=839 => self.now += self.rng.random_range(100..20_000),
            840..=869 => self.admin_change().await,
            870..=899 => self.sweep_leases().await,
            900..=939 => self.notice_dead_stream().await,
            940..=954 => self.cut(i),
            955..=974 => self.links_up[i] = true,
            975..=979 => self.restart_replica(i),
            980..=982 => self.restart_control().await,
            983..=984 => {
                // Down for a while; a later step starts it again.
                self.totals.control_restarts += 1;
                self.kill_control();
            }
            985..=991 => self.take_backup(),
            992..=993 => self.restore().await,
            _ => {
                if self.control.is_none() {
                    self.start_control().await;
                    self.publish().await;
                }
            }
        }
    }

    /// The network heals and the faults stop: everything settles.
    async fn settle(&mut self) {
        self.links_up = vec![true; REPLICAS];
        if self.control.is_none() {
            self.start_control().await;
        }
        for _ in 0..SETTLE_STEPS {
            self.step += 1;
            let i = self.rng.random_range(0..REPLICAS);
            match self.rng.random_range(0..10) {
                0..=4 => self.deliver().await,
                5 => self.pump(i),
                6 => self.commit_reliably().await,
                7 => self.connect(i),
                8 => self.notice_dead_stream().await,
                _ => {
                    self.now += 1_000;
                    self.sweep_leases().await;
                }
            }
            self.check().await;
            if self.quiet() {
                return;
            }
        }
        self.fail("the protocol did not settle after the network healed");
    }

    async fn commit_reliably(&mut self) {
        let queued = self.control.as_ref().map_or(0, |c| c.queued.len());
        if queued > 0 {
            // No more faults: every commit succeeds.
            let before = self.totals.failed_commits;
            self.open_side();
            inject_failure(self.side(), false);
            let control = self.control.as_mut().unwrap();
            let jobs: Vec<(u64, pb::ReportUsageRequest)> = control.queued.drain(..).collect();
            let batches = jobs.iter().map(|(_, r)| batch_of(r.clone())).collect();
            let outcomes = control.store.ingest_usage_batches(batches).await.unwrap();
            self.totals.commits += 1;
            for ((stream, _), outcome) in jobs.iter().zip(outcomes) {
                if outcome.is_err() {
                    self.totals.refused_reports += 1;
                }
                let Some(&replica) = control.usage_streams.get(stream) else {
                    continue;
                };
                let message = match outcome {
                    Ok(mark) => Message::Ack(mark),
                    Err(_) => {
                        control.usage_streams.remove(stream);
                        control.closed.insert(*stream);
                        Message::Refused(tonic::Code::Aborted)
                    }
                };
                self.in_flight.push(Envelope {
                    replica,
                    stream: *stream,
                    to_control: false,
                    message,
                });
            }
            assert_eq!(self.totals.failed_commits, before);
        }
    }

    /// Nothing left to do: every replica connected, current, and holding nothing unacked.
    fn quiet(&self) -> bool {
        let Some(control) = &self.control else {
            return false;
        };
        let latest = control.publisher.latest();
        self.in_flight.is_empty()
            && control.queued.is_empty()
            && self.unnoticed.is_empty()
            && self.replicas.iter().all(|r| {
                r.snapshot_stream.is_some()
                    && r.usage_stream.is_some()
                    && r.sink().pending() == 0
                    && r.events.is_empty()
                    && r.store
                        .load()
                        .is_some_and(|s| s.epoch == latest.epoch && s.version == latest.version)
            })
    }

    // ---- the invariants ----------------------------------------------------------------

    async fn check(&mut self) {
        self.open_side();
        self.check_shares();
    }

    /// No record counted twice. A count never goes down but by a restore, so checking
    /// before each restore and at the end sees every double count there ever was.
    fn check_counted_once_at_most(&mut self) {
        self.open_side();
        let counts = usage_counts(self.side());
        if let Some((model, n)) = counts.iter().find(|(_, n)| **n > 1) {
            self.fail(format!("record {model} counted {n} times"));
        }
    }

    fn check_shares(&self) {
        let Some(control) = &self.control else {
            return;
        };
        let latest = control.publisher.latest();
        let holders = holders(self.side());
        let limit = f64::from(RPM_LIMIT);
        // Replicas on older snapshots enforce the shares those counted (the bound's second
        // term in docs/guarantees.md): nothing here bounds them.
        let mut current_sum = 0.0;
        for (i, replica) in self.replicas.iter().enumerate() {
            let node = &replica.node_id;
            if let Some(until) = self.must_count_until[i]
                && self.now < until
                && !holders.contains(node)
            {
                self.fail(format!(
                    "{node} lost its share before its lease ran out ({} < {until})",
                    self.now
                ));
            }
            let Some(snapshot) = replica.store.load() else {
                continue;
            };
            let share = snapshot
                .backends()
                .iter()
                .find_map(|b| b.limiter.as_ref())
                .map_or(0.0, |l| l.share_per_minute());
            if snapshot.epoch == latest.epoch && snapshot.version == latest.version {
                if !holders.contains(node) {
                    self.fail(format!(
                        "{node} runs the newest snapshot but is not among those it counts"
                    ));
                }
                current_sum += share;
            }
        }
        if current_sum > limit * (1.0 + 1e-9) {
            self.fail(format!(
                "the replicas on the newest snapshot enforce {current_sum} rpm together, more than the limit {limit}"
            ));
        }
    }

    async fn check_converged(&mut self) {
        self.open_side();
        let control = self.control.as_ref().unwrap();
        let latest = control.publisher.latest();
        for (i, replica) in self.replicas.iter().enumerate() {
            let current = replica.store.load().unwrap();
            if current.epoch != latest.epoch || current.version != latest.version {
                self.fail(format!(
                    "replica {i} runs {} of {}, not the newest {} of {}",
                    current.version, current.epoch, latest.version, latest.epoch
                ));
            }
        }
        let counts = usage_counts(self.side());
        let taken_back = |at: usize| {
            self.restored_windows
                .iter()
                .any(|&(taken, restored)| at > taken && at <= restored)
        };
        for (model, &at) in &self.acked_at {
            let n = counts.get(model).copied().unwrap_or(0);
            if n != 1 && !taken_back(at) {
                self.fail(format!("record {model}, acked at {at}, counted {n} times"));
            }
        }
        // Settled: every record still held was acked (and so is checked above).
        for (i, replica) in self.replicas.iter().enumerate() {
            if !replica.held.is_empty() || replica.sink().pending() != 0 {
                self.fail(format!(
                    "replica {i} still holds {} records unacked",
                    replica.sink().pending()
                ));
            }
        }
        self.check_cooldowns_agree(&latest);
    }

    /// Settled: every replica holds the control plane's cooldown state, and skips the
    /// backend while the control plane says it cools down, longer by at most the time its
    /// last snapshot travelled (whatever its wall clock says).
    fn check_cooldowns_agree(&self, latest: &pb::Snapshot) {
        let backend = &latest.backends[0];
        let ms =
            |t: &sluice_proto::wkt::Timestamp| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000;
        let control_until = backend.cooldown_until.as_ref().map(ms);
        for (i, replica) in self.replicas.iter().enumerate() {
            let view = replica.store.cooldowns().view(&backend.id);
            if (view.epoch, view.streak) != (backend.cooldown_epoch, backend.consecutive_failures) {
                self.fail(format!(
                    "replica {i} holds cooldown epoch {} streak {}, the control plane {} and {}",
                    view.epoch, view.streak, backend.cooldown_epoch, backend.consecutive_failures
                ));
            }
            let now = self.replica_now(i);
            let replica_until = replica
                .store
                .cooldowns()
                .check(&backend.id, "", now.instant)
                .err()
                .map(|until| START_MS + i64::try_from((until - self.base).as_millis()).unwrap());
            let transit = replica.last_transit_ms;
            let agrees = match (
                control_until.filter(|until| *until > self.now),
                replica_until,
            ) {
                (Some(cp), Some(r)) => cp <= r && r <= cp + transit,
                (Some(_), None) => false,
                (None, Some(r)) => control_until.is_some_and(|cp| r <= cp + transit),
                (None, None) => true,
            };
            if !agrees {
                self.fail(format!(
                    "at {} replica {i} (clock {} ms off) cools down until {replica_until:?}, the \
                     control plane until {control_until:?} (its last snapshot travelled {transit} ms)",
                    self.now, replica.skew_ms
                ));
            }
        }
    }
}

/// The replicas holding a share, as the control plane's database says.
fn holders(conn: &rusqlite::Connection) -> BTreeSet<String> {
    let mut stmt = conn
        .prepare_cached("SELECT node_id FROM data_planes WHERE share_until IS NOT NULL")
        .unwrap();
    stmt.query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// How many times each record (its unique model name) is counted.
fn usage_counts(conn: &rusqlite::Connection) -> BTreeMap<String, i64> {
    let mut stmt = conn
        .prepare_cached("SELECT model, sum(request_count) FROM usage_hourly GROUP BY model")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// Makes every usage commit fail (`on`), as a full disk would, or stops it: triggers that
/// abort the statement moving a high-water mark, created from another connection.
fn inject_failure(conn: &rusqlite::Connection, on: bool) {
    if on {
        conn.execute_batch(
            "CREATE TRIGGER IF NOT EXISTS sim_fail_insert BEFORE INSERT ON usage_high_water
                 BEGIN SELECT RAISE(ABORT, 'simulated disk failure'); END;
             CREATE TRIGGER IF NOT EXISTS sim_fail_update BEFORE UPDATE ON usage_high_water
                 BEGIN SELECT RAISE(ABORT, 'simulated disk failure'); END;",
        )
        .unwrap();
    } else {
        conn.execute_batch(
            "DROP TRIGGER IF EXISTS sim_fail_insert; DROP TRIGGER IF EXISTS sim_fail_update;",
        )
        .unwrap();
    }
}

/// A report as the control plane reads it off the wire: the data plane sends its records
/// pre-encoded ([`Report`]), the control plane decodes a `ReportUsageRequest`.
fn on_the_wire(report: &Report) -> pb::ReportUsageRequest {
    use prost::Message as _;
    pb::ReportUsageRequest::decode(report.encode_to_vec().as_slice()).unwrap()
}

/// The hello a simulated replica's snapshot stream opens with.
fn hello(node_id: &str) -> NodeHello {
    NodeHello {
        node_id: node_id.to_owned(),
        incarnation: String::new(),
        hostname: "sim".into(),
        peer_address: String::new(),
        build_version: "sim".into(),
    }
}
