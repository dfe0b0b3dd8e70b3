//! The mesh's life through its CLI, against the test API server: `fsm install` (the chart the CLI
//! embeds, rendered as Helm renders it — `fsm_install_renders_like_helm` checks that against the
//! real Helm engine) creates the control plane; this test plays kube-controller-manager and the
//! kubelet: it runs fsm-controller and fsm-injector as processes with the arguments of the
//! installed Deployments (listen addresses moved to loopback, a kubeconfig instead of the
//! in-cluster account), creates their pods and writes the Deployments' status, which `fsm
//! install` waits for. Then `fsm namespace add demo`; the API server calls the injector (HTTPS,
//! its certificate from the mesh CA, whose root the injector publishes into the installed webhook
//! configuration) for every pod created in the namespace, as kube-apiserver does; the injected
//! pods are what the controller then serves (fsm-sidecar and real Envoy, run with the injected
//! identity and bootstrap); `fsm proxy status` shows them synced, `fsm proxy get config_dump`
//! returns their dumps; `fsm uninstall mesh` removes the control plane and keeps the CRDs.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use fsm_integration_tests::cluster::{self, TestCluster};
use fsm_integration_tests::controller::ADS_SERVER_NAME;
use fsm_integration_tests::{
    AdsMode, ControllerOptions, FsmSidecarConfig, ManagedProcess, binary, envoy_binary, eventually,
    free_port, repo_root, start_controller_on_cluster, start_fsm_sidecar, start_localhost_server,
};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::Api;
use kube::api::{DynamicObject, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

const CONVERGE: Duration = Duration::from_secs(30);
const WEBHOOK_CONFIG: &str = "fsm-webhook-fsm";
const FSM_NAMESPACE: &str = "fsm-system";

/// The arguments of an installed Deployment's container.
fn container_args(deployment: &Deployment) -> Result<Vec<String>> {
    deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|s| s.containers.first())
        .and_then(|c| c.args.clone())
        .with_context(|| {
            format!(
                "Deployment {:?} has no container arguments",
                deployment.metadata.name
            )
        })
}

/// What kube-controller-manager and the kubelet would do for an installed Deployment whose
/// process this test runs: one Ready pod from its template, and the Deployment's status saying
/// its replicas are updated and available. Returns the pod's name.
async fn run_deployment(c: &TestCluster, deployment: &Deployment) -> Result<String> {
    let name = deployment.metadata.name.clone().context("name")?;
    let spec = deployment.spec.clone().context("spec")?;
    let replicas = spec.replicas.unwrap_or(1);
    let pod_name = format!("{name}-6d5984fb9f-2nj7s");
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), FSM_NAMESPACE);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {
            "name": pod_name,
            "labels": spec.template.metadata.as_ref().and_then(|m| m.labels.clone()),
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                 "name": format!("{name}-6d5984fb9f"),
                                 "uid": "3e8e1f7a-0000-4000-8000-00000000beef", "controller": true}],
        },
        "spec": spec.template.spec,
    }))?;
    pods.create(&PostParams::default(), &pod).await?;
    pods.patch_status(
        &pod_name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Running", "podIP": "127.0.0.1",
            "conditions": [{"type": "Ready", "status": "True"}]}})),
    )
    .await?;
    let deployments: Api<Deployment> = Api::namespaced(c.client.clone(), FSM_NAMESPACE);
    deployments
        .patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {
                "observedGeneration": deployment.metadata.generation,
                "replicas": replicas, "updatedReplicas": replicas,
                "readyReplicas": replicas, "availableReplicas": replicas,
                "conditions": [{"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"}],
            }})),
        )
        .await?;
    Ok(pod_name)
}

/// `args` without the flags in `drop` (given as `--flag=value`).
fn without(args: &[String], drop: &[&str]) -> Vec<String> {
    args.iter()
        .filter(|a| !drop.iter().any(|d| a.starts_with(&format!("{d}="))))
        .cloned()
        .collect()
}

