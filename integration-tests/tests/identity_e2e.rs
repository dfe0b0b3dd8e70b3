//! Identity and mTLS end to end: the real controller (Tresor CA in manifest mode), the demo
//! workloads and real Envoy 1.40 sidecars.
//!
//! - Sidecars talk mTLS to each other and to the control plane; plaintext, certificate-less and
//!   foreign-CA clients are refused by a meshed inbound port.
//! - A proxy cannot obtain another identity's configuration or keys by claiming its node id, nor
//!   by a pod copying another pod's proxy UUID label; a second stream of a proxy changes nothing
//!   for its first.
//! - Leaf certificates (short MeshConfig validity) and the root rotate under sustained traffic
//!   without losing a request; an expired root is refused with its error code.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail, ensure};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use fsm_catalog::CatalogSettings;
use fsm_integration_tests::controller::ADS_SERVER_NAME;
use fsm_integration_tests::{
    AdsMode, Controller, ControllerOptions, Envoy, MeshPod, SidecarConfig, demo_manifests,
    edit_manifest, eventually, http_get_via, load_catalog, mesh_pods, start_controller,
    start_demo_apps, start_envoy,
};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CONVERGE: Duration = Duration::from_secs(30);
const HTTPBIN: &str = "httpbin.demo:14001";
const SDS: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";

/// The demo mesh with an Envoy sidecar per meshed pod.
struct Mesh {
    _work: tempfile::TempDir,
    manifests: std::path::PathBuf,
    logs: std::path::PathBuf,
    controller: Controller,
    _apps: Vec<fsm_integration_tests::ManagedProcess>,
    pods: Vec<MeshPod>,
    envoys: Vec<(MeshPod, Envoy)>,
}

impl Mesh {
    async fn start(subnet: u8, edit: impl FnOnce(&Path) -> Result<()>) -> Result<Mesh> {
        let work = tempfile::tempdir()?;
        let logs = work.path().join("logs");
        std::fs::create_dir_all(&logs)?;
        let manifests = demo_manifests(&work.path().join("manifests"), subnet)?;
        edit(&manifests)?;
        let catalog = load_catalog(&manifests, CatalogSettings::default())?;
        let controller = start_controller(&manifests, &logs, &ControllerOptions::default()).await?;
        let apps = start_demo_apps(&catalog, &logs).await?;
        let pods: Vec<MeshPod> = mesh_pods(&catalog)
            .into_iter()
            .filter(|p| p.node_id().is_some())
            .collect();
        let mut mesh = Mesh {
            _work: work,
            manifests: manifests.clone(),
            logs,
            controller,
            _apps: apps,
            pods: pods.clone(),
            envoys: Vec::new(),
        };
        for pod in &pods {
            let envoy = mesh.start_envoy(pod).await?;
            mesh.envoys.push((pod.clone(), envoy));
        }
        Ok(mesh)
    }

    async fn start_envoy(&self, pod: &MeshPod) -> Result<Envoy> {
        let mut envoy = start_envoy(
            &SidecarConfig::for_pod(pod, &self.controller.ads(), AdsMode::Sotw)?,
            &self.logs,
        )
        .await?;
        envoy
            .wait_ready(CONVERGE)
            .await
            .with_context(|| format!("sidecar of {}", pod.id()))?;
        Ok(envoy)
    }

    fn pod(&self, name: &str) -> Result<&MeshPod> {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .with_context(|| format!("pod {name}"))
    }

    fn envoy(&self, name: &str) -> Result<&Envoy> {
        self.envoys
            .iter()
            .find(|(p, _)| p.name == name)
            .map(|(_, e)| e)
            .with_context(|| format!("sidecar of {name}"))
    }
}

async fn get_httpbin(curl: &MeshPod) -> Result<()> {
    let reply = http_get_via(curl.outbound_addr(), HTTPBIN, "/get").await?;
    ensure!(
        reply.status == 200,
        "status {}: {}",
        reply.body,
        reply.status
    );
    Ok(())
}

