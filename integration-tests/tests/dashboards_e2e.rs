//! The chart's Grafana dashboards (charts/fsm/dashboards) and Prometheus configuration
//! (charts/fsm/prometheus: FSM's scrape job and relabelling, the recording rules that put Envoy on
//! fsm-sidecar's series) against a running mesh, through the real Prometheus.
//!
//! The demo mesh runs with both data planes on both sides: `demo/curl` on fsm-sidecar and
//! `metrics-demo/curl` (a second client Deployment, FSM's metrics-demo namespace) on Envoy, both
//! calling `httpbin`, whose two pods run one on each. A deliberately invalid manifest makes the
//! controller count an FSM error code. Prometheus scrapes the controller (`/metrics`) and every
//! sidecar (`/stats/prometheus` on 15010: fsm-sidecar's metrics port, and for Envoy the injector's
//! own metrics listener in front of its admin port) with the chart's `prometheus.yml` and
//! `fsm-rules.yml`, changed only where a test must:
//!
//! - Kubernetes discovery is replaced by one static target per pod carrying the `__meta_kubernetes_*`
//!   labels that discovery would give it (namespace, pod name, `app` label, controlling
//!   ReplicaSet or StatefulSet, `prometheus.io/*` annotations), so FSM's relabelling runs as
//!   shipped and produces the same target labels (`source_workload_name`, ...);
//! - it scrapes and evaluates the rules every second instead of every 10 s, to keep the run short.
//!
//! While both clients send traffic (2xx, 4xx and 5xx answers), the checks are:
//!
//! - **queries use only exported metrics and labels**: every panel's and variable's PromQL, parsed
//!   by a real parser (GreptimeTeam's promql-parser), names only metrics that the controller or a
//!   sidecar exported in this run (their `/metrics` text) and, on each, only labels its series
//!   carry in Prometheus (after the chart's relabelling and rules);
//! - **panels render from the demo mesh**: every panel's queries, evaluated over the traffic by
//!   Prometheus's `query_range`, return data; the service-to-service request rate is drawn as a PNG
//!   at `target/dashboards-e2e/fsm-service-to-service-requests.png` (the path is printed);
//! - **both data planes answer FSM's documented queries the same way**: FSM's
//!   `irate(sidecar_cluster_upstream_rq_xx{exported_source_workload_name="curl", sidecar_cluster_name=...}[30s])`
//!   returns one series per client, Envoy's and fsm-sidecar's, and the series the dashboards read
//!   carry the same label names for both.
//!
//! Control-plane metrics from FSM's list that this run cannot move (fsm-injector and the webhooks
//! are not part of it; a send error needs a failing stream) may be absent: they are listed in
//! [`NOT_IN_THIS_RUN`] with the reason, and the test prints which of them were missing.
//!
//! One test runs the mesh once for the three checks (a run takes about 30 s on two cores) and
//! reports each; `every_panel_query_parses` needs no processes.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, ensure};
use fsm_integration_tests::prometheus::{Labels, RangeSeries, exposition_names};
use fsm_integration_tests::{
    AdsMode, DemoMesh, FsmSidecarConfig, MeshPod, Plane, Prometheus, Sidecar, SidecarConfig,
    eventually, http_get_via, repo_root, start_envoy_with, start_fsm_sidecar, start_prometheus,
};
use promql_parser::parser::{Expr, VectorMatchCardinality};
use serde::Deserialize as _;
use serde_json::Value;

const SUBNET: u8 = 150;
const HTTPBIN: &str = "httpbin.demo:14001";
/// How long both clients send traffic.
const TRAFFIC: Duration = Duration::from_secs(20);
/// Between two requests of one client.
const PACE: Duration = Duration::from_millis(200);
const CONVERGE: Duration = Duration::from_secs(30);
/// The sidecars' metrics port (FSM's `prometheus.io/port`).
const METRICS_PORT: u16 = 15010;
/// Grafana's built-in variables, as the test evaluates them (one-second scrapes).
const RATE_INTERVAL: &str = "10s";
const STEP: Duration = Duration::from_secs(1);
/// The panel drawn as a PNG: its dashboard file and title.
const PNG_PANEL: (&str, &str) = (
    "fsm-service-to-service.json",
    "Requests per second by destination service",
);
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// FSM's control-plane metrics this run cannot produce, and why. A panel reading one of them may
/// find nothing; every other metric a dashboard names must be exported.
const NOT_IN_THIS_RUN: &[(&str, &str)] = &[
    (
        "fsm_admission_webhook_response_total",
        "fsm-injector and the validating webhook answer an API server's admission reviews: none in a manifest-directory mesh",
    ),
    (
        "fsm_conversion_webhook_resource_total",
        "counted when an API server asks fsm-controller to convert a resource: none here",
    ),
    (
        "fsm_proxy_response_send_error_count",
        "counted when sending to a proxy fails, which no stream does here",
    ),
    (
        "fsm_k8s_api_event_count",
        "events from the Kubernetes API server: this mesh reads a manifest directory",
    ),
    (
        "fsm_reconciliation_total",
        "the reconciler of FSM's own resources does not run here",
    ),
];

// === the dashboards ===

