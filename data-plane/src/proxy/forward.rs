//! Trying the candidates in order: skip backends that are cooling down or out of rate tokens,
//! send to the next, move on after a connect error, a timeout before the first byte, a 429 or
//! a 5xx (as the policy allows), and never after a byte reached the client.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, header};
use sluice_proto::v1::ErrorKind;
use tokio::time::Instant;

use super::accounting::Accounting;
use super::failure::{
    Failure, FirstEvent, LifecycleHold, Refusal, error_in_answer, failed_response,
    fewer_tokens_would_do, first_event, opens_with_an_error, out_of_credit, out_of_quota,
    refused_model, refuses_the_key, refuses_the_request_itself, retry_delay_in_body,
    starts_an_event,
};
use super::health::{StreamHealth, record_health};
use super::kept_sleeps::{KeptSleeps, within};
use super::outgoing::{
    after_options_refused, capped, chat_body, messages_body, replace_all, with_query,
    without_stream_options,
};
use super::relay::{KEEP_ALIVE, Mode, Pending, Relay, Translation, tokens_of};
use super::usage_figures::{
    UsageInPassing, usage_of_answer, usage_of_value, usage_value_of_answer,
};
use super::{AppState, Collected};
use crate::answer_memory::{AnswerMemory, AnswerPermit, CountedAnswer, Full};
use crate::anthropic;
use crate::cooldown::{self, Outcome, Scope};
use crate::error::ProxyError;
use crate::metrics::{AttemptOutcome, Label, LimitScope, SkipReason};
use crate::redact::redact_error;
use crate::request::ParsedRequest;
use crate::responses::{self, IdRewrite};
use crate::router;
use crate::snapshot::{ApiFormat, Backend, Endpoint, Policy, Route, Snapshot};
use crate::upstream::{self, UpstreamBody, UpstreamClient};
use crate::usage::Tokens;

/// Largest error body read from an upstream 429/5xx (to pass it on if it is the last one).
const MAX_ERROR_BODY: usize = 64 * 1024;

/// The most of a stream held before its first event (comments, an event's other fields):
/// past it the backend is not streaming, and the attempt fails.
const MAX_BEFORE_FIRST_EVENT: usize = 64 * 1024;

/// The most of a Responses create's lifecycle events held before its output (see
/// [`Sending::holds_lifecycle`]).
const MAX_HELD_LIFECYCLE: usize = 512 * 1024;

/// What a successful attempt produced: a whole body, or a stream whose first chunk arrived.
enum Answer {
    Full {
        status: StatusCode,
        /// The answer's headers so far: the upstream's `content-type` alone, in the upstream
        /// answer's own map (see [`only_content_type`]).
        headers: HeaderMap,
        body: Bytes,
        /// What the body holds of [`AppState::answer_memory`], until it is sent.
        memory: Option<AnswerPermit>,
    },
    Stream {
        status: StatusCode,
        upstream: UpstreamBody,
        first: Bytes,
        /// Committed before its first event (`--stream-keepalive`): `first` is comments.
        early: bool,
    },
}

/// What each candidate is sent, and what its answer holds.
pub(super) struct Call<'a> {
    pub endpoint: Endpoint,
    /// The public model, for errors.
    pub model: &'a str,
    pub stream: bool,
    pub send: Outbound<'a>,
    /// For the Responses API: how the response ids in the answer become Sluice's
    /// (`backend_id` is filled in with the backend that answers).
    pub ids: Option<IdRewrite>,
    /// Whether the answer's usage is the request's (a create's; a retrieve's is not).
    pub count_usage: bool,
    /// What a backend of the client's API gets of its request as it came.
    pub passed: Option<&'a Passthrough>,
    /// The conversation the request names (`prompt_cache_key`), which orders its backends.
    pub conversation: Option<&'a str>,
}

impl Call<'_> {
    /// Whether the call takes a request from its backend's `rpm_limit`: not one on a stored
    /// response (a retrieve, a delete, an item list, a cancel), which a provider does not
    /// count among a model's requests. A client polling a background response every second
    /// took 60 of them a minute from the creates.
    fn takes_from_rpm_limit(&self) -> bool {
        !self.on_stored()
    }

    /// Whether the request asked for the flex tier (`service_tier: "flex"`).
    fn asked_flex(&self) -> bool {
        matches!(self.send, Outbound::Body { parsed, .. }
            if parsed.members().any(|(key, value)| key == "service_tier" && value.get() == "\"flex\""))
    }

    /// Whether the call is on a stored response (a retrieve, a delete, an item list, a
    /// cancel), not a new generation.
    fn on_stored(&self) -> bool {
        matches!(self.send, Outbound::Stored { .. })
    }

    /// Whether the call bills nothing (counting tokens, a call on a stored response): left
    /// to the SDKs' retries whatever became of its attempts.
    fn bills_nothing(&self) -> bool {
        self.endpoint.counts_only() || !self.count_usage
    }

    /// The figures of `usage`, the text of the top-level `usage` of the answer of a backend
    /// of `format`, when its usage is the request's: read as its whole answer's would be.
    fn usage_in(&self, format: ApiFormat, usage: &[u8]) -> Option<Tokens> {
        match (&self.ids, format) {
            (Some(_), _) => self
                .count_usage
                .then(|| responses::usage_tokens(usage))
                .flatten(),
            (None, ApiFormat::Anthropic) => (self.endpoint.format() == ApiFormat::OpenAi
                || self.endpoint == Endpoint::Messages)
                .then(|| anthropic::response::anthropic_usage_in(usage).map(tokens_of))
                .flatten(),
            (None, ApiFormat::OpenAi) => usage_of_value(usage),
        }
    }
}

/// The OpenAI SDKs' header naming the beta features a request uses.
const OPENAI_BETA: HeaderName = HeaderName::from_static("openai-beta");

/// How long openai-python and anthropic-sdk-python wait for the next byte of an answer (their
/// read timeout, in seconds: `600.0`).
const CLIENT_READ_TIMEOUT: HeaderName = HeaderName::from_static("x-stainless-read-timeout");
/// How long openai-node and anthropic-sdk-python wait for an answer, in seconds.
const CLIENT_TIMEOUT: HeaderName = HeaderName::from_static("x-stainless-timeout");

/// How long the client waits for the first byte of the answer before it gives up and, being
/// one of the official SDKs, sends the request again: what it announces
/// (`x-stainless-read-timeout`, `x-stainless-timeout`; the shorter), less a margin (a tenth,
/// at most 2 s) for Sluice's answer to reach it. `None` when it says nothing Sluice can read.
///
/// Sluice answers a request it gave up on at its deadline with 504 and `x-should-retry:
/// false` when a provider may have billed it; arriving after the client's own timeout, that
/// answer was never read, and the SDK sent the request again, twice (the SDKs' timeout and
/// `request_timeout` are both 600 s by default, and the client's clock starts first).
pub(super) fn client_wait(headers: &HeaderMap) -> Option<Duration> {
    // One look at the few names a request has, rather than two hashed lookups, for the
    // clients that send neither (about 360 instructions a request; the SDKs send several
    // `x-stainless-*` headers, and pay for the lookups).
    if !headers
        .keys()
        .any(|name| name.as_str().starts_with("x-stainless-"))
    {
        return None;
    }
    let announced = |name: &HeaderName| {
        let seconds: f64 = headers.get(name)?.to_str().ok()?.trim().parse().ok()?;
        Duration::try_from_secs_f64(seconds)
            .ok()
            .filter(|wait| !wait.is_zero())
    };
    let wait = match (announced(&CLIENT_READ_TIMEOUT), announced(&CLIENT_TIMEOUT)) {
        (Some(read), Some(total)) => read.min(total),
        (one, other) => one.or(other)?,
    };
    Some(wait - (wait / 10).min(Duration::from_secs(2)))
}

/// What a backend speaking the client's API gets of the client's request as it came, beyond
/// the body: a Messages client's `anthropic-*` headers and query string (the SDKs' beta
/// clients post to `/v1/messages?beta=true`), a Responses client's `openai-beta` header.
/// Nothing to a backend of the other API. And how long the client waits ([`client_wait`]).
#[derive(Debug, Default)]
pub(super) struct Passthrough {
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub query: Option<String>,
    pub client_wait: Option<Duration>,
}

impl Passthrough {
    /// On Anthropic's routes: the query string, and the headers `anthropic-version` (it
    /// defines what the body means; the backend's configured version is sent only when the
    /// client names none), `anthropic-beta` and every other `anthropic-*` header (features
    /// Sluice need not know). On the Responses API's: `openai-beta` (the SDKs'
    /// `client.beta.responses` name the beta features a request uses in it), not the query
    /// string (an OpenAI-format backend's base URL may carry a query of its own, Azure's
    /// `api-version`). Never the client's key.
    pub(super) fn of(endpoint: Endpoint, client: &http::request::Parts) -> Self {
        Self {
            headers: Self::headers_for(endpoint, &client.headers),
            query: (endpoint.format() == ApiFormat::Anthropic)
                .then(|| client.uri.query().map(str::to_owned))
                .flatten(),
            client_wait: client_wait(&client.headers),
        }
    }

    /// The headers of [`Passthrough::of`].
    pub(super) fn headers_for(
        endpoint: Endpoint,
        headers: &http::HeaderMap,
    ) -> Vec<(HeaderName, HeaderValue)> {
        let anthropic = endpoint.format() == ApiFormat::Anthropic;
        if !anthropic && !endpoint.is_responses() {
            // Chat, completions, embeddings: nothing, and no look at the headers.
            return Vec::new();
        }
        let passes = |name: &HeaderName| {
            if anthropic {
                name.as_str().starts_with("anthropic-")
            } else {
                name == OPENAI_BETA
            }
        };
        headers
            .iter()
            .filter(|(name, _)| passes(name))
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect()
    }
}

/// The upstream request.
pub(super) enum Outbound<'a> {
    /// `POST` the client's body to the endpoint with the route's model, and
    /// `previous_response_id` replaced by the upstream's own id when given.
    Body {
        parsed: &'a ParsedRequest<'a>,
        previous_response_id: Option<&'a str>,
    },
    /// A call on the stored response `upstream_id` (retrieve, delete, input items, cancel).
    Stored {
        method: Method,
        upstream_id: &'a str,
        action: Option<&'static str>,
        query: Option<&'a str>,
    },
}

