//! SMI access end to end, with real sidecars on both sides (Envoy, then fsm-sidecar): the demo
//! mesh starts permissive; turning MeshConfig `enablePermissiveTrafficPolicyMode` off denies
//! curl's requests (403) and connections; a TrafficTarget with an HTTPRouteGroup and a TCPRoute
//! lets curl's service account in again, for the matched routes only; turning permissive mode
//! back on admits everything. Nothing restarts: the manifests change under the running mesh.
//!
//! How a denial shows: HTTP gets 403 from the server's sidecar (Envoy: per-route RBAC, body
//! "RBAC: access denied"; fsm-sidecar: its route's allowed identities); a TCP connection is
//! accepted by the client's sidecar and closed by the server's without a byte of the
//! application's (Envoy: the RBAC network filter; fsm-sidecar: the tunnel is refused), so the
//! client sees the connection end without an answer.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use fsm_integration_tests::{AdsMode, DemoMesh, eventually, http_get_via, tcp_roundtrip};

const CONVERGE: Duration = Duration::from_secs(30);
const HTTPBIN: &str = "httpbin.demo:14001";

/// curl may GET `/get` from httpbin and talk to tcp-echo's port 9000; nothing else.
const ACCESS: &str = r#"
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {name: httpbin-routes, namespace: demo}
spec:
  matches:
  - {name: get, pathRegex: /get, methods: [GET]}
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: curl-to-httpbin, namespace: demo}
spec:
  destination: {kind: ServiceAccount, name: httpbin, namespace: demo}
  sources: [{kind: ServiceAccount, name: curl, namespace: demo}]
  rules: [{kind: HTTPRouteGroup, name: httpbin-routes, matches: [get]}]
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: TCPRoute
metadata: {name: echo, namespace: demo}
spec:
  matches: {ports: [9000]}
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: curl-to-tcp-echo, namespace: demo}
spec:
  destination: {kind: ServiceAccount, name: tcp-echo, namespace: demo}
  sources: [{kind: ServiceAccount, name: curl, namespace: demo}]
  rules: [{kind: TCPRoute, name: echo}]
"#;

fn set_permissive(manifests: &Path, permissive: bool) -> Result<()> {
    let path = manifests.join("00-mesh.yaml");
    let text = std::fs::read_to_string(&path)?;
    let (from, to) = if permissive {
        ("false", "true")
    } else {
        ("true", "false")
    };
    let edited = text.replace(
        &format!("enablePermissiveTrafficPolicyMode: {from}"),
        &format!("enablePermissiveTrafficPolicyMode: {to}"),
    );
    ensure!(edited != text, "MeshConfig already permissive={permissive}");
    std::fs::write(&path, edited)?;
    Ok(())
}

async fn status(via: SocketAddr, path: &str) -> Result<u16> {
    Ok(http_get_via(via, HTTPBIN, path).await?.status)
}

/// Waits until `path` answers `expected`.
async fn until_status(via: SocketAddr, path: &str, expected: u16) -> Result<()> {
    eventually(CONVERGE, || async {
        let got = status(via, path).await?;
        ensure!(got == expected, "GET {path}: {got}, waiting for {expected}");
        Ok(())
    })
    .await
    .with_context(|| format!("GET {path} never answered {expected}"))
}

async fn modes_switch_live(plane: &str, subnet: u8) -> Result<()> {
    let mesh = DemoMesh::start(subnet).await?;
    // Kept alive for the run.
    let _sidecars: (Vec<_>, Vec<_>) = match plane {
        "envoy" => (mesh.start_envoys(AdsMode::Sotw, CONVERGE).await?, vec![]),
        _ => (
            vec![],
            mesh.start_fsm_sidecars(AdsMode::Sotw, CONVERGE).await?,
        ),
    };
    let curl = mesh.pod("curl")?;
    let via = curl.outbound_addr();
    let echo = SocketAddr::new(curl.ip, 9000);

    // Permissive: everything goes.
    until_status(via, "/get", 200).await?;
    until_status(via, "/status/418", 418).await?;
    eventually(CONVERGE, || tcp_roundtrip(echo, "open")).await?;

    // SMI mode without a TrafficTarget: denied, HTTP and TCP.
    set_permissive(&mesh.manifests, false)?;
    until_status(via, "/get", 403).await?;
    ensure!(status(via, "/status/418").await? == 403);
    let denied = http_get_via(via, HTTPBIN, "/get").await?;
    ensure!(
        denied.status == 403 && denied.served_by().is_none(),
        "the server's sidecar answers, not the application: {denied:?}"
    );
    eventually(CONVERGE, || async {
        match tcp_roundtrip(echo, "closed").await {
            Ok(reply) => anyhow::bail!("tcp-echo still answers: {reply}"),
            Err(_) => Ok(()),
        }
    })
    .await?;

    // A TrafficTarget lets curl in, for the routes it names only.
    std::fs::write(mesh.manifests.join("40-access.yaml"), ACCESS)?;
    until_status(via, "/get", 200).await?;
    ensure!(
        status(via, "/status/418").await? == 403,
        "a path outside the route group stays denied"
    );
    let reply = eventually(CONVERGE, || tcp_roundtrip(echo, "allowed")).await?;
    ensure!(reply == "tcp-echo-1: allowed", "{reply}");

    // Permissive again: the route group no longer limits anything.
    set_permissive(&mesh.manifests, true)?;
    until_status(via, "/status/418", 418).await?;
    until_status(via, "/get", 200).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissive_and_smi_modes_switch_live_with_envoy() {
    if let Err(err) = modes_switch_live("envoy", 52).await {
        panic!("{err:#}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissive_and_smi_modes_switch_live_with_fsm_sidecar() {
    if let Err(err) = modes_switch_live("fsm-sidecar", 53).await {
        panic!("{err:#}");
    }
}
