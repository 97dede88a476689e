//! One request's usage record and log line, built up as the request proceeds and emitted
//! exactly once: by `finish`, or by `Drop` when the client went away first (the handler
//! future or the streamed response body was dropped), as `CLIENT_CANCELLED`. With a spool,
//! the record is written to disk before each upstream attempt (its start) and when emitted
//! (its finish), so that a crash in between still leaves a record of the attempt.

use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use sluice_proto::limits::OTHER_MODEL;
use sluice_proto::v1::{ErrorKind, UsageRecord};
use tokio::time::Instant;

use std::sync::Arc;

use super::request_log::RequestLine;
use crate::allowance::Reservation as BudgetReservation;
use crate::calls::{CallPrices, Counted, Given};
use crate::clock::{proto_duration, timestamp};
use crate::error::ProxyError;
use crate::metrics::{Held, Label, Metrics};
use crate::ratelimit::{InFlight, Reservation};
use crate::snapshot::{Backend, Endpoint, Route};
use crate::spool::{Lane, Refused, Unwritten, Written};
use crate::tiers::{Reported, Tiers};
use crate::usage::{RecordStrings, UsageSink, spare_strings};
use sluice_domain::price::{Billed, Prices};

pub use crate::error::CLIENT_CLOSED_REQUEST;

pub use crate::usage::Tokens;

/// The answer's headers [`Accounting::decorate`] sets, named once rather than parsed from
/// text at each request.
const X_SLUICE_BACKEND: HeaderName = HeaderName::from_static("x-sluice-backend");
const X_SLUICE_ATTEMPTS: HeaderName = HeaderName::from_static("x-sluice-attempts");

/// `x-sluice-attempts` for the counts almost every request ends with, as static text: a
/// value formatted from the number would be a new allocation at each request.
const FEW_ATTEMPTS: [HeaderValue; 4] = [
    HeaderValue::from_static("0"),
    HeaderValue::from_static("1"),
    HeaderValue::from_static("2"),
    HeaderValue::from_static("3"),
];

/// Boxed: the request's futures carry it by value through several layers (serving,
/// forwarding, relaying, answering an error), and each layer's state held its own copy of
/// every field; a pointer keeps those futures, and each move of the request, small.
pub struct Accounting(Box<Ledger>);

struct Ledger {
    sink: UsageSink,
    /// This serving thread's writer into the spool, if there is one.
    spool: Option<Arc<Lane>>,
    /// The request's number in the spool once its start is on disk.
    spooled: Option<u64>,
    metrics: Arc<Metrics>,
    record: UsageRecord,
    /// The backend attempted counts a thinking model's thoughts in `total_tokens` alone
    /// ([`Backend::thoughts_in_total`]).
    thoughts_in_total: bool,
    /// The endpoint the client called: its API shapes the errors it gets.
    endpoint: Endpoint,
    started: Instant,
    first_byte: Option<Duration>,
    backend_name: Option<Arc<str>>,
    /// The prices of the route last attempted, which the record's cost is computed by.
    prices: Prices,
    /// That route's price tiers, and which of them its answer reported.
    tiers: Tiers,
    tiers_reported: Reported,
    /// The tier the request asked for (`service_tier`), taken as the answer's when its answer
    /// names none: a compaction's (`response.compaction` carries no `service_tier`).
    asked_tier: Option<Box<str>>,
    /// That route's priced tools, how many calls of each its answer reported, which of those
    /// counts its final figures gave (the calls billed), and how many its stream's events
    /// showed (what a stream left before its last usage had made).
    call_prices: CallPrices,
    calls: Counted,
    calls_given: Given,
    calls_seen: Counted,
    /// Whether `decorate` names the backend.
    expose_backend: bool,
    /// The request came on HTTP/2, whose connections carry many at once: its whole answer
    /// counts against the answers' memory whatever its size (see `forward::SMALL_ANSWER_BYTES`).
    multiplexed: bool,
    /// The requested model's name as the snapshot holds it, if a route serves it (only then
    /// may it be a metric label).
    model_label: Option<Arc<str>>,
    /// Time spent waiting on upstream attempts so far.
    upstream_wait: Duration,
    /// When the attempt whose stream is being relayed was sent.
    stream_sent: Option<Instant>,
    /// The status already sent to the client (a streamed response's), if any.
    status_sent: Option<StatusCode>,
    /// The prompt's tokens as estimated from the request body, before any answer.
    prompt_estimate: u64,
    /// Content deltas the upstream streamed: at least one completion token each.
    output_deltas: u64,
    /// What the request took from its key's TPM bucket and from the bucket of the backend
    /// it is at; settled with its real tokens when the record is emitted.
    key_tokens: Option<Reservation>,
    backend_tokens: Option<Reservation>,
    /// Its place under its key's `max_parallel_requests`, freed when this is dropped.
    _parallel: Option<InFlight>,
    /// The request's hold on its key's budget allowance, settled when it ends.
    budget: Option<BudgetReservation>,
    /// Of the budget's reserve, the prompt's estimate at the prices without their tiers:
    /// what a request that learns no tokens keeps, times the tier its answer reported.
    untiered_reserve: u64,
    /// An attempt failed in a way the provider may have billed (it timed out, perhaps while
    /// generating): the request keeps its reserve whatever the later attempts answer.
    billed_failure: bool,
    /// The largest fee for the request itself ([`CallPrices::request_fee_nanos`]) among the
    /// routes of those attempts: kept with the reserve.
    billed_failure_fee: u64,
    /// The last attempt failed ([`Self::attempt_failed`]) rather than answered.
    last_attempt_failed: bool,
    /// Of the record's `cache_write_prompt_tokens`, those written to Anthropic's 1-hour cache:
    /// priced at their own rate, not kept in the record.
    cache_write_1h: u64,
    /// The last attempt was never sent: this replica could not open its connection (out of
    /// file descriptors). No provider saw it.
    unsent: bool,
    done: bool,
    _in_flight: Held,
}

