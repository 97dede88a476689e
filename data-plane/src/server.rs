//! Wiring: the HTTP listener, the serving threads, the snapshot subscriber, the usage
//! reporter, and the graceful shutdown that drains requests and flushes usage in that order.
//!
//! Requests are served thread-per-core: the caller's runtime accepts connections (and runs
//! the usage reporter; the snapshot subscriber has a thread of its own, since decoding and
//! preparing a snapshot of 100,000 keys holds its thread for a few hundred milliseconds, and
//! connections must not wait for it) and deals each to the one of N serving
//! threads holding the fewest connections, each with a single-threaded runtime and its own
//! upstream connection pool. A request, its upstream call and its response then stay on one
//! thread: no work stealing and no cross-thread wake-ups on the hot path. Against one multi-threaded runtime that took
//! context switches per proxied request from 3.0–4.0 to 1.8–2.3 (`./e2e/bench-cpu.sh`) and the
//! saturation throughput ratio from 0.26–0.32 to 0.30–0.37. The price: a connection stays on
//! the thread it was dealt to, so a few very busy connections can load one thread more than
//! another.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use prometheus_client::metrics::gauge::Gauge;
use sluice_listener::{Acceptor, Graceful, Http, Slot};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::allowance::Allowances;
use crate::answer_memory::{
    AnswerMemory, AnswerPermit, CountedAnswer, H2_STREAM_BYTES, OWN_ANSWERS,
};
use crate::backoff::Backoff;
use crate::clock::Clock;
use crate::config::Config;
use crate::control::{self, ControlError, NodeIdentity};
use crate::deadline::{self, Alarm, ConnectionDeadline};
use crate::metrics::{Held, Metrics};
use crate::proxy::{self, AppState, Limits};
use crate::snapshot::{Refusal, SnapshotStore};
use crate::spool::{Spool, SpoolError};
use crate::stopping::Stopping;
use crate::subscribe;
use crate::upstream::UpstreamTls;
use crate::usage::{UsageReporter, UsageSink};

/// Longest wait for stream relays to record their usage after the server stopped.
const RELAY_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot read the data-plane token file: {0}")]
    TokenFile(std::io::Error),
    #[error(
        "no data-plane token: set SLUICE_DATAPLANE_TOKEN or --dataplane-token-file (the control \
         plane's is in its data directory, file dataplane-token)"
    )]
    NoToken,
    #[error("{0}")]
    WeakToken(String),
    #[error("cannot read the control plane CA file: {0}")]
    CaFile(std::io::Error),
    #[error("{0}")]
    UpstreamCa(String),
    #[error("the egress proxy settings cannot be used: {0}")]
    EgressProxy(String),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error("http server failed: {0}")]
    Serve(std::io::Error),
    #[error(
        "--max-buffered-answer-bytes ({answers}) is less than --max-response-bytes ({largest}): \
         the largest answer could never be held"
    )]
    AnswersBelowLargest { answers: usize, largest: usize },
    #[error(
        "--max-buffered-answer-bytes-per-key ({share}) is less than --max-response-bytes \
         ({largest}): a key's largest answer could never be held"
    )]
    KeyShareBelowLargest { share: usize, largest: usize },
}

/// How long a stop waits for the snapshot stream to close (its farewell: the `leaving` word
/// and the control plane's close, up to 1 s each); past it the stream's thread is left to end
/// on its own.
const SUBSCRIBER_WAIT: Duration = Duration::from_secs(2);

/// Hands the snapshot stream's snapshots to the store, which counts what it refuses, and
/// its keys with a budget to the allowances. Public for tests that run the subscriber as a
/// server runs it.
pub struct Applier(pub Arc<SnapshotStore>, pub Arc<Allowances>);

