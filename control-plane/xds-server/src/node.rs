//! Who is on the other end of a stream, from the Envoy `Node` of its first request.
//!
//! FSM names every proxy in its node id (and in its certificate's common name) as
//!
//! ```text
//! <uuid>.<kind>.<service-account>.<namespace>[.<trust-domain>]
//! e.g. 0f9e3a52-2d4b-4c64-9a39-0c6f6fd1b6a5.sidecar.bookbuyer.bookstore.cluster.local
//! ```
//!
//! - `uuid`: the pod's `fsm-proxy-uuid` label, a UUID in hex 8-4-4-4-12 form. With the three
//!   other parts it is the key of the proxy's snapshot in the cache ([`ProxyIdentity`]).
//! - `kind`: `sidecar` or `gateway`.
//! - `service-account`, `namespace`: DNS labels (RFC 1123: lowercase alphanumerics and `-`, at most
//!   63 characters, starting and ending with an alphanumeric); together they are the proxy's
//!   service identity `<sa>.<ns>`. Dots would make the id ambiguous, so subdomains are rejected.
//! - an optional trust domain (`cluster.local`), one or more non-empty dot-separated parts.
//!
//! The rules for the four parts are `fsm_identity`'s ([`ProxyIdentity::from_parts`]), shared
//! with the certificate manager's xDS CN parser; this module names the origin and the whole id
//! in the error and raises it as E5001.
//!
//! Which data plane a stream is served ([`DataPlane`]) is decided per stream from the type URLs it
//! asks for; the node's `user_agent_name` is only a hint for a first request of unknown type.
//!
//! The xDS client certificate's common name ([`XdsCertIdentity`]) follows the same rules with
//! exactly the four first parts; when the server authenticates peers, the node id must name the
//! proxy of the certificate: FSM's E5010 when its service account (`<sa>.<ns>`) differs, E5004
//! when its proxy UUID or kind does (the proxy cannot be set up for the pod's `fsm-proxy-uuid`).

use std::fmt;

use envoy_types::pb::envoy::config::core::v3::Node;
use fsm_errcode::{ErrCode, HasErrCode};
pub use fsm_identity::{DataPlane, IdentityError, ProxyIdentity, ProxyKind};

/// The format named in every error, so a log line alone tells the operator what was expected.
const FORMAT: &str = "<uuid>.<kind>.<service-account>.<namespace>[.<trust-domain>]";
/// The form of the xDS client certificate's common name (FSM's
/// `<proxy-UUID>.<kind>.<proxy-identity>`).
const CN_FORMAT: &str = "<proxy-UUID>.<kind>.<service-account>.<namespace>";

/// A connected proxy as identified by its node id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyNode {
    pub identity: ProxyIdentity,
    /// `node.user_agent_name` as received (empty when the node gave none): a hint only.
    pub user_agent: String,
    /// The node id as received.
    pub node_id: String,
}

/// Which string an identity was parsed from; named in every error so a log line alone tells the
/// operator which of the two was malformed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IdOrigin {
    /// The Envoy node id of a stream's first request.
    NodeId,
    /// The subject common name of the proxy's xDS client certificate.
    CertificateCn,
}

/// Why a node id or certificate common name was refused; every variant is FSM's E5001.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    #[error("the first request of the stream carries no node")]
    MissingNode,
    #[error("{origin} {id:?} has {parts} dot-separated parts, expected {}", origin.format())]
    WrongPartCount {
        origin: IdOrigin,
        id: String,
        parts: usize,
    },
    #[error("{origin} {id:?}: proxy UUID {uuid:?} is not a UUID (hex 8-4-4-4-12)")]
    InvalidUuid {
        origin: IdOrigin,
        id: String,
        uuid: String,
    },
    #[error("{origin} {id:?}: proxy kind {kind:?} is neither \"sidecar\" nor \"gateway\"")]
    InvalidKind {
        origin: IdOrigin,
        id: String,
        kind: String,
    },
    #[error("{origin} {id:?}: service account {service_account:?} is not a DNS label")]
    InvalidServiceAccount {
        origin: IdOrigin,
        id: String,
        service_account: String,
    },
    #[error("{origin} {id:?}: namespace {namespace:?} is not a DNS label")]
    InvalidNamespace {
        origin: IdOrigin,
        id: String,
        namespace: String,
    },
    #[error("node id {id:?}: trust domain {trust_domain:?} has an empty part")]
    InvalidTrustDomain { id: String, trust_domain: String },
}

