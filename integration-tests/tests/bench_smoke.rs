//! Every `fsm-bench` benchmark in `--smoke` mode: the same steps as `make bench` with tiny sizes
//! and durations. No figure is asserted; a benchmark that no longer runs to the end (a process
//! that does not start, a proxy that never syncs, no successful request) exits non-zero and fails
//! here, so `make test` notices a broken benchmark instead of the next `make bench`.
//!
//! The data-plane benches use the debug `fsm-sidecar` that `make build` put next to `fsm-bench`,
//! and Envoy from `make envoy`.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A smoke run takes seconds; this only bounds a hung one.
const LIMIT: Duration = Duration::from_secs(180);

struct Outcome {
    success: bool,
    output: String,
}

/// Runs `fsm-bench <args>`, killing it after [`LIMIT`]; stdout and stderr go to files, so a
/// chatty benchmark cannot block on a full pipe while it is polled.
fn run_bench(args: &[&str]) -> Outcome {
    let dir = tempfile::tempdir().expect("temp dir");
    let (out, err) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let file = |path: &Path| std::fs::File::create(path).expect("output file");
    let mut child = Command::new(env!("CARGO_BIN_EXE_fsm-bench"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(file(&out))
        .stderr(file(&err))
        .spawn()
        .expect("fsm-bench starts");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for fsm-bench") {
            break Some(status);
        }
        if started.elapsed() > LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let read = |path: &Path| std::fs::read_to_string(path).unwrap_or_default();
    let output = format!(
        "fsm-bench {} ({}):\n--- stdout\n{}--- stderr\n{}",
        args.join(" "),
        match status {
            Some(status) => format!("{status}, {:.1} s", started.elapsed().as_secs_f64()),
            None => format!("killed after {LIMIT:?}"),
        },
        read(&out),
        read(&err)
    );
    Outcome {
        success: status.is_some_and(|s| s.success()),
        output,
    }
}

fn smoke(bench: &str) {
    let outcome = run_bench(&[bench, "--smoke"]);
    // Shown with --nocapture: the smoke figures, and how long the smoke run took.
    println!("{}", outcome.output);
    assert!(outcome.success, "{}", outcome.output);
}

#[test]
fn watch_latency_smoke() {
    smoke("watch-latency");
}

#[test]
fn smi_compile_smoke() {
    smoke("smi-compile");
}

#[test]
fn controller_memory_smoke() {
    smoke("controller-memory");
}

#[test]
fn cert_issuance_smoke() {
    smoke("cert-issuance");
}

#[test]
fn sidecar_memory_smoke() {
    smoke("sidecar-memory");
}

#[test]
fn sidecar_rps_smoke() {
    smoke("sidecar-rps");
}

#[test]
fn sidecar_limits_smoke() {
    smoke("sidecar-limits");
}

/// The other side of the tests above: a benchmark whose step fails exits non-zero (here the
/// fsm-sidecar under test does not exist), so a passing smoke run means every step ran.
#[test]
fn a_failed_step_fails_the_smoke_run() {
    let outcome = run_bench(&[
        "sidecar-memory",
        "--smoke",
        "--sidecar-bin",
        "/nonexistent/fsm-sidecar",
    ]);
    assert!(!outcome.success, "{}", outcome.output);
    assert!(
        outcome
            .output
            .contains("fsm-sidecar not found at /nonexistent/fsm-sidecar"),
        "{}",
        outcome.output
    );
}

#[test]
fn xds_scale_smoke() {
    smoke("xds-scale");
}
