//! The sidecar injector in a cluster: the test API server calls `fsm-injector` (a real process,
//! HTTPS with a certificate from the mesh CA whose root it publishes into the webhook
//! configuration's caBundle) for every pod created in a namespace of the mesh, as kube-apiserver
//! does; the injected pod is what the controller then serves: it writes the pod's bootstrap
//! Secret, and an fsm-sidecar run with the injected identity gets its configuration.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use fsm_integration_tests::cluster::{self, TestCluster};
use fsm_integration_tests::controller::ADS_SERVER_NAME;
use fsm_integration_tests::{
    AdsMode, ControllerOptions, FsmSidecarConfig, ManagedProcess, binary, eventually, free_port,
    start_controller_on_cluster, start_fsm_sidecar,
};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::{Value, json};

const CONVERGE: Duration = Duration::from_secs(30);
const WEBHOOK_CONFIG: &str = "fsm-webhook-fsm";

/// The webhook configuration as the chart installs it (no caBundle: the injector writes it).
fn webhook_configuration() -> Value {
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": WEBHOOK_CONFIG, "labels": {"app": "fsm-injector"}},
        "webhooks": [{
            "name": "fsm-inject.flomesh.io",
            "clientConfig": {"service": {"name": "fsm-injector", "namespace": "fsm-system", "path": "/mutate-pod-creation", "port": 9090}},
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
            "namespaceSelector": {"matchLabels": {"flomesh.io/monitored-by": "fsm"}},
            "failurePolicy": "Fail",
            "sideEffects": "NoneOnDryRun",
            "admissionReviewVersions": ["v1"],
            "timeoutSeconds": 10,
        }],
    })
}

/// The injector's Service and, since nothing here runs an endpoints controller, its Endpoints:
/// the injector process on 127.0.0.1.
fn injector_service(port: u16) -> [Value; 2] {
    [
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "fsm-injector", "namespace": "fsm-system"},
            "spec": {"selector": {"app": "fsm-injector"},
                     "ports": [{"name": "sidecar-inject", "port": 9090, "targetPort": port}]},
        }),
        json!({
            "apiVersion": "v1", "kind": "Endpoints",
            "metadata": {"name": "fsm-injector", "namespace": "fsm-system"},
            "subsets": [{"addresses": [{"ip": "127.0.0.1"}],
                         "ports": [{"name": "sidecar-inject", "port": port}]}],
        }),
    ]
}

/// A pod as a ReplicaSet of Deployment `name` creates it.
fn deployment_pod(namespace: &str, name: &str, annotations: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "generateName": format!("{name}-7c9f5f9cdf-"),
            "namespace": namespace,
            "labels": {"app": name, "fsm-proxy-uuid": "chosen-by-the-user"},
            "annotations": annotations,
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("{name}-7c9f5f9cdf"),
                                 "uid": "3e8e1f7a-0000-4000-8000-00000000abcd", "controller": true}],
        },
        "spec": {
            "serviceAccountName": "curl",
            "containers": [{
                "name": "app", "image": "curlimages/curl",
                "ports": [{"name": "http", "containerPort": 8080}],
                "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}},
            }],
        },
    })
}

async fn start_injector(
    c: &TestCluster,
    port: u16,
    ads: SocketAddr,
    default_class: &str,
) -> Result<ManagedProcess> {
    let mut command = Command::new(binary("fsm-injector")?);
    command
        .current_dir(c.work.path())
        .arg("--kubeconfig")
        .arg(&c.kubeconfig)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--ads-address")
        .arg(ads.to_string())
        .arg("--ads-server-name")
        .arg(ADS_SERVER_NAME)
        .arg("--sidecar-class")
        .arg(default_class)
        .arg("--log-level")
        .arg("info,fsm_injector=debug");
    let mut process = ManagedProcess::spawn("fsm-injector", command, &c.logs)?;
    process
        .wait_for_tcp(
            SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            Duration::from_secs(20),
        )
        .await?;
    Ok(process)
}

fn arg_value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter()
        .find_map(|a| a.strip_prefix(flag).and_then(|v| v.strip_prefix('=')))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_created_through_the_api_server_are_injected_and_served() {
    if let Err(err) = injected_and_served(31).await {
        panic!("{err:#}");
    }
}

