//! Child processes that log to files and never outlive the test that started them.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use tokio::time::Instant;

/// A child process whose stdout and stderr go to `<log_dir>/<name>.log`. Dropping it kills the
/// process, so a failing or panicking test leaves nothing listening on its ports.
#[derive(Debug)]
pub struct ManagedProcess {
    name: String,
    child: Child,
    log_path: PathBuf,
}

// === ManagedProcess ===

impl ManagedProcess {
    pub fn spawn(name: &str, mut command: Command, log_dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(log_dir)
            .with_context(|| format!("creating log directory {}", log_dir.display()))?;
        let log_path = log_dir.join(format!("{name}.log"));
        let stdout =
            File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let stderr = stdout.try_clone().context("duplicating log file handle")?;
        let child = command
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("starting {name}: {command:?}"))?;
        Ok(ManagedProcess {
            name: name.to_string(),
            child,
            log_path,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The last `lines` lines of the log, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Fails when the process has exited, quoting its log: a crashed child otherwise shows up
    /// only as a confusing timeout further on.
    pub fn check_running(&mut self) -> Result<()> {
        match self.child.try_wait().context("polling child process")? {
            None => Ok(()),
            Some(status) => bail!(
                "{} exited with {status}; from {}:\n{}",
                self.name,
                self.log_path.display(),
                self.exit_reason(30)
            ),
        }
    }

    /// What the log says about why the process ended: from its last panic or error (which a
    /// backtrace after it would push out of a plain tail), else its last lines; at most `lines`.
    fn exit_reason(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let start = all
            .iter()
            .rposition(|l| l.contains("panicked at") || l.starts_with("Error:"))
            .unwrap_or(all.len().saturating_sub(lines));
        all[start..all.len().min(start + lines)].join("\n")
    }

    /// Waits until `addr` accepts connections, failing early if the process dies.
    pub async fn wait_for_tcp(&mut self, addr: SocketAddr, timeout: Duration) -> Result<()> {
        self.wait_for(
            timeout,
            &format!("{addr} to accept connections"),
            || async move { try_connect(addr).await },
        )
        .await
    }

    /// Waits until the log contains `needle`. Stronger than probing a port when the process
    /// announces readiness itself: a stale process still holding the port cannot fake it.
    pub async fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let path = self.log_path.clone();
        self.wait_for(timeout, &format!("{needle:?} in its log"), || {
            let path = path.clone();
            async move {
                let text = tokio::fs::read_to_string(&path)
                    .await
                    .with_context(|| format!("reading {}", path.display()))?;
                if text.contains(needle) {
                    Ok(())
                } else {
                    Err(anyhow!("not logged yet"))
                }
            }
        })
        .await
    }

    /// Waits until GET `url` answers 2xx, failing early if the process dies.
    pub async fn wait_for_http_ok(&mut self, url: &str, timeout: Duration) -> Result<()> {
        let client = crate::client::plain_client()?;
        self.wait_for(timeout, &format!("{url} to answer 2xx"), || {
            let client = client.clone();
            async move { try_http_ok(&client, url).await }
        })
        .await
    }

    async fn wait_for<F, Fut>(&mut self, timeout: Duration, what: &str, mut probe: F) -> Result<()>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<()>>,
    {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_running()?;
            let last = match probe().await {
                Ok(()) => return Ok(()),
                Err(err) => err,
            };
            if Instant::now() >= deadline {
                return Err(last.context(format!(
                    "{}: waited {timeout:?} for {what}; last lines of {}:\n{}",
                    self.name,
                    self.log_path.display(),
                    self.log_tail(30)
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills the process and reaps it. Idempotent.
    pub fn kill(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for ManagedProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

// === free functions ===

/// A loopback port that was free a moment ago. The OS hands out ports from the ephemeral range in
/// sequence, so the short window before the child binds it rarely matters in practice.
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .context("binding 127.0.0.1:0 to find a free port")?;
    Ok(listener
        .local_addr()
        .context("reading the bound port")?
        .port())
}

/// Waits until `addr` accepts TCP connections.
pub async fn wait_for_tcp(addr: SocketAddr, timeout: Duration) -> Result<()> {
    crate::eventually(timeout, || try_connect(addr))
        .await
        .with_context(|| format!("waiting for {addr} to accept connections"))
}

/// Waits until GET `url` answers 2xx.
pub async fn wait_for_http_ok(url: &str, timeout: Duration) -> Result<()> {
    let client = crate::client::plain_client()?;
    crate::eventually(timeout, || try_http_ok(&client, url))
        .await
        .with_context(|| format!("waiting for {url} to answer 2xx"))
}

async fn try_connect(addr: SocketAddr) -> Result<()> {
    tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| anyhow!("connect to {addr} timed out"))?
        .with_context(|| format!("connecting to {addr}"))?;
    Ok(())
}

async fn try_http_ok(client: &reqwest::Client, url: &str) -> Result<()> {
    let response = client
        .get(url)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    let status = response.status();
    if !status.is_success() {
        let body = response.text().await.unwrap_or_default();
        bail!("GET {url}: {status}: {}", body.trim());
    }
    Ok(())
}

/// A `kB` field of `/proc/<pid>/status` such as `VmRSS` or `VmHWM` (Linux only).
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
