//! API errors as real `Status` objects.
//!
//! kube-rs turns any non-2xx body that parses as a `Status` into `kube::Error::Api`, and tests
//! match on `code` and `reason`, so both must be exactly what a real API server sends.

use std::borrow::Cow;
use std::fmt;

use serde_json::{Value, json};

// === ApiError ===

/// An error answered as a `Status` object (`kind: Status`, `status: Failure`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// HTTP status code, also the `code` field.
    pub code: u16,
    /// Machine-readable reason (`NotFound`, `AlreadyExists`, `Conflict`, `Invalid`, …); empty
    /// when none is known (an admission webhook's denial without a reason).
    pub reason: Cow<'static, str>,
    /// Human-readable message, worded like the real API server's.
    pub message: String,
    /// `details`, when the real server sends them for this reason (boxed: errors travel in
    /// `Result`s everywhere and should stay small).
    pub details: Option<Box<Details>>,
}

/// `Status.details`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Details {
    pub name: String,
    pub group: String,
    /// The resource (plural) for most reasons, the kind for `Invalid`, as the real server does.
    pub kind: String,
    pub causes: Vec<Cause>,
}

/// `Status.details.causes[]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Cause {
    pub reason: String,
    pub message: String,
    pub field: String,
}

/// One field validation failure, formatted like Go's `field.Error`.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldError {
    /// Dotted path, e.g. `spec.ports[0].port`.
    pub field: String,
    pub kind: FieldErrorKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum FieldErrorKind {
    Required(String),
    Invalid {
        value: Value,
        detail: String,
    },
    /// `Invalid` with the value as the Go server prints it where it is a map or a struct
    /// (`map[string]string{"app":"web"}`), which the JSON value alone cannot say.
    InvalidPrinted {
        shown: String,
        detail: String,
    },
    TypeInvalid {
        value: Value,
        detail: String,
    },
    NotSupported {
        value: Value,
        supported: Vec<Value>,
    },
    TooLong {
        max: usize,
    },
    TooMany {
        actual: usize,
        max: usize,
    },
    Duplicate(Value),
    Forbidden(String),
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            code,
            reason: Cow::Borrowed(reason),
            message: message.into(),
            details: None,
        }
    }

    fn with_details(mut self, name: &str, group: &str, kind: &str) -> Self {
        self.details = Some(Box::new(Details {
            name: name.to_string(),
            group: group.to_string(),
            kind: kind.to_string(),
            causes: Vec::new(),
        }));
        self
    }

    /// `configmaps "x" not found`, `meshconfigs.config.flomesh.io "x" not found`.
    pub fn not_found(group: &str, resource: &str, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", qualified(resource, group)),
        )
        .with_details(name, group, resource)
    }

    /// The answer for a path that names no served resource.
    pub fn no_route() -> Self {
        let mut err = Self::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        );
        err.details = Some(Box::default());
        err
    }

    pub fn already_exists(group: &str, resource: &str, name: &str) -> Self {
        Self::new(
            409,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", qualified(resource, group)),
        )
        .with_details(name, group, resource)
    }

    pub fn conflict(group: &str, resource: &str, name: &str, why: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": {why}",
                qualified(resource, group)
            ),
        )
        .with_details(name, group, resource)
    }

    /// The optimistic-concurrency failure of an update with a stale `resourceVersion`.
    pub fn stale(group: &str, resource: &str, name: &str) -> Self {
        Self::conflict(
            group,
            resource,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }

    /// 422 `Invalid`: `Kind.group "name" is invalid: <errors>` with one cause per error.
    pub fn invalid(group: &str, kind: &str, name: &str, errors: &[FieldError]) -> Self {
        let list = if errors.len() == 1 {
            errors[0].to_string()
        } else {
            let all: Vec<String> = errors.iter().map(ToString::to_string).collect();
            format!("[{}]", all.join(", "))
        };
        let mut err = Self::new(
            422,
            "Invalid",
            format!("{} \"{name}\" is invalid: {list}", qualified(kind, group)),
        )
        .with_details(name, group, kind);
        if let Some(details) = err.details.as_mut() {
            details.causes = errors
                .iter()
                .map(|e| Cause {
                    reason: e.kind.reason().to_string(),
                    message: e.kind.body(),
                    field: e.field.clone(),
                })
                .collect();
        }
        err
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    /// 410 `Expired`: what a watch or list gets for a compacted resourceVersion.
    pub fn gone(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }

    pub fn method_not_allowed() -> Self {
        Self::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        )
    }

    pub fn unsupported_media_type(got: &str) -> Self {
        Self::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format ({got}) - accepted media types include: \
                 application/json-patch+json, application/merge-patch+json, \
                 application/strategic-merge-patch+json, application/apply-patch+yaml"
            ),
        )
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "InternalError", message)
    }

    pub fn timeout(message: impl Into<String>) -> Self {
        Self::new(504, "Timeout", message)
    }

    /// The causes (field errors) carried by an `Invalid` error.
    pub fn causes(&self) -> &[Cause] {
        self.details.as_ref().map_or(&[], |d| d.causes.as_slice())
    }

    /// The `Status` object as JSON.
    pub fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "code": self.code,
        });
        if !self.reason.is_empty() {
            status["reason"] = json!(self.reason);
        }
        if let Some(d) = &self.details {
            let mut details = serde_json::Map::new();
            if !d.name.is_empty() {
                details.insert("name".into(), d.name.clone().into());
            }
            if !d.group.is_empty() {
                details.insert("group".into(), d.group.clone().into());
            }
            if !d.kind.is_empty() {
                details.insert("kind".into(), d.kind.clone().into());
            }
            if !d.causes.is_empty() {
                let causes: Vec<Value> = d
                    .causes
                    .iter()
                    .map(|c| json!({"reason": c.reason, "message": c.message, "field": c.field}))
                    .collect();
                details.insert("causes".into(), causes.into());
            }
            status["details"] = Value::Object(details);
        }
        status
    }
}

