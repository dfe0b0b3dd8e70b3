//! `make bench`: the control plane's figures, measured with real processes on loopback.
//!
//! * `watch-latency`: an endpoint change made through the API server (or a manifest edit), until
//!   a real Envoy sidecar has ACKed the new endpoints; median of N changes.
//! * `controller-memory`: resident memory of fsm-controller with a large cluster loaded through
//!   the test API server, beside an empty cluster's.
//! * `sidecar-memory`: idle resident memory of fsm-sidecar and of Envoy, both configured for the
//!   same client identity in a mesh of 100+ services, in the same run.
//! * `sidecar-rps`: requests per second through one sidecar pinned to one core (Envoy and
//!   fsm-sidecar in turn), beside the direct path to the same app.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::{Parser, Subcommand};
use fsm_catalog::CatalogSettings;
use fsm_integration_tests::cluster::{self, TestCluster, find};
use fsm_integration_tests::mesh::MeshPod;
use fsm_integration_tests::paths::bin_dir;
use fsm_integration_tests::{
    AdsMode, Controller, ControllerOptions, FsmSidecar, FsmSidecarConfig, ManagedProcess,
    SidecarConfig, demo_manifests, load_catalog, mesh_pods, start_controller,
    start_controller_on_cluster, start_envoy,
};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
    /// Idle RSS of an Envoy and an fsm-sidecar serving the same client identity in a mesh with
    /// SERVICES extra HTTP services (beside the demo mesh's).
    SidecarMemory {
        #[arg(long, default_value_t = 100)]
        services: usize,
        #[command(flatten)]
        sidecar: SidecarArgs,
    },
    /// Service certificates issued by Tresor through the certificate manager, one identity each
    /// (key generation and signing, as the controller does for a new service account).
    CertIssuance {
        #[arg(long, default_value_t = 500)]
        count: usize,
    },
    /// Requests per second through one sidecar pinned to CPU 0 (load generator and app on CPU 1):
    /// direct to the app, through Envoy and through fsm-sidecar, RUNS rounds each.
    SidecarRps {
        /// Keep-alive HTTP/1.1 connections.
        #[arg(long, default_value_t = 16)]
        connections: usize,
        /// Measured seconds per run (after a 2 s warm-up).
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Rounds; each measures every path once, and per path the run with the median req/s is
        /// reported.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Load generator: `wrk` when installed, else the built-in reqwest one.
        #[arg(long, value_enum, default_value_t = Load::Auto)]
        load: Load,
        #[command(flatten)]
        sidecar: SidecarArgs,
    },
}

