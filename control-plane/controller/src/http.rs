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
        .route("/debug/proxies/resources", get(proxy_resources))
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

#[derive(serde::Deserialize)]
struct ProxyQuery {
    /// The proxy's node id, as `/debug/proxies` lists it.
    proxy: String,
}

/// What the controller would send one proxy now: per type, each resource in its data plane's
/// own JSON form (Envoy's `/config_dump` form, or fsm-sidecar's), private keys redacted. `fsm
/// proxy status <pod>` compares it with the proxy's own dump.
async fn proxy_resources(
    State(state): State<AppState>,
    axum::extract::Query(query): axum::extract::Query<ProxyQuery>,
) -> axum::response::Response {
    let Ok(key) = fsm_cache::ProxyKey::parse(&query.proxy) else {
        return (
            StatusCode::BAD_REQUEST,
            format!("{:?} is not a proxy's node id", query.proxy),
        )
            .into_response();
    };
    let Some(snapshot) = state.cache.get(&key) else {
        return (
            StatusCode::NOT_FOUND,
            format!("no configuration computed for proxy {key}"),
        )
            .into_response();
    };
    let mut types = serde_json::Map::new();
    for (type_url, set) in snapshot.types() {
        let resources: Vec<serde_json::Value> = set
            .resources()
            .map(|r| {
                serde_json::json!({
                    "name": &*r.name,
                    "version": &*r.version,
                    "resource": resource_json(type_url, &r.body)
                        .unwrap_or_else(|e| serde_json::json!({"undecodable": e})),
                })
            })
            .collect();
        types.insert(
            type_url.to_string(),
            serde_json::json!({"version": &**set.version(), "resources": resources}),
        );
    }
    Json(serde_json::json!({"proxy": key.to_string(), "types": types})).into_response()
}

/// One encoded resource in its data plane's JSON form, private keys redacted.
fn resource_json(type_url: &str, body: &[u8]) -> Result<serde_json::Value, String> {
    if type_url.starts_with("type.googleapis.com/fsm.dataplane.") {
        fsm_dataplane_proto::json::resource_json(type_url, body)
    } else {
        fsm_adapter_envoy::json::encoded_to_json(
            type_url,
            body,
            fsm_adapter_envoy::json::Sensitive::Redact,
        )
        .map_err(|e| e.to_string())
    }
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
