//! `Egress`: lets chosen service accounts reach destinations outside the mesh (needs
//! `featureFlags.enableEgressPolicy`).

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{API_VERSION, PortSpec, TypedLocalObjectReference, validate_matches};
use crate::validate::{Errors, FieldError, Validate};

/// Allows `sources` to reach `hosts` / `ipAddresses` on `ports`.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "policy.flomesh.io",
    version = "v1alpha1",
    kind = "Egress",
    plural = "egresses",
    shortname = "egress",
    namespaced,
    derive = "PartialEq",
    label("app.kubernetes.io/name", "flomesh.io"),
    label("flomesh.io/reconcile", "true"),
    doc = "Egress allows service accounts in the mesh to reach destinations outside it."
)]
#[serde(rename_all = "camelCase")]
pub struct EgressSpec {
    /// Service accounts the policy applies to.
    pub sources: Vec<EgressSourceSpec>,
    /// External hosts: matched against Host/authority for HTTP and SNI for HTTPS; ignored for
    /// other protocols.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// External destination CIDRs.
    #[serde(default, skip_serializing_if = "Vec::is_empty", rename = "ipAddresses")]
    pub ip_addresses: Vec<String>,
    /// Destination ports.
    pub ports: Vec<PortSpec>,
    /// HTTPRouteGroups narrowing HTTP traffic, and at most one UpstreamTrafficSetting.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<TypedLocalObjectReference>,
}

/// A source of egress traffic.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct EgressSourceSpec {
    pub kind: EgressSourceKind,
    pub name: String,
    pub namespace: String,
}

/// Kinds of egress source.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum EgressSourceKind {
    ServiceAccount,
}

/// `apiGroup` spellings an Egress match may use, with the one kind allowed for each.
const EGRESS_MATCHES: &[(&str, &str)] = &[
    ("specs.smi-spec.io/v1alpha4", "HTTPRouteGroup"),
    (API_VERSION, "UpstreamTrafficSetting"),
];

impl Validate for Egress {
    fn validate(&self) -> Vec<FieldError> {
        let mut errs = Errors::new();
        let spec = &self.spec;

        if spec.sources.is_empty() {
            errs.push("spec.sources", "at least one source is required");
        }
        for (i, s) in spec.sources.iter().enumerate() {
            errs.non_empty(format!("spec.sources[{i}].name"), &s.name);
            errs.non_empty(format!("spec.sources[{i}].namespace"), &s.namespace);
        }
        for (i, host) in spec.hosts.iter().enumerate() {
            if !is_host_pattern(host) {
                errs.push(
                    format!("spec.hosts[{i}]"),
                    format!("invalid host {host:?}: expected a DNS name such as \"httpbin.org\" or \"*.example.com\""),
                );
            }
        }
        for (i, cidr) in spec.ip_addresses.iter().enumerate() {
            errs.cidr(format!("spec.ipAddresses[{i}]"), cidr);
        }
        if spec.ports.is_empty() {
            errs.push("spec.ports", "at least one port is required");
        }
        for (i, port) in spec.ports.iter().enumerate() {
            errs.port(format!("spec.ports[{i}].number"), port.number);
        }

        validate_matches(&mut errs, &spec.matches, EGRESS_MATCHES);
        let settings = spec
            .matches
            .iter()
            .filter(|m| m.kind == "UpstreamTrafficSetting")
            .count();
        if settings > 1 {
            errs.push(
                "spec.matches",
                "cannot have more than 1 UpstreamTrafficSetting match",
            );
        }
        errs.into_vec()
    }
}

/// A DNS name, optionally with one leading `*.` wildcard label.
fn is_host_pattern(host: &str) -> bool {
    let name = host.strip_prefix("*.").unwrap_or(host);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::super::PortProtocol;
    use super::*;
    use crate::validate::test_support::fields;

    const K8S_API_EGRESS: &str = r#"
kind: Egress
apiVersion: policy.flomesh.io/v1alpha1
metadata:
  name: k8s-server-egress
  namespace: test
spec:
  sources:
  - kind: ServiceAccount
    name: curl
    namespace: test
  ipAddresses:
  - 10.0.0.1/32
  ports:
  - number: 443
    protocol: https
"#;

    fn example() -> Egress {
        serde_yaml_ng::from_str(K8S_API_EGRESS).expect("example egress")
    }

    #[test]
    fn mesh_core_example_is_valid() {
        let egress = example();
        assert_eq!(egress.spec.ports[0].protocol, PortProtocol::Https);
        assert_eq!(egress.spec.ip_addresses, ["10.0.0.1/32"]);
        assert!(egress.validate().is_empty());
    }

    #[test]
    fn addresses_hosts_and_ports() {
        let mut egress = example();
        egress.spec.ip_addresses.push("10.0.0.1".into());
        egress.spec.hosts = vec![
            "httpbin.org".into(),
            "*.example.com".into(),
            "http://httpbin.org".into(),
            "".into(),
        ];
        egress.spec.ports[0].number = 0;
        assert_eq!(
            fields(&egress.validate()),
            [
                "spec.hosts[2]",
                "spec.hosts[3]",
                "spec.ipAddresses[1]",
                "spec.ports[0].number"
            ]
        );
    }

    #[test]
    fn sources_and_ports_are_required() {
        let mut egress = example();
        egress.spec.sources.clear();
        egress.spec.ports.clear();
        assert_eq!(fields(&egress.validate()), ["spec.sources", "spec.ports"]);
        assert!(
            serde_yaml_ng::from_str::<Egress>(
                &K8S_API_EGRESS.replace("kind: ServiceAccount", "kind: Service")
            )
            .is_err()
        );
    }

    #[test]
    fn match_references() {
        let mut egress = example();
        let r = |group: Option<&str>, kind: &str| TypedLocalObjectReference {
            api_group: group.map(Into::into),
            kind: kind.into(),
            name: "m".into(),
        };
        egress.spec.matches = vec![
            r(Some("specs.smi-spec.io/v1alpha4"), "HTTPRouteGroup"),
            r(Some(API_VERSION), "UpstreamTrafficSetting"),
        ];
        assert!(egress.validate().is_empty());

        egress.spec.matches = vec![
            r(None, "HTTPRouteGroup"),
            r(Some("specs.smi-spec.io/v1alpha4"), "TCPRoute"),
            r(Some("example.com/v1"), "Thing"),
            r(Some(API_VERSION), "UpstreamTrafficSetting"),
            r(Some(API_VERSION), "UpstreamTrafficSetting"),
        ];
        assert_eq!(
            fields(&egress.validate()),
            [
                "spec.matches[0].apiGroup",
                "spec.matches[1].kind",
                "spec.matches[2].apiGroup",
                "spec.matches"
            ]
        );
    }
}
