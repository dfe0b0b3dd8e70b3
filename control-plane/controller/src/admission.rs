//! The validating admission webhook for mesh objects (FSM's `fsm-validator-mesh-<mesh>`):
//! MeshConfig and the SMI and FSM policies are checked before the API server stores them, so a
//! mistake is refused at `kubectl apply` with the field named, instead of being found later in
//! the controller's log.
//!
//! Two checks, in order:
//! 1. FSM's: the object decodes into its kind (the CRD schema's types) and passes the semantic
//!    validation the catalog applies (durations, CIDRs, cross-field rules); refused with the
//!    field and the FSM code the catalog would log.
//! 2. Beyond FSM: the object is applied to a copy of the current catalog, and the proxies it
//!    touches are compiled and translated by both adapters; an object that any of them cannot
//!    turn into valid data-plane configuration is refused. What the compiler leaves out because
//!    of the object (an unknown route group, a port no service has) is not an error (objects are
//!    often applied before what they name), but comes back as admission warnings, which kubectl
//!    prints.
//!
//! The same server answers CRD ConversionReviews on `POST /convert` ([`crate::conversion`]).
//!
//! Deletions are always allowed. The check runs on the control loop's catalog through
//! [`AdmissionCheck`] messages; a catalog not loaded yet admits with a warning.

use std::time::Duration;

use bytes::Bytes;
use fsm_catalog::{Catalog, MeshObject, decode_manifests};
use fsm_compiler::{MeshView, ProxyRef, ProxyScope, compile_with_view};
use fsm_errcode::{ErrCode, HasErrCode};
use fsm_injector::metrics::{count_admission, count_answer, review_kind};
use fsm_injector::server::{read_json, reply};
use fsm_injector::webhook::{ReviewError, review_request};
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

pub const VALIDATE_PATH: &str = "/validate";
/// At most this many of the proxies an object touches are compiled to check it: enough to meet
/// every shape of configuration the object produces, bounded at 10,000 proxies.
pub const MAX_PROXIES_CHECKED: usize = 100;
/// Longest wait for the control loop's verdict; past it the object is admitted with a warning
/// (the API server's own timeout is 10 s by default).
const VERDICT_TIMEOUT: Duration = Duration::from_secs(5);
/// kubectl shows every warning; a long list helps no one.
const MAX_WARNINGS: usize = 10;

/// A request to the control loop: what would `object` do to the mesh?
pub struct AdmissionCheck {
    pub object: MeshObject,
    pub reply: oneshot::Sender<Verdict>,
}

/// The control loop's answer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Why the object is refused (FSM code first).
    pub refusal: Option<String>,
    pub warnings: Vec<String>,
}

/// Credentials good enough for the adapters to translate with (their content is not checked).
fn placeholder_credentials() -> fsm_ir::ProxyCredentials {
    fsm_ir::ProxyCredentials {
        cert_chain_pem: String::new(),
        private_key_pem: String::new(),
        trust_bundle_pem: String::new(),
    }
}

