//! Real Envoy sidecars, bootstrapped the way FSM's injector does it: identity in the node, one
//! static cluster for the control plane, everything else over ADS.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::controller::{ADS_SERVER_NAME, AdsTarget, wait_for_bootstrap};
use crate::mesh::MeshPod;
use crate::{ManagedProcess, envoy_binary};

/// The static cluster name the ADS config points at.
pub const CONTROLLER_CLUSTER: &str = "fsm-controller";

/// Which flavour of ADS the sidecar speaks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum AdsMode {
    /// State of the world (`api_type: GRPC`).
    #[default]
    Sotw,
    /// Incremental (`api_type: DELTA_GRPC`).
    Delta,
}

impl AdsMode {
    pub fn api_type(self) -> &'static str {
        match self {
            AdsMode::Sotw => "GRPC",
            AdsMode::Delta => "DELTA_GRPC",
        }
    }
}

/// Everything that differs between two sidecars' bootstraps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SidecarConfig {
    /// Names the log and bootstrap files (`envoy-<name>.log`).
    pub name: String,
    pub node_id: String,
    pub node_cluster: String,
    pub admin: SocketAddr,
    pub ads: SocketAddr,
    /// Further control-plane replicas: the ADS cluster balances over all of them, so when one
    /// goes away the sidecar reconnects to another.
    pub ads_replicas: Vec<SocketAddr>,
    pub ads_mode: AdsMode,
    /// The pod's bootstrap credentials (`ca.crt`, `tls.crt`, `tls.key`) for the mTLS ADS stream.
    pub bootstrap_dir: PathBuf,
}

impl SidecarConfig {
    /// The sidecar of a meshed pod, with FSM's node identity and admin on the pod address.
    pub fn for_pod(pod: &MeshPod, ads: &AdsTarget, ads_mode: AdsMode) -> Result<Self> {
        let Some(node_id) = pod.node_id() else {
            bail!(
                "pod {} has no {} label, so it cannot have a sidecar",
                pod.id(),
                fsm_catalog::PROXY_UUID_LABEL
            );
        };
        Ok(SidecarConfig {
            name: format!("{}-{}", pod.namespace, pod.name),
            node_id,
            node_cluster: pod.node_cluster(),
            admin: pod.admin_addr(),
            ads: ads.addr,
            ads_replicas: Vec::new(),
            ads_mode,
            bootstrap_dir: ads.pod_dir(&pod.namespace, &pod.name),
        })
    }
}

/// A running Envoy; killed on drop.
#[derive(Debug)]
pub struct Envoy {
    pub process: ManagedProcess,
    pub config: SidecarConfig,
}

// === Envoy ===

