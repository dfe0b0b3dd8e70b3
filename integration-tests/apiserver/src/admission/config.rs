//! `MutatingWebhookConfiguration` and `ValidatingWebhookConfiguration`
//! (`admissionregistration.k8s.io/v1`): the real server's defaults and validation rules, and
//! the parsed [`Hook`]s the dispatcher works from.

use std::collections::HashSet;
use std::time::Duration;

use k8s_openapi::api::admissionregistration::v1::{RuleWithOperations, WebhookClientConfig};
use serde_json::{Value, json};

use crate::meta;
use crate::names;
use crate::selector::LabelSelector;
use crate::status::{FieldError, FieldErrorKind};

/// `timeoutSeconds` when unset, and the largest allowed.
const DEFAULT_TIMEOUT_SECONDS: i64 = 10;
const MAX_TIMEOUT_SECONDS: i64 = 30;
/// The only `AdmissionReview` version this server sends.
const REVIEW_VERSION: &str = "v1";

// === Types ===

/// One webhook of a configuration, ready to match and call.
#[derive(Debug, Clone)]
pub(crate) struct Hook {
    /// `metadata.name` of the configuration it comes from.
    pub configuration: String,
    pub name: String,
    pub rules: Vec<RuleWithOperations>,
    /// `failurePolicy: Ignore`.
    pub ignore_failures: bool,
    pub namespace_selector: LabelSelector,
    pub object_selector: LabelSelector,
    pub timeout: Duration,
    pub client: WebhookClientConfig,
}

// === Defaults ===

/// The defaults the real server fills in on decoding (`SetDefaults_*Webhook`, `SetDefaults_Rule`,
/// `SetDefaults_ServiceReference`), so reads show them as on a real cluster.
pub(crate) fn default(mut obj: Value, mutating: bool) -> Value {
    let Some(hooks) = obj.get_mut("webhooks").and_then(Value::as_array_mut) else {
        return obj;
    };
    for hook in hooks {
        default_field(hook, "failurePolicy", json!("Fail"));
        default_field(hook, "matchPolicy", json!("Equivalent"));
        default_field(hook, "namespaceSelector", json!({}));
        default_field(hook, "objectSelector", json!({}));
        default_field(hook, "timeoutSeconds", json!(DEFAULT_TIMEOUT_SECONDS));
        if mutating {
            default_field(hook, "reinvocationPolicy", json!("Never"));
        }
        if let Some(rules) = hook.get_mut("rules").and_then(Value::as_array_mut) {
            for rule in rules {
                default_field(rule, "scope", json!("*"));
            }
        }
        if let Some(service) = hook.pointer_mut("/clientConfig/service") {
            default_field(service, "port", json!(443));
        }
    }
    obj
}

fn default_field(obj: &mut Value, key: &str, value: Value) {
    if let Some(m) = obj.as_object_mut()
        && m.get(key).is_none_or(Value::is_null)
    {
        m.insert(key.to_string(), value);
    }
}

// === Validation ===

/// `ValidateMutatingWebhookConfiguration` / `ValidateValidatingWebhookConfiguration` for a
/// decoded (typed round-trip, defaulted) configuration. `matchConditions` are not checked.
pub(crate) fn validate(obj: &Value) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let hooks = obj
        .get("webhooks")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let mut seen = HashSet::new();
    for (i, hook) in hooks.iter().enumerate() {
        let at = format!("webhooks[{i}]");
        let name = str_at(hook, "/name");
        if !name.is_empty() && !seen.insert(name) {
            errors.push(FieldError::new(
                format!("{at}.name"),
                FieldErrorKind::Duplicate(json!(name)),
            ));
        }
        validate_hook(hook, &at, &mut errors);
    }
    errors
}

