//! `rbac.authorization.k8s.io/v1` objects as the real registry stores them: the v1 defaults
//! (`roleRef.apiGroup`, subjects' `apiGroup`) and the checks of `pkg/apis/rbac/validation`
//! with the real messages. Nothing here authorizes anything: the server has no RBAC.

use serde_json::{Value, json};

use crate::names;
use crate::selector::LabelSelector;
use crate::status::{FieldError, FieldErrorKind, go_string_slice};

pub const GROUP: &str = "rbac.authorization.k8s.io";

/// The four RBAC kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Role,
    ClusterRole,
    RoleBinding,
    ClusterRoleBinding,
}

/// `SetDefaults_RoleBinding`/`ClusterRoleBinding` and `SetDefaults_Subject`.
pub(crate) fn default(kind: Kind, mut obj: Value) -> Value {
    if !matches!(kind, Kind::RoleBinding | Kind::ClusterRoleBinding) {
        return obj;
    }
    if obj
        .pointer("/roleRef/apiGroup")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
        && let Some(role_ref) = obj.get_mut("roleRef").and_then(Value::as_object_mut)
    {
        role_ref.insert("apiGroup".into(), json!(GROUP));
    }
    for subject in obj
        .get_mut("subjects")
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
    {
        let kind = subject.get("kind").and_then(Value::as_str);
        let unset = subject
            .get("apiGroup")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty);
        if unset && matches!(kind, Some("User" | "Group")) {
            subject["apiGroup"] = json!(GROUP);
        }
    }
    obj
}

/// `ValidateRole`, `ValidateClusterRole`, `ValidateRoleBinding`, `ValidateClusterRoleBinding`
/// (metadata aside), and on update the immutable `roleRef` of bindings.
pub(crate) fn validate(kind: Kind, obj: &Value, old: Option<&Value>) -> Vec<FieldError> {
    let mut errors = Vec::new();
    match kind {
        Kind::Role | Kind::ClusterRole => {
            let rules = obj.get("rules").and_then(Value::as_array);
            for (i, rule) in rules.into_iter().flatten().enumerate() {
                policy_rule(
                    &mut errors,
                    rule,
                    kind == Kind::Role,
                    &format!("rules[{i}]"),
                );
            }
            if kind == Kind::ClusterRole
                && let Some(aggregation) = obj.get("aggregationRule").filter(|a| !a.is_null())
            {
                aggregation_rule(&mut errors, aggregation);
            }
        }
        Kind::RoleBinding | Kind::ClusterRoleBinding => {
            let namespaced = kind == Kind::RoleBinding;
            role_ref(&mut errors, obj, namespaced);
            let subjects = obj.get("subjects").and_then(Value::as_array);
            for (i, subject) in subjects.into_iter().flatten().enumerate() {
                self::subject(&mut errors, subject, namespaced, &format!("subjects[{i}]"));
            }
            if let Some(old) = old
                && old.get("roleRef") != obj.get("roleRef")
            {
                errors.push(FieldError::invalid_printed(
                    "roleRef",
                    go_role_ref(obj.get("roleRef").unwrap_or(&Value::Null)),
                    "cannot change roleRef",
                ));
            }
        }
    }
    errors
}

fn strings(v: &Value, key: &str) -> usize {
    v.get(key).and_then(Value::as_array).map_or(0, Vec::len)
}

