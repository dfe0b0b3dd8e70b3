//! `fsm-bench xds-scale`: the control plane under N simulated Envoy proxies.
//!
//! A generated mesh ([`mesh`]: S services, N sidecar pods) is served by the release
//! `fsm-controller`, from a manifest directory or (`--apiserver`) through the test API server.
//! Once the controller has written every pod's bootstrap credentials, N simulated proxies
//! ([`proxy`]) connect, each on its own mTLS connection with its pod's credentials, and behave as
//! Envoy does (SotW or delta). Measured ([`report`]): time until every proxy holds a full
//! configuration; one endpoint change (who received what, per type, and how long until each
//! affected proxy ACKed it); controller RSS and CPU; through the API server, the responses pushed
//! after a `410 Gone` relist of every kind (must be 0); a rolling restart of 10 % of the pods.
//! `--out DIR` saves the figures as JSON and plots them ([`plot`]).

mod grpc_stream;
pub(crate) mod mesh;
mod plot;
mod proxy;
mod report;
mod xds;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use fsm_integration_tests::{Controller, ControllerOptions, repo_root};
use fsm_test_apiserver::{ApiServer, RunningApiServer, Verb};

use crate::procfs::{cpu_time, memory_of};
use mesh::{Mesh, Pod, namespace_of, service_name};
use proxy::{Fleet, Protocol, Proxy};
use report::{EndpointChange, PerType, Percentiles, Relist, Restart, RunReport, Warmup};

/// No response for this long: the controller has pushed everything it meant to.
const QUIET: Duration = Duration::from_secs(1);
/// How often the coordinator looks at the proxies' progress.
const POLL: Duration = Duration::from_millis(100);

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Flavor {
    Sotw,
    Delta,
    Both,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// xDS protocol of the simulated proxies.
    #[arg(long, value_enum, default_value_t = Flavor::Both)]
    flavor: Flavor,
    /// Numbers of proxies, one run each (repeat the flag or list them: 1000,2000,5000,10000).
    #[arg(long, value_delimiter = ',', default_values_t = [1000])]
    proxies: Vec<usize>,
    /// HTTP services in the mesh.
    #[arg(long, default_value_t = 1000)]
    services: usize,
    /// Also run through the test API server (with a 410 Gone relist), at this many proxies.
    #[arg(long, num_args = 0..=1, default_missing_value = "1000")]
    apiserver: Option<usize>,
    /// Only the API-server run (with `--apiserver`): no manifest-directory runs.
    #[arg(long, requires = "apiserver")]
    apiserver_only: bool,
    /// Tiny and quick (20 proxies, 20 services, both sources, seconds), for `make test`: fails on
    /// any error, asserts no figure.
    #[arg(long)]
    smoke: bool,
    /// Where to write `xds-scale.json` and `xds-scale.png`.
    #[arg(long)]
    out: Option<PathBuf>,
    /// How long each step (credentials, warm-up, endpoint change, each restart batch) may take.
    #[arg(long, default_value_t = 300)]
    timeout_secs: u64,
    /// Concurrent TCP + TLS handshakes while connecting.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    /// Pods replaced by the rolling restart, in percent.
    #[arg(long, default_value_t = 10)]
    restart_percent: usize,
    /// The rolling restart replaces its pods in this many batches, each once the previous
    /// batch's new proxies are warm.
    #[arg(long, default_value_t = 10)]
    restart_batches: usize,
    /// The TrueType font of the plot's text.
    #[arg(
        long,
        default_value = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
    )]
    font: PathBuf,
}

/// How the mesh reaches the controller.
enum Source {
    Manifests(PathBuf),
    Api(RunningApiServer),
}