fn validate_hook(hook: &Value, at: &str, errors: &mut Vec<FieldError>) {
    fully_qualified_name(&format!("{at}.name"), str_at(hook, "/name"), errors);
    if let Some(rules) = hook.get("rules").and_then(Value::as_array) {
        for (i, rule) in rules.iter().enumerate() {
            validate_rule(rule, &format!("{at}.rules[{i}]"), errors);
        }
    }
    one_of(hook, at, "failurePolicy", &["Fail", "Ignore"], errors);
    one_of(hook, at, "matchPolicy", &["Equivalent", "Exact"], errors);
    one_of(
        hook,
        at,
        "reinvocationPolicy",
        &["IfNeeded", "Never"],
        errors,
    );
    match hook.get("sideEffects").and_then(Value::as_str) {
        None | Some("") => errors.push(FieldError::required(
            format!("{at}.sideEffects"),
            "must specify one of None, NoneOnDryRun",
        )),
        Some(_) => one_of(hook, at, "sideEffects", &["None", "NoneOnDryRun"], errors),
    }
    if let Some(t) = hook.get("timeoutSeconds").and_then(Value::as_i64)
        && !(1..=MAX_TIMEOUT_SECONDS).contains(&t)
    {
        errors.push(FieldError::invalid(
            format!("{at}.timeoutSeconds"),
            json!(t),
            "the timeout value must be between 1 and 30 seconds",
        ));
    }
    review_versions(hook, at, errors);
    for selector in ["namespaceSelector", "objectSelector"] {
        if let Some(s) = hook.get(selector)
            && let Err(errs) = LabelSelector::from_k8s(s, &format!("{at}.{selector}"))
        {
            errors.extend(errs);
        }
    }
    client_config(hook, at, errors);
}

/// `IsFullyQualifiedName`: a DNS subdomain with at least three segments.
fn fully_qualified_name(path: &str, name: &str, errors: &mut Vec<FieldError>) {
    if name.is_empty() {
        errors.push(FieldError::required(path, ""));
        return;
    }
    let errs = names::dns1123_subdomain(name);
    if !errs.is_empty() {
        errors.push(FieldError::invalid(path, json!(name), errs.join(",")));
    } else if name.split('.').count() < 3 {
        errors.push(FieldError::invalid(
            path,
            json!(name),
            "should be a domain with at least three segments separated by dots",
        ));
    }
}

fn review_versions(hook: &Value, at: &str, errors: &mut Vec<FieldError>) {
    let path = format!("{at}.admissionReviewVersions");
    let versions = strings_at(hook, "/admissionReviewVersions");
    if versions.is_empty() {
        errors.push(FieldError::required(
            path,
            format!("must specify one of {REVIEW_VERSION}"),
        ));
        return;
    }
    let mut seen = HashSet::new();
    for (i, v) in versions.iter().enumerate() {
        if !seen.insert(v.as_str()) {
            errors.push(FieldError::invalid(
                format!("{path}[{i}]"),
                json!(v),
                "duplicate version",
            ));
            continue;
        }
        for msg in names::dns1035_label(v) {
            errors.push(FieldError::invalid(format!("{path}[{i}]"), json!(v), msg));
        }
    }
    if !versions.iter().any(|v| v == REVIEW_VERSION) {
        // The real server also accepts v1beta1; this one only speaks admission.k8s.io/v1.
        errors.push(FieldError::invalid(
            path,
            json!(versions),
            format!("must include at least one of {REVIEW_VERSION}"),
        ));
    }
}