/// Check 2 (and check 1 again, as the catalog applies it) of `object` against `what_if`, a copy
/// of the current catalog (CPU work: run it off the control loop).
pub fn check(mut what_if: Catalog, object: MeshObject) -> Verdict {
    let key = object.key();
    let _ = what_if.take_changes();
    what_if.apply(object);
    if let Some(rejection) = what_if.rejected().get(&key) {
        return Verdict {
            refusal: Some(format!("{}: {}", rejection.code, rejection.message)),
            warnings: Vec::new(),
        };
    }
    let changes = what_if.take_changes();
    if changes.objects.is_empty() {
        return Verdict::default();
    }
    let scope = ProxyScope::of(&changes);
    let view = MeshView::build(&what_if);
    let named = format!("{}/{}", key.namespace, key.name);
    let mut warnings: Vec<String> = Vec::new();
    let touched = what_if.sidecar_proxies().into_iter().filter(|p| {
        scope.covers(
            &p.uuid,
            &p.namespace,
            &p.service_account,
            fsm_ir::OutboundDetail::All,
        )
    });
    for proxy in touched.take(MAX_PROXIES_CHECKED) {
        let proxy_ref = ProxyRef {
            uuid: proxy.uuid.clone(),
            service_account: proxy.service_account.clone(),
            namespace: proxy.namespace.clone(),
        };
        // A proxy that cannot be compiled at all is a problem of its pod, not of this object.
        let Ok(compiled) =
            compile_with_view(&what_if, &proxy_ref, &view, fsm_ir::OutboundDetail::All)
        else {
            continue;
        };
        for warning in &compiled.warnings {
            let text = format!("{}: {}", warning.code, warning.message);
            if text.contains(&named) && !warnings.contains(&text) {
                warnings.push(text);
            }
        }
        let at = format!("{}/{}", proxy.namespace, proxy.pod);
        let invalid = |what: &str, e: String| Verdict {
            refusal: Some(format!(
                "{}: {key} would give the sidecar of pod {at} configuration {what} rejects: {e}",
                ErrCode::E5007
            )),
            warnings: Vec::new(),
        };
        if let Err(e) = compiled.ir.validate() {
            return invalid("the mesh's IR", e.to_string());
        }
        let credentials = placeholder_credentials();
        if let Err(e) = fsm_adapter_envoy::translate(&compiled.ir, &credentials) {
            return invalid("Envoy", e.to_string());
        }
        if let Err(e) = fsm_adapter_native::translate(&compiled.ir, &credentials) {
            return invalid("fsm-sidecar", e.to_string());
        }
    }
    warnings.truncate(MAX_WARNINGS);
    Verdict {
        refusal: None,
        warnings,
    }
}

/// Answers one HTTP request of the webhook server.
pub async fn handle(
    checks: mpsc::Sender<AdmissionCheck>,
    request: Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    match (request.method().as_str(), request.uri().path()) {
        ("GET", "/healthz") => reply(StatusCode::OK, "\"ok\"".into()),
        ("POST", VALIDATE_PATH) => {
            let review = match read_json(request).await {
                Ok(review) => review,
                Err(response) => {
                    count_admission("", false);
                    return response;
                }
            };
            let kind = review_kind(&review);
            match review_response(&review, &checks).await {
                Ok(answer) => {
                    count_answer(kind, &answer);
                    reply(StatusCode::OK, answer.to_string())
                }
                Err(e) => {
                    fsm_errcode::warn!(e.err_code(), error = %e, "unreadable AdmissionReview");
                    count_admission(kind, false);
                    reply(
                        StatusCode::BAD_REQUEST,
                        Value::String(e.to_string()).to_string(),
                    )
                }
            }
        }
        ("POST", crate::conversion::CONVERT_PATH) => {
            let review = match read_json(request).await {
                Ok(review) => review,
                Err(response) => return response,
            };
            match crate::conversion::respond(&review) {
                Ok(answer) => reply(StatusCode::OK, answer.to_string()),
                Err(e) => {
                    let code = ErrCode::E3002;
                    fsm_errcode::warn!(code, error = %e, "unreadable ConversionReview");
                    reply(
                        StatusCode::BAD_REQUEST,
                        Value::String(format!("{code}: {e}")).to_string(),
                    )
                }
            }
        }
        _ => reply(StatusCode::NOT_FOUND, "\"not found\"".into()),
    }
}

/// The AdmissionReview answering `review`. A refusal is an error returned to the client: it
/// carries its FSM code first and is counted (logged at info: the client is told).
async fn review_response(
    review: &Value,
    checks: &mpsc::Sender<AdmissionCheck>,
) -> Result<Value, ReviewError> {
    let (request, uid) = review_request(review)?;
    let operation = request.get("operation").and_then(Value::as_str);
    let verdict = match (operation, request.get("object")) {
        (Some("CREATE" | "UPDATE"), Some(object)) if !object.is_null() => {
            verdict_for(object, checks).await
        }
        _ => Verdict::default(),
    };
    let mut response = json!({"uid": uid, "allowed": verdict.refusal.is_none()});
    if let Some(message) = &verdict.refusal {
        // Every refusal is written code first ([`Verdict::refusal`]).
        let code = ErrCode::prefix_of(message).unwrap_or(ErrCode::E3002);
        fsm_errcode::info!(code, %message, "refused a mesh object");
        response["status"] = json!({"code": 422, "reason": "Invalid", "message": message});
    }
    if !verdict.warnings.is_empty() {
        response["warnings"] = json!(verdict.warnings);
    }
    Ok(json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": response,
    }))
}