/// `resource.group`, or just `resource` for the core group.
pub(crate) fn qualified(resource: &str, group: &str) -> String {
    if group.is_empty() {
        resource.to_string()
    } else {
        format!("{resource}.{group}")
    }
}

// === FieldError ===

impl FieldError {
    pub fn new(field: impl Into<String>, kind: FieldErrorKind) -> Self {
        FieldError {
            field: field.into(),
            kind,
        }
    }

    pub fn required(field: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::new(field, FieldErrorKind::Required(detail.into()))
    }

    pub fn invalid(field: impl Into<String>, value: Value, detail: impl Into<String>) -> Self {
        Self::new(
            field,
            FieldErrorKind::Invalid {
                value,
                detail: detail.into(),
            },
        )
    }

    /// [`FieldErrorKind::InvalidPrinted`].
    pub fn invalid_printed(
        field: impl Into<String>,
        shown: impl Into<String>,
        detail: impl Into<String>,
    ) -> Self {
        Self::new(
            field,
            FieldErrorKind::InvalidPrinted {
                shown: shown.into(),
                detail: detail.into(),
            },
        )
    }

    pub fn forbidden(field: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::new(field, FieldErrorKind::Forbidden(detail.into()))
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.kind.body())
    }
}

impl FieldErrorKind {
    /// The `reason` of the cause, as in `k8s.io/apimachinery/pkg/util/validation/field`.
    pub fn reason(&self) -> &'static str {
        match self {
            FieldErrorKind::Required(_) => "FieldValueRequired",
            FieldErrorKind::Invalid { .. } | FieldErrorKind::InvalidPrinted { .. } => {
                "FieldValueInvalid"
            }
            FieldErrorKind::TypeInvalid { .. } => "FieldValueTypeInvalid",
            FieldErrorKind::NotSupported { .. } => "FieldValueNotSupported",
            FieldErrorKind::TooLong { .. } => "FieldValueTooLong",
            FieldErrorKind::TooMany { .. } => "FieldValueTooMany",
            FieldErrorKind::Duplicate(_) => "FieldValueDuplicate",
            FieldErrorKind::Forbidden(_) => "FieldValueForbidden",
        }
    }

    /// The message without the field path (what goes into `causes[].message`).
    pub fn body(&self) -> String {
        match self {
            FieldErrorKind::Required(detail) => with_detail("Required value", detail),
            FieldErrorKind::Invalid { value, detail }
            | FieldErrorKind::TypeInvalid { value, detail } => {
                with_detail(&format!("Invalid value: {}", go_value(value)), detail)
            }
            FieldErrorKind::InvalidPrinted { shown, detail } => {
                with_detail(&format!("Invalid value: {shown}"), detail)
            }
            FieldErrorKind::NotSupported { value, supported } => {
                let list: Vec<String> = supported.iter().map(go_value).collect();
                format!(
                    "Unsupported value: {}: supported values: {}",
                    go_value(value),
                    list.join(", ")
                )
            }
            FieldErrorKind::TooLong { max } => {
                format!("Too long: may not be more than {max} bytes")
            }
            FieldErrorKind::TooMany { actual, max } => {
                format!("Too many: {actual}: must have at most {max} items")
            }
            FieldErrorKind::Duplicate(value) => format!("Duplicate value: {}", go_value(value)),
            FieldErrorKind::Forbidden(detail) => with_detail("Forbidden", detail),
        }
    }
}

