//! `Isolation` (cluster-scoped): IP ranges cut off from the mesh.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::PolicyStatus;
use crate::validate::{Errors, FieldError, Validate};

/// Isolates the listed CIDRs.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "policy.flomesh.io",
    version = "v1alpha1",
    kind = "Isolation",
    plural = "isolations",
    shortname = "iso",
    status = "PolicyStatus",
    derive = "PartialEq",
    label("app.kubernetes.io/name", "flomesh.io"),
    label("flomesh.io/reconcile", "true"),
    doc = "Isolation cuts the listed IP ranges off from the mesh."
)]
pub struct IsolationSpec {
    /// CIDRs to isolate, e.g. `192.168.1.0/24`.
    #[schemars(length(min = 1))]
    pub cidrs: Vec<String>,
}

impl Validate for Isolation {
    fn validate(&self) -> Vec<FieldError> {
        let mut errs = Errors::new();
        if self.spec.cidrs.is_empty() {
            errs.push("spec.cidrs", "at least one CIDR is required");
        }
        for (i, cidr) in self.spec.cidrs.iter().enumerate() {
            errs.cidr(format!("spec.cidrs[{i}]"), cidr);
        }
        errs.into_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::test_support::fields;

    #[test]
    fn cidrs_must_parse() {
        let mut iso = Isolation::new(
            "lab",
            IsolationSpec {
                cidrs: vec!["192.168.1.0/24".into()],
            },
        );
        assert!(iso.validate().is_empty());
        iso.spec.cidrs.push("192.168.1.0".into());
        assert_eq!(fields(&iso.validate()), ["spec.cidrs[1]"]);
        iso.spec.cidrs.clear();
        assert_eq!(fields(&iso.validate()), ["spec.cidrs"]);
    }
}
