//! `split.smi-spec.io/v1alpha4` `TrafficSplit`: spreads traffic for a root (apex) service over
//! weighted backend services in the same namespace.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::validate::{Errors, FieldError, Validate};

/// Spreads traffic addressed to `service` over `backends` by weight.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "split.smi-spec.io",
    version = "v1alpha4",
    kind = "TrafficSplit",
    plural = "trafficsplits",
    shortname = "ts",
    namespaced,
    derive = "PartialEq",
    label("app.kubernetes.io/name", "flomesh.io"),
    label("flomesh.io/reconcile", "true"),
    printcolumn(
        name = "Service",
        type_ = "string",
        description = "The apex service of this split.",
        json_path = ".spec.service"
    ),
    doc = "TrafficSplit spreads traffic for a root service over weighted backend services."
)]
#[serde(rename_all = "camelCase")]
pub struct TrafficSplitSpec {
    /// The root (apex) service: `svc`, `svc.ns`, or an FQDN such as
    /// `svc.ns.svc.cluster.local`, always in the TrafficSplit's namespace.
    pub service: String,
    /// Backend services (names in the same namespace) and their weights.
    pub backends: Vec<TrafficSplitBackend>,
    /// HTTPRouteGroups restricting which requests are split; empty splits all traffic.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<TrafficSplitMatch>,
}

/// One backend of a split.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct TrafficSplitBackend {
    /// Name of a Service in the TrafficSplit's namespace.
    pub service: String,
    // Signed so that a negative weight is reported by `Validate` instead of failing to parse.
    /// Relative weight; 0 sends this backend no traffic.
    pub weight: i32,
}

/// An HTTPRouteGroup the split applies to.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct TrafficSplitMatch {
    pub kind: TrafficSplitMatchKind,
    pub name: String,
}

/// Kinds a TrafficSplit match may name.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum TrafficSplitMatchKind {
    #[serde(rename = "HTTPRouteGroup")]
    HttpRouteGroup,
}

impl TrafficSplitSpec {
    /// The root service's name: the first DNS label of `service` (the namespace is always the
    /// TrafficSplit's, as in FSM).
    pub fn root_service_name(&self) -> &str {
        self.service.split('.').next().unwrap_or_default()
    }
}

impl Validate for TrafficSplit {
    fn validate(&self) -> Vec<FieldError> {
        validate_spec(&self.spec, self.metadata.namespace.as_deref())
    }
}

/// Shared with `v1alpha2`, whose spec is a subset of this one.
pub(crate) fn validate_spec(spec: &TrafficSplitSpec, namespace: Option<&str>) -> Vec<FieldError> {
    let mut errs = Errors::new();

    let labels: Vec<&str> = spec.service.split('.').collect();
    if spec.service.trim().is_empty() || labels.iter().any(|l| l.is_empty()) {
        errs.push(
            "spec.service",
            format!(
                "invalid service {:?}: expected a service name or FQDN such as \"bookstore.default.svc.cluster.local\"",
                spec.service
            ),
        );
    } else if let (Some(ns), Some(host_ns)) = (namespace, labels.get(1))
        && host_ns != &ns
    {
        errs.push(
            "spec.service",
            format!(
                "service {:?} must be in the TrafficSplit's namespace {ns:?}",
                spec.service
            ),
        );
    }

    if spec.backends.is_empty() {
        errs.push("spec.backends", "at least one backend is required");
    }
    let mut total: i64 = 0;
    for (i, backend) in spec.backends.iter().enumerate() {
        errs.non_empty(format!("spec.backends[{i}].service"), &backend.service);
        if backend.weight < 0 {
            errs.push(
                format!("spec.backends[{i}].weight"),
                format!("weight {} must not be negative", backend.weight),
            );
        } else {
            total += i64::from(backend.weight);
        }
    }
    if !spec.backends.is_empty() && total == 0 {
        errs.push(
            "spec.backends",
            "the sum of the backend weights must be greater than zero",
        );
    }

    for (i, m) in spec.matches.iter().enumerate() {
        errs.non_empty(format!("spec.matches[{i}].name"), &m.name);
    }
    errs.into_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::test_support::fields;

    fn backend(service: &str, weight: i32) -> TrafficSplitBackend {
        TrafficSplitBackend {
            service: service.into(),
            weight,
        }
    }

    fn split(service: &str, backends: Vec<TrafficSplitBackend>) -> TrafficSplit {
        let mut ts = TrafficSplit::new(
            "bookstore-split",
            TrafficSplitSpec {
                service: service.into(),
                backends,
                matches: Vec::new(),
            },
        );
        ts.metadata.namespace = Some("default".into());
        ts
    }

    #[test]
    fn valid_splits() {
        for service in [
            "bookstore",
            "bookstore.default",
            "bookstore.default.svc.cluster.local",
        ] {
            let ts = split(
                service,
                vec![backend("bookstore-v1", 90), backend("bookstore-v2", 10)],
            );
            assert!(ts.validate().is_empty(), "{service}");
            assert_eq!(ts.spec.root_service_name(), "bookstore");
        }
        // A zero weight is a cut-over, not an error (traffic-policy.md §7 item 2).
        let cutover = split(
            "bookstore",
            vec![backend("bookstore", 0), backend("bookstore-v2", 100)],
        );
        assert!(cutover.validate().is_empty());
    }

    #[test]
    fn weights_must_be_non_negative_with_positive_total() {
        let ts = split("bookstore", vec![backend("a", -1), backend("b", 1)]);
        assert_eq!(fields(&ts.validate()), ["spec.backends[0].weight"]);

        let ts = split("bookstore", vec![backend("a", 0), backend("b", 0)]);
        assert_eq!(fields(&ts.validate()), ["spec.backends"]);

        let ts = split("bookstore", vec![]);
        assert_eq!(fields(&ts.validate()), ["spec.backends"]);
    }

    #[test]
    fn service_must_be_in_the_split_namespace() {
        let ts = split("bookstore.other.svc.cluster.local", vec![backend("a", 1)]);
        assert_eq!(fields(&ts.validate()), ["spec.service"]);
        for bad in ["", "bookstore..svc", ".bookstore"] {
            let ts = split(bad, vec![backend("a", 1)]);
            assert_eq!(fields(&ts.validate()), ["spec.service"], "{bad:?}");
        }
    }

    #[test]
    fn backend_names_and_matches_are_required() {
        let mut ts = split("bookstore", vec![backend("", 1)]);
        ts.spec.matches.push(TrafficSplitMatch {
            kind: TrafficSplitMatchKind::HttpRouteGroup,
            name: String::new(),
        });
        assert_eq!(
            fields(&ts.validate()),
            ["spec.backends[0].service", "spec.matches[0].name"]
        );
    }
}
