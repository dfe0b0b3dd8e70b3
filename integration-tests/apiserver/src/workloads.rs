//! `apps/v1` Deployments as the real registry stores them: the defaults of
//! `SetDefaults_Deployment` and the checks of `ValidateDeploymentSpec`,
//! `ValidateDeploymentStatus` and the apps/v1 update strategy (immutable selector) that a
//! client notices, with the real messages. The other workload kinds (ReplicaSets, DaemonSets,
//! StatefulSets, Jobs) are decoded and stored without kind-specific rules. Nothing here acts
//! on a Deployment: no ReplicaSets, no pods, no status.

use serde_json::{Map, Value, json};

use crate::selector::LabelSelector;
use crate::status::{FieldError, FieldErrorKind, go_string_map, go_string_slice};

const MISMATCH: &str = "`selector` does not match template `labels`";

/// `SetDefaults_Deployment`: one replica, a 25%/25% rolling update, ten old ReplicaSets kept,
/// a 600 s progress deadline.
pub(crate) fn default_deployment(mut obj: Value) -> Value {
    let Some(root) = obj.as_object_mut() else {
        return obj;
    };
    let spec = object_at(root, "spec");
    spec.entry("replicas").or_insert(json!(1));
    let strategy = object_at(spec, "strategy");
    let kind = strategy
        .entry("type")
        .or_insert(json!("RollingUpdate"))
        .clone();
    if kind == "RollingUpdate" {
        let rolling = object_at(strategy, "rollingUpdate");
        rolling.entry("maxUnavailable").or_insert(json!("25%"));
        rolling.entry("maxSurge").or_insert(json!("25%"));
    }
    spec.entry("revisionHistoryLimit").or_insert(json!(10));
    spec.entry("progressDeadlineSeconds").or_insert(json!(600));
    obj
}

/// The object under `key`, made one when absent or not an object.
fn object_at<'a>(map: &'a mut Map<String, Value>, key: &str) -> &'a mut Map<String, Value> {
    let slot = map.entry(key).or_insert_with(|| json!({}));
    if !slot.is_object() {
        *slot = json!({});
    }
    match slot {
        Value::Object(m) => m,
        _ => unreachable!("made an object above"),
    }
}

/// `ValidateDeploymentSpec` (and, on update, the immutable selector of apps/v1).
pub(crate) fn validate_deployment(obj: &Value, old: Option<&Value>) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let spec = obj.get("spec").unwrap_or(&Value::Null);
    let int = |key: &str| spec.get(key).and_then(Value::as_i64);
    non_negative(&mut errors, "spec.replicas", int("replicas"));

    let selector = spec.get("selector").filter(|s| !s.is_null());
    // `None`: no selector (`labels.Nothing()`, which matches no labels); `Some(None)`: an
    // invalid one; `Some(Some(s))`: a valid one (empty matches everything).
    let parsed: Option<Option<LabelSelector>> = match selector {
        None => {
            errors.push(FieldError::required("spec.selector", ""));
            None
        }
        Some(sel) => {
            let parsed = LabelSelector::from_k8s(sel, "spec.selector");
            let empty = sel
                .get("matchLabels")
                .and_then(Value::as_object)
                .is_none_or(Map::is_empty)
                && sel
                    .get("matchExpressions")
                    .and_then(Value::as_array)
                    .is_none_or(Vec::is_empty);
            let valid = match parsed {
                Ok(s) => Some(s),
                Err(errs) => {
                    errors.extend(errs);
                    None
                }
            };
            if empty {
                errors.push(FieldError::invalid_printed(
                    "spec.selector",
                    go_label_selector(sel),
                    "empty selector is invalid for deployment",
                ));
            }
            if valid.is_none() {
                errors.push(FieldError::invalid_printed(
                    "spec.selector",
                    go_label_selector(sel),
                    "invalid label selector",
                ));
            }
            Some(valid)
        }
    };
    if let Some(old_selector) = old.map(|o| o.pointer("/spec/selector"))
        && !same_selector(selector, old_selector)
    {
        errors.push(FieldError::invalid_printed(
            "spec.selector",
            selector.map_or_else(|| "null".to_string(), go_label_selector),
            "field is immutable",
        ));
    }

    if let Some(selector) = parsed.as_ref().map_or(Some(None), |p| p.as_ref().map(Some)) {
        let template = spec.get("template").unwrap_or(&Value::Null);
        let labels = template.pointer("/metadata/labels");
        let matches = selector.is_some_and(|s| s.is_empty() || s.matches_object(template));
        if !matches {
            errors.push(FieldError::invalid_printed(
                "spec.template.metadata.labels",
                go_string_map(labels),
                MISMATCH,
            ));
        }
        let containers = template
            .pointer("/spec/containers")
            .and_then(Value::as_array);
        if containers.is_none_or(Vec::is_empty) {
            errors.push(FieldError::required("spec.template.spec.containers", ""));
        }
        if let Some(policy) = template
            .pointer("/spec/restartPolicy")
            .and_then(Value::as_str)
            .filter(|p| *p != "Always")
        {
            errors.push(FieldError::new(
                "spec.template.spec.restartPolicy",
                FieldErrorKind::NotSupported {
                    value: json!(policy),
                    supported: vec![json!("Always")],
                },
            ));
        }
    }

    if spec.pointer("/strategy/type").and_then(Value::as_str) == Some("Recreate")
        && spec
            .pointer("/strategy/rollingUpdate")
            .is_some_and(|r| !r.is_null())
    {
        errors.push(FieldError::forbidden(
            "spec.strategy.rollingUpdate",
            "may not be specified when strategy `type` is 'Recreate'",
        ));
    }
    let min_ready = int("minReadySeconds");
    non_negative(&mut errors, "spec.minReadySeconds", min_ready);
    non_negative(
        &mut errors,
        "spec.revisionHistoryLimit",
        int("revisionHistoryLimit"),
    );
    if let Some(deadline) = int("progressDeadlineSeconds") {
        non_negative(&mut errors, "spec.progressDeadlineSeconds", Some(deadline));
        if deadline <= min_ready.unwrap_or(0) {
            errors.push(FieldError::invalid(
                "spec.progressDeadlineSeconds",
                json!(deadline),
                "must be greater than minReadySeconds",
            ));
        }
    }
    errors
}

