//! Names derived from a workload identity: the service certificate CN and SPIFFE ID, and FSM's
//! xDS client certificate CN `<proxy-UUID>.<kind>.<sa>.<ns>` (parsed back with E5001 on error).

use std::fmt;
use std::str::FromStr;

use uuid::Uuid;

use crate::error::CertError;

/// The service certificate CN suffix FSM uses (`<sa>.<ns>.cluster.local`).
pub const CLUSTER_DOMAIN: &str = "cluster.local";

// === ServiceIdentity ===

/// A workload identity: a ServiceAccount in a namespace (FSM writes it `<sa>.<ns>`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceIdentity {
    pub service_account: String,
    pub namespace: String,
}

impl ServiceIdentity {
    pub fn new(service_account: impl Into<String>, namespace: impl Into<String>) -> Self {
        Self {
            service_account: service_account.into(),
            namespace: namespace.into(),
        }
    }

    /// `<sa>.<ns>.cluster.local`, the service certificate's CN.
    pub fn common_name(&self) -> String {
        format!("{self}.{CLUSTER_DOMAIN}")
    }

    /// `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`, the service certificate's URI SAN.
    pub fn spiffe_id(&self, trust_domain: &str) -> String {
        format!(
            "spiffe://{trust_domain}/ns/{}/sa/{}",
            self.namespace, self.service_account
        )
    }

    fn validate(&self) -> Result<(), CertError> {
        for (what, v) in [
            ("service account", &self.service_account),
            ("namespace", &self.namespace),
        ] {
            if v.is_empty() || v.contains('.') || v.contains('/') {
                return Err(CertError::InvalidRequest(format!(
                    "{what} {v:?} must be a non-empty DNS label"
                )));
            }
        }
        Ok(())
    }

    pub(crate) fn checked(self) -> Result<Self, CertError> {
        self.validate().map(|()| self)
    }
}

impl fmt::Display for ServiceIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.service_account, self.namespace)
    }
}

// === ProxyKind ===

/// The `<kind>` part of an xDS certificate CN.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProxyKind {
    /// A sidecar proxy next to a workload (`sidecar`).
    Sidecar,
    /// A gateway proxy (`gateway`).
    Gateway,
}

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

impl FromStr for ProxyKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "sidecar" => Ok(ProxyKind::Sidecar),
            "gateway" => Ok(ProxyKind::Gateway),
            other => Err(format!("unknown proxy kind {other:?}")),
        }
    }
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
    fn from_str(cn: &str) -> Result<Self, CertError> {
        let bad = |reason: &str| CertError::XdsCommonName {
            cn: cn.to_owned(),
            reason: reason.to_owned(),
        };
        let parts: Vec<&str> = cn.split('.').collect();
        // Tolerate the `.cluster.local` suffix OSM appends to the CN prefix.
        let parts = match parts.as_slice() {
            [rest @ .., "cluster", "local"] => rest,
            all => all,
        };
        let [uuid, kind, sa, ns] = parts else {
            return Err(bad(
                "expected <proxy-UUID>.<kind>.<service-account>.<namespace>",
            ));
        };
        let proxy_uuid = Uuid::parse_str(uuid).map_err(|e| bad(&format!("proxy UUID: {e}")))?;
        let kind = kind.parse().map_err(|e: String| bad(&e))?;
        let identity = ServiceIdentity::new(*sa, *ns)
            .checked()
            .map_err(|e| bad(&e.to_string()))?;
        Ok(Self {
            proxy_uuid,
            kind,
            identity,
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
        assert_eq!(id.common_name(), "bookbuyer.bookstore.cluster.local");
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
        assert_eq!(text.parse::<XdsCommonName>().ok(), Some(cn.clone()));
        let with_suffix = format!("{text}.cluster.local");
        assert_eq!(with_suffix.parse::<XdsCommonName>().ok(), Some(cn));
    }

    #[test]
    fn malformed_xds_cn_is_e5001() {
        for bad in [
            "",
            "not-a-uuid.sidecar.sa.ns",
            "00000000-0000-0000-0000-000000001234.robot.sa.ns",
            "00000000-0000-0000-0000-000000001234.sidecar.sa",
            "00000000-0000-0000-0000-000000001234.sidecar.sa.ns.extra",
        ] {
            let err = bad.parse::<XdsCommonName>().err();
            assert_eq!(err.map(|e| e.code()), Some(ErrCode::E5001), "{bad:?}");
        }
    }
}