impl Source {
    fn name(&self) -> &'static str {
        match self {
            Source::Manifests(_) => "manifests",
            Source::Api(_) => "apiserver",
        }
    }

    fn write_endpoints(&self, mesh: &Mesh, service: usize) -> Result<()> {
        match self {
            Source::Manifests(dir) => mesh.write_endpoints(dir, service),
            Source::Api(server) => apply(server, &mesh.endpoints_object(service)),
        }
    }

    /// Makes the source show `mesh` after the pods `old` were replaced.
    fn replace_pods(&self, mesh: &Mesh, old: &[Pod], slots: &[usize]) -> Result<()> {
        let services: BTreeSet<usize> = old.iter().map(|p| p.service).collect();
        match self {
            Source::Manifests(dir) => {
                for s in services {
                    mesh.write_pods(dir, s)?;
                    mesh.write_endpoints(dir, s)?;
                }
            }
            Source::Api(server) => {
                let store = server.store();
                for pod in old {
                    store
                        .delete("v1", "Pod", Some(&pod.namespace), &pod.name)
                        .map_err(|e| {
                            anyhow::anyhow!("deleting pod {}/{}: {e:?}", pod.namespace, pod.name)
                        })?;
                }
                for slot in slots {
                    apply(server, &Mesh::pod_object(&mesh.pods[*slot]))?;
                }
                for s in services {
                    apply(server, &mesh.endpoints_object(s))?;
                }
            }
        }
        Ok(())
    }
}

fn apply(server: &RunningApiServer, object: &serde_json::Value) -> Result<()> {
    server.store().apply(object).map_err(|e| {
        anyhow::anyhow!(
            "applying {} {}/{}: {e:?}",
            object["kind"],
            object["metadata"]["namespace"],
            object["metadata"]["name"]
        )
    })?;
    Ok(())
}

/// Writes `xds-scale.json` and `xds-scale.png` into `out`.
fn save(reports: &[RunReport], out: &Path, font: &Path) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let json = out.join("xds-scale.json");
    std::fs::write(&json, serde_json::to_string_pretty(reports)?)
        .with_context(|| format!("writing {}", json.display()))?;
    let png = out.join("xds-scale.png");
    plot::draw(reports, &png, font)?;
    println!("wrote {} and {}", json.display(), png.display());
    Ok(())
}

pub async fn run(args: Args) -> Result<()> {
    raise_fd_limit()?;
    let smoke = args.smoke;
    let (proxies, services, timeout) = if smoke {
        (vec![20], 20, Duration::from_secs(60))
    } else {
        (
            args.proxies.clone(),
            args.services,
            Duration::from_secs(args.timeout_secs),
        )
    };
    let api_proxies = if smoke { Some(20) } else { args.apiserver };
    let protocols: &[Protocol] = match args.flavor {
        Flavor::Sotw => &[Protocol::Sotw],
        Flavor::Delta => &[Protocol::Delta],
        Flavor::Both => &[Protocol::Sotw, Protocol::Delta],
    };
    let settings = Settings {
        services,
        timeout,
        connect_concurrency: args.connect_concurrency,
        restart_percent: args.restart_percent,
        restart_batches: args.restart_batches.max(1),
        relist_window: if smoke {
            Duration::from_secs(3)
        } else {
            Duration::from_secs(10)
        },
    };
    let mut reports = Vec::new();
    for &protocol in protocols {
        let sizes = proxies
            .iter()
            .filter(|_| !args.apiserver_only)
            .map(|n| (*n, false))
            .chain(api_proxies.map(|n| (n, true)));
        for (n, api) in sizes {
            reports.push(run_one(&settings, protocol, n, api).await?);
            // After every run, so that a long series stopped part-way keeps what it measured.
            if let Some(out) = &args.out {
                save(&reports, out, &args.font)?;
            }
        }
    }
    let failed: Vec<String> = reports
        .iter()
        .flat_map(|r| {
            r.failures
                .iter()
                .map(move |f| format!("{} {} {}: {f}", r.protocol, r.source, r.proxies))
        })
        .collect();
    if !failed.is_empty() {
        bail!("xds-scale failed:\n{}", failed.join("\n"));
    }
    if smoke {
        let errors: u64 = reports.iter().map(|r| r.stream_errors).sum();
        if errors > 0 {
            bail!("xds-scale smoke: {errors} stream errors (see above)");
        }
    }
    Ok(())
}

struct Settings {
    services: usize,
    timeout: Duration,
    connect_concurrency: usize,
    restart_percent: usize,
    restart_batches: usize,
    relist_window: Duration,
}

/// 10,000 connections need more descriptors than the usual soft limit of 1,024.
fn raise_fd_limit() -> Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("reading RLIMIT_NOFILE")?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).context("raising RLIMIT_NOFILE")?;
    Ok(())
}

