//! The control plane's HTTP listener: health, readiness and Prometheus metrics.

use std::fmt::Write as _;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use crate::dataplane::Registry;
use crate::snapshot::Publisher;

#[derive(Clone)]
struct AppState {
    publisher: Arc<Publisher>,
    registry: Arc<Registry>,
}

pub fn router(publisher: Arc<Publisher>, registry: Arc<Registry>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(|| async { "ready\n" }))
        .route("/metrics", get(metrics))
        .with_state(AppState {
            publisher,
            registry,
        })
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP sluice_snapshot_version The newest published snapshot version."
    );
    let _ = writeln!(out, "# TYPE sluice_snapshot_version gauge");
    let _ = writeln!(
        out,
        "sluice_snapshot_version {}",
        state.publisher.latest().version
    );
    let _ = writeln!(
        out,
        "# HELP sluice_connected_replicas Data planes with an open snapshot stream."
    );
    let _ = writeln!(out, "# TYPE sluice_connected_replicas gauge");
    let _ = writeln!(
        out,
        "sluice_connected_replicas {}",
        state.registry.connected_count()
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}
