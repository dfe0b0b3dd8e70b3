//! `sidecar-limits`: what an UpstreamTrafficSetting costs fsm-sidecar per request. The path of
//! `sidecar-rps` (client -> fsm-sidecar -> mTLS -> fsm-sidecar -> app, both sidecars on CPU 0)
//! at a fixed rate, alternately without any setting and with one that gives the client's
//! outbound cluster circuit breakers (every limit set) and the server's inbound virtual host and
//! route each a token bucket, all too generous to refuse anything: the difference is the cost
//! of the bookkeeping alone. Rounds alternate so drift on a shared machine falls on both.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use fsm_integration_tests::eventually;

use crate::SidecarArgs;
use crate::bench_mesh::{BenchMesh, sidecar_label};
use crate::load::{RatePlan, RateRun, Target, fixed_rate, ms, probe, serve_fixed};
use crate::mesh_gen::{APP_PORT, CLIENT_FSM, SERVER_FSM, app_host};
use crate::procfs::pin;

pub(crate) struct LimitsPlan {
    pub(crate) rate: u32,
    pub(crate) connections: usize,
    pub(crate) warmup: Duration,
    pub(crate) duration: Duration,
    pub(crate) rounds: usize,
}

/// Limits nothing at the bench's rates reaches, on every knob the setting has.
fn setting() -> String {
    format!(
        "apiVersion: policy.flomesh.io/v1alpha1\nkind: UpstreamTrafficSetting\nmetadata: {{name: {SERVER_FSM}, namespace: demo}}\nspec:\n  host: {SERVER_FSM}.demo.svc.cluster.local\n  connectionSettings:\n    tcp: {{maxConnections: 10000}}\n    http: {{maxPendingRequests: 10000, maxRequests: 10000, maxRequestsPerConnection: 1000000, maxRetries: 100}}\n  rateLimit:\n    local:\n      http: {{requests: 1000000, unit: second, burst: 1000}}\n  httpRoutes:\n  - path: .*\n    rateLimit: {{local: {{requests: 1000000, unit: second}}}}\n"
    )
}

pub(crate) async fn sidecar_limits(plan: &LimitsPlan, sidecar: &SidecarArgs) -> Result<()> {
    ensure!(plan.rounds > 0, "--rounds must be at least 1");
    if std::thread::available_parallelism().map_or(1, usize::from) < 2 {
        bail!("sidecar-limits needs two CPUs: the sidecars on CPU 0, load and apps on CPU 1");
    }
    pin(std::process::id(), 1)?;
    let mesh = BenchMesh::start(62, 0).await?;
    pin(mesh.controller.process.pid(), 1)?;
    let app = SocketAddr::new(mesh.pod(SERVER_FSM)?.ip, APP_PORT);
    let listener = tokio::net::TcpListener::bind(app)
        .await
        .with_context(|| format!("binding the app of {SERVER_FSM} on {app}"))?;
    tokio::spawn(serve_fixed(listener));
    let client = mesh.fsm_sidecar(CLIENT_FSM, sidecar).await?;
    let server = mesh.fsm_sidecar(SERVER_FSM, sidecar).await?;
    let pids = [client.process.pid(), server.process.pid()];
    for pid in pids {
        pin(pid, 0)?;
    }
    let target = Target {
        name: "fsm-sidecar",
        addr: mesh.pod(CLIENT_FSM)?.outbound_addr(),
        host: app_host(SERVER_FSM),
        sidecars: pids.to_vec(),
    };
    probe(&target).await?;
    let rate_plan = RatePlan {
        rate: plan.rate,
        connections: plan.connections,
        warmup: plan.warmup,
        duration: plan.duration,
    };
    let file = mesh.manifests.join("90-bench-limits.yaml");
    let bucket =
        format!("inbound_rate_limit.demo/{SERVER_FSM}|{APP_PORT}|local.http_local_rate_limit.ok");
    let breaker_cluster = format!("demo/{SERVER_FSM}|{APP_PORT}");
    let mut none = Vec::new();
    let mut limited = Vec::new();
    for round in 1..=plan.rounds {
        for with_limits in [false, true] {
            if with_limits {
                std::fs::write(&file, setting())?;
            } else if file.exists() {
                std::fs::remove_file(&file)?;
            }
            // Applied (or gone) once a request moves (or no longer moves) the server's bucket
            // counter and the client's config names the breakers.
            eventually(Duration::from_secs(30), || async {
                let before = server.counter(&bucket).await?;
                probe(&target).await?;
                let moved = server.counter(&bucket).await? > before;
                let dump = client.admin_get("/config_dump").await?;
                let breakers = (dump.contains("max_pending_requests")
                    || dump.contains("maxPendingRequests"))
                    && dump.contains(&breaker_cluster);
                ensure!(
                    moved == with_limits && breakers == with_limits,
                    "setting not {} yet",
                    if with_limits { "applied" } else { "removed" }
                );
                Ok(())
            })
            .await?;
            let run = fixed_rate(&target, &rate_plan).await?;
            ensure!(run.errors == 0, "{} requests failed", run.errors);
            eprintln!(
                "round {round}, {}: p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, ok {}",
                if with_limits { "with limits" } else { "none" },
                ms(run.p50),
                ms(run.p99),
                ms(run.p999),
                run.ok
            );
            if with_limits {
                limited.push(run);
            } else {
                none.push(run);
            }
        }
    }
    let median = |runs: &mut Vec<RateRun>, pick: fn(&RateRun) -> Duration| -> f64 {
        let mut values: Vec<f64> = runs.iter().map(|r| ms(pick(r))).collect();
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    let (n50, n99) = (median(&mut none, |r| r.p50), median(&mut none, |r| r.p99));
    let (l50, l99) = (
        median(&mut limited, |r| r.p50),
        median(&mut limited, |r| r.p99),
    );
    println!(
        "fsm-sidecar pair at a fixed {} req/s over {} keep-alive connections ({:.0} s measured per round, {} rounds alternating, medians): circuit breakers on the client's cluster and rate limits on the server's virtual host and route, none of them reached, against none:",
        plan.rate,
        plan.connections,
        plan.duration.as_secs_f64(),
        plan.rounds
    );
    println!("  none:        p50 {n50:.3} ms, p99 {n99:.3} ms");
    println!("  with limits: p50 {l50:.3} ms, p99 {l99:.3} ms");
    println!(
        "  cost: p50 {:+.3} ms, p99 {:+.3} ms ({:.2}x)  [{}]",
        l50 - n50,
        l99 - n99,
        l99 / n99,
        sidecar_label(sidecar)
    );
    Ok(())
}
