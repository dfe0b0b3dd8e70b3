//! fsm-sidecar end to end: fsm-controller on a manifest directory, demo workloads on their own
//! loopback addresses and one fsm-sidecar per meshed pod, each started with nothing but its node
//! identity and the ADS address. Mirrors `mesh_e2e.rs` (the same mesh with Envoy sidecars), once
//! over state-of-the-world ADS and once over delta ADS, each on its own 127.0.<subnet>.x
//! addresses so both can run at the same time.
//!
//! Transparent mode: the same mesh in network namespaces with FSM's iptables rules, once with
//! fsm-sidecar and once with Envoy sidecars (same script, same assertions).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use fsm_catalog::CatalogSettings;
use fsm_integration_tests::{
    AdsMode, Controller, ControllerOptions, DemoMesh, FsmSidecar, MeshPod, Plane, SidecarConfig,
    backends_via, bootstrap_secrets, demo_manifests, edit_manifest, envoy_bootstrap, eventually,
    http_get_via, load_catalog, mesh_pods, start_controller, tcp_roundtrip,
};

const CDS: &str = "type.googleapis.com/fsm.dataplane.v1.Cluster";
const EDS: &str = "type.googleapis.com/fsm.dataplane.v1.ClusterLoadAssignment";
const LDS: &str = "type.googleapis.com/fsm.dataplane.v1.Listener";
const RDS: &str = "type.googleapis.com/fsm.dataplane.v1.RouteConfiguration";
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

/// The type versions fsm-sidecar reports in `/config_dump`.
async fn dump_version(sidecar: &FsmSidecar, type_url: &str) -> Result<String> {
    let dump = sidecar.config_dump().await?;
    dump["types"][type_url]["version"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("no {type_url} version in /config_dump: {dump}"))
}

/// The series of `metric` in a Prometheus text exposition: each one's labels and value.
fn series(text: &str, metric: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(metric)?.strip_prefix('{')?;
            let (labels, value) = rest.rsplit_once("} ")?;
            let value = value.trim().parse().ok()?;
            let mut map = BTreeMap::new();
            // Values here never contain `",`, so a plain split is a faithful parse.
            for pair in labels.split("\",") {
                let (name, quoted) = pair.split_once("=\"")?;
                map.insert(name.to_string(), quoted.trim_end_matches('"').to_string());
            }
            Some((map, value))
        })
        .collect()
}