impl Accounting {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        sink: UsageSink,
        spool: Option<Arc<Lane>>,
        metrics: Arc<Metrics>,
        request_id: &str,
        client_key_id: &str,
        endpoint: Endpoint,
        started: Instant,
        arrived: SystemTime,
    ) -> Self {
        let RecordStrings {
            request_id: mut recorded_id,
            backend_id,
            model,
            client_key_id: mut recorded_key,
        } = spare_strings();
        recorded_id.push_str(request_id);
        recorded_key.push_str(client_key_id);
        Self(Box::new(Ledger {
            _in_flight: metrics.in_flight(),
            sink,
            spool,
            spooled: None,
            metrics,
            thoughts_in_total: false,
            record: UsageRecord {
                request_id: recorded_id,
                backend_id,
                model,
                client_key_id: recorded_key,
                endpoint: endpoint.to_proto() as i32,
                time: Some(timestamp(arrived)),
                ..Default::default()
            },
            endpoint,
            started,
            first_byte: None,
            backend_name: None,
            prices: Prices::default(),
            tiers: Tiers::default(),
            tiers_reported: 0,
            asked_tier: None,
            call_prices: CallPrices::default(),
            calls: Counted::default(),
            calls_given: Given::default(),
            calls_seen: Counted::default(),
            expose_backend: false,
            multiplexed: false,
            model_label: None,
            upstream_wait: Duration::ZERO,
            stream_sent: None,
            status_sent: None,
            prompt_estimate: 0,
            output_deltas: 0,
            key_tokens: None,
            backend_tokens: None,
            _parallel: None,
            budget: None,
            untiered_reserve: 0,
            billed_failure: false,
            billed_failure_fee: 0,
            last_attempt_failed: false,
            cache_write_1h: 0,
            unsent: false,
            done: false,
        }))
    }

    /// The prompt's tokens estimated from the request body (`⌈bytes / 4⌉`): what the token
    /// limits are charged at admission, before the answer says how many there were.
    /// The prompt's tokens as estimated from the body ([`super::estimate::prompt_tokens`]).
    pub fn estimate_prompt(&mut self, tokens: u64) {
        self.0.prompt_estimate = tokens;
    }

    pub fn prompt_estimate(&self) -> u64 {
        self.0.prompt_estimate
    }

    /// The upstream streamed one more delta of output (text, tool-call arguments, …): the
    /// completion has at least one token more, should its usage never arrive.
    pub fn output_delta(&mut self) {
        self.0.output_deltas += 1;
    }

    /// The key's limits this request was admitted under: its TPM reservation and its place
    /// among the key's requests in flight, both held until the record is emitted.
    pub fn admitted_under(&mut self, tokens: Option<Reservation>, parallel: Option<InFlight>) {
        self.0.key_tokens = tokens;
        self.0._parallel = parallel;
    }

    /// The request goes to a backend that reserved `tokens` for it (after
    /// [`Accounting::attempt_failed`] settled the reservation at the one before, if any).
    pub fn backend_tokens(&mut self, tokens: Option<Reservation>) {
        if let Some(earlier) = std::mem::replace(&mut self.0.backend_tokens, tokens) {
            earlier.cancel();
        }
    }

    /// The attempt at the current backend failed, and the next may be tried: its reservation
    /// is handed back when the provider counted nothing (it refused, answered an error or
    /// could not be reached), and stays charged when it may have (`billed`: it timed out,
    /// perhaps while generating).
    pub fn attempt_failed(&mut self, billed: bool) {
        self.0.billed_failure |= billed;
        self.0.last_attempt_failed = true;
        if billed {
            let fee = self.0.call_prices.request_fee_nanos();
            self.0.billed_failure_fee = self.0.billed_failure_fee.max(fee);
        }
        self.0.unsent = false;
        if let Some(reservation) = self.0.backend_tokens.take() {
            if billed {
                reservation.keep();
            } else {
                reservation.cancel();
            }
        }
    }

    /// Whether an attempt that failed may have been billed (it timed out or broke after it
    /// was sent): the provider may be generating it still.
    pub fn may_have_been_billed(&self) -> bool {
        self.0.billed_failure
    }

    /// The attempt was never sent (see `failure::Failure::OutOfFiles`): its backend's
    /// token reservation is given back, and unless an earlier attempt may have been billed,
    /// so are the key's and the budget's reserve.
    pub fn attempt_unsent(&mut self) {
        self.attempt_failed(false);
        self.0.unsent = true;
    }

    /// The request was admitted on `reservation` of its key's budget allowance: the record's
    /// cost is settled into it when the request ends.
    /// The request holds `reservation` of its key's budget; `untiered`, of it, is its
    /// prompt's estimate at the route's prices without their tiers ([`keeps_reserve`]).
    pub fn reserved(&mut self, reservation: BudgetReservation, untiered: u64) {
        self.0.budget = Some(reservation);
        self.0.untiered_reserve = untiered;
    }

    /// An upstream attempt took `took` (until its answer, or its first event for a stream).
    pub fn waited_upstream(&mut self, took: Duration) {
        self.0.upstream_wait += took;
    }

    /// The response head goes to the client now: if the request reached a backend, records
    /// the gateway overhead, the time so far not spent waiting on upstream attempts.
    pub fn head_ready(&self) {
        self.head_ready_after(self.0.started.elapsed());
    }

    /// [`Self::head_ready`], `elapsed` after the request arrived.
    fn head_ready_after(&self, elapsed: Duration) {
        if self.0.record.attempts > 0 {
            self.0
                .metrics
                .overhead(elapsed.saturating_sub(self.0.upstream_wait));
        }
    }

    /// The answer is the stream of the attempt sent at `sent`; its upstream latency is
    /// recorded when the stream ends.
    pub fn relaying_stream_sent_at(&mut self, sent: Instant) {
        self.0.stream_sent = Some(sent);
    }

    pub fn endpoint(&self) -> Endpoint {
        self.0.endpoint
    }

    /// The id of the request's client key.
    pub fn key_id(&self) -> &str {
        &self.0.record.client_key_id
    }

    pub fn started(&self) -> Instant {
        self.0.started
    }

    /// The request's id, as its `x-request-id` and its `request finished` line carry it: the
    /// lines of its failed attempts carry it too.
    pub fn request_id(&self) -> &str {
        &self.0.record.request_id
    }

    pub fn attempts(&self) -> u32 {
        self.0.record.attempts
    }

    /// The request asked for `model`, which `routed`, the snapshot's copy of its name, is
    /// when a route serves it: the record and the metrics then carry that name. Otherwise the
    /// record says [`OTHER_MODEL`]: a name no route serves is the client's invention, of any
    /// length, and must not reach usage records, metrics or logs. (One call for both, so that
    /// the record's name is built once.)
    pub fn set_request(&mut self, model: &str, routed: Option<&Arc<str>>, stream: bool) {
        let recorded = &mut self.0.record.model;
        recorded.clear();
        match routed {
            Some(name) => {
                self.0.model_label = Some(Arc::clone(name));
                recorded.push_str(name);
            }
            None if model.is_empty() => {}
            None => recorded.push_str(OTHER_MODEL),
        }
        self.0.record.stream = stream;
    }

    /// Counts an attempt at `backend` by `route`, which become the backend the record names
    /// and the prices its cost is computed by, and
    /// writes the record so far to the spool: the upstream may be called once this returns.
    /// Fails only when the spool cannot record the request and the policy is to refuse it.
    ///
    /// The record spooled is what the request costs should this process die before it ends
    /// ([`Self::start_record`]): a replay reports it so, as interrupted.
    pub async fn attempt(&mut self, backend: &Backend, route: &Route) -> Result<(), ProxyError> {
        self.0.record.attempts += 1;
        self.0.prices = route.prices;
        self.0.tiers.clone_from(&route.tiers);
        self.0.tiers_reported = match self.0.asked_tier.as_deref() {
            // OpenAI bills its renamed "fast" as priority, the tier a route lists for it
            // (usage.md); a whole answer names the tier it was served at, a compaction none.
            Some("fast") if self.0.tiers.named("fast") == 0 => self.0.tiers.named("priority"),
            Some(tier) => self.0.tiers.named(tier),
            None => 0,
        };
        self.0.call_prices.clone_from(&route.call_prices);
        self.0.calls = Counted::default();
        self.0.calls_given = Given::default();
        self.0.calls_seen = Counted::default();
        self.0.last_attempt_failed = false;
        self.0.record.backend_id.clone_from(&backend.id);
        self.0.backend_name = Some(Arc::clone(&backend.name));
        self.0.thoughts_in_total = backend.thoughts_in_total;
        let Some(lane) = self.0.spool.clone() else {
            return Ok(());
        };
        let first = self.0.spooled.is_none();
        let replaced = self.start_record(route);
        let started = lane.start(&mut self.0.spooled, &mut self.0.record);
        replaced.put_back(&mut self.0.record);
        let written = match started {
            Ok(written) => written.await,
            Err(Refused(why)) => Err(why),
        };
        match written {
            Err(why) if first && lane.refuses_unrecorded() => Err(self.refused(why)),
            _ => Ok(()),
        }
    }

    /// Makes the record what the request is charged if its process dies during the attempt at
    /// `route` (a crash, an OOM kill): the provider may have billed it, and nobody will learn
    /// how much. Its prompt's estimate, at the route's prices, and the route's fee for the
    /// request itself, as a request its client left is charged ([`Self::estimate_unreported`]),
    /// with the fee of an earlier attempt that may have been billed (`billed_failure_fee`, as
    /// a finish without tokens keeps it); and whose allowance paid for it. Returns the figures it replaced, which the caller puts
    /// back once the record is spooled.
    fn start_record(&mut self, route: &Route) -> Replaced {
        let record = &mut self.0.record;
        let replaced = Replaced::of(record);
        let estimate = self.0.prompt_estimate;
        let fee = match self.0.endpoint.counts_only() {
            true => 0,
            false => route.call_prices.request_fee_nanos(),
        };
        record.prompt_tokens = estimate;
        record.tokens_estimated = true;
        record.cost_nanos = route
            .prices
            .cost_nanos(Billed {
                prompt: estimate,
                ..Billed::default()
            })
            .saturating_add(fee)
            .saturating_add(self.0.billed_failure_fee);
        priced_by(self.0.budget.as_ref(), record);
        replaced
    }

    /// The request is refused before any upstream call: the record says no backend was tried.
    fn refused(&mut self, why: Unwritten) -> ProxyError {
        self.0.record.attempts = 0;
        self.0.record.backend_id.clear();
        self.0.backend_name = None;
        ProxyError::UsageUnrecordable(why)
    }

    pub fn tokens(&mut self, mut tokens: Tokens) {
        // Embeddings generate nothing: their total is their prompt, which Jina's answers
        // report alone (`{"total_tokens": N}`), on any host (Google's thoughts in the total
        // are a generation's).
        if self.0.endpoint == Endpoint::Embeddings {
            if tokens.prompt == 0 && tokens.completion == 0 {
                tokens.prompt = tokens.unshown;
            }
        } else if self.0.thoughts_in_total {
            tokens = tokens.with_unshown_as_reasoning();
        }
        self.0.record.prompt_tokens = tokens.prompt;
        self.0.record.completion_tokens = tokens.completion;
        self.0.record.cached_prompt_tokens = tokens.cached_prompt;
        self.0.record.reasoning_tokens = tokens.reasoning;
        self.0.record.cache_write_prompt_tokens = tokens.cache_write;
        self.0.cache_write_1h = tokens.cache_write_1h;
        self.0.record.audio_prompt_tokens = tokens.audio_prompt;
        self.0.record.audio_completion_tokens = tokens.audio_completion;
    }

    /// Reads what `text`, the answer (or the stream event) whose usage was counted, says
    /// changes its price, when the route attempted prices it: the price tier it was served
    /// at ([`crate::tiers`]) and the calls of tools billed by the call ([`crate::calls`]).
    /// The request asked for the tier `tier`, which its answer will not name (a compaction's):
    /// it is priced at that tier.
    pub fn asked_tier(&mut self, tier: &str) {
        self.0.asked_tier = Some(tier.into());
    }

    pub fn priced_in(&mut self, text: &[u8]) {
        if self.0.tiers.any() {
            self.0.tiers_reported |= self.0.tiers.reported_in(text);
        }
        let given = self.0.call_prices.count_in(text, &mut self.0.calls);
        self.calls_given(given);
    }

    fn calls_given(&mut self, given: Given) {
        for (was, now) in self.0.calls_given.iter_mut().zip(given) {
            *was |= now;
        }
    }

    /// Counts the call of a priced tool a stream's event `kind` shows (an Anthropic server
    /// tool's block starting, a Responses built-in tool's item done), when the route prices
    /// any ([`CallPrices::count_event`]).
    pub fn calls_in_event(&mut self, kind: Option<&str>, data: &[u8]) {
        if self.0.call_prices.any() {
            self.0
                .call_prices
                .count_event(kind, data, &mut self.0.calls_seen);
        }
    }

    /// [`Self::priced_in`] for the text of a `usage` value alone (an answer refused for
    /// memory keeps no more of it): Anthropic's names its tiers and counts its server tools'
    /// calls there.
    pub fn priced_in_usage(&mut self, usage: &[u8]) {
        if self.0.tiers.any() {
            self.0.tiers_reported |= self.0.tiers.reported_in_usage(usage);
        }
        let given = self.0.call_prices.count_in_usage(usage, &mut self.0.calls);
        self.calls_given(given);
    }

    /// Whether the upstream reported the request's usage (some of its tokens).
    pub fn has_usage(&self) -> bool {
        self.0.record.prompt_tokens > 0 || self.0.record.completion_tokens > 0
    }

    /// Marks the first byte or event sent to the client (only the first call counts).
    pub fn first_byte(&mut self) {
        if self.0.first_byte.is_none() {
            self.0.first_byte = Some(self.0.started.elapsed());
        }
    }

    /// The response status has gone out (a stream's head); a later cancel keeps it.
    pub fn status_sent(&mut self, status: StatusCode) {
        self.0.status_sent = Some(status);
    }

    /// Whether the answer names its backend in `x-sluice-backend` (the setting
    /// `expose_backend_header`, off by default).
    pub fn expose_backend(&mut self, expose: bool) {
        self.0.expose_backend = expose;
    }

    /// The request came on a connection that carries many at once (HTTP/2).
    pub fn multiplexed(&mut self, multiplexed: bool) {
        self.0.multiplexed = multiplexed;
    }

    pub fn is_multiplexed(&self) -> bool {
        self.0.multiplexed
    }

    /// `x-sluice-attempts`, and `x-sluice-backend` if exposed, for the response.
    pub fn decorate(&self, headers: &mut HeaderMap) {
        if self.0.expose_backend
            && let Some(name) = &self.0.backend_name
            && let Ok(value) = HeaderValue::from_str(name)
        {
            headers.insert(X_SLUICE_BACKEND, value);
        }
        let attempts = self.0.record.attempts;
        let value = usize::try_from(attempts)
            .ok()
            .and_then(|n| FEW_ATTEMPTS.get(n).cloned())
            .unwrap_or_else(|| HeaderValue::from(attempts));
        headers.insert(X_SLUICE_ATTEMPTS, value);
    }

    /// Emits the record and the log line. The end of the answer may go to the client once
    /// the returned future resolves (the record is then in the spool, if there is one).
    pub fn finish(mut self, status: StatusCode, kind: ErrorKind) -> Written {
        self.emit(status.as_u16(), kind)
    }

    /// An answer sent whole (a body in memory, or an error) goes out now: its head
    /// ([`Self::head_ready`]), with `first_byte` its first byte ([`Self::first_byte`]), and
    /// its record ([`Self::finish`]), all timed by one reading of the clock rather than three.
    pub fn finish_whole(
        mut self,
        status: StatusCode,
        kind: ErrorKind,
        first_byte: bool,
    ) -> Written {
        let elapsed = self.0.started.elapsed();
        if first_byte && self.0.first_byte.is_none() {
            self.0.first_byte = Some(elapsed);
        }
        self.head_ready_after(elapsed);
        self.emit_after(status.as_u16(), kind, elapsed)
    }

    fn emit(&mut self, status: u16, kind: ErrorKind) -> Written {
        self.emit_after(status, kind, self.0.started.elapsed())
    }

    /// Emits the record and the line of a request that took `latency`.
    fn emit_after(&mut self, status: u16, kind: ErrorKind, latency: Duration) -> Written {
        if std::mem::replace(&mut self.0.done, true) {
            return Written::ready();
        }
        let mut record = std::mem::take(&mut self.0.record);
        record.status_code = u32::from(status);
        record.error_kind = kind as i32;
        record.latency = Some(proto_duration(latency));
        record.time_to_first_token = self.0.first_byte.map(proto_duration);
        self.estimate_unreported(&mut record, kind);
        let used = record
            .prompt_tokens
            .saturating_add(record.completion_tokens);
        // A provider that may have counted the request without saying how much keeps its
        // estimate charged, as a budget keeps its reserve.
        let unknown = keeps_reserve(&record, kind, self.0.billed_failure, self.0.unsent);
        for reservation in [self.0.key_tokens.take(), self.0.backend_tokens.take()]
            .into_iter()
            .flatten()
        {
            if unknown {
                reservation.keep();
            } else {
                reservation.settle(used);
            }
        }
        // Nearly every request reports no tier its route prices: its prices as they are.
        let (tier, prices, tier_names) = match self.0.tiers_reported {
            0 => (1.0, self.0.prices, None),
            reported => {
                let tier = self.0.tiers.multiplier(reported);
                (
                    tier,
                    self.0.prices.scaled(tier),
                    self.0.tiers.names(reported),
                )
            }
        };
        record.cost_nanos = prices.cost_nanos(Billed {
            prompt: record.prompt_tokens,
            cached: record.cached_prompt_tokens,
            cache_write: record.cache_write_prompt_tokens,
            cache_write_1h: self.0.cache_write_1h,
            completion: record.completion_tokens,
            audio_prompt: record.audio_prompt_tokens,
            audio_completion: record.audio_completion_tokens,
        });
        // Nearly every route prices no tool's calls: nothing to add or name.
        let (mut fees, calls) = match self.0.call_prices.any() {
            true => {
                // The answer's counts where its final figures gave them (what was billed: a
                // search that failed streamed its block all the same); else what its stream
                // showed when that is more (a stream left before its last usage, a backend
                // that does not count the tool).
                let mut calls = self.0.calls;
                let given = self.0.calls_given;
                for ((calls, seen), given) in calls.iter_mut().zip(self.0.calls_seen).zip(given) {
                    if !given {
                        *calls = (*calls).max(seen);
                    }
                }
                // The route's fee for the request itself, when its backend processed the
                // request: its tokens are known or estimated, or it answered without saying
                // (not a failure: a refusal, or an attempt that failed after it was sent,
                // whose fee is `billed_failure_fee`). A count of tokens bills nothing.
                let answered = used > 0 || (unknown && !self.0.last_attempt_failed);
                if answered && !self.0.endpoint.counts_only() {
                    self.0.call_prices.count_request(&mut calls);
                }
                let fees = self.0.call_prices.cost_nanos(&calls);
                record.cost_nanos = record.cost_nanos.saturating_add(fees);
                (fees, self.0.call_prices.names(&calls))
            }
            false => (0, None),
        };
        // An attempt that failed after it was sent, at a route with a fee, may have been
        // billed it, when no later attempt's tokens settle what the request cost.
        if unknown && used == 0 && self.0.billed_failure_fee > 0 {
            fees = fees.saturating_add(self.0.billed_failure_fee);
            record.cost_nanos = record.cost_nanos.saturating_add(self.0.billed_failure_fee);
        }
        priced_by(self.0.budget.as_ref(), &mut record);
        if let Some(reservation) = &self.0.budget
            && unknown
        {
            // At the tier read so far, not the dearest ones the reserve held against, and the
            // calls known besides (a request's fee, the searches a stream showed).
            let kept = (self.0.untiered_reserve as f64 * tier).round() as u64;
            let kept = kept
                .saturating_add(fees)
                .min(reservation.reserve().max(0) as u64);
            record.cost_nanos = record.cost_nanos.max(kept);
        }
        RequestLine {
            request_id: &record.request_id,
            client_key: &record.client_key_id,
            model: &record.model,
            backend: self.0.backend_name.as_deref().unwrap_or(""),
            status,
            attempts: record.attempts,
            stream: record.stream,
            latency_ms: latency.as_millis() as u64,
            ttft_ms: self.0.first_byte.map(|d| d.as_millis() as u64),
            prompt_tokens: record.prompt_tokens,
            completion_tokens: record.completion_tokens,
            cached_prompt_tokens: record.cached_prompt_tokens,
            cache_write_prompt_tokens: record.cache_write_prompt_tokens,
            cost_nanos: record.cost_nanos,
            price_tier: tier_names.as_deref(),
            tool_calls: calls.as_deref(),
            tokens_estimated: record.tokens_estimated,
            error_kind: kind,
        }
        .emit();
        let backend = self
            .0
            .backend_name
            .as_ref()
            .map_or(Label::NONE, Label::from);
        let model = match &self.0.model_label {
            Some(name) => Label::from(name),
            None if record.model.is_empty() => Label::NONE,
            None => Label::OTHER_MODEL,
        };
        self.0.metrics.request(&backend, &model, status);
        if let Some(sent) = self.0.stream_sent {
            self.0.metrics.upstream_latency(&backend, sent.elapsed());
        }
        let (spool, spooled) = (&self.0.spool, self.0.spooled);
        // The pool is charged what the record says: the control plane counts the records'
        // cost as spend, and money a replica kept spent without its record saying so would
        // stay outstanding there, shrinking every later grant of the key (see `keeps_reserve`).
        let spent = record.cost_nanos;
        let mut written = Written::ready();
        self.0.sink.record_spooled(record, |record| {
            let Some(lane) = spool else {
                return false;
            };
            written = lane.finish(spooled, record);
            written.holds_record()
        });
        // After the record is queued: see `allowance::Allowances::hello`.
        if let Some(reservation) = self.0.budget.take() {
            reservation.settle(spent);
        }
        written
    }
}