async fn injected_and_served(subnet: u8) -> Result<()> {
    let c = TestCluster::start_demo(subnet).await?;
    cluster::apply_all(&c.client, &c.objects).await?;
    let controller =
        start_controller_on_cluster(&c.kubeconfig, &c.logs, &ControllerOptions::default()).await?;
    cluster::apply(&c.client, &webhook_configuration()).await?;
    let port = free_port()?;
    for object in injector_service(port) {
        cluster::apply(&c.client, &object).await?;
    }
    let _injector = start_injector(&c, port, controller.ads().addr, "fsm-sidecar").await?;

    // The injector publishes the mesh's roots as the webhook's caBundle.
    let configs: Api<MutatingWebhookConfiguration> = Api::all(c.client.clone());
    eventually(CONVERGE, || async {
        let config = configs.get(WEBHOOK_CONFIG).await?;
        let bundle = config
            .webhooks
            .unwrap_or_default()
            .first()
            .and_then(|w| w.client_config.ca_bundle.clone())
            .context("no caBundle yet")?;
        ensure!(
            String::from_utf8_lossy(&bundle.0).contains("BEGIN CERTIFICATE"),
            "caBundle is not PEM"
        );
        Ok(())
    })
    .await
    .context("the injector's roots in the webhook configuration")?;

    // demo is monitored; turn injection on for it, as `fsm namespace add` does.
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(c.client.clone());
    namespaces
        .patch(
            "demo",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"annotations": {"flomesh.io/sidecar-injection": "enabled"}}}),
            ),
        )
        .await?;

    let pods: Api<Pod> = Api::namespaced(c.client.clone(), "demo");
    let create = |pod: Value| {
        let pods = pods.clone();
        async move {
            let pod: Pod = serde_json::from_value(pod)?;
            anyhow::Ok(pods.create(&PostParams::default(), &pod).await?)
        }
    };
    let pod = create(deployment_pod("demo", "injected", json!({}))).await?;
    let name = pod.metadata.name.clone().context("generated name")?;
    let uuid = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("fsm-proxy-uuid"))
        .cloned()
        .context("no fsm-proxy-uuid label")?;
    ensure!(
        uuid != "chosen-by-the-user" && uuid::Uuid::parse_str(&uuid).is_ok(),
        "the user's UUID label was kept: {uuid}"
    );
    let spec = pod.spec.clone().context("spec")?;
    let init: Vec<_> = spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    ensure!(init == ["fsm-init"], "init containers {init:?}");
    let containers: Vec<_> = spec.containers.iter().map(|c| c.name.as_str()).collect();
    ensure!(
        containers == ["app", "sidecar"],
        "containers {containers:?}"
    );
    let probe = spec.containers[0]
        .readiness_probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref())
        .context("readiness probe")?;
    ensure!(
        probe.path.as_deref() == Some("/fsm-readiness-probe"),
        "readiness probe not rewritten: {probe:?}"
    );
    let sidecar_args = spec.containers[1].args.clone().unwrap_or_default();
    let node_id = arg_value(&sidecar_args, "--node-id")
        .context("no --node-id")?
        .to_string();
    ensure!(
        node_id == format!("{uuid}.sidecar.curl.demo"),
        "node id {node_id}"
    );
    ensure!(
        arg_value(&sidecar_args, "--probes").is_some_and(|p| p.contains("\"targetPort\":8080")),
        "probes not passed to the sidecar: {sidecar_args:?}"
    );
    ensure!(
        spec.volumes.iter().flatten().any(|v| v
            .secret
            .as_ref()
            .and_then(|s| s.secret_name.as_deref())
            == Some(&format!("fsm-sidecar-bootstrap-{uuid}"))),
        "no bootstrap Secret volume"
    );

    // Another pod chooses Envoy; a pod asking for an unknown sidecar is refused, by name.
    let envoy = create(deployment_pod(
        "demo",
        "envoy-app",
        json!({"flomesh.io/sidecar-class": "envoy"}),
    ))
    .await?;
    let envoy_sidecar = &envoy.spec.context("spec")?.containers[1];
    ensure!(
        envoy_sidecar
            .env
            .iter()
            .flatten()
            .any(|e| e.name == "FSM_ENVOY_BOOTSTRAP"),
        "the Envoy sidecar has no bootstrap"
    );
    match create(deployment_pod(
        "demo",
        "bad",
        json!({"flomesh.io/sidecar-class": "pipy"}),
    ))
    .await
    {
        Ok(_) => bail!("a pod with an unknown sidecar class was admitted"),
        Err(e) => {
            let text = format!("{e:#}");
            ensure!(
                text.contains("denied the request")
                    && text.contains("flomesh.io/sidecar-class")
                    && text.contains("E6108"),
                "{text}"
            );
        }
    }
    // A pod that opts out is admitted unchanged.
    let plain = create(deployment_pod(
        "demo",
        "plain",
        json!({"flomesh.io/sidecar-injection": "disabled"}),
    ))
    .await?;
    ensure!(
        plain.spec.context("spec")?.containers.len() == 1,
        "a pod annotated disabled got a sidecar"
    );

    // The kubelet starts it: an address.
    let ip = IpAddr::V4(Ipv4Addr::new(127, 0, subnet, 77));
    pods.patch_status(
        &name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Running", "podIP": ip.to_string()}})),
    )
    .await?;

    // The controller serves it: its bootstrap Secret, then configuration to its sidecar.
    let secrets: Api<Secret> = Api::namespaced(c.client.clone(), "demo");
    let secret = format!("fsm-sidecar-bootstrap-{uuid}");
    eventually(CONVERGE, || async {
        secrets.get_opt(&secret).await?.context("no Secret yet")
    })
    .await
    .with_context(|| format!("the controller's Secret {secret}"))?;
    let ads = controller.ads();
    let config = FsmSidecarConfig {
        name: name.clone(),
        node_id,
        node_cluster: "curl.demo".into(),
        pod_ip: ip,
        pod_name: name.clone(),
        pod_namespace: "demo".into(),
        workload_kind: "Deployment".into(),
        workload_name: "injected".into(),
        admin: SocketAddr::new(ip, 15000),
        metrics: SocketAddr::new(ip, 15010),
        ads: ads.addr,
        ads_mode: AdsMode::Sotw,
        bootstrap_dir: ads.pod_dir("demo", &name),
        binary: None,
        workers: None,
        log_level: "info".into(),
    };
    let mut sidecar = start_fsm_sidecar(&config, &c.logs).await?;
    sidecar
        .wait_ready(CONVERGE)
        .await
        .context("the injected pod's sidecar never got its configuration")?;

    // The injector's cost per pod creation, through the API server: pods in a namespace of the
    // mesh (the webhook is called) against pods in one outside it (not called).
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "outside"}}))?,
        )
        .await?;
    let outside: Api<Pod> = Api::namespaced(c.client.clone(), "outside");
    let mut with = Vec::new();
    let mut without = Vec::new();
    for _ in 0..100 {
        let pod: Pod = serde_json::from_value(deployment_pod("demo", "load", json!({})))?;
        let started = Instant::now();
        let created = pods.create(&PostParams::default(), &pod).await?;
        with.push(started.elapsed());
        ensure!(created.spec.map(|s| s.containers.len()) == Some(2));
        let mut pod: Pod = serde_json::from_value(deployment_pod("outside", "load", json!({})))?;
        if let Some(spec) = pod.spec.as_mut() {
            spec.service_account_name = None;
        }
        let started = Instant::now();
        let created = outside.create(&PostParams::default(), &pod).await?;
        without.push(started.elapsed());
        ensure!(created.spec.map(|s| s.containers.len()) == Some(1));
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (with, without) = (median(&mut with), median(&mut without));
    eprintln!(
        "[injector] pod creation through the test API server, median of 100: {:.2} ms with the webhook, {:.2} ms without: {:.2} ms added",
        with.as_secs_f64() * 1e3,
        without.as_secs_f64() * 1e3,
        (with.as_secs_f64() - without.as_secs_f64()) * 1e3
    );
    ensure!(
        c.server.admission_calls("fsm-inject.flomesh.io") >= 104,
        "the webhook was not called for every pod of the mesh"
    );
    Ok(())
}
