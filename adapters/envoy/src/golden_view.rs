//! A readable, deterministic text view of Envoy resources for golden files and debugging: the
//! `Debug` form of each resource with every packed `Any` decoded in place of its bytes.

use std::fmt::Write;

use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit;
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::{Rbac, RbacPerRoute};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::TcpProxy;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    DownstreamTlsContext, UpstreamTlsContext, secret,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::HttpProtocolOptions;
use envoy_types::pb::google::protobuf::Any;
use prost::{Message, Name};

use crate::EnvoyResources;

fn decoded(any: &Any) -> String {
    fn pretty<M: Message + Default + Name + std::fmt::Debug>(any: &Any) -> Option<String> {
        (any.type_url == M::type_url()).then(|| match M::decode(any.value.as_slice()) {
            Ok(m) => format!("{m:#?}"),
            Err(e) => format!("<undecodable {}: {e}>", any.type_url),
        })
    }
    let text = pretty::<HttpConnectionManager>(any)
        .or_else(|| pretty::<TcpProxy>(any))
        .or_else(|| pretty::<Router>(any))
        .or_else(|| pretty::<HttpProtocolOptions>(any))
        .or_else(|| pretty::<Rbac>(any))
        .or_else(|| pretty::<RbacPerRoute>(any))
        .or_else(|| pretty::<LocalRateLimit>(any))
        .or_else(|| pretty::<DownstreamTlsContext>(any))
        .or_else(|| pretty::<UpstreamTlsContext>(any))
        .unwrap_or_else(|| format!("<{} bytes>", any.value.len()));
    text + "\n"
}

/// Renders one resource: its Debug form, with each `Any` (found by the `type_url` / `value`
/// pattern prost's Debug prints) replaced by its decoded message.
fn view<M: std::fmt::Debug>(resource: &M, anys: &[Any]) -> String {
    let mut text = format!("{resource:#?}\n");
    for any in anys {
        let _ = write!(text, "--- {}\n{}", any.type_url, decoded(any));
    }
    text
}

/// One golden file per resource type: `out.clusters.txt`, `out.endpoints.txt`,
/// `out.listeners.txt`, `out.routes.txt`, `out.secrets.txt` (private keys shown as their
/// length only) and `out.warnings.txt` when there are any.
pub fn render(resources: &EnvoyResources) -> std::collections::BTreeMap<String, String> {
    use envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType as SocketConfig;
    use envoy_types::pb::envoy::config::listener::v3::filter::ConfigType;
    let mut listeners = String::new();
    for l in &resources.listeners {
        let mut l = l.clone();
        let mut anys = Vec::new();
        for chain in &mut l.filter_chains {
            for filter in &mut chain.filters {
                if let Some(ConfigType::TypedConfig(any)) = &mut filter.config_type {
                    anys.push(any.clone());
                    any.value.clear();
                }
            }
            if let Some(SocketConfig::TypedConfig(any)) = chain
                .transport_socket
                .as_mut()
                .and_then(|t| t.config_type.as_mut())
            {
                anys.push(any.clone());
                any.value.clear();
            }
        }
        listeners.push_str(&view(&l, &anys));
    }
    let mut clusters = String::new();
    for c in &resources.clusters {
        let mut c = c.clone();
        let mut anys = Vec::new();
        for any in c.typed_extension_protocol_options.values_mut() {
            anys.push(any.clone());
            any.value.clear();
        }
        for m in &mut c.transport_socket_matches {
            if let Some(SocketConfig::TypedConfig(any)) = m
                .transport_socket
                .as_mut()
                .and_then(|t| t.config_type.as_mut())
            {
                anys.push(any.clone());
                any.value.clear();
            }
        }
        clusters.push_str(&view(&c, &anys));
    }
    let mut routes = String::new();
    for r in &resources.routes {
        let mut r = r.clone();
        let anys: Vec<Any> = Vec::new();
        // Per-filter configurations are maps, whose Debug order varies: each is listed after
        // the resource, by owner and filter name, and the maps are shown empty.
        let mut per_filter = Vec::new();
        for vh in &mut r.virtual_hosts {
            let mut by_filter: Vec<_> = std::mem::take(&mut vh.typed_per_filter_config)
                .into_iter()
                .collect();
            by_filter.sort_by(|a, b| a.0.cmp(&b.0));
            for (filter, any) in by_filter {
                per_filter.push((format!("{} {filter}", vh.name), any));
            }
            for (i, route) in vh.routes.iter_mut().enumerate() {
                let mut by_filter: Vec<_> = std::mem::take(&mut route.typed_per_filter_config)
                    .into_iter()
                    .collect();
                by_filter.sort_by(|a, b| a.0.cmp(&b.0));
                for (filter, any) in by_filter {
                    per_filter.push((format!("{}.routes[{i}] {filter}", vh.name), any));
                }
            }
        }
        routes.push_str(&view(&r, &anys));
        for (owner, any) in per_filter {
            let _ = write!(routes, "--- {owner}: {}\n{}", any.type_url, decoded(&any));
        }
    }
    let mut secrets = String::new();
    for s in &resources.secrets {
        let mut s = s.clone();
        if let Some(secret::Type::TlsCertificate(cert)) = &mut s.r#type
            && let Some(key) = &mut cert.private_key
        {
            use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;
            if let Some(Specifier::InlineString(pem)) = &mut key.specifier {
                *pem = format!("<{} bytes of private key>", pem.len());
            }
        }
        secrets.push_str(&format!("{s:#?}\n"));
    }
    let join = |items: Vec<String>| items.join("");
    let mut out = std::collections::BTreeMap::from([
        ("out.clusters.txt".to_string(), clusters),
        (
            "out.endpoints.txt".to_string(),
            join(
                resources
                    .endpoints
                    .iter()
                    .map(|e| format!("{e:#?}\n"))
                    .collect(),
            ),
        ),
        ("out.listeners.txt".to_string(), listeners),
        ("out.routes.txt".to_string(), routes),
        ("out.secrets.txt".to_string(), secrets),
    ]);
    if !resources.warnings.is_empty() {
        out.insert(
            "out.warnings.txt".to_string(),
            resources
                .warnings
                .iter()
                .map(|w| format!("- {w:?}\n"))
                .collect(),
        );
    }
    out
}
