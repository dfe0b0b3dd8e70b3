//! The demo mesh without its sidecars: manifests in a temporary directory, the controller
//! serving them and the demo apps, with the meshed pods whose sidecars each test starts its own
//! way (Envoy or fsm-sidecar, SotW or delta, one kind per pod).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use fsm_catalog::CatalogSettings;

use crate::{
    AdsMode, Controller, ControllerOptions, Envoy, FsmSidecar, FsmSidecarConfig, ManagedProcess,
    MeshPod, SidecarConfig, example_manifests, load_catalog, mesh_pods, start_controller,
    start_demo_apps, start_envoy, start_fsm_sidecar,
};

/// The running demo mesh but its sidecars. Dropping it stops the controller and the apps, then
/// removes the directory (fields drop in order: the processes before `work`).
pub struct DemoMesh {
    pub controller: Controller,
    pub apps: Vec<ManagedProcess>,
    /// The meshed pods (those with a node id), in catalog order.
    pub pods: Vec<MeshPod>,
    pub manifests: PathBuf,
    /// Where every process logs.
    pub logs: PathBuf,
    pub work: tempfile::TempDir,
}

impl DemoMesh {
    /// The demo manifests on `subnet` (`127.0.<subnet>.0/24`) as they are.
    pub async fn start(subnet: u8) -> Result<DemoMesh> {
        DemoMesh::start_edited(subnet, |_| Ok(())).await
    }

