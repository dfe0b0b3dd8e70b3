//! One purpose per certificate, end to end: the real controller (Tresor CA in manifest mode), the
//! demo workloads and real sidecars (Envoy, and fsm-sidecar).
//!
//! The controller's CA signs two kinds of leaf: each proxy's xDS bootstrap certificate (CN
//! `<uuid>.sidecar.<sa>.<ns>`, no SPIFFE URI SAN, for the ADS server only) and each identity's
//! service certificate (SPIFFE URI SAN, sidecar to sidecar). Both chain to the same root, so
//! only their names tell them apart:
//!
//! - curl's bootstrap certificate gets no HTTP response at httpbin's meshed inbound port, while
//!   the sidecars' service certificates still carry curl's requests to httpbin;
//! - curl's service certificate opens no ADS stream (E5001), while its bootstrap one does.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use fsm_catalog::CatalogSettings;
use fsm_integration_tests::controller::ADS_SERVER_NAME;
use fsm_integration_tests::{
    AdsMode, Controller, ControllerOptions, FsmSidecarConfig, ManagedProcess, MeshPod,
    SidecarConfig, demo_manifests, eventually, http_get_via, load_catalog, mesh_pods,
    start_controller, start_demo_apps, start_envoy, start_fsm_sidecar,
};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CONVERGE: Duration = Duration::from_secs(30);
const HTTPBIN: &str = "httpbin.demo:14001";
const SDS: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

#[derive(Clone, Copy, Debug)]
enum DataPlane {
    Envoy,
    FsmSidecar,
}

/// The demo mesh with a sidecar per meshed pod; dropping it stops everything.
struct Mesh {
    _work: tempfile::TempDir,
    controller: Controller,
    _apps: Vec<fsm_integration_tests::ManagedProcess>,
    pods: Vec<MeshPod>,
    /// Each sidecar's process by pod, stopped on drop.
    sidecars: Vec<(String, ManagedProcess)>,
}

impl Mesh {
    async fn start(subnet: u8, plane: DataPlane) -> Result<Mesh> {
        let work = tempfile::tempdir()?;
        let logs = work.path().join("logs");
        std::fs::create_dir_all(&logs)?;
        let manifests = demo_manifests(&work.path().join("manifests"), subnet)?;
        let catalog = load_catalog(&manifests, CatalogSettings::default())?;
        let controller = start_controller(&manifests, &logs, &ControllerOptions::default()).await?;
        let apps = start_demo_apps(&catalog, &logs).await?;
        let pods: Vec<MeshPod> = mesh_pods(&catalog)
            .into_iter()
            .filter(|p| p.node_id().is_some())
            .collect();
        let mut sidecars = Vec::new();
        for pod in &pods {
            let ads = controller.ads();
            let sidecar = match plane {
                DataPlane::Envoy => {
                    let config = SidecarConfig::for_pod(pod, &ads, AdsMode::Sotw)?;
                    let mut envoy = start_envoy(&config, &logs).await?;
                    envoy.wait_ready(CONVERGE).await.map(|()| envoy.process)
                }
                DataPlane::FsmSidecar => {
                    let config = FsmSidecarConfig::for_pod(pod, &ads, AdsMode::Sotw)?;
                    let mut sidecar = start_fsm_sidecar(&config, &logs).await?;
                    sidecar.wait_ready(CONVERGE).await.map(|()| sidecar.process)
                }
            };
            let process = sidecar.with_context(|| format!("{plane:?} sidecar of {}", pod.id()))?;
            sidecars.push((pod.id(), process));
        }
        Ok(Mesh {
            _work: work,
            controller,
            _apps: apps,
            pods,
            sidecars,
        })
    }

    fn print_sidecar_logs(&self) {
        for (pod, process) in &self.sidecars {
            eprintln!("--- sidecar of {pod}:\n{}", process.log_tail(20));
        }
    }

    fn pod(&self, name: &str) -> Result<&MeshPod> {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .with_context(|| format!("pod {name}"))
    }
}

async fn get_httpbin(curl: &MeshPod) -> Result<()> {
    let reply = http_get_via(curl.outbound_addr(), HTTPBIN, "/get").await?;
    ensure!(
        reply.status == 200,
        "status {}: {}",
        reply.status,
        reply.body
    );
    Ok(())
}

// === A TLS client at a meshed inbound port ===

/// Accepts any server certificate: the probe only checks what the *server* does with the
/// client's certificate.
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

/// Sends `GET /get` to `addr` over TLS with the client certificate `chain` and `key` (PEM), and
/// returns what came back before the connection closed ("" when the handshake was refused).
async fn probe(addr: SocketAddr, chain: &str, key: &str) -> Result<String> {
    let request = format!("GET /get HTTP/1.1\r\nHost: {HTTPBIN}\r\nConnection: close\r\n\r\n");
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = rustls_pki_types::pem::PemObject::pem_slice_iter(chain.as_bytes())
        .collect::<Result<Vec<rustls_pki_types::CertificateDer>, _>>()?;
    let key =
        <rustls_pki_types::PrivateKeyDer as rustls_pki_types::pem::PemObject>::from_pem_slice(
            key.as_bytes(),
        )?;
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_client_auth_cert(certs, key)?;
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
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut reply)).await;
    Ok(String::from_utf8_lossy(&reply).into_owned())
}

// === An ADS client ===

