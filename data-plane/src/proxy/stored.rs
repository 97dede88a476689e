//! The Responses API's calls that depend on state a backend holds: a create that continues
//! an earlier response (`previous_response_id`) and the calls on a stored response (retrieve,
//! delete, input items, cancel). Each goes to the backend named in the response id, which
//! [`crate::affinity`] authenticates; never to another one, which would not hold the state.

use std::sync::Arc;

use axum::response::Response;
use http::Method;
use sluice_domain::price::Prices;
use tokio::time::Instant;

use super::AppState;
use super::accounting::Accounting;
use super::forward::{self, Call, Outbound, Passthrough};
use crate::affinity::{Affinity, IdError};
use crate::calls::CallPrices;
use crate::error::{ProxyError, quoted};
use crate::metrics::LimitScope;
use crate::request::{ParsedRequest, RequestError};
use crate::responses::IdRewrite;
use crate::snapshot::{ClientKey, Endpoint, Route, Snapshot};
use crate::tiers::Tiers;

/// A call on a stored response, from the path.
pub(super) struct Target {
    pub method: Method,
    pub id: String,
    /// `input_items` or `cancel`; `None` for the response itself.
    pub action: Option<&'static str>,
    pub query: Option<String>,
    /// The client's `openai-beta` header ([`Passthrough::headers_for`]).
    pub beta: Vec<(http::HeaderName, http::HeaderValue)>,
}

/// `POST /v1/responses` (and its `compact` and `input_tokens`, `endpoint`): routed like any
/// request, unless it continues an earlier response, which pins it to that response's backend.
#[allow(clippy::too_many_arguments)]
pub(super) async fn create(
    app: &Arc<AppState>,
    snapshot: &Snapshot,
    key: &ClientKey,
    endpoint: Endpoint,
    routes: &[Route],
    parsed: &ParsedRequest<'_>,
    passed: &Passthrough,
    mut acct: Accounting,
) -> Response {
    // A compaction's answer names no tier: it is billed at the one the request asked for
    // (OpenAI's priority at twice the price, flex at half). Given twice, the provider reads
    // the last (Python's `json`), which a client could make dearer than the first: refused.
    if endpoint == Endpoint::ResponsesCompact {
        let mut tiers = parsed.members().filter(|(key, _)| *key == "service_tier");
        let tier = tiers.next();
        if tiers.next().is_some() {
            let refused = RequestError::DuplicateKey("service_tier");
            return forward::error(acct, refused.into()).await;
        }
        if let Some(tier) =
            tier.and_then(|(_, value)| serde_json::from_str::<String>(value.get()).ok())
        {
            acct.asked_tier(&tier);
        }
    }
    if snapshot.affinity.is_empty() {
        return forward::error(acct, ProxyError::NoAffinityKey).await;
    }
    // Only backends that serve the Responses API; the others would answer 404.
    let serving: Vec<Route> = routes
        .iter()
        .filter(|r| {
            snapshot
                .backends()
                .get(r.backend)
                .is_some_and(|b| b.responses_api)
        })
        .cloned()
        .collect();
    if serving.is_empty() {
        return forward::error(
            acct,
            ProxyError::ResponsesUnsupported(parsed.model.to_string()),
        )
        .await;
    }
    let (all_routes, routes) = (routes, serving.as_slice());
    let mut ids = IdRewrite {
        keys: Arc::clone(&snapshot.affinity),
        client_key_id: key.id.clone(),
        backend_id: String::new(),
        model: parsed.model.to_string(),
        known: None,
    };
    let pinned = match &parsed.previous_response_id {
        None => None,
        Some(previous) => {
            let pinned = pin(app, snapshot, key, previous, "previous_response_id", true);
            let (index, affinity) = match pinned {
                Ok(pinned) => pinned,
                Err(e) => return forward::error(acct, e).await,
            };
            let Some(route) = routes.iter().find(|r| r.backend == index) else {
                // A backend that serves the model but the Responses API no more holds the
                // response out of reach, as a disabled one does; one that does not serve the
                // model may serve the one the client names next.
                let error = match all_routes.iter().any(|r| r.backend == index) {
                    true => ProxyError::ResponseBackendGone {
                        id: quoted(previous),
                    },
                    false => ProxyError::ResponseBackendLacksModel {
                        id: quoted(previous),
                        model: parsed.model.to_string(),
                    },
                };
                return forward::error(acct, error).await;
            };
            // The model's cooldown at the backend, as its own (`pin`): routed, the only
            // candidate cooling was answered 429 "every backend is busy", and the client was
            // not told that no other backend can take it.
            if let Err(until) = app.store.cooldowns().check(
                &affinity.backend_id,
                &route.upstream_model,
                Instant::now(),
            ) {
                return forward::error(acct, cooling_down(previous, until)).await;
            }
            ids.known = Some((affinity.upstream_id.clone(), previous.to_string()));
            Some((route, affinity.upstream_id))
        }
    };
    let call = Call {
        endpoint,
        model: &parsed.model,
        stream: parsed.stream && endpoint.can_stream(),
        send: Outbound::Body {
            parsed,
            previous_response_id: pinned.as_ref().map(|(_, id)| id.as_str()),
        },
        ids: Some(ids),
        count_usage: true,
        passed: Some(passed),
        conversation: parsed.prompt_cache_key.as_deref(),
    };
    let routes = match &pinned {
        Some((route, _)) => std::slice::from_ref(*route),
        None => routes,
    };
    forward::forward_call(app, snapshot, routes, &call, acct, None).await
}

