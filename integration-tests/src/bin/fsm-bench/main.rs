//! `make bench`: the control plane's figures, measured with real processes on loopback.
//!
//! * `watch-latency`: an endpoint change made through the API server (or a manifest edit), until
//!   a real Envoy sidecar has ACKed the new endpoints; median of N changes.
//! * `controller-memory`: resident memory of fsm-controller with a large cluster loaded through
//!   the test API server, beside an empty cluster's.
//! * `sidecar-memory`: idle resident memory of fsm-sidecar and of Envoy, both configured for the
//!   same client identity in a mesh of 100+ services, in the same run.
//! * `sidecar-rps`: requests per second through one sidecar pinned to one core (Envoy and
//!   fsm-sidecar in turn), beside the direct path to the same app.

mod bench_mesh;
mod cert_issuance;
mod controller_memory;
mod load;
mod mesh_gen;
mod procfs;
mod sidecar_memory;
mod sidecar_rps;
mod watch_latency;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::cert_issuance::cert_issuance;
use crate::controller_memory::controller_memory;
use crate::load::LoadPlan;
use crate::sidecar_memory::sidecar_memory;
use crate::sidecar_rps::sidecar_rps;
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
    },
    /// Controller RSS with SERVICES services of PODS_PER_SERVICE pods each, loaded through the
    /// test API server.
    ControllerMemory {
        #[arg(long, default_value_t = 1000)]
        services: usize,
        #[arg(long, default_value_t = 5)]
        pods_per_service: usize,
    },
    /// Idle RSS of an Envoy and an fsm-sidecar serving the same client identity in a mesh with
    /// SERVICES extra HTTP services (beside the demo mesh's).
    SidecarMemory {
        #[arg(long, default_value_t = 100)]
        services: usize,
        #[command(flatten)]
        sidecar: SidecarArgs,
    },
    /// Service certificates issued by Tresor through the certificate manager, one identity each
    /// (key generation and signing, as the controller does for a new service account).
    CertIssuance {
        #[arg(long, default_value_t = 500)]
        count: usize,
    },
    /// Requests per second through one sidecar pinned to CPU 0 (load generator and app on CPU 1):
    /// direct to the app, through Envoy and through fsm-sidecar, RUNS rounds each.
    SidecarRps {
        /// Keep-alive HTTP/1.1 connections.
        #[arg(long, default_value_t = 16)]
        connections: usize,
        /// Measured seconds per run (after a 2 s warm-up).
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Rounds; each measures every path once, and per path the run with the median req/s is
        /// reported.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Load generator: `wrk` when installed, else the built-in reqwest one.
        #[arg(long, value_enum, default_value_t = Load::Auto)]
        load: Load,
        #[command(flatten)]
        sidecar: SidecarArgs,
    },
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
        Bench::WatchLatency { changes } => watch_latency(changes).await,
        Bench::ControllerMemory {
            services,
            pods_per_service,
        } => controller_memory(services, pods_per_service).await,
        Bench::SidecarMemory { services, sidecar } => sidecar_memory(services, &sidecar).await,
        Bench::CertIssuance { count } => cert_issuance(count).await,
        Bench::SidecarRps {
            connections,
            seconds,
            runs,
            load,
            sidecar,
        } => {
            let plan = LoadPlan {
                connections,
                duration: Duration::from_secs(seconds),
                load,
            };
            sidecar_rps(&plan, runs, &sidecar).await
        }
    }
}
