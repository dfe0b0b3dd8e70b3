//! fsm-controller: wires sources, catalog, compiler, adapters, cache and the ADS server.

mod admission;
mod bootstrap;
mod conversion;
mod http;
mod identity;
mod leader;
mod metrics;
mod publish;
mod reconciler;
mod runner;
mod source;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use fsm_catalog::CatalogSettings;
use fsm_errcode::ErrCode;
use fsm_injector::logging::LogControl;
use fsm_injector::server::CaBundleTarget;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::ServiceReference;
use tokio::sync::mpsc;

/// The FSM-compatible control plane: watches mesh objects, computes each sidecar's configuration
/// and streams it to Envoy sidecars and fsm-sidecars over ADS (state-of-the-world and delta xDS).
///
/// Where the mesh objects come from (Namespaces, Services, Endpoints/EndpointSlices, Pods,
/// ServiceAccounts, the `fsm-mesh-config` MeshConfig, SMI and FSM policies), in this order:
///
///   --manifest-dir DIR   no cluster: a directory of ordinary Kubernetes YAML manifests, watched
///                        for edits (the embedded default used by `make demo`);
///   --kubeconfig FILE    a cluster reached through a kubeconfig file (its current context);
///   neither              in a pod: the cluster's in-cluster service-account configuration.
///
/// Every connection is mutually authenticated: sidecars reach the ADS server with an xDS client
/// certificate (CN `<proxy-uuid>.sidecar.<sa>.<ns>`) and talk to each other with service
/// certificates delivered over SDS. Without a cluster the controller writes each sidecar pod's
/// bootstrap credentials to `<state-dir>/bootstrap/<ns>/<pod>/{ca.crt,tls.crt,tls.key}` and keeps
/// the Tresor root in `<state-dir>/fsm-ca-bundle.pem`; replace that file with a new root (PEM
/// certificate and key) to rotate the root without dropping traffic.
#[derive(Debug, Parser)]
#[command(name = "fsm-controller", version, verbatim_doc_comment)]
struct Args {
    /// Serve the manifests in this directory instead of a cluster (watched recursively).
    #[arg(long, env = "FSM_MANIFEST_DIR", conflicts_with = "kubeconfig")]
    manifest_dir: Option<PathBuf>,
    /// Watch the cluster of this kubeconfig file's current context.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
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
    /// Log filter (tracing-subscriber syntax), e.g. `info` or `fsm_xds_server=debug,info`, until
    /// the MeshConfig is loaded; from then on its `spec.observability.fsmLogLevel` sets the level,
    /// live (per-target directives given here stay).
    #[arg(long, env = "FSM_LOG", default_value = "info")]
    log_level: String,
    /// Log as JSON lines instead of human-readable text.
    #[arg(long)]
    log_json: bool,
    /// Where the controller keeps what it must not lose without a cluster: the Tresor root
    /// (`fsm-ca-bundle.pem`) and, in manifest mode, the sidecars' bootstrap credentials.
    #[arg(long, default_value = "fsm-state")]
    state_dir: PathBuf,
    /// Write sidecar bootstrap credentials here (default in manifest mode:
    /// `<state-dir>/bootstrap`; in a cluster only when given, for sidecars outside it: in-cluster
    /// sidecars get theirs from the Secret `fsm-sidecar-bootstrap-<proxy-uuid>`).
    #[arg(long)]
    bootstrap_dir: Option<PathBuf>,
    /// DNS name in the ADS server's certificate, which sidecars verify
    /// (default `fsm-controller.<fsm-namespace>.svc.cluster.local`).
    #[arg(long)]
    ads_server_name: Option<String>,
    /// Longest wait, during a root rotation, for every proxy to acknowledge certificates of the
    /// new root before the old root stops being trusted.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    root_rotation_grace: std::time::Duration,
    /// HTTPS address of the validating webhook for mesh objects (`POST /validate`) and of the
    /// CRD conversion webhook (`POST /convert`), in a cluster only. Off when not given.
    #[arg(long)]
    validating_webhook_listen: Option<SocketAddr>,
    /// The ValidatingWebhookConfiguration whose caBundle the controller keeps current (default
    /// `fsm-validator-mesh-<mesh-name>`).
    #[arg(long)]
    validating_webhook_config_name: Option<String>,
    /// The controller's Service, named in the webhook's certificate (`<name>.<fsm-namespace>.svc`).
    #[arg(long, default_value = "fsm-controller")]
    webhook_service_name: String,
    /// The port of that Service the API server calls the webhooks on (the chart's `webhook`
    /// port): written, with the service, into the conversion of every multi-version mesh CRD.
    #[arg(long, default_value_t = 9093)]
    webhook_service_port: u16,
    /// Restore the mesh's webhook configurations and CRDs (those labelled
    /// `flomesh.io/reconcile: "true"`) when someone edits or deletes them (in a cluster only).
    #[arg(long)]
    enable_reconciler: bool,
    #[command(flatten)]
    certificates: identity::CertArgs,
    #[command(flatten)]
    leader_election: LeaderElectionArgs,
}

