//! Tracing end to end (MeshConfig `observability.tracing`), with real sidecars in every pairing
//! of client and server data plane (Envoy and fsm-sidecar each side): the spans of one request
//! reach a Zipkin-compatible collector (here, a small HTTP server taking `POST /api/v2/spans`)
//! from both sidecars and form one trace, whichever data planes made them.
//!
//! The demo mesh starts with tracing off. Turned on in MeshConfig (collector A), a request from
//! curl to httpbin reaches the application with B3 headers, and the collector receives curl's
//! sidecar's CLIENT span (`curl.demo`) and httpbin's sidecar's SERVER span (`httpbin.demo`) with
//! the request's trace id, the SERVER span the CLIENT span's child, and the application's
//! `x-b3-spanid`/`x-b3-parentspanid` those two spans. Moved to collector B, new spans go there.
//! Turned off, requests carry no B3 headers and no span of theirs arrives anywhere. Nothing
//! restarts: each change goes to the running sidecars over xDS.
//!
//! Envoy sends its spans when five are buffered or every 5 s (its Zipkin tracer's defaults);
//! fsm-sidecar every second. Each round sends five requests, and the test polls.
//!
//! Envoy applies a listener change (its HTTP connection managers carry the tracer) to the
//! connections accepted after it; one already open keeps its old filter chain until it closes
//! or drains (Envoy's drain time, 10 minutes by default), while fsm-sidecar reads the setting
//! for every request. An UpstreamTrafficSetting with `maxRequestsPerConnection: 1` gives each
//! request a connection of its own between the sidecars (the test client opens one per request
//! to curl's sidecar), so that every request shows the setting in force.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use fsm_integration_tests::{DemoMesh, PAIRINGS, Plane, eventually, http_get_via};
use parking_lot::Mutex;
use serde_json::Value;

const CONVERGE: Duration = Duration::from_secs(30);
/// Longer than Envoy's 5 s flush interval: a span not reported by then never will be.
const FLUSHED: Duration = Duration::from_secs(6);
const HTTPBIN: &str = "httpbin.demo:14001";
/// Subnets 127.0.160.0/24 on, one per pairing.
const FIRST_SUBNET: u8 = 160;

// === Collector ===