impl subscribe::Receiver for Applier {
    fn apply(&mut self, snapshot: sluice_proto::v1::Snapshot) -> Result<(), String> {
        let (version, epoch) = (snapshot.version, snapshot.epoch.clone());
        let budgeted = snapshot
            .client_keys
            .iter()
            .filter(|k| k.max_budget > 0.0)
            .map(|k| {
                let resets = k
                    .budget_reset_time
                    .as_ref()
                    .and_then(crate::clock::system_time);
                let period_start = k
                    .budget_period_start
                    .as_ref()
                    .and_then(crate::clock::system_time)
                    .map(crate::allowance::system_time_ms);
                (k.id.clone(), k.max_budget, resets, period_start)
            })
            .collect();
        // The pools of the keys it brings before requests see it: a request of a new
        // budgeted key let in between found no pool and was served on no budget at all (its
        // cost never settled into a pool nor kept as its reserve).
        let allowances = &self.1;
        match self
            .0
            .apply_before_swap(snapshot, || allowances.budgeted(budgeted))
        {
            Ok(applied) => {
                tracing::info!(version, %epoch, ?applied, "snapshot applied");
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        }
    }

    fn too_large(&mut self, _detail: &str) {
        self.0.refused_undecoded(Refusal::TooLarge);
    }

    fn allowances(&self) -> Option<Arc<Allowances>> {
        Some(Arc::clone(&self.1))
    }

    fn connected(&mut self, connected: bool) {
        self.0.set_connected(connected);
    }
}

/// A bound, not yet serving data plane.
pub struct Proxy {
    listener: TcpListener,
    local_addr: SocketAddr,
    config: Config,
    token: Option<String>,
    ca_pem: Option<Vec<u8>>,
    store: Arc<SnapshotStore>,
    usage: UsageSink,
    /// The usage spool, when there is a data directory.
    spool: Option<Arc<Spool>>,
    identity: NodeIdentity,
    /// Resolved once (the default reads the CPU quota): the snapshot store builds as many
    /// upstream pools.
    serving_threads: usize,
}

impl Proxy {
    /// Binds the HTTP listener and logs `http listening on <addr>`.
    pub async fn bind(config: Config) -> Result<Self, RunError> {
        if config.max_buffered_answer_bytes < config.max_response_bytes {
            return Err(RunError::AnswersBelowLargest {
                answers: config.max_buffered_answer_bytes,
                largest: config.max_response_bytes,
            });
        }
        if config.answers_per_key() < config.max_response_bytes {
            return Err(RunError::KeyShareBelowLargest {
                share: config.answers_per_key(),
                largest: config.max_response_bytes,
            });
        }
        if config.answers_per_key() < config.max_response_bytes.saturating_mul(2)
            && config.answers_per_key() < config.max_buffered_answer_bytes
        {
            tracing::warn!(
                "--max-buffered-answer-bytes-per-key is less than twice --max-response-bytes: \
                 an answer over half the largest that declares no length is refused even when \
                 its key holds nothing else"
            );
        }
        if config.max_buffered_answer_bytes < config.max_response_bytes.saturating_mul(2) {
            // An answer of undeclared length is read into a buffer that doubles as it grows.
            tracing::warn!(
                "--max-buffered-answer-bytes is less than twice --max-response-bytes: an answer \
                 over half the largest that declares no length is refused even on an idle replica"
            );
        }
        let token = config
            .token()
            .map_err(RunError::TokenFile)?
            .filter(|token| !token.is_empty())
            .ok_or(RunError::NoToken)?;
        sluice_domain::auth::check_token_strength("the data-plane token", &token)
            .map_err(RunError::WeakToken)?;
        let token = Some(token);
        if let Some(unusable) = crate::upstream::unusable_proxy_env() {
            return Err(RunError::EgressProxy(unusable));
        }
        let ca_pem = match &config.control_plane_ca {
            Some(path) => Some(std::fs::read(path).map_err(RunError::CaFile)?),
            None => None,
        };
        let upstream_tls = UpstreamTls {
            http2: config.upstream_http2,
            ..UpstreamTls::default()
        };
        let upstream_tls = match &config.upstream_ca {
            Some(path) => upstream_tls
                .with_roots_from(path)
                .map_err(RunError::UpstreamCa)?,
            None => upstream_tls,
        };
        // Fail on a bad URL, token or CA now rather than in a retry loop.
        control::connect_with_ca(&config.control_plane, token.as_deref(), ca_pem.as_deref())?;
        let serving_threads = config.serving_threads();
        let identity = NodeIdentity::new(config.node_id.clone());
        // Before listening: a data directory another process holds stops this one here.
        let spool = match config.spool() {
            Some(options) => {
                let serve_anyway = options.on_full == crate::spool::OnFull::Serve;
                match Spool::open(options, &identity, serving_threads) {
                    Ok(spool) => Some(Arc::new(spool)),
                    Err(err) if serve_anyway && err.disk_failing() => {
                        tracing::error!(
                            error = %err,
                            "the usage spool cannot be opened on a failing disk; serving without \
                             it (--usage-spool-full serve): usage survives no crash of this \
                             process, and what an earlier run left is sent after a restart on a \
                             working disk"
                        );
                        None
                    }
                    Err(err) => return Err(err.into()),
                }
            }
            None => None,
        };
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| RunError::Bind {
                addr: config.listen,
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| RunError::Bind {
            addr: config.listen,
            source,
        })?;
        tracing::info!(serving_threads, "http listening on {local_addr}");
        tracing::info!(node_id = %identity.node_id, incarnation = %identity.incarnation, control_plane = %config.control_plane, "data plane starting");
        match &config.data_dir {
            Some(dir) => {
                tracing::info!(data_dir = %dir.display(), "usage spool on: usage survives a crash of this process")
            }
            None => tracing::warn!(
                "no --data-dir (SLUICE_PROXY_DATA_DIR): usage spool off, so a crash of this process loses the usage the control plane has not acked yet"
            ),
        }
        if crate::upstream::egress_proxy_from_env() {
            // The proxy's address is not logged: it may carry credentials.
            tracing::info!(
                "upstream calls go through the egress proxy named by HTTPS_PROXY / HTTP_PROXY / ALL_PROXY (NO_PROXY applies)"
            );
        }
        Ok(Self {
            listener,
            local_addr,
            usage: UsageSink::new(config.usage_queue),
            spool,
            store: Arc::new(
                SnapshotStore::default()
                    .with_upstream_pools(serving_threads)
                    .with_upstream_tls(upstream_tls)
                    .with_author(sluice_domain::cooldown::author(
                        &identity.node_id,
                        &identity.incarnation,
                    ))
                    .with_node_id(identity.node_id.clone())
                    .with_clock(
                        config
                            .wall_clock_offset
                            .map(Clock::with_wall_offset)
                            .unwrap_or_default(),
                    ),
            ),
            token,
            ca_pem,
            identity,
            config,
            serving_threads,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The snapshot store (tests watch it for versions).
    pub fn store(&self) -> Arc<SnapshotStore> {
        Arc::clone(&self.store)
    }

    /// The usage queue (tests read its counters).
    pub fn usage(&self) -> UsageSink {
        self.usage.clone()
    }

    pub fn identity(&self) -> &NodeIdentity {
        &self.identity
    }

    /// Serves until `shutdown` completes, then stops accepting, lets in-flight requests and
    /// streams finish (up to the drain timeout), and flushes usage (up to its timeout).
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), RunError> {
        let Self {
            listener,
            config,
            token,
            ca_pem,
            store,
            usage,
            spool,
            identity,
            serving_threads: threads,
            ..
        } = self;
        let client =
            control::connect_with_ca(&config.control_plane, token.as_deref(), ca_pem.as_deref())?;
        let usage_client =
            control::usage_client(&config.control_plane, token.as_deref(), ca_pem.as_deref())?;

        let allowances = Allowances::new(
            config.allowances(),
            usage.clone(),
            identity.incarnation.clone(),
        );
        let stop_snapshots = CancellationToken::new();
        // Cancelled once the listener closes: no request is admitted from then on.
        let draining = CancellationToken::new();
        // On a thread of its own: decoding and preparing a snapshot of 100,000 keys takes a
        // while, and this thread accepts every connection.
        let subscriber = on_a_thread_of_its_own(
            "sluice-snapshots",
            subscribe::run(
                client.clone(),
                identity.clone(),
                Backoff::default(),
                Applier(Arc::clone(&store), Arc::clone(&allowances)),
                draining.clone(),
                stop_snapshots.clone(),
            ),
        )
        .map_err(RunError::Serve)?;
        let stop_usage = CancellationToken::new();
        let stop_resending = CancellationToken::new();
        if let Some(spool) = &spool {
            spool.start_syncing(usage.clone());
            for replay in spool.take_replays() {
                let resend =
                    Arc::clone(spool).resend(replay, usage_client.clone(), identity.clone());
                let stop = stop_resending.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        () = resend => {}
                        () = stop.cancelled() => {}
                    }
                });
            }
        }
        let cooldowns = Arc::clone(store.cooldowns());
        let clock = store.clock();
        let served = Arc::clone(&store);
        let reporter = tokio::spawn(
            UsageReporter::new(usage.clone(), usage_client, identity)
                .resend_events_with(Box::new(move || {
                    cooldowns.unacknowledged_events(clock.now().instant)
                }))
                .database_with(Box::new(move || {
                    served
                        .load()
                        .map(|snapshot| snapshot.database_id.clone())
                        .unwrap_or_default()
                }))
                .run(stop_usage.clone()),
        );

