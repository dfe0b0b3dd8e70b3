//! `policy.flomesh.io/v1alpha1`, one module per kind, plus the pieces several kinds share.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::validate::Errors;

mod access_cert;
mod access_control;
mod egress;
mod egress_gateway;
mod ingress_backend;
mod isolation;
mod retry;
mod upstream_traffic_setting;

pub use access_cert::*;
pub use access_control::*;
pub use egress::*;
pub use egress_gateway::*;
pub use ingress_backend::*;
pub use isolation::*;
pub use retry::*;
pub use upstream_traffic_setting::*;

/// `apiVersion` of these kinds, as `matches[].apiGroup` references spell it.
pub const API_VERSION: &str = "policy.flomesh.io/v1alpha1";

// === Ports ===

/// A destination or backend port.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub struct PortSpec {
    #[schemars(range(min = 1))]
    pub number: u16,
    pub protocol: PortProtocol,
}

/// Application protocols FSM knows, spelled as FSM (and Service `appProtocol`) spell them.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum PortProtocol {
    #[serde(rename = "http")]
    Http,
    #[serde(rename = "https")]
    Https,
    #[serde(rename = "tcp")]
    Tcp,
    /// TCP where the server speaks first (MySQL, PostgreSQL).
    #[serde(rename = "tcp-server-first")]
    TcpServerFirst,
    #[serde(rename = "grpc")]
    Grpc,
}

impl PortProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Https => "https",
            Self::Tcp => "tcp",
            Self::TcpServerFirst => "tcp-server-first",
            Self::Grpc => "grpc",
        }
    }
}

// === Status ===

/// Status FSM writes on policies that have one.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    /// Current status, e.g. `committed` or `error`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub current_status: String,
    /// Why the policy has that status.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

// === References ===

/// A reference to an object in the policy's namespace (Kubernetes' `TypedLocalObjectReference`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TypedLocalObjectReference {
    /// For FSM policies this is group *and* version, e.g. `policy.flomesh.io/v1alpha1` or
    /// `specs.smi-spec.io/v1alpha4`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_group: Option<String>,
    pub kind: String,
    pub name: String,
}

/// A Secret by name and namespace (Kubernetes' `SecretReference`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
pub struct SecretReference {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
}

// === Backends and sources (IngressBackend, AccessControl) ===

/// A mesh backend that accepts traffic from outside the mesh.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct BackendSpec {
    /// Name of the backend Service.
    pub name: String,
    /// The backend's target (container) port, not the Service port.
    pub port: PortSpec,
    /// TLS settings; for IngressBackend, an `https` port is TLS even when this is unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,
}

/// A backend's TLS settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TlsSpec {
    /// Accept clients without validating their certificate.
    pub skip_client_cert_validation: bool,
    /// SNI host names the backend accepts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sni_hosts: Vec<String>,
}

/// Where traffic to a backend may come from.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct IngressSourceSpec {
    pub kind: IngressSourceKind,
    /// Service name, CIDR, or certificate SAN, depending on `kind`.
    pub name: String,
    /// The Service's namespace (`kind: Service` only).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
}

/// Kinds of ingress source.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum IngressSourceKind {
    /// The endpoints of a Service (its namespace must be monitored by the mesh).
    Service,
    /// Any client whose IP is in the CIDR `name`.
    #[serde(rename = "IPRange")]
    IpRange,
    /// A client whose certificate carries the SAN `name`.
    AuthenticatedPrincipal,
}