#[derive(clap::Args, Debug)]
struct SidecarArgs {
    /// The fsm-sidecar binary to measure (default: the one next to this binary). Point it at
    /// `target/release/fsm-sidecar` for figures comparable with the release Envoy build.
    #[arg(long)]
    sidecar_bin: Option<PathBuf>,
    /// fsm-sidecar's tokio worker threads (Envoy runs with `--concurrency 1`).
    #[arg(long, default_value_t = 1)]
    workers: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Load {
    Auto,
    Wrk,
    Builtin,
}

#[tokio::main]
async fn main() -> Result<()> {
    match Args::parse().bench {
        Bench::WatchLatency { changes } => watch_latency(changes).await,
        Bench::ControllerMemory {
            services,
            pods_per_service,
        } => controller_memory(services, pods_per_service).await,
        Bench::SidecarMemory { services, sidecar } => sidecar_memory(services, &sidecar).await,
        Bench::CertIssuance { count } => cert_issuance(count).await,
        Bench::SidecarRps {
            connections,
            seconds,
            runs,
            load,
            sidecar,
        } => {
            let plan = LoadPlan {
                connections,
                duration: Duration::from_secs(seconds),
                load,
            };
            sidecar_rps(&plan, runs, &sidecar).await
        }
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

/// `VmRSS` and `VmHWM` of a process, in MiB.
fn memory_of(pid: u32) -> Result<(f64, f64)> {
    let field = |name: &str| -> Result<f64> {
        let kib = fsm_integration_tests::process::proc_status_kib(pid, name)
            .with_context(|| format!("no {name} in /proc/{pid}/status"))?;
        Ok(kib as f64 / 1024.0)
    };
    Ok((field("VmRSS")?, field("VmHWM")?))
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

// === data plane ===

/// Pod address of Envoy's client in the data-plane benches (`curl` in the demo mesh).
const CLIENT: &str = "curl";
/// A second pod of the same service account, for the fsm-sidecar: same identity, same config.
const CLIENT_FSM: &str = "curl-fsm";
/// The unmeshed upstream of `sidecar-rps`, and the Host the client asks the sidecar for.
const APP_SERVICE: &str = "bench-app";
const APP_PORT: u16 = 14001;
const APP_HOST: &str = "bench-app.demo:14001";

fn to_yaml_docs(objects: &[Value]) -> String {
    // JSON is YAML; one document per object.
    objects
        .iter()
        .map(Value::to_string)
        .collect::<Vec<_>>()
        .join("\n---\n")
}

/// The demo mesh on 127.0.`subnet`.x, plus: a second `curl` pod (`curl-fsm`, .11) with its own
/// proxy UUID; the `bench-app` Service in `demo` whose only endpoint is an unmeshed pod (.20,
/// `flomesh.io/sidecar-injection: disabled`), so a client sidecar connects straight to the app;
/// and `services` extra HTTP services in the monitored namespace `bench`, one pod each on
/// 127.0.`subnet + 1 + i / 250`.x, where nothing listens.
fn bench_manifests(dir: &Path, subnet: u8, services: usize) -> Result<()> {
    demo_manifests(dir, subnet)?;
    let ip = |third: usize, fourth: usize| format!("127.0.{third}.{fourth}");
    let mut objects = vec![
        json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": CLIENT_FSM, "namespace": "demo",
                         "labels": {"app": CLIENT, "fsm-proxy-uuid": "6a1f3c2e-1b7d-4c1e-9a3f-0c5d2e8b7a11"}},
            "spec": {"serviceAccountName": CLIENT, "containers": [{"name": "curl", "image": "curlimages/curl"}]},
            "status": {"podIP": ip(subnet.into(), 11)}}),
        json!({"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": APP_SERVICE, "namespace": "demo"}}),
        json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": APP_SERVICE, "namespace": "demo"},
            "spec": {"selector": {"app": APP_SERVICE},
                     "ports": [{"name": "http", "port": APP_PORT, "targetPort": APP_PORT, "appProtocol": "http"}]}}),
        json!({"apiVersion": "v1", "kind": "Endpoints",
            "metadata": {"name": APP_SERVICE, "namespace": "demo"},
            "subsets": [{"addresses": [{"ip": ip(subnet.into(), 20),
                                        "targetRef": {"kind": "Pod", "name": APP_SERVICE, "namespace": "demo"}}],
                         "ports": [{"name": "http", "port": APP_PORT}]}]}),
        json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": APP_SERVICE, "namespace": "demo", "labels": {"app": APP_SERVICE},
                         "annotations": {"flomesh.io/sidecar-injection": "disabled"}},
            "spec": {"serviceAccountName": APP_SERVICE,
                     "containers": [{"name": "app", "image": "bench/app:1",
                                     "ports": [{"name": "http", "containerPort": APP_PORT}]}]},
            "status": {"phase": "Running", "podIP": ip(subnet.into(), 20)}}),
    ];
    if services > 0 {
        objects.push(json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "bench", "labels": {"flomesh.io/monitored-by": "fsm"}}}));
    }
    for s in 0..services {
        let name = format!("svc-{s}");
        let pod_ip = ip(usize::from(subnet) + 1 + s / 250, 1 + s % 250);
        objects.push(json!({"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": name, "namespace": "bench"}}));
        objects.push(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "bench"},
            "spec": {"selector": {"app": name},
                     "ports": [{"name": "http", "port": 8080, "appProtocol": "http"}]}}));
        objects.push(json!({"apiVersion": "v1", "kind": "Endpoints",
            "metadata": {"name": name, "namespace": "bench"},
            "subsets": [{"addresses": [{"ip": pod_ip,
                                        "targetRef": {"kind": "Pod", "name": format!("{name}-0"), "namespace": "bench"}}],
                         "ports": [{"name": "http", "port": 8080}]}]}));
        objects.push(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("{name}-0"), "namespace": "bench",
                         "labels": {"app": name, "fsm-proxy-uuid": format!("00000000-0000-4000-8000-{s:012x}")}},
            "spec": {"serviceAccountName": name,
                     "containers": [{"name": "app", "image": "bench/app:1",
                                     "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"phase": "Running", "podIP": pod_ip}}));
    }
    std::fs::write(dir.join("50-bench.yaml"), to_yaml_docs(&objects))?;
    Ok(())
}

/// The mesh of [`bench_manifests`] with the controller running on it.
struct BenchMesh {
    _dir: tempfile::TempDir,
    logs: PathBuf,
    controller: Controller,
    pods: Vec<MeshPod>,
}

impl BenchMesh {
    async fn start(subnet: u8, services: usize) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("fsm-bench-").tempdir()?;
        let manifests = dir.path().join("manifests");
        let logs = dir.path().join("logs");
        bench_manifests(&manifests, subnet, services)?;
        let pods = mesh_pods(&load_catalog(&manifests, CatalogSettings::default())?);
        let controller = start_controller(&manifests, &logs, &ControllerOptions::default()).await?;
        Ok(BenchMesh {
            _dir: dir,
            logs,
            controller,
            pods,
        })
    }

    fn pod(&self, name: &str) -> Result<&MeshPod> {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .with_context(|| format!("no pod {name} in the bench manifests"))
    }

    async fn envoy(&self) -> Result<fsm_integration_tests::Envoy> {
        let pod = self.pod(CLIENT)?;
        let mut envoy = start_envoy(
            &SidecarConfig::for_pod(pod, &self.controller.ads(), AdsMode::Sotw)?,
            &self.logs,
        )
        .await?;
        envoy.wait_ready(CONVERGE).await?;
        wait_proxy_in_sync(&self.controller, pod).await?;
        Ok(envoy)
    }

    /// Starts `sidecar.sidecar_bin` the way the harness's `start_fsm_sidecar` starts the debug
    /// build, with `--workers` and `--log-level warn`.
    async fn fsm_sidecar(&self, sidecar: &SidecarArgs) -> Result<FsmSidecar> {
        let pod = self.pod(CLIENT_FSM)?;
        let config = FsmSidecarConfig::for_pod(pod, &self.controller.ads(), AdsMode::Sotw)?;
        let bin = match &sidecar.sidecar_bin {
            Some(bin) => bin.clone(),
            None => bin_dir()?.join("fsm-sidecar"),
        };
        ensure!(bin.is_file(), "fsm-sidecar not found at {}", bin.display());
        let mut command = Command::new(&bin);
        command
            .arg("--node-id")
            .arg(&config.node_id)
            .arg("--node-cluster")
            .arg(&config.node_cluster)
            .arg("--ads")
            .arg(config.ads.to_string())
            .args(["--ads-mode", "sotw"])
            .arg("--pod-ip")
            .arg(config.pod_ip.to_string())
            .arg("--pod-name")
            .arg(&config.pod_name)
            .arg("--admin")
            .arg(config.admin.to_string())
            .arg("--metrics")
            .arg(config.metrics.to_string())
            .arg("--workers")
            .arg(sidecar.workers.to_string())
            .args(["--log-level", "warn"]);
        let process =
            ManagedProcess::spawn(&format!("fsm-sidecar-{}", config.name), command, &self.logs)?;
        let mut fsm = FsmSidecar { process, config };
        fsm.process
            .wait_for_tcp(fsm.config.admin, Duration::from_secs(20))
            .await?;
        fsm.wait_ready(CONVERGE).await?;
        wait_proxy_in_sync(&self.controller, pod).await?;
        Ok(fsm)
    }
}

