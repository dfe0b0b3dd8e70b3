//! `AccessControl`: which non-mesh clients (Services, IP ranges, principals) may reach mesh
//! backends, with or without mTLS.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{
    BackendSpec, IngressSourceSpec, PolicyStatus, TypedLocalObjectReference,
    validate_backends_and_sources,
};
use crate::validate::{Errors, FieldError, Validate};

/// FSM names the backend type separately; the shape is IngressBackend's.
pub type AccessControlBackendSpec = BackendSpec;
/// FSM names the source type separately; the shape is IngressBackend's.
pub type AccessControlSourceSpec = IngressSourceSpec;

/// Authorizes `sources` to reach `backends` (all backends in the namespace when empty).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "policy.flomesh.io",
    version = "v1alpha1",
    kind = "AccessControl",
    plural = "accesscontrols",
    shortname = "accesscontrol",
    namespaced,
    status = "PolicyStatus",
    derive = "PartialEq",
    label("app.kubernetes.io/name", "flomesh.io"),
    label("flomesh.io/reconcile", "true"),
    doc = "AccessControl authorizes clients outside the mesh to reach mesh backends."
)]
#[serde(rename_all = "camelCase")]
pub struct AccessControlSpec {
    /// Backends the policy applies to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<AccessControlBackendSpec>,
    /// Sources allowed to send traffic.
    pub sources: Vec<AccessControlSourceSpec>,
    /// Further objects the policy matches on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<TypedLocalObjectReference>,
}

impl Validate for AccessControl {
    fn validate(&self) -> Vec<FieldError> {
        let mut errs = Errors::new();
        // Here TLS is opt-in per backend: a `tls` block without skipping validation is mTLS.
        validate_backends_and_sources(&mut errs, &self.spec.backends, &self.spec.sources, |b| {
            b.tls
                .as_ref()
                .is_some_and(|t| !t.skip_client_cert_validation)
        });
        errs.into_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::super::{IngressSourceKind, PortProtocol, PortSpec, TlsSpec};
    use super::*;
    use crate::validate::test_support::fields;

    fn acl(backends: Vec<BackendSpec>, sources: Vec<IngressSourceSpec>) -> AccessControl {
        AccessControl::new(
            "acl",
            AccessControlSpec {
                backends,
                sources,
                matches: Vec::new(),
            },
        )
    }

    fn ip(name: &str) -> IngressSourceSpec {
        IngressSourceSpec {
            kind: IngressSourceKind::IpRange,
            name: name.into(),
            namespace: String::new(),
        }
    }

    #[test]
    fn sources_only_is_valid() {
        assert!(
            acl(vec![], vec![ip("192.168.0.0/16")])
                .validate()
                .is_empty()
        );
        assert_eq!(
            fields(&acl(vec![], vec![ip("192.168.0.0")]).validate()),
            ["spec.sources[0].name"]
        );
        assert_eq!(fields(&acl(vec![], vec![]).validate()), ["spec.sources"]);
    }

    #[test]
    fn mtls_backend_needs_a_principal() {
        let backend = BackendSpec {
            name: "foo".into(),
            port: PortSpec {
                number: 8080,
                protocol: PortProtocol::Http,
            },
            tls: Some(TlsSpec::default()),
        };
        assert_eq!(
            fields(&acl(vec![backend.clone()], vec![ip("10.0.0.0/8")]).validate()),
            ["spec.backends[0].tls"]
        );
        let plain = BackendSpec {
            tls: None,
            ..backend
        };
        assert!(
            acl(vec![plain], vec![ip("10.0.0.0/8")])
                .validate()
                .is_empty()
        );
    }
}
