//! The certificate manager's Prometheus metrics, with FSM's names verbatim:
//! `fsm_cert_issued_count` and `fsm_cert_issued_time` (seconds), moved by every certificate the
//! manager issues through its provider (first issuance and every rotation; a certificate served
//! from the cache is not counted), as FSM's certificate manager counts them: service
//! certificates the sidecars get over SDS, their xDS client certificates, the control plane's
//! server certificates.

use std::sync::OnceLock;

use prometheus::{Histogram, HistogramOpts, IntCounter, Opts};

pub struct Metrics {
    /// `fsm_cert_issued_count`
    pub cert_issued_count: IntCounter,
    /// `fsm_cert_issued_time`
    pub cert_issued_time: Histogram,
}

/// The metrics, registered in the default registry on first use.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let metrics = Metrics {
            cert_issued_count: IntCounter::with_opts(
                Opts::new(
                    "issued_count",
                    "Represents the total number of XDS certificates issued to proxies",
                )
                .namespace("fsm")
                .subsystem("cert"),
            )
            .expect("static metric options are valid"),
            cert_issued_time: Histogram::with_opts(
                HistogramOpts::new(
                    "issued_time",
                    "Histogram to track time spent to issue xds certificate",
                )
                .namespace("fsm")
                .subsystem("cert")
                // FSM's buckets.
                .buckets(vec![0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 90.0]),
            )
            .expect("static metric options are valid"),
        };
        for collector in [
            Box::new(metrics.cert_issued_count.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(metrics.cert_issued_time.clone()),
        ] {
            if let Err(error) = prometheus::register(collector) {
                // A clash leaves the metric counting but unexported: a defect of the build, which
                // the metrics tests catch (they read every metric back), not an operational error.
                tracing::debug!(%error, "could not register a certificate metric");
            }
        }
        metrics
    })
}

/// One certificate issued, in `elapsed`.
pub(crate) fn issued(elapsed: std::time::Duration) {
    let m = metrics();
    m.cert_issued_count.inc();
    m.cert_issued_time.observe(elapsed.as_secs_f64());
}
