//! The control plane's `fsm_*` metrics, each moved by the real event it describes.
//!
//! fsm-controller (with its validating webhook and `--enable-reconciler`) and fsm-injector watch
//! the test API server; two real Envoy sidecars connect over mTLS. The test then does what an
//! operator or the cluster does — changes endpoints, loads a burst of objects, flips a MeshConfig
//! feature flag, caps `maxDataPlaneConnections` and connects one proxy too many, applies a valid
//! and an invalid policy (the API server calls the validating webhook) and creates a pod (it calls
//! the injector), asks for a CRD conversion as kube-apiserver would through the conversion webhook
//! the controller wrote into the TrafficSplit CRD (the test API server does not call conversion
//! webhooks), edits and deletes the webhook configurations and edits the CRD (the reconciler
//! restores them, leaving the conversion webhook), disconnects a sidecar
//! — and after each, scrapes `/metrics` (the controller's 9091 and the injector's
//! `--metrics-listen`) and checks that the metric moved. Every wait is a bounded poll; the run
//! takes about two seconds.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use fsm_catalog::CatalogSettings;
use fsm_integration_tests::ads_client::{SecretsWait, fetch_secrets, xds_node};
use fsm_integration_tests::client::get_text;
use fsm_integration_tests::cluster::{self, TestCluster, find};
use fsm_integration_tests::controller::ADS_SERVER_NAME;
use fsm_integration_tests::{
    AdsMode, Controller, ControllerOptions, Envoy, ManagedProcess, MeshPod, SidecarConfig, binary,
    eventually, free_port, load_catalog, mesh_pods, start_controller_on_cluster, start_envoy,
};
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;
use kube::api::{DeleteParams, PostParams};
use serde_json::{Value, json};

const SUBNET: u8 = 62;
const CONVERGE: Duration = Duration::from_secs(20);
const FSM_NAMESPACE: &str = "fsm-system";
const MUTATING: &str = "fsm-webhook-fsm";
const VALIDATING: &str = "fsm-validator-mesh-fsm";
/// The one mesh CRD serving two versions, whose conversion the controller's webhook does.
const TRAFFIC_SPLITS: &str = "trafficsplits.split.smi-spec.io";
const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";

// === Reading /metrics ===

/// One sample of the Prometheus text format.
#[derive(Clone, Debug, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

fn parse(text: &str) -> Result<Vec<Sample>> {
    let mut samples = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (series, value) = line
            .rsplit_once(' ')
            .with_context(|| format!("no value in {line:?}"))?;
        let value: f64 = value
            .parse()
            .with_context(|| format!("value of {line:?}"))?;
        let (name, labels) = match series.split_once('{') {
            None => (series.to_owned(), BTreeMap::new()),
            Some((name, rest)) => (
                name.to_owned(),
                parse_labels(rest.strip_suffix('}').context("unclosed labels")?)?,
            ),
        };
        samples.push(Sample {
            name,
            labels,
            value,
        });
    }
    Ok(samples)
}

/// `a="x",b="y\"z"` → {a: x, b: y"z}.
fn parse_labels(text: &str) -> Result<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    let mut rest = text;
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"").context("label without value")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => bail!("dangling escape"),
                },
                Some((at, '"')) => break at,
                Some((_, c)) => value.push(c),
                None => bail!("unterminated label value"),
            }
        };
        labels.insert(key.to_owned(), value);
        rest = after[end + 1..].trim_start_matches(',');
    }
    Ok(labels)
}

/// The scraped metrics of one process.
struct Scrape(Vec<Sample>);

impl Scrape {
    async fn of(url: &str) -> Result<Scrape> {
        Ok(Scrape(parse(&get_text(url).await?)?))
    }

    /// The sum of the samples of `name` carrying every label of `labels` (0 when none).
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }

    fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&str, &str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.0.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    fn has(&self, name: &str, labels: &[(&str, &str)]) -> bool {
        self.matching(name, labels).next().is_some()
    }

    /// Series of any metric labelled `proxy_uuid="uuid"`.
    fn series_of_proxy(&self, uuid: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|s| s.labels.get("proxy_uuid").map(String::as_str) == Some(uuid))
            .map(|s| format!("{}{:?}", s.name, s.labels))
            .collect()
    }
}