/// In a cluster, replicas elect the one that writes (bootstrap Secrets) through a
/// coordination.k8s.io/v1 Lease; the others serve ADS and take over when the leader's lease
/// expires.
#[derive(Debug, clap::Args)]
struct LeaderElectionArgs {
    /// Name of the leader election Lease.
    #[arg(long, default_value = "fsm-controller")]
    leader_election_lease_name: String,
    /// Namespace of the Lease (default: --fsm-namespace).
    #[arg(long)]
    leader_election_namespace: Option<String>,
    /// This replica's holder identity (default: `$POD_NAME` or the host name, and a random suffix).
    #[arg(long)]
    leader_election_identity: Option<String>,
    /// How long followers wait, after the lease last changed, before taking it over.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    leader_election_lease_duration: std::time::Duration,
    /// A leader that could not renew for this long stops writing (shorter than the lease).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    leader_election_renew_deadline: std::time::Duration,
    /// Time between attempts to acquire or renew the lease.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    leader_election_retry_period: std::time::Duration,
}

fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    fsm_catalog::parse_duration(text)
        .ok_or_else(|| format!("{text:?} is not a duration like 30s or 5m"))
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run(Args::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // FSM's `fatal`: logged with its code (the first one its messages name; E1000, the
            // start-up group's, for the few that name none), then the process ends.
            let code = error
                .chain()
                .find_map(|e| ErrCode::prefix_of(&e.to_string()))
                .unwrap_or(ErrCode::E1000);
            fsm_errcode::error!(code, error = format!("{error:#}"), "fsm-controller stopped");
            eprintln!("Error: {error:?}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let logs = Arc::new(
        LogControl::install(&args.log_level, args.log_json)
            .map_err(|e| anyhow::anyhow!("{}: invalid --log-level {e}", ErrCode::E1000))?,
    );
    metrics::register_all();
    let settings = CatalogSettings {
        mesh_name: args.mesh_name.clone(),
        fsm_namespace: args.fsm_namespace.clone(),
    };

    let cache = Arc::new(fsm_cache::SnapshotCache::new());
    let (catalog_tx, catalog_rx) = mpsc::channel(fsm_sources::EVENT_QUEUE);
    let (proxy_tx, proxy_rx) = mpsc::unbounded_channel();
    let source = start_source(&args, catalog_tx).await?;
    let state = Arc::new(runner::State::default());

    let root_file = args.state_dir.join("fsm-ca-bundle.pem");
    let provider = identity::provider(
        &args.certificates,
        source.client(),
        &args.fsm_namespace,
        &root_file,
    )
    .await?;
    let certs = identity::manager(provider);
    let server_name = args
        .ads_server_name
        .clone()
        .unwrap_or_else(|| format!("fsm-controller.{}.svc.cluster.local", args.fsm_namespace));
    let ads_tls = identity::ads_tls(&certs, &server_name).await?;
    // How far the bootstrap writer has caught up with certificate announcements.
    let (bootstrap_synced, bootstrap_synced_rx) = tokio::sync::watch::channel(0);
    if source.client().is_none()
        && args.certificates.certificate_provider == identity::ProviderKind::Tresor
    {
        let (cache, rotating) = (cache.clone(), certs.clone());
        tokio::spawn(identity::watch_root_file(
            root_file.clone(),
            certs.clone(),
            args.root_rotation_grace,
            // Every proxy ACKed its secrets, and every pod's bootstrap files hold the phase's
            // certificates (a proxy reconnecting reads them).
            move || {
                all_in_sync(&cache) && *bootstrap_synced_rx.borrow() >= rotating.announcements()
            },
        ));
    }

    // MeshConfig spec.sidecar.maxDataPlaneConnections, kept current by the control loop.
    let connection_limit = fsm_xds_server::ConnectionLimit::default();
    let ads = fsm_xds_server::AdsServer::new(cache.clone(), proxy_tx)
        .with_type_urls(&fsm_dataplane_proto::ALL_TYPE_URLS)
        .require_client_certificates()
        .with_connection_limit(connection_limit.clone())
        .into_service();
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
        .with_context(|| {
            format!(
                "{}: cannot listen for HTTP on --http-listen {}",
                ErrCode::E1000,
                args.http_listen
            )
        })?;
    tracing::info!(ads = %args.ads_listen, http = %args.http_listen, source = %source.describe(), mesh = %args.mesh_name, certificates = certs.provider_name(), ads_server_name = %server_name, "fsm-controller starting");

    // Ready for `/health/ready` from its first poll: bound, and accepting from then on.
    let readiness = Arc::new(http::Readiness::default());
    let ads_server = {
        let readiness = readiness.clone();
        let serve = fsm_xds_server::listen::serve(ads, ads_tls.incoming(ads_listener));
        async move {
            readiness.set_ads_serving(true);
            serve.await;
            readiness.set_ads_serving(false);
        }
    };
    let (admission_tx, admission_rx) = mpsc::channel(16);
    let validating_webhook = match (args.validating_webhook_listen, source.client()) {
        (Some(listen), Some(client)) => {
            let server_name = format!("{}.{}.svc", args.webhook_service_name, args.fsm_namespace);
            let config_name = args
                .validating_webhook_config_name
                .clone()
                .unwrap_or_else(|| format!("fsm-validator-mesh-{}", args.mesh_name));
            // The roots go into the webhook configuration and, as the conversion webhook, into
            // every mesh CRD serving several versions (only while this server runs: a CRD must
            // not be pointed at nothing).
            let service = ServiceReference {
                namespace: args.fsm_namespace.clone(),
                name: args.webhook_service_name.clone(),
                path: Some(conversion::CONVERT_PATH.into()),
                port: Some(i32::from(args.webhook_service_port)),
            };
            let targets = std::iter::once(CaBundleTarget::WebhookConfiguration(config_name))
                .chain(conversion::converted_crds().into_iter().map(|crd| {
                    CaBundleTarget::CrdConversion {
                        crd,
                        service: service.clone(),
                    }
                }))
                .collect();
            let tls = fsm_injector::server::webhook_tls_publishing(
                &certs,
                &server_name,
                client,
                fsm_injector::server::WebhookKind::Validating,
                targets,
            )
            .await?;
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("{}: binding {listen}", ErrCode::E6701))?;
            tracing::info!(%listen, %server_name, "validating webhook serving");
            Some(fsm_injector::server::serve(
                listener,
                tls,
                fsm_injector::server::WebhookKind::Validating,
                move |request| admission::handle(admission_tx.clone(), request),
            ))
        }
        (Some(_), None) => anyhow::bail!(
            "{}: --validating-webhook-listen needs a cluster (--kubeconfig or in-cluster), not --manifest-dir",
            ErrCode::E1000
        ),
        (None, _) => None,
    };
    let validating_webhook = async move {
        match validating_webhook {
            Some(server) => server.await,
            None => std::future::pending().await,
        }
    };
    let runner = runner::Runner::new(settings, cache.clone(), state.clone(), certs.clone())
        .with_connection_limit(connection_limit)
        .with_log_control(logs);
    let election = &args.leader_election;
    let identity = election
        .leader_election_identity
        .clone()
        .unwrap_or_else(leader::default_identity);
    let leadership = match source.client() {
        Some(client) => {
            let config = leader::Config {
                namespace: election
                    .leader_election_namespace
                    .clone()
                    .unwrap_or_else(|| args.fsm_namespace.clone()),
                name: election.leader_election_lease_name.clone(),
                identity: identity.clone(),
                lease_duration: election.leader_election_lease_duration,
                renew_deadline: election.leader_election_renew_deadline,
                retry_period: election.leader_election_retry_period,
            };
            config.validate().map_err(|e| {
                anyhow::anyhow!("{}: invalid leader election flags: {e}", ErrCode::E1000)
            })?;
            leader::Leadership::elect(client, config)
        }
        None => leader::Leadership::always(),
    };
    match (args.enable_reconciler, source.client()) {
        (true, Some(client)) => {
            tokio::spawn(reconciler::run(
                client,
                args.mesh_name.clone(),
                leadership.subscribe(),
            ));
        }
        (true, None) => anyhow::bail!(
            "{}: --enable-reconciler needs a cluster (--kubeconfig or in-cluster), not --manifest-dir",
            ErrCode::E1000
        ),
        (false, _) => {}
    }
    let targets = bootstrap::Targets {
        dir: args.bootstrap_dir.clone().or_else(|| {
            source
                .client()
                .is_none()
                .then(|| args.state_dir.join("bootstrap"))
        }),
        secrets: source.client(),
        writer: identity,
    };
    tracing::info!(dir = ?targets.dir, secrets = targets.secrets.is_some(), "writing sidecar bootstrap credentials while leading");
    tokio::spawn(bootstrap::run(
        targets,
        certs.clone(),
        runner.sidecars(),
        leadership.subscribe(),
        bootstrap_synced,
    ));
    let http = http::serve(
        http_listener,
        http::AppState {
            cache,
            runner: state,
            source: Arc::new(source),
            readiness,
            fsm_namespace: args.fsm_namespace.clone(),
        },
    );

    // Compiling and publishing is CPU work: the control loop runs on its own thread (its
    // certificate requests and timers still use the runtime), so a large recompute never holds
    // up the reactor that serves ADS streams, health checks and the API server's watches.
    let (loop_done, loop_stopped) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::runtime::Handle::current();
    std::thread::Builder::new()
        .name("fsm-control-loop".into())
        .spawn(move || {
            handle.block_on(runner.run(catalog_rx, proxy_rx, admission_rx));
            let _ = loop_done.send(());
        })
        .with_context(|| format!("{}: cannot start the control loop's thread", ErrCode::E5009))?;

    tokio::select! {
        () = ads_server => anyhow::bail!("{}: the ADS listener stopped", ErrCode::E5009),
        _ = loop_stopped => anyhow::bail!("{}: the control loop stopped", ErrCode::E5009),
        result = http => result.context("HTTP server failed")?,
        () = validating_webhook => anyhow::bail!("{}: the validating webhook stopped", ErrCode::E6701),
        _ = tokio::signal::ctrl_c() => tracing::info!("shutting down"),
        // What Kubernetes sends a pod it stops.
        () = terminated() => tracing::info!("terminated: shutting down"),
    }
    // A successor need not wait for the lease to expire.
    leadership.release().await;
    Ok(())
}