/// `ValidateDeploymentStatus`: what a write of `status` (the `/status` subresource, or a
/// fixture) must satisfy.
pub(crate) fn validate_deployment_status(obj: &Value) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let status = obj.get("status").unwrap_or(&Value::Null);
    let int = |key: &str| status.get(key).and_then(Value::as_i64);
    for key in [
        "observedGeneration",
        "replicas",
        "updatedReplicas",
        "readyReplicas",
        "availableReplicas",
        "unavailableReplicas",
        "collisionCount",
    ] {
        non_negative(&mut errors, &format!("status.{key}"), int(key));
    }
    let count = |key: &str| int(key).unwrap_or(0);
    let replicas = count("replicas");
    for key in ["updatedReplicas", "readyReplicas", "availableReplicas"] {
        if count(key) > replicas {
            errors.push(FieldError::invalid(
                format!("status.{key}"),
                json!(count(key)),
                "cannot be greater than status.replicas",
            ));
        }
    }
    if count("availableReplicas") > count("readyReplicas") {
        errors.push(FieldError::invalid(
            "status.availableReplicas",
            json!(count("availableReplicas")),
            "cannot be greater than readyReplicas",
        ));
    }
    errors
}

/// `ValidateNonnegativeField`.
fn non_negative(errors: &mut Vec<FieldError>, field: &str, value: Option<i64>) {
    if let Some(v) = value.filter(|v| *v < 0) {
        errors.push(FieldError::invalid(
            field,
            json!(v),
            "must be greater than or equal to 0",
        ));
    }
}

/// Semantic equality of two selectors, as `apiequality.Semantic.DeepEqual` sees them: an
/// empty `matchLabels` or `matchExpressions` is the same as an absent one.
fn same_selector(a: Option<&Value>, b: Option<&Value>) -> bool {
    let norm = |s: Option<&Value>| -> Option<Value> {
        let mut s = s.filter(|s| !s.is_null())?.clone();
        if let Some(m) = s.as_object_mut() {
            m.retain(|_, v| match v {
                Value::Object(o) => !o.is_empty(),
                Value::Array(a) => !a.is_empty(),
                Value::Null => false,
                _ => true,
            });
        }
        Some(s)
    };
    norm(a) == norm(b)
}

