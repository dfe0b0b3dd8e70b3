//! `make demo`: the demo mesh on one machine — control plane, workloads and real Envoy sidecars
//! (or fsm-sidecars with `--data-plane fsm-sidecar`)
//! on loopback addresses — followed by a traffic check.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use fsm_catalog::CatalogSettings;
use fsm_integration_tests::{
    AdsMode, AdsTarget, Controller, ControllerOptions, Envoy, FsmSidecar, FsmSidecarConfig,
    ManagedProcess, MeshPod, SidecarConfig, eventually, http_get_via, load_catalog, mesh_pods,
    repo_root, start_controller, start_demo_apps, start_envoy, start_fsm_sidecar, tcp_roundtrip,
};

/// Runs the FSM demo mesh locally and sends traffic through it.
///
/// Copies the demo manifests to WORK_DIR/manifests, starts fsm-controller on them, one
/// fsm-demo-app per pod with ports and one Envoy sidecar per meshed pod (each on the pod's
/// 127.0.10.x address), then sends HTTP and TCP traffic from the client pod's sidecar. Without
/// --once it keeps running until Ctrl-C; edit WORK_DIR/manifests to change the mesh live.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Run the traffic check once and exit 0 (passed) or 1 (failed); for tests and CI.
    #[arg(long)]
    once: bool,
    /// Manifests to copy into the working directory [default: examples/demo].
    #[arg(long, value_name = "DIR")]
    manifests: Option<PathBuf>,
    /// Working directory; its manifests/ and logs/ are replaced on every start [default: .demo].
    #[arg(long, value_name = "DIR")]
    work_dir: Option<PathBuf>,
    /// Which sidecar runs next to each meshed pod.
    #[arg(long, value_enum, default_value_t = DataPlane::Envoy)]
    data_plane: DataPlane,
    /// ADS flavour the sidecars speak.
    #[arg(long, value_enum, default_value_t = AdsMode::Sotw)]
    ads_mode: AdsMode,
    /// Pod that sends the traffic, as namespace/name.
    #[arg(long, default_value = "demo/curl")]
    client: String,
    /// Host header of the HTTP check: the service and port to reach.
    #[arg(long, default_value = "httpbin.demo:14001")]
    http_host: String,
    /// Path of the HTTP check's GETs.
    #[arg(long, default_value = "/get")]
    http_path: String,
    /// Number of HTTP requests to send.
    #[arg(long, default_value_t = 10)]
    requests: usize,
    /// Service port of the TCP check, reached at <client pod IP>:<port>; 0 skips the check.
    #[arg(long, default_value_t = 9000)]
    tcp_port: u16,
    /// Where the controller serves ADS; port 0 picks a free one.
    #[arg(long, default_value = "127.0.0.1:15128", value_name = "ADDR")]
    ads_listen: SocketAddr,
    /// Where the controller serves health, /metrics and /debug; port 0 picks a free one.
    #[arg(long, default_value = "127.0.0.1:9091", value_name = "ADDR")]
    http_listen: SocketAddr,
    /// Seconds to wait for each stage (controller ready, sidecars configured, first response).
    #[arg(long, default_value_t = 30)]
    timeout: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum DataPlane {
    /// Envoy 1.40, served the Envoy xDS types.
    Envoy,
    /// Our own fsm-sidecar (dataplane-rs), served the native fsm.dataplane.v1 types.
    FsmSidecar,
}

/// A running sidecar of either data plane; stopped on drop.
enum Sidecar {
    Envoy(Envoy),
    Fsm(FsmSidecar),
}

impl Sidecar {
    async fn start(
        plane: DataPlane,
        pod: &MeshPod,
        ads: &AdsTarget,
        mode: AdsMode,
        logs: &Path,
    ) -> Result<Sidecar> {
        Ok(match plane {
            DataPlane::Envoy => {
                Sidecar::Envoy(start_envoy(&SidecarConfig::for_pod(pod, ads, mode)?, logs).await?)
            }
            DataPlane::FsmSidecar => Sidecar::Fsm(
                start_fsm_sidecar(&FsmSidecarConfig::for_pod(pod, ads, mode)?, logs).await?,
            ),
        })
    }

    async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        match self {
            Sidecar::Envoy(envoy) => envoy.wait_ready(timeout).await,
            Sidecar::Fsm(sidecar) => sidecar.wait_ready(timeout).await,
        }
    }
}