/// Resolves on SIGTERM.
async fn terminated() {
    // `tokio::main` enables the signal driver, and SIGTERM may be handled: this cannot fail.
    let mut signal = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("the runtime's signal driver handles SIGTERM");
    signal.recv().await;
}

/// The types that carry a proxy's certificate and trust bundle (Envoy's SDS, fsm-sidecar's).
const SECRET_TYPES: [&str; 2] = [
    fsm_adapter_envoy::SECRET_TYPE,
    fsm_dataplane_proto::type_url::SECRET,
];

/// Every connected proxy has acknowledged the secrets of its current snapshot: what a root
/// rotation waits for between its phases. Other types are not waited for, so that a proxy
/// refusing (NACKing) a listener or a route does not hold every rotation for its grace period.
fn all_in_sync(cache: &fsm_cache::SnapshotCache) -> bool {
    cache.status().values().all(|proxy| {
        proxy
            .types
            .iter()
            .filter(|(type_url, _)| SECRET_TYPES.contains(type_url))
            .all(|(_, t)| t.snapshot_version.is_none() || t.acked_version == t.snapshot_version)
    })
}

/// Picks the source as `--help` describes.
async fn start_source(
    args: &Args,
    events: mpsc::Sender<fsm_catalog::CatalogEvent>,
) -> anyhow::Result<source::Source> {
    if let Some(dir) = &args.manifest_dir {
        let manifests = fsm_sources::ManifestSource::spawn(dir.clone(), events)
            .await
            .with_context(|| {
                format!(
                    "{}: cannot read --manifest-dir {}",
                    ErrCode::E1000,
                    dir.display()
                )
            })?;
        return Ok(source::Source::Manifests {
            dir: dir.clone(),
            source: manifests,
        });
    }
    let (config, origin) = match &args.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path).with_context(|| {
                format!(
                    "{}: cannot read kubeconfig {}",
                    ErrCode::E1000,
                    path.display()
                )
            })?;
            let config = kube::Config::from_custom_kubeconfig(
                kubeconfig,
                &kube::config::KubeConfigOptions::default(),
            )
            .await
            .with_context(|| {
                format!("{}: unusable kubeconfig {}", ErrCode::E1000, path.display())
            })?;
            (config, format!("kubeconfig {}", path.display()))
        }
        None => {
            let config = kube::Config::incluster().map_err(|e| {
                anyhow::anyhow!(
                    "{}: no source of mesh objects: not running in a pod ({e}); pass --manifest-dir DIR to serve manifests without a cluster, or --kubeconfig FILE to watch a cluster",
                    ErrCode::E1000
                )
            })?;
            (config, "in-cluster configuration".to_string())
        }
    };
    let cluster = config.cluster_url.to_string();
    let client = kube::Client::try_from(config).with_context(|| {
        format!(
            "{}: cannot create a Kubernetes client for {cluster}",
            ErrCode::E1000
        )
    })?;
    Ok(source::Source::Kube {
        origin: format!("{cluster} ({origin})"),
        source: fsm_sources::KubeSource::spawn(client.clone(), events),
        client,
    })
}
