//! Load generation for `sidecar-rps`: the fixed-reply app, a fixed-rate open-loop client, full
//! load from wrk or the built-in generator, and the figures of one run.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::Load;
use crate::procfs::{CpuUse, CpuWindow};

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

/// Where one path of the bench sends its requests.
#[derive(Clone, Debug)]
pub(crate) struct Target {
    pub(crate) name: &'static str,
    /// The client sidecar's outbound listener, or the app itself for the direct path.
    pub(crate) addr: SocketAddr,
    /// The `Host` the client names (the sidecar routes by it).
    pub(crate) host: String,
    /// The sidecars on the path (client and server), whose CPU time is sampled.
    pub(crate) sidecars: Vec<u32>,
}

/// A full-load run: as many requests as `connections` keep-alive connections carry, one in
/// flight on each.
pub(crate) struct LoadPlan {
    pub(crate) connections: usize,
    pub(crate) warmup: Duration,
    pub(crate) duration: Duration,
    pub(crate) load: Load,
}

/// One measured full-load run.
#[derive(Clone, Debug)]
pub(crate) struct Run {
    pub(crate) rps: f64,
    pub(crate) ok: u64,
    pub(crate) p50: Duration,
    pub(crate) p99: Duration,
    pub(crate) errors: u64,
    pub(crate) cpu: CpuUse,
}

pub(crate) fn wrk_available() -> bool {
    Command::new("wrk")
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("wrk"))
}

/// The load generator `load` stands for on this machine.
pub(crate) fn use_wrk(load: Load) -> bool {
    match load {
        Load::Wrk => true,
        Load::Builtin => false,
        Load::Auto => wrk_available(),
    }
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

/// Runs wrk (one thread, pinned to CPU 1) against `target`.
async fn wrk(target: &Target, connections: usize, duration: Duration) -> Result<Run> {
    let output = tokio::process::Command::new("taskset")
        .args(["-c", "1", "wrk", "-t1", "--latency", "-H"])
        .arg(format!("Host: {}", target.host))
        .arg(format!("-c{connections}"))
        .arg(format!("-d{}s", duration.as_secs().max(1)))
        .arg(format!("http://{}/", target.addr))
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
    // "N requests in 10.00s, ..." counts every response, the non-2xx ones too.
    let requests = text
        .lines()
        .map(str::trim)
        .find_map(|l| l.split_once(" requests in ")?.0.parse::<u64>().ok())
        .with_context(|| format!("no request count in wrk output:\n{text}"))?;
    Ok(Run {
        rps: value_after("Requests/sec:")?.parse()?,
        ok: requests.saturating_sub(errors),
        p50: parse_wrk_duration(value_after("50%")?)?,
        p99: parse_wrk_duration(value_after("99%")?)?,
        errors,
        cpu: CpuUse::default(),
    })
}

/// One keep-alive HTTP/1.1 client connection that sends `GET /` and reads a response with a
/// `content-length` (the bench app always sends one; so do both sidecars when relaying it).
struct Client {
    stream: TcpStream,
    request: Vec<u8>,
    buf: Vec<u8>,
}

impl Client {
    async fn connect(target: &Target) -> Result<Self> {
        let stream = TcpStream::connect(target.addr)
            .await
            .with_context(|| format!("connecting to {} ({})", target.addr, target.name))?;
        stream.set_nodelay(true)?;
        Ok(Client {
            stream,
            request: format!("GET / HTTP/1.1\r\nhost: {}\r\n\r\n", target.host).into_bytes(),
            buf: Vec::with_capacity(4096),
        })
    }

    /// One request on `client`, connecting first when there is none; after an error the
    /// connection is dropped, so the next request starts a fresh one.
    async fn request(client: &mut Option<Client>, target: &Target) -> Result<()> {
        let result = match client {
            Some(client) => client.get().await,
            None => {
                let mut new = Client::connect(target).await?;
                let result = new.get().await;
                *client = Some(new);
                result
            }
        };
        if result.is_err() {
            *client = None;
        }
        result
    }

    /// One request and its whole response; an error unless the status is 200.
    async fn get(&mut self) -> Result<()> {
        self.stream.write_all(&self.request).await?;
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = std::str::from_utf8(&self.buf[..end]).context("response head")?;
                let status = head
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or_default()
                    .to_string();
                let length: usize = head
                    .lines()
                    .filter_map(|l| l.split_once(':'))
                    .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
                    .map(|(_, value)| value.trim().parse())
                    .transpose()?
                    .with_context(|| format!("response without content-length: {head}"))?;
                let total = end + 4 + length;
                while self.buf.len() < total {
                    self.fill().await?;
                }
                self.buf.drain(..total);
                ensure!(status == "200", "status {status}");
                return Ok(());
            }
            self.fill().await?;
        }
    }

    async fn fill(&mut self) -> Result<()> {
        let mut chunk = [0u8; 4096];
        let n = self.stream.read(&mut chunk).await?;
        ensure!(n > 0, "connection closed by the peer");
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}

