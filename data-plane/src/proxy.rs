//! The HTTP surface, OpenAI's API and Anthropic's Messages API: routes, client
//! authentication, body limits, and the hand-off to routing (`forward`) and stream relaying
//! (`relay`).

mod accounting;
mod estimate;
mod failure;
pub(crate) mod forward;
mod health;
mod kept_sleeps;
mod outgoing;
mod relay;
mod request_log;
mod stored;
mod usage_figures;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::{Bytes, BytesMut};
use futures::FutureExt;
use futures::future::Either;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, header};
use http_body_util::BodyExt;
use serde::Serialize;
use sluice_proto::limits::MAX_REQUEST_ID_BYTES;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tower_service::Service;

pub use accounting::{CLIENT_CLOSED_REQUEST, Tokens};
pub use kept_sleeps::KeptSleeps;
pub use usage_figures::{usage_of, usage_of_answer, usage_value_of_answer};

use crate::allowance::{Allowances, Refusal};
use crate::answer_memory::AnswerMemory;
use crate::auth::authenticate;
use crate::error::ProxyError;
use crate::metrics::{BodyRefusal, BudgetRefusal, Label, LimitScope, Metrics};
use crate::ratelimit::InFlight;
use crate::request;
use crate::snapshot::{ApiFormat, ClientKey, Endpoint, Snapshot, SnapshotStore};
use crate::spool::{Lane, Spool};
use crate::stopping::Stopping;
use crate::usage::UsageSink;
use accounting::Accounting;

/// The `tracing` target of the one `request finished` line each proxied request gets
/// (`RUST_LOG=info,sluice::request=off` silences them).
pub const REQUEST_LOG_TARGET: &str = "sluice::request";

/// Size limits for request and response bodies.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Larger request bodies get 413.
    pub max_body_bytes: usize,
    /// The bytes of request bodies the replica holds at once (`--max-buffered-body-bytes`):
    /// `body_memory`'s permits.
    pub max_buffered_body_bytes: usize,
    /// Larger non-streamed upstream bodies count as a failed attempt (502).
    pub max_response_bytes: usize,
    /// A body not read in full this long after its headers gets 408.
    pub body_read_timeout: Duration,
    /// `--stream-keepalive`: a stream silent this long gets a comment, and one whose first
    /// event has not come this long after the request arrived is committed without it.
    pub stream_keepalive: Option<Duration>,
}

/// `--stream-keepalive`'s default: a comment every 15 s of silence, well inside the 60 s after
/// which AWS's load balancers and ingress-nginx cut an answer by default.
pub const DEFAULT_STREAM_KEEPALIVE: Duration = Duration::from_secs(15);

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 16 * 1024 * 1024,
            max_buffered_body_bytes: 256 * 1024 * 1024,
            max_response_bytes: 64 * 1024 * 1024,
            body_read_timeout: Duration::from_secs(30),
            stream_keepalive: Some(DEFAULT_STREAM_KEEPALIVE),
        }
    }
}

/// What every handler shares.
pub struct AppState {
    pub store: Arc<SnapshotStore>,
    pub usage: UsageSink,
    /// The usage spool, if there is a data directory (for `/metrics`).
    pub spool: Option<Arc<Spool>>,
    /// This serving thread's writer into it.
    pub spool_lane: Option<Arc<Lane>>,
    pub limits: Limits,
    /// Stream relays still running; shutdown waits for them so their usage is recorded.
    pub tasks: TaskTracker,
    pub metrics: Arc<Metrics>,
    /// Request-body bytes that may be held at once, over every serving thread: a permit per
    /// byte, taken as a body arrives and given back when its request is answered.
    pub body_memory: Arc<Semaphore>,
    /// Bytes of whole answers held in memory (`--max-buffered-answer-bytes`): taken as an
    /// answer is read, given back once it is sent. Apart from the bodies', so that answers
    /// held for clients slow to read them never refuse a request's body.
    pub answer_memory: Arc<AnswerMemory>,
    /// Which serving thread this state belongs to: it picks that thread's upstream pool.
    pub pool: usize,
    /// The budget allowances budgeted keys spend (shared by every serving thread).
    pub allowances: Arc<Allowances>,
    /// This serving thread's sleeps for the upstream calls' timeouts.
    pub sleeps: KeptSleeps,
    /// What this serving thread's requests see of the process stopping.
    pub stopping: Arc<Stopping>,
    /// The backends (by id) that refused a stream's `stream_options` at an endpoint, which
    /// Sluice adds to have its usage counted: their streams there go without it
    /// ([`forward::forward_call`]). This serving thread's; each learns it from one refusal,
    /// retried at once.
    pub refuse_stream_options: std::sync::Mutex<std::collections::HashSet<(String, Endpoint)>>,
}

/// The endpoints that proxy a request's body: `POST` to `/v1` and the endpoint's
/// [`Endpoint::path`], the path it has at the upstream's base URL too.
const PROXIED: [Endpoint; 8] = [
    Endpoint::ChatCompletions,
    Endpoint::Completions,
    Endpoint::Embeddings,
    Endpoint::Responses,
    Endpoint::ResponsesCompact,
    Endpoint::ResponsesInputTokens,
    Endpoint::Messages,
    Endpoint::CountTokens,
];