        let tasks = TaskTracker::new();
        let metrics = Arc::<Metrics>::default();
        let (done, mut finished) = mpsc::unbounded_channel();
        let body_memory = Arc::new(Semaphore::new(
            config.max_buffered_body_bytes.min(Semaphore::MAX_PERMITS),
        ));
        let answer_memory =
            AnswerMemory::new(config.max_buffered_answer_bytes, config.answers_per_key());
        // A pool of their own, one key's share: backends' answers filling the replica's memory
        // still get their 503 `server_busy` made and held.
        let own_answers = AnswerMemory::new(config.answers_per_key(), config.answers_per_key());
        let mut shards = Vec::with_capacity(threads);
        let mut stoppings = Vec::with_capacity(threads);
        for pool in 0..threads {
            let stopping = Arc::new(Stopping::default());
            stoppings.push(Arc::clone(&stopping));
            let (deal, dealt) = mpsc::channel(DEALT_QUEUE);
            let app = Arc::new(AppState {
                store: Arc::clone(&store),
                usage: usage.clone(),
                spool: spool.clone(),
                spool_lane: spool.as_ref().and_then(|spool| spool.lane(pool)),
                limits: Limits {
                    max_body_bytes: config.max_body_bytes,
                    max_buffered_body_bytes: config
                        .max_buffered_body_bytes
                        .min(Semaphore::MAX_PERMITS),
                    max_response_bytes: config.max_response_bytes,
                    body_read_timeout: config.body_read_timeout,
                    stream_keepalive: config.stream_keepalive(),
                },
                tasks: tasks.clone(),
                metrics: Arc::clone(&metrics),
                body_memory: Arc::clone(&body_memory),
                answer_memory: Arc::clone(&answer_memory),
                pool,
                allowances: Arc::clone(&allowances),
                sleeps: proxy::KeptSleeps::default(),
                stopping: Arc::clone(&stopping),
                refuse_stream_options: Default::default(),
            });
            let shard = Shard {
                connections: Dealt { dealt },
                app,
                http: Http::new(
                    config.header_read_timeout,
                    config.idle_timeout,
                    config.write_timeout,
                    metrics.write_timeouts(),
                ),
                write_timeout: config.write_timeout,
                own_answers: Arc::clone(&own_answers),
                stopping: Arc::clone(&stopping),
                drain_timeout: config.drain_timeout,
            };
            if let Err(e) = shard.spawn(pool, done.clone()) {
                draining.cancel();
                return Err(RunError::Serve(e));
            }
            shards.push(ShardInbox {
                deal,
                open: metrics.client_connections(pool),
            });
        }
        drop(done);
        let listener = Acceptor::new(
            listener,
            config.max_connections,
            metrics.connections_refused(),
        );
        let acceptor = tokio::spawn(deal_connections(listener, shards, draining.clone()));
        let (signalled, mut served) = tokio::select! {
            // A serving thread only stops on its own when it failed.
            result = finished.recv() => (false, result.unwrap_or(Ok(()))),
            () = shutdown => (true, Ok(())),
        };
        for stopping in &stoppings {
            stopping.start_lame_duck();
        }
        if signalled && !config.drain_delay.is_zero() {
            tracing::info!(
                drain_delay = ?config.drain_delay,
                "shutting down: still serving, /readyz answers 503 and HTTP/1 answers close their connections"
            );
            tokio::select! {
                result = finished.recv() => served = result.unwrap_or(Ok(())),
                () = tokio::time::sleep(config.drain_delay) => {}
            }
        }
        if served.is_ok() {
            tracing::info!(drain_timeout = ?config.drain_timeout, "shutting down: draining in-flight requests");
        }
        draining.cancel();
        let _ = acceptor.await;
        while let Some(result) = finished.recv().await {
            if served.is_ok() {
                served = result;
            }
        }
        // The serving threads have dropped whatever connections were left; their relays
        // recorded the cancellation.
        tasks.close();
        if tokio::time::timeout(RELAY_WAIT, tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("stream relays did not finish in time");
        }
        stop_snapshots.cancel();
        // Bounded: a control plane that stopped reading the stream (its writes blocked on a
        // full window) must not hold up the usage flush.
        if tokio::time::timeout(SUBSCRIBER_WAIT, subscriber)
            .await
            .is_err()
        {
            tracing::warn!("the snapshot stream did not close in time");
        }
        stop_usage.cancel();
        match tokio::time::timeout(config.usage_flush_timeout, reporter).await {
            Ok(_) => tracing::info!(acked = usage.acked(), "usage flushed"),
            Err(_) if spool.is_some() => tracing::warn!(
                unsent = usage.pending(),
                "usage flush timed out: the unacked records stay in the spool for the next start"
            ),
            Err(_) => tracing::warn!(
                unsent = usage.pending(),
                "usage flush timed out: unacked records are lost"
            ),
        }
        stop_resending.cancel();
        if let Some(spool) = &spool {
            spool.close(usage.pending() == 0);
        }
        served.map_err(RunError::Serve)
    }
}

