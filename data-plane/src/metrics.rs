//! Prometheus metrics of the data plane, served at `GET /metrics` in the OpenMetrics text
//! format. Every label comes from a bounded set: backend names and public model names from
//! the snapshot (configuration, not client input; a model no route serves is `other`), status
//! classes, and small fixed enums. Never request ids, keys or prompt text.

use std::cell::RefCell;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::snapshot::SnapshotStore;
use crate::spool::SpoolStats;
use crate::usage::UsageSink;

/// A label value: a fixed word, or a name shared with the snapshot (a backend or public
/// model name), so that counting a request clones a pointer instead of copying a string.
/// Equal and hashed by its text.
#[derive(Debug, Clone)]
pub enum Label {
    Fixed(&'static str),
    Shared(Arc<str>),
}

impl Label {
    /// "No backend was tried", "no model was read".
    pub const NONE: Self = Self::Fixed("none");
    /// The model label of a request for a model no route serves.
    pub const OTHER_MODEL: Self = Self::Fixed(sluice_proto::limits::OTHER_MODEL);

    pub fn as_str(&self) -> &str {
        match self {
            Self::Fixed(s) => s,
            Self::Shared(s) => s,
        }
    }
}

impl From<&Arc<str>> for Label {
    fn from(name: &Arc<str>) -> Self {
        Self::Shared(Arc::clone(name))
    }
}

impl PartialEq for Label {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Label {}

impl Hash for Label {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl EncodeLabelValue for Label {
    /// Escaped as the text format wants (`\\`, `\"`, `\n`), which prometheus-client does not
    /// do: a backend or model named with a quote (`azure "eu"`) made every scrape of every
    /// replica unparsable, for as long as its series stayed.
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write as _;
        let mut rest = self.as_str();
        while let Some(at) = rest.find(['\\', '"', '\n']) {
            encoder.write_str(&rest[..at])?;
            encoder.write_str(match rest.as_bytes()[at] {
                b'\\' => "\\\\",
                b'"' => "\\\"",
                _ => "\\n",
            })?;
            rest = &rest[at + 1..];
        }
        encoder.write_str(rest)
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    backend: Label,
    model: Label,
    status_class: &'static str,
}

/// `2xx` … `5xx`, or `other`.
fn status_class(status: u16) -> &'static str {
    match status / 100 {
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        5 => "5xx",
        _ => "other",
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ThreadLabels {
    thread: usize,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    backend: Label,
}

/// How one upstream attempt ended.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum AttemptOutcome {
    ok,
    rate_limited,
    server_error,
    connect_error,
    timeout,
    invalid_response,
    /// The backend refused Sluice's credentials for it (401, 403).
    auth_error,
    /// Not the backend's: this replica could not open a connection to it (out of file
    /// descriptors).
    local_error,
    /// The backend answered 404 or 405 to a call it does not serve at all (`count_tokens`,
    /// legacy completions, embeddings): another backend was asked.
    not_served,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttemptLabels {
    backend: Label,
    outcome: AttemptOutcome,
}

/// Why a backend was cooled down.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum CooldownReason {
    /// The upstream answered 429.
    rate_limited,
    /// Consecutive 5xx, connect errors or timeouts.
    failures,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CooldownLabels {
    backend: Label,
    reason: CooldownReason,
}

/// Why a candidate backend was passed over without an attempt.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum SkipReason {
    cooling_down,
    rate_limited,
    /// Out of tokens under its TPM limit.
    token_limited,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SkipLabels {
    backend: Label,
    reason: SkipReason,
}

/// What refused a request with 429 before any upstream answered.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum LimitScope {
    /// The client key's own RPM limit.
    client_key,
    /// The client key's TPM limit.
    client_key_tokens,
    /// The client key's `max_parallel_requests`.
    client_key_parallel,
    /// Every candidate backend was cooling down or out of rate tokens.
    backends,
}

/// Why a request body was not read to the end.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum BodyRefusal {
    /// It did not arrive within --body-read-timeout (408).
    timeout,
    /// The bodies being read already held --max-buffered-body-bytes (503).
    memory,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BodyRefusalLabels {
    reason: BodyRefusal,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ScopeLabels {
    scope: LimitScope,
}

/// Why a budgeted request was refused.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum BudgetRefusal {
    /// 429 `insufficient_quota`: the budget is spent, by the control plane's answer or the
    /// snapshot.
    spent,
    /// 503 `budget_unavailable`: the pool ran out and the control plane could not be asked
    /// (`--budget-when-away refuse`).
    unavailable,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BudgetRefusalLabels {
    reason: BudgetRefusal,
}

/// Why a usage record was not written to the spool.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
enum UnwrittenReason {
    full,
    failed,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UnwrittenLabels {
    reason: UnwrittenReason,
}

/// The spool's figures as metrics; counters are brought up to the spool's own counts.
struct SpoolMetrics {
    records: Gauge,
    bytes: Gauge,
    torn: Counter,
    resent: Counter,
    flush_failures: Counter,
    unwritten: Family<UnwrittenLabels, Counter>,
    /// What the counters already hold.
    seen: Mutex<SpoolStats>,
}

impl SpoolMetrics {
    fn register(registry: &mut Registry) -> Self {
        let records = Gauge::default();
        registry.register(
            "usage_spool_records",
            "Usage records in the spool on disk that the control plane has not acked: requests \
             in flight, finished requests, and an earlier run's records being sent again \
             (what a replica lost for good with its volume would lose)",
            records.clone(),
        );
        let bytes = Gauge::default();
        registry.register_with_unit(
            "usage_spool",
            "Size of the usage spool's files on disk (bounded by --usage-spool-max-bytes)",
            Unit::Bytes,
            bytes.clone(),
        );
        let torn = Counter::default();
        registry.register(
            "usage_spool_torn_records",
            "Spool records an earlier run left torn or damaged (a write cut short by a crash), \
             dropped at start: usage lost",
            torn.clone(),
        );
        let resent = Counter::default();
        registry.register(
            "usage_spool_resent_records",
            "Usage records of an earlier run of this replica sent again from the spool and acked",
            resent.clone(),
        );
        let flush_failures = Counter::default();
        registry.register(
            "usage_spool_flush_failures",
            "Flushes of the usage spool to disk (fdatasync) that failed: the records they held \
             are reported all the same, but a machine crash may then count a request twice \
             (once more as interrupted, charged its prompt's estimate again)",
            flush_failures.clone(),
        );
        let unwritten = Family::default();
        registry.register(
            "usage_spool_unwritten_records",
            "Usage records not written to the spool because it was full or its disk failed \
             (reported all the same, but lost if the process dies before the ack)",
            unwritten.clone(),
        );
        Self {
            records,
            bytes,
            torn,
            resent,
            flush_failures,
            unwritten,
            seen: Mutex::new(SpoolStats::default()),
        }
    }

    fn set(&self, now: &SpoolStats) {
        self.records
            .set(i64::try_from(now.records).unwrap_or(i64::MAX));
        self.bytes.set(i64::try_from(now.bytes).unwrap_or(i64::MAX));
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        self.torn.inc_by(now.torn.saturating_sub(seen.torn));
        self.resent.inc_by(now.resent.saturating_sub(seen.resent));
        self.flush_failures
            .inc_by(now.flush_failures.saturating_sub(seen.flush_failures));
        for (reason, now, seen) in [
            (
                UnwrittenReason::full,
                now.unwritten_full,
                seen.unwritten_full,
            ),
            (
                UnwrittenReason::failed,
                now.unwritten_failed,
                seen.unwritten_failed,
            ),
        ] {
            self.unwritten
                .get_or_create(&UnwrittenLabels { reason })
                .inc_by(now.saturating_sub(seen));
        }
        // An older read (two scrapes at once) never lowers what was seen.
        seen.torn = seen.torn.max(now.torn);
        seen.resent = seen.resent.max(now.resent);
        seen.flush_failures = seen.flush_failures.max(now.flush_failures);
        seen.unwritten_full = seen.unwritten_full.max(now.unwritten_full);
        seen.unwritten_failed = seen.unwritten_failed.max(now.unwritten_failed);
    }
}

/// Upstream latency buckets: 1 ms to about 70 min, past the default `stream_timeout` (1 h): they
/// stopped at about 2 min, and the p95 of long streams and reasoning answers read as 131 s
/// however long they took; then at about 17 min, past the default `request_timeout`, which
/// bounded streams until `stream_timeout` let them run an hour.
#[derive(Clone, Copy)]
struct UpstreamBuckets;

impl MetricConstructor<Histogram> for UpstreamBuckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new(exponential_buckets(0.001, 2.0, 23))
    }
}

/// Every metric of one data plane.
pub struct Metrics {
    /// Tells this registry's series apart in the threads' [`SeriesCache`]s.
    id: u64,
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    upstream_latency: Family<BackendLabels, Histogram, UpstreamBuckets>,
    upstream_ttft: Family<BackendLabels, Histogram, UpstreamBuckets>,
    overhead: Histogram,
    in_flight: Gauge,
    client_connections: Family<ThreadLabels, Gauge>,
    connections_refused: Counter,
    write_timeouts: Counter,
    bodies_refused: Family<BodyRefusalLabels, Counter>,
    answers_refused: Counter,
    h2_answers_reset: Counter,
    attempts: Family<AttemptLabels, Counter>,
    failovers: Counter,
    streams_committed_early: Family<BackendLabels, Counter>,
    streams_interrupted: Family<BackendLabels, Counter>,
    cooldowns: Family<CooldownLabels, Counter>,
    skips: Family<SkipLabels, Counter>,
    rate_limited: Family<ScopeLabels, Counter>,
    budget_refusals: Family<BudgetRefusalLabels, Counter>,
    allowance_asks: Counter,
    /// Asks already added to `allowance_asks` (the allowances count them themselves).
    allowance_asks_seen: AtomicU64,
    snapshot_version: Gauge,
    snapshot_refusals: Family<RefusalLabels, Counter>,
    /// Refusals already added to `snapshot_refusals` (the store counts them itself).
    snapshot_refusals_seen: [AtomicU64; 4],
    snapshot_age: Gauge<f64, AtomicU64>,
    request_body_bytes: Gauge,
    answer_bytes: Gauge,
    control_plane_connected: Gauge,
    usage_queue: Gauge,
    usage_dropped: Counter,
    /// Drops already added to `usage_dropped` (the sink counts them itself).
    usage_dropped_seen: AtomicU64,
    usage_unsendable: Counter,
    usage_unsendable_seen: AtomicU64,
    log_dropped: Counter,
    /// Drops already added to `log_dropped`.
    log_dropped_seen: AtomicU64,
    spool: SpoolMetrics,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("sluice");
        let requests = Family::default();
        registry.register(
            "requests",
            "Requests answered, by backend (the last one tried; none if no backend was tried), \
             public model (other if no route serves it, none if unread) and status class",
            requests.clone(),
        );
        let upstream_latency = Family::new_with_constructor(UpstreamBuckets);
        registry.register_with_unit(
            "upstream_latency",
            "Per upstream attempt: request sent to the whole answer (streams: to the end of the \
             stream; failed attempts: to the failure)",
            Unit::Seconds,
            upstream_latency.clone(),
        );
        let upstream_ttft = Family::new_with_constructor(UpstreamBuckets);
        registry.register_with_unit(
            "upstream_ttft",
            "Per streamed attempt that answered: request sent to the first event from the upstream",
            Unit::Seconds,
            upstream_ttft.clone(),
        );
        // 25 µs to about 0.8 s.
        let overhead = Histogram::new(exponential_buckets(0.000_025, 2.0, 16));
        registry.register_with_unit(
            "gateway_overhead",
            "Per request that reached a backend: arrival to the response head going to the \
             client, minus the time waiting on upstream attempts (each from sending the request \
             to the whole answer, or for a stream to its first event)",
            Unit::Seconds,
            overhead.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "requests_in_flight",
            "Requests accepted and not yet finished (streams until their last event)",
            in_flight.clone(),
        );
        let client_connections = Family::default();
        registry.register(
            "client_connections",
            "Client connections open, by the serving thread that holds them",
            client_connections.clone(),
        );
        let connections_refused = Counter::default();
        registry.register(
            "connections_refused",
            "Client connections refused (503, closed) because --max-connections were open",
            connections_refused.clone(),
        );
        let write_timeouts = Counter::default();
        registry.register(
            "write_timeouts",
            "Client connections closed because the client accepted none of an answer for --write-timeout",
            write_timeouts.clone(),
        );
        let bodies_refused = Family::default();
        registry.register(
            "request_bodies_refused",
            "Request bodies not read to the end: too slow (timeout) or past the memory for bodies (memory)",
            bodies_refused.clone(),
        );
        // At 0 from the start, so that an alert on `increase(…) > 0` sees the first refusal.
        for reason in [BodyRefusal::timeout, BodyRefusal::memory] {
            let _ = bodies_refused.get_or_create(&BodyRefusalLabels { reason });
        }
        let answers_refused = Counter::default();
        registry.register(
            "answers_refused",
            "Whole answers refused (503) because the answers held in memory reached --max-buffered-answer-bytes",
            answers_refused.clone(),
        );
        let h2_answers_reset = Counter::default();
        registry.register(
            "h2_answers_reset",
            "Answers the replica made itself on HTTP/2 (errors, /metrics, lists) whose stream was reset because such answers held their share of --max-buffered-answer-bytes",
            h2_answers_reset.clone(),
        );
        let attempts = Family::default();
        registry.register(
            "upstream_attempts",
            "Upstream attempts by backend and outcome",
            attempts.clone(),
        );
        let failovers = Counter::default();
        registry.register(
            "failovers",
            "Attempts made after an earlier attempt of the same request failed",
            failovers.clone(),
        );
        let streams_committed_early = Family::default();
        registry.register(
            "streams_committed_early",
            "Streams committed to their backend before their first event (--stream-keepalive)",
            streams_committed_early.clone(),
        );
        let streams_interrupted = Family::default();
        registry.register(
            "streams_interrupted",
            "Streams their backend broke, cut, left silent or ended with an error once Sluice \
             was committed to it (after its first event, or --stream-keepalive)",
            streams_interrupted.clone(),
        );
        let cooldowns = Family::default();
        registry.register(
            "cooldown_events",
            "Backend cooldowns this replica started, by backend and reason",
            cooldowns.clone(),
        );
        let skips = Family::default();
        registry.register(
            "backend_skips",
            "Candidate backends passed over without an attempt, by backend and reason",
            skips.clone(),
        );
        let rate_limited = Family::default();
        registry.register(
            "rate_limited_requests",
            "Requests answered 429 by Sluice itself: the client key's limit, or every candidate \
             backend cooling down or out of rate tokens",
            rate_limited.clone(),
        );
        let budget_refusals = Family::default();
        registry.register(
            "budget_refusals",
            "Budgeted requests refused: spent (429 insufficient_quota) or unavailable (503, the \
             allowance ran out and the control plane could not be asked)",
            budget_refusals.clone(),
        );
        let allowance_asks = Counter::default();
        registry.register(
            "allowance_asks",
            "Asks for more of a key's budget sent to the control plane",
            allowance_asks.clone(),
        );
        let snapshot_version = Gauge::default();
        registry.register(
            "snapshot_version",
            "Version of the routing snapshot in force (0: none yet)",
            snapshot_version.clone(),
        );
        let snapshot_refusals = Family::default();
        registry.register(
            "snapshot_refusals",
            "Snapshots this replica refused, by reason: `stale` (older than the current one of \
             the same control-plane epoch), `invalid`, `too_large` (past the snapshot size limit), \
             `other_database` (built from another database than the current one's); the current \
             snapshot stays in force",
            snapshot_refusals.clone(),
        );
        let request_body_bytes = Gauge::default();
        registry.register_with_unit(
            "request_body_buffered",
            "Request bodies held in memory now (from their arrival until their request is \
             answered), of --max-buffered-body-bytes; at the limit, further bodies get 503",
            Unit::Bytes,
            request_body_bytes.clone(),
        );
        let answer_bytes = Gauge::default();
        registry.register_with_unit(
            "answer_buffered",
            "Upstream answers held in memory now (whole answers until their client has read \
             them, stream events being read), of --max-buffered-answer-bytes; at the limit, \
             further whole answers get 503 and streams reading a large event end",
            Unit::Bytes,
            answer_bytes.clone(),
        );
        let snapshot_age = Gauge::<f64, AtomicU64>::default();
        registry.register_with_unit(
            "snapshot_age",
            "Time since the snapshot in force was applied",
            Unit::Seconds,
            snapshot_age.clone(),
        );
        let control_plane_connected = Gauge::default();
        registry.register(
            "control_plane_connected",
            "1 while the snapshot stream to the control plane is open, 0 while this replica is \
             cut off from it (serving its last snapshot: no change made since reaches it)",
            control_plane_connected.clone(),
        );
        let usage_queue = Gauge::default();
        registry.register(
            "usage_queue_depth",
            "Usage records held until the control plane acks them",
            usage_queue.clone(),
        );
        let usage_dropped = Counter::default();
        registry.register(
            "usage_dropped_records",
            "Usage records dropped because the queue was full (the control plane was away too long)",
            usage_dropped.clone(),
        );
        let usage_unsendable = Counter::default();
        registry.register(
            "usage_unsendable_records",
            "Usage records dropped because they can never be delivered: larger than a usage \
             report may be, or refused by the control plane when sent on their own",
            usage_unsendable.clone(),
        );
        let log_dropped = Counter::default();
        registry.register(
            "log_dropped_lines",
            "Log lines dropped because stderr was slower than the proxy and the queue to it was full",
            log_dropped.clone(),
        );
        let spool = SpoolMetrics::register(&mut registry);
        static IDS: AtomicU64 = AtomicU64::new(1);
        Self {
            id: IDS.fetch_add(1, Ordering::Relaxed),
            registry,
            spool,
            requests,
            upstream_latency,
            upstream_ttft,
            overhead,
            in_flight,
            client_connections,
            connections_refused,
            write_timeouts,
            bodies_refused,
            answers_refused,
            h2_answers_reset,
            attempts,
            failovers,
            streams_committed_early,
            streams_interrupted,
            cooldowns,
            skips,
            rate_limited,
            snapshot_version,
            snapshot_refusals,
            snapshot_refusals_seen: Default::default(),
            budget_refusals,
            allowance_asks,
            allowance_asks_seen: AtomicU64::new(0),
            snapshot_age,
            request_body_bytes,
            answer_bytes,
            control_plane_connected,
            usage_queue,
            usage_dropped,
            usage_dropped_seen: AtomicU64::new(0),
            usage_unsendable,
            usage_unsendable_seen: AtomicU64::new(0),
            log_dropped,
            log_dropped_seen: AtomicU64::new(0),
        }
    }

