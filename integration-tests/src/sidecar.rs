//! fsm-sidecar, the native Rust data plane, started the way `envoy.rs` starts Envoy: identity in
//! the node, the ADS address, admin and metrics on the pod address, everything else over ADS.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Result, bail, ensure};

use crate::controller::{ADS_SERVER_NAME, AdsTarget, wait_for_bootstrap};
use crate::envoy::AdsMode;
use crate::mesh::MeshPod;
use crate::{ManagedProcess, binary};

/// fsm-sidecar's Prometheus port (FSM's sidecar metrics port).
pub const METRICS_PORT: u16 = 15010;

/// Everything that differs between two fsm-sidecars.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsmSidecarConfig {
    /// Names the log file (`fsm-sidecar-<name>.log`).
    pub name: String,
    pub node_id: String,
    pub node_cluster: String,
    pub pod_ip: IpAddr,
    pub pod_name: String,
    pub pod_namespace: String,
    pub workload_kind: String,
    pub workload_name: String,
    pub admin: SocketAddr,
    pub metrics: SocketAddr,
    pub ads: SocketAddr,
    pub ads_mode: AdsMode,
    /// The pod's bootstrap credentials for the mTLS ADS stream.
    pub bootstrap_dir: PathBuf,
    /// The fsm-sidecar executable; `None` is the one built beside the harness (`make build`'s
    /// debug build). Benchmarks point it at a release build.
    pub binary: Option<PathBuf>,
    /// `--workers` (tokio worker threads); `None` leaves fsm-sidecar's default.
    pub workers: Option<usize>,
    /// `--log-level`.
    pub log_level: String,
}

impl FsmSidecarConfig {
    /// The sidecar of a meshed pod, with FSM's node identity and admin/metrics on the pod address.
    pub fn for_pod(pod: &MeshPod, ads: &AdsTarget, ads_mode: AdsMode) -> Result<Self> {
        let Some(node_id) = pod.node_id() else {
            bail!(
                "pod {} has no proxy UUID label, so it cannot have a sidecar",
                pod.id()
            );
        };
        Ok(FsmSidecarConfig {
            name: format!("{}-{}", pod.namespace, pod.name),
            node_id,
            node_cluster: pod.node_cluster(),
            pod_ip: pod.ip,
            pod_name: pod.name.clone(),
            pod_namespace: pod.namespace.clone(),
            workload_kind: pod.workload.kind.clone(),
            workload_name: pod.workload.name.clone(),
            admin: pod.admin_addr(),
            metrics: SocketAddr::new(pod.ip, METRICS_PORT),
            ads: ads.addr,
            ads_mode,
            bootstrap_dir: ads.pod_dir(&pod.namespace, &pod.name),
            binary: None,
            workers: None,
            log_level: "info".to_string(),
        })
    }
}

/// A running fsm-sidecar; killed on drop.
#[derive(Debug)]
pub struct FsmSidecar {
    pub process: ManagedProcess,
    pub config: FsmSidecarConfig,
}

// === FsmSidecar ===

impl FsmSidecar {
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.config.admin)
    }

    /// GET an admin path such as `/config_dump` or `/stats`, requiring 2xx.
    pub async fn admin_get(&self, path: &str) -> Result<String> {
        crate::client::get_text(&self.admin_url(path)).await
    }

    /// `/config_dump` as JSON.
    pub async fn config_dump(&self) -> Result<serde_json::Value> {
        let body = self.admin_get("/config_dump").await?;
        Ok(serde_json::from_str(&body)?)
    }

    /// GET a path of the metrics port.
    pub async fn metrics_get(&self, path: &str) -> Result<String> {
        crate::client::get_text(&format!("http://{}{path}", self.config.metrics)).await
    }

    /// Waits until `/ready` answers 200, which fsm-sidecar does once its first clusters and
    /// listeners are applied; fails early if the process exits.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let url = self.admin_url("/ready");
        self.process.wait_for_http_ok(&url, timeout).await
    }

    /// One counter from `/stats`, 0 when the sidecar has not created it.
    pub async fn counter(&self, name: &str) -> Result<u64> {
        let stats = self.admin_get("/stats").await?;
        Ok(crate::client::stats_counter(&stats, name))
    }

    /// Resident memory from `/proc/<pid>/status`, in KiB (Linux only).
    pub fn rss_kib(&self) -> Option<u64> {
        crate::process::proc_status_kib(self.process.pid(), "VmRSS")
    }
}

// === free functions ===

/// Starts fsm-sidecar with `config` and waits until its admin port accepts connections. Use
/// [`FsmSidecar::wait_ready`] to wait for the first configuration.
pub async fn start_fsm_sidecar(config: &FsmSidecarConfig, log_dir: &Path) -> Result<FsmSidecar> {
    wait_for_bootstrap(&config.bootstrap_dir, Duration::from_secs(20)).await?;
    let executable = match &config.binary {
        Some(path) => {
            ensure!(
                path.is_file(),
                "fsm-sidecar not found at {}",
                path.display()
            );
            path.clone()
        }
        None => binary("fsm-sidecar")?,
    };
    let mut command = Command::new(executable);
    command
        .arg("--bootstrap-dir")
        .arg(&config.bootstrap_dir)
        .arg("--ads-server-name")
        .arg(ADS_SERVER_NAME)
        .arg("--node-id")
        .arg(&config.node_id)
        .arg("--node-cluster")
        .arg(&config.node_cluster)
        .arg("--ads")
        .arg(config.ads.to_string())
        .arg("--ads-mode")
        .arg(match config.ads_mode {
            AdsMode::Sotw => "sotw",
            AdsMode::Delta => "delta",
        })
        .arg("--pod-ip")
        .arg(config.pod_ip.to_string())
        .arg("--pod-name")
        .arg(&config.pod_name)
        .arg("--pod-namespace")
        .arg(&config.pod_namespace)
        .arg("--workload-kind")
        .arg(&config.workload_kind)
        .arg("--workload-name")
        .arg(&config.workload_name)
        .arg("--admin")
        .arg(config.admin.to_string())
        .arg("--metrics")
        .arg(config.metrics.to_string())
        .arg("--log-level")
        .arg(&config.log_level);
    if let Some(workers) = config.workers {
        command.arg("--workers").arg(workers.to_string());
    }
    let mut process =
        ManagedProcess::spawn(&format!("fsm-sidecar-{}", config.name), command, log_dir)?;
    process
        .wait_for_tcp(config.admin, Duration::from_secs(20))
        .await?;
    Ok(FsmSidecar {
        process,
        config: config.clone(),
    })
}
