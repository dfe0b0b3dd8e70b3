//! The control plane's HTTP port (FSM's 9091): health, Prometheus metrics and debug views.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use fsm_cache::SnapshotCache;

use crate::runner;
use crate::source::Source;

#[derive(Clone)]
pub struct AppState {
    pub cache: Arc<SnapshotCache>,
    pub runner: Arc<runner::State>,
    pub source: Arc<Source>,
}

pub async fn serve(listener: tokio::net::TcpListener, state: AppState) -> std::io::Result<()> {
    let app = axum::Router::new()
        .route("/health/alive", get(|| async { "alive" }))
        .route("/health/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/debug/proxies", get(proxies))
        .route("/debug/config", get(config))
        .route("/debug/problems", get(problems))
        .route("/debug/recompute", get(recompute))
        .route("/debug/source", get(source))
        .route("/version", get(version))
        .with_state(state)
        // fsm_http_response_total / fsm_http_response_duration, by route template.
        .layer(axum::middleware::from_fn(crate::metrics::track_http));
    axum::serve(listener, app).await
}

/// The controller's version (what `fsm version` shows for the control plane).
async fn version() -> impl IntoResponse {
    axum::Json(serde_json::json!({"version": env!("CARGO_PKG_VERSION")}))
}

async fn ready(State(state): State<AppState>) -> impl IntoResponse {
    if state.runner.is_ready() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "loading")
    }
}

async fn metrics() -> impl IntoResponse {
    match prometheus::TextEncoder::new().encode_to_string(&prometheus::gather()) {
        Ok(text) => (StatusCode::OK, text),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// Per proxy and type: the snapshot version, and what was sent, ACKed and NACKed.
async fn proxies(State(state): State<AppState>) -> impl IntoResponse {
    Json(state.cache.status())
}

/// Per proxy: node id, pod, and why its configuration is missing or partial.
async fn config(State(state): State<AppState>) -> impl IntoResponse {
    Json(state.runner.proxies())
}

/// What the last batch of catalog changes cost: proxies recompiled, resources encoded,
/// snapshots published.
async fn recompute(State(state): State<AppState>) -> impl IntoResponse {
    Json(state.runner.last_change())
}

/// Objects that were rejected, each naming the object and field with its FSM error code.
async fn problems(State(state): State<AppState>) -> impl IntoResponse {
    let mut problems = state.source.problems();
    problems.extend(state.runner.rejected());
    Json(problems)
}

/// Where objects come from and, for a cluster, the state of each kind's watch.
async fn source(State(state): State<AppState>) -> impl IntoResponse {
    Json(state.source.status())
}
