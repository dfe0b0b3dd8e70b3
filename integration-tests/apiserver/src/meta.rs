//! Object metadata: decoding a request body into a stored shape, metadata validation, and the
//! fields the server owns (uid, creationTimestamp, resourceVersion, generation).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::{Map, Value, json};

use crate::names::{self, NameRule};
use crate::registry::ResourceType;
use crate::status::{ApiError, FieldError};

/// `metadata.name`, or "" when absent.
pub fn name(obj: &Value) -> &str {
    obj.pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// `metadata.namespace`, or "" when absent.
pub fn namespace(obj: &Value) -> &str {
    obj.pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

pub fn resource_version(obj: &Value) -> &str {
    obj.pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

pub fn uid(obj: &Value) -> &str {
    obj.pointer("/metadata/uid")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

pub fn generation(obj: &Value) -> i64 {
    obj.pointer("/metadata/generation")
        .and_then(Value::as_i64)
        .unwrap_or(0)
}

/// `metadata` as a mutable map, created when missing. Only objects reach here (`decode` rejects
/// other bodies and non-object metadata with a 400 first).
pub fn meta_mut(obj: &mut Value) -> &mut Map<String, Value> {
    let root = ensure_object(obj);
    ensure_object(root.entry("metadata").or_insert_with(|| json!({})))
}

fn ensure_object(v: &mut Value) -> &mut Map<String, Value> {
    if !v.is_object() {
        *v = Value::Object(Map::new());
    }
    match v {
        Value::Object(m) => m,
        _ => unreachable!("replaced by an object above"),
    }
}

pub fn set(obj: &mut Value, key: &str, value: Value) {
    meta_mut(obj).insert(key.to_string(), value);
}

/// RFC 3339 with second precision, as Kubernetes stores `metav1.Time`.
pub fn now() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

pub fn new_uid() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// `generateName` plus five characters from the real server's alphabet.
pub fn generate_name(prefix: &str) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let random = uuid::Uuid::new_v4();
    let suffix: String = random
        .as_bytes()
        .iter()
        .take(5)
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect();
    format!("{prefix}{suffix}")
}

/// Turns a request body into the object shape that gets stored: checks `apiVersion`/`kind`,
/// fills or checks the namespace, and decodes through the typed model (built-ins) or
/// `ObjectMeta` (custom resources). Failures are 400s, as decoding errors are on a real server.
pub fn decode(
    rt: &ResourceType,
    url_namespace: Option<&str>,
    mut obj: Value,
) -> Result<Value, ApiError> {
    if !obj.is_object() {
        return Err(ApiError::bad_request(format!(
            "the body of the request was not a JSON or YAML object for {}",
            rt.kind
        )));
    }
    let expected = rt.api_version();
    match obj.get("apiVersion").and_then(Value::as_str) {
        Some(given) if !given.is_empty() && given != expected => {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({given}) does not match the expected API version ({expected})"
            )));
        }
        _ => {}
    }
    match obj.get("kind").and_then(Value::as_str) {
        Some(given) if !given.is_empty() && given != rt.kind => {
            return Err(ApiError::bad_request(format!(
                "the kind in the data ({given}) does not match the expected kind ({})",
                rt.kind
            )));
        }
        _ => {}
    }
    obj["apiVersion"] = json!(expected);
    obj["kind"] = json!(rt.kind);
    if obj.get("metadata").is_some_and(|m| !m.is_object()) {
        return Err(ApiError::bad_request(format!(
            "{} in version \"{}\" cannot be handled as a {}: metadata must be an object",
            rt.kind, rt.version, rt.kind
        )));
    }
    if rt.namespaced {
        let body_ns = namespace(&obj).to_string();
        match url_namespace {
            Some(url_ns) if body_ns.is_empty() => set(&mut obj, "namespace", json!(url_ns)),
            Some(url_ns) if body_ns != url_ns => {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            _ => {}
        }
    } else {
        meta_mut(&mut obj).remove("namespace");
    }
    // Fields the server owns or does not implement would otherwise leak into storage.
    meta_mut(&mut obj).remove("managedFields");
    meta_mut(&mut obj).remove("selfLink");

    let obj = if rt.is_custom() {
        let meta = obj.get("metadata").cloned().unwrap_or_else(|| json!({}));
        let typed: ObjectMeta = serde_json::from_value(meta).map_err(|e| {
            ApiError::bad_request(format!(
                "{} in version \"{}\" cannot be handled as a {}: metadata: {e}",
                rt.kind, rt.version, rt.kind
            ))
        })?;
        let mut obj = obj;
        obj["metadata"] = serde_json::to_value(typed)
            .map_err(|e| ApiError::internal(format!("encoding metadata: {e}")))?;
        obj
    } else {
        rt.normalize_builtin(obj).map_err(ApiError::bad_request)?
    };
    Ok(obj)
}

/// Metadata rules every kind shares: name shape, label and annotation keys, label values.
pub fn validate(rt: &ResourceType, obj: &Value) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let name = name(obj);
    if name.is_empty() {
        errors.push(FieldError::required(
            "metadata.name",
            "name or generateName is required",
        ));
    } else {
        let rule = if rt.is_custom() {
            NameRule::Dns1123Subdomain
        } else {
            rt.name_rule
        };
        for msg in names::check_name(rule, name) {
            errors.push(FieldError::invalid("metadata.name", json!(name), msg));
        }
    }
    if rt.namespaced && namespace(obj).is_empty() {
        errors.push(FieldError::required("metadata.namespace", ""));
    }
    if let Some(labels) = obj.pointer("/metadata/labels").and_then(Value::as_object) {
        for (k, v) in labels {
            for msg in names::qualified_name(k) {
                errors.push(FieldError::invalid("metadata.labels", json!(k), msg));
            }
            let v = v.as_str().unwrap_or_default();
            for msg in names::label_value(v) {
                errors.push(FieldError::invalid(
                    format!("metadata.labels.{k}"),
                    json!(v),
                    msg,
                ));
            }
        }
    }
    if let Some(annotations) = obj
        .pointer("/metadata/annotations")
        .and_then(Value::as_object)
    {
        for k in annotations.keys() {
            for msg in names::qualified_name(k) {
                errors.push(FieldError::invalid("metadata.annotations", json!(k), msg));
            }
        }
    }
    errors
}

