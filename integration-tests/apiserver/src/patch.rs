//! PATCH bodies: JSON merge patch (RFC 7386), JSON patch (RFC 6902), strategic merge patch
//! (applied as a merge patch) and server-side apply (merged like a merge patch; no managed
//! fields, so no conflicts).

use serde_json::Value;

use crate::status::ApiError;

// === Types ===

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PatchKind {
    Merge,
    Json,
    /// Lists are replaced, not merged by key; `$patch`-style directives are dropped.
    StrategicMerge,
    Apply,
}

// === PatchKind ===

impl PatchKind {
    /// Maps a request `Content-Type` (parameters ignored) to a patch kind.
    pub fn from_content_type(content_type: &str) -> Option<Self> {
        let media = content_type.split(';').next().unwrap_or_default().trim();
        match media {
            "application/merge-patch+json" => Some(PatchKind::Merge),
            "application/json-patch+json" => Some(PatchKind::Json),
            "application/strategic-merge-patch+json" => Some(PatchKind::StrategicMerge),
            "application/apply-patch+yaml" => Some(PatchKind::Apply),
            _ => None,
        }
    }

    /// Applies `body` to `doc` in place.
    pub fn apply(&self, doc: &mut Value, body: &[u8]) -> Result<(), ApiError> {
        match self {
            PatchKind::Merge => {
                let patch = parse_object(body)?;
                json_patch::merge(doc, &patch);
            }
            PatchKind::StrategicMerge => {
                let mut patch = parse_object(body)?;
                strip_directives(&mut patch);
                json_patch::merge(doc, &patch);
            }
            PatchKind::Json => {
                let patch: json_patch::Patch = serde_json::from_slice(body)
                    .map_err(|e| ApiError::bad_request(e.to_string()))?;
                json_patch::patch(doc, &patch)
                    .map_err(|e| ApiError::new(422, "Invalid", e.to_string()))?;
            }
            PatchKind::Apply => {
                let applied = parse_apply_body(body)?;
                json_patch::merge(doc, &applied);
            }
        }
        Ok(())
    }
}

fn parse_object(body: &[u8]) -> Result<Value, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::bad_request(
            "error decoding patch: the patch must be a JSON object",
        ));
    }
    Ok(v)
}

/// The configuration carried by an apply patch: YAML or JSON (JSON is what kube-rs sends).
pub fn parse_apply_body(body: &[u8]) -> Result<Value, ApiError> {
    let v: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(_) => serde_yaml_ng::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))?,
    };
    if !v.is_object() {
        return Err(ApiError::bad_request(
            "error decoding YAML: the applied configuration must be an object",
        ));
    }
    Ok(v)
}

/// Drops strategic-merge directives (`$patch`, `$retainKeys`, `$setElementOrder/...`, …),
/// which would otherwise land in the object as fields.
fn strip_directives(v: &mut Value) {
    match v {
        Value::Object(map) => {
            map.retain(|k, _| !k.starts_with('$'));
            map.values_mut().for_each(strip_directives);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_directives),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn content_types() {
        assert_eq!(
            PatchKind::from_content_type("application/merge-patch+json; charset=utf-8"),
            Some(PatchKind::Merge)
        );
        assert_eq!(PatchKind::from_content_type("application/json"), None);
    }

    #[test]
    fn merge_json_strategic_apply() {
        let base = json!({"metadata": {"labels": {"a": "1", "b": "2"}}, "data": {"k": "v"}, "list": [1, 2]});

        let mut doc = base.clone();
        PatchKind::Merge
            .apply(
                &mut doc,
                br#"{"metadata":{"labels":{"a":null,"c":"3"}},"list":[9]}"#,
            )
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(doc["metadata"]["labels"], json!({"b": "2", "c": "3"}));
        assert_eq!(doc["list"], json!([9]));

        let mut doc = base.clone();
        PatchKind::Json
            .apply(&mut doc, br#"[{"op":"replace","path":"/data/k","value":"w"},{"op":"add","path":"/list/-","value":3}]"#)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(doc["data"]["k"], "w");
        assert_eq!(doc["list"], json!([1, 2, 3]));

        let mut doc = base.clone();
        let err =
            PatchKind::Json.apply(&mut doc, br#"[{"op":"test","path":"/data/k","value":"x"}]"#);
        assert!(err.is_err_and(|e| e.code == 422));
        let err = PatchKind::Json.apply(&mut doc, b"{not json");
        assert!(err.is_err_and(|e| e.code == 400));

        let mut doc = base.clone();
        PatchKind::StrategicMerge
            .apply(&mut doc, br#"{"data":{"$patch":"replace","x":"y"}}"#)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(doc["data"], json!({"k": "v", "x": "y"}));

        let mut doc = base;
        PatchKind::Apply
            .apply(&mut doc, b"data:\n  z: zz\n")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(doc["data"], json!({"k": "v", "z": "zz"}));
    }
}