impl HasErrCode for NodeError {
    fn err_code(&self) -> ErrCode {
        ErrCode::E5001
    }
}

impl IdOrigin {
    /// The expected form. The certificate CN never carries a trust domain: FSM issues it as
    /// `<proxy-UUID>.<kind>.<proxy-identity>`.
    fn format(self) -> &'static str {
        match self {
            IdOrigin::NodeId => FORMAT,
            IdOrigin::CertificateCn => CN_FORMAT,
        }
    }
}

impl fmt::Display for IdOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IdOrigin::NodeId => "node id",
            IdOrigin::CertificateCn => "certificate CN",
        })
    }
}

/// The `node.user_agent_name` fsm-sidecar announces itself with.
pub const FSM_SIDECAR_USER_AGENT: &str = "fsm-sidecar";

// === DataPlane ===

/// The data plane a stream is served, from its first request: native types mean fsm-sidecar,
/// Envoy's types mean Envoy resources (also for a generic xDS client without a user agent). Only
/// a type neither knows falls back on the user agent, and then on Envoy.
pub fn stream_data_plane(type_url: &str, native_types: &[&str], user_agent: &str) -> DataPlane {
    if native_types.contains(&type_url) {
        DataPlane::FsmSidecar
    } else if crate::protocol::ENVOY_TYPES.contains(&type_url) {
        DataPlane::Envoy
    } else if user_agent == FSM_SIDECAR_USER_AGENT {
        DataPlane::FsmSidecar
    } else {
        DataPlane::Envoy
    }
}

// === ProxyNode ===

impl ProxyNode {
    pub fn from_node(node: &Node) -> Result<Self, NodeError> {
        Self::parse(&node.id, &node.user_agent_name)
    }

    /// Parses a node id; `user_agent_name` is kept as a hint.
    pub fn parse(node_id: &str, user_agent_name: &str) -> Result<Self, NodeError> {
        let origin = IdOrigin::NodeId;
        let parts: Vec<&str> = node_id.splitn(5, '.').collect();
        let [uuid, kind, service_account, namespace, rest @ ..] = parts.as_slice() else {
            return Err(NodeError::WrongPartCount {
                origin,
                id: node_id.to_owned(),
                parts: node_id.split('.').count(),
            });
        };
        let identity = ProxyIdentity::from_parts([*uuid, *kind, *service_account, *namespace])
            .map_err(|e| NodeError::from_identity(origin, node_id, e))?;
        if let Some(trust_domain) = rest.first()
            && trust_domain.split('.').any(str::is_empty)
        {
            return Err(NodeError::InvalidTrustDomain {
                id: node_id.to_owned(),
                trust_domain: (*trust_domain).to_owned(),
            });
        }
        Ok(ProxyNode {
            identity,
            user_agent: user_agent_name.to_owned(),
            node_id: node_id.to_owned(),
        })
    }

    /// The snapshot cache key: the whole identity, never the UUID alone.
    pub fn key(&self) -> ProxyIdentity {
        self.identity.clone()
    }
}

// === XdsCertIdentity ===

/// The proxy named by the subject common name of its xDS client certificate, which FSM issues as
/// `<proxy-UUID>.<kind>.<service-account>.<namespace>` (exactly four parts, no trust domain).
///
/// When the ADS server authenticates its peers, the node id a proxy sends must name the same
/// proxy; see [`XdsCertIdentity::check_node`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XdsCertIdentity(pub ProxyIdentity);

impl std::ops::Deref for XdsCertIdentity {
    type Target = ProxyIdentity;

    fn deref(&self) -> &ProxyIdentity {
        &self.0
    }
}

/// A node id naming another proxy than the stream's client certificate: FSM's E5010 when the
/// service account differs (its name or namespace), E5004 when the proxy UUID or kind does.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "the node id {node_id:?} does not match the client certificate CN {common_name:?}: the {differs} differs"
)]
pub struct IdentityMismatch {
    pub common_name: String,
    pub node_id: String,
    /// The first part that differs, in this order: `service account`, `namespace`, `proxy UUID`,
    /// `proxy kind`.
    pub differs: &'static str,
}

