//! The generated schemas are ones a real API server accepts and enforces: structural, typed
//! everywhere, closed sets as `enum`, and with defaults that agree with the Rust `Default`s.

use fsm_crds::all_crds;
use fsm_crds::config::v1alpha3::{MeshConfig, MeshConfigSpec};
use kube::CustomResourceExt;
use serde_json::{Value, json};

fn mesh_config_schema() -> Value {
    let crd = all_crds()
        .into_iter()
        .find(|c| c.spec.names.kind == "MeshConfig")
        .expect("MeshConfig CRD");
    let schema = crd.spec.versions[0]
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .expect("schema");
    serde_json::to_value(schema).expect("schema JSON")
}

fn at<'a>(schema: &'a Value, path: &[&str]) -> &'a Value {
    path.iter().fold(schema, |node, key| {
        node.pointer(&format!("/properties/{key}"))
            .unwrap_or_else(|| panic!("no {key} in {path:?}"))
    })
}

#[test]
fn enable_egress_is_a_boolean() {
    let schema = mesh_config_schema();
    assert_eq!(
        at(&schema, &["spec", "traffic", "enableEgress"])["type"],
        "boolean"
    );
    assert_eq!(
        at(
            &schema,
            &["spec", "traffic", "enablePermissiveTrafficPolicyMode"]
        )["type"],
        "boolean"
    );
    let ports = at(&schema, &["spec", "traffic", "outboundPortExclusionList"]);
    assert_eq!(ports["type"], "array");
    assert_eq!(ports["items"]["type"], "integer");
    assert_eq!(ports["items"]["minimum"], 1.0);
    assert_eq!(ports["items"]["maximum"], 65535.0);
    assert_eq!(
        at(&schema, &["spec", "observability", "fsmLogLevel"])["enum"],
        json!([
            "trace", "debug", "info", "warn", "error", "fatal", "panic", "disabled"
        ])
    );
}

/// The API server's structural defaulting (apiextensions-apiserver `structuraldefaulting`):
/// fill absent properties from `default`, then recurse, including into what was just filled.
fn apply_defaults(value: &mut Value, schema: &Value) {
    let (Value::Object(obj), Some(Value::Object(props))) = (value, schema.get("properties")) else {
        return;
    };
    for (name, prop) in props {
        if !obj.contains_key(name)
            && let Some(default) = prop.get("default")
        {
            obj.insert(name.clone(), default.clone());
        }
    }
    for (name, v) in obj.iter_mut() {
        if let Some(prop) = props.get(name) {
            apply_defaults(v, prop);
        }
    }
}

#[test]
fn api_server_defaults_equal_rust_defaults() {
    let schema = mesh_config_schema();
    for mut object in [
        json!({}),
        json!({"spec": {}}),
        json!({"spec": {"traffic": {}, "observability": {"tracing": {}}}}),
    ] {
        apply_defaults(&mut object, &schema);
        let defaulted: MeshConfigSpec =
            serde_json::from_value(object["spec"].clone()).expect("defaulted spec");
        assert_eq!(defaulted, MeshConfigSpec::default());
        // Every default is spelled out, not left to serde.
        let serialized = serde_json::to_value(MeshConfigSpec::default()).expect("serialize");
        assert_eq!(object["spec"], serialized);
    }
}

/// Rules from "Specifying a structural schema" in the Kubernetes CRD docs, for the subset of
/// schema features our types produce.
fn assert_structural(node: &Value, path: &str) {
    let obj = node
        .as_object()
        .unwrap_or_else(|| panic!("{path}: not an object"));
    for banned in [
        "$ref",
        "definitions",
        "$schema",
        "oneOf",
        "anyOf",
        "allOf",
        "not",
    ] {
        assert!(!obj.contains_key(banned), "{path}: has {banned}");
    }
    let preserves = obj.get("x-kubernetes-preserve-unknown-fields") == Some(&json!(true));
    let int_or_string = obj.get("x-kubernetes-int-or-string") == Some(&json!(true));
    assert!(
        obj.contains_key("type") || preserves || int_or_string,
        "{path}: no type"
    );
    if let Some(Value::Array(values)) = obj.get("enum") {
        assert!(!values.contains(&Value::Null), "{path}: null in enum");
    }
    if let Some(Value::Object(props)) = obj.get("properties") {
        for (name, prop) in props {
            assert_structural(prop, &format!("{path}.{name}"));
        }
    }
    if let Some(items) = obj.get("items") {
        assert_structural(items, &format!("{path}[]"));
    }
    if let Some(extra @ Value::Object(_)) = obj.get("additionalProperties") {
        assert_structural(extra, &format!("{path}{{}}"));
    }
}

#[test]
fn every_schema_is_structural() {
    let crds = all_crds();
    assert_eq!(crds.len(), 13);
    for crd in crds {
        assert!(!crd.spec.versions.is_empty());
        assert_eq!(
            crd.spec.versions.iter().filter(|v| v.storage).count(),
            1,
            "{}: exactly one storage version",
            crd.spec.names.kind
        );
        for version in &crd.spec.versions {
            let schema = version
                .schema
                .as_ref()
                .and_then(|s| s.open_api_v3_schema.as_ref())
                .expect("schema");
            let schema = serde_json::to_value(schema).expect("schema JSON");
            assert_structural(
                &schema,
                &format!("{}/{}", crd.spec.names.kind, version.name),
            );
        }
        let labels = crd.metadata.labels.clone().unwrap_or_default();
        assert_eq!(
            labels.get("app.kubernetes.io/name").map(String::as_str),
            Some("flomesh.io"),
            "{}: FSM's uninstall finds CRDs by this label",
            crd.spec.names.kind
        );
    }
}

#[test]
fn mesh_config_crd_names_match_fsm() {
    let crd = MeshConfig::crd();
    assert_eq!(
        crd.metadata.name.as_deref(),
        Some("meshconfigs.config.flomesh.io")
    );
    assert_eq!(crd.spec.scope, "Namespaced");
    assert_eq!(
        crd.spec.names.short_names,
        Some(vec!["meshconfig".to_string()])
    );
}
