//! `watch-latency`: an endpoint change made through the API server (or a manifest edit), until a
//! real Envoy sidecar has ACKed the new endpoints; median of N changes.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use fsm_catalog::CatalogSettings;
use fsm_integration_tests::cluster::{self, TestCluster, find};
use fsm_integration_tests::{
    AdsMode, Controller, ControllerOptions, SidecarConfig, load_catalog, mesh_pods,
    start_controller, start_controller_on_cluster, start_envoy,
};
use serde_json::json;

use crate::CONVERGE;

const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

struct Summary(Vec<Duration>);

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut sorted = self.0.clone();
        sorted.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        match (sorted.first(), sorted.last()) {
            (Some(min), Some(max)) => write!(
                f,
                "n={} median {:.1} ms, min {:.1} ms, max {:.1} ms",
                sorted.len(),
                ms(sorted[sorted.len() / 2]),
                ms(*min),
                ms(*max)
            ),
            _ => write!(f, "no samples"),
        }
    }
}

/// Times `changes` alternating endpoint changes made by `change(round)` until the curl sidecar has
/// ACKed a new EDS version.
async fn time_changes<F, Fut>(
    controller: &Controller,
    uuid: &str,
    changes: usize,
    mut change: F,
) -> Result<Summary>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let mut samples = Vec::with_capacity(changes);
    for round in 0..changes {
        let before = wait_in_sync(controller, uuid).await?;
        let started = Instant::now();
        change(round).await?;
        loop {
            if let Some(now) = controller.in_sync_version(uuid, EDS).await?
                && now != before
            {
                break;
            }
            ensure!(
                started.elapsed() < CONVERGE,
                "EDS not re-ACKed after change {round}"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        samples.push(started.elapsed());
    }
    Ok(Summary(samples))
}

async fn wait_in_sync(controller: &Controller, uuid: &str) -> Result<String> {
    let started = Instant::now();
    loop {
        if let Some(version) = controller.in_sync_version(uuid, EDS).await? {
            return Ok(version);
        }
        ensure!(started.elapsed() < CONVERGE, "proxy {uuid} never in sync");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub(crate) async fn watch_latency(changes: usize) -> Result<()> {
    let c = TestCluster::start_demo(16).await?;
    cluster::apply_all(&c.client, &c.objects).await?;
    let catalog = load_catalog(&c.manifests, CatalogSettings::default())?;
    let curl = mesh_pods(&catalog)
        .into_iter()
        .find(|p| p.name == "curl")
        .context("curl pod")?;
    let uuid = curl.proxy_uuid.clone().context("curl has no proxy UUID")?;

    // Through the API server.
    let controller =
        start_controller_on_cluster(&c.kubeconfig, &c.logs, &ControllerOptions::default()).await?;
    let mut envoy = start_envoy(
        &SidecarConfig::for_pod(&curl, &controller.ads(), AdsMode::Sotw)?,
        &c.logs,
    )
    .await?;
    envoy.wait_ready(CONVERGE).await?;
    let endpoints = find(&c.objects, "Endpoints", "httpbin")?.clone();
    let both = endpoints["subsets"].clone();
    let mut one = both.clone();
    if let Some(addresses) = one[0]["addresses"].as_array_mut() {
        addresses.truncate(1);
    }
    let client = c.client.clone();
    let kube = time_changes(&controller, &uuid, changes, |round| {
        let subsets = if round % 2 == 0 { &one } else { &both };
        let patch = json!({ "subsets": subsets });
        let (client, endpoints) = (client.clone(), endpoints.clone());
        async move { cluster::merge_patch(&client, &endpoints, &patch).await }
    })
    .await?;
    drop(envoy);
    drop(controller);

    // Through a manifest edit, for comparison.
    let controller = start_controller(&c.manifests, &c.logs, &ControllerOptions::default()).await?;
    let mut envoy = start_envoy(
        &SidecarConfig::for_pod(&curl, &controller.ads(), AdsMode::Sotw)?,
        &c.logs,
    )
    .await?;
    envoy.wait_ready(CONVERGE).await?;
    let file = c.manifests.join("20-httpbin.yaml");
    let original = std::fs::read_to_string(&file)?;
    let v2_line = original
        .lines()
        .find(|l| l.contains("name: httpbin-v2") && l.contains("targetRef"))
        .context("no httpbin-v2 endpoint line in 20-httpbin.yaml")?
        .to_string();
    let v2_address = original
        .lines()
        .collect::<Vec<_>>()
        .windows(2)
        .find(|w| w[1] == v2_line)
        .map(|w| format!("{}\n{}\n", w[0], w[1]))
        .context("no address line before the httpbin-v2 targetRef")?;
    let manifests = time_changes(&controller, &uuid, changes, |round| {
        let text = if round % 2 == 0 {
            original.replacen(&v2_address, "", 1)
        } else {
            original.clone()
        };
        let file = file.clone();
        async move {
            let tmp = file.with_extension("tmp~");
            std::fs::write(&tmp, text)?;
            std::fs::rename(&tmp, &file)?;
            Ok(())
        }
    })
    .await?;

    println!("endpoint change -> Envoy EDS ACK (SotW), {changes} changes each:");
    println!("  test API server watch: {kube}");
    println!("  manifest file edit:    {manifests}");
    Ok(())
}