/// Runs `task` on a new thread with a single-threaded runtime of its own; the returned future
/// completes once it did (or the thread failed).
fn on_a_thread_of_its_own(
    name: &str,
    task: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<impl Future<Output = ()>> {
    let (done, finished) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime.block_on(task),
                Err(e) => tracing::error!(error = %e, "cannot start a runtime"),
            }
            drop(done);
        })?;
    Ok(async move {
        let _ = finished.await;
    })
}

/// Connections accepted but not yet taken by their serving thread, per thread.
const DEALT_QUEUE: usize = 1024;

/// Accepts connections (up to the connection limit) and deals each to the serving thread
/// holding the fewest (the next one in turn among equals) until `draining`; then deals those
/// already in the kernel's accept queue, and the listener closes (see [`Acceptor::close`]).
async fn deal_connections(
    listener: Acceptor,
    shards: Vec<ShardInbox>,
    draining: CancellationToken,
) {
    let mut next = 0;
    loop {
        let (tcp, _peer, slot) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = draining.cancelled() => break,
        };
        // A tokio stream belongs to the runtime that registered it: hand the socket over
        // and let the serving thread register it with its own.
        let tcp = match tcp.into_std() {
            Ok(tcp) => tcp,
            Err(e) => {
                tracing::debug!(error = %e, "dropped an accepted connection");
                continue;
            }
        };
        if !deal(&shards, &mut next, tcp, slot).await {
            return;
        }
    }
    for (tcp, _peer, slot) in listener.close() {
        if let Err(e) = tcp.set_nonblocking(true) {
            tracing::debug!(error = %e, "dropped an accepted connection");
            continue;
        }
        if !deal(&shards, &mut next, tcp, slot).await {
            return;
        }
    }
}