/// `ValidatePolicyRule`.
fn policy_rule(errors: &mut Vec<FieldError>, rule: &Value, namespaced: bool, at: &str) {
    if strings(rule, "verbs") == 0 {
        errors.push(FieldError::required(
            format!("{at}.verbs"),
            "verbs must contain at least one value",
        ));
    }
    if strings(rule, "nonResourceURLs") > 0 {
        let urls = go_string_slice(rule.get("nonResourceURLs"));
        if namespaced {
            errors.push(FieldError::invalid_printed(
                format!("{at}.nonResourceURLs"),
                &urls,
                "namespaced rules cannot apply to non-resource URLs",
            ));
        }
        if strings(rule, "apiGroups") + strings(rule, "resources") + strings(rule, "resourceNames")
            > 0
        {
            errors.push(FieldError::invalid_printed(
                format!("{at}.nonResourceURLs"),
                &urls,
                "rules cannot apply to both regular resources and non-resource URLs",
            ));
        }
        return;
    }
    if strings(rule, "apiGroups") == 0 {
        errors.push(FieldError::required(
            format!("{at}.apiGroups"),
            "resource rules must supply at least one api group",
        ));
    }
    if strings(rule, "resources") == 0 {
        errors.push(FieldError::required(
            format!("{at}.resources"),
            "resource rules must supply at least one resource",
        ));
    }
}

fn aggregation_rule(errors: &mut Vec<FieldError>, aggregation: &Value) {
    let selectors = aggregation
        .get("clusterRoleSelectors")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    if selectors.is_empty() {
        errors.push(FieldError::required(
            "aggregationRule.clusterRoleSelectors",
            "at least one clusterRoleSelector required if aggregationRule is non-nil",
        ));
    }
    for (i, selector) in selectors.iter().enumerate() {
        let at = format!("aggregationRule.clusterRoleSelectors[{i}]");
        if let Err(errs) = LabelSelector::from_k8s(selector, &at) {
            errors.extend(errs);
        }
    }
}

fn role_ref(errors: &mut Vec<FieldError>, obj: &Value, namespaced: bool) {
    let s = |k: &str| {
        obj.pointer(&format!("/roleRef/{k}"))
            .and_then(Value::as_str)
            .unwrap_or_default()
    };
    if s("apiGroup") != GROUP {
        errors.push(not_supported("roleRef.apiGroup", s("apiGroup"), &[GROUP]));
    }
    let kinds: &[&str] = if namespaced {
        &["Role", "ClusterRole"]
    } else {
        &["ClusterRole"]
    };
    if !kinds.contains(&s("kind")) {
        errors.push(not_supported("roleRef.kind", s("kind"), kinds));
    }
    let name = s("name");
    if name.is_empty() {
        errors.push(FieldError::required("roleRef.name", ""));
    }
    for msg in names::path_segment_name(name) {
        errors.push(FieldError::invalid("roleRef.name", json!(name), msg));
    }
}

/// `ValidateRoleBindingSubject`.
fn subject(errors: &mut Vec<FieldError>, subject: &Value, namespaced: bool, at: &str) {
    let s = |k: &str| subject.get(k).and_then(Value::as_str).unwrap_or_default();
    let name = s("name");
    if name.is_empty() {
        errors.push(FieldError::required(format!("{at}.name"), ""));
    }
    match s("kind") {
        "ServiceAccount" => {
            if !name.is_empty() {
                for msg in names::dns1123_subdomain(name) {
                    errors.push(FieldError::invalid(format!("{at}.name"), json!(name), msg));
                }
            }
            if !s("apiGroup").is_empty() {
                errors.push(not_supported(
                    &format!("{at}.apiGroup"),
                    s("apiGroup"),
                    &[""],
                ));
            }
            if !namespaced && s("namespace").is_empty() {
                errors.push(FieldError::required(format!("{at}.namespace"), ""));
            }
        }
        "User" | "Group" => {
            if s("apiGroup") != GROUP {
                errors.push(not_supported(
                    &format!("{at}.apiGroup"),
                    s("apiGroup"),
                    &[GROUP],
                ));
            }
        }
        other => errors.push(not_supported(
            &format!("{at}.kind"),
            other,
            &["ServiceAccount", "User", "Group"],
        )),
    }
}

fn not_supported(field: &str, value: &str, supported: &[&str]) -> FieldError {
    FieldError::new(
        field,
        FieldErrorKind::NotSupported {
            value: json!(value),
            supported: supported.iter().map(|s| json!(s)).collect(),
        },
    )
}