/// Waits until the controller reports the pod's proxy connected and in sync on every type it
/// subscribed to; returns the number of types.
async fn wait_proxy_in_sync(controller: &Controller, pod: &MeshPod) -> Result<usize> {
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

fn sidecar_label(sidecar: &SidecarArgs) -> String {
    let bin = sidecar
        .sidecar_bin
        .clone()
        .or_else(|| bin_dir().ok().map(|d| d.join("fsm-sidecar")))
        .unwrap_or_default();
    format!("{} (--workers {})", bin.display(), sidecar.workers)
}

async fn sidecar_memory(services: usize, sidecar: &SidecarArgs) -> Result<()> {
    let mesh = BenchMesh::start(60, services).await?;
    let envoy = mesh.envoy().await?;
    let fsm = mesh.fsm_sidecar(sidecar).await?;
    // Both must hold the whole config at once, and nothing may still be arriving.
    wait_proxy_in_sync(&mesh.controller, mesh.pod(CLIENT)?).await?;
    wait_proxy_in_sync(&mesh.controller, mesh.pod(CLIENT_FSM)?).await?;
    // Measured before any admin call: building a config dump allocates in both.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (envoy_rss, envoy_hwm) = memory_of(envoy.process.pid())?;
    let (fsm_rss, fsm_hwm) = memory_of(fsm.process.pid())?;
    // Then check both hold the whole mesh.
    let clusters = envoy.active_clusters().await?.len();
    ensure!(
        clusters > services,
        "Envoy has {clusters} clusters, fewer than the {services} services"
    );
    // fsm-sidecar's resources per type, e.g. `Cluster: 103`: the same mesh, in its own types.
    let dump = fsm.config_dump().await?;
    let mut held = Vec::new();
    let mut fsm_clusters = 0;
    for (type_url, state) in dump["types"].as_object().into_iter().flatten() {
        let kind = type_url.rsplit('.').next().unwrap_or(type_url);
        let count = state["resources"].as_array().map_or(0, Vec::len);
        if kind == "Cluster" {
            fsm_clusters = count;
        }
        held.push(format!("{kind}: {count}"));
    }
    ensure!(
        fsm_clusters > services,
        "fsm-sidecar has {fsm_clusters} clusters, fewer than the {services} services"
    );
    println!(
        "idle sidecar memory, client {} with {services} extra services ({clusters} Envoy clusters), 2 s after both were in sync:",
        mesh.pod(CLIENT)?.node_cluster()
    );
    println!("  fsm-sidecar holds {}", held.join(", "));
    println!("  envoy (--concurrency 1): RSS {envoy_rss:.1} MiB (peak {envoy_hwm:.1} MiB)");
    println!(
        "  fsm-sidecar:             RSS {fsm_rss:.1} MiB (peak {fsm_hwm:.1} MiB)  [{}]",
        sidecar_label(sidecar)
    );
    println!(
        "  fsm-sidecar / envoy:     RSS {:.3}x, peak {:.3}x",
        fsm_rss / envoy_rss,
        fsm_hwm / envoy_hwm
    );
    Ok(())
}

/// Pins every thread of `pid` to `cpu` with `taskset -a -p`.
fn pin(pid: u32, cpu: u32) -> Result<()> {
    let output = Command::new("taskset")
        .args(["-a", "-p", "-c", &cpu.to_string(), &pid.to_string()])
        .output()
        .context("running taskset (util-linux)")?;
    ensure!(
        output.status.success(),
        "taskset -a -p -c {cpu} {pid}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// User plus system CPU time of a process.
fn cpu_time(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("malformed /proc/<pid>/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks =
        |i: usize| -> Result<u64> { Ok(fields.get(i).context("short /proc/<pid>/stat")?.parse()?) };
    // Linux reports these in USER_HZ, which is 100 on every supported architecture.
    let total = ticks(11)? + ticks(12)?;
    Ok(Duration::from_millis(total * 10))
}

/// Time one CPU spent in processes (user, nice, system, steal) and in interrupts (irq, softirq,
/// where the kernel does most of loopback TCP's receive work), from `/proc/stat`.
fn cpu_busy(cpu: u32) -> Result<(Duration, Duration)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with(&format!("cpu{cpu} ")))
        .with_context(|| format!("no cpu{cpu} in /proc/stat"))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let sum = |fields: &[usize]| -> Duration {
        // USER_HZ is 100.
        Duration::from_millis(fields.iter().filter_map(|&i| ticks.get(i)).sum::<u64>() * 10)
    };
    Ok((sum(&[0, 1, 2, 7]), sum(&[5, 6])))
}

/// A minimal HTTP/1.1 keep-alive server: every request (no body expected) gets the same small
/// 200. As little work per request as an app can do, so the sidecar's cost stands out.
async fn serve_fixed(listener: tokio::net::TcpListener) {
    const RESPONSE: &[u8] =
        b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 13\r\n\r\nhello, mesh!\n";
    while let Ok((mut stream, _)) = listener.accept().await {
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 16 * 1024];
            let mut filled = 0;
            loop {
                let Ok(n) = stream.read(&mut buf[filled..]).await else {
                    return;
                };
                if n == 0 {
                    return;
                }
                filled += n;
                let mut replies = 0;
                let mut start = 0;
                while let Some(end) = buf[start..filled].windows(4).position(|w| w == b"\r\n\r\n") {
                    replies += 1;
                    start += end + 4;
                }
                buf.copy_within(start..filled, 0);
                filled -= start;
                if filled == buf.len() {
                    return;
                }
                for _ in 0..replies {
                    if stream.write_all(RESPONSE).await.is_err() {
                        return;
                    }
                }
            }
        });
    }
}