/// Hands `tcp` to the serving thread holding the fewest connections, from `next` on; `false`
/// when that thread stopped (it failed: `serve` is shutting down).
async fn deal(
    shards: &[ShardInbox],
    next: &mut usize,
    tcp: std::net::TcpStream,
    slot: Slot,
) -> bool {
    // Without TCP_NODELAY the first SSE event waits behind the response head for the
    // client's delayed ACK (up to 40 ms on Linux): the TTFT tail the benchmark showed.
    if let Err(err) = tcp.set_nodelay(true) {
        tracing::debug!(error = %err, "TCP_NODELAY not set");
    }
    let Some(shard) = least_loaded(shards, *next) else {
        return false;
    };
    *next = next.wrapping_add(1);
    let open = Held::new(shard.open.clone());
    shard.deal.send((tcp, open, slot)).await.is_ok()
}

/// The shard with the fewest open connections, looking from `start` (mod the count) on.
fn least_loaded(shards: &[ShardInbox], start: usize) -> Option<&ShardInbox> {
    let n = shards.len();
    (0..n)
        .filter_map(|i| shards.get((start + i) % n))
        .min_by_key(|shard| shard.open.get())
}

/// What the acceptor hands a serving thread.
type DealtConnection = (std::net::TcpStream, Held, Slot);

