//! The controller's Prometheus metrics on `/metrics` (9091).
//!
//! What the control loop's work costs, per catalog change (`fsm_controller_*`, ours), so that "an
//! endpoint change recompiles no proxy and encodes one resource" is visible in production, not
//! only in tests; and FSM's metrics of the controller's own endpoints and settings, with FSM's
//! names and labels verbatim: `fsm_http_response_total` / `fsm_http_response_duration` (every
//! response of the HTTP port, by route template), `fsm_feature_flag_enabled` (MeshConfig
//! `spec.featureFlags`), `fsm_reconciliation_total` (the reconciler) and
//! `fsm_conversion_webhook_resource_total`. The other `fsm_*` metrics live beside the code that
//! moves them (sources, ADS server, certificate manager, webhooks); [`register_all`] makes every
//! one of them exported from the start.

use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts,
};
use serde::Serialize;

pub struct Metrics {
    /// Catalog change batches applied (each one recompute).
    pub changes: IntCounter,
    /// Proxies whose own part (pod, inbound ports, listeners, certificate) was compiled.
    pub proxies_recompiled: IntCounter,
    /// Resources encoded (each is then shared by every proxy that receives it).
    pub resources_encoded: IntCounter,
    /// Proxy snapshots that changed and were handed to their streams.
    pub snapshots_published: IntCounter,
    /// Time to apply one change batch to the view, the shared parts and the affected proxies.
    pub recompute_seconds: Histogram,
}

pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let counter = |name: &str, help: &str| {
            let counter = IntCounter::new(name, help).expect("valid metric name");
            // Registration fails only on a duplicate name, which this OnceLock rules out.
            let _ = prometheus::register(Box::new(counter.clone()));
            counter
        };
        let recompute_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "fsm_controller_recompute_seconds",
                "Time to apply one batch of catalog changes to the proxies it affects",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
        )
        .expect("valid metric");
        let _ = prometheus::register(Box::new(recompute_seconds.clone()));
        Metrics {
            changes: counter(
                "fsm_controller_catalog_changes_total",
                "Batches of catalog changes applied",
            ),
            proxies_recompiled: counter(
                "fsm_controller_proxies_recompiled_total",
                "Proxies whose own configuration (pod, inbound ports, listeners, certificate) was compiled",
            ),
            resources_encoded: counter(
                "fsm_controller_resources_encoded_total",
                "xDS resources encoded; each is shared by every proxy that receives it",
            ),
            snapshots_published: counter(
                "fsm_controller_snapshots_published_total",
                "Proxy snapshots that changed and were handed to the proxy's streams",
            ),
            recompute_seconds,
        }
    })
}

/// The work of one batch of catalog changes (or of a proxy connecting); the last batch's is
/// shown on `/debug/recompute`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Work {
    pub proxies_recompiled: u64,
    pub resources_encoded: u64,
    pub snapshots_published: u64,
}

impl Work {
    /// Adds this work to the Prometheus counters.
    pub fn record(&self) {
        let m = metrics();
        m.proxies_recompiled.inc_by(self.proxies_recompiled);
        m.resources_encoded.inc_by(self.resources_encoded);
        m.snapshots_published.inc_by(self.snapshots_published);
    }
}

// === FSM's metrics of the controller ===

pub struct FsmMetrics {
    /// `fsm_http_response_total{code,method,path}`
    pub http_response_total: IntCounterVec,
    /// `fsm_http_response_duration{code,method,path}` (seconds)
    pub http_response_duration: HistogramVec,
    /// `fsm_feature_flag_enabled{feature_flag}`: 1 or 0 per MeshConfig `spec.featureFlags` field,
    /// named as in the MeshConfig.
    pub feature_flag_enabled: IntGaugeVec,
    /// `fsm_reconciliation_total{kind}`: objects the reconciler restored.
    pub reconciliation_total: IntCounterVec,
    /// `fsm_conversion_webhook_resource_total{kind,success,from_version,to_version}`
    pub conversion_webhook_resource_total: IntCounterVec,
}