/// `client`'s sidecar counted and timed successful requests to `server` with FSM's eight peer
/// labels, the kinds and names derived from the demo pods' owner references.
fn check_request_metrics(prom: &str, client: &MeshPod, server: &MeshPod) -> Result<()> {
    let expected: BTreeMap<String, String> = [
        ("source_kind", "Deployment"),
        ("source_name", "curl"),
        ("source_pod", client.name.as_str()),
        ("source_namespace", "demo"),
        ("destination_kind", "Deployment"),
        ("destination_name", server.name.as_str()),
        ("destination_pod", server.name.as_str()),
        ("destination_namespace", "demo"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    // Guards the expectations themselves: the demo's httpbin pods are named like their
    // Deployments, and a label must never be expected empty.
    ensure!(expected.values().all(|v| !v.is_empty()), "{expected:?}");
    let peers_match =
        |labels: &BTreeMap<String, String>| expected.iter().all(|(k, v)| labels.get(k) == Some(v));
    let total: f64 = series(prom, "fsm_request_total")
        .iter()
        .filter(|(labels, _)| {
            peers_match(labels) && labels.get("response_code").map(String::as_str) == Some("200")
        })
        .map(|(_, v)| v)
        .sum();
    ensure!(
        total >= 1.0,
        "no fsm_request_total{{{expected:?}, response_code=\"200\"}} on {}'s sidecar: {prom}",
        client.id()
    );
    let timed: f64 = series(prom, "fsm_request_duration_ms_bucket")
        .iter()
        .filter(|(labels, _)| {
            peers_match(labels)
                && !labels.contains_key("response_code")
                && labels.get("le").map(String::as_str) == Some("+Inf")
        })
        .map(|(_, v)| v)
        .sum();
    ensure!(
        timed >= 1.0,
        "no fsm_request_duration_ms_bucket{{{expected:?}, le=\"+Inf\"}} on {}'s sidecar: {prom}",
        client.id()
    );
    Ok(())
}

async fn run_mesh(mode: AdsMode, subnet: u8) -> Result<()> {
    // The test reads the controller's /debug endpoints.
    let mesh =
        DemoMesh::start_edited(subnet, fsm_integration_tests::mesh::enable_debug_server).await?;
    let sidecars = mesh.start_fsm_sidecars(mode, CONVERGE).await?;
    let mut result = check_mesh(
        mode,
        subnet,
        &mesh.controller,
        &mesh.manifests,
        &mesh.pods,
        &sidecars,
    )
    .await;
    if result.is_ok() {
        // The restart check takes the controller over (it kills it); the apps, the manifests
        // and the sidecars stay.
        result = check_control_plane_restart(
            mesh.controller,
            subnet,
            &mesh.manifests,
            &mesh.logs,
            &mesh.pods,
        )
        .await;
    }
    if result.is_err() {
        for (pod, sidecar) in &sidecars {
            eprintln!(
                "--- {} sidecar log:\n{}",
                pod.id(),
                sidecar.process.log_tail(20)
            );
        }
    }
    result
}

async fn check_mesh(
    mode: AdsMode,
    subnet: u8,
    controller: &Controller,
    manifests: &Path,
    pods: &[MeshPod],
    sidecars: &[(MeshPod, FsmSidecar)],
) -> Result<()> {
    let curl = pods
        .iter()
        .find(|p| p.name == "curl")
        .context("curl pod")?
        .clone();
    let sidecar = |name: &str| {
        sidecars
            .iter()
            .find(|(p, _)| p.name == name)
            .map(|(_, s)| s)
            .context("sidecar")
    };

    // 1. HTTP crosses client sidecar -> server sidecar -> app, round-robin over both versions.
    let seen = eventually(CONVERGE, || backends(curl.outbound_addr(), 6)).await?;
    ensure!(
        seen == BTreeSet::from(["httpbin-v1".into(), "httpbin-v2".into()]),
        "backends {seen:?}"
    );
    for name in ["httpbin-v1", "httpbin-v2"] {
        let served = sidecar(name)?
            .counter("cluster.demo/httpbin|14001|local.upstream_rq_total")
            .await?;
        ensure!(
            served > 0,
            "{name}'s sidecar forwarded no request to its app (local-cluster upstream_rq_total {served})"
        );
    }
    // An unknown Host is FSM's (and Envoy's) 404.
    let reply = http_get_via(curl.outbound_addr(), "nowhere.demo:80", "/get").await?;
    ensure!(reply.status == 404, "unknown host: {reply:?}");

    // 2. TCP through both sidecars (HTTP/2 CONNECT tunnel between them).
    let tcp_addr = SocketAddr::new(curl.ip, 9000);
    let echoed = eventually(CONVERGE, || tcp_roundtrip(tcp_addr, "ping")).await?;
    ensure!(echoed == "tcp-echo-1: ping", "echo {echoed:?}");

    // 3. Metrics with FSM's names and labels, on the metrics port and the admin port: the source
    //    is the curl sidecar's own pod and workload, the destination the pod that answered.
    let curl_sidecar = sidecar("curl")?;
    let prom = curl_sidecar.metrics_get("/stats/prometheus").await?;
    for server in pods.iter().filter(|p| p.name.starts_with("httpbin-")) {
        check_request_metrics(&prom, &curl, server)?;
    }
    let admin_prom = curl_sidecar.admin_get("/stats/prometheus").await?;
    ensure!(admin_prom.contains("sidecar_cluster_upstream_rq_xx{"));
    let httpbin_v1 = pods
        .iter()
        .find(|p| p.name == "httpbin-v1")
        .context("httpbin-v1 pod")?;
    check_request_metrics(&admin_prom, &curl, httpbin_v1)?;

    // 4. Each sidecar holds exactly the versions the controller reports as ACKed.
    for (pod, sc) in sidecars {
        let uuid = uuid_of(pod);
        eventually(CONVERGE, || async {
            let status = controller
                .debug_proxies()
                .await?
                .get(&uuid)
                .cloned()
                .context("proxy not in /debug/proxies")?;
            for type_url in [CDS, EDS, LDS, RDS] {
                let t = status
                    .types
                    .get(type_url)
                    .with_context(|| format!("{type_url} not tracked"))?;
                ensure!(t.is_in_sync(), "{} {type_url} not in sync: {t:?}", pod.id());
                let held = dump_version(sc, type_url).await?;
                ensure!(
                    Some(&held) == t.acked_version.as_ref(),
                    "{} {type_url}: sidecar holds {held:?}, controller saw ACK of {:?}",
                    pod.id(),
                    t.acked_version
                );
            }
            Ok(())
        })
        .await?;
    }

    // 5. Endpoint edits are followed: one version leaves, comes back.
    let httpbin_file = manifests.join("20-httpbin.yaml");
    let v1_line = V1_ENDPOINT.replace("127.0.10.", &format!("127.0.{subnet}."));
    let v2_line = V2_ENDPOINT.replace("127.0.10.", &format!("127.0.{subnet}."));
    for round in 0..4 {
        if round % 2 == 0 {
            edit_manifest(&httpbin_file, &v2_line, "")?;
        } else {
            edit_manifest(&httpbin_file, &v1_line, &format!("{v1_line}{v2_line}"))?;
        }
        let expected: BTreeSet<String> = if round % 2 == 0 {
            BTreeSet::from(["httpbin-v1".into()])
        } else {
            BTreeSet::from(["httpbin-v1".into(), "httpbin-v2".into()])
        };
        eventually(CONVERGE, || async {
            let seen = backends(curl.outbound_addr(), 6).await?;
            ensure!(seen == expected, "backends {seen:?}, want {expected:?}");
            Ok(())
        })
        .await
        .with_context(|| format!("[{mode:?}] endpoint edit round {round}"))?;
    }

    // 6. A removed service disappears from the sidecars: its TCP listener closes, its cluster
    //    leaves the config dump, and HTTP keeps working.
    std::fs::remove_file(manifests.join("30-tcp-echo.yaml"))?;
    eventually(CONVERGE, || async {
        match tcp_roundtrip(tcp_addr, "ping").await {
            Ok(reply) => bail!("tcp-echo still reachable: {reply:?}"),
            Err(_) => Ok(()),
        }
    })
    .await?;
    eventually(CONVERGE, || async {
        let dump = curl_sidecar.config_dump().await?;
        let names: Vec<String> = dump["types"][CDS]["resources"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["name"].as_str().map(str::to_string))
            .collect();
        ensure!(
            names.iter().any(|n| n == "demo/httpbin|14001"),
            "httpbin cluster missing: {names:?}"
        );
        ensure!(
            !names.iter().any(|n| n == "demo/tcp-echo|9000"),
            "tcp-echo cluster still there: {names:?}"
        );
        Ok(())
    })
    .await?;
    ensure!(!backends(curl.outbound_addr(), 2).await?.is_empty());

    // 7. MeshConfig spec.sidecar.logLevel is followed live (the Runtime resource): `debug`
    //    brings the sidecar's per-connection debug lines, `error` (the demo's) leaves none below
    //    error once the change is said.
    let mesh_file = manifests.join("00-mesh.yaml");
    let curl_log = || std::fs::read_to_string(curl_sidecar.process.log_path()).unwrap_or_default();
    edit_manifest(&mesh_file, "    logLevel: error\n", "    logLevel: debug\n")?;
    eventually(CONVERGE, || async {
        backends(curl.outbound_addr(), 1).await?;
        let log = curl_log();
        ensure!(
            log.lines()
                .any(|l| l.contains(" DEBUG ") && l.contains("connection accepted")),
            "no debug line after logLevel debug"
        );
        Ok(())
    })
    .await
    .with_context(|| format!("[{mode:?}] sidecar.logLevel debug was not followed"))?;
    edit_manifest(&mesh_file, "    logLevel: debug\n", "    logLevel: error\n")?;
    let said = eventually(CONVERGE, || async {
        let log = curl_log();
        log.rfind("log level set from MeshConfig spec.sidecar.logLevel")
            .filter(|at| {
                log[*at..]
                    .lines()
                    .next()
                    .is_some_and(|l| l.contains("to=error"))
            })
            .map(|at| at + 1)
            .context("no change to error said")
    })
    .await
    .with_context(|| format!("[{mode:?}] sidecar.logLevel error was not followed"))?;
    for _ in 0..3 {
        ensure!(!backends(curl.outbound_addr(), 2).await?.is_empty());
    }
    let after: String = curl_log()[said..]
        .lines()
        .skip(1)
        .collect::<Vec<_>>()
        .join("\n");
    ensure!(
        !after.contains(" INFO ") && !after.contains(" DEBUG "),
        "[{mode:?}] logged below error at sidecar.logLevel error:\n{after}"
    );

    // 8. Idle memory, for the record.
    for (pod, sc) in sidecars {
        if let Some(rss) = sc.rss_kib() {
            eprintln!("[{mode:?}] fsm-sidecar of {} VmRSS {rss} kB", pod.id());
        }
    }
    Ok(())
}

/// The control plane goes away: the sidecars keep serving their last config; it comes back on the
/// same address: they resume and follow changes again.
async fn check_control_plane_restart(
    mut controller: Controller,
    subnet: u8,
    manifests: &Path,
    logs: &Path,
    pods: &[MeshPod],
) -> Result<()> {
    let curl = pods.iter().find(|p| p.name == "curl").context("curl pod")?;
    let options = ControllerOptions {
        ads_addr: Some(controller.ads_addr),
        http_addr: Some(controller.http_addr),
        ..ControllerOptions::default()
    };
    controller.process.kill();
    let both = BTreeSet::from(["httpbin-v1".to_string(), "httpbin-v2".to_string()]);
    for _ in 0..3 {
        let seen = backends(curl.outbound_addr(), 6).await?;
        ensure!(seen == both, "without a control plane: {seen:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let controller = start_controller(manifests, logs, &options).await?;
    // Pods deleted meanwhile (tcp-echo) lost their bootstrap credentials with them: only the
    // pods still in the mesh can, and must, reconnect.
    let remaining: BTreeSet<String> =
        mesh_pods(&load_catalog(manifests, CatalogSettings::default())?)
            .into_iter()
            .map(|p| p.id())
            .collect();
    eventually(CONVERGE, || async {
        let proxies = controller.debug_proxies().await?;
        for pod in pods.iter().filter(|p| remaining.contains(&p.id())) {
            let connected = proxies
                .get(&uuid_of(pod))
                .map_or(0, |p| p.connected_streams);
            ensure!(connected == 1, "{} has {connected} streams", pod.id());
        }
        Ok(())
    })
    .await
    .context("sidecars did not reconnect")?;
    let v2_line = V2_ENDPOINT.replace("127.0.10.", &format!("127.0.{subnet}."));
    edit_manifest(&manifests.join("20-httpbin.yaml"), &v2_line, "")?;
    eventually(CONVERGE, || async {
        let seen = backends(curl.outbound_addr(), 6).await?;
        ensure!(
            seen == BTreeSet::from(["httpbin-v1".to_string()]),
            "after the restart: {seen:?}"
        );
        Ok(())
    })
    .await
    .context("a change after the restart was not followed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsm_sidecar_mesh_over_sotw_ads() {
    if let Err(err) = run_mesh(AdsMode::Sotw, 14).await {
        panic!("{err:#}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsm_sidecar_mesh_over_delta_ads() {
    if let Err(err) = run_mesh(AdsMode::Delta, 16).await {
        panic!("{err:#}");
    }
}

// === transparent mode ===

/// MeshConfig `outboundIPRangeExclusionList` of the test: httpbin-v1's pod address, which the
/// client then reaches without its own sidecar.
const OUTBOUND_IP_EXCLUSION: &str = "10.244.77.1/32";

/// A server outside the mesh (its own namespace on the bridge, no rules, no sidecar), which
/// the client reaches through its sidecar's egress passthrough (MeshConfig `enableEgress`).
const OUTSIDE: &str = "outside";
const OUTSIDE_LAST: u8 = 250;
const OUTSIDE_PORT: u16 = 9999;
/// A second TCP port of the outside server, which no Egress policy allows.
const OUTSIDE_OTHER_PORT: u16 = 9998;
/// The outside server's TLS port (`openssl s_server`), and the name its certificate has.
const OUTSIDE_TLS_PORT: u16 = 9443;
const OUTSIDE_TLS_NAME: &str = "outside.example";

/// Egress policies letting curl reach the outside server by address on one TCP port and by
/// server name on its TLS port, once passthrough is off.
fn egress_policies(outside_ip: &str) -> String {
    format!(
        r#"apiVersion: policy.flomesh.io/v1alpha1
kind: Egress
metadata: {{name: outside-tcp, namespace: demo}}
spec:
  sources: [{{kind: ServiceAccount, name: curl, namespace: demo}}]
  ipAddresses: [{outside_ip}/32]
  ports: [{{number: {OUTSIDE_PORT}, protocol: tcp}}]
---
apiVersion: policy.flomesh.io/v1alpha1
kind: Egress
metadata: {{name: outside-tls, namespace: demo}}
spec:
  sources: [{{kind: ServiceAccount, name: curl, namespace: demo}}]
  hosts: [{OUTSIDE_TLS_NAME}]
  ports: [{{number: {OUTSIDE_TLS_PORT}, protocol: https}}]
"#
    )
}

/// The name the ingress controller's certificate carries, which the IngressBackend admits.
const INGRESS_PRINCIPAL: &str = "ingress.example";

/// An IngressBackend admitting TLS to httpbin's port from clients whose certificate (from the
/// mesh CA) names [`INGRESS_PRINCIPAL`].
fn https_ingress_backend() -> String {
    format!(
        r#"apiVersion: policy.flomesh.io/v1alpha1
kind: IngressBackend
metadata: {{name: httpbin-tls, namespace: demo}}
spec:
  backends: [{{name: httpbin, port: {{number: 14001, protocol: https}}}}]
  sources: [{{kind: AuthenticatedPrincipal, name: {INGRESS_PRINCIPAL}}}]
"#
    )
}

/// The name of a certificate admitted from the outside host's address only.
const GATEWAY_PRINCIPAL: &str = "gateway.example";

/// An IngressBackend admitting TLS to httpbin's port from clients whose certificate names
/// [`GATEWAY_PRINCIPAL`] and whose address is the outside host's: both must hold.
fn https_ingress_by_name_and_address() -> String {
    format!(
        r#"apiVersion: policy.flomesh.io/v1alpha1
kind: IngressBackend
metadata: {{name: httpbin-gateway, namespace: demo}}
spec:
  backends: [{{name: httpbin, port: {{number: 14001, protocol: https}}}}]
  sources:
  - {{kind: AuthenticatedPrincipal, name: {GATEWAY_PRINCIPAL}}}
  - {{kind: IPRange, name: 10.244.{POD_SUBNET}.{OUTSIDE_LAST}/32}}
"#
    )
}

/// A client certificate and key signed by the mesh's root (`ca`, the manifest-mode root file
/// holding certificate and key), with DNS SAN `name`, written to `dir` as `<name>.crt`/`.key`.
fn client_certificate(ca: &Path, dir: &Path, name: &str) -> Result<(PathBuf, PathBuf)> {
    let (crt, key, csr, ext) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
        dir.join(format!("{name}.csr")),
        dir.join(format!("{name}.ext")),
    );
    std::fs::write(
        &ext,
        format!("subjectAltName=DNS:{name}\nextendedKeyUsage=clientAuth\n"),
    )?;
    sh(&format!(
        "set -e
         openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN={name} -keyout {key} -out {csr} 2>&1
         openssl x509 -req -in {csr} -CA {ca} -CAkey {ca} -set_serial 7 -days 1 -extfile {ext} -out {crt} 2>&1",
        key = key.display(),
        csr = csr.display(),
        ca = ca.display(),
        ext = ext.display(),
        crt = crt.display(),
    ))?;
    Ok((crt, key))
}

/// The first line of the reply to `GET /get` with Host `httpbin.demo:14001`, sent over TLS from
/// inside `ns` with the client certificate `cert` (none: `None`).
fn https_in(ns: &str, addr: &str, cert: Option<&(PathBuf, PathBuf)>) -> Result<String> {
    let client_cert = cert.map_or(String::new(), |(crt, key)| {
        format!("-cert {} -key {}", crt.display(), key.display())
    });
    let out = sh(&format!(
        "ip netns exec {ns} timeout 5 bash -c 'printf \"GET /get HTTP/1.1\\r\\nHost: httpbin.demo:14001\\r\\nConnection: close\\r\\n\\r\\n\" | openssl s_client -connect {addr} {client_cert} -quiet 2>/dev/null | head -1'"
    ))?;
    Ok(out.trim_end().to_string())
}

/// The `fsm-init` rules of a pod of the test's mesh, from the generator the injector uses
/// (FSM's program with the MeshConfig's exclusions; the demo's pods have no annotations).
fn init_rules(catalog: &fsm_catalog::Catalog) -> Result<String> {
    let interception = fsm_injector::Interception::for_pod(
        &catalog.mesh_config().spec.traffic,
        &std::collections::BTreeMap::new(),
    )
    .map_err(|errors| anyhow::anyhow!("{errors:?}"))?;
    Ok(interception.iptables_restore())
}

/// A counter from a sidecar's admin `/stats` in `ns`, 0 when absent.
fn stat_in(ns: &str, name: &str) -> Result<u64> {
    let stats = http_in(ns, "127.0.0.1:15000", "admin", "/stats")?;
    Ok(fsm_integration_tests::stats_counter(&stats, name))
}

/// The proxy UID FSM's rules exclude from redirection.
const PROXY_UID: &str = "1500";
const PROXY_UID_NUM: u32 = 1500;
/// Pod addresses on the test's private bridge: 10.244.<POD_SUBNET>.x.
const POD_SUBNET: u8 = 77;

fn sh(script: &str) -> Result<String> {
    let out = std::process::Command::new("bash")
        .args(["-c", script])
        .output()
        .context("running bash")?;
    ensure!(
        out.status.success(),
        "{script}\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Network namespaces named `<prefix>-*`, deleted (with their veths) on drop.
struct Netns {
    prefix: String,
    names: Vec<String>,
}

impl Netns {
    fn ns(&self, pod: &str) -> String {
        format!("{}-{pod}", self.prefix)
    }

    /// A "node" namespace holding a bridge, and one namespace per pod with a veth to it, the
    /// pod address on eth0 and FSM's iptables rules.
    /// `outside`: namespaces on the same bridge without the rules (servers outside the mesh).
    fn create(
        prefix: &str,
        pods: &[(&str, u8)],
        outside: &[(&str, u8)],
        init_rules: &str,
    ) -> Result<Netns> {
        let mut netns = Netns {
            prefix: prefix.to_string(),
            names: Vec::new(),
        };
        let rules_file = tempfile::NamedTempFile::new()?;
        std::fs::write(rules_file.path(), init_rules)?;
        let rules = rules_file.path();
        let node = netns.ns("node");
        sh(&format!("ip netns add {node}"))?;
        netns.names.push(node.clone());
        sh(&format!(
            "ip -n {node} link set lo up && ip -n {node} link add br0 type bridge && ip -n {node} link set br0 up"
        ))?;
        let meshed = pods.iter().map(|p| (p, true));
        for ((pod, last), intercepted) in meshed.chain(outside.iter().map(|p| (p, false))) {
            let ns = netns.ns(pod);
            sh(&format!("ip netns add {ns}"))?;
            netns.names.push(ns.clone());
            sh(&format!(
                "set -e
                 ip -n {ns} link set lo up
                 ip -n {node} link add b{last} type veth peer name e{last}
                 ip -n {node} link set e{last} netns {ns}
                 ip -n {node} link set b{last} master br0 up
                 ip -n {ns} link set e{last} name eth0
                 ip -n {ns} addr add 10.244.{POD_SUBNET}.{last}/24 dev eth0
                 ip -n {ns} link set eth0 up
                 ip -n {ns} route add default dev eth0
                 {restore}",
                restore = if intercepted {
                    format!(
                        "ip netns exec {ns} iptables-restore --noflush {}",
                        rules.display()
                    )
                } else {
                    String::new()
                }
            ))?;
        }
        Ok(netns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for name in self.names.iter().rev() {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", name])
                .status();
        }
    }
}

/// Why this machine cannot run the namespace test, if it cannot.
fn transparent_unsupported() -> Option<String> {
    for tool in ["ip", "iptables", "setpriv", "bash", "openssl"] {
        let found = std::process::Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return Some(format!("{tool} is not installed"));
        }
    }
    let probe = format!("fsmprobe{}", std::process::id());
    match sh(&format!(
        "ip netns add {probe} && ip netns exec {probe} iptables -t nat -L -n >/dev/null; r=$?; ip netns del {probe}; exit $r"
    )) {
        Ok(_) => None,
        Err(e) => Some(format!(
            "the kernel refuses network namespaces or iptables: {e:#}"
        )),
    }
}

/// One plain HTTP/1.1 GET from inside `ns`, as an unmodified application would send it, with
/// bash's `/dev/tcp` so the test needs no HTTP client in the namespace.
fn http_in(ns: &str, addr: &str, host: &str, path: &str) -> Result<String> {
    let (ip, port) = addr.split_once(':').context("ip:port")?;
    sh(&format!(
        "ip netns exec {ns} timeout 5 bash -c 'exec 3<>/dev/tcp/{ip}/{port} && printf \"GET {path} HTTP/1.1\\r\\nHost: {host}\\r\\nConnection: close\\r\\n\\r\\n\" >&3 && cat <&3'"
    ))
}

/// The first line of the reply to `GET /` over TLS from inside `ns`, with `server_name` as the
/// ClientHello's SNI (the server's certificate is not checked: the test asks whether the
/// handshake goes through the client's sidecar untouched, not whom to trust).
fn tls_in(ns: &str, ip: &str, port: u16, server_name: &str) -> Result<String> {
    let out = sh(&format!(
        "ip netns exec {ns} timeout 5 bash -c 'printf \"GET / HTTP/1.0\\r\\n\\r\\n\" | openssl s_client -connect {ip}:{port} -servername {server_name} -quiet 2>/dev/null | head -1'"
    ))?;
    Ok(out.trim_end().to_string())
}

fn tcp_in(ns: &str, ip: &str, port: u16, line: &str) -> Result<String> {
    let out = sh(&format!(
        "ip netns exec {ns} timeout 5 bash -c 'exec 3<>/dev/tcp/{ip}/{port} && echo {line} >&3 && head -1 <&3'"
    ))?;
    Ok(out.trim_end().to_string())
}

/// The sidecar of `pod` in its namespace `ns`, running as the proxy UID (so its own connections
/// are not redirected), with the pod's bootstrap credentials in `credentials` (readable by that
/// UID, as an injector's Secret volume is).
fn transparent_sidecar(
    plane: Plane,
    pod: &MeshPod,
    ns: &str,
    credentials: &Path,
) -> Result<std::process::Command> {
    let mut sidecar = std::process::Command::new("ip");
    sidecar
        .args(["netns", "exec", ns, "setpriv", "--reuid", PROXY_UID])
        .args(["--regid", PROXY_UID, "--clear-groups"]);
    match plane {
        Plane::FsmSidecar => {
            sidecar
                .arg(fsm_integration_tests::binary("fsm-sidecar")?)
                .arg("--transparent")
                .arg("--node-id")
                .arg(pod.node_id().context("node id")?)
                .args(["--ads", "127.0.0.1:15128", "--bootstrap-dir"])
                .arg(credentials)
                .arg("--pod-ip")
                .arg(pod.ip.to_string())
                .args(["--pod-name", &pod.name]);
        }
        Plane::Envoy => {
            // The bootstrap a sidecar of this pod gets, beside its credentials: the pod's own
            // namespace gives it the same admin and ADS addresses as every other pod.
            let config = SidecarConfig {
                name: pod.name.clone(),
                node_id: pod.node_id().context("node id")?,
                node_cluster: pod.node_cluster(),
                admin: "127.0.0.1:15000".parse()?,
                ads: "127.0.0.1:15128".parse()?,
                ads_replicas: Vec::new(),
                ads_mode: AdsMode::Sotw,
                bootstrap_dir: credentials.to_path_buf(),
            };
            let mut files: Vec<(String, String)> = bootstrap_secrets(&config).into();
            files.push((
                "bootstrap.yaml".into(),
                envoy_bootstrap(&config, credentials),
            ));
            for (name, text) in files {
                let path = credentials.join(name);
                std::fs::write(&path, text)?;
                std::os::unix::fs::chown(&path, Some(PROXY_UID_NUM), Some(PROXY_UID_NUM))?;
            }
            sidecar
                .arg(fsm_integration_tests::envoy_binary()?)
                .arg("--config-path")
                .arg(credentials.join("bootstrap.yaml"))
                .args(["--disable-hot-restart", "--concurrency", "1"])
                .arg("--reject-unknown-dynamic-fields");
        }
    }
    Ok(sidecar)
}

async fn run_transparent(plane: Plane) -> Result<()> {
    let work = tempfile::tempdir()?;
    let logs = work.path().join("logs");
    std::fs::create_dir_all(&logs)?;
    let manifests = demo_manifests(&work.path().join("manifests"), 10)?;
    // Pods on the bridge instead of loopback; httpbin-v2 gets no namespace, so it leaves.
    let httpbin = manifests.join("20-httpbin.yaml");
    edit_manifest(&httpbin, V2_ENDPOINT, "")?;
    for file in std::fs::read_dir(&manifests)? {
        let path = file?.path();
        let text = std::fs::read_to_string(&path)?;
        // Every pod runs fsm-init (the test installs its rules): the proxies take redirected
        // connections.
        std::fs::write(
            &path,
            text.replace("127.0.10.", &format!("10.244.{POD_SUBNET}."))
                .replace("localProxyMode: PodIP", "localProxyMode: Localhost")
                .replace(
                    "  containers:\n",
                    &format!(
                        "  initContainers: [{{name: {}}}]\n  containers:\n",
                        fsm_catalog::INIT_CONTAINER_NAME
                    ),
                ),
        )?;
    }
    let mesh_config = manifests.join("00-mesh.yaml");
    let text = std::fs::read_to_string(&mesh_config)?;
    std::fs::write(
        &mesh_config,
        text.replacen(
            "  traffic:\n",
            &format!("  traffic:\n    outboundIPRangeExclusionList: [{OUTBOUND_IP_EXCLUSION}]\n"),
            1,
        )
        .replace("enableEgress: false", "enableEgress: true"),
    )?;
    let catalog = load_catalog(&manifests, CatalogSettings::default())?;
    ensure!(
        catalog
            .mesh_config()
            .spec
            .traffic
            .outbound_ip_range_exclusion_list
            == [OUTBOUND_IP_EXCLUSION],
        "the MeshConfig edit did not take"
    );
    let pods: Vec<MeshPod> = mesh_pods(&catalog)
        .into_iter()
        .filter(|p| p.node_id().is_some() && p.name != "httpbin-v2")
        .collect();
    let layout: Vec<(String, u8)> = pods
        .iter()
        .map(|p| {
            let last = p.ip.to_string().rsplit('.').next()?.parse().ok()?;
            Some((p.name.clone(), last))
        })
        .collect::<Option<_>>()
        .context("pod addresses")?;
    let layout_refs: Vec<(&str, u8)> = layout.iter().map(|(n, l)| (n.as_str(), *l)).collect();
    let netns = Netns::create(
        &format!("fsmt{}", std::process::id() % 100_000),
        &layout_refs,
        &[(OUTSIDE, OUTSIDE_LAST)],
        &init_rules(&catalog)?,
    )?;

    let mut processes = Vec::new();
    let mut outside = std::process::Command::new("ip");
    outside
        .args(["netns", "exec", &netns.ns(OUTSIDE)])
        .arg(fsm_integration_tests::binary("fsm-demo-app")?)
        .args(["--name", OUTSIDE, "--tcp"])
        .arg(format!("0.0.0.0:{OUTSIDE_PORT}"))
        .arg("--tcp")
        .arg(format!("0.0.0.0:{OUTSIDE_OTHER_PORT}"));
    processes.push(fsm_integration_tests::ManagedProcess::spawn(
        "app-outside",
        outside,
        &logs,
    )?);
    let tls = work.path().join("outside-tls");
    std::fs::create_dir_all(&tls)?;
    let (cert, key) = (tls.join("tls.crt"), tls.join("tls.key"));
    sh(&format!(
        "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 -subj /CN={OUTSIDE_TLS_NAME} -keyout {} -out {} 2>&1",
        key.display(),
        cert.display()
    ))?;
    let mut tls_server = std::process::Command::new("ip");
    tls_server
        .args([
            "netns",
            "exec",
            &netns.ns(OUTSIDE),
            "openssl",
            "s_server",
            "-www",
        ])
        .arg("-accept")
        .arg(OUTSIDE_TLS_PORT.to_string())
        .arg("-cert")
        .arg(&cert)
        .arg("-key")
        .arg(&key);
    processes.push(fsm_integration_tests::ManagedProcess::spawn(
        "tls-outside",
        tls_server,
        &logs,
    )?);
    for pod in &pods {
        let ns = netns.ns(&pod.name);
        // Each pod namespace has its own controller on its loopback: the same manifests give
        // the same configuration, and ADS never leaves 127.0.0.1.
        // They share one root CA file, so every pod trusts every other pod's certificates.
        let bootstrap = logs.join(format!("bootstrap-{}", pod.name));
        let mut controller = std::process::Command::new("ip");
        controller
            .args(["netns", "exec", &ns])
            .arg(fsm_integration_tests::binary("fsm-controller")?)
            .arg("--manifest-dir")
            .arg(&manifests)
            .arg("--state-dir")
            .arg(logs.join("state"))
            .arg("--bootstrap-dir")
            .arg(&bootstrap)
            .args([
                "--ads-listen",
                "127.0.0.1:15128",
                "--http-listen",
                "127.0.0.1:9091",
            ]);
        processes.push(fsm_integration_tests::ManagedProcess::spawn(
            &format!("controller-{}", pod.name),
            controller,
            &logs,
        )?);
        if !pod.ports.is_empty() {
            let mut app = std::process::Command::new("ip");
            app.args(["netns", "exec", &ns])
                .arg(fsm_integration_tests::binary("fsm-demo-app")?)
                .arg("--name")
                .arg(&pod.name);
            for port in &pod.ports {
                let flag = match port.protocol {
                    fsm_integration_tests::AppProtocol::Http => "--http",
                    fsm_integration_tests::AppProtocol::Tcp => "--tcp",
                };
                // As in a real pod: the application listens on all addresses and its sidecar
                // reaches it on localhost (FSM's default localProxyMode).
                app.arg(flag).arg(format!("0.0.0.0:{}", port.port));
            }
            processes.push(fsm_integration_tests::ManagedProcess::spawn(
                &format!("app-{}", pod.name),
                app,
                &logs,
            )?);
        }
        // The sidecar runs as the proxy UID, so its own connections are not redirected. Like an
        // injector's Secret volume, its bootstrap credentials are readable by that UID.
        let written = bootstrap.join(&pod.namespace).join(&pod.name);
        fsm_integration_tests::controller::wait_for_bootstrap(&written, CONVERGE).await?;
        let credentials = logs.join(format!("credentials-{}", pod.name));
        std::fs::create_dir_all(&credentials)?;
        for file in ["ca.crt", "tls.crt", "tls.key"] {
            std::fs::copy(written.join(file), credentials.join(file))?;
            std::os::unix::fs::chown(
                credentials.join(file),
                Some(PROXY_UID_NUM),
                Some(PROXY_UID_NUM),
            )?;
        }
        processes.push(fsm_integration_tests::ManagedProcess::spawn(
            &format!("{plane:?}-{}", pod.name),
            transparent_sidecar(plane, pod, &ns, &credentials)?,
            &logs,
        )?);
    }
    let dump_logs = |processes: &mut Vec<fsm_integration_tests::ManagedProcess>| {
        for p in processes.iter_mut() {
            eprintln!("--- {}:\n{}", p.name(), p.log_tail(15));
        }
    };
    let result = async {
        for pod in &pods {
            let ns = netns.ns(&pod.name);
            eventually(CONVERGE, || async {
                let ready = http_in(&ns, "127.0.0.1:15000", "admin", "/ready")?;
                ensure!(ready.starts_with("HTTP/1.1 200"), "{ready}");
                Ok(())
            })
            .await
            .with_context(|| format!("sidecar of {} never ready", pod.id()))?;
        }
        let curl = netns.ns("curl");
        // The application addresses the service's cluster IP and port, nothing else: iptables
        // hands the connection to the sidecar, which routes it by its original destination.
        let reply = eventually(CONVERGE, || async {
            let reply = http_in(&curl, "10.96.0.10:14001", "httpbin.demo:14001", "/get")?;
            ensure!(reply.starts_with("HTTP/1.1 200"), "{reply}");
            Ok(reply)
        })
        .await?;
        ensure!(
            reply
                .to_ascii_lowercase()
                .contains("x-served-by: httpbin-v1"),
            "{reply}"
        );
        // The server sidecar intercepted the inbound connection and forwarded to its app.
        let stats = http_in(
            &netns.ns("httpbin-v1"),
            "127.0.0.1:15000",
            "admin",
            "/stats?filter=upstream_rq_total",
        )?;
        ensure!(
            stats.contains("cluster.demo/httpbin|14001|local.upstream_rq_total: "),
            "{stats}"
        );
        // TCP to the other service's cluster IP, tunnelled between the two sidecars.
        let echoed = eventually(CONVERGE, || async {
            tcp_in(&curl, "10.96.0.20", 9000, "transparent")
        })
        .await?;
        ensure!(echoed == "tcp-echo-1: transparent", "{echoed:?}");

        // Egress passthrough: TCP to an address outside the mesh goes through the client's
        // sidecar (redirected, its catch-all chain) to where it was going, its original
        // destination.
        // fsm-sidecar counts each TCP connection as a request, Envoy as a connection.
        let passthrough = match plane {
            Plane::Envoy => "cluster.passthrough-outbound.upstream_cx_total",
            Plane::FsmSidecar => "cluster.passthrough-outbound.upstream_rq_total",
        };
        let before = stat_in(&curl, passthrough)?;
        let outside_ip = format!("10.244.{POD_SUBNET}.{OUTSIDE_LAST}");
        let echoed = eventually(CONVERGE, || async {
            tcp_in(&curl, &outside_ip, OUTSIDE_PORT, "egress")
        })
        .await?;
        ensure!(echoed == "outside: egress", "{echoed:?}");
        ensure!(
            stat_in(&curl, passthrough)? > before,
            "the connection to {outside_ip} did not go through the sidecar's passthrough"
        );

        // The excluded address bypasses the client's sidecar (its outbound counter stays put)
        // but is still intercepted by the server's sidecar on the way in, which refuses it: a
        // meshed inbound port takes mTLS only, and this request is plaintext.
        const CLIENT_COUNTER: &str = "cluster.demo/httpbin|14001.upstream_rq_total";
        const SERVER_COUNTER: &str = "cluster.demo/httpbin|14001|local.upstream_rq_total";
        let server = netns.ns("httpbin-v1");
        let (client_before, server_before) = (
            stat_in(&curl, CLIENT_COUNTER)?,
            stat_in(&server, SERVER_COUNTER)?,
        );
        ensure!(
            client_before > 0,
            "the client sidecar counted no request to httpbin yet"
        );
        let direct =
            http_in(&curl, "10.244.77.1:14001", "httpbin.demo:14001", "/get").unwrap_or_default();
        ensure!(
            !direct.starts_with("HTTP/"),
            "plaintext reached a meshed inbound port: {direct}"
        );
        ensure!(
            stat_in(&curl, CLIENT_COUNTER)? == client_before,
            "a request to an excluded address went through the client sidecar"
        );
        ensure!(
            stat_in(&server, SERVER_COUNTER)? == server_before,
            "the server sidecar forwarded a plaintext request to its app"
        );
        // Nothing plaintext is reachable from outside the pod: the client's outbound port,
        // asked by a host outside the mesh to send a request as the client, is redirected to
        // the inbound port like every connection from outside, which takes mTLS only.
        let curl_ip = pods
            .iter()
            .find(|p| p.name == "curl")
            .context("curl pod")?
            .ip;
        let borrowed = http_in(
            &netns.ns(OUTSIDE),
            &format!("{curl_ip}:15001"),
            "httpbin.demo:14001",
            "/get",
        )
        .unwrap_or_default();
        ensure!(
            !borrowed.starts_with("HTTP/"),
            "the client's outbound port served a request from outside the pod: {borrowed}"
        );

        // Egress policies, passthrough off: the outside server is reachable only where a
        // policy allows, by address for TCP and by server name for TLS (not terminated: the
        // handshake is between the client and the outside server).
        std::fs::write(
            manifests.join("70-egress.yaml"),
            egress_policies(&outside_ip),
        )?;
        let mesh_text = std::fs::read_to_string(&mesh_config)?;
        std::fs::write(
            &mesh_config,
            mesh_text.replace("enableEgress: true", "enableEgress: false"),
        )?;
        eventually(CONVERGE, || async {
            let refused = tcp_in(&curl, &outside_ip, OUTSIDE_OTHER_PORT, "no policy");
            ensure!(
                refused.is_err() || refused.as_ref().is_ok_and(String::is_empty),
                "passthrough still on: {refused:?}"
            );
            Ok(())
        })
        .await?;
        let echoed = eventually(CONVERGE, || async {
            tcp_in(&curl, &outside_ip, OUTSIDE_PORT, "policy")
        })
        .await?;
        ensure!(echoed == "outside: policy", "{echoed:?}");
        let page = eventually(CONVERGE, || async {
            let line = tls_in(&curl, &outside_ip, OUTSIDE_TLS_PORT, OUTSIDE_TLS_NAME)?;
            ensure!(line.starts_with("HTTP/1.0 200"), "{line:?}");
            Ok(line)
        })
        .await
        .context("TLS by an allowed server name")?;
        ensure!(page.starts_with("HTTP/1.0 200"), "{page:?}");
        let other =
            tls_in(&curl, &outside_ip, OUTSIDE_TLS_PORT, "other.example").unwrap_or_default();
        ensure!(
            other.is_empty(),
            "TLS with a server name no policy allows got through: {other:?}"
        );

        // HTTPS ingress: a client outside the mesh whose certificate (from the mesh CA) names
        // the IngressBackend's AuthenticatedPrincipal reaches httpbin's port over TLS; before
        // the policy, and with a certificate naming anything else, it does not.
        let ca = logs.join("state").join("fsm-ca-bundle.pem");
        let ingress_cert = client_certificate(&ca, work.path(), INGRESS_PRINCIPAL)?;
        let stranger_cert = client_certificate(&ca, work.path(), "stranger.example")?;
        let outside = netns.ns(OUTSIDE);
        let httpbin_port = format!("10.244.{POD_SUBNET}.1:14001");
        let before = https_in(&outside, &httpbin_port, Some(&ingress_cert)).unwrap_or_default();
        ensure!(
            !before.starts_with("HTTP/"),
            "TLS ingress admitted without an IngressBackend: {before:?}"
        );
        std::fs::write(
            manifests.join("71-https-ingress.yaml"),
            https_ingress_backend(),
        )?;
        let admitted = eventually(CONVERGE, || async {
            let line = https_in(&outside, &httpbin_port, Some(&ingress_cert))?;
            ensure!(line.starts_with("HTTP/1.1 200"), "{line:?}");
            Ok(line)
        })
        .await
        .context("HTTPS ingress with the admitted certificate name")?;
        ensure!(admitted.starts_with("HTTP/1.1 200"), "{admitted:?}");
        for (who, cert) in [
            ("a certificate naming someone else", Some(&stranger_cert)),
            ("no certificate", None),
        ] {
            let line = https_in(&outside, &httpbin_port, cert).unwrap_or_default();
            ensure!(
                !line.starts_with("HTTP/1.1 200"),
                "TLS ingress with {who} was admitted: {line:?}"
            );
        }
        // Plaintext ingress to the same port, from the outside host's address, beside TLS.
        let plain = || http_in(&outside, &httpbin_port, "httpbin.demo:14001", "/get");
        ensure!(
            !plain().unwrap_or_default().starts_with("HTTP/"),
            "plaintext ingress admitted without an IngressBackend"
        );
        std::fs::write(
            manifests.join("72-plaintext-ingress.yaml"),
            format!(
                "apiVersion: policy.flomesh.io/v1alpha1\nkind: IngressBackend\nmetadata: {{name: httpbin-plain, namespace: demo}}\nspec:\n  backends: [{{name: httpbin, port: {{number: 14001, protocol: http}}}}]\n  sources: [{{kind: IPRange, name: 10.244.{POD_SUBNET}.{OUTSIDE_LAST}/32}}]\n"
            ),
        )?;
        eventually(CONVERGE, || async {
            let reply = plain()?;
            ensure!(reply.starts_with("HTTP/1.1 200"), "{reply}");
            Ok(())
        })
        .await
        .context("plaintext ingress beside TLS ingress on one port")?;
        let tls_still = https_in(&outside, &httpbin_port, Some(&ingress_cert))?;
        ensure!(tls_still.starts_with("HTTP/1.1 200"), "{tls_still:?}");

        // TLS without client certificates (skipClientCertValidation) from the outside host's
        // address only: curl's pod (its connection to httpbin's pod address is excluded from
        // its own sidecar, so it arrives from its address, without a certificate) is refused.
        std::fs::write(
            manifests.join("73-https-unchecked.yaml"),
            format!(
                "apiVersion: policy.flomesh.io/v1alpha1\nkind: IngressBackend\nmetadata: {{name: httpbin-unchecked, namespace: demo}}\nspec:\n  backends: [{{name: httpbin, port: {{number: 14001, protocol: https}}, tls: {{skipClientCertValidation: true}}}}]\n  sources: [{{kind: IPRange, name: 10.244.{POD_SUBNET}.{OUTSIDE_LAST}/32}}]\n"
            ),
        )?;
        eventually(CONVERGE, || async {
            let line = https_in(&outside, &httpbin_port, None)?;
            ensure!(line.starts_with("HTTP/1.1 200"), "{line:?}");
            Ok(())
        })
        .await
        .context("TLS ingress without a client certificate from an admitted address")?;
        let from_curl = https_in(&curl, &httpbin_port, None).unwrap_or_default();
        ensure!(
            !from_curl.starts_with("HTTP/1.1 200"),
            "TLS without a certificate from an address no source names was admitted: {from_curl:?}"
        );

        // A certificate name admitted from some addresses only (FSM's set-up for an ingress
        // controller: its Service and its certificate's name): the outside host is admitted
        // with that certificate, curl's pod with the same certificate is not. The policy above,
        // which admits the outside host without a certificate, goes first.
        std::fs::remove_file(manifests.join("73-https-unchecked.yaml"))?;
        let gateway_cert = client_certificate(&ca, work.path(), GATEWAY_PRINCIPAL)?;
        let from_outside = || https_in(&outside, &httpbin_port, Some(&gateway_cert));
        eventually(CONVERGE, || async {
            let line = from_outside().unwrap_or_default();
            ensure!(!line.starts_with("HTTP/1.1 200"), "{line:?}");
            Ok(())
        })
        .await
        .context("a certificate no policy names, once no policy admits its address either")?;
        std::fs::write(
            manifests.join("74-https-by-name-and-address.yaml"),
            https_ingress_by_name_and_address(),
        )?;
        eventually(CONVERGE, || async {
            let line = from_outside()?;
            ensure!(line.starts_with("HTTP/1.1 200"), "{line:?}");
            Ok(())
        })
        .await
        .context("TLS ingress with an admitted name from an admitted address")?;
        let from_curl = https_in(&curl, &httpbin_port, Some(&gateway_cert)).unwrap_or_default();
        ensure!(
            !from_curl.starts_with("HTTP/1.1 200"),
            "an admitted certificate name from an address no source names was admitted: {from_curl:?}"
        );
        anyhow::Ok(())
    }
    .await;
    if result.is_err() {
        dump_logs(&mut processes);
        if plane == Plane::Envoy {
            // Where the client's connections went: its listeners and their chain misses.
            let curl = netns.ns("curl");
            for path in ["/listeners", "/stats?filter=no_filter_chain_match"] {
                eprintln!(
                    "--- curl's Envoy {path}:\n{}",
                    http_in(&curl, "127.0.0.1:15000", "admin", path).unwrap_or_default()
                );
            }
        }
    }
    drop(processes);
    drop(netns);
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transparent_mode_in_network_namespaces_on_each_data_plane() {
    if let Some(why) = transparent_unsupported() {
        eprintln!("SKIPPED transparent_mode_in_network_namespaces_on_each_data_plane: {why}");
        return;
    }
    for plane in [Plane::Envoy, Plane::FsmSidecar] {
        if let Err(err) = run_transparent(plane).await {
            panic!("{plane:?}: {err:#}");
        }
    }
}
