//! Who is on the other end of an xDS stream.
//!
//! A proxy is named by four parts, in its node id and in its xDS client certificate's common name
//! (`<uuid>.<kind>.<service-account>.<namespace>`). The whole of it, not the UUID alone, is what
//! the control plane keys a proxy's snapshot by: a stream receives only what was computed for the
//! identity its certificate proves, so a pod that copies another pod's UUID label cannot reach the
//! other pod's configuration or keys.
//!
//! Parsing and the rules for each part live in `fsm-xds-server` (node ids) beside the errors they
//! raise; this crate holds the values every stage shares.

#![forbid(unsafe_code)]

use std::fmt;
use std::sync::Arc;

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

impl fmt::Display for ProxyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
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
}