async fn run_one(
    settings: &Settings,
    protocol: Protocol,
    n: usize,
    api: bool,
) -> Result<RunReport> {
    let work = tempfile::tempdir()?;
    let logs = work.path().join("logs");
    let bootstrap_root = work.path().join("bootstrap");
    let mut mesh = Mesh::new(settings.services, n);
    let options = ControllerOptions {
        bootstrap_dir: Some(bootstrap_root.clone()),
        ..Default::default()
    };
    let (source, mut controller) = if api {
        let server = ApiServer::builder()
            .crd_dir(repo_root().join("charts/fsm/crds"))
            .bookmark_interval(Duration::from_secs(1))
            .start()
            .await?;
        for object in mesh.all_objects() {
            apply(&server, &object)?;
        }
        let kubeconfig = work.path().join("kubeconfig");
        server.write_kubeconfig(&kubeconfig)?;
        let controller =
            fsm_integration_tests::start_controller_on_cluster(&kubeconfig, &logs, &options)
                .await?;
        (Source::Api(server), controller)
    } else {
        let dir = work.path().join("manifests");
        mesh.write_all(&dir)?;
        let controller = fsm_integration_tests::start_controller(&dir, &logs, &options).await?;
        (Source::Manifests(dir), controller)
    };
    let mut report = RunReport {
        protocol: format!("{protocol:?}").to_lowercase(),
        source: source.name().into(),
        services: settings.services,
        proxies: n,
        ..Default::default()
    };
    let result = measure(
        settings,
        protocol,
        &mut mesh,
        &source,
        &mut controller,
        &bootstrap_root,
        &mut report,
    )
    .await;
    if let Err(e) = result {
        report.failures.push(format!("{e:#}"));
    }
    if let Err(e) = controller.process.check_running() {
        report.failures.push(format!("{e:#}"));
    }
    for line in report.lines() {
        println!("{line}");
    }
    if !report.failures.is_empty() {
        println!(
            "  controller log: {} (kept)",
            controller.process.log_path().display()
        );
        // Keep the logs of a failed run for a look.
        let _ = work.keep();
    }
    Ok(report)
}

