//! fsm-injector: FSM's sidecar injector as a mutating admission webhook.
//!
//! Serves HTTPS on `--listen` (FSM: 9090): `POST /mutate-pod-creation` answers AdmissionReviews
//! ([`fsm_injector::webhook`]), `GET /healthz` says it is up. Its certificate (DNS name
//! `<service-name>.<fsm-namespace>.svc`) comes from the mesh's certificate provider and rotates
//! with it; at start-up and on every rotation the injector writes the mesh's roots into the
//! `caBundle` of its MutatingWebhookConfiguration, which is how kube-apiserver learns to trust it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use bytes::Bytes;
use clap::Parser;
use fsm_certs::setup::{CertArgs, coded, manager, provider};
use fsm_certs::{CertKey, IssuedCertificate};
use fsm_crds::config::v1alpha3::{MeshConfig, MeshConfigSpec};
use fsm_errcode::ErrCode;
use fsm_injector::webhook::{ReviewContext, read_review, respond};
use fsm_injector::{InjectorSettings, SidecarClass};
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Request, Response, StatusCode};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Namespace;
use kube::Api;
use kube::api::PostParams;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

/// Lifetime of the webhook's certificate; rotated at a third of it, like every certificate.
const CERT_VALIDITY: Duration = Duration::from_secs(24 * 3600);
/// The largest AdmissionReview read (a pod with its containers is a few KiB; kube-apiserver
/// itself limits requests to 3 MiB).
const MAX_REVIEW_BYTES: usize = 3 * 1024 * 1024;
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
    #[arg(long, env = "FSM_LOG", default_value = "info")]
    log_level: String,
    #[command(flatten)]
    certificates: CertArgs,
}

struct State {
    settings: InjectorSettings,
    client: kube::Client,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&args.log_level)
                .with_context(|| format!("{}: invalid --log-level", ErrCode::E1000))?,
        )
        .init();
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
    let cert = certs
        .issue_server_certificate(&server_name, CERT_VALIDITY)
        .await
        .map_err(coded)
        .with_context(|| format!("{}: cannot issue the webhook certificate", ErrCode::E6101))?;
    let tls = Arc::new(ArcSwap::from_pointee(server_config(&cert)?));
    let webhook_config = args
        .webhook_config_name
        .clone()
        .unwrap_or_else(|| format!("fsm-webhook-{}", args.mesh_name));
    publish_ca_bundle(&client, &webhook_config, &cert.trust_bundle_pem).await;

    // Rotation: a new certificate for new connections, the (possibly new) roots to the webhook
    // configuration.
    let mut rotations = certs.subscribe();
    let (rotating_tls, rotating_client, key) = (
        tls.clone(),
        client.clone(),
        CertKey::Server {
            common_name: server_name.clone(),
        },
    );
    tokio::spawn(async move {
        loop {
            match rotations.recv().await {
                Ok(event) if event.key == key => match server_config(&event.cert) {
                    Ok(config) => {
                        rotating_tls.store(Arc::new(config));
                        publish_ca_bundle(
                            &rotating_client,
                            &webhook_config,
                            &event.cert.trust_bundle_pem,
                        )
                        .await;
                        tracing::info!(serial = %event.cert.serial, "webhook certificate rotated");
                    }
                    Err(e) => {
                        tracing::error!(code = %ErrCode::E6101, error = %e, "cannot use the rotated webhook certificate; keeping the previous one")
                    }
                },
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    });

    let state = Arc::new(State { settings, client });
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("{}: binding {}", ErrCode::E6102, args.listen))?;
    tracing::info!(listen = %args.listen, %server_name, "sidecar injector serving");
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let acceptor = TlsAcceptor::from(tls.load_full());
        let state = state.clone();
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(
                Duration::from_secs(10),
                acceptor.accept(stream),
            )
            .await
            {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let service = hyper::service::service_fn(move |request| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&state, request).await) }
            });
            let _ =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
        });
    }
}