/// Routes the request and answers it; `acct` is finished here or handed to the stream relay.
/// `client` is the client's request head, its body read: what of it an Anthropic backend gets
/// ([`Passthrough::of`]), and its header map, on which the first attempt's request is built.
pub(super) async fn forward(
    app: &Arc<AppState>,
    snapshot: &Snapshot,
    routes: &[Route],
    endpoint: Endpoint,
    parsed: &ParsedRequest<'_>,
    acct: Accounting,
    client: http::request::Parts,
) -> Response {
    let passed = Passthrough::of(endpoint, &client);
    // A Messages client names its conversation in `metadata.user_id` (Claude Code: its
    // session), and Anthropic caches prompts per organisation as OpenAI does per account.
    let user_id = match (&parsed.prompt_cache_key, endpoint) {
        (None, Endpoint::Messages) => parsed.metadata_user_id(),
        _ => None,
    };
    let call = Call {
        endpoint,
        model: &parsed.model,
        stream: parsed.stream && endpoint.can_stream(),
        send: Outbound::Body {
            parsed,
            previous_response_id: None,
        },
        ids: None,
        count_usage: true,
        passed: Some(&passed),
        conversation: parsed.prompt_cache_key.as_deref().or(user_id.as_deref()),
    };
    forward_call(app, snapshot, routes, &call, acct, Some(client.headers)).await
}