/// The acceptor's side of one serving thread.
struct ShardInbox {
    deal: mpsc::Sender<DealtConnection>,
    /// `sluice_client_connections{thread}`: also what dealing balances.
    open: Gauge,
}

/// A client connection that counts itself open while it lives, and fails once the deadline
/// of a stream it carries passed (see [`crate::deadline`]).
struct Counted {
    tcp: TcpStream,
    deadline: ConnectionDeadline,
    timer: Option<Alarm>,
    /// Counts it in `sluice_client_connections{thread}` until it closes.
    _open: Held,
    /// Counts it against `--max-connections` until it closes.
    _slot: Slot,
}

impl Counted {
    /// `Ready(Err)` once a stream's deadline passed on this connection, else `Ready(Ok)`.
    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.deadline.poll_expired(&mut self.timer, cx) {
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "a stream's request deadline passed",
            )));
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        ready!(self.poll_deadline(cx))?;
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        ready!(self.poll_deadline(cx))?;
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        ready!(self.poll_deadline(cx))?;
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        ready!(self.poll_deadline(cx))?;
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// The connections dealt to one serving thread.
struct Dealt {
    dealt: mpsc::Receiver<DealtConnection>,
}

impl Dealt {
    /// The next connection, registered with this thread's runtime; `None` once the acceptor
    /// stopped.
    async fn next(&mut self) -> Option<Counted> {
        loop {
            let (tcp, open, slot) = self.dealt.recv().await?;
            match TcpStream::from_std(tcp) {
                Ok(tcp) => {
                    return Some(Counted {
                        tcp,
                        deadline: ConnectionDeadline::default(),
                        timer: None,
                        _open: open,
                        _slot: slot,
                    });
                }
                Err(e) => tracing::debug!(error = %e, "dropped an accepted connection"),
            }
        }
    }
}

/// One serving thread: a single-threaded runtime serving the connections dealt to it.
struct Shard {
    connections: Dealt,
    app: Arc<AppState>,
    http: Http,
    /// A whole answer's allowance on an h2 connection once its head is sent (see
    /// [`hold_deadline`]).
    write_timeout: Duration,
    /// The memory the answers the replica makes itself on h2 may hold ([`OWN_ANSWERS`]).
    own_answers: Arc<AnswerMemory>,
    /// What this thread's requests see of the stop; also [`AppState::stopping`].
    stopping: Arc<Stopping>,
    drain_timeout: Duration,
}

