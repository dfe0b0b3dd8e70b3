//! The mutating admission webhook's reply to one `AdmissionReview` (admission.k8s.io/v1): a pod
//! the injection rules select gets the patch of [`crate::pod::inject`]; any other pod is admitted
//! unchanged; a pod that cannot be injected (a bad annotation, a reserved container name) is
//! refused with a message naming the field, so the user learns at `kubectl apply` time rather than
//! from a pod that never joins the mesh. A review that cannot be read is answered 400 by the
//! server (FSM E6103/E6107).

use base64::Engine as _;
use fsm_crds::config::v1alpha3::MeshConfigSpec;
use fsm_errcode::{ErrCode, HasErrCode};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::{Value, json};

use crate::decision::{Decision, decide};
use crate::pod::{InjectorSettings, inject};

/// What one review needs beyond the request: the mesh's settings and the pod's namespace.
pub struct ReviewContext<'a> {
    pub settings: &'a InjectorSettings,
    pub mesh: &'a MeshConfigSpec,
    /// The metadata of the request's namespace.
    pub namespace: &'a ObjectMeta,
}

/// The parts of an AdmissionReview request the injector reads.
#[derive(Clone, Debug)]
pub struct PodReview {
    pub uid: String,
    pub namespace: String,
    pub pod: Pod,
    pub dry_run: bool,
}

/// Why an AdmissionReview cannot be answered (answered 400): FSM's E6107 when it has no
/// request, E6103 otherwise. Displayed code first.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ReviewError {
    pub code: ErrCode,
    pub message: String,
}

impl HasErrCode for ReviewError {
    fn err_code(&self) -> ErrCode {
        self.code
    }
}

fn unreadable(code: ErrCode, message: String) -> ReviewError {
    ReviewError { code, message }
}

/// The `request` of an AdmissionReview and its `uid`, which the response must echo; the error
/// says what is missing (E6107 no request, E6103 no uid).
pub fn review_request(review: &Value) -> Result<(&Value, &str), ReviewError> {
    let request = review
        .get("request")
        .ok_or_else(|| unreadable(ErrCode::E6107, "the AdmissionReview has no request".into()))?;
    let uid = request
        .get("uid")
        .and_then(Value::as_str)
        .filter(|u| !u.is_empty())
        .ok_or_else(|| unreadable(ErrCode::E6103, "request.uid is missing".into()))?;
    Ok((request, uid))
}

/// Reads the pod review of an AdmissionReview; the error says what is missing (E6103/E6107).
pub fn read_review(review: &Value) -> Result<PodReview, ReviewError> {
    let (request, uid) = review_request(review)?;
    let kind = request.pointer("/kind/kind").and_then(Value::as_str);
    if kind != Some("Pod") {
        return Err(unreadable(
            ErrCode::E6103,
            format!("request.kind.kind is {kind:?}, not Pod"),
        ));
    }
    let pod: Pod = serde_json::from_value(request.get("object").cloned().unwrap_or(Value::Null))
        .map_err(|e| unreadable(ErrCode::E6103, format!("request.object is not a Pod: {e}")))?;
    let namespace = request
        .get("namespace")
        .and_then(Value::as_str)
        .map(str::to_string)
        .or_else(|| pod.metadata.namespace.clone())
        .unwrap_or_else(|| "default".into());
    Ok(PodReview {
        uid: uid.to_string(),
        namespace,
        pod,
        dry_run: request
            .get("dryRun")
            .and_then(Value::as_bool)
            .unwrap_or(false),
    })
}

/// The AdmissionReview answering `review`; `uuid` makes the new proxy's identity.
pub fn respond(
    ctx: &ReviewContext<'_>,
    review: &PodReview,
    uuid: impl FnOnce() -> String,
) -> Value {
    let response = match decide(
        &ctx.settings.mesh_name,
        &ctx.settings.fsm_namespace,
        ctx.namespace,
        &review.pod,
    ) {
        Decision::Skip(why) => {
            tracing::debug!(namespace = %review.namespace, pod = %pod_name(&review.pod), %why, "not injected");
            json!({"uid": review.uid, "allowed": true})
        }
        Decision::Inject => {
            let mut pod = review.pod.clone();
            pod.metadata.namespace = Some(review.namespace.clone());
            match inject(ctx.settings, ctx.mesh, ctx.namespace, &pod, &uuid()) {
                Ok(injection) => {
                    tracing::info!(namespace = %review.namespace, pod = %pod_name(&review.pod), sidecar = injection.class.as_str(), "injected");
                    let patch = serde_json::to_vec(&injection.patch).unwrap_or_default();
                    json!({
                        "uid": review.uid,
                        "allowed": true,
                        "patchType": "JSONPatch",
                        "patch": base64::engine::general_purpose::STANDARD.encode(patch),
                    })
                }
                Err(e) => {
                    let code = ErrCode::E6108;
                    let message = format!(
                        "{code}: pod {}/{} cannot get a sidecar: {e}",
                        review.namespace,
                        pod_name(&review.pod)
                    );
                    fsm_errcode::warn!(code, "{message}");
                    json!({
                        "uid": review.uid,
                        "allowed": false,
                        "status": {"code": 400, "reason": "BadRequest", "message": message},
                    })
                }
            }
        }
    };
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": response,
    })
}

