//! SMI end to end, with real sidecars in all four pairings of client and server data plane
//! (Envoy and fsm-sidecar each side), which must all see the same.
//!
//! Access: the demo mesh starts permissive; turning MeshConfig
//! `enablePermissiveTrafficPolicyMode` off denies curl's requests (403) and connections; a
//! TrafficTarget with an HTTPRouteGroup and a TCPRoute lets curl's service account in again, for
//! the matched routes only; turning permissive mode back on admits everything. Nothing restarts: the manifests change under the running mesh.
//!
//! How a denial shows: HTTP gets 403 from the server's sidecar (Envoy: per-route RBAC, body
//! "RBAC: access denied"; fsm-sidecar: its route's allowed identities, the same answer). TCP
//! between sidecars runs in an HTTP/2 CONNECT tunnel to the server's sidecar, which answers a
//! denied CONNECT with 403 (both data planes): the client's sidecar, which had accepted the
//! connection, closes it without a byte of the application's.
//!
//! TrafficSplit: httpbin's traffic moves between two version services (the demo's two pods)
//! 100/0, 50/50 and 0/100 as the split is edited, measured over the requests curl sends.
//!
//! Retry: httpbin fails one request in three (`/flaky/3`); once MeshConfig enables retry
//! policies and a Retry names curl's account and httpbin, curl sees none of the failures.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use fsm_integration_tests::{
    DemoMesh, PAIRINGS, Plane, Sidecar, eventually, http_get_via, share_served_by,
    split_share_matches, tcp_roundtrip, unavailable_count,
};

const CONVERGE: Duration = Duration::from_secs(30);
const HTTPBIN: &str = "httpbin.demo:14001";

async fn start_sidecars(mesh: &DemoMesh, client: Plane, servers: Plane) -> Result<Vec<Sidecar>> {
    mesh.start_client_and_servers(client, servers, CONVERGE)
        .await
}

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

async fn modes_switch_live(client: Plane, servers: Plane, subnet: u8) -> Result<()> {
    let mesh = DemoMesh::start(subnet).await?;
    let _sidecars = start_sidecars(&mesh, client, servers).await?;
    let curl = mesh.pod("curl")?;
    let via = curl.outbound_addr();
    let echo = SocketAddr::new(curl.ip, 9000);

    // Permissive: everything goes.
    until_status(via, "/get", 200).await?;
    until_status(via, "/status/418", 418).await?;
    eventually(CONVERGE, || tcp_roundtrip(echo, "open")).await?;

    // SMI mode without a TrafficTarget: denied, HTTP and TCP.
    mesh.set_mesh_flag("enablePermissiveTrafficPolicyMode", false)?;
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
    mesh.set_mesh_flag("enablePermissiveTrafficPolicyMode", true)?;
    until_status(via, "/status/418", 418).await?;
    until_status(via, "/get", 200).await?;
    Ok(())
}

/// A service per httpbin version (the demo's pods) and a split of httpbin over them.
fn split_manifests(subnet: u8, v1: u32, v2: u32) -> String {
    let version = |v: u8| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: httpbin-v{v}, namespace: demo}}\nspec:\n  clusterIP: 10.96.0.{}\n  selector: {{app: httpbin, version: v{v}}}\n  ports: [{{name: http, port: 14001, targetPort: 14001, appProtocol: http}}]\n---\napiVersion: v1\nkind: Endpoints\nmetadata: {{name: httpbin-v{v}, namespace: demo}}\nsubsets:\n- addresses: [{{ip: 127.0.{subnet}.{v}, targetRef: {{kind: Pod, name: httpbin-v{v}, namespace: demo}}}}]\n  ports: [{{name: http, port: 14001}}]\n---\n",
            20 + v
        )
    };
    format!(
        "{}{}apiVersion: split.smi-spec.io/v1alpha4\nkind: TrafficSplit\nmetadata: {{name: httpbin-split, namespace: demo}}\nspec:\n  service: httpbin.demo.svc.cluster.local\n  backends: [{{service: httpbin-v1, weight: {v1}}}, {{service: httpbin-v2, weight: {v2}}}]\n",
        version(1),
        version(2)
    )
}

