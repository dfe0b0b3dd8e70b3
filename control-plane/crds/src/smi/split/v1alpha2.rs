//! `split.smi-spec.io/v1alpha2` `TrafficSplit`, still served by FSM. Same meaning as
//! `v1alpha4` without `matches`; convert with `From` and handle one type downstream.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::v1alpha4;
pub use super::v1alpha4::TrafficSplitBackend;
use crate::validate::{FieldError, Validate};

/// Spreads traffic addressed to `service` over `backends` by weight.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "split.smi-spec.io",
    version = "v1alpha2",
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
    /// The root (apex) service, in the TrafficSplit's namespace.
    pub service: String,
    /// Backend services (names in the same namespace) and their weights.
    pub backends: Vec<TrafficSplitBackend>,
}

impl From<TrafficSplitSpec> for v1alpha4::TrafficSplitSpec {
    fn from(spec: TrafficSplitSpec) -> Self {
        Self {
            service: spec.service,
            backends: spec.backends,
            matches: Vec::new(),
        }
    }
}

impl From<TrafficSplit> for v1alpha4::TrafficSplit {
    fn from(ts: TrafficSplit) -> Self {
        Self {
            metadata: ts.metadata,
            spec: ts.spec.into(),
        }
    }
}

impl Validate for TrafficSplit {
    fn validate(&self) -> Vec<FieldError> {
        let spec = v1alpha4::TrafficSplitSpec::from(self.spec.clone());
        v1alpha4::validate_spec(&spec, self.metadata.namespace.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_to_v1alpha4_and_validates_the_same() {
        let yaml = r#"
apiVersion: split.smi-spec.io/v1alpha2
kind: TrafficSplit
metadata:
  name: bookstore-split
  namespace: bookstore
spec:
  service: bookstore.bookstore
  backends:
  - service: bookstore
    weight: 0
  - service: bookstore-v2
    weight: 100
"#;
        let ts: TrafficSplit = serde_yaml_ng::from_str(yaml).expect("v1alpha2 split");
        assert!(ts.validate().is_empty());
        let v4 = v1alpha4::TrafficSplit::from(ts);
        assert_eq!(v4.spec.root_service_name(), "bookstore");
        assert_eq!(v4.spec.backends[1].weight, 100);
        assert!(v4.spec.matches.is_empty());
    }
}
