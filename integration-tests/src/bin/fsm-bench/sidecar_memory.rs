//! `sidecar-memory`: idle resident memory of fsm-sidecar and of Envoy, both configured for the
//! same client identity in a mesh of 100+ services, in the same run.

use std::time::Duration;

use anyhow::{Result, ensure};

use crate::SidecarArgs;
use crate::bench_mesh::{BenchMesh, sidecar_label, wait_proxy_in_sync};
use crate::mesh_gen::{CLIENT, CLIENT_FSM};
use crate::procfs::memory_of;

/// `settle`: how long after both are in sync the sidecars are left alone before their memory is
/// read.
pub(crate) async fn sidecar_memory(
    services: usize,
    settle: Duration,
    sidecar: &SidecarArgs,
) -> Result<()> {
    let mesh = BenchMesh::start(60, services).await?;
    let envoy = mesh.envoy(CLIENT).await?;
    let fsm = mesh.fsm_sidecar(CLIENT_FSM, sidecar).await?;
    // Both must hold the whole config at once, and nothing may still be arriving.
    wait_proxy_in_sync(&mesh.controller, mesh.pod(CLIENT)?).await?;
    wait_proxy_in_sync(&mesh.controller, mesh.pod(CLIENT_FSM)?).await?;
    // Measured before any admin call: building a config dump allocates in both.
    tokio::time::sleep(settle).await;
    let (envoy_rss, envoy_hwm) = memory_of(envoy.process.pid())?;
    let (fsm_rss, fsm_hwm) = memory_of(fsm.process.pid())?;
    // Then check both hold the whole mesh.
    let clusters = envoy.active_clusters().await?.len();
    ensure!(
        clusters > services,
        "Envoy has {clusters} clusters, fewer than the {services} services"
    );
    // fsm-sidecar's resources per type, e.g. `Cluster: 103`: the same mesh, in its own types.
    let dump = fsm.config_dump().await?;
    let mut held = Vec::new();
    let mut fsm_clusters = 0;
    for (type_url, state) in dump["types"].as_object().into_iter().flatten() {
        let kind = type_url.rsplit('.').next().unwrap_or(type_url);
        let count = state["resources"].as_array().map_or(0, Vec::len);
        if kind == "Cluster" {
            fsm_clusters = count;
        }
        held.push(format!("{kind}: {count}"));
    }
    ensure!(
        fsm_clusters > services,
        "fsm-sidecar has {fsm_clusters} clusters, fewer than the {services} services"
    );
    println!(
        "idle sidecar memory, client {} with {services} extra services ({clusters} Envoy clusters), {:.1} s after both were in sync:",
        mesh.pod(CLIENT)?.node_cluster(),
        settle.as_secs_f64()
    );
    println!("  fsm-sidecar holds {}", held.join(", "));
    println!("  envoy (--concurrency 1): RSS {envoy_rss:.1} MiB (peak {envoy_hwm:.1} MiB)");
    println!(
        "  fsm-sidecar:             RSS {fsm_rss:.1} MiB (peak {fsm_hwm:.1} MiB)  [{}]",
        sidecar_label(sidecar)
    );
    println!(
        "  fsm-sidecar / envoy:     RSS {:.3}x, peak {:.3}x",
        fsm_rss / envoy_rss,
        fsm_hwm / envoy_hwm
    );
    Ok(())
}