struct LoadPlan {
    connections: usize,
    duration: Duration,
    load: Load,
}

/// One measured run.
#[derive(Clone, Debug)]
struct Run {
    rps: f64,
    p50: Duration,
    p99: Duration,
    errors: u64,
    /// CPU time the sidecar used per second of the run (1.0 = one full core).
    sidecar_cores: Option<f64>,
    /// CPU 0's process time per second of the run not spent in the sidecar: other processes
    /// competing for the sidecar's core (the machine is shared).
    other_on_cpu0: Option<f64>,
    /// CPU 0's interrupt time per second of the run (mostly loopback TCP).
    irq_on_cpu0: Option<f64>,
}

fn wrk_available() -> bool {
    Command::new("wrk")
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("wrk"))
}

/// `512.00us`, `1.20ms`, `2.00s` as printed by wrk.
fn parse_wrk_duration(text: &str) -> Result<Duration> {
    let (number, scale) = if let Some(n) = text.strip_suffix("us") {
        (n, 1e-6)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1.0)
    } else {
        bail!("unknown wrk duration {text:?}")
    };
    Ok(Duration::from_secs_f64(number.parse::<f64>()? * scale))
}

/// Runs wrk (one thread, pinned to CPU 1) against `url` with the bench's Host header.
async fn wrk(url: &str, plan: &LoadPlan, duration: Duration) -> Result<Run> {
    let output = tokio::process::Command::new("taskset")
        .args(["-c", "1", "wrk", "-t1", "--latency", "-H"])
        .arg(format!("Host: {APP_HOST}"))
        .arg(format!("-c{}", plan.connections))
        .arg(format!("-d{}s", duration.as_secs().max(1)))
        .arg(url)
        .output()
        .await
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    ensure!(
        output.status.success(),
        "wrk failed: {text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let value_after = |prefix: &str| -> Result<&str> {
        text.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(prefix))
            .map(str::trim)
            .with_context(|| format!("no {prefix:?} in wrk output:\n{text}"))
    };
    let errors = text
        .lines()
        .map(str::trim)
        .filter_map(|l| l.strip_prefix("Non-2xx or 3xx responses:"))
        .filter_map(|n| n.trim().parse::<u64>().ok())
        .sum::<u64>()
        + text
            .lines()
            .map(str::trim)
            .filter_map(|l| l.strip_prefix("Socket errors:"))
            .flat_map(|l| l.split(','))
            .filter_map(|kv| kv.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum::<u64>();
    Ok(Run {
        rps: value_after("Requests/sec:")?.parse()?,
        p50: parse_wrk_duration(value_after("50%")?)?,
        p99: parse_wrk_duration(value_after("99%")?)?,
        errors,
        sidecar_cores: None,
        other_on_cpu0: None,
        irq_on_cpu0: None,
    })
}

