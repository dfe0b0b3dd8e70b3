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