/// The proxied endpoint a request is for, when it is one (`POST` to a path of [`PROXIED`]).
fn proxied(method: &Method, path: &str) -> Option<Endpoint> {
    if method != Method::POST {
        return None;
    }
    let path = path.strip_prefix("/v1")?;
    PROXIED.into_iter().find(|endpoint| endpoint.path() == path)
}

/// A serving thread's HTTP routes.
///
/// A proxied request (`POST` to one of [`PROXIED`]'s paths) goes straight to [`serve`]; every
/// other request (the stored responses' calls, the models, health, metrics, and the 404 and
/// 405 answers) goes through axum's router, which has the proxied paths too, for the other
/// methods' 405 (and answering them as this does, should a request ever reach it). Skipping
/// the router for the requests that are nearly all of a gateway's traffic spares each of them
/// about 3,850 instructions (`docs/benchmarks.md`): the router's path match, the request
/// extensions it inserts (`OriginalUri`, `MatchedPath`, the path parameters), its cloned
/// boxed service, and the `Content-Length` it sets on the answer, which hyper writes anyway
/// from the body's exact size (test `whole_answers_carry_their_length_on_the_wire`).
#[derive(Clone)]
pub struct Routes {
    app: Arc<AppState>,
    router: Router,
}

impl Routes {
    pub fn new(app: Arc<AppState>) -> Self {
        let router = router(Arc::clone(&app));
        Self { app, router }
    }

    /// The answer to `request`.
    pub fn answer<B>(&self, request: http::Request<B>) -> impl Future<Output = Response> + use<B>
    where
        B: http_body::Body<Data = Bytes, Error: Into<axum::BoxError>> + Send + 'static,
    {
        match proxied(request.method(), request.uri().path()) {
            // Boxed: the request's future is a few kilobytes, which hyper would otherwise
            // copy into its slot for the connection's request in flight, and the service
            // future wrapping it copies again. Written into its allocation, which `Box::pin`
            // would instead build on the stack and copy (a 4.8 KB memcpy a request).
            Some(endpoint) => Either::Left(Box::into_pin(Box::write(
                Box::new_uninit(),
                serve(
                    Arc::clone(&self.app),
                    endpoint,
                    request.map(axum::body::Body::new),
                ),
            ))),
            None => Either::Right(self.router.clone().call(request).map(|Ok(answer)| answer)),
        }
    }
}

