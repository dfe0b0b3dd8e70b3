//! What a simulated proxy reads from xDS responses, decoded as little and as rarely as possible.
//!
//! The load generator shares two cores with the controller, so thousands of proxies cannot each
//! decode a thousand clusters per response. Responses are read with [`LiteResponse`] and
//! [`LiteDeltaResponse`] (only the fields a proxy acts on; every resource stays opaque bytes), and
//! what a resource references (the EDS, RDS and SDS names Envoy would subscribe to next) is decoded
//! once per distinct content and shared through [`Memo`]: proxies of one identity receive the same
//! bytes, and a resource's meaning is a function of its bytes.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{Context, Result};
use bytes::Bytes;
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{ClusterDiscoveryType, DiscoveryType};
use envoy_types::pb::envoy::config::core::v3::TransportSocket;
use envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType as SocketConfig;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::listener::v3::filter::ConfigType as FilterConfig;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::RouteSpecifier;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::common_tls_context::ValidationContextType;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CommonTlsContext, DownstreamTlsContext, UpstreamTlsContext,
};
use parking_lot::{Mutex, MutexGuard, RwLock};
use prost::Message;

/// The five types a sidecar uses, in the order Envoy needs them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum XdsType {
    Cds,
    Lds,
    Eds,
    Rds,
    Sds,
}

impl XdsType {
    pub const ALL: [XdsType; 5] = [Self::Cds, Self::Lds, Self::Eds, Self::Rds, Self::Sds];

    pub fn url(self) -> &'static str {
        match self {
            Self::Cds => "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            Self::Lds => "type.googleapis.com/envoy.config.listener.v3.Listener",
            Self::Eds => "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
            Self::Rds => "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
            Self::Sds => "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
        }
    }

    pub fn from_url(url: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.url() == url)
    }

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::Cds => "CDS",
            Self::Lds => "LDS",
            Self::Eds => "EDS",
            Self::Rds => "RDS",
            Self::Sds => "SDS",
        }
    }
}

/// A `google.protobuf.Any` whose type URL is not read (the response names the type).
#[derive(Clone, PartialEq, Message)]
pub struct LiteAny {
    #[prost(bytes = "bytes", tag = "2")]
    pub value: Bytes,
}

/// `DiscoveryResponse` with only what a SotW client acts on.
#[derive(Clone, PartialEq, Message)]
pub struct LiteResponse {
    #[prost(string, tag = "1")]
    pub version_info: String,
    #[prost(message, repeated, tag = "2")]
    pub resources: Vec<LiteAny>,
    #[prost(string, tag = "4")]
    pub type_url: String,
    #[prost(string, tag = "5")]
    pub nonce: String,
}

/// `DiscoveryRequest` without `error_detail` (every response is ACKed), with its resource names
/// encoded once per subscription: a SotW ACK repeats every subscribed name (a thousand EDS names
/// per proxy), which as a string each would be a thousand allocations and encodings per ACK.
/// The bytes on the wire are those of a `DiscoveryRequest`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LiteRequest {
    pub version_info: String,
    pub node: Option<envoy_types::pb::envoy::config::core::v3::Node>,
    /// The `resource_names` fields, encoded ([`LiteRequest::encode_names`]).
    pub resource_names: Bytes,
    pub type_url: String,
    pub response_nonce: String,
}

impl LiteRequest {
    /// `names` as the `resource_names` fields of a request.
    pub fn encode_names<'a>(names: impl IntoIterator<Item = &'a str>) -> Bytes {
        use prost::encoding::{WireType, encode_key, encode_varint};
        let mut out = Vec::new();
        for name in names {
            encode_key(3, WireType::LengthDelimited, &mut out);
            encode_varint(name.len() as u64, &mut out);
            out.extend_from_slice(name.as_bytes());
        }
        out.into()
    }
}

/// `DeltaDiscoveryRequest` without `initial_resource_versions` and `error_detail`, with the
/// names it subscribes to encoded once per subscription change ([`Memo::request_names`]: field 3,
/// as in [`LiteRequest`]). The bytes on the wire are those of a `DeltaDiscoveryRequest`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LiteDeltaRequest {
    pub node: Option<envoy_types::pb::envoy::config::core::v3::Node>,
    pub type_url: String,
    /// The `resource_names_subscribe` fields, encoded.
    pub subscribe: Bytes,
    pub unsubscribe: Vec<String>,
    pub response_nonce: String,
}

