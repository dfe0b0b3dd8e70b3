//! fsm-injector: FSM's sidecar injector as a mutating admission webhook.
//!
//! Serves HTTPS on `--listen` (FSM: 9090): `POST /mutate-pod-creation` answers AdmissionReviews
//! ([`fsm_injector::webhook`]), `GET /healthz` says it is up. Its certificate (DNS name
//! `<service-name>.<fsm-namespace>.svc`) comes from the mesh's certificate provider and rotates
//! with it; at start-up and on every rotation the injector writes the mesh's roots into the
//! `caBundle` of its MutatingWebhookConfiguration, which is how kube-apiserver learns to trust it.
//!
//! Serves plain HTTP on `--metrics-listen` (FSM: 9091, where the pod's `prometheus.io/port`
//! annotation points): `GET /metrics` (`fsm_admission_webhook_response_total`, the certificate
//! metrics, `fsm_error_err_code_count`) and `GET /healthz`.
//!
//! Logs at `--log-level` until it first reads the MeshConfig (for a pod to inject), then at its
//! `spec.observability.fsmLogLevel`, followed each time it reads it again
//! ([`fsm_injector::logging`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;
use clap::Parser;
use fsm_certs::setup::{CertArgs, manager, provider};
use fsm_crds::config::v1alpha3::{MeshConfig, MeshConfigSpec};
use fsm_errcode::{ErrCode, HasErrCode};
use fsm_injector::logging::LogControl;
use fsm_injector::metrics::{count_admission, count_answer, review_kind};
use fsm_injector::server::{WebhookKind, read_json, reply, serve, webhook_tls};
use fsm_injector::webhook::{ReviewContext, read_review, respond};
use fsm_injector::{InjectorSettings, SidecarClass};
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use k8s_openapi::api::core::v1::Namespace;
use kube::Api;
const MUTATE_PATH: &str = "/mutate-pod-creation";

/// FSM's sidecar injector (mutating admission webhook).
#[derive(Debug, Parser)]
#[command(name = "fsm-injector", version)]
struct Args {
    /// Cluster to use (absent: the in-cluster service account).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// HTTPS address of the webhook and /healthz.
    #[arg(long, default_value = "0.0.0.0:9090")]
    listen: SocketAddr,
    /// Plain HTTP address of GET /metrics (Prometheus) and GET /healthz.
    #[arg(long, default_value = "0.0.0.0:9091")]
    metrics_listen: SocketAddr,
    #[arg(long, default_value = "fsm")]
    mesh_name: String,
    #[arg(long, default_value = "fsm-system")]
    fsm_namespace: String,
    /// The MutatingWebhookConfiguration whose caBundle the injector keeps current (default
    /// `fsm-webhook-<mesh-name>`).
    #[arg(long)]
    webhook_config_name: Option<String>,
    /// The injector's Service, named in its certificate (`<name>.<fsm-namespace>.svc`).
    #[arg(long, default_value = "fsm-injector")]
    service_name: String,
    /// ADS address the sidecars dial (default `fsm-controller.<fsm-namespace>.svc.cluster.local:15128`).
    #[arg(long)]
    ads_address: Option<String>,
    /// DNS name the sidecars require in the ADS server's certificate (default: the host of
    /// the ADS address).
    #[arg(long)]
    ads_server_name: Option<String>,
    #[arg(long, default_value = "flomesh/fsm-init:latest")]
    init_image: String,
    #[arg(long, default_value = "envoyproxy/envoy:v1.40-latest")]
    envoy_image: String,
    #[arg(long, default_value = "flomesh/fsm-sidecar:latest")]
    fsm_sidecar_image: String,
    /// The sidecar of pods without a `flomesh.io/sidecar-class` annotation: envoy or fsm-sidecar.
    #[arg(long, default_value = "envoy", value_parser = ["envoy", "fsm-sidecar"])]
    sidecar_class: String,
    /// Log filter (tracing-subscriber syntax) until the MeshConfig is read; then its
    /// `spec.observability.fsmLogLevel` sets the level (per-target directives here stay).
    #[arg(long, env = "FSM_LOG", default_value = "info")]
    log_level: String,
    #[command(flatten)]
    certificates: CertArgs,
}