fn server_config(cert: &IssuedCertificate) -> anyhow::Result<ServerConfig> {
    let chain = CertificateDer::pem_slice_iter(cert.cert_chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("webhook certificate chain")?;
    let key = PrivateKeyDer::from_pem_slice(cert.private_key.expose_pem().as_bytes())
        .context("webhook private key")?;
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Writes `roots` into every webhook of the MutatingWebhookConfiguration `name` (read, change,
/// replace: a conflicting write is retried). A missing configuration is logged: the webhook
/// still serves whoever calls it.
async fn publish_ca_bundle(client: &kube::Client, name: &str, roots: &str) {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let bundle = k8s_openapi::ByteString(roots.as_bytes().to_vec());
    for _ in 0..5 {
        let mut config = match api.get_opt(name).await {
            Ok(Some(config)) => config,
            Ok(None) => {
                tracing::warn!(code = %ErrCode::E6114, name, "no MutatingWebhookConfiguration to publish the webhook's roots in");
                return;
            }
            Err(e) => {
                tracing::warn!(code = %ErrCode::E6114, name, error = %e, "cannot read the MutatingWebhookConfiguration");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut changed = false;
        for webhook in config.webhooks.iter_mut().flatten() {
            if webhook.client_config.ca_bundle.as_ref() != Some(&bundle) {
                webhook.client_config.ca_bundle = Some(bundle.clone());
                changed = true;
            }
        }
        if !changed {
            return;
        }
        match api.replace(name, &PostParams::default(), &config).await {
            Ok(_) => {
                tracing::info!(name, "published the webhook's roots (caBundle)");
                return;
            }
            Err(e) => {
                tracing::warn!(code = %ErrCode::E6114, name, error = %e, "cannot update the MutatingWebhookConfiguration; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

async fn handle(state: &State, request: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_default()
    };
    match (request.method().as_str(), request.uri().path()) {
        ("GET", "/healthz") => reply(StatusCode::OK, "\"ok\"".into()),
        ("POST", MUTATE_PATH) => {
            let body = match Limited::new(request.into_body(), MAX_REVIEW_BYTES)
                .collect()
                .await
            {
                Ok(body) => body.to_bytes(),
                Err(e) => {
                    return reply(
                        StatusCode::BAD_REQUEST,
                        format!("\"{}: {e}\"", ErrCode::E6111),
                    );
                }
            };
            let review = match serde_json::from_slice(&body)
                .map_err(|e| format!("{}: {e}", ErrCode::E6103))
                .and_then(|v| read_review(&v))
            {
                Ok(review) => review,
                Err(e) => {
                    tracing::warn!(error = %e, "unreadable AdmissionReview");
                    return reply(
                        StatusCode::BAD_REQUEST,
                        serde_json::Value::String(e).to_string(),
                    );
                }
            };
            let namespaces: Api<Namespace> = Api::all(state.client.clone());
            let namespace = match namespaces.get(&review.namespace).await {
                Ok(ns) => ns.metadata,
                Err(e) => {
                    let message = format!(
                        "{}: cannot read namespace {}: {e}",
                        ErrCode::E6109,
                        review.namespace
                    );
                    tracing::warn!("{message}");
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
            reply(StatusCode::OK, answer.to_string())
        }
        _ => reply(StatusCode::NOT_FOUND, "\"not found\"".into()),
    }
}

/// The mesh's MeshConfig spec; its defaults when it cannot be read (logged).
async fn mesh_config(state: &State) -> MeshConfigSpec {
    let api: Api<MeshConfig> = Api::namespaced(state.client.clone(), &state.settings.fsm_namespace);
    match api.get_opt(fsm_catalog::MESH_CONFIG_NAME).await {
        Ok(Some(mc)) => mc.spec,
        Ok(None) => MeshConfigSpec::default(),
        Err(e) => {
            tracing::warn!(code = %ErrCode::E4152, error = %e, "cannot read the MeshConfig; injecting with its defaults");
            MeshConfigSpec::default()
        }
    }
}
