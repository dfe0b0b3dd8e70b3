//! `make bench`: the control plane's figures, measured with real processes on loopback.
//!
//! * `watch-latency`: an endpoint change made through the API server (or a manifest edit), until
//!   a real Envoy sidecar has ACKed the new endpoints; median of N changes.
//! * `controller-memory`: resident memory of fsm-controller with a large cluster loaded through
//!   the test API server, beside an empty cluster's.
//! * `sidecar-memory`: idle resident memory of fsm-sidecar and of Envoy, both configured for the
//!   same client identity in a mesh of 100+ services, in the same run.
//! * `sidecar-rps`: client -> sidecar -> mTLS -> sidecar -> app for a pair of Envoys and a pair of
//!   fsm-sidecars pinned to one core, beside the direct path to the same app: latency added at a
//!   fixed rate, CPU, and requests per sidecar CPU-second at full load.
//!
//! Every benchmark takes `--smoke`: the same steps with tiny sizes, run by `make test`
//! (`tests/bench_smoke.rs`) so that a benchmark that no longer runs fails the build.

mod bench_mesh;
mod cert_issuance;
mod controller_memory;
mod load;
mod mesh_gen;
mod procfs;
mod sidecar_limits;
mod sidecar_memory;
mod sidecar_rps;
mod smi_compile;
mod watch_latency;
mod xds_scale;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::cert_issuance::cert_issuance;
use crate::controller_memory::controller_memory;
use crate::load::LoadPlan;
use crate::sidecar_limits::{LimitsPlan, sidecar_limits};
use crate::sidecar_memory::sidecar_memory;
use crate::sidecar_rps::{RpsPlan, sidecar_rps};
use crate::watch_latency::watch_latency;

/// How long a proxy may take to connect and hold its whole configuration.
const CONVERGE: Duration = Duration::from_secs(30);

/// Measures the control plane (see BENCHMARKS.md for recorded figures).
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand, Debug)]
enum Bench {
    /// Endpoint change -> Envoy EDS ACK, through the test API server and through a manifest edit.
    WatchLatency {
        /// Number of endpoint changes per source.
        #[arg(long, default_value_t = 20)]
        changes: usize,
        #[command(flatten)]
        smoke: Smoke,
    },
    /// Controller RSS with SERVICES services of PODS_PER_SERVICE pods each, loaded through the
    /// test API server.
    ControllerMemory {
        #[arg(long, default_value_t = 1000)]
        services: usize,
        #[arg(long, default_value_t = 5)]
        pods_per_service: usize,
        #[command(flatten)]
        smoke: Smoke,
    },
    /// Idle RSS of an Envoy and an fsm-sidecar serving the same client identity in a mesh with
    /// SERVICES extra HTTP services (beside the demo mesh's).
    SidecarMemory {
        #[arg(long, default_value_t = 100)]
        services: usize,
        #[command(flatten)]
        sidecar: SidecarArgs,
        #[command(flatten)]
        smoke: Smoke,
    },
    /// Service certificates issued by Tresor through the certificate manager, one identity each
    /// (key generation and signing, as the controller does for a new service account).
    CertIssuance {
        #[arg(long, default_value_t = 500)]
        count: usize,
        #[command(flatten)]
        smoke: Smoke,
    },
    /// The control plane under N simulated Envoy proxies, each on its own mTLS connection:
    /// warm-up, one endpoint change, RSS and CPU, a 410 relist, a rolling restart.
    XdsScale(xds_scale::Args),
    /// The compiler in SMI mode, every service with a TrafficTarget and an HTTPRouteGroup: the
    /// shared view, one proxy and every proxy, and what one policy change recompiles.
    SmiCompile {
        #[arg(long, default_value_t = 1000)]
        services: usize,
        #[command(flatten)]
        smoke: Smoke,
    },
    /// HTTP/1.1 through a client and a server sidecar over mTLS (both pinned to CPU 0; load
    /// generator and app on CPU 1): direct to the app, through two Envoys and through two
    /// fsm-sidecars, at a fixed rate per concurrency and at full load (RUNS rounds).
    SidecarRps {
        /// Fixed-rate part: total requests per second.
        #[arg(long, default_value_t = 1000)]
        rate: u32,
        /// Fixed-rate part: keep-alive connections to measure at, comma-separated.
        #[arg(long, value_delimiter = ',', default_values_t = [2, 4, 8, 16, 32, 64])]
        concurrency: Vec<usize>,
        /// Fixed-rate part: measured seconds per point (after a 1 s warm-up).
        #[arg(long, default_value_t = 10)]
        rate_seconds: u64,
        /// Full-load part: keep-alive HTTP/1.1 connections.
        #[arg(long, default_value_t = 16)]
        connections: usize,
        /// Full-load part: measured seconds per run (after a 2 s warm-up).
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Full-load rounds; each measures every path once, and per path the run with the median
        /// req/s is reported.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Full-load generator: `wrk` when installed, else the built-in one.
        #[arg(long, value_enum, default_value_t = Load::Auto)]
        load: Load,
        #[command(flatten)]
        sidecar: SidecarArgs,
        #[command(flatten)]
        smoke: Smoke,
    },
    /// What an UpstreamTrafficSetting costs fsm-sidecar: a pair of fsm-sidecars at a fixed rate,
    /// alternately without a setting and with circuit breakers and rate limits none of the
    /// requests reaches.
    SidecarLimits {
        #[arg(long, default_value_t = 1000)]
        rate: u32,
        #[arg(long, default_value_t = 8)]
        connections: usize,
        /// Measured seconds per round and case (after a 1 s warm-up).
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        #[command(flatten)]
        sidecar: SidecarArgs,
        #[command(flatten)]
        smoke: Smoke,
    },
}

