//! IngressBackend end to end, on each data plane as the server's sidecar: a client outside the
//! mesh (an "ingress controller" on its own loopback address, no sidecar, plaintext HTTP) sends
//! to httpbin-v1's sidecar, as iptables would deliver it in a cluster (here, explicitly, to the
//! sidecar's inbound port with httpbin's Host).
//!
//! Without an IngressBackend the sidecar refuses it (its inbound port takes mTLS from mesh peers
//! only). An IngressBackend naming httpbin's pod port admits its `IPRange` source and the
//! endpoints of its `Service` source (an ingress controller's Service in a namespace outside the
//! mesh); any other address stays refused, and so does everyone once the IngressBackend is gone.
//! An AccessControl without backends then admits its own source to every service of the
//! namespace.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use fsm_integration_tests::{AdsMode, DemoMesh, Plane, eventually, http_get_from};

const CONVERGE: Duration = Duration::from_secs(30);
const HTTPBIN: &str = "httpbin.demo:14001";

/// The ingress controller's Service, outside the mesh, with one endpoint at `.202`.
fn ingress_controller(subnet: u8) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: ingress}}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: ingress-nginx, namespace: ingress}}\nspec:\n  clusterIP: 10.96.9.1\n  selector: {{app: ingress-nginx}}\n  ports: [{{name: http, port: 80}}]\n---\napiVersion: v1\nkind: Endpoints\nmetadata: {{name: ingress-nginx, namespace: ingress}}\nsubsets: [{{addresses: [{{ip: 127.0.{subnet}.202}}], ports: [{{name: http, port: 80}}]}}]\n"
    )
}

fn ingress_backend(subnet: u8) -> String {
    format!(
        "apiVersion: policy.flomesh.io/v1alpha1\nkind: IngressBackend\nmetadata: {{name: httpbin, namespace: demo}}\nspec:\n  backends: [{{name: httpbin, port: {{number: 14001, protocol: http}}}}]\n  sources:\n  - {{kind: IPRange, name: 127.0.{subnet}.200/32}}\n  - {{kind: Service, name: ingress-nginx, namespace: ingress}}\n"
    )
}

/// Whether a GET from `from` gets httpbin-v1's answer.
async fn admitted(from: IpAddr, via: SocketAddr) -> bool {
    http_get_from(from, via, HTTPBIN, "/get")
        .await
        .is_ok_and(|r| r.status == 200 && r.served_by() == Some("httpbin-v1"))
}

async fn until(from: IpAddr, via: SocketAddr, want: bool) -> Result<()> {
    eventually(CONVERGE, || async {
        ensure!(
            admitted(from, via).await == want,
            "{from} admitted: not {want} yet"
        );
        Ok(())
    })
    .await
    .with_context(|| format!("{from} never {}", if want { "admitted" } else { "refused" }))
}

async fn ingress(servers: Plane, subnet: u8) -> Result<()> {
    let mesh = DemoMesh::start_edited(subnet, |manifests| {
        std::fs::write(
            manifests.join("15-ingress-controller.yaml"),
            ingress_controller(subnet),
        )?;
        Ok(())
    })
    .await?;
    let _sidecars = mesh
        .start_sidecars(|_| servers, AdsMode::Sotw, CONVERGE)
        .await?;
    let via = mesh.pod("httpbin-v1")?.inbound_addr();
    let source = |last: u8| IpAddr::from([127, 0, subnet, last]);
    let (range, service, other) = (source(200), source(202), source(201));

    // No IngressBackend: plaintext from outside the mesh is refused.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for from in [range, service, other] {
        ensure!(
            !admitted(from, via).await,
            "{from} admitted without an IngressBackend"
        );
    }

    let file = mesh.manifests.join("60-ingress-backend.yaml");
    std::fs::write(&file, ingress_backend(subnet))?;
    until(range, via, true).await?;
    until(service, via, true).await?;
    ensure!(
        !admitted(other, via).await,
        "{other} is not a source, yet admitted"
    );

    std::fs::remove_file(&file)?;
    until(range, via, false).await?;
    ensure!(
        !admitted(service, via).await,
        "{service} admitted after the IngressBackend went"
    );

    // An AccessControl without backends: every HTTP port of the namespace admits its source.
    std::fs::write(
        mesh.manifests.join("61-access-control.yaml"),
        format!(
            "apiVersion: policy.flomesh.io/v1alpha1\nkind: AccessControl\nmetadata: {{name: office, namespace: demo}}\nspec:\n  sources: [{{kind: IPRange, name: 127.0.{subnet}.201/32}}]\n"
        ),
    )?;
    until(other, via, true).await?;
    ensure!(
        !admitted(range, via).await,
        "{range} admitted by the AccessControl"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingress_backends_and_access_controls_admit_their_sources_only_on_each_data_plane() {
    for (plane, subnet) in [Plane::Envoy, Plane::FsmSidecar].into_iter().zip(78..) {
        if let Err(err) = ingress(plane, subnet).await {
            panic!("{plane:?}: {err:#}");
        }
    }
}
