//! What the injector changes in a pod it injects, as one RFC 6902 JSON patch:
//!
//! - label `fsm-proxy-uuid`, a fresh UUID the injector generates (a value the user set is
//!   replaced: the proxy's identity must not be chosen by whoever writes the pod);
//! - the init container `fsm-init`, which runs the pod's interception rules
//!   ([`Interception::iptables_restore`]) with `NET_ADMIN` (privileged when MeshConfig
//!   `spec.sidecar.enablePrivilegedInitContainer`);
//! - the sidecar container (Envoy or fsm-sidecar, see [`SidecarClass`]) running as UID 1500 with
//!   the pod's bootstrap Secret `fsm-sidecar-bootstrap-<uuid>` mounted (the controller writes it
//!   once it sees the pod);
//! - the application containers' HTTP and TCP probes rewritten to the sidecar's probe ports
//!   ([`crate::probes`]), with `fsm-healthcheck` for TCP probes;
//! - Prometheus scrape annotations when the namespace has metrics enabled.
//!
//! The whole pod is rebuilt and each changed top-level field replaced, so the patch applies to
//! exactly the object it was computed from (kube-apiserver sends that object).

use std::collections::BTreeMap;

use fsm_catalog::{INIT_CONTAINER_NAME, PROXY_UUID_LABEL};
use fsm_crds::config::v1alpha3::MeshConfigSpec;
use fsm_errcode::ErrCode;
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, ObjectFieldSelector, Pod,
    SecretVolumeSource, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::{Value, json};

use crate::envoy::{EnvoyBootstrap, envoy_bootstrap};
use crate::interception::{Interception, InterceptionError, PROXY_UID};
use crate::probes::{HEALTHCHECK_CONTAINER_NAME, HEALTHCHECK_PORT, Probes, rewrite_probes};

/// Pod annotation choosing the sidecar (`envoy` or `fsm-sidecar`) over the injector's default.
pub const SIDECAR_CLASS_ANNOTATION: &str = "flomesh.io/sidecar-class";
/// Namespace annotation that turns on metrics scraping of its pods.
pub const METRICS_ANNOTATION: &str = "flomesh.io/metrics";
/// The injected sidecar container.
pub const SIDECAR_CONTAINER_NAME: &str = "sidecar";
/// The volume holding the pod's bootstrap credentials and where the sidecar finds them.
pub const BOOTSTRAP_VOLUME: &str = "fsm-sidecar-bootstrap";
pub const BOOTSTRAP_MOUNT_PATH: &str = "/etc/fsm/bootstrap";
/// The sidecar's metrics port (FSM: `prometheus.io/port: 15010`).
pub const METRICS_PORT: u16 = 15010;
/// The sidecar's admin port, on loopback only.
pub const ADMIN_PORT: u16 = 15000;
/// Where an Envoy sidecar's start-up command writes its SDS files.
const ENVOY_SDS_DIR: &str = "/tmp/fsm-sds";

/// Which data plane an injected pod runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SidecarClass {
    Envoy,
    FsmSidecar,
}

impl SidecarClass {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "envoy" => Some(SidecarClass::Envoy),
            "fsm-sidecar" => Some(SidecarClass::FsmSidecar),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SidecarClass::Envoy => "envoy",
            SidecarClass::FsmSidecar => "fsm-sidecar",
        }
    }
}

/// The injector's own settings (its command line).
#[derive(Clone, Debug)]
pub struct InjectorSettings {
    pub mesh_name: String,
    pub fsm_namespace: String,
    /// `host:port` of the controller's ADS server, as the sidecars reach it.
    pub ads_address: String,
    /// The DNS name the sidecars require in the ADS server's certificate.
    pub ads_server_name: String,
    pub init_image: String,
    pub envoy_image: String,
    pub fsm_sidecar_image: String,
    /// The sidecar of pods that do not choose one.
    pub default_class: SidecarClass,
}

/// Why a pod cannot be injected: the admission is refused with this message, naming the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InjectError {
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Interception(Vec<InterceptionError>),
    #[error(
        "metadata.annotations[\"{SIDECAR_CLASS_ANNOTATION}\"]: {0:?} is neither envoy nor fsm-sidecar"
    )]
    SidecarClass(String),
    #[error("spec.containers: the pod has no containers")]
    NoContainers,
    #[error("spec.containers[{index}]: the name {name:?} is the injector's; rename the container")]
    ReservedName { index: usize, name: String },
    #[error("{0}")]
    Probe(String),
}

