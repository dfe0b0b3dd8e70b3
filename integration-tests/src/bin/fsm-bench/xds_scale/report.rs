//! Figures of one xds-scale run, printed as text lines and saved as JSON.

use std::time::Duration;

use serde::Serialize;

/// p50, p99 and max of a set of durations, in milliseconds.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Percentiles {
    pub count: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    pub fn of(mut samples: Vec<Duration>) -> Percentiles {
        if samples.is_empty() {
            return Percentiles::default();
        }
        samples.sort_unstable();
        // Nearest rank: the smallest sample with at least q of the samples at or below it.
        let rank = |q: f64| {
            let index = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1;
            ms(samples[index])
        };
        Percentiles {
            count: samples.len(),
            p50_ms: rank(0.50),
            p99_ms: rank(0.99),
            max_ms: ms(samples[samples.len() - 1]),
        }
    }
}

impl std::fmt::Display for Percentiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms (n={})",
            self.p50_ms, self.p99_ms, self.max_ms, self.count
        )
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Responses of each type received by the proxies in a window.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PerType {
    /// Proxies that received at least one response of the type, keyed CDS, LDS, EDS, RDS, SDS.
    pub proxies: std::collections::BTreeMap<&'static str, usize>,
    /// Responses of the type, over all proxies.
    pub responses: std::collections::BTreeMap<&'static str, u64>,
}

impl PerType {
    pub fn line(&self) -> String {
        self.proxies
            .iter()
            .map(|(t, n)| format!("{t} {n} ({} responses)", self.responses[t]))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Warmup {
    /// Proxies that held a full configuration within the timeout.
    pub warm_proxies: usize,
    /// From the first connection attempt until the last proxy held a full configuration (when
    /// all did; else until the last that did).
    pub all_warm_s: f64,
    /// Per proxy, from its own first connection attempt.
    pub per_proxy: Percentiles,
    pub controller_cpu_s: f64,
    /// CPU seconds of this load generator (all simulated proxies) in the same time.
    pub load_generator_cpu_s: f64,
    /// Responses received until every proxy was warm, per type (one of each type a proxy
    /// subscribes to is the least).
    pub received: PerType,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct EndpointChange {
    pub service: String,
    pub new_ip: String,
    /// Proxies that ACKed a ClusterLoadAssignment carrying the new address.
    pub proxies_updated: usize,
    /// From the write (file or API) until each proxy ACKed it.
    pub latency: Percentiles,
    /// Every response received from the write until the proxies were quiet again.
    pub received: PerType,
    pub controller_cpu_s: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Relist {
    /// LIST requests the controller made after every watch was expired (410 Gone).
    pub lists: u64,
    pub window_s: f64,
    /// Responses the proxies received in the window: must be 0, nothing changed.
    pub responses_pushed: u64,
    pub received: PerType,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Restart {
    pub pods_replaced: usize,
    pub batches: usize,
    /// From the first pod replaced until the last new proxy was warm and the fleet quiet.
    pub convergence_s: f64,
    /// Per new proxy, from its pod's write until it held a full configuration.
    pub new_proxy_warm: Percentiles,
    pub stream_errors: u64,
    pub refused_streams: u64,
    pub controller_cpu_s: f64,
}

/// One run: one protocol, one number of proxies, one source.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RunReport {
    pub protocol: String,
    pub source: String,
    pub services: usize,
    pub proxies: usize,
    /// Until the controller had written every pod's bootstrap credentials.
    pub credentials_s: f64,
    pub rss_before_mib: f64,
    pub rss_warm_mib: f64,
    pub rss_per_proxy_kib: f64,
    pub warmup: Warmup,
    pub endpoint_change: EndpointChange,
    pub relist: Option<Relist>,
    pub restart: Option<Restart>,
    /// Stream errors over the whole run (each failed stream or connection attempt).
    pub stream_errors: u64,
    pub error_samples: Vec<String>,
    /// What did not hold (a proxy never warm, an update that never arrived): the run failed.
    pub failures: Vec<String>,
}

impl RunReport {
    pub fn lines(&self) -> Vec<String> {
        let mut lines = vec![
            format!(
                "xds-scale {} via {}: {} proxies, {} services",
                self.protocol, self.source, self.proxies, self.services
            ),
            format!(
                "  bootstrap credentials for every pod after {:.1} s",
                self.credentials_s
            ),
            format!(
                "  warm-up: {} of {} proxies held a full configuration, the last after {:.2} s; per proxy {}; CPU: controller {:.1} s, load generator {:.1} s",
                self.warmup.warm_proxies,
                self.proxies,
                self.warmup.all_warm_s,
                self.warmup.per_proxy,
                self.warmup.controller_cpu_s,
                self.warmup.load_generator_cpu_s
            ),
            format!(
                "    responses until warm, per type: {}",
                self.warmup.received.line()
            ),
            format!(
                "  controller RSS {:.1} MiB before connects, {:.1} MiB warm: {:.0} KiB per connected proxy",
                self.rss_before_mib, self.rss_warm_mib, self.rss_per_proxy_kib
            ),
            format!(
                "  endpoint change ({} += {}): {} of {} proxies ACKed it, {}; controller CPU {:.2} s",
                self.endpoint_change.service,
                self.endpoint_change.new_ip,
                self.endpoint_change.proxies_updated,
                self.proxies,
                self.endpoint_change.latency,
                self.endpoint_change.controller_cpu_s
            ),
            format!(
                "    proxies that received anything, per type: {}",
                self.endpoint_change.received.line()
            ),
        ];
        if let Some(relist) = &self.relist {
            lines.push(format!(
                "  410 Gone relist of every kind ({} LISTs): {} responses pushed in {:.0} s ({})",
                relist.lists,
                relist.responses_pushed,
                relist.window_s,
                relist.received.line()
            ));
        }
        if let Some(restart) = &self.restart {
            lines.push(format!(
                "  rolling restart of {} pods in {} batches: converged after {:.2} s; new proxies warm {}; {} stream errors, {} refused; controller CPU {:.1} s",
                restart.pods_replaced,
                restart.batches,
                restart.convergence_s,
                restart.new_proxy_warm,
                restart.stream_errors,
                restart.refused_streams,
                restart.controller_cpu_s
            ));
        }
        lines.push(format!(
            "  stream errors over the run: {}",
            self.stream_errors
        ));
        for sample in &self.error_samples {
            lines.push(format!("    error: {sample}"));
        }
        for failure in &self.failures {
            lines.push(format!("  FAILED: {failure}"));
        }
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let p = Percentiles::of(samples);
        assert_eq!(
            (p.p50_ms, p.p99_ms, p.max_ms, p.count),
            (50.0, 99.0, 100.0, 100)
        );
        let one = Percentiles::of(vec![Duration::from_millis(7)]);
        assert_eq!((one.p50_ms, one.p99_ms), (7.0, 7.0));
    }
}