/// [`forward`] for any [`Call`]. `spare` is a header map the client's request no longer
/// needs (its own, read): the first attempt's request is built on it, cleared, which saves
/// allocating a map for it.
pub(super) async fn forward_call(
    app: &Arc<AppState>,
    snapshot: &Snapshot,
    routes: &[Route],
    call: &Call<'_>,
    mut acct: Accounting,
    mut spare: Option<HeaderMap>,
) -> Response {
    let policy = snapshot.policy;
    let stream = call.stream;
    let deadline = acct.started() + policy.request_timeout;
    // The first byte (a whole answer: all of it) is waited for no longer than the client
    // waits, so that it reads why Sluice gave up rather than time out and send the request
    // again; a stream, once it has begun, runs to the request's deadline.
    let answer_by = call
        .passed
        .and_then(|p| p.client_wait)
        // From now, the body read: the SDKs' read timeout starts once they have sent it.
        .and_then(|wait| Instant::now().checked_add(wait))
        .map_or(deadline, |by| deadline.min(by));
    let cooldowns = app.store.cooldowns();
    let order = router::order(
        routes,
        snapshot.backends(),
        &mut rand::rng(),
        call.conversation,
    );
    // A Responses create run in the background: its job runs to its end once the provider
    // has it, whatever becomes of the connection that asked.
    let background = call.endpoint == Endpoint::Responses
        && call.count_usage
        && matches!(call.send, Outbound::Body { parsed, .. } if parsed.background());
    let mut soonest: Option<Instant> = None;
    // Of `soonest`, the candidates passed over for their rate limit (not a cooldown).
    let mut limited: Option<Instant> = None;
    let mut last: Option<(Failure, ApiFormat)> = None;
    // A backend's 404 or 405 to a call it does not serve ([`Failure::lacks_endpoint`]): the
    // answer only when no backend failed otherwise, nor was passed over as busy.
    let mut lacking: Option<(Failure, ApiFormat)> = None;
    // When the backends whose attempts were rate limited free up again: the last attempt's
    // (its own answer says it to the client), and the soonest of the others'.
    let (mut last_frees, mut others_free): (Option<Instant>, Option<Instant>) = (None, None);
    let mut unsupported = false;
    // Why the request could not be written for a backend of the other API (a member it has
    // no equivalent for): that backend is passed over, and this is the answer only if no
    // other could take the request either.
    // Boxed: it lives across the attempts' awaits, in the request's future, which is moved.
    let mut untranslatable: Option<Box<ProxyError>> = None;
    for (position, &route) in order.iter().enumerate() {
        if acct.attempts() >= policy.max_attempts {
            break;
        }
        let Some(backend) = snapshot.backends().get(route.backend) else {
            continue;
        };
        // The last attempt is kept for the next pool when the ones before it failed in this
        // one and a candidate there is not cooling: with `max_attempts` (3) no more than the
        // primaries, a failing primary pool spent every attempt, and a healthy fallback was
        // asked only once the primaries had cooled (`failure_threshold` requests later).
        if acct.attempts() > 0
            && acct.attempts() + 1 == policy.max_attempts
            && later_pool_takes(
                app,
                snapshot,
                cooldowns,
                call,
                &order[position..],
                backend.pool,
            )
        {
            continue;
        }
        let Some(uri) = backend.uri(call.endpoint) else {
            unsupported = true;
            continue;
        };
        // A backend speaking the client's API gets the client's bytes; only the other API
        // needs a translation.
        let client = call.endpoint.format();
        let translated = match translated_body(app, call, backend, route) {
            Some(Ok(body)) => Some(body),
            Some(Err(e)) => {
                untranslatable.get_or_insert_with(|| Box::new(e));
                continue;
            }
            None => None,
        };
        let label = Label::from(&backend.name);
        let now = Instant::now();
        if now >= answer_by {
            last.get_or_insert((Failure::Timeout { of_model: true }, backend.format));
            break;
        }
        // A call that only counts tokens is limited apart from the model's answers at the
        // provider (Anthropic's token counting has "separate and independent" limits): it has
        // no say in the model's state, and is not kept from the model by it; only the
        // backend's own state, an account spent or a server down, counts for it.
        let health_model = match call.endpoint.counts_only() {
            true => "",
            false => route.upstream_model.as_str(),
        };
        let basis = match cooldowns.check(&backend.id, health_model, now) {
            Ok(basis) => Some(basis),
            // A call on a stored response goes to the one backend holding it, cooling or not
            // (see `stored::pin`); what becomes of it then is not news of the backend's state.
            Err(_) if call.on_stored() => None,
            Err(until) => {
                app.metrics.skip(&label, SkipReason::cooling_down);
                soonest = Some(soonest.map_or(until, |s| s.min(until)));
                continue;
            }
        };
        // Tokens first: a backend then skipped for its RPM limit gets them back. Calls on a
        // stored response count no tokens.
        let tokens = match &backend.tokens {
            Some(bucket) if call.count_usage => {
                match bucket.try_admit(acct.prompt_estimate(), now) {
                    Ok(reserved) => Some(reserved),
                    Err(wait) => {
                        app.metrics.skip(&label, SkipReason::token_limited);
                        let until = now + wait;
                        soonest = Some(soonest.map_or(until, |s| s.min(until)));
                        limited = Some(limited.map_or(until, |s| s.min(until)));
                        continue;
                    }
                }
            }
            _ => None,
        };
        if let Some(limiter) = &backend.limiter
            && call.takes_from_rpm_limit()
            && let Err(wait) = limiter.try_acquire(now)
        {
            if let Some(tokens) = tokens {
                tokens.cancel();
            }
            app.metrics.skip(&label, SkipReason::rate_limited);
            let until = now + wait;
            soonest = Some(soonest.map_or(until, |s| s.min(until)));
            limited = Some(limited.map_or(until, |s| s.min(until)));
            continue;
        }
        acct.backend_tokens(tokens);
        if acct.attempts() > 0 {
            app.metrics.failover();
        }
        if let Err(refused) = acct.attempt(backend, route).await {
            return error(acct, refused).await;
        }
        // Sluice asks an OpenAI-format backend's stream for its usage (`stream_options`), unless
        // the backend refused the member before: some (Mistral, older Azure API versions)
        // refuse it, and send the usage in the last chunk anyway. Then it goes without it,
        // the client's own too.
        let usage_option = stream
            && backend.format == ApiFormat::OpenAi
            && !call.endpoint.is_responses()
            && matches!(&call.send, Outbound::Body { .. });
        let refused_before = usage_option && refuses_stream_options(app, backend, call.endpoint);
        let (method, uri, body) = match &call.send {
            Outbound::Body {
                parsed,
                previous_response_id,
            } => (
                Method::POST,
                match call.passed.and_then(|p| p.query.as_deref()) {
                    Some(query) if backend.format == client => {
                        with_query(uri, query).unwrap_or_else(|| uri.clone())
                    }
                    _ => uri.clone(),
                },
                match translated {
                    Some(body) if refused_before => without_stream_options(&body).unwrap_or(body),
                    Some(body) => body,
                    // The Responses API and Anthropic's always report usage; they have no
                    // `include_usage`.
                    None => {
                        let body = parsed.rewrite_with(
                            &route.upstream_model,
                            usage_option && client == ApiFormat::OpenAi && !refused_before,
                            *previous_response_id,
                        );
                        match refused_before {
                            true => without_stream_options(&body).unwrap_or(body),
                            false => body,
                        }
                    }
                },
            ),
            Outbound::Stored {
                method,
                upstream_id,
                action,
                query,
            } => match backend.stored_response_uri(upstream_id, *action, *query) {
                Some(uri) => (method.clone(), uri, Bytes::new()),
                None => return error(acct, ProxyError::UpstreamInvalid).await,
            },
        };
        let sent = Instant::now();
        let again =
            (usage_option && !refused_before).then(|| (method.clone(), uri.clone(), body.clone()));
        let memory = (
            &app.answer_memory,
            acct.key_id(),
            // Whether an answer refused for memory is read on for its `usage`.
            call.count_usage && !call.endpoint.counts_only(),
        );
        // An h2 connection carries up to 200 requests: their small answers count too.
        let uncounted = if acct.is_multiplexed() {
            0
        } else {
            SMALL_ANSWER_BYTES
        };
        // Whether another backend could still be asked if this attempt timed out: one of the
        // routes after it that the loop would not pass over now (serving the endpoint, the
        // request written for its API, not cooling down, under its limits), with an attempt
        // left and timeouts failed over. Asked only when the attempt's wait runs out. (A
        // call that bills nothing is always given up: the SDK sends it again.)
        let holds_lifecycle =
            stream && call.endpoint == Endpoint::Responses && call.count_usage && !background;
        let attempts_left = acct.attempts() < policy.max_attempts;
        let later = &order[position + 1..];
        let moves_on = || {
            call.bills_nothing()
                || (policy.retry_on_timeout
                    && attempts_left
                    && later
                        .iter()
                        .any(|route| could_take(app, snapshot, cooldowns, call, route)))
        };
        let sending = Sending {
            client: snapshot.upstream(app.pool),
            sleeps: &app.sleeps,
            sent,
            moves_on: &moves_on,
            backend,
            // Only to a backend of the client's own API: a translated request carries none.
            passed: call
                .passed
                .filter(|_| backend.format == client)
                .map_or(&[][..], |p| &p.headers),
            stream,
            policy: &policy,
            deadline: answer_by,
            max_response: app.limits.max_response_bytes,
            memory,
            uncounted,
            endpoint: call.endpoint,
            committed_by: app
                .limits
                .stream_keepalive
                .filter(|_| stream)
                .map(|every| (acct.started() + every, every)),
            holds_lifecycle,
        };
        let mut outcome = attempt(&sending, spare.take(), method, uri, body).await;
        let mut again = again;
        while let Some((method, uri, body)) = again.take()
            && let Some(refusal) = stream_options_refusal(&outcome)
            && let Some((body, ours)) = after_options_refused(&body)
            // An error that only names the member is taken for its refusal when the member
            // sent was Sluice's alone (`{"include_usage":true}`): nothing of the client's
            // then wrote the words, and the retry without it is all that is learnt from.
            && (refusal == OptionsRefusal::InItsWords || ours)
        {
            // Boxed: a rare second await of the large future, kept out of the request's own.
            outcome = Box::pin(attempt(
                &sending,
                None,
                method.clone(),
                uri.clone(),
                body.clone(),
            ))
            .await;
            if !ours {
                // Sent again with the member as Sluice writes it: refused, it is the member.
                again = Some((method, uri, body));
                continue;
            }
            // Learnt only from a refusal of the member as Sluice writes it alone, when the
            // same request without it was served: not from a request that fails either way
            // (one whose error merely echoes the body, as vLLM's validation errors do).
            if matches!(&outcome, Ok(Answer::Full { status, .. } | Answer::Stream { status, .. })
                if status.is_success())
            {
                if let Ok(mut refusing) = app.refuse_stream_options.lock() {
                    refusing.insert(options_key(backend, call.endpoint));
                }
                tracing::warn!(
                    backend = %backend.name,
                    "the backend refused stream_options and served the stream without it: its \
                     streams go without it from now on (their usage read from a chunk that \
                     carries it, or estimated)"
                );
            }
        }
        let took = sent.elapsed();
        acct.waited_upstream(took);
        let health = match &outcome {
            // Its first event ends the backend's streak, if it is on one; the rest is known
            // when the stream ends ([`StreamHealth`]): one that breaks after its first event
            // is the backend's failure, and counted a success here it ended the backend's
            // count of consecutive failures at every such stream.
            Ok(Answer::Stream { early: false, .. }) => Some(Outcome::Answering),
            // Its first event, when it comes, says so ([`Pending`]).
            Ok(Answer::Stream { early: true, .. }) => None,
            Ok(Answer::Full { .. }) => Some(Outcome::Success),
            Err(failure) => failure.health(),
        };
        match &outcome {
            Ok(Answer::Full { .. }) => {
                app.metrics.attempt(&label, AttemptOutcome::ok, Some(took));
            }
            Ok(Answer::Stream { early, .. }) => {
                app.metrics.attempt(&label, AttemptOutcome::ok, None);
                match early {
                    false => app.metrics.upstream_ttft(&label, took),
                    true => app.metrics.stream_committed_early(&label),
                }
                acct.relaying_stream_sent_at(sent);
            }
            Err(failure) => {
                app.metrics
                    .attempt(&label, failure.metric_outcome(), Some(took));
                if matches!(failure, Failure::OutOfFiles) {
                    tracing::error!(
                        backend = %backend.name,
                        "cannot open an upstream connection: this replica is out of file descriptors (raise its open-files limit)"
                    );
                }
                // An answer too large to pass on was billed too: its `usage`, read past the
                // size, is what the provider charged for it.
                if let Failure::Cut {
                    usage: Some(usage), ..
                } = failure
                    && let Some(tokens) = call.usage_in(backend.format, usage)
                {
                    acct.tokens(tokens);
                    acct.priced_in_usage(usage);
                }
                if let Failure::MemoryFull(full, usage) = failure {
                    app.metrics.answer_refused();
                    // The provider billed the answer the client does not get.
                    if let Some(usage) = usage.as_deref()
                        && let Some(tokens) = call.usage_in(backend.format, usage)
                    {
                        acct.tokens(tokens);
                        // Anthropic's usage names its tiers itself (OpenAI's `service_tier`
                        // stands beside it, not kept).
                        acct.priced_in_usage(usage);
                    }
                    match full {
                        Full::Replica => tracing::warn!(
                            backend = %backend.name,
                            "refused an answer: the answers in memory reached --max-buffered-answer-bytes"
                        ),
                        Full::Key => tracing::warn!(
                            backend = %backend.name,
                            key_id = acct.key_id(),
                            "refused an answer: the key's answers in memory reached its share (--max-buffered-answer-bytes-per-key)"
                        ),
                    }
                }
            }
        }
        // A count's 429 (or overload) is of its own limit, not of the model's answers; a call
        // on a stored response's (a poll's) says nothing of the model's creates.
        let health = health.filter(|health| !health_model.is_empty() || !health.of_model());
        // A flex request's 429 is the provider's flex capacity running short (OpenAI's flex
        // processing, Vertex's): it says nothing of the model at the standard tier, whose
        // requests were kept from the backend while it cooled. Still failed over: another
        // account may have the capacity. Read only when it comes.
        let health = health.filter(|health| {
            !matches!(
                health,
                Outcome::RateLimited {
                    scope: Scope::Model,
                    ..
                }
            ) || !call.asked_flex()
        });
        if let (Some(health), Some(basis)) = (health, basis) {
            record_health(app, backend, health_model, basis, &policy.cooldown, health);
        }
        match outcome {
            Ok(answer) => {
                let mode = match (&call.ids, backend.format, client) {
                    (None, ApiFormat::Anthropic, ApiFormat::OpenAi) => Mode::Translated(Box::new(
                        Translation::ChatFromEvents(anthropic::stream::ChunksFromEvents::new(
                            unix_now(),
                            match &call.send {
                                Outbound::Body { parsed, .. } => parsed.include_usage,
                                Outbound::Stored { .. } => false,
                            },
                        )),
                    )),
                    (None, ApiFormat::OpenAi, ApiFormat::Anthropic) => Mode::Translated(Box::new(
                        Translation::EventsFromChunks(anthropic::stream::EventsFromChunks::new(
                            match &call.send {
                                Outbound::Body { parsed, .. } => {
                                    anthropic::ToolNames::of_request(parsed.members())
                                }
                                Outbound::Stored { .. } => Default::default(),
                            },
                            acct.prompt_estimate(),
                        )),
                    )),
                    (None, ApiFormat::Anthropic, ApiFormat::Anthropic) => Mode::Messages {
                        usage: anthropic::stream::EventUsage::default(),
                        count_usage: call.endpoint == Endpoint::Messages,
                    },
                    (None, ApiFormat::OpenAi, ApiFormat::OpenAi) => Mode::Chat {
                        forward_usage: match &call.send {
                            Outbound::Body { parsed, .. } => parsed.include_usage,
                            Outbound::Stored { .. } => false,
                        },
                    },
                    (Some(ids), ..) => Mode::Responses {
                        ids: Box::new(IdRewrite {
                            backend_id: backend.id.clone(),
                            ..ids.clone()
                        }),
                        count_usage: call.count_usage,
                    },
                };
                // A stream's end is judged at the state its first event left: when that event
                // ended the backend's streak, the stream's own break after it is a failure of
                // the backend as it is now, not a report of a state that has passed (judged at
                // the old basis it was dropped, and a backend breaking every stream never
                // cooled down past the base).
                let streamed = basis.filter(|_| matches!(answer, Answer::Stream { .. }));
                let health = streamed.map(|basis| {
                    let now = app.store.clock().now().instant;
                    let basis = app.store.cooldowns().restate(
                        &backend.id,
                        &route.upstream_model,
                        basis,
                        now,
                    );
                    StreamHealth::new(app, backend, &route.upstream_model, basis, policy.cooldown)
                });
                // A client error passed on after an attempt that may have been billed (a
                // fallback's 408 or 409, which the SDKs send again, to the billed backend
                // first): not to be sent again, as a final failure would not be.
                let billed = acct.may_have_been_billed() && !call.bills_nothing();
                let pending = matches!(answer, Answer::Stream { early: true, .. }).then(|| {
                    Box::new(Pending {
                        event_by: deadline,
                        answer_by: sent + first_event_wait(&policy),
                        sent,
                        metrics: Arc::clone(&app.metrics),
                        backend: label,
                    })
                });
                let mut response = deliver(
                    app,
                    answer,
                    acct,
                    mode,
                    &policy,
                    deadline,
                    (health, pending),
                )
                .await;
                if billed && response.status().is_client_error() {
                    not_to_be_sent_again(&mut response);
                }
                return response;
            }
            Err(failure) => {
                // An answer refused for memory was billed: its backend's token reservation
                // stays, settled with the record (at its `usage`, or kept if none was read).
                // (One cut for its size with its `usage` read is billed as any cut answer is:
                // its 502 says not to send it again, its tokens are the usage's.)
                match failure {
                    Failure::MemoryFull(..) => {}
                    Failure::OutOfFiles => acct.attempt_unsent(),
                    // An answer that came and could not be used (a 200 stream that ended, or
                    // ran past 64 KiB, before its first event) was answered: the provider
                    // may have billed it, as the request's kept reserve already says.
                    _ => acct.attempt_failed(matches!(
                        failure,
                        Failure::Timeout { .. }
                            | Failure::Deadline
                            | Failure::Cut { .. }
                            | Failure::Lost(_)
                            | Failure::Invalid(_)
                    )),
                }
                // Not a background create that may have reached its provider: sent again, a
                // second job would run on another account, its id never given to anyone to
                // poll or cancel, while the first ran to its end.
                let retry = failure.retryable(&policy)
                    && !(background
                        && matches!(
                            failure,
                            Failure::Lost(_) | Failure::Timeout { .. } | Failure::Invalid(_)
                        ));
                tracing::info!(
                    request_id = acct.request_id(),
                    backend = %backend.name,
                    failure = %failure.describe(),
                    retry,
                    "upstream attempt failed"
                );
                // Not the request's answer while another failure says more (a busy primary's
                // 429 is the client's to wait on; a 404 would not be sent again).
                if failure.lacks_endpoint() {
                    lacking = Some((failure, backend.format));
                    continue;
                }
                // A backend rate limited (a 429, not an account out of credit; a 503 that
                // said when to come back) and cooling down is free again at its cooldown's
                // end: the client may come back then (see `fail`).
                let frees = failure
                    .says_when_free()
                    .then(|| cooldowns.check(&backend.id, &route.upstream_model, Instant::now()))
                    .and_then(Result::err);
                others_free = others_free.into_iter().chain(last_frees).min();
                last_frees = frees;
                last = Some((failure, backend.format));
                if !retry {
                    break;
                }
            }
        }
    }
    if last.is_none()
        && soonest.is_none()
        && let Some(refused) = untranslatable
    {
        return error(acct, *refused).await;
    }
    if last.is_none() && soonest.is_none() {
        last = lacking;
    }
    match last {
        Some((failure, format)) => {
            let free = call.bills_nothing();
            // Another candidate frees up at a known time: rate limited in this request, or
            // passed over for its rate limit (not for a cooldown: that may be a broken
            // backend's, which frees up to fail again).
            let others = others_free.into_iter().chain(limited).min();
            let frees = Frees {
                this: last_frees,
                others,
            };
            fail(acct, failure, format, call.endpoint.format(), free, frees).await
        }
        None if unsupported && soonest.is_none() => {
            let refused = match call.endpoint {
                Endpoint::CountTokens => ProxyError::TokenCountUnsupported(call.model.to_owned()),
                endpoint => ProxyError::EndpointUnsupported {
                    model: call.model.to_owned(),
                    path: endpoint.path(),
                },
            };
            error(acct, refused).await
        }
        None => match soonest {
            Some(until) => {
                app.metrics.rate_limited(LimitScope::backends);
                error(
                    acct,
                    ProxyError::BackendsBusy {
                        model: call.model.to_owned(),
                        retry_after: until.saturating_duration_since(Instant::now()),
                    },
                )
                .await
            }
            None => error(acct, ProxyError::UpstreamTimeout).await,
        },
    }
}