/// The injector's Endpoints (nothing here runs an endpoints controller): the injector process on
/// 127.0.0.1, under the chart Service's port name.
fn injector_endpoints(port: u16) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Endpoints",
        "metadata": {"name": "fsm-injector", "namespace": "fsm-system"},
        "subsets": [{"addresses": [{"ip": "127.0.0.1"}],
                     "ports": [{"name": "sidecar-inject", "port": port}]}],
    })
}

/// The controller's Endpoints (the chart Service's `webhook` and `http` ports).
fn controller_endpoints(webhook: u16, http: u16) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Endpoints",
        "metadata": {"name": "fsm-controller", "namespace": "fsm-system"},
        "subsets": [{"addresses": [{"ip": "127.0.0.1"}],
                     "ports": [{"name": "webhook", "port": webhook}, {"name": "http", "port": http}]}],
    })
}

/// `fsm proxy status` once it shows the proxy of `pod` (in demo) SYNCED for every type; with the
/// proxy's details (its last NACK) when it does not.
async fn proxy_synced(c: &TestCluster, pod: &str) -> Result<String> {
    eventually(CONVERGE, || async {
        let status = fsm_cli(c, &["proxy", "status"])?;
        let line = status
            .lines()
            .find(|l| l.starts_with(&format!("demo/{pod} ")))
            .with_context(|| format!("no line for demo/{pod}:\n{status}"))?;
        if line.matches("SYNCED").count() != 5 {
            let detail = fsm_cli(c, &["proxy", "status", pod, "-n", "demo"])?;
            bail!("demo/{pod} not synced:\n{status}\n{detail}");
        }
        Ok(status)
    })
    .await
}

/// `fsm proxy status <pod>` once it says the proxy holds exactly what the controller computed
/// (its table compares each type's resources, the proxy's from its own `/config_dump`).
async fn holds_what_was_computed(c: &TestCluster, pod: &str) -> Result<String> {
    eventually(CONVERGE, || async {
        let detail = fsm_cli(c, &["proxy", "status", pod, "-n", "demo"])?;
        ensure!(
            detail.contains("The proxy holds exactly what the controller computed."),
            "{detail}"
        );
        Ok(detail)
    })
    .await
}