/// One query of a dashboard: a panel target or a variable's `label_values(...)`.
#[derive(Clone, Debug)]
struct Query {
    dashboard: String,
    panel: String,
    legend: String,
    /// As written in the dashboard.
    expr: String,
    /// A variable's query: `label_values(<selector>, <label>)`.
    variable: bool,
}

impl Query {
    fn id(&self) -> String {
        format!("{} / {:?}: {}", self.dashboard, self.panel, self.expr)
    }
}

fn dashboards() -> Result<BTreeMap<String, Value>> {
    let dir = repo_root().join("charts/fsm/dashboards");
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "json") {
            let text = std::fs::read_to_string(&path)?;
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .context("file name")?
                .to_string();
            out.insert(
                name,
                serde_json::from_str(&text).with_context(|| format!("{}", path.display()))?,
            );
        }
    }
    ensure!(!out.is_empty(), "no dashboards in {}", dir.display());
    Ok(out)
}

fn queries(dashboards: &BTreeMap<String, Value>) -> Vec<Query> {
    let mut out = Vec::new();
    for (name, d) in dashboards {
        for panel in d["panels"].as_array().into_iter().flatten() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                out.push(Query {
                    dashboard: name.clone(),
                    panel: panel["title"].as_str().unwrap_or_default().to_string(),
                    legend: target["legendFormat"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    expr: target["expr"].as_str().unwrap_or_default().to_string(),
                    variable: false,
                });
            }
        }
        for var in d["templating"]["list"].as_array().into_iter().flatten() {
            if var["type"] == "query" {
                out.push(Query {
                    dashboard: name.clone(),
                    panel: format!("${}", var["name"].as_str().unwrap_or_default()),
                    legend: String::new(),
                    expr: var["query"].as_str().unwrap_or_default().to_string(),
                    variable: true,
                });
            }
        }
    }
    out
}

/// The query with Grafana's variables replaced as the test evaluates it: every dashboard
/// variable set to "All" (`.*`), the built-in intervals to durations.
fn substitute(expr: &str, range: Duration) -> String {
    let mut text = expr
        .replace("$__rate_interval", RATE_INTERVAL)
        .replace("$__interval", &format!("{}s", STEP.as_secs()))
        .replace("$__range", &format!("{}s", range.as_secs().max(1)));
    // ${name} and $name (identifier characters) of the dashboard's own variables.
    let mut out = String::new();
    while let Some(at) = text.find('$') {
        out.push_str(&text[..at]);
        let rest = &text[at + 1..];
        let len = if let Some(inner) = rest.strip_prefix('{') {
            inner.find('}').map_or(0, |end| end + 2)
        } else {
            rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len())
        };
        out.push_str(".*");
        text = rest[len..].to_string();
    }
    out.push_str(&text);
    out
}

/// A variable's `label_values(<selector>, <label>)` as its selector and label.
fn label_values(expr: &str) -> Result<(String, String)> {
    let inner = expr
        .trim()
        .strip_prefix("label_values(")
        .and_then(|s| s.strip_suffix(')'))
        .with_context(|| format!("{expr}: not label_values(<selector>, <label>)"))?;
    let (selector, label) = inner
        .rsplit_once(',')
        .with_context(|| format!("{expr}: label_values needs a selector and a label"))?;
    Ok((selector.trim().to_string(), label.trim().to_string()))
}

/// What one query reads: each metric it selects, with the labels it names on that metric
/// (matchers, `by`/`without`, `on`/`ignoring`, `group_*`, `label_replace`'s source).
fn uses(query: &Query) -> Result<BTreeMap<String, BTreeSet<String>>> {
    let mut uses = BTreeMap::new();
    if query.variable {
        let (selector, label) = label_values(&query.expr)?;
        let expr = promql_parser::parser::parse(&substitute(&selector, TRAFFIC))
            .map_err(|e| anyhow!("{}: {e}", query.id()))?;
        let metrics = walk(&expr, &mut uses).0;
        name_labels(&mut uses, &metrics, &BTreeSet::new(), [label.as_str()]);
    } else {
        let expr = promql_parser::parser::parse(&substitute(&query.expr, TRAFFIC))
            .map_err(|e| anyhow!("{}: {e}", query.id()))?;
        walk(&expr, &mut uses);
    }
    Ok(uses)
}

type Uses = BTreeMap<String, BTreeSet<String>>;

fn name_labels<'a>(
    uses: &mut Uses,
    metrics: &BTreeSet<String>,
    created: &BTreeSet<String>,
    labels: impl IntoIterator<Item = &'a str>,
) {
    for label in labels {
        if created.contains(label) {
            continue;
        }
        for metric in metrics {
            uses.entry(metric.clone())
                .or_default()
                .insert(label.to_string());
        }
    }
}