/// The built-in load generator: `connections` tasks on a keep-alive reqwest pool, each sending
/// one request at a time (this process is pinned to CPU 1).
async fn builtin_load(url: &str, plan: &LoadPlan, duration: Duration) -> Result<Run> {
    let client = reqwest::Client::builder()
        .http1_only()
        .no_proxy()
        .pool_max_idle_per_host(plan.connections)
        .timeout(Duration::from_secs(5))
        .build()?;
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..plan.connections {
        let (client, url) = (client.clone(), url.to_string());
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0u64;
            while Instant::now() < deadline {
                let sent = Instant::now();
                let ok = match client.get(&url).header("host", APP_HOST).send().await {
                    Ok(response) => {
                        let ok = response.status().is_success();
                        ok && response.bytes().await.is_ok()
                    }
                    Err(_) => false,
                };
                if ok {
                    latencies.push(sent.elapsed());
                } else {
                    errors += 1;
                }
            }
            (latencies, errors)
        });
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    while let Some(joined) = tasks.join_next().await {
        let (l, e) = joined?;
        latencies.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed();
    latencies.sort();
    let quantile = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    Ok(Run {
        rps: latencies.len() as f64 / elapsed.as_secs_f64(),
        p50: quantile(0.50),
        p99: quantile(0.99),
        errors,
        sidecar_cores: None,
        other_on_cpu0: None,
        irq_on_cpu0: None,
    })
}