/// The router: every route, the proxied ones included.
fn router(state: Arc<AppState>) -> Router {
    let mut router = Router::new();
    for endpoint in PROXIED {
        router = router.route(
            &format!("/v1{}", endpoint.path()),
            post(move |State(app): State<Arc<AppState>>, request: Request| {
                serve(app, endpoint, request)
            }),
        );
    }
    router
        .route(
            "/v1/responses/{id}",
            get(retrieve_response).delete(delete_response),
        )
        .route("/v1/responses/{id}/input_items", get(response_input_items))
        .route("/v1/responses/{id}/cancel", post(cancel_response))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{*model}", get(get_model))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(unknown_path)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

async fn retrieve_response(
    State(app): State<Arc<AppState>>,
    id: Result<Path<String>, PathRejection>,
    request: Request,
) -> Response {
    let id = path_param(id, request.uri(), "/v1/responses/");
    on_stored(app, Method::GET, id, None, request).await
}

async fn delete_response(
    State(app): State<Arc<AppState>>,
    id: Result<Path<String>, PathRejection>,
    request: Request,
) -> Response {
    let id = path_param(id, request.uri(), "/v1/responses/");
    on_stored(app, Method::DELETE, id, None, request).await
}

async fn response_input_items(
    State(app): State<Arc<AppState>>,
    id: Result<Path<String>, PathRejection>,
    request: Request,
) -> Response {
    let id = path_param(id, request.uri(), "/v1/responses/");
    on_stored(app, Method::GET, id, Some("input_items"), request).await
}

async fn cancel_response(
    State(app): State<Arc<AppState>>,
    id: Result<Path<String>, PathRejection>,
    request: Request,
) -> Response {
    let id = path_param(id, request.uri(), "/v1/responses/");
    on_stored(app, Method::POST, id, Some("cancel"), request).await
}

/// A path parameter as decoded, or, when its decoded bytes are not UTF-8 (which axum answers
/// with a plain-text 400, outside the API), the path's segment after `prefix` as it came,
/// still percent-encoded: no id or model is named so, and the handler answers that in the
/// API's own error, with its request id, record and metrics.
fn path_param(decoded: Result<Path<String>, PathRejection>, uri: &Uri, prefix: &str) -> String {
    match decoded {
        Ok(Path(param)) => param,
        Err(_) => {
            let rest = uri.path().strip_prefix(prefix).unwrap_or_default();
            rest.split('/').next().unwrap_or_default().to_owned()
        }
    }
}

async fn on_stored(
    app: Arc<AppState>,
    method: Method,
    id: String,
    action: Option<&'static str>,
    request: Request,
) -> Response {
    let target = stored::Target {
        method,
        id,
        action,
        query: request.uri().query().map(str::to_owned),
        beta: forward::Passthrough::headers_for(Endpoint::Responses, request.headers()),
    };
    serve_as(app, Endpoint::Responses, request, Some(target)).await
}

/// One proxied request, from arrival to the response head.
async fn serve(app: Arc<AppState>, endpoint: Endpoint, request: Request) -> Response {
    serve_as(app, endpoint, request, None).await
}

/// [`serve`], or with a `target` a call on a stored response (its body is not read).
async fn serve_as(
    app: Arc<AppState>,
    endpoint: Endpoint,
    request: Request,
    target: Option<stored::Target>,
) -> Response {
    let started = Instant::now();
    // By the replica's clock (skewed in tests by `--wall-clock-offset`, as a host's could be).
    let arrived = app.store.clock().wall();
    let request_id = request_id(request.headers());
    let response = match app.store.load() {
        None => {
            linger(request, app.limits.max_body_bytes);
            unaccounted(
                &app,
                id_text(&request_id),
                started,
                endpoint,
                ProxyError::NotReady,
            )
        }
        Some(snapshot) => {
            match authenticate(&snapshot, request.headers(), endpoint.format(), arrived) {
                Err(e) => {
                    linger(request, app.limits.max_body_bytes);
                    unaccounted(&app, id_text(&request_id), started, endpoint, e)
                }
                Ok(key) => {
                    let mut acct = Accounting::new(
                        app.usage.clone(),
                        app.spool_lane.clone(),
                        Arc::clone(&app.metrics),
                        id_text(&request_id),
                        &key.id,
                        endpoint,
                        started,
                        arrived,
                    );
                    acct.expose_backend(snapshot.policy.expose_backend_header);
                    acct.multiplexed(request.version() == http::Version::HTTP_2);
                    match target {
                        None => authorized(&app, &snapshot, key, endpoint, request, acct).await,
                        Some(target) => stored::call(&app, &snapshot, key, target, acct).await,
                    }
                }
            }
        }
    };
    let mut response = with_request_id(response, request_id);
    if endpoint.format() == ApiFormat::Anthropic {
        // Where Anthropic's SDKs read a request's id (`_request_id`, an error's
        // `request_id`): the client can quote the id this replica logged the request under.
        if let Some(id) = response.headers().get(X_REQUEST_ID).cloned() {
            response.headers_mut().insert(REQUEST_ID, id);
        }
    }
    response
}

/// Reads and throws away the body of a request refused before it was read (a key that is
/// wrong, expired or revoked; a replica not ready), as a refused oversized body is
/// ([`discard_rest`]): a client still uploading a long conversation gets its 401 or 503, not
/// a broken pipe.
fn linger(request: Request, limit: usize) {
    let body = request.into_body();
    if !http_body::Body::is_end_stream(&body) {
        discard_rest(body, limit);
    }
}

/// Answers a request refused before it belongs to a client key (no usage record): the
/// metrics count it and it gets its one log line.
fn unaccounted(
    app: &AppState,
    request_id: &str,
    started: Instant,
    endpoint: Endpoint,
    err: ProxyError,
) -> Response {
    let status = err.status().as_u16();
    app.metrics.request(&Label::NONE, &Label::NONE, status);
    tracing::info!(
        target: REQUEST_LOG_TARGET,
        request_id,
        status,
        attempts = 0,
        stream = false,
        latency_ms = started.elapsed().as_millis() as u64,
        error_kind = err.error_kind().as_str_name(),
        "request finished"
    );
    err.into_response_as(endpoint.format())
}

async fn authorized(
    app: &Arc<AppState>,
    snapshot: &Snapshot,
    key: &ClientKey,
    endpoint: Endpoint,
    request: Request,
    mut acct: Accounting,
) -> Response {
    // A body that may be large is not read for a key its own limits refuse: it would upload
    // into the memory for bodies and hold it, every other key's bodies refused meanwhile. Its
    // place in flight is taken now, the upload counting among its requests in flight. A small
    // one is read first, so that a refusal names the model it asked for (metrics, records).
    // Its declared length is hyper's reading of `content-length` (none: chunked).
    let may_be_large = http_body::Body::size_hint(request.body())
        .upper()
        .is_none_or(|length| length > SMALL_BODY_BYTES);
    let mut parallel = None;
    if may_be_large {
        let checked = match key_refusal(app, key, Some(Instant::now())) {
            Some(refused) => Err(refused),
            None => take_place(app, key),
        };
        match checked {
            Ok(place) => parallel = place,
            Err(refused) => {
                linger(request, app.limits.max_body_bytes);
                return forward::error(acct, refused).await;
            }
        }
    }
    let (head, body) = request.into_parts();
    // Held until the response head: the body is in memory until then.
    let (body, _body_memory) = match read_body(app, &head.headers, body).await {
        Ok(body) => body,
        Err(e) => return forward::error(acct, e).await,
    };
    let parsed = match request::parse_received(&body) {
        Ok(parsed) => parsed,
        Err(e) => return forward::error(acct, e.into()).await,
    };
    let routed = snapshot.model(&parsed.model);
    acct.set_request(
        &parsed.model,
        routed.map(|(name, _)| name),
        parsed.stream && endpoint.can_stream(),
    );
    if !key.may_use(&parsed.model) {
        return forward::error(acct, ProxyError::ModelNotAllowed(parsed.model.to_string())).await;
    }
    let Some((_, routes)) = routed else {
        return forward::error(acct, ProxyError::ModelNotFound(parsed.model.to_string())).await;
    };
    // A background response spends its tokens after the create returned, unseen: the key's
    // budget, token limit and parallel limit would not hold it.
    if endpoint.is_responses()
        && (key.tokens.is_some()
            || key.parallel.is_some()
            || app.allowances.pool(&key.id).is_some())
        && parsed.background()
    {
        return forward::error(acct, ProxyError::BackgroundNotAllowed).await;
    }
    // Before the rate limit: a refused request takes no rate token.
    if !may_be_large && let Some(refused) = key_refusal(app, key, None) {
        return forward::error(acct, refused).await;
    }
    // Its reserve from the key's allowance; settled with the real cost when it ends. Counting
    // a prompt's tokens is free (Anthropic bills no tokens for it, and its answer has no
    // usage): it takes no reserve, which it would otherwise keep spent (see
    // `accounting::keeps_reserve`).
    let prompt_tokens = match endpoint.counts_only() {
        true => 0,
        false => estimate::prompt_tokens(&body),
    };
    let cost = (!endpoint.counts_only()).then(|| prompt_cost(prompt_tokens, routes));
    let admitted = match cost {
        Some(cost) => app.allowances.admit(&key.id, cost.reserve).await,
        None => Ok(None),
    };
    match admitted {
        Ok(Some(reservation)) => acct.reserved(reservation, cost.map_or(0, |c| c.untiered)),
        Ok(None) => {}
        Err(Refusal::Exhausted { max_budget, resets }) => {
            app.metrics.budget_refused(BudgetRefusal::spent);
            let refused = ProxyError::BudgetSpent {
                key_name: key.name.clone(),
                max_budget,
                resets,
            };
            return forward::error(acct, refused).await;
        }
        Err(Refusal::Unavailable { retry_after }) => {
            app.metrics.budget_refused(BudgetRefusal::unavailable);
            return forward::error(acct, ProxyError::BudgetUnavailable { retry_after }).await;
        }
    }
    // The limits that can give back what they took come first: a request refused by a
    // later one has used nothing of them.
    if !may_be_large {
        parallel = match take_place(app, key) {
            Ok(place) => place,
            Err(refused) => return forward::error(acct, refused).await,
        };
    }
    // A count is not a generation: it takes nothing from the tokens per minute either
    // (`try_admit(0)` still refuses a key in debt).
    acct.estimate_prompt(prompt_tokens);
    let now = Instant::now();
    let tokens = match &key.tokens {
        Some(bucket) => match bucket.try_admit(acct.prompt_estimate(), now) {
            Ok(reserved) => Some(reserved),
            Err(retry_after) => {
                app.metrics.rate_limited(LimitScope::client_key_tokens);
                let refused = ProxyError::KeyTokensLimited {
                    limit: bucket.limit(),
                    retry_after,
                };
                return forward::error(acct, refused).await;
            }
        },
        None => None,
    };
    if let Some(limiter) = &key.limiter
        && let Err(retry_after) = limiter.try_acquire(now)
    {
        if let Some(tokens) = tokens {
            tokens.cancel();
        }
        app.metrics.rate_limited(LimitScope::client_key);
        return forward::error(acct, ProxyError::KeyRateLimited { retry_after }).await;
    }
    acct.admitted_under(tokens, parallel);
    if endpoint.is_responses() {
        let passed = forward::Passthrough::of(endpoint, &head);
        return stored::create(app, snapshot, key, endpoint, routes, &parsed, &passed, acct).await;
    }
    forward::forward(app, snapshot, routes, endpoint, &parsed, acct, head).await
}

/// The most a body's declared length may be for it to be read before its key's own limits
/// are checked ([`authorized`]): the memory for bodies would need thousands of these at once,
/// past the connections a replica takes, to fill.
const SMALL_BODY_BYTES: u64 = 64 * 1024;

/// Why `key`'s own state refuses a request, before anything of it is taken: a budget the
/// snapshot says is spent, or, looked at `now` when given, tokens or requests per minute with
/// nothing left (looked at, nothing taken: [`authorized`] takes them after).
fn key_refusal(app: &AppState, key: &ClientKey, now: Option<Instant>) -> Option<ProxyError> {
    if let Some(spent) = key.budget_spent {
        app.metrics.budget_refused(BudgetRefusal::spent);
        return Some(ProxyError::BudgetSpent {
            key_name: key.name.clone(),
            max_budget: spent.max_budget,
            resets: spent.resets,
        });
    }
    let now = now?;
    if let Some(bucket) = &key.tokens
        && let wait = bucket.available_in(now)
        && !wait.is_zero()
    {
        app.metrics.rate_limited(LimitScope::client_key_tokens);
        return Some(ProxyError::KeyTokensLimited {
            limit: bucket.limit(),
            retry_after: wait,
        });
    }
    if let Some(limiter) = &key.limiter
        && let wait = limiter.available_in(now)
        && !wait.is_zero()
    {
        app.metrics.rate_limited(LimitScope::client_key);
        return Some(ProxyError::KeyRateLimited { retry_after: wait });
    }
    None
}

/// The request's place among its key's requests in flight (`None`: the key has no
/// `max_parallel_requests`), or its refusal when they are all taken.
fn take_place(app: &AppState, key: &ClientKey) -> Result<Option<InFlight>, ProxyError> {
    let Some(limit) = &key.parallel else {
        return Ok(None);
    };
    limit.try_enter().map(Some).ok_or_else(|| {
        app.metrics.rate_limited(LimitScope::client_key_parallel);
        ProxyError::KeyParallelLimited {
            limit: limit.total(),
        }
    })
}

/// What a request's prompt is estimated to cost before it is sent: its estimated tokens
/// ([`estimate::prompt_tokens`]) at the highest input (or cache write) price among the model's
/// routes, at the dearest price tiers each may report at once, with the route's fee for the
/// request itself if it has one (`reserve`), and without the tiers or the fee (`untiered`:
/// what a request that learns no tokens keeps, times the tier its answer reported, if any,
/// with the fees it was charged); the real cost is settled when the response ends.
fn prompt_cost(tokens: u64, routes: &[crate::snapshot::Route]) -> PromptCost {
    routes.iter().fold(PromptCost::default(), |most, route| {
        let untiered = route.prices.prompt_ceiling_nanos(tokens);
        let reserve = match route.tiers.any() {
            true => route
                .prices
                .scaled(route.tiers.ceiling())
                .prompt_ceiling_nanos(tokens),
            false => untiered,
        };
        let reserve = reserve.saturating_add(route.call_prices.request_fee_nanos());
        PromptCost {
            reserve: most.reserve.max(reserve),
            untiered: most.untiered.max(untiered),
        }
    })
}

/// [`prompt_cost`]'s two figures, in nano-units.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct PromptCost {
    reserve: u64,
    untiered: u64,
}