/// The metrics under `expr` and the labels `label_replace`/`label_join` create there.
fn walk(expr: &Expr, uses: &mut Uses) -> (BTreeSet<String>, BTreeSet<String>) {
    let no_labels = BTreeSet::new;
    match expr {
        Expr::VectorSelector(vs) => selector(vs, uses),
        Expr::MatrixSelector(ms) => selector(&ms.vs, uses),
        Expr::Aggregate(agg) => {
            let (metrics, created) = walk(&agg.expr, uses);
            if let Some(param) = &agg.param {
                walk(param, uses);
            }
            if let Some(modifier) = &agg.modifier {
                let labels = &modifier.labels().labels;
                name_labels(uses, &metrics, &created, labels.iter().map(String::as_str));
            }
            (metrics, created)
        }
        Expr::Binary(bin) => {
            let (lhs, lhs_created) = walk(&bin.lhs, uses);
            let (rhs, rhs_created) = walk(&bin.rhs, uses);
            if let Some(modifier) = &bin.modifier {
                if let Some(matching) = &modifier.matching {
                    let labels = matching.labels().labels.iter().map(String::as_str);
                    name_labels(uses, &lhs, &lhs_created, labels.clone());
                    name_labels(uses, &rhs, &rhs_created, labels);
                }
                match &modifier.card {
                    // group_left(labels) copies them from the right-hand ("one") side.
                    VectorMatchCardinality::ManyToOne(l) => name_labels(
                        uses,
                        &rhs,
                        &rhs_created,
                        l.labels.iter().map(String::as_str),
                    ),
                    VectorMatchCardinality::OneToMany(l) => name_labels(
                        uses,
                        &lhs,
                        &lhs_created,
                        l.labels.iter().map(String::as_str),
                    ),
                    _ => {}
                }
            }
            (
                lhs.union(&rhs).cloned().collect(),
                lhs_created.union(&rhs_created).cloned().collect(),
            )
        }
        Expr::Call(call) => {
            let args = &call.args.args;
            let mut metrics = BTreeSet::new();
            let mut created = BTreeSet::new();
            for arg in args {
                let (m, c) = walk(arg, uses);
                metrics.extend(m);
                created.extend(c);
            }
            let string = |i: usize| match args.get(i).map(|a| a.as_ref()) {
                Some(Expr::StringLiteral(s)) => Some(s.val.clone()),
                _ => None,
            };
            match call.func.name {
                "label_replace" => {
                    let (dst, src) = (string(1), string(3));
                    if let Some(src) = src.filter(|s| !s.is_empty()) {
                        name_labels(uses, &metrics, &created, [src.as_str()]);
                    }
                    created.extend(dst);
                }
                "label_join" => {
                    let sources: Vec<String> = (3..args.len()).filter_map(string).collect();
                    name_labels(uses, &metrics, &created, sources.iter().map(String::as_str));
                    created.extend(string(1));
                }
                _ => {}
            }
            (metrics, created)
        }
        Expr::Paren(p) => walk(&p.expr, uses),
        Expr::Unary(u) => walk(&u.expr, uses),
        Expr::Subquery(s) => walk(&s.expr, uses),
        Expr::NumberLiteral(_) | Expr::StringLiteral(_) | Expr::Extension(_) => {
            (no_labels(), no_labels())
        }
    }
}

fn selector(
    vs: &promql_parser::parser::VectorSelector,
    uses: &mut Uses,
) -> (BTreeSet<String>, BTreeSet<String>) {
    let matchers = vs
        .matchers
        .matchers
        .iter()
        .chain(vs.matchers.or_matchers.iter().flatten());
    let name = vs.name.clone().or_else(|| {
        vs.matchers
            .matchers
            .iter()
            .find(|m| m.name == "__name__")
            .map(|m| m.value.clone())
    });
    let mut metrics = BTreeSet::new();
    if let Some(name) = name {
        let labels = uses.entry(name.clone()).or_default();
        for m in matchers.filter(|m| m.name != "__name__") {
            labels.insert(m.name.clone());
        }
        metrics.insert(name);
    }
    (metrics, BTreeSet::new())
}

// === the mesh ===

/// How Kubernetes discovery would describe a pod: its `__meta_kubernetes_*` labels.
#[derive(Clone, Debug)]
struct PodMeta {
    namespace: String,
    name: String,
    app: Option<String>,
    /// The controlling owner: `ReplicaSet`/`curl-7b9f6d8c4f`, `StatefulSet`/`tcp-echo`.
    controller: Option<(String, String)>,
}

/// Every Pod of the manifest directory, by `namespace/name`.
fn pod_metas(manifests: &Path) -> Result<BTreeMap<String, PodMeta>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(manifests)? {
        let path = entry?.path();
        let text = std::fs::read_to_string(&path)?;
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let Ok(value) = serde_json::Value::deserialize(doc) else {
                continue;
            };
            if value["kind"] != "Pod" {
                continue;
            }
            let meta = &value["metadata"];
            let text = |v: &Value| v.as_str().map(str::to_string);
            let pod = PodMeta {
                namespace: text(&meta["namespace"]).unwrap_or_else(|| "default".into()),
                name: text(&meta["name"]).context("pod without a name")?,
                app: text(&meta["labels"]["app"]),
                controller: meta["ownerReferences"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|o| o["controller"] == true)
                    .and_then(|o| Some((text(&o["kind"])?, text(&o["name"])?))),
            };
            out.insert(format!("{}/{}", pod.namespace, pod.name), pod);
        }
    }
    Ok(out)
}

