//! `make demo` as a test: the demo mesh on `examples/demo` with real sidecars must carry HTTP and
//! TCP and end with every sidecar in sync; so must `make demo-bookstore` on `examples/bookstore`
//! (HTTP from bookbuyer). Uses the demo's `127.0.10.x` addresses, so it fails while a `make demo`
//! is running on the same machine.

use std::process::Command;

use fsm_integration_tests::AdsMode;

fn run_demo_once(mode: AdsMode, data_plane: &str) -> String {
    run_once(mode, data_plane, &[])
}

fn run_once(mode: AdsMode, data_plane: &str, extra: &[&str]) -> String {
    let work = tempfile::tempdir().expect("temp dir");
    let mode_arg = match mode {
        AdsMode::Sotw => "sotw",
        AdsMode::Delta => "delta",
    };
    let output = Command::new(env!("CARGO_BIN_EXE_fsm-demo"))
        .args([
            "--once",
            "--ads-mode",
            mode_arg,
            "--data-plane",
            data_plane,
            "--ads-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .args(extra)
        .arg("--work-dir")
        .arg(work.path())
        .output()
        .expect("fsm-demo runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "fsm-demo --once ({mode_arg}, {data_plane}) failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("demo check PASSED"), "{stdout}");
    stdout.into_owned()
}

fn check_demo(stdout: &str) {
    for backend in ["httpbin-v1", "httpbin-v2"] {
        assert!(
            stdout.contains(&format!("served by {backend}")),
            "{backend} never answered:\n{stdout}"
        );
    }
    assert!(
        stdout.contains("tcp-echo-1: hello from fsm-demo"),
        "{stdout}"
    );
}

/// The bookstore demo as `make demo-bookstore` runs it: bookbuyer buys from bookstore (SMI mode,
/// the split sends it all to bookstore-v1).
fn run_bookstore_once(data_plane: &str) {
    let stdout = run_once(
        AdsMode::Sotw,
        data_plane,
        &[
            "--manifests",
            concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/bookstore"),
            "--client",
            "bookbuyer/bookbuyer",
            "--http-host",
            "bookstore.bookstore:14001",
            "--http-path",
            "/buy-a-book/new",
            "--tcp-port",
            "0",
        ],
    );
    assert!(stdout.contains("served by bookstore-v1"), "{stdout}");
}

// One test for every mode, data plane and example: they share the demo's fixed pod addresses,
// so they must not overlap.
#[test]
fn demo_passes_with_sotw_and_delta_ads_on_both_data_planes() {
    check_demo(&run_demo_once(AdsMode::Sotw, "envoy"));
    check_demo(&run_demo_once(AdsMode::Delta, "envoy"));
    check_demo(&run_demo_once(AdsMode::Sotw, "fsm-sidecar"));
    check_demo(&run_demo_once(AdsMode::Delta, "fsm-sidecar"));
    run_bookstore_once("envoy");
    run_bookstore_once("fsm-sidecar");
}