fn validate_rule(rule: &Value, at: &str, errors: &mut Vec<FieldError>) {
    let operations = strings_at(rule, "/operations");
    if operations.is_empty() {
        errors.push(FieldError::required(format!("{at}.operations"), ""));
    }
    if operations.len() > 1 && operations.iter().any(|o| o == "*") {
        errors.push(FieldError::invalid(
            format!("{at}.operations"),
            json!(operations),
            "if '*' is present, must not specify other operations",
        ));
    }
    const OPERATIONS: [&str; 5] = ["*", "CONNECT", "CREATE", "DELETE", "UPDATE"];
    for (i, op) in operations.iter().enumerate() {
        if !OPERATIONS.contains(&op.as_str()) {
            errors.push(not_supported(
                format!("{at}.operations[{i}]"),
                op,
                &OPERATIONS,
            ));
        }
    }
    for (field, what) in [("apiGroups", "API groups"), ("apiVersions", "API versions")] {
        let values = strings_at(rule, &format!("/{field}"));
        if values.is_empty() {
            errors.push(FieldError::required(format!("{at}.{field}"), ""));
        }
        if values.len() > 1 && values.iter().any(|v| v == "*") {
            errors.push(FieldError::invalid(
                format!("{at}.{field}"),
                json!(values),
                format!("if '*' is present, must not specify other {what}"),
            ));
        }
    }
    for (i, v) in strings_at(rule, "/apiVersions").iter().enumerate() {
        if v.is_empty() {
            errors.push(FieldError::required(format!("{at}.apiVersions[{i}]"), ""));
        }
    }
    let resources = strings_at(rule, "/resources");
    let path = format!("{at}.resources");
    if resources.is_empty() {
        errors.push(FieldError::required(&path, ""));
    }
    for (i, r) in resources.iter().enumerate() {
        if r.is_empty() {
            errors.push(FieldError::required(format!("{path}[{i}]"), ""));
        }
    }
    if resources.len() > 1 && resources.iter().any(|r| r == "*/*") {
        errors.push(FieldError::invalid(
            &path,
            json!(resources),
            "if '*/*' is present, must not specify other resources",
        ));
    }
    if resources.iter().any(|r| r == "*") && resources.iter().any(|r| r != "*" && !r.contains('/'))
    {
        errors.push(FieldError::invalid(
            &path,
            json!(resources),
            "if '*' is present, must not specify other resources without subresources",
        ));
    }
    if let Some(scope) = rule.get("scope").and_then(Value::as_str)
        && !["*", "Cluster", "Namespaced"].contains(&scope)
    {
        errors.push(not_supported(
            format!("{at}.scope"),
            scope,
            &["*", "Cluster", "Namespaced"],
        ));
    }
}

fn client_config(hook: &Value, at: &str, errors: &mut Vec<FieldError>) {
    let path = format!("{at}.clientConfig");
    let url = hook.pointer("/clientConfig/url").and_then(Value::as_str);
    let service = hook
        .pointer("/clientConfig/service")
        .filter(|s| !s.is_null());
    match (url, service) {
        (Some(url), None) => webhook_url(&format!("{path}.url"), url, errors),
        (None, Some(service)) => webhook_service(&format!("{path}.service"), service, errors),
        _ => errors.push(FieldError::required(
            path,
            "exactly one of url or service is required",
        )),
    }
}

/// `ValidateWebhookURL` with https forced.
fn webhook_url(path: &str, url: &str, errors: &mut Vec<FieldError>) {
    const FORM: &str = "; desired format: https://host[/path]";
    let (rest, fragment) = url.split_once('#').unwrap_or((url, ""));
    let uri: http::Uri = match rest.parse() {
        Ok(u) => u,
        Err(e) => {
            errors.push(FieldError::required(
                path,
                format!("url must be a valid URL: {e}{FORM}"),
            ));
            return;
        }
    };
    let scheme = uri.scheme_str().unwrap_or_default();
    if scheme != "https" {
        errors.push(FieldError::invalid(
            path,
            json!(scheme),
            format!("'https' is the only allowed URL scheme{FORM}"),
        ));
    }
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
    if uri.host().is_none_or(str::is_empty) {
        errors.push(FieldError::invalid(
            path,
            json!(""),
            format!("host must be specified{FORM}"),
        ));
    }
    if let Some((user, _)) = authority.split_once('@') {
        errors.push(FieldError::invalid(
            path,
            json!(user),
            "user information is not permitted in the URL",
        ));
    }
    if !fragment.is_empty() {
        errors.push(FieldError::invalid(
            path,
            json!(fragment),
            "fragments are not permitted in the URL",
        ));
    }
    if let Some(q) = uri.query().filter(|q| !q.is_empty()) {
        errors.push(FieldError::invalid(
            path,
            json!(q),
            "query parameters are not permitted in the URL",
        ));
    }
}

