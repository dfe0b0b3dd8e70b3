//! What the harness needs to know about a manifest directory: its pods, their addresses, ports and
//! sidecars. Decoding goes through `fsm-catalog`, so the harness and the control plane read the
//! same manifests the same way.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use anyhow::{Context, Result, bail};
use fsm_catalog::{Catalog, CatalogSettings, Kind, PodRecord, Workload, decode_manifests};

/// Sidecar admin port (FSM's Envoy admin port).
pub const ADMIN_PORT: u16 = 15000;
/// Sidecar outbound HTTP listener the app sends requests to in explicit mode.
pub const OUTBOUND_PORT: u16 = 15001;
/// Sidecar inbound listener in front of the app.
pub const INBOUND_PORT: u16 = 15003;

/// How a demo app serves one container port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum AppProtocol {
    Http,
    Tcp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct AppPort {
    pub port: u16,
    pub protocol: AppProtocol,
}

/// One pod of the manifests, reduced to what the harness starts and addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshPod {
    pub namespace: String,
    pub name: String,
    /// `status.podIP`: the loopback address its app and sidecar bind.
    pub ip: IpAddr,
    pub service_account: String,
    /// From the pod's owner references, by the rule the control plane names endpoints with, so
    /// a sidecar's `source_*` labels match other sidecars' `destination_*` labels.
    pub workload: Workload,
    pub proxy_uuid: Option<String>,
    /// In a monitored namespace, injection not disabled, and carrying a proxy UUID.
    pub has_sidecar: bool,
    /// Container ports, sorted.
    pub ports: Vec<AppPort>,
}

// === MeshPod ===

impl MeshPod {
    /// Envoy `node.id`: `<uuid>.sidecar.<service account>.<namespace>`, FSM's format, from which
    /// the control plane finds the pod.
    pub fn node_id(&self) -> Option<String> {
        let uuid = self.proxy_uuid.as_deref()?;
        Some(format!(
            "{uuid}.sidecar.{}.{}",
            self.service_account, self.namespace
        ))
    }

    /// Envoy `node.cluster`: `<service account>.<namespace>`.
    pub fn node_cluster(&self) -> String {
        format!("{}.{}", self.service_account, self.namespace)
    }

    pub fn admin_addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, ADMIN_PORT)
    }

    pub fn outbound_addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, OUTBOUND_PORT)
    }

    pub fn inbound_addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, INBOUND_PORT)
    }

    /// `namespace/name`, for logs and log file names.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

// === free functions ===

/// Replaces the first `from` in the file with `to`, writing a temporary file and renaming it as
/// editors do, so a watcher never sees a half-written file.
pub fn edit_manifest(path: &Path, from: &str, to: &str) -> Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    anyhow::ensure!(
        text.contains(from),
        "{} does not contain {from:?}",
        path.display()
    );
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, text.replacen(from, to, 1))?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Copies examples/demo into `out` with every 127.0.10.x address moved to 127.0.<subnet>.x, so
/// tests running at the same time each have their own pod addresses.
pub fn demo_manifests(out: &Path, subnet: u8) -> Result<std::path::PathBuf> {
    example_manifests("demo", out, subnet)
}

/// [`demo_manifests`] for the manifest set examples/`example`.
pub fn example_manifests(example: &str, out: &Path, subnet: u8) -> Result<std::path::PathBuf> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let examples = crate::repo_root().join("examples").join(example);
    for entry in
        std::fs::read_dir(&examples).with_context(|| format!("reading {}", examples.display()))?
    {
        let path = entry?.path();
        let text = std::fs::read_to_string(&path)?;
        std::fs::write(
            out.join(path.file_name().context("file name")?),
            text.replace("127.0.10.", &format!("127.0.{subnet}.")),
        )?;
    }
    Ok(out.to_path_buf())
}

/// Turns MeshConfig `spec.observability.enableDebugServer` on in `dir`'s `00-mesh.yaml`: what a
/// test (or the demo) that reads the controller's `/debug/*` endpoints asks of its mesh, since
/// FSM keeps them off by default.
pub fn enable_debug_server(dir: &Path) -> Result<()> {
    let path = dir.join("00-mesh.yaml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    if text.contains("enableDebugServer: true") {
        return Ok(());
    }
    let at = text
        .find("kind: MeshConfig")
        .with_context(|| format!("no MeshConfig in {}", path.display()))?;
    let (before, config) = text.split_at(at);
    let edited = if config.contains("enableDebugServer: false") {
        config.replacen("enableDebugServer: false", "enableDebugServer: true", 1)
    } else if config.contains("\n  observability:\n") {
        config.replacen(
            "\n  observability:\n",
            "\n  observability:\n    enableDebugServer: true\n",
            1,
        )
    } else if config.contains("\nspec:\n") {
        config.replacen(
            "\nspec:\n",
            "\nspec:\n  observability:\n    enableDebugServer: true\n",
            1,
        )
    } else {
        anyhow::bail!("no spec in the MeshConfig of {}", path.display());
    };
    std::fs::write(&path, format!("{before}{edited}"))
        .with_context(|| format!("writing {}", path.display()))
}