/// The result of injecting one pod.
#[derive(Clone, Debug)]
pub struct Injection {
    /// RFC 6902 operations turning the pod as received into `pod`.
    pub patch: Vec<Value>,
    pub pod: Pod,
    pub class: SidecarClass,
}

/// Injects `pod` (in the namespace described by `namespace`) with the sidecar of proxy `uuid`.
pub fn inject(
    settings: &InjectorSettings,
    mesh: &MeshConfigSpec,
    namespace: &ObjectMeta,
    pod: &Pod,
    uuid: &str,
) -> Result<Injection, InjectError> {
    let empty = BTreeMap::new();
    let annotations = pod.metadata.annotations.as_ref().unwrap_or(&empty);
    // The pod's choice, else the mesh's (MeshConfig), else the injector's.
    let mesh_class =
        SidecarClass::parse(mesh.sidecar.sidecar_class.trim()).unwrap_or(settings.default_class);
    let class = match annotations.get(SIDECAR_CLASS_ANNOTATION) {
        Some(text) => SidecarClass::parse(text.trim())
            .ok_or_else(|| InjectError::SidecarClass(text.clone()))?,
        None => mesh_class,
    };
    let interception =
        Interception::for_pod(&mesh.traffic, annotations).map_err(InjectError::Interception)?;
    let mut spec = pod.spec.clone().unwrap_or_default();
    if spec.containers.is_empty() {
        return Err(InjectError::NoContainers);
    }
    let reserved = [
        SIDECAR_CONTAINER_NAME,
        INIT_CONTAINER_NAME,
        HEALTHCHECK_CONTAINER_NAME,
    ];
    for (index, c) in spec.containers.iter().enumerate() {
        if reserved.contains(&c.name.as_str()) {
            return Err(InjectError::ReservedName {
                index,
                name: c.name.clone(),
            });
        }
    }
    let probes = rewrite_probes(&mut spec.containers).map_err(InjectError::Probe)?;
    let namespace_name = pod
        .metadata
        .namespace
        .clone()
        .or_else(|| namespace.name.clone())
        .unwrap_or_default();
    let service_account = spec
        .service_account_name
        .clone()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".into());
    let node_id = format!("{uuid}.sidecar.{service_account}.{namespace_name}");

    spec.init_containers
        .get_or_insert_with(Vec::new)
        .retain(|c| c.name != INIT_CONTAINER_NAME);
    spec.init_containers
        .get_or_insert_with(Vec::new)
        .insert(0, init_container(settings, mesh, &interception));
    spec.containers.push(sidecar_container(
        settings,
        mesh,
        mesh_class,
        class,
        &node_id,
        &probes,
        workload_of(pod).as_ref(),
    ));
    if probes.needs_healthcheck() {
        spec.containers.push(healthcheck_container(settings));
    }
    let volumes = spec.volumes.get_or_insert_with(Vec::new);
    volumes.retain(|v| v.name != BOOTSTRAP_VOLUME);
    volumes.push(Volume {
        name: BOOTSTRAP_VOLUME.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(format!("fsm-sidecar-bootstrap-{uuid}")),
            ..Default::default()
        }),
        ..Default::default()
    });

    let mut metadata = pod.metadata.clone();
    metadata
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert(PROXY_UUID_LABEL.into(), uuid.into());
    let metrics_enabled = namespace
        .annotations
        .as_ref()
        .and_then(|a| a.get(METRICS_ANNOTATION))
        .is_some_and(|v| v.eq_ignore_ascii_case("enabled"));
    if metrics_enabled {
        let a = metadata.annotations.get_or_insert_with(BTreeMap::new);
        a.insert("prometheus.io/scrape".into(), "true".into());
        a.insert("prometheus.io/port".into(), METRICS_PORT.to_string());
        a.insert("prometheus.io/path".into(), "/stats/prometheus".into());
    }

    let mut injected = pod.clone();
    injected.metadata = metadata;
    injected.spec = Some(spec);
    let patch = diff_top_level(pod, &injected);
    Ok(Injection {
        patch,
        pod: injected,
        class,
    })
}

