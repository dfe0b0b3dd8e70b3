//! The control plane's HTTP port (FSM's 9091): health, Prometheus metrics and debug views.
//!
//! # Rules
//!
//! * **Ready means proxies can be served.** `/health/ready` answers 200 only once the ADS
//!   listener is bound and accepting and the first full sync of the source is applied to the
//!   catalog; until then 503, naming what is missing (`loading: ADS not serving; first sync: 3
//!   of 14 kinds`). `/health/alive` answers as soon as the process serves HTTP.
//! * **The debug endpoints are MeshConfig's to open.** `/debug/*` answer only while
//!   `spec.observability.enableDebugServer` is true (FSM's default is false), switched live;
//!   otherwise 404 naming the field and the command that turns it on. `/health/*`, `/metrics`
//!   and `/version` always answer.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use fsm_cache::SnapshotCache;

use crate::runner;
use crate::source::Source;

/// The header a 404 of a switched-off debug endpoint carries (`fsm proxy status` also reads
/// the body, which names the MeshConfig field).
pub const DEBUG_OFF_HEADER: &str = "x-fsm-debug-server";

#[derive(Clone)]
pub struct AppState {
    pub cache: Arc<SnapshotCache>,
    pub runner: Arc<runner::State>,
    pub source: Arc<Source>,
    pub readiness: Arc<Readiness>,
    /// Where the MeshConfig lives, for the hint of a switched-off debug endpoint.
    pub fsm_namespace: String,
}

/// What `/health/ready` waits for besides the catalog.
#[derive(Debug, Default)]
pub struct Readiness {
    ads_serving: AtomicBool,
}

impl Readiness {
    /// The ADS listener is bound and accepting connections (or no longer is).
    pub fn set_ads_serving(&self, serving: bool) {
        self.ads_serving.store(serving, Ordering::Release);
    }

    pub fn ads_serving(&self) -> bool {
        self.ads_serving.load(Ordering::Acquire)
    }
}

pub async fn serve(listener: tokio::net::TcpListener, state: AppState) -> std::io::Result<()> {
    axum::serve(listener, router(state)).await
}

fn router(state: AppState) -> axum::Router {
    let debug = axum::Router::new()
        .route("/debug/proxies", get(proxies))
        .route("/debug/proxies/resources", get(proxy_resources))
        .route("/debug/config", get(config))
        .route("/debug/problems", get(problems))
        .route("/debug/recompute", get(recompute))
        .route("/debug/source", get(source))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            debug_gate,
        ));
    axum::Router::new()
        .route("/health/alive", get(|| async { "alive" }))
        .route("/health/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/version", get(version))
        .merge(debug)
        .with_state(state)
        // fsm_http_response_total / fsm_http_response_duration, by route template.
        .layer(axum::middleware::from_fn(crate::metrics::track_http))
}

/// Lets a `/debug/*` request through while MeshConfig enables the debug server.
async fn debug_gate(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if state.runner.debug_server() {
        return next.run(request).await;
    }
    let manifests = match &*state.source {
        Source::Manifests { dir, .. } => Some(dir.display().to_string()),
        Source::Kube { .. } => None,
    };
    (
        StatusCode::NOT_FOUND,
        [(DEBUG_OFF_HEADER, "off")],
        debug_off_hint(&state.fsm_namespace, manifests.as_deref()),
    )
        .into_response()
}

/// The body of a switched-off debug endpoint: the field, and how to turn it on.
pub fn debug_off_hint(fsm_namespace: &str, manifest_dir: Option<&str>) -> String {
    let mut hint = format!(
        "the debug server is off: MeshConfig {fsm_namespace}/fsm-mesh-config has spec.observability.enableDebugServer false (FSM's default). Turn it on with:\n  kubectl patch meshconfig fsm-mesh-config -n {fsm_namespace} --type=merge -p '{{\"spec\":{{\"observability\":{{\"enableDebugServer\":true}}}}}}'\n"
    );
    if let Some(dir) = manifest_dir {
        hint.push_str(&format!(
            "or, without a cluster, set spec.observability.enableDebugServer: true in the MeshConfig manifest under {dir}\n"
        ));
    }
    hint
}

/// Why the controller is not ready (`None`: ready): the ADS listener, then the first sync,
/// whose progress `progress` tells.
pub fn not_ready(
    ads_serving: bool,
    synced: bool,
    progress: impl FnOnce() -> String,
) -> Option<String> {
    let mut missing = Vec::new();
    if !ads_serving {
        missing.push("ADS not serving".to_owned());
    }
    if !synced {
        missing.push(format!("first sync: {}", progress()));
    }
    (!missing.is_empty()).then(|| format!("loading: {}", missing.join("; ")))
}

/// The controller's version (what `fsm version` shows for the control plane).
async fn version() -> impl IntoResponse {
    axum::Json(serde_json::json!({"version": env!("CARGO_PKG_VERSION")}))
}