/// Encode only: the load generator never receives a request.
impl Message for LiteDeltaRequest {
    fn encode_raw(&self, buf: &mut impl bytes::BufMut) {
        use prost::encoding::{message, string};
        if let Some(node) = &self.node {
            message::encode(1, node, buf);
        }
        if !self.type_url.is_empty() {
            string::encode(2, &self.type_url, buf);
        }
        buf.put_slice(&self.subscribe);
        string::encode_repeated(4, &self.unsubscribe, buf);
        if !self.response_nonce.is_empty() {
            string::encode(6, &self.response_nonce, buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: prost::encoding::WireType,
        buf: &mut impl bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        use prost::encoding::{message, string};
        self.node
            .as_ref()
            .map_or(0, |node| message::encoded_len(1, node))
            + if self.type_url.is_empty() {
                0
            } else {
                string::encoded_len(2, &self.type_url)
            }
            + self.subscribe.len()
            + string::encoded_len_repeated(4, &self.unsubscribe)
            + if self.response_nonce.is_empty() {
                0
            } else {
                string::encoded_len(6, &self.response_nonce)
            }
    }

    fn clear(&mut self) {
        *self = LiteDeltaRequest::default();
    }
}

/// Encode only: the load generator never receives a request.
impl Message for LiteRequest {
    fn encode_raw(&self, buf: &mut impl bytes::BufMut) {
        use prost::encoding::{message, string};
        if !self.version_info.is_empty() {
            string::encode(1, &self.version_info, buf);
        }
        if let Some(node) = &self.node {
            message::encode(2, node, buf);
        }
        buf.put_slice(&self.resource_names);
        if !self.type_url.is_empty() {
            string::encode(4, &self.type_url, buf);
        }
        if !self.response_nonce.is_empty() {
            string::encode(5, &self.response_nonce, buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: prost::encoding::WireType,
        buf: &mut impl bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        use prost::encoding::{message, string};
        let text = |tag, s: &String| {
            if s.is_empty() {
                0
            } else {
                string::encoded_len(tag, s)
            }
        };
        text(1, &self.version_info)
            + self
                .node
                .as_ref()
                .map_or(0, |node| message::encoded_len(2, node))
            + self.resource_names.len()
            + text(4, &self.type_url)
            + text(5, &self.response_nonce)
    }

    fn clear(&mut self) {
        *self = LiteRequest::default();
    }
}

/// `Resource` of a delta response, without aliases, TTL and metadata. Its name and version are
/// read as slices of the response (same wire type as `string`), not a string each: a warm-up
/// delivers a thousand resources of a kind to every proxy.
#[derive(Clone, PartialEq, Message)]
pub struct LiteResource {
    #[prost(bytes = "bytes", tag = "1")]
    pub version: Bytes,
    #[prost(message, optional, tag = "2")]
    pub resource: Option<LiteAny>,
    #[prost(bytes = "bytes", tag = "3")]
    pub name: Bytes,
}

/// `DeltaDiscoveryResponse` with only what a delta client acts on.
#[derive(Clone, PartialEq, Message)]
pub struct LiteDeltaResponse {
    #[prost(message, repeated, tag = "2")]
    pub resources: Vec<LiteResource>,
    #[prost(string, tag = "4")]
    pub type_url: String,
    #[prost(string, tag = "5")]
    pub nonce: String,
    #[prost(string, repeated, tag = "6")]
    pub removed_resources: Vec<String>,
}

/// Only the name of a resource (field 1 of Cluster, Listener, RouteConfiguration, Secret and
/// ClusterLoadAssignment alike).
#[derive(Clone, PartialEq, Message)]
struct Named {
    #[prost(string, tag = "1")]
    name: String,
}

/// What one resource is called and what it makes Envoy ask for. Names are interned ids.
#[derive(Debug, Default)]
pub struct ResourceInfo {
    pub name: u32,
    /// EDS names of the EDS clusters (CDS).
    pub eds: Vec<u32>,
    /// Route configuration names of RDS listeners (LDS).
    pub rds: Vec<u32>,
    /// Secret names referenced by transport sockets (CDS, LDS).
    pub sds: Vec<u32>,
    /// A ClusterLoadAssignment carrying the watched marker (see [`Memo::set_marker`]).
    pub marker: bool,
}

/// The union of a SotW response's resources (every response is the whole state of its type).
#[derive(Debug, Default)]
pub struct ResponseInfo {
    /// Sorted names of the resources.
    pub names: Vec<u32>,
    pub eds: Vec<u32>,
    pub rds: Vec<u32>,
    pub sds: Vec<u32>,
    pub marker: bool,
}

/// Interned names and memoized resource meanings, shared by every simulated proxy.
#[derive(Default)]
pub struct Memo {
    names: Mutex<Interner>,
    resources: Mutex<HashMap<(XdsType, u64), Arc<ResourceInfo>>>,
    responses: Mutex<HashMap<(XdsType, u64), Arc<ResponseInfo>>>,
    /// Bytes whose presence in a ClusterLoadAssignment marks the endpoint change under watch.
    marker: RwLock<Option<Vec<u8>>>,
}

#[derive(Default)]
struct Interner {
    ids: HashMap<Arc<str>, u32>,
    names: Vec<Arc<str>>,
}

impl Memo {
    pub fn intern(&self, name: &str) -> u32 {
        let mut names = self.names.lock();
        if let Some(id) = names.ids.get(name) {
            return *id;
        }
        let id = u32::try_from(names.names.len()).unwrap_or(u32::MAX);
        let name: Arc<str> = name.into();
        names.names.push(name.clone());
        names.ids.insert(name, id);
        id
    }

    /// The names of `ids`, as a request's `resource_names` ([`LiteRequest::encode_names`]).
    pub fn request_names(&self, ids: &[u32]) -> Bytes {
        let names = self.names.lock();
        LiteRequest::encode_names(
            ids.iter()
                .map(|id| names.names.get(*id as usize).map_or("", |n| &**n)),
        )
    }

    pub fn name(&self, id: u32) -> Arc<str> {
        let names = self.names.lock();
        names
            .names
            .get(id as usize)
            .cloned()
            .unwrap_or_else(|| "".into())
    }

    /// Watches for `marker` in ClusterLoadAssignments decoded from now on. Content seen before
    /// cannot contain it: the marker is an address the mesh has never used.
    pub fn set_marker(&self, marker: &[u8]) {
        *self.marker.write() = Some(marker.to_vec());
    }

    /// What the resource `bytes` of type `kind` names and references.
    pub fn resource(&self, kind: XdsType, bytes: &[u8]) -> Result<Arc<ResourceInfo>> {
        let key = (kind, xxhash_rust::xxh3::xxh3_64(bytes));
        if let Some(info) = self.lock_resources().get(&key) {
            return Ok(info.clone());
        }
        // Decoded outside the lock: two proxies racing on one new resource decode it twice,
        // which is harmless and rarer than every proxy waiting on one decoder.
        let info = Arc::new(self.decode(kind, bytes)?);
        self.lock_resources().insert(key, info.clone());
        Ok(info)
    }

    /// The union of a SotW response's resources.
    pub fn response(&self, kind: XdsType, resources: &[LiteAny]) -> Result<Arc<ResponseInfo>> {
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        for any in resources {
            hasher.update(&(any.value.len() as u64).to_le_bytes());
            hasher.update(&any.value);
        }
        let key = (kind, hasher.digest());
        if let Some(info) = self.lock_responses().get(&key) {
            return Ok(info.clone());
        }
        let mut info = ResponseInfo::default();
        for any in resources {
            let resource = self.resource(kind, &any.value)?;
            info.names.push(resource.name);
            info.eds.extend(&resource.eds);
            info.rds.extend(&resource.rds);
            info.sds.extend(&resource.sds);
            info.marker |= resource.marker;
        }
        for list in [&mut info.names, &mut info.eds, &mut info.rds, &mut info.sds] {
            list.sort_unstable();
            list.dedup();
        }
        let info = Arc::new(info);
        self.lock_responses().insert(key, info.clone());
        Ok(info)
    }

    fn lock_resources(&self) -> MutexGuard<'_, HashMap<(XdsType, u64), Arc<ResourceInfo>>> {
        self.resources.lock()
    }

    fn lock_responses(&self) -> MutexGuard<'_, HashMap<(XdsType, u64), Arc<ResponseInfo>>> {
        self.responses.lock()
    }

    fn decode(&self, kind: XdsType, bytes: &[u8]) -> Result<ResourceInfo> {
        let mut info = ResourceInfo::default();
        let mut sds = Vec::new();
        match kind {
            XdsType::Cds => {
                let cluster = Cluster::decode(bytes).context("decoding a Cluster")?;
                info.name = self.intern(&cluster.name);
                if cluster.cluster_discovery_type
                    == Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32))
                {
                    let service_name = cluster
                        .eds_cluster_config
                        .as_ref()
                        .map(|c| c.service_name.as_str())
                        .filter(|n| !n.is_empty())
                        .unwrap_or(&cluster.name);
                    info.eds.push(self.intern(service_name));
                }
                let sockets = cluster.transport_socket.iter().chain(
                    cluster
                        .transport_socket_matches
                        .iter()
                        .filter_map(|m| m.transport_socket.as_ref()),
                );
                for socket in sockets {
                    if let Some(common) = tls_context(socket, true)? {
                        secret_names(&common, &mut sds);
                    }
                }
            }
            XdsType::Lds => {
                let listener = Listener::decode(bytes).context("decoding a Listener")?;
                info.name = self.intern(&listener.name);
                for chain in listener
                    .filter_chains
                    .iter()
                    .chain(listener.default_filter_chain.as_ref())
                {
                    if let Some(socket) = &chain.transport_socket
                        && let Some(common) = tls_context(socket, false)?
                    {
                        secret_names(&common, &mut sds);
                    }
                    for filter in &chain.filters {
                        let Some(FilterConfig::TypedConfig(any)) = &filter.config_type else {
                            continue;
                        };
                        if !any.type_url.ends_with(".HttpConnectionManager") {
                            continue;
                        }
                        let hcm = HttpConnectionManager::decode(any.value.as_slice())
                            .with_context(|| {
                                format!("listener {}: decoding {}", listener.name, filter.name)
                            })?;
                        if let Some(RouteSpecifier::Rds(rds)) = hcm.route_specifier {
                            info.rds.push(self.intern(&rds.route_config_name));
                        }
                    }
                }
            }
            XdsType::Eds | XdsType::Rds | XdsType::Sds => {
                let named = Named::decode(bytes)
                    .with_context(|| format!("decoding a {} resource", kind.label()))?;
                info.name = self.intern(&named.name);
                if kind == XdsType::Eds
                    && let Some(marker) = self.marker.read().as_deref()
                {
                    info.marker = contains(bytes, marker);
                }
            }
        }
        info.sds = sds.iter().map(|n| self.intern(n)).collect();
        Ok(info)
    }
}

