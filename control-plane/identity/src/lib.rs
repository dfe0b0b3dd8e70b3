//! Who is on the other end of an xDS stream.
//!
//! A proxy is named by four parts, in its node id and in its xDS client certificate's common name
//! (`<uuid>.<kind>.<service-account>.<namespace>`). The whole of it, not the UUID alone, is what
//! the control plane keys a proxy's snapshot by: a stream receives only what was computed for the
//! identity its certificate proves, so a pod that copies another pod's UUID label cannot reach the
//! other pod's configuration or keys.
//!
//! This crate holds the values every stage shares and the one set of rules for the four parts
//! ([`ProxyIdentity::from_parts`], [`ProxyIdentity::parse`]), so the ADS server (node ids and
//! peer certificates) and the certificate manager (xDS certificate CNs) cannot disagree on what
//! a proxy is. Callers map [`IdentityError`] to the error their FSM code is raised with (E5001).

#![forbid(unsafe_code)]

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// The mesh's trust domain: the suffix of service certificate CNs (`<sa>.<ns>.cluster.local`)
/// and the authority of SPIFFE IDs. FSM fixes it; one constant so that the compiler, the
/// certificate manager and the controller cannot drift apart.
pub const TRUST_DOMAIN: &str = "cluster.local";

/// The four parts of a proxy identity, as named in errors.
pub const PROXY_ID_FORMAT: &str = "<uuid>.<kind>.<service-account>.<namespace>";

/// A proxy's kind, the second part of its node id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ProxyKind {
    Sidecar,
    Gateway,
}

impl ProxyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyKind::Sidecar => "sidecar",
            ProxyKind::Gateway => "gateway",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "sidecar" => Some(ProxyKind::Sidecar),
            "gateway" => Some(ProxyKind::Gateway),
            _ => None,
        }
    }
}

/// A `<kind>` that is neither `sidecar` nor `gateway`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("proxy kind {0:?} is neither \"sidecar\" nor \"gateway\"")]
pub struct UnknownProxyKind(pub String);

impl FromStr for ProxyKind {
    type Err = UnknownProxyKind;

    fn from_str(s: &str) -> Result<Self, UnknownProxyKind> {
        ProxyKind::parse(s).ok_or_else(|| UnknownProxyKind(s.to_owned()))
    }
}

impl fmt::Display for ProxyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A workload identity: a ServiceAccount in a namespace, written `<sa>.<ns>`. Its service
/// certificate's CN is `<sa>.<ns>.<trust-domain>` and its URI SAN the SPIFFE ID. The one type
/// the IR, the certificate manager and the controller share (serde: `serviceAccount`,
/// `namespace`, as in the golden IR).
#[derive(
    Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "camelCase")]
pub struct ServiceIdentity {
    pub service_account: String,
    pub namespace: String,
}

impl ServiceIdentity {
    pub fn new(service_account: impl Into<String>, namespace: impl Into<String>) -> Self {
        ServiceIdentity {
            service_account: service_account.into(),
            namespace: namespace.into(),
        }
    }

    /// `<sa>.<ns>.<trust-domain>`, the service certificate's CN.
    pub fn common_name(&self, trust_domain: &str) -> String {
        format!("{self}.{trust_domain}")
    }

    /// `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`: the URI SAN every service certificate
    /// carries; peers are authenticated by it.
    pub fn spiffe_id(&self, trust_domain: &str) -> String {
        format!(
            "spiffe://{trust_domain}/ns/{}/sa/{}",
            self.namespace, self.service_account
        )
    }
}

/// `<sa>.<ns>`.
impl fmt::Display for ServiceIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.service_account, self.namespace)
    }
}

/// The service identity a proxy runs as: its service account and namespace.
impl From<&ProxyIdentity> for ServiceIdentity {
    fn from(proxy: &ProxyIdentity) -> Self {
        ServiceIdentity::new(&*proxy.service_account, &*proxy.namespace)
    }
}

/// The whole identity of one proxy: the key of its snapshot and of its state everywhere in the
/// control plane. Cheap to clone (shared strings).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProxyIdentity {
    /// The pod's `fsm-proxy-uuid` label value.
    pub uuid: Arc<str>,
    pub kind: ProxyKind,
    pub service_account: Arc<str>,
    pub namespace: Arc<str>,
}