/// Polls `url` until `check` holds for its metrics; returns them.
async fn until(url: &str, what: &str, check: impl Fn(&Scrape) -> bool) -> Result<Scrape> {
    eventually(CONVERGE, || async {
        let scrape = Scrape::of(url).await?;
        ensure!(check(&scrape), "{what}: not yet");
        Ok(scrape)
    })
    .await
    .with_context(|| format!("waiting for {what} on {url}"))
}

// === The control plane ===

/// A Service of the control plane and its Endpoints on 127.0.0.1:`port` (nothing here runs an
/// endpoints controller), as the API server resolves a webhook's `clientConfig.service`.
fn service_and_endpoints(name: &str, port: u16) -> [Value; 2] {
    [
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": FSM_NAMESPACE},
            "spec": {"ports": [{"name": "webhook", "port": 443, "targetPort": port}]},
        }),
        json!({
            "apiVersion": "v1", "kind": "Endpoints",
            "metadata": {"name": name, "namespace": FSM_NAMESPACE},
            "subsets": [{"addresses": [{"ip": "127.0.0.1"}],
                         "ports": [{"name": "webhook", "port": port}]}],
        }),
    ]
}

/// The chart's labels, and the one FSM's reconciler selects by.
fn reconciled_labels() -> Value {
    json!({"app.kubernetes.io/name": "flomesh.io", "app.kubernetes.io/instance": "fsm",
           "flomesh.io/reconcile": "true"})
}

fn webhook_configurations() -> [Value; 2] {
    [
        json!({
            "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": MUTATING, "labels": reconciled_labels()},
            "webhooks": [{
                "name": "fsm-inject.flomesh.io",
                "clientConfig": {"service": {"name": "fsm-injector", "namespace": FSM_NAMESPACE,
                                             "path": "/mutate-pod-creation"}},
                "namespaceSelector": {"matchLabels": {"flomesh.io/monitored-by": "fsm"}},
                "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                           "resources": ["pods"]}],
                "failurePolicy": "Fail", "sideEffects": "NoneOnDryRun",
                "admissionReviewVersions": ["v1"],
            }],
        }),
        json!({
            "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
            "metadata": {"name": VALIDATING, "labels": reconciled_labels()},
            "webhooks": [{
                "name": "fsm-validate.flomesh.io",
                "clientConfig": {"service": {"name": "fsm-controller", "namespace": FSM_NAMESPACE,
                                             "path": "/validate"}},
                "rules": [
                    {"operations": ["CREATE", "UPDATE"], "apiGroups": ["config.flomesh.io"],
                     "apiVersions": ["v1alpha3"], "resources": ["meshconfigs"]},
                    {"operations": ["CREATE", "UPDATE"], "apiGroups": ["policy.flomesh.io"],
                     "apiVersions": ["v1alpha1"], "resources": ["retries"]},
                ],
                "failurePolicy": "Fail", "sideEffects": "None", "admissionReviewVersions": ["v1"],
            }],
        }),
    ]
}

async fn start_injector(
    c: &TestCluster,
    port: u16,
    metrics: SocketAddr,
    ads: SocketAddr,
) -> Result<ManagedProcess> {
    let mut command = Command::new(binary("fsm-injector")?);
    command
        .current_dir(c.work.path())
        .arg("--kubeconfig")
        .arg(&c.kubeconfig)
        .arg(format!("--listen=127.0.0.1:{port}"))
        .arg(format!("--metrics-listen={metrics}"))
        .arg(format!("--ads-address={ads}"))
        .arg(format!("--ads-server-name={ADS_SERVER_NAME}"));
    let mut process = ManagedProcess::spawn("fsm-injector", command, &c.logs)?;
    process
        .wait_for_http_ok(&format!("http://{metrics}/healthz"), CONVERGE)
        .await?;
    Ok(process)
}

async fn start_sidecar(pod: &MeshPod, controller: &Controller, c: &TestCluster) -> Result<Envoy> {
    let config = SidecarConfig::for_pod(pod, &controller.ads(), AdsMode::Sotw)?;
    let mut envoy = start_envoy(&config, &c.logs).await?;
    envoy
        .wait_ready(CONVERGE)
        .await
        .with_context(|| format!("the sidecar of {}", pod.id()))?;
    Ok(envoy)
}

