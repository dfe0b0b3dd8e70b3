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
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use fsm_integration_tests::{
    AdsMode, Controller, DemoMesh, ManagedProcess, MeshPod, ProbeClient, SecretsWait, eventually,
    fetch_secrets, http_get_ok_via, probe, tls_certificate, xds_node,
};

const CONVERGE: Duration = Duration::from_secs(30);
const HTTPBIN: &str = "httpbin.demo:14001";
/// The name a TLS client of httpbin's inbound port asks for.
const HTTPBIN_SNI: &str = "httpbin.demo.svc.cluster.local";

#[derive(Clone, Copy, Debug)]
enum DataPlane {
    Envoy,
    FsmSidecar,
}

/// The demo mesh with a sidecar per meshed pod; dropping it stops everything.
struct Mesh {
    /// Each sidecar's process by pod, stopped on drop (before the control plane).
    sidecars: Vec<(String, ManagedProcess)>,
    demo: DemoMesh,
}

impl Mesh {
    async fn start(subnet: u8, plane: DataPlane) -> Result<Mesh> {
        let demo = DemoMesh::start(subnet).await?;
        let sidecars = match plane {
            DataPlane::Envoy => (demo.start_envoys(AdsMode::Sotw, CONVERGE).await?)
                .into_iter()
                .map(|(pod, envoy)| (pod.id(), envoy.process))
                .collect(),
            DataPlane::FsmSidecar => (demo.start_fsm_sidecars(AdsMode::Sotw, CONVERGE).await?)
                .into_iter()
                .map(|(pod, sidecar)| (pod.id(), sidecar.process))
                .collect(),
        };
        Ok(Mesh { sidecars, demo })
    }

    fn print_sidecar_logs(&self) {
        for (pod, process) in &self.sidecars {
            eprintln!("--- sidecar of {pod}:\n{}", process.log_tail(20));
        }
    }
}

async fn get_httpbin(curl: &MeshPod) -> Result<()> {
    http_get_ok_via(curl.outbound_addr(), HTTPBIN, "/get").await?;
    Ok(())
}

/// Sends `GET /get` to `addr` over TLS with the client certificate `chain` and `key` (PEM), and
/// returns what came back before the connection closed ("" when the handshake was refused).
async fn probe_with(addr: SocketAddr, chain: &str, key: &str) -> Result<String> {
    probe(
        addr,
        HTTPBIN,
        HTTPBIN_SNI,
        ProbeClient::Certificate { chain, key },
    )
    .await
}

/// Asks for curl's secrets with the credentials in `dir`, announcing `node_id` as an Envoy.
async fn fetch_secrets_with(
    controller: &Controller,
    dir: &Path,
    node_id: &str,
) -> Result<std::result::Result<Vec<Secret>, tonic::Status>> {
    let node = xds_node(node_id, "cert-purpose", "envoy");
    fetch_secrets(
        controller.ads_addr,
        dir,
        node,
        SecretsWait::FirstWithSecrets,
    )
    .await
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
    let curl = mesh.demo.pod("curl")?.clone();
    let httpbin = mesh.demo.pod("httpbin-v1")?.clone();
    let curl_node = curl.node_id().context("curl's node id")?;

    // Service certificates still work: curl's request crosses both Envoys over mTLS.
    eventually(CONVERGE, || get_httpbin(&curl)).await?;

    // curl's bootstrap certificate, as the controller wrote it for curl's Envoy.
    let curl_dir = mesh
        .demo
        .controller
        .ads()
        .pod_dir(&curl.namespace, &curl.name);
    let read = |name: &str| {
        std::fs::read_to_string(curl_dir.join(name))
            .with_context(|| format!("{}", curl_dir.join(name).display()))
    };
    let (bootstrap_chain, bootstrap_key) = (read("tls.crt")?, read("tls.key")?);

    // The ADS server gives it curl's service certificate (its purpose)…
    let secrets = fetch_secrets_with(&mesh.demo.controller, &curl_dir, &curl_node)
        .await?
        .map_err(|s| anyhow::anyhow!("curl's bootstrap certificate refused by ADS: {s}"))?;
    let (service_chain, service_key) = tls_certificate(&secrets, "service-cert")?;

    // …and at httpbin's meshed inbound port the service certificate is answered, the bootstrap
    // certificate is not.
    let inbound = httpbin.inbound_addr();
    let served = probe_with(inbound, &service_chain, &service_key).await?;
    ensure!(
        served.starts_with("HTTP/1.1 200"),
        "curl's service certificate was not served at {inbound}: {served:?}"
    );
    let refused = probe_with(inbound, &bootstrap_chain, &bootstrap_key).await?;
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
    match fetch_secrets_with(&mesh.demo.controller, as_service.path(), &curl_node).await? {
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
