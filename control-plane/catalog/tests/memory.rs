//! What the catalog keeps in memory per object, at the size issue 16 targets: 1,000 services and
//! 10,000 sidecar pods, each object shaped the way the API server delivers it.
//!
//! A counting global allocator (stats_alloc) makes this its own test binary: the figure is the bytes still
//! allocated once every object went through `Catalog::apply` and the inputs were dropped (what a
//! long-running controller holds), per stored object. Run with `--nocapture` to see the figures.

use std::alloc::System;

use fsm_catalog::{Catalog, CatalogEvent, CatalogSettings, Kind, MeshKind, MeshObject, Scope};
use k8s_openapi::api::core::v1::{Endpoints, Namespace, Pod, Service, ServiceAccount};
use serde_json::{Value, json};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Bytes allocated during `f` and still allocated after it (what `f` left behind).
fn kept_by(f: impl FnOnce()) -> usize {
    let region = Region::new(GLOBAL);
    f();
    let stats = region.change();
    // Growth by `realloc` is counted in `bytes_allocated`, shrinking in `bytes_deallocated`.
    stats
        .bytes_allocated
        .saturating_sub(stats.bytes_deallocated)
}

const NAMESPACES: usize = 10;
const SERVICES: usize = 1_000;
const PODS_PER_SERVICE: usize = 10;
/// The target of issue 16, point 4.
const TARGET_BYTES_PER_OBJECT: usize = 2048;

fn namespace_of(service: usize) -> String {
    format!("bookstore-{}", service % NAMESPACES)
}

fn service_name(service: usize) -> String {
    format!("svc-{service:04}")
}

fn pod_name(service: usize, replica: usize) -> String {
    format!("{}-v1-6c5d8f7b9d-{replica:05x}", service_name(service))
}

fn pod_ip(service: usize, replica: usize) -> String {
    let n = service * PODS_PER_SERVICE + replica;
    format!("10.{}.{}.{}", 1 + n / 65_536, (n / 256) % 256, n % 256)
}

fn uid(n: usize) -> String {
    format!("8d1f3c2a-{:04x}-4e5b-9a7c-{n:012x}", n % 65_536)
}

fn object<K: MeshKind>(value: Value) -> K {
    serde_json::from_value(value).expect("a well-formed generated object")
}

fn namespace(index: usize) -> Namespace {
    object(json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": format!("bookstore-{index}"),
            "uid": uid(900_000 + index),
            "resourceVersion": "1201",
            "creationTimestamp": "2026-12-06T10:00:00Z",
            "labels": {
                "flomesh.io/monitored-by": "fsm",
                "kubernetes.io/metadata.name": format!("bookstore-{index}"),
            },
            "annotations": {"flomesh.io/sidecar-injection": "enabled"},
        },
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"},
    }))
}

fn service_account(service: usize) -> ServiceAccount {
    object(json!({
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {
            "name": service_name(service),
            "namespace": namespace_of(service),
            "uid": uid(800_000 + service),
            "resourceVersion": "1302",
            "creationTimestamp": "2026-12-06T10:00:01Z",
        },
    }))
}

fn service(service: usize) -> Service {
    let name = service_name(service);
    object(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": namespace_of(service),
            "uid": uid(700_000 + service),
            "resourceVersion": "1403",
            "creationTimestamp": "2026-12-06T10:00:02Z",
            "labels": {"app": name},
        },
        "spec": {
            "type": "ClusterIP",
            "selector": {"app": name},
            "ports": [
                {"name": "http", "port": 8080, "targetPort": 8080, "protocol": "TCP"},
                {"name": "tcp-metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"},
            ],
            "clusterIP": format!("10.96.{}.{}", service / 256, service % 256),
            "clusterIPs": [format!("10.96.{}.{}", service / 256, service % 256)],
            "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack",
            "sessionAffinity": "None",
            "internalTrafficPolicy": "Cluster",
        },
        "status": {"loadBalancer": {}},
    }))
}

fn endpoints(service: usize) -> Endpoints {
    let namespace = namespace_of(service);
    let addresses: Vec<Value> = (0..PODS_PER_SERVICE)
        .map(|replica| {
            json!({
                "ip": pod_ip(service, replica),
                "nodeName": format!("node-{}", replica % 3),
                "targetRef": {
                    "kind": "Pod",
                    "namespace": namespace,
                    "name": pod_name(service, replica),
                    "uid": uid(service * PODS_PER_SERVICE + replica),
                },
            })
        })
        .collect();
    object(json!({
        "apiVersion": "v1",
        "kind": "Endpoints",
        "metadata": {
            "name": service_name(service),
            "namespace": namespace,
            "uid": uid(600_000 + service),
            "resourceVersion": "1504",
            "creationTimestamp": "2026-12-06T10:00:03Z",
            "labels": {"app": service_name(service)},
            "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2026-12-06T10:00:03Z"},
        },
        "subsets": [{
            "addresses": addresses,
            "ports": [
                {"name": "http", "port": 8080, "protocol": "TCP"},
                {"name": "tcp-metrics", "port": 9091, "protocol": "TCP"},
            ],
        }],
    }))
}

