//! Admission webhooks, called the way kube-apiserver's `MutatingAdmissionWebhook` and
//! `ValidatingAdmissionWebhook` plugins call them (`k8s.io/apiserver/pkg/admission/plugin/webhook`).
//!
//! [`Admission::mutate`] runs every matching mutating webhook in order (configurations by name,
//! webhooks in their order), each seeing the previous one's result, and applies their JSON
//! patches; [`Admission::validate`] runs the matching validating webhooks in parallel. Errors are
//! the real server's: a denial carries the webhook's status (403 by default) and
//! `admission webhook "<name>" denied the request: <message>`; a failed call is a 500
//! `Internal error occurred: failed calling webhook "<name>": …` unless the webhook's
//! `failurePolicy` is `Ignore`. The HTTP write paths (`http/writes.rs`) decide when to call them.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Display;

use k8s_openapi::api::admissionregistration::v1::RuleWithOperations;
use parking_lot::Mutex;
use serde_json::{Value, json};

use crate::meta;
use crate::registry::{ADMISSION_GROUP, ResourceType};
use crate::status::{ApiError, Cause, Details};
use crate::store::Store;

mod client;
pub(crate) mod config;

use config::Hook;

const API_VERSION: &str = "admissionregistration.k8s.io/v1";
const MUTATING: &str = "MutatingWebhookConfiguration";
const VALIDATING: &str = "ValidatingWebhookConfiguration";
/// The identity the server reports to webhooks (there is no authentication here).
const USERNAME: &str = "system:admin";
const GROUPS: [&str; 2] = ["system:masters", "system:authenticated"];

// === Types ===

/// Calls admission webhooks for HTTP writes, and counts the calls per webhook name.
pub(crate) struct Admission {
    store: Store,
    calls: Mutex<HashMap<String, u64>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Operation {
    Create,
    Update,
    Delete,
}

/// What an admission request is about (the real server's `admission.Attributes`).
pub(crate) struct Request<'a> {
    pub rt: &'a ResourceType,
    pub operation: Operation,
    /// `""`, or `"status"` for writes through the status subresource.
    pub subresource: &'static str,
    /// The object's namespace; for a Namespace, its own name; `""` for other cluster-scoped
    /// objects.
    pub namespace: String,
    /// Empty for a create with `generateName`, as on the real server.
    pub name: String,
    pub dry_run: bool,
    /// `CreateOptions`, `UpdateOptions` or `DeleteOptions` (`meta.k8s.io/v1`).
    pub options: Value,
}

/// Why a call produced no verdict, or the verdict as an error.
enum Failure {
    /// The real server's `ErrCallingWebhook`: subject to `failurePolicy`.
    Call(String),
    /// A denial or an unusable patch: fails the request whatever the policy.
    Error(ApiError),
}

/// What a webhook answered, after the real server's `VerifyAdmissionResponse` checks.
struct Verdict {
    allowed: bool,
    status: Option<Value>,
    patch: Option<Vec<u8>>,
    patch_type: String,
}

// === Operation ===

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Create => "CREATE",
            Operation::Update => "UPDATE",
            Operation::Delete => "DELETE",
        }
    }
}

// === Request ===

impl Request<'_> {
    fn is_namespace(&self) -> bool {
        self.rt.group.is_empty() && self.rt.plural == "namespaces"
    }

    /// The `AdmissionReview` sent to a webhook.
    fn review(&self, uid: &str, object: Option<&Value>, old: Option<&Value>) -> Value {
        let rt = self.rt;
        let kind = json!({"group": rt.group, "version": rt.version, "kind": rt.kind});
        let resource = json!({"group": rt.group, "version": rt.version, "resource": rt.plural});
        let mut request = json!({
            "uid": uid,
            "kind": kind,
            "resource": resource,
            "requestKind": kind,
            "requestResource": resource,
            "operation": self.operation.as_str(),
            "userInfo": {"username": USERNAME, "groups": GROUPS},
            "object": object.cloned().unwrap_or(Value::Null),
            "oldObject": old.cloned().unwrap_or(Value::Null),
            "dryRun": self.dry_run,
            "options": self.options,
        });
        if !self.subresource.is_empty() {
            request["subResource"] = json!(self.subresource);
            request["requestSubResource"] = json!(self.subresource);
        }
        if !self.name.is_empty() {
            request["name"] = json!(self.name);
        }
        if !self.namespace.is_empty() {
            request["namespace"] = json!(self.namespace);
        }
        json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request})
    }
}

// === Admission ===

impl Admission {
    pub fn new(store: Store) -> Self {
        Admission {
            store,
            calls: Mutex::new(HashMap::new()),
        }
    }