impl HasErrCode for IdentityMismatch {
    fn err_code(&self) -> ErrCode {
        match self.differs {
            "service account" | "namespace" => ErrCode::E5010,
            _ => ErrCode::E5004,
        }
    }
}

impl XdsCertIdentity {
    /// Parses a certificate's subject common name with the node id's rules (E5001 on error).
    pub fn from_common_name(cn: &str) -> Result<Self, NodeError> {
        let origin = IdOrigin::CertificateCn;
        ProxyIdentity::parse(cn)
            .map(XdsCertIdentity)
            .map_err(|e| NodeError::from_identity(origin, cn, e))
    }

    /// Whether `node` names this very proxy. The UUID is compared exactly (not case-folded):
    /// it is the snapshot cache key, and FSM writes the certificate and the node id from the
    /// same pod label, so any difference is a different claim.
    pub fn check_node(&self, node: &ProxyNode) -> Result<(), IdentityMismatch> {
        let node_id = &node.node_id;
        let node = &node.identity;
        // The service account first: when it differs, whatever else does, the node id names
        // another identity than the certificate (FSM's E5010).
        let differs = if self.service_account != node.service_account {
            "service account"
        } else if self.namespace != node.namespace {
            "namespace"
        } else if self.uuid != node.uuid {
            "proxy UUID"
        } else if self.kind != node.kind {
            "proxy kind"
        } else {
            return Ok(());
        };
        Err(IdentityMismatch {
            common_name: self.to_string(),
            node_id: node_id.clone(),
            differs,
        })
    }
}

impl fmt::Display for XdsCertIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

// === The shared rules ===