    /// One answered request. `backend` is the last backend tried, `model` the public model
    /// name if a route serves it; see [`Label::NONE`] and [`Label::OTHER_MODEL`].
    pub fn request(&self, backend: &Label, model: &Label, status: u16) {
        let status_class = status_class(status);
        SeriesCache::with(self.id, |cache| {
            let key = (text_at(backend), text_at(model), status_class);
            let (_, _, counter) = cache.requests.entry(key).or_insert_with(|| {
                let labels = RequestLabels {
                    backend: backend.clone(),
                    model: model.clone(),
                    status_class,
                };
                let counter = self.requests.get_or_create(&labels).clone();
                (backend.clone(), model.clone(), counter)
            });
            counter.inc();
        });
    }

    /// One upstream attempt; `latency` unless it is a stream still running (its latency is
    /// recorded when it ends).
    pub fn attempt(&self, backend: &Label, outcome: AttemptOutcome, latency: Option<Duration>) {
        SeriesCache::with(self.id, |cache| {
            let key = (text_at(backend), outcome);
            let (_, counter) = cache.attempts.entry(key).or_insert_with(|| {
                let labels = AttemptLabels {
                    backend: backend.clone(),
                    outcome,
                };
                (
                    backend.clone(),
                    self.attempts.get_or_create(&labels).clone(),
                )
            });
            counter.inc();
        });
        if let Some(took) = latency {
            self.upstream_latency(backend, took);
        }
    }