/// Everything started; dropping it stops all processes.
struct Mesh {
    controller: Controller,
    _apps: Vec<ManagedProcess>,
    sidecars: Vec<(MeshPod, Sidecar)>,
    manifest_dir: PathBuf,
    log_dir: PathBuf,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(err) => {
            eprintln!("\nfsm-demo failed: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<bool> {
    let root = repo_root();
    let work_dir = args.work_dir.clone().unwrap_or_else(|| root.join(".demo"));
    let source = args
        .manifests
        .clone()
        .unwrap_or_else(|| root.join("examples/demo"));
    let timeout = Duration::from_secs(args.timeout);

    let mesh = start_mesh(&args, &source, &work_dir, timeout).await?;
    let traffic_ok = traffic_check(&args, &mesh, timeout).await;
    let sync_ok = print_proxies(&mesh, timeout).await;
    let passed = traffic_ok && sync_ok;

    if args.once {
        println!(
            "\n{}",
            if passed {
                "demo check PASSED"
            } else {
                "demo check FAILED"
            }
        );
        if !passed {
            println!("logs: {}", mesh.log_dir.display());
        }
        return Ok(passed);
    }
    print_hints(&args, &mesh);
    wait_for_stop_signal().await?;
    println!("\nstopping the mesh");
    Ok(passed)
}

async fn start_mesh(
    args: &Args,
    source: &Path,
    work_dir: &Path,
    timeout: Duration,
) -> Result<Mesh> {
    let manifest_dir = work_dir.join("manifests");
    let log_dir = work_dir.join("logs");
    // A fresh copy each run: the demo must start from the known mesh, whatever was edited last time.
    for dir in [&manifest_dir, &log_dir] {
        if dir.exists() {
            std::fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
        }
    }
    copy_manifests(source, &manifest_dir)?;
    // The demo is for looking inside: its MeshConfig opens the controller's /debug endpoints
    // (FSM keeps them off by default), which the xDS table below reads.
    let debug = match fsm_integration_tests::mesh::enable_debug_server(&manifest_dir) {
        Ok(()) => "; MeshConfig spec.observability.enableDebugServer on",
        Err(_) => "",
    };
    step(
        1,
        &format!(
            "manifests copied from {} to {}{debug}",
            source.display(),
            manifest_dir.display()
        ),
    );

    let catalog = load_catalog(&manifest_dir, CatalogSettings::default())?;
    let pods = mesh_pods(&catalog);
    let fixed = |addr: SocketAddr| (addr.port() != 0).then_some(addr);
    let options = ControllerOptions {
        ads_addr: fixed(args.ads_listen),
        http_addr: fixed(args.http_listen),
        ..Default::default()
    };
    let controller = start_controller(&manifest_dir, &log_dir, &options).await?;
    step(
        2,
        &format!(
            "fsm-controller ready: ADS {}, HTTP http://{}",
            controller.ads_addr, controller.http_addr
        ),
    );

    let apps = start_demo_apps(&catalog, &log_dir).await?;
    for pod in pods.iter().filter(|p| !p.ports.is_empty()) {
        let ports: Vec<String> = pod
            .ports
            .iter()
            .map(|p| format!("{}/{:?}", p.port, p.protocol).to_lowercase())
            .collect();
        detail(&format!(
            "app {:<22} {:<14} {}",
            pod.id(),
            pod.ip,
            ports.join(" ")
        ));
    }
    step(3, &format!("{} demo apps listening", apps.len()));

    let mut sidecars = Vec::new();
    for pod in pods.into_iter().filter(|p| p.has_sidecar) {
        let sidecar = Sidecar::start(
            args.data_plane,
            &pod,
            &controller.ads(),
            args.ads_mode,
            &log_dir,
        )
        .await?;
        sidecars.push((pod, sidecar));
    }
    step(
        4,
        &format!(
            "{} {:?} sidecars started ({:?} ADS), waiting for their first configuration",
            sidecars.len(),
            args.data_plane,
            args.ads_mode
        ),
    );
    for (pod, sidecar) in &mut sidecars {
        sidecar
            .wait_ready(timeout)
            .await
            .with_context(|| format!("sidecar of {} never became ready", pod.id()))?;
        detail(&format!(
            "sidecar {:<18} admin http://{}  outbound {}",
            pod.id(),
            pod.admin_addr(),
            pod.outbound_addr()
        ));
    }
    step(5, "all sidecars configured (LIVE)");
    Ok(Mesh {
        controller,
        _apps: apps,
        sidecars,
        manifest_dir,
        log_dir,
    })
}

fn copy_manifests(source: &Path, target: &Path) -> Result<()> {
    std::fs::create_dir_all(target).with_context(|| format!("creating {}", target.display()))?;
    let entries =
        std::fs::read_dir(source).with_context(|| format!("reading {}", source.display()))?;
    for entry in entries {
        let path = entry
            .with_context(|| format!("listing {}", source.display()))?
            .path();
        if path.is_file()
            && let Some(name) = path.file_name()
        {
            std::fs::copy(&path, target.join(name))
                .with_context(|| format!("copying {}", path.display()))?;
        }
    }
    Ok(())
}

/// Sends the traffic and prints what happened; true when every check passed.
async fn traffic_check(args: &Args, mesh: &Mesh, timeout: Duration) -> bool {
    println!("\ntraffic from {}:", args.client);
    let Some(client) = mesh
        .sidecars
        .iter()
        .map(|(pod, _)| pod)
        .find(|pod| pod.id() == args.client)
    else {
        println!("  FAIL no meshed pod {} in the manifests", args.client);
        return false;
    };
    let http_ok = http_check(args, client, timeout).await;
    let tcp_ok = if args.tcp_port == 0 {
        true
    } else {
        tcp_check(args, client, timeout).await
    };
    println!("\nsummary:");
    println!(
        "  HTTP {} via {}: {}",
        args.http_host,
        client.outbound_addr(),
        verdict(http_ok)
    );
    if args.tcp_port != 0 {
        println!(
            "  TCP  via {}:{}: {}",
            client.ip,
            args.tcp_port,
            verdict(tcp_ok)
        );
    }
    http_ok && tcp_ok
}

async fn http_check(args: &Args, client: &MeshPod, timeout: Duration) -> bool {
    let via = client.outbound_addr();
    println!(
        "  HTTP GET http://{}{} (Host: {}) x{}",
        via, args.http_path, args.http_host, args.requests
    );
    // Routes may land a moment after the listener; only the first request gets a grace period.
    let first = eventually(timeout, || async {
        let reply = http_get_via(via, &args.http_host, &args.http_path).await?;
        if reply.status != 200 {
            bail!("status {}: {}", reply.status, reply.body.trim());
        }
        Ok(())
    })
    .await;
    if let Err(err) = first {
        println!("  FAIL no successful response within {timeout:?}: {err:#}");
        return false;
    }
    let mut backends: BTreeMap<String, usize> = BTreeMap::new();
    let mut all_ok = true;
    for i in 1..=args.requests {
        match http_get_via(via, &args.http_host, &args.http_path).await {
            Ok(reply) => {
                let backend = reply.served_by().unwrap_or("?").to_string();
                println!("    #{i:<2} {} served by {backend}", reply.status);
                all_ok &= reply.status == 200 && reply.served_by().is_some();
                *backends.entry(backend).or_default() += 1;
            }
            Err(err) => {
                println!("    #{i:<2} error: {err:#}");
                all_ok = false;
            }
        }
    }
    let spread: Vec<String> = backends
        .iter()
        .map(|(name, n)| format!("{name} x{n}"))
        .collect();
    println!("  backends: {}", spread.join(", "));
    all_ok
}

async fn tcp_check(args: &Args, client: &MeshPod, timeout: Duration) -> bool {
    let addr = SocketAddr::new(client.ip, args.tcp_port);
    let line = "hello from fsm-demo";
    println!("  TCP {addr} <- {line:?}");
    let reply = eventually(timeout, || async {
        let reply = tcp_roundtrip(addr, line).await?;
        if !reply.ends_with(line) {
            bail!("unexpected reply {reply:?}");
        }
        Ok(reply)
    })
    .await;
    match reply {
        Ok(reply) => {
            println!("  TCP {addr} -> {reply:?}");
            true
        }
        Err(err) => {
            println!("  FAIL {err:#}");
            false
        }
    }
}

/// Prints the controller's view of each sidecar's versions (latest, sent, ACKed, NACKed); true
/// when every sidecar has ACKed its latest snapshot of every type and NACKed nothing.
async fn print_proxies(mesh: &Mesh, timeout: Duration) -> bool {
    println!(
        "\nxDS versions (GET http://{}/debug/proxies):",
        mesh.controller.http_addr
    );
    let expected: Vec<String> = mesh
        .sidecars
        .iter()
        .filter_map(|(pod, _)| pod.proxy_uuid.clone())
        .collect();
    // ACKs trail the traffic check by at most a round trip; wait for them instead of racing.
    let synced = eventually(timeout, || async {
        let proxies = mesh.controller.debug_proxies().await?;
        let lagging: Vec<&String> = expected
            .iter()
            .filter(|uuid| {
                proxies
                    .get(*uuid)
                    .is_none_or(|p| p.types.is_empty() || !p.types.values().all(|t| t.is_in_sync()))
            })
            .collect();
        if !lagging.is_empty() {
            bail!("not in sync: {lagging:?}");
        }
        Ok(proxies)
    })
    .await;
    let (proxies, in_sync) = match synced {
        Ok(proxies) => (proxies, true),
        Err(err) => match mesh.controller.debug_proxies().await {
            Ok(proxies) => {
                println!("  FAIL {err:#}");
                (proxies, false)
            }
            Err(err) => {
                println!("  unavailable: {err:#}");
                return false;
            }
        },
    };
    let pod_of = |uuid: &str| {
        mesh.sidecars
            .iter()
            .find(|(pod, _)| pod.proxy_uuid.as_deref() == Some(uuid))
            .map(|(pod, _)| pod.id())
            .unwrap_or_else(|| uuid.to_string())
    };
    let short = |v: &Option<String>| match v {
        Some(v) if v.len() > 12 => format!(
            "{}…",
            &v[..v.char_indices().nth(12).map(|(i, _)| i).unwrap_or(v.len())]
        ),
        Some(v) => v.clone(),
        None => "-".to_string(),
    };
    println!(
        "  {:<18} {:<21} {:<14} {:<14} {:<14} {:<14} {:>5}",
        "proxy", "type", "snapshot", "sent", "acked", "nacked", "sent#"
    );
    for (uuid, proxy) in &proxies {
        for (type_url, t) in &proxy.types {
            let kind = type_url.rsplit('.').next().unwrap_or(type_url);
            println!(
                "  {:<18} {:<21} {:<14} {:<14} {:<14} {:<14} {:>5}",
                pod_of(uuid),
                kind,
                short(&t.snapshot_version),
                short(&t.sent_version),
                short(&t.acked_version),
                short(&t.nacked_version),
                t.responses_sent
            );
            if let Some(error) = &t.last_nack_error {
                println!("    last NACK: {error}");
            }
        }
    }
    println!(
        "  every sidecar ACKed its latest configuration: {}",
        verdict(in_sync)
    );
    in_sync
}

fn print_hints(args: &Args, mesh: &Mesh) {
    let client = mesh
        .sidecars
        .iter()
        .map(|(pod, _)| pod)
        .find(|pod| pod.id() == args.client);
    println!("\nthe mesh is running; Ctrl-C stops it.");
    println!("  logs:        {}", mesh.log_dir.display());
    println!(
        "  manifests:   {}  (edit or add files: the mesh updates live)",
        mesh.manifest_dir.display()
    );
    println!(
        "  controller:  http://{}/debug/proxies  http://{}/metrics",
        mesh.controller.http_addr, mesh.controller.http_addr
    );
    if let Some(client) = client {
        println!(
            "  try:         curl -H 'Host: {}' http://{}{}",
            args.http_host,
            client.outbound_addr(),
            args.http_path
        );
        if args.tcp_port != 0 {
            println!(
                "               echo hi | nc -q1 {} {}",
                client.ip, args.tcp_port
            );
        }
        println!(
            "  admin:       curl http://{}/config_dump",
            client.admin_addr()
        );
    }
}

/// Ctrl-C, and also SIGTERM and SIGHUP: any of them must end in the drops that stop the
/// children, or the sidecars would keep the demo addresses busy.
async fn wait_for_stop_signal() -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut hangup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result.context("waiting for Ctrl-C")?,
        _ = terminate.recv() => {}
        _ = hangup.recv() => {}
    }
    Ok(())
}

fn step(n: usize, text: &str) {
    println!("[{n}/5] {text}");
}

fn detail(text: &str) {
    println!("      {text}");
}

fn verdict(ok: bool) -> &'static str {
    if ok { "ok" } else { "FAILED" }
}
