//! The control plane's HTTP listener: health, readiness, Prometheus metrics, and the
//! web dashboard with its JSON API. Every answer carries the security headers; only
//! requests for a host this server answers to are served ([`host`]).

pub mod host;

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sluice_listener::{Acceptor, Graceful, Http};
use tokio_util::sync::CancellationToken;
use tower_service::Service;

use crate::dashboard::JsonApi;
use crate::membership::Registry;
use crate::metrics::Metrics;
use crate::snapshot::Publisher;

#[derive(Clone)]
struct AppState {
    publisher: Arc<Publisher>,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
}

/// The dashboard's Content-Security-Policy: only this origin's files, no inline
/// script or style, no framing.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; img-src 'self' data:; \
     style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'; \
     base-uri 'none'; form-action 'self'";

/// Serves `router` on the connections `acceptor` takes until `stop`, then lets the requests
/// in progress finish.
pub async fn serve(acceptor: Acceptor, router: Router, http: Http, stop: CancellationToken) {
    let graceful = Graceful::new();
    loop {
        let (tcp, peer, slot) = tokio::select! {
            accepted = acceptor.accept() => accepted,
            () = stop.cancelled() => break,
        };
        let router = router.clone();
        let service = hyper::service::service_fn(
            move |mut request: hyper::Request<hyper::body::Incoming>| {
                // The JSON API throttles failed logins per client address.
                request
                    .extensions_mut()
                    .insert(axum::extract::ConnectInfo(peer));
                router.clone().call(request)
            },
        );
        let connection = http.serve(tcp, service, &graceful);
        tokio::spawn(async move {
            connection.await;
            drop(slot);
        });
    }
    graceful.shutdown().await;
}

/// Everything the HTTP listener serves; `api` is the dashboard's JSON API.
pub fn router(
    publisher: Arc<Publisher>,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    api: JsonApi,
    hosts: host::AllowedHosts,
) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(|| async { "ready\n" }))
        .route("/metrics", get(serve_metrics))
        .with_state(AppState {
            publisher,
            registry,
            metrics: Arc::clone(&metrics),
        })
        .merge(crate::dashboard::router(api, metrics))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n") })
        .layer(axum::middleware::from_fn_with_state(
            hosts,
            host::check_host,
        ))
        .layer(axum::middleware::from_fn(security_headers))
}

/// Adds the security headers to every answer, and `no-store` to the API's.
async fn security_headers(request: Request, next: Next) -> Response {
    let api = request.uri().path().starts_with("/api/");
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    if api {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

async fn serve_metrics(State(state): State<AppState>) -> impl IntoResponse {
    let text = state.metrics.render(
        state.publisher.latest().version,
        state.registry.connected_count(),
    );
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
}