/// Reads every `*.yaml`/`*.yml` file of `dir` (sorted, like the manifest source) into a catalog.
/// Any undecodable document is an error: a harness that silently skipped one would test a
/// different mesh than the control plane sees.
pub fn load_catalog(dir: &Path, settings: CatalogSettings) -> Result<Catalog> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading manifest directory {}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| {
            path.extension()
                .is_some_and(|ext| ext == "yaml" || ext == "yml")
        })
        .collect();
    files.sort();
    let mut catalog = Catalog::new(settings);
    let mut problems = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        let (objects, errors) = decode_manifests(&file.display().to_string(), &text);
        problems.extend(errors.iter().map(ToString::to_string));
        for object in objects {
            catalog.apply(object);
        }
    }
    if !problems.is_empty() {
        bail!(
            "manifests in {} do not decode:\n{}",
            dir.display(),
            problems.join("\n")
        );
    }
    Ok(catalog)
}

/// Every pod with a `status.podIP`, sorted by namespace and name.
pub fn mesh_pods(catalog: &Catalog) -> Vec<MeshPod> {
    catalog
        .keys()
        .filter(|key| key.kind == Kind::Pod)
        .filter_map(|key| {
            let pod = catalog.pod(&key.namespace, &key.name)?;
            to_mesh_pod(catalog, &key.namespace, &key.name, pod)
        })
        .collect()
}

fn to_mesh_pod(catalog: &Catalog, namespace: &str, name: &str, pod: &PodRecord) -> Option<MeshPod> {
    let ip = pod.ip()?;
    let service_account = pod.service_account().to_owned();
    let proxy_uuid = pod.proxy_uuid().map(str::to_owned);
    let services = catalog.services_selecting(pod);
    let mut ports: Vec<AppPort> = pod
        .container_ports()
        .iter()
        .filter_map(|cp| {
            let port = u16::try_from(cp.container_port).ok()?;
            // A port speaks TCP when a Service targeting it says so; HTTP is FSM's default.
            let is_tcp = services
                .iter()
                .flat_map(|svc| svc.ports())
                .filter(|sp| Catalog::target_port(sp, pod) == Some(port))
                .any(|sp| {
                    sp.app_protocol()
                        .is_some_and(|p| p.eq_ignore_ascii_case("tcp"))
                });
            Some(AppPort {
                port,
                protocol: if is_tcp {
                    AppProtocol::Tcp
                } else {
                    AppProtocol::Http
                },
            })
        })
        .collect();
    ports.sort();
    ports.dedup();
    Some(MeshPod {
        namespace: namespace.to_string(),
        name: name.to_string(),
        ip,
        service_account,
        workload: pod.workload(),
        has_sidecar: proxy_uuid.is_some() && catalog.pod_has_sidecar(namespace, name),
        proxy_uuid,
        ports,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_demo_mesh() {
        let catalog = load_catalog(
            &crate::repo_root().join("examples/demo"),
            CatalogSettings::default(),
        )
        .expect("demo manifests");
        let pods = mesh_pods(&catalog);
        let summary: Vec<(String, String, bool, Vec<AppPort>)> = pods
            .iter()
            .map(|p| (p.id(), p.ip.to_string(), p.has_sidecar, p.ports.clone()))
            .collect();
        let http = |port| AppPort {
            port,
            protocol: AppProtocol::Http,
        };
        assert_eq!(
            summary,
            vec![
                ("demo/curl".into(), "127.0.10.10".into(), true, vec![]),
                (
                    "demo/httpbin-v1".into(),
                    "127.0.10.1".into(),
                    true,
                    vec![http(14001)]
                ),
                (
                    "demo/httpbin-v2".into(),
                    "127.0.10.2".into(),
                    true,
                    vec![http(14001)]
                ),
                (
                    "demo/tcp-echo-1".into(),
                    "127.0.10.3".into(),
                    true,
                    vec![AppPort {
                        port: 9000,
                        protocol: AppProtocol::Tcp
                    }]
                ),
            ]
        );
        let curl = &pods[0];
        assert_eq!(
            curl.node_id().as_deref(),
            Some("6a1f3c2e-1b7d-4c1e-9a3f-0c5d2e8b7a10.sidecar.curl.demo")
        );
        assert_eq!(curl.node_cluster(), "curl.demo");
        let workloads: Vec<(&str, &str)> = pods
            .iter()
            .map(|p| (p.workload.kind.as_str(), p.workload.name.as_str()))
            .collect();
        assert_eq!(
            workloads,
            vec![
                ("Deployment", "curl"),
                ("Deployment", "httpbin-v1"),
                ("Deployment", "httpbin-v2"),
                ("StatefulSet", "tcp-echo"),
            ],
            "the demo's owner references"
        );
        assert_eq!(curl.outbound_addr().to_string(), "127.0.10.10:15001");
    }
}