/// `--smoke`, which every benchmark takes (`xds-scale` in its own arguments).
#[derive(clap::Args, Clone, Copy, Debug)]
struct Smoke {
    /// The same benchmark end to end with tiny sizes and durations (seconds), for `make test`:
    /// figures are printed but not meant to be quoted, and any failed step exits non-zero.
    #[arg(long)]
    smoke: bool,
}

impl Smoke {
    /// `full`, or `tiny` in smoke mode.
    fn pick<T>(self, full: T, tiny: T) -> T {
        if self.smoke { tiny } else { full }
    }

    /// How long a process is left alone before its memory is read.
    fn settle(self) -> Duration {
        self.pick(Duration::from_secs(2), Duration::from_millis(200))
    }
}

#[derive(clap::Args, Debug)]
struct SidecarArgs {
    /// The fsm-sidecar binary to measure (default: the one next to this binary). Point it at
    /// `target/release/fsm-sidecar` for figures comparable with the release Envoy build.
    #[arg(long)]
    sidecar_bin: Option<PathBuf>,
    /// fsm-sidecar's tokio worker threads (Envoy runs with `--concurrency 1`).
    #[arg(long, default_value_t = 1)]
    workers: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Load {
    Auto,
    Wrk,
    Builtin,
}

#[tokio::main]
async fn main() -> Result<()> {
    match Args::parse().bench {
        Bench::WatchLatency { changes, smoke } => watch_latency(smoke.pick(changes, 2)).await,
        Bench::ControllerMemory {
            services,
            pods_per_service,
            smoke,
        } => {
            controller_memory(
                smoke.pick(services, 10),
                smoke.pick(pods_per_service, 2),
                smoke.settle(),
            )
            .await
        }
        Bench::SidecarMemory {
            services,
            sidecar,
            smoke,
        } => sidecar_memory(smoke.pick(services, 3), smoke.settle(), &sidecar).await,
        Bench::CertIssuance { count, smoke } => cert_issuance(smoke.pick(count, 5)).await,
        Bench::XdsScale(args) => xds_scale::run(args).await,
        Bench::SmiCompile { services, smoke } => smi_compile::smi_compile(smoke.pick(services, 20)),
        Bench::SidecarRps {
            rate,
            concurrency,
            rate_seconds,
            connections,
            seconds,
            runs,
            load,
            sidecar,
            smoke,
        } => {
            let plan = if smoke.smoke {
                RpsPlan {
                    rate: 200,
                    concurrency: vec![2],
                    rate_warmup: Duration::from_millis(200),
                    rate_duration: Duration::from_secs(1),
                    full: LoadPlan {
                        connections: 4,
                        warmup: Duration::from_millis(200),
                        duration: Duration::from_secs(1),
                        load,
                    },
                    runs: 1,
                }
            } else {
                RpsPlan {
                    rate,
                    concurrency,
                    rate_warmup: Duration::from_secs(1),
                    rate_duration: Duration::from_secs(rate_seconds),
                    full: LoadPlan {
                        connections,
                        warmup: Duration::from_secs(2),
                        duration: Duration::from_secs(seconds),
                        load,
                    },
                    runs,
                }
            };
            sidecar_rps(&plan, &sidecar).await
        }
        Bench::SidecarLimits {
            rate,
            connections,
            seconds,
            rounds,
            sidecar,
            smoke,
        } => {
            let plan = LimitsPlan {
                rate: smoke.pick(rate, 200),
                connections: smoke.pick(connections, 2),
                warmup: smoke.pick(Duration::from_secs(1), Duration::from_millis(200)),
                duration: smoke.pick(Duration::from_secs(seconds), Duration::from_secs(1)),
                rounds: smoke.pick(rounds, 1),
            };
            sidecar_limits(&plan, &sidecar).await
        }
    }
}
