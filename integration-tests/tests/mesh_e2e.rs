//! The walking skeleton end to end: fsm-controller on a manifest directory, demo workloads on their
//! own loopback addresses and real Envoy 1.40 sidecars bootstrapped with nothing but the ADS
//! address. Run once over state-of-the-world ADS and once over delta ADS, each on its own
//! 127.0.<subnet>.x addresses so both can run at the same time.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use fsm_integration_tests::{
    AdsMode, Controller, DemoMesh, MeshPod, backends_via, edit_manifest, eventually, tcp_roundtrip,
    wait_tcp_unreachable,
};

const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
const CONVERGE: Duration = Duration::from_secs(20);
const HTTPBIN: &str = "httpbin.demo:14001";
const V1_ENDPOINT: &str =
    "  - ip: 127.0.10.1\n    targetRef: {kind: Pod, name: httpbin-v1, namespace: demo}\n";
const V2_ENDPOINT: &str =
    "  - ip: 127.0.10.2\n    targetRef: {kind: Pod, name: httpbin-v2, namespace: demo}\n";

async fn backends(via: SocketAddr, n: usize) -> Result<BTreeSet<String>> {
    backends_via(via, HTTPBIN, n).await
}

fn uuid_of(pod: &MeshPod) -> String {
    pod.proxy_uuid.clone().unwrap_or_default()
}

async fn eds_acked(controller: &Controller, uuid: &str) -> Result<Option<String>> {
    controller.in_sync_version(uuid, EDS).await
}

