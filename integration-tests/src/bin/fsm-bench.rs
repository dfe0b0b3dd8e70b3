//! `make bench`: the control plane's figures, measured with real processes on loopback.
//!
//! * `watch-latency`: an endpoint change made through the API server (or a manifest edit), until
//!   a real Envoy sidecar has ACKed the new endpoints; median of N changes.
//! * `controller-memory`: resident memory of fsm-controller with a large cluster loaded through
//!   the test API server, beside an empty cluster's.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::{Parser, Subcommand};
use fsm_catalog::CatalogSettings;
use fsm_integration_tests::cluster::{self, TestCluster, find};
use fsm_integration_tests::{
    AdsMode, Controller, ControllerOptions, SidecarConfig, load_catalog, mesh_pods,
    start_controller, start_controller_on_cluster, start_envoy,
};
use serde_json::{Value, json};

const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
const CONVERGE: Duration = Duration::from_secs(30);

/// Measures the control plane (see BENCHMARKS.md for recorded figures).
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand, Debug)]
enum Bench {
    /// Endpoint change -> Envoy EDS ACK, through the test API server and through a manifest edit.
    WatchLatency {
        /// Number of endpoint changes per source.
        #[arg(long, default_value_t = 20)]
        changes: usize,
    },
    /// Controller RSS with SERVICES services of PODS_PER_SERVICE pods each, loaded through the
    /// test API server.
    ControllerMemory {
        #[arg(long, default_value_t = 1000)]
        services: usize,
        #[arg(long, default_value_t = 5)]
        pods_per_service: usize,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    match Args::parse().bench {
        Bench::WatchLatency { changes } => watch_latency(changes).await,
        Bench::ControllerMemory {
            services,
            pods_per_service,
        } => controller_memory(services, pods_per_service).await,
    }
}

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

async fn watch_latency(changes: usize) -> Result<()> {
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
        &SidecarConfig::for_pod(&curl, controller.ads_addr, AdsMode::Sotw)?,
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
        &SidecarConfig::for_pod(&curl, controller.ads_addr, AdsMode::Sotw)?,
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

/// `VmRSS` and `VmHWM` of a process, in MiB.
fn memory_of(pid: u32) -> Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<f64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("no {name} in /proc/{pid}/status"))?;
        let kb: f64 = line
            .split_whitespace()
            .nth(1)
            .context("malformed line")?
            .parse()?;
        Ok(kb / 1024.0)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// Objects of a large synthetic mesh: 10 monitored namespaces, `services` services with
/// `pods_per_service` pods each (and their Endpoints), addresses in 10.0.0.0/8 (never contacted).
fn synthetic_mesh(services: usize, pods_per_service: usize) -> Vec<Value> {
    let namespaces = 10.min(services.max(1));
    let mut objects = vec![
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "fsm-system"}}),
        json!({"apiVersion": "config.flomesh.io/v1alpha3", "kind": "MeshConfig",
               "metadata": {"name": "fsm-mesh-config", "namespace": "fsm-system"},
               "spec": {"traffic": {"enablePermissiveTrafficPolicyMode": true}}}),
    ];
    for n in 0..namespaces {
        objects.push(json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": format!("bench-{n}"), "labels": {"flomesh.io/monitored-by": "fsm"}}}));
    }
    let mut pod_index: u32 = 0;
    for s in 0..services {
        let namespace = format!("bench-{}", s % namespaces);
        let name = format!("svc-{s}");
        objects.push(json!({"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": name, "namespace": namespace}}));
        objects.push(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"selector": {"app": name},
                     "ports": [{"name": "http", "port": 8080, "appProtocol": "http"}]}}));
        let mut addresses = Vec::new();
        for p in 0..pods_per_service {
            pod_index += 1;
            let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + pod_index));
            let pod = format!("{name}-{p}");
            objects.push(json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": pod, "namespace": namespace,
                             "labels": {"app": name, "fsm-proxy-uuid": format!("00000000-0000-4000-8000-{pod_index:012x}")}},
                "spec": {"serviceAccountName": name,
                         "containers": [{"name": "app", "image": "bench/app:1",
                                         "ports": [{"name": "http", "containerPort": 8080}]}]},
                "status": {"phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}]}}));
            addresses.push(json!({"ip": ip.to_string(),
                "targetRef": {"kind": "Pod", "name": pod, "namespace": namespace}}));
        }
        objects.push(json!({"apiVersion": "v1", "kind": "Endpoints",
            "metadata": {"name": name, "namespace": namespace},
            "subsets": [{"addresses": addresses, "ports": [{"name": "http", "port": 8080}]}]}));
    }
    objects
}

async fn controller_memory(services: usize, pods_per_service: usize) -> Result<()> {
    let mut figures = Vec::new();
    for (label, services) in [("empty cluster", 0), ("loaded cluster", services)] {
        let c = TestCluster::start_demo(17).await?;
        let objects = synthetic_mesh(services, pods_per_service);
        let store = c.server.store();
        let loading = Instant::now();
        for object in &objects {
            if let Err(e) = store.apply(object) {
                bail!(
                    "loading {} {}: {e:?}",
                    object["kind"],
                    object["metadata"]["name"]
                );
            }
        }
        let loaded_in = loading.elapsed();
        let started = Instant::now();
        let controller =
            start_controller_on_cluster(&c.kubeconfig, &c.logs, &ControllerOptions::default())
                .await?;
        let ready_in = started.elapsed();
        // Let the initial lists' buffers be released and the allocator settle.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (rss, hwm) = memory_of(controller.process.pid())?;
        figures.push(format!(
            "  {label:14}: {services} services, {} pods, {} objects (store load {:.1}s): controller ready in {:.2}s, RSS {rss:.1} MiB (peak {hwm:.1} MiB)",
            services * pods_per_service,
            objects.len(),
            loaded_in.as_secs_f64(),
            ready_in.as_secs_f64()
        ));
    }
    println!("fsm-controller memory, objects loaded through the test API server:");
    for line in figures {
        println!("{line}");
    }
    Ok(())
}