/// The request's body, with the permits of [`AppState::body_memory`] it holds. Refused when
/// larger than `max_body_bytes` (413), slower than `body_read_timeout` (408), or when the
/// bodies being held would pass the memory for bodies (503).
async fn read_body(
    app: &AppState,
    headers: &HeaderMap,
    body: axum::body::Body,
) -> Result<(Bytes, Option<OwnedSemaphorePermit>), ProxyError> {
    let limits = app.limits;
    let mut held: Option<OwnedSemaphorePermit> = None;
    let read = read_body_within(headers, body, limits.max_body_bytes, |len| {
        let permit = u32::try_from(len)
            .ok()
            .and_then(|n| Arc::clone(&app.body_memory).try_acquire_many_owned(n).ok())
            .ok_or(ProxyError::BodiesBusy)?;
        match &mut held {
            Some(held) => held.merge(permit),
            None => held = Some(permit),
        }
        Ok(())
    });
    let refused = match tokio::time::timeout(limits.body_read_timeout, read).await {
        Ok(Ok(body)) => return Ok((body, held)),
        Ok(Err(ProxyError::BodiesBusy)) => BodyRefusal::memory,
        Ok(Err(e)) => return Err(e),
        Err(_) => BodyRefusal::timeout,
    };
    app.metrics.body_refused(refused);
    // Every refusal is counted (`sluice_request_bodies_refused_total`); its line goes out at
    // most once in 10 s, with how many were held back: with the memory full, every other
    // client's body is refused too, and a line each flooded the log at their request rate.
    if let Some(held_back) = BODY_REFUSALS.permit() {
        let busy = app.body_memory.available_permits() == 0;
        tracing::warn!(
            reason = ?refused,
            memory_exhausted = busy,
            held_back,
            "refused a request body"
        );
    }
    Err(match refused {
        BodyRefusal::memory => ProxyError::BodiesBusy,
        BodyRefusal::timeout => ProxyError::BodyTimeout {
            limit: limits.body_read_timeout,
        },
    })
}