fn retry(name: &str, per_try_timeout: &str) -> Value {
    json!({
        "apiVersion": "policy.flomesh.io/v1alpha1", "kind": "Retry",
        "metadata": {"name": name, "namespace": "demo"},
        "spec": {
            "source": {"kind": "ServiceAccount", "name": "curl", "namespace": "demo"},
            "destinations": [{"kind": "Service", "name": "httpbin", "namespace": "demo"}],
            "retryPolicy": {"retryOn": "5xx", "numRetries": 3, "perTryTimeout": per_try_timeout},
        },
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fsm_metric_moves_with_the_event_it_counts() {
    if let Err(err) = metrics_move(SUBNET).await {
        panic!("{err:#}");
    }
}

async fn metrics_move(subnet: u8) -> Result<()> {
    let c = TestCluster::start_demo(subnet).await?;
    cluster::apply_all(&c.client, &c.objects).await?;
    let (validator_port, injector_port) = (free_port()?, free_port()?);
    let injector_metrics = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
    for object in service_and_endpoints("fsm-controller", validator_port)
        .iter()
        .chain(&service_and_endpoints("fsm-injector", injector_port))
        .chain(&webhook_configurations())
    {
        cluster::apply(&c.client, object).await?;
    }
    let controller = start_controller_on_cluster(
        &c.kubeconfig,
        &c.logs,
        &ControllerOptions {
            extra_args: vec![
                format!("--validating-webhook-listen=127.0.0.1:{validator_port}"),
                // The port of the Service of `service_and_endpoints`.
                "--webhook-service-port=443".into(),
                "--enable-reconciler".into(),
            ],
            ..Default::default()
        },
    )
    .await?;
    let metrics = controller.url("/metrics");
    let _injector =
        start_injector(&c, injector_port, injector_metrics, controller.ads().addr).await?;
    let injector_metrics = format!("http://{injector_metrics}/metrics");
    let result = scenario(&c, &controller, validator_port, &metrics, &injector_metrics).await;
    result.with_context(|| {
        format!(
            "controller log:\n{}\n(logs in {})",
            controller.process.log_tail(40),
            c.logs.display()
        )
    })
}

async fn scenario(
    c: &TestCluster,
    controller: &Controller,
    validator_port: u16,
    metrics: &str,
    injector_metrics: &str,
) -> Result<()> {
    // Loading the cluster: FSM's informer events, every metric registered.
    let start = until(metrics, "the initial lists counted", |m| {
        m.sum(
            "fsm_k8s_api_event_count",
            &[("type", "pod-added"), ("namespace", "demo")],
        ) >= 4.0
            && m.sum(
                "fsm_k8s_api_event_count",
                &[("type", "namespace-added"), ("namespace", "")],
            ) >= 2.0
            && m.sum(
                "fsm_k8s_api_event_count",
                &[("type", "meshconfig-added"), ("namespace", FSM_NAMESPACE)],
            ) == 1.0
            && m.sum("fsm_proxy_broadcast_event_count", &[]) >= 1.0
            && m.sum("fsm_events_queued", &[]) == 0.0
    })
    .await?;
    for name in [
        "fsm_events_queued",
        "fsm_proxy_connect_count",
        "fsm_proxy_reconnect_count",
        "fsm_proxy_max_connections_rejected",
        "fsm_proxy_broadcast_event_count",
        "fsm_cert_issued_count",
        "fsm_cert_issued_time_count",
    ] {
        ensure!(
            start.has(name, &[]),
            "{name} is not exported from the start"
        );
    }
    ensure!(
        start.sum(
            "fsm_feature_flag_enabled",
            &[("feature_flag", "enableRetryPolicy")]
        ) == 0.0
            && start.has(
                "fsm_feature_flag_enabled",
                &[("feature_flag", "enableValidateHTTPRouteHostnames")]
            ),
        "feature flags at the MeshConfig's values"
    );

    // Two real sidecars connect: their service certificates are issued, their configuration
    // computed and sent, their requests counted under their UUID.
    let catalog = load_catalog(&c.manifests, CatalogSettings::default())?;
    let pods = mesh_pods(&catalog);
    let pod = |name: &str| {
        pods.iter()
            .find(|p| p.name == name)
            .cloned()
            .with_context(|| format!("pod {name}"))
    };
    let (curl, httpbin_v1, httpbin_v2) = (pod("curl")?, pod("httpbin-v1")?, pod("httpbin-v2")?);
    let curl_uuid = curl.proxy_uuid.clone().context("curl's UUID")?;
    let issued = start.sum("fsm_cert_issued_count", &[]);
    let mut curl_envoy = start_sidecar(&curl, controller, c).await?;
    let _httpbin_envoy = start_sidecar(&httpbin_v1, controller, c).await?;
    let connected = until(metrics, "two proxies connected and served", |m| {
        m.sum("fsm_proxy_connect_count", &[]) == 2.0
            && m.sum("fsm_cert_issued_count", &[]) >= issued + 2.0
            && m.sum(
                "fsm_proxy_xds_request_count",
                &[
                    ("proxy_uuid", curl_uuid.as_str()),
                    ("identity", "curl.demo"),
                    ("type", "CDS"),
                ],
            ) >= 1.0
            && m.sum(
                "fsm_proxy_response_send_success_count",
                &[("proxy_uuid", curl_uuid.as_str()), ("type", "LDS")],
            ) >= 1.0
            && m.sum(
                "fsm_proxy_config_update_time_count",
                &[("resource_type", CDS), ("success", "true")],
            ) >= 2.0
    })
    .await?;
    ensure!(
        connected.sum("fsm_cert_issued_time_count", &[])
            == connected.sum("fsm_cert_issued_count", &[]),
        "every issued certificate is timed"
    );

    // An endpoint change: an informer update, a mesh-wide (shared) change, and the time until
    // curl's Envoy acknowledged the new endpoints.
    let endpoints = find(&c.objects, "Endpoints", "httpbin")?.clone();
    let mut v1_only = endpoints["subsets"].clone();
    let addresses = v1_only[0]["addresses"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    v1_only[0]["addresses"] = Value::Array(
        addresses
            .into_iter()
            .filter(|a| a["targetRef"]["name"] == "httpbin-v1")
            .collect(),
    );
    cluster::merge_patch(&c.client, &endpoints, &json!({"subsets": v1_only})).await?;
    until(metrics, "the endpoint change counted and converged", |m| {
        let updated = |m: &Scrape| {
            m.sum(
                "fsm_k8s_api_event_count",
                &[("type", "endpoint-updated"), ("namespace", "demo")],
            )
        };
        updated(m) >= updated(&connected) + 1.0
            && m.sum("fsm_proxy_broadcast_event_count", &[])
                > connected.sum("fsm_proxy_broadcast_event_count", &[])
            && m.sum("fsm_proxy_convergence_seconds_count", &[("type", "EDS")])
                > connected.sum("fsm_proxy_convergence_seconds_count", &[("type", "EDS")])
    })
    .await?;

    // A burst of objects queues events for the control loop; the queue drains.
    let mut peak = 0.0_f64;
    for attempt in 0..3 {
        let namespace = format!("burst-{attempt}");
        let mut objects = vec![json!({"apiVersion": "v1", "kind": "Namespace",
                                      "metadata": {"name": namespace}})];
        objects.extend((0..600).map(|i| {
            json!({"apiVersion": "v1", "kind": "Service",
                   "metadata": {"name": format!("s{i}"), "namespace": namespace},
                   "spec": {"ports": [{"port": 80}]}})
        }));
        let store = c.server.store();
        let load = tokio::task::spawn_blocking(move || store.apply_all(objects));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while tokio::time::Instant::now() < deadline {
            let queued = Scrape::of(metrics).await?.sum("fsm_events_queued", &[]);
            peak = peak.max(queued);
            if peak > 0.0 {
                break;
            }
        }
        load.await??;
        if peak > 0.0 {
            break;
        }
    }
    ensure!(
        peak > 0.0,
        "fsm_events_queued never rose during three bursts"
    );
    until(metrics, "the burst processed", |m| {
        m.sum("fsm_events_queued", &[]) == 0.0
            && m.sum(
                "fsm_k8s_api_event_count",
                &[("type", "service-added"), ("namespace", "burst-0")],
            ) == 600.0
    })
    .await?;

    // A MeshConfig change: a feature flag flips, and it reaches every proxy.
    let mesh_config = find(&c.objects, "MeshConfig", "fsm-mesh-config")?.clone();
    let before = Scrape::of(metrics).await?;
    cluster::merge_patch(
        &c.client,
        &mesh_config,
        &json!({"spec": {"featureFlags": {"enableRetryPolicy": true}}}),
    )
    .await?;
    until(metrics, "the feature flag's gauge", |m| {
        m.sum(
            "fsm_feature_flag_enabled",
            &[("feature_flag", "enableRetryPolicy")],
        ) == 1.0
            && m.sum("fsm_proxy_broadcast_event_count", &[])
                > before.sum("fsm_proxy_broadcast_event_count", &[])
            && m.sum(
                "fsm_k8s_api_event_count",
                &[("type", "meshconfig-updated"), ("namespace", FSM_NAMESPACE)],
            ) >= 1.0
    })
    .await?;

    // The validating webhook: the MeshConfig patch was admitted; a Retry with a bad timeout is
    // refused, a good one admitted.
    let refused = cluster::apply(&c.client, &retry("bad", "forever")).await;
    ensure!(
        refused
            .as_ref()
            .is_err_and(|e| format!("{e:#}").contains("perTryTimeout")),
        "an invalid Retry was not refused: {refused:?}"
    );
    cluster::apply(&c.client, &retry("good", "1s")).await?;
    cluster::delete(&c.client, &retry("good", "1s")).await?;
    until(metrics, "the validating webhook's answers", |m| {
        let answers = |kind: &str, success: &str| {
            m.sum(
                "fsm_admission_webhook_response_total",
                &[("kind", kind), ("success", success)],
            )
        };
        answers("MeshConfig", "true") >= 1.0
            && answers("Retry", "false") >= 1.0
            && answers("Retry", "true") >= 1.0
            && m.sum(
                "fsm_k8s_api_event_count",
                &[("type", "retry-deleted"), ("namespace", "demo")],
            ) == 1.0
    })
    .await?;

    // The conversion webhook: the controller points the TrafficSplit CRD (the one serving two
    // versions) at it, with the mesh's roots, the caBundle it publishes for the validating
    // webhook. It is called here as kube-apiserver calls it, through the CRD's clientConfig
    // (the test API server converts multi-version CRDs itself): a v1alpha2 TrafficSplit read
    // as v1alpha4.
    let roots = eventually(CONVERGE, || async {
        Api::<ValidatingWebhookConfiguration>::all(c.client.clone())
            .get(VALIDATING)
            .await?
            .webhooks
            .unwrap_or_default()
            .first()
            .and_then(|w| w.client_config.ca_bundle.clone())
            .context("no caBundle published")
    })
    .await?;
    let crds: Api<CustomResourceDefinition> = Api::all(c.client.clone());
    let conversion = eventually(CONVERGE, || async {
        crds.get(TRAFFIC_SPLITS)
            .await?
            .spec
            .conversion
            .filter(|c| c.strategy == "Webhook")
            .context("the TrafficSplit CRD has no conversion webhook")
    })
    .await?;
    let client_config = conversion
        .webhook
        .as_ref()
        .and_then(|w| w.client_config.clone())
        .context("no clientConfig")?;
    ensure!(
        conversion
            .webhook
            .as_ref()
            .map(|w| &w.conversion_review_versions[..])
            == Some(&["v1".to_owned()][..]),
        "{conversion:?}"
    );
    ensure!(
        client_config.ca_bundle.as_ref() == Some(&roots),
        "the conversion webhook's caBundle is not the mesh's roots: {client_config:?}"
    );
    let service = client_config.service.context("no service")?;
    ensure!(
        (
            service.namespace.as_str(),
            service.name.as_str(),
            service.path.as_deref(),
            service.port
        ) == (FSM_NAMESPACE, "fsm-controller", Some("/convert"), Some(443)),
        "{service:?}"
    );
    let host = format!("{}.{}.svc", service.name, service.namespace);
    let https = reqwest::Client::builder()
        .no_proxy()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&roots.0)?)
        .resolve(
            &host,
            // The Service's port 443 goes to its Endpoints' port.
            SocketAddr::from((Ipv4Addr::LOCALHOST, validator_port)),
        )
        .build()?;
    let review = json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "ConversionReview",
        "request": {"uid": "c0nv", "desiredAPIVersion": "split.smi-spec.io/v1alpha4", "objects": [{
            "apiVersion": "split.smi-spec.io/v1alpha2", "kind": "TrafficSplit",
            "metadata": {"name": "split", "namespace": "demo"},
            "spec": {"service": "httpbin", "backends": [{"service": "httpbin-v1", "weight": 1}]},
        }]},
    });
    let answer: Value = https
        .post(format!("https://{host}/convert?timeout=10s"))
        .json(&review)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    ensure!(
        answer["response"]["result"]["status"] == "Success"
            && answer["response"]["convertedObjects"][0]["apiVersion"]
                == "split.smi-spec.io/v1alpha4",
        "{answer}"
    );
    until(metrics, "the conversion counted", |m| {
        m.sum(
            "fsm_conversion_webhook_resource_total",
            &[
                ("kind", "TrafficSplit"),
                ("success", "true"),
                ("from_version", "split.smi-spec.io/v1alpha2"),
                ("to_version", "split.smi-spec.io/v1alpha4"),
            ],
        ) == 1.0
    })
    .await?;

    // The mutating webhook: a pod created in the mesh goes through the injector (once it has
    // published its roots in the webhook configuration).
    let pods_api: Api<Pod> = Api::namespaced(c.client.clone(), "demo");
    let new_pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "injected", "namespace": "demo", "labels": {"app": "injected"}},
        "spec": {"serviceAccountName": "curl", "containers": [{"name": "app", "image": "app"}]},
    }))?;
    let created = eventually(CONVERGE, || async {
        Ok(pods_api.create(&PostParams::default(), &new_pod).await?)
    })
    .await?;
    ensure!(
        created
            .spec
            .as_ref()
            .is_some_and(|s| s.containers.iter().any(|c| c.name == "sidecar")),
        "the pod was not injected"
    );
    until(injector_metrics, "the injector's answer", |m| {
        m.sum(
            "fsm_admission_webhook_response_total",
            &[("kind", "Pod"), ("success", "true")],
        ) >= 1.0
    })
    .await?;

    // maxDataPlaneConnections: with two proxies connected and a limit of two, a third is
    // refused and counted; without a limit it is served.
    cluster::merge_patch(
        &c.client,
        &mesh_config,
        &json!({"spec": {"sidecar": {"maxDataPlaneConnections": 2}}}),
    )
    .await?;
    let credentials = controller
        .ads()
        .pod_dir(&httpbin_v2.namespace, &httpbin_v2.name);
    let node = || {
        xds_node(
            &httpbin_v2.node_id().unwrap_or_default(),
            &httpbin_v2.node_cluster(),
            "envoy",
        )
    };
    let status = eventually(CONVERGE, || async {
        match fetch_secrets(
            controller.ads().addr,
            &credentials,
            node(),
            SecretsWait::FirstResponse,
        )
        .await?
        {
            Err(status) => Ok(status),
            Ok(_) => bail!("served: the limit is not applied yet"),
        }
    })
    .await?;
    ensure!(
        status.code() == tonic::Code::ResourceExhausted
            && status.message().contains("maxDataPlaneConnections"),
        "{status:?}"
    );
    until(metrics, "the rejected connection counted", |m| {
        m.sum("fsm_proxy_max_connections_rejected", &[]) >= 1.0
    })
    .await?;
    cluster::merge_patch(
        &c.client,
        &mesh_config,
        &json!({"spec": {"sidecar": {"maxDataPlaneConnections": 0}}}),
    )
    .await?;
    eventually(CONVERGE, || async {
        fetch_secrets(
            controller.ads().addr,
            &credentials,
            node(),
            SecretsWait::FirstResponse,
        )
        .await?
        .map_err(|status| anyhow::anyhow!("still refused: {status:?}"))
    })
    .await
    .context("served again without a limit")?;

    // An error code: a proxy announcing another pod's identity than its certificate's (E5010).
    let impostor = fetch_secrets(
        controller.ads().addr,
        &credentials,
        xds_node(
            &curl.node_id().unwrap_or_default(),
            &curl.node_cluster(),
            "envoy",
        ),
        SecretsWait::FirstResponse,
    )
    .await?;
    ensure!(impostor.is_err(), "an impostor was served");
    until(metrics, "the error code counted", |m| {
        m.sum("fsm_error_err_code_count", &[("err_code", "E5010")]) >= 1.0
    })
    .await?;

    // The reconciler: an edited webhook configuration is put back, a deleted one recreated, an
    // edited CRD is put back with the conversion webhook the controller wrote.
    let mut edited_crd = crds.get(TRAFFIC_SPLITS).await?;
    edited_crd.spec.names.short_names = Some(vec!["edited".into()]);
    crds.replace(TRAFFIC_SPLITS, &PostParams::default(), &edited_crd)
        .await?;
    let mutating: Api<MutatingWebhookConfiguration> = Api::all(c.client.clone());
    let mut edited = mutating.get(MUTATING).await?;
    for webhook in edited.webhooks.iter_mut().flatten() {
        webhook.failure_policy = Some("Ignore".into());
    }
    mutating
        .replace(MUTATING, &PostParams::default(), &edited)
        .await?;
    let validating: Api<ValidatingWebhookConfiguration> = Api::all(c.client.clone());
    validating
        .delete(VALIDATING, &DeleteParams::default())
        .await?;
    eventually(CONVERGE, || async {
        let restored = mutating.get(MUTATING).await?;
        let policies: Vec<_> = restored
            .webhooks
            .iter()
            .flatten()
            .map(|w| w.failure_policy.clone())
            .collect();
        ensure!(
            policies == [Some("Fail".to_owned())],
            "failurePolicy {policies:?}"
        );
        validating
            .get_opt(VALIDATING)
            .await?
            .context("the validating webhook configuration is not back")?;
        let crd = crds.get(TRAFFIC_SPLITS).await?;
        ensure!(
            crd.spec.names.short_names == Some(vec!["ts".to_owned()]),
            "shortNames {:?}",
            crd.spec.names.short_names
        );
        ensure!(
            crd.spec.conversion.as_ref() == Some(&conversion),
            "the reconciler changed the conversion: {:?}",
            crd.spec.conversion
        );
        Ok(())
    })
    .await?;
    until(metrics, "the reconciliations counted", |m| {
        m.sum(
            "fsm_reconciliation_total",
            &[("kind", "MutatingWebhookConfiguration")],
        ) >= 1.0
            && m.sum(
                "fsm_reconciliation_total",
                &[("kind", "ValidatingWebhookConfiguration")],
            ) >= 1.0
            && m.sum(
                "fsm_reconciliation_total",
                &[("kind", "CustomResourceDefinition")],
            ) >= 1.0
    })
    .await?;

    // A proxy goes: its series go with it; it comes back: a reconnect.
    let before = Scrape::of(metrics).await?;
    ensure!(
        !before.series_of_proxy(&curl_uuid).is_empty(),
        "curl's series before it disconnects"
    );
    drop(curl_envoy);
    until(metrics, "curl's series removed", |m| {
        m.series_of_proxy(&curl_uuid).is_empty()
            && m.sum("fsm_proxy_connect_count", &[]) < before.sum("fsm_proxy_connect_count", &[])
    })
    .await?;
    curl_envoy = start_sidecar(&curl, controller, c).await?;
    until(metrics, "the reconnect counted", |m| {
        m.sum("fsm_proxy_reconnect_count", &[]) > before.sum("fsm_proxy_reconnect_count", &[])
            && !m.series_of_proxy(&curl_uuid).is_empty()
    })
    .await?;
    drop(curl_envoy);

    // The HTTP port's own responses, by route template.
    until(metrics, "the HTTP responses counted", |m| {
        m.sum(
            "fsm_http_response_total",
            &[("code", "200"), ("method", "GET"), ("path", "/metrics")],
        ) >= 10.0
            && m.sum(
                "fsm_http_response_duration_count",
                &[
                    ("code", "200"),
                    ("method", "GET"),
                    ("path", "/health/ready"),
                ],
            ) >= 1.0
    })
    .await?;
    Ok(())
}

#[test]
fn the_text_format_is_read_with_escapes() -> Result<()> {
    let samples = parse(
        "# HELP x y\n# TYPE x counter\nx 1\ny{a=\"1\",b=\"q\\\"uote\"} 2.5\nz_bucket{le=\"+Inf\"} 3\n",
    )?;
    assert_eq!(samples.len(), 3);
    assert_eq!(samples[1].labels["b"], "q\"uote");
    assert_eq!(samples[1].value, 2.5);
    let scrape = Scrape(samples);
    assert_eq!(scrape.sum("y", &[("a", "1")]), 2.5);
    assert_eq!(scrape.sum("y", &[("a", "2")]), 0.0);
    assert!(scrape.has("x", &[]));
    Ok(())
}