impl Envoy {
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.config.admin)
    }

    /// GET an admin path such as `/config_dump` or `/stats`, requiring 2xx.
    pub async fn admin_get(&self, path: &str) -> Result<String> {
        crate::client::get_text(&self.admin_url(path)).await
    }

    /// The `version_info` of every dynamic cluster and listener Envoy holds.
    pub async fn dynamic_versions(&self) -> Result<(BTreeSet<String>, BTreeSet<String>)> {
        let dump: serde_json::Value = serde_json::from_str(&self.admin_get("/config_dump").await?)?;
        let mut clusters = BTreeSet::new();
        let mut listeners = BTreeSet::new();
        for config in dump["configs"].as_array().into_iter().flatten() {
            for c in config["dynamic_active_clusters"]
                .as_array()
                .into_iter()
                .flatten()
            {
                clusters.insert(c["version_info"].as_str().unwrap_or_default().to_string());
            }
            for l in config["dynamic_listeners"].as_array().into_iter().flatten() {
                listeners.insert(
                    l["active_state"]["version_info"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                );
            }
        }
        Ok((clusters, listeners))
    }

    /// Names of the dynamic clusters Envoy has active.
    pub async fn active_clusters(&self) -> Result<Vec<String>> {
        let dump: serde_json::Value = serde_json::from_str(&self.admin_get("/config_dump").await?)?;
        Ok(dump["configs"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|c| {
                c["dynamic_active_clusters"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .filter_map(|c| c["cluster"]["name"].as_str().map(str::to_string))
            .collect())
    }

    /// Waits until Envoy has every cluster of `present` active and none of `absent`.
    pub async fn wait_for_clusters(
        &self,
        present: &[&str],
        absent: &[&str],
        timeout: Duration,
    ) -> Result<()> {
        crate::eventually(timeout, || async {
            let active = self.active_clusters().await?;
            for name in present {
                anyhow::ensure!(
                    active.iter().any(|n| n == name),
                    "{name} missing: {active:?}"
                );
            }
            for name in absent {
                anyhow::ensure!(
                    !active.iter().any(|n| n == name),
                    "{name} still active: {active:?}"
                );
            }
            Ok(())
        })
        .await
    }

    /// One counter from `/stats`, 0 when Envoy has not created it.
    pub async fn counter(&self, name: &str) -> Result<u64> {
        // The filter is a regex; its dots matching any character is harmless, the exact name is
        // checked below.
        let stats = self.admin_get(&format!("/stats?filter={name}")).await?;
        Ok(crate::client::stats_counter(&stats, name))
    }

    /// Waits until the admin `/ready` says LIVE, which Envoy reports only after its first CDS and
    /// LDS responses are applied; fails early if Envoy exits (e.g. on a rejected bootstrap).
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let url = self.admin_url("/ready");
        self.process.wait_for_http_ok(&url, timeout).await
    }
}

// === free functions ===

/// SDS names of the bootstrap credentials in [`bootstrap_secrets`].
const BOOTSTRAP_CERT: &str = "fsm-bootstrap-cert";
const BOOTSTRAP_CA: &str = "fsm-bootstrap-ca";

/// The file-based SDS resources the bootstrap's ADS cluster uses, one file each (Envoy wants one
/// secret per file): the pod's xDS certificate and the mesh roots, read from the pod's bootstrap
/// directory. Returns `(file name, YAML)` pairs.
pub fn bootstrap_secrets(config: &SidecarConfig) -> [(String, String); 2] {
    let file = |name: &str| config.bootstrap_dir.join(name).display().to_string();
    let secret = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
    let cert = serde_json::json!({"resources": [{
        "@type": secret,
        "name": BOOTSTRAP_CERT,
        "tls_certificate": {
            "certificate_chain": {"filename": file("tls.crt")},
            "private_key": {"filename": file("tls.key")},
        },
    }]});
    let ca = serde_json::json!({"resources": [{
        "@type": secret,
        "name": BOOTSTRAP_CA,
        "validation_context": {
            "trusted_ca": {"filename": file("ca.crt")},
            "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": ADS_SERVER_NAME}}],
        },
    }]});
    let yaml =
        |v: &serde_json::Value| serde_yaml_ng::to_string(v).unwrap_or_else(|_| v.to_string());
    [
        (sds_file_name(config, BOOTSTRAP_CERT), yaml(&cert)),
        (sds_file_name(config, BOOTSTRAP_CA), yaml(&ca)),
    ]
}

fn sds_file_name(config: &SidecarConfig, secret: &str) -> String {
    format!("envoy-{}.{secret}.yaml", config.name)
}

/// The bootstrap YAML for one sidecar; `sds_dir` holds the files of [`bootstrap_secrets`].
pub fn envoy_bootstrap(config: &SidecarConfig, sds_dir: &Path) -> String {
    yaml_of(&bootstrap_json(config, sds_dir))
}

fn yaml_of(bootstrap: &serde_json::Value) -> String {
    // JSON is valid YAML; the fallback only matters if serde_yaml_ng ever refuses plain JSON data.
    serde_yaml_ng::to_string(bootstrap).unwrap_or_else(|_| bootstrap.to_string())
}

