//! fsm.dataplane.v1: the native data-plane resource types served over ADS.
//!
//! The messages are generated at build time from `fsm/dataplane/v1/*.proto` (read those for the
//! semantics a sidecar must implement). Each resource travels over the same ADS stream as Envoy's
//! resources, as a `google.protobuf.Any` whose type URL is in [`type_url`].

use std::fmt;

pub mod json;

/// The generated `fsm.dataplane.v1` messages.
// Generated code: clippy judges the .proto comments turned into doc comments, not our code.
#[allow(clippy::all)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/fsm.dataplane.v1.rs"));
}

/// Type URLs of the six resource types, as they appear in `Any.type_url` and in
/// `DiscoveryRequest.type_url`.
pub mod type_url {
    pub const CLUSTER: &str = "type.googleapis.com/fsm.dataplane.v1.Cluster";
    pub const CLUSTER_LOAD_ASSIGNMENT: &str =
        "type.googleapis.com/fsm.dataplane.v1.ClusterLoadAssignment";
    pub const LISTENER: &str = "type.googleapis.com/fsm.dataplane.v1.Listener";
    pub const ROUTE_CONFIGURATION: &str = "type.googleapis.com/fsm.dataplane.v1.RouteConfiguration";
    pub const SECRET: &str = "type.googleapis.com/fsm.dataplane.v1.Secret";
    pub const RUNTIME: &str = "type.googleapis.com/fsm.dataplane.v1.Runtime";
}

/// Every resource type, in the order ADS responses go out: CDS-like, EDS, LDS, RDS, SDS, then the
/// proxy-wide `Runtime` (nothing refers to it, and a sidecar is ready without it).
pub const ALL_TYPE_URLS: [&str; 6] = [
    type_url::CLUSTER,
    type_url::CLUSTER_LOAD_ASSIGNMENT,
    type_url::LISTENER,
    type_url::ROUTE_CONFIGURATION,
    type_url::SECRET,
    type_url::RUNTIME,
];

/// The name of the one `Runtime` resource each proxy is sent.
pub const RUNTIME_NAME: &str = "runtime";

/// The encoded `google.protobuf.FileDescriptorSet` of `fsm.dataplane.v1` and its imports, without
/// comments: for reflection, e.g. a JSON view of resources in golden files or `/config_dump`.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/fsm_dataplane_v1_descriptor.bin"));

// === v1::TlsCertificate ===

impl fmt::Debug for v1::TlsCertificate {
    /// Shows the certificate chain and only the length of the private key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsCertificate")
            .field(
                "certificate_chain",
                &String::from_utf8_lossy(&self.certificate_chain),
            )
            .field(
                "private_key",
                &format_args!("<{} bytes redacted>", self.private_key.len()),
            )
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::{Message, Name};

    #[test]
    fn type_urls_name_the_generated_messages() {
        assert_eq!(type_url::CLUSTER, v1::Cluster::type_url());
        assert_eq!(
            type_url::CLUSTER_LOAD_ASSIGNMENT,
            v1::ClusterLoadAssignment::type_url()
        );
        assert_eq!(type_url::LISTENER, v1::Listener::type_url());
        assert_eq!(
            type_url::ROUTE_CONFIGURATION,
            v1::RouteConfiguration::type_url()
        );
        assert_eq!(type_url::SECRET, v1::Secret::type_url());
        assert_eq!(type_url::RUNTIME, v1::Runtime::type_url());
    }

    #[test]
    fn messages_round_trip() {
        let listener = v1::Listener {
            name: "inbound-listener".into(),
            address: Some(v1::SocketAddress {
                ip: "127.0.0.1".into(),
                port: 15003,
            }),
            direction: v1::TrafficDirection::Inbound as i32,
            filter_chains: vec![v1::FilterChain {
                name: "explicit-http".into(),
                protocol: v1::Protocol::Http as i32,
                target: Some(v1::filter_chain::Target::Http(v1::HttpTarget {
                    route_config_name: "inbound".into(),
                })),
                ..Default::default()
            }],
            tracing: Some(v1::Tracing {
                collector_cluster: "pipy-tracing-cluster".into(),
                collector_endpoint: "/api/v2/spans".into(),
                sampled_per_million: 1_000_000,
                service_name: "httpbin.app".into(),
            }),
        };
        let bytes = listener.encode_to_vec();
        assert_eq!(v1::Listener::decode(bytes.as_slice()), Ok(listener));
    }

    #[test]
    fn debug_redacts_private_keys() {
        let cert = v1::TlsCertificate {
            certificate_chain: b"-----BEGIN CERTIFICATE-----".to_vec(),
            private_key: b"-----BEGIN PRIVATE KEY----- secret".to_vec(),
        };
        let secret = v1::Secret {
            name: "service-cert".into(),
            kind: Some(v1::secret::Kind::TlsCertificate(cert)),
        };
        let text = format!("{secret:?}");
        assert!(!text.contains("secret\""), "{text}");
        assert!(!text.contains("PRIVATE KEY"), "{text}");
        assert!(text.contains("<34 bytes redacted>"), "{text}");
    }

    #[test]
    fn descriptor_set_holds_every_resource() {
        let fds = prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET)
            .expect("descriptor set decodes");
        let messages: Vec<String> = fds
            .file
            .iter()
            .filter(|f| f.package() == "fsm.dataplane.v1")
            .flat_map(|f| f.message_type.iter().map(|m| m.name().to_string()))
            .collect();
        for url in ALL_TYPE_URLS {
            let name = url.rsplit('.').next().expect("type url has a dot");
            assert!(messages.iter().any(|m| m == name), "{name} missing");
        }
    }
}
