//! A proxy's identity cannot be taken over in a cluster: fsm-controller watching the test API
//! server, real Envoy sidecars, and an impostor Pod created through the API like any workload.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use fsm_catalog::CatalogSettings;
use fsm_integration_tests::cluster::{self, TestCluster};
use fsm_integration_tests::{
    AdsMode, ControllerOptions, MeshPod, SidecarConfig, eventually, http_get_ok_via, load_catalog,
    mesh_pods, start_controller_on_cluster, start_demo_apps, start_envoy,
};
use k8s_openapi::api::core::v1::Secret;
use serde_json::json;

const CONVERGE: Duration = Duration::from_secs(30);
const HTTPBIN: &str = "httpbin.demo:14001";
const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";

async fn get_httpbin(via: SocketAddr) -> Result<()> {
    http_get_ok_via(via, HTTPBIN, "/get").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_copying_a_proxy_uuid_through_the_api_takes_nothing_over() {
    if let Err(err) = takeover(27).await {
        panic!("{err:#}");
    }
}

async fn takeover(subnet: u8) -> Result<()> {
    let c = TestCluster::start_demo(subnet).await?;
    cluster::apply_all(&c.client, &c.objects).await?;
    let controller =
        start_controller_on_cluster(&c.kubeconfig, &c.logs, &ControllerOptions::default()).await?;
    let catalog = load_catalog(&c.manifests, CatalogSettings::default())?;
    let _apps = start_demo_apps(&catalog, &c.logs).await?;
    let pods: Vec<MeshPod> = mesh_pods(&catalog)
        .into_iter()
        .filter(|p| p.node_id().is_some() && !p.name.starts_with("tcp-echo"))
        .collect();
    let mut envoys = Vec::new();
    for pod in &pods {
        let mut envoy = start_envoy(
            &SidecarConfig::for_pod(pod, &controller.ads(), AdsMode::Sotw)?,
            &c.logs,
        )
        .await?;
        envoy
            .wait_ready(CONVERGE)
            .await
            .with_context(|| format!("sidecar of {}", pod.id()))?;
        envoys.push(envoy);
    }
    let curl = pods
        .iter()
        .find(|p| p.name == "curl")
        .context("curl pod")?
        .clone();
    let uuid = curl.proxy_uuid.clone().context("curl's UUID")?;
    eventually(CONVERGE, || get_httpbin(curl.outbound_addr())).await?;

    let secrets: kube::Api<Secret> = kube::Api::namespaced(c.client.clone(), "demo");
    let secret_name = format!("fsm-sidecar-bootstrap-{uuid}");
    let curl_secret = eventually(CONVERGE, || async {
        secrets
            .get_opt(&secret_name)
            .await?
            .and_then(|s| s.data)
            .context("curl's bootstrap Secret")
    })
    .await?;
    let curl_files =
        std::fs::read_to_string(controller.ads().pod_dir("demo", "curl").join("tls.crt"))?;

    // The impostor: its own service account and address, curl's UUID label.
    let evil = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "evil", "namespace": "demo",
                     "labels": {"app": "evil", "fsm-proxy-uuid": uuid}},
        "spec": {"serviceAccountName": "evil", "containers": [{"name": "evil", "image": "evil"}]},
        "status": {"podIP": format!("127.0.{subnet}.99")}
    });
    cluster::apply(
        &c.client,
        &json!({"apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": "evil", "namespace": "demo"}}),
    )
    .await?;
    cluster::apply(&c.client, &evil).await?;
    eventually(CONVERGE, || async {
        let problems = controller.debug_problems().await?;
        ensure!(
            problems
                .iter()
                .any(|p| p.starts_with("E5004") && p.contains("demo/evil") && p.contains(&uuid)),
            "no E5004 for demo/evil: {problems:?}"
        );
        Ok(())
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let now = secrets.get(&secret_name).await?.data;
    ensure!(
        now.as_ref() == Some(&curl_secret),
        "curl's bootstrap Secret was rewritten for the impostor"
    );
    ensure!(
        !controller.ads().pod_dir("demo", "evil").exists(),
        "the impostor got bootstrap credentials"
    );
    ensure!(
        std::fs::read_to_string(controller.ads().pod_dir("demo", "curl").join("tls.crt"))?
            == curl_files
    );
    get_httpbin(curl.outbound_addr()).await?;

    // Deleting the impostor changes nothing for curl.
    cluster::delete(&c.client, &evil).await?;
    eventually(CONVERGE, || async {
        let problems = controller.debug_problems().await?;
        ensure!(
            !problems.iter().any(|p| p.contains("demo/evil")),
            "{problems:?}"
        );
        Ok(())
    })
    .await?;
    get_httpbin(curl.outbound_addr()).await?;
    ensure!(
        secrets.get(&secret_name).await?.data.as_ref() == Some(&curl_secret),
        "curl's bootstrap Secret changed after the impostor left"
    );
    ensure!(
        controller.in_sync_version(&uuid, LDS).await?.is_some(),
        "curl's listeners are not in sync"
    );
    Ok(())
}
