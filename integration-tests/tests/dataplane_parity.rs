//! Envoy and fsm-sidecar are interchangeable: the demo mesh runs with every combination of
//! client-side and server-side data plane (Envoy/Envoy, fsm-sidecar/fsm-sidecar and both mixes,
//! which also proves they interoperate on the wire: plain HTTP between sidecars and HTTP/2
//! CONNECT tunnels for TCP), and every run must observe the same status codes, backends, headers
//! and echoed bytes, at the mesh's edges too: egress to a server outside the mesh by an Egress
//! policy, and ingress from outside it by an IngressBackend.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use fsm_integration_tests::{
    AdsMode, AdsTarget, DemoMesh, FsmSidecarConfig, MeshPod, SidecarConfig, eventually,
    http_get_from, http_get_via, localhost_get_egress_policy, start_envoy, start_fsm_sidecar,
    start_localhost_server, tcp_roundtrip,
};

const CONVERGE: Duration = Duration::from_secs(30);
const HTTPBIN: &str = "httpbin.demo:14001";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Plane {
    Envoy,
    FsmSidecar,
}

/// Everything a client of the mesh can observe, data-plane specific headers left out.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Observed {
    backends: BTreeSet<String>,
    get: (u16, Option<String>, Option<String>),
    /// What the app saw: method, path and Host.
    echoed: (String, String, String),
    teapot: u16,
    unavailable: u16,
    unknown_host: u16,
    tcp: String,
    /// A GET to a server outside the mesh by name, which an Egress policy allows (status and
    /// who answered), and one to a path its route group leaves out.
    egress: (u16, Option<String>),
    egress_other_path: u16,
    /// A plaintext GET from outside the mesh that an IngressBackend admits: status and server.
    ingress: (u16, Option<String>),
}

/// An Egress policy letting curl GET `/get` from `localhost:<port>`, and an IngressBackend
/// admitting plaintext HTTP to httpbin from `ingress_ip`.
fn edge_policies(port: u16, ingress_ip: std::net::IpAddr) -> String {
    let egress = localhost_get_egress_policy(port);
    format!(
        r#"{egress}---
apiVersion: policy.flomesh.io/v1alpha1
kind: IngressBackend
metadata: {{name: httpbin, namespace: demo}}
spec:
  backends: [{{name: httpbin, port: {{number: 14001, protocol: http}}}}]
  sources: [{{kind: IPRange, name: {ingress_ip}/32}}]
"#
    )
}

