//! What the control loop's work costs, per catalog change: Prometheus counters on `/metrics`
//! (9091), so that "an endpoint change recompiles no proxy and encodes one resource" is visible
//! in production, not only in tests.

use std::sync::OnceLock;

use prometheus::{Histogram, HistogramOpts, IntCounter};
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