/// A second client Deployment, `curl` in FSM's metrics-demo namespace, for the Envoy side.
fn metrics_demo(subnet: u8) -> String {
    format!(
        r#"apiVersion: v1
kind: Namespace
metadata:
  name: metrics-demo
  labels:
    flomesh.io/monitored-by: fsm
  annotations:
    flomesh.io/sidecar-injection: enabled
    flomesh.io/metrics: enabled
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: curl
  namespace: metrics-demo
---
apiVersion: v1
kind: Pod
metadata:
  name: curl
  namespace: metrics-demo
  ownerReferences:
  - apiVersion: apps/v1
    kind: ReplicaSet
    name: curl-5d7f9c8b6d
    uid: 9c2e4b1a-7d3f-4e8a-b6c5-2f1e0d9c8b70
    controller: true
    blockOwnerDeletion: true
  labels:
    app: curl
    fsm-proxy-uuid: 2d4b6f8a-0c1e-4a3b-8d5f-7e9a1b3c5d70
spec:
  serviceAccountName: curl
  containers:
  - name: curl
    image: curlimages/curl
status:
  podIP: 127.0.{subnet}.20
"#
    )
}

/// Which data plane a pod runs: a client and a server of each kind.
fn plane_of(pod: &MeshPod) -> Plane {
    match (pod.namespace.as_str(), pod.name.as_str()) {
        ("metrics-demo", "curl") | ("demo", "httpbin-v1") => Plane::Envoy,
        _ => Plane::FsmSidecar,
    }
}

/// Envoy with the injector's own metrics listener (`fsm-metrics` on 15010, forwarding
/// `/stats/prometheus` to the admin port), moved from `0.0.0.0` and `127.0.0.1` to the pod's
/// address: every pod shares this host's loopback.
fn with_injector_metrics_listener(bootstrap: &mut Value, ip: IpAddr) -> Result<()> {
    let probes = fsm_injector::probes::Probes::default();
    let injected = fsm_injector::envoy::envoy_bootstrap(&fsm_injector::envoy::EnvoyBootstrap {
        node_id: "00000000-0000-4000-8000-000000000000.sidecar.sa.ns",
        ads_address: "127.0.0.1:15128",
        ads_server_name: "fsm-controller.fsm-system.svc.cluster.local",
        credentials_dir: "/unused",
        sds_dir: "/unused",
        admin_port: 15000,
        metrics_port: METRICS_PORT,
        probes: &probes,
    });
    let injected: Value = serde_json::from_str(&injected.bootstrap)?;
    let resources = &injected["static_resources"];
    let mut listener = resources["listeners"]
        .as_array()
        .and_then(|l| l.iter().find(|l| l["name"] == "fsm-metrics"))
        .cloned()
        .context("the injector's bootstrap has no fsm-metrics listener")?;
    let mut admin = resources["clusters"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == "fsm-admin"))
        .cloned()
        .context("the injector's bootstrap has no fsm-admin cluster")?;
    listener["address"]["socket_address"]["address"] = Value::from(ip.to_string());
    admin["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
        ["address"] = Value::from(ip.to_string());
    let statics = &mut bootstrap["static_resources"];
    if !statics["listeners"].is_array() {
        statics["listeners"] = Value::Array(Vec::new());
    }
    statics["listeners"]
        .as_array_mut()
        .context("listeners")?
        .push(listener);
    statics["clusters"]
        .as_array_mut()
        .context("clusters")?
        .push(admin);
    Ok(())
}