// === TLS probes of a meshed inbound port ===

/// Accepts any server certificate: these probes only check that the *server* refuses them.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &[rustls_pki_types::CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Sends an HTTP request to `addr` over TLS (with `client_cert`, PEM chain and key, if any) or
/// in plaintext, and returns what came back before the connection closed.
async fn probe(addr: SocketAddr, tls: Option<Option<(&str, &str)>>) -> Result<String> {
    let request = format!("GET /get HTTP/1.1\r\nHost: {HTTPBIN}\r\nConnection: close\r\n\r\n");
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let mut reply = Vec::new();
    let Some(client_cert) = tls else {
        stream.write_all(request.as_bytes()).await?;
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut reply)).await;
        return Ok(String::from_utf8_lossy(&reply).into_owned());
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)));
    let config = match client_cert {
        None => builder.with_no_client_auth(),
        Some((chain, key)) => {
            let certs = rustls_pki_types::pem::PemObject::pem_slice_iter(chain.as_bytes())
                .collect::<Result<Vec<rustls_pki_types::CertificateDer>, _>>()?;
            let key = <rustls_pki_types::PrivateKeyDer as rustls_pki_types::pem::PemObject>::from_pem_slice(key.as_bytes())?;
            builder.with_client_auth_cert(certs, key)?
        }
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = rustls_pki_types::ServerName::try_from("httpbin.demo.svc.cluster.local")?;
    // With TLS 1.3 the server judges the client certificate after the client's handshake is
    // done, so a refusal shows up as an alert or a close on the first read.
    let Ok(mut tls) = connector.connect(name, stream).await else {
        return Ok(String::new());
    };
    if tls.write_all(request.as_bytes()).await.is_err() {
        return Ok(String::new());
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut reply)).await;
    Ok(String::from_utf8_lossy(&reply).into_owned())
}

// === ADS as a hostile proxy ===

/// Opens a SotW ADS stream with the credentials in `bootstrap_dir`, announcing `node_id`, asks for
/// the secrets, and returns the secrets received (or the stream's error status).
async fn fetch_secrets(
    controller: &Controller,
    bootstrap_dir: &Path,
    node_id: &str,
) -> Result<std::result::Result<Vec<Secret>, tonic::Status>> {
    fetch_secrets_as(controller, bootstrap_dir, node_id, "envoy").await
}

/// [`fetch_secrets`] announcing `user_agent` (empty: a generic xDS client).
async fn fetch_secrets_as(
    controller: &Controller,
    bootstrap_dir: &Path,
    node_id: &str,
    user_agent: &str,
) -> Result<std::result::Result<Vec<Secret>, tonic::Status>> {
    let read = |name: &str| std::fs::read_to_string(bootstrap_dir.join(name));
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(read("ca.crt")?))
        .identity(tonic::transport::Identity::from_pem(
            read("tls.crt")?,
            read("tls.key")?,
        ))
        .domain_name(ADS_SERVER_NAME);
    let channel =
        tonic::transport::Endpoint::from_shared(format!("https://{}", controller.ads_addr))?
            .tls_config(tls)?
            .connect()
            .await?;
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    let request = DiscoveryRequest {
        node: Some(Node {
            id: node_id.to_string(),
            cluster: "spoof".into(),
            user_agent_name: user_agent.into(),
            ..Default::default()
        }),
        type_url: SDS.into(),
        ..Default::default()
    };
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(request).await?;
    let mut responses = match client
        .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
    {
        Ok(r) => r.into_inner(),
        Err(status) => return Ok(Err(status)),
    };
    let first = tokio::time::timeout(Duration::from_secs(10), responses.message()).await;
    drop(tx);
    match first {
        Ok(Ok(Some(response))) => Ok(Ok(response
            .resources
            .iter()
            .map(|any| Secret::decode(any.value.as_slice()))
            .collect::<std::result::Result<_, _>>()?)),
        Ok(Ok(None)) => bail!("stream closed without a response or an error"),
        Ok(Err(status)) => Ok(Err(status)),
        Err(_) => bail!("no SDS response within 10 s"),
    }
}