/// The `refused a request body` line's limiter ([`read_body`]).
static BODY_REFUSALS: sluice_domain::logging::LogLimiter =
    sluice_domain::logging::LogLimiter::new(Duration::from_secs(10));

/// Reads a body of at most `limit` bytes, calling `hold` with the size of each chunk before
/// keeping it.
async fn read_body_within(
    headers: &HeaderMap,
    mut body: axum::body::Body,
    limit: usize,
    mut hold: impl FnMut(usize) -> Result<(), ProxyError>,
) -> Result<Bytes, ProxyError> {
    let too_large = ProxyError::BodyTooLarge { limit };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        discard_rest(body, LINGER_BYTES);
        return Err(too_large);
    }
    let mut collected = Collected::default();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(|e| body_error(&e))?.into_data() else {
            continue; // trailers
        };
        if collected.len() + data.len() > limit {
            discard_rest(body, LINGER_BYTES);
            return Err(too_large);
        }
        if let Err(refused) = hold(data.len()) {
            // The memory for bodies is full: its 503 must reach a client still uploading a
            // body of a size that is taken.
            discard_rest(body, limit);
            return Err(refused);
        }
        collected.push(data);
    }
    Ok(collected.into_bytes())
}

/// What a failure to read the request body was: its client leaving (the connection closed or
/// reset before the body's end, an HTTP/2 stream cancelled), or a body that cannot be read
/// (a chunked encoding broken, an HTTP/2 body longer than its `content-length`).
fn body_error(err: &axum::Error) -> ProxyError {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cause {
        if let Some(hyper) = e.downcast_ref::<hyper::Error>()
            && (hyper.is_incomplete_message() || hyper.is_canceled())
        {
            return ProxyError::ClientLeft;
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                std::io::ErrorKind::UnexpectedEof
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
            )
        {
            return ProxyError::ClientLeft;
        }
        if let Some(h2) = e.downcast_ref::<h2::Error>()
            && (h2.is_io() || h2.reason() == Some(h2::Reason::CANCEL))
        {
            return ProxyError::ClientLeft;
        }
        cause = e.source();
    }
    ProxyError::BodyUnreadable
}

/// A body's chunks joined into one buffer. Most bodies arrive in one chunk: that one is kept
/// as it came, without a copy.
#[derive(Default)]
pub(crate) struct Collected {
    only: Option<Bytes>,
    joined: BytesMut,
    len: usize,
    /// The length the sender declared: the joined buffer is made that large at once, not
    /// doubled as chunks come.
    expected: usize,
}

