//! The data-plane benches' mesh: the controller on [`crate::mesh_gen::bench_manifests`], and the
//! sidecars under test connected to it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use fsm_catalog::CatalogSettings;
use fsm_integration_tests::mesh::MeshPod;
use fsm_integration_tests::paths::bin_dir;
use fsm_integration_tests::{
    AdsMode, Controller, ControllerOptions, Envoy, FsmSidecar, FsmSidecarConfig, SidecarConfig,
    load_catalog, mesh_pods, start_controller, start_envoy, start_fsm_sidecar,
};

use crate::mesh_gen::bench_manifests;
use crate::{CONVERGE, SidecarArgs};

/// The mesh of [`bench_manifests`] with the controller running on it.
pub(crate) struct BenchMesh {
    _dir: tempfile::TempDir,
    /// The manifest directory the controller watches: benches edit it to apply policies.
    pub(crate) manifests: PathBuf,
    pub(crate) logs: PathBuf,
    pub(crate) controller: Controller,
    pub(crate) pods: Vec<MeshPod>,
}

impl BenchMesh {
    pub(crate) async fn start(subnet: u8, services: usize) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("fsm-bench-").tempdir()?;
        let manifests = dir.path().join("manifests");
        let logs = dir.path().join("logs");
        bench_manifests(&manifests, subnet, services)?;
        let pods = mesh_pods(&load_catalog(&manifests, CatalogSettings::default())?);
        let controller = start_controller(&manifests, &logs, &ControllerOptions::default()).await?;
        Ok(BenchMesh {
            _dir: dir,
            manifests,
            logs,
            controller,
            pods,
        })
    }

    pub(crate) fn pod(&self, name: &str) -> Result<&MeshPod> {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .with_context(|| format!("no pod {name} in the bench manifests"))
    }

    /// Envoy as the sidecar of the pod `name`, ready and in sync.
    pub(crate) async fn envoy(&self, name: &str) -> Result<Envoy> {
        let pod = self.pod(name)?;
        let mut envoy = start_envoy(
            &SidecarConfig::for_pod(pod, &self.controller.ads(), AdsMode::Sotw)?,
            &self.logs,
        )
        .await?;
        envoy
            .wait_ready(CONVERGE)
            .await
            .with_context(|| format!("Envoy sidecar of {}", pod.id()))?;
        wait_proxy_in_sync(&self.controller, pod).await?;
        Ok(envoy)
    }

    /// fsm-sidecar (`sidecar.sidecar_bin`, `--workers`, `--log-level warn`) as the sidecar of the
    /// pod `name`, with the bootstrap credentials the controller wrote for it, ready and in sync.
    pub(crate) async fn fsm_sidecar(
        &self,
        name: &str,
        sidecar: &SidecarArgs,
    ) -> Result<FsmSidecar> {
        let pod = self.pod(name)?;
        let mut config = FsmSidecarConfig::for_pod(pod, &self.controller.ads(), AdsMode::Sotw)?;
        config.binary = sidecar.sidecar_bin.clone();
        config.workers = Some(sidecar.workers);
        config.log_level = "warn".to_string();
        let mut fsm = start_fsm_sidecar(&config, &self.logs).await?;
        fsm.wait_ready(CONVERGE)
            .await
            .with_context(|| format!("fsm-sidecar of {}", pod.id()))?;
        wait_proxy_in_sync(&self.controller, pod).await?;
        Ok(fsm)
    }
}

/// Waits until the controller reports the pod's proxy connected and in sync on every type it
/// subscribed to; returns the number of types.
pub(crate) async fn wait_proxy_in_sync(controller: &Controller, pod: &MeshPod) -> Result<usize> {
    let uuid = pod
        .proxy_uuid
        .as_deref()
        .context("pod without proxy UUID")?;
    let started = Instant::now();
    loop {
        let proxies = controller.debug_proxies().await?;
        if let Some(proxy) = proxies.get(uuid)
            && proxy.connected_streams > 0
            && !proxy.types.is_empty()
            && proxy.types.values().all(|t| t.is_in_sync())
        {
            return Ok(proxy.types.len());
        }
        ensure!(
            started.elapsed() < CONVERGE,
            "proxy of {} never in sync: {:?}",
            pod.id(),
            proxies.get(uuid)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(crate) fn sidecar_label(sidecar: &SidecarArgs) -> String {
    let bin = sidecar
        .sidecar_bin
        .clone()
        .or_else(|| bin_dir().ok().map(|d| d.join("fsm-sidecar")))
        .unwrap_or_default();
    format!("{} (--workers {})", bin.display(), sidecar.workers)
}
