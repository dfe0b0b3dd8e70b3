//! `controller-memory`: resident memory of fsm-controller with a large cluster loaded through the
//! test API server, beside an empty cluster's.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use fsm_integration_tests::cluster::TestCluster;
use fsm_integration_tests::{ControllerOptions, start_controller_on_cluster};

use crate::mesh_gen::synthetic_mesh;
use crate::procfs::memory_of;

/// `settle`: how long after ready the controller is left alone before its memory is read.
pub(crate) async fn controller_memory(
    services: usize,
    pods_per_service: usize,
    settle: Duration,
) -> Result<()> {
    let mut figures = Vec::new();
    for (label, services) in [("empty cluster", 0), ("loaded cluster", services)] {
        let c = TestCluster::start_demo(17).await?;
        let objects = synthetic_mesh(services, pods_per_service);
        let store = c.server.store();
        let loading = Instant::now();
        for object in &objects {
            if let Err(e) = store.apply(object) {
                bail!(
                    "loading {} {}: {e:?}",
                    object["kind"],
                    object["metadata"]["name"]
                );
            }
        }
        let loaded_in = loading.elapsed();
        let started = Instant::now();
        let controller =
            start_controller_on_cluster(&c.kubeconfig, &c.logs, &ControllerOptions::default())
                .await?;
        let ready_in = started.elapsed();
        // Let the initial lists' buffers be released and the allocator settle.
        tokio::time::sleep(settle).await;
        let (rss, hwm) = memory_of(controller.process.pid())?;
        figures.push(format!(
            "  {label:14}: {services} services, {} pods, {} objects (store load {:.1}s): controller ready in {:.2}s, RSS {rss:.1} MiB (peak {hwm:.1} MiB)",
            services * pods_per_service,
            objects.len(),
            loaded_in.as_secs_f64(),
            ready_in.as_secs_f64()
        ));
    }
    println!("fsm-controller memory, objects loaded through the test API server:");
    for line in figures {
        println!("{line}");
    }
    Ok(())
}