async fn measure(
    settings: &Settings,
    protocol: Protocol,
    mesh: &mut Mesh,
    source: &Source,
    controller: &mut Controller,
    bootstrap_root: &Path,
    report: &mut RunReport,
) -> Result<()> {
    let pid = controller.process.pid();
    let n = mesh.pods.len();
    let started = std::time::Instant::now();
    let pod_dirs: Vec<PathBuf> = mesh
        .pods
        .iter()
        .map(|p| p.proxy(bootstrap_root).credentials)
        .collect();
    wait_for_credentials(controller, &pod_dirs, settings.timeout).await?;
    report.credentials_s = started.elapsed().as_secs_f64();
    // Let the controller settle after writing credentials before the baseline.
    tokio::time::sleep(Duration::from_secs(1)).await;
    report.rss_before_mib = memory_of(pid)?.0;

    // Warm-up.
    let fleet = Arc::new(Fleet::new(
        protocol,
        controller.ads_addr,
        settings.connect_concurrency,
    ));
    let cpu = cpu_time(pid)?;
    let own_cpu = cpu_time(std::process::id())?;
    phase("warm-up");
    let first = fleet.now_us();
    let mut proxies: Vec<Proxy> = mesh
        .pods
        .iter()
        .map(|p| proxy::spawn(&fleet, p.proxy(bootstrap_root)))
        .collect();
    let all_warm = wait_until(controller, settings.timeout, || {
        proxies
            .iter()
            .all(|p| p.stats.warm.load(Ordering::Relaxed) != 0)
    })
    .await?;
    let warm: Vec<u64> = proxies
        .iter()
        .map(|p| p.stats.warm.load(Ordering::Relaxed))
        .collect();
    let none = vec![[0; 5]; proxies.len()];
    report.warmup = Warmup {
        warm_proxies: warm.iter().filter(|w| **w != 0).count(),
        load_generator_cpu_s: (cpu_time(std::process::id())? - own_cpu).as_secs_f64(),
        all_warm_s: warm
            .iter()
            .max()
            .map_or(0.0, |last| micros(last.saturating_sub(first))),
        per_proxy: Percentiles::of(
            proxies
                .iter()
                .filter(|p| p.stats.warm.load(Ordering::Relaxed) != 0)
                .map(|p| {
                    Duration::from_micros(
                        p.stats.warm.load(Ordering::Relaxed)
                            - p.stats.started.load(Ordering::Relaxed),
                    )
                })
                .collect(),
        ),
        controller_cpu_s: (cpu_time(pid)? - cpu).as_secs_f64(),
        received: received(&none, &counters(&proxies)),
    };
    record_errors(&fleet, report);
    if !all_warm {
        // Measured on: the endpoint change and the restart still say how the rest behaves.
        let cold = warm.iter().filter(|w| **w == 0).count();
        report.failures.push(format!(
            "{cold} of {n} proxies held no full configuration after {:?}",
            settings.timeout
        ));
    }
    wait_quiet(&fleet, controller, Duration::from_secs(30)).await?;
    report.rss_warm_mib = memory_of(pid)?.0;
    report.rss_per_proxy_kib =
        (report.rss_warm_mib - report.rss_before_mib) * 1024.0 / n.max(1) as f64;

    // One endpoint change.
    let service = n.saturating_sub(1) % mesh.services;
    let ip = mesh.add_endpoint(service);
    fleet.memo.set_marker(ip.to_string().as_bytes());
    let before = counters(&proxies);
    let cpu = cpu_time(pid)?;
    phase("endpoint change");
    let written = fleet.now_us();
    source.write_endpoints(mesh, service)?;
    let all_updated = wait_until(controller, settings.timeout, || {
        proxies
            .iter()
            .all(|p| p.stats.marker_acked.load(Ordering::Relaxed) != 0)
    })
    .await?;
    wait_quiet(&fleet, controller, Duration::from_secs(30)).await?;
    phase("endpoint change settled");
    let latencies: Vec<Duration> = proxies
        .iter()
        .map(|p| p.stats.marker_acked.load(Ordering::Relaxed))
        .filter(|t| *t != 0)
        .map(|t| Duration::from_micros(t.saturating_sub(written)))
        .collect();
    report.endpoint_change = EndpointChange {
        service: format!("{}/{}", namespace_of(service), service_name(service)),
        new_ip: ip.to_string(),
        proxies_updated: latencies.len(),
        latency: Percentiles::of(latencies),
        received: received(&before, &counters(&proxies)),
        controller_cpu_s: (cpu_time(pid)? - cpu).as_secs_f64(),
    };
    if !all_updated {
        report.failures.push(format!(
            "{} of {n} proxies never ACKed the endpoint change within {:?}",
            n - report.endpoint_change.proxies_updated,
            settings.timeout
        ));
    }

    // A relist of every kind: compacted history and closed watches, so every watch restarts
    // from a resourceVersion the server has forgotten (410 Gone) and the controller lists anew.
    if let Source::Api(server) = source {
        let before = counters(&proxies);
        let lists = server.request_count(Verb::List);
        server.compact();
        server.close_watches();
        tokio::time::sleep(settings.relist_window).await;
        let after = counters(&proxies);
        let received = received(&before, &after);
        let relist = Relist {
            lists: server.request_count(Verb::List) - lists,
            window_s: settings.relist_window.as_secs_f64(),
            responses_pushed: received.responses.values().sum(),
            received,
        };
        if relist.lists == 0 {
            report
                .failures
                .push("the controller did not relist after its watches expired".into());
        }
        report.relist = Some(relist);
    }

    // Rolling restart.
    let replaced = (n * settings.restart_percent).div_ceil(100).min(n);
    if replaced > 0 {
        let errors = fleet.errors.load(Ordering::Relaxed);
        let refused = fleet.refused.load(Ordering::Relaxed);
        let cpu = cpu_time(pid)?;
        phase("rolling restart");
        let slots: Vec<usize> = (0..replaced).map(|i| i * n / replaced).collect();
        let batch_size = replaced.div_ceil(settings.restart_batches);
        let first_write = fleet.now_us();
        let mut new_warm = Vec::new();
        let mut batches = 0;
        for batch in slots.chunks(batch_size) {
            batches += 1;
            let mut old = Vec::new();
            for &slot in batch {
                // The pod goes away with its proxy: the connection closes.
                proxies[slot].task.abort();
                old.push(mesh.restart(slot));
            }
            let written = fleet.now_us();
            source.replace_pods(mesh, &old, batch)?;
            let dirs: Vec<PathBuf> = batch
                .iter()
                .map(|s| mesh.pods[*s].proxy(bootstrap_root).credentials)
                .collect();
            wait_for_credentials(controller, &dirs, settings.timeout).await?;
            for &slot in batch {
                proxies[slot] = proxy::spawn(&fleet, mesh.pods[slot].proxy(bootstrap_root));
            }
            let warm = wait_until(controller, settings.timeout, || {
                batch
                    .iter()
                    .all(|s| proxies[*s].stats.warm.load(Ordering::Relaxed) != 0)
            })
            .await?;
            if !warm {
                bail!(
                    "a new proxy of the rolling restart held no full configuration after {:?}",
                    settings.timeout
                );
            }
            new_warm.extend(batch.iter().map(|s| {
                Duration::from_micros(
                    proxies[*s]
                        .stats
                        .warm
                        .load(Ordering::Relaxed)
                        .saturating_sub(written),
                )
            }));
        }
        wait_quiet(&fleet, controller, Duration::from_secs(60)).await?;
        let last_warm = slots
            .iter()
            .map(|s| proxies[*s].stats.warm.load(Ordering::Relaxed))
            .max()
            .unwrap_or(first_write);
        let last = last_warm.max(fleet.last_response.load(Ordering::Relaxed));
        report.restart = Some(Restart {
            pods_replaced: replaced,
            batches,
            convergence_s: micros(last.saturating_sub(first_write)),
            new_proxy_warm: Percentiles::of(new_warm),
            stream_errors: fleet.errors.load(Ordering::Relaxed) - errors,
            refused_streams: fleet.refused.load(Ordering::Relaxed) - refused,
            controller_cpu_s: (cpu_time(pid)? - cpu).as_secs_f64(),
        });
    }
    record_errors(&fleet, report);
    drop(proxies);
    Ok(())
}