/// [`envoy_bootstrap`] as JSON, for tests that adjust it before starting Envoy.
pub fn bootstrap_json(config: &SidecarConfig, sds_dir: &Path) -> serde_json::Value {
    let socket = |addr: SocketAddr| serde_json::json!({"socket_address": {"address": addr.ip().to_string(), "port_value": addr.port()}});
    let sds_file = |secret: &str| {
        serde_json::json!({
            "path_config_source": {
                "path": sds_dir.join(sds_file_name(config, secret)).display().to_string(),
                // The controller swaps the `..data` link inside the pod's directory, as the
                // kubelet does for a Secret volume; a move there makes Envoy reload.
                "watched_directory": {"path": config.bootstrap_dir.display().to_string()},
            },
            "resource_api_version": "V3",
        })
    };
    let bootstrap = serde_json::json!({
        "node": {"id": config.node_id, "cluster": config.node_cluster},
        "admin": {"address": socket(config.admin)},
        "static_resources": {"clusters": [{
            "name": CONTROLLER_CLUSTER,
            "type": "STATIC",
            // Short, so a sidecar started before the controller reconnects quickly.
            "connect_timeout": "1s",
            "load_assignment": {
                "cluster_name": CONTROLLER_CLUSTER,
                "endpoints": [{"lb_endpoints": std::iter::once(config.ads)
                    .chain(config.ads_replicas.iter().copied())
                    .map(|addr| serde_json::json!({"endpoint": {"address": socket(addr)}}))
                    .collect::<Vec<_>>()}],
            },
            // mTLS with the pod's bootstrap credentials. They come through file-based SDS, the
            // one way Envoy reloads certificates from disk: when the controller swaps the pod
            // directory's `..data` link (rotation), Envoy re-reads them.
            "transport_socket": {
                "name": "envoy.transport_sockets.tls",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                    "sni": ADS_SERVER_NAME,
                    "common_tls_context": {
                        "alpn_protocols": ["h2"],
                        "tls_certificate_sds_secret_configs": [{"name": BOOTSTRAP_CERT, "sds_config": sds_file(BOOTSTRAP_CERT)}],
                        "validation_context_sds_secret_config": {"name": BOOTSTRAP_CA, "sds_config": sds_file(BOOTSTRAP_CA)},
                    },
                },
            },
            // gRPC needs HTTP/2 to the control plane.
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}},
                },
            },
        }]},
        "dynamic_resources": {
            "ads_config": {
                "api_type": config.ads_mode.api_type(),
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": CONTROLLER_CLUSTER}}],
                "set_node_on_first_message_only": true,
            },
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
        },
    });
    bootstrap
}

/// A base id no other Envoy of this or a concurrent test process uses, so instances never share
/// hot-restart state even where hot restart is left enabled.
fn next_base_id() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    (std::process::id() % 100_000) * 64 + NEXT.fetch_add(1, Ordering::Relaxed) % 64
}

/// Starts Envoy with `config`, writing the bootstrap beside its log, and waits until its admin
/// port accepts connections. Use [`Envoy::wait_ready`] to wait for the first configuration.
pub async fn start_envoy(config: &SidecarConfig, log_dir: &Path) -> Result<Envoy> {
    start_envoy_with(config, log_dir, |_| {}).await
}

/// [`start_envoy`] with the bootstrap adjusted by `edit` first (e.g. ADS rate limits).
pub async fn start_envoy_with(
    config: &SidecarConfig,
    log_dir: &Path,
    edit: impl FnOnce(&mut serde_json::Value),
) -> Result<Envoy> {
    std::fs::create_dir_all(log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
    wait_for_bootstrap(&config.bootstrap_dir, Duration::from_secs(20)).await?;
    let bootstrap_path = log_dir.join(format!("envoy-{}.bootstrap.yaml", config.name));
    for (name, yaml) in bootstrap_secrets(config) {
        let path = log_dir.join(name);
        std::fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))?;
    }
    let mut bootstrap = bootstrap_json(config, log_dir);
    edit(&mut bootstrap);
    std::fs::write(&bootstrap_path, yaml_of(&bootstrap))
        .with_context(|| format!("writing {}", bootstrap_path.display()))?;
    let mut command = Command::new(envoy_binary()?);
    command
        .arg("--config-path")
        .arg(&bootstrap_path)
        .args([
            "--disable-hot-restart",
            "--base-id",
            &next_base_id().to_string(),
        ])
        // One worker: a test mesh has several sidecars and CI has two cores.
        .args(["--concurrency", "1"])
        // Reject unknown fields, so a typo in pushed config fails loudly instead of being ignored.
        .arg("--reject-unknown-dynamic-fields");
    let mut process = ManagedProcess::spawn(&format!("envoy-{}", config.name), command, log_dir)?;
    process
        .wait_for_tcp(config.admin, Duration::from_secs(20))
        .await?;
    Ok(Envoy {
        process,
        config: config.clone(),
    })
}

/// Runs `envoy --mode validate` on a bootstrap, returning Envoy's complaint when it rejects it.
pub async fn validate_bootstrap(yaml: &str) -> Result<()> {
    run_validate(&["--config-yaml", yaml]).await
}

/// [`validate_bootstrap`] on a bootstrap file (`.yaml`, `.json` or binary `.pb`).
pub async fn validate_bootstrap_file(path: &Path) -> Result<()> {
    let path = path.display().to_string();
    run_validate(&["--config-path", &path]).await
}

async fn run_validate(config: &[&str]) -> Result<()> {
    let output = tokio::process::Command::new(envoy_binary()?)
        .args(["--mode", "validate", "--disable-hot-restart"])
        .args(config)
        .output()
        .await
        .context("running envoy --mode validate")?;
    if !output.status.success() {
        bail!(
            "envoy rejected the bootstrap ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}
