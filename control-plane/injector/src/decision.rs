//! Whether a pod gets a sidecar: FSM's injection rules (spec/mesh-core.md §8.5), all of which
//! must hold:
//!
//! 1. the pod's namespace is monitored by this mesh (label `flomesh.io/monitored-by=<mesh>`);
//! 2. the namespace is not ignored (label `flomesh.io/ignore=true`);
//! 3. the namespace does not carry label `name: <control-plane namespace>`;
//! 4. the pod does not use `hostNetwork`;
//! 5. the pod is annotated `flomesh.io/sidecar-injection=enabled`, or the namespace is and the
//!    pod is not annotated `disabled` (the pod's annotation wins; neither annotated: no sidecar).

use std::collections::BTreeMap;

use fsm_catalog::{MONITORED_BY_LABEL, SIDECAR_INJECTION_ANNOTATION};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// The label `fsm namespace ignore` puts on a namespace no mesh may touch.
pub const IGNORE_LABEL: &str = "flomesh.io/ignore";

/// What the injector decided for one pod, and why (the reason goes into the admission response's
/// audit annotations and the injector's log).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Inject,
    Skip(String),
}

/// FSM's decision for `pod` in the namespace described by `namespace` (its metadata), for the mesh
/// `mesh_name` whose control plane runs in `fsm_namespace`.
pub fn decide(mesh_name: &str, fsm_namespace: &str, namespace: &ObjectMeta, pod: &Pod) -> Decision {
    let empty = BTreeMap::new();
    let ns_name = namespace.name.as_deref().unwrap_or_default();
    let ns_labels = namespace.labels.as_ref().unwrap_or(&empty);
    let ns_annotations = namespace.annotations.as_ref().unwrap_or(&empty);
    let skip = |why: String| Decision::Skip(why);
    if ns_labels.get(MONITORED_BY_LABEL).map(String::as_str) != Some(mesh_name) {
        return skip(format!(
            "namespace {ns_name} is not monitored by mesh {mesh_name} (label {MONITORED_BY_LABEL})"
        ));
    }
    if ns_labels.get(IGNORE_LABEL).map(String::as_str) == Some("true") {
        return skip(format!(
            "namespace {ns_name} is ignored (label {IGNORE_LABEL}=true)"
        ));
    }
    if ns_labels.get("name").map(String::as_str) == Some(fsm_namespace) {
        return skip(format!(
            "namespace {ns_name} is labelled name={fsm_namespace}, the control plane's namespace"
        ));
    }
    if pod
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false)
    {
        return skip("the pod uses hostNetwork".into());
    }
    let pod_annotation = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(SIDECAR_INJECTION_ANNOTATION))
        .map(|v| v.to_ascii_lowercase());
    let ns_annotation = ns_annotations
        .get(SIDECAR_INJECTION_ANNOTATION)
        .map(|v| v.to_ascii_lowercase());
    match (pod_annotation.as_deref(), ns_annotation.as_deref()) {
        (Some("enabled"), _) => Decision::Inject,
        (Some("disabled"), _) => skip(format!(
            "the pod is annotated {SIDECAR_INJECTION_ANNOTATION}=disabled"
        )),
        (Some(other), _) => skip(format!(
            "the pod's annotation {SIDECAR_INJECTION_ANNOTATION}={other:?} is neither enabled nor disabled"
        )),
        (None, Some("enabled")) => Decision::Inject,
        (None, _) => skip(format!(
            "neither the pod nor namespace {ns_name} is annotated {SIDECAR_INJECTION_ANNOTATION}=enabled"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use test_case::test_case;

    fn namespace(labels: &[(&str, &str)], injection: Option<&str>) -> ObjectMeta {
        ObjectMeta {
            name: Some("app".into()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            annotations: injection.map(|v| {
                [(SIDECAR_INJECTION_ANNOTATION.to_string(), v.to_string())]
                    .into_iter()
                    .collect()
            }),
            ..Default::default()
        }
    }

    fn pod(injection: Option<&str>, host_network: bool) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "p",
                "annotations": injection.map(|v| serde_json::json!({SIDECAR_INJECTION_ANNOTATION: v})),
            },
            "spec": {"hostNetwork": host_network, "containers": [{"name": "app"}]},
        }))
        .expect("pod")
    }

    const MONITORED: (&str, &str) = (MONITORED_BY_LABEL, "fsm");

    // FSM's truth table: the pod's annotation wins; unset follows the namespace.
    #[test_case(&[MONITORED], Some("enabled"), None, false => true ; "namespace enabled")]
    #[test_case(&[MONITORED], Some("enabled"), Some("disabled"), false => false ; "pod disabled wins")]
    #[test_case(&[MONITORED], Some("disabled"), Some("enabled"), false => true ; "pod enabled wins")]
    #[test_case(&[MONITORED], None, Some("enabled"), false => true ; "pod enabled in unannotated namespace")]
    #[test_case(&[MONITORED], None, None, false => false ; "neither annotated")]
    #[test_case(&[MONITORED], Some("disabled"), None, false => false ; "namespace disabled")]
    #[test_case(&[MONITORED], Some("ENABLED"), None, false => true ; "values are case insensitive")]
    #[test_case(&[MONITORED], Some("enabled"), Some("yes"), false => false ; "unknown pod value")]
    #[test_case(&[], Some("enabled"), Some("enabled"), false => false ; "not monitored")]
    #[test_case(&[(MONITORED_BY_LABEL, "other")], Some("enabled"), Some("enabled"), false => false ; "another mesh")]
    #[test_case(&[MONITORED, (IGNORE_LABEL, "true")], Some("enabled"), Some("enabled"), false => false ; "ignored")]
    #[test_case(&[MONITORED, ("name", "fsm-system")], Some("enabled"), Some("enabled"), false => false ; "control plane namespace")]
    #[test_case(&[MONITORED, ("name", "app")], Some("enabled"), None, false => true ; "another name label")]
    #[test_case(&[MONITORED], Some("enabled"), Some("enabled"), true => false ; "host network")]
    fn follows_fsm_rules(
        ns_labels: &[(&str, &str)],
        ns_injection: Option<&str>,
        pod_injection: Option<&str>,
        host_network: bool,
    ) -> bool {
        let decision = decide(
            "fsm",
            "fsm-system",
            &namespace(ns_labels, ns_injection),
            &pod(pod_injection, host_network),
        );
        if let Decision::Skip(why) = &decision {
            assert!(!why.is_empty());
        }
        decision == Decision::Inject
    }
}