/// A 2 s warm-up, then one measured run against `target`; `sidecar` is the pid whose CPU time
/// is sampled over the measured run.
async fn measure(target: SocketAddr, plan: &LoadPlan, sidecar: Option<u32>) -> Result<Run> {
    let url = format!("http://{target}/");
    let use_wrk = match plan.load {
        Load::Wrk => true,
        Load::Builtin => false,
        Load::Auto => wrk_available(),
    };
    let run = |duration| {
        let url = url.clone();
        async move {
            if use_wrk {
                wrk(&url, plan, duration).await
            } else {
                builtin_load(&url, plan, duration).await
            }
        }
    };
    run(Duration::from_secs(2)).await?;
    let cpu_before = sidecar.map(cpu_time).transpose()?;
    let cpu0_before = cpu_busy(0)?;
    let started = Instant::now();
    let mut measured = run(plan.duration).await?;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu0_after = cpu_busy(0)?;
    let per_second =
        |after: Duration, before: Duration| after.saturating_sub(before).as_secs_f64() / elapsed;
    let cpu0 = per_second(cpu0_after.0, cpu0_before.0);
    measured.irq_on_cpu0 = Some(per_second(cpu0_after.1, cpu0_before.1));
    let mut sidecar_cores = 0.0;
    if let (Some(pid), Some(before)) = (sidecar, cpu_before) {
        sidecar_cores = cpu_time(pid)?.saturating_sub(before).as_secs_f64() / elapsed;
        measured.sidecar_cores = Some(sidecar_cores);
    }
    measured.other_on_cpu0 = Some((cpu0 - sidecar_cores).max(0.0));
    Ok(measured)
}

