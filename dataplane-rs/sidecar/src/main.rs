//! fsm-sidecar: the native Rust data plane of the mesh (binary).
//!
//! Wiring only: the CLI, the ADS client ([`fsm_sidecar_xds`]) feeding the config store, the
//! listener manager and the proxy ([`fsm_sidecar_proxy`]), the admin server and the metrics port,
//! and the application probes of `--probes`.

mod admin;
mod cli;
mod logging;
mod probes;

use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;
use fsm_sidecar_proxy::{
    Metrics, Proxy, RateLimits, Store, StoreSink, Tracer, Upstreams, Workload,
};
use fsm_sidecar_xds::{AdsState, AdsTls, ClientOptions, NodeInfo, build_node};

use crate::cli::Cli;

fn main() -> Result<()> {
    let cli = Cli::parse();
    // The Runtime resource's level (MeshConfig spec.sidecar.logLevel) replaces it live.
    let log = logging::LogControl::install(&cli.log_level)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("--log-level {:?}", cli.log_level))?;
    // A sidecar shares the pod's CPU with the app: two workers are plenty and keep idle memory low.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.workers)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(run(cli, Arc::new(log)))
}

/// The ADS client's options from the CLI: mTLS with the bootstrap certificate, or plaintext only
/// when explicitly asked for.
fn client_options(cli: &Cli) -> Result<ClientOptions> {
    let options = ClientOptions::new(cli.ads.clone());
    match (&cli.bootstrap_dir, cli.ads_insecure) {
        (Some(dir), _) => Ok(options.with_tls(AdsTls {
            bootstrap_dir: dir.clone(),
            server_name: cli.ads_server_name.clone(),
        })),
        (None, true) => Ok(options),
        (None, false) => anyhow::bail!(
            "no --bootstrap-dir (FSM_SIDECAR_BOOTSTRAP_DIR): the ADS connection needs the bootstrap \
             certificate (ca.crt, tls.crt, tls.key) for mTLS; pass --ads-insecure to use plaintext \
             gRPC against a test control plane"
        ),
    }
}

async fn run(cli: Cli, log: Arc<logging::LogControl>) -> Result<()> {
    let probes = probes::parse(cli.probes.as_deref().unwrap_or_default(), "--probes")?;
    let options = client_options(&cli)?;
    // Probes are served before anything else and whatever the control plane does: the kubelet
    // asks them from the start.
    let probe_listeners = fsm_sidecar_proxy::probes::ProbeListeners::bind(&probes).await?;
    probe_listeners.spawn();
    let info = NodeInfo {
        id: cli.node_id.clone(),
        cluster: cli.node_cluster.clone().unwrap_or_else(|| {
            // `<sa>.<ns>` from the node id when not given.
            cli.node_id
                .splitn(5, '.')
                .skip(2)
                .take(2)
                .collect::<Vec<_>>()
                .join(".")
        }),
        pod_ip: cli.pod_ip.map(|ip| ip.to_string()).unwrap_or_default(),
        pod_name: cli.pod_name.clone(),
    };
    let (sa, ns) = info
        .identity()
        .map(|(sa, ns)| (sa.to_string(), ns.to_string()))
        .with_context(|| {
            format!(
                "--node-id {:?} is not <uuid>.sidecar.<service-account>.<namespace>",
                cli.node_id
            )
        })?;
    let metrics = Arc::new(
        Metrics::new(Workload {
            namespace: cli.pod_namespace.clone().unwrap_or(ns),
            // A pod started without its workload is at least named after itself, as FSM names
            // a bare pod.
            name: cli
                .workload_name
                .clone()
                .or_else(|| cli.pod_name.clone())
                .unwrap_or(sa),
            pod: cli.pod_name.clone().unwrap_or_default(),
            kind: cli.workload_kind.clone().unwrap_or_default(),
        })
        .context("registering metrics")?,
    );
    let store = Arc::new(Store::default());
    let proxy = Arc::new(Proxy {
        store: store.clone(),
        upstreams: Upstreams::default(),
        rate_limits: RateLimits::default(),
        metrics: metrics.clone(),
        tracer: Tracer::spawn(&metrics.registry).context("registering the tracing metrics")?,
        transparent: cli.transparent,
    });
    let admin = admin::Admin {
        store: store.clone(),
        metrics: metrics.clone(),
        node: info.clone(),
    };
    let admin_listener = tokio::net::TcpListener::bind(cli.admin)
        .await
        .with_context(|| format!("binding the admin address {}", cli.admin))?;
    let metrics_listener = tokio::net::TcpListener::bind(cli.metrics)
        .await
        .with_context(|| format!("binding the metrics address {}", cli.metrics))?;
    tokio::spawn(admin::serve(admin_listener, admin.clone().router()));
    tokio::spawn(admin::serve(metrics_listener, admin.metrics_router()));
    tokio::spawn(fsm_sidecar_proxy::listeners::run(proxy));

    let state = AdsState::new(cli.ads_mode.into(), build_node(&info));
    let mut sink = logging::Sink {
        store: StoreSink(store),
        log,
    };
    tracing::info!(
        node = %info.id, ads = %cli.ads, mode = ?cli.ads_mode, admin = %cli.admin,
        ads_tls = options.tls.is_some(),
        metrics = %cli.metrics, "fsm-sidecar starting"
    );
    // Every ADS log line carries the node, so several sidecars' logs can be read together.
    let client = tracing::Instrument::instrument(
        fsm_sidecar_xds::run(options, state, &mut sink),
        tracing::info_span!("ads", node = %info.id),
    );
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        () = client => {}
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted; exiting"),
        _ = terminate.recv() => tracing::info!("terminated; exiting"),
    }
    Ok(())
}
