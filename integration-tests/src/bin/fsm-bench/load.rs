//! Load generation for `sidecar-rps`: the fixed-reply app, wrk or the built-in generator, and
//! the figures of one run.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::Load;
use crate::mesh_gen::APP_HOST;
use crate::procfs::{cpu_busy, cpu_time};

/// A minimal HTTP/1.1 keep-alive server: every request (no body expected) gets the same small
/// 200. As little work per request as an app can do, so the sidecar's cost stands out.
pub(crate) async fn serve_fixed(listener: tokio::net::TcpListener) {
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

pub(crate) struct LoadPlan {
    pub(crate) connections: usize,
    pub(crate) duration: Duration,
    pub(crate) load: Load,
}

/// One measured run.
#[derive(Clone, Debug)]
pub(crate) struct Run {
    pub(crate) rps: f64,
    pub(crate) p50: Duration,
    pub(crate) p99: Duration,
    pub(crate) errors: u64,
    /// CPU time the sidecar used per second of the run (1.0 = one full core).
    pub(crate) sidecar_cores: Option<f64>,
    /// CPU 0's process time per second of the run not spent in the sidecar: other processes
    /// competing for the sidecar's core (the machine is shared).
    pub(crate) other_on_cpu0: Option<f64>,
    /// CPU 0's interrupt time per second of the run (mostly loopback TCP).
    pub(crate) irq_on_cpu0: Option<f64>,
}

pub(crate) fn wrk_available() -> bool {
    Command::new("wrk")
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("wrk"))
}

/// `512.00us`, `1.20ms`, `2.00s` as printed by wrk.
pub(crate) fn parse_wrk_duration(text: &str) -> Result<Duration> {
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
pub(crate) async fn wrk(url: &str, plan: &LoadPlan, duration: Duration) -> Result<Run> {
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
pub(crate) async fn builtin_load(url: &str, plan: &LoadPlan, duration: Duration) -> Result<Run> {
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
pub(crate) async fn measure(
    target: SocketAddr,
    plan: &LoadPlan,
    sidecar: Option<u32>,
) -> Result<Run> {
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

pub(crate) fn run_line(run: &Run) -> String {
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

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The run with the median requests per second.
pub(crate) fn median_run(runs: &[Run]) -> Option<Run> {
    let mut sorted = runs.to_vec();
    sorted.sort_by(|a, b| a.rps.total_cmp(&b.rps));
    sorted.get(sorted.len() / 2).cloned()
}