/// Says on stderr when a phase starts, in Unix time, so that a profile of the controller
/// (`perf record -k CLOCK_REALTIME`, then `perf report --time`) can be cut to one phase.
fn phase(name: &str) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    eprintln!("xds-scale: {name} at {:.6}", now.as_secs_f64());
}

fn micros(us: u64) -> f64 {
    us as f64 / 1e6
}

fn record_errors(fleet: &Fleet, report: &mut RunReport) {
    report.stream_errors = fleet.errors.load(Ordering::Relaxed);
    report.error_samples = fleet.error_samples.lock().clone();
}

/// Responses per type per proxy.
fn counters(proxies: &[Proxy]) -> Vec<[u32; 5]> {
    proxies
        .iter()
        .map(|p| std::array::from_fn(|i| p.stats.responses[i].load(Ordering::Relaxed)))
        .collect()
}

fn received(before: &[[u32; 5]], after: &[[u32; 5]]) -> PerType {
    let mut per_type = PerType::default();
    for kind in xds::XdsType::ALL {
        let i = kind.index();
        let deltas = before
            .iter()
            .zip(after)
            .map(|(b, a)| a[i].saturating_sub(b[i]));
        per_type
            .proxies
            .insert(kind.label(), deltas.clone().filter(|d| *d > 0).count());
        per_type
            .responses
            .insert(kind.label(), deltas.map(u64::from).sum());
    }
    per_type
}

/// Polls `done` until it holds (true) or `timeout` passes (false); fails when the controller dies.
async fn wait_until(
    controller: &mut Controller,
    timeout: Duration,
    mut done: impl FnMut() -> bool,
) -> Result<bool> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if done() {
            return Ok(true);
        }
        controller.process.check_running()?;
        if tokio::time::Instant::now() > deadline {
            return Ok(false);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Waits until no proxy received anything for [`QUIET`] (at most `limit`).
async fn wait_quiet(fleet: &Fleet, controller: &mut Controller, limit: Duration) -> Result<()> {
    let quiet_us = QUIET.as_micros() as u64;
    wait_until(controller, limit, || {
        fleet
            .now_us()
            .saturating_sub(fleet.last_response.load(Ordering::Relaxed))
            > quiet_us
    })
    .await?;
    Ok(())
}

/// Waits until the controller has written the credentials of every pod in `dirs`.
async fn wait_for_credentials(
    controller: &mut Controller,
    dirs: &[PathBuf],
    timeout: Duration,
) -> Result<()> {
    let mut missing: Vec<&PathBuf> = dirs.iter().collect();
    let done = wait_until(controller, timeout, || {
        missing.retain(|d| !d.join("tls.key").exists());
        missing.is_empty()
    })
    .await?;
    if !done {
        bail!(
            "{} of {} pods have no bootstrap credentials after {timeout:?} (first: {})",
            missing.len(),
            dirs.len(),
            missing[0].display()
        );
    }
    Ok(())
}