async fn ready(State(state): State<AppState>) -> impl IntoResponse {
    match not_ready(
        state.readiness.ads_serving(),
        state.runner.is_ready(),
        || state.source.sync_progress(),
    ) {
        None => (StatusCode::OK, "ready".to_owned()),
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
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
        // An error returned to the client: its code, counted.
        let code = fsm_errcode::ErrCode::E5001;
        fsm_errcode::count(code);
        return (
            StatusCode::BAD_REQUEST,
            format!("{code}: {:?} is not a proxy's node id", query.proxy),
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

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// The HTTP port of a controller without a control loop: its state is set by hand.
    struct Harness {
        addr: SocketAddr,
        state: AppState,
        _events: tokio::sync::mpsc::Receiver<fsm_catalog::CatalogEvent>,
        _dir: tempfile::TempDir,
    }

    async fn start() -> Harness {
        let dir = tempfile::tempdir().expect("temporary directory");
        let (tx, events) = tokio::sync::mpsc::channel(16);
        let manifests = fsm_sources::ManifestSource::spawn(dir.path().to_path_buf(), tx)
            .await
            .expect("manifest source");
        let state = AppState {
            cache: Arc::new(SnapshotCache::new()),
            runner: Arc::default(),
            source: Arc::new(Source::Manifests {
                dir: dir.path().to_path_buf(),
                source: manifests,
            }),
            readiness: Arc::default(),
            fsm_namespace: "fsm-system".into(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        tokio::spawn(serve(listener, state.clone()));
        Harness {
            addr,
            state,
            _events: events,
            _dir: dir,
        }
    }

    /// Status, head and body of `GET path`.
    async fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .expect("request");
        let mut text = String::new();
        stream.read_to_string(&mut text).await.expect("response");
        let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("status");
        (status, head.to_ascii_lowercase(), body.to_owned())
    }

    #[test]
    fn not_ready_names_what_is_missing() {
        let progress = || "3 of 14 kinds".to_owned();
        assert_eq!(
            not_ready(false, false, progress).as_deref(),
            Some("loading: ADS not serving; first sync: 3 of 14 kinds")
        );
        assert_eq!(
            not_ready(true, false, progress).as_deref(),
            Some("loading: first sync: 3 of 14 kinds")
        );
        assert_eq!(
            not_ready(false, true, progress).as_deref(),
            Some("loading: ADS not serving")
        );
        assert_eq!(not_ready(true, true, progress), None);
    }

    #[tokio::test]
    async fn ready_only_once_ads_serves_and_the_first_sync_is_applied() {
        let h = start().await;
        let (status, _, body) = get(h.addr, "/health/ready").await;
        assert_eq!(
            (status, body.as_str()),
            (
                503,
                "loading: ADS not serving; first sync: manifests read, not applied yet"
            )
        );
        assert_eq!(get(h.addr, "/health/alive").await.0, 200);

        // The ADS listener serves; the catalog has not loaded yet.
        h.state.readiness.set_ads_serving(true);
        let (status, _, body) = get(h.addr, "/health/ready").await;
        assert_eq!(
            (status, body.as_str()),
            (503, "loading: first sync: manifests read, not applied yet")
        );

        // Both: ready.
        h.state.runner.set_ready();
        let (status, _, body) = get(h.addr, "/health/ready").await;
        assert_eq!((status, body.as_str()), (200, "ready"));

        // The listener gone: not ready any more.
        h.state.readiness.set_ads_serving(false);
        let (status, _, body) = get(h.addr, "/health/ready").await;
        assert_eq!((status, body.as_str()), (503, "loading: ADS not serving"));
    }

    #[tokio::test]
    async fn the_debug_endpoints_follow_enable_debug_server_live() {
        let h = start().await;
        for round in 0..2 {
            let (status, head, body) = get(h.addr, "/debug/proxies").await;
            assert_eq!(status, 404, "round {round}: {body}");
            assert!(head.contains("x-fsm-debug-server: off"), "{head}");
            assert!(
                body.contains("spec.observability.enableDebugServer")
                    && body.contains("kubectl patch meshconfig fsm-mesh-config -n fsm-system --type=merge -p '{\"spec\":{\"observability\":{\"enableDebugServer\":true}}}'")
                    && body.contains(&h._dir.path().display().to_string()),
                "{body}"
            );
            for path in ["/health/alive", "/metrics", "/version"] {
                assert_eq!(
                    get(h.addr, path).await.0,
                    200,
                    "{path} with the debug server off"
                );
            }

            assert!(h.state.runner.set_debug_server(true));
            for path in [
                "/debug/proxies",
                "/debug/config",
                "/debug/problems",
                "/debug/recompute",
                "/debug/source",
            ] {
                let (status, _, body) = get(h.addr, path).await;
                assert_eq!(status, 200, "{path}: {body}");
            }
            assert!(h.state.runner.set_debug_server(false));
        }
    }

    #[tokio::test]
    async fn a_malformed_node_id_is_answered_with_its_code() {
        let h = start().await;
        h.state.runner.set_debug_server(true);
        let before = fsm_errcode::counted(fsm_errcode::ErrCode::E5001);
        let (status, _, body) = get(h.addr, "/debug/proxies/resources?proxy=nope").await;
        assert_eq!(status, 400);
        assert!(body.starts_with("E5001: "), "{body}");
        assert!(fsm_errcode::counted(fsm_errcode::ErrCode::E5001) > before);
    }
}