/// `replace` (or `add`) operations for each of `metadata.labels`, `metadata.annotations`,
/// `spec.initContainers`, `spec.containers` and `spec.volumes` that differ.
fn diff_top_level(before: &Pod, after: &Pod) -> Vec<Value> {
    let (b, a) = (
        serde_json::to_value(before).unwrap_or_default(),
        serde_json::to_value(after).unwrap_or_default(),
    );
    let mut ops = Vec::new();
    if b.get("spec").is_none() {
        ops.push(json!({"op": "add", "path": "/spec", "value": a["spec"]}));
    }
    for (parent, field) in [
        ("metadata", "labels"),
        ("metadata", "annotations"),
        ("spec", "initContainers"),
        ("spec", "containers"),
        ("spec", "volumes"),
    ] {
        if parent == "spec" && b.get("spec").is_none() {
            continue;
        }
        let old = b.get(parent).and_then(|p| p.get(field));
        let new = a.get(parent).and_then(|p| p.get(field));
        if old == new {
            continue;
        }
        let Some(new) = new else { continue };
        let op = if old.is_some() { "replace" } else { "add" };
        ops.push(json!({"op": op, "path": format!("/{parent}/{field}"), "value": new}));
    }
    ops
}

fn init_container(
    settings: &InjectorSettings,
    mesh: &MeshConfigSpec,
    interception: &Interception,
) -> Container {
    let privileged = mesh.sidecar.enable_privileged_init_container;
    Container {
        name: INIT_CONTAINER_NAME.into(),
        image: Some(settings.init_image.clone()),
        command: Some(vec!["/bin/sh".into(), "-c".into()]),
        // The rules go in as the script's standard input, so they are applied atomically.
        args: Some(vec![format!(
            "iptables-restore --noflush <<'EOF'\n{}EOF\n",
            interception.iptables_restore()
        )]),
        security_context: Some(SecurityContext {
            privileged: Some(privileged),
            capabilities: (!privileged).then(|| Capabilities {
                add: Some(vec!["NET_ADMIN".into()]),
                drop: None,
            }),
            run_as_non_root: Some(false),
            run_as_user: Some(0),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn downward(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                api_version: None,
            }),
            ..Default::default()
        }),
    }
}

/// The workload a pod belongs to, as FSM's metrics name it (`source_workload_kind`,
/// `source_workload_name`): its controller, with a Deployment's ReplicaSet (`<name>-<pod template
/// hash>`) named as the Deployment. None for a pod nothing owns.
pub fn workload_of(pod: &Pod) -> Option<(String, String)> {
    let owners = pod.metadata.owner_references.as_ref()?;
    let owner = owners
        .iter()
        .find(|o| o.controller == Some(true))
        .or_else(|| owners.first())?;
    let hash = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("pod-template-hash"));
    if owner.kind == "ReplicaSet" {
        let deployment = match hash {
            Some(hash) => owner.name.strip_suffix(&format!("-{hash}")),
            None => owner.name.rsplit_once('-').map(|(name, _)| name),
        };
        if let Some(deployment) = deployment.filter(|d| !d.is_empty()) {
            return Some(("Deployment".into(), deployment.into()));
        }
    }
    Some((owner.kind.clone(), owner.name.clone()))
}

/// MeshConfig `spec.sidecar.logLevel` as one of FSM's levels: FSM's default `error` when empty,
/// and when unknown (E1001: it cannot be set).
fn sidecar_level(configured: &str) -> crate::logging::FsmLevel {
    if configured.trim().is_empty() {
        return crate::logging::FsmLevel::Error;
    }
    configured.parse().unwrap_or_else(|why: String| {
        fsm_errcode::warn!(
            ErrCode::E1001,
            "MeshConfig spec.sidecar.logLevel: {why}; sidecars start at error"
        );
        crate::logging::FsmLevel::Error
    })
}