async fn run_mesh(mode: AdsMode, subnet: u8) -> Result<()> {
    // The test reads the controller's /debug endpoints.
    let mesh =
        DemoMesh::start_edited(subnet, fsm_integration_tests::mesh::enable_debug_server).await?;
    let envoys = mesh.start_envoys(mode, CONVERGE).await?;
    let DemoMesh {
        controller,
        pods,
        manifests,
        ..
    } = &mesh;
    let curl = pods
        .iter()
        .find(|p| p.name == "curl")
        .context("curl pod")?
        .clone();
    let server = |name: &str| {
        envoys
            .iter()
            .find(|(p, _)| p.name == name)
            .map(|(_, e)| e)
            .context("sidecar")
    };

    // 1. HTTP crosses client sidecar -> server sidecar -> app, round-robin over both versions.
    let seen = eventually(CONVERGE, || backends(curl.outbound_addr(), 6)).await?;
    ensure!(
        seen == BTreeSet::from(["httpbin-v1".into(), "httpbin-v2".into()]),
        "backends {seen:?}"
    );
    for name in ["httpbin-v1", "httpbin-v2"] {
        let served = server(name)?
            .counter("cluster.demo/httpbin|14001|local.upstream_rq_total")
            .await?;
        ensure!(
            served > 0,
            "{name}'s sidecar forwarded no request to its app (local-cluster upstream_rq_total {served})"
        );
    }

    // 2. TCP through both sidecars (CONNECT tunnel between them).
    let tcp_addr = SocketAddr::new(curl.ip, 9000);
    let echoed = eventually(CONVERGE, || tcp_roundtrip(tcp_addr, "ping")).await?;
    ensure!(echoed == "tcp-echo-1: ping", "echo {echoed:?}");

    // 3. Envoy holds exactly the versions the controller reports as ACKed.
    for (pod, envoy) in &envoys {
        let uuid = uuid_of(pod);
        eventually(CONVERGE, || async {
            let status = controller
                .debug_proxies()
                .await?
                .get(&uuid)
                .cloned()
                .context("proxy not in /debug/proxies")?;
            for type_url in [CDS, EDS, LDS] {
                let t = status
                    .types
                    .get(type_url)
                    .with_context(|| format!("{type_url} not tracked"))?;
                ensure!(t.is_in_sync(), "{} {type_url} not in sync: {t:?}", pod.id());
            }
            if mode == AdsMode::Sotw {
                let (clusters, listeners) = envoy.dynamic_versions().await?;
                ensure!(
                    clusters
                        == BTreeSet::from([status.types[CDS]
                            .acked_version
                            .clone()
                            .unwrap_or_default()]),
                    "clusters {clusters:?} vs {:?}",
                    status.types[CDS]
                );
                ensure!(
                    listeners
                        == BTreeSet::from([status.types[LDS]
                            .acked_version
                            .clone()
                            .unwrap_or_default()]),
                    "listeners {listeners:?} vs {:?}",
                    status.types[LDS]
                );
            }
            Ok(())
        })
        .await?;
    }

    // 4. Manifest edits change behaviour: an endpoint leaves, comes back; time each edit to ACK.
    let httpbin_file = manifests.join("20-httpbin.yaml");
    let v1_line = V1_ENDPOINT.replace("127.0.10.", &format!("127.0.{subnet}."));
    let v2_line = V2_ENDPOINT.replace("127.0.10.", &format!("127.0.{subnet}."));
    let curl_uuid = uuid_of(&curl);
    let mut latencies = Vec::new();
    for round in 0..20 {
        let before = eds_acked(controller, &curl_uuid).await?;
        let started = Instant::now();
        if round % 2 == 0 {
            edit_manifest(&httpbin_file, &v2_line, "")?;
        } else {
            edit_manifest(&httpbin_file, &v1_line, &format!("{v1_line}{v2_line}"))?;
        }
        let acked = async {
            loop {
                if let Some(now) = eds_acked(controller, &curl_uuid).await?
                    && Some(&now) != before.as_ref()
                {
                    return anyhow::Ok(now);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(CONVERGE, acked)
            .await
            .context("EDS not re-ACKed in time")??;
        latencies.push(started.elapsed());
        eventually(CONVERGE, || async {
            let now = eds_acked(controller, &curl_uuid).await?;
            let status = controller
                .debug_proxies()
                .await?
                .get(&curl_uuid)
                .and_then(|p| p.types.get(EDS).cloned());
            ensure!(
                now.is_some() && now != before,
                "EDS not yet re-ACKed (before {before:?}): {status:?}"
            );
            Ok(())
        })
        .await
        .with_context(|| {
            format!(
                "round {round}; controller log:\n{}",
                controller.process.log_tail(15)
            )
        })?;
        let expected: BTreeSet<String> = if round % 2 == 0 {
            BTreeSet::from(["httpbin-v1".into()])
        } else {
            BTreeSet::from(["httpbin-v1".into(), "httpbin-v2".into()])
        };
        let seen = eventually(CONVERGE, || async {
            let seen = backends(curl.outbound_addr(), 6).await?;
            ensure!(seen == expected, "backends {seen:?}, want {expected:?}");
            Ok(seen)
        })
        .await?;
        ensure!(seen == expected);
    }
    latencies.sort();
    eprintln!(
        "[{mode:?}] manifest edit -> Envoy EDS ACK over {} edits: median {:?}, min {:?}, max {:?}",
        latencies.len(),
        latencies[latencies.len() / 2],
        latencies[0],
        latencies[latencies.len() - 1]
    );

    // 5. A malformed document is reported and skipped; the mesh keeps serving.
    std::fs::write(
        manifests.join("40-broken.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: broken\n  namespace: demo\nspec:\n  ports:\n  - port: 99999\n",
    )?;
    let problems = eventually(CONVERGE, || async {
        let body = reqwest::get(controller.url("/debug/problems"))
            .await?
            .text()
            .await?;
        ensure!(
            body.contains("40-broken.yaml") && body.contains("spec.ports[0].port"),
            "problems: {body}"
        );
        Ok(body)
    })
    .await?;
    ensure!(problems.contains("Service demo/broken"), "{problems}");
    ensure!(!backends(curl.outbound_addr(), 2).await?.is_empty());

    // 6. A removed service disappears from the sidecars: its TCP listener closes.
    std::fs::remove_file(manifests.join("30-tcp-echo.yaml"))?;
    wait_tcp_unreachable(tcp_addr, CONVERGE).await?;
    let (_, curl_envoy) = envoys
        .iter()
        .find(|(p, _)| p.name == "curl")
        .context("curl sidecar")?;
    curl_envoy
        .wait_for_clusters(&["demo/httpbin|14001"], &["demo/tcp-echo|9000"], CONVERGE)
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_mesh_over_sotw_ads() {
    if let Err(err) = run_mesh(AdsMode::Sotw, 11).await {
        panic!("{err:#}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_mesh_over_delta_ads() {
    if let Err(err) = run_mesh(AdsMode::Delta, 12).await {
        panic!("{err:#}");
    }
}