/// Opens a SotW ADS stream with `ca.crt`, `tls.crt` and `tls.key` of `dir`, announcing
/// `node_id`, asks for the secrets and returns them (or the stream's error status).
async fn fetch_secrets(
    controller: &Controller,
    dir: &Path,
    node_id: &str,
) -> Result<std::result::Result<Vec<Secret>, tonic::Status>> {
    let read = |name: &str| std::fs::read_to_string(dir.join(name));
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
            cluster: "cert-purpose".into(),
            user_agent_name: "envoy".into(),
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
    // The first non-empty response: a stream whose data plane is new to this proxy may first
    // be answered with no secrets until the controller has built them. Each response is ACKed.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let next = tokio::time::timeout_at(deadline, responses.message()).await;
        let response = match next {
            Ok(Ok(Some(response))) => response,
            Ok(Ok(None)) => bail!("stream closed without a response or an error"),
            Ok(Err(status)) => return Ok(Err(status)),
            Err(_) => bail!("no SDS response with secrets within 10 s"),
        };
        if !response.resources.is_empty() {
            return Ok(Ok(response
                .resources
                .iter()
                .map(|any| Secret::decode(any.value.as_slice()))
                .collect::<std::result::Result<_, _>>()?));
        }
        tx.send(DiscoveryRequest {
            type_url: SDS.into(),
            version_info: response.version_info,
            response_nonce: response.nonce,
            ..Default::default()
        })
        .await?;
    }
}

/// The chain and key of the `TlsCertificate` secret named `name`.
fn tls_certificate(secrets: &[Secret], name: &str) -> Result<(String, String)> {
    let inline = |source: &Option<envoy_types::pb::envoy::config::core::v3::DataSource>| {
        use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;
        match source.as_ref().and_then(|s| s.specifier.as_ref()) {
            Some(Specifier::InlineString(text)) => Ok(text.clone()),
            Some(Specifier::InlineBytes(bytes)) => Ok(String::from_utf8(bytes.clone())?),
            other => bail!("{name}: not inline: {other:?}"),
        }
    };
    let cert = secrets
        .iter()
        .find(|s| s.name == name)
        .and_then(|s| match &s.r#type {
            Some(secret::Type::TlsCertificate(c)) => Some(c),
            _ => None,
        })
        .with_context(|| {
            format!(
                "no TlsCertificate {name} among {:?}",
                secrets
                    .iter()
                    .map(|s| (&s.name, s.r#type.is_some()))
                    .collect::<Vec<_>>()
            )
        })?;
    Ok((inline(&cert.certificate_chain)?, inline(&cert.private_key)?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_certificate_is_refused_at_an_envoy_inbound_port() {
    if let Err(err) = one_purpose_per_certificate(58, DataPlane::Envoy).await {
        panic!("{err:#}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_certificate_is_refused_at_an_fsm_sidecar_inbound_port() {
    if let Err(err) = one_purpose_per_certificate(59, DataPlane::FsmSidecar).await {
        panic!("{err:#}");
    }
}

async fn one_purpose_per_certificate(subnet: u8, plane: DataPlane) -> Result<()> {
    let mesh = Mesh::start(subnet, plane).await?;
    let result = check(&mesh).await;
    if result.is_err() {
        mesh.print_sidecar_logs();
    }
    result
}

async fn check(mesh: &Mesh) -> Result<()> {
    let curl = mesh.pod("curl")?.clone();
    let httpbin = mesh.pod("httpbin-v1")?.clone();
    let curl_node = curl.node_id().context("curl's node id")?;

    // Service certificates still work: curl's request crosses both Envoys over mTLS.
    eventually(CONVERGE, || get_httpbin(&curl)).await?;

    // curl's bootstrap certificate, as the controller wrote it for curl's Envoy.
    let curl_dir = mesh.controller.ads().pod_dir(&curl.namespace, &curl.name);
    let read = |name: &str| {
        std::fs::read_to_string(curl_dir.join(name))
            .with_context(|| format!("{}", curl_dir.join(name).display()))
    };
    let (bootstrap_chain, bootstrap_key) = (read("tls.crt")?, read("tls.key")?);

    // The ADS server gives it curl's service certificate (its purpose)…
    let secrets = fetch_secrets(&mesh.controller, &curl_dir, &curl_node)
        .await?
        .map_err(|s| anyhow::anyhow!("curl's bootstrap certificate refused by ADS: {s}"))?;
    let (service_chain, service_key) = tls_certificate(&secrets, "service-cert:demo/curl")?;

    // …and at httpbin's meshed inbound port the service certificate is answered, the bootstrap
    // certificate is not.
    let inbound = httpbin.inbound_addr();
    let served = probe(inbound, &service_chain, &service_key).await?;
    ensure!(
        served.starts_with("HTTP/1.1 200"),
        "curl's service certificate was not served at {inbound}: {served:?}"
    );
    let refused = probe(inbound, &bootstrap_chain, &bootstrap_key).await?;
    ensure!(
        !refused.starts_with("HTTP/"),
        "curl's bootstrap certificate got an HTTP answer at {inbound}: {refused:?}"
    );

    // The other way round: the service certificate opens no ADS stream, whatever node id it
    // announces.
    let as_service = tempfile::tempdir()?;
    std::fs::copy(curl_dir.join("ca.crt"), as_service.path().join("ca.crt"))?;
    std::fs::write(as_service.path().join("tls.crt"), &service_chain)?;
    std::fs::write(as_service.path().join("tls.key"), &service_key)?;
    match fetch_secrets(&mesh.controller, as_service.path(), &curl_node).await? {
        Ok(secrets) => bail!(
            "a service certificate opened an ADS stream and received {:?}",
            secrets.iter().map(|s| &s.name).collect::<Vec<_>>()
        ),
        Err(status) => ensure!(
            status.message().starts_with("E5001"),
            "refused, but not with E5001: {status}"
        ),
    }
    Ok(())
}
