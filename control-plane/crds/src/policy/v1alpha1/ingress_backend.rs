//! `IngressBackend`: which sources outside the mesh may send traffic to mesh backends.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{
    BackendSpec, IngressSourceSpec, PolicyStatus, PortProtocol, TypedLocalObjectReference,
    validate_backends_and_sources,
};
use crate::validate::{Errors, FieldError, Validate};

/// Authorizes `sources` to send ingress traffic to `backends`.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "policy.flomesh.io",
    version = "v1alpha1",
    kind = "IngressBackend",
    plural = "ingressbackends",
    shortname = "ingressbackend",
    namespaced,
    status = "PolicyStatus",
    derive = "PartialEq",
    label("app.kubernetes.io/name", "flomesh.io"),
    label("flomesh.io/reconcile", "true"),
    doc = "IngressBackend authorizes sources outside the mesh to send traffic to mesh backends."
)]
#[serde(rename_all = "camelCase")]
pub struct IngressBackendSpec {
    /// Backends (Services in this namespace) that accept the ingress traffic.
    pub backends: Vec<BackendSpec>,
    /// Sources allowed to send it.
    pub sources: Vec<IngressSourceSpec>,
    /// Further objects the policy matches on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<TypedLocalObjectReference>,
}

impl Validate for IngressBackend {
    fn validate(&self) -> Vec<FieldError> {
        let mut errs = Errors::new();
        let spec = &self.spec;
        if spec.backends.is_empty() {
            errs.push("spec.backends", "at least one backend is required");
        }
        for (i, backend) in spec.backends.iter().enumerate() {
            if !matches!(
                backend.port.protocol,
                PortProtocol::Http | PortProtocol::Https | PortProtocol::Grpc
            ) {
                errs.push(
                    format!("spec.backends[{i}].port.protocol"),
                    format!(
                        "protocol {:?} is not supported for ingress; expected http, https or grpc",
                        backend.port.protocol.as_str()
                    ),
                );
            }
        }
        // An https backend validates client certificates unless told to skip it.
        validate_backends_and_sources(&mut errs, &spec.backends, &spec.sources, |b| {
            b.port.protocol == PortProtocol::Https
                && !b
                    .tls
                    .as_ref()
                    .is_some_and(|t| t.skip_client_cert_validation)
        });
        errs.into_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::super::{IngressSourceKind, PortSpec, TlsSpec};
    use super::*;
    use crate::validate::test_support::fields;

    fn backend(name: &str, number: u16, protocol: PortProtocol) -> BackendSpec {
        BackendSpec {
            name: name.into(),
            port: PortSpec { number, protocol },
            tls: None,
        }
    }

    fn source(kind: IngressSourceKind, name: &str, namespace: &str) -> IngressSourceSpec {
        IngressSourceSpec {
            kind,
            name: name.into(),
            namespace: namespace.into(),
        }
    }

    fn policy(backends: Vec<BackendSpec>, sources: Vec<IngressSourceSpec>) -> IngressBackend {
        IngressBackend::new(
            "basic",
            IngressBackendSpec {
                backends,
                sources,
                matches: Vec::new(),
            },
        )
    }

    #[test]
    fn fsm_ingress_example_is_valid() {
        let ib = policy(
            vec![backend("foo", 80, PortProtocol::Http)],
            vec![source(
                IngressSourceKind::Service,
                "fsm-ingress",
                "fsm-system",
            )],
        );
        assert!(ib.validate().is_empty());
    }

    #[test]
    fn ip_range_names_are_cidrs() {
        let ib = policy(
            vec![backend("foo", 80, PortProtocol::Http)],
            vec![
                source(IngressSourceKind::IpRange, "10.0.0.0/8", ""),
                source(IngressSourceKind::IpRange, "10.0.0.1", ""),
            ],
        );
        assert_eq!(fields(&ib.validate()), ["spec.sources[1].name"]);
    }

    #[test]
    fn service_sources_need_a_namespace() {
        let ib = policy(
            vec![backend("foo", 80, PortProtocol::Http)],
            vec![
                source(IngressSourceKind::Service, "ingress", ""),
                source(IngressSourceKind::AuthenticatedPrincipal, "", ""),
            ],
        );
        assert_eq!(
            fields(&ib.validate()),
            ["spec.sources[0].namespace", "spec.sources[1].name"]
        );
    }

    #[test]
    fn https_needs_a_principal_unless_validation_is_skipped() {
        let mut https = backend("foo", 443, PortProtocol::Https);
        https.tls = Some(TlsSpec {
            skip_client_cert_validation: false,
            sni_hosts: Vec::new(),
        });
        let ip = source(IngressSourceKind::IpRange, "10.0.0.0/8", "");
        let ib = policy(vec![https.clone()], vec![ip.clone()]);
        assert_eq!(fields(&ib.validate()), ["spec.backends[0].tls"]);

        let principal = source(
            IngressSourceKind::AuthenticatedPrincipal,
            "client.default.svc.cluster.local",
            "",
        );
        assert!(
            policy(vec![https.clone()], vec![ip.clone(), principal])
                .validate()
                .is_empty()
        );

        https.tls = Some(TlsSpec {
            skip_client_cert_validation: true,
            sni_hosts: Vec::new(),
        });
        assert!(policy(vec![https], vec![ip]).validate().is_empty());
    }

    #[test]
    fn protocols_ports_and_duplicates() {
        let ib = policy(
            vec![
                backend("foo", 80, PortProtocol::Tcp),
                backend("foo", 0, PortProtocol::Http),
                backend("foo", 0, PortProtocol::Grpc),
            ],
            vec![],
        );
        assert_eq!(
            fields(&ib.validate()),
            [
                "spec.backends[0].port.protocol",
                "spec.backends[1].port.number",
                "spec.backends[2].port.number",
                "spec.backends[2]",
                "spec.sources",
            ]
        );
        assert!(policy(vec![], vec![]).validate().len() == 2);
    }
}