impl Collected {
    /// A body whose sender declared `expected` bytes (its `content-length`, already checked
    /// against the limit).
    pub(crate) fn expecting(expected: usize) -> Self {
        Self {
            expected,
            ..Self::default()
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn push(&mut self, chunk: Bytes) {
        self.len += chunk.len();
        match self.only.take() {
            None if self.joined.is_empty() => self.only = Some(chunk),
            None => self.joined.extend_from_slice(&chunk),
            Some(first) => {
                self.joined.reserve(self.len.max(self.expected));
                self.joined.extend_from_slice(&first);
                self.joined.extend_from_slice(&chunk);
            }
        }
    }

    /// The bytes of memory it holds: the one chunk, or the joined buffer's capacity (up to
    /// twice what it holds, the buffer doubling as it grows).
    pub(crate) fn held(&self) -> usize {
        self.only
            .as_ref()
            .map_or(self.joined.capacity(), Bytes::len)
    }

    pub(crate) fn into_bytes(self) -> Bytes {
        self.only.unwrap_or_else(|| self.joined.freeze())
    }
}

/// Reads and throws away what is left of a refused body (up to `limit` bytes within
/// [`LINGER_TIME`]: [`LINGER_BYTES`] past a body too large, else as much as a body may be)
/// while the refusal (413, 401, 503) goes out. Closing the connection with the upload still
/// arriving would reset it, and a client busy writing its body would then see a broken pipe
/// instead of the answer; nginx lingers on close for the same reason.
fn discard_rest(mut body: axum::body::Body, limit: usize) {
    tokio::spawn(async move {
        let drain = async {
            let mut read = 0;
            while let Some(Ok(frame)) = body.frame().await {
                read += frame.data_ref().map_or(0, Bytes::len);
                if read > limit {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(LINGER_TIME, drain).await;
    });
}

/// How much of a refused request body is still read, and for how long, before the
/// connection closes (see [`discard_rest`]).
const LINGER_BYTES: usize = 4 * 1024 * 1024;
const LINGER_TIME: std::time::Duration = std::time::Duration::from_secs(5);

/// The request id's header, in the request and in the answer. A name given as text would
/// be parsed again at each use.
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The request id's header in Anthropic's API, on the Messages routes' answers.
const REQUEST_ID: HeaderName = HeaderName::from_static("request-id");

/// A sane incoming `x-request-id` (1–128 of `[A-Za-z0-9._:-]`), or a new UUIDv7; kept as the
/// header value the answer carries, so that an incoming id is not copied (it shares the
/// request's buffer) and a new one is copied once, not again for the answer.
fn request_id(headers: &HeaderMap) -> HeaderValue {
    let sane = |id: &&HeaderValue| {
        (1..=MAX_REQUEST_ID_BYTES).contains(&id.len())
            && id
                .as_bytes()
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
    };
    if let Some(id) = headers.get(X_REQUEST_ID).filter(sane) {
        return id.clone();
    }
    // The hyphenated form `to_string` writes, without the formatting machinery.
    let mut text = uuid::Uuid::encode_buffer();
    let id = uuid::Uuid::now_v7().hyphenated().encode_lower(&mut text);
    // Hex digits and hyphens are always a valid header value; the fallback is never taken.
    HeaderValue::from_str(id).unwrap_or(HeaderValue::from_static("-"))
}

/// The request id as text: ASCII by construction (see [`request_id`]).
fn id_text(id: &HeaderValue) -> &str {
    id.to_str().unwrap_or_default()
}

fn with_request_id(mut response: Response, request_id: HeaderValue) -> Response {
    response.headers_mut().insert(X_REQUEST_ID, request_id);
    response
}

#[derive(Serialize)]
struct Model<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    owned_by: &'static str,
}

fn model_object(snapshot: &Snapshot, id: &str) -> serde_json::Value {
    let created = snapshot
        .created
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    serde_json::json!(Model {
        id,
        object: "model",
        created,
        owned_by: "sluice",
    })
}

/// The API a call outside the proxied endpoints (the models, a path or method served nowhere)
/// is answered in: Anthropic's when the client names an `anthropic-version` (Anthropic's SDKs
/// always do, OpenAI's never), which also lets a models call present its key in `x-api-key`.
fn models_format(headers: &HeaderMap) -> ApiFormat {
    if headers.contains_key("anthropic-version") {
        ApiFormat::Anthropic
    } else {
        ApiFormat::OpenAi
    }
}

/// A model in Anthropic's `ModelInfo` shape.
fn anthropic_model_object(snapshot: &Snapshot, id: &str) -> serde_json::Value {
    let created = snapshot.created.unwrap_or(SystemTime::UNIX_EPOCH);
    serde_json::json!({
        "type": "model",
        "id": id,
        "display_name": id,
        "created_at": humantime::format_rfc3339_seconds(created).to_string(),
        // Required by the current SDK's `ModelInfo`: a model Sluice routes is served.
        "lifecycle": "active",
    })
}

/// `GET /v1/models`: the models this key may use, in OpenAI's list shape or Anthropic's.
async fn list_models(State(app): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let request_id = request_id(&headers);
    let format = models_format(&headers);
    let response = match app.store.load() {
        None => ProxyError::NotReady.into_response_as(format),
        Some(snapshot) => match authenticate(&snapshot, &headers, format, app.store.clock().wall())
        {
            Err(e) => e.into_response_as(format),
            Ok(key) => {
                let models = snapshot.models().into_iter().filter(|m| key.may_use(m));
                let body = match format {
                    ApiFormat::OpenAi => {
                        let data: Vec<_> = models.map(|m| model_object(&snapshot, m)).collect();
                        serde_json::json!({"object": "list", "data": data})
                    }
                    ApiFormat::Anthropic => {
                        let ids: Vec<&str> = models.collect();
                        let data: Vec<_> = ids
                            .iter()
                            .map(|m| anthropic_model_object(&snapshot, m))
                            .collect();
                        serde_json::json!({
                            "data": data,
                            "has_more": false,
                            "first_id": ids.first(),
                            "last_id": ids.last(),
                        })
                    }
                };
                axum::Json(body).into_response()
            }
        },
    };
    with_request_id(response, request_id)
}

/// `GET /v1/models/{model}`, in OpenAI's shape or Anthropic's.
async fn get_model(
    State(app): State<Arc<AppState>>,
    model: Result<Path<String>, PathRejection>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let model = match model {
        Ok(Path(model)) => model,
        // A model name may hold slashes: all of the rest is the name.
        Err(_) => uri
            .path()
            .strip_prefix("/v1/models/")
            .unwrap_or_default()
            .to_owned(),
    };
    let request_id = request_id(&headers);
    let format = models_format(&headers);
    let response = match app.store.load() {
        None => ProxyError::NotReady.into_response_as(format),
        Some(snapshot) => match authenticate(&snapshot, &headers, format, app.store.clock().wall())
        {
            Err(e) => e.into_response_as(format),
            Ok(key) if key.may_use(&model) && snapshot.routes(&model).is_some() => {
                axum::Json(match format {
                    ApiFormat::OpenAi => model_object(&snapshot, &model),
                    ApiFormat::Anthropic => anthropic_model_object(&snapshot, &model),
                })
                .into_response()
            }
            Ok(_) => ProxyError::ModelNotFound(model).into_response_as(format),
        },
    };
    with_request_id(response, request_id)
}

async fn healthz() -> &'static str {
    "ok"
}

/// 200 with a snapshot, even one the control plane has moved past: a snapshot one replica
/// refuses, every replica refuses, and taking them all out of rotation would be an outage. The
/// body says so instead (the reason's detail, which may name backends, stays in the log and in
/// `sluicectl dataplane list`).
async fn readyz(State(app): State<Arc<AppState>>) -> Response {
    if app.stopping.lame_duck() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: shutting down\n",
        )
            .into_response();
    }
    match app.store.load() {
        Some(snapshot) => {
            let mut body = format!("ready: snapshot version {}\n", snapshot.version);
            if let Some(stale) = app.store.stale() {
                let refused = match stale.refused_version {
                    Some(version) => format!("snapshot version {version}"),
                    None => "a snapshot".to_owned(),
                };
                body.push_str(&format!(
                    "stale: refused {refused} ({}); serving version {} until the control plane \
                     sends one this replica accepts (details in its log and `sluicectl dataplane \
                     list`)\n",
                    stale.why.as_str(),
                    snapshot.version,
                ));
            }
            (StatusCode::OK, body).into_response()
        }
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: no snapshot yet\n",
        )
            .into_response(),
    }
}

