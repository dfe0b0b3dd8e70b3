//! `fsm translate` over the example manifest sets: every pod with a sidecar, as a static Envoy
//! bootstrap that real Envoy validates, as Envoy's resources in the JSON Envoy's `/config_dump`
//! prints (which real Envoy is shown to print the same), and as fsm-sidecar's resources; a broken
//! set is refused with every problem named; and the time for a 1,000-service mesh.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::bootstrap::v3::{Admin, Bootstrap};
use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address, socket_address};
use envoy_types::pb::google::protobuf::BoolValue;
use fsm_adapter_envoy::json::{Sensitive, descriptor_pool, message_to_json, normalize};
use fsm_catalog::CatalogSettings;
use fsm_integration_tests::{
    ManagedProcess, binary, client, envoy_binary, free_port, load_catalog, repo_root,
    validate_bootstrap_file,
};
use prost::Message;

fn fsm(args: &[&str]) -> std::process::Output {
    Command::new(binary("fsm").expect("fsm built"))
        .args(args)
        .output()
        .expect("run fsm")
}

/// The example sets that make a mesh by themselves, and demo with the resilience policies.
fn example_sets(work: &Path) -> Vec<PathBuf> {
    let examples = repo_root().join("examples");
    let combined = work.join("demo-resilience");
    std::fs::create_dir_all(&combined).expect("dir");
    for dir in ["demo", "resilience"] {
        for entry in std::fs::read_dir(examples.join(dir)).expect("examples") {
            let path = entry.expect("entry").path();
            std::fs::copy(&path, combined.join(path.file_name().expect("name"))).expect("copy");
        }
    }
    vec![examples.join("demo"), examples.join("bookstore"), combined]
}

/// The example pods with sidecars: (manifest directory, <namespace>/<pod>).
fn example_pods(work: &Path) -> Vec<(String, String)> {
    let mut pods = Vec::new();
    for set in example_sets(work) {
        let catalog = load_catalog(&set, CatalogSettings::default()).expect("catalog");
        let proxies = catalog.sidecar_proxies();
        assert!(!proxies.is_empty(), "{}: no pods", set.display());
        for p in proxies {
            pods.push((
                set.display().to_string(),
                format!("{}/{}", p.namespace, p.pod),
            ));
        }
    }
    pods
}

