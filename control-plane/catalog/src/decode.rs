//! Decoding multi-document Kubernetes YAML into [`MeshObject`]s.
//!
//! Each document is parsed on its own, so one malformed document never hides the others: it is
//! reported with its file, index, line, kind/name and field, and skipped.

use std::fmt;
use std::net::IpAddr;

use fsm_errcode::{ErrCode, HasErrCode};
use serde_json::Value;

use crate::object::{KindVisitor, MeshKind};
use crate::{Kind, MESH_CONFIG_NAME, MeshObject};

/// Why one document of a manifest was skipped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeError {
    pub file: String,
    /// 0-based index of the document inside the file.
    pub document: usize,
    /// 1-based line where the document starts.
    pub line: usize,
    /// `Kind name` or `Kind namespace/name` when known.
    pub object: Option<String>,
    /// Dotted path of the offending field when known (`spec.ports[0].port`).
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{} (document {})",
            self.file, self.line, self.document
        )?;
        if let Some(object) = &self.object {
            write!(f, " {object}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": field {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for DecodeError {}

impl HasErrCode for DecodeError {
    /// E3002 (the object could not be unmarshalled), but E1001 for a MeshConfig log level that is
    /// none of FSM's: FSM's code for a level that cannot be set.
    fn err_code(&self) -> ErrCode {
        match self.field.as_deref() {
            Some("spec.observability.fsmLogLevel") => ErrCode::E1001,
            _ => ErrCode::E3002,
        }
    }
}

/// Decodes every document of `text`. Documents of kinds the mesh does not read (Deployments,
/// ConfigMaps, …) are ignored without error; empty documents are skipped.
pub fn decode_manifests(file: &str, text: &str) -> (Vec<MeshObject>, Vec<DecodeError>) {
    let mut objects = Vec::new();
    let mut errors = Vec::new();
    for (index, (line, doc)) in split_documents(text).into_iter().enumerate() {
        let fail = |object: Option<String>, field: Option<String>, message: String| DecodeError {
            file: file.to_string(),
            document: index,
            line,
            object,
            field,
            message,
        };
        let value: Value = match serde_yaml_ng::from_str(doc) {
            Ok(Value::Null) => continue,
            Ok(value) => value,
            Err(err) => {
                let message = match err.location() {
                    Some(loc) => format!("malformed YAML at line {}: {err}", line + loc.line() - 1),
                    None => format!("malformed YAML: {err}"),
                };
                errors.push(fail(None, None, message));
                continue;
            }
        };
        match decode_value(value) {
            Ok(Some(object)) => objects.push(object),
            Ok(None) => {}
            Err((object, field, message)) => errors.push(fail(object, field, message)),
        }
    }
    (objects, errors)
}

type Failure = (Option<String>, Option<String>, String);

fn decode_value(value: Value) -> Result<Option<MeshObject>, Failure> {
    let Value::Object(map) = &value else {
        return Err((None, None, "document is not a mapping".to_string()));
    };
    let api_version = map
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let Some(kind_name) = map.get("kind").and_then(Value::as_str).map(str::to_string) else {
        return Err((None, Some("kind".into()), "missing kind".into()));
    };
    let group = api_version.rsplit_once('/').map(|(g, _)| g).unwrap_or("");
    let Some(kind) = Kind::from_api(group, &kind_name) else {
        if (group, kind_name.as_str()) == ("", "List") {
            return Err((
                None,
                Some("kind".into()),
                "List documents are not supported; use one document per object".into(),
            ));
        }
        return Ok(None);
    };
    let meta = map.get("metadata");
    let name = meta
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let namespace = meta
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
        .map(str::to_string);
    let label = match (&namespace, kind.is_namespaced()) {
        (Some(ns), true) => format!("{kind_name} {ns}/{name}"),
        _ => format!("{kind_name} {name}"),
    };
    let object = Some(label.clone());
    if name.is_empty() {
        return Err((object, Some("metadata.name".into()), "required".into()));
    }
    let typed = |e: serde_path_to_error::Error<serde_json::Error>| {
        let path = e.path().to_string();
        (
            object.clone(),
            (path != ".").then_some(path),
            e.into_inner().to_string(),
        )
    };
    let mut decoded = kind.visit(Decode(value)).map_err(typed)?;
    default_namespace(&mut decoded);
    validate(&decoded).map_err(|(field, message)| (object, Some(field), message))?;
    Ok(Some(decoded))
}

/// Deserializes a document into the Rust type of its kind, keeping the path of a failing field.
struct Decode(Value);

impl KindVisitor for Decode {
    type Output = Result<MeshObject, serde_path_to_error::Error<serde_json::Error>>;
    fn visit<K: MeshKind>(self) -> Self::Output {
        serde_path_to_error::deserialize::<_, K>(self.0).map(K::into_object)
    }
}

/// Namespaced objects without a namespace land in `default`, as `kubectl apply` would put them.
fn default_namespace(object: &mut MeshObject) {
    if object.kind().is_namespaced() {
        object
            .metadata_mut()
            .namespace
            .get_or_insert_with(|| "default".to_string());
    }
}

/// Semantic checks a real API server (or FSM's validating webhook) would make.
fn validate(object: &MeshObject) -> Result<(), (String, String)> {
    let port_ok = |port: i32| (1..=65535).contains(&port);
    match object {
        MeshObject::Service(svc) => {
            for (i, port) in svc
                .spec
                .iter()
                .flat_map(|s| s.ports.iter().flatten())
                .enumerate()
            {
                if !port_ok(port.port) {
                    return Err((
                        format!("spec.ports[{i}].port"),
                        format!(
                            "Invalid value: {}: must be between 1 and 65535, inclusive",
                            port.port
                        ),
                    ));
                }
            }
            if let Some(ip) = svc.spec.as_ref().and_then(|s| s.cluster_ip.as_deref())
                && ip != "None"
                && !ip.is_empty()
                && ip.parse::<IpAddr>().is_err()
            {
                return Err((
                    "spec.clusterIP".into(),
                    format!("Invalid value: {ip:?}: must be a valid IP address"),
                ));
            }
        }
        MeshObject::Pod(pod) => {
            if let Some(ip) = pod.status.as_ref().and_then(|s| s.pod_ip.as_deref())
                && ip.parse::<IpAddr>().is_err()
            {
                return Err((
                    "status.podIP".into(),
                    format!("Invalid value: {ip:?}: must be a valid IP address"),
                ));
            }
        }
        MeshObject::Endpoints(ep) => {
            for (i, subset) in ep.subsets.iter().flatten().enumerate() {
                for (j, addr) in subset.addresses.iter().flatten().enumerate() {
                    if addr.ip.parse::<IpAddr>().is_err() {
                        return Err((
                            format!("subsets[{i}].addresses[{j}].ip"),
                            format!("Invalid value: {:?}: must be a valid IP address", addr.ip),
                        ));
                    }
                }
                for (j, port) in subset.ports.iter().flatten().enumerate() {
                    if !port_ok(port.port) {
                        return Err((
                            format!("subsets[{i}].ports[{j}].port"),
                            format!(
                                "Invalid value: {}: must be between 1 and 65535, inclusive",
                                port.port
                            ),
                        ));
                    }
                }
            }
        }
        MeshObject::EndpointSlice(slice) => {
            for (i, endpoint) in slice.endpoints.iter().enumerate() {
                for (j, addr) in endpoint.addresses.iter().enumerate() {
                    if addr.parse::<IpAddr>().is_err() {
                        return Err((
                            format!("endpoints[{i}].addresses[{j}]"),
                            format!("Invalid value: {addr:?}: must be a valid IP address"),
                        ));
                    }
                }
            }
            for (i, port) in slice.ports.iter().flatten().enumerate() {
                if let Some(p) = port.port
                    && !port_ok(p)
                {
                    return Err((
                        format!("ports[{i}].port"),
                        format!("Invalid value: {p}: must be between 1 and 65535, inclusive"),
                    ));
                }
            }
        }
        MeshObject::MeshConfig(mc) => {
            let name = mc.metadata.name.as_deref().unwrap_or_default();
            if name != MESH_CONFIG_NAME {
                return Err((
                    "metadata.name".into(),
                    format!(
                        "Invalid value: {name:?}: the control plane reads only the MeshConfig named {MESH_CONFIG_NAME:?}"
                    ),
                ));
            }
        }
        _ => {}
    }
    if let Some(first) = object.semantic_errors().into_iter().next() {
        return Err((first.field, format!("Invalid value: {}", first.message)));
    }
    Ok(())
}

fn split_documents(text: &str) -> Vec<(usize, &str)> {
    let mut docs = Vec::new();
    let mut start = 0;
    let mut start_line = 1;
    let mut offset = 0;
    for (number, line) in text.split_inclusive('\n').enumerate() {
        let trimmed = line.trim_end();
        let is_separator =
            trimmed == "---" || trimmed.starts_with("--- ") || trimmed.starts_with("---\t");
        if is_separator {
            docs.push((start_line, &text[start..offset]));
            start = offset + line.len();
            start_line = number + 2;
        }
        offset += line.len();
    }
    docs.push((start_line, &text[start..]));
    docs.retain(|(_, doc)| {
        doc.lines()
            .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
    });
    docs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_document_does_not_hide_the_others() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: a\n---\nkind: [unclosed\n---\napiVersion: v1\nkind: Service\nmetadata:\n  name: s\n  namespace: a\nspec:\n  ports:\n  - port: 70000\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: sa\n";
        let (objects, errors) = decode_manifests("m.yaml", text);
        assert_eq!(objects.len(), 2);
        assert_eq!(objects[1].key().namespace, "default");
        assert_eq!(errors.len(), 2);
        assert_eq!(errors[0].document, 1);
        assert_eq!(errors[0].line, 6);
        assert!(
            errors[0].message.contains("malformed YAML"),
            "{}",
            errors[0]
        );
        assert_eq!(errors[1].object.as_deref(), Some("Service a/s"));
        assert_eq!(errors[1].field.as_deref(), Some("spec.ports[0].port"));
        assert_eq!(
            errors[1].to_string(),
            "m.yaml:8 (document 2) Service a/s: field spec.ports[0].port: Invalid value: 70000: must be between 1 and 65535, inclusive"
        );
    }

    #[test]
    fn type_errors_name_the_field() {
        let text = "apiVersion: config.flomesh.io/v1alpha3\nkind: MeshConfig\nmetadata:\n  name: fsm-mesh-config\n  namespace: fsm-system\nspec:\n  traffic:\n    enableEgress: \"no\"\n";
        let (objects, errors) = decode_manifests("mc.yaml", text);
        assert!(objects.is_empty());
        assert_eq!(
            errors[0].object.as_deref(),
            Some("MeshConfig fsm-system/fsm-mesh-config")
        );
        assert_eq!(
            errors[0].field.as_deref(),
            Some("spec.traffic.enableEgress")
        );
        assert!(
            errors[0].message.contains("expected a boolean"),
            "{}",
            errors[0].message
        );
        assert_eq!(errors[0].err_code(), ErrCode::E3002);
    }

    #[test]
    fn an_unknown_log_level_is_e1001() {
        let text = "apiVersion: config.flomesh.io/v1alpha3\nkind: MeshConfig\nmetadata:\n  name: fsm-mesh-config\n  namespace: fsm-system\nspec:\n  observability:\n    fsmLogLevel: verbose\n";
        let (_, errors) = decode_manifests("mc.yaml", text);
        assert_eq!(
            errors[0].field.as_deref(),
            Some("spec.observability.fsmLogLevel")
        );
        assert_eq!(errors[0].err_code(), ErrCode::E1001);
    }

    #[test]
    fn mesh_config_defaults_follow_fsm() {
        let text = "apiVersion: config.flomesh.io/v1alpha3\nkind: MeshConfig\nmetadata:\n  name: fsm-mesh-config\n  namespace: fsm-system\nspec: {}\n";
        let (objects, errors) = decode_manifests("mc.yaml", text);
        assert!(errors.is_empty(), "{errors:?}");
        let MeshObject::MeshConfig(mc) = &objects[0] else {
            panic!("not a MeshConfig")
        };
        assert!(!mc.spec.traffic.enable_permissive_traffic_policy_mode);
        assert_eq!(mc.spec.certificate.service_cert_validity_duration, "24h");
        assert_eq!(mc.spec.sidecar.log_level, "error");
    }

    #[test]
    fn unknown_kinds_are_ignored_and_missing_names_rejected() {
        let (objects, errors) = decode_manifests(
            "x.yaml",
            "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: d\n---\napiVersion: v1\nkind: Pod\nmetadata: {}\n",
        );
        assert!(objects.is_empty());
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].field.as_deref(), Some("metadata.name"));
    }
}