async fn metrics(State(app): State<Arc<AppState>>) -> Response {
    let spool = app.spool.as_ref().map(|spool| spool.stats(&app.usage));
    app.metrics.request_bodies_buffered(
        app.limits
            .max_buffered_body_bytes
            .saturating_sub(app.body_memory.available_permits()),
    );
    app.metrics.answers_buffered(app.answer_memory.held());
    let text = app
        .metrics
        .render(&app.store, &app.usage, spool, app.allowances.asks_sent());
    // Past what an answer holds uncounted, the replica's own share of the answers' memory:
    // held until the client has read it (up to the write timeout), on HTTP/1 one per
    // connection, and any client may ask, with no key.
    let mut body = Bytes::from(text);
    let counted = body.len() > forward::SMALL_ANSWER_BYTES;
    if counted {
        match app
            .answer_memory
            .take(crate::answer_memory::OWN_ANSWERS, body.len())
        {
            Ok(permit) => body = forward::Held::bytes(body, permit),
            Err(_) => return ProxyError::AnswersBusy.into_response(),
        }
    }
    let mut response = (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response();
    if counted {
        response
            .extensions_mut()
            .insert(crate::answer_memory::CountedAnswer);
    }
    response
}

/// The router's own refusals read what the client still uploads while they go out
/// ([`linger`]), as the proxied routes' do: closed unread, the connection was reset under a
/// client posting to a mistyped path, which then read "Connection error", and nginx in front
/// counted the reset as the replica's failure.
async fn unknown_path(State(app): State<Arc<AppState>>, request: Request) -> Response {
    let answer = ProxyError::UnknownPath {
        method: crate::error::quoted(request.method().as_str()),
        path: crate::error::quoted(request.uri().path()),
    }
    .into_response_as(models_format(request.headers()));
    linger(request, app.limits.max_body_bytes);
    answer
}

/// A method the path does not take: 405, but for a WebSocket handshake, which gets 426. The
/// Codex CLI opens `/v1/responses` as a WebSocket first and falls back to HTTP at once on a 426
/// only; any other status it retries, five times with backoff, at the start of every session.
async fn method_not_allowed(State(app): State<Arc<AppState>>, request: Request) -> Response {
    let websocket = request
        .headers()
        .get_all(header::UPGRADE)
        .iter()
        .any(|value| value.as_bytes().eq_ignore_ascii_case(b"websocket"));
    let answer = if websocket {
        ProxyError::WebSocketRefused {
            path: crate::error::quoted(request.uri().path()),
        }
        .into_response()
    } else {
        ProxyError::MethodNotAllowed {
            method: crate::error::quoted(request.method().as_str()),
            path: crate::error::quoted(request.uri().path()),
        }
        .into_response_as(models_format(request.headers()))
    };
    linger(request, app.limits.max_body_bytes);
    answer
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A budget reserves the prompt at the dearest route, that route's dearest tiers together:
    /// an answer may report any of them.
    #[test]
    fn the_prompt_is_reserved_at_the_dearest_tiers() {
        use crate::snapshot::Route;
        use crate::tiers::Tiers;
        use sluice_domain::price::Prices;
        let route = |input: f64, tiers: Tiers| Route {
            backend: 0,
            upstream_model: String::new(),
            prices: Prices::per_mtok(input, None, None, 10.0),
            tiers,
            call_prices: Default::default(),
            default_max_tokens: 0,
            max_output_tokens: None,
        };
        let plain = route(2.0, Tiers::default());
        // $1 a million tokens at 2.5 and 1.1 times at once (flex's half lowers nothing).
        let tiered = route(1.0, Tiers::new([("fast", 2.5), ("us", 1.1), ("flex", 0.5)]));
        let cost = |routes: &[Route]| {
            let cost = prompt_cost(1_000, routes);
            (cost.reserve, cost.untiered)
        };
        assert_eq!(cost(std::slice::from_ref(&plain)), (2_000_000, 2_000_000));
        assert_eq!(
            cost(&[plain.clone(), tiered.clone()]),
            (2_750_000, 2_000_000)
        );
        assert_eq!(cost(std::slice::from_ref(&tiered)), (2_750_000, 1_000_000));
        // A search model's fee for each request is reserved with its prompt: $30 per 1,000.
        let searching = Route {
            call_prices: crate::calls::CallPrices::new([(crate::calls::REQUEST, 30.0)]),
            ..route(0.5, Tiers::default())
        };
        assert_eq!(cost(&[plain, searching]), (30_500_000, 2_000_000));
    }

    /// A body in one chunk is kept as it came; in several, joined in order.
    #[test]
    fn chunks_are_joined_in_order() {
        let one = Bytes::from_static(b"whole");
        let mut collected = Collected::default();
        collected.push(one.clone());
        assert_eq!(collected.into_bytes().as_ptr(), one.as_ptr(), "not copied");
        let mut collected = Collected::default();
        for part in ["ab", "cde", "", "f"] {
            collected.push(Bytes::from_static(part.as_bytes()));
        }
        assert_eq!(collected.len(), 6);
        assert_eq!(&collected.into_bytes()[..], b"abcdef");
        // Declared whole: the buffer is made that size at once, and holds no more.
        let mut collected = Collected::expecting(1000);
        for _ in 0..10 {
            collected.push(Bytes::from(vec![b'x'; 100]));
        }
        assert_eq!(collected.held(), 1000);
        assert_eq!(collected.into_bytes().len(), 1000);
    }

    /// The control plane refuses a base URL that ends with a path the data planes append
    /// (`sluice_domain::endpoint::ALL`): every proxied endpoint's must be in that list, or a URL
    /// copied with it in place sends every request to a doubled path.
    #[test]
    fn every_proxied_path_is_one_the_control_plane_refuses_at_a_base_urls_end() {
        let mut proxied: Vec<&str> = PROXIED.iter().map(|endpoint| endpoint.path()).collect();
        let mut known = sluice_domain::endpoint::ALL.to_vec();
        proxied.sort_unstable();
        known.sort_unstable();
        assert_eq!(proxied, known);
    }

    #[test]
    fn only_a_post_to_a_proxied_path_skips_the_router() {
        for (path, endpoint) in [
            ("/v1/chat/completions", Endpoint::ChatCompletions),
            ("/v1/completions", Endpoint::Completions),
            ("/v1/embeddings", Endpoint::Embeddings),
            ("/v1/responses", Endpoint::Responses),
            ("/v1/responses/compact", Endpoint::ResponsesCompact),
            ("/v1/responses/input_tokens", Endpoint::ResponsesInputTokens),
            ("/v1/messages", Endpoint::Messages),
            ("/v1/messages/count_tokens", Endpoint::CountTokens),
        ] {
            assert_eq!(proxied(&Method::POST, path), Some(endpoint), "{path}");
            assert_eq!(proxied(&Method::GET, path), None, "{path}");
            assert_eq!(proxied(&Method::PUT, path), None, "{path}");
            assert_eq!(proxied(&Method::POST, &format!("{path}/")), None, "{path}");
            assert_eq!(proxied(&Method::POST, &path.to_uppercase()), None, "{path}");
            // `Endpoint::path` is the same path below the base URL's `/v1`.
            assert_eq!(format!("/v1{}", endpoint.path()), path);
        }
        for path in [
            "/v1/responses/resp_1",
            "/v1/models",
            "/healthz",
            "/metrics",
            "/",
            "",
        ] {
            assert_eq!(proxied(&Method::POST, path), None, "{path}");
        }
    }
}
