//! The web dashboard the control plane serves on its HTTP listener: plain HTML,
//! CSS and JavaScript embedded in the binary (`/` and `/ui/...`), and the JSON API
//! it speaks (`/api/...`, see [`json_api`]).

pub mod json_api;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};

use crate::metrics::Metrics;

pub use json_api::JsonApi;

const INDEX_HTML: &str = include_str!("dashboard/index.html");
const APP_JS: &str = include_str!("dashboard/app.js");
const APP_CSS: &str = include_str!("dashboard/app.css");

/// The dashboard's pages and its JSON API, whose calls count in `metrics`.
pub fn router(api: JsonApi, metrics: Arc<Metrics>) -> Router {
    let json = Router::new()
        .route("/api/sluice.v1.AdminService/{method}", any(json_api::admin))
        .route("/api/sluice.v1.StatsService/{method}", any(json_api::stats))
        .route("/api/{*path}", any(json_api::unknown_service))
        .layer(DefaultBodyLimit::max(json_api::BODY_LIMIT))
        .layer(axum::middleware::from_fn_with_state(
            metrics,
            crate::metrics::count_json_api,
        ))
        .with_state(api);
    Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/ui/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/ui/app.css",
            get(|| async { asset("text/css; charset=utf-8", APP_CSS) }),
        )
        .merge(json)
}

/// An embedded file. `no-cache` so that a new binary's dashboard is picked up at once.
fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        body,
    )
        .into_response()
}