/// `ValidateWebhookService`.
fn webhook_service(path: &str, service: &Value, errors: &mut Vec<FieldError>) {
    if str_at(service, "/name").is_empty() {
        errors.push(FieldError::required(
            format!("{path}.name"),
            "service name is required",
        ));
    }
    if str_at(service, "/namespace").is_empty() {
        errors.push(FieldError::required(
            format!("{path}.namespace"),
            "service namespace is required",
        ));
    }
    let port = service.get("port").and_then(Value::as_i64).unwrap_or(443);
    if !(1..=65535).contains(&port) {
        errors.push(FieldError::invalid(
            format!("{path}.port"),
            json!(port),
            "port is not valid: must be between 1 and 65535, inclusive",
        ));
    }
    let url_path = str_at(service, "/path");
    if url_path.is_empty() || url_path == "/" {
        return;
    }
    if !url_path.starts_with('/') {
        errors.push(FieldError::invalid(
            format!("{path}.path"),
            json!(url_path),
            "must start with a '/'",
        ));
    } else if url_path.trim_end_matches('/')[1..]
        .split('/')
        .any(str::is_empty)
    {
        errors.push(FieldError::invalid(
            format!("{path}.path"),
            json!(url_path),
            "segment may not be empty",
        ));
    }
}

fn one_of(hook: &Value, at: &str, field: &str, allowed: &[&str], errors: &mut Vec<FieldError>) {
    if let Some(v) = hook.get(field).and_then(Value::as_str)
        && !allowed.contains(&v)
    {
        errors.push(not_supported(format!("{at}.{field}"), v, allowed));
    }
}

fn not_supported(path: String, value: &str, allowed: &[&str]) -> FieldError {
    FieldError::new(
        path,
        FieldErrorKind::NotSupported {
            value: json!(value),
            supported: allowed.iter().map(|a| json!(a)).collect(),
        },
    )
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_default()
}

fn strings_at(v: &Value, pointer: &str) -> Vec<String> {
    v.pointer(pointer)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|s| s.as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}

// === Parsing ===

/// The webhooks of stored configurations (valid, defaulted), configurations ordered by name
/// and webhooks in their order, as the real dispatcher runs them.
pub(crate) fn hooks(configurations: &[Value]) -> Vec<Hook> {
    let mut configurations: Vec<&Value> = configurations.iter().collect();
    configurations.sort_by(|a, b| meta::name(a).cmp(meta::name(b)));
    let mut out = Vec::new();
    for config in configurations {
        let hooks = config
            .get("webhooks")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        for hook in hooks {
            match parse_hook(meta::name(config), hook) {
                Ok(h) => out.push(h),
                // Stored configurations were validated; a failure here is a bug, so say so.
                Err(e) => {
                    tracing::warn!(configuration = meta::name(config), error = %e, "skipping an unparsable webhook")
                }
            }
        }
    }
    out
}