/// An `rbac.RoleRef` as Go's `%#v` prints it.
fn go_role_ref(role_ref: &Value) -> String {
    let s = |k: &str| role_ref.get(k).and_then(Value::as_str).unwrap_or_default();
    format!(
        "rbac.RoleRef{{APIGroup:{:?}, Kind:{:?}, Name:{:?}}}",
        s("apiGroup"),
        s("kind"),
        s("name")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn messages(errors: &[FieldError]) -> Vec<String> {
        errors.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn binding_defaults() {
        let b = default(
            Kind::RoleBinding,
            json!({"roleRef": {"kind": "Role", "name": "r", "apiGroup": ""},
                   "subjects": [{"kind": "ServiceAccount", "name": "sa"},
                                {"kind": "User", "name": "alice"},
                                {"kind": "Group", "name": "devs", "apiGroup": ""}]}),
        );
        assert_eq!(b["roleRef"]["apiGroup"], GROUP);
        assert!(b["subjects"][0].get("apiGroup").is_none());
        assert_eq!(b["subjects"][1]["apiGroup"], GROUP);
        assert_eq!(b["subjects"][2]["apiGroup"], GROUP);
        assert!(validate(Kind::RoleBinding, &b, None).is_empty());
    }

    #[test]
    fn rules() {
        let role = json!({"rules": [
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]},
            {"resources": ["pods"]},
            {"nonResourceURLs": ["/healthz"], "verbs": ["get"], "apiGroups": [""]},
        ]});
        assert!(
            validate(
                Kind::ClusterRole,
                &json!({"rules": [
            {"nonResourceURLs": ["/healthz"], "verbs": ["get"]}]}),
                None
            )
            .is_empty()
        );
        assert_eq!(
            messages(&validate(Kind::Role, &role, None)),
            vec![
                "rules[1].verbs: Required value: verbs must contain at least one value",
                "rules[1].apiGroups: Required value: resource rules must supply at least one api group",
                "rules[2].nonResourceURLs: Invalid value: []string{\"/healthz\"}: namespaced rules cannot apply to non-resource URLs",
                "rules[2].nonResourceURLs: Invalid value: []string{\"/healthz\"}: rules cannot apply to both regular resources and non-resource URLs",
            ]
        );
        assert_eq!(
            messages(&validate(
                Kind::ClusterRole,
                &json!({"aggregationRule": {}}),
                None
            )),
            vec![
                "aggregationRule.clusterRoleSelectors: Required value: at least one clusterRoleSelector required if aggregationRule is non-nil"
            ]
        );
    }

    #[test]
    fn bindings() {
        let crb = json!({"roleRef": {"apiGroup": GROUP, "kind": "Role", "name": ""},
                         "subjects": [{"kind": "ServiceAccount", "name": "sa"},
                                      {"kind": "Robot", "name": "r"}]});
        assert_eq!(
            messages(&validate(Kind::ClusterRoleBinding, &crb, None)),
            vec![
                "roleRef.kind: Unsupported value: \"Role\": supported values: \"ClusterRole\"",
                "roleRef.name: Required value",
                "subjects[0].namespace: Required value",
                "subjects[1].kind: Unsupported value: \"Robot\": supported values: \"ServiceAccount\", \"User\", \"Group\"",
            ]
        );
        let old = json!({"roleRef": {"apiGroup": GROUP, "kind": "ClusterRole", "name": "a"}});
        let new = json!({"roleRef": {"apiGroup": GROUP, "kind": "ClusterRole", "name": "b"}});
        assert!(validate(Kind::ClusterRoleBinding, &old, Some(&old)).is_empty());
        assert_eq!(
            messages(&validate(Kind::ClusterRoleBinding, &new, Some(&old))),
            vec![
                "roleRef: Invalid value: rbac.RoleRef{APIGroup:\"rbac.authorization.k8s.io\", Kind:\"ClusterRole\", Name:\"b\"}: cannot change roleRef"
            ]
        );
    }
}
