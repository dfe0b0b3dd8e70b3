//! Prometheus metrics with FSM's names, and an Envoy-style `/stats` text view of the same counters.

use std::fmt::Write as _;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

/// A pod and its workload, for the `source_*` (this sidecar) and `destination_*` (the endpoint a
/// request went to) labels.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Workload {
    pub namespace: String,
    /// The workload (Deployment, StatefulSet, …) name.
    pub name: String,
    pub pod: String,
    /// `Deployment`, `StatefulSet`, `DaemonSet`, `Job`, … or `Pod`.
    pub kind: String,
}

#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    request_total: IntCounterVec,
    request_duration_ms: HistogramVec,
    upstream_rq_total: IntCounterVec,
    upstream_rq_xx: IntCounterVec,
    downstream_cx_total: IntCounterVec,
    upstream_cx_overflow: IntCounterVec,
    upstream_cx_connect_fail: IntCounterVec,
    upstream_rq_pending_overflow: IntCounterVec,
    upstream_rq_active_overflow: IntCounterVec,
    upstream_rq_retry_overflow: IntCounterVec,
    local_rate_limit_ok: IntCounterVec,
    local_rate_limit_rate_limited: IntCounterVec,
    pub workload: Workload,
}

const CLUSTER: &str = "sidecar_cluster_name";
/// Envoy's tag for the rate limit's stat prefix; ours is the virtual host name.
const RATE_LIMIT_PREFIX: &str = "sidecar_http_local_rate_limit_prefix";

/// The labels FSM's Pipy sidecar puts on its per-cluster request counters: this sidecar's pod and
/// workload. FSM's relabelling adds target labels named like the first three, so Prometheus keeps
/// these as `exported_source_*` (FSM's documented query filters on `exported_source_workload_name`).
const SELF_LABELS: [&str; 4] = [
    "source_namespace",
    "source_workload_kind",
    "source_workload_name",
    "source_workload_pod",
];

/// Envoy's default histogram buckets (ms), so that `fsm_request_duration_ms` from fsm-sidecar and
/// the one the chart's recording rules make from Envoy's `cluster.upstream_rq_time` add up bucket
/// by bucket; FSM's Pipy buckets (5 ms to 1 h) are a subset.
const DURATION_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

const PEER_LABELS: [&str; 8] = [
    "source_kind",
    "destination_kind",
    "source_name",
    "destination_name",
    "source_pod",
    "destination_pod",
    "source_namespace",
    "destination_namespace",
];