/// Answers with a proxy error, in the shape of the client's API, and records it (the answer
/// goes once the record is written).
pub(super) async fn error(acct: Accounting, err: ProxyError) -> Response {
    let status = err.status();
    let kind = err.error_kind();
    let mut response = err.into_response_as(acct.endpoint().format());
    acct.decorate(response.headers_mut());
    let _ = acct.finish_whole(status, kind, false).await;
    response
}

/// [`error`] for an answer the backend gave with a successful head, which the client cannot be
/// given (its body broke, stalled or passed `--max-response-bytes`, or cannot be read or
/// translated): the provider has generated, and billed, it, so the SDKs, which send a request
/// again on any 5xx, are told not to (`x-should-retry: false`): each try would be billed and
/// fail alike.
async fn error_after_billing(acct: Accounting, err: ProxyError) -> Response {
    let mut response = error(acct, err).await;
    not_to_be_sent_again(&mut response);
    response
}

/// Tells the SDKs not to send the request again on their own (`x-should-retry: false`).
fn not_to_be_sent_again(response: &mut Response) {
    response.headers_mut().insert(
        HeaderName::from_static("x-should-retry"),
        HeaderValue::from_static("false"),
    );
}

/// Whether a candidate of `rest` (the routes from the current one on) is in a pool after
/// `pool` and the attempt loop would send `call` to it now ([`could_take`]: it serves the
/// endpoint, the request can be written for its API, no cooldown or limit passes it over):
/// the request's last attempt then goes there ([`forward_call`]). Asked only before a last
/// attempt that follows a failed one. (Asking only whether it cooled, a fallback at its RPM
/// limit, or one of the other API for a call it cannot take, had the healthy primaries left
/// skipped and then was passed over itself: the request failed where it used to be served.)
#[cold]
fn later_pool_takes(
    app: &AppState,
    snapshot: &Snapshot,
    cooldowns: &cooldown::CooldownTracker,
    call: &Call<'_>,
    rest: &[&Route],
    pool: sluice_domain::pool::Pool,
) -> bool {
    rest.iter().any(|route| {
        snapshot
            .backends()
            .get(route.backend)
            .is_some_and(|b| b.pool > pool)
            && could_take(app, snapshot, cooldowns, call, route)
    })
}

/// When the candidates of a request that failed are free again, as far as Sluice knows.
struct Frees {
    /// The last one's cooldown ends: it was rate limited and is cooling.
    this: Option<Instant>,
    /// Another one that said it is only busy frees up.
    others: Option<Instant>,
}

/// Answers with the last failure: the upstream's own 429/5xx (in the client's API, `client`:
/// as it came when the backend speaks it, else translated), or 502/504, with its retry hints.
async fn fail(
    acct: Accounting,
    failure: Failure,
    backend: ApiFormat,
    client: ApiFormat,
    free: bool,
    Frees { this, others }: Frees,
) -> Response {
    // A passed-on 429 or 503 says to come back when its backend is free again (OpenAI's a
    // second, Azure's S0 tier a day): no later than another candidate that said it is only
    // busy frees up (`others`). With the last backend's wait, openai-python gave up on any
    // over 120 s and anthropic's 2.x slept through it, while the primary was free in a
    // second. A candidate not cooling is not taken as free now (it may have just failed, or
    // be one the retry would not reach), nor one cooling (it may be broken).
    //
    // What only the operator can fix, when it was this backend's and another is only busy
    // for a while the SDKs wait (a minute: openai-node and anthropic's newer SDKs wait no
    // longer), says when to come back rather than never.
    let operators = matches!(failure, Failure::Refused { .. })
        || matches!(&failure, Failure::Status { status, body, .. }
            if *status == StatusCode::TOO_MANY_REQUESTS && out_of_quota(body));
    let come_back = others
        .map(|others| others.saturating_duration_since(Instant::now()))
        .filter(|wait| operators && *wait <= Duration::from_secs(60));
    // A 429 that named no wait (vLLM's, TGI's, a stream's first event) says the one Sluice
    // knows: when its backend's cooldown, just started, ends, or another candidate frees up.
    // Without it the SDKs came back within a second, to Sluice's own 429.
    let says_when_free = failure.says_when_free();
    let failure = match (failure, others) {
        (
            Failure::Status {
                status,
                retry_after: None,
                content_type,
                body,
                in_body,
            },
            _,
        ) if says_when_free => Failure::Status {
            status,
            retry_after: this
                .into_iter()
                .chain(others)
                .min()
                .map(|free| free.saturating_duration_since(Instant::now())),
            content_type,
            body,
            in_body,
        },
        (
            Failure::Status {
                status,
                retry_after: Some(wait),
                content_type,
                body,
                in_body,
            },
            Some(others),
        ) => Failure::Status {
            status,
            retry_after: Some(wait.min(others.saturating_duration_since(Instant::now()))),
            content_type,
            body,
            in_body,
        },
        (failure, _) => failure,
    };
    // An attempt that timed out or broke after it was sent may be generating, and billed:
    // the SDKs, which send a 408, 409, 429 or 5xx again twice (each time through every
    // backend), are told not to, whatever the last attempt's failure was (a fallback's 429
    // after a primary's timeout too: its retry went to the primary first, billed again).
    // Unless the call bills nothing (`free`).
    let billed = acct.may_have_been_billed() && !free;
    let mut response = answer_failure(acct, failure, backend, client).await;
    if billed {
        not_to_be_sent_again(&mut response);
    } else if let Some(wait) = come_back {
        let headers = response.headers_mut();
        headers.remove("x-should-retry");
        headers.insert(
            header::RETRY_AFTER,
            HeaderValue::from(crate::error::retry_after_secs(wait)),
        );
    }
    response
}

/// Whether an answer's head says something other than the backend's API answered: a
/// redirect (the client follows none: it would carry the key to another host), an egress
/// proxy's 407, a web page as a 2xx (no API Sluice speaks answers a call with `text/html`).
fn not_the_api(status: StatusCode, content_type: Option<&HeaderValue>) -> bool {
    let web_page = || {
        content_type.is_some_and(|t| {
            t.as_bytes()
                .get(..9)
                .is_some_and(|media| media.eq_ignore_ascii_case(b"text/html"))
        })
    };
    status.is_redirection()
        || status == StatusCode::PROXY_AUTHENTICATION_REQUIRED
        || (status.is_success() && web_page())
}

