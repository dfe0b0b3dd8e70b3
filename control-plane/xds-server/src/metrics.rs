//! The ADS server's Prometheus metrics, with FSM's names and labels verbatim (dashboards and
//! alerts written for FSM keep working), and the controller's `fsm_proxy_*` metrics about
//! computing proxies' configurations (one family, one place).
//!
//! The series labelled with a `proxy_uuid` ([`PROXY_LABELS`]) live only while the proxy has a
//! stream open: [`ProxySeries`] removes them when its last stream ends, so ten thousand pods
//! replaced leave no series behind.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use fsm_cache::TypeUrl;
use parking_lot::Mutex;
use prometheus::core::Collector;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
};

use crate::protocol::short_name;

/// Labels of the per-proxy counters: the proxy UUID, its identity `<sa>.<ns>` and the short type
/// name (`CDS`, …).
pub const PROXY_LABELS: &[&str] = &["proxy_uuid", "identity", "type"];

/// FSM's buckets for `fsm_proxy_config_update_time` and `fsm_cert_issued_time` (seconds).
pub const FSM_BUCKETS: &[f64] = &[0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 90.0];

/// Buckets of `fsm_proxy_convergence_seconds`: a push is milliseconds on a quiet mesh and
/// seconds behind a slow proxy.
const CONVERGENCE_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

pub struct Metrics {
    /// `fsm_proxy_connect_count`: streams currently open.
    pub proxy_connect_count: IntGauge,
    /// `fsm_proxy_reconnect_count`: connects from a proxy UUID seen before.
    pub proxy_reconnect_count: IntCounter,
    /// `fsm_proxy_xds_request_count{proxy_uuid,identity,type}`
    pub proxy_xds_request_count: IntCounterVec,
    /// `fsm_proxy_response_send_success_count{proxy_uuid,identity,type}`
    pub proxy_response_send_success_count: IntCounterVec,
    /// `fsm_proxy_response_send_error_count{proxy_uuid,identity,type}`
    pub proxy_response_send_error_count: IntCounterVec,
    /// `fsm_proxy_max_connections_rejected`: streams refused because MeshConfig
    /// `spec.sidecar.maxDataPlaneConnections` were already open.
    pub proxy_max_connections_rejected: IntCounter,
    /// `fsm_proxy_config_update_time{resource_type,success}` (seconds): the controller's time to
    /// compute one proxy's new configuration, observed once per resource type (full type URL, as
    /// FSM labels it) the update changed; on failure, once per type the proxy is served, with
    /// `success="false"`.
    pub proxy_config_update_time: HistogramVec,
    /// `fsm_proxy_broadcast_event_count`: catalog changes that reached every connected proxy's
    /// configuration (MeshConfig, a namespace, a mesh-wide policy, or the shared part every proxy
    /// of a data plane holds: services, endpoints).
    pub proxy_broadcast_event_count: IntCounter,
    /// `fsm_proxy_convergence_seconds{type}` (ours, not FSM's): from the controller observing a
    /// change to the proxy's ACK of the first response that carries it, per short type name.
    pub proxy_convergence_seconds: HistogramVec,
    /// `fsm_ads_tls_handshake_failure_count{reason}` (ours, not FSM's): connections to the mTLS
    /// listener that never reached the gRPC service; `reason` is `handshake` (refused: no or
    /// untrusted client certificate, plaintext client…), `timeout`, or `accept` (listener
    /// errors such as EMFILE).
    pub ads_tls_handshake_failure_count: IntCounterVec,
}

/// The metrics, registered in the default registry on first use.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::register)
}