impl Metrics {
    pub fn new(workload: Workload) -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let mut total_labels = PEER_LABELS.to_vec();
        total_labels.push("response_code");
        let request_total = IntCounterVec::new(
            Opts::new(
                "fsm_request_total",
                "Requests this sidecar proxied to mesh services",
            ),
            &total_labels,
        )?;
        let request_duration_ms = HistogramVec::new(
            HistogramOpts::new(
                "fsm_request_duration_ms",
                "Duration of proxied requests in milliseconds",
            )
            .buckets(DURATION_BUCKETS_MS.to_vec()),
            &PEER_LABELS,
        )?;
        let mut per_cluster_labels = SELF_LABELS.to_vec();
        per_cluster_labels.push(CLUSTER);
        let upstream_rq_total = IntCounterVec::new(
            Opts::new(
                "sidecar_cluster_upstream_rq_total",
                "Upstream requests per cluster",
            ),
            &per_cluster_labels,
        )?;
        per_cluster_labels.push("sidecar_response_code_class");
        let upstream_rq_xx = IntCounterVec::new(
            Opts::new(
                "sidecar_cluster_upstream_rq_xx",
                "Upstream responses per cluster and status class",
            ),
            &per_cluster_labels,
        )?;
        let downstream_cx_total = IntCounterVec::new(
            Opts::new(
                "sidecar_listener_downstream_cx_total",
                "Connections accepted per listener",
            ),
            &["sidecar_listener_name"],
        )?;
        let per_cluster =
            |name: &str, help: &str| IntCounterVec::new(Opts::new(name, help), &[CLUSTER]);
        let upstream_cx_overflow = per_cluster(
            "sidecar_cluster_upstream_cx_overflow",
            "Connections max_connections did not let this sidecar open (TCP: client connections closed; HTTP/1.1: requests that found every connection in use)",
        )?;
        let upstream_cx_connect_fail = per_cluster(
            "sidecar_cluster_upstream_cx_connect_fail",
            "Upstream connections that could not be made (refused, timed out, TLS failed, or a DNS cluster's name not resolved)",
        )?;
        let upstream_rq_pending_overflow = per_cluster(
            "sidecar_cluster_upstream_rq_pending_overflow",
            "Requests refused with 503 by max_pending_requests",
        )?;
        let upstream_rq_active_overflow = per_cluster(
            "sidecar_cluster_upstream_rq_active_overflow",
            "Requests refused with 503 by max_requests",
        )?;
        let upstream_rq_retry_overflow = per_cluster(
            "sidecar_cluster_upstream_rq_retry_overflow",
            "Retries not made because max_retries retries were in flight",
        )?;
        let local_rate_limit_ok = IntCounterVec::new(
            Opts::new(
                "sidecar_http_local_rate_limit_ok",
                "Inbound requests and tunnels a local rate limit admitted, per virtual host",
            ),
            &[RATE_LIMIT_PREFIX],
        )?;
        let local_rate_limit_rate_limited = IntCounterVec::new(
            Opts::new(
                "sidecar_http_local_rate_limit_rate_limited",
                "Inbound requests and tunnels a local rate limit refused, per virtual host",
            ),
            &[RATE_LIMIT_PREFIX],
        )?;
        registry.register(Box::new(request_total.clone()))?;
        registry.register(Box::new(request_duration_ms.clone()))?;
        registry.register(Box::new(upstream_rq_total.clone()))?;
        registry.register(Box::new(upstream_rq_xx.clone()))?;
        registry.register(Box::new(downstream_cx_total.clone()))?;
        registry.register(Box::new(upstream_cx_overflow.clone()))?;
        registry.register(Box::new(upstream_cx_connect_fail.clone()))?;
        registry.register(Box::new(upstream_rq_pending_overflow.clone()))?;
        registry.register(Box::new(upstream_rq_active_overflow.clone()))?;
        registry.register(Box::new(upstream_rq_retry_overflow.clone()))?;
        registry.register(Box::new(local_rate_limit_ok.clone()))?;
        registry.register(Box::new(local_rate_limit_rate_limited.clone()))?;
        Ok(Metrics {
            registry,
            request_total,
            request_duration_ms,
            upstream_rq_total,
            upstream_rq_xx,
            downstream_cx_total,
            upstream_cx_overflow,
            upstream_cx_connect_fail,
            upstream_rq_pending_overflow,
            upstream_rq_active_overflow,
            upstream_rq_retry_overflow,
            local_rate_limit_ok,
            local_rate_limit_rate_limited,
            workload,
        })
    }

    /// `max_connections` refused a connection to `cluster`.
    pub fn cx_overflow(&self, cluster: &str) {
        self.upstream_cx_overflow
            .with_label_values(&[cluster])
            .inc();
    }

    /// A connection to `cluster` could not be made: refused, timed out, its TLS handshake
    /// failed, or (DNS cluster) its name did not resolve.
    pub fn connect_fail(&self, cluster: &str) {
        self.upstream_cx_connect_fail
            .with_label_values(&[cluster])
            .inc();
    }

    /// `max_pending_requests` refused a request to `cluster`.
    pub fn pending_overflow(&self, cluster: &str) {
        self.upstream_rq_pending_overflow
            .with_label_values(&[cluster])
            .inc();
    }

    /// `max_requests` refused a request to `cluster` (Envoy 1.40 counts these apart from the
    /// pending ones, under this name).
    pub fn active_overflow(&self, cluster: &str) {
        self.upstream_rq_active_overflow
            .with_label_values(&[cluster])
            .inc();
    }

    /// `max_retries` stopped a retry to `cluster`.
    pub fn retry_overflow(&self, cluster: &str) {
        self.upstream_rq_retry_overflow
            .with_label_values(&[cluster])
            .inc();
    }

    /// The local rate limit of `virtual_host` admitted (`true`) or refused a request.
    pub fn local_rate_limit(&self, virtual_host: &str, admitted: bool) {
        let counter = if admitted {
            &self.local_rate_limit_ok
        } else {
            &self.local_rate_limit_rate_limited
        };
        counter.with_label_values(&[virtual_host]).inc();
    }

    pub fn connection(&self, listener: &str) {
        self.downstream_cx_total
            .with_label_values(&[listener])
            .inc();
    }

    /// One request (or TCP connection) sent to `cluster`; `status` 0 when no HTTP status exists.
    pub fn upstream(&self, cluster: &str, status: u16) {
        let w = &self.workload;
        let (ns, kind, name, pod) = (&*w.namespace, &*w.kind, &*w.name, &*w.pod);
        self.upstream_rq_total
            .with_label_values(&[ns, kind, name, pod, cluster])
            .inc();
        if status >= 100 {
            let class = (status / 100).to_string();
            self.upstream_rq_xx
                .with_label_values(&[ns, kind, name, pod, cluster, class.as_str()])
                .inc();
        }
    }

    /// An outbound request from this workload to `destination`, the endpoint of `cluster`
    /// (`ns/svc|port`) that answered. Without one (no endpoint, or the control plane did not say
    /// whose pod it is) the destination is named after the service, with kind and pod unknown.
    pub fn outbound_request(
        &self,
        cluster: &str,
        destination: Option<&Workload>,
        status: u16,
        millis: f64,
    ) {
        let (service_ns, service_name) = cluster
            .split('|')
            .next()
            .and_then(|s| s.split_once('/'))
            .unwrap_or(("", cluster));
        let (dest_kind, dest_name, dest_pod, dest_ns) = match destination {
            Some(d) => (
                d.kind.as_str(),
                d.name.as_str(),
                d.pod.as_str(),
                d.namespace.as_str(),
            ),
            None => ("", service_name, "", service_ns),
        };
        let w = &self.workload;
        let peers = [
            w.kind.as_str(),
            dest_kind,
            w.name.as_str(),
            dest_name,
            w.pod.as_str(),
            dest_pod,
            w.namespace.as_str(),
            dest_ns,
        ];
        let code = status.to_string();
        let mut with_code = peers.to_vec();
        with_code.push(code.as_str());
        self.request_total.with_label_values(&with_code).inc();
        self.request_duration_ms
            .with_label_values(&peers)
            .observe(millis);
    }

    /// Prometheus text format.
    pub fn prometheus_text(&self) -> String {
        let encoder = prometheus::TextEncoder::new();
        encoder
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# encoding failed: {e}\n"))
    }

    /// Envoy's `/stats` shape: `cluster.<name>.upstream_rq_total: N`, filtered by substring.
    pub fn stats_text(&self, filter: Option<&str>) -> String {
        let mut lines = Vec::new();
        for family in self.registry.gather() {
            for m in family.get_metric() {
                let label = |n: &str| {
                    m.get_label()
                        .iter()
                        .find(|l| l.name() == n)
                        .map(|l| l.value().to_string())
                        .unwrap_or_default()
                };
                let value = m.get_counter().get_value();
                let line = match family.name() {
                    "sidecar_cluster_upstream_rq_total" => format!(
                        "cluster.{}.upstream_rq_total: {value}",
                        label("sidecar_cluster_name")
                    ),
                    "sidecar_cluster_upstream_rq_xx" => format!(
                        "cluster.{}.upstream_rq_{}xx: {value}",
                        label("sidecar_cluster_name"),
                        label("sidecar_response_code_class")
                    ),
                    "sidecar_listener_downstream_cx_total" => format!(
                        "listener.{}.downstream_cx_total: {value}",
                        label("sidecar_listener_name")
                    ),
                    "sidecar_cluster_upstream_cx_overflow" => {
                        format!("cluster.{}.upstream_cx_overflow: {value}", label(CLUSTER))
                    }
                    "sidecar_cluster_upstream_cx_connect_fail" => format!(
                        "cluster.{}.upstream_cx_connect_fail: {value}",
                        label(CLUSTER)
                    ),
                    "sidecar_cluster_upstream_rq_pending_overflow" => format!(
                        "cluster.{}.upstream_rq_pending_overflow: {value}",
                        label(CLUSTER)
                    ),
                    "sidecar_cluster_upstream_rq_active_overflow" => format!(
                        "cluster.{}.upstream_rq_active_overflow: {value}",
                        label(CLUSTER)
                    ),
                    "sidecar_cluster_upstream_rq_retry_overflow" => format!(
                        "cluster.{}.upstream_rq_retry_overflow: {value}",
                        label(CLUSTER)
                    ),
                    "sidecar_http_local_rate_limit_ok" => format!(
                        "inbound_rate_limit.{}.http_local_rate_limit.ok: {value}",
                        label(RATE_LIMIT_PREFIX)
                    ),
                    "sidecar_http_local_rate_limit_rate_limited" => format!(
                        "inbound_rate_limit.{}.http_local_rate_limit.rate_limited: {value}",
                        label(RATE_LIMIT_PREFIX)
                    ),
                    _ => continue,
                };
                lines.push(line);
            }
        }
        lines.sort();
        let mut out = String::new();
        for line in lines
            .iter()
            .filter(|l| filter.is_none_or(|f| l.contains(f)))
        {
            let _ = writeln!(out, "{line}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn curl() -> Metrics {
        Metrics::new(Workload {
            namespace: "demo".into(),
            name: "curl".into(),
            pod: "curl-7b9f6d8c4f-q5z2m".into(),
            kind: "Deployment".into(),
        })
        .expect("metrics")
    }

    #[test]
    fn fsm_names_and_labels() {
        let m = curl();
        let httpbin = Workload {
            namespace: "demo".into(),
            name: "httpbin-v1".into(),
            pod: "httpbin-v1-6c5d8f7b9d-x2k4q".into(),
            kind: "Deployment".into(),
        };
        m.outbound_request("demo/httpbin|14001", Some(&httpbin), 200, 3.0);
        m.upstream("demo/httpbin|14001", 200);
        let text = m.prometheus_text();
        // The encoder sorts labels by name.
        let destination = "destination_kind=\"Deployment\",destination_name=\"httpbin-v1\",\
            destination_namespace=\"demo\",destination_pod=\"httpbin-v1-6c5d8f7b9d-x2k4q\"";
        let source = "source_kind=\"Deployment\",source_name=\"curl\",\
            source_namespace=\"demo\",source_pod=\"curl-7b9f6d8c4f-q5z2m\"";
        assert!(
            text.contains(&format!(
                "fsm_request_total{{{destination},response_code=\"200\",{source}}} 1"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "fsm_request_duration_ms_bucket{{{destination},{source},le=\"5\"}} 1"
            )),
            "{text}"
        );
        // FSM's Pipy labels its per-cluster counters with its own pod and workload.
        let me = "source_namespace=\"demo\",source_workload_kind=\"Deployment\",\
            source_workload_name=\"curl\",source_workload_pod=\"curl-7b9f6d8c4f-q5z2m\"";
        assert!(
            text.contains(&format!(
                "sidecar_cluster_upstream_rq_xx{{sidecar_cluster_name=\"demo/httpbin|14001\",\
                 sidecar_response_code_class=\"2\",{me}}} 1"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "sidecar_cluster_upstream_rq_total{{sidecar_cluster_name=\"demo/httpbin|14001\",{me}}} 1"
            )),
            "{text}"
        );
        // Envoy's buckets, so both data planes' histograms add up.
        assert!(
            text.contains(&format!(
                "fsm_request_duration_ms_bucket{{{destination},{source},le=\"0.5\"}} 0"
            )),
            "{text}"
        );
        let stats = m.stats_text(Some("upstream_rq_total"));
        assert_eq!(stats, "cluster.demo/httpbin|14001.upstream_rq_total: 1\n");
    }

    #[test]
    fn breaker_and_rate_limit_counters_in_envoy_stats_shape() {
        let m = curl();
        m.cx_overflow("demo/echo|9000");
        m.connect_fail("egress/httpbin.org|80");
        m.pending_overflow("demo/httpbin|14001");
        m.pending_overflow("demo/httpbin|14001");
        m.retry_overflow("demo/httpbin|14001");
        m.local_rate_limit("demo/httpbin|14001|local", true);
        m.local_rate_limit("demo/httpbin|14001|local", false);
        assert_eq!(
            m.stats_text(Some("overflow")),
            "cluster.demo/echo|9000.upstream_cx_overflow: 1\n\
             cluster.demo/httpbin|14001.upstream_rq_pending_overflow: 2\n\
             cluster.demo/httpbin|14001.upstream_rq_retry_overflow: 1\n"
        );
        assert_eq!(
            m.stats_text(Some("connect_fail")),
            "cluster.egress/httpbin.org|80.upstream_cx_connect_fail: 1\n"
        );
        assert_eq!(
            m.stats_text(Some("http_local_rate_limit")),
            "inbound_rate_limit.demo/httpbin|14001|local.http_local_rate_limit.ok: 1\n\
             inbound_rate_limit.demo/httpbin|14001|local.http_local_rate_limit.rate_limited: 1\n"
        );
        let text = m.prometheus_text();
        assert!(
            text.contains(
                "sidecar_http_local_rate_limit_rate_limited{sidecar_http_local_rate_limit_prefix=\"demo/httpbin|14001|local\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "sidecar_cluster_upstream_cx_overflow{sidecar_cluster_name=\"demo/echo|9000\"} 1"
            ),
            "{text}"
        );
    }

    #[test]
    fn an_unknown_destination_is_named_after_its_service() {
        let m = curl();
        m.outbound_request("demo/httpbin|14001", None, 503, 1.0);
        let text = m.prometheus_text();
        assert!(
            text.contains(
                "destination_kind=\"\",destination_name=\"httpbin\",\
                 destination_namespace=\"demo\",destination_pod=\"\""
            ),
            "{text}"
        );
    }
}