impl NodeError {
    /// The E5001 error for a part that breaks `fsm_identity`'s rules, naming the whole `id` and
    /// where it came from.
    fn from_identity(origin: IdOrigin, id: &str, error: IdentityError) -> Self {
        let id = id.to_owned();
        match error {
            IdentityError::WrongPartCount { parts } => {
                NodeError::WrongPartCount { origin, id, parts }
            }
            IdentityError::InvalidUuid(uuid) => NodeError::InvalidUuid { origin, id, uuid },
            IdentityError::InvalidKind(kind) => NodeError::InvalidKind { origin, id, kind },
            IdentityError::InvalidServiceAccount(service_account) => {
                NodeError::InvalidServiceAccount {
                    origin,
                    id,
                    service_account,
                }
            }
            IdentityError::InvalidNamespace(namespace) => NodeError::InvalidNamespace {
                origin,
                id,
                namespace,
            },
        }
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
            assert_eq!(&*node.identity.uuid, UUID, "{name}");
            assert_eq!(node.identity.kind, *kind, "{name}");
            assert_eq!(&*node.identity.service_account, *sa, "{name}");
            assert_eq!(&*node.identity.namespace, *ns, "{name}");
            assert_eq!(node.node_id, node_id, "{name}");
            assert_eq!(
                node.key(),
                ProxyIdentity::new(UUID, *kind, sa, ns),
                "{name}"
            );
            assert_eq!(
                node.identity.service_identity(),
                format!("{sa}.{ns}"),
                "{name}"
            );
        }
    }

    #[test]
    fn uppercase_uuid_is_accepted() {
        let upper = UUID.to_uppercase();
        let node = ProxyNode::parse(&format!("{upper}.sidecar.a.b"), "envoy").expect("valid");
        assert_eq!(&*node.identity.uuid, upper);
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
    fn data_plane_comes_from_the_requested_type_then_the_user_agent() {
        const NATIVE: &[&str] = &["type.googleapis.com/fsm.dataplane.v1.Listener"];
        let cds = crate::protocol::CLUSTER;
        for (type_url, agent, expected) in [
            (cds, "envoy", DataPlane::Envoy),
            (cds, "", DataPlane::Envoy),
            (cds, "grpc-go", DataPlane::Envoy),
            // The type decides, not the user agent a client claims.
            (cds, "fsm-sidecar", DataPlane::Envoy),
            (NATIVE[0], "", DataPlane::FsmSidecar),
            (NATIVE[0], "envoy", DataPlane::FsmSidecar),
            ("type.example/Unknown", "fsm-sidecar", DataPlane::FsmSidecar),
            ("type.example/Unknown", "pipy", DataPlane::Envoy),
        ] {
            assert_eq!(
                stream_data_plane(type_url, NATIVE, agent),
                expected,
                "{type_url} {agent:?}"
            );
        }
    }

    #[test]
    fn certificate_cn_parses_with_the_node_id_rules() {
        let cn = id("gateway.fsm-ingress.fsm-system");
        let cert = XdsCertIdentity::from_common_name(&cn).expect("valid CN");
        assert_eq!(&*cert.uuid, UUID);
        assert_eq!(cert.kind, ProxyKind::Gateway);
        assert_eq!(&*cert.service_account, "fsm-ingress");
        assert_eq!(&*cert.namespace, "fsm-system");
        assert_eq!(cert.service_identity(), "fsm-ingress.fsm-system");
        assert_eq!(cert.to_string(), cn);
    }

    #[test]
    fn invalid_certificate_cns_are_e5001() {
        let cases: Vec<(&str, String, &str)> = vec![
            (
                "identity only",
                "bookbuyer.bookstore".into(),
                "certificate CN \"bookbuyer.bookstore\" has 2 dot-separated parts",
            ),
            (
                "trust domain is not part of the CN",
                id("sidecar.sa.ns.cluster.local"),
                "has 6 dot-separated parts, expected <proxy-UUID>.<kind>",
            ),
            ("empty", String::new(), "1 dot-separated parts"),
            ("not a uuid", "x.sidecar.sa.ns".into(), "proxy UUID \"x\""),
            ("kind", id("pipy.sa.ns"), "proxy kind \"pipy\""),
            ("service account", id("sidecar.S_A.ns"), "service account"),
            ("namespace", id("sidecar.sa."), "namespace \"\""),
        ];
        for (name, cn, needle) in cases {
            let err = XdsCertIdentity::from_common_name(&cn).expect_err(name);
            let message = err.to_string();
            assert!(
                message.contains(needle),
                "{name}: {message:?} should contain {needle:?}"
            );
            assert!(message.starts_with("certificate CN"), "{name}: {message}");
            assert_eq!(err.err_code(), ErrCode::E5001, "{name}");
        }
    }

    #[test]
    fn node_must_name_the_certificate_proxy() {
        let cert = XdsCertIdentity::from_common_name(&id("sidecar.bookbuyer.bookstore"))
            .expect("valid CN");
        let other_uuid = "11111111-2222-3333-4444-555555555555";
        let same = ProxyNode::parse(&id("sidecar.bookbuyer.bookstore.cluster.local"), "envoy")
            .expect("valid");
        assert_eq!(
            cert.check_node(&same),
            Ok(()),
            "the trust domain is ignored"
        );
        // E5010 is FSM's service-account mismatch only; another proxy is E5004.
        let cases = [
            (
                format!("{other_uuid}.sidecar.bookbuyer.bookstore"),
                "proxy UUID",
                ErrCode::E5004,
            ),
            (
                id("gateway.bookbuyer.bookstore"),
                "proxy kind",
                ErrCode::E5004,
            ),
            (
                id("sidecar.bookstore.bookstore"),
                "service account",
                ErrCode::E5010,
            ),
            (
                id("sidecar.bookbuyer.bookthief"),
                "namespace",
                ErrCode::E5010,
            ),
            (
                UUID.to_uppercase() + ".sidecar.bookbuyer.bookstore",
                "proxy UUID",
                ErrCode::E5004,
            ),
        ];
        for (node_id, differs, code) in cases {
            let node = ProxyNode::parse(&node_id, "envoy").expect("valid");
            let err = cert.check_node(&node).expect_err(&node_id);
            assert_eq!(err.differs, differs, "{node_id}");
            assert_eq!(err.err_code(), code, "{node_id}");
            let message = err.to_string();
            assert!(message.contains(&node_id), "{message}");
            assert!(message.contains(&cert.to_string()), "{message}");
        }
    }
}
