//! fsm-controller: wires sources, catalog, compiler, adapters, cache and the ADS server.

mod http;
mod runner;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use fsm_catalog::CatalogSettings;
use fsm_errcode::ErrCode;
use tokio::sync::mpsc;

/// The FSM-compatible control plane: watches mesh objects, computes each sidecar's configuration
/// and streams it to Envoy sidecars over ADS (state-of-the-world and delta xDS).
///
/// Without a cluster it reads a directory of ordinary Kubernetes YAML manifests (Namespaces,
/// Services, Endpoints/EndpointSlices, Pods, ServiceAccounts and the `fsm-mesh-config`
/// MeshConfig) and follows edits to it live.
#[derive(Debug, Parser)]
#[command(name = "fsm-controller", version)]
struct Args {
    /// Directory of Kubernetes YAML manifests to serve (watched recursively for changes).
    #[arg(long, env = "FSM_MANIFEST_DIR")]
    manifest_dir: PathBuf,
    /// Address of the ADS gRPC server that sidecars connect to.
    #[arg(long, default_value = "127.0.0.1:15128")]
    ads_listen: SocketAddr,
    /// Address of the HTTP server for /health/ready, /health/alive, /metrics and /debug/proxies.
    #[arg(long, default_value = "127.0.0.1:9091")]
    http_listen: SocketAddr,
    /// Mesh name: namespaces labelled flomesh.io/monitored-by=<mesh-name> are meshed.
    #[arg(long, default_value = "fsm")]
    mesh_name: String,
    /// Namespace of the control plane, where the fsm-mesh-config MeshConfig lives.
    #[arg(long, default_value = "fsm-system")]
    fsm_namespace: String,
    /// Log filter (tracing-subscriber syntax), e.g. `info` or `fsm_xds_server=debug,info`.
    #[arg(long, env = "FSM_LOG", default_value = "info")]
    log_level: String,
    /// Log as JSON lines instead of human-readable text.
    #[arg(long)]
    log_json: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log_level).with_context(|| {
        format!(
            "{}: invalid --log-level {:?}",
            ErrCode::E1000,
            args.log_level
        )
    })?;
    if args.log_json {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .json()
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    let settings = CatalogSettings {
        mesh_name: args.mesh_name.clone(),
        fsm_namespace: args.fsm_namespace.clone(),
    };

    let cache = Arc::new(fsm_cache::SnapshotCache::new());
    let (catalog_tx, catalog_rx) = mpsc::unbounded_channel();
    let (proxy_tx, proxy_rx) = mpsc::unbounded_channel();
    let source =
        fsm_sources::manifest::ManifestSource::spawn(args.manifest_dir.clone(), catalog_tx)
            .await
            .with_context(|| {
                format!(
                    "cannot read manifest directory {}",
                    args.manifest_dir.display()
                )
            })?;
    let state = Arc::new(runner::State::default());

    let ads = fsm_xds_server::AdsServer::new(cache.clone(), proxy_tx).into_service();
    let ads_listener = tokio::net::TcpListener::bind(args.ads_listen)
        .await
        .with_context(|| {
            format!(
                "{}: cannot listen for ADS on {}",
                ErrCode::E5009,
                args.ads_listen
            )
        })?;
    let http_listener = tokio::net::TcpListener::bind(args.http_listen)
        .await
        .with_context(|| format!("cannot listen for HTTP on {}", args.http_listen))?;
    tracing::info!(ads = %args.ads_listen, http = %args.http_listen, manifests = %args.manifest_dir.display(), mesh = %args.mesh_name, "fsm-controller starting");

    let ads_server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .add_service(ads)
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(ads_listener));
    let runner = runner::Runner::new(settings, cache.clone(), state.clone());
    let http = http::serve(
        http_listener,
        http::AppState {
            cache,
            runner: state,
            source: Arc::new(source),
        },
    );

    tokio::select! {
        result = ads_server => result.with_context(|| format!("{}: ADS server failed", ErrCode::E5009))?,
        () = runner.run(catalog_rx, proxy_rx) => anyhow::bail!("the control loop stopped"),
        result = http => result.context("HTTP server failed")?,
        _ = tokio::signal::ctrl_c() => tracing::info!("shutting down"),
    }
    Ok(())
}
