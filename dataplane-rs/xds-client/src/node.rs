//! The `Node` a sidecar announces on its ADS stream, in FSM's format.

use std::collections::HashMap;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::value::Kind;
use envoy_types::pb::google::protobuf::{Struct, Value};

/// What the control plane routes a sidecar's config by: the controller picks the native resource
/// types for `user_agent_name` "fsm-sidecar".
pub const USER_AGENT_NAME: &str = "fsm-sidecar";

/// Identity of this sidecar, from the command line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// `<uuid>.sidecar.<sa>.<ns>`.
    pub id: String,
    /// `<sa>.<ns>`.
    pub cluster: String,
    /// This pod's IP.
    pub pod_ip: String,
    /// Pod name, when known (metric labels).
    pub pod_name: Option<String>,
}

impl NodeInfo {
    /// `(service account, namespace)` from the node id's third and fourth parts.
    pub fn identity(&self) -> Option<(&str, &str)> {
        let mut parts = self.id.splitn(5, '.');
        let _uuid = parts.next()?;
        let _kind = parts.next()?;
        Some((parts.next()?, parts.next()?))
    }
}

/// The node as FSM's sidecars send it: id, cluster, user agent, and metadata naming the pod.
pub fn build_node(info: &NodeInfo) -> Node {
    let text = |s: &str| Value {
        kind: Some(Kind::StringValue(s.to_string())),
    };
    let mut fields = HashMap::new();
    if let Some((sa, ns)) = info.identity() {
        fields.insert("SERVICE_ACCOUNT".to_string(), text(sa));
        fields.insert("POD_NAMESPACE".to_string(), text(ns));
    }
    if !info.pod_ip.is_empty() {
        fields.insert("POD_IP".to_string(), text(&info.pod_ip));
    }
    if let Some(name) = &info.pod_name {
        fields.insert("POD_NAME".to_string(), text(name));
    }
    Node {
        id: info.id.clone(),
        cluster: info.cluster.clone(),
        user_agent_name: USER_AGENT_NAME.to_string(),
        metadata: Some(Struct { fields }),
        user_agent_version_type: Some(
            envoy_types::pb::envoy::config::core::v3::node::UserAgentVersionType::UserAgentVersion(
                env!("CARGO_PKG_VERSION").to_string(),
            ),
        ),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_has_fsm_identity_and_user_agent() {
        let info = NodeInfo {
            id: "6a1f3c2e-1b7d-4c1e-9a3f-0c5d2e8b7a10.sidecar.curl.demo".into(),
            cluster: "curl.demo".into(),
            pod_ip: "127.0.10.10".into(),
            pod_name: Some("curl".into()),
        };
        assert_eq!(info.identity(), Some(("curl", "demo")));
        let node = build_node(&info);
        assert_eq!(node.user_agent_name, "fsm-sidecar");
        assert_eq!(node.cluster, "curl.demo");
        let fields = node.metadata.expect("metadata").fields;
        assert_eq!(
            fields.get("POD_NAMESPACE").and_then(|v| v.kind.clone()),
            Some(Kind::StringValue("demo".into()))
        );
    }
}
