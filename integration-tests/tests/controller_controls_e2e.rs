//! The operator's controls over fsm-controller, switched live through MeshConfig on a manifest
//! directory (the demo's, which leaves them at FSM's defaults):
//!
//! - `spec.observability.enableDebugServer`: `/debug/*` answer 404 with the field and the
//!   `kubectl patch` that turns them on while it is false, and serve once it is true, and stop
//!   again once it is false; `/health/*`, `/metrics` and `/version` answer throughout.
//! - `spec.observability.fsmLogLevel`: `debug` brings the controller's debug lines, `error` leaves
//!   only errors; a level that is none of FSM's is refused with E1001, counted in
//!   `fsm_error_err_code_count`, and the level in force stays.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use fsm_integration_tests::mesh::enable_debug_server;
use fsm_integration_tests::{
    Controller, ControllerOptions, edit_manifest, eventually, example_manifests, start_controller,
};

const CONVERGE: Duration = Duration::from_secs(20);
/// A debug line of the control loop, written after every batch of catalog changes.
const DEBUG_LINE: &str = "applied catalog changes";
/// What the controller logs as its level changes.
const LEVEL_SET: &str = "log level set from MeshConfig";

/// Status and body of `GET path`.
async fn get(controller: &Controller, path: &str) -> Result<(u16, String)> {
    let response = reqwest::get(controller.url(path))
        .await
        .with_context(|| format!("GET {path}"))?;
    let status = response.status().as_u16();
    Ok((status, response.text().await?))
}

/// The always-on endpoints answer.
async fn always_on(controller: &Controller) -> Result<()> {
    for path in ["/health/alive", "/health/ready", "/metrics", "/version"] {
        let (status, body) = get(controller, path).await?;
        ensure!(status == 200, "{path}: {status} {body}");
    }
    Ok(())
}

fn log(controller: &Controller) -> String {
    std::fs::read_to_string(controller.process.log_path()).unwrap_or_default()
}

/// Replaces `from` with `to` in the MeshConfig manifest.
fn edit_mesh_config(manifests: &Path, from: &str, to: &str) -> Result<()> {
    edit_manifest(&manifests.join("00-mesh.yaml"), from, to)
}

#[tokio::test]
async fn debug_server_and_log_level_follow_meshconfig_live() -> Result<()> {
    let work = tempfile::tempdir()?;
    let logs = work.path().join("logs");
    std::fs::create_dir_all(&logs)?;
    let manifests = example_manifests("demo", &work.path().join("manifests"), 10)?;
    let controller = start_controller(&manifests, &logs, &ControllerOptions::default()).await?;
    let (status, body) = get(&controller, "/health/ready").await?;
    ensure!((status, body.as_str()) == (200, "ready"), "{status} {body}");

    // FSM's default: off, and the answer says how to turn it on.
    let (status, body) = get(&controller, "/debug/proxies").await?;
    ensure!(status == 404, "{status} {body}");
    ensure!(
        body.contains("spec.observability.enableDebugServer")
            && body.contains("kubectl patch meshconfig fsm-mesh-config -n fsm-system --type=merge -p '{\"spec\":{\"observability\":{\"enableDebugServer\":true}}}'"),
        "{body}"
    );
    always_on(&controller).await?;
    // The default level is info: no debug line so far.
    ensure!(
        !log(&controller).contains(DEBUG_LINE),
        "{}",
        log(&controller)
    );

    // On, live.
    enable_debug_server(&manifests)?;
    eventually(CONVERGE, || async {
        let (status, body) = get(&controller, "/debug/proxies").await?;
        ensure!(status == 200, "{status} {body}");
        Ok(())
    })
    .await
    .context("the debug server never came on")?;
    for path in ["/debug/config", "/debug/problems", "/debug/source"] {
        let (status, body) = get(&controller, path).await?;
        ensure!(status == 200, "{path}: {status} {body}");
    }

    // fsmLogLevel debug: the control loop's debug lines appear.
    edit_mesh_config(
        &manifests,
        "    enableDebugServer: true\n",
        "    enableDebugServer: true\n    fsmLogLevel: debug\n",
    )?;
    eventually(CONVERGE, || async {
        ensure!(log(&controller).contains(DEBUG_LINE), "no debug line yet");
        Ok(())
    })
    .await
    .context("fsmLogLevel debug was not followed")?;

    // A level that is none of FSM's: E1001, and the MeshConfig in force stays.
    let counted = |metrics: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with("fsm_error_err_code_count{err_code=\"E1001\"}"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let before = counted(&controller.metrics().await?);
    edit_mesh_config(&manifests, "fsmLogLevel: debug", "fsmLogLevel: verbose")?;
    eventually(CONVERGE, || async {
        let problems = controller.debug_problems().await?;
        ensure!(
            problems
                .iter()
                .any(|p| p.starts_with("E1001") && p.contains("spec.observability.fsmLogLevel")),
            "{problems:?}"
        );
        ensure!(
            counted(&controller.metrics().await?) > before,
            "E1001 not counted"
        );
        Ok(())
    })
    .await
    .context("an unknown fsmLogLevel was not refused with E1001")?;
    ensure!(get(&controller, "/debug/proxies").await?.0 == 200);

    // fsmLogLevel error: the change is said, then nothing below error, though the debug server
    // going off is an info line and the batch applying it a debug one.
    let said = log(&controller).matches(LEVEL_SET).count();
    edit_mesh_config(&manifests, "fsmLogLevel: verbose", "fsmLogLevel: error")?;
    eventually(CONVERGE, || async {
        // Said just before the change, at the level it leaves.
        ensure!(
            log(&controller).matches(LEVEL_SET).count() > said,
            "the level change is not logged yet"
        );
        Ok(())
    })
    .await
    .context("fsmLogLevel error was not followed")?;
    let quiet_from = log(&controller).len();
    edit_mesh_config(
        &manifests,
        "enableDebugServer: true",
        "enableDebugServer: false",
    )?;
    eventually(CONVERGE, || async {
        let (status, body) = get(&controller, "/debug/proxies").await?;
        ensure!(status == 404, "{status} {body}");
        Ok(())
    })
    .await
    .context("the debug server never went off")?;
    always_on(&controller).await?;
    let after = log(&controller)[quiet_from..].to_owned();
    ensure!(
        !after.contains("INFO") && !after.contains("DEBUG") && !after.contains(DEBUG_LINE),
        "logged below error at fsmLogLevel error:\n{after}"
    );
    Ok(())
}