/// The common TLS context of an Envoy TLS transport socket.
fn tls_context(socket: &TransportSocket, upstream: bool) -> Result<Option<CommonTlsContext>> {
    let Some(SocketConfig::TypedConfig(any)) = &socket.config_type else {
        return Ok(None);
    };
    let common = if upstream && any.type_url.ends_with(".UpstreamTlsContext") {
        UpstreamTlsContext::decode(any.value.as_slice())
            .context("decoding an UpstreamTlsContext")?
            .common_tls_context
    } else if !upstream && any.type_url.ends_with(".DownstreamTlsContext") {
        DownstreamTlsContext::decode(any.value.as_slice())
            .context("decoding a DownstreamTlsContext")?
            .common_tls_context
    } else {
        None
    };
    Ok(common)
}

/// The SDS secrets a TLS context makes Envoy ask for.
fn secret_names(common: &CommonTlsContext, out: &mut Vec<String>) {
    out.extend(
        common
            .tls_certificate_sds_secret_configs
            .iter()
            .map(|s| s.name.clone()),
    );
    match &common.validation_context_type {
        Some(ValidationContextType::ValidationContextSdsSecretConfig(s)) => {
            out.push(s.name.clone());
        }
        Some(ValidationContextType::CombinedValidationContext(c)) => {
            out.extend(
                c.validation_context_sds_secret_config
                    .as_ref()
                    .map(|s| s.name.clone()),
            );
        }
        _ => {}
    }
}

