//! The control plane under test: `fsm-controller` on a manifest directory or a (test) API server,
//! on free loopback ports.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Deserialize;

use crate::{ManagedProcess, binary, free_port};

/// How long a fresh controller may take to load the manifests and answer `/health/ready`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Optional controller flags; `None` keeps the controller's default.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ControllerOptions {
    /// Fixed ADS address; a free loopback port when `None`.
    pub ads_addr: Option<SocketAddr>,
    /// Fixed HTTP (health, metrics, debug) address; a free loopback port when `None`.
    pub http_addr: Option<SocketAddr>,
    pub mesh_name: Option<String>,
    pub fsm_namespace: Option<String>,
    /// Process name for logs (`<name>.log`); `fsm-controller` when `None`.
    pub name: Option<String>,
    /// Where the controller writes sidecar bootstrap credentials; `<log-dir>/<name>.state/bootstrap`
    /// when `None`. Replicas of one mesh share one.
    pub bootstrap_dir: Option<PathBuf>,
    /// Extra arguments appended verbatim, for flags the harness does not know yet.
    pub extra_args: Vec<String>,
}

/// How a sidecar reaches the control plane: the ADS address and the directory holding every
/// pod's bootstrap credentials (`<dir>/<ns>/<pod>/{ca.crt,tls.crt,tls.key}`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdsTarget {
    pub addr: SocketAddr,
    pub bootstrap_root: PathBuf,
}

impl AdsTarget {
    /// The pod's own bootstrap directory.
    pub fn pod_dir(&self, namespace: &str, pod: &str) -> PathBuf {
        self.bootstrap_root.join(namespace).join(pod)
    }
}

/// The DNS name in the controller's ADS certificate that sidecars verify (the default of
/// `fsm-controller --ads-server-name` for the `fsm-system` namespace).
pub const ADS_SERVER_NAME: &str = "fsm-controller.fsm-system.svc.cluster.local";

/// Writes bootstrap credentials for `common_name` from a throwaway CA, laid out as the controller
/// writes them: for a sidecar started without a controller.
pub fn write_standalone_bootstrap(pod_dir: &Path, common_name: &str) -> Result<()> {
    let ca = fsm_certs::tresor::CertificateAuthority::generate_root(
        "fsm-test-root",
        Duration::from_secs(3600),
    )?;
    let cert = ca.issue(&fsm_certs::CertificateRequest::new(
        common_name,
        Duration::from_secs(3600),
    ))?;
    std::fs::create_dir_all(pod_dir)?;
    std::fs::write(pod_dir.join("ca.crt"), &cert.trust_bundle_pem)?;
    std::fs::write(pod_dir.join("tls.crt"), &cert.cert_chain_pem)?;
    std::fs::write(pod_dir.join("tls.key"), cert.private_key.expose_pem())?;
    Ok(())
}

