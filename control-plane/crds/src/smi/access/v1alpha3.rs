//! `access.smi-spec.io/v1alpha3` `TrafficTarget`: grants source service accounts access to a
//! destination service account over the listed routes.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::validate::{Errors, FieldError, Validate};

/// The only subject kind SMI access control (and FSM) supports.
pub const KIND_SERVICE_ACCOUNT: &str = "ServiceAccount";

/// Allows traffic from `sources` to `destination` for the routes in `rules`.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "access.smi-spec.io",
    version = "v1alpha3",
    kind = "TrafficTarget",
    plural = "traffictargets",
    shortname = "tt",
    namespaced,
    derive = "PartialEq",
    label("app.kubernetes.io/name", "flomesh.io"),
    label("flomesh.io/reconcile", "true"),
    doc = "TrafficTarget grants source service accounts access to a destination service account."
)]
#[serde(rename_all = "camelCase")]
pub struct TrafficTargetSpec {
    /// The service account whose pods receive the traffic.
    pub destination: IdentityBindingSubject,
    /// The routes (HTTPRouteGroup / TCPRoute) the sources may use.
    pub rules: Vec<TrafficTargetRule>,
    /// The service accounts allowed to send traffic.
    pub sources: Vec<IdentityBindingSubject>,
}

/// A workload identity: a service account.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct IdentityBindingSubject {
    /// Must be `ServiceAccount`.
    pub kind: String,
    pub name: String,
    /// Empty means the TrafficTarget's namespace.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
}

impl IdentityBindingSubject {
    /// The subject's namespace, defaulting to `fallback` (the TrafficTarget's) when unset.
    pub fn namespace_or<'a>(&'a self, fallback: &'a str) -> &'a str {
        if self.namespace.is_empty() {
            fallback
        } else {
            &self.namespace
        }
    }
}

/// A reference to a route resource in the TrafficTarget's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct TrafficTargetRule {
    pub kind: TrafficTargetRuleKind,
    pub name: String,
    /// Names of HTTPRouteGroup matches to allow; empty allows every match of the group.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<String>,
}

/// Kinds of route a TrafficTarget rule may name (the SMI CRD's enum).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum TrafficTargetRuleKind {
    #[serde(rename = "HTTPRouteGroup")]
    HttpRouteGroup,
    #[serde(rename = "TCPRoute")]
    TcpRoute,
    // In the SMI schema, but FSM has no UDPRoute; `Validate` rejects it.
    #[serde(rename = "UDPRoute")]
    UdpRoute,
}

impl Validate for TrafficTarget {
    fn validate(&self) -> Vec<FieldError> {
        let mut errs = Errors::new();
        let spec = &self.spec;

        subject(&mut errs, "spec.destination", &spec.destination);
        // FSM ignores a TrafficTarget whose destination lives in another namespace.
        if let Some(ns) = self.metadata.namespace.as_deref()
            && !spec.destination.namespace.is_empty()
            && spec.destination.namespace != ns
        {
            errs.push(
                "spec.destination.namespace",
                format!(
                    "destination namespace {:?} must be the TrafficTarget's namespace {ns:?}",
                    spec.destination.namespace
                ),
            );
        }

        if spec.sources.is_empty() {
            errs.push("spec.sources", "at least one source is required");
        }
        for (i, source) in spec.sources.iter().enumerate() {
            subject(&mut errs, format!("spec.sources[{i}]"), source);
        }

        if spec.rules.is_empty() {
            errs.push("spec.rules", "at least one rule is required");
        }
        for (i, rule) in spec.rules.iter().enumerate() {
            errs.non_empty(format!("spec.rules[{i}].name"), &rule.name);
            if rule.kind == TrafficTargetRuleKind::UdpRoute {
                errs.push(
                    format!("spec.rules[{i}].kind"),
                    "UDPRoute is not supported; use HTTPRouteGroup or TCPRoute",
                );
            }
            for (j, m) in rule.matches.iter().enumerate() {
                errs.non_empty(format!("spec.rules[{i}].matches[{j}]"), m);
            }
        }
        errs.into_vec()
    }
}

fn subject(errs: &mut Errors, path: impl std::fmt::Display, s: &IdentityBindingSubject) {
    if s.kind != KIND_SERVICE_ACCOUNT {
        errs.push(
            format!("{path}.kind"),
            format!(
                "kind {:?} is not supported; must be {KIND_SERVICE_ACCOUNT}",
                s.kind
            ),
        );
    }
    errs.non_empty(format!("{path}.name"), &s.name);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::test_support::fields;

    fn sa(name: &str, ns: &str) -> IdentityBindingSubject {
        IdentityBindingSubject {
            kind: KIND_SERVICE_ACCOUNT.into(),
            name: name.into(),
            namespace: ns.into(),
        }
    }

    fn target() -> TrafficTarget {
        let mut tt = TrafficTarget::new(
            "test",
            TrafficTargetSpec {
                destination: sa("sa-1", "default"),
                rules: vec![TrafficTargetRule {
                    kind: TrafficTargetRuleKind::HttpRouteGroup,
                    name: "http-route".into(),
                    matches: vec!["version".into()],
                }],
                sources: vec![sa("sa-2", "default")],
            },
        );
        tt.metadata.namespace = Some("default".into());
        tt
    }

    #[test]
    fn valid_target() {
        assert!(target().validate().is_empty());
    }

    #[test]
    fn subjects_must_be_service_accounts() {
        let mut tt = target();
        tt.spec.destination.kind = "Service".into();
        tt.spec.sources[0].kind = "serviceaccount".into();
        tt.spec.sources.push(sa("", "default"));
        assert_eq!(
            fields(&tt.validate()),
            [
                "spec.destination.kind",
                "spec.sources[0].kind",
                "spec.sources[1].name"
            ]
        );
    }

    #[test]
    fn destination_must_be_in_the_target_namespace() {
        let mut tt = target();
        tt.spec.destination.namespace = "other".into();
        assert_eq!(fields(&tt.validate()), ["spec.destination.namespace"]);
        tt.spec.destination.namespace = String::new();
        assert!(
            tt.validate().is_empty(),
            "unset namespace means the target's"
        );
        assert_eq!(tt.spec.destination.namespace_or("default"), "default");
    }

    #[test]
    fn rules_and_sources_are_required() {
        let mut tt = target();
        tt.spec.rules.clear();
        tt.spec.sources.clear();
        assert_eq!(fields(&tt.validate()), ["spec.sources", "spec.rules"]);
    }

    #[test]
    fn udp_routes_and_empty_names_are_rejected() {
        let mut tt = target();
        tt.spec.rules.push(TrafficTargetRule {
            kind: TrafficTargetRuleKind::UdpRoute,
            name: String::new(),
            matches: vec![String::new()],
        });
        assert_eq!(
            fields(&tt.validate()),
            [
                "spec.rules[1].name",
                "spec.rules[1].kind",
                "spec.rules[1].matches[0]"
            ]
        );
    }

    #[test]
    fn unknown_rule_kind_fails_to_parse() {
        let json = r#"{"destination":{"kind":"ServiceAccount","name":"a"},
                       "rules":[{"kind":"GRPCRoute","name":"r"}],"sources":[]}"#;
        assert!(serde_json::from_str::<TrafficTargetSpec>(json).is_err());
    }
}
