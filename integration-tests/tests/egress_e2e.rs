//! Egress end to end, with the client's sidecar on each data plane.
//!
//! Passthrough (MeshConfig `enableEgress`): a server outside the mesh (its own loopback address,
//! no sidecar, not a Service) is
//! reached through curl's sidecar, which sends an HTTP request whose Host is `<ip>:<port>` to
//! that address in plaintext once egress is on, and answers 404 (no virtual host) while it is
//! off. A Host that is a name gets 503 (the mesh resolves no names for egress); a request
//! addressed to the sidecar itself does not go round again.
//!
//! Egress policies (`featureFlags.enableEgressPolicy`, passthrough off): a server outside the
//! mesh by name (`localhost`, which every resolver knows; the server has 127.0.0.1 to itself on
//! a port of its own) is reached by the service account the policy names, on the routes its
//! HTTPRouteGroup allows, and by nobody once the policy is gone.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use fsm_integration_tests::{
    AdsMode, DemoMesh, HttpReply, Plane, eventually, http_get_via, localhost_get_egress_policy,
    start_demo_app, start_localhost_server,
};

const CONVERGE: Duration = Duration::from_secs(30);

/// The reply to `GET <path>` with Host `host` through the sidecar at `via`, once it is `status`.
async fn until_status(via: SocketAddr, host: &str, path: &str, status: u16) -> Result<HttpReply> {
    eventually(CONVERGE, || async {
        let reply = http_get_via(via, host, path).await?;
        ensure!(
            reply.status == status,
            "GET {host}{path}: {}, waiting for {status}",
            reply.status
        );
        Ok(reply)
    })
    .await
}

async fn egress(client: Plane, subnet: u8) -> Result<()> {
    let mesh = DemoMesh::start(subnet).await?;
    let _sidecars = mesh
        .start_sidecars(
            |pod| {
                if pod.name == "curl" {
                    client
                } else {
                    Plane::Envoy
                }
            },
            AdsMode::Sotw,
            CONVERGE,
        )
        .await?;
    let external: SocketAddr = format!("127.0.{subnet}.250:8080").parse()?;
    let _external = start_demo_app("external", &[external], &[], &mesh.logs).await?;
    let via = mesh.pod("curl")?.outbound_addr();
    let host = external.to_string();

    // Off: curl's sidecar knows no such host.
    until_status(via, "httpbin.demo:14001", "/get", 200).await?;
    let off = http_get_via(via, &host, "/get").await?;
    ensure!(off.status == 404, "egress off, yet {host} answered {off:?}");

    mesh.set_mesh_flag("enableEgress", true)?;
    let passed = until_status(via, &host, "/get", 200)
        .await
        .context("egress never passed through")?;
    ensure!(
        passed.served_by() == Some("external"),
        "answered by {:?}",
        passed.served_by()
    );
    // Services still go to the mesh.
    let mesh_reply = http_get_via(via, "httpbin.demo:14001", "/get").await?;
    ensure!(
        mesh_reply.status == 200 && mesh_reply.served_by() != Some("external"),
        "{mesh_reply:?}"
    );
    let named = http_get_via(via, "example.com", "/get").await?;
    ensure!(named.status == 503, "a named host: {named:?}");
    let looped = http_get_via(via, &via.to_string(), "/get").await?;
    ensure!(looped.status == 503, "the sidecar itself: {looped:?}");

    mesh.set_mesh_flag("enableEgress", false)?;
    until_status(via, &host, "/get", 404)
        .await
        .context("egress off again")?;
    Ok(())
}

async fn egress_policy_on(client: Plane, subnet: u8) -> Result<()> {
    let mesh = DemoMesh::start(subnet).await?;
    let _sidecars = mesh
        .start_sidecars(|_| client, AdsMode::Sotw, CONVERGE)
        .await?;
    let (port, _external) = start_localhost_server("external", &mesh.logs).await?;
    let external = SocketAddr::from(([127, 0, 0, 1], port));
    let curl = mesh.pod("curl")?.outbound_addr();
    let other = mesh.pod("httpbin-v1")?.outbound_addr();
    let host = format!("localhost:{port}");
    until_status(curl, "httpbin.demo:14001", "/get", 200).await?;
    let before = http_get_via(curl, &host, "/get").await?;
    ensure!(
        before.status == 404,
        "no policy yet, {host} answered {before:?}"
    );

    let file = mesh.manifests.join("70-egress.yaml");
    std::fs::write(&file, localhost_get_egress_policy(port))?;
    let allowed = until_status(curl, &host, "/get", 200)
        .await
        .context("the Egress policy never let curl out")?;
    ensure!(
        allowed.served_by() == Some("external"),
        "answered by {:?}",
        allowed.served_by()
    );
    let path = http_get_via(curl, &host, "/status/200").await?;
    ensure!(
        path.status == 404,
        "a path the route group leaves out: {path:?}"
    );
    let by_address = http_get_via(curl, &external.to_string(), "/get").await?;
    ensure!(
        by_address.status == 404,
        "the address, not the host: {by_address:?}"
    );
    let not_source = http_get_via(other, &host, "/get").await?;
    ensure!(
        not_source.status == 404,
        "httpbin is not a source: {not_source:?}"
    );

    std::fs::remove_file(&file)?;
    until_status(curl, &host, "/get", 404)
        .await
        .context("the Egress policy is gone")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_policies_let_their_sources_reach_their_hosts_on_each_data_plane() {
    for (plane, subnet) in [Plane::Envoy, Plane::FsmSidecar].into_iter().zip(82..) {
        if let Err(err) = egress_policy_on(plane, subnet).await {
            panic!("{plane:?}: {err:#}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_passthrough_follows_mesh_config_on_each_data_plane() {
    for (plane, subnet) in [Plane::Envoy, Plane::FsmSidecar].into_iter().zip(80..) {
        if let Err(err) = egress(plane, subnet).await {
            panic!("{plane:?}: {err:#}");
        }
    }
}