/// The sample at quantile `q` of sorted `samples`.
fn quantile(sorted: &[Duration], q: f64) -> Duration {
    sorted
        .get(((sorted.len() as f64 * q) as usize).min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default()
}

/// The built-in full-load generator: `connections` tasks, each with its own keep-alive
/// connection and one request in flight (this process is pinned to CPU 1).
async fn builtin_load(target: &Target, connections: usize, duration: Duration) -> Result<Run> {
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let target = target.clone();
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0u64;
            let mut client = None;
            while Instant::now() < deadline {
                let sent = Instant::now();
                match Client::request(&mut client, &target).await {
                    Ok(()) => latencies.push(sent.elapsed()),
                    Err(_) => {
                        errors += 1;
                        // Back off so a dead path does not spin.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
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
    Ok(Run {
        rps: latencies.len() as f64 / elapsed.as_secs_f64(),
        ok: latencies.len() as u64,
        p50: quantile(&latencies, 0.50),
        p99: quantile(&latencies, 0.99),
        errors,
        cpu: CpuUse::default(),
    })
}

/// A warm-up, then one measured full-load run against `target`, sampling its sidecars' CPU over
/// the measured part. Fails when no request succeeded.
pub(crate) async fn full_load(target: &Target, plan: &LoadPlan) -> Result<Run> {
    let wrk = use_wrk(plan.load);
    let run = |duration| async move {
        if wrk {
            self::wrk(target, plan.connections, duration).await
        } else {
            builtin_load(target, plan.connections, duration).await
        }
    };
    run(plan.warmup).await?;
    let window = CpuWindow::start(&target.sidecars)?;
    let mut measured = run(plan.duration).await?;
    measured.cpu = window.finish()?;
    ensure!(
        measured.ok > 0,
        "no successful request through {} ({} errors)",
        target.name,
        measured.errors
    );
    Ok(measured)
}

/// A fixed-rate run: `rate` requests per second in all, spread evenly over `connections`
/// keep-alive connections.
pub(crate) struct RatePlan {
    pub(crate) rate: u32,
    pub(crate) connections: usize,
    pub(crate) warmup: Duration,
    pub(crate) duration: Duration,
}

/// One measured fixed-rate run.
#[derive(Clone, Debug)]
pub(crate) struct RateRun {
    pub(crate) ok: u64,
    pub(crate) errors: u64,
    pub(crate) p50: Duration,
    pub(crate) p99: Duration,
    pub(crate) p999: Duration,
    pub(crate) max: Duration,
    pub(crate) cpu: CpuUse,
}

/// Open-loop load at a fixed rate (as wrk2 does): every connection has its own schedule of send
/// times, and a request that could not be sent on time because the previous response on its
/// connection came late is timed from when it should have been sent, so a stall shows in the
/// tail instead of lowering the rate (coordinated omission). Timer lateness (tokio's timer has
/// millisecond resolution) is not counted: such a request is timed from when it was written.
/// Only requests scheduled after the warm-up are recorded; the sidecars' CPU is sampled over the
/// measured part. Fails when no request succeeded.
pub(crate) async fn fixed_rate(target: &Target, plan: &RatePlan) -> Result<RateRun> {
    ensure!(
        plan.rate > 0 && plan.connections > 0,
        "rate and connections must be positive"
    );
    let start = tokio::time::Instant::now() + Duration::from_millis(50);
    let measured_from = start + plan.warmup;
    let end = measured_from + plan.duration;
    let gap = Duration::from_secs_f64(1.0 / f64::from(plan.rate));
    let interval = gap * plan.connections as u32;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..plan.connections {
        let target = target.clone();
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0u64;
            let mut client: Option<Client> = None;
            let mut due = start + gap * i as u32;
            while due < end {
                tokio::time::sleep_until(due).await;
                let now = tokio::time::Instant::now();
                // Late by more than the timer's slack: the connection was busy with the
                // previous request, so the wait counts.
                let timed_from = if now > due + Duration::from_millis(2) {
                    due
                } else {
                    now
                };
                let result = Client::request(&mut client, &target).await;
                if due >= measured_from {
                    match result {
                        Ok(()) => latencies.push(timed_from.elapsed()),
                        Err(_) => errors += 1,
                    }
                }
                due += interval;
            }
            (latencies, errors)
        });
    }
    tokio::time::sleep_until(measured_from).await;
    let window = CpuWindow::start(&target.sidecars)?;
    let mut latencies = Vec::new();
    let mut errors = 0;
    while let Some(joined) = tasks.join_next().await {
        let (l, e) = joined?;
        latencies.extend(l);
        errors += e;
    }
    let cpu = window.finish()?;
    latencies.sort();
    ensure!(
        !latencies.is_empty(),
        "no successful request through {} at {} req/s on {} connections ({errors} errors)",
        target.name,
        plan.rate,
        plan.connections
    );
    Ok(RateRun {
        ok: latencies.len() as u64,
        errors,
        p50: quantile(&latencies, 0.50),
        p99: quantile(&latencies, 0.99),
        p999: quantile(&latencies, 0.999),
        max: latencies.last().copied().unwrap_or_default(),
        cpu,
    })
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

/// One successful request through `target`, retried for a few seconds (a sidecar in sync may
/// still be opening its listener); the last error names the path.
pub(crate) async fn probe(target: &Target) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut client = None;
    loop {
        match Client::request(&mut client, target).await {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(e.context(format!(
                    "no answer through {} ({} with Host {})",
                    target.name, target.addr, target.host
                )));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Whether a plaintext `GET /` to `target` fails (a TLS listener closes or answers with an
/// alert, never with a 200) within two seconds.
pub(crate) async fn refuses_plaintext(target: &Target) -> bool {
    let mut client = None;
    let attempt = Client::request(&mut client, target);
    !matches!(
        tokio::time::timeout(Duration::from_secs(2), attempt).await,
        Ok(Ok(()))
    )
}