impl Metrics {
    fn register() -> Self {
        let metrics = Metrics {
            proxy_connect_count: IntGauge::with_opts(opts(
                "proxy_connect_count",
                "Represents the number of proxies connected to FSM controller",
            ))
            .expect("static metric options are valid"),
            proxy_reconnect_count: IntCounter::with_opts(opts(
                "proxy_reconnect_count",
                "Represents the number of reconnects from known proxies to FSM controller",
            ))
            .expect("static metric options are valid"),
            proxy_xds_request_count: counter_vec(
                "proxy_xds_request_count",
                "Represents the number of XDS requests made by proxies",
            ),
            proxy_response_send_success_count: counter_vec(
                "proxy_response_send_success_count",
                "Represents the number of responses successfully sent to proxies",
            ),
            proxy_response_send_error_count: counter_vec(
                "proxy_response_send_error_count",
                "Represents the number of responses that errored when being set to proxies",
            ),
            proxy_max_connections_rejected: IntCounter::with_opts(opts(
                "proxy_max_connections_rejected",
                "Represents the number of proxy connections rejected due to the configured max connections limit",
            ))
            .expect("static metric options are valid"),
            proxy_config_update_time: HistogramVec::new(
                HistogramOpts::new(
                    "config_update_time",
                    "Histogram to track time spent for proxy configuration",
                )
                .namespace("fsm")
                .subsystem("proxy")
                .buckets(FSM_BUCKETS.to_vec()),
                &["resource_type", "success"],
            )
            .expect("static metric options are valid"),
            proxy_broadcast_event_count: IntCounter::with_opts(opts(
                "proxy_broadcast_event_count",
                "Represents the number of ProxyBroadcast events published by the FSM controller",
            ))
            .expect("static metric options are valid"),
            proxy_convergence_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "proxy_convergence_seconds",
                    "Time from the controller observing a change to the proxy acknowledging the first response that carries it, per resource type",
                )
                .namespace("fsm")
                .buckets(CONVERGENCE_BUCKETS.to_vec()),
                &["type"],
            )
            .expect("static metric options are valid"),
            ads_tls_handshake_failure_count: IntCounterVec::new(
                opts(
                    "ads_tls_handshake_failure_count",
                    "Connections to the ADS mTLS listener that failed before reaching the gRPC service",
                ),
                &["reason"],
            )
            .expect("static metric options are valid"),
        };
        register(metrics.proxy_connect_count.clone());
        register(metrics.proxy_reconnect_count.clone());
        register(metrics.proxy_xds_request_count.clone());
        register(metrics.proxy_response_send_success_count.clone());
        register(metrics.proxy_response_send_error_count.clone());
        register(metrics.proxy_max_connections_rejected.clone());
        register(metrics.proxy_config_update_time.clone());
        register(metrics.proxy_broadcast_event_count.clone());
        register(metrics.proxy_convergence_seconds.clone());
        register(metrics.ads_tls_handshake_failure_count.clone());
        metrics
    }

    /// The convergence histogram of one type (short name label).
    pub fn convergence(&self, type_url: &str) -> Histogram {
        self.proxy_convergence_seconds
            .with_label_values(&[short_name(type_url)])
    }
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace("fsm")
}

fn counter_vec(name: &str, help: &str) -> IntCounterVec {
    IntCounterVec::new(opts(name, help), PROXY_LABELS).expect("static metric options are valid")
}

/// A name clash (someone else registered it) leaves the metric working but unexported; that must
/// not take the ADS server down. It is a defect of the build, which the metrics tests catch (they
/// read every metric back), not an operational error: logged at debug, with no FSM code.
fn register(collector: impl Collector + 'static) {
    if let Err(error) = prometheus::register(Box::new(collector)) {
        tracing::debug!(%error, "could not register an ADS metric");
    }
}

// === ProxySeries ===

/// Which per-proxy series exist, by (proxy UUID, identity), and how many streams use them.
///
/// A proxy may hold two streams at once (a reconnect racing the old stream's teardown, or an
/// Envoy and a debugging client): the series are shared by label values, so the first stream to
/// end must not remove what the other still counts into, and the last one must remove every type
/// any of them labelled.
#[derive(Default)]
pub struct ProxySeries {
    proxies: Mutex<HashMap<SeriesKey, Labelled>>,
}

/// A proxy's `proxy_uuid` and `identity` labels.
type SeriesKey = (Arc<str>, Arc<str>);

#[derive(Default)]
struct Labelled {
    streams: usize,
    types: Vec<TypeUrl>,
}

impl ProxySeries {
    /// A stream of the proxy opened.
    pub fn opened(&self, uuid: &Arc<str>, identity: &Arc<str>) {
        self.proxies
            .lock()
            .entry((uuid.clone(), identity.clone()))
            .or_default()
            .streams += 1;
    }

    /// A stream of the proxy is about to create the series of `type_url`.
    pub fn labelled(&self, uuid: &Arc<str>, identity: &Arc<str>, type_url: TypeUrl) {
        let mut proxies = self.proxies.lock();
        let entry = proxies.entry((uuid.clone(), identity.clone())).or_default();
        if !entry.types.contains(&type_url) {
            entry.types.push(type_url);
        }
    }