/// Whether `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// Whether sorted `small` is contained in sorted `big`.
pub fn is_subset(small: &[u32], big: &[u32]) -> bool {
    let mut big = big.iter();
    small.iter().all(|s| big.any(|b| b == s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::cluster::v3::cluster::EdsClusterConfig;
    use envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType;
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::SdsSecretConfig;
    use envoy_types::pb::google::protobuf::Any;

    #[test]
    fn a_lite_request_is_a_discovery_request_on_the_wire() -> Result<()> {
        use envoy_types::pb::envoy::config::core::v3::Node;
        use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
        let names = ["ns/a|80", "", "ns/ü|8080"];
        for (node, version, nonce) in [(None, "", ""), (Some("uuid.sidecar.sa.ns"), "v1", "7")] {
            let lite = LiteRequest {
                version_info: version.into(),
                node: node.map(|id| Node {
                    id: id.into(),
                    ..Default::default()
                }),
                resource_names: LiteRequest::encode_names(names),
                type_url: XdsType::Eds.url().into(),
                response_nonce: nonce.into(),
            };
            let bytes = lite.encode_to_vec();
            assert_eq!(bytes.len(), lite.encoded_len());
            let decoded = DiscoveryRequest::decode(&bytes[..])?;
            assert_eq!(
                decoded,
                DiscoveryRequest {
                    version_info: version.into(),
                    node: lite.node.clone(),
                    resource_names: names.map(String::from).to_vec(),
                    type_url: XdsType::Eds.url().into(),
                    response_nonce: nonce.into(),
                    ..Default::default()
                }
            );
        }
        Ok(())
    }

    #[test]
    fn a_lite_delta_request_is_a_delta_discovery_request_on_the_wire() -> Result<()> {
        use envoy_types::pb::envoy::config::core::v3::Node;
        use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
        let names = ["ns/a|80", "", "ns/ü|8080"];
        for (node, nonce, dropped) in [
            (None, "", vec![]),
            (Some("uuid.sidecar.sa.ns"), "7", vec!["ns/b|80".to_string()]),
        ] {
            let lite = LiteDeltaRequest {
                node: node.map(|id| Node {
                    id: id.into(),
                    ..Default::default()
                }),
                type_url: XdsType::Eds.url().into(),
                subscribe: LiteRequest::encode_names(names),
                unsubscribe: dropped.clone(),
                response_nonce: nonce.into(),
            };
            let bytes = lite.encode_to_vec();
            assert_eq!(bytes.len(), lite.encoded_len());
            let decoded = DeltaDiscoveryRequest::decode(&bytes[..])?;
            assert_eq!(
                decoded,
                DeltaDiscoveryRequest {
                    node: lite.node.clone(),
                    type_url: XdsType::Eds.url().into(),
                    resource_names_subscribe: names.map(String::from).to_vec(),
                    resource_names_unsubscribe: dropped,
                    response_nonce: nonce.into(),
                    ..Default::default()
                }
            );
        }
        Ok(())
    }

    #[test]
    fn cluster_references_its_eds_name_and_secrets_once_decoded() -> Result<()> {
        let tls = UpstreamTlsContext {
            common_tls_context: Some(CommonTlsContext {
                tls_certificate_sds_secret_configs: vec![SdsSecretConfig {
                    name: "cert".into(),
                    ..Default::default()
                }],
                validation_context_type: Some(
                    ValidationContextType::ValidationContextSdsSecretConfig(SdsSecretConfig {
                        name: "roots".into(),
                        ..Default::default()
                    }),
                ),
                ..Default::default()
            }),
            ..Default::default()
        };
        let cluster = Cluster {
            name: "ns/svc|8080".into(),
            cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
            eds_cluster_config: Some(EdsClusterConfig {
                service_name: "ns/svc|8080-eds".into(),
                ..Default::default()
            }),
            transport_socket: Some(TransportSocket {
                name: "tls".into(),
                config_type: Some(ConfigType::TypedConfig(Any {
                    type_url: "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext".into(),
                    value: tls.encode_to_vec(),
                })),
            }),
            ..Default::default()
        };
        let memo = Memo::default();
        let info = memo.resource(XdsType::Cds, &cluster.encode_to_vec())?;
        assert_eq!(&*memo.name(info.name), "ns/svc|8080");
        let names = |ids: &[u32]| {
            ids.iter()
                .map(|i| memo.name(*i).to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&info.eds), ["ns/svc|8080-eds"]);
        assert_eq!(names(&info.sds), ["cert", "roots"]);
        // The second proxy gets the memoized meaning: the same Arc.
        let again = memo.resource(XdsType::Cds, &cluster.encode_to_vec())?;
        assert!(Arc::ptr_eq(&info, &again));
        Ok(())
    }

    #[test]
    fn marker_is_found_only_in_load_assignments_decoded_after_it_is_set() -> Result<()> {
        let memo = Memo::default();
        let named = |n: &str| Named { name: n.into() }.encode_to_vec();
        let mut with_ip = named("a");
        with_ip.extend_from_slice(&[0x12, 9]);
        with_ip.extend_from_slice(b"10.9.9.9x");
        memo.set_marker(b"10.9.9.9");
        assert!(memo.resource(XdsType::Eds, &with_ip)?.marker);
        assert!(!memo.resource(XdsType::Eds, &named("b"))?.marker);
        assert!(is_subset(&[1, 3], &[1, 2, 3]));
        assert!(!is_subset(&[1, 4], &[1, 2, 3]));
        Ok(())
    }
}
