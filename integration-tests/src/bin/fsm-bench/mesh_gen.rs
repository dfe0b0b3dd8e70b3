//! Generated manifests: the large synthetic mesh of `controller-memory` and the demo mesh plus
//! bench pods and services of the data-plane benches.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use anyhow::Result;
use fsm_integration_tests::demo_manifests;
use serde_json::{Value, json};

/// Objects of a large synthetic mesh: 10 monitored namespaces, `services` services with
/// `pods_per_service` pods each (and their Endpoints), addresses in 10.0.0.0/8 (never contacted).
pub(crate) fn synthetic_mesh(services: usize, pods_per_service: usize) -> Vec<Value> {
    let namespaces = 10.min(services.max(1));
    let mut objects = vec![
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "fsm-system"}}),
        json!({"apiVersion": "config.flomesh.io/v1alpha3", "kind": "MeshConfig",
               "metadata": {"name": "fsm-mesh-config", "namespace": "fsm-system"},
               "spec": {"traffic": {"enablePermissiveTrafficPolicyMode": true}}}),
    ];
    for n in 0..namespaces {
        objects.push(json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": format!("bench-{n}"), "labels": {"flomesh.io/monitored-by": "fsm"}}}));
    }
    let mut pod_index: u32 = 0;
    for s in 0..services {
        let namespace = format!("bench-{}", s % namespaces);
        let name = format!("svc-{s}");
        objects.push(json!({"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": name, "namespace": namespace}}));
        objects.push(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"selector": {"app": name},
                     "ports": [{"name": "http", "port": 8080, "appProtocol": "http"}]}}));
        let mut addresses = Vec::new();
        for p in 0..pods_per_service {
            pod_index += 1;
            let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + pod_index));
            let pod = format!("{name}-{p}");
            objects.push(json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": pod, "namespace": namespace,
                             "labels": {"app": name, "fsm-proxy-uuid": format!("00000000-0000-4000-8000-{pod_index:012x}")}},
                "spec": {"serviceAccountName": name,
                         "containers": [{"name": "app", "image": "bench/app:1",
                                         "ports": [{"name": "http", "containerPort": 8080}]}]},
                "status": {"phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}]}}));
            addresses.push(json!({"ip": ip.to_string(),
                "targetRef": {"kind": "Pod", "name": pod, "namespace": namespace}}));
        }
        objects.push(json!({"apiVersion": "v1", "kind": "Endpoints",
            "metadata": {"name": name, "namespace": namespace},
            "subsets": [{"addresses": addresses, "ports": [{"name": "http", "port": 8080}]}]}));
    }
    objects
}

/// Pod address of Envoy's client in the data-plane benches (`curl` in the demo mesh).
pub(crate) const CLIENT: &str = "curl";
/// A second pod of the same service account, for the fsm-sidecar: same identity, same config.
pub(crate) const CLIENT_FSM: &str = "curl-fsm";
/// The service account of both meshed app pods: one identity, so the same inbound config.
pub(crate) const APP_ACCOUNT: &str = "bench-app";
/// The meshed app behind an Envoy sidecar (Service and Pod of that name, .20).
pub(crate) const SERVER: &str = "bench-app-envoy";
/// The meshed app behind an fsm-sidecar (Service and Pod of that name, .21).
pub(crate) const SERVER_FSM: &str = "bench-app-fsm";
pub(crate) const APP_PORT: u16 = 14001;

/// The Host a client asks its sidecar for to reach `service`.
pub(crate) fn app_host(service: &str) -> String {
    format!("{service}.demo:{APP_PORT}")
}

pub(crate) fn to_yaml_docs(objects: &[Value]) -> String {
    // JSON is YAML; one document per object.
    objects
        .iter()
        .map(Value::to_string)
        .collect::<Vec<_>>()
        .join("\n---\n")
}

