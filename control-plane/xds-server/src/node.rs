//! Who is on the other end of a stream, from the Envoy `Node` of its first request.
//!
//! FSM names every proxy in its node id (and in its certificate's common name) as
//!
//! ```text
//! <uuid>.<kind>.<service-account>.<namespace>[.<trust-domain>]
//! e.g. 0f9e3a52-2d4b-4c64-9a39-0c6f6fd1b6a5.sidecar.bookbuyer.bookstore.cluster.local
//! ```
//!
//! - `uuid`: the pod's `fsm-proxy-uuid` label, a UUID in hex 8-4-4-4-12 form; it is the key of the
//!   proxy's snapshot in the cache.
//! - `kind`: `sidecar` or `gateway`.
//! - `service-account`, `namespace`: DNS labels (RFC 1123: lowercase alphanumerics and `-`, at most
//!   63 characters, starting and ending with an alphanumeric); together they are the proxy's
//!   service identity `<sa>.<ns>`. Dots would make the id ambiguous, so subdomains are rejected.
//! - an optional trust domain (`cluster.local`), one or more non-empty dot-separated parts.
//!
//! The node's `user_agent_name` tells which data plane speaks (`envoy`, `fsm-sidecar`, …).

use std::fmt;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::Node;
use fsm_cache::ProxyKey;
use fsm_errcode::{ErrCode, HasErrCode};

/// The format named in every error, so a log line alone tells the operator what was expected.
const FORMAT: &str = "<uuid>.<kind>.<service-account>.<namespace>[.<trust-domain>]";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProxyKind {
    Sidecar,
    Gateway,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum DataPlane {
    Envoy,
    /// Our own sidecar (`dataplane-rs`), served the native `fsm.dataplane.v1` types.
    FsmSidecar,
    /// Any other `user_agent_name`, kept verbatim (empty when the node gave none).
    Other(String),
}

/// A connected proxy as identified by its node id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyNode {
    pub uuid: String,
    pub kind: ProxyKind,
    pub service_account: String,
    pub namespace: String,
    pub data_plane: DataPlane,
    /// The node id as received.
    pub node_id: String,
}

/// Why a node id was refused; every variant is FSM's E5001.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    #[error("the first request of the stream carries no node")]
    MissingNode,
    #[error("node id {id:?} has {parts} dot-separated parts, expected {FORMAT}")]
    TooFewParts { id: String, parts: usize },
    #[error("node id {id:?}: proxy UUID {uuid:?} is not a UUID (hex 8-4-4-4-12)")]
    InvalidUuid { id: String, uuid: String },
    #[error("node id {id:?}: proxy kind {kind:?} is neither \"sidecar\" nor \"gateway\"")]
    InvalidKind { id: String, kind: String },
    #[error("node id {id:?}: service account {service_account:?} is not a DNS label")]
    InvalidServiceAccount { id: String, service_account: String },
    #[error("node id {id:?}: namespace {namespace:?} is not a DNS label")]
    InvalidNamespace { id: String, namespace: String },
    #[error("node id {id:?}: trust domain {trust_domain:?} has an empty part")]
    InvalidTrustDomain { id: String, trust_domain: String },
}

impl HasErrCode for NodeError {
    fn err_code(&self) -> ErrCode {
        ErrCode::E5001
    }
}

// === ProxyKind ===

impl ProxyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyKind::Sidecar => "sidecar",
            ProxyKind::Gateway => "gateway",
        }
    }
}

impl fmt::Display for ProxyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `node.user_agent_name` fsm-sidecar announces itself with.
pub const FSM_SIDECAR_USER_AGENT: &str = "fsm-sidecar";

// === DataPlane ===

impl DataPlane {
    fn from_user_agent(name: &str) -> Self {
        match name {
            "envoy" => DataPlane::Envoy,
            FSM_SIDECAR_USER_AGENT => DataPlane::FsmSidecar,
            other => DataPlane::Other(other.to_owned()),
        }
    }
}

// === ProxyNode ===