/// The running mesh, its Prometheus, and what the run produced.
struct Run {
    mesh: DemoMesh,
    sidecars: Vec<(MeshPod, Sidecar)>,
    prometheus: Prometheus,
    /// The traffic's window, unix seconds.
    start: f64,
    end: f64,
    /// `/metrics` texts of the controller and every sidecar, by target name.
    expositions: BTreeMap<String, String>,
    /// `instance` label of each Envoy and fsm-sidecar pod.
    envoy_instances: BTreeSet<String>,
    fsm_instances: BTreeSet<String>,
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// The test's prometheus.yml: the chart's, scraping static targets every second (see the module
/// docs).
fn prometheus_config(
    chart_config: &str,
    targets: Vec<(SocketAddr, &str, &PodMeta)>,
) -> Result<String> {
    let mut config: serde_yaml_ng::Value = serde_yaml_ng::from_str(chart_config)?;
    config["global"]["scrape_interval"] = "1s".into();
    config["global"]["scrape_timeout"] = "1s".into();
    config["global"]["evaluation_interval"] = "1s".into();
    let jobs = config["scrape_configs"]
        .as_sequence_mut()
        .context("scrape_configs")?;
    ensure!(jobs.len() == 1, "the chart's config has one job");
    let job = jobs[0].as_mapping_mut().context("the job")?;
    ensure!(
        job.remove("kubernetes_sd_configs").is_some(),
        "the chart's job discovers pods"
    );
    let statics: Vec<serde_yaml_ng::Value> = targets
        .into_iter()
        .map(|(addr, path, pod)| {
            let mut labels = serde_yaml_ng::Mapping::new();
            let mut put = |k: &str, v: &str| {
                labels.insert(k.into(), v.into());
            };
            put(
                "__meta_kubernetes_pod_annotation_prometheus_io_scrape",
                "true",
            );
            put(
                "__meta_kubernetes_pod_annotation_prometheus_io_port",
                &addr.port().to_string(),
            );
            put("__meta_kubernetes_pod_annotation_prometheus_io_path", path);
            put("__meta_kubernetes_namespace", &pod.namespace);
            put("__meta_kubernetes_pod_name", &pod.name);
            if let Some(app) = &pod.app {
                put("__meta_kubernetes_pod_label_app", app);
            }
            if let Some((kind, name)) = &pod.controller {
                put("__meta_kubernetes_pod_controller_kind", kind);
                put("__meta_kubernetes_pod_controller_name", name);
            }
            serde_yaml_ng::to_value(serde_json::json!({
                // As discovery gives it for a pod without declared ports: its IP alone.
                "targets": [addr.ip().to_string()],
            }))
            .map(|mut v| {
                v["labels"] = serde_yaml_ng::Value::Mapping(labels);
                v
            })
        })
        .collect::<Result<_, _>>()?;
    job.insert("static_configs".into(), statics.into());
    Ok(serde_yaml_ng::to_string(&config)?)
}

impl Run {
    async fn start() -> Result<Run> {
        let mesh = DemoMesh::start_edited(SUBNET, |dir| {
            std::fs::write(dir.join("40-metrics-demo.yaml"), metrics_demo(SUBNET))?;
            Ok(())
        })
        .await?;
        let ads = mesh.controller.ads();
        let mut sidecars = Vec::new();
        for pod in &mesh.pods {
            let sidecar = if plane_of(pod) == Plane::Envoy {
                let config = SidecarConfig::for_pod(pod, &ads, AdsMode::Sotw)?;
                let mut edit_error = None;
                let mut envoy = start_envoy_with(&config, &mesh.logs, |b| {
                    edit_error = with_injector_metrics_listener(b, pod.ip).err();
                })
                .await?;
                if let Some(e) = edit_error {
                    return Err(e);
                }
                envoy.wait_ready(CONVERGE).await?;
                Sidecar::Envoy(envoy)
            } else {
                let config = FsmSidecarConfig::for_pod(pod, &ads, AdsMode::Sotw)?;
                let mut sidecar = start_fsm_sidecar(&config, &mesh.logs).await?;
                sidecar.wait_ready(CONVERGE).await?;
                Sidecar::Fsm(sidecar)
            };
            sidecars.push((pod.clone(), sidecar));
        }

        // An FSM error for the error panels: a manifest the controller cannot read (E3002).
        std::fs::write(
            mesh.manifests.join("90-invalid.yaml"),
            "apiVersion: v1\nkind: Service\nmetadata: {name: broken, namespace: demo}\nspec:\n  ports: [{port: not-a-port}]\n",
        )?;
        eventually(CONVERGE, || async {
            let metrics = mesh.controller.metrics().await?;
            ensure!(
                metrics.contains("fsm_error_err_code_count{err_code=\"E3002\"}"),
                "the controller has not counted the invalid manifest"
            );
            Ok(())
        })
        .await?;

        // Prometheus with the chart's configuration.
        let chart = repo_root().join("charts/fsm/prometheus");
        let dir = mesh.work.path().join("prometheus");
        std::fs::create_dir_all(&dir)?;
        std::fs::copy(chart.join("fsm-rules.yml"), dir.join("fsm-rules.yml"))?;
        let metas = pod_metas(&mesh.manifests)?;
        let controller_pod = PodMeta {
            namespace: "fsm-system".into(),
            name: "fsm-controller-7c9d8b6f5d-q2w3e".into(),
            app: Some("fsm-controller".into()),
            controller: Some(("ReplicaSet".into(), "fsm-controller-7c9d8b6f5d".into())),
        };
        let mut targets = vec![(mesh.controller.http_addr, "/metrics", &controller_pod)];
        let mut envoy_instances = BTreeSet::new();
        let mut fsm_instances = BTreeSet::new();
        for (pod, sidecar) in &sidecars {
            let meta = metas
                .get(&pod.id())
                .with_context(|| format!("{} in the manifests", pod.id()))?;
            let addr = SocketAddr::new(pod.ip, METRICS_PORT);
            targets.push((addr, "/stats/prometheus", meta));
            match sidecar {
                Sidecar::Envoy(_) => envoy_instances.insert(addr.to_string()),
                Sidecar::Fsm(_) => fsm_instances.insert(addr.to_string()),
            };
        }
        let config = prometheus_config(
            &std::fs::read_to_string(chart.join("prometheus.yml"))?,
            targets,
        )?;
        std::fs::write(dir.join("prometheus.yml"), config)?;
        let prometheus = start_prometheus(&dir, &mesh.logs).await?;
        eventually(CONVERGE, || async {
            let targets = prometheus.targets().await?;
            let down: Vec<_> = targets
                .iter()
                .filter(|t| t.health != "up")
                .map(|t| format!("{} {} {}", t.scrape_url, t.health, t.last_error))
                .collect();
            ensure!(
                targets.len() == sidecars.len() + 1 && down.is_empty(),
                "targets not up: {down:?}"
            );
            Ok(())
        })
        .await?;

        // Traffic from both clients: mostly 200s, some 404s and 503s from httpbin.
        let clients: Vec<SocketAddr> = sidecars
            .iter()
            .filter(|(p, _)| p.name == "curl")
            .map(|(p, _)| p.outbound_addr())
            .collect();
        ensure!(clients.len() == 2, "two curl clients: {clients:?}");
        for via in &clients {
            eventually(CONVERGE, || async {
                let reply = http_get_via(*via, HTTPBIN, "/get").await?;
                ensure!(reply.status == 200, "GET /get via {via}: {}", reply.status);
                Ok(())
            })
            .await?;
        }
        let start = now();
        let mut pace = tokio::time::interval(PACE);
        let mut sent = 0u32;
        while now() - start < TRAFFIC.as_secs_f64() {
            pace.tick().await;
            let path = match sent % 10 {
                3 => "/status/404",
                7 => "/status/503",
                _ => "/get",
            };
            for via in &clients {
                http_get_via(*via, HTTPBIN, path)
                    .await
                    .with_context(|| format!("GET {path} via {via}"))?;
            }
            sent += 1;
        }
        let end = now();

        // Every target scraped after the traffic, and the rules evaluated on it.
        eventually(CONVERGE, || async {
            let scraped = prometheus.query("min(timestamp(up))", None).await?;
            ensure!(
                scraped.first().is_some_and(|s| s.value > end + 1.0),
                "not every target scraped since the traffic ended: {scraped:?}"
            );
            let recorded = prometheus
                .query("max(timestamp(fsm_request_total))", None)
                .await?;
            ensure!(
                recorded.first().is_some_and(|s| s.value > end + 1.0),
                "the rules have not run since the traffic ended: {recorded:?}"
            );
            Ok(())
        })
        .await?;

        let mut expositions = BTreeMap::new();
        expositions.insert(
            "fsm-controller".to_string(),
            mesh.controller.metrics().await?,
        );
        for (pod, _) in &sidecars {
            let url = format!("http://{}:{METRICS_PORT}/stats/prometheus", pod.ip);
            expositions.insert(
                pod.id(),
                fsm_integration_tests::client::get_text(&url).await?,
            );
        }
        Ok(Run {
            mesh,
            sidecars,
            prometheus,
            start,
            end,
            expositions,
            envoy_instances,
            fsm_instances,
        })
    }

