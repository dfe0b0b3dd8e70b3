//! FSM's bookstore demo (examples/bookstore) as its acceptance test, with Envoy and with
//! fsm-sidecar as every pod's sidecar: in SMI mode bookbuyer may buy books and bookthief gets
//! 403; a TrafficSplit moves bookstore's traffic 100/0 -> 50/50 -> 0/100 (measured over 2,000
//! requests, within 5 % of the weights); a Retry makes bookstore's calls to a bookwarehouse that
//! fails one request in three all succeed.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Result, ensure};
use fsm_integration_tests::{
    AdsMode, DemoMesh, Plane, eventually, http_get_via, share_served_by, split_share_matches,
    unavailable_count,
};

const CONVERGE: Duration = Duration::from_secs(30);
const BOOKSTORE: &str = "bookstore.bookstore:14001";
const BOOKWAREHOUSE: &str = "bookwarehouse.bookwarehouse:14001";
const BUY: &str = "/buy-a-book/new";

async fn status(via: SocketAddr, host: &str, path: &str) -> Result<u16> {
    Ok(http_get_via(via, host, path).await?.status)
}

fn split(v1: u32, v2: u32) -> String {
    format!(
        "apiVersion: split.smi-spec.io/v1alpha4\nkind: TrafficSplit\nmetadata: {{name: bookstore-split, namespace: bookstore}}\nspec:\n  service: bookstore.bookstore\n  backends:\n  - {{service: bookstore-v1, weight: {v1}}}\n  - {{service: bookstore-v2, weight: {v2}}}\n"
    )
}

async fn bookstore(plane: Plane, subnet: u8) -> Result<()> {
    // Without its Retry at first, to see bookwarehouse fail.
    let mesh = DemoMesh::start_example("bookstore", subnet, |dir| {
        Ok(std::fs::remove_file(dir.join("60-retry.yaml"))?)
    })
    .await?;
    let _sidecars = mesh
        .start_sidecars(|_| plane, AdsMode::Sotw, CONVERGE)
        .await?;
    let buyer = mesh.pod("bookbuyer")?.outbound_addr();
    let thief = mesh.pod("bookthief")?.outbound_addr();

    // Access: bookbuyer buys, bookthief is refused, and so is what no route allows.
    eventually(CONVERGE, || async {
        let got = status(buyer, BOOKSTORE, BUY).await?;
        ensure!(got == 200, "bookbuyer: {got}");
        Ok(())
    })
    .await?;
    ensure!(
        status(thief, BOOKSTORE, BUY).await? == 403,
        "bookthief buys"
    );
    ensure!(status(buyer, BOOKSTORE, "/get").await? == 403);
    let bought = |client_app: &'static str| async move {
        let r = fsm_integration_tests::http_get_with_headers(
            buyer,
            BOOKSTORE,
            "/books-bought",
            &[("client-app", client_app)],
        )
        .await?;
        anyhow::Ok(r.status)
    };
    ensure!(bought("bookbuyer").await? == 200, "header match");
    ensure!(bought("someone").await? == 403, "header mismatch");

    // Split: 100/0 as applied, then 50/50 and 0/100.
    for (v1, v2, expected) in [(100, 0, 1.0), (50, 50, 0.5), (0, 100, 0.0)] {
        std::fs::write(mesh.manifests.join("50-split.yaml"), split(v1, v2))?;
        eventually(CONVERGE, || async {
            let share = share_served_by(buyer, BOOKSTORE, BUY, "bookstore-v1", 20).await?;
            let converged = match expected {
                1.0 | 0.0 => share == expected,
                _ => share > 0.0 && share < 1.0,
            };
            ensure!(converged, "{v1}/{v2}: v1 served {share:.2} of 20");
            Ok(())
        })
        .await?;
        let share = share_served_by(buyer, BOOKSTORE, BUY, "bookstore-v1", 2000).await?;
        eprintln!("[bookstore] {plane:?} {v1}/{v2}: bookstore-v1 served {share:.3} of 2,000");
        ensure!(
            split_share_matches(share, expected, 2000),
            "{plane:?} {v1}/{v2}: bookstore-v1 served {share:.3} of 2,000 purchases"
        );
    }

    // Retry: bookwarehouse fails one call in three until bookstore's Retry applies.
    let store = mesh.pod("bookstore-v1")?.outbound_addr();
    eventually(CONVERGE, || async {
        let got = status(store, BOOKWAREHOUSE, "/get").await?;
        ensure!(got == 200, "restock: {got}");
        Ok(())
    })
    .await?;
    let failed = unavailable_count(store, BOOKWAREHOUSE, "/flaky/3", 12).await?;
    ensure!(failed >= 3, "without the Retry {failed} of 12 failed");
    std::fs::copy(
        fsm_integration_tests::repo_root().join("examples/bookstore/60-retry.yaml"),
        mesh.manifests.join("60-retry.yaml"),
    )?;
    eventually(CONVERGE, || async {
        let failed = unavailable_count(store, BOOKWAREHOUSE, "/flaky/3", 6).await?;
        ensure!(failed == 0, "{failed} of 6 failed");
        Ok(())
    })
    .await?;
    let failed = unavailable_count(store, BOOKWAREHOUSE, "/flaky/3", 60).await?;
    ensure!(
        failed == 0,
        "{plane:?}: {failed} of 60 restocks failed with the Retry"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookstore_with_envoy() {
    if let Err(err) = bookstore(Plane::Envoy, 62).await {
        panic!("{err:#}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookstore_with_fsm_sidecar() {
    if let Err(err) = bookstore(Plane::FsmSidecar, 63).await {
        panic!("{err:#}");
    }
}