/// Check 1: `object` as the mesh reads it (`None`: a kind the mesh does not read), or why it is
/// refused: FSM code, object, field, problem.
fn decode_object(object: &Value) -> Result<Option<MeshObject>, String> {
    let (mut objects, errors) = decode_manifests("admission", &object.to_string());
    if let Some(e) = errors.first() {
        let what = e.object.clone().unwrap_or_else(|| "the object".into());
        let field = e
            .field
            .as_deref()
            .map(|f| format!(" {f}:"))
            .unwrap_or_default();
        return Err(format!("{}: {what}:{field} {}", e.err_code(), e.message));
    }
    Ok(objects.pop())
}

async fn verdict_for(object: &Value, checks: &mpsc::Sender<AdmissionCheck>) -> Verdict {
    let object = match decode_object(object) {
        Ok(Some(object)) => object,
        // Not a kind the mesh reads: nothing to check.
        Ok(None) => return Verdict::default(),
        Err(refusal) => {
            return Verdict {
                refusal: Some(refusal),
                warnings: Vec::new(),
            };
        }
    };
    let (reply, answer) = oneshot::channel();
    if checks.send(AdmissionCheck { object, reply }).await.is_err() {
        return unchecked("the control loop is not running");
    }
    match tokio::time::timeout(VERDICT_TIMEOUT, answer).await {
        Ok(Ok(verdict)) => verdict,
        Ok(Err(_)) => unchecked("the control loop dropped the check"),
        Err(_) => unchecked("the control loop did not answer in time"),
    }
}

