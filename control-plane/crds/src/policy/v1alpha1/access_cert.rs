//! `AccessCert`: asks the mesh CA to issue a certificate for a client outside the mesh.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{PolicyStatus, SecretReference};
use crate::validate::{Errors, FieldError, Validate};

/// Issues a certificate with `subjectAltNames` into `secret`.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "policy.flomesh.io",
    version = "v1alpha1",
    kind = "AccessCert",
    plural = "accesscerts",
    shortname = "acct",
    namespaced,
    status = "PolicyStatus",
    derive = "PartialEq",
    label("app.kubernetes.io/name", "flomesh.io"),
    label("flomesh.io/reconcile", "true"),
    doc = "AccessCert asks the mesh CA for a certificate for a client outside the mesh."
)]
#[serde(rename_all = "camelCase")]
pub struct AccessCertSpec {
    /// DNS names and IP addresses the certificate is for.
    pub subject_alt_names: Vec<String>,
    /// Where the certificate is stored.
    pub secret: SecretReference,
}

impl Validate for AccessCert {
    fn validate(&self) -> Vec<FieldError> {
        let mut errs = Errors::new();
        if self.spec.subject_alt_names.is_empty() {
            errs.push(
                "spec.subjectAltNames",
                "at least one subject alternative name is required",
            );
        }
        for (i, san) in self.spec.subject_alt_names.iter().enumerate() {
            errs.non_empty(format!("spec.subjectAltNames[{i}]"), san);
        }
        errs.non_empty("spec.secret.name", &self.spec.secret.name);
        errs.into_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::test_support::fields;

    #[test]
    fn sans_and_secret_name_are_required() {
        let mut cert = AccessCert::new(
            "client",
            AccessCertSpec {
                subject_alt_names: vec!["client.default.svc.cluster.local".into()],
                secret: SecretReference {
                    name: "client-cert".into(),
                    namespace: "default".into(),
                },
            },
        );
        assert!(cert.validate().is_empty());
        cert.spec.subject_alt_names = vec![" ".into()];
        cert.spec.secret.name.clear();
        assert_eq!(
            fields(&cert.validate()),
            ["spec.subjectAltNames[0]", "spec.secret.name"]
        );
        cert.spec.subject_alt_names.clear();
        assert_eq!(
            fields(&cert.validate()),
            ["spec.subjectAltNames", "spec.secret.name"]
        );
    }
}