/// Marks `record`'s cost as the replica's, paid from `budget`'s allowance: a request taken
/// from no pool is charged by the control plane to no grant.
fn priced_by(budget: Option<&BudgetReservation>, record: &mut UsageRecord) {
    record.priced = true;
    record.unbudgeted = budget.is_none();
    record.budget_period_start_ms = budget.map_or(0, BudgetReservation::period_start_ms);
}

/// The figures of a record [`Accounting::start_record`] replaced for its spooled start.
struct Replaced {
    prompt_tokens: u64,
    tokens_estimated: bool,
    cost_nanos: u64,
    priced: bool,
}

impl Replaced {
    fn of(record: &UsageRecord) -> Self {
        Self {
            prompt_tokens: record.prompt_tokens,
            tokens_estimated: record.tokens_estimated,
            cost_nanos: record.cost_nanos,
            priced: record.priced,
        }
    }

    fn put_back(self, record: &mut UsageRecord) {
        record.prompt_tokens = self.prompt_tokens;
        record.tokens_estimated = self.tokens_estimated;
        record.cost_nanos = self.cost_nanos;
        record.priced = self.priced;
    }
}

/// Whether a request keeps its budget reserve spent, as its cost, and its token-limit
/// reservations charged: one that reached a backend and learnt no tokens, where the provider
/// may have billed and counted it (an answer without usage, a timeout, an answer Sluice could
/// not read). One whose backend answered an error status, or could not be reached, was billed
/// nothing: its reserve is given back, unless an earlier attempt may have been billed
/// (`billed_failure`: it timed out, and the next backend answered an error). Nor was one
/// whose last attempt was never sent (`unsent`: no descriptor for its connection), which
/// ends as this replica's own error. (A request cut short has its tokens estimated before
/// this: see `estimate_unreported`.)
fn keeps_reserve(
    record: &UsageRecord,
    kind: ErrorKind,
    billed_failure: bool,
    unsent: bool,
) -> bool {
    // Cut by the replica's stop while its provider was generating it: charged its estimate
    // (`estimate_unreported`) and kept at its reserve, which the answer may well have cost.
    let stopped = kind == ErrorKind::DataPlaneStopped && !unsent;
    record.attempts > 0
        && (stopped
            || (record.prompt_tokens == 0
                && record.completion_tokens == 0
                && (billed_failure
                    || !(unsent
                        || matches!(
                            kind,
                            ErrorKind::UpstreamStatus | ErrorKind::UpstreamConnect
                        )))))
}

