//! `sidecar-rps`: HTTP/1.1 through a pair of sidecars as the mesh runs them, client -> client
//! sidecar (outbound) -> mTLS -> server sidecar (inbound) -> app, for Envoy and for fsm-sidecar,
//! beside the direct connection to the same app (the floor). Both sidecars of a pair are pinned
//! to CPU 0; the load generator, the apps and the controller run on CPU 1.
//!
//! Two measurements: a fixed rate at several concurrencies (latency added to the floor, tail,
//! sidecar CPU), and full load (requests per sidecar CPU-second).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

use crate::SidecarArgs;
use crate::bench_mesh::{BenchMesh, sidecar_label};
use crate::load::{
    LoadPlan, RatePlan, RateRun, Run, Target, fixed_rate, full_load, median_run, ms, probe,
    refuses_plaintext, serve_fixed, use_wrk,
};
use crate::mesh_gen::{APP_PORT, CLIENT, CLIENT_FSM, SERVER, SERVER_FSM, app_host};
use crate::procfs::{CpuUse, pin};

/// What `sidecar-rps` measures.
pub(crate) struct RpsPlan {
    /// Fixed-rate part: total requests per second.
    pub(crate) rate: u32,
    /// Fixed-rate part: the connection counts to measure at.
    pub(crate) concurrency: Vec<usize>,
    pub(crate) rate_warmup: Duration,
    pub(crate) rate_duration: Duration,
    /// Full-load part.
    pub(crate) full: LoadPlan,
    /// Full-load rounds; per path the run with the median req/s is reported.
    pub(crate) runs: usize,
}

