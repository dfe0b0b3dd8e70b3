//! Delta ADS subscriptions under churn, with the real controller (manifest mode) and a real Envoy
//! 1.40 client sidecar over incremental ADS.
//!
//! Envoy sends a new EDS subscription on the next request it can send for the type. When its
//! requests queue (here its own ADS `rate_limit_settings`; in production equally flow control or a
//! busy proxy) that request is an ACK, and under churn its nonce is often one the controller has
//! since superseded. The xDS protocol requires the server to honour subscription changes on such a
//! stale-nonce request; a server that drops the whole request never answers the new name, and the
//! new cluster stays warming until Envoy's initial-fetch timeout (15 s), then serves with no
//! endpoints. (Unthrottled, Envoy 1.40's delta mux sends a subscription made while it applies CDS
//! right away on a request of its own without a nonce, which even a nonce-strict server honours:
//! the race needs a queued request.)
//!
//! Here one service's endpoints change every 100 ms while new services are added one by one. For
//! each, the client sidecar is held still (SIGSTOP) across the publish so that, when it resumes, it
//! reads a churn EDS response, the new cluster, and more churn EDS responses in one go: the
//! subscription then rides on an ACK that is already stale when it arrives. Each new cluster must
//! have its endpoint within 2 s of the controller publishing it.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use fsm_catalog::CatalogSettings;
use fsm_integration_tests::{
    AdsMode, Controller, ControllerOptions, Envoy, SidecarConfig, demo_manifests, edit_manifest,
    load_catalog, mesh_pods, start_controller, start_envoy_with,
};

const SUBNET: u8 = 40;
const CONVERGE: Duration = Duration::from_secs(30);
const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
/// What the issue asks for: far below Envoy's 15 s initial-fetch timeout.
const ENDPOINTS_WITHIN: Duration = Duration::from_secs(2);
/// How often the churned service's endpoints change.
const CHURN_PERIOD: Duration = Duration::from_millis(100);
/// How long the client sidecar is held still before and after the publish: a few churn periods, so
/// churn EDS responses queue up on both sides of the new cluster.
const STALL: Duration = Duration::from_millis(200);
const NEW_SERVICES: u8 = 5;
const NEW_SERVICE_PORT: u16 = 8080;
/// The churned service's EDS resource, as the client's sidecar names it.
const HTTPBIN_CLUSTER: &str = "demo/httpbin|14001";

/// A Service with one backend pod and its Endpoints, in its own manifest file.
fn new_service_manifest(n: u8) -> String {
    let ip = pod_ip(n);
    format!(
        "apiVersion: v1
kind: ServiceAccount
metadata: {{name: svc{n}, namespace: demo}}
---
apiVersion: v1
kind: Service
metadata: {{name: svc{n}, namespace: demo}}
spec:
  clusterIP: 10.96.1.{n}
  selector: {{app: svc{n}}}
  ports:
  - {{name: http, port: {NEW_SERVICE_PORT}, targetPort: {NEW_SERVICE_PORT}, appProtocol: http}}
---
apiVersion: v1
kind: Endpoints
metadata: {{name: svc{n}, namespace: demo}}
subsets:
- addresses:
  - ip: {ip}
    targetRef: {{kind: Pod, name: svc{n}-0, namespace: demo}}
  ports:
  - {{name: http, port: {NEW_SERVICE_PORT}}}
---
apiVersion: v1
kind: Pod
metadata:
  name: svc{n}-0
  namespace: demo
  labels: {{app: svc{n}, fsm-proxy-uuid: 5d0e1f2a-0000-4000-8000-0000000000{n:02}}}
spec:
  serviceAccountName: svc{n}
  containers:
  - name: app
    image: kennethreitz/httpbin
    ports:
    - {{name: http, containerPort: {NEW_SERVICE_PORT}}}
status:
  podIP: {ip}
"
    )
}

fn pod_ip(n: u8) -> String {
    format!("127.0.{SUBNET}.{}", 100 + n)
}