/// Waits until the controller has written `pod_dir`'s credentials (a sidecar needs them to start).
pub async fn wait_for_bootstrap(pod_dir: &Path, timeout: Duration) -> Result<()> {
    let key = pod_dir.join("tls.key");
    let deadline = tokio::time::Instant::now() + timeout;
    while !key.exists() {
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!(
                "no bootstrap credentials at {} after {timeout:?}: is the pod meshed, with a proxy UUID label?",
                pod_dir.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// A running `fsm-controller`; killed on drop.
#[derive(Debug)]
pub struct Controller {
    pub process: ManagedProcess,
    pub ads_addr: SocketAddr,
    pub http_addr: SocketAddr,
    /// `--state-dir`: the Tresor root file `fsm-ca-bundle.pem` lives here.
    pub state_dir: PathBuf,
    pub bootstrap_root: PathBuf,
}

/// One proxy's entry in `/debug/proxies`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ProxyDebug {
    pub connected_streams: u64,
    /// Keyed by type URL.
    pub types: BTreeMap<String, TypeDebug>,
}

/// Versions of one resource type for one proxy, as the controller tracks them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TypeDebug {
    pub snapshot_version: Option<String>,
    pub sent_version: Option<String>,
    pub acked_version: Option<String>,
    pub nacked_version: Option<String>,
    pub last_nack_error: Option<String>,
    pub responses_sent: u64,
}

impl TypeDebug {
    /// The proxy has acknowledged the latest snapshot and rejected nothing since.
    pub fn is_in_sync(&self) -> bool {
        self.snapshot_version.is_some()
            && self.acked_version == self.snapshot_version
            && self.nacked_version.is_none()
    }
}

// === Controller ===

impl Controller {
    pub fn ads(&self) -> AdsTarget {
        AdsTarget {
            addr: self.ads_addr,
            bootstrap_root: self.bootstrap_root.clone(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http_addr)
    }

    async fn get(&self, path: &str) -> Result<String> {
        crate::client::get_text(&self.url(path)).await
    }

    /// `/debug/proxies` as the controller keys it: by whole proxy identity,
    /// `<uuid>.<kind>.<service-account>.<namespace>`.
    pub async fn debug_proxies_by_identity(&self) -> Result<BTreeMap<String, ProxyDebug>> {
        let body = self.get("/debug/proxies").await?;
        serde_json::from_str(&body).with_context(|| format!("decoding /debug/proxies: {body}"))
    }

    /// `/debug/proxies`, keyed by proxy UUID (tests give each pod its own UUID; where two
    /// identities claim one UUID, use [`Controller::debug_proxies_by_identity`]).
    pub async fn debug_proxies(&self) -> Result<BTreeMap<String, ProxyDebug>> {
        Ok(by_uuid(self.debug_proxies_by_identity().await?))
    }

    /// The version of `type_url` the proxy has ACKed, when it is in sync with its snapshot.
    pub async fn in_sync_version(&self, uuid: &str, type_url: &str) -> Result<Option<String>> {
        let proxies = self.debug_proxies().await?;
        let status = proxies
            .get(uuid)
            .and_then(|p| p.types.get(type_url))
            .cloned()
            .unwrap_or_default();
        Ok(status
            .is_in_sync()
            .then_some(status.acked_version)
            .flatten())
    }

    /// `/debug/config` as the controller keys it: by whole proxy identity.
    pub async fn debug_config_by_identity(
        &self,
    ) -> Result<serde_json::Map<String, serde_json::Value>> {
        let body = self.get("/debug/config").await?;
        serde_json::from_str(&body).with_context(|| format!("decoding /debug/config: {body}"))
    }

    /// `/debug/config`: per proxy UUID, its pod and why its configuration is missing or stale.
    pub async fn debug_config(&self) -> Result<serde_json::Value> {
        let by_identity = self.debug_config_by_identity().await?;
        Ok(serde_json::Value::Object(
            by_uuid(by_identity.into_iter().collect())
                .into_iter()
                .collect(),
        ))
    }

    /// `/debug/problems`: every refused object and pod, `<code>: <what and why>`.
    pub async fn debug_problems(&self) -> Result<Vec<String>> {
        let body = self.get("/debug/problems").await?;
        serde_json::from_str(&body).with_context(|| format!("decoding /debug/problems: {body}"))
    }

    /// `/metrics` in Prometheus text format.
    pub async fn metrics(&self) -> Result<String> {
        self.get("/metrics").await
    }
}

// === free functions ===

/// Re-keys a map keyed by proxy identity (`<uuid>.<kind>.<sa>.<ns>`) by its UUID.
fn by_uuid<V>(by_identity: BTreeMap<String, V>) -> BTreeMap<String, V> {
    by_identity
        .into_iter()
        .map(|(identity, v)| {
            let uuid = identity.split('.').next().unwrap_or_default().to_owned();
            (uuid, v)
        })
        .collect()
}

/// Starts `fsm-controller --manifest-dir <dir>` with ADS and HTTP on free loopback ports (unless
/// `options` fixes them) and waits for `/health/ready`.
pub async fn start_controller(
    manifest_dir: &Path,
    log_dir: &Path,
    options: &ControllerOptions,
) -> Result<Controller> {
    spawn_controller("--manifest-dir", manifest_dir, log_dir, options).await
}

/// Starts `fsm-controller --kubeconfig <file>` (a cluster, in tests the test API server) like
/// [`start_controller`]. Set `options.name` to tell several replicas' logs apart.
pub async fn start_controller_on_cluster(
    kubeconfig: &Path,
    log_dir: &Path,
    options: &ControllerOptions,
) -> Result<Controller> {
    spawn_controller("--kubeconfig", kubeconfig, log_dir, options).await
}

async fn spawn_controller(
    source_flag: &str,
    source: &Path,
    log_dir: &Path,
    options: &ControllerOptions,
) -> Result<Controller> {
    // Ports picked here were free a moment ago; another process may take one before the
    // controller binds it (tests run side by side). Such a start is tried again on new ports.
    let mut attempt = 0;
    loop {
        attempt += 1;
        match spawn_controller_once(source_flag, source, log_dir, options).await {
            Err(err)
                if attempt < 3
                    && (options.ads_addr.is_none() || options.http_addr.is_none())
                    && format!("{err:#}")
                        .to_ascii_lowercase()
                        .contains("address already in use") =>
            {
                eprintln!("fsm-controller could not bind its ports, trying others: {err:#}");
            }
            result => return result,
        }
    }
}

async fn spawn_controller_once(
    source_flag: &str,
    source: &Path,
    log_dir: &Path,
    options: &ControllerOptions,
) -> Result<Controller> {
    let free =
        || -> Result<SocketAddr> { Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?))) };
    let ads_addr = match options.ads_addr {
        Some(addr) => addr,
        None => free()?,
    };
    let http_addr = match options.http_addr {
        Some(addr) => addr,
        None => free()?,
    };
    let name = options.name.as_deref().unwrap_or("fsm-controller");
    let state_dir = log_dir.join(format!("{name}.state"));
    let bootstrap_root = options
        .bootstrap_dir
        .clone()
        .unwrap_or_else(|| state_dir.join("bootstrap"));
    let mut command = Command::new(binary("fsm-controller")?);
    command
        .arg("--state-dir")
        .arg(&state_dir)
        .arg("--bootstrap-dir")
        .arg(&bootstrap_root)
        .arg(source_flag)
        .arg(source)
        .arg("--ads-listen")
        .arg(ads_addr.to_string())
        .arg("--http-listen")
        .arg(http_addr.to_string());
    if let Some(mesh) = &options.mesh_name {
        command.arg("--mesh-name").arg(mesh);
    }
    if let Some(namespace) = &options.fsm_namespace {
        command.arg("--fsm-namespace").arg(namespace);
    }
    command.args(&options.extra_args);
    let mut process = ManagedProcess::spawn(name, command, log_dir)?;
    process
        .wait_for_http_ok(&format!("http://{http_addr}/health/ready"), READY_TIMEOUT)
        .await?;
    Ok(Controller {
        process,
        ads_addr,
        http_addr,
        state_dir,
        bootstrap_root,
    })
}