    pub fn upstream_latency(&self, backend: &Label, took: Duration) {
        SeriesCache::with(self.id, |cache| {
            let (_, histogram) = cache.latency.entry(text_at(backend)).or_insert_with(|| {
                let labels = BackendLabels {
                    backend: backend.clone(),
                };
                let histogram = self.upstream_latency.get_or_create(&labels).clone();
                (backend.clone(), histogram)
            });
            histogram.observe(took.as_secs_f64());
        });
    }

    pub fn upstream_ttft(&self, backend: &Label, took: Duration) {
        self.upstream_ttft
            .get_or_create(&BackendLabels {
                backend: backend.clone(),
            })
            .observe(took.as_secs_f64());
    }

    pub fn overhead(&self, took: Duration) {
        self.overhead.observe(took.as_secs_f64());
    }

    pub fn failover(&self) {
        self.failovers.inc();
    }

    /// A stream committed to `backend` before its first event: from then on it is not failed
    /// over ([`crate::proxy`]'s `--stream-keepalive`).
    /// A stream its backend broke after its first event: the attempt was counted `ok` then,
    /// and only this says the backend failed it.
    pub fn stream_interrupted(&self, backend: &Label) {
        self.streams_interrupted
            .get_or_create(&BackendLabels {
                backend: backend.clone(),
            })
            .inc();
    }