fn sidecar_container(
    settings: &InjectorSettings,
    mesh: &MeshConfigSpec,
    mesh_class: SidecarClass,
    class: SidecarClass,
    node_id: &str,
    probes: &Probes,
    workload: Option<&(String, String)>,
) -> Container {
    let mesh_image = mesh.sidecar.sidecar_image.trim();
    let level = sidecar_level(&mesh.sidecar.log_level);
    let mut env = vec![
        downward("POD_NAME", "metadata.name"),
        downward("POD_NAMESPACE", "metadata.namespace"),
        downward("POD_IP", "status.podIP"),
    ];
    let (image, command, args) = match class {
        SidecarClass::Envoy => {
            let files = envoy_bootstrap(&EnvoyBootstrap {
                node_id,
                ads_address: &settings.ads_address,
                ads_server_name: &settings.ads_server_name,
                credentials_dir: BOOTSTRAP_MOUNT_PATH,
                sds_dir: ENVOY_SDS_DIR,
                admin_port: ADMIN_PORT,
                metrics_port: METRICS_PORT,
                probes,
            });
            let value = |name: &str, value: String| EnvVar {
                name: name.into(),
                value: Some(value),
                value_from: None,
            };
            env.push(value("FSM_ENVOY_BOOTSTRAP", files.bootstrap));
            env.push(value("FSM_SDS_CERT", files.sds_cert));
            env.push(value("FSM_SDS_CA", files.sds_ca));
            // Envoy reloads certificates from files through file-based SDS only; the two SDS
            // files (which just name the mounted credentials) are written before it starts.
            let script = format!(
                "mkdir -p {ENVOY_SDS_DIR} && printf '%s' \"$FSM_SDS_CERT\" > {ENVOY_SDS_DIR}/cert.yaml && printf '%s' \"$FSM_SDS_CA\" > {ENVOY_SDS_DIR}/ca.yaml && exec envoy --config-yaml \"$FSM_ENVOY_BOOTSTRAP\" --log-level {}",
                level.envoy_level()
            );
            (
                settings.envoy_image.clone(),
                vec!["/bin/sh".to_string(), "-c".to_string()],
                vec![script],
            )
        }
        SidecarClass::FsmSidecar => (
            settings.fsm_sidecar_image.clone(),
            vec!["fsm-sidecar".to_string()],
            workload
                .iter()
                .flat_map(|(kind, name)| {
                    [
                        format!("--workload-kind={kind}"),
                        format!("--workload-name={name}"),
                    ]
                })
                .chain([
                    format!("--node-id={node_id}"),
                    format!("--ads={}", settings.ads_address),
                    format!("--ads-server-name={}", settings.ads_server_name),
                    format!("--bootstrap-dir={BOOTSTRAP_MOUNT_PATH}"),
                    "--transparent".into(),
                    format!("--admin=127.0.0.1:{ADMIN_PORT}"),
                    format!("--metrics=0.0.0.0:{METRICS_PORT}"),
                    format!("--log-level={}", level.sidecar_filter()),
                    format!("--probes={}", probes.to_json()),
                ])
                .collect(),
        ),
    };
    let image = match (class, mesh_image) {
        // MeshConfig's sidecarImage names the image of the mesh's sidecar class.
        (c, img) if !img.is_empty() && c == mesh_class => img.to_string(),
        _ => image,
    };
    let mut ports = vec![ContainerPort {
        name: Some("proxy-metrics".into()),
        container_port: i32::from(METRICS_PORT),
        ..Default::default()
    }];
    for port in probes.listen_ports() {
        ports.push(ContainerPort {
            container_port: i32::from(port),
            ..Default::default()
        });
    }
    Container {
        name: SIDECAR_CONTAINER_NAME.into(),
        image: Some(image),
        image_pull_policy: Some("IfNotPresent".into()),
        command: Some(command),
        args: Some(args),
        env: Some(env),
        ports: Some(ports),
        volume_mounts: Some(vec![VolumeMount {
            name: BOOTSTRAP_VOLUME.into(),
            mount_path: BOOTSTRAP_MOUNT_PATH.into(),
            read_only: Some(true),
            ..Default::default()
        }]),
        security_context: Some(SecurityContext {
            run_as_user: Some(i64::from(PROXY_UID)),
            run_as_group: Some(i64::from(PROXY_UID)),
            run_as_non_root: Some(true),
            allow_privilege_escalation: Some(false),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn healthcheck_container(settings: &InjectorSettings) -> Container {
    Container {
        name: HEALTHCHECK_CONTAINER_NAME.into(),
        image: Some(settings.fsm_sidecar_image.clone()),
        image_pull_policy: Some("IfNotPresent".into()),
        command: Some(vec!["fsm-healthcheck".into()]),
        args: Some(vec![format!("--listen=0.0.0.0:{HEALTHCHECK_PORT}")]),
        ports: Some(vec![ContainerPort {
            container_port: i32::from(HEALTHCHECK_PORT),
            ..Default::default()
        }]),
        security_context: Some(SecurityContext {
            run_as_user: Some(i64::from(PROXY_UID)),
            run_as_non_root: Some(true),
            allow_privilege_escalation: Some(false),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use fsm_crds::config::v1alpha3::MeshConfigSpec;

    pub(crate) fn settings() -> InjectorSettings {
        InjectorSettings {
            mesh_name: "fsm".into(),
            fsm_namespace: "fsm-system".into(),
            ads_address: "fsm-controller.fsm-system.svc.cluster.local:15128".into(),
            ads_server_name: "fsm-controller.fsm-system.svc.cluster.local".into(),
            init_image: "flomesh/fsm-init:test".into(),
            envoy_image: "envoyproxy/envoy:v1.40-latest".into(),
            fsm_sidecar_image: "flomesh/fsm-sidecar:test".into(),
            default_class: SidecarClass::Envoy,
        }
    }

    fn namespace(metrics: bool) -> ObjectMeta {
        ObjectMeta {
            name: Some("demo".into()),
            annotations: metrics.then(|| {
                [(METRICS_ANNOTATION.to_string(), "enabled".to_string())]
                    .into_iter()
                    .collect()
            }),
            ..Default::default()
        }
    }

    fn pod(annotations: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {
                "generateName": "curl-",
                "namespace": "demo",
                "labels": {"app": "curl", PROXY_UUID_LABEL: "chosen-by-the-user"},
                "annotations": annotations,
            },
            "spec": {
                "serviceAccountName": "curl",
                "containers": [{
                    "name": "curl",
                    "image": "curlimages/curl",
                    "livenessProbe": {"tcpSocket": {"port": 8080}},
                }],
            },
        }))
        .expect("pod")
    }

    /// Applies the injector's operations (add/replace of whole fields) the way kube-apiserver's
    /// JSON patch would.
    fn apply(pod: &Pod, patch: &[Value]) -> Pod {
        let mut v = serde_json::to_value(pod).expect("json");
        for op in patch {
            let path = op["path"].as_str().expect("path");
            let target = v.pointer_mut(path.rsplit_once('/').expect("parent").0);
            let (_, field) = path.rsplit_once('/').expect("field");
            match (op["op"].as_str(), target) {
                (Some("add" | "replace"), Some(parent)) => {
                    parent[field] = op["value"].clone();
                }
                (Some("add"), None) if path == "/spec" => v["spec"] = op["value"].clone(),
                other => panic!("cannot apply {op}: {other:?}"),
            }
        }
        serde_json::from_value(v).expect("pod")
    }

    #[test]
    fn an_fsm_sidecar_is_told_its_workload_as_fsm_metrics_name_it() {
        let owned = |kind: &str, name: &str, hash: Option<&str>| -> Pod {
            let mut p = pod(json!({SIDECAR_CLASS_ANNOTATION: "fsm-sidecar"}));
            p.metadata.owner_references = Some(vec![
                serde_json::from_value(json!({"apiVersion": "apps/v1", "kind": kind, "name": name,
                    "uid": "u", "controller": true}))
                .expect("owner"),
            ]);
            if let Some(hash) = hash {
                p.metadata
                    .labels
                    .get_or_insert_default()
                    .insert("pod-template-hash".into(), hash.into());
            }
            p
        };
        let workload = |p: &Pod| workload_of(p).map(|(k, n)| format!("{k}/{n}"));
        assert_eq!(
            workload(&owned(
                "ReplicaSet",
                "book-buyer-7c9f5f9cdf",
                Some("7c9f5f9cdf")
            )),
            Some("Deployment/book-buyer".into())
        );
        assert_eq!(
            workload(&owned("ReplicaSet", "web-abc12", None)),
            Some("Deployment/web".into())
        );
        assert_eq!(
            workload(&owned("StatefulSet", "db", None)),
            Some("StatefulSet/db".into())
        );
        assert_eq!(workload(&pod(json!({}))), None);
        let injection = inject(
            &settings(),
            &MeshConfigSpec::default(),
            &namespace(false),
            &owned("ReplicaSet", "curl-7c9f5f9cdf", Some("7c9f5f9cdf")),
            "u-1",
        )
        .expect("injects");
        let sidecar = injection
            .pod
            .spec
            .as_ref()
            .and_then(|s| {
                s.containers
                    .iter()
                    .find(|c| c.name == SIDECAR_CONTAINER_NAME)
            })
            .expect("sidecar");
        let args = sidecar.args.clone().unwrap_or_default();
        assert!(
            args.contains(&"--workload-kind=Deployment".to_string()),
            "{args:?}"
        );
        assert!(
            args.contains(&"--workload-name=curl".to_string()),
            "{args:?}"
        );
    }

    #[test]
    fn each_sidecar_starts_at_meshconfigs_sidecar_log_level_in_its_own_terms() {
        let command = |class: &str, level: &str| -> String {
            let mut mesh = MeshConfigSpec::default();
            mesh.sidecar.log_level = level.into();
            let injection = inject(
                &settings(),
                &mesh,
                &namespace(false),
                &pod(json!({SIDECAR_CLASS_ANNOTATION: class})),
                "u-1",
            )
            .expect("injects");
            let sidecar = injection
                .pod
                .spec
                .as_ref()
                .and_then(|s| {
                    s.containers
                        .iter()
                        .find(|c| c.name == SIDECAR_CONTAINER_NAME)
                })
                .expect("sidecar")
                .clone();
            sidecar.args.unwrap_or_default().join(" ")
        };
        let unknown_before = fsm_errcode::counted(ErrCode::E1001);
        for (level, envoy, fsm_sidecar) in [
            ("debug", "--log-level debug", "--log-level=debug"),
            ("Warn", "--log-level warning", "--log-level=warn"),
            ("fatal", "--log-level critical", "--log-level=error"),
            ("disabled", "--log-level off", "--log-level=off"),
            // FSM's default, and what an unknown level falls back to (logged, E1001).
            ("", "--log-level error", "--log-level=error"),
            ("verbose", "--log-level error", "--log-level=error"),
        ] {
            let envoy_command = command("envoy", level);
            assert!(envoy_command.contains(envoy), "{level}: {envoy_command}");
            let sidecar_command = command("fsm-sidecar", level);
            assert!(
                sidecar_command.contains(fsm_sidecar),
                "{level}: {sidecar_command}"
            );
        }
        // "verbose", once per sidecar class.
        assert!(fsm_errcode::counted(ErrCode::E1001) >= unknown_before + 2);
    }

    #[test]
    fn an_envoy_pod_gets_its_identity_init_rules_sidecar_probes_and_metrics() {
        let original = pod(json!({"flomesh.io/outbound-port-exclusion-list": "6379"}));
        let uuid = "6f0e0b8e-0000-4000-8000-000000000001";
        let injection = inject(
            &settings(),
            &MeshConfigSpec::default(),
            &namespace(true),
            &original,
            uuid,
        )
        .expect("injects");
        let pod = apply(&original, &injection.patch);
        assert_eq!(
            pod, injection.pod,
            "the patch makes exactly the injected pod"
        );
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        assert_eq!(
            labels[PROXY_UUID_LABEL], uuid,
            "the user's value is replaced"
        );
        let annotations = pod.metadata.annotations.clone().unwrap_or_default();
        assert_eq!(annotations["prometheus.io/port"], "15010");
        let spec = pod.spec.expect("spec");
        let init = &spec.init_containers.as_ref().expect("init")[0];
        assert_eq!(init.name, INIT_CONTAINER_NAME);
        let script = &init.args.as_ref().expect("args")[0];
        assert!(script.contains("iptables-restore --noflush"), "{script}");
        assert!(
            script.contains("6379"),
            "the pod's exclusion is in the rules: {script}"
        );
        let names: Vec<_> = spec.containers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            ["curl", SIDECAR_CONTAINER_NAME, HEALTHCHECK_CONTAINER_NAME]
        );
        let sidecar = &spec.containers[1];
        assert_eq!(
            sidecar.image.as_deref(),
            Some("envoyproxy/envoy:v1.40-latest")
        );
        let env = sidecar.env.clone().unwrap_or_default();
        let bootstrap = env
            .iter()
            .find(|e| e.name == "FSM_ENVOY_BOOTSTRAP")
            .and_then(|e| e.value.clone())
            .expect("bootstrap");
        assert!(bootstrap.contains(&format!("{uuid}.sidecar.curl.demo")));
        assert_eq!(
            sidecar
                .security_context
                .as_ref()
                .and_then(|s| s.run_as_user),
            Some(1500)
        );
        let volume = &spec.volumes.as_ref().expect("volumes")[0];
        assert_eq!(
            volume.secret.as_ref().and_then(|s| s.secret_name.clone()),
            Some(format!("fsm-sidecar-bootstrap-{uuid}"))
        );
        let probe = spec.containers[0].liveness_probe.as_ref().expect("probe");
        assert_eq!(
            probe.http_get.as_ref().map(|g| g.port.clone()),
            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(15904))
        );
    }

    #[test]
    fn meshconfig_chooses_the_sidecar_and_its_image_unless_the_pod_does() {
        let mut mesh = MeshConfigSpec::default();
        mesh.sidecar.sidecar_class = "fsm-sidecar".into();
        mesh.sidecar.sidecar_image = "registry.example/fsm-sidecar:1".into();
        let inject_with = |annotations: serde_json::Value| {
            inject(
                &settings(),
                &mesh,
                &namespace(false),
                &pod(annotations),
                "u",
            )
            .expect("injects")
        };
        let by_mesh = inject_with(json!({}));
        assert_eq!(by_mesh.class, SidecarClass::FsmSidecar);
        let sidecar = &by_mesh.pod.spec.as_ref().expect("spec").containers[1];
        assert_eq!(
            sidecar.image.as_deref(),
            Some("registry.example/fsm-sidecar:1")
        );
        let by_pod = inject_with(json!({SIDECAR_CLASS_ANNOTATION: "envoy"}));
        assert_eq!(by_pod.class, SidecarClass::Envoy);
        let sidecar = &by_pod.pod.spec.as_ref().expect("spec").containers[1];
        assert_eq!(
            sidecar.image.as_deref(),
            Some("envoyproxy/envoy:v1.40-latest"),
            "the mesh's image is for its own class"
        );
    }

    #[test]
    fn the_pod_chooses_fsm_sidecar_and_bad_input_is_named() {
        let original = pod(json!({SIDECAR_CLASS_ANNOTATION: "fsm-sidecar"}));
        let injection = inject(
            &settings(),
            &MeshConfigSpec::default(),
            &namespace(false),
            &original,
            "u",
        )
        .expect("injects");
        assert_eq!(injection.class, SidecarClass::FsmSidecar);
        let spec = injection.pod.spec.expect("spec");
        let args = spec.containers[1].args.clone().unwrap_or_default();
        assert!(
            args.contains(&"--node-id=u.sidecar.curl.demo".to_string()),
            "{args:?}"
        );
        assert!(args.contains(&"--transparent".to_string()));
        assert!(
            !injection
                .pod
                .metadata
                .annotations
                .unwrap_or_default()
                .contains_key("prometheus.io/port")
        );

        let err = |annotations: serde_json::Value| {
            inject(
                &settings(),
                &MeshConfigSpec::default(),
                &namespace(false),
                &pod(annotations),
                "u",
            )
            .expect_err("refused")
            .to_string()
        };
        assert_eq!(
            err(json!({SIDECAR_CLASS_ANNOTATION: "pipy"})),
            "metadata.annotations[\"flomesh.io/sidecar-class\"]: \"pipy\" is neither envoy nor fsm-sidecar"
        );
        assert!(
            err(json!({"flomesh.io/outbound-ip-range-exclusion-list": "10.0.0.0/40"}))
                .contains("flomesh.io/outbound-ip-range-exclusion-list"),
        );
        let mut named_sidecar = pod(json!({}));
        if let Some(spec) = named_sidecar.spec.as_mut() {
            spec.containers[0].name = SIDECAR_CONTAINER_NAME.into();
        }
        assert_eq!(
            inject(
                &settings(),
                &MeshConfigSpec::default(),
                &namespace(false),
                &named_sidecar,
                "u"
            )
            .expect_err("reserved")
            .to_string(),
            "spec.containers[0]: the name \"sidecar\" is the injector's; rename the container"
        );
    }
}
