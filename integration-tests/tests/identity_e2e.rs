//! Identity and mTLS end to end: the real controller (Tresor CA in manifest mode), the demo
//! workloads and real Envoy 1.40 sidecars.
//!
//! - Sidecars talk mTLS to each other and to the control plane; plaintext, certificate-less and
//!   foreign-CA clients are refused by a meshed inbound port, and a client sidecar refuses an
//!   upstream whose mesh certificate names another identity than the service's.
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
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use fsm_integration_tests::{
    AdsMode, Controller, DemoMesh, Envoy, MeshPod, ProbeClient, SDS, SecretsWait, SidecarConfig,
    edit_manifest, eventually, fetch_secrets, http_get_ok_via, http_get_via, private_key_owners,
    probe, start_envoy, xds_node,
};

const CONVERGE: Duration = Duration::from_secs(30);
const HTTPBIN: &str = "httpbin.demo:14001";
/// The name a TLS client of httpbin's inbound port asks for.
const HTTPBIN_SNI: &str = "httpbin.demo.svc.cluster.local";
const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";

/// The demo mesh with an Envoy sidecar per meshed pod.
struct Mesh {
    /// Stopped on drop, before the control plane.
    envoys: Vec<(MeshPod, Envoy)>,
    demo: DemoMesh,
}

impl Mesh {
    async fn start(subnet: u8, edit: impl FnOnce(&Path) -> Result<()>) -> Result<Mesh> {
        // The tests read the controller's /debug endpoints.
        let demo = DemoMesh::start_edited(subnet, |dir| {
            fsm_integration_tests::mesh::enable_debug_server(dir)?;
            edit(dir)
        })
        .await?;
        let envoys = demo.start_envoys(AdsMode::Sotw, CONVERGE).await?;
        Ok(Mesh { envoys, demo })
    }