    pub fn stream_committed_early(&self, backend: &Label) {
        self.streams_committed_early
            .get_or_create(&BackendLabels {
                backend: backend.clone(),
            })
            .inc();
    }

    pub fn cooldown(&self, backend: &Label, reason: CooldownReason) {
        self.cooldowns
            .get_or_create(&CooldownLabels {
                backend: backend.clone(),
                reason,
            })
            .inc();
    }

    pub fn skip(&self, backend: &Label, reason: SkipReason) {
        self.skips
            .get_or_create(&SkipLabels {
                backend: backend.clone(),
                reason,
            })
            .inc();
    }

    pub fn rate_limited(&self, scope: LimitScope) {
        self.rate_limited
            .get_or_create(&ScopeLabels { scope })
            .inc();
    }

    pub fn budget_refused(&self, reason: BudgetRefusal) {
        self.budget_refusals
            .get_or_create(&BudgetRefusalLabels { reason })
            .inc();
    }

    /// Counts a request in flight until the guard drops.
    pub fn in_flight(&self) -> Held {
        Held::new(self.in_flight.clone())
    }

    /// Counts a request body not read to the end for `reason`.
    pub fn body_refused(&self, reason: BodyRefusal) {
        self.bodies_refused
            .get_or_create(&BodyRefusalLabels { reason })
            .inc();
    }