/// Writes a manifest whole (temporary file, then rename), as editors and `kubectl` do.
fn write_manifest(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// Removes and re-adds httpbin-v2's endpoint every [`CHURN_PERIOD`] until `stop`; returns how
/// many edits it made.
fn churn(manifests: &Path, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Result<u64>> {
    let file = manifests.join("20-httpbin.yaml");
    let endpoint = |pod: &str, host: u8| {
        format!(
            "  - ip: 127.0.{SUBNET}.{host}\n    targetRef: {{kind: Pod, name: {pod}, namespace: demo}}\n"
        )
    };
    let (v1, v2) = (endpoint("httpbin-v1", 1), endpoint("httpbin-v2", 2));
    let both = format!("{v1}{v2}");
    tokio::spawn(async move {
        let mut edits = 0u64;
        while !stop.load(Ordering::Relaxed) {
            if edits.is_multiple_of(2) {
                edit_manifest(&file, &both, &v1)?;
            } else {
                edit_manifest(&file, &v1, &both)?;
            }
            edits += 1;
            tokio::time::sleep(CHURN_PERIOD).await;
        }
        Ok(edits)
    })
}

/// The addresses of a cluster's hosts in Envoy's `/clusters`, which lists only active (warmed)
/// clusters; `None` when the cluster is not there.
async fn cluster_hosts(envoy: &Envoy, cluster: &str) -> Result<Option<Vec<String>>> {
    let body = envoy.admin_get("/clusters?format=json").await?;
    let json: serde_json::Value =
        serde_json::from_str(&body).context("decoding Envoy's /clusters?format=json")?;
    Ok(json["cluster_statuses"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == cluster)
        .map(|c| {
            c["host_statuses"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|h| h["address"]["socket_address"]["address"].as_str())
                .map(str::to_owned)
                .collect()
        }))
}

/// Sends `signal` (`STOP` or `CONT`) to the sidecar.
fn signal(envoy: &Envoy, signal: &str) -> Result<()> {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(envoy.process.pid().to_string())
        .status()
        .context("running kill")?;
    ensure!(
        status.success(),
        "kill -{signal} {}: {status}",
        envoy.process.pid()
    );
    Ok(())
}

/// The CDS version the controller has published for the proxy.
async fn cds_published(controller: &Controller, uuid: &str) -> Result<Option<String>> {
    Ok(controller
        .debug_proxies()
        .await?
        .get(uuid)
        .and_then(|p| p.types.get(CDS))
        .and_then(|t| t.snapshot_version.clone()))
}

/// Adds service `n` and returns how long after the controller published the new cluster for the
/// client proxy its sidecar had the service's endpoint.
async fn add_service(
    manifests: &Path,
    controller: &Controller,
    client: &Envoy,
    client_uuid: &str,
    n: u8,
) -> Result<Duration> {
    let cluster = format!("demo/svc{n}|{NEW_SERVICE_PORT}");
    let before = cds_published(controller, client_uuid).await?;
    signal(client, "STOP")?;
    let stalled = async {
        tokio::time::sleep(STALL).await;
        let written = Instant::now();
        write_manifest(
            &manifests.join(format!("50-svc{n}.yaml")),
            &new_service_manifest(n),
        )?;
        let published = tokio::time::timeout(CONVERGE, async {
            loop {
                let now = cds_published(controller, client_uuid).await?;
                if now.is_some() && now != before {
                    return anyhow::Ok(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .with_context(|| format!("the controller published no new CDS for {cluster}"))??;
        tokio::time::sleep(STALL).await;
        anyhow::Ok((written, published))
    }
    .await;
    // Resume whatever happened, so a failure does not leave the sidecar stopped.
    signal(client, "CONT")?;
    let (written, published) = stalled?;
    let poll = Duration::from_millis(10);
    // Past the bound the endpoint can only come from a later event (or never): stop looking a
    // little after it, so a failure says how long Envoy really waited without taking 15 s.
    let deadline = published + ENDPOINTS_WITHIN + Duration::from_secs(3);
    let want = pod_ip(n);
    let mut last = None;
    let arrived = loop {
        let hosts = cluster_hosts(client, &cluster).await?;
        if hosts.as_ref().is_some_and(|h| h.contains(&want)) {
            break Some(Instant::now());
        }
        last = hosts;
        if Instant::now() > deadline {
            break None;
        }
        tokio::time::sleep(poll).await;
    };
    let Some(arrived) = arrived else {
        anyhow::bail!(
            "{cluster}: no endpoint {want} in the client sidecar {:?} after the controller published it (cluster in /clusters: {last:?}); controller log:\n{}",
            deadline - published,
            controller.process.log_tail(20)
        );
    };
    let took = arrived.duration_since(published);
    eprintln!(
        "[delta] svc{n}: manifest written -> published {:?}, published -> endpoint in Envoy {took:?}",
        published.duration_since(written)
    );
    ensure!(
        took <= ENDPOINTS_WITHIN,
        "{cluster}: endpoint arrived {took:?} after publishing, over {ENDPOINTS_WITHIN:?}"
    );
    Ok(took)
}

async fn new_services_under_churn() -> Result<()> {
    let work = tempfile::tempdir()?;
    let logs = work.path().join("logs");
    let manifests = demo_manifests(&work.path().join("manifests"), SUBNET)?;
    // The test reads the controller's /debug endpoints.
    fsm_integration_tests::mesh::enable_debug_server(&manifests)?;
    let catalog = load_catalog(&manifests, CatalogSettings::default())?;
    let controller = start_controller(&manifests, &logs, &ControllerOptions::default()).await?;
    // Only the client's sidecar: the assertion is about what it is sent, and a lighter mesh
    // keeps the timing honest on a small machine. No apps are needed for EDS either.
    let curl = mesh_pods(&catalog)
        .into_iter()
        .find(|p| p.name == "curl")
        .context("curl pod")?;
    let curl_uuid = curl.proxy_uuid.clone().context("curl's proxy UUID")?;
    // One ADS request at a time, 30 a second: enough for the churn's ACKs, but a request that
    // finds the bucket empty waits and leaves with the next ACK, as in a throttled proxy.
    let mut envoy = start_envoy_with(
        &SidecarConfig::for_pod(&curl, &controller.ads(), AdsMode::Delta)?,
        &logs,
        |bootstrap| {
            bootstrap["dynamic_resources"]["ads_config"]["rate_limit_settings"] =
                serde_json::json!({"max_tokens": 1, "fill_rate": 30.0});
        },
    )
    .await?;
    envoy.wait_ready(CONVERGE).await.context("curl's sidecar")?;
    envoy
        .wait_for_clusters(&[HTTPBIN_CLUSTER], &[], CONVERGE)
        .await?;

    let stop = Arc::new(AtomicBool::new(false));
    let churner = churn(&manifests, stop.clone());
    let eds_updates = format!("cluster.{HTTPBIN_CLUSTER}.update_success");
    let updates_before = envoy.counter(&eds_updates).await?;
    // Let the churn reach a steady state before the first new service.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut took = Vec::new();
    let mut outcome = Ok(());
    for n in 1..=NEW_SERVICES {
        match add_service(&manifests, &controller, &envoy, &curl_uuid, n).await {
            Ok(t) => took.push(t),
            Err(err) => {
                outcome = Err(err);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let edits = churner.await.context("churn task")??;
    outcome?;
    let updates = envoy.counter(&eds_updates).await? - updates_before;
    // The scenario only means something if the client really was being sent endpoint changes
    // all along.
    ensure!(
        updates >= 10,
        "only {updates} EDS updates of {HTTPBIN_CLUSTER} reached the client over {edits} manifest edits"
    );
    took.sort();
    eprintln!(
        "[delta] {} new services under churn ({edits} endpoint edits, {updates} EDS updates of {HTTPBIN_CLUSTER} applied): published -> endpoints in the client sidecar median {:?}, max {:?}",
        took.len(),
        took[took.len() / 2],
        took[took.len() - 1]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_new_service_gets_endpoints_under_endpoint_churn() {
    if let Err(err) = new_services_under_churn().await {
        panic!("{err:#}");
    }
}