fn unchecked(why: &str) -> Verdict {
    Verdict {
        refusal: None,
        warnings: vec![format!(
            "not compiled before admission: {why}; the controller checks it when it applies it"
        )],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fsm_catalog::CatalogSettings;

    fn catalog(manifests: &str) -> Catalog {
        let (objects, errors) = decode_manifests("test", manifests);
        assert!(errors.is_empty(), "{errors:?}");
        let mut catalog = Catalog::new(CatalogSettings::default());
        for object in objects {
            catalog.apply(object);
        }
        let _ = catalog.take_changes();
        catalog
    }

    fn object(yaml: &str) -> MeshObject {
        let (mut objects, errors) = decode_manifests("test", yaml);
        assert!(errors.is_empty(), "{errors:?}");
        objects.pop().expect("one object")
    }

    const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {flomesh.io/monitored-by: fsm}}
---
apiVersion: v1
kind: Service
metadata: {name: httpbin, namespace: demo}
spec: {clusterIP: 10.96.0.10, selector: {app: httpbin}, ports: [{name: http, port: 14001, appProtocol: http}]}
---
apiVersion: v1
kind: Pod
metadata: {name: httpbin, namespace: demo, labels: {app: httpbin, fsm-proxy-uuid: 6f0e0b8e-0000-4000-8000-000000000001}}
spec: {serviceAccountName: httpbin, containers: [{name: app, ports: [{containerPort: 14001}]}]}
status: {podIP: 10.0.0.5}
"#;

    #[test]
    fn an_invalid_policy_is_refused_with_its_field_and_code() {
        let retry = json!({
            "apiVersion": "policy.flomesh.io/v1alpha1",
            "kind": "Retry",
            "metadata": {"name": "r", "namespace": "demo"},
            "spec": {
                "source": {"kind": "ServiceAccount", "name": "curl", "namespace": "demo"},
                "destinations": [{"kind": "Service", "name": "httpbin", "namespace": "demo"}],
                "retryPolicy": {"retryOn": "5xx", "numRetries": 3, "perTryTimeout": "forever"},
            },
        });
        let refusal = decode_object(&retry).expect_err("refused");
        assert!(
            refusal.contains("Retry demo/r: spec.retryPolicy.perTryTimeout: ")
                && refusal.contains("\"forever\""),
            "{refusal}"
        );
        assert!(refusal.starts_with('E'), "{refusal}");
        // A kind the mesh does not read passes untouched.
        let config_map =
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}});
        assert!(decode_object(&config_map).expect("readable").is_none());
    }

    #[test]
    fn what_no_data_plane_implements_is_admitted_with_the_compilers_warning() {
        let mesh = format!(
            "{MESH}---{}",
            r#"
apiVersion: v1
kind: Pod
metadata: {name: curl, namespace: demo, labels: {app: curl, fsm-proxy-uuid: 6f0e0b8e-0000-4000-8000-000000000002}}
spec: {serviceAccountName: curl, containers: [{name: app}]}
status: {podIP: 10.0.0.6}
---
apiVersion: config.flomesh.io/v1alpha3
kind: MeshConfig
metadata: {name: fsm-mesh-config, namespace: fsm-system}
spec: {featureFlags: {enableRetryPolicy: true}}
"#
        );
        let catalog = catalog(&mesh);
        let verdict = check(
            catalog,
            object(
                r#"
apiVersion: policy.flomesh.io/v1alpha1
kind: Retry
metadata: {name: r, namespace: demo}
spec:
  source: {kind: ServiceAccount, name: curl, namespace: demo}
  destinations: [{kind: Service, name: httpbin, namespace: demo}]
  retryPolicy: {retryOn: "5xx,envoy-ratelimited", numRetries: 3, perTryTimeout: 1s}
"#,
            ),
        );
        // The compiler leaves out what no data plane implements, and says so.
        assert_eq!(verdict.refusal, None);
        assert!(
            verdict
                .warnings
                .iter()
                .any(|w| w.starts_with("E2008: Retry demo/r") && w.contains("envoy-ratelimited")),
            "{verdict:?}"
        );
    }

    #[test]
    fn what_the_catalog_would_refuse_is_refused() {
        // Built without the decoder (which refuses it first), as a safety net for check 2.
        let retry: fsm_crds::policy::v1alpha1::Retry = serde_json::from_value(json!({
            "apiVersion": "policy.flomesh.io/v1alpha1",
            "kind": "Retry",
            "metadata": {"name": "r", "namespace": "demo"},
            "spec": {
                "source": {"kind": "ServiceAccount", "name": "curl", "namespace": "demo"},
                "destinations": [{"kind": "Service", "name": "httpbin", "namespace": "demo"}],
                "retryPolicy": {"retryOn": "5xx", "numRetries": 3, "perTryTimeout": "forever"},
            },
        }))
        .expect("retry");
        let verdict = check(catalog(MESH), MeshObject::Retry(retry));
        let refusal = verdict.refusal.expect("refused");
        assert!(
            refusal.starts_with('E') && refusal.contains("perTryTimeout"),
            "{refusal}"
        );
    }

    #[test]
    fn a_policy_naming_what_does_not_exist_is_admitted_with_a_warning() {
        let catalog = catalog(MESH);
        let verdict = check(
            catalog,
            object(
                r#"
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: t, namespace: demo}
spec:
  destination: {kind: ServiceAccount, name: httpbin, namespace: demo}
  rules: [{kind: HTTPRouteGroup, name: missing, matches: [all]}]
  sources: [{kind: ServiceAccount, name: curl, namespace: demo}]
"#,
            ),
        );
        assert_eq!(verdict.refusal, None);
        assert!(
            verdict.warnings.iter().any(|w| w.contains("demo/t")),
            "{verdict:?}"
        );
    }

    #[test]
    fn an_unchanged_object_is_admitted_quietly() {
        let retry = r#"
apiVersion: policy.flomesh.io/v1alpha1
kind: Retry
metadata: {name: r, namespace: demo}
spec:
  source: {kind: ServiceAccount, name: curl, namespace: demo}
  destinations: [{kind: Service, name: httpbin, namespace: demo}]
  retryPolicy: {retryOn: 5xx, numRetries: 3, perTryTimeout: 1s}
"#;
        let catalog = catalog(&format!("{MESH}---{retry}"));
        assert_eq!(check(catalog.clone(), object(retry)), Verdict::default());
    }
}