fn pod_name(pod: &Pod) -> String {
    pod.metadata
        .name
        .clone()
        .or_else(|| pod.metadata.generate_name.clone().map(|g| format!("{g}*")))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pod::tests::settings;
    use fsm_catalog::{MONITORED_BY_LABEL, SIDECAR_INJECTION_ANNOTATION};

    fn review(annotations: Value) -> Value {
        json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": "demo",
                "operation": "CREATE",
                "object": {
                    "metadata": {"generateName": "curl-", "annotations": annotations},
                    "spec": {"containers": [{"name": "curl", "image": "curl"}]},
                },
            },
        })
    }

    fn namespace() -> ObjectMeta {
        ObjectMeta {
            name: Some("demo".into()),
            labels: Some([(MONITORED_BY_LABEL.to_string(), "fsm".to_string())].into()),
            annotations: Some(
                [(
                    SIDECAR_INJECTION_ANNOTATION.to_string(),
                    "enabled".to_string(),
                )]
                .into(),
            ),
            ..Default::default()
        }
    }

    fn answer(annotations: Value) -> Value {
        let (settings, mesh, namespace) = (settings(), MeshConfigSpec::default(), namespace());
        let ctx = ReviewContext {
            settings: &settings,
            mesh: &mesh,
            namespace: &namespace,
        };
        let request = read_review(&review(annotations)).expect("readable");
        respond(&ctx, &request, || {
            "6f0e0b8e-0000-4000-8000-000000000001".into()
        })
    }

    #[test]
    fn a_selected_pod_is_patched_another_admitted_a_bad_one_refused() {
        let injected = answer(json!({}));
        let response = &injected["response"];
        assert_eq!(response["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
        assert_eq!(response["allowed"], true);
        assert_eq!(response["patchType"], "JSONPatch");
        let patch = base64::engine::general_purpose::STANDARD
            .decode(response["patch"].as_str().expect("patch"))
            .expect("base64");
        let ops: Vec<Value> = serde_json::from_slice(&patch).expect("json patch");
        assert!(ops.iter().any(|op| op["path"] == "/metadata/labels"
            && op["value"]["fsm-proxy-uuid"] == "6f0e0b8e-0000-4000-8000-000000000001"));

        let skipped = answer(json!({SIDECAR_INJECTION_ANNOTATION: "disabled"}));
        assert_eq!(skipped["response"]["allowed"], true);
        assert!(skipped["response"].get("patch").is_none());

        let refused = answer(json!({"flomesh.io/sidecar-class": "pipy"}));
        assert_eq!(refused["response"]["allowed"], false);
        assert_eq!(refused["response"]["status"]["code"], 400);
        let message = refused["response"]["status"]["message"]
            .as_str()
            .unwrap_or_default();
        assert!(message.starts_with("E6108: pod demo/curl-* cannot get a sidecar: metadata.annotations[\"flomesh.io/sidecar-class\"]"), "{message}");
    }

    #[test]
    fn unreadable_reviews_are_named() {
        let no_request = read_review(&json!({})).expect_err("no request");
        assert_eq!(no_request.err_code(), ErrCode::E6107);
        assert!(
            no_request.to_string().starts_with("E6107: "),
            "{no_request}"
        );
        let mut not_a_pod = review(json!({}));
        not_a_pod["request"]["kind"]["kind"] = json!("Service");
        let not_a_pod = read_review(&not_a_pod).expect_err("not a pod");
        assert_eq!(not_a_pod.err_code(), ErrCode::E6103);
        assert!(not_a_pod.to_string().contains("request.kind.kind"));
        let mut no_uid = review(json!({}));
        no_uid["request"]["uid"] = json!("");
        assert!(
            read_review(&no_uid)
                .expect_err("no uid")
                .to_string()
                .contains("request.uid")
        );
    }
}