impl Shard {
    /// Starts the thread; it reports on `done` when it stopped, after its runtime (and with it
    /// every connection it still held) is gone.
    fn spawn(
        self,
        index: usize,
        done: mpsc::UnboundedSender<std::io::Result<()>>,
    ) -> std::io::Result<()> {
        std::thread::Builder::new()
            .name(format!("sluice-http-{index}"))
            .spawn(move || {
                // A panic here (not in a request: tokio contains those to their connection)
                // must still reach `serve`, which then stops the process.
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map(|runtime| {
                            runtime.block_on(self.serve());
                            // Drops the connections left; does not wait long for a DNS
                            // lookup still running on the blocking pool.
                            runtime.shutdown_timeout(Duration::from_secs(1));
                        })
                }))
                .unwrap_or_else(|_| Err(std::io::Error::other("a serving thread panicked")));
                let _ = done.send(result);
            })
            .map(drop)
    }

    /// Serves the connections dealt to it until the acceptor stops (draining has started:
    /// those it dealt last are served too), then lets in-flight requests and streams finish
    /// for up to the drain timeout. Streams still running shortly before it runs out end
    /// with an error event ([`Stopping::end_streams`]).
    async fn serve(self) {
        let Self {
            mut connections,
            app,
            http,
            write_timeout,
            own_answers,
            stopping,
            drain_timeout,
        } = self;
        let store = Arc::clone(&app.store);
        let (memory, metrics) = (own_answers, Arc::clone(&app.metrics));
        let routes = proxy::Routes::new(app);
        let graceful = Graceful::new();
        while let Some(connection) = connections.next().await {
            let routes = routes.clone();
            let store = Arc::clone(&store);
            let stopping = Arc::clone(&stopping);
            let deadline = connection.deadline.clone();
            let (memory, metrics) = (Arc::clone(&memory), Arc::clone(&metrics));
            let service = hyper::service::service_fn(move |request: http::Request<_>| {
                let arrived = tokio::time::Instant::now();
                let h2 = request.version() == http::Version::HTTP_2;
                let response = routes.answer(request);
                let store = Arc::clone(&store);
                let stopping = Arc::clone(&stopping);
                let deadline = deadline.clone();
                // Only an h2 answer may be counted here: nothing more to clone on HTTP/1.
                let own = h2.then(|| (Arc::clone(&memory), Arc::clone(&metrics)));
                async move {
                    let mut response = response.await;
                    if !h2 && stopping.lame_duck() {
                        // The client retires the connection itself, after this answer.
                        response
                            .headers_mut()
                            .insert(http::header::CONNECTION, CLOSE.clone());
                    }
                    let counted = match own {
                        Some((memory, metrics))
                            if response.extensions().get::<CountedAnswer>().is_none() =>
                        {
                            let Some(permit) = own_answer_memory(&memory, &response) else {
                                metrics.h2_answer_reset();
                                return Err(OwnAnswersFull);
                            };
                            Some(permit)
                        }
                        _ => None,
                    };
                    Ok(hold_deadline(
                        response,
                        arrived,
                        write_timeout,
                        h2,
                        &store,
                        &deadline,
                        counted,
                    ))
                }
            });
            tokio::spawn(http.serve(connection, service, &graceful));
        }
        let mut closed = std::pin::pin!(graceful.shutdown());
        let last = STREAMS_END_BEFORE.min(drain_timeout / 2);
        if tokio::time::timeout(drain_timeout - last, closed.as_mut())
            .await
            .is_ok()
        {
            return;
        }
        stopping.end_streams();
        if tokio::time::timeout(last, closed).await.is_err() {
            tracing::warn!("drain timeout passed: closing the remaining connections");
            stopping.cut_the_rest();
        }
    }
}