/// `GET`/`DELETE /v1/responses/{id}`, `GET …/input_items`, `POST …/cancel`.
pub(super) async fn call(
    app: &Arc<AppState>,
    snapshot: &Snapshot,
    key: &ClientKey,
    target: Target,
    mut acct: Accounting,
) -> Response {
    let stream = target.method == Method::GET
        && target.action.is_none()
        && target.query.as_deref().is_some_and(|q| {
            url::form_urlencoded::parse(q.as_bytes()).any(|(k, v)| k == "stream" && v == "true")
        });
    let (index, affinity) = match pin(app, snapshot, key, &target.id, "response_id", false) {
        Ok(pinned) => pinned,
        Err(e) => {
            acct.set_request("", None, stream);
            return forward::error(acct, e).await;
        }
    };
    let routed = snapshot.model(&affinity.model).map(|(name, _)| name);
    acct.set_request(&affinity.model, routed, stream);
    if !affinity.model.is_empty() && !key.may_use(&affinity.model) {
        return forward::error(acct, ProxyError::ModelNotAllowed(affinity.model)).await;
    }
    if let Some(limiter) = &key.limiter
        && let Err(retry_after) = limiter.try_acquire(Instant::now())
    {
        app.metrics.rate_limited(LimitScope::client_key);
        return forward::error(acct, ProxyError::KeyRateLimited { retry_after }).await;
    }
    let passed = Passthrough {
        headers: target.beta,
        query: None,
        // A call on a stored response costs nothing: the SDK's retry after its own timeout
        // bills nobody twice.
        client_wait: None,
    };
    let route = Route {
        backend: index,
        upstream_model: String::new(),
        // The response was charged when it was created; reading, listing or deleting it
        // adds nothing to the key's spend.
        prices: Prices::default(),
        tiers: Tiers::default(),
        call_prices: CallPrices::default(),
        default_max_tokens: crate::snapshot::DEFAULT_MAX_TOKENS,
        max_output_tokens: None,
    };
    let call = Call {
        endpoint: Endpoint::Responses,
        model: &affinity.model,
        stream,
        send: Outbound::Stored {
            method: target.method,
            upstream_id: &affinity.upstream_id,
            action: target.action,
            query: target.query.as_deref(),
        },
        ids: Some(IdRewrite {
            keys: Arc::clone(&snapshot.affinity),
            client_key_id: key.id.clone(),
            backend_id: String::new(),
            model: affinity.model.clone(),
            known: Some((affinity.upstream_id.clone(), target.id.clone())),
        }),
        count_usage: false,
        passed: Some(&passed),
        conversation: None,
    };
    forward::forward_call(
        app,
        snapshot,
        std::slice::from_ref(&route),
        &call,
        acct,
        None,
    )
    .await
}

/// The backend (its index) that holds the response `id`, with what the id says; refused
/// when the id is not one this gateway issued to this key, or its backend cannot be reached
/// now (no failover: no other backend holds the state): gone, or, for a call that
/// `generates` (a continuation), cooling down. A call on the stored response itself (a
/// retrieve, a delete, a cancel, its items) is sent whatever the cooldown: it generates
/// nothing, and only that backend holds what it asks for (a background job's finished answer,
/// already paid for, was out of reach while an account out of credit cooled its backend).
fn pin(
    app: &AppState,
    snapshot: &Snapshot,
    key: &ClientKey,
    id: &str,
    param: &'static str,
    generates: bool,
) -> Result<(usize, Affinity), ProxyError> {
    let affinity = snapshot.affinity.unwrap(&key.id, id).map_err(|e| match e {
        IdError::NoKey => ProxyError::NoAffinityKey,
        IdError::Invalid => ProxyError::InvalidResponseId {
            param,
            id: quoted(id),
        },
    })?;
    let Some((index, backend)) = snapshot.backend_by_id(&affinity.backend_id) else {
        return Err(ProxyError::ResponseBackendGone { id: quoted(id) });
    };
    // The backend's own cooldown: a model's at it is checked once the call is routed.
    if generates && let Err(until) = app.store.cooldowns().check(&backend.id, "", Instant::now()) {
        return Err(cooling_down(id, until));
    }
    Ok((index, affinity))
}

/// The answer to a call on the response `id` whose backend, or model at it, cools down
/// until `until`.
fn cooling_down(id: &str, until: Instant) -> ProxyError {
    ProxyError::ResponseBackendCoolingDown {
        id: quoted(id),
        retry_after: until.saturating_duration_since(Instant::now()),
    }
}