impl Accounting {
    /// A request that reached an upstream and was cut off before the provider's usage arrived
    /// (its client went away, or the stream broke) is charged what is known: the prompt
    /// estimate, unless the provider reported the prompt, and a completion token per output
    /// delta streamed, unless it reported more. It undercounts by what the provider generated
    /// after the cut; the record says the figures are estimates. So is a stream that streamed
    /// output and ended without usage, normally (a server ignoring `include_usage`) or with
    /// the provider's error event (a Responses API `error` or `response.failed`). And so is an
    /// embeddings answer without usage (Google's OpenAI-compatible endpoint, OpenWebUI's send
    /// none): its prompt is all it is billed for.
    fn estimate_unreported(&self, record: &mut UsageRecord, kind: ErrorKind) {
        let cut_short = matches!(
            kind,
            ErrorKind::ClientCancelled | ErrorKind::StreamInterrupted | ErrorKind::DataPlaneStopped
        );
        let unreported = record.prompt_tokens == 0 && record.completion_tokens == 0;
        let ended_without_usage = self.0.output_deltas > 0
            && unreported
            && matches!(kind, ErrorKind::Unspecified | ErrorKind::UpstreamStatus);
        let embedded_without_usage = unreported
            && self.0.endpoint == Endpoint::Embeddings
            && kind == ErrorKind::Unspecified
            && (200..300).contains(&record.status_code);
        if record.attempts == 0 || !(cut_short || ended_without_usage || embedded_without_usage) {
            return;
        }
        let prompt = match record.prompt_tokens {
            0 => self.0.prompt_estimate,
            reported => reported,
        };
        let completion = record.completion_tokens.max(self.0.output_deltas);
        if (prompt, completion) != (record.prompt_tokens, record.completion_tokens) {
            record.prompt_tokens = prompt;
            record.completion_tokens = completion;
            record.tokens_estimated = true;
        }
    }
}