/// A Zipkin v2 collector: keeps every span POSTed to `/api/v2/spans`; stops when dropped.
struct Collector {
    addr: SocketAddr,
    spans: Arc<Mutex<Vec<Value>>>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Collector {
    async fn start() -> Result<Collector> {
        async fn take(
            State(spans): State<Arc<Mutex<Vec<Value>>>>,
            Json(batch): Json<Vec<Value>>,
        ) -> StatusCode {
            spans.lock().extend(batch);
            StatusCode::ACCEPTED
        }
        let spans = Arc::new(Mutex::new(Vec::new()));
        let app = axum::Router::new()
            .route("/api/v2/spans", post(take))
            .with_state(spans.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Collector {
            addr,
            spans,
            server,
        })
    }

    fn spans(&self) -> Vec<Value> {
        self.spans.lock().clone()
    }

    /// The spans whose URL path starts with `prefix` (Envoy tags `http.url`, fsm-sidecar both
    /// `http.url` and `http.path`).
    fn spans_for(&self, prefix: &str) -> Vec<Value> {
        self.spans()
            .into_iter()
            .filter(|s| {
                s["tags"]["http.url"]
                    .as_str()
                    .and_then(|url| url.split_once("://").map(|(_, rest)| rest))
                    .and_then(|rest| rest.find('/').map(|i| &rest[i..]))
                    .is_some_and(|path| path.starts_with(prefix))
            })
            .collect()
    }
}

// === MeshConfig ===

/// See the module's comment.
const ONE_REQUEST_PER_CONNECTION: &str = r#"
apiVersion: policy.flomesh.io/v1alpha1
kind: UpstreamTrafficSetting
metadata: {name: httpbin, namespace: demo}
spec:
  host: httpbin.demo.svc.cluster.local
  connectionSettings:
    http: {maxRequestsPerConnection: 1}
"#;

/// `00-mesh.yaml` as the demo has it, with `observability.tracing` pointing at `collector`
/// (enabled or not).
fn with_tracing(base: &str, collector: SocketAddr, enable: bool) -> String {
    base.replacen(
        "spec:\n",
        &format!(
            "spec:\n  observability:\n    tracing:\n      enable: {enable}\n      address: \"{}\"\n      port: {}\n      endpoint: /api/v2/spans\n",
            collector.ip(),
            collector.port()
        ),
        1,
    )
}

// === The test ===

/// What the application saw of one request's trace context.
#[derive(Debug)]
struct Seen {
    trace_id: String,
    span_id: String,
    /// Absent while only the client's sidecar traces (the server's has not got the change yet).
    parent_span_id: Option<String>,
    sampled: String,
}

/// GETs `path` from httpbin through curl's sidecar; the B3 headers the application got, if any.
async fn get(via: SocketAddr, path: &str) -> Result<Option<Seen>> {
    let reply = http_get_via(via, HTTPBIN, path).await?;
    ensure!(reply.status == 200, "GET {path}: {}", reply.status);
    let json = reply.json()?;
    let headers = &json["headers"];
    let header = |name: &str| headers[name].as_str().map(str::to_owned);
    Ok(match header("x-b3-traceid") {
        None => None,
        Some(trace_id) => Some(Seen {
            trace_id,
            span_id: header("x-b3-spanid").context("x-b3-spanid")?,
            parent_span_id: header("x-b3-parentspanid"),
            sampled: header("x-b3-sampled").unwrap_or_default(),
        }),
    })
}

/// Sends a round of five requests `<prefix>/<n>` (enough for Envoy to report at once).
async fn round(via: SocketAddr, prefix: &str) -> Result<Vec<Option<Seen>>> {
    let mut seen = Vec::new();
    for n in 0..5 {
        seen.push(get(via, &format!("{prefix}/{n}")).await?);
    }
    Ok(seen)
}

/// Checks that `spans` hold the CLIENT span of curl's sidecar and the SERVER span of httpbin's
/// for the request the application saw as `seen`, one the other's parent.
fn check_trace(spans: &[Value], seen: &Seen) -> Result<()> {
    let of_trace: Vec<&Value> = spans
        .iter()
        .filter(|s| s["traceId"] == seen.trace_id.as_str())
        .collect();
    let find = |kind: &str, service: &str| {
        of_trace
            .iter()
            .copied()
            .find(|s| s["kind"] == kind && s["localEndpoint"]["serviceName"] == service)
    };
    let (Some(client), Some(server)) =
        (find("CLIENT", "curl.demo"), find("SERVER", "httpbin.demo"))
    else {
        bail!(
            "trace {} lacks curl.demo's CLIENT span or httpbin.demo's SERVER span: {of_trace:#?}",
            seen.trace_id
        );
    };
    let client_id = client["id"].as_str().context("client span id")?;
    let server_id = server["id"].as_str().context("server span id")?;
    ensure!(
        client_id != server_id,
        "one span for both: {client} {server}"
    );
    ensure!(
        server["parentId"] == client_id,
        "the SERVER span's parent is not the CLIENT span: {client:#} {server:#}"
    );
    ensure!(
        seen.span_id == server_id && seen.parent_span_id.as_deref() == Some(client_id),
        "the application saw span {} (parent {:?}), not the SERVER span {server_id} (parent {client_id})",
        seen.span_id,
        seen.parent_span_id
    );
    for span in [client, server] {
        ensure!(
            span["timestamp"].as_u64().is_some() && span["duration"].as_u64().is_some(),
            "no timestamp or duration: {span:#}"
        );
        ensure!(
            span["tags"]["http.method"] == "GET",
            "no http.method: {span:#}"
        );
    }
    Ok(())
}

async fn spans_share_a_trace(client: Plane, servers: Plane, subnet: u8) -> Result<()> {
    let a = Collector::start().await?;
    let b = Collector::start().await?;
    let mesh = DemoMesh::start_edited(subnet, |dir| {
        std::fs::write(
            dir.join("40-one-request-per-connection.yaml"),
            ONE_REQUEST_PER_CONNECTION,
        )?;
        Ok(())
    })
    .await?;
    let mesh_yaml = mesh.manifests.join("00-mesh.yaml");
    let base = std::fs::read_to_string(&mesh_yaml)?;
    let sidecars = mesh
        .start_client_and_servers(client, servers, CONVERGE)
        .await?;
    let via = mesh.pod("curl")?.outbound_addr();
    ensure!(
        get(via, "/off-at-start").await?.is_none(),
        "B3 headers with tracing off"
    );

    // On, to collector A.
    std::fs::write(&mesh_yaml, with_tracing(&base, a.addr, true))?;
    eventually(CONVERGE, || async {
        ensure!(
            get(via, "/converging").await?.is_some(),
            "no B3 headers yet"
        );
        Ok(())
    })
    .await
    .context("tracing never reached the sidecars")?;
    let seen = round(via, "/traced").await?;
    let seen: Vec<Seen> = seen
        .into_iter()
        .map(|s| s.context("a traced request without B3 headers"))
        .collect::<Result<_>>()?;
    for s in &seen {
        ensure!(
            s.sampled == "1" && s.trace_id.len() == 32,
            "the application saw {s:?}"
        );
    }
    let found = eventually(CONVERGE, || async {
        let spans = a.spans_for("/traced/");
        for s in &seen {
            check_trace(&spans, s)?;
        }
        Ok(())
    })
    .await;
    if let Err(e) = found {
        let mut stats = String::new();
        for (pod, sidecar) in mesh.pods.iter().zip(&sidecars) {
            stats.push_str(&format!(
                "{}:\n{}",
                pod.name,
                sidecar.stats_with("tracing").await?
            ));
        }
        return Err(e.context(format!("collector A; tracing stats:\n{stats}")));
    }

    // Moved to collector B.
    std::fs::write(&mesh_yaml, with_tracing(&base, b.addr, true))?;
    // Every request sent since the move, as the application saw it: spans of one round may
    // arrive after the next has been sent.
    let moved = Mutex::new(Vec::new());
    eventually(CONVERGE, || async {
        let seen = round(via, "/moved").await?;
        let mut all = moved.lock();
        all.extend(seen.into_iter().flatten());
        let spans = b.spans_for("/moved/");
        ensure!(
            all.iter().any(|s| check_trace(&spans, s).is_ok()),
            "no whole trace at collector B yet ({} spans)",
            spans.len()
        );
        Ok(())
    })
    .await
    .context("collector B")?;

    // Off: no B3 headers, and no span of the requests made since.
    std::fs::write(&mesh_yaml, with_tracing(&base, b.addr, false))?;
    eventually(CONVERGE, || async {
        ensure!(
            get(via, "/turning-off").await?.is_none(),
            "B3 headers still"
        );
        Ok(())
    })
    .await
    .context("tracing never went off")?;
    for s in round(via, "/untraced").await? {
        ensure!(s.is_none(), "B3 headers with tracing off: {s:?}");
    }
    tokio::time::sleep(FLUSHED).await;
    for (name, collector) in [("A", &a), ("B", &b)] {
        let late = collector.spans_for("/untraced/");
        ensure!(
            late.is_empty(),
            "collector {name} got spans of requests made with tracing off: {late:#?}"
        );
    }
    eprintln!(
        "[tracing] {client:?} -> {servers:?}: {} spans at A, {} at B",
        a.spans().len(),
        b.spans().len()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_and_server_spans_share_a_trace_in_every_pairing() {
    for ((client, servers), subnet) in PAIRINGS.into_iter().zip(FIRST_SUBNET..) {
        if let Err(err) = spans_share_a_trace(client, servers, subnet).await {
            panic!("client {client:?}, servers {servers:?}: {err:#}");
        }
    }
}
