//! The demo workloads: one `fsm-demo-app` per pod, bound to the pod's own loopback address.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use fsm_catalog::Catalog;

use crate::mesh::{AppProtocol, mesh_pods};
use crate::{ManagedProcess, binary};

const START_TIMEOUT: Duration = Duration::from_secs(10);

/// What `fsm-demo-app` logs once every listener is bound.
pub const READY_LINE: &str = ": ready on all addresses";

/// Starts `fsm-demo-app` serving HTTP on `http` and the line echo on `tcp`, and waits until it has
/// bound every address.
pub async fn start_demo_app(
    name: &str,
    http: &[SocketAddr],
    tcp: &[SocketAddr],
    log_dir: &Path,
) -> Result<ManagedProcess> {
    let mut command = Command::new(binary("fsm-demo-app")?);
    command.arg("--name").arg(name);
    for addr in http {
        command.arg("--http").arg(addr.to_string());
    }
    for addr in tcp {
        command.arg("--tcp").arg(addr.to_string());
    }
    let mut process = ManagedProcess::spawn(&format!("app-{name}"), command, log_dir)?;
    process.wait_for_log(READY_LINE, START_TIMEOUT).await?;
    Ok(process)
}

/// Starts an HTTP server outside the mesh, named `name`, on a free port of 127.0.0.1: where the
/// host name `localhost`, which every resolver knows, leads. Returns the port and the server.
pub async fn start_localhost_server(name: &str, log_dir: &Path) -> Result<(u16, ManagedProcess)> {
    let port = crate::free_port()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    Ok((port, start_demo_app(name, &[addr], &[], log_dir).await?))
}

/// An Egress policy (with its HTTPRouteGroup) letting the demo's curl send GETs of `/get`, and
/// nothing else, to `localhost:<port>`.
pub fn localhost_get_egress_policy(port: u16) -> String {
    format!(
        r#"apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {{name: external-get, namespace: demo}}
spec:
  matches: [{{name: get, pathRegex: /get, methods: [GET]}}]
---
apiVersion: policy.flomesh.io/v1alpha1
kind: Egress
metadata: {{name: external, namespace: demo}}
spec:
  sources: [{{kind: ServiceAccount, name: curl, namespace: demo}}]
  hosts: [localhost]
  ports: [{{number: {port}, protocol: http}}]
  matches: [{{apiGroup: specs.smi-spec.io/v1alpha4, kind: HTTPRouteGroup, name: external-get}}]
"#
    )
}

/// Starts one demo app per pod with container ports, named after the pod: TCP echo on ports a
/// Service marks `appProtocol: tcp`, HTTP on the others. Pods without ports (clients) get none.
pub async fn start_demo_apps(catalog: &Catalog, log_dir: &Path) -> Result<Vec<ManagedProcess>> {
    let mut apps = Vec::new();
    for pod in mesh_pods(catalog)
        .into_iter()
        .filter(|p| !p.ports.is_empty())
    {
        let addrs = |protocol| -> Vec<SocketAddr> {
            pod.ports
                .iter()
                .filter(|p| p.protocol == protocol)
                .map(|p| SocketAddr::new(pod.ip, p.port))
                .collect()
        };
        apps.push(
            start_demo_app(
                &pod.name,
                &addrs(AppProtocol::Http),
                &addrs(AppProtocol::Tcp),
                log_dir,
            )
            .await?,
        );
    }
    Ok(apps)
}