/// `fsm translate -f <dir> --proxy <proxy> <args>`, which must succeed: its stdout.
fn translate_output(dir: &str, proxy: &str, args: &[&str]) -> Vec<u8> {
    let out = fsm(&[&["translate", "-f", dir, "--proxy", proxy], args].concat());
    assert!(
        out.status.success(),
        "{dir} {proxy} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

const RESOURCE_TYPES: [(&str, &str); 5] = [
    ("clusters", "envoy.config.cluster.v3.Cluster"),
    (
        "endpoints",
        "envoy.config.endpoint.v3.ClusterLoadAssignment",
    ),
    ("listeners", "envoy.config.listener.v3.Listener"),
    ("routes", "envoy.config.route.v3.RouteConfiguration"),
    (
        "secrets",
        "envoy.extensions.transport_sockets.tls.v3.Secret",
    ),
];

/// Every `@type` in `json`, at any depth.
fn type_urls(json: &serde_json::Value, out: &mut Vec<String>) {
    match json {
        serde_json::Value::Object(map) => {
            if let Some(t) = map.get("@type") {
                out.push(t.as_str().unwrap_or_default().to_owned());
            }
            map.values().for_each(|v| type_urls(v, out));
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| type_urls(v, out)),
        _ => {}
    }
}

fn names(items: &[serde_json::Value], key: &str) -> BTreeSet<String> {
    items
        .iter()
        .map(|i| i[key].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Checks one proxy's `-o json` document: the five arrays, each resource's `@type`, every nested
/// `@type` a type Envoy's descriptors hold, each resource read back through the descriptors to
/// itself, no private key, and the same resources as the proxy's static bootstrap.
fn check_envoy_json(what: &str, json: &serde_json::Value, bootstrap: &Bootstrap) {
    for (key, type_name) in RESOURCE_TYPES {
        let items = json[key]
            .as_array()
            .unwrap_or_else(|| panic!("{what}: no {key} array in {json}"));
        for item in items {
            assert_eq!(
                item["@type"],
                format!("type.googleapis.com/{type_name}"),
                "{what} {key}"
            );
            let mut urls = Vec::new();
            type_urls(item, &mut urls);
            for url in urls {
                let name = url.strip_prefix("type.googleapis.com/").unwrap_or_default();
                assert!(
                    descriptor_pool().get_message_by_name(name).is_some(),
                    "{what} {key}: @type {url:?}"
                );
            }
            assert_eq!(
                &normalize(item).unwrap_or_else(|e| panic!("{what} {key}: {e}")),
                item,
                "{what} {key}: changed through the descriptors"
            );
        }
    }
    assert!(
        json["listeners"].as_array().is_some_and(|l| !l.is_empty()),
        "{what}: no listeners"
    );
    let static_resources = bootstrap.static_resources.clone().unwrap_or_default();
    let listeners: BTreeSet<String> = static_resources
        .listeners
        .iter()
        .map(|l| l.name.clone())
        .collect();
    let clusters: BTreeSet<String> = static_resources
        .clusters
        .iter()
        .map(|c| c.name.clone())
        .collect();
    let secrets: BTreeSet<String> = static_resources
        .secrets
        .iter()
        .map(|s| s.name.clone())
        .collect();
    let array = |key: &str| json[key].as_array().cloned().unwrap_or_default();
    assert_eq!(names(&array("listeners"), "name"), listeners, "{what}");
    assert_eq!(names(&array("clusters"), "name"), clusters, "{what}");
    assert_eq!(names(&array("secrets"), "name"), secrets, "{what}");
    let text = json.to_string();
    assert!(
        !text.contains("PRIVATE KEY"),
        "{what}: a private key was printed"
    );
    assert!(text.contains("[redacted]"), "{what}: no redacted key");
}

/// A translation without its secrets' certificates and keys: they come from a root made for
/// each run, so two runs differ there and only there.
fn without_pem(json: &serde_json::Value) -> serde_json::Value {
    fn strip(json: &serde_json::Value) -> serde_json::Value {
        match json {
            serde_json::Value::Object(map) => map
                .iter()
                .filter(|(k, _)| k.as_str() != "inline_string")
                .map(|(k, v)| (k.clone(), strip(v)))
                .collect(),
            serde_json::Value::Array(items) => items.iter().map(strip).collect(),
            other => other.clone(),
        }
    }
    let mut json = json.clone();
    json["secrets"] = strip(&json["secrets"]);
    json
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_example_pod_translates_for_both_data_planes() {
    let work = tempfile::tempdir().expect("tempdir");
    let mut translated = 0;
    for set in example_sets(work.path()) {
        let catalog = load_catalog(&set, CatalogSettings::default()).expect("catalog");
        let proxies = catalog.sidecar_proxies();
        assert!(!proxies.is_empty(), "{}: no pods", set.display());
        for p in proxies {
            let proxy = format!("{}/{}", p.namespace, p.pod);
            let dir = set.display().to_string();
            let out = fsm(&[
                "translate",
                "-f",
                &dir,
                "--proxy",
                &proxy,
                "-o",
                "bootstrap",
            ]);
            assert!(
                out.status.success(),
                "{dir} {proxy}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let file = work.path().join(format!("{}-{}.pb", p.namespace, p.pod));
            std::fs::write(&file, &out.stdout).expect("write");
            validate_bootstrap_file(&file)
                .await
                .unwrap_or_else(|e| panic!("{dir} {proxy}: {e:#}"));

            let bootstrap = Bootstrap::decode(out.stdout.as_slice()).expect("a Bootstrap");
            let what = format!("{dir} {proxy} -o json");
            let json: serde_json::Value =
                serde_json::from_slice(&translate_output(&dir, &proxy, &["-o", "json"]))
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
            check_envoy_json(&what, &json, &bootstrap);
            let yaml: serde_json::Value =
                serde_yaml_ng::from_slice(&translate_output(&dir, &proxy, &["-o", "yaml"]))
                    .unwrap_or_else(|e| panic!("{dir} {proxy} -o yaml: {e}"));
            assert_eq!(
                without_pem(&yaml),
                without_pem(&json),
                "{dir} {proxy}: -o yaml is -o json"
            );

            let out = fsm(&[
                "translate",
                "-f",
                &dir,
                "--proxy",
                &proxy,
                "--data-plane",
                "fsm-sidecar",
                "-o",
                "json",
            ]);
            assert!(
                out.status.success(),
                "{dir} {proxy}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
            assert!(
                json["listeners"].as_array().is_some_and(|l| !l.is_empty()),
                "{dir} {proxy}: no listeners in {json}"
            );
            assert!(
                !String::from_utf8_lossy(&out.stdout).contains("PRIVATE KEY"),
                "a private key was printed"
            );
            translated += 1;
        }
    }
    assert!(translated >= 10, "only {translated} pods translated");
}

/// Real Envoy, given each example pod's static bootstrap, prints every resource in its
/// `/config_dump` exactly as `fsm translate -o json` prints resources
/// ([`message_to_json`]), so an operator's diff of the two shows only real differences; and
/// [`normalize`] leaves Envoy's JSON as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_prints_each_resource_as_translate_does() {
    let work = tempfile::tempdir().expect("tempdir");
    let pods = example_pods(work.path());
    let mut compared = 0;
    for (dir, proxy) in &pods {
        let what = format!("{dir} {proxy}");
        let mut bootstrap =
            Bootstrap::decode(translate_output(dir, proxy, &["-o", "bootstrap"]).as_slice())
                .expect("a Bootstrap");
        let resources = bootstrap.static_resources.get_or_insert_default();
        // The pods' addresses are not this machine's: listeners that do not bind are still
        // active, and dumped.
        for listener in &mut resources.listeners {
            listener.bind_to_port = Some(BoolValue { value: false });
        }
        let mut ours = Vec::new();
        for c in &resources.clusters {
            ours.push(message_to_json(c, Sensitive::Redact).expect("json"));
        }
        for l in &resources.listeners {
            ours.push(message_to_json(l, Sensitive::Redact).expect("json"));
        }
        for s in &resources.secrets {
            ours.push(message_to_json(s, Sensitive::Redact).expect("json"));
        }
        let admin = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port().expect("port")));
        bootstrap.admin = Some(Admin {
            address: Some(Address {
                address: Some(address::Address::SocketAddress(SocketAddress {
                    address: admin.ip().to_string(),
                    port_specifier: Some(socket_address::PortSpecifier::PortValue(
                        admin.port().into(),
                    )),
                    ..Default::default()
                })),
            }),
            ..Default::default()
        });
        let name = proxy.replace('/', "-");
        let path = work.path().join(format!("{name}.pb"));
        std::fs::write(&path, bootstrap.encode_to_vec()).expect("write");
        let mut command = Command::new(envoy_binary().expect("envoy"));
        command
            .arg("-c")
            .arg(&path)
            .args(["--disable-hot-restart", "--concurrency", "1"]);
        let mut envoy = ManagedProcess::spawn(&format!("envoy-{name}"), command, work.path())
            .expect("start envoy");
        envoy
            .wait_for_tcp(admin, Duration::from_secs(20))
            .await
            .unwrap_or_else(|e| panic!("{what}: {e:#}"));
        let url = format!("http://{admin}/config_dump");
        let mut dumped = Vec::new();
        for _ in 0..40 {
            let dump: serde_json::Value =
                serde_json::from_str(&client::get_text(&url).await.expect("config_dump"))
                    .expect("config_dump is JSON");
            dumped = dump["configs"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|config| {
                    [
                        ("static_clusters", "cluster"),
                        ("static_listeners", "listener"),
                        ("static_secrets", "secret"),
                    ]
                    .into_iter()
                    .flat_map(move |(list, key)| {
                        config[list]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(move |item| item[key].clone())
                    })
                })
                .collect();
            if dumped.len() == ours.len() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        assert_eq!(dumped.len(), ours.len(), "{what}: Envoy dumped {dumped:?}");
        for resource in &ours {
            let found = dumped
                .iter()
                .find(|d| d["@type"] == resource["@type"] && d["name"] == resource["name"])
                .unwrap_or_else(|| panic!("{what}: Envoy did not dump {}", resource["name"]));
            assert_eq!(found, resource, "{what}: Envoy prints it otherwise");
            assert_eq!(
                &normalize(found).expect("normalizes"),
                resource,
                "{what}: normalize changed Envoy's JSON"
            );
            compared += 1;
        }
    }
    assert!(pods.len() >= 10, "only {} pods", pods.len());
    eprintln!(
        "[translate] Envoy printed {compared} resources of {} pods as fsm translate does",
        pods.len()
    );
}

#[test]
fn a_broken_set_is_refused_with_every_problem_named() {
    let work = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(repo_root().join("examples/demo")).expect("demo") {
        let path = entry.expect("entry").path();
        std::fs::copy(&path, work.path().join(path.file_name().expect("name"))).expect("copy");
    }
    std::fs::write(
        work.path().join("90-broken.yaml"),
        "apiVersion: policy.flomesh.io/v1alpha1\nkind: Retry\nmetadata: {name: r, namespace: demo}\nspec:\n  source: {kind: ServiceAccount, name: curl, namespace: demo}\n  destinations: [{kind: Service, name: httpbin, namespace: demo}]\n  retryPolicy: {retryOn: 5xx, numRetries: 3, perTryTimeout: forever}\n---\nkind: [not, a, kind]\n",
    )
    .expect("write");
    let dir = work.path().display().to_string();
    let out = fsm(&["translate", "-f", &dir, "--proxy", "demo/curl"]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("2 problem(s)"), "{err}");
    assert!(
        err.contains(
            "90-broken.yaml:1 (document 0) Retry demo/r: field spec.retryPolicy.perTryTimeout"
        ),
        "{err}"
    );
    assert!(err.contains("(document 1)"), "{err}");
    // Asking for what the data plane does not print is refused before reading anything.
    let out = fsm(&[
        "translate",
        "-f",
        &dir,
        "--data-plane",
        "fsm-sidecar",
        "-o",
        "bootstrap",
    ]);
    assert!(!out.status.success());
}

/// 1,000 services, each with one pod, in one namespace; the time of one proxy's translation.
#[test]
fn a_thousand_service_mesh_translates() {
    let work = tempfile::tempdir().expect("tempdir");
    let mut text = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: big, labels: {flomesh.io/monitored-by: fsm}}\n",
    );
    for i in 0..1000u32 {
        let (a, b) = (i / 250, i % 250 + 1);
        text.push_str(&format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: big}}\nspec: {{clusterIP: 10.96.{a}.{b}, selector: {{app: svc-{i}}}, ports: [{{name: http, port: 8080, appProtocol: http}}]}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {{name: svc-{i}, namespace: big, labels: {{app: svc-{i}, fsm-proxy-uuid: 00000000-0000-4000-8000-{i:012}}}}}\nspec: {{serviceAccountName: svc-{i}, containers: [{{name: app, ports: [{{containerPort: 8080}}]}}]}}\nstatus: {{podIP: 10.1.{a}.{b}}}\n---\napiVersion: v1\nkind: Endpoints\nmetadata: {{name: svc-{i}, namespace: big}}\nsubsets: [{{addresses: [{{ip: 10.1.{a}.{b}, targetRef: {{kind: Pod, name: svc-{i}, namespace: big}}}}], ports: [{{name: http, port: 8080}}]}}]\n"
        ));
    }
    std::fs::write(work.path().join("mesh.yaml"), text).expect("write");
    let dir = work.path().display().to_string();
    let started = Instant::now();
    let out = fsm(&[
        "translate",
        "-f",
        &dir,
        "--proxy",
        "big/svc-0",
        "--data-plane",
        "fsm-sidecar",
        "-o",
        "json",
    ]);
    let elapsed = started.elapsed();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert!(
        json["clusters"].as_array().map_or(0, Vec::len) >= 1000,
        "every service is a cluster of the permissive-mode proxy? {}",
        json["clusters"].as_array().map_or(0, Vec::len)
    );
    eprintln!(
        "[translate] 1,000 services, one proxy, fsm-sidecar JSON: {:.2} s (this build)",
        elapsed.as_secs_f64()
    );
}