    /// Counts a whole answer refused for the memory of answers.
    pub fn answer_refused(&self) {
        self.answers_refused.inc();
    }

    /// Counts an answer of the replica's own on HTTP/2 reset for the memory of answers.
    pub fn h2_answer_reset(&self) {
        self.h2_answers_reset.inc();
    }

    /// `sluice_connections_refused_total`, for the acceptor to count its refusals in.
    pub fn connections_refused(&self) -> Counter {
        self.connections_refused.clone()
    }

    /// `sluice_write_timeouts_total`, for the listener to count the connections its write
    /// timeout closed in.
    pub fn write_timeouts(&self) -> Counter {
        self.write_timeouts.clone()
    }

    /// The bytes of request bodies held in memory now (read at each scrape).
    pub fn request_bodies_buffered(&self, bytes: usize) {
        self.request_body_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// The bytes the replica's answers hold now.
    pub fn answers_buffered(&self, bytes: usize) {
        self.answer_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// The gauge of client connections open on serving thread `thread`.
    pub fn client_connections(&self, thread: usize) -> Gauge {
        self.client_connections
            .get_or_create(&ThreadLabels { thread })
            .clone()
    }

    /// The exposition text, with the gauges read now; `spool` when there is one;
    /// `allowance_asks` the asks sent so far.
    pub fn render(
        &self,
        store: &SnapshotStore,
        usage: &UsageSink,
        spool: Option<SpoolStats>,
        allowance_asks: u64,
    ) -> String {
        match store.load() {
            Some(snapshot) => {
                self.snapshot_version
                    .set(i64::try_from(snapshot.version).unwrap_or(i64::MAX));
                self.snapshot_age
                    .set(snapshot.applied_at.elapsed().as_secs_f64());
            }
            None => {
                self.snapshot_version.set(0);
                self.snapshot_age.set(0.0);
            }
        }
        self.control_plane_connected
            .set(i64::from(store.connected()));
        for ((why, total), seen) in store.refusals().zip(&self.snapshot_refusals_seen) {
            let counter = self.snapshot_refusals.get_or_create(&RefusalLabels {
                reason: why.as_str(),
            });
            catch_up(&counter, seen, total);
        }
        self.usage_queue
            .set(i64::try_from(usage.pending()).unwrap_or(i64::MAX));
        catch_up(
            &self.usage_dropped,
            &self.usage_dropped_seen,
            usage.dropped(),
        );
        catch_up(
            &self.usage_unsendable,
            &self.usage_unsendable_seen,
            usage.unsendable(),
        );
        catch_up(
            &self.allowance_asks,
            &self.allowance_asks_seen,
            allowance_asks,
        );
        catch_up(
            &self.log_dropped,
            &self.log_dropped_seen,
            crate::logging::dropped_lines(),
        );
        self.spool.set(&spool.unwrap_or_default());
        let mut out = String::with_capacity(8192);
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// One unit of a gauge (a request in flight, an open connection), given back when dropped.
#[derive(Debug)]
pub struct Held(Gauge);

impl Held {
    pub fn new(gauge: Gauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Where a label's text is: while a [`SeriesCache`] keeps a clone of the label, no other
/// text can be at that address, so the address stands for the text (hashing one word
/// instead of the string).
fn text_at(label: &Label) -> usize {
    label.as_str().as_ptr() as usize
}

/// The series of the busiest families one serving thread has counted, by the address of
/// their labels' text: counting a request hashes a few words with foldhash and takes no
/// lock, where the family's own lookup takes a read lock every thread shares (its word
/// bouncing between cores) and hashes the label texts with SipHash. Each entry keeps clones
/// of its labels (so their addresses are not reused) and of the series (the family's own).
/// The same text at two addresses (two snapshots' copies of a name) is two entries for one
/// series.
#[derive(Default)]
struct SeriesCache {
    /// The [`Metrics`] the series are of (tests make several in one thread).
    owner: u64,
    requests: foldhash::HashMap<(usize, usize, &'static str), (Label, Label, Counter)>,
    attempts: foldhash::HashMap<(usize, AttemptOutcome), (Label, Counter)>,
    latency: foldhash::HashMap<usize, (Label, Histogram)>,
}

/// Entries a thread keeps at most (each snapshot brings new copies of the names); past it,
/// the cache starts over.
const CACHED_SERIES: usize = 4_096;

thread_local! {
    static SERIES: RefCell<SeriesCache> = RefCell::default();
}

impl SeriesCache {
    fn with(owner: u64, f: impl FnOnce(&mut SeriesCache)) {
        SERIES.with_borrow_mut(|cache| {
            let entries = cache.requests.len() + cache.attempts.len() + cache.latency.len();
            if cache.owner != owner || entries >= CACHED_SERIES {
                *cache = SeriesCache {
                    owner,
                    ..SeriesCache::default()
                };
            }
            f(cache);
        });
    }
}

/// Brings `counter` up to `total`, a count kept elsewhere; `seen` is what it already holds.
/// Two scrapes at once may come with their totals in either order: the older never lowers
/// `seen` (a swap did, and the next scrape counted the difference a second time).
fn catch_up(counter: &Counter, seen: &AtomicU64, total: u64) {
    let before = seen.fetch_max(total, Ordering::Relaxed);
    counter.inc_by(total.saturating_sub(before));
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// Two scrapes at once bring their totals in either order: an older total after a newer
    /// one counts nothing, and the next counts only what is new (it counted the difference
    /// twice).
    #[test]
    fn totals_caught_up_out_of_order_are_counted_once() {
        let (counter, seen) = (Counter::default(), AtomicU64::new(0));
        for total in [5, 12, 10, 12, 13] {
            catch_up(&counter, &seen, total);
        }
        assert_eq!(counter.get(), 13);
        let spool = SpoolMetrics::register(&mut Registry::default());
        for full in [12, 10, 12] {
            spool.set(&SpoolStats {
                unwritten_full: full,
                ..Default::default()
            });
        }
        let unwritten = spool
            .unwritten
            .get_or_create(&UnwrittenLabels {
                reason: UnwrittenReason::full,
            })
            .get();
        assert_eq!(unwritten, 12);
    }

    /// A backend or model named with a quote or a backslash is written escaped, so that a
    /// scrape still parses.
    #[test]
    fn label_values_are_escaped_as_the_text_format_wants() {
        let metrics = Metrics::default();
        let backend = Label::from(&Arc::<str>::from(r#"azure "eu" \ west"#));
        let model = Label::from(&Arc::<str>::from("m\nx"));
        metrics.request(&backend, &model, 200);
        let text = metrics.render(&SnapshotStore::default(), &UsageSink::new(1), None, 0);
        let line = r#"sluice_requests_total{backend="azure \"eu\" \\ west",model="m\nx",status_class="2xx"} 1"#;
        assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
    }

    /// The per-thread cache of series must count exactly what the families would: per
    /// registry, by label text (not by which copy of the text), and past its bound.
    #[test]
    fn the_threads_series_cache_counts_by_text_and_by_registry() {
        let (one, two) = (Metrics::default(), Metrics::default());
        let model = Label::from(&Arc::<str>::from("m"));
        for i in 0..(CACHED_SERIES + 10) {
            // A new copy of the same name each time, as each snapshot brings.
            let backend = Label::from(&Arc::<str>::from("b"));
            one.request(&backend, &model, 200);
            one.attempt(&backend, AttemptOutcome::ok, Some(Duration::from_millis(1)));
            if i % 2 == 0 {
                two.request(&backend, &model, 200);
            }
        }
        let usage = UsageSink::new(1);
        let count = |m: &Metrics, line: &str| {
            let text = m.render(&SnapshotStore::default(), &usage, None, 0);
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        };
        let n = CACHED_SERIES + 10;
        count(
            &one,
            &format!(r#"sluice_requests_total{{backend="b",model="m",status_class="2xx"}} {n}"#),
        );
        count(
            &one,
            &format!(r#"sluice_upstream_attempts_total{{backend="b",outcome="ok"}} {n}"#),
        );
        count(
            &one,
            &format!(r#"sluice_upstream_latency_seconds_count{{backend="b"}} {n}"#),
        );
        count(
            &two,
            &format!(
                r#"sluice_requests_total{{backend="b",model="m",status_class="2xx"}} {}"#,
                n.div_ceil(2)
            ),
        );
    }

    #[test]
    fn renders_every_family_with_bounded_labels() {
        let metrics = Metrics::default();
        let b1 = Label::from(&Arc::<str>::from("b1"));
        let model = Label::from(&Arc::<str>::from("gpt-4o-mini"));
        metrics.request(&b1, &model, 200);
        // The same text from another snapshot's `Arc` is the same series.
        metrics.request(&Label::Shared("b1".into()), &model, 201);
        metrics.request(&Label::NONE, &Label::NONE, 401);
        metrics.attempt(
            &b1,
            AttemptOutcome::rate_limited,
            Some(Duration::from_millis(3)),
        );
        metrics.upstream_ttft(&b1, Duration::from_millis(2));
        metrics.cooldown(&b1, CooldownReason::rate_limited);
        metrics.rate_limited(LimitScope::client_key);
        metrics.budget_refused(BudgetRefusal::spent);
        metrics.overhead(Duration::from_micros(80));
        let guard = metrics.in_flight();
        let usage = UsageSink::new(10);
        let spool = SpoolStats {
            records: 3,
            bytes: 4096,
            torn: 1,
            resent: 7,
            unwritten_full: 2,
            unwritten_failed: 0,
            flush_failures: 4,
        };
        let text = metrics.render(&SnapshotStore::default(), &usage, Some(spool), 3);
        for line in [
            r#"sluice_requests_total{backend="b1",model="gpt-4o-mini",status_class="2xx"} 2"#,
            r#"sluice_requests_total{backend="none",model="none",status_class="4xx"} 1"#,
            r#"sluice_upstream_attempts_total{backend="b1",outcome="rate_limited"} 1"#,
            r#"sluice_upstream_latency_seconds_count{backend="b1"} 1"#,
            r#"sluice_upstream_ttft_seconds_count{backend="b1"} 1"#,
            r#"sluice_cooldown_events_total{backend="b1",reason="rate_limited"} 1"#,
            r#"sluice_rate_limited_requests_total{scope="client_key"} 1"#,
            r#"sluice_budget_refusals_total{reason="spent"} 1"#,
            "sluice_allowance_asks_total 3",
            "sluice_gateway_overhead_seconds_count 1",
            "sluice_requests_in_flight 1",
            "sluice_snapshot_version 0",
            "sluice_usage_queue_depth 0",
            "sluice_usage_dropped_records_total 0",
            "sluice_usage_unsendable_records_total 0",
            "sluice_snapshot_refusals_total{reason=\"too_large\"} 0",
            "sluice_usage_spool_records 3",
            "sluice_usage_spool_bytes 4096",
            "sluice_usage_spool_torn_records_total 1",
            "sluice_usage_spool_resent_records_total 7",
            "sluice_usage_spool_flush_failures_total 4",
            r#"sluice_usage_spool_unwritten_records_total{reason="full"} 2"#,
            r#"sluice_usage_spool_unwritten_records_total{reason="failed"} 0"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
        drop(guard);
        let later = SpoolStats {
            torn: 1,
            unwritten_full: 5,
            ..spool
        };
        let text = metrics.render(&SnapshotStore::default(), &usage, Some(later), 5);
        assert!(text.lines().any(|l| l == "sluice_requests_in_flight 0"));
        assert!(text.lines().any(|l| l == "sluice_allowance_asks_total 5"));
        assert!(
            text.lines()
                .any(|l| l == "sluice_usage_spool_torn_records_total 1")
        );
        assert!(
            text.lines()
                .any(|l| l == r#"sluice_usage_spool_unwritten_records_total{reason="full"} 5"#)
        );
    }
}