/// Whether a write changes what `metadata.generation` tracks: everything but metadata, and
/// also not status where status is a subresource.
pub fn spec_changed(rt: &ResourceType, old: &Value, new: &Value) -> bool {
    let strip = |v: &Value| -> Value {
        let mut v = v.clone();
        if let Some(m) = v.as_object_mut() {
            m.remove("metadata");
            if rt.status_subresource {
                m.remove("status");
            }
        }
        v
    };
    strip(old) != strip(new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Registry;

    #[test]
    fn decode_fills_namespace_and_prunes_unknown_builtin_fields() {
        let r = Registry::with_builtins();
        let cm = r
            .get("", "v1", "configmaps")
            .unwrap_or_else(|| panic!("configmaps"));
        let obj = decode(
            &cm,
            Some("ns"),
            json!({"metadata": {"name": "a"}, "data": {"k": "v"}, "bogus": 1}),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(obj["metadata"]["namespace"], "ns");
        assert_eq!(obj["apiVersion"], "v1");
        assert_eq!(obj["kind"], "ConfigMap");
        assert!(obj.get("bogus").is_none());

        let err = decode(
            &cm,
            Some("ns"),
            json!({"metadata": {"name": "a", "namespace": "other"}}),
        );
        assert!(err.is_err_and(|e| e.code == 400));
        let err = decode(
            &cm,
            Some("ns"),
            json!({"metadata": {"name": "a"}, "data": {"k": 1}}),
        );
        assert!(
            err.is_err_and(
                |e| e.code == 400 && e.message.starts_with("ConfigMap in version \"v1\"")
            )
        );
    }

    #[test]
    fn metadata_validation() {
        let r = Registry::with_builtins();
        let ns = r
            .get("", "v1", "namespaces")
            .unwrap_or_else(|| panic!("namespaces"));
        let errs = validate(
            &ns,
            &json!({"metadata": {"name": "Bad.Name", "labels": {"a": "b c"}}}),
        );
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, vec!["metadata.name", "metadata.labels.a"]);
        assert!(validate(&ns, &json!({"metadata": {"name": "good"}})).is_empty());
    }

    #[test]
    fn generated_names() {
        let n = generate_name("web-");
        assert_eq!(n.len(), 9);
        assert!(n.starts_with("web-"));
    }
}