/// What answered instead of the API ([`not_the_api`]), for the log line: a redirect's target
/// without its query (which may hold a key). Out of the request path's code.
#[cold]
#[inline(never)]
fn what_answered(status: StatusCode, headers: &HeaderMap) -> String {
    if status.is_redirection() {
        let to = headers
            .get(header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .and_then(|l| l.split(['?', '#']).next())
            .unwrap_or("nowhere");
        format!(
            "answered {status}, a redirect to {to}: never followed; correct the backend's base_url"
        )
    } else if status == StatusCode::PROXY_AUTHENTICATION_REQUIRED {
        "the egress proxy asked for credentials (407)".to_owned()
    } else {
        format!(
            "answered {status} with a web page (text/html), not the API: a proxy's page, or a \
             base_url naming a web site?"
        )
    }
}

/// [`fail`]'s answer, before the retry hint.
async fn answer_failure(
    acct: Accounting,
    failure: Failure,
    backend: ApiFormat,
    client: ApiFormat,
) -> Response {
    match failure {
        // OpenAI's account out of credit, which it says with a 429 `insufficient_quota`: as
        // a 402 or Anthropic's "credit balance is too low" is, not the provider's text, in
        // which clients read their own key's budget spent (Sluice's, in the same words).
        Failure::Status { status, body, .. }
            if status == StatusCode::TOO_MANY_REQUESTS && out_of_quota(&body) =>
        {
            error(acct, ProxyError::UpstreamUnfunded).await
        }
        Failure::Status {
            status,
            retry_after,
            content_type,
            body,
            ..
        } => {
            let (status, content_type, body) = match (backend, client) {
                (ApiFormat::Anthropic, ApiFormat::OpenAi) => {
                    let (status, body) = anthropic::error::to_openai(status, &body);
                    (status, None, body)
                }
                (ApiFormat::OpenAi, ApiFormat::Anthropic) => {
                    (status, None, anthropic::error::to_anthropic(status, &body))
                }
                _ => (status, content_type, body),
            };
            let mut response = Response::new(Body::from(body));
            *response.status_mut() = status;
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                content_type.unwrap_or(HeaderValue::from_static("application/json")),
            );
            if let Some(wait) = retry_after {
                headers.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(crate::error::retry_after_secs(wait)),
                );
            }
            acct.decorate(headers);
            let _ = acct
                .finish_whole(status, ErrorKind::UpstreamStatus, false)
                .await;
            response
        }
        Failure::Connect(_) => error(acct, ProxyError::UpstreamConnect).await,
        Failure::Lost(_) => error(acct, ProxyError::UpstreamConnectionLost).await,
        Failure::Refused {
            why: Refusal::Key, ..
        } => error(acct, ProxyError::UpstreamCredentials).await,
        Failure::Refused {
            why: Refusal::Unfunded,
            ..
        } => error(acct, ProxyError::UpstreamUnfunded).await,
        Failure::Refused {
            why: Refusal::Model | Refusal::Feature,
            ..
        } => error(acct, ProxyError::UpstreamModelUnavailable).await,
        Failure::Invalid(_) | Failure::NotTheApi(_) => {
            error(acct, ProxyError::UpstreamInvalid).await
        }
        // Billed ([`fail`] says not to send it again).
        Failure::Cut { timeout: false, .. } => error(acct, ProxyError::UpstreamInvalid).await,
        Failure::Cut { timeout: true, .. } => error(acct, ProxyError::UpstreamTimeout).await,
        Failure::Timeout { .. } | Failure::Deadline => {
            error(acct, ProxyError::UpstreamTimeout).await
        }
        Failure::MemoryFull(Full::Replica, _) => error(acct, ProxyError::AnswersBusy).await,
        Failure::MemoryFull(Full::Key, _) => error(acct, ProxyError::KeyAnswersBusy).await,
        Failure::OutOfFiles => error(acct, ProxyError::OutOfFiles).await,
    }
}

/// Whether the attempt loop of [`forward_call`] would send `call` to `route` now: its backend
/// serves the endpoint, the request can be written for its API, and neither a cooldown nor a
/// rate or token limit passes it over (looked at, nothing taken).
fn could_take(
    app: &AppState,
    snapshot: &Snapshot,
    cooldowns: &cooldown::CooldownTracker,
    call: &Call<'_>,
    route: &Route,
) -> bool {
    let Some(backend) = snapshot.backends().get(route.backend) else {
        return false;
    };
    let now = Instant::now();
    // The translation last: it writes the whole body.
    backend.uri(call.endpoint).is_some()
        && cooldowns
            .check(&backend.id, &route.upstream_model, now)
            .is_ok()
        && backend.limiter.as_ref().is_none_or(|limiter| {
            !call.takes_from_rpm_limit() || limiter.available_in(now).is_zero()
        })
        && backend
            .tokens
            .as_ref()
            .is_none_or(|bucket| !call.count_usage || bucket.available_in(now).is_zero())
        && translated_body(app, call, backend, route).is_none_or(|body| body.is_ok())
}

/// The body `route`'s backend gets when it speaks the other API than the client's (`None`
/// when it speaks the client's: it gets the client's bytes), or why the request cannot be
/// written for it.
///
/// The translation reads the body as a tree of JSON values, which can take many times the
/// body's bytes (an array of zeros: 2 bytes an element in the text, 32 to 64 in the tree):
/// a body past [`SMALL_TREE`] holds the room its tree may take ([`ParsedRequest::tree_bytes`])
/// from the memory for request bodies while it is translated, or is refused as that memory
/// refuses bodies (503 `server_busy`; 413 when no room could ever hold it). Uncounted, a
/// handful of 16 MiB bodies translated at once on the serving threads took gigabytes.
fn translated_body(
    app: &AppState,
    call: &Call<'_>,
    backend: &Backend,
    route: &Route,
) -> Option<Result<Bytes, ProxyError>> {
    let Outbound::Body { parsed, .. } = &call.send else {
        return None;
    };
    let to_messages = match (backend.format, call.endpoint.format()) {
        (ApiFormat::Anthropic, ApiFormat::OpenAi) => true,
        (ApiFormat::OpenAi, ApiFormat::Anthropic) => false,
        _ => return None,
    };
    // A tree is at most about 65 times its text (a byte and a separator a value): a text that
    // small is not counted.
    let tree = match parsed.text_bytes().saturating_mul(66) <= SMALL_TREE {
        true => 0,
        false => parsed.tree_bytes(),
    };
    let _room = match tree <= SMALL_TREE {
        true => None,
        false => match u32::try_from(tree)
            .ok()
            .filter(|&tree| tree as usize <= app.limits.max_buffered_body_bytes)
        {
            None => return Some(Err(ProxyError::BodyTooManyValues)),
            Some(tree) => match Arc::clone(&app.body_memory).try_acquire_many_owned(tree) {
                Ok(room) => Some(room),
                Err(_) => return Some(Err(ProxyError::BodiesBusy)),
            },
        },
    };
    let body = match to_messages {
        true => messages_body(parsed, route, backend.sampling, call.stream),
        false => chat_body(parsed, route, backend.completion_limit),
    };
    Some(body.map(|body| capped(body, route.max_output_tokens)))
}

/// The most memory a translation's tree of values takes without holding room for it: each
/// serving thread translates one request at a time, so these add up to a few megabytes.
const SMALL_TREE: usize = 4 << 20;

/// What every call of one attempt to a backend shares ([`attempt`]).
#[derive(Clone, Copy)]
struct Sending<'a> {
    client: &'a UpstreamClient,
    sleeps: &'a KeptSleeps,
    /// When the attempt started (its first byte's deadline counts from then).
    sent: Instant,
    /// Whether another backend could be asked if this attempt timed out; when none could, it
    /// waits for its answer to the deadline ([`attempt`]).
    moves_on: &'a (dyn Fn() -> bool + Sync),
    backend: &'a Backend,
    /// What an Anthropic backend gets of the client's request as it came.
    passed: &'a [(HeaderName, HeaderValue)],
    stream: bool,
    policy: &'a Policy,
    deadline: Instant,
    max_response: usize,
    /// The answers' memory, the key whose share an answer takes, and whether an answer
    /// refused for memory is read on for its `usage`.
    memory: (&'a Arc<AnswerMemory>, &'a str, bool),
    /// The size below which an answer takes none of that memory.
    uncounted: usize,
    /// The endpoint called (`count_tokens`, legacy completions and embeddings move on from a
    /// backend without them).
    endpoint: Endpoint,
    /// A stream whose head came but whose first event has not by then (`--stream-keepalive`
    /// after the request arrived) is committed to without it ([`attempt`]), and the
    /// keep-alive's interval.
    committed_by: Option<(Instant, Duration)>,
    /// A Responses create (not a background one, whose job exists once created): its
    /// lifecycle events are held until its output begins ([`LifecycleHold`]).
    holds_lifecycle: bool,
}

/// How long a stream's first event is waited for once its head came, to fail over: a whole
/// answer's wait, `answer_timeout` (or `first_byte_timeout`, the longer), since a reasoning
/// model sends it once it has thought.
fn first_event_wait(policy: &Policy) -> Duration {
    policy.answer_timeout.max(policy.first_byte_timeout)
}

/// The media type of a stream's answer.
const SSE: &str = "text/event-stream";

/// At least this long (or `--stream-keepalive`, the shorter) passes between a stream's head
/// and its commitment before its first event.
const COMMIT_AFTER_THE_HEAD: Duration = Duration::from_secs(1);

