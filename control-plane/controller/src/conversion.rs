//! The CRD conversion webhook (`POST /convert` on the validating webhook's server): answers
//! `apiextensions.k8s.io/v1` ConversionReviews for the one mesh CRD serving several versions,
//! `trafficsplits.split.smi-spec.io` (v1alpha4 stored, v1alpha2 served too).
//!
//! v1alpha2 has no `spec.matches`. Converting a v1alpha4 object down keeps its matches in the
//! annotation [`MATCHES_ANNOTATION`], and converting it back up restores them, so a v1alpha2
//! client that reads and writes an object (`kubectl edit` through the old version) does not
//! silently drop the routes it cannot see, which the `None` strategy would.
//!
//! The API server calls it once the CRD's `spec.conversion` says `strategy: Webhook` with this
//! service and path, which the controller writes, with the mesh's roots, into every CRD of
//! [`converted_crds`] at start-up and on every certificate rotation (`fsm_injector::server::
//! publish_ca_bundle`); every object converted counts in
//! `fsm_conversion_webhook_resource_total{kind,success,from_version,to_version}` (versions as
//! `apiVersion`s).

use serde_json::{Value, json};

pub const CONVERT_PATH: &str = "/convert";

/// Where a v1alpha2 object keeps the v1alpha4 `spec.matches` it cannot hold (JSON).
pub const MATCHES_ANNOTATION: &str = "split.smi-spec.io/v1alpha4-matches";

const GROUP: &str = "split.smi-spec.io";
const KIND: &str = "TrafficSplit";

/// The mesh CRDs serving more than one version (of the chart's, `fsm_crds::crdgen::all_crds`):
/// those whose conversion is this webhook.
pub fn converted_crds() -> Vec<String> {
    fsm_crds::crdgen::all_crds()
        .into_iter()
        .filter(|crd| crd.spec.versions.iter().filter(|v| v.served).count() > 1)
        .filter_map(|crd| crd.metadata.name)
        .collect()
}

/// The ConversionReview answering `review`, or why it cannot be read (answered 400).
pub fn respond(review: &Value) -> Result<Value, String> {
    let request = review
        .get("request")
        .ok_or("the ConversionReview has no request")?;
    let uid = request
        .get("uid")
        .and_then(Value::as_str)
        .ok_or("request.uid is missing")?;
    let desired = request
        .get("desiredAPIVersion")
        .and_then(Value::as_str)
        .ok_or("request.desiredAPIVersion is missing")?;
    let objects = request
        .get("objects")
        .and_then(Value::as_array)
        .ok_or("request.objects is missing")?;
    let mut converted = Vec::with_capacity(objects.len());
    let mut failure = None;
    for object in objects {
        let kind = object.get("kind").and_then(Value::as_str).unwrap_or("");
        let from = object
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or("");
        let result = convert(object, desired);
        crate::metrics::fsm()
            .conversion_webhook_resource_total
            .with_label_values(&[
                kind,
                if result.is_ok() { "true" } else { "false" },
                from,
                desired,
            ])
            .inc();
        match result {
            Ok(object) => converted.push(object),
            Err(message) => {
                // The object could not be marshalled into the version asked for.
                fsm_errcode::warn!(fsm_errcode::ErrCode::E3001, kind, from, to = desired, %message, "conversion refused");
                failure.get_or_insert(message);
            }
        }
    }
    // All or nothing: the API server takes no partial answer.
    let response = match failure {
        None => json!({"uid": uid, "convertedObjects": converted, "result": {"status": "Success"}}),
        Some(message) => {
            json!({"uid": uid, "result": {"status": "Failure", "message": message}})
        }
    };
    Ok(json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "ConversionReview",
        "response": response,
    }))
}

/// `object` as `desired` (an `apiVersion`).
pub fn convert(object: &Value, desired: &str) -> Result<Value, String> {
    let from = object
        .get("apiVersion")
        .and_then(Value::as_str)
        .ok_or("an object without apiVersion")?;
    let kind = object.get("kind").and_then(Value::as_str).unwrap_or("");
    let version = |api_version: &str| {
        api_version
            .strip_prefix(GROUP)
            .and_then(|v| v.strip_prefix('/'))
            .map(str::to_owned)
    };
    let (Some(from_version), Some(to_version)) = (version(from), version(desired)) else {
        return Err(format!("no conversion of {kind} from {from} to {desired}"));
    };
    if kind != KIND {
        return Err(format!("no conversion of {kind} from {from} to {desired}"));
    }
    let mut object = object.clone();
    match (from_version.as_str(), to_version.as_str()) {
        (a, b) if a == b => {}
        ("v1alpha4", "v1alpha2") => down(&mut object)?,
        ("v1alpha2", "v1alpha4") => up(&mut object)?,
        _ => return Err(format!("no conversion of {kind} from {from} to {desired}")),
    }
    object["apiVersion"] = Value::String(desired.to_owned());
    Ok(object)
}