    /// Calls made to the webhook named `name` (each attempt, failed ones included).
    pub fn calls(&self, name: &str) -> u64 {
        self.calls.lock().get(name).copied().unwrap_or(0)
    }

    /// Whether any webhook is configured at all; when none is, writes take the plain path.
    pub fn configured(&self) -> bool {
        [MUTATING, VALIDATING].iter().any(|kind| {
            self.store.list(API_VERSION, kind, None).iter().any(|c| {
                c.get("webhooks")
                    .and_then(Value::as_array)
                    .is_some_and(|w| !w.is_empty())
            })
        })
    }

    /// Runs the matching mutating webhooks in order and returns the object with their patches
    /// applied (decoded again after each, as the real server does). `object` is `None` for
    /// DELETE, where a webhook's patch is an error.
    pub async fn mutate(
        &self,
        req: &Request<'_>,
        object: Option<Value>,
        old: Option<&Value>,
    ) -> Result<Option<Value>, ApiError> {
        let hooks = self.relevant(MUTATING, req, object.as_ref(), old)?;
        let mut object = object;
        for hook in hooks {
            match self.call(&hook, req, object.as_ref(), old, true).await {
                Ok(None) => {}
                Ok(Some(patch)) => {
                    let Some(mut obj) = object.take() else {
                        return Err(internal_error(format!(
                            "admission webhook \"{}\" attempted to modify the object, which is not supported for this operation",
                            hook.name
                        )));
                    };
                    json_patch::patch(&mut obj, &patch.0).map_err(internal_error)?;
                    let url_ns = req.rt.namespaced.then_some(req.namespace.as_str());
                    let decoded =
                        meta::decode(req.rt, url_ns, obj).map_err(|e| internal_error(e.message))?;
                    object = Some(decoded);
                }
                Err(failure) => self.settle(&hook, failure)?,
            }
        }
        Ok(object)
    }

    /// Runs the matching validating webhooks (in parallel); the first failure in webhook order
    /// fails the request.
    pub async fn validate(
        &self,
        req: &Request<'_>,
        object: Option<&Value>,
        old: Option<&Value>,
    ) -> Result<(), ApiError> {
        let hooks = self.relevant(VALIDATING, req, object, old)?;
        let calls = hooks
            .iter()
            .map(|hook| self.call(hook, req, object, old, false));
        let results = futures::future::join_all(calls).await;
        for (hook, result) in hooks.iter().zip(results) {
            if let Err(failure) = result {
                self.settle(hook, failure)?;
            }
        }
        Ok(())
    }

    /// A failed call is skipped (logged) under `failurePolicy: Ignore`, else fails the request.
    fn settle(&self, hook: &Hook, failure: Failure) -> Result<(), ApiError> {
        match failure {
            Failure::Call(reason) if hook.ignore_failures => {
                tracing::warn!(webhook = %hook.name, configuration = %hook.configuration, %reason, "failed calling webhook, failing open");
                Ok(())
            }
            Failure::Call(reason) => {
                tracing::warn!(webhook = %hook.name, configuration = %hook.configuration, %reason, "failed calling webhook, failing closed");
                Err(internal_error(format!(
                    "failed calling webhook \"{}\": {reason}",
                    hook.name
                )))
            }
            Failure::Error(e) => Err(e),
        }
    }

    /// The webhooks of `kind` configurations that apply to this request: rules, then
    /// `namespaceSelector`, then `objectSelector` (`matchConditions` are not evaluated).
    fn relevant(
        &self,
        kind: &str,
        req: &Request<'_>,
        object: Option<&Value>,
        old: Option<&Value>,
    ) -> Result<Vec<Hook>, ApiError> {
        // The real server never sends webhook configurations to webhooks.
        if req.rt.group == ADMISSION_GROUP {
            return Ok(Vec::new());
        }
        let mut namespace_labels: Option<BTreeMap<String, String>> = None;
        let mut out = Vec::new();
        for hook in config::hooks(&self.store.list(API_VERSION, kind, None)) {
            if !hook.rules.iter().any(|r| rule_matches(r, req)) {
                continue;
            }
            // A cluster-scoped object other than a namespace is never excluded by namespace,
            // nor is a request on a collection across namespaces.
            let namespace_scoped =
                !req.namespace.is_empty() || (req.is_namespace() && object.is_some());
            if namespace_scoped && !hook.namespace_selector.is_empty() {
                if namespace_labels.is_none() {
                    namespace_labels = Some(self.namespace_labels(req, object)?);
                }
                let labels = namespace_labels.as_ref().map_or(&EMPTY_LABELS, |l| l);
                if !hook.namespace_selector.matches(labels) {
                    continue;
                }
            }
            if !hook.object_selector.is_empty()
                && !object.is_some_and(|o| hook.object_selector.matches_object(o))
                && !old.is_some_and(|o| hook.object_selector.matches_object(o))
            {
                continue;
            }
            out.push(hook);
        }
        Ok(out)
    }