pub fn fsm() -> &'static FsmMetrics {
    static METRICS: OnceLock<FsmMetrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let http_labels = &["code", "method", "path"];
        let metrics = FsmMetrics {
            http_response_total: IntCounterVec::new(
                Opts::new("http_response_total", "Counter of HTTP responses sent").namespace("fsm"),
                http_labels,
            )
            .expect("valid metric"),
            http_response_duration: HistogramVec::new(
                HistogramOpts::new(
                    "http_response_duration",
                    "Duration in seconds of HTTP responses sent",
                )
                .namespace("fsm")
                .buckets(vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ]),
                http_labels,
            )
            .expect("valid metric"),
            feature_flag_enabled: IntGaugeVec::new(
                Opts::new(
                    "feature_flag_enabled",
                    "Represents whether a feature flag is enabled (1) or disabled (0)",
                )
                .namespace("fsm"),
                &["feature_flag"],
            )
            .expect("valid metric"),
            reconciliation_total: IntCounterVec::new(
                Opts::new(
                    "reconciliation_total",
                    "Counter of resource reconciliations invoked",
                )
                .namespace("fsm"),
                &["kind"],
            )
            .expect("valid metric"),
            conversion_webhook_resource_total: IntCounterVec::new(
                Opts::new(
                    "conversion_webhook_resource_total",
                    "Number of resources converted by conversion webhooks",
                )
                .namespace("fsm"),
                &["kind", "success", "from_version", "to_version"],
            )
            .expect("valid metric"),
        };
        for collector in [
            Box::new(metrics.http_response_total.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(metrics.http_response_duration.clone()),
            Box::new(metrics.feature_flag_enabled.clone()),
            Box::new(metrics.reconciliation_total.clone()),
            Box::new(metrics.conversion_webhook_resource_total.clone()),
        ] {
            // Registration fails only on a duplicate name, which this OnceLock rules out.
            let _ = prometheus::register(collector);
        }
        metrics
    })
}

/// Registers every metric the controller exports, so that each is on `/metrics` from the start
/// (those without labels at 0; labelled ones appear with their first series).
pub fn register_all() {
    metrics();
    fsm();
    fsm_xds_server::metrics::metrics();
    fsm_sources::metrics::metrics();
    fsm_certs::metrics::metrics();
    fsm_injector::metrics::metrics();
    fsm_errcode::register();
}

/// Sets `fsm_feature_flag_enabled` from MeshConfig `spec.featureFlags`: one series per flag,
/// labelled with its MeshConfig field name.
pub fn set_feature_flags(flags: &impl Serialize) {
    let Ok(serde_json::Value::Object(flags)) = serde_json::to_value(flags) else {
        return;
    };
    let gauge = &fsm().feature_flag_enabled;
    for (name, value) in flags {
        if let Some(enabled) = value.as_bool() {
            gauge
                .with_label_values(&[name.as_str()])
                .set(i64::from(enabled));
        }
    }
}

/// Tower middleware of the HTTP port: counts and times every response by status code, method
/// and route template (`/debug/proxies`, not what the client typed: bounded cardinality;
/// `unmatched` for a path no route serves).
pub async fn track_http(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let path = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let response = next.run(request).await;
    let status = response.status();
    let labels = [status.as_str(), method.as_str(), path.as_str()];
    let m = fsm();
    m.http_response_total.with_label_values(&labels).inc();
    m.http_response_duration
        .with_label_values(&labels)
        .observe(started.elapsed().as_secs_f64());
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Flags {
        enable_retry_policy: bool,
        #[serde(rename = "enableValidateHTTPRouteHostnames")]
        enable_validate_http_route_hostnames: bool,
    }

    #[test]
    fn feature_flags_are_one_gauge_each_named_as_in_the_mesh_config() {
        set_feature_flags(&Flags {
            enable_retry_policy: true,
            enable_validate_http_route_hostnames: false,
        });
        let gauge = &fsm().feature_flag_enabled;
        assert_eq!(gauge.with_label_values(&["enableRetryPolicy"]).get(), 1);
        assert_eq!(
            gauge
                .with_label_values(&["enableValidateHTTPRouteHostnames"])
                .get(),
            0
        );
        set_feature_flags(&Flags {
            enable_retry_policy: false,
            enable_validate_http_route_hostnames: true,
        });
        assert_eq!(gauge.with_label_values(&["enableRetryPolicy"]).get(), 0);
    }

    #[tokio::test]
    async fn http_responses_are_counted_by_route_template() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let app = axum::Router::new()
            .route("/things/{id}", axum::routing::get(|| async { "thing" }))
            .layer(axum::middleware::from_fn(track_http));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        tokio::spawn(async move { axum::serve(listener, app).await });
        for path in ["/things/1", "/things/2", "/nowhere"] {
            let mut stream = tokio::net::TcpStream::connect(address)
                .await
                .expect("connect");
            let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
            stream.write_all(request.as_bytes()).await.expect("request");
            let mut answer = String::new();
            stream.read_to_string(&mut answer).await.expect("answer");
        }
        let total = &fsm().http_response_total;
        assert_eq!(
            total
                .with_label_values(&["200", "GET", "/things/{id}"])
                .get(),
            2
        );
        assert_eq!(
            total.with_label_values(&["404", "GET", "unmatched"]).get(),
            1
        );
        assert_eq!(
            fsm()
                .http_response_duration
                .with_label_values(&["200", "GET", "/things/{id}"])
                .get_sample_count(),
            2
        );
    }
}