impl ProxyIdentity {
    pub fn new(uuid: &str, kind: ProxyKind, service_account: &str, namespace: &str) -> Self {
        ProxyIdentity {
            uuid: Arc::from(uuid),
            kind,
            service_account: Arc::from(service_account),
            namespace: Arc::from(namespace),
        }
    }

    /// Checks the four parts by the rules every parser of a proxy id shares:
    ///
    /// - `uuid`: hex in 8-4-4-4-12 form (either case; kept as given, since it is compared
    ///   exactly with the node id written from the same pod label);
    /// - `kind`: `sidecar` or `gateway`;
    /// - `service_account`, `namespace`: RFC 1123 DNS labels (lowercase alphanumerics and `-`,
    ///   1 to 63 characters, alphanumeric at both ends). A dot would make the id ambiguous.
    ///
    /// The first bad part, in that order, is the error.
    pub fn from_parts(
        [uuid, kind, service_account, namespace]: [&str; 4],
    ) -> Result<Self, IdentityError> {
        if !is_uuid(uuid) {
            return Err(IdentityError::InvalidUuid(uuid.to_owned()));
        }
        let Some(kind) = ProxyKind::parse(kind) else {
            return Err(IdentityError::InvalidKind(kind.to_owned()));
        };
        if !is_dns_label(service_account) {
            return Err(IdentityError::InvalidServiceAccount(
                service_account.to_owned(),
            ));
        }
        if !is_dns_label(namespace) {
            return Err(IdentityError::InvalidNamespace(namespace.to_owned()));
        }
        Ok(ProxyIdentity::new(uuid, kind, service_account, namespace))
    }

    /// Parses exactly `<uuid>.<kind>.<service-account>.<namespace>` (an xDS certificate's common
    /// name: no trust domain), with the rules of [`ProxyIdentity::from_parts`].
    pub fn parse(text: &str) -> Result<Self, IdentityError> {
        let parts: Vec<&str> = text.split('.').collect();
        let [uuid, kind, service_account, namespace] = parts.as_slice() else {
            return Err(IdentityError::WrongPartCount { parts: parts.len() });
        };
        Self::from_parts([uuid, kind, service_account, namespace])
    }

    /// FSM's service identity, `<sa>.<ns>`, as used in metric labels.
    pub fn service_identity(&self) -> String {
        format!("{}.{}", self.service_account, self.namespace)
    }
}

/// `<uuid>.<kind>.<service-account>.<namespace>`, the form of the certificate's common name.
impl fmt::Display for ProxyIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{}.{}.{}",
            self.uuid, self.kind, self.service_account, self.namespace
        )
    }
}

impl serde::Serialize for ProxyIdentity {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl FromStr for ProxyIdentity {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, IdentityError> {
        Self::parse(s)
    }
}

/// Which part of a proxy id breaks the rules of [`ProxyIdentity::from_parts`]. Each message
/// names the part and quotes it; callers add the whole id and their FSM code (E5001).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("{parts} dot-separated parts, expected {PROXY_ID_FORMAT}")]
    WrongPartCount { parts: usize },
    #[error("proxy UUID {0:?} is not a UUID (hex 8-4-4-4-12)")]
    InvalidUuid(String),
    #[error("proxy kind {0:?} is neither \"sidecar\" nor \"gateway\"")]
    InvalidKind(String),
    #[error("service account {0:?} is not a DNS label")]
    InvalidServiceAccount(String),
    #[error("namespace {0:?} is not a DNS label")]
    InvalidNamespace(String),
}

/// Whether `s` is a UUID in its hyphenated hex form, 8-4-4-4-12 (either case).
pub fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, len)| g.len() == len && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Whether `s` is an RFC 1123 DNS label: 1 to 63 lowercase alphanumerics or `-`, alphanumeric
/// at both ends (Kubernetes' rule for namespaces and service account names).
pub fn is_dns_label(s: &str) -> bool {
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

/// The resource family one stream is served. Decided per stream from what it asks for, never
/// from another stream of the same proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DataPlane {
    /// Envoy's xDS v3 types: Envoy, and any generic xDS client asking for them.
    Envoy,
    /// Our own sidecar (`dataplane-rs`), served the native `fsm.dataplane.v1` types.
    FsmSidecar,
}