/// A sidecar of either kind, kept alive for the run.
enum Running {
    Envoy(#[allow(dead_code)] fsm_integration_tests::Envoy),
    Fsm(#[allow(dead_code)] fsm_integration_tests::FsmSidecar),
}

async fn start(plane: Plane, pod: &MeshPod, ads: &AdsTarget, logs: &Path) -> Result<Running> {
    Ok(match plane {
        Plane::Envoy => {
            let mut e =
                start_envoy(&SidecarConfig::for_pod(pod, ads, AdsMode::Sotw)?, logs).await?;
            e.wait_ready(CONVERGE).await?;
            Running::Envoy(e)
        }
        Plane::FsmSidecar => {
            let mut s =
                start_fsm_sidecar(&FsmSidecarConfig::for_pod(pod, ads, AdsMode::Sotw)?, logs)
                    .await?;
            s.wait_ready(CONVERGE).await?;
            Running::Fsm(s)
        }
    })
}

async fn observe(client: Plane, servers: Plane, subnet: u8) -> Result<Observed> {
    // Bound in the order the processes should outlive each other: `_work` is dropped last.
    let DemoMesh {
        work: _work,
        logs,
        manifests,
        controller,
        apps: _apps,
        pods,
    } = DemoMesh::start(subnet).await?;
    let (port, _external) = start_localhost_server("external", &logs).await?;
    let ingress_ip = std::net::IpAddr::from([127, 0, subnet, 200]);
    std::fs::write(
        manifests.join("70-edges.yaml"),
        edge_policies(port, ingress_ip),
    )?;
    let mut running = Vec::new();
    for pod in &pods {
        let plane = if pod.name == "curl" { client } else { servers };
        running.push(
            start(plane, pod, &controller.ads(), &logs)
                .await
                .with_context(|| format!("{plane:?} sidecar of {}", pod.id()))?,
        );
    }
    let curl = pods.iter().find(|p| p.name == "curl").context("curl pod")?;
    let via = curl.outbound_addr();

    let backends = eventually(CONVERGE, || async {
        let mut seen = BTreeSet::new();
        for _ in 0..6 {
            let r = http_get_via(via, HTTPBIN, "/get").await?;
            ensure!(r.status == 200, "status {} {}", r.status, r.body);
            seen.insert(r.served_by().context("x-served-by")?.to_string());
        }
        ensure!(seen.len() == 2, "round robin not over both yet: {seen:?}");
        Ok(seen)
    })
    .await?;
    let r = http_get_via(via, HTTPBIN, "/get").await?;
    let body = r.json()?;
    let text = |k: &str| body[k].as_str().unwrap_or_default().to_string();
    let observed = Observed {
        backends,
        get: (
            r.status,
            r.header("content-type").map(str::to_string),
            r.served_by()
                .map(|s| s.trim_end_matches(['1', '2']).to_string()),
        ),
        echoed: (text("method"), text("path"), text("host")),
        teapot: http_get_via(via, HTTPBIN, "/status/418").await?.status,
        unavailable: http_get_via(via, HTTPBIN, "/status/503").await?.status,
        unknown_host: http_get_via(via, "nowhere.demo:80", "/").await?.status,
        tcp: eventually(CONVERGE, || {
            tcp_roundtrip(SocketAddr::new(curl.ip, 9000), "parity")
        })
        .await?,
        egress: eventually(CONVERGE, || async {
            let r = http_get_via(via, &format!("localhost:{port}"), "/get").await?;
            ensure!(r.status == 200, "egress: {}", r.status);
            Ok((r.status, r.served_by().map(str::to_string)))
        })
        .await?,
        egress_other_path: http_get_via(via, &format!("localhost:{port}"), "/status/200")
            .await?
            .status,
        ingress: eventually(CONVERGE, || async {
            let server = pods
                .iter()
                .find(|p| p.name == "httpbin-v1")
                .context("httpbin-v1 pod")?;
            let r = http_get_from(ingress_ip, server.inbound_addr(), HTTPBIN, "/get").await?;
            ensure!(r.status == 200, "ingress: {}", r.status);
            Ok((r.status, r.served_by().map(str::to_string)))
        })
        .await?,
    };
    drop(running);
    Ok(observed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_and_fsm_sidecar_behave_the_same() {
    let runs = [
        (Plane::Envoy, Plane::Envoy, 17),
        (Plane::FsmSidecar, Plane::FsmSidecar, 18),
        (Plane::Envoy, Plane::FsmSidecar, 19),
        (Plane::FsmSidecar, Plane::Envoy, 20),
    ];
    let mut results = Vec::new();
    for (client, servers, subnet) in runs {
        match observe(client, servers, subnet).await {
            Ok(o) => results.push(((client, servers), o)),
            Err(e) => panic!("client {client:?}, servers {servers:?}: {e:#}"),
        }
    }
    let (reference_planes, reference) = &results[0];
    for (planes, observed) in &results[1..] {
        assert_eq!(
            observed, reference,
            "{planes:?} differs from {reference_planes:?}"
        );
    }
    assert_eq!(reference.get.0, 200);
    assert_eq!(reference.teapot, 418);
    assert_eq!(reference.unavailable, 503);
    assert_eq!(reference.unknown_host, 404);
    assert_eq!(reference.tcp, "tcp-echo-1: parity");
    assert_eq!(reference.egress, (200, Some("external".to_string())));
    assert_eq!(reference.egress_other_path, 404);
    assert_eq!(reference.ingress, (200, Some("httpbin-v1".to_string())));
}