    /// The demo manifests on `subnet`, changed by `edit` (given the manifest directory) before
    /// the controller reads them.
    pub async fn start_edited(
        subnet: u8,
        edit: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<DemoMesh> {
        DemoMesh::start_example("demo", subnet, edit).await
    }

    /// [`DemoMesh::start_edited`] with the manifest set examples/`example`.
    pub async fn start_example(
        example: &str,
        subnet: u8,
        edit: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<DemoMesh> {
        let work = tempfile::tempdir()?;
        let logs = work.path().join("logs");
        std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
        let manifests = example_manifests(example, &work.path().join("manifests"), subnet)?;
        edit(&manifests)?;
        let catalog = load_catalog(&manifests, CatalogSettings::default())?;
        let controller = start_controller(&manifests, &logs, &ControllerOptions::default()).await?;
        let apps = start_demo_apps(&catalog, &logs).await?;
        let pods = mesh_pods(&catalog)
            .into_iter()
            .filter(|p| p.node_id().is_some())
            .collect();
        Ok(DemoMesh {
            controller,
            apps,
            pods,
            manifests,
            logs,
            work,
        })
    }

    /// Starts an Envoy sidecar for every meshed pod, speaking `mode` to the controller, one
    /// after the other, each ready within `ready`.
    pub async fn start_envoys(
        &self,
        mode: AdsMode,
        ready: Duration,
    ) -> Result<Vec<(MeshPod, Envoy)>> {
        let mut envoys = Vec::new();
        for pod in &self.pods {
            let config = SidecarConfig::for_pod(pod, &self.controller.ads(), mode)?;
            let mut envoy = start_envoy(&config, &self.logs).await?;
            envoy
                .wait_ready(ready)
                .await
                .with_context(|| format!("sidecar of {}", pod.id()))?;
            envoys.push((pod.clone(), envoy));
        }
        Ok(envoys)
    }

    /// [`DemoMesh::start_envoys`] with fsm-sidecar as the sidecar.
    pub async fn start_fsm_sidecars(
        &self,
        mode: AdsMode,
        ready: Duration,
    ) -> Result<Vec<(MeshPod, FsmSidecar)>> {
        let mut sidecars = Vec::new();
        for pod in &self.pods {
            let config = FsmSidecarConfig::for_pod(pod, &self.controller.ads(), mode)?;
            let mut sidecar = start_fsm_sidecar(&config, &self.logs).await?;
            sidecar
                .wait_ready(ready)
                .await
                .with_context(|| format!("sidecar of {}", pod.id()))?;
            sidecars.push((pod.clone(), sidecar));
        }
        Ok(sidecars)
    }

    /// A sidecar for every meshed pod, of the data plane `plane_of` picks for it, each ready
    /// within `ready`.
    pub async fn start_sidecars(
        &self,
        plane_of: impl Fn(&MeshPod) -> Plane,
        mode: AdsMode,
        ready: Duration,
    ) -> Result<Vec<Sidecar>> {
        let mut sidecars = Vec::new();
        for pod in &self.pods {
            let ads = self.controller.ads();
            sidecars.push(match plane_of(pod) {
                Plane::Envoy => {
                    let mut envoy =
                        start_envoy(&SidecarConfig::for_pod(pod, &ads, mode)?, &self.logs).await?;
                    envoy
                        .wait_ready(ready)
                        .await
                        .with_context(|| format!("Envoy of {}", pod.id()))?;
                    Sidecar::Envoy(envoy)
                }
                Plane::FsmSidecar => {
                    let config = FsmSidecarConfig::for_pod(pod, &ads, mode)?;
                    let mut sidecar = start_fsm_sidecar(&config, &self.logs).await?;
                    sidecar
                        .wait_ready(ready)
                        .await
                        .with_context(|| format!("fsm-sidecar of {}", pod.id()))?;
                    Sidecar::Fsm(sidecar)
                }
            });
        }
        Ok(sidecars)
    }

    /// curl's sidecar of the `client` data plane and every other pod's of `servers`, over SotW
    /// ADS, each ready within `ready`.
    pub async fn start_client_and_servers(
        &self,
        client: Plane,
        servers: Plane,
        ready: Duration,
    ) -> Result<Vec<Sidecar>> {
        self.start_sidecars(
            |pod| if pod.name == "curl" { client } else { servers },
            AdsMode::Sotw,
            ready,
        )
        .await
    }

    /// Turns the boolean MeshConfig field `key` (e.g. `enableEgress`) of the running mesh's
    /// `00-mesh.yaml` to `on`; an error when it is already so (or absent).
    pub fn set_mesh_flag(&self, key: &str, on: bool) -> Result<()> {
        let path = self.manifests.join("00-mesh.yaml");
        let text = std::fs::read_to_string(&path)?;
        let edited = text.replace(&format!("{key}: {}", !on), &format!("{key}: {on}"));
        anyhow::ensure!(
            edited != text,
            "MeshConfig {key} is not {} to turn {on}",
            !on
        );
        std::fs::write(&path, edited)?;
        Ok(())
    }

    /// The meshed pod named `name`.
    pub fn pod(&self, name: &str) -> Result<&MeshPod> {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .with_context(|| format!("meshed pod {name}"))
    }
}

/// A data plane a pod's sidecar may run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plane {
    Envoy,
    FsmSidecar,
}

/// Client (curl) and server data planes: every pairing, which must all behave the same.
pub const PAIRINGS: [(Plane, Plane); 4] = [
    (Plane::Envoy, Plane::Envoy),
    (Plane::FsmSidecar, Plane::FsmSidecar),
    (Plane::Envoy, Plane::FsmSidecar),
    (Plane::FsmSidecar, Plane::Envoy),
];

/// A running sidecar of either data plane; stopped on drop.
pub enum Sidecar {
    Envoy(Envoy),
    Fsm(FsmSidecar),
}

impl Sidecar {
    /// One counter from the admin `/stats` (both data planes use Envoy's names and format).
    pub async fn counter(&self, name: &str) -> Result<u64> {
        match self {
            Sidecar::Envoy(e) => e.counter(name).await,
            Sidecar::Fsm(s) => s.counter(name).await,
        }
    }

    /// The admin `/stats` lines that contain `part`, for a failing test to show.
    pub async fn stats_with(&self, part: &str) -> Result<String> {
        let stats = match self {
            Sidecar::Envoy(e) => e.admin_get("/stats").await?,
            Sidecar::Fsm(s) => s.admin_get("/stats").await?,
        };
        Ok(stats
            .lines()
            .filter(|l| l.contains(part))
            .map(|l| format!("{l}\n"))
            .collect())
    }
}