fn run_line(run: &Run) -> String {
    let sidecar = run.sidecar_cores.map_or(String::new(), |cores| {
        format!(
            ", sidecar CPU {:.0} % ({:.0} req per CPU-second)",
            cores * 100.0,
            run.rps / cores
        )
    });
    let other = run.other_on_cpu0.map_or(String::new(), |other| {
        format!(
            "; CPU 0: other processes {:.0} %, interrupts {:.0} %",
            other * 100.0,
            run.irq_on_cpu0.unwrap_or_default() * 100.0
        )
    });
    format!(
        "{:>8.0} req/s, p50 {:.2} ms, p99 {:.2} ms, errors {}{sidecar}{other}",
        run.rps,
        ms(run.p50),
        ms(run.p99),
        run.errors
    )
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The run with the median requests per second.
fn median_run(runs: &[Run]) -> Option<Run> {
    let mut sorted = runs.to_vec();
    sorted.sort_by(|a, b| a.rps.total_cmp(&b.rps));
    sorted.get(sorted.len() / 2).cloned()
}

async fn sidecar_rps(plan: &LoadPlan, runs: usize, sidecar: &SidecarArgs) -> Result<()> {
    ensure!(runs > 0, "--runs must be at least 1");
    if std::thread::available_parallelism().map_or(1, usize::from) < 2 {
        bail!("sidecar-rps needs two CPUs: the sidecar on CPU 0, load and app on CPU 1");
    }
    // This process (app, and the built-in load generator if used) and the controller on CPU 1.
    pin(std::process::id(), 1)?;
    let mesh = BenchMesh::start(61, 0).await?;
    pin(mesh.controller.process.pid(), 1)?;
    let app_addr = SocketAddr::new(mesh.pod(APP_SERVICE)?.ip, APP_PORT);
    let listener = tokio::net::TcpListener::bind(app_addr).await?;
    tokio::spawn(serve_fixed(listener));

    let envoy = mesh.envoy().await?;
    let fsm = mesh.fsm_sidecar(sidecar).await?;
    pin(envoy.process.pid(), 0)?;
    pin(fsm.process.pid(), 0)?;
    let paths: [(&str, SocketAddr, Option<u32>); 3] = [
        ("direct", app_addr, None),
        (
            "envoy",
            mesh.pod(CLIENT)?.outbound_addr(),
            Some(envoy.process.pid()),
        ),
        (
            "fsm-sidecar",
            mesh.pod(CLIENT_FSM)?.outbound_addr(),
            Some(fsm.process.pid()),
        ),
    ];
    let generator = match plan.load {
        Load::Wrk => "wrk",
        Load::Builtin => "built-in (reqwest)",
        Load::Auto if wrk_available() => "wrk",
        Load::Auto => "built-in (reqwest)",
    };
    if !generator.starts_with("wrk") {
        eprintln!(
            "note: the built-in load generator saturates CPU 1 well below the sidecars' capacity; install wrk for throughput figures"
        );
    }
    let mut results: Vec<Vec<Run>> = vec![Vec::new(); paths.len()];
    for round in 1..=runs {
        for ((name, target, pid), runs) in paths.iter().zip(&mut results) {
            let run = measure(*target, plan, *pid).await?;
            eprintln!("round {round} {name:12}: {}", run_line(&run));
            runs.push(run);
        }
    }
    let medians: Vec<Run> = results.iter().filter_map(|r| median_run(r)).collect();
    println!(
        "HTTP/1.1 GET through one sidecar on CPU 0 ({generator}, {} keep-alive connections, {} s after 2 s warm-up, median of {runs} by req/s); load, app and controller on CPU 1:",
        plan.connections,
        plan.duration.as_secs()
    );
    for ((name, _, _), run) in paths.iter().zip(&medians) {
        println!("  {name:12}: {}", run_line(run));
    }
    if let [_, envoy_run, fsm_run] = medians.as_slice() {
        let per_core = |r: &Run| r.sidecar_cores.map_or(f64::NAN, |c| r.rps / c);
        println!(
            "  fsm-sidecar / envoy: {:.2}x req/s, {:.2}x req per sidecar CPU-second, p50 {:.2}x, p99 {:.2}x  [{}]",
            fsm_run.rps / envoy_run.rps,
            per_core(fsm_run) / per_core(envoy_run),
            ms(fsm_run.p50) / ms(envoy_run.p50),
            ms(fsm_run.p99) / ms(envoy_run.p99),
            sidecar_label(sidecar)
        );
    }
    Ok(())
}

async fn cert_issuance(count: usize) -> Result<()> {
    let provider = fsm_certs::tresor::TresorProvider::generate()?;
    let certs = fsm_certs::CertManager::new(std::sync::Arc::new(provider), Default::default());
    let validity = Duration::from_secs(24 * 3600);
    let mut micros = Vec::with_capacity(count);
    let started = Instant::now();
    for i in 0..count {
        let t = Instant::now();
        certs
            .issue_service_certificate(&format!("sa-{i}"), "bench", "cluster.local", validity)
            .await?;
        micros.push(t.elapsed().as_micros() as u64);
    }
    let total = started.elapsed();
    micros.sort_unstable();
    let at = |q: f64| micros[((micros.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "cert-issuance: {count} Tresor service certificates (P-256 key + signature) in {:.2} s: median {} us, p99 {} us, max {} us per certificate",
        total.as_secs_f64(),
        at(0.5),
        at(0.99),
        micros.last().copied().unwrap_or(0)
    );
    Ok(())
}