    /// Labels a `namespaceSelector` is matched against: a Namespace being created or updated
    /// is matched by its own (new) labels, anything else by its namespace's stored labels.
    fn namespace_labels(
        &self,
        req: &Request<'_>,
        object: Option<&Value>,
    ) -> Result<BTreeMap<String, String>, ApiError> {
        let own = req.is_namespace()
            && req.subresource.is_empty()
            && matches!(req.operation, Operation::Create | Operation::Update);
        let ns = if own {
            object.cloned()
        } else {
            self.store.get("v1", "Namespace", None, &req.namespace)
        };
        let Some(ns) = ns else {
            return Err(ApiError::not_found("", "namespaces", &req.namespace));
        };
        Ok(ns
            .pointer("/metadata/labels")
            .and_then(Value::as_object)
            .map(|l| {
                l.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// One call: send the review, check the answer, turn a denial into its error and a patch
    /// into a JSON patch.
    async fn call(
        &self,
        hook: &Hook,
        req: &Request<'_>,
        object: Option<&Value>,
        old: Option<&Value>,
        mutating: bool,
    ) -> Result<Option<json_patch::Patch>, Failure> {
        *self.calls.lock().entry(hook.name.clone()).or_default() += 1;
        let uid = meta::new_uid();
        let review = req.review(&uid, object, old);
        let body = serde_json::to_vec(&review)
            .map_err(|e| Failure::Call(format!("could not create admission objects: {e}")))?;
        tracing::debug!(webhook = %hook.name, configuration = %hook.configuration, operation = req.operation.as_str(), resource = %req.rt.plural, name = %req.name, "calling admission webhook");
        let response = client::post(&self.store, &hook.client, hook.timeout, body)
            .await
            .map_err(Failure::Call)?;
        let verdict = verify(&uid, mutating, &response)
            .map_err(|e| Failure::Call(format!("received invalid webhook response: {e}")))?;
        if !verdict.allowed {
            return Err(Failure::Error(denied(&hook.name, verdict.status.as_ref())));
        }
        let Some(patch) = verdict.patch else {
            return Ok(None);
        };
        let patch: json_patch::Patch =
            serde_json::from_slice(&patch).map_err(|e| Failure::Error(internal_error(e)))?;
        if patch.0.is_empty() {
            return Ok(None);
        }
        if object.is_none() {
            return Err(Failure::Error(internal_error(format!(
                "admission webhook \"{}\" attempted to modify the object, which is not supported for this operation",
                hook.name
            ))));
        }
        if verdict.patch_type != "JSONPatch" {
            return Err(Failure::Call(format!(
                "unsupported patch type {:?}",
                verdict.patch_type
            )));
        }
        Ok(Some(patch))
    }
}

static EMPTY_LABELS: BTreeMap<String, String> = BTreeMap::new();

/// The real server's rule `Matcher`: operation, group, version, resource[/subresource], scope.
fn rule_matches(rule: &RuleWithOperations, req: &Request<'_>) -> bool {
    let any = |list: &Option<Vec<String>>, value: &str| {
        list.as_ref()
            .is_some_and(|l| l.iter().any(|x| x == "*" || x == value))
    };
    let resource = rule.resources.iter().flatten().any(|r| {
        let (res, sub) = r.split_once('/').unwrap_or((r.as_str(), ""));
        (res == "*" || res == req.rt.plural) && (sub == "*" || sub == req.subresource)
    });
    let scope = match rule.scope.as_deref() {
        Some("Namespaced") => !req.is_namespace() && !req.namespace.is_empty(),
        Some("Cluster") => req.is_namespace() || req.namespace.is_empty(),
        _ => true,
    };
    any(&rule.operations, req.operation.as_str())
        && any(&rule.api_groups, &req.rt.group)
        && any(&rule.api_versions, &req.rt.version)
        && resource
        && scope
}

/// `VerifyAdmissionResponse`: the response must be an `admission.k8s.io/v1` `AdmissionReview`
/// answering this uid; only mutating webhooks may patch, and `patch` needs `patchType`.
fn verify(uid: &str, mutating: bool, review: &Value) -> Result<Verdict, String> {
    let Some(response) = review.get("response").filter(|r| r.is_object()) else {
        return Err("webhook response was absent".into());
    };
    let got_uid = response
        .get("uid")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if got_uid != uid {
        return Err(format!("expected response.uid={uid:?}, got {got_uid:?}"));
    }
    let api_version = review
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let kind = review
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if api_version != "admission.k8s.io/v1" || kind != "AdmissionReview" {
        let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
        return Err(format!(
            "expected webhook response of admission.k8s.io/v1, Kind=AdmissionReview, got {group}/{version}, Kind={kind}"
        ));
    }
    let patch_type = response
        .get("patchType")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let patch = match response.get("patch").and_then(Value::as_str) {
        Some(p) if !p.is_empty() => {
            use base64::Engine as _;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(p)
                .map_err(|e| format!("illegal base64 data in response.patch: {e}"))?;
            Some(bytes)
        }
        _ => None,
    };
    if patch.is_some() && patch_type.is_empty() {
        return Err("webhook returned response.patch but not response.patchType".into());
    }
    if patch.is_some() && !mutating {
        return Err("validating webhooks may not return response.patch".into());
    }
    if patch.is_none() && !patch_type.is_empty() {
        return Err("webhook returned response.patchType but not response.patch".into());
    }
    Ok(Verdict {
        allowed: response
            .get("allowed")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        status: response.get("status").filter(|s| s.is_object()).cloned(),
        patch,
        patch_type,
    })
}

/// `webhookerrors.ToStatusErr`: the webhook's status, with a code of at least 400 (403 when it
/// gave none) and the message prefixed with who denied the request.
fn denied(hook: &str, status: Option<&Value>) -> ApiError {
    let empty = json!({});
    let status = status.unwrap_or(&empty);
    let s = |k: &str| {
        status
            .get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let code = status
        .get("code")
        .and_then(Value::as_u64)
        .and_then(|c| u16::try_from(c).ok())
        .filter(|c| (400..1000).contains(c))
        .unwrap_or(403);
    let (message, reason) = (s("message"), s("reason"));
    let denied_by = format!("admission webhook {hook:?} denied the request");
    let message = if !message.is_empty() {
        format!("{denied_by}: {message}")
    } else if !reason.is_empty() {
        format!("{denied_by}: {reason}")
    } else {
        format!("{denied_by} without explanation")
    };
    let mut err = ApiError::new(code, "", message);
    err.reason = reason.into();
    if let Some(d) = status.get("details").filter(|d| d.is_object()) {
        let ds = |k: &str| d.get(k).and_then(Value::as_str).unwrap_or_default();
        err.details = Some(Box::new(Details {
            name: ds("name").to_string(),
            group: ds("group").to_string(),
            kind: ds("kind").to_string(),
            causes: d
                .get("causes")
                .and_then(Value::as_array)
                .map(|cs| {
                    cs.iter()
                        .map(|c| {
                            let cs = |k: &str| {
                                c.get(k)
                                    .and_then(Value::as_str)
                                    .unwrap_or_default()
                                    .to_string()
                            };
                            Cause {
                                reason: cs("reason"),
                                message: cs("message"),
                                field: cs("field"),
                            }
                        })
                        .collect()
                })
                .unwrap_or_default(),
        }));
    }
    err
}

/// `apierrors.NewInternalError`: 500 `InternalError`, `Internal error occurred: <detail>`.
fn internal_error(detail: impl Display) -> ApiError {
    let detail = detail.to_string();
    let mut err = ApiError::internal(format!("Internal error occurred: {detail}"));
    err.details = Some(Box::new(Details {
        causes: vec![Cause {
            reason: String::new(),
            message: detail,
            field: String::new(),
        }],
        ..Details::default()
    }));
    err
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Registry;

    fn request<'a>(rt: &'a ResourceType, op: Operation, ns: &str) -> Request<'a> {
        Request {
            rt,
            operation: op,
            subresource: "",
            namespace: ns.to_string(),
            name: "x".into(),
            dry_run: false,
            options: json!({"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"}),
        }
    }

    fn rule(v: Value) -> RuleWithOperations {
        serde_json::from_value(v).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn rules_match_like_the_real_matcher() {
        let r = Registry::with_builtins();
        let pods = r.get("", "v1", "pods").unwrap_or_else(|| panic!("pods"));
        let nss = r
            .get("", "v1", "namespaces")
            .unwrap_or_else(|| panic!("namespaces"));
        let create_pod = request(&pods, Operation::Create, "demo");
        let pod_rule = rule(
            json!({"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}),
        );
        assert!(rule_matches(&pod_rule, &create_pod));
        assert!(!rule_matches(
            &pod_rule,
            &request(&pods, Operation::Update, "demo")
        ));
        let mut status = request(&pods, Operation::Update, "demo");
        status.subresource = "status";
        let any_update = rule(
            json!({"operations": ["*"], "apiGroups": ["*"], "apiVersions": ["*"], "resources": ["*"]}),
        );
        assert!(rule_matches(&any_update, &create_pod));
        assert!(
            !rule_matches(&any_update, &status),
            "'*' has no subresources"
        );
        let pod_status = rule(
            json!({"operations": ["UPDATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods/status"]}),
        );
        assert!(rule_matches(&pod_status, &status));
        let all = rule(
            json!({"operations": ["*"], "apiGroups": ["*"], "apiVersions": ["*"], "resources": ["*/*"]}),
        );
        assert!(rule_matches(&all, &status));

        // Scope: a Namespace is cluster-scoped even though its request carries a namespace.
        let namespaced = rule(
            json!({"operations": ["*"], "apiGroups": ["*"], "apiVersions": ["*"], "resources": ["*"], "scope": "Namespaced"}),
        );
        let cluster = rule(
            json!({"operations": ["*"], "apiGroups": ["*"], "apiVersions": ["*"], "resources": ["*"], "scope": "Cluster"}),
        );
        let create_ns = request(&nss, Operation::Create, "x");
        assert!(rule_matches(&namespaced, &create_pod) && !rule_matches(&cluster, &create_pod));
        assert!(!rule_matches(&namespaced, &create_ns) && rule_matches(&cluster, &create_ns));
    }

    #[test]
    fn reviews_carry_the_request() {
        let r = Registry::with_builtins();
        let pods = r.get("", "v1", "pods").unwrap_or_else(|| panic!("pods"));
        let mut req = request(&pods, Operation::Create, "demo");
        req.name = String::new();
        let review = req.review("u1", Some(&json!({"kind": "Pod"})), None);
        let request = &review["request"];
        assert_eq!(review["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(request["uid"], "u1");
        assert_eq!(
            request["kind"],
            json!({"group": "", "version": "v1", "kind": "Pod"})
        );
        assert_eq!(request["resource"]["resource"], "pods");
        assert_eq!(request["operation"], "CREATE");
        assert_eq!(request["namespace"], "demo");
        assert!(request.get("name").is_none(), "generateName: no name");
        assert_eq!(request["oldObject"], Value::Null);
        assert_eq!(request["userInfo"]["username"], "system:admin");
        assert_eq!(request["dryRun"], false);
    }

    #[test]
    fn responses_are_checked() {
        let ok = |resp: Value| json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": resp});
        assert!(
            verify("u", true, &ok(json!({"uid": "u", "allowed": true}))).is_ok_and(|v| v.allowed)
        );
        let err = |mutating: bool, review: Value| {
            verify("u", mutating, &review).err().unwrap_or_default()
        };
        assert_eq!(err(true, json!({})), "webhook response was absent");
        assert_eq!(
            err(true, ok(json!({"uid": "v", "allowed": true}))),
            "expected response.uid=\"u\", got \"v\""
        );
        assert_eq!(
            err(
                true,
                json!({"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview", "response": {"uid": "u"}})
            ),
            "expected webhook response of admission.k8s.io/v1, Kind=AdmissionReview, got admission.k8s.io/v1beta1, Kind=AdmissionReview"
        );
        assert_eq!(
            err(
                false,
                ok(json!({"uid": "u", "allowed": true, "patchType": "JSONPatch", "patch": "W10="}))
            ),
            "validating webhooks may not return response.patch"
        );
        assert_eq!(
            err(
                true,
                ok(json!({"uid": "u", "allowed": true, "patch": "W10="}))
            ),
            "webhook returned response.patch but not response.patchType"
        );
    }

    #[test]
    fn denials_keep_the_webhook_status() {
        let e = denied(
            "deny.flomesh.io",
            Some(&json!({"code": 422, "reason": "Invalid", "message": "no"})),
        );
        assert_eq!(
            (e.code, e.reason.as_ref(), e.message.as_str()),
            (
                422,
                "Invalid",
                "admission webhook \"deny.flomesh.io\" denied the request: no"
            )
        );
        let e = denied("deny.flomesh.io", Some(&json!({"code": 200})));
        assert_eq!(e.code, 403);
        assert_eq!(
            e.message,
            "admission webhook \"deny.flomesh.io\" denied the request without explanation"
        );
        assert!(e.to_status().get("reason").is_none());
        let e = internal_error("failed calling webhook \"x\": boom");
        assert_eq!(
            e.message,
            "Internal error occurred: failed calling webhook \"x\": boom"
        );
        assert_eq!(e.reason, "InternalError");
    }
}