fn env(pairs: &[(&str, &str)]) -> Value {
    pairs
        .iter()
        .map(|(name, value)| json!({"name": name, "value": value}))
        .collect()
}

fn pod(service: usize, replica: usize) -> Pod {
    let n = service * PODS_PER_SERVICE + replica;
    let app = service_name(service);
    let name = pod_name(service, replica);
    let ip = pod_ip(service, replica);
    let resources = json!({
        "limits": {"cpu": "500m", "memory": "256Mi"},
        "requests": {"cpu": "100m", "memory": "64Mi"},
    });
    let token_mount = json!({
        "name": "kube-api-access-x2k4q",
        "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
        "readOnly": true,
    });
    let condition = |type_: &str| json!({"type": type_, "status": "True", "lastTransitionTime": "2026-12-06T10:00:09Z"});
    object(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "generateName": format!("{app}-v1-6c5d8f7b9d-"),
            "namespace": namespace_of(service),
            "uid": uid(n),
            "resourceVersion": format!("{}", 20_000 + n),
            "creationTimestamp": "2026-12-06T10:00:05Z",
            "labels": {
                "app": app,
                "version": "v1",
                "pod-template-hash": "6c5d8f7b9d",
                "fsm-proxy-uuid": uid(500_000 + n),
            },
            "annotations": {
                "prometheus.io/scrape": "true",
                "prometheus.io/port": "15010",
                "prometheus.io/path": "/stats/prometheus",
            },
            "ownerReferences": [{
                "apiVersion": "apps/v1",
                "kind": "ReplicaSet",
                "name": format!("{app}-v1-6c5d8f7b9d"),
                "uid": uid(400_000 + service),
                "controller": true,
                "blockOwnerDeletion": true,
            }],
        },
        "spec": {
            "serviceAccountName": app,
            "serviceAccount": app,
            "nodeName": format!("node-{}", replica % 3),
            "restartPolicy": "Always",
            "dnsPolicy": "ClusterFirst",
            "schedulerName": "default-scheduler",
            "terminationGracePeriodSeconds": 30,
            "containers": [
                {
                    "name": "app",
                    "image": format!("flomesh/bookstore:v0.{}", service % 7),
                    "imagePullPolicy": "IfNotPresent",
                    "command": ["/bookstore"],
                    "args": ["--port", "8080"],
                    "env": env(&[("IDENTITY", &app), ("PORT", "8080"), ("LOG_LEVEL", "info")]),
                    "ports": [
                        {"name": "web", "containerPort": 8080, "protocol": "TCP"},
                        {"name": "metrics", "containerPort": 9091, "protocol": "TCP"},
                    ],
                    "resources": resources,
                    "volumeMounts": [token_mount],
                    "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 5},
                    "terminationMessagePath": "/dev/termination-log",
                    "terminationMessagePolicy": "File",
                },
                {
                    "name": "sidecar",
                    "image": "flomesh/pipy:1.5.12",
                    "imagePullPolicy": "IfNotPresent",
                    "args": ["--admin-port=6060", "--log-level=error"],
                    "env": env(&[("POD_NAME", &name), ("POD_NAMESPACE", &namespace_of(service)), ("POD_IP", &ip)]),
                    "ports": [
                        {"name": "proxy-admin", "containerPort": 15000, "protocol": "TCP"},
                        {"name": "proxy-inbound", "containerPort": 15003, "protocol": "TCP"},
                        {"name": "proxy-metrics", "containerPort": 15010, "protocol": "TCP"},
                    ],
                    "resources": resources,
                    "volumeMounts": [token_mount, {"name": "sidecar-bootstrap", "mountPath": "/etc/fsm"}],
                    "securityContext": {"runAsUser": 1500, "allowPrivilegeEscalation": false},
                },
            ],
            "volumes": [
                {"name": "sidecar-bootstrap", "secret": {"secretName": format!("fsm-sidecar-bootstrap-{n}")}},
                {"name": "kube-api-access-x2k4q", "projected": {"sources": [
                    {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
                    {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                ]}},
            ],
            "tolerations": [
                {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
            ],
        },
        "status": {
            "phase": "Running",
            "hostIP": format!("192.168.0.{}", replica % 3),
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "startTime": "2026-12-06T10:00:06Z",
            "qosClass": "Burstable",
            "conditions": [
                condition("Initialized"),
                condition("Ready"),
                condition("ContainersReady"),
                condition("PodScheduled"),
            ],
            "containerStatuses": [
                {"name": "app", "ready": true, "restartCount": 0, "image": "flomesh/bookstore:v0.1",
                 "imageID": "docker.io/flomesh/bookstore@sha256:0123456789abcdef", "started": true,
                 "containerID": format!("containerd://{n:064x}"),
                 "state": {"running": {"startedAt": "2026-12-06T10:00:08Z"}}},
                {"name": "sidecar", "ready": true, "restartCount": 0, "image": "flomesh/pipy:1.5.12",
                 "imageID": "docker.io/flomesh/pipy@sha256:fedcba9876543210", "started": true,
                 "containerID": format!("containerd://{:064x}", n + 1_000_000),
                 "state": {"running": {"startedAt": "2026-12-06T10:00:07Z"}}},
            ],
        },
    }))
}