/// A `metav1.LabelSelector` as Go's `%#v` prints it in a field error.
fn go_label_selector(sel: &Value) -> String {
    let expressions = match sel.get("matchExpressions").and_then(Value::as_array) {
        None => "[]v1.LabelSelectorRequirement(nil)".to_string(),
        Some(list) => {
            let items: Vec<String> = list
                .iter()
                .map(|r| {
                    let s = |k: &str| r.get(k).and_then(Value::as_str).unwrap_or_default();
                    format!(
                        "v1.LabelSelectorRequirement{{Key:{:?}, Operator:{:?}, Values:{}}}",
                        s("key"),
                        s("operator"),
                        go_string_slice(r.get("values"))
                    )
                })
                .collect();
            format!("[]v1.LabelSelectorRequirement{{{}}}", items.join(", "))
        }
    };
    format!(
        "v1.LabelSelector{{MatchLabels:{}, MatchExpressions:{expressions}}}",
        go_string_map(sel.get("matchLabels"))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment(selector: Value, labels: Value) -> Value {
        default_deployment(json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {
                "selector": selector,
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {"containers": [{"name": "c", "image": "i"}]},
                },
            },
        }))
    }

    fn messages(errors: &[FieldError]) -> Vec<String> {
        errors.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn defaults() {
        let d = deployment(
            json!({"matchLabels": {"app": "web"}}),
            json!({"app": "web"}),
        );
        assert_eq!(d["spec"]["replicas"], 1);
        assert_eq!(
            d["spec"]["strategy"],
            json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": "25%"}})
        );
        assert_eq!(d["spec"]["revisionHistoryLimit"], 10);
        assert_eq!(d["spec"]["progressDeadlineSeconds"], 600);
        let recreate =
            default_deployment(json!({"spec": {"replicas": 3, "strategy": {"type": "Recreate"}}}));
        assert_eq!(recreate["spec"]["replicas"], 3);
        assert_eq!(recreate["spec"]["strategy"], json!({"type": "Recreate"}));
        assert!(validate_deployment(&d, None).is_empty());
    }

    #[test]
    fn selector_must_match_the_template() {
        let d = deployment(
            json!({"matchLabels": {"app": "web"}}),
            json!({"app": "other", "tier": "x"}),
        );
        assert_eq!(
            messages(&validate_deployment(&d, None)),
            vec![
                "spec.template.metadata.labels: Invalid value: map[string]string{\"app\":\"other\", \"tier\":\"x\"}: `selector` does not match template `labels`"
            ]
        );
        let expressions = deployment(
            json!({"matchExpressions": [{"key": "app", "operator": "In", "values": ["web", "api"]}]}),
            json!({"app": "api"}),
        );
        assert!(validate_deployment(&expressions, None).is_empty());
    }

    #[test]
    fn missing_and_empty_selectors() {
        let mut d = deployment(json!({}), json!({"app": "web"}));
        assert_eq!(
            messages(&validate_deployment(&d, None)),
            vec![
                "spec.selector: Invalid value: v1.LabelSelector{MatchLabels:map[string]string(nil), MatchExpressions:[]v1.LabelSelectorRequirement(nil)}: empty selector is invalid for deployment"
            ]
        );
        if let Some(spec) = d["spec"].as_object_mut() {
            spec.remove("selector");
            spec.remove("template");
        }
        assert_eq!(
            messages(&validate_deployment(&d, None)),
            vec![
                "spec.selector: Required value",
                "spec.template.metadata.labels: Invalid value: map[string]string(nil): `selector` does not match template `labels`",
                "spec.template.spec.containers: Required value",
            ]
        );
        let bad = deployment(
            json!({"matchExpressions": [{"key": "app", "operator": "Near"}]}),
            json!({"app": "web"}),
        );
        let fields: Vec<String> = validate_deployment(&bad, None)
            .into_iter()
            .map(|e| e.field)
            .collect();
        assert_eq!(
            fields,
            vec![
                "spec.selector.matchExpressions[0].operator",
                "spec.selector"
            ]
        );
    }

    #[test]
    fn numbers_and_strategy() {
        let mut d = deployment(
            json!({"matchLabels": {"app": "web"}}),
            json!({"app": "web"}),
        );
        d["spec"]["replicas"] = json!(-1);
        d["spec"]["minReadySeconds"] = json!(700);
        d["spec"]["strategy"]["type"] = json!("Recreate");
        d["spec"]["template"]["spec"]["restartPolicy"] = json!("Never");
        assert_eq!(
            messages(&validate_deployment(&d, None)),
            vec![
                "spec.replicas: Invalid value: -1: must be greater than or equal to 0",
                "spec.template.spec.restartPolicy: Unsupported value: \"Never\": supported values: \"Always\"",
                "spec.strategy.rollingUpdate: Forbidden: may not be specified when strategy `type` is 'Recreate'",
                "spec.progressDeadlineSeconds: Invalid value: 600: must be greater than minReadySeconds",
            ]
        );
    }

    #[test]
    fn selector_is_immutable() {
        let old = deployment(
            json!({"matchLabels": {"app": "web"}}),
            json!({"app": "web"}),
        );
        let same = deployment(
            json!({"matchLabels": {"app": "web"}, "matchExpressions": []}),
            json!({"app": "web"}),
        );
        assert!(validate_deployment(&same, Some(&old)).is_empty());
        let changed = deployment(
            json!({"matchLabels": {"app": "web", "v": "2"}}),
            json!({"app": "web", "v": "2"}),
        );
        assert_eq!(
            messages(&validate_deployment(&changed, Some(&old))),
            vec![
                "spec.selector: Invalid value: v1.LabelSelector{MatchLabels:map[string]string{\"app\":\"web\", \"v\":\"2\"}, MatchExpressions:[]v1.LabelSelectorRequirement(nil)}: field is immutable"
            ]
        );
    }

    #[test]
    fn status_rules() {
        let ok = json!({"status": {"replicas": 2, "readyReplicas": 2, "availableReplicas": 1}});
        assert!(validate_deployment_status(&ok).is_empty());
        let bad = json!({"status": {"replicas": 1, "readyReplicas": 2, "availableReplicas": 2, "observedGeneration": -1}});
        assert_eq!(
            messages(&validate_deployment_status(&bad)),
            vec![
                "status.observedGeneration: Invalid value: -1: must be greater than or equal to 0",
                "status.readyReplicas: Invalid value: 2: cannot be greater than status.replicas",
                "status.availableReplicas: Invalid value: 2: cannot be greater than status.replicas",
            ]
        );
    }
}