fn private_key_owners(secrets: &[Secret]) -> Vec<String> {
    secrets
        .iter()
        .filter(|s| matches!(s.r#type, Some(secret::Type::TlsCertificate(_))))
        .map(|s| s.name.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_mesh_identities_get_in() {
    if let Err(err) = refusals(22).await {
        panic!("{err:#}");
    }
}

async fn refusals(subnet: u8) -> Result<()> {
    let mesh = Mesh::start(subnet, |_| Ok(())).await?;
    let curl = mesh.pod("curl")?.clone();
    let httpbin = mesh.pod("httpbin-v1")?.clone();

    // Sidecars reach each other: the server side requires a mesh client certificate, so this
    // request crossed mTLS.
    eventually(CONVERGE, || get_httpbin(&curl)).await?;
    let ssl = mesh
        .envoy("httpbin-v1")?
        .admin_get("/stats?filter=ssl.handshake")
        .await?;
    ensure!(
        ssl.lines()
            .any(|l| l.contains("ssl.handshake") && !l.ends_with(": 0")),
        "httpbin-v1's sidecar completed no TLS handshake: {ssl}"
    );

    // Plaintext, no certificate, and a certificate of another CA: no HTTP response at all.
    let inbound = httpbin.inbound_addr();
    let plain = probe(inbound, None).await?;
    ensure!(
        !plain.starts_with("HTTP/"),
        "plaintext was answered: {plain:?}"
    );
    let anonymous = probe(inbound, Some(None)).await?;
    ensure!(
        !anonymous.starts_with("HTTP/"),
        "a client without certificate was answered: {anonymous:?}"
    );
    let foreign_ca = fsm_certs::tresor::CertificateAuthority::generate_root(
        "not-the-mesh",
        Duration::from_secs(3600),
    )?;
    let foreign = foreign_ca.issue(
        &fsm_certs::CertificateRequest::new("curl.demo.cluster.local", Duration::from_secs(3600))
            .with_uri_san("spiffe://cluster.local/ns/demo/sa/curl"),
    )?;
    let foreign_reply = probe(
        inbound,
        Some(Some((
            &foreign.cert_chain_pem,
            foreign.private_key.expose_pem(),
        ))),
    )
    .await?;
    ensure!(
        !foreign_reply.starts_with("HTTP/"),
        "a client of another CA was answered: {foreign_reply:?}"
    );

    // ADS: curl's bootstrap certificate gets curl's secrets, and only curl's key.
    let ads = mesh.controller.ads();
    let curl_dir = ads.pod_dir(&curl.namespace, &curl.name);
    let own = fetch_secrets(
        &mesh.controller,
        &curl_dir,
        &curl.node_id().context("node id")?,
    )
    .await?
    .map_err(|s| anyhow::anyhow!("own identity refused: {s}"))?;
    ensure!(
        private_key_owners(&own) == ["service-cert:demo/curl"],
        "curl received keys {:?}",
        private_key_owners(&own)
    );
    // …and claiming httpbin's node id with it is refused before anything is sent.
    let spoofed = fetch_secrets(
        &mesh.controller,
        &curl_dir,
        &httpbin.node_id().context("node id")?,
    )
    .await?;
    match spoofed {
        Ok(secrets) => bail!(
            "a proxy with curl's certificate obtained httpbin's secrets {:?}",
            secrets.iter().map(|s| &s.name).collect::<Vec<_>>()
        ),
        Err(status) => {
            ensure!(
                status.code() == tonic::Code::PermissionDenied
                    && status.message().contains("E5010"),
                "expected PermissionDenied with E5010, got {status:?}"
            );
        }
    }
    let metrics = mesh.controller.metrics().await?;
    ensure!(
        metrics
            .lines()
            .any(|l| l.starts_with("fsm_error_err_code_count{err_code=\"E5010\"}")),
        "E5010 not counted"
    );
    Ok(())
}

// === A copied proxy UUID ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_copying_a_proxy_uuid_takes_nothing_over() {
    if let Err(err) = takeover(24).await {
        panic!("{err:#}");
    }
}

/// Issue 15, A: pod `demo/evil` (its own service account and address) carries curl's
/// `fsm-proxy-uuid`. Curl keeps its credentials, configuration and traffic; evil gets neither
/// credentials nor configuration, is reported with E5004, and deleting it changes nothing.
async fn takeover(subnet: u8) -> Result<()> {
    let mesh = Mesh::start(subnet, |_| Ok(())).await?;
    let curl = mesh.pod("curl")?.clone();
    let uuid = curl.proxy_uuid.clone().context("curl's proxy UUID")?;
    eventually(CONVERGE, || get_httpbin(&curl)).await?;
    let ads = mesh.controller.ads();
    let curl_dir = ads.pod_dir("demo", "curl");
    let curl_cert = std::fs::read_to_string(curl_dir.join("tls.crt"))?;
    let (_, curl_listeners) = mesh.envoy("curl")?.dynamic_versions().await?;

    let evil_file = mesh.manifests.join("90-evil.yaml");
    std::fs::write(
        &evil_file,
        format!(
            "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: evil, namespace: demo}}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata:\n  name: evil\n  namespace: demo\n  labels: {{app: evil, fsm-proxy-uuid: {uuid}}}\n\
             spec:\n  serviceAccountName: evil\n  containers: [{{name: evil, image: evil}}]\nstatus: {{podIP: 127.0.{subnet}.99}}\n"
        ),
    )?;
    eventually(CONVERGE, || async {
        let problems = mesh.controller.debug_problems().await?;
        ensure!(
            problems
                .iter()
                .any(|p| p.starts_with("E5004") && p.contains("demo/evil") && p.contains(&uuid)),
            "no E5004 for demo/evil in /debug/problems: {problems:?}"
        );
        Ok(())
    })
    .await?;
    // The bootstrap writer runs after the catalog: give it time to do the wrong thing.
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure!(
        !ads.pod_dir("demo", "evil").exists(),
        "the impostor was given bootstrap credentials"
    );
    ensure!(
        std::fs::read_to_string(curl_dir.join("tls.crt"))? == curl_cert,
        "curl's bootstrap credentials changed"
    );

    // Even holding an xDS certificate for `<uuid>.sidecar.evil.demo` from the mesh CA (as the
    // controller used to issue), the impostor's stream is closed with E5004 and gets nothing.
    let ca = fsm_certs::tresor::TresorProvider::load_or_create_in_file(
        mesh.controller.state_dir.join("fsm-ca-bundle.pem"),
    )
    .await?;
    let evil_id = format!("{uuid}.sidecar.evil.demo");
    let forged = ca.ca().issue(
        &fsm_certs::CertificateRequest::new(evil_id.clone(), Duration::from_secs(3600))
            .with_purpose(fsm_certs::CertPurpose::XdsClient),
    )?;
    let evil_dir = mesh.logs.join("evil-credentials");
    std::fs::create_dir_all(&evil_dir)?;
    std::fs::copy(curl_dir.join("ca.crt"), evil_dir.join("ca.crt"))?;
    std::fs::write(evil_dir.join("tls.crt"), &forged.cert_chain_pem)?;
    std::fs::write(evil_dir.join("tls.key"), forged.private_key.expose_pem())?;
    match fetch_secrets(&mesh.controller, &evil_dir, &evil_id).await? {
        Ok(secrets) => bail!(
            "the impostor received {:?}",
            secrets.iter().map(|s| &s.name).collect::<Vec<_>>()
        ),
        Err(status) => ensure!(
            status.code() == tonic::Code::PermissionDenied && status.message().starts_with("E5004"),
            "expected PermissionDenied with E5004, got {status:?}"
        ),
    }

    // Curl is untouched: same listeners, same credentials, traffic flows, nothing wrong with it.
    get_httpbin(&curl).await?;
    let (_, listeners) = mesh.envoy("curl")?.dynamic_versions().await?;
    ensure!(
        listeners == curl_listeners,
        "curl's listeners changed: {curl_listeners:?} -> {listeners:?}"
    );
    let config = mesh.controller.debug_config().await?;
    ensure!(
        config[&uuid]["error"].is_null(),
        "curl has an error: {}",
        config[&uuid]
    );

    // Deleting the impostor changes nothing for curl.
    std::fs::remove_file(&evil_file)?;
    eventually(CONVERGE, || async {
        let problems = mesh.controller.debug_problems().await?;
        ensure!(
            !problems.iter().any(|p| p.contains("demo/evil")),
            "{problems:?}"
        );
        Ok(())
    })
    .await?;
    get_httpbin(&curl).await?;
    ensure!(std::fs::read_to_string(curl_dir.join("tls.crt"))? == curl_cert);
    for type_url in [LDS, SDS] {
        ensure!(
            mesh.controller
                .in_sync_version(&uuid, type_url)
                .await?
                .is_some(),
            "curl's {type_url} is not in sync"
        );
    }
    Ok(())
}

// === A second stream of the same proxy ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_stream_changes_nothing_for_the_first() {
    if let Err(err) = second_stream(25).await {
        panic!("{err:#}");
    }
}

/// Issue 15, B: with curl's Envoy connected, a generic xDS client using curl's own credentials
/// and node id but no user agent connects (and is served Envoy resources) and goes away; curl's
/// Envoy keeps receiving every update.
async fn second_stream(subnet: u8) -> Result<()> {
    let mesh = Mesh::start(subnet, |_| Ok(())).await?;
    let curl = mesh.pod("curl")?.clone();
    let uuid = curl.proxy_uuid.clone().context("curl's proxy UUID")?;
    eventually(CONVERGE, || get_httpbin(&curl)).await?;
    let curl_dir = mesh.controller.ads().pod_dir("demo", "curl");
    let node_id = curl.node_id().context("node id")?;
    for _ in 0..2 {
        let secrets = fetch_secrets_as(&mesh.controller, &curl_dir, &node_id, "")
            .await?
            .map_err(|s| anyhow::anyhow!("curl's own second stream refused: {s}"))?;
        ensure!(
            private_key_owners(&secrets) == ["service-cert:demo/curl"],
            "a generic client asking for Envoy's types gets Envoy secrets: {:?}",
            private_key_owners(&secrets)
        );
    }

    // An endpoint leaves httpbin: curl's Envoy, connected all along, gets the new EDS.
    let eds_before = eventually(CONVERGE, || async {
        mesh.controller
            .in_sync_version(&uuid, EDS)
            .await?
            .context("curl's EDS not in sync")
    })
    .await?;
    let v2_endpoint = format!(
        "  - ip: 127.0.{subnet}.2\n    targetRef: {{kind: Pod, name: httpbin-v2, namespace: demo}}\n"
    );
    edit_manifest(&mesh.manifests.join("20-httpbin.yaml"), &v2_endpoint, "")?;
    eventually(CONVERGE, || async {
        let now = mesh.controller.in_sync_version(&uuid, EDS).await?;
        ensure!(
            now.is_some() && now.as_ref() != Some(&eds_before),
            "curl's EDS still at {eds_before} ({now:?})"
        );
        Ok(())
    })
    .await?;
    let metrics = mesh.controller.metrics().await?;
    ensure!(
        !metrics
            .lines()
            .any(|l| l.starts_with("fsm_error_err_code_count{err_code=\"E5013\"}")),
        "a stream without user agent was treated as an unsupported data plane"
    );
    get_httpbin(&curl).await?;
    Ok(())
}

// === rotation under load ===

/// Requests through curl's sidecar from `workers` loops until `stop`: (succeeded, failed).
fn sustained_load(
    curl: MeshPod,
    workers: usize,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(u64, u64, Vec<String>)> {
    tokio::spawn(async move {
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(load_errors::Errors::default());
        let mut tasks = Vec::new();
        for _ in 0..workers {
            let (curl, stop, ok, failed, errors) = (
                curl.clone(),
                stop.clone(),
                ok.clone(),
                failed.clone(),
                errors.clone(),
            );
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match get_httpbin(&curl).await {
                        Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            errors.push(format!("{e:#}"));
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        (
            ok.load(Ordering::Relaxed),
            failed.load(Ordering::Relaxed),
            errors.take(),
        )
    })
}

mod load_errors {
    /// The first few errors of the load, for the failure message.
    #[derive(Default)]
    pub struct Errors(parking_lot::Mutex<Vec<String>>);

    impl Errors {
        pub fn push(&self, e: String) {
            let mut v = self.0.lock();
            if v.len() < 5 {
                v.push(e);
            }
        }
        pub fn take(&self) -> Vec<String> {
            std::mem::take(&mut *self.0.lock())
        }
    }
}

/// What Envoy's `/certs` says: (serial of the service certificate, serials of the trusted CAs).
async fn envoy_certs(envoy: &Envoy) -> Result<(String, Vec<String>)> {
    let certs: serde_json::Value = serde_json::from_str(&envoy.admin_get("/certs").await?)?;
    let mut leaf = String::new();
    let mut roots = Vec::new();
    for c in certs["certificates"].as_array().into_iter().flatten() {
        for chain in c["cert_chain"].as_array().into_iter().flatten() {
            let san_uri = chain["subject_alt_names"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|s| {
                    s["uri"]
                        .as_str()
                        .is_some_and(|u| u.starts_with("spiffe://"))
                });
            if san_uri {
                leaf = chain["serial_number"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
            }
        }
        for ca in c["ca_cert"].as_array().into_iter().flatten() {
            let serial = ca["serial_number"].as_str().unwrap_or_default().to_string();
            if !roots.contains(&serial) {
                roots.push(serial);
            }
        }
    }
    roots.sort();
    Ok((leaf, roots))
}

fn serial_hex(pem: &str) -> Result<String> {
    Ok(fsm_certs::x509::leaf_info(pem)?.serial)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_load_without_losing_requests() {
    if let Err(err) = rotation(23).await {
        panic!("{err:#}");
    }
}

async fn rotation(subnet: u8) -> Result<()> {
    // Service certificates live 15 s, so they are renewed about every 10 s.
    let mut mesh = Mesh::start(subnet, |manifests| {
        edit_manifest(
            &manifests.join("00-mesh.yaml"),
            "serviceCertValidityDuration: 24h",
            "serviceCertValidityDuration: 15s",
        )
    })
    .await?;
    let curl = mesh.pod("curl")?.clone();
    eventually(CONVERGE, || get_httpbin(&curl)).await?;
    let (first_leaf, first_roots) = envoy_certs(mesh.envoy("curl")?).await?;
    ensure!(
        !first_leaf.is_empty() && first_roots.len() == 1,
        "/certs: {first_leaf:?} {first_roots:?}"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let load = sustained_load(curl.clone(), 4, stop.clone());

    // Two leaf rotations under load.
    let leaves = parking_lot::Mutex::new(vec![first_leaf.clone()]);
    eventually(Duration::from_secs(45), || async {
        let (leaf, _) = envoy_certs(mesh.envoy("curl")?).await?;
        let mut seen = leaves.lock();
        if !seen.contains(&leaf) {
            seen.push(leaf);
        }
        ensure!(seen.len() >= 3, "leaf serials so far {seen:?}");
        Ok(())
    })
    .await?;
    let leaf_rotations = leaves.lock().len() - 1;

    // A root rotation under load: the operator replaces the root file.
    let new_root = fsm_certs::tresor::CertificateAuthority::generate_root(
        "fsm-rotated-root",
        Duration::from_secs(24 * 3600),
    )?;
    let new_root_serial = serial_hex(new_root.cert_pem())?;
    replace_root_file(
        &mesh.controller.state_dir.join("fsm-ca-bundle.pem"),
        &format!("{}{}", new_root.cert_pem(), new_root.key_pem().expose_pem()),
    )?;
    eventually(Duration::from_secs(45), || async {
        let (_, roots) = envoy_certs(mesh.envoy("curl")?).await?;
        if roots != [new_root_serial.clone()] {
            let out_of_sync: Vec<String> = mesh
                .controller
                .debug_proxies()
                .await?
                .into_iter()
                .flat_map(|(uuid, p)| {
                    p.types
                        .into_iter()
                        .filter(|(_, t)| !t.is_in_sync())
                        .map(move |(t, s)| format!("{uuid} {t}: {s:?}"))
                })
                .collect();
            let dir = mesh.controller.ads().pod_dir("demo", "curl");
            let on_disk = std::fs::read_to_string(dir.join("ca.crt"))
                .map_err(anyhow::Error::from)
                .and_then(|pem| Ok(fsm_certs::x509::all_info(&pem)?.into_iter().map(|i| i.serial).collect::<Vec<_>>()));
            let link = std::fs::read_link(&dir);
            bail!(
                "curl's sidecar trusts {roots:?}, waiting for only the new root {new_root_serial}; proxies not in sync: {out_of_sync:?}; bootstrap ca.crt on disk: {on_disk:?} via {link:?}"
            );
        }
        Ok(())
    })
    .await?;
    // Keep the load on a little after the old root is gone.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let (ok, failed, errors) = load.await?;
    println!(
        "ROTATION_FIGURES: {} leaf rotations and 1 root rotation in {:.1} s under load: {ok} requests succeeded, {failed} failed",
        leaf_rotations,
        started.elapsed().as_secs_f64()
    );
    ensure!(ok > 100, "too little load to mean anything: {ok} requests");
    ensure!(
        failed == 0,
        "{failed} requests failed during rotation: {errors:?}"
    );

    // A restarted sidecar handshakes from scratch with new-root credentials only: its bootstrap
    // certificate (ADS) and its service certificate (to httpbin's sidecar).
    let index = mesh
        .envoys
        .iter()
        .position(|(p, _)| p.name == "curl")
        .context("curl sidecar")?;
    mesh.envoys.remove(index);
    let restarted = mesh.start_envoy(&curl).await?;
    mesh.envoys.push((curl.clone(), restarted));
    eventually(CONVERGE, || get_httpbin(&curl)).await?;

    // An expired root is refused with its code, and the current root keeps serving.
    let expired = fsm_certs::tresor::CertificateAuthority::generate_root_valid_between(
        "fsm-expired-root",
        SystemTime::now() - Duration::from_secs(48 * 3600),
        SystemTime::now() - Duration::from_secs(24 * 3600),
    )?;
    replace_root_file(
        &mesh.controller.state_dir.join("fsm-ca-bundle.pem"),
        &format!("{}{}", expired.cert_pem(), expired.key_pem().expose_pem()),
    )?;
    eventually(CONVERGE, || async {
        let metrics = mesh.controller.metrics().await?;
        ensure!(
            metrics
                .lines()
                .any(|l| l.starts_with("fsm_error_err_code_count{err_code=\"E4015\"}")),
            "the expired root was not reported with E4015"
        );
        Ok(())
    })
    .await?;
    get_httpbin(&curl).await?;
    let (_, roots) = envoy_certs(mesh.envoy("curl")?).await?;
    ensure!(
        roots == [new_root_serial],
        "roots after the refused root: {roots:?}"
    );
    Ok(())
}

/// Replaces the root file atomically, as `kubectl cp`/an editor's save-by-rename would.
fn replace_root_file(path: &Path, contents: &str) -> Result<()> {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, contents)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}