    fn range(&self) -> Duration {
        Duration::from_secs_f64(self.end - self.start)
    }

    /// Every metric family the controller and the sidecars exported, with its label names.
    fn exported(&self) -> BTreeMap<String, BTreeSet<String>> {
        let mut all: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for text in self.expositions.values() {
            for (name, labels) in exposition_names(text) {
                all.entry(name).or_default().extend(labels);
            }
        }
        all
    }

    /// Label names of `metric`'s series in Prometheus.
    async fn stored_labels(&self, metric: &str) -> Result<BTreeSet<String>> {
        Ok(self
            .prometheus
            .series(metric)
            .await?
            .into_iter()
            .flat_map(|labels| labels.into_keys())
            .collect())
    }
}

// === the checks ===

fn not_in_this_run(metric: &str) -> Option<&'static str> {
    NOT_IN_THIS_RUN
        .iter()
        .find(|(name, _)| {
            metric == *name
                || metric
                    .strip_prefix(name)
                    .is_some_and(|s| ["_bucket", "_sum", "_count"].contains(&s))
        })
        .map(|(_, why)| *why)
}

/// Every panel's and variable's metrics and labels were exported in this run.
async fn queries_use_only_exported_metrics_and_labels(
    run: &Run,
    notes: &mut Vec<String>,
) -> Result<()> {
    let exported = run.exported();
    let mut problems = Vec::new();
    let mut absent = BTreeSet::new();
    for query in queries(&dashboards()?) {
        for (metric, labels) in uses(&query)? {
            if !exported.contains_key(&metric) {
                match not_in_this_run(&metric) {
                    Some(why) => {
                        absent.insert(format!("{metric} ({why})"));
                    }
                    None => problems.push(format!(
                        "{}: {metric} is exported by neither the controller nor a sidecar",
                        query.id()
                    )),
                }
                continue;
            }
            let stored = run.stored_labels(&metric).await?;
            let missing: Vec<_> = labels.difference(&stored).collect();
            if !missing.is_empty() {
                problems.push(format!(
                    "{}: {metric} has no label {missing:?} in Prometheus (it has {stored:?})",
                    query.id()
                ));
            }
        }
    }
    for metric in absent {
        notes.push(format!("not exported in this run: {metric}"));
    }
    ensure!(problems.is_empty(), "{}", problems.join("\n"));
    Ok(())
}