/// Rules shared by IngressBackend and AccessControl. `tls_required` says whether a backend is
/// TLS with client-certificate validation, which needs an `AuthenticatedPrincipal` source.
pub(crate) fn validate_backends_and_sources(
    errs: &mut Errors,
    backends: &[BackendSpec],
    sources: &[IngressSourceSpec],
    tls_required: impl Fn(&BackendSpec) -> bool,
) {
    let has_principal = sources
        .iter()
        .any(|s| s.kind == IngressSourceKind::AuthenticatedPrincipal);
    let mut seen = std::collections::BTreeSet::new();
    for (i, backend) in backends.iter().enumerate() {
        let base = format!("spec.backends[{i}]");
        errs.non_empty(format!("{base}.name"), &backend.name);
        errs.port(format!("{base}.port.number"), backend.port.number);
        if !seen.insert((backend.name.as_str(), backend.port.number)) {
            errs.push(
                &base,
                format!(
                    "duplicate backend with service name {:?} and port {}",
                    backend.name, backend.port.number
                ),
            );
        }
        if tls_required(backend) && !has_principal {
            errs.push(
                format!("{base}.tls"),
                "a TLS backend that validates client certificates needs at least one AuthenticatedPrincipal source",
            );
        }
        if let Some(tls) = &backend.tls {
            for (j, host) in tls.sni_hosts.iter().enumerate() {
                errs.non_empty(format!("{base}.tls.sniHosts[{j}]"), host);
            }
        }
    }

    if sources.is_empty() {
        errs.push("spec.sources", "at least one source is required");
    }
    for (i, source) in sources.iter().enumerate() {
        let base = format!("spec.sources[{i}]");
        match source.kind {
            IngressSourceKind::Service => {
                errs.non_empty(format!("{base}.name"), &source.name);
                errs.non_empty(format!("{base}.namespace"), &source.namespace);
            }
            IngressSourceKind::AuthenticatedPrincipal => {
                errs.non_empty(format!("{base}.name"), &source.name);
            }
            IngressSourceKind::IpRange => errs.cidr(format!("{base}.name"), &source.name),
        }
    }
}

/// Names are checked the way FSM's Egress validator checks them; an empty or unknown
/// `apiGroup` is an error rather than a crash.
pub(crate) fn validate_matches(
    errs: &mut Errors,
    matches: &[TypedLocalObjectReference],
    allowed: &[(&str, &str)],
) {
    for (i, m) in matches.iter().enumerate() {
        let base = format!("spec.matches[{i}]");
        errs.non_empty(format!("{base}.name"), &m.name);
        match m.api_group.as_deref() {
            None | Some("") => errs.push(format!("{base}.apiGroup"), "apiGroup is required"),
            Some(group) => match allowed.iter().find(|(g, _)| *g == group) {
                None => {
                    let groups: Vec<&str> = allowed.iter().map(|(g, _)| *g).collect();
                    errs.push(
                        format!("{base}.apiGroup"),
                        format!("apiGroup {group:?} must be one of {groups:?}"),
                    )
                }
                Some((_, kind)) if m.kind != *kind => errs.push(
                    format!("{base}.kind"),
                    format!("kind {:?} must be {kind} for apiGroup {group}", m.kind),
                ),
                Some(_) => {}
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocols_use_fsm_spellings() {
        let all = [
            PortProtocol::Http,
            PortProtocol::Https,
            PortProtocol::Tcp,
            PortProtocol::TcpServerFirst,
            PortProtocol::Grpc,
        ];
        for p in all {
            let json = serde_json::to_value(p).expect("serialize");
            assert_eq!(json, p.as_str());
            assert_eq!(
                serde_json::from_value::<PortProtocol>(json).expect("parse"),
                p
            );
        }
        assert!(serde_json::from_str::<PortProtocol>(r#""HTTP""#).is_err());
        assert!(serde_json::from_str::<PortProtocol>(r#""udp""#).is_err());
    }

    #[test]
    fn source_kinds_use_fsm_spellings() {
        let s: IngressSourceSpec =
            serde_json::from_str(r#"{"kind":"IPRange","name":"10.0.0.0/8"}"#).expect("source");
        assert_eq!(s.kind, IngressSourceKind::IpRange);
        assert!(serde_json::from_str::<IngressSourceSpec>(r#"{"kind":"Pod","name":"x"}"#).is_err());
    }
}
