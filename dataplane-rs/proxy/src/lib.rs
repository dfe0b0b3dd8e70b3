//! fsm-sidecar's data path: validated config, routing, load balancing, HTTP and TCP proxying.
//!
//! Reading order: [`config`] (native protos -> validated domain types), [`store`] (the atomically
//! swapped snapshot the xDS client feeds), [`route`] and [`lb`] (pure decisions), [`listeners`]
//! (sockets follow the config; [`sni`] reads a ClientHello's server name), [`http`] and [`tcp`] (the two kinds of filter chain),
//! [`upstream`] (pooled connections), [`ratelimit`] and [`breakers`] (local rate limits and
//! circuit breakers, whose state outlives config swaps), [`trace`] (Zipkin spans, B3 headers),
//! [`metrics`]. Apart from xDS:
//! [`probes`] (application probes FSM's injector rewrote) and [`healthcheck`] (`fsm-healthcheck`).

use std::sync::Arc;

pub mod breakers;
pub mod config;
pub mod healthcheck;
pub mod http;
pub mod lb;
pub mod listeners;
pub mod metrics;
pub mod original_dst;
pub mod probes;
pub mod ratelimit;
pub mod route;
pub mod sni;
pub mod store;
pub mod tcp;
pub mod tls;
pub mod trace;
pub mod upstream;

pub use config::{Config, ConfigError};
pub use metrics::{Metrics, Workload};
pub use ratelimit::RateLimits;
pub use store::{Store, StoreSink};
pub use trace::Tracer;
pub use upstream::Upstreams;

/// Everything a connection handler needs, shared by all listeners.
#[derive(Debug)]
pub struct Proxy {
    pub store: Arc<Store>,
    pub upstreams: Upstreams,
    /// Token buckets of the inbound local rate limits; here, not in the config, so that
    /// rebuilding the config on every xDS update does not refill them.
    pub rate_limits: RateLimits,
    pub metrics: Arc<Metrics>,
    /// Spans of traced listeners' requests, reported off the request path.
    pub tracer: Tracer,
    /// Listeners bind the unspecified address and chains match the original destination.
    pub transparent: bool,
}

/// `max_connections` of a cluster was reached: the connection is refused.
#[derive(Debug)]
pub struct ConnectionOverflow;

impl Proxy {
    /// Counts one client connection relayed to `cluster` (a TCP connection, or a CONNECT
    /// tunnel), held until dropped; `Err` (counted as `upstream_cx_overflow`) when
    /// `max_connections` of them are already open. `None` when the cluster sets no limit.
    pub fn hold_connection(
        &self,
        cluster: &config::Cluster,
    ) -> Result<Option<breakers::Held>, ConnectionOverflow> {
        let Some(max) = cluster.breakers.max_connections else {
            return Ok(None);
        };
        match self
            .upstreams
            .limits(&cluster.name)
            .try_hold(breakers::Counter::Connections, max)
        {
            Some(held) => Ok(Some(held)),
            None => {
                self.metrics.cx_overflow(&cluster.name);
                Err(ConnectionOverflow)
            }
        }
    }
}