fn parse_hook(configuration: &str, hook: &Value) -> Result<Hook, String> {
    let selector = |field: &str| {
        LabelSelector::from_k8s(hook.get(field).unwrap_or(&Value::Null), field)
            .map_err(|errs| format!("{errs:?}"))
    };
    let rules: Vec<RuleWithOperations> =
        serde_json::from_value(hook.get("rules").cloned().unwrap_or_else(|| json!([])))
            .map_err(|e| e.to_string())?;
    let client: WebhookClientConfig =
        serde_json::from_value(hook.get("clientConfig").cloned().unwrap_or_default())
            .map_err(|e| e.to_string())?;
    let timeout = hook
        .get("timeoutSeconds")
        .and_then(Value::as_i64)
        .unwrap_or(DEFAULT_TIMEOUT_SECONDS)
        .clamp(1, MAX_TIMEOUT_SECONDS);
    Ok(Hook {
        configuration: configuration.to_string(),
        name: str_at(hook, "/name").to_string(),
        rules,
        ignore_failures: str_at(hook, "/failurePolicy") == "Ignore",
        namespace_selector: selector("namespaceSelector")?,
        object_selector: selector("objectSelector")?,
        timeout: Duration::from_secs(timeout.unsigned_abs()),
        client,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(hook: Value) -> Value {
        json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": "c"},
            "webhooks": [hook],
        })
    }

    fn good_hook() -> Value {
        json!({
            "name": "inject.flomesh.io",
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "clientConfig": {"service": {"namespace": "fsm-system", "name": "injector", "path": "/mutate"}},
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
        })
    }

    fn fields(errors: &[FieldError]) -> Vec<&str> {
        errors.iter().map(|e| e.field.as_str()).collect()
    }

    #[test]
    fn defaults_like_the_real_server() {
        let obj = default(config(good_hook()), true);
        let hook = &obj["webhooks"][0];
        assert_eq!(hook["failurePolicy"], "Fail");
        assert_eq!(hook["matchPolicy"], "Equivalent");
        assert_eq!(hook["timeoutSeconds"], 10);
        assert_eq!(hook["reinvocationPolicy"], "Never");
        assert_eq!(hook["namespaceSelector"], json!({}));
        assert_eq!(hook["rules"][0]["scope"], "*");
        assert_eq!(hook["clientConfig"]["service"]["port"], 443);
        assert!(validate(&obj).is_empty(), "{:?}", validate(&obj));
    }

    #[test]
    fn validation_errors_name_their_fields() {
        let mut hook = good_hook();
        hook["name"] = json!("inject");
        hook["admissionReviewVersions"] = json!(["v1beta1"]);
        hook["sideEffects"] = json!("Some");
        hook["timeoutSeconds"] = json!(31);
        hook["clientConfig"]["url"] = json!("https://x.example.com/");
        hook["rules"][0]["operations"] = json!(["*", "CREATE"]);
        let errs = validate(&default(config(hook), true));
        assert_eq!(
            fields(&errs),
            vec![
                "webhooks[0].name",
                "webhooks[0].rules[0].operations",
                "webhooks[0].sideEffects",
                "webhooks[0].timeoutSeconds",
                "webhooks[0].admissionReviewVersions",
                "webhooks[0].clientConfig",
            ]
        );
        assert_eq!(
            errs[0].to_string(),
            "webhooks[0].name: Invalid value: \"inject\": should be a domain with at least three segments separated by dots"
        );
        assert_eq!(
            errs[2].to_string(),
            "webhooks[0].sideEffects: Unsupported value: \"Some\": supported values: \"None\", \"NoneOnDryRun\""
        );

        let mut hook = good_hook();
        hook.as_object_mut().map(|m| m.remove("sideEffects"));
        hook["clientConfig"] = json!({"url": "http://x.example.com/?a=b"});
        let mut dup = config(hook.clone());
        dup["webhooks"] = json!([hook.clone(), hook]);
        let errs = validate(&default(dup, false));
        assert_eq!(
            fields(&errs),
            vec![
                "webhooks[0].sideEffects",
                "webhooks[0].clientConfig.url",
                "webhooks[0].clientConfig.url",
                "webhooks[1].name",
                "webhooks[1].sideEffects",
                "webhooks[1].clientConfig.url",
                "webhooks[1].clientConfig.url",
            ]
        );
    }

    #[test]
    fn hooks_come_ordered_by_configuration_name() {
        let mut b = config(good_hook());
        b["metadata"]["name"] = json!("b");
        let mut second = good_hook();
        second["name"] = json!("second.flomesh.io");
        second["failurePolicy"] = json!("Ignore");
        b["webhooks"] = json!([good_hook(), second]);
        let mut a = config(good_hook());
        a["metadata"]["name"] = json!("a");
        a["webhooks"][0]["name"] = json!("first.flomesh.io");
        let hooks = hooks(&[default(b, true), default(a, true)]);
        let names: Vec<(&str, &str)> = hooks
            .iter()
            .map(|h| (h.configuration.as_str(), h.name.as_str()))
            .collect();
        assert_eq!(
            names,
            vec![
                ("a", "first.flomesh.io"),
                ("b", "inject.flomesh.io"),
                ("b", "second.flomesh.io")
            ]
        );
        assert!(hooks[2].ignore_failures && !hooks[1].ignore_failures);
        assert_eq!(hooks[0].timeout, Duration::from_secs(10));
    }
}