/// v1alpha4 → v1alpha2: `spec.matches` into the annotation.
fn down(object: &mut Value) -> Result<(), String> {
    let matches = object
        .get_mut("spec")
        .and_then(Value::as_object_mut)
        .and_then(|spec| spec.remove("matches"));
    if let Some(matches) = matches.filter(|m| m.as_array().is_none_or(|m| !m.is_empty())) {
        let metadata = object
            .get_mut("metadata")
            .and_then(Value::as_object_mut)
            .ok_or("an object without metadata")?;
        let annotations = metadata
            .entry("annotations")
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .ok_or("metadata.annotations is not a map")?;
        annotations.insert(
            MATCHES_ANNOTATION.into(),
            Value::String(matches.to_string()),
        );
    }
    Ok(())
}

/// v1alpha2 → v1alpha4: `spec.matches` back from the annotation.
fn up(object: &mut Value) -> Result<(), String> {
    let kept = object
        .pointer_mut("/metadata/annotations")
        .and_then(Value::as_object_mut)
        .and_then(|a| a.remove(MATCHES_ANNOTATION));
    if let Some(kept) = kept {
        let matches: Value = kept
            .as_str()
            .and_then(|text| serde_json::from_str(text).ok())
            .filter(Value::is_array)
            .ok_or_else(|| format!("annotation {MATCHES_ANNOTATION} is not a JSON list"))?;
        object
            .get_mut("spec")
            .and_then(Value::as_object_mut)
            .ok_or("an object without spec")?
            .insert("matches".into(), matches);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_converted_crds_are_the_multi_version_ones_this_webhook_converts() {
        assert_eq!(
            converted_crds(),
            [format!("trafficsplits.{GROUP}")],
            "a new multi-version CRD needs its conversion here first"
        );
    }

    fn split(api_version: &str, matches: Option<Value>) -> Value {
        let mut object = json!({
            "apiVersion": api_version, "kind": "TrafficSplit",
            "metadata": {"name": "s", "namespace": "demo", "uid": "u"},
            "spec": {"service": "httpbin", "backends": [{"service": "httpbin-v1", "weight": 1}]},
        });
        if let Some(matches) = matches {
            object["spec"]["matches"] = matches;
        }
        object
    }

    #[test]
    fn matches_survive_a_round_trip_through_v1alpha2() {
        let matches = json!([{"kind": "HTTPRouteGroup", "name": "routes"}]);
        let v4 = split("split.smi-spec.io/v1alpha4", Some(matches.clone()));
        let v2 = convert(&v4, "split.smi-spec.io/v1alpha2").expect("down");
        assert_eq!(v2["apiVersion"], "split.smi-spec.io/v1alpha2");
        assert!(v2["spec"].get("matches").is_none());
        assert_eq!(
            v2["metadata"]["annotations"][MATCHES_ANNOTATION],
            matches.to_string()
        );
        assert_eq!(v2["metadata"]["uid"], "u", "metadata is kept");
        let back = convert(&v2, "split.smi-spec.io/v1alpha4").expect("up");
        assert_eq!(back["spec"]["matches"], matches);
        assert!(
            back["metadata"]["annotations"]
                .get(MATCHES_ANNOTATION)
                .is_none()
        );
        // Without matches nothing is added either way.
        let plain = convert(
            &split("split.smi-spec.io/v1alpha4", None),
            "split.smi-spec.io/v1alpha2",
        )
        .expect("down");
        assert!(plain["metadata"].get("annotations").is_none());
    }

    #[test]
    fn a_review_is_answered_whole_and_every_object_counted() {
        let counter = &crate::metrics::fsm().conversion_webhook_resource_total;
        let labels = [
            "TrafficSplit",
            "true",
            "split.smi-spec.io/v1alpha2",
            "split.smi-spec.io/v1alpha4",
        ];
        let before = counter.with_label_values(&labels).get();
        let review = json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "ConversionReview",
            "request": {"uid": "r1", "desiredAPIVersion": "split.smi-spec.io/v1alpha4",
                        "objects": [split("split.smi-spec.io/v1alpha2", None),
                                    split("split.smi-spec.io/v1alpha2", None)]}});
        let answer = respond(&review).expect("readable");
        assert_eq!(answer["response"]["uid"], "r1");
        assert_eq!(answer["response"]["result"]["status"], "Success");
        assert_eq!(
            answer["response"]["convertedObjects"]
                .as_array()
                .map(Vec::len),
            Some(2)
        );
        assert_eq!(counter.with_label_values(&labels).get(), before + 2);

        let mut bad = split("split.smi-spec.io/v1alpha2", None);
        bad["metadata"]["annotations"] = json!({MATCHES_ANNOTATION: "not json"});
        let review = json!({"request": {"uid": "r2", "desiredAPIVersion": "split.smi-spec.io/v1alpha4",
                                        "objects": [split("split.smi-spec.io/v1alpha2", None), bad]}});
        let answer = respond(&review).expect("readable");
        assert_eq!(answer["response"]["result"]["status"], "Failure");
        assert!(answer["response"].get("convertedObjects").is_none());
        assert!(respond(&json!({})).is_err());
        assert!(convert(&json!({"apiVersion": "v1", "kind": "Pod"}), "v2").is_err());
    }
}
