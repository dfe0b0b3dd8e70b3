//! Egress passthrough (MeshConfig `enableEgress`) end to end, with curl's sidecar on each data
//! plane: a server outside the mesh (its own loopback address, no sidecar, not a Service) is
//! reached through curl's sidecar, which sends an HTTP request whose Host is `<ip>:<port>` to
//! that address in plaintext once egress is on, and answers 404 (no virtual host) while it is
//! off. A Host that is a name gets 503 (the mesh resolves no names for egress); a request
//! addressed to the sidecar itself does not go round again.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use fsm_integration_tests::{AdsMode, DemoMesh, Plane, eventually, http_get_via, start_demo_app};

const CONVERGE: Duration = Duration::from_secs(30);

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
    eventually(CONVERGE, || async {
        let reply = http_get_via(via, "httpbin.demo:14001", "/get").await?;
        ensure!(
            reply.status == 200,
            "the mesh is not up yet: {}",
            reply.status
        );
        Ok(())
    })
    .await?;
    let off = http_get_via(via, &host, "/get").await?;
    ensure!(off.status == 404, "egress off, yet {host} answered {off:?}");

    mesh.set_mesh_flag("enableEgress", true)?;
    let passed = eventually(CONVERGE, || async {
        let reply = http_get_via(via, &host, "/get").await?;
        ensure!(reply.status == 200, "GET via passthrough: {}", reply.status);
        Ok(reply)
    })
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
    eventually(CONVERGE, || async {
        let reply = http_get_via(via, &host, "/get").await?;
        ensure!(
            reply.status == 404,
            "egress off again, yet {}",
            reply.status
        );
        Ok(())
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_passthrough_follows_mesh_config_on_each_data_plane() {
    for (plane, subnet) in [Plane::Envoy, Plane::FsmSidecar].into_iter().zip(80..) {
        if let Err(err) = egress(plane, subnet).await {
            panic!("{plane:?}: {err:#}");
        }
    }
}