pub(crate) async fn sidecar_rps(plan: &RpsPlan, sidecar: &SidecarArgs) -> Result<()> {
    ensure!(plan.runs > 0, "--runs must be at least 1");
    ensure!(!plan.concurrency.is_empty(), "--concurrency needs a value");
    if std::thread::available_parallelism().map_or(1, usize::from) < 2 {
        bail!("sidecar-rps needs two CPUs: the sidecars on CPU 0, load and apps on CPU 1");
    }
    // This process (apps, load generator) and the controller on CPU 1.
    pin(std::process::id(), 1)?;
    let mesh = BenchMesh::start(61, 0).await?;
    pin(mesh.controller.process.pid(), 1)?;
    let mut apps = Vec::new();
    for server in [SERVER, SERVER_FSM] {
        let addr = SocketAddr::new(mesh.pod(server)?.ip, APP_PORT);
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the app of {server} on {addr}"))?;
        tokio::spawn(serve_fixed(listener));
        apps.push(addr);
    }

    let envoy_client = mesh.envoy(CLIENT).await?;
    let envoy_server = mesh.envoy(SERVER).await?;
    let fsm_client = mesh.fsm_sidecar(CLIENT_FSM, sidecar).await?;
    let fsm_server = mesh.fsm_sidecar(SERVER_FSM, sidecar).await?;
    let envoys = [envoy_client.process.pid(), envoy_server.process.pid()];
    let fsms = [fsm_client.process.pid(), fsm_server.process.pid()];
    for pid in envoys.iter().chain(&fsms) {
        pin(*pid, 0)?;
    }
    let targets = [
        Target {
            name: "direct",
            addr: apps[0],
            host: app_host(SERVER),
            sidecars: Vec::new(),
        },
        Target {
            name: "envoy",
            addr: mesh.pod(CLIENT)?.outbound_addr(),
            host: app_host(SERVER),
            sidecars: envoys.to_vec(),
        },
        Target {
            name: "fsm-sidecar",
            addr: mesh.pod(CLIENT_FSM)?.outbound_addr(),
            host: app_host(SERVER_FSM),
            sidecars: fsms.to_vec(),
        },
    ];
    // Every path answers before anything is measured, so a broken path fails here by name.
    for target in &targets {
        probe(target).await?;
    }
    // Between the sidecars of a pair it is mTLS: each server sidecar's inbound port, which the
    // client sidecar sends to, does not serve plaintext (while the app itself does, which checks
    // the check).
    ensure!(
        !refuses_plaintext(&targets[0]).await,
        "the app refused plaintext HTTP"
    );
    for server in [SERVER, SERVER_FSM] {
        let inbound = Target {
            name: server,
            addr: mesh.pod(server)?.inbound_addr(),
            host: app_host(server),
            sidecars: Vec::new(),
        };
        ensure!(
            refuses_plaintext(&inbound).await,
            "the inbound port of {server}'s sidecar ({}) answered plaintext HTTP: the pair would not be measured over mTLS",
            inbound.addr
        );
    }
    let label = sidecar_label(sidecar);

    // === fixed rate ===
    let mut rate_runs: Vec<(usize, Vec<RateRun>)> = Vec::new();
    for &connections in &plan.concurrency {
        let rate_plan = RatePlan {
            rate: plan.rate,
            connections,
            warmup: plan.rate_warmup,
            duration: plan.rate_duration,
        };
        let mut runs = Vec::new();
        for target in &targets {
            let run = fixed_rate(target, &rate_plan).await?;
            eprintln!(
                "{} req/s, {connections:>2} connections, {:12}: p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, ok {}, errors {}",
                plan.rate,
                target.name,
                ms(run.p50),
                ms(run.p99),
                ms(run.p999),
                run.ok,
                run.errors
            );
            runs.push(run);
        }
        rate_runs.push((connections, runs));
    }
    println!(
        "HTTP/1.1 GET at a fixed {} req/s (open loop, keep-alive), client -> sidecar -> mTLS -> sidecar -> app; both sidecars of a path on CPU 0, load, apps and controller on CPU 1; {:.1} s measured after {:.1} s warm-up per point:",
        plan.rate,
        plan.rate_duration.as_secs_f64(),
        plan.rate_warmup.as_secs_f64()
    );
    println!(
        "  conns  path            p50 ms   p99 ms  p99.9 ms   max ms  added p50  added p99  added p99.9  sidecars CPU  errors  CPU 0 others/irq"
    );
    for (connections, runs) in &rate_runs {
        let floor = &runs[0];
        for (target, run) in targets.iter().zip(runs) {
            let added = |d: Duration, floor: Duration| ms(d.saturating_sub(floor));
            println!(
                "  {connections:>5}  {:12} {:>8.3} {:>8.3} {:>9.3} {:>8.2} {:>10.3} {:>10.3} {:>12.3} {:>13} {:>7}  {:.0} % / {:.0} %",
                target.name,
                ms(run.p50),
                ms(run.p99),
                ms(run.p999),
                ms(run.max),
                added(run.p50, floor.p50),
                added(run.p99, floor.p99),
                added(run.p999, floor.p999),
                cpu_percent(&run.cpu),
                run.errors,
                run.cpu.other_on_cpu0 * 100.0,
                run.cpu.irq_on_cpu0 * 100.0
            );
        }
        if let [floor, envoy, fsm] = runs.as_slice() {
            let added = |r: &RateRun| ms(r.p99.saturating_sub(floor.p99));
            let added_p50 = |r: &RateRun| ms(r.p50.saturating_sub(floor.p50));
            println!(
                "  {connections:>5}  fsm-sidecar / envoy: added p50 {}, added p99 {}, p99.9 {}, sidecars CPU {}",
                ratio(added_p50(fsm), added_p50(envoy)),
                ratio(added(fsm), added(envoy)),
                ratio(ms(fsm.p999), ms(envoy.p999)),
                ratio(
                    fsm.cpu.sidecars.unwrap_or(f64::NAN),
                    envoy.cpu.sidecars.unwrap_or(f64::NAN)
                )
            );
        }
    }
    println!("  fsm-sidecar: {label}");

    // === full load ===
    let generator = if use_wrk(plan.full.load) {
        "wrk"
    } else {
        "built-in"
    };
    let mut results: Vec<Vec<Run>> = vec![Vec::new(); targets.len()];
    for round in 1..=plan.runs {
        for (target, runs) in targets.iter().zip(&mut results) {
            let run = full_load(target, &plan.full).await?;
            eprintln!("round {round} {:12}: {}", target.name, run_line(&run));
            runs.push(run);
        }
    }
    let medians: Vec<Run> = results.iter().filter_map(|r| median_run(r)).collect();
    println!(
        "HTTP/1.1 GET at full load through the same paths ({generator}, {} keep-alive connections, {:.1} s after {:.1} s warm-up, median of {} by req/s):",
        plan.full.connections,
        plan.full.duration.as_secs_f64(),
        plan.full.warmup.as_secs_f64(),
        plan.runs
    );
    for (target, run) in targets.iter().zip(&medians) {
        println!("  {:12}: {}", target.name, run_line(run));
    }
    if let [direct, envoy, fsm] = medians.as_slice() {
        let per_core = |r: &Run| r.cpu.sidecars.map_or(f64::NAN, |c| r.rps / c);
        println!(
            "  fsm-sidecar / envoy: {} req/s, {} req per sidecar CPU-second, p50 {}, p99 {}  [{label}]",
            ratio(fsm.rps, envoy.rps),
            ratio(per_core(fsm), per_core(envoy)),
            ratio(ms(fsm.p50), ms(envoy.p50)),
            ratio(ms(fsm.p99), ms(envoy.p99)),
        );
        println!(
            "  vs direct: envoy {} req/s, fsm-sidecar {} req/s",
            ratio(envoy.rps, direct.rps),
            ratio(fsm.rps, direct.rps)
        );
    }
    Ok(())
}

fn ratio(a: f64, b: f64) -> String {
    format!("{:.2}x", a / b)
}

fn cpu_percent(cpu: &CpuUse) -> String {
    cpu.sidecars
        .map_or("-".to_string(), |c| format!("{:.1} %", c * 100.0))
}

fn run_line(run: &Run) -> String {
    let sidecars = run.cpu.sidecars.map_or(String::new(), |cores| {
        format!(
            ", sidecars CPU {:.0} % ({:.0} req per CPU-second)",
            cores * 100.0,
            run.rps / cores
        )
    });
    format!(
        "{:>8.0} req/s, p50 {:.2} ms, p99 {:.2} ms, errors {}{sidecars}; CPU 0: other processes {:.0} %, interrupts {:.0} %",
        run.rps,
        ms(run.p50),
        ms(run.p99),
        run.errors,
        run.cpu.other_on_cpu0 * 100.0,
        run.cpu.irq_on_cpu0 * 100.0
    )
}
