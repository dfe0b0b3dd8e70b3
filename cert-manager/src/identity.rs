//! Names derived from a workload identity: the service certificate CN and SPIFFE ID, and FSM's
//! xDS client certificate CN `<proxy-UUID>.<kind>.<sa>.<ns>` (parsed back with E5001 on error).
//!
//! The proxy kind, the trust domain and the rules for the four parts of an xDS CN are
//! `fsm_identity`'s, shared with the ADS server that parses the same CN from its peers.

use std::fmt;
use std::str::FromStr;

use fsm_identity::ProxyIdentity;
pub use fsm_identity::ProxyKind;
use uuid::Uuid;

use crate::error::CertError;

/// The service certificate CN suffix FSM uses (`<sa>.<ns>.cluster.local`): the mesh's trust
/// domain, [`fsm_identity::TRUST_DOMAIN`], under the name this crate has always exported.
pub const CLUSTER_DOMAIN: &str = fsm_identity::TRUST_DOMAIN;

// === ServiceIdentity ===

/// A workload identity: a ServiceAccount in a namespace (FSM writes it `<sa>.<ns>`); the
/// mesh-wide type, shared with the IR and the controller. Its service certificate's CN is
/// `common_name(CLUSTER_DOMAIN)`.
pub use fsm_identity::ServiceIdentity;

/// The identity of a service certificate request, refused (E4014) when a part is empty or
/// contains a `.` or `/`, which would make its CN or SPIFFE ID ambiguous.
pub(crate) fn checked_service_identity(sa: &str, ns: &str) -> Result<ServiceIdentity, CertError> {
    for (what, v) in [("service account", sa), ("namespace", ns)] {
        if v.is_empty() || v.contains('.') || v.contains('/') {
            return Err(CertError::InvalidRequest(format!(
                "{what} {v:?} must be a non-empty DNS label"
            )));
        }
    }
    Ok(ServiceIdentity::new(sa, ns))
}

// === XdsCommonName ===

/// FSM's xDS client certificate CN, `<proxy-UUID>.<kind>.<proxy-identity>` where the identity
/// is `<sa>.<ns>`: e.g. `6f1c…-…​.sidecar.bookbuyer.bookstore`. The ADS server parses it from the
/// peer certificate with [`FromStr`]; a malformed CN is [`CertError::XdsCommonName`] (E5001).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct XdsCommonName {
    pub proxy_uuid: Uuid,
    pub kind: ProxyKind,
    pub identity: ServiceIdentity,
}

impl fmt::Display for XdsCommonName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.proxy_uuid, self.kind, self.identity)
    }
}

impl FromStr for XdsCommonName {
    type Err = CertError;
    /// Exactly four parts, checked by [`ProxyIdentity::parse`]'s rules (the ADS server's): a
    /// trust domain suffix is refused, as FSM never issues one in an xDS CN.
    fn from_str(cn: &str) -> Result<Self, CertError> {
        let bad = |reason: String| CertError::XdsCommonName {
            cn: cn.to_owned(),
            reason,
        };
        let id = ProxyIdentity::parse(cn).map_err(|e| bad(e.to_string()))?;
        // `parse` has checked the 8-4-4-4-12 hex form, which `Uuid` always accepts.
        let proxy_uuid = Uuid::parse_str(&id.uuid).map_err(|e| bad(format!("proxy UUID: {e}")))?;
        Ok(Self {
            proxy_uuid,
            kind: id.kind,
            identity: ServiceIdentity::new(&*id.service_account, &*id.namespace),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fsm_errcode::ErrCode;

    #[test]
    fn service_names() {
        let id = ServiceIdentity::new("bookbuyer", "bookstore");
        assert_eq!(
            id.common_name(CLUSTER_DOMAIN),
            "bookbuyer.bookstore.cluster.local"
        );
        assert_eq!(
            id.spiffe_id("cluster.local"),
            "spiffe://cluster.local/ns/bookstore/sa/bookbuyer"
        );
    }

    #[test]
    fn xds_cn_round_trips() {
        let cn = XdsCommonName {
            proxy_uuid: Uuid::from_u128(0x1234),
            kind: ProxyKind::Sidecar,
            identity: ServiceIdentity::new("bookbuyer", "bookstore"),
        };
        let text = cn.to_string();
        assert_eq!(
            text,
            "00000000-0000-0000-0000-000000001234.sidecar.bookbuyer.bookstore"
        );
        assert_eq!(text.parse::<XdsCommonName>().ok(), Some(cn));
        // One set of rules with the ADS server: no trust domain suffix in an xDS CN.
        let with_suffix = format!("{text}.{CLUSTER_DOMAIN}");
        assert!(with_suffix.parse::<XdsCommonName>().is_err());
    }

    #[test]
    fn malformed_xds_cn_is_e5001() {
        for bad in [
            "",
            "not-a-uuid.sidecar.sa.ns",
            "00000000-0000-0000-0000-000000001234.robot.sa.ns",
            "00000000-0000-0000-0000-000000001234.sidecar.sa",
            "00000000-0000-0000-0000-000000001234.sidecar.sa.ns.extra",
            "00000000-0000-0000-0000-000000001234.sidecar.sa.ns.cluster.local",
            // The shared rules: hyphenated UUIDs only, DNS labels for sa and ns.
            "00000000000000000000000000001234.sidecar.sa.ns",
            "00000000-0000-0000-0000-000000001234.sidecar.S_A.ns",
            "00000000-0000-0000-0000-000000001234.sidecar.sa.NS",
        ] {
            let err = bad.parse::<XdsCommonName>().err();
            assert_eq!(err.map(|e| e.code()), Some(ErrCode::E5001), "{bad:?}");
        }
        let err = "00000000-0000-0000-0000-000000001234.sidecar.S_A.ns"
            .parse::<XdsCommonName>()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("service account \"S_A\""), "{err}");
    }
}