/// One call to `to.backend`: `method` to `uri` with `body`, on the headers `spare` when given.
async fn attempt(
    to: &Sending<'_>,
    spare: Option<HeaderMap>,
    method: Method,
    uri: http::Uri,
    body: Bytes,
) -> Result<Answer, Failure> {
    let Sending {
        client,
        sleeps,
        sent,
        moves_on,
        backend,
        passed,
        stream,
        policy,
        deadline,
        max_response,
        memory: (memory, key, counts_usage),
        uncounted,
        endpoint,
        committed_by,
        holds_lifecycle,
    } = *to;
    let has_body = method == Method::POST;
    let mut request = Request::new(body);
    if let Some(mut headers) = spare {
        // Nothing of the client's goes upstream but what is added below.
        headers.clear();
        *request.headers_mut() = headers;
    }
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    let headers = request.headers_mut();
    if has_body {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    // No content coding: the answer is read for its usage and passed on with its media type
    // alone, and a server may compress an answer to a request that names none (RFC 9110).
    headers.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    for (name, value) in backend.auth_headers() {
        headers.insert(name, value.clone());
    }
    // After the backend's own: the client's anthropic-version wins. A header the client sent
    // on several lines (`anthropic-beta: a`, `anthropic-beta: b`) goes as it came.
    for (name, _) in passed {
        headers.remove(name);
    }
    for (name, value) in passed {
        headers.append(name.clone(), value.clone());
    }
    // A stream's head comes once the provider has taken the request; a whole answer's only
    // once all of it is generated, which a reasoning model may take minutes over, and a
    // stream's first event once it has thought (see below). The answer is given up at
    // `answer_timeout` only for another backend to be asked: with none left, it is waited
    // for to the deadline (cut off, a model thinking for longer was never answered, and
    // every attempt was billed).
    let head_wait = match stream {
        true => policy.first_byte_timeout,
        false => policy.answer_timeout,
    };
    let event_wait = first_event_wait(policy);
    // Cut by the request's deadline before its own wait was over: not the backend's failure.
    let timed_out = |by: Instant, wait: Duration, of_model: bool| {
        if by < sent + wait {
            Failure::Deadline
        } else {
            Failure::Timeout { of_model }
        }
    };
    // A connect timeout is a connect error (the connector's own limit); only our deadlines
    // make a timeout.
    let mut sending = std::pin::pin!(client.send(request, backend.host()));
    let mut head_by = deadline.min(sent + head_wait);
    let upstream = loop {
        match within(sleeps, move || head_by, sending.as_mut()).await {
            Err(_) if !stream && head_by < deadline && !moves_on() => head_by = deadline,
            Err(_) => return Err(timed_out(head_by, head_wait, !stream)),
            Ok(response) => break response,
        }
    };
    let upstream = match upstream {
        Err(e) if upstream::out_of_files(&*e) => return Err(Failure::OutOfFiles),
        Err(e) if upstream::never_sent(&*e) => {
            return Err(Failure::Connect(upstream::error_chain(&*e)));
        }
        Err(e) => return Err(Failure::Lost(upstream::error_chain(&*e))),
        Ok(response) => response,
    };
    let (head, mut upstream) = upstream.into_parts();
    let status = head.status;
    let content_type = head.headers.get(header::CONTENT_TYPE).cloned();
    if not_the_api(status, content_type.as_ref()) {
        return Err(Failure::NotTheApi(what_answered(status, &head.headers)));
    }
    if status == StatusCode::UNAUTHORIZED {
        return Err(Failure::Refused {
            status,
            why: Refusal::Key,
        });
    }
    if status == StatusCode::FORBIDDEN {
        // Read for what was refused: the key, or one model to the account.
        let body = error_body(sleeps, upstream, policy, deadline).await;
        return Err(Failure::Refused {
            status,
            why: refused_model(&body).unwrap_or(Refusal::Key),
        });
    }
    if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
        let retry_after = cooldown::retry_after(&head.headers, SystemTime::now());
        let body = error_body(sleeps, upstream, policy, deadline).await;
        // Google says when to come back in its body alone.
        let retry_after = retry_after.or_else(|| retry_delay_in_body(&body));
        let body = redact_error(body, backend.api_key());
        return Err(Failure::Status {
            status,
            retry_after,
            content_type,
            body,
            in_body: false,
        });
    }
    let is_sse = content_type
        .as_ref()
        .and_then(|v| v.to_str().ok())
        // Media types are case-insensitive (`Text/Event-Stream` is one).
        .and_then(|v| v.get(..SSE.len()))
        .is_some_and(|v| v.eq_ignore_ascii_case(SSE));
    if stream && status.is_success() && is_sse {
        // Wait for the first event before committing: until then another backend can still
        // take over. Comments before it (DeepSeek's `: keep-alive` while the request waits
        // in its queue, OpenRouter's `: OPENROUTER PROCESSING`) do not count; they go to the
        // client with it. The head came: the provider is generating, and a reasoning model
        // sends its first chunk only with the answer's first token, after it has thought
        // (minutes, at a high effort). So the first event is waited for as long as a whole
        // answer (`answer_timeout`); cut off at the first byte's wait, every attempt of such
        // a request failed over, billed, and none was ever answered.
        let mut first = BytesMut::new();
        // A Responses create's events before its output, read as they come: once a lifecycle
        // event has come (`hold.held`) the stream has begun, and is committed to rather than
        // given up.
        let mut hold = holds_lifecycle.then(LifecycleHold::default);
        let mut first_event_by = deadline.min(sent + event_wait);
        // Not before a moment after the head, however late the attempt: an overloaded
        // provider's error comes as the first event right after it (Anthropic's
        // `overloaded_error`), and is failed over.
        let commit_at = committed_by
            .map(|(by, every)| by.max(Instant::now() + every.min(COMMIT_AFTER_THE_HEAD)));
        loop {
            let wait_by = commit_at.map_or(first_event_by, |by| by.min(first_event_by));
            let chunk =
                match within(sleeps, move || wait_by, upstream::next_chunk(&mut upstream)).await {
                    // The client has heard nothing for `--stream-keepalive`: a front's read
                    // timeout would soon cut it (and its SDK send the request again, billed
                    // twice). The stream is committed to now, its head sent with a comment, and
                    // the relay keeps the client hearing from it; an error or silence from here
                    // on ends the stream as it would after its first event, with no failover.
                    Err(_) if wait_by < first_event_by => {
                        if first.is_empty() {
                            first.extend_from_slice(KEEP_ALIVE);
                        }
                        return Ok(Answer::Stream {
                            status,
                            upstream,
                            first: first.freeze(),
                            early: true,
                        });
                    }
                    Err(_) if hold.as_ref().is_some_and(|h| h.held) => {
                        return Ok(Answer::Stream {
                            status,
                            upstream,
                            first: first.freeze(),
                            early: false,
                        });
                    }
                    Err(_) if first_event_by < deadline && !moves_on() => {
                        first_event_by = deadline;
                        continue;
                    }
                    Err(_) => return Err(timed_out(first_event_by, event_wait, true)),
                    // The head came: the provider has the request.
                    Ok(Err(e)) => return Err(Failure::Lost(upstream::error_chain(&*e))),
                    Ok(Ok(None)) => {
                        return Err(Failure::Invalid(
                            "the stream ended before its first event".into(),
                        ));
                    }
                    Ok(Ok(Some(chunk))) => chunk,
                };
            if first.is_empty()
                && !holds_lifecycle
                && starts_an_event(&chunk)
                && !opens_with_an_error(&chunk)
            {
                // The usual case: the first chunk holds the first event.
                return Ok(Answer::Stream {
                    status,
                    upstream,
                    first: chunk,
                    early: false,
                });
            }
            first.extend_from_slice(&chunk);
            let read = match &mut hold {
                Some(hold) => Some(hold.push(&chunk, backend.api_key())),
                None => starts_an_event(&first).then(|| first_event(&first, backend.api_key())),
            };
            if let Some(read) = read {
                match read {
                    FirstEvent::Commit => {
                        return Ok(Answer::Stream {
                            status,
                            upstream,
                            first: first.freeze(),
                            early: false,
                        });
                    }
                    FirstEvent::Failed(failure) => return Err(failure),
                    FirstEvent::Unfinished => {}
                }
            }
            // Lifecycle events echo the request's instructions and tools (tens of KiB for
            // Codex, twice; `response.created` alone may pass 64 KiB): held up to a bound from
            // the first byte, then committed to as they are, a Responses stream all the same.
            if hold.is_some() && first.len() > MAX_HELD_LIFECYCLE {
                return Ok(Answer::Stream {
                    status,
                    upstream,
                    first: first.freeze(),
                    early: false,
                });
            }
            if hold.is_none() && first.len() > MAX_BEFORE_FIRST_EVENT {
                return Err(Failure::Invalid(format!(
                    "more than {MAX_BEFORE_FIRST_EVENT} bytes of the stream before its first event"
                )));
            }
        }
    }
    // The declared `content-length`, as hyper read it (no second look at the headers).
    let declared = http_body::Body::size_hint(&upstream)
        .exact()
        .and_then(|n| usize::try_from(n).ok());
    let headers = only_content_type(head.headers, content_type);
    let (mut body, memory) = read_body(
        sleeps,
        upstream,
        max_response,
        policy.idle_stream_timeout,
        deadline,
        Some((memory, key, uncounted)),
        declared,
        counts_usage && status.is_success(),
    )
    .await
    .map_err(Failure::cut)?;
    // An account out of credit (a 402 that is not about this request's size: OpenRouter
    // answers one the account could pay with fewer `max_tokens` with 402 too, which the
    // client can fix, and which says nothing of the backend).
    if status == StatusCode::PAYMENT_REQUIRED && !fewer_tokens_would_do(&body) {
        return Err(Failure::Refused {
            status,
            why: Refusal::Unfunded,
        });
    }
    // Groq (and Cerebras) answer a request whose tokens alone pass the account's per-minute
    // limit with 413 where OpenAI answers 429, in the same words: handled as OpenAI's is.
    if status == StatusCode::PAYLOAD_TOO_LARGE && refuses_the_request_itself(&body) {
        return Err(Failure::Status {
            status,
            retry_after: None,
            content_type: headers.get(header::CONTENT_TYPE).cloned(),
            body: redact_error(body, backend.api_key()),
            in_body: false,
        });
    }
    if status == StatusCode::BAD_REQUEST {
        if refuses_the_key(&body) {
            return Err(Failure::Refused {
                status,
                why: Refusal::Key,
            });
        }
        if out_of_credit(&body) {
            return Err(Failure::Refused {
                status,
                why: Refusal::Unfunded,
            });
        }
    }
    // The model the operator routed here is unknown to the backend, or not open to its
    // account: the client asked for a model Sluice serves, so not the client's mistake.
    if status == StatusCode::NOT_FOUND
        && let Some(why) = refused_model(&body)
    {
        return Err(Failure::Refused { status, why });
    }
    // A server that serves Messages without Anthropic's `count_tokens` (Ollama's, LiteLLM's
    // before late 2025), or OpenAI's API without its legacy completions or its embeddings
    // (Groq's "Unknown request URL", TGI's, Mistral's), or the Responses API without its
    // compactions and input token counts (a server with `POST /v1/responses` alone): another
    // backend of the model may serve the call; the last one's answer is the client's when
    // none does.
    if matches!(
        endpoint,
        Endpoint::CountTokens
            | Endpoint::Completions
            | Endpoint::Embeddings
            | Endpoint::ResponsesCompact
            | Endpoint::ResponsesInputTokens
    ) && matches!(
        status,
        StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED
    ) {
        return Err(Failure::Status {
            status,
            retry_after: None,
            content_type: headers.get(header::CONTENT_TYPE).cloned(),
            body: redact_error(body, backend.api_key()),
            in_body: false,
        });
    }
    // A chat or completion answer that is its provider's error in a 2xx (OpenRouter's).
    if status.is_success()
        && backend.format == ApiFormat::OpenAi
        && matches!(
            endpoint,
            Endpoint::ChatCompletions | Endpoint::Completions | Endpoint::Messages
        )
        && let Some(status) = error_in_answer(&body)
    {
        return Err(Failure::Status {
            status,
            retry_after: None,
            content_type: Some(HeaderValue::from_static("application/json")),
            body: redact_error(body, backend.api_key()),
            in_body: true,
        });
    }
    // A Responses create's failure in a 200 (not a stored one's, read again: history).
    if status.is_success()
        && endpoint == Endpoint::Responses
        && counts_usage
        && let Some(failure) = failed_response(&body, backend.api_key())
    {
        return Err(failure);
    }
    if !status.is_success() {
        // A 4xx is passed on as it came, but for the key some providers quote in it.
        body = redact_error(body, backend.api_key());
    }
    Ok(Answer::Full {
        status,
        headers,
        body,
        memory,
    })
}

