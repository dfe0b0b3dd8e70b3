//! `/proc` sampling (resident memory, CPU time) and CPU pinning of the processes under test.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};

/// `VmRSS` and `VmHWM` of a process, in MiB.
pub(crate) fn memory_of(pid: u32) -> Result<(f64, f64)> {
    let field = |name: &str| -> Result<f64> {
        let kib = fsm_integration_tests::process::proc_status_kib(pid, name)
            .with_context(|| format!("no {name} in /proc/{pid}/status"))?;
        Ok(kib as f64 / 1024.0)
    };
    Ok((field("VmRSS")?, field("VmHWM")?))
}

/// Pins every thread of `pid` to `cpu` with `taskset -a -p`.
pub(crate) fn pin(pid: u32, cpu: u32) -> Result<()> {
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
pub(crate) fn cpu_time(pid: u32) -> Result<Duration> {
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
pub(crate) fn cpu_busy(cpu: u32) -> Result<(Duration, Duration)> {
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

/// CPU used over a measured window: by the sidecars under test, by everything else on CPU 0
/// (where the sidecars are pinned), and by interrupts on CPU 0.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct CpuUse {
    /// CPU time of the sidecars per second of the window (1.0 = one full core).
    pub(crate) sidecars: Option<f64>,
    /// CPU 0's process time per second not spent in the sidecars: other processes competing for
    /// the sidecars' core (the machine is shared).
    pub(crate) other_on_cpu0: f64,
    /// CPU 0's interrupt time per second (mostly loopback TCP).
    pub(crate) irq_on_cpu0: f64,
}

/// The start of a [`CpuUse`] window.
pub(crate) struct CpuWindow {
    pids: Vec<u32>,
    sidecars: Duration,
    cpu0: (Duration, Duration),
    started: std::time::Instant,
}

impl CpuWindow {
    /// Starts a window over the processes `pids` (none: only CPU 0 is sampled).
    pub(crate) fn start(pids: &[u32]) -> Result<Self> {
        Ok(CpuWindow {
            pids: pids.to_vec(),
            sidecars: total_cpu_time(pids)?,
            cpu0: cpu_busy(0)?,
            started: std::time::Instant::now(),
        })
    }

    pub(crate) fn finish(self) -> Result<CpuUse> {
        let elapsed = self.started.elapsed().as_secs_f64();
        let cpu0 = cpu_busy(0)?;
        let per_second = |after: Duration, before: Duration| {
            after.saturating_sub(before).as_secs_f64() / elapsed
        };
        let sidecars = per_second(total_cpu_time(&self.pids)?, self.sidecars);
        Ok(CpuUse {
            sidecars: (!self.pids.is_empty()).then_some(sidecars),
            other_on_cpu0: (per_second(cpu0.0, self.cpu0.0) - sidecars).max(0.0),
            irq_on_cpu0: per_second(cpu0.1, self.cpu0.1),
        })
    }
}

fn total_cpu_time(pids: &[u32]) -> Result<Duration> {
    pids.iter().map(|&pid| cpu_time(pid)).sum()
}