/// Every panel's queries return data over the traffic; one panel is drawn as a PNG.
async fn panels_render_from_the_demo_mesh(run: &Run, notes: &mut Vec<String>) -> Result<()> {
    let dashboards = dashboards()?;
    let mut problems = Vec::new();
    let mut drawn = None;
    for query in queries(&dashboards).into_iter().filter(|q| !q.variable) {
        let expr = substitute(&query.expr, run.range());
        let result = run
            .prometheus
            .query_range(&expr, run.start, run.end, STEP)
            .await
            .with_context(|| query.id())?;
        let points: usize = result.iter().map(|s| s.points.len()).sum();
        if points == 0 {
            let reasons: Vec<_> = uses(&query)?
                .keys()
                .filter_map(|m| not_in_this_run(m).map(|why| format!("{m}: {why}")))
                .collect();
            if reasons.is_empty() {
                problems.push(format!("{}: no data", query.id()));
            } else {
                notes.push(format!(
                    "empty panel {} ({})",
                    query.id(),
                    reasons.join("; ")
                ));
            }
        }
        if (query.dashboard.as_str(), query.panel.as_str()) == PNG_PANEL {
            drawn = Some((query.clone(), result));
        }
    }
    ensure!(problems.is_empty(), "{}", problems.join("\n"));
    let (query, series) = drawn.with_context(|| format!("no panel {PNG_PANEL:?}"))?;
    let png = repo_root()
        .join("target/dashboards-e2e")
        .join("fsm-service-to-service-requests.png");
    draw_panel(&query, &series, run.start, &png)?;
    println!(
        "dashboards_e2e: panel {:?} drawn at {}",
        query.panel,
        png.display()
    );
    notes.push(format!(
        "panel {:?} drawn at {}",
        query.panel,
        png.display()
    ));
    Ok(())
}

/// FSM's documented queries answer for the Envoy and the fsm-sidecar client alike, and the
/// series the dashboards read have the same label names from both data planes.
async fn both_data_planes_answer_fsm_queries(run: &Run) -> Result<()> {
    let documented = r#"irate(sidecar_cluster_upstream_rq_xx{exported_source_workload_name="curl", sidecar_cluster_name="demo/httpbin|14001"}[30s])"#;
    let samples = run.prometheus.query(documented, Some(run.end)).await?;
    let instances: BTreeSet<String> = samples
        .iter()
        .filter(|s| {
            s.value > 0.0
                && s.labels
                    .get("sidecar_response_code_class")
                    .map(String::as_str)
                    == Some("2")
        })
        .filter_map(|s| s.labels.get("instance").cloned())
        .collect();
    let clients = |set: &BTreeSet<String>| {
        run.sidecars
            .iter()
            .filter(|(p, _)| p.name == "curl")
            .map(|(p, _)| SocketAddr::new(p.ip, METRICS_PORT).to_string())
            .filter(|i| set.contains(i))
            .collect::<BTreeSet<_>>()
    };
    let (envoy_client, fsm_client) = (clients(&run.envoy_instances), clients(&run.fsm_instances));
    ensure!(
        envoy_client.len() == 1 && fsm_client.len() == 1,
        "one client of each data plane: {envoy_client:?} {fsm_client:?}"
    );
    ensure!(
        instances == envoy_client.union(&fsm_client).cloned().collect(),
        "{documented} answers for {instances:?}, not for both clients {envoy_client:?} (Envoy) and {fsm_client:?} (fsm-sidecar): {samples:?}"
    );
    let successes = run
        .prometheus
        .query(
            r#"sidecar_cluster_upstream_rq_xx{sidecar_response_code_class="2"}"#,
            Some(run.end),
        )
        .await?;
    for plane in [&run.envoy_instances, &run.fsm_instances] {
        ensure!(
            successes
                .iter()
                .any(|s| s.labels.get("instance").is_some_and(|i| plane.contains(i))),
            "sidecar_cluster_upstream_rq_xx{{sidecar_response_code_class=\"2\"}} has nothing from {plane:?}"
        );
    }
    // Same label names from both planes, on everything the traffic dashboards read.
    for metric in [
        "sidecar_cluster_upstream_rq_xx",
        "sidecar_cluster_upstream_rq_total",
        "fsm_request_total",
        "fsm_request_duration_ms_bucket",
        "fsm_request_duration_ms_sum",
        "fsm_request_duration_ms_count",
    ] {
        let series = run.prometheus.series(metric).await?;
        let names = |plane: &BTreeSet<String>| -> BTreeSet<BTreeSet<String>> {
            series
                .iter()
                .filter(|l| l.get("instance").is_some_and(|i| plane.contains(i)))
                // Without an endpoint's workload, fsm-sidecar names no destination kind or pod,
                // like Envoy: compare the series that have the most labels.
                .map(|l: &Labels| l.keys().filter(|k| *k != "__name__").cloned().collect())
                .collect()
        };
        let (envoy, fsm) = (names(&run.envoy_instances), names(&run.fsm_instances));
        ensure!(
            !envoy.is_empty() && !fsm.is_empty(),
            "{metric}: Envoy {envoy:?}, fsm-sidecar {fsm:?}"
        );
        let widest = |sets: &BTreeSet<BTreeSet<String>>| -> BTreeSet<String> {
            sets.iter().flatten().cloned().collect()
        };
        let (envoy, fsm) = (widest(&envoy), widest(&fsm));
        // An Envoy client's stats are per cluster: no destination workload kind or pod.
        let only_fsm: BTreeSet<_> = fsm.difference(&envoy).cloned().collect();
        let allowed: BTreeSet<String> = ["destination_kind", "destination_pod"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        ensure!(
            envoy.is_subset(&fsm) && only_fsm.is_subset(&allowed),
            "{metric}: label names differ: Envoy only {:?}, fsm-sidecar only {only_fsm:?}",
            envoy.difference(&fsm).collect::<Vec<_>>()
        );
    }
    Ok(())
}

// === the PNG ===

fn legend(format: &str, labels: &Labels) -> String {
    let mut out = format.to_string();
    for (name, value) in labels {
        out = out.replace(&format!("{{{{{name}}}}}"), value);
    }
    out
}

fn draw_panel(query: &Query, series: &[RangeSeries], start: f64, png: &Path) -> Result<()> {
    use plotters::prelude::*;
    use plotters::style::FontStyle;
    const FAMILY: &str = "sans-serif";
    let font = std::fs::read(FONT).with_context(|| {
        format!("reading {FONT}: run `make prometheus` (installs fonts-dejavu-core)")
    })?;
    let font: &'static [u8] = Box::leak(font.into_boxed_slice());
    plotters::style::register_font(FAMILY, FontStyle::Normal, font)
        .map_err(|_| anyhow!("{FONT} is not a TrueType font"))?;
    if let Some(dir) = png.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let error = |e: &dyn std::fmt::Display| anyhow!("drawing {}: {e}", png.display());
    let root = BitMapBackend::new(png, (900, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| error(&e))?;
    let max_x = series
        .iter()
        .flat_map(|s| s.points.iter().map(|(t, _)| t - start))
        .fold(1.0, f64::max);
    let max_y = series
        .iter()
        .flat_map(|s| s.points.iter().map(|(_, v)| *v))
        .filter(|v| v.is_finite())
        .fold(0.1, f64::max);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "{} ({})",
                query.panel,
                query.dashboard.trim_end_matches(".json")
            ),
            (FAMILY, 18),
        )
        .margin(15)
        .x_label_area_size(35)
        .y_label_area_size(55)
        .build_cartesian_2d(0.0..max_x, 0.0..max_y * 1.25)
        .map_err(|e| error(&e))?;
    chart
        .configure_mesh()
        .x_desc("seconds since the traffic started")
        .y_desc("requests/s")
        .label_style((FAMILY, 12))
        .draw()
        .map_err(|e| error(&e))?;
    let colors = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
    for (i, s) in series.iter().enumerate() {
        let color = colors[i % colors.len()];
        let points: Vec<(f64, f64)> = s
            .points
            .iter()
            .filter(|(_, v)| v.is_finite())
            .map(|(t, v)| (t - start, *v))
            .collect();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(|e| error(&e))?
            .label(legend(&query.legend, &s.labels))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font((FAMILY, 12))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| error(&e))?;
    root.present().map_err(|e| error(&e))?;
    Ok(())
}