/// `object` as a relist delivers it again: a new resource version.
fn relisted<K: MeshKind>(mut object: K) -> MeshObject {
    object.meta_mut().resource_version = Some("999999".into());
    object.into_object()
}

/// Applies `count` objects made by `make`, one at a time (so only the catalog's copy stays; the
/// pending changes are taken, as the runner does after each batch), and returns the bytes the
/// catalog grew by.
fn apply_all<K: MeshKind>(catalog: &mut Catalog, count: usize, make: impl Fn(usize) -> K) -> usize {
    kept_by(|| {
        for i in 0..count {
            assert!(catalog.apply(make(i).into_object()), "object {i} is new");
            catalog.take_changes();
        }
    })
}

#[test]
fn catalog_bytes_per_object_at_1000_services_and_10000_pods() {
    let mut catalog = Catalog::new(CatalogSettings::default());
    let mut per_kind = vec![
        (
            Kind::Namespace,
            NAMESPACES,
            apply_all(&mut catalog, NAMESPACES, namespace),
        ),
        (
            Kind::ServiceAccount,
            SERVICES,
            apply_all(&mut catalog, SERVICES, service_account),
        ),
        (
            Kind::Service,
            SERVICES,
            apply_all(&mut catalog, SERVICES, service),
        ),
        (
            Kind::Endpoints,
            SERVICES,
            apply_all(&mut catalog, SERVICES, endpoints),
        ),
    ];
    per_kind.push((
        Kind::Pod,
        SERVICES * PODS_PER_SERVICE,
        apply_all(&mut catalog, SERVICES * PODS_PER_SERVICE, |n| {
            pod(n / PODS_PER_SERVICE, n % PODS_PER_SERVICE)
        }),
    ));
    let total: usize = per_kind.iter().map(|(_, _, bytes)| bytes).sum();
    let objects: usize = per_kind.iter().map(|(_, count, _)| count).sum();

    // The mesh is really there: every pod is a sidecar proxy the catalog resolves.
    assert_eq!(catalog.keys().count(), objects);
    assert_eq!(catalog.sidecar_proxies().len(), SERVICES * PODS_PER_SERVICE);

    for (kind, count, bytes) in &per_kind {
        println!(
            "catalog memory: {:<15} {count:>6} objects {:>12} bytes {:>6} bytes/object",
            kind.to_string(),
            bytes,
            bytes / count
        );
    }
    let per_object = total / objects;
    println!("catalog memory: total {objects} objects {total} bytes {per_object} bytes/object");
    assert!(per_object > 0, "the counting allocator saw the catalog");

    // A relist of every kind (what a watch's 410 Gone causes) delivers the same objects with new
    // resource versions, and pods with a new image tag: nothing the mesh reads, so no change. The
    // relist is buffered as records until it is complete.
    assert!(!catalog.handle(CatalogEvent::Init(Scope::All)));
    let buffered = kept_by(|| {
        let mut relist = |object: MeshObject| {
            assert!(!catalog.handle(CatalogEvent::InitApply(object)));
        };
        (0..NAMESPACES).for_each(|i| relist(relisted(namespace(i))));
        (0..SERVICES).for_each(|i| relist(relisted(service_account(i))));
        (0..SERVICES).for_each(|i| relist(relisted(service(i))));
        (0..SERVICES).for_each(|i| relist(relisted(endpoints(i))));
        for n in 0..SERVICES * PODS_PER_SERVICE {
            let mut pod = pod(n / PODS_PER_SERVICE, n % PODS_PER_SERVICE);
            if let Some(spec) = &mut pod.spec {
                spec.containers[0].image = Some("flomesh/bookstore:v1.0".into());
            }
            relist(relisted(pod));
        }
    });
    println!(
        "catalog memory: relist of every kind buffered {buffered} bytes, {} bytes/object",
        buffered / objects
    );
    assert!(
        !catalog.handle(CatalogEvent::InitDone(Scope::All)),
        "a relist of the same mesh changes nothing"
    );
    assert!(catalog.take_changes().is_empty());
    assert_eq!(catalog.keys().count(), objects);
    assert!(
        per_object <= TARGET_BYTES_PER_OBJECT,
        "{per_object} bytes per object, over the target of {TARGET_BYTES_PER_OBJECT}"
    );
}