/// An answer the replica made itself on HTTP/2 found such answers holding their share of the
/// answers' memory: its stream is reset (hyper sends `RST_STREAM`) instead of holding one more.
#[derive(Debug, thiserror::Error)]
#[error("the replica's own answers on HTTP/2 hold their share of --max-buffered-answer-bytes")]
struct OwnAnswersFull;

/// The memory an answer the replica made itself on HTTP/2 holds until its client has taken
/// it (see [`OWN_ANSWERS`]); `None` when such answers hold their share.
fn own_answer_memory(
    memory: &Arc<AnswerMemory>,
    response: &axum::response::Response,
) -> Option<AnswerPermit> {
    let body = http_body::Body::size_hint(response.body()).lower();
    let bytes = usize::try_from(body)
        .unwrap_or(usize::MAX)
        .saturating_add(H2_STREAM_BYTES);
    memory.take(OWN_ANSWERS, bytes).ok()
}

/// `Connection: close`, on HTTP/1 answers once the replica is stopping.
static CLOSE: http::HeaderValue = http::HeaderValue::from_static("close");

/// How long before the drain timeout runs out the streams still relayed end with an error
/// event (at most half the drain timeout): time for the event to reach their clients.
const STREAMS_END_BEFORE: Duration = Duration::from_secs(1);

/// A whole answer larger than this holds a deadline on HTTP/1 too (see [`hold_deadline`]):
/// the answers that take permits of `--max-buffered-answer-bytes`.
const LARGE_ANSWER_BYTES: u64 = proxy::forward::SMALL_ANSWER_BYTES as u64;

/// A relayed stream's response holds its end ([`deadline::RunsUntil`], by the settings its
/// request arrived under) on its connection while it is sent, and
/// so does a whole answer on HTTP/2 (`h2`): an h2 client that grants a stream no
/// flow-control window leaves its answer in hyper's buffer with no write waiting on the
/// socket, which the write timeout alone would never end (a whole answer, up to
/// `--max-response-bytes`, per stream, 200 streams a connection). So does a whole answer over
/// [`LARGE_ANSWER_BYTES`] on HTTP/1: it holds `--max-buffered-answer-bytes` until its
/// client has taken it, and a client that reads a little every minute never lets the write
/// timeout end it. A whole answer gets the later of its request's deadline and the write
/// timeout from its head, so that one ready near its deadline still has the write timeout's
/// allowance to be read. A small whole answer on HTTP/1 that is not read waits on the socket,
/// and the write timeout ends it.
fn hold_deadline(
    response: axum::response::Response,
    arrived: tokio::time::Instant,
    write_timeout: Duration,
    h2: bool,
    store: &SnapshotStore,
    deadline: &ConnectionDeadline,
    memory: Option<AnswerPermit>,
) -> http::Response<deadline::Holding<axum::body::Body>> {
    // A relayed stream, whatever its content type says: a whole answer an upstream labelled
    // `text/event-stream` (an error passed on with its own type) is held as a whole answer.
    let runs_until = response.extensions().get::<deadline::RunsUntil>().copied();
    let stream = runs_until.is_some();
    let large = !stream && http_body::Body::size_hint(response.body()).lower() > LARGE_ANSWER_BYTES;
    let held = (stream || h2 || large).then(|| {
        let answered = tokio::time::Instant::now() + write_timeout;
        let until = match runs_until {
            Some(deadline::RunsUntil(until)) => until,
            None => match store.load() {
                Some(snapshot) => (arrived + snapshot.policy.request_timeout).max(answered),
                // Before the first snapshot: only the replica's own answers, held by the write
                // timeout (no deadline held, an h2 client granting no window kept them for
                // good).
                None => answered,
            },
        };
        deadline.hold(until + deadline::GRACE)
    });
    response.map(|body| deadline::Holding::new(body, held, memory))
}

/// Binds and serves until `shutdown`.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), RunError> {
    Proxy::bind(config).await?.serve(shutdown).await
}