/// The demo mesh on 127.0.`subnet`.x, plus: a second `curl` pod (`curl-fsm`, .11) with its own
/// proxy UUID; two meshed HTTP Services in `demo`, `bench-app-envoy` (pod .20) and `bench-app-fsm`
/// (pod .21), one pod each of the service account `bench-app`, so each client sidecar reaches its
/// own kind of server sidecar over mTLS and the app behind it (the bench serves the app on
/// `<pod>:14001`); and `services` extra HTTP services in the monitored namespace `bench`, one
/// pod each on 127.0.`subnet + 1 + i / 250`.x, where nothing listens.
pub(crate) fn bench_manifests(dir: &Path, subnet: u8, services: usize) -> Result<()> {
    demo_manifests(dir, subnet)?;
    // The benches read the controller's /debug endpoints.
    fsm_integration_tests::mesh::enable_debug_server(dir)?;
    let ip = |third: usize, fourth: usize| format!("127.0.{third}.{fourth}");
    let mut objects = vec![
        json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": CLIENT_FSM, "namespace": "demo",
                         "labels": {"app": CLIENT, "fsm-proxy-uuid": "6a1f3c2e-1b7d-4c1e-9a3f-0c5d2e8b7a11"}},
            "spec": {"serviceAccountName": CLIENT, "containers": [{"name": "curl", "image": "curlimages/curl"}]},
            "status": {"podIP": ip(subnet.into(), 11)}}),
        json!({"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": APP_ACCOUNT, "namespace": "demo"}}),
    ];
    for (name, last, uuid) in [
        (SERVER, 20, "6a1f3c2e-1b7d-4c1e-9a3f-0c5d2e8b7a20"),
        (SERVER_FSM, 21, "6a1f3c2e-1b7d-4c1e-9a3f-0c5d2e8b7a21"),
    ] {
        let pod_ip = ip(subnet.into(), last);
        objects.push(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "demo"},
            "spec": {"selector": {"app": name},
                     "ports": [{"name": "http", "port": APP_PORT, "targetPort": APP_PORT, "appProtocol": "http"}]}}));
        objects.push(json!({"apiVersion": "v1", "kind": "Endpoints",
            "metadata": {"name": name, "namespace": "demo"},
            "subsets": [{"addresses": [{"ip": pod_ip,
                                        "targetRef": {"kind": "Pod", "name": name, "namespace": "demo"}}],
                         "ports": [{"name": "http", "port": APP_PORT}]}]}));
        objects.push(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "demo",
                         "labels": {"app": name, "fsm-proxy-uuid": uuid}},
            "spec": {"serviceAccountName": APP_ACCOUNT,
                     "containers": [{"name": "app", "image": "bench/app:1",
                                     "ports": [{"name": "http", "containerPort": APP_PORT}]}]},
            "status": {"phase": "Running", "podIP": pod_ip}}));
    }
    if services > 0 {
        objects.push(json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "bench", "labels": {"flomesh.io/monitored-by": "fsm"}}}));
    }
    for s in 0..services {
        let name = format!("svc-{s}");
        let pod_ip = ip(usize::from(subnet) + 1 + s / 250, 1 + s % 250);
        objects.push(json!({"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": name, "namespace": "bench"}}));
        objects.push(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "bench"},
            "spec": {"selector": {"app": name},
                     "ports": [{"name": "http", "port": 8080, "appProtocol": "http"}]}}));
        objects.push(json!({"apiVersion": "v1", "kind": "Endpoints",
            "metadata": {"name": name, "namespace": "bench"},
            "subsets": [{"addresses": [{"ip": pod_ip,
                                        "targetRef": {"kind": "Pod", "name": format!("{name}-0"), "namespace": "bench"}}],
                         "ports": [{"name": "http", "port": 8080}]}]}));
        objects.push(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("{name}-0"), "namespace": "bench",
                         "labels": {"app": name, "fsm-proxy-uuid": format!("00000000-0000-4000-8000-{s:012x}")}},
            "spec": {"serviceAccountName": name,
                     "containers": [{"name": "app", "image": "bench/app:1",
                                     "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"phase": "Running", "podIP": pod_ip}}));
    }
    std::fs::write(dir.join("50-bench.yaml"), to_yaml_docs(&objects))?;
    Ok(())
}