async fn split_moves_traffic_live(client: Plane, servers: Plane, subnet: u8) -> Result<()> {
    let mesh = DemoMesh::start(subnet).await?;
    let _sidecars = start_sidecars(&mesh, client, servers).await?;
    let via = mesh.pod("curl")?.outbound_addr();
    until_status(via, "/get", 200).await?;
    let split = mesh.manifests.join("40-split.yaml");
    for (v1, v2, expected) in [(100, 0, 1.0), (50, 50, 0.5), (0, 100, 0.0)] {
        std::fs::write(&split, split_manifests(subnet, v1, v2))?;
        // Converged once a short run shows only the expected version (or, for 50/50, both).
        eventually(CONVERGE, || async {
            let share = share_served_by(via, HTTPBIN, "/get", "httpbin-v1", 20).await?;
            let converged = match expected {
                1.0 | 0.0 => share == expected,
                _ => share > 0.0 && share < 1.0,
            };
            ensure!(converged, "{v1}/{v2}: v1 served {share:.2} of 20");
            Ok(())
        })
        .await?;
        let share = share_served_by(via, HTTPBIN, "/get", "httpbin-v1", 1000).await?;
        ensure!(
            split_share_matches(share, expected, 1000),
            "{client:?} -> {servers:?} {v1}/{v2}: httpbin-v1 served {share:.3} of 1,000 requests"
        );
        eprintln!(
            "[split] {client:?} -> {servers:?} {v1}/{v2}: httpbin-v1 served {share:.3} of 1,000 requests"
        );
    }
    Ok(())
}

const RETRY: &str = r#"
apiVersion: policy.flomesh.io/v1alpha1
kind: Retry
metadata: {name: curl-to-httpbin, namespace: demo}
spec:
  source: {kind: ServiceAccount, name: curl, namespace: demo}
  destinations: [{kind: Service, name: httpbin, namespace: demo}]
  retryPolicy: {retryOn: 5xx, numRetries: 3, perTryTimeout: 2s, retryBackoffBaseInterval: 10ms}
"#;

async fn retry_hides_a_flaky_server(client: Plane, servers: Plane, subnet: u8) -> Result<()> {
    let mesh = DemoMesh::start(subnet).await?;
    let _sidecars = start_sidecars(&mesh, client, servers).await?;
    let via = mesh.pod("curl")?.outbound_addr();
    until_status(via, "/get", 200).await?;
    let failed = unavailable_count(via, HTTPBIN, "/flaky/3", 12).await?;
    ensure!(failed >= 3, "without retries {failed} of 12 failed");

    let mesh_config = mesh.manifests.join("00-mesh.yaml");
    let text = std::fs::read_to_string(&mesh_config)?;
    std::fs::write(
        &mesh_config,
        text.replacen(
            "  sidecar:\n",
            "  featureFlags:\n    enableRetryPolicy: true\n  sidecar:\n",
            1,
        ),
    )?;
    std::fs::write(mesh.manifests.join("40-retry.yaml"), RETRY)?;
    // Converged once a run of requests sees no failure; then none may fail.
    eventually(CONVERGE, || async {
        let failed = unavailable_count(via, HTTPBIN, "/flaky/3", 6).await?;
        ensure!(failed == 0, "{failed} of 6 failed");
        Ok(())
    })
    .await?;
    let failed = unavailable_count(via, HTTPBIN, "/flaky/3", 60).await?;
    ensure!(
        failed == 0,
        "{client:?} -> {servers:?}: {failed} of 60 failed with retries"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_hides_a_flaky_server_in_every_pairing() {
    for ((client, servers), subnet) in PAIRINGS.into_iter().zip(58..) {
        if let Err(err) = retry_hides_a_flaky_server(client, servers, subnet).await {
            panic!("client {client:?}, servers {servers:?}: {err:#}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_split_moves_traffic_live_in_every_pairing() {
    for ((client, servers), subnet) in PAIRINGS.into_iter().zip(54..) {
        if let Err(err) = split_moves_traffic_live(client, servers, subnet).await {
            panic!("client {client:?}, servers {servers:?}: {err:#}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissive_and_smi_modes_switch_live_in_every_pairing() {
    for ((client, servers), subnet) in PAIRINGS.into_iter().zip(50..) {
        if let Err(err) = modes_switch_live(client, servers, subnet).await {
            panic!("client {client:?}, servers {servers:?}: {err:#}");
        }
    }
}