// === tests ===

#[test]
fn every_panel_query_parses() {
    let dashboards = dashboards().expect("charts/fsm/dashboards");
    let queries = queries(&dashboards);
    assert!(queries.len() > 30, "{} queries", queries.len());
    let mut problems = Vec::new();
    for query in &queries {
        match uses(query) {
            Ok(uses) if uses.is_empty() => {
                problems.push(format!("{}: reads no metric", query.id()))
            }
            Ok(_) => {}
            Err(e) => problems.push(format!("{e:#}")),
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // The analysis itself, on a query with every construct the dashboards use.
    let uses = uses(&Query {
        dashboard: "t".into(),
        panel: "t".into(),
        legend: String::new(),
        expr: r#"histogram_quantile(0.99, sum by (le, dst) (label_replace(rate(a_bucket{x=~"$v"}[$__rate_interval]), "dst", "$1", "src", "(.*)"))) / on (k) group_left (g) b"#.into(),
        variable: false,
    })
    .expect("parses");
    let labels = |m: &str| uses[m].iter().cloned().collect::<Vec<_>>();
    assert_eq!(
        labels("a_bucket"),
        ["k", "le", "src", "x"],
        "dst is made by label_replace; on (k) needs k on both sides"
    );
    assert_eq!(labels("b"), ["g", "k"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboards_and_rules_against_the_demo_mesh() {
    let run = match Run::start().await {
        Ok(run) => run,
        Err(err) => panic!("starting the run: {err:#}"),
    };
    let mut notes = Vec::new();
    let mut failures = Vec::new();
    let checks: [(&str, Result<()>); 3] = [
        (
            "queries use only exported metrics and labels",
            queries_use_only_exported_metrics_and_labels(&run, &mut notes).await,
        ),
        (
            "panels render from the demo mesh",
            panels_render_from_the_demo_mesh(&run, &mut notes).await,
        ),
        (
            "both data planes answer FSM's queries",
            both_data_planes_answer_fsm_queries(&run).await,
        ),
    ];
    for (name, result) in checks {
        match result {
            Ok(()) => println!("ok   {name}"),
            Err(err) => {
                println!("FAIL {name}: {err:#}");
                failures.push(format!("{name}: {err:#}"));
            }
        }
    }
    for note in &notes {
        println!("note {note}");
    }
    if !failures.is_empty() {
        // Keep the logs, the manifests and Prometheus's configuration and data for a look.
        let Run { mesh, .. } = run;
        let kept: PathBuf = mesh.work.keep();
        panic!(
            "{}\n(logs, manifests and Prometheus in {})",
            failures.join("\n"),
            kept.display()
        );
    }
}