fn with_detail(head: &str, detail: &str) -> String {
    if detail.is_empty() {
        head.to_string()
    } else {
        format!("{head}: {detail}")
    }
}

/// Formats a value the way the Go server prints it in field errors: strings quoted, numbers
/// and booleans bare; composites as JSON (Go prints its own syntax there, which no test matches).
pub(crate) fn go_value(value: &Value) -> String {
    match value {
        Value::String(s) => format!("{s:?}"),
        Value::Null => "null".to_string(),
        other => other.to_string(),
    }
}

/// A JSON string map as Go's `%#v` prints a `map[string]string` (keys sorted; absent is nil).
pub(crate) fn go_string_map(map: Option<&Value>) -> String {
    let Some(map) = map.and_then(Value::as_object) else {
        return "map[string]string(nil)".to_string();
    };
    let mut entries: Vec<(&String, &str)> = map
        .iter()
        .map(|(k, v)| (k, v.as_str().unwrap_or_default()))
        .collect();
    entries.sort();
    let body: Vec<String> = entries
        .iter()
        .map(|(k, v)| format!("{k:?}:{v:?}"))
        .collect();
    format!("map[string]string{{{}}}", body.join(", "))
}

/// A JSON string list as Go's `%#v` prints a `[]string` (absent is nil).
pub(crate) fn go_string_slice(list: Option<&Value>) -> String {
    let Some(list) = list.and_then(Value::as_array) else {
        return "[]string(nil)".to_string();
    };
    let body: Vec<String> = list
        .iter()
        .map(|v| format!("{:?}", v.as_str().unwrap_or_default()))
        .collect();
    format!("[]string{{{}}}", body.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_single_and_many() {
        let one = ApiError::invalid(
            "config.flomesh.io",
            "MeshConfig",
            "fsm-mesh-config",
            &[FieldError::new(
                "spec.traffic.enableEgress",
                FieldErrorKind::TypeInvalid {
                    value: json!("string"),
                    detail: "spec.traffic.enableEgress in body must be of type boolean: \"string\""
                        .into(),
                },
            )],
        );
        assert_eq!(
            one.message,
            "MeshConfig.config.flomesh.io \"fsm-mesh-config\" is invalid: spec.traffic.enableEgress: \
             Invalid value: \"string\": spec.traffic.enableEgress in body must be of type boolean: \"string\""
        );
        let status = one.to_status();
        assert_eq!(status["code"], 422);
        assert_eq!(
            status["details"]["causes"][0]["field"],
            "spec.traffic.enableEgress"
        );
        assert_eq!(
            status["details"]["causes"][0]["reason"],
            "FieldValueTypeInvalid"
        );

        let two = ApiError::invalid(
            "",
            "Pod",
            "p",
            &[
                FieldError::required("metadata.name", ""),
                FieldError::required("spec.x", ""),
            ],
        );
        assert_eq!(
            two.message,
            "Pod \"p\" is invalid: [metadata.name: Required value, spec.x: Required value]"
        );
    }

    #[test]
    fn go_syntax() {
        assert_eq!(
            go_string_map(Some(&json!({"b": "2", "a": "1"}))),
            r#"map[string]string{"a":"1", "b":"2"}"#
        );
        assert_eq!(go_string_map(None), "map[string]string(nil)");
        assert_eq!(go_string_map(Some(&json!({}))), "map[string]string{}");
        assert_eq!(
            go_string_slice(Some(&json!(["/healthz", "/x"]))),
            r#"[]string{"/healthz", "/x"}"#
        );
        assert_eq!(go_string_slice(None), "[]string(nil)");
        let e = FieldError::invalid_printed("f", "map[string]string(nil)", "bad");
        assert_eq!(
            e.to_string(),
            "f: Invalid value: map[string]string(nil): bad"
        );
        assert_eq!(e.kind.reason(), "FieldValueInvalid");
    }

    #[test]
    fn not_found_is_qualified_by_group() {
        assert_eq!(
            ApiError::not_found("", "namespaces", "x").message,
            "namespaces \"x\" not found"
        );
        assert_eq!(
            ApiError::not_found("config.flomesh.io", "meshconfigs", "m").message,
            "meshconfigs.config.flomesh.io \"m\" not found"
        );
    }
}