impl fmt::Display for DataPlane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DataPlane::Envoy => "envoy",
            DataPlane::FsmSidecar => "fsm-sidecar",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_displays_as_certificate_common_name() {
        let id = ProxyIdentity::new("u", ProxyKind::Sidecar, "curl", "demo");
        assert_eq!(id.to_string(), "u.sidecar.curl.demo");
        assert_eq!(id.service_identity(), "curl.demo");
        assert_eq!(ProxyKind::parse("gateway"), Some(ProxyKind::Gateway));
        assert_eq!(ProxyKind::parse("Sidecar"), None);
    }

    #[test]
    fn every_part_distinguishes_identities() {
        let base = ProxyIdentity::new("u", ProxyKind::Sidecar, "curl", "demo");
        for other in [
            ProxyIdentity::new("v", ProxyKind::Sidecar, "curl", "demo"),
            ProxyIdentity::new("u", ProxyKind::Gateway, "curl", "demo"),
            ProxyIdentity::new("u", ProxyKind::Sidecar, "evil", "demo"),
            ProxyIdentity::new("u", ProxyKind::Sidecar, "curl", "other"),
        ] {
            assert_ne!(base, other, "{other}");
        }
    }

    const UUID: &str = "0f9e3a52-2d4b-4c64-9a39-0c6f6fd1b6a5";

    #[test]
    fn valid_ids_parse_into_their_parts() {
        let upper = UUID.to_uppercase();
        let long = "a".repeat(63);
        let cases: Vec<(String, &str, ProxyKind, &str, &str)> = vec![
            (
                format!("{UUID}.sidecar.bookbuyer.bookstore"),
                UUID,
                ProxyKind::Sidecar,
                "bookbuyer",
                "bookstore",
            ),
            (
                format!("{UUID}.gateway.fsm-ingress.fsm-system"),
                UUID,
                ProxyKind::Gateway,
                "fsm-ingress",
                "fsm-system",
            ),
            (
                format!("{UUID}.sidecar.0sa9.1ns2"),
                UUID,
                ProxyKind::Sidecar,
                "0sa9",
                "1ns2",
            ),
            (
                format!("{upper}.sidecar.a.b"),
                &upper,
                ProxyKind::Sidecar,
                "a",
                "b",
            ),
            (
                format!("{UUID}.sidecar.{long}.b"),
                UUID,
                ProxyKind::Sidecar,
                &long,
                "b",
            ),
        ];
        for (text, uuid, kind, sa, ns) in &cases {
            let id = ProxyIdentity::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(id, ProxyIdentity::new(uuid, *kind, sa, ns), "{text}");
            assert_eq!(id.to_string(), *text, "{text}: display round-trips");
            assert_eq!(text.parse::<ProxyIdentity>().as_ref(), Ok(&id));
        }
    }

    #[test]
    fn invalid_ids_name_the_first_bad_part() {
        use IdentityError::*;
        let long = "a".repeat(64);
        let cases: Vec<(String, IdentityError)> = vec![
            (String::new(), WrongPartCount { parts: 1 }),
            (format!("{UUID}.sidecar.sa"), WrongPartCount { parts: 3 }),
            // No trust domain in this form: FSM issues xDS CNs without one.
            (
                format!("{UUID}.sidecar.sa.ns.{TRUST_DOMAIN}"),
                WrongPartCount { parts: 6 },
            ),
            (
                "proxy-1.sidecar.sa.ns".into(),
                InvalidUuid("proxy-1".into()),
            ),
            (
                "0f9e3a5-2d4b-4c64-9a39-0c6f6fd1b6a5.sidecar.sa.ns".into(),
                InvalidUuid("0f9e3a5-2d4b-4c64-9a39-0c6f6fd1b6a5".into()),
            ),
            (
                "0f9e3a522d4b4c649a390c6f6fd1b6a5.sidecar.sa.ns".into(),
                InvalidUuid("0f9e3a522d4b4c649a390c6f6fd1b6a5".into()),
            ),
            (
                "0f9e3a52-2d4b-4c64-9a39-0c6f6fd1b6ag.sidecar.sa.ns".into(),
                InvalidUuid("0f9e3a52-2d4b-4c64-9a39-0c6f6fd1b6ag".into()),
            ),
            (
                format!("{UUID}.Sidecar.sa.ns"),
                InvalidKind("Sidecar".into()),
            ),
            (format!("{UUID}.pipy.sa.ns"), InvalidKind("pipy".into())),
            (
                format!("{UUID}.sidecar.S_A.ns"),
                InvalidServiceAccount("S_A".into()),
            ),
            (
                format!("{UUID}.sidecar.-sa.ns"),
                InvalidServiceAccount("-sa".into()),
            ),
            (
                format!("{UUID}.sidecar.{long}.ns"),
                InvalidServiceAccount(long.clone()),
            ),
            (
                format!("{UUID}.sidecar..ns"),
                InvalidServiceAccount(String::new()),
            ),
            (
                format!("{UUID}.sidecar.sa.ns-"),
                InvalidNamespace("ns-".into()),
            ),
            (
                format!("{UUID}.sidecar.sa.Ns"),
                InvalidNamespace("Ns".into()),
            ),
            (
                format!("{UUID}.sidecar.sa."),
                InvalidNamespace(String::new()),
            ),
            // The order of the checks decides which part is named.
            ("x.pipy.S.N".into(), InvalidUuid("x".into())),
        ];
        for (text, expected) in cases {
            assert_eq!(ProxyIdentity::parse(&text), Err(expected), "{text:?}");
        }
        assert_eq!(
            "robot".parse::<ProxyKind>(),
            Err(UnknownProxyKind("robot".into()))
        );
    }

    #[test]
    fn service_identity_names() {
        let proxy = ProxyIdentity::new(UUID, ProxyKind::Sidecar, "bookbuyer", "bookstore");
        let id = ServiceIdentity::from(&proxy);
        assert_eq!(id, ServiceIdentity::new("bookbuyer", "bookstore"));
        assert_eq!(id.to_string(), proxy.service_identity());
        assert_eq!(
            id.common_name(TRUST_DOMAIN),
            "bookbuyer.bookstore.cluster.local"
        );
        assert_eq!(
            id.spiffe_id(TRUST_DOMAIN),
            "spiffe://cluster.local/ns/bookstore/sa/bookbuyer"
        );
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn dns_label() -> impl Strategy<Value = String> {
            "[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
        }

        proptest! {
            /// Whatever valid parts a proxy has, its id parses back to exactly them.
            #[test]
            fn valid_parts_round_trip(
                uuid in "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
                gateway in any::<bool>(),
                sa in dns_label(),
                ns in dns_label(),
            ) {
                let kind = if gateway { ProxyKind::Gateway } else { ProxyKind::Sidecar };
                let id = ProxyIdentity::new(&uuid, kind, &sa, &ns);
                prop_assert_eq!(ProxyIdentity::parse(&id.to_string()), Ok(id));
            }

            /// Four near-valid parts parse exactly when each obeys its rule; the error names
            /// the first part (in id order) that does not, and an accepted id prints back as
            /// the very text it came from.
            #[test]
            fn parse_accepts_exactly_the_rules(
                uuid in prop_oneof![
                    "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
                    "[0-9a-fA-Fg-]{34,38}",
                ],
                kind in "sidecar|gateway|Sidecar|pipy|",
                sa in prop_oneof![dns_label(), "[a-zA-Z0-9_-]{0,6}".boxed()],
                ns in "[a-z0-9-]{0,6}",
            ) {
                let text = format!("{uuid}.{kind}.{sa}.{ns}");
                let expected = if !is_uuid(&uuid) {
                    Err(IdentityError::InvalidUuid(uuid.clone()))
                } else if ProxyKind::parse(&kind).is_none() {
                    Err(IdentityError::InvalidKind(kind.clone()))
                } else if !is_dns_label(&sa) {
                    Err(IdentityError::InvalidServiceAccount(sa.clone()))
                } else if !is_dns_label(&ns) {
                    Err(IdentityError::InvalidNamespace(ns.clone()))
                } else {
                    Ok(text.clone())
                };
                let got = ProxyIdentity::parse(&text).map(|id| id.to_string());
                prop_assert_eq!(got, expected);
            }

            /// A dot inside a part changes the part count, so no part can smuggle one in.
            #[test]
            fn parts_never_contain_dots(sa in "[a-z.]{1,10}", ns in dns_label()) {
                let text = format!("{UUID}.sidecar.{sa}.{ns}");
                match ProxyIdentity::parse(&text) {
                    Ok(id) => prop_assert!(!id.service_account.contains('.')),
                    Err(e) => prop_assert!(sa.contains('.') || !is_dns_label(&sa), "{e}"),
                }
            }
        }
    }
}