struct State {
    settings: InjectorSettings,
    client: kube::Client,
    logs: LogControl,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let logs = LogControl::install(&args.log_level, false)
        .map_err(|e| anyhow::anyhow!("{}: invalid --log-level {e}", ErrCode::E1000))?;
    let client = match &args.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .context("loading the kubeconfig")?;
            kube::Client::try_from(config)?
        }
        None => kube::Client::try_default()
            .await
            .context("in-cluster configuration")?,
    };
    let ads_address = args.ads_address.clone().unwrap_or_else(|| {
        format!(
            "fsm-controller.{}.svc.cluster.local:15128",
            args.fsm_namespace
        )
    });
    let ads_server_name = args.ads_server_name.clone().unwrap_or_else(|| {
        ads_address
            .rsplit_once(':')
            .map_or(ads_address.as_str(), |(h, _)| h)
            .to_string()
    });
    let settings = InjectorSettings {
        mesh_name: args.mesh_name.clone(),
        fsm_namespace: args.fsm_namespace.clone(),
        ads_address,
        ads_server_name,
        init_image: args.init_image.clone(),
        envoy_image: args.envoy_image.clone(),
        fsm_sidecar_image: args.fsm_sidecar_image.clone(),
        default_class: SidecarClass::parse(&args.sidecar_class).unwrap_or(SidecarClass::Envoy),
    };

    let root_file = PathBuf::from("fsm-ca-bundle.pem");
    let provider = provider(
        &args.certificates,
        Some(client.clone()),
        &args.fsm_namespace,
        &root_file,
    )
    .await?;
    let certs = manager(provider);
    let server_name = format!("{}.{}.svc", args.service_name, args.fsm_namespace);
    let webhook_config = args
        .webhook_config_name
        .clone()
        .unwrap_or_else(|| format!("fsm-webhook-{}", args.mesh_name));
    let tls = webhook_tls(
        &certs,
        &server_name,
        client.clone(),
        WebhookKind::Mutating,
        webhook_config,
    )
    .await?;
    fsm_injector::metrics::metrics();
    fsm_certs::metrics::metrics();
    fsm_errcode::register();
    // Without its metrics the injector still injects: pods must not wait for Prometheus.
    match tokio::net::TcpListener::bind(args.metrics_listen).await {
        Ok(listener) => {
            tokio::spawn(fsm_injector::metrics::serve(listener));
        }
        Err(e) => {
            fsm_errcode::error!(WebhookKind::Mutating.server_failed(), listen = %args.metrics_listen, error = %e, "cannot serve /metrics; injecting without it");
        }
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("{}: binding {}", ErrCode::E6102, args.listen))?;
    tracing::info!(listen = %args.listen, metrics = %args.metrics_listen, %server_name, "sidecar injector serving");
    let state = Arc::new(State {
        settings,
        client,
        logs,
    });
    serve(listener, tls, WebhookKind::Mutating, move |request| {
        let state = state.clone();
        async move { handle(&state, request).await }
    })
    .await;
    Ok(())
}

async fn handle(state: &State, request: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    match (request.method().as_str(), request.uri().path()) {
        ("GET", "/healthz") => reply(StatusCode::OK, "\"ok\"".into()),
        ("POST", MUTATE_PATH) => {
            let review = match read_json(request).await {
                Ok(json) => json,
                Err(response) => {
                    count_admission("", false);
                    return response;
                }
            };
            let kind = review_kind(&review).to_owned();
            let review = match read_review(&review) {
                Ok(review) => review,
                Err(e) => {
                    fsm_errcode::warn!(e.err_code(), error = %e, "unreadable AdmissionReview");
                    count_admission(&kind, false);
                    return reply(
                        StatusCode::BAD_REQUEST,
                        serde_json::Value::String(e.to_string()).to_string(),
                    );
                }
            };
            let namespaces: Api<Namespace> = Api::all(state.client.clone());
            let namespace = match namespaces.get(&review.namespace).await {
                Ok(ns) => ns.metadata,
                Err(e) => {
                    let code = ErrCode::E6109;
                    let message =
                        format!("{code}: cannot read namespace {}: {e}", review.namespace);
                    fsm_errcode::warn!(code, "{message}");
                    count_admission(&kind, false);
                    return reply(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        serde_json::Value::String(message).to_string(),
                    );
                }
            };
            let mesh = mesh_config(state).await;
            let ctx = ReviewContext {
                settings: &state.settings,
                mesh: &mesh,
                namespace: &namespace,
            };
            let answer = respond(&ctx, &review, || uuid::Uuid::new_v4().to_string());
            count_answer(&kind, &answer);
            reply(StatusCode::OK, answer.to_string())
        }
        _ => reply(StatusCode::NOT_FOUND, "\"not found\"".into()),
    }
}

/// The mesh's MeshConfig spec; its defaults when it cannot be read (logged). Its
/// `fsmLogLevel` becomes the injector's log level (none: `--log-level`'s).
async fn mesh_config(state: &State) -> MeshConfigSpec {
    let api: Api<MeshConfig> = Api::namespaced(state.client.clone(), &state.settings.fsm_namespace);
    match api.get_opt(fsm_catalog::MESH_CONFIG_NAME).await {
        Ok(Some(mc)) => {
            state.logs.set(Some(fsm_injector::logging::from_crd(
                mc.spec.observability.fsm_log_level,
            )));
            mc.spec
        }
        Ok(None) => {
            state.logs.set(None);
            MeshConfigSpec::default()
        }
        Err(e) => {
            fsm_errcode::warn!(ErrCode::E4152, error = %e, "cannot read the MeshConfig; injecting with its defaults");
            MeshConfigSpec::default()
        }
    }
}
