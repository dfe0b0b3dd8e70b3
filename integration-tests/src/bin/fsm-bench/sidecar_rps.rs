//! `sidecar-rps`: requests per second through one sidecar pinned to one core (Envoy and
//! fsm-sidecar in turn), beside the direct path to the same app.

use std::net::SocketAddr;

use anyhow::{Result, bail, ensure};

use crate::bench_mesh::{BenchMesh, sidecar_label};
use crate::load::{LoadPlan, Run, measure, median_run, ms, run_line, serve_fixed, wrk_available};
use crate::mesh_gen::{APP_PORT, APP_SERVICE, CLIENT, CLIENT_FSM};
use crate::procfs::pin;
use crate::{Load, SidecarArgs};

pub(crate) async fn sidecar_rps(plan: &LoadPlan, runs: usize, sidecar: &SidecarArgs) -> Result<()> {
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