impl ProxyNode {
    pub fn from_node(node: &Node) -> Result<Self, NodeError> {
        Self::parse(&node.id, &node.user_agent_name)
    }

    /// Parses a node id; `user_agent_name` only selects the data plane.
    pub fn parse(node_id: &str, user_agent_name: &str) -> Result<Self, NodeError> {
        let id = || node_id.to_owned();
        let parts: Vec<&str> = node_id.splitn(5, '.').collect();
        let [uuid, kind, service_account, namespace, rest @ ..] = parts.as_slice() else {
            return Err(NodeError::TooFewParts {
                id: id(),
                parts: node_id.split('.').count(),
            });
        };
        if !is_uuid(uuid) {
            return Err(NodeError::InvalidUuid {
                id: id(),
                uuid: (*uuid).to_owned(),
            });
        }
        let kind = match *kind {
            "sidecar" => ProxyKind::Sidecar,
            "gateway" => ProxyKind::Gateway,
            other => {
                return Err(NodeError::InvalidKind {
                    id: id(),
                    kind: other.to_owned(),
                });
            }
        };
        if !is_dns_label(service_account) {
            return Err(NodeError::InvalidServiceAccount {
                id: id(),
                service_account: (*service_account).to_owned(),
            });
        }
        if !is_dns_label(namespace) {
            return Err(NodeError::InvalidNamespace {
                id: id(),
                namespace: (*namespace).to_owned(),
            });
        }
        if let Some(trust_domain) = rest.first()
            && trust_domain.split('.').any(str::is_empty)
        {
            return Err(NodeError::InvalidTrustDomain {
                id: id(),
                trust_domain: (*trust_domain).to_owned(),
            });
        }
        Ok(ProxyNode {
            uuid: (*uuid).to_owned(),
            kind,
            service_account: (*service_account).to_owned(),
            namespace: (*namespace).to_owned(),
            data_plane: DataPlane::from_user_agent(user_agent_name),
            node_id: node_id.to_owned(),
        })
    }

    /// The snapshot cache key: the proxy UUID.
    pub fn key(&self) -> ProxyKey {
        ProxyKey(Arc::from(self.uuid.as_str()))
    }

    /// FSM's service identity, `<sa>.<ns>`, as used in metric labels.
    pub fn identity(&self) -> String {
        format!("{}.{}", self.service_account, self.namespace)
    }
}

fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, len)| g.len() == len && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn is_dns_label(s: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = s.as_bytes();
    match (bytes.first(), bytes.last()) {
        (Some(&first), Some(&last)) => {
            bytes.len() <= 63
                && alnum(first)
                && alnum(last)
                && bytes.iter().all(|&b| alnum(b) || b == b'-')
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UUID: &str = "0f9e3a52-2d4b-4c64-9a39-0c6f6fd1b6a5";

    fn id(rest: &str) -> String {
        format!("{UUID}.{rest}")
    }

    #[test]
    fn valid_ids() {
        let cases: &[(&str, &str, ProxyKind, &str, &str)] = &[
            (
                "plain sidecar",
                "sidecar.bookbuyer.bookstore",
                ProxyKind::Sidecar,
                "bookbuyer",
                "bookstore",
            ),
            (
                "trust domain",
                "sidecar.bookbuyer.bookstore.cluster.local",
                ProxyKind::Sidecar,
                "bookbuyer",
                "bookstore",
            ),
            (
                "gateway",
                "gateway.fsm-ingress.fsm-system",
                ProxyKind::Gateway,
                "fsm-ingress",
                "fsm-system",
            ),
            (
                "one-part trust domain",
                "sidecar.a.b.example",
                ProxyKind::Sidecar,
                "a",
                "b",
            ),
            (
                "digits",
                "sidecar.0sa9.1ns2",
                ProxyKind::Sidecar,
                "0sa9",
                "1ns2",
            ),
        ];
        for (name, rest, kind, sa, ns) in cases {
            let node_id = id(rest);
            let node =
                ProxyNode::parse(&node_id, "envoy").unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(node.uuid, UUID, "{name}");
            assert_eq!(node.kind, *kind, "{name}");
            assert_eq!(node.service_account, *sa, "{name}");
            assert_eq!(node.namespace, *ns, "{name}");
            assert_eq!(node.node_id, node_id, "{name}");
            assert_eq!(node.key(), ProxyKey(UUID.into()), "{name}");
            assert_eq!(node.identity(), format!("{sa}.{ns}"), "{name}");
        }
    }

    #[test]
    fn uppercase_uuid_is_accepted() {
        let upper = UUID.to_uppercase();
        let node = ProxyNode::parse(&format!("{upper}.sidecar.a.b"), "envoy").expect("valid");
        assert_eq!(node.uuid, upper);
    }

    #[test]
    fn invalid_ids_name_the_bad_part() {
        let long = "a".repeat(64);
        let cases: Vec<(&str, String, &str)> = vec![
            ("empty", String::new(), "1 dot-separated parts"),
            ("three parts", id("sidecar.sa"), "3 dot-separated parts"),
            (
                "not a uuid",
                "proxy-1.sidecar.sa.ns".into(),
                "proxy UUID \"proxy-1\"",
            ),
            (
                "uuid bad group length",
                "0f9e3a5-2d4b-4c64-9a39-0c6f6fd1b6a5.sidecar.sa.ns".into(),
                "proxy UUID",
            ),
            (
                "uuid non hex",
                "0f9e3a5g-2d4b-4c64-9a39-0c6f6fd1b6a5.sidecar.sa.ns".into(),
                "proxy UUID",
            ),
            (
                "uuid extra group",
                "0f9e3a52-2d4b-4c64-9a39-0c6f-fd1b6a5.sidecar.sa.ns".into(),
                "proxy UUID",
            ),
            ("kind", id("pipy.sa.ns"), "proxy kind \"pipy\""),
            (
                "kind is case sensitive",
                id("Sidecar.sa.ns"),
                "proxy kind \"Sidecar\"",
            ),
            (
                "empty service account",
                id("sidecar..ns"),
                "service account \"\"",
            ),
            (
                "uppercase service account",
                id("sidecar.Book.ns"),
                "service account \"Book\"",
            ),
            (
                "service account leading dash",
                id("sidecar.-sa.ns"),
                "service account \"-sa\"",
            ),
            (
                "service account too long",
                id(&format!("sidecar.{long}.ns")),
                "service account",
            ),
            ("empty namespace", id("sidecar.sa."), "namespace \"\""),
            (
                "namespace trailing dash",
                id("sidecar.sa.ns-"),
                "namespace \"ns-\"",
            ),
            (
                "namespace underscore",
                id("sidecar.sa.n_s"),
                "namespace \"n_s\"",
            ),
            (
                "empty trust domain part",
                id("sidecar.sa.ns.cluster..local"),
                "trust domain \"cluster..local\"",
            ),
            (
                "trailing dot",
                id("sidecar.sa.ns.cluster.local."),
                "trust domain",
            ),
        ];
        for (name, node_id, needle) in cases {
            let err = ProxyNode::parse(&node_id, "envoy").expect_err(name);
            let message = err.to_string();
            assert!(
                message.contains(needle),
                "{name}: {message:?} should contain {needle:?}"
            );
            assert_eq!(err.err_code(), ErrCode::E5001, "{name}");
        }
    }

    #[test]
    fn data_plane_comes_from_the_user_agent() {
        let node_id = id("sidecar.sa.ns");
        for (agent, expected) in [
            ("envoy", DataPlane::Envoy),
            ("fsm-sidecar", DataPlane::FsmSidecar),
            ("pipy", DataPlane::Other("pipy".into())),
            ("", DataPlane::Other(String::new())),
        ] {
            let node = Node {
                id: node_id.clone(),
                user_agent_name: agent.into(),
                ..Node::default()
            };
            assert_eq!(
                ProxyNode::from_node(&node).expect("valid").data_plane,
                expected,
                "{agent:?}"
            );
        }
    }
}