/// `headers` emptied but for `content_type` (the first of theirs), the one upstream header an
/// answer passes on. The map is the upstream answer's own: the client's answer is built on
/// it, which saves allocating a map for it and freeing this one. (The value is read with
/// `get` and a clone: `remove` costs twice as much.)
fn only_content_type(mut headers: HeaderMap, content_type: Option<HeaderValue>) -> HeaderMap {
    headers.clear();
    if let Some(content_type) = content_type {
        headers.insert(header::CONTENT_TYPE, content_type);
    }
    headers
}

/// The longest pause in reading an error's body ([`error_body`]).
const ERROR_BODY_WAIT: Duration = Duration::from_secs(10);

/// An error answer's body, up to [`MAX_ERROR_BODY`]; empty when it cannot be read.
async fn error_body(
    sleeps: &KeptSleeps,
    upstream: UpstreamBody,
    policy: &Policy,
    deadline: Instant,
) -> Bytes {
    // A few hundred bytes the server has decided to send: a body stalling is not a model
    // thinking, and the next backend waits on it. Nor is one trickling out a byte at a time,
    // never silent for the pause: the whole of it gets three pauses.
    let pause = policy.idle_stream_timeout.min(ERROR_BODY_WAIT);
    read_body(
        sleeps,
        upstream,
        MAX_ERROR_BODY,
        pause,
        deadline.min(Instant::now() + pause * 3),
        None,
        None,
        false,
    )
    .await
    .map(|(body, _)| body)
    .unwrap_or_default()
}

/// Reads a whole body of at most `max` bytes, with `idle` as the longest pause. One that
/// `memory` cannot hold is refused, and read to its end for its `usage` when
/// `follow_usage` ([`usage_of_the_rest`]).
#[allow(clippy::too_many_arguments)]
async fn read_body(
    sleeps: &KeptSleeps,
    mut upstream: UpstreamBody,
    max: usize,
    idle: Duration,
    deadline: Instant,
    memory: Option<(&Arc<AnswerMemory>, &str, usize)>,
    declared: Option<usize>,
    follow_usage: bool,
) -> Result<(Bytes, Option<AnswerPermit>), Failure> {
    if let Some(declared) = declared.filter(|&n| n > max) {
        // Past what would be read for its `usage`, not read at all.
        let follow_usage = follow_usage && declared <= max.saturating_mul(READ_FOR_USAGE_PAST_MAX);
        return Err(too_large(
            sleeps,
            upstream,
            Collected::expecting(0),
            max,
            idle,
            deadline,
            follow_usage,
        )
        .await);
    }
    let mut collected = Collected::expecting(declared.unwrap_or(0));
    let mut held: Option<AnswerPermit> = None;
    let mut counted = 0;
    loop {
        let until = || deadline.min(Instant::now() + idle);
        match within(sleeps, until, upstream::next_chunk(&mut upstream)).await {
            // Cut by the request's deadline, not by the backend's silence: not its failure.
            Err(_) if Instant::now() >= deadline => return Err(Failure::Deadline),
            Err(_) => return Err(Failure::Timeout { of_model: false }),
            Ok(Err(e)) => return Err(Failure::Invalid(upstream::error_chain(&*e))),
            Ok(Ok(None)) => return Ok((collected.into_bytes(), held)),
            Ok(Ok(Some(chunk))) => {
                if collected.len() + chunk.len() > max {
                    drop(held);
                    collected.push(chunk);
                    return Err(too_large(
                        sleeps,
                        upstream,
                        collected,
                        max,
                        idle,
                        deadline,
                        follow_usage,
                    )
                    .await);
                }
                collected.push(chunk);
                // What the answer holds, its buffer's capacity, taken as it grows past
                // what goes uncounted (all of it then).
                let holds = collected.held();
                if let Some((memory, key, uncounted)) = memory
                    && holds > uncounted
                    && holds > counted
                {
                    let permit = match memory.take(key, holds - counted) {
                        Ok(permit) => permit,
                        Err(full) => {
                            drop(held);
                            // Boxed: the rare path's state stays out of every answer's
                            // future, which is moved.
                            let usage = match follow_usage {
                                true => {
                                    Box::pin(usage_of_the_rest(
                                        sleeps, upstream, collected, max, idle, deadline,
                                    ))
                                    .await
                                }
                                false => None,
                            };
                            return Err(Failure::MemoryFull(full, usage));
                        }
                    };
                    counted = holds;
                    match &mut held {
                        Some(held) => held.merge(permit),
                        None => held = Some(permit),
                    }
                }
            }
        }
    }
}

/// How many times `--max-response-bytes` an answer too large to pass on is read for its
/// `usage` (only that value kept).
const READ_FOR_USAGE_PAST_MAX: usize = 4;

/// The failure of an answer larger than `max`, `read` its beginning: when `follow_usage`, cut
/// with its `usage`, read from the rest of it ([`usage_of_the_rest`], up to
/// [`READ_FOR_USAGE_PAST_MAX`] times `max`). The provider generated and billed it (`n` choices
/// with `logprobs` reach 64 MiB): without its figures the key was charged its prompt's
/// reserve alone.
async fn too_large(
    sleeps: &KeptSleeps,
    upstream: UpstreamBody,
    read: Collected,
    max: usize,
    idle: Duration,
    deadline: Instant,
    follow_usage: bool,
) -> Failure {
    let detail = format!("body larger than {max} bytes");
    if !follow_usage {
        return Failure::Invalid(detail);
    }
    // Boxed: the rare path's state stays out of every answer's future, which is moved.
    let usage = Box::pin(usage_of_the_rest(
        sleeps,
        upstream,
        read,
        max.saturating_mul(READ_FOR_USAGE_PAST_MAX),
        idle,
        deadline,
    ))
    .await;
    Failure::Cut {
        timeout: false,
        detail,
        usage,
    }
}

/// The text of the top-level `usage` of an answer refused for memory, `read` its beginning:
/// the rest is read and thrown away, only that value kept ([`UsageInPassing`]), within the
/// answer's bounds (its size, the longest pause, the deadline). The provider generated and
/// billed the answer; without its figures the key would be charged only its prompt's reserve.
async fn usage_of_the_rest(
    sleeps: &KeptSleeps,
    mut upstream: UpstreamBody,
    read: Collected,
    max: usize,
    idle: Duration,
    deadline: Instant,
) -> Option<Vec<u8>> {
    let mut passing = UsageInPassing::default();
    let mut len = read.len();
    passing.feed(&read.into_bytes());
    if passing.hopeless() {
        return None;
    }
    loop {
        let until = || deadline.min(Instant::now() + idle);
        match within(sleeps, until, upstream::next_chunk(&mut upstream)).await {
            Ok(Ok(Some(chunk))) => {
                len += chunk.len();
                if len > max {
                    return None;
                }
                passing.feed(&chunk);
                if passing.hopeless() {
                    return None;
                }
            }
            Ok(Ok(None)) => return passing.value().map(<[u8]>::to_vec),
            Err(_) | Ok(Err(_)) => return None,
        }
    }
}

async fn deliver(
    app: &Arc<AppState>,
    answer: Answer,
    mut acct: Accounting,
    mode: Mode,
    policy: &Policy,
    deadline: Instant,
    (health, pending): (Option<StreamHealth>, Option<Box<Pending>>),
) -> Response {
    match answer {
        Answer::Full {
            status,
            mut headers,
            mut body,
            memory,
        } => {
            let status = match &mode {
                Mode::Translated(t) => match t.whole(status, &body, unix_now()) {
                    Ok((status, translated, tokens)) => {
                        if let Some(tokens) = tokens {
                            acct.tokens(tokens);
                            acct.priced_in(&body);
                        }
                        body = translated;
                        headers.insert(
                            header::CONTENT_TYPE,
                            HeaderValue::from_static("application/json"),
                        );
                        status
                    }
                    Err(tokens) => {
                        // The backend answered what the client cannot be given; what its
                        // `usage` says it spent is spent all the same.
                        if let Some(tokens) = tokens {
                            acct.tokens(tokens);
                            acct.priced_in(&body);
                        }
                        return error_after_billing(acct, ProxyError::UpstreamInvalid).await;
                    }
                },
                _ => status,
            };
            match &mode {
                Mode::Translated(_) => {}
                Mode::Messages { count_usage, .. } => {
                    // The message's `usage` alone is parsed, found as an OpenAI answer's is.
                    if *count_usage
                        && status.is_success()
                        && let Some(usage) = usage_value_of_answer(&body)
                            .and_then(anthropic::response::anthropic_usage_in)
                    {
                        acct.tokens(tokens_of(usage));
                        acct.priced_in(&body);
                    }
                }
                Mode::Chat { .. } => {
                    if status.is_success()
                        && let Some(tokens) = crate::utf8::text(&body).and_then(usage_of_answer)
                    {
                        acct.tokens(tokens);
                        acct.priced_in(&body);
                    }
                }
                Mode::Responses { ids, count_usage } if status.is_success() => {
                    match responses::rewrite_response(&body, ids) {
                        Ok(rewritten) => {
                            if *count_usage && let Some(tokens) = rewritten.tokens {
                                acct.tokens(tokens);
                                acct.priced_in(&body);
                            }
                            body = rewritten.bytes;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot read the upstream's response object");
                            return error_after_billing(acct, ProxyError::UpstreamInvalid).await;
                        }
                    }
                }
                // An error about a stored response quotes the upstream's id: show the client
                // the one it sent.
                Mode::Responses { ids, .. } => {
                    if let Some((theirs, ours)) = &ids.known {
                        body = replace_all(&body, theirs.as_bytes(), ours.as_bytes());
                    }
                }
            }
            // The permits go with the bytes, until the client has been sent them (or left).
            // Marked for the listener, which counts unmarked answers on h2 (not on HTTP/1:
            // nothing to mark there, and a response's extensions are an allocation).
            let counted = memory.is_some() && acct.is_multiplexed();
            let body = match memory {
                Some(memory) => Bytes::from_owner(Held {
                    body,
                    _memory: memory,
                }),
                None => body,
            };
            let mut response = Response::new(Body::from(body));
            *response.status_mut() = status;
            *response.headers_mut() = headers;
            if counted {
                response.extensions_mut().insert(CountedAnswer);
            }
            acct.decorate(response.headers_mut());
            let kind = if status.is_success() {
                ErrorKind::Unspecified
            } else {
                ErrorKind::UpstreamStatus
            };
            let _ = acct.finish_whole(status, kind, true).await;
            response
        }
        Answer::Stream {
            status,
            upstream,
            first,
            early: _,
        } => {
            let mut response = Response::new(Body::empty());
            *response.status_mut() = status;
            if acct.is_multiplexed() {
                response.extensions_mut().insert(CountedAnswer);
            }
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            );
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            acct.decorate(headers);
            acct.status_sent(status);
            acct.head_ready();
            let max_event = max_event_bytes(&mode, app.limits.max_response_bytes);
            // Begun, a stream runs to `stream_timeout` from its request's arrival
            // (`request_timeout` bounded its beginning: a committed stream's first event is
            // still due by then, `Pending::event_by`).
            let runs_until = deadline.max(acct.started() + policy.stream_run());
            response
                .extensions_mut()
                .insert(crate::deadline::RunsUntil(runs_until));
            *response.body_mut() = Body::new(Relay::new(
                upstream,
                first,
                acct,
                mode,
                policy.idle_stream_timeout,
                runs_until,
                max_event,
                app.tasks.token(),
                app.stopping.streams_end(),
                health,
                Arc::clone(&app.answer_memory),
                app.limits.stream_keepalive,
                pending,
            ));
            response
        }
    }
}