/// Runs the `fsm` CLI with the test cluster's kubeconfig; its stdout, or its stderr as the error.
fn fsm_cli(c: &TestCluster, args: &[&str]) -> Result<String> {
    let out = Command::new(binary("fsm")?)
        .arg("--kubeconfig")
        .arg(&c.kubeconfig)
        .args(args)
        .output()
        .context("running fsm")?;
    ensure!(
        out.status.success(),
        "fsm {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
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
    chart_args: &[String],
    port: u16,
    ads: SocketAddr,
) -> Result<ManagedProcess> {
    let mut command = Command::new(binary("fsm-injector")?);
    command
        .current_dir(c.work.path())
        .args(without(chart_args, &["--listen", "--ads-address"]))
        .arg("--kubeconfig")
        .arg(&c.kubeconfig)
        .arg(format!("--listen=127.0.0.1:{port}"))
        .arg(format!("--ads-address={ads}"))
        .arg(format!("--ads-server-name={ADS_SERVER_NAME}"));
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
async fn fsm_install_then_namespace_add_injects_pods_the_controller_serves_then_uninstall() {
    if let Err(err) = injected_and_served(31).await {
        panic!("{err:#}");
    }
}

async fn injected_and_served(subnet: u8) -> Result<()> {
    let c = TestCluster::start_demo(subnet).await?;
    // The demo's workloads, without its MeshConfig: the installed one is the mesh's.
    let demo: Vec<Value> = c
        .objects
        .iter()
        .filter(|o| o["kind"] != "MeshConfig")
        .cloned()
        .collect();
    cluster::apply_all(&c.client, &demo).await?;

    // `fsm install`, waiting for the control plane this test is about to run; with the
    // controller's debug server on, which `fsm proxy status` reads (FSM's default is off).
    let mut install = tokio::process::Command::new(binary("fsm")?)
        .arg("--kubeconfig")
        .arg(&c.kubeconfig)
        .args([
            "install",
            "--set",
            "fsm.enableDebugServer=true",
            "--timeout",
            "120s",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("running fsm install")?;
    let deployments: Api<Deployment> = Api::namespaced(c.client.clone(), FSM_NAMESPACE);
    let installed = eventually(CONVERGE, || async {
        let controller = deployments.get_opt("fsm-controller").await?;
        let injector = deployments.get_opt("fsm-injector").await?;
        let webhook = Api::<MutatingWebhookConfiguration>::all(c.client.clone())
            .get_opt(WEBHOOK_CONFIG)
            .await?;
        match (controller, injector, webhook) {
            (Some(controller), Some(injector), Some(_)) => Ok((controller, injector)),
            _ => bail!("fsm install has not created the control plane yet"),
        }
    })
    .await;
    let (controller_deployment, injector_deployment) = match installed {
        Ok(deployments) => deployments,
        Err(e) => {
            let _ = install.start_kill();
            let out = install.wait_with_output().await?;
            bail!(
                "{e:#}\nfsm install: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    };
    // The controller's validating webhook, on loopback like the rest.
    let validator_port = free_port()?;
    let http_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
    cluster::apply(
        &c.client,
        &controller_endpoints(validator_port, http_addr.port()),
    )
    .await?;
    let mut controller_args = without(
        &container_args(&controller_deployment)?,
        &[
            "--ads-listen",
            "--http-listen",
            "--validating-webhook-listen",
        ],
    );
    controller_args.push(format!(
        "--validating-webhook-listen=127.0.0.1:{validator_port}"
    ));
    let controller = start_controller_on_cluster(
        &c.kubeconfig,
        &c.logs,
        &ControllerOptions {
            extra_args: controller_args,
            http_addr: Some(http_addr),
            ..Default::default()
        },
    )
    .await?;
    let port = free_port()?;
    cluster::apply(&c.client, &injector_endpoints(port)).await?;
    let _injector = start_injector(
        &c,
        &container_args(&injector_deployment)?,
        port,
        controller.ads().addr,
    )
    .await?;
    let mut control_plane_pods = Vec::new();
    for deployment in [&injector_deployment, &controller_deployment] {
        control_plane_pods.push(run_deployment(&c, deployment).await?);
    }
    let out = tokio::time::timeout(Duration::from_secs(120), install.wait_with_output())
        .await
        .context("fsm install did not return")??;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    ensure!(out.status.success(), "fsm install failed: {stdout}{stderr}");
    eprintln!("[fsm install]\n{stdout}");
    ensure!(
        stdout
            == format!(
                "fsm-injector[{}] Done\nfsm-controller[{}] Done\nFSM installed successfully in namespace [fsm-system] with mesh name [fsm]\n",
                control_plane_pods[0], control_plane_pods[1]
            ),
        "fsm install printed {stdout:?}"
    );
    // One mesh per cluster.
    let second = fsm_cli(
        &c,
        &[
            "install",
            "--mesh-name",
            "other",
            "--fsm-namespace",
            "other-system",
        ],
    );
    ensure!(
        second
            .as_ref()
            .is_err_and(|e| format!("{e:#}")
                .contains("Mesh [fsm] in namespace [fsm-system] already exists")),
        "a second mesh was not refused: {second:?}"
    );

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

    // demo joins the mesh, with injection.
    let added = fsm_cli(&c, &["namespace", "add", "demo"])?;
    ensure!(
        added.contains("Namespace [demo] successfully added to mesh [fsm]"),
        "{added}"
    );
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(c.client.clone());

    let pods: Api<Pod> = Api::namespaced(c.client.clone(), "demo");
    let create = |pod: Value| {
        let pods = pods.clone();
        async move {
            let pod: Pod = serde_json::from_value(pod)?;
            anyhow::Ok(pods.create(&PostParams::default(), &pod).await?)
        }
    };
    let pod = create(deployment_pod(
        "demo",
        "injected",
        json!({"flomesh.io/sidecar-class": "fsm-sidecar"}),
    ))
    .await?;
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

    // A pod that chooses nothing gets the chart's default, Envoy; a pod asking for an unknown
    // sidecar is refused, by name.
    let envoy = create(deployment_pod("demo", "envoy-app", json!({}))).await?;
    let envoy_sidecar = &envoy.spec.context("spec")?.containers[1];
    ensure!(
        envoy_sidecar
            .env
            .iter()
            .flatten()
            .any(|e| e.name == "FSM_ENVOY_BOOTSTRAP"),
        "the Envoy sidecar has no bootstrap"
    );
    // The mesh's choice is MeshConfig's, read when a pod is created.
    cluster::merge_patch(
        &c.client,
        &json!({"apiVersion": "config.flomesh.io/v1alpha3", "kind": "MeshConfig",
                "metadata": {"name": "fsm-mesh-config", "namespace": "fsm-system"}}),
        &json!({"spec": {"sidecar": {"sidecarClass": "fsm-sidecar"}}}),
    )
    .await?;
    let native = create(deployment_pod("demo", "native-app", json!({}))).await?;
    let native_sidecar = &native.spec.context("spec")?.containers[1];
    ensure!(
        native_sidecar.command.as_deref() == Some(&["fsm-sidecar".to_string()][..]),
        "MeshConfig's sidecarClass was not followed: {:?}",
        native_sidecar.command
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
    // The controller's validating webhook: an invalid policy is refused with its field and FSM
    // code; a valid one is stored.
    let retry = |timeout: &str| {
        json!({
            "apiVersion": "policy.flomesh.io/v1alpha1", "kind": "Retry",
            "metadata": {"name": "curl-retries", "namespace": "demo"},
            "spec": {
                "source": {"kind": "ServiceAccount", "name": "curl", "namespace": "demo"},
                "destinations": [{"kind": "Service", "name": "httpbin", "namespace": "demo"}],
                "retryPolicy": {"retryOn": "5xx", "numRetries": 3, "perTryTimeout": timeout},
            },
        })
    };
    let refused = eventually(CONVERGE, || async {
        match cluster::apply(&c.client, &retry("forever")).await {
            Ok(()) => bail!("an invalid Retry was admitted"),
            Err(e) => {
                let text = format!("{e:#}");
                ensure!(
                    text.contains("denied the request"),
                    "not refused by the webhook yet: {text}"
                );
                Ok(text)
            }
        }
    })
    .await?;
    ensure!(
        refused.contains("Retry demo/curl-retries: spec.retryPolicy.perTryTimeout:")
            && refused.contains("\"forever\""),
        "{refused}"
    );
    cluster::apply(&c.client, &retry("2s")).await?;
    ensure!(
        c.server.admission_calls("fsm-validate.flomesh.io") >= 2,
        "the validating webhook was not called"
    );

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
    // The fsm CLI, through the API server: the proxy is synced, its own dump is fsm-sidecar's.
    let native_status = proxy_synced(&c, &name).await?;
    ensure!(native_status.contains(" fsm-sidecar "), "{native_status}");
    // …and holds exactly what the controller computes for it now, resource by resource.
    let native_diff = holds_what_was_computed(&c, &name).await?;
    eprintln!("[fsm proxy status {name}]\n{native_diff}");
    let native_dump = fsm_cli(&c, &["proxy", "get", "config_dump", &name, "-n", "demo"])?;
    ensure!(
        native_dump.contains("fsm.dataplane.v1"),
        "not fsm-sidecar's config dump: {}",
        &native_dump[..native_dump.len().min(300)]
    );
    // Both pods are transparent (their listeners take every address of 15001, as in their own
    // network namespaces); on one host only one can run at a time.
    drop(sidecar);

    // An Envoy pod, run from what the injector put into it: its bootstrap, SDS files and start-up
    // command, with only the pod's paths and addresses moved onto this machine.
    let (_envoy, _app, envoy_pod) =
        envoy_from_its_injection(&c, &pods, &controller.ads(), subnet).await?;
    let status = proxy_synced(&c, &envoy_pod).await?;
    eprintln!("[fsm proxy status]\n{status}");
    ensure!(status.contains(" envoy "), "{status}");
    let detail = holds_what_was_computed(&c, &envoy_pod).await?;
    eprintln!("[fsm proxy status {envoy_pod}]\n{detail}");
    ensure!(
        detail.contains("envoy.config.cluster.v3.Cluster") && detail.contains("SYNCED"),
        "{detail}"
    );
    let dump = fsm_cli(
        &c,
        &["proxy", "get", "config_dump", &envoy_pod, "-n", "demo"],
    )?;
    ensure!(
        dump.contains("type.googleapis.com/envoy.admin.v3.BootstrapConfigDump"),
        "not Envoy's config dump: {}",
        &dump[..dump.len().min(300)]
    );
    let version = fsm_cli(&c, &["version"])?;
    ensure!(
        version.contains("Control plane [fsm-system] version: "),
        "{version}"
    );

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

    // `fsm uninstall mesh`: the control plane goes, the CRDs and the mesh's objects stay.
    let uninstalled = fsm_cli(&c, &["uninstall", "mesh", "-f"])?;
    ensure!(
        uninstalled.contains("FSM [mesh name: fsm] uninstalled"),
        "{uninstalled}"
    );
    for name in ["fsm-controller", "fsm-injector"] {
        ensure!(
            deployments.get_opt(name).await?.is_none(),
            "Deployment {name} is still there"
        );
    }
    ensure!(
        Api::<MutatingWebhookConfiguration>::all(c.client.clone())
            .get_opt(WEBHOOK_CONFIG)
            .await?
            .is_none(),
        "the webhook configuration is still there"
    );
    let release_records = Api::<Secret>::namespaced(c.client.clone(), FSM_NAMESPACE)
        .list(&kube::api::ListParams::default().labels("owner=helm,name=fsm"))
        .await?;
    ensure!(
        release_records.items.is_empty(),
        "the Helm release record is still there"
    );
    let crds: Api<
        k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    > = Api::all(c.client.clone());
    ensure!(
        crds.get_opt("meshconfigs.config.flomesh.io")
            .await?
            .is_some(),
        "uninstall deleted the CRDs"
    );
    ensure!(
        Api::<DynamicObject>::namespaced_with(
            c.client.clone(),
            "demo",
            &kube::core::ApiResource::from_gvk(&kube::core::GroupVersionKind::gvk(
                "policy.flomesh.io",
                "v1alpha1",
                "Retry"
            ))
        )
        .get_opt("curl-retries")
        .await?
        .is_some(),
        "uninstall deleted the mesh's policies"
    );
    Ok(())
}

/// `fsm install --dry-run` renders the chart it embeds exactly as the real Helm engine renders
/// charts/fsm: the chart's own tests run with `--fsm`, which renders every value set of theirs
/// through both and compares the objects, and every refused value's message.
#[test]
fn fsm_install_renders_like_helm() -> Result<()> {
    let out = Command::new("python3")
        .arg(repo_root().join("charts/tests/test_chart.py"))
        .arg("--fsm")
        .arg(binary("fsm")?)
        .output()
        .context("running charts/tests/test_chart.py (make chart-deps installs its Helm)")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        stdout.contains("install --dry-run compared with it") && stdout.contains(" 0 failed"),
        "{stdout}"
    );
    Ok(())
}

/// Creates an Envoy pod whose readiness probe asks the app for `/status/202`, runs real Envoy with
/// the bootstrap the injector wrote into the pod (credentials from the controller, ADS to the
/// controller), and checks that Envoy gets its configuration over mTLS with the injected identity
/// and answers the rewritten probe from the app. Returns Envoy, the app and the pod's name.
async fn envoy_from_its_injection(
    c: &TestCluster,
    pods: &Api<Pod>,
    ads: &fsm_integration_tests::controller::AdsTarget,
    subnet: u8,
) -> Result<(ManagedProcess, ManagedProcess, String)> {
    let (app_port, app) = start_localhost_server("envoy-app", &c.logs).await?;
    let mut pod = deployment_pod(
        "demo",
        "envoy-served",
        json!({"flomesh.io/sidecar-class": "envoy"}),
    );
    pod["spec"]["containers"][0]["ports"][0]["containerPort"] = json!(app_port);
    pod["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"] = json!("/status/202");
    let pod: Pod = serde_json::from_value(pod)?;
    let pod = pods.create(&PostParams::default(), &pod).await?;
    let name = pod.metadata.name.clone().context("name")?;
    let sidecar = pod.spec.as_ref().context("spec")?.containers[1].clone();
    let env = |key: &str| {
        sidecar
            .env
            .iter()
            .flatten()
            .find(|e| e.name == key)
            .and_then(|e| e.value.clone())
            .with_context(|| format!("the Envoy sidecar has no {key}"))
    };
    let script = sidecar.args.clone().unwrap_or_default().join(" ");
    ensure!(
        script.contains("exec envoy --config-yaml \"$FSM_ENVOY_BOOTSTRAP\""),
        "{script}"
    );
    let ip = Ipv4Addr::new(127, 0, subnet, 78);
    pods.patch_status(
        &name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Running", "podIP": ip.to_string()}})),
    )
    .await?;
    let credentials = ads.pod_dir("demo", &name);
    fsm_integration_tests::controller::wait_for_bootstrap(&credentials, CONVERGE).await?;

    // The pod's paths and wildcard addresses, here.
    let sds = c.work.path().join(format!("sds-{name}"));
    std::fs::create_dir_all(&sds)?;
    let here = |text: String| {
        text.replace("/etc/fsm/bootstrap", &credentials.display().to_string())
            .replace("/tmp/fsm-sds", &sds.display().to_string())
            .replace("\"0.0.0.0\"", &format!("\"{ip}\""))
            .replace(
                "\"127.0.0.1\",\"port_value\":15000",
                &format!("\"{ip}\",\"port_value\":15000"),
            )
    };
    std::fs::write(sds.join("cert.yaml"), here(env("FSM_SDS_CERT")?))?;
    std::fs::write(sds.join("ca.yaml"), here(env("FSM_SDS_CA")?))?;
    let bootstrap = here(env("FSM_ENVOY_BOOTSTRAP")?);
    ensure!(
        bootstrap.contains(&format!("\"{ip}\",\"port_value\":15000")),
        "the admin address was not moved: {bootstrap}"
    );
    let mut command = Command::new(envoy_binary()?);
    command.arg("--config-yaml").arg(&bootstrap).args([
        "--disable-hot-restart",
        "--use-dynamic-base-id",
        "--concurrency",
        "1",
    ]);
    let mut envoy = ManagedProcess::spawn(&format!("envoy-{name}"), command, &c.logs)?;
    envoy
        .wait_for_http_ok(&format!("http://{ip}:15000/ready"), CONVERGE)
        .await
        .context("the injected Envoy never got its configuration from the controller")?;
    let probe = eventually(CONVERGE, || async {
        let reply = fsm_integration_tests::http_get_from(
            std::net::IpAddr::V4(Ipv4Addr::LOCALHOST),
            SocketAddr::from((ip, 15902)),
            "kubelet",
            "/fsm-readiness-probe",
        )
        .await?;
        ensure!(reply.status == 202, "{} {:?}", reply.status, reply.body);
        Ok(reply.status)
    })
    .await?;
    ensure!(
        probe == 202,
        "the rewritten readiness probe got {probe}, not the app's 202"
    );
    Ok((envoy, app, name))
}