    /// A stream of the proxy ended: with its last one, every series of the proxy goes.
    pub fn closed(&self, uuid: &Arc<str>, identity: &Arc<str>) {
        let gone = {
            let mut proxies = self.proxies.lock();
            let key = (uuid.clone(), identity.clone());
            let Some(entry) = proxies.get_mut(&key) else {
                return;
            };
            entry.streams = entry.streams.saturating_sub(1);
            if entry.streams > 0 {
                return;
            }
            proxies.remove(&key).map(|e| e.types).unwrap_or_default()
        };
        let m = metrics();
        for type_url in gone {
            let labels = [&**uuid, &**identity, short_name(type_url)];
            // Absent series (no error was ever counted) are fine.
            let _ = m.proxy_xds_request_count.remove_label_values(&labels);
            let _ = m
                .proxy_response_send_success_count
                .remove_label_values(&labels);
            let _ = m
                .proxy_response_send_error_count
                .remove_label_values(&labels);
        }
    }

    /// Proxies with series.
    pub fn len(&self) -> usize {
        self.proxies.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_fsm_verbatim_and_registration_is_idempotent() {
        let m = metrics();
        assert!(std::ptr::eq(m, metrics()));
        m.proxy_connect_count.inc();
        m.proxy_reconnect_count.inc();
        m.proxy_xds_request_count
            .with_label_values(&["uuid-m", "sa.ns", "CDS"])
            .inc();
        m.proxy_response_send_success_count
            .with_label_values(&["uuid-m", "sa.ns", "CDS"])
            .inc();
        m.proxy_response_send_error_count
            .with_label_values(&["uuid-m", "sa.ns", "CDS"])
            .inc();
        let names: Vec<String> = prometheus::gather()
            .into_iter()
            .map(|f| f.name().to_owned())
            .collect();
        for name in [
            "fsm_proxy_connect_count",
            "fsm_proxy_reconnect_count",
            "fsm_proxy_xds_request_count",
            "fsm_proxy_response_send_success_count",
            "fsm_proxy_response_send_error_count",
        ] {
            assert!(
                names.iter().any(|n| n == name),
                "{name} missing from {names:?}"
            );
        }
        m.proxy_connect_count.dec();
    }

    fn exported(uuid: &str) -> usize {
        prometheus::gather()
            .iter()
            .flat_map(|f| f.get_metric())
            .filter(|m| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == "proxy_uuid" && l.value() == uuid)
            })
            .count()
    }

    #[test]
    fn a_proxys_series_go_with_its_last_stream_whatever_types_each_labelled() {
        const CDS: TypeUrl = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
        const LDS: TypeUrl = "type.googleapis.com/envoy.config.listener.v3.Listener";
        let series = ProxySeries::default();
        let (uuid, identity): (Arc<str>, Arc<str>) = ("uuid-series".into(), "sa.ns".into());
        let m = metrics();
        let count = |type_url: TypeUrl| {
            series.labelled(&uuid, &identity, type_url);
            m.proxy_xds_request_count
                .with_label_values(&[&*uuid, &*identity, short_name(type_url)])
                .inc();
        };
        series.opened(&uuid, &identity);
        count(CDS);
        // A reconnect racing the old stream's end: the new stream labels another type.
        series.opened(&uuid, &identity);
        count(LDS);
        series.closed(&uuid, &identity);
        assert_eq!(exported("uuid-series"), 2, "the other stream still counts");
        series.closed(&uuid, &identity);
        assert_eq!(exported("uuid-series"), 0, "gone with the last stream");
        assert!(series.is_empty());
    }

    #[test]
    fn churning_proxies_leave_no_series() {
        const CDS: TypeUrl = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
        let series = ProxySeries::default();
        let m = metrics();
        let identity: Arc<str> = "churn.ns".into();
        for i in 0..10_000 {
            let uuid: Arc<str> = format!("churn-{i}").into();
            series.opened(&uuid, &identity);
            series.labelled(&uuid, &identity, CDS);
            m.proxy_response_send_success_count
                .with_label_values(&[&*uuid, &*identity, "CDS"])
                .inc();
            series.closed(&uuid, &identity);
        }
        assert!(series.is_empty());
        let left = m
            .proxy_response_send_success_count
            .collect()
            .iter()
            .flat_map(|f| f.get_metric())
            .filter(|m| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == "identity" && l.value() == "churn.ns")
            })
            .count();
        assert_eq!(left, 0);
    }
}
