//! The ADS server's Prometheus metrics, with FSM's names and labels verbatim (dashboards and
//! alerts written for FSM keep working).

use std::sync::OnceLock;

use prometheus::core::Collector;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts};

/// Labels of the per-proxy counters: the proxy UUID, its identity `<sa>.<ns>` and the short type
/// name (`CDS`, …).
const PROXY_LABELS: &[&str] = &["proxy_uuid", "identity", "type"];

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
        register(metrics.ads_tls_handshake_failure_count.clone());
        metrics
    }
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace("fsm")
}

fn counter_vec(name: &str, help: &str) -> IntCounterVec {
    IntCounterVec::new(opts(name, help), PROXY_LABELS).expect("static metric options are valid")
}

/// A name clash (someone else registered it) leaves the metric working but unexported; that must
/// not take the ADS server down.
fn register(collector: impl Collector + 'static) {
    if let Err(error) = prometheus::register(Box::new(collector)) {
        tracing::warn!(%error, "could not register an ADS metric");
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
}