#[cfg(test)]
impl Accounting {
    /// A request's accounting on a backend whose totals hold a thinking model's thoughts, or
    /// not ([`Backend::thoughts_in_total`]), before any figure is read.
    pub(super) fn on_a_backend(endpoint: Endpoint, thoughts_in_total: bool) -> Self {
        let mut acct = Self::new(
            UsageSink::new(1),
            None,
            Arc::new(Metrics::new()),
            "request",
            "key",
            endpoint,
            Instant::now(),
            SystemTime::now(),
        );
        acct.0.thoughts_in_total = thoughts_in_total;
        acct
    }

    /// The record's prompt, completion and reasoning tokens so far.
    pub(super) fn recorded_tokens(&self) -> (u64, u64, u64) {
        let record = &self.0.record;
        (
            record.prompt_tokens,
            record.completion_tokens,
            record.reasoning_tokens,
        )
    }
}

impl Drop for Accounting {
    fn drop(&mut self) {
        if !self.0.done {
            // Cut by the replica's stop, its drain run out while it waited on its upstream:
            // not its client leaving (nor the backend's fault, as a 499 reads), and the
            // provider may be generating it.
            let (status, kind) = match self.0.status_sent {
                None if crate::stopping::cut_by_the_stop() => (0, ErrorKind::DataPlaneStopped),
                sent => (
                    sent.map_or(CLIENT_CLOSED_REQUEST, |s| s.as_u16()),
                    ErrorKind::ClientCancelled,
                ),
            };
            // Nothing more goes to the client: write it now rather than wait for others.
            let _ = self.emit(status, kind).now();
        }
    }
}