/// The largest event a stream may carry: `--max-response-bytes` for the Responses API, whose
/// events carry whole output items (an image generated in one comes whole, megabytes of
/// base64); [`MAX_DELTA_EVENT_BYTES`] at most for chat and Messages streams, whose events are
/// deltas, so that a stream holds no more than that while it reads one (a server that sends
/// its whole answer in one event stays far below it).
fn max_event_bytes(mode: &Mode, max_response: usize) -> usize {
    match mode {
        Mode::Responses { .. } => max_response,
        Mode::Chat { .. } | Mode::Translated(_) | Mode::Messages { .. } => {
            max_response.min(MAX_DELTA_EVENT_BYTES)
        }
    }
}

/// See [`max_event_bytes`].
const MAX_DELTA_EVENT_BYTES: usize = 4 * 1024 * 1024;

/// Whole answers this small take no permits of [`AppState::answer_memory`] on HTTP/1: a
/// semaphore and an allocation at every request cost more than 1 % of its instructions, and
/// the connection limit bounds them (one at a time each). On HTTP/2, where a connection
/// carries up to 200 requests, every answer counts. (Nor do they hold a deadline on HTTP/1:
/// see `server::hold_deadline`, which takes this bound.)
pub(crate) const SMALL_ANSWER_BYTES: usize = 64 * 1024;

/// An answer's bytes with what they hold of [`AppState::answer_memory`].
pub(super) struct Held {
    body: Bytes,
    _memory: AnswerPermit,
}

impl Held {
    /// `body`, holding `memory` until its last copy is dropped (once sent).
    pub(super) fn bytes(body: Bytes, memory: AnswerPermit) -> Bytes {
        Bytes::from_owner(Self {
            body,
            _memory: memory,
        })
    }
}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        &self.body
    }
}

/// Whether `backend` refused `stream_options` at the endpoint a call of `endpoint` reaches
/// on this serving thread before.
fn refuses_stream_options(app: &AppState, backend: &Backend, endpoint: Endpoint) -> bool {
    app.refuse_stream_options.lock().is_ok_and(|refusing| {
        !refusing.is_empty() && refusing.contains(&options_key(backend, endpoint))
    })
}

/// What a refusal of `stream_options` is remembered by: the backend, and the endpoint a call
/// of `endpoint` reaches there (a Messages call translated for an OpenAI-format backend
/// reaches its chat completions).
fn options_key(backend: &Backend, endpoint: Endpoint) -> (String, Endpoint) {
    let reached = match (endpoint, backend.format) {
        (Endpoint::Messages, ApiFormat::OpenAi) => Endpoint::ChatCompletions,
        (endpoint, _) => endpoint,
    };
    (backend.id.clone(), reached)
}

/// How an answer may be a backend's refusal of `stream_options` ([`stream_options_refusal`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OptionsRefusal {
    /// In the words of a provider that refuses it.
    InItsWords,
    /// An error that names the member: its refusal in other words (Groq's "property
    /// 'stream_options' is unsupported", a strict decoder's "unknown field"), or one that
    /// echoes the body.
    Naming,
}

/// Whether an answer may be a backend's refusal of `stream_options`: a 400 or 422 whose error
/// says the member is not taken, in the words of the providers that refuse it (Mistral: 422
/// `extra_forbidden` at `["body","stream_options",…]`, its detail an object or a string of
/// JSON; Azure's older API versions: 400 "Unrecognized request argument supplied:
/// stream_options"), or one that merely names the member, which may echo the body.
fn stream_options_refusal(outcome: &Result<Answer, Failure>) -> Option<OptionsRefusal> {
    const REFUSALS: [&[u8]; 3] = [
        b"[\"body\",\"stream_options\"",
        b"[\\\"body\\\",\\\"stream_options\\\"",
        b"Unrecognized request argument supplied: stream_options",
    ];
    let Ok(Answer::Full { status, body, .. }) = outcome else {
        return None;
    };
    if !matches!(status.as_u16(), 400 | 422) {
        return None;
    }
    if REFUSALS
        .iter()
        .any(|refusal| memchr::memmem::find(body, refusal).is_some())
    {
        return Some(OptionsRefusal::InItsWords);
    }
    memchr::memmem::find(body, b"stream_options").map(|_| OptionsRefusal::Naming)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The SDKs' announced waits, the shorter of two, less a tenth (at most 2 s); nothing
    /// for what is not a positive number of seconds.
    #[test]
    fn the_clients_wait_is_what_its_sdk_announces_less_a_margin() {
        let wait = |pairs: &[(&'static str, &'static str)]| {
            let mut headers = HeaderMap::new();
            for (name, value) in pairs {
                headers.insert(*name, HeaderValue::from_static(value));
            }
            client_wait(&headers)
        };
        assert_eq!(
            wait(&[("x-stainless-read-timeout", "600.0")]),
            Some(Duration::from_secs(598))
        );
        assert_eq!(
            wait(&[
                ("x-stainless-timeout", "600"),
                ("x-stainless-read-timeout", "5")
            ]),
            Some(Duration::from_millis(4_500))
        );
        assert_eq!(
            wait(&[("x-stainless-timeout", "1")]),
            Some(Duration::from_millis(900))
        );
        for bad in ["0", "-5", "nan", "inf", "1e400", "soon", ""] {
            assert_eq!(wait(&[("x-stainless-read-timeout", bad)]), None, "{bad}");
        }
        assert_eq!(wait(&[]), None);
    }

    /// A refusal of `stream_options` is told from its providers' words, not from the member's
    /// name anywhere in an error: vLLM's validation errors echo the whole body, and a client's
    /// own bad request must not make a thread stop asking that backend for usage.
    #[test]
    fn a_refusal_of_stream_options_in_its_words_is_told_from_an_error_naming_it() {
        let answer = |status: u16, body: &str| {
            Ok(Answer::Full {
                status: StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
                headers: HeaderMap::new(),
                body: Bytes::from(body.to_owned()),
                memory: None,
            })
        };
        let mistral = r#"{"object":"error","message":{"detail":[{"type":"extra_forbidden","loc":["body","stream_options","include_usage"],"msg":"Extra inputs are not permitted","input":true}]},"type":"invalid_request_error","param":null,"code":null}"#;
        let mistral_2024 = r#"{"object":"error","message":"{\"detail\":[{\"type\":\"extra_forbidden\",\"loc\":[\"body\",\"stream_options\"],\"msg\":\"Extra inputs are not permitted\"}]}","type":"invalid_request_error"}"#;
        let azure = r#"{"error":{"message":"Unrecognized request argument supplied: stream_options","type":"invalid_request_error","param":null,"code":null}}"#;
        let refusal = |status, body| stream_options_refusal(&answer(status, body));
        for body in [mistral, mistral_2024, azure] {
            assert_eq!(
                refusal(422, body),
                Some(OptionsRefusal::InItsWords),
                "{body}"
            );
            assert_eq!(
                refusal(400, body),
                Some(OptionsRefusal::InItsWords),
                "{body}"
            );
            assert_eq!(refusal(500, body), None, "{body}");
        }
        // Errors that name the member: its refusal in other words, or the body echoed.
        let groq = r#"{"error":{"message":"property 'stream_options' is unsupported, did you mean 'stream'?","type":"invalid_request_error"}}"#;
        let echoed = r#"{"object":"error","message":"[{'type': 'value_error', 'loc': ('body',), 'msg': 'temperature must be in [0, 2]', 'input': {'model': 'm', 'temperature': 9, 'stream': True, 'stream_options': {'include_usage': True}}}]","type":"BadRequestError","code":400}"#;
        let own = r#"{"error":{"message":"Unknown parameter: 'stream_options.include_obfuscation'.","type":"invalid_request_error","param":"stream_options.include_obfuscation","code":"unknown_parameter"}}"#;
        for body in [groq, echoed, own] {
            assert_eq!(refusal(400, body), Some(OptionsRefusal::Naming), "{body}");
        }
        assert_eq!(refusal(400, r#"{"error":{"message":"bad"}}"#), None);
    }
}