    /// A new sidecar for `pod`, as [`DemoMesh::start_envoys`] starts them.
    async fn start_envoy(&self, pod: &MeshPod) -> Result<Envoy> {
        let mut envoy = start_envoy(
            &SidecarConfig::for_pod(pod, &self.demo.controller.ads(), AdsMode::Sotw)?,
            &self.demo.logs,
        )
        .await?;
        envoy
            .wait_ready(CONVERGE)
            .await
            .with_context(|| format!("sidecar of {}", pod.id()))?;
        Ok(envoy)
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
    http_get_ok_via(curl.outbound_addr(), HTTPBIN, "/get").await?;
    Ok(())
}

/// Sends `GET /get` to httpbin's meshed inbound port at `addr` as `client` says.
async fn probe_httpbin(addr: SocketAddr, client: ProbeClient<'_>) -> Result<String> {
    probe(addr, HTTPBIN, HTTPBIN_SNI, client).await
}

// === ADS as a hostile proxy ===

/// Opens a SotW ADS stream with the credentials in `bootstrap_dir`, announcing `node_id` as an
/// Envoy, asks for the secrets, and returns those of the first response (or the stream's error
/// status).
async fn fetch_secrets_of(
    controller: &Controller,
    bootstrap_dir: &Path,
    node_id: &str,
) -> Result<std::result::Result<Vec<Secret>, tonic::Status>> {
    fetch_secrets_as(controller, bootstrap_dir, node_id, "envoy").await
}

/// [`fetch_secrets_of`] announcing `user_agent` (empty: a generic xDS client).
async fn fetch_secrets_as(
    controller: &Controller,
    bootstrap_dir: &Path,
    node_id: &str,
    user_agent: &str,
) -> Result<std::result::Result<Vec<Secret>, tonic::Status>> {
    let node = xds_node(node_id, "spoof", user_agent);
    fetch_secrets(
        controller.ads_addr,
        bootstrap_dir,
        node,
        SecretsWait::FirstResponse,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_mesh_identities_get_in() {
    if let Err(err) = refusals(22).await {
        panic!("{err:#}");
    }
}

async fn refusals(subnet: u8) -> Result<()> {
    let mesh = Mesh::start(subnet, |_| Ok(())).await?;
    let curl = mesh.demo.pod("curl")?.clone();
    let httpbin = mesh.demo.pod("httpbin-v1")?.clone();

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
    let plain = probe_httpbin(inbound, ProbeClient::Plaintext).await?;
    ensure!(
        !plain.starts_with("HTTP/"),
        "plaintext was answered: {plain:?}"
    );
    let anonymous = probe_httpbin(inbound, ProbeClient::Anonymous).await?;
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
    let foreign_reply = probe_httpbin(
        inbound,
        ProbeClient::Certificate {
            chain: &foreign.cert_chain_pem,
            key: foreign.private_key.expose_pem(),
        },
    )
    .await?;
    ensure!(
        !foreign_reply.starts_with("HTTP/"),
        "a client of another CA was answered: {foreign_reply:?}"
    );

    // ADS: curl's bootstrap certificate gets curl's secrets, and only curl's key.
    let ads = mesh.demo.controller.ads();
    let curl_dir = ads.pod_dir(&curl.namespace, &curl.name);
    let own = fetch_secrets_of(
        &mesh.demo.controller,
        &curl_dir,
        &curl.node_id().context("node id")?,
    )
    .await?
    .map_err(|s| anyhow::anyhow!("own identity refused: {s}"))?;
    ensure!(
        private_key_owners(&own) == ["service-cert of curl.demo.cluster.local"],
        "curl received keys {:?}",
        private_key_owners(&own)
    );
    // …and claiming httpbin's node id with it is refused before anything is sent.
    let spoofed = fetch_secrets_of(
        &mesh.demo.controller,
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
    let metrics = mesh.demo.controller.metrics().await?;
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
    let curl = mesh.demo.pod("curl")?.clone();
    let uuid = curl.proxy_uuid.clone().context("curl's proxy UUID")?;
    eventually(CONVERGE, || get_httpbin(&curl)).await?;
    let ads = mesh.demo.controller.ads();
    let curl_dir = ads.pod_dir("demo", "curl");
    let curl_cert = std::fs::read_to_string(curl_dir.join("tls.crt"))?;
    let (_, curl_listeners) = mesh.envoy("curl")?.dynamic_versions().await?;

    let evil_file = mesh.demo.manifests.join("90-evil.yaml");
    std::fs::write(
        &evil_file,
        format!(
            "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: evil, namespace: demo}}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata:\n  name: evil\n  namespace: demo\n  labels: {{app: evil, fsm-proxy-uuid: {uuid}}}\n\
             spec:\n  serviceAccountName: evil\n  containers: [{{name: evil, image: evil}}]\nstatus: {{podIP: 127.0.{subnet}.99}}\n"
        ),
    )?;
    eventually(CONVERGE, || async {
        let problems = mesh.demo.controller.debug_problems().await?;
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
        mesh.demo.controller.state_dir.join("fsm-ca-bundle.pem"),
    )
    .await?;
    let evil_id = format!("{uuid}.sidecar.evil.demo");
    let forged = ca.ca().issue(
        &fsm_certs::CertificateRequest::new(evil_id.clone(), Duration::from_secs(3600))
            .with_purpose(fsm_certs::CertPurpose::XdsClient),
    )?;
    let evil_dir = mesh.demo.logs.join("evil-credentials");
    std::fs::create_dir_all(&evil_dir)?;
    std::fs::copy(curl_dir.join("ca.crt"), evil_dir.join("ca.crt"))?;
    std::fs::write(evil_dir.join("tls.crt"), &forged.cert_chain_pem)?;
    std::fs::write(evil_dir.join("tls.key"), forged.private_key.expose_pem())?;
    match fetch_secrets_of(&mesh.demo.controller, &evil_dir, &evil_id).await? {
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
    let config = mesh.demo.controller.debug_config().await?;
    ensure!(
        config[&uuid]["error"].is_null(),
        "curl has an error: {}",
        config[&uuid]
    );

    // Deleting the impostor changes nothing for curl.
    std::fs::remove_file(&evil_file)?;
    eventually(CONVERGE, || async {
        let problems = mesh.demo.controller.debug_problems().await?;
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
            mesh.demo
                .controller
                .in_sync_version(&uuid, type_url)
                .await?
                .is_some(),
            "curl's {type_url} is not in sync"
        );
    }
    Ok(())
}

// === An upstream presenting another identity ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_with_another_mesh_identity_is_refused() {
    if let Err(err) = impostor_upstream(29).await {
        panic!("{err:#}");
    }
}

/// The roots a client checks upstream servers against are one secret for every service; which
/// identities a service's servers may have travels with its cluster. httpbin's sidecars are
/// replaced by a server holding a certificate of the mesh CA: curl's Envoy talks to it only when
/// its certificate names httpbin's identity, not curl's.
async fn impostor_upstream(subnet: u8) -> Result<()> {
    let mut mesh = Mesh::start(subnet, |_| Ok(())).await?;
    let curl = mesh.demo.pod("curl")?.clone();
    eventually(CONVERGE, || get_httpbin(&curl)).await?;
    let ca = fsm_certs::tresor::TresorProvider::load_or_create_in_file(
        mesh.demo.controller.state_dir.join("fsm-ca-bundle.pem"),
    )
    .await?;
    let certificate = |sa: &str| {
        ca.ca().issue(
            &fsm_certs::CertificateRequest::new(
                format!("{sa}.demo.cluster.local"),
                Duration::from_secs(3600),
            )
            .with_uri_san(format!("spiffe://cluster.local/ns/demo/sa/{sa}")),
        )
    };
    let httpbin_pods: Vec<MeshPod> = mesh
        .envoys
        .iter()
        .map(|(pod, _)| pod.clone())
        .filter(|pod| pod.service_account == "httpbin")
        .collect();
    ensure!(!httpbin_pods.is_empty(), "no httpbin pod in the demo");
    mesh.envoys
        .retain(|(pod, _)| pod.service_account != "httpbin");
    // The sidecars are gone; give their ports a moment to be released.
    tokio::time::sleep(Duration::from_millis(200)).await;

    for (sa, admitted) in [("curl", false), ("httpbin", true)] {
        let issued = certificate(sa)?;
        let mut servers = Vec::new();
        for pod in &httpbin_pods {
            servers.push(
                ImpostorServer::start(
                    pod.inbound_addr(),
                    &issued.cert_chain_pem,
                    issued.private_key.expose_pem(),
                )
                .await?,
            );
        }
        let reply = http_get_via(curl.outbound_addr(), HTTPBIN, "/get").await?;
        if admitted {
            ensure!(
                reply.status == 200 && reply.body == ImpostorServer::BODY,
                "a server with httpbin's identity was not reached: {} {:?}",
                reply.status,
                reply.body
            );
        } else {
            ensure!(
                reply.status == 503 && reply.body != ImpostorServer::BODY,
                "a server with {sa}'s identity answered for httpbin: {} {:?}",
                reply.status,
                reply.body
            );
            let handshakes: usize = servers.iter().map(|s| s.refused()).sum();
            ensure!(
                handshakes > 0,
                "curl's sidecar never reached the impostor (nothing was refused)"
            );
        }
        for server in servers {
            server.stop().await;
        }
    }
    Ok(())
}

/// A TLS server at a sidecar's inbound address that answers every HTTP/1.1 request with
/// [`ImpostorServer::BODY`]; it counts handshakes the client broke off.
struct ImpostorServer {
    refused: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl ImpostorServer {
    const BODY: &str = "impostor";

    async fn start(addr: SocketAddr, chain_pem: &str, key_pem: &str) -> Result<ImpostorServer> {
        use rustls_pki_types::pem::PemObject;
        let chain = rustls_pki_types::CertificateDer::pem_slice_iter(chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()?;
        let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes())?;
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        // The sidecar's connections linger in TIME_WAIT on this address.
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_reuseaddr(true)?;
        socket
            .bind(addr)
            .with_context(|| format!("binding the impostor at {addr}"))?;
        let listener = socket.listen(128)?;
        let refused = Arc::new(AtomicU64::new(0));
        let counter = refused.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let counter = counter.clone();
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        counter.fetch_add(1, Ordering::Relaxed);
                        return;
                    };
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tls.read(&mut buf).await {
                            Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
                            // The client checked the certificate after the handshake and left.
                            _ => {
                                counter.fetch_add(1, Ordering::Relaxed);
                                return;
                            }
                        }
                    }
                    let response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{}",
                        Self::BODY.len(),
                        Self::BODY
                    );
                    let _ = tls.write_all(response.as_bytes()).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        Ok(ImpostorServer { refused, task })
    }

    /// Stops listening before it returns, so that the address can be bound again.
    async fn stop(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }

    fn refused(&self) -> usize {
        self.refused.load(Ordering::Relaxed) as usize
    }
}

impl Drop for ImpostorServer {
    fn drop(&mut self) {
        self.task.abort();
    }
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
    let curl = mesh.demo.pod("curl")?.clone();
    let uuid = curl.proxy_uuid.clone().context("curl's proxy UUID")?;
    eventually(CONVERGE, || get_httpbin(&curl)).await?;
    let curl_dir = mesh.demo.controller.ads().pod_dir("demo", "curl");
    let node_id = curl.node_id().context("node id")?;
    for _ in 0..2 {
        let secrets = fetch_secrets_as(&mesh.demo.controller, &curl_dir, &node_id, "")
            .await?
            .map_err(|s| anyhow::anyhow!("curl's own second stream refused: {s}"))?;
        ensure!(
            private_key_owners(&secrets) == ["service-cert of curl.demo.cluster.local"],
            "a generic client asking for Envoy's types gets Envoy secrets: {:?}",
            private_key_owners(&secrets)
        );
    }

    // An endpoint leaves httpbin: curl's Envoy, connected all along, gets the new EDS.
    let eds_before = eventually(CONVERGE, || async {
        mesh.demo
            .controller
            .in_sync_version(&uuid, EDS)
            .await?
            .context("curl's EDS not in sync")
    })
    .await?;
    let v2_endpoint = format!(
        "  - ip: 127.0.{subnet}.2\n    targetRef: {{kind: Pod, name: httpbin-v2, namespace: demo}}\n"
    );
    edit_manifest(
        &mesh.demo.manifests.join("20-httpbin.yaml"),
        &v2_endpoint,
        "",
    )?;
    eventually(CONVERGE, || async {
        let now = mesh.demo.controller.in_sync_version(&uuid, EDS).await?;
        ensure!(
            now.is_some() && now.as_ref() != Some(&eds_before),
            "curl's EDS still at {eds_before} ({now:?})"
        );
        Ok(())
    })
    .await?;
    let metrics = mesh.demo.controller.metrics().await?;
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
    let curl = mesh.demo.pod("curl")?.clone();
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
        &mesh.demo.controller.state_dir.join("fsm-ca-bundle.pem"),
        &format!("{}{}", new_root.cert_pem(), new_root.key_pem().expose_pem()),
    )?;
    eventually(Duration::from_secs(45), || async {
        let (_, roots) = envoy_certs(mesh.envoy("curl")?).await?;
        if roots != [new_root_serial.clone()] {
            let out_of_sync: Vec<String> = mesh
                .demo
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
            let dir = mesh.demo.controller.ads().pod_dir("demo", "curl");
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
        &mesh.demo.controller.state_dir.join("fsm-ca-bundle.pem"),
        &format!("{}{}", expired.cert_pem(), expired.key_pem().expose_pem()),
    )?;
    eventually(CONVERGE, || async {
        let metrics = mesh.demo.controller.metrics().await?;
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
