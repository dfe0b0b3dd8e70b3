//! Envoy xDS v3 adapter: mesh IR to Listener, RouteConfiguration, Cluster and
//! ClusterLoadAssignment.
//!
//! [`translate`] is a pure function of a [`ProxyIr`]. It lays the sidecar out in *explicit* mode,
//! the mode used where no iptables interception exists (the manifest-directory default):
//!
//! - `outbound-listener` on `<pod-ip>:15001`: applications send HTTP there; routing is by Host
//!   (route configuration `outbound`, one virtual host per service port whose domains are FSM's
//!   `HttpHostPort2Service` keys plus `<cluster-ip>:<port>`).
//! - one `outbound-tcp:<ns>/<svc>|<port>` listener per TCP service port on `<pod-ip>:<port>`:
//!   applications connect there and the bytes are carried to the service.
//! - `inbound-listener` on `<pod-ip>:15003`: peers' sidecars deliver HTTP requests (routed by Host
//!   to `<ns>/<svc>|<port>|local`) and TCP streams tunnelled in HTTP/2 CONNECT (routed by the
//!   CONNECT authority `<svc>.<ns>.svc.cluster.local:<port>`), so one inbound port serves every
//!   application port, as iptables' REDIRECT to 15003 does in a cluster.
//!
//! Endpoints of pods that run a sidecar are therefore addressed at `<pod-ip>:15003`, never at the
//! application port, so traffic always crosses both sidecars.
//!
//! A pod that runs FSM's `fsm-init` container ([`fsm_ir::ProxyInfo::transparent`]) has its
//! connections redirected by iptables instead, and its `outbound-listener` listens on every
//! address of 15001 and picks a chain per connection by its original destination (see
//! `transparent_outbound`); it then has no `outbound-tcp` listeners, so nothing plaintext is
//! bound to the pod address (FSM's rules send every connection from outside the pod to 15003).
//!
//! Every connection between sidecars is mutually authenticated, with FSM's SDS names:
//!
//! - the inbound listener presents `service-cert` (the proxy's own certificate, one name for
//!   every proxy so that clusters are shared), requires a client certificate that
//!   chains to `root-cert-for-mtls-inbound:<ns>/<sa>` and carries a SPIFFE URI SAN of the
//!   trust domain (so a proxy's xDS bootstrap certificate, from the same CA, is refused), and an
//!   HTTP RBAC filter admits, per route, only the identities the route allows (by that SAN);
//! - outbound clusters reach meshed endpoints over TLS with the same client certificate, SNI
//!   `<svc>.<ns>.svc.cluster.local`, and check that the server chains to the mesh roots of
//!   `root-cert-for-mtls-outbound` (one secret for every upstream service) and carries one of
//!   the service's SPIFFE identities, which the cluster itself lists (Envoy merges the two into
//!   one validation context, as Istio's clusters do). Unmeshed endpoints (no sidecar to terminate
//!   TLS) stay plaintext.
//!
//! [`secrets`] builds those three Secrets from the proxy's [`ProxyCredentials`].
//!
//! [`json`] shows the resources in Envoy's own JSON form, as its `/config_dump` does (the golden
//! files, `fsm translate -o json|yaml`), and [`bootstrap`] as one static bootstrap.

pub mod bootstrap;
pub mod json;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use envoy_types::pb::envoy::config::cluster::v3 as cluster;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::endpoint::v3 as endpoint;
use envoy_types::pb::envoy::config::listener::v3 as listener;
use envoy_types::pb::envoy::config::rbac::v3 as rbac;
use envoy_types::pb::envoy::config::route::v3 as route;
use envoy_types::pb::envoy::config::trace::v3 as trace;
use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3 as local_ratelimit;
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3 as rbac_filter;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::listener::original_dst::v3::OriginalDst;
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3 as tcp_proxy;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls;
use envoy_types::pb::envoy::extensions::upstreams::http::v3 as upstream_http;
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher;
use envoy_types::pb::envoy::r#type::v3 as types;
use envoy_types::pb::google::protobuf::{Any, BoolValue, Duration, Struct, UInt32Value, Value};
use fsm_ir::{
    AllowedSources, ClusterKind, Domains, EgressHttpHost, HttpRoute, OutboundService, PathMatch,
    Protocol, ProxyCredentials, ProxyIr, ServiceIdentity, ServiceOutbound, names, ports,
};
use prost::{Message, Name};

pub use json::{render, to_json};

pub const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINT_TYPE: &str =
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ROUTE_TYPE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
pub const SECRET_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// The endpoint metadata key (under `envoy.transport_socket_match`) that selects TLS.
const MESHED_MATCH_KEY: &str = "fsm.meshed";
const RBAC_FILTER: &str = "envoy.filters.http.rbac";
const RATE_LIMIT_FILTER: &str = "envoy.filters.http.local_ratelimit";

pub use fsm_ir::names::{INBOUND_LISTENER, INBOUND_ROUTES, OUTBOUND_LISTENER, OUTBOUND_ROUTES};

/// Route configuration of the inbound listener's plaintext chain for clients outside the mesh
/// (IngressBackend).
pub const INGRESS_ROUTES: &str = "ingress";

/// The Envoy resources of one proxy.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EnvoyResources {
    pub clusters: Vec<cluster::Cluster>,
    pub endpoints: Vec<endpoint::ClusterLoadAssignment>,
    pub listeners: Vec<listener::Listener>,
    pub routes: Vec<route::RouteConfiguration>,
    pub secrets: Vec<tls::Secret>,
    /// Parts of the IR Envoy cannot be given, with the reason.
    pub warnings: Vec<String>,
}

pub use fsm_cache::Encoded;
use fsm_cache::encode_sorted;

impl EnvoyResources {
    pub fn encode(&self) -> Encoded {
        BTreeMap::from([
            (CLUSTER_TYPE, encode_sorted(&self.clusters, |c| &c.name)),
            (
                ENDPOINT_TYPE,
                encode_sorted(&self.endpoints, |c| &c.cluster_name),
            ),
            (LISTENER_TYPE, encode_sorted(&self.listeners, |l| &l.name)),
            (ROUTE_TYPE, {
                let mut routes: Vec<(String, Vec<u8>)> = self
                    .routes
                    .iter()
                    .map(|r| (r.name.clone(), encode_route_configuration(r)))
                    .collect();
                routes.sort_by(|a, b| a.0.cmp(&b.0));
                routes
            }),
            (SECRET_TYPE, encode_sorted(&self.secrets, |s| &s.name)),
        ])
    }
}

/// A route configuration's wire form, the same for the same configuration: prost encodes a
/// map (`typed_per_filter_config`) in its `HashMap`'s order, which differs between two maps with
/// the same entries, so a route with RBAC and a rate limit would look changed on every encoding.
/// Here each map is written after the message's other fields, its entries sorted by filter name
/// (protobuf parsers accept fields in any order).
pub fn encode_route_configuration(config: &route::RouteConfiguration) -> Vec<u8> {
    /// A map entry of `map<string, google.protobuf.Any>`.
    #[derive(Clone, PartialEq, prost::Message)]
    struct FilterEntry {
        #[prost(string, tag = "1")]
        key: String,
        #[prost(message, optional, tag = "2")]
        value: Option<Any>,
    }
    fn encode_map(tag: u32, map: &std::collections::HashMap<String, Any>, buf: &mut Vec<u8>) {
        let mut entries: Vec<(&String, &Any)> = map.iter().collect();
        entries.sort_by(|a, b| a.0.cmp(b.0));
        for (key, value) in entries {
            let entry = FilterEntry {
                key: key.clone(),
                value: Some(value.clone()),
            };
            prost::encoding::message::encode(tag, &entry, buf);
        }
    }
    /// `Route.typed_per_filter_config` and `VirtualHost.typed_per_filter_config`.
    const ROUTE_FILTERS: u32 = 13;
    const VIRTUAL_HOST_FILTERS: u32 = 15;
    const VIRTUAL_HOST_ROUTES: u32 = 3;
    const CONFIGURATION_VIRTUAL_HOSTS: u32 = 2;
    let mut bare = config.clone();
    let virtual_hosts = std::mem::take(&mut bare.virtual_hosts);
    let mut buf = bare.encode_to_vec();
    for vh in virtual_hosts {
        let mut bare_vh = vh.clone();
        bare_vh.routes.clear();
        bare_vh.typed_per_filter_config.clear();
        let mut vh_buf = bare_vh.encode_to_vec();
        for r in &vh.routes {
            let mut bare_route = r.clone();
            bare_route.typed_per_filter_config.clear();
            let mut route_buf = bare_route.encode_to_vec();
            encode_map(ROUTE_FILTERS, &r.typed_per_filter_config, &mut route_buf);
            prost::encoding::bytes::encode(VIRTUAL_HOST_ROUTES, &route_buf, &mut vh_buf);
        }
        encode_map(
            VIRTUAL_HOST_FILTERS,
            &vh.typed_per_filter_config,
            &mut vh_buf,
        );
        prost::encoding::bytes::encode(CONFIGURATION_VIRTUAL_HOSTS, &vh_buf, &mut buf);
    }
    buf
}

/// Why a proxy's IR cannot be given to Envoy.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AdapterError {
    #[error("invalid IR: {0}")]
    InvalidIr(#[from] fsm_ir::IrError),
}

/// Translates one proxy's IR into Envoy resources, with its mTLS material as SDS secrets: the
/// shared resources of every service it may reach ([`service_resources`], [`outbound_routes`])
/// and its own ([`proxy_resources`]).
pub fn translate(
    ir: &ProxyIr,
    credentials: &ProxyCredentials,
) -> Result<EnvoyResources, AdapterError> {
    let mut out = proxy_resources(ir, credentials)?;
    for service in ir.service_outbounds() {
        let shared = service_resources(&service, &ir.mesh.trust_domain);
        out.clusters.extend(shared.clusters);
        out.endpoints.extend(shared.endpoints);
    }
    out.secrets
        .push(outbound_root(&credentials.trust_bundle_pem));
    out.secrets.sort_by(|a, b| a.name.cmp(&b.name));
    out.routes.insert(
        0,
        outbound_routes(ir.outbound.iter(), &ir.egress.http, ir.mesh.enable_egress),
    );
    out.clusters.sort_by(|a, b| a.name.cmp(&b.name));
    out.endpoints
        .sort_by(|a, b| a.cluster_name.cmp(&b.cluster_name));
    Ok(out)
}

/// The resources of one service that are the same for every proxy that may reach it: its
/// outbound clusters (naming the identities its servers must have) and their
/// ClusterLoadAssignments. Built once per service and shared.
pub fn service_resources(service: &ServiceOutbound, trust_domain: &str) -> ServiceResources {
    ServiceResources {
        clusters: service
            .clusters
            .iter()
            .map(|c| outbound_cluster(c, trust_domain))
            .collect(),
        endpoints: service
            .clusters
            .iter()
            .map(outbound_load_assignment)
            .collect(),
    }
}

/// An outbound cluster of [`service_resources`]: made of [`fsm_ir::Cluster::outbound_shape`]
/// alone.
pub fn outbound_cluster(c: &fsm_ir::Cluster, trust_domain: &str) -> cluster::Cluster {
    build_cluster(c, is_tunnelled(c), trust_domain)
}

/// The ClusterLoadAssignment of an outbound cluster of [`service_resources`].
pub fn outbound_load_assignment(c: &fsm_ir::Cluster) -> endpoint::ClusterLoadAssignment {
    load_assignment(c, is_tunnelled(c))
}

/// Secret [`names::OUTBOUND_ROOT`]: the roots every upstream sidecar's certificate must chain to.
/// The same for every proxy whose certificate carries this trust bundle.
pub fn outbound_root(trust_bundle_pem: &str) -> tls::Secret {
    tls::Secret {
        name: names::OUTBOUND_ROOT.into(),
        r#type: Some(tls::secret::Type::ValidationContext(
            tls::CertificateValidationContext {
                trusted_ca: Some(inline(trust_bundle_pem)),
                ..Default::default()
            },
        )),
    }
}

/// One service's shared resources (see [`service_resources`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServiceResources {
    pub clusters: Vec<cluster::Cluster>,
    pub endpoints: Vec<endpoint::ClusterLoadAssignment>,
}

/// A TCP cluster with a sidecar behind some endpoint is reached through an HTTP/2 CONNECT tunnel
/// to the peer sidecar's inbound port.
fn is_tunnelled(c: &fsm_ir::Cluster) -> bool {
    c.kind == ClusterKind::Outbound && !c.protocol.is_http() && c.endpoints.iter().any(|e| e.meshed)
}

/// Route configuration `outbound`: one virtual host per HTTP service port, routed by Host, then
/// one per host outside the mesh an Egress policy allows (`egress_hosts`), and with `passthrough`
/// (MeshConfig `enableEgress`) a last one for every other Host, passed through to it. The same
/// for every proxy that may reach the same services and hosts.
pub fn outbound_routes<'a>(
    services: impl IntoIterator<Item = &'a OutboundService>,
    egress_hosts: &[EgressHttpHost],
    passthrough: bool,
) -> route::RouteConfiguration {
    let mut domains = Domains::default();
    let mut virtual_hosts = Vec::new();
    for svc in services.into_iter().filter(|s| s.protocol.is_http()) {
        virtual_hosts.push(route::VirtualHost {
            name: format!("{}|{}", svc.service, svc.port),
            domains: domains.claim(&svc.hosts),
            routes: svc
                .routes
                .iter()
                .map(|r| http_route(r, None, None))
                .collect(),
            ..Default::default()
        });
    }
    for host in egress_hosts {
        virtual_hosts.push(route::VirtualHost {
            name: host.cluster_name().to_string(),
            domains: domains.claim(&host.domains()),
            routes: host
                .routes()
                .iter()
                .map(|r| http_route(r, None, None))
                .collect(),
            ..Default::default()
        });
    }
    if passthrough {
        virtual_hosts.push(passthrough_virtual_host());
    }
    route::RouteConfiguration {
        name: OUTBOUND_ROUTES.into(),
        virtual_hosts,
        ..Default::default()
    }
}

/// Marks a request the passthrough sent, so that one sent to this sidecar itself (its Host was
/// the sidecar's own address) is refused instead of going round again.
const EGRESS_HOP_HEADER: &str = "x-fsm-egress";

/// Every Host no service has goes to the original-destination cluster, which connects to the
/// address the Host names: only `<ip>:<port>` (a name would need resolving, which the mesh does
/// not do for egress), only once (no loop through the sidecar itself); anything else gets 503.
fn passthrough_virtual_host() -> route::VirtualHost {
    let header = |key: &str, value: &str| core::HeaderValueOption {
        header: Some(core::HeaderValue {
            key: key.into(),
            value: value.into(),
            ..Default::default()
        }),
        append_action: core::header_value_option::HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    };
    let first_hop = route::HeaderMatcher {
        name: EGRESS_HOP_HEADER.into(),
        header_match_specifier: Some(route::header_matcher::HeaderMatchSpecifier::PresentMatch(
            true,
        )),
        invert_match: true,
        ..Default::default()
    };
    let pass = route::Route {
        r#match: Some(route::RouteMatch {
            path_specifier: Some(route::route_match::PathSpecifier::Prefix("/".into())),
            headers: vec![
                regex_header(
                    ":authority",
                    r"(\d{1,3}\.){3}\d{1,3}:\d{1,5}|\[[0-9a-fA-F:.]+\]:\d{1,5}",
                ),
                first_hop,
            ],
            ..Default::default()
        }),
        action: Some(route::route::Action::Route(route::RouteAction {
            cluster_specifier: Some(route::route_action::ClusterSpecifier::Cluster(
                names::PASSTHROUGH_CLUSTER.into(),
            )),
            timeout: Some(duration_ms(0)),
            ..Default::default()
        })),
        request_headers_to_add: vec![
            header("x-envoy-original-dst-host", "%REQ(:authority)%"),
            header(EGRESS_HOP_HEADER, "1"),
        ],
        ..Default::default()
    };
    let refuse = route::Route {
        r#match: Some(route::RouteMatch {
            path_specifier: Some(route::route_match::PathSpecifier::Prefix("/".into())),
            ..Default::default()
        }),
        action: Some(route::route::Action::DirectResponse(
            route::DirectResponseAction {
                status: 503,
                body: Some(core::DataSource {
                    specifier: Some(core::data_source::Specifier::InlineString(
                        "no original destination: the Host is not <ip>:<port> (or the request came round again)".into(),
                    )),
                    ..Default::default()
                }),
                ..Default::default()
            },
        )),
        ..Default::default()
    };
    route::VirtualHost {
        name: names::PASSTHROUGH_VIRTUAL_HOST.into(),
        domains: vec!["*".into()],
        routes: vec![pass, refuse],
        ..Default::default()
    }
}

/// The original-destination cluster of egress passthrough: the address the request's
/// `x-envoy-original-dst-host` (its Host, set by the passthrough route) names, in plaintext.
fn passthrough_cluster() -> cluster::Cluster {
    cluster::Cluster {
        name: names::PASSTHROUGH_CLUSTER.into(),
        cluster_discovery_type: Some(cluster::cluster::ClusterDiscoveryType::Type(
            cluster::cluster::DiscoveryType::OriginalDst as i32,
        )),
        lb_policy: cluster::cluster::LbPolicy::ClusterProvided as i32,
        lb_config: Some(cluster::cluster::LbConfig::OriginalDstLbConfig(
            cluster::cluster::OriginalDstLbConfig {
                use_http_header: true,
                http_header_name: "x-envoy-original-dst-host".into(),
                ..Default::default()
            },
        )),
        connect_timeout: Some(duration_ms(EGRESS_CONNECT_TIMEOUT_MS)),
        ..Default::default()
    }
}

/// The cluster of a host outside the mesh an Egress policy allows: the name resolved by DNS
/// when connections are made (Envoy's LOGICAL_DNS, IPv4 first), plaintext (the application's
/// TLS, if any, goes through untouched), with the policy's connection limits.
fn egress_host_cluster(host: &EgressHttpHost) -> cluster::Cluster {
    let name = host.cluster_name().to_string();
    cluster::Cluster {
        name: name.clone(),
        cluster_discovery_type: Some(cluster::cluster::ClusterDiscoveryType::Type(
            cluster::cluster::DiscoveryType::LogicalDns as i32,
        )),
        dns_lookup_family: cluster::cluster::DnsLookupFamily::V4Preferred as i32,
        load_assignment: Some(dns_load_assignment(name, &host.host, host.port)),
        connect_timeout: Some(duration_ms(EGRESS_CONNECT_TIMEOUT_MS)),
        lb_policy: cluster::cluster::LbPolicy::RoundRobin as i32,
        circuit_breakers: host
            .circuit_breaker
            .as_ref()
            .map(|l| circuit_breakers(l, true, false)),
        ..Default::default()
    }
}

/// How long a proxy waits for a connection to a destination outside the mesh.
const EGRESS_CONNECT_TIMEOUT_MS: u64 = 1000;

/// The one endpoint of a LOGICAL_DNS cluster: `host` (a name Envoy resolves, or an address) and
/// `port`.
fn dns_load_assignment(
    cluster_name: String,
    host: &str,
    port: u16,
) -> endpoint::ClusterLoadAssignment {
    endpoint::ClusterLoadAssignment {
        cluster_name,
        endpoints: vec![endpoint::LocalityLbEndpoints {
            lb_endpoints: vec![endpoint::LbEndpoint {
                host_identifier: Some(endpoint::lb_endpoint::HostIdentifier::Endpoint(
                    endpoint::Endpoint {
                        address: Some(core::Address {
                            address: Some(core::address::Address::SocketAddress(
                                core::SocketAddress {
                                    address: host.to_owned(),
                                    port_specifier: Some(
                                        core::socket_address::PortSpecifier::PortValue(u32::from(
                                            port,
                                        )),
                                    ),
                                    ..Default::default()
                                },
                            )),
                        }),
                        ..Default::default()
                    },
                )),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

// === Tracing ===

/// How long a proxy waits for a connection to the tracing collector (FSM's 1s).
const TRACING_CONNECT_TIMEOUT_MS: u64 = 1000;

/// FSM's tracing cluster, as its troubleshooting guide shows it in a config dump:
/// `pipy-tracing-cluster`, LOGICAL_DNS, connect timeout 1s, the collector's address and port.
fn tracing_cluster(tracing: &fsm_ir::Tracing) -> cluster::Cluster {
    cluster::Cluster {
        name: names::TRACING_CLUSTER.into(),
        alt_stat_name: names::TRACING_CLUSTER.into(),
        cluster_discovery_type: Some(cluster::cluster::ClusterDiscoveryType::Type(
            cluster::cluster::DiscoveryType::LogicalDns as i32,
        )),
        dns_lookup_family: cluster::cluster::DnsLookupFamily::V4Preferred as i32,
        connect_timeout: Some(duration_ms(TRACING_CONNECT_TIMEOUT_MS)),
        lb_policy: cluster::cluster::LbPolicy::RoundRobin as i32,
        load_assignment: Some(dns_load_assignment(
            names::TRACING_CLUSTER.into(),
            &tracing.address,
            tracing.port,
        )),
        ..Default::default()
    }
}

/// An HTTP connection manager's tracing: Envoy's Zipkin tracer (B3 headers, spans as Zipkin v2
/// JSON POSTed to the collector's endpoint through [`tracing_cluster`]), new traces sampled at
/// the mesh's rate. Client and server spans are distinct (`shared_span_context` off): the
/// outbound listener's span is the CLIENT span and the peer's inbound span, its child, the
/// SERVER span (the kind comes from the listener's `traffic_direction`).
fn hcm_tracing(tracing: &fsm_ir::Tracing) -> hcm::http_connection_manager::Tracing {
    let zipkin = trace::ZipkinConfig {
        collector_cluster: names::TRACING_CLUSTER.into(),
        collector_endpoint: tracing.endpoint.clone(),
        trace_id_128bit: true,
        shared_span_context: Some(BoolValue { value: false }),
        collector_endpoint_version: trace::zipkin_config::CollectorEndpointVersion::HttpJson as i32,
        // The Host of the report: the collector's, not the cluster's name.
        collector_hostname: tracing.address.clone(),
        ..Default::default()
    };
    hcm::http_connection_manager::Tracing {
        random_sampling: Some(types::Percent {
            value: f64::from(tracing.sampled_per_million) / 10_000.0,
        }),
        provider: Some(trace::tracing::Http {
            name: "envoy.tracers.zipkin".into(),
            config_type: Some(trace::tracing::http::ConfigType::TypedConfig(any(&zipkin))),
        }),
        ..Default::default()
    }
}

/// A listener's `traffic_direction`: what kind of span its HTTP connection manager starts.
fn direction(inbound: bool) -> i32 {
    if inbound {
        core::TrafficDirection::Inbound as i32
    } else {
        core::TrafficDirection::Outbound as i32
    }
}

/// What [`proxy_resources`] reads of the services the proxy may reach in explicit mode: HTTP
/// services are routed by the shared `outbound` route configuration; only TCP service ports get
/// listeners of their own. A transparent proxy's outbound listener has a chain for every service
/// port, so it reads all of them.
pub const PROXY_RESOURCES_OUTBOUND: fsm_ir::OutboundDetail = fsm_ir::OutboundDetail::TcpOnly;

/// What only this proxy has: its listeners (bound to its pod address), the inbound route
/// configuration, the clusters of its own application, and its certificate with the roots its
/// clients must chain to.
pub fn proxy_resources(
    ir: &ProxyIr,
    credentials: &ProxyCredentials,
) -> Result<EnvoyResources, AdapterError> {
    ir.validate()?;
    let mut out = EnvoyResources {
        secrets: own_secrets(ir, credentials),
        ..Default::default()
    };
    let own = &ir.proxy.identity;
    let trust_domain = ir.mesh.trust_domain.as_str();
    let pod_ip = ir.proxy.pod_ip;
    let tunnelled: BTreeSet<&str> = ir
        .clusters
        .iter()
        .filter(|c| is_tunnelled(c))
        .map(|c| c.name.as_str())
        .collect();
    for c in ir.clusters.iter().filter(|c| c.kind == ClusterKind::Local) {
        out.clusters.push(build_cluster(c, false, trust_domain));
    }
    let original_destination = ir.proxy.transparent && ir.egress.uses_original_destination();
    if ir.mesh.enable_egress || original_destination {
        out.clusters.push(passthrough_cluster());
    }
    out.clusters
        .extend(ir.egress.http.iter().map(egress_host_cluster));
    out.clusters
        .extend(ir.mesh.tracing.as_ref().map(tracing_cluster));
    let tracing = ir.mesh.tracing.as_ref();
    if ir.egress.uses_original_destination() && !ir.proxy.transparent {
        // In explicit mode applications name the proxy: nothing redirects their TLS or TCP
        // connections to it, so it has no original destination to match them on.
        out.warnings.push(format!(
            "Egress: the TLS and TCP destinations its policies allow on port(s) {} need the pod's connections redirected to the proxy (transparent mode: the pod runs fsm-init); in explicit mode they are not reachable through it",
            ir.egress
                .tls
                .iter()
                .map(|t| t.port)
                .chain(ir.egress.tcp.iter().map(|t| t.port))
                .collect::<BTreeSet<u16>>()
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if ir.proxy.transparent {
        out.listeners
            .push(transparent_outbound(ir, &tunnelled, &mut out.warnings));
    } else {
        out.listeners.push(http_listener(
            OUTBOUND_LISTENER,
            pod_ip,
            ports::OUTBOUND,
            OUTBOUND_ROUTES,
            None,
            tracing,
        ));
    }

    // Explicit-mode outbound TCP: one listener per service port on the pod address (see
    // `ProxyIr::explicit_tcp`: Envoy refuses two listeners on one address).
    for tcp in ir.explicit_tcp() {
        let svc = match tcp {
            fsm_ir::ExplicitTcp::Listener(svc) => svc,
            fsm_ir::ExplicitTcp::PortTaken(svc) => {
                out.warnings.push(format!(
                    "outbound TCP {}|{}: port {} is taken on this pod (application or sidecar port); clients of this pod cannot reach it in explicit mode",
                    svc.service, svc.port, svc.port
                ));
                continue;
            }
            fsm_ir::ExplicitTcp::PortServes { service, first } => {
                out.warnings.push(format!(
                    "outbound TCP {}|{}: port {} already serves {}|{} in explicit mode; clients of this pod cannot reach it there",
                    service.service, service.port, service.port, first.service, first.port
                ));
                continue;
            }
        };
        let Some(proxy) = outbound_tcp_proxy(svc, &tunnelled) else {
            continue;
        };
        out.listeners.push(listener::Listener {
            name: format!("outbound-tcp:{}|{}", svc.service, svc.port),
            address: Some(socket_address(pod_ip, svc.port)),
            traffic_direction: direction(false),
            filter_chains: vec![listener::FilterChain {
                filters: vec![network_filter("envoy.filters.network.tcp_proxy", &proxy)],
                ..Default::default()
            }],
            ..Default::default()
        });
    }

    // Inbound: HTTP by Host, TCP by CONNECT authority, all through 15003.
    let mut domains = Domains::default();
    let mut virtual_hosts = Vec::new();
    for port in &ir.inbound {
        for svc in &port.services {
            let routes = if port.protocol.is_http() {
                svc.routes
                    .iter()
                    .map(|r| {
                        let mut route = http_route(r, None, Some(trust_domain));
                        if let Some(limit) = &r.rate_limit {
                            route.typed_per_filter_config.insert(
                                RATE_LIMIT_FILTER.into(),
                                any(&rate_limit(limit, &svc.local_cluster)),
                            );
                        } else if svc.rate_limit.is_some() && is_denied(&r.allowed) {
                            // A denied request is refused without taking the service's token,
                            // as RBAC refuses the others before the rate limit filter.
                            route.typed_per_filter_config.insert(
                                RATE_LIMIT_FILTER.into(),
                                any(&local_ratelimit::LocalRateLimit {
                                    stat_prefix: RATE_LIMIT_STATS.into(),
                                    ..Default::default()
                                }),
                            );
                        }
                        route
                    })
                    .collect()
            } else {
                vec![connect_route(
                    svc.local_cluster.as_str(),
                    &svc.allowed,
                    trust_domain,
                )]
            };
            virtual_hosts.push(route::VirtualHost {
                name: svc.local_cluster.to_string(),
                domains: domains.claim(&svc.hosts),
                routes,
                typed_per_filter_config: svc
                    .rate_limit
                    .iter()
                    .map(|limit| {
                        (
                            RATE_LIMIT_FILTER.to_string(),
                            any(&rate_limit(limit, &svc.local_cluster)),
                        )
                    })
                    .collect(),
                ..Default::default()
            });
        }
    }
    out.routes.push(route::RouteConfiguration {
        name: INBOUND_ROUTES.into(),
        virtual_hosts,
        ..Default::default()
    });
    let mut inbound = http_listener(
        INBOUND_LISTENER,
        pod_ip,
        ports::INBOUND,
        INBOUND_ROUTES,
        Some(own),
        tracing,
    );
    if let Some((chains, routes)) = ingress(ir) {
        // TLS (peers' mTLS) and plaintext (ingress) are told apart by the first bytes.
        if ir.proxy.transparent {
            inbound.listener_filters.push(original_dst_filter());
        }
        inbound.listener_filters.push(tls_inspector_filter());
        for mesh in &mut inbound.filter_chains {
            mesh.filter_chain_match = Some(listener::FilterChainMatch {
                transport_protocol: "tls".into(),
                ..Default::default()
            });
        }
        inbound.filter_chains.extend(chains);
        out.routes.push(routes);
    }
    out.listeners.push(inbound);

    Ok(out)
}

/// The tcp_proxy that carries a TCP service port's connections to its backends (weighted when
/// split), through an HTTP/2 CONNECT tunnel to the peer sidecar where the backend is meshed.
fn outbound_tcp_proxy(
    svc: &OutboundService,
    tunnelled: &BTreeSet<&str>,
) -> Option<tcp_proxy::TcpProxy> {
    let backend = svc.tcp_backends.first()?;
    let tunnel = tunnelled.contains(backend.cluster.as_str());
    Some(tcp_proxy::TcpProxy {
        stat_prefix: format!("outbound-tcp.{}|{}", svc.service, svc.port),
        cluster_specifier: Some(if svc.tcp_backends.len() == 1 {
            tcp_proxy::tcp_proxy::ClusterSpecifier::Cluster(backend.cluster.to_string())
        } else {
            tcp_proxy::tcp_proxy::ClusterSpecifier::WeightedClusters(
                tcp_proxy::tcp_proxy::WeightedCluster {
                    clusters: svc
                        .tcp_backends
                        .iter()
                        .map(|b| tcp_proxy::tcp_proxy::weighted_cluster::ClusterWeight {
                            name: b.cluster.to_string(),
                            weight: b.weight,
                            ..Default::default()
                        })
                        .collect(),
                },
            )
        }),
        tunneling_config: tunnel.then(|| tcp_proxy::tcp_proxy::TunnelingConfig {
            hostname: format!("{}:{}", svc.service.fqdn(), svc.port),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// A tcp_proxy to the connection's original destination (the passthrough cluster).
fn to_original_destination(stat_prefix: String) -> tcp_proxy::TcpProxy {
    tcp_proxy::TcpProxy {
        stat_prefix,
        cluster_specifier: Some(tcp_proxy::tcp_proxy::ClusterSpecifier::Cluster(
            names::PASSTHROUGH_CLUSTER.into(),
        )),
        ..Default::default()
    }
}

/// Transparent mode's outbound listener: FSM's iptables rules redirect the pod's outbound
/// connections to 127.0.0.1:15001, so it listens on every address, and the original_dst
/// listener filter restores each connection's destination, which picks its chain:
///
/// - a service port's ClusterIPs and port: HTTP to the `outbound` routes, TCP to its backends;
/// - an Egress policy's port: HTTP to the `outbound` routes (whose egress hosts decide), TLS by
///   server name (read by the tls_inspector) and TCP by address range to where it was going;
/// - 15001 itself: applications that name the proxy (explicit HTTP, as in explicit mode);
/// - anything else: passed through when MeshConfig `enableEgress` is on, else closed.
///
/// Destinations the pod's rules leave alone ([`fsm_ir::Bypass`]) get no chain: their
/// connections never arrive.
///
/// Reachable from outside the pod only through the same rules, which send every inbound
/// connection to 15003 (mTLS only).
fn transparent_outbound(
    ir: &ProxyIr,
    tunnelled: &BTreeSet<&str>,
    warnings: &mut Vec<String>,
) -> listener::Listener {
    let any_address = if ir.proxy.pod_ip.is_ipv6() {
        IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED)
    } else {
        IpAddr::from(std::net::Ipv4Addr::UNSPECIFIED)
    };
    let http = |name: &str| {
        network_filter(
            "envoy.filters.network.http_connection_manager",
            &http_manager(name, OUTBOUND_ROUTES, None, ir.mesh.tracing.as_ref()),
        )
    };
    let tcp =
        |proxy: &tcp_proxy::TcpProxy| network_filter("envoy.filters.network.tcp_proxy", proxy);
    let chain_match =
        |port: u16, ranges: &[String], server_names: &[String]| listener::FilterChainMatch {
            destination_port: Some(UInt32Value {
                value: u32::from(port),
            }),
            prefix_ranges: ranges.iter().filter_map(|r| cidr_range(r)).collect(),
            server_names: server_names.to_vec(),
            ..Default::default()
        };
    let mut chains = vec![listener::FilterChain {
        name: "explicit-http".into(),
        filter_chain_match: Some(chain_match(ports::OUTBOUND, &[], &[])),
        filters: vec![http(OUTBOUND_LISTENER)],
        ..Default::default()
    }];
    let bypass = &ir.proxy.bypass;
    for svc in &ir.outbound {
        if !bypass.redirects_outbound(svc.port, &svc.destination_ip_ranges) {
            continue;
        }
        let name = format!("{}|{}", svc.service, svc.port);
        let filter = if svc.protocol.is_http() {
            http(OUTBOUND_LISTENER)
        } else {
            match outbound_tcp_proxy(svc, tunnelled) {
                Some(proxy) => tcp(&proxy),
                None => continue,
            }
        };
        chains.push(listener::FilterChain {
            filter_chain_match: Some(chain_match(svc.port, &svc.destination_ip_ranges, &[])),
            filters: vec![filter],
            name,
            ..Default::default()
        });
    }
    let http_ports: BTreeSet<u16> = ir.egress.http.iter().map(|h| h.port).collect();
    for port in http_ports
        .into_iter()
        .filter(|p| bypass.redirects_outbound(*p, &[]))
    {
        chains.push(listener::FilterChain {
            name: format!("egress-http|{port}"),
            filter_chain_match: Some(chain_match(port, &[], &[])),
            filters: vec![http(OUTBOUND_LISTENER)],
            ..Default::default()
        });
    }
    for t in ir
        .egress
        .tls
        .iter()
        .filter(|t| bypass.redirects_outbound(t.port, &[]))
    {
        let name = format!("egress-tls|{}", t.port);
        chains.push(listener::FilterChain {
            filter_chain_match: Some(chain_match(t.port, &[], &t.server_names)),
            filters: vec![tcp(&to_original_destination(name.clone()))],
            name,
            ..Default::default()
        });
    }
    for t in ir
        .egress
        .tcp
        .iter()
        .filter(|t| bypass.redirects_outbound(t.port, &t.ip_ranges))
    {
        let name = format!("egress-tcp|{}", t.port);
        chains.push(listener::FilterChain {
            filter_chain_match: Some(chain_match(t.port, &t.ip_ranges, &[])),
            filters: vec![tcp(&to_original_destination(name.clone()))],
            name,
            ..Default::default()
        });
    }
    // Envoy refuses a listener two of whose chains match the same connections.
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    chains.retain(|chain| {
        let key = format!("{:?}", chain.filter_chain_match);
        match seen.get(&key) {
            Some(first) => {
                warnings.push(format!(
                    "{OUTBOUND_LISTENER}: chain {} matches the same destinations as {first} and is never used",
                    chain.name
                ));
                false
            }
            None => {
                seen.insert(key, chain.name.clone());
                true
            }
        }
    });
    let mut listener_filters = vec![original_dst_filter()];
    if !ir.egress.tls.is_empty() {
        listener_filters.push(tls_inspector_filter());
    }
    listener::Listener {
        name: OUTBOUND_LISTENER.into(),
        address: Some(socket_address(any_address, ports::OUTBOUND)),
        traffic_direction: direction(false),
        listener_filters,
        filter_chains: chains,
        default_filter_chain: ir.mesh.enable_egress.then(|| listener::FilterChain {
            name: names::PASSTHROUGH_CLUSTER.into(),
            filters: vec![tcp(&to_original_destination(
                names::PASSTHROUGH_CLUSTER.into(),
            ))],
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Restores a redirected connection's original destination, which chains then match on.
fn original_dst_filter() -> listener::ListenerFilter {
    listener::ListenerFilter {
        name: "envoy.filters.listener.original_dst".into(),
        config_type: Some(listener::listener_filter::ConfigType::TypedConfig(any(
            &OriginalDst::default(),
        ))),
        ..Default::default()
    }
}

/// Reads a connection's first bytes: TLS or not, and the ClientHello's server name.
fn tls_inspector_filter() -> listener::ListenerFilter {
    listener::ListenerFilter {
        name: "envoy.filters.listener.tls_inspector".into(),
        config_type: Some(listener::listener_filter::ConfigType::TypedConfig(any(
            &TlsInspector::default(),
        ))),
        ..Default::default()
    }
}

/// The inbound listener's chains for clients outside the mesh, when some port admits ingress
/// (IngressBackend, AccessControl): plaintext HTTP only from the admitted addresses (the chain
/// matches no other client), and, in transparent mode, TLS to each application port that admits
/// certificate names (the chain requires one of them). Their route configuration,
/// [`INGRESS_ROUTES`], has one virtual host per such service port, whose route admits its own
/// clients only (per-route RBAC on the client's address or certificate name).
fn ingress(ir: &ProxyIr) -> Option<(Vec<listener::FilterChain>, route::RouteConfiguration)> {
    let mut sources: BTreeSet<&str> = BTreeSet::new();
    let mut domains = Domains::default();
    let mut virtual_hosts = Vec::new();
    for svc in ir.ingress_services() {
        sources.extend(svc.ingress_sources.iter().map(String::as_str));
        let by_address = svc
            .ingress_sources
            .iter()
            .chain(&svc.ingress_tls_sources)
            .filter_map(|cidr| cidr_range(cidr))
            .map(|range| rbac::Principal {
                identifier: Some(rbac::principal::Identifier::DirectRemoteIp(range)),
            });
        // A certificate's URI SAN, else its DNS SAN, is the name RBAC compares.
        let certificate_named = |name: &String| rbac::Principal {
            identifier: Some(rbac::principal::Identifier::Authenticated(
                rbac::principal::Authenticated {
                    principal_name: Some(exact(name)),
                },
            )),
        };
        let any_of = |ids: Vec<rbac::Principal>| rbac::Principal {
            identifier: Some(rbac::principal::Identifier::OrIds(rbac::principal::Set {
                ids,
            })),
        };
        let by_certificate = svc.ingress_principals.iter().map(certificate_named);
        let by_certificate_and_address = svc.ingress_principals_from.iter().map(|from| {
            let from_address = from
                .sources
                .iter()
                .filter_map(|cidr| cidr_range(cidr))
                .map(|range| rbac::Principal {
                    identifier: Some(rbac::principal::Identifier::DirectRemoteIp(range)),
                })
                .collect();
            rbac::Principal {
                identifier: Some(rbac::principal::Identifier::AndIds(rbac::principal::Set {
                    ids: vec![
                        any_of(from.principals.iter().map(certificate_named).collect()),
                        any_of(from_address),
                    ],
                })),
            }
        });
        let mut route = http_route(
            &fsm_ir::HttpRoute {
                matches: Default::default(),
                backends: vec![fsm_ir::WeightedCluster {
                    cluster: svc.local_cluster.clone(),
                    weight: 100,
                }],
                allowed: fsm_ir::AllowedSources::Any,
                timeout_ms: None,
                retry: None,
                rate_limit: None,
            },
            None,
            None,
        );
        route.typed_per_filter_config = rbac_per_route(
            by_address
                .chain(by_certificate)
                .chain(by_certificate_and_address)
                .collect(),
        );
        virtual_hosts.push(route::VirtualHost {
            name: svc.local_cluster.to_string(),
            domains: domains.claim(&svc.hosts),
            routes: vec![route],
            ..Default::default()
        });
    }
    if virtual_hosts.is_empty() {
        return None;
    }
    let manager = hcm::HttpConnectionManager {
        stat_prefix: "inbound_ingress".into(),
        tracing: ir.mesh.tracing.as_ref().map(hcm_tracing),
        codec_type: hcm::http_connection_manager::CodecType::Auto as i32,
        route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::Rds(
            hcm::Rds {
                config_source: ads(),
                route_config_name: INGRESS_ROUTES.into(),
            },
        )),
        http_filters: vec![
            hcm::HttpFilter {
                name: RBAC_FILTER.into(),
                config_type: Some(hcm::http_filter::ConfigType::TypedConfig(any(
                    &rbac_filter::Rbac::default(),
                ))),
                ..Default::default()
            },
            hcm::HttpFilter {
                name: "envoy.filters.http.router".into(),
                config_type: Some(hcm::http_filter::ConfigType::TypedConfig(any(
                    &Router::default(),
                ))),
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    let http = || {
        vec![network_filter(
            "envoy.filters.network.http_connection_manager",
            &manager,
        )]
    };
    let mut chains = Vec::new();
    if !sources.is_empty() {
        chains.push(listener::FilterChain {
            name: "ingress-http".into(),
            filter_chain_match: Some(listener::FilterChainMatch {
                transport_protocol: "raw_buffer".into(),
                source_prefix_ranges: sources.iter().filter_map(|c| cidr_range(c)).collect(),
                ..Default::default()
            }),
            filters: http(),
            ..Default::default()
        });
    }
    // TLS from outside the mesh arrives redirected from the application port it was sent to
    // (the listener's original_dst filter restores it); peers' mTLS comes to 15003 itself.
    let redirected = |p: &&fsm_ir::InboundPort| {
        ir.proxy.transparent && ir.proxy.bypass.redirects_inbound(p.target_port)
    };
    for port in ir.inbound.iter().filter(redirected) {
        let principals = port.ingress_principals();
        let unchecked = port.ingress_tls_sources();
        if principals.is_empty() && unchecked.is_empty() {
            continue;
        }
        // Envoy picks among the chains naming a connection's destination port before it looks
        // at the transport: plaintext ingress redirected to this port needs a chain here too.
        let plaintext: BTreeSet<&str> = port
            .services
            .iter()
            .flat_map(|s| s.ingress_sources.iter().map(String::as_str))
            .collect();
        if !plaintext.is_empty() {
            chains.push(listener::FilterChain {
                name: format!("ingress-http|{}", port.target_port),
                filter_chain_match: Some(listener::FilterChainMatch {
                    destination_port: Some(UInt32Value {
                        value: u32::from(port.target_port),
                    }),
                    transport_protocol: "raw_buffer".into(),
                    source_prefix_ranges: plaintext.iter().filter_map(|c| cidr_range(c)).collect(),
                    ..Default::default()
                }),
                filters: http(),
                ..Default::default()
            });
        }
        if !principals.is_empty() {
            chains.push(listener::FilterChain {
                name: format!("ingress-https|{}", port.target_port),
                filter_chain_match: Some(listener::FilterChainMatch {
                    destination_port: Some(UInt32Value {
                        value: u32::from(port.target_port),
                    }),
                    transport_protocol: "tls".into(),
                    ..Default::default()
                }),
                filters: http(),
                transport_socket: Some(ingress_tls(&principals)),
                ..Default::default()
            });
        }
        // TLS without client certificates (`skipClientCertValidation`), from the admitted
        // addresses only: more specific than the chain above, which takes everyone else.
        if !unchecked.is_empty() {
            chains.push(listener::FilterChain {
                name: format!("ingress-https-unchecked|{}", port.target_port),
                filter_chain_match: Some(listener::FilterChainMatch {
                    destination_port: Some(UInt32Value {
                        value: u32::from(port.target_port),
                    }),
                    transport_protocol: "tls".into(),
                    source_prefix_ranges: unchecked.iter().filter_map(|c| cidr_range(c)).collect(),
                    ..Default::default()
                }),
                filters: http(),
                transport_socket: Some(server_tls(None)),
                ..Default::default()
            });
        }
    }
    let routes = route::RouteConfiguration {
        name: INGRESS_ROUTES.into(),
        virtual_hosts,
        ..Default::default()
    };
    Some((chains, routes))
}

/// TLS for clients outside the mesh: the proxy's own certificate, and a client certificate that
/// chains to the mesh's roots and names one of `principals` (as a URI or DNS SAN).
fn ingress_tls(principals: &BTreeSet<&str>) -> core::TransportSocket {
    let san =
        |san_type: tls::subject_alt_name_matcher::SanType, name: &str| tls::SubjectAltNameMatcher {
            san_type: san_type as i32,
            matcher: Some(exact(name)),
            ..Default::default()
        };
    let sans = principals
        .iter()
        .flat_map(|name| {
            [
                san(tls::subject_alt_name_matcher::SanType::Dns, name),
                san(tls::subject_alt_name_matcher::SanType::Uri, name),
            ]
        })
        .collect();
    server_tls(Some(
        tls::common_tls_context::ValidationContextType::CombinedValidationContext(
            tls::common_tls_context::CombinedCertificateValidationContext {
                default_validation_context: Some(tls::CertificateValidationContext {
                    match_typed_subject_alt_names: sans,
                    ..Default::default()
                }),
                validation_context_sds_secret_config: Some(sds(names::OUTBOUND_ROOT.into())),
                ..Default::default()
            },
        ),
    ))
}

/// `10.0.0.0/8` as Envoy's CidrRange; `None` for anything else (the compiler passes only CIDRs).
fn cidr_range(cidr: &str) -> Option<core::CidrRange> {
    let (address, prefix) = cidr.split_once('/')?;
    Some(core::CidrRange {
        address_prefix: address.to_owned(),
        prefix_len: Some(UInt32Value {
            value: prefix.parse().ok()?,
        }),
    })
}

/// The proxy's own SDS secrets: its certificate and the roots its clients must chain to.
fn own_secrets(ir: &ProxyIr, credentials: &ProxyCredentials) -> Vec<tls::Secret> {
    vec![
        tls::Secret {
            name: names::SERVICE_CERT.into(),
            r#type: Some(tls::secret::Type::TlsCertificate(tls::TlsCertificate {
                certificate_chain: Some(inline(&credentials.cert_chain_pem)),
                private_key: Some(inline(&credentials.private_key_pem)),
                ..Default::default()
            })),
        },
        tls::Secret {
            name: names::inbound_validation(&ir.proxy.identity),
            r#type: Some(tls::secret::Type::ValidationContext(
                tls::CertificateValidationContext {
                    trusted_ca: Some(inline(&credentials.trust_bundle_pem)),
                    // One purpose per certificate: the mesh CA also signs every proxy's xDS
                    // bootstrap certificate, which carries no SPIFFE URI SAN. Only service
                    // certificates (`spiffe://<trust-domain>/ns/<ns>/sa/<sa>`) may connect.
                    match_typed_subject_alt_names: vec![tls::SubjectAltNameMatcher {
                        san_type: tls::subject_alt_name_matcher::SanType::Uri as i32,
                        matcher: Some(prefix(&spiffe_workload_prefix(&ir.mesh.trust_domain))),
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            )),
        },
    ]
}

/// The proxy's SDS secrets: its certificate, the roots its clients must chain to, and the roots
/// its servers must chain to.
pub fn secrets(ir: &ProxyIr, credentials: &ProxyCredentials) -> Vec<tls::Secret> {
    let mut out = own_secrets(ir, credentials);
    out.push(outbound_root(&credentials.trust_bundle_pem));
    out
}

fn inline(pem: &str) -> core::DataSource {
    core::DataSource {
        specifier: Some(core::data_source::Specifier::InlineString(pem.into())),
        ..Default::default()
    }
}

/// `spiffe://<trust-domain>/ns/`: what every workload's SPIFFE ID starts with.
fn spiffe_workload_prefix(trust_domain: &str) -> String {
    format!("spiffe://{trust_domain}/ns/")
}

fn prefix(value: &str) -> matcher::StringMatcher {
    matcher::StringMatcher {
        match_pattern: Some(matcher::string_matcher::MatchPattern::Prefix(value.into())),
        ..Default::default()
    }
}

fn exact(value: &str) -> matcher::StringMatcher {
    matcher::StringMatcher {
        match_pattern: Some(matcher::string_matcher::MatchPattern::Exact(value.into())),
        ..Default::default()
    }
}

fn sds(name: String) -> tls::SdsSecretConfig {
    tls::SdsSecretConfig {
        name,
        sds_config: ads(),
    }
}

fn transport_socket<M: Message + Name>(context: &M) -> core::TransportSocket {
    core::TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(core::transport_socket::ConfigType::TypedConfig(any(
            context,
        ))),
    }
}

/// Server side of the inbound mTLS: this proxy's certificate, clients must present one from the
/// mesh CA. Both ALPNs are offered so the connection manager speaks what the client speaks.
fn downstream_tls(own: &ServiceIdentity) -> core::TransportSocket {
    server_tls(Some(
        tls::common_tls_context::ValidationContextType::ValidationContextSdsSecretConfig(sds(
            names::inbound_validation(own),
        )),
    ))
}

/// Server-side TLS with the proxy's own certificate ([`names::SERVICE_CERT`]): requiring a
/// client certificate checked against `client_validation`, or asking for none without one.
fn server_tls(
    client_validation: Option<tls::common_tls_context::ValidationContextType>,
) -> core::TransportSocket {
    let require = client_validation.is_some();
    transport_socket(&tls::DownstreamTlsContext {
        common_tls_context: Some(tls::CommonTlsContext {
            tls_certificate_sds_secret_configs: vec![sds(names::SERVICE_CERT.into())],
            validation_context_type: client_validation,
            alpn_protocols: vec!["h2".into(), "http/1.1".into()],
            ..Default::default()
        }),
        require_client_certificate: require.then_some(BoolValue { value: true }),
        ..Default::default()
    })
}

/// Client side of the outbound mTLS to one service's sidecars: the server must chain to the
/// mesh roots ([`names::OUTBOUND_ROOT`], from SDS) and carry one of the cluster's identities
/// (inline; Envoy merges the SDS context into this one).
/// The client certificate is named [`names::SERVICE_CERT`] whatever the proxy's identity, so
/// that a cluster is the same resource for every proxy that may reach the service.
fn upstream_tls(c: &fsm_ir::Cluster, http2: bool, trust_domain: &str) -> core::TransportSocket {
    let identities = tls::CertificateValidationContext {
        match_typed_subject_alt_names: c
            .server_identities()
            .into_iter()
            .map(|id| tls::SubjectAltNameMatcher {
                san_type: tls::subject_alt_name_matcher::SanType::Uri as i32,
                matcher: Some(exact(&id.spiffe_id(trust_domain))),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    transport_socket(&tls::UpstreamTlsContext {
        common_tls_context: Some(tls::CommonTlsContext {
            tls_certificate_sds_secret_configs: vec![sds(names::SERVICE_CERT.into())],
            validation_context_type: Some(
                tls::common_tls_context::ValidationContextType::CombinedValidationContext(
                    tls::common_tls_context::CombinedCertificateValidationContext {
                        default_validation_context: Some(identities),
                        validation_context_sds_secret_config: Some(
                            sds(names::OUTBOUND_ROOT.into()),
                        ),
                        ..Default::default()
                    },
                ),
            ),
            alpn_protocols: if http2 { vec!["h2".into()] } else { vec![] },
            ..Default::default()
        }),
        sni: c.service.fqdn(),
        ..Default::default()
    })
}

/// `{"fsm.meshed": true}`: what meshed endpoints carry and the TLS transport socket matches.
fn meshed_match() -> Struct {
    Struct {
        fields: BTreeMap::from([(
            MESHED_MATCH_KEY.to_string(),
            Value {
                kind: Some(envoy_types::pb::google::protobuf::value::Kind::BoolValue(
                    true,
                )),
            },
        )])
        .into_iter()
        .collect(),
    }
}

fn any<M: Message + Name>(message: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: message.encode_to_vec(),
    }
}

fn ads() -> Option<core::ConfigSource> {
    Some(core::ConfigSource {
        resource_api_version: core::ApiVersion::V3 as i32,
        config_source_specifier: Some(core::config_source::ConfigSourceSpecifier::Ads(
            core::AggregatedConfigSource {},
        )),
        ..Default::default()
    })
}

fn socket_address(ip: IpAddr, port: u16) -> core::Address {
    core::Address {
        address: Some(core::address::Address::SocketAddress(core::SocketAddress {
            address: ip.to_string(),
            port_specifier: Some(core::socket_address::PortSpecifier::PortValue(u32::from(
                port,
            ))),
            ..Default::default()
        })),
    }
}

fn duration_ms(ms: u64) -> Duration {
    Duration {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

fn network_filter<M: Message + Name>(name: &str, config: &M) -> listener::Filter {
    listener::Filter {
        name: name.into(),
        config_type: Some(listener::filter::ConfigType::TypedConfig(any(config))),
    }
}

/// An HTTP listener; `inbound` (this proxy's identity) makes it the mTLS inbound listener that
/// also accepts CONNECT tunnels, authorises clients per route and enforces the rate limits its
/// virtual hosts and routes carry.
fn http_listener(
    name: &str,
    ip: IpAddr,
    port: u16,
    routes: &str,
    inbound: Option<&ServiceIdentity>,
    tracing: Option<&fsm_ir::Tracing>,
) -> listener::Listener {
    listener::Listener {
        name: name.into(),
        address: Some(socket_address(ip, port)),
        traffic_direction: direction(inbound.is_some()),
        filter_chains: vec![listener::FilterChain {
            filters: vec![network_filter(
                "envoy.filters.network.http_connection_manager",
                &http_manager(name, routes, inbound, tracing),
            )],
            transport_socket: inbound.map(downstream_tls),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The HTTP connection manager of [`http_listener`]: stats under `stat_name`, routes from the
/// route configuration `routes`, spans reported as `tracing` says.
fn http_manager(
    stat_name: &str,
    routes: &str,
    inbound: Option<&ServiceIdentity>,
    tracing: Option<&fsm_ir::Tracing>,
) -> hcm::HttpConnectionManager {
    let name = stat_name;
    let accept_connect = inbound.is_some();
    let connect = || {
        vec![hcm::http_connection_manager::UpgradeConfig {
            upgrade_type: "CONNECT".into(),
            ..Default::default()
        }]
    };
    hcm::HttpConnectionManager {
        stat_prefix: name.replace('-', "_"),
        codec_type: hcm::http_connection_manager::CodecType::Auto as i32,
        route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::Rds(
            hcm::Rds {
                config_source: ads(),
                route_config_name: routes.into(),
            },
        )),
        http_filters: inbound
            .as_ref()
            .map(|_| hcm::HttpFilter {
                // No rules here: routes carry their own (RBACPerRoute).
                name: RBAC_FILTER.into(),
                config_type: Some(hcm::http_filter::ConfigType::TypedConfig(any(
                    &rbac_filter::Rbac::default(),
                ))),
                ..Default::default()
            })
            .into_iter()
            // After RBAC, so a refused client takes no token. No bucket here: virtual hosts and
            // routes carry their own, and without one the filter lets everything by. Always
            // there: a setting must change the routes only, which apply to every connection at
            // once, not the listener, whose old filters serve the connections opened before it
            // changed until they drain (up to Envoy's 10 minute drain time).
            .chain(inbound.as_ref().map(|_| hcm::HttpFilter {
                name: RATE_LIMIT_FILTER.into(),
                config_type: Some(hcm::http_filter::ConfigType::TypedConfig(any(
                    &local_ratelimit::LocalRateLimit {
                        stat_prefix: RATE_LIMIT_STATS.into(),
                        ..Default::default()
                    },
                ))),
                ..Default::default()
            }))
            .chain([hcm::HttpFilter {
                name: "envoy.filters.http.router".into(),
                config_type: Some(hcm::http_filter::ConfigType::TypedConfig(any(
                    &Router::default(),
                ))),
                ..Default::default()
            }])
            .collect(),
        http2_protocol_options: accept_connect.then(|| core::Http2ProtocolOptions {
            allow_connect: true,
            ..Default::default()
        }),
        upgrade_configs: if accept_connect { connect() } else { vec![] },
        tracing: tracing.map(hcm_tracing),
        ..Default::default()
    }
}

/// The stat prefix of the inbound rate limits (`http_local_rate_limit.<prefix>.rate_limited`).
const RATE_LIMIT_STATS: &str = "inbound_rate_limit";

/// FSM's local rate limit as Envoy's: the bucket, enabled and enforced for every request, the
/// status and headers of a refusal. `owner` (the virtual host) prefixes its statistics.
fn rate_limit(
    limit: &fsm_ir::LocalRateLimit,
    owner: &fsm_ir::ClusterName,
) -> local_ratelimit::LocalRateLimit {
    let always = || core::RuntimeFractionalPercent {
        default_value: Some(types::FractionalPercent {
            numerator: 100,
            denominator: types::fractional_percent::DenominatorType::Hundred as i32,
        }),
        runtime_key: String::new(),
    };
    local_ratelimit::LocalRateLimit {
        stat_prefix: format!("{RATE_LIMIT_STATS}.{owner}"),
        status: Some(types::HttpStatus {
            code: i32::from(limit.status),
        }),
        token_bucket: Some(types::TokenBucket {
            max_tokens: limit.max_tokens,
            tokens_per_fill: Some(UInt32Value {
                value: limit.tokens_per_fill,
            }),
            fill_interval: Some(duration_ms(limit.fill_interval_ms)),
        }),
        filter_enabled: Some(always()),
        filter_enforced: Some(always()),
        response_headers_to_add: limit
            .response_headers
            .iter()
            .map(|h| core::HeaderValueOption {
                header: Some(core::HeaderValue {
                    key: h.name.clone(),
                    value: h.value.clone(),
                    ..Default::default()
                }),
                append_action: core::header_value_option::HeaderAppendAction::OverwriteIfExistsOrAdd
                    as i32,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

fn denied() -> route::route::Action {
    route::route::Action::DirectResponse(route::DirectResponseAction {
        status: 403,
        body: Some(core::DataSource {
            specifier: Some(core::data_source::Specifier::InlineString(
                "RBAC: access denied".into(),
            )),
            ..Default::default()
        }),
        ..Default::default()
    })
}

fn is_denied(allowed: &AllowedSources) -> bool {
    matches!(allowed, AllowedSources::Identities(ids) if ids.is_empty())
}

/// The per-route RBAC of an inbound route that admits only some identities: the client's
/// certificate (verified by the mTLS handshake) must carry one of their SPIFFE URI SANs.
fn route_rbac(
    allowed: &AllowedSources,
    trust_domain: &str,
) -> std::collections::HashMap<String, Any> {
    let AllowedSources::Identities(ids) = allowed else {
        return Default::default();
    };
    if ids.is_empty() {
        return Default::default();
    }
    let principals = ids
        .iter()
        .map(|id| rbac::Principal {
            identifier: Some(rbac::principal::Identifier::Authenticated(
                rbac::principal::Authenticated {
                    principal_name: Some(exact(&id.spiffe_id(trust_domain))),
                },
            )),
        })
        .collect();
    rbac_per_route(principals)
}

/// A route's RBAC: any request of a client one of `principals` names.
fn rbac_per_route(principals: Vec<rbac::Principal>) -> std::collections::HashMap<String, Any> {
    let policy = rbac::Policy {
        permissions: vec![rbac::Permission {
            rule: Some(rbac::permission::Rule::Any(true)),
        }],
        principals,
        ..Default::default()
    };
    let per_route = rbac_filter::RbacPerRoute {
        rbac: Some(rbac_filter::Rbac {
            rules: Some(rbac::Rbac {
                action: rbac::rbac::Action::Allow as i32,
                // One policy only: a map with several would encode in hash order.
                policies: [("allowed-sources".to_string(), policy)]
                    .into_iter()
                    .collect(),
                ..Default::default()
            }),
            ..Default::default()
        }),
    };
    [(RBAC_FILTER.to_string(), any(&per_route))]
        .into_iter()
        .collect()
}

/// A header whose whole value must match `regex`.
fn regex_header(name: &str, regex: &str) -> route::HeaderMatcher {
    route::HeaderMatcher {
        name: name.into(),
        header_match_specifier: Some(route::header_matcher::HeaderMatchSpecifier::StringMatch(
            matcher::StringMatcher {
                match_pattern: Some(matcher::string_matcher::MatchPattern::SafeRegex(
                    matcher::RegexMatcher {
                        regex: regex.into(),
                        ..Default::default()
                    },
                )),
                ..Default::default()
            },
        )),
        ..Default::default()
    }
}

/// `inbound_trust_domain` is set for inbound routes, whose allowed sources become RBAC.
fn http_route(
    r: &HttpRoute,
    upgrade: Option<route::route_action::UpgradeConfig>,
    inbound_trust_domain: Option<&str>,
) -> route::Route {
    let path_specifier = match &r.matches.path {
        PathMatch::Exact(p) => route::route_match::PathSpecifier::Path(p.clone()),
        PathMatch::Prefix(p) => route::route_match::PathSpecifier::Prefix(p.clone()),
        PathMatch::Regex(re) if re == ".*" => route::route_match::PathSpecifier::Prefix("/".into()),
        PathMatch::Regex(re) => {
            route::route_match::PathSpecifier::SafeRegex(matcher::RegexMatcher {
                regex: re.clone(),
                ..Default::default()
            })
        }
    };
    let mut headers: Vec<route::HeaderMatcher> = r
        .matches
        .headers
        .iter()
        .map(|(name, value)| regex_header(name, value))
        .collect();
    if !r.matches.methods.is_empty() && !r.matches.methods.iter().any(|m| m == "*") {
        headers.push(regex_header(":method", &r.matches.methods.join("|")));
    }
    let action = if is_denied(&r.allowed) {
        denied()
    } else {
        let cluster_specifier = if r.backends.len() == 1 {
            route::route_action::ClusterSpecifier::Cluster(r.backends[0].cluster.to_string())
        } else {
            route::route_action::ClusterSpecifier::WeightedClusters(route::WeightedCluster {
                clusters: r
                    .backends
                    .iter()
                    .map(|b| route::weighted_cluster::ClusterWeight {
                        name: b.cluster.to_string(),
                        weight: Some(UInt32Value { value: b.weight }),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
        };
        route::route::Action::Route(route::RouteAction {
            cluster_specifier: Some(cluster_specifier),
            // Envoy's default of 15 s would cut long requests the mesh has no policy for.
            timeout: Some(duration_ms(r.timeout_ms.unwrap_or(0))),
            upgrade_configs: upgrade.into_iter().collect(),
            retry_policy: r.retry.as_ref().map(retry_policy),
            ..Default::default()
        })
    };
    route::Route {
        r#match: Some(route::RouteMatch {
            path_specifier: Some(path_specifier),
            headers,
            ..Default::default()
        }),
        action: Some(action),
        typed_per_filter_config: inbound_trust_domain
            .map(|td| route_rbac(&r.allowed, td))
            .unwrap_or_default(),
        ..Default::default()
    }
}

/// FSM's Retry as Envoy's: the same `retryOn` names (one comma-separated string), the back-off
/// capped at 10 times its base as Envoy does by default. Envoy buffers a request's body to retry
/// it, up to its per-connection buffer limit (1 MiB); a larger body is sent once.
fn retry_policy(retry: &fsm_ir::RetryPolicy) -> route::RetryPolicy {
    route::RetryPolicy {
        retry_on: retry.conditions().join(","),
        num_retries: Some(UInt32Value {
            value: retry.num_retries,
        }),
        per_try_timeout: retry.per_try_timeout_ms.map(duration_ms),
        retry_back_off: retry.backoff_base_interval_ms.map(|base| {
            route::retry_policy::RetryBackOff {
                base_interval: Some(duration_ms(base)),
                max_interval: Some(duration_ms(base.saturating_mul(10))),
            }
        }),
        ..Default::default()
    }
}

fn connect_route(
    local_cluster: &str,
    allowed: &AllowedSources,
    trust_domain: &str,
) -> route::Route {
    let action = if is_denied(allowed) {
        denied()
    } else {
        route::route::Action::Route(route::RouteAction {
            cluster_specifier: Some(route::route_action::ClusterSpecifier::Cluster(
                local_cluster.into(),
            )),
            timeout: Some(duration_ms(0)),
            upgrade_configs: vec![route::route_action::UpgradeConfig {
                upgrade_type: "CONNECT".into(),
                connect_config: Some(route::route_action::upgrade_config::ConnectConfig::default()),
                ..Default::default()
            }],
            ..Default::default()
        })
    };
    route::Route {
        r#match: Some(route::RouteMatch {
            path_specifier: Some(route::route_match::PathSpecifier::ConnectMatcher(
                route::route_match::ConnectMatcher {},
            )),
            ..Default::default()
        }),
        action: Some(action),
        typed_per_filter_config: route_rbac(allowed, trust_domain),
        ..Default::default()
    }
}

fn build_cluster(c: &fsm_ir::Cluster, tunnel: bool, trust_domain: &str) -> cluster::Cluster {
    let http2 = tunnel || c.protocol == Protocol::Grpc;
    let limits = c.circuit_breaker.as_ref();
    let per_connection = limits
        .and_then(|l| l.max_requests_per_connection)
        .filter(|_| c.protocol.is_http());
    use upstream_http::http_protocol_options::explicit_http_config::ProtocolConfig;
    let protocol_options = if http2 {
        Some(ProtocolConfig::Http2ProtocolOptions(
            core::Http2ProtocolOptions::default(),
        ))
    } else if per_connection.is_some() {
        Some(ProtocolConfig::HttpProtocolOptions(
            core::Http1ProtocolOptions::default(),
        ))
    } else {
        // HTTP/1.1 is what Envoy speaks upstream when a cluster names no protocol: saying so
        // explicitly cost 144 bytes per cluster, 14 % of a proxy's configuration at 1,000
        // services.
        None
    };
    let typed_extension_protocol_options = protocol_options
        .map(|config| {
            let options = upstream_http::HttpProtocolOptions {
                upstream_protocol_options: Some(
                    upstream_http::http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(
                        upstream_http::http_protocol_options::ExplicitHttpConfig {
                            protocol_config: Some(config),
                        },
                    ),
                ),
                common_http_protocol_options: per_connection.map(|n| core::HttpProtocolOptions {
                    max_requests_per_connection: Some(UInt32Value { value: n }),
                    ..Default::default()
                }),
                ..Default::default()
            };
            BTreeMap::from([(
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".to_string(),
                any(&options),
            )])
        })
        .unwrap_or_default();
    let (discovery, eds_cluster_config, load_assignment) = match c.kind {
        ClusterKind::Outbound => (
            cluster::cluster::DiscoveryType::Eds,
            Some(cluster::cluster::EdsClusterConfig {
                eds_config: ads(),
                service_name: String::new(),
            }),
            None,
        ),
        // The local application never moves while the pod lives: no EDS round trip needed.
        ClusterKind::Local => (
            cluster::cluster::DiscoveryType::Static,
            None,
            Some(load_assignment(c, false)),
        ),
    };
    // Only endpoints with a sidecar terminate TLS; they are marked in EDS (see `load_assignment`).
    let transport_socket_matches = if c.kind == ClusterKind::Outbound && c.has_meshed_endpoints() {
        vec![cluster::cluster::TransportSocketMatch {
            name: "fsm-mtls".into(),
            r#match: Some(meshed_match()),
            transport_socket: Some(upstream_tls(c, http2, trust_domain)),
        }]
    } else {
        vec![]
    };
    cluster::Cluster {
        name: c.name.to_string(),
        transport_socket_matches,
        cluster_discovery_type: Some(cluster::cluster::ClusterDiscoveryType::Type(
            discovery as i32,
        )),
        eds_cluster_config,
        load_assignment,
        connect_timeout: Some(duration_ms(c.connect_timeout_ms)),
        lb_policy: cluster::cluster::LbPolicy::RoundRobin as i32,
        typed_extension_protocol_options: typed_extension_protocol_options.into_iter().collect(),
        circuit_breakers: limits.map(|l| circuit_breakers(l, c.protocol.is_http(), tunnel)),
        ..Default::default()
    }
}

/// FSM's `connectionSettings` as Envoy's default-priority thresholds; a limit FSM leaves unset
/// is Envoy's "unlimited" (2^32 - 1, FSM's documented default), not Envoy's own default of 1024.
/// A TCP cluster carries HTTP limits nowhere; when it is tunnelled, each client connection is a
/// CONNECT stream, so `maxConnections` also bounds the streams.
fn circuit_breakers(
    limits: &fsm_ir::CircuitBreaker,
    http: bool,
    tunnel: bool,
) -> cluster::CircuitBreakers {
    let value = |v: Option<u32>| {
        Some(UInt32Value {
            value: v.unwrap_or(u32::MAX),
        })
    };
    let (pending, requests, retries) = if http {
        (
            limits.max_pending_requests,
            limits.max_requests,
            limits.max_retries,
        )
    } else if tunnel {
        (None, limits.max_connections, None)
    } else {
        (None, None, None)
    };
    cluster::CircuitBreakers {
        thresholds: vec![cluster::circuit_breakers::Thresholds {
            max_connections: value(limits.max_connections),
            max_pending_requests: value(pending),
            max_requests: value(requests),
            max_retries: value(retries),
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn load_assignment(c: &fsm_ir::Cluster, tunnel: bool) -> endpoint::ClusterLoadAssignment {
    let lb_endpoints = c
        .endpoints
        .iter()
        // A tunnelled cluster speaks CONNECT, which only a sidecar understands.
        .filter(|e| !tunnel || e.meshed)
        .map(|e| {
            let port = if e.meshed && c.kind == ClusterKind::Outbound {
                ports::INBOUND
            } else {
                e.port
            };
            let tls_match = e.meshed && c.kind == ClusterKind::Outbound;
            endpoint::LbEndpoint {
                host_identifier: Some(endpoint::lb_endpoint::HostIdentifier::Endpoint(
                    endpoint::Endpoint {
                        address: Some(socket_address(e.ip, port)),
                        ..Default::default()
                    },
                )),
                metadata: tls_match.then(|| core::Metadata {
                    filter_metadata: [("envoy.transport_socket_match".to_string(), meshed_match())]
                        .into_iter()
                        .collect(),
                    ..Default::default()
                }),
                ..Default::default()
            }
        })
        .collect();
    endpoint::ClusterLoadAssignment {
        cluster_name: c.name.to_string(),
        endpoints: vec![endpoint::LocalityLbEndpoints {
            lb_endpoints,
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit() -> fsm_ir::LocalRateLimit {
        fsm_ir::LocalRateLimit {
            max_tokens: 3,
            tokens_per_fill: 3,
            fill_interval_ms: 60_000,
            status: 429,
            response_headers: vec![],
        }
    }

    /// A route with two per-filter configurations encodes to the same bytes whatever order its
    /// maps hold them in, and decodes to the route configuration it came from.
    #[test]
    fn route_configurations_encode_the_same_whatever_their_maps_order() {
        let owner = fsm_ir::ClusterName("app/httpbin|14001|local".into());
        let config = || {
            let allowed = AllowedSources::Identities(vec![ServiceIdentity {
                service_account: "curl".into(),
                namespace: "app".into(),
            }]);
            let mut route = http_route(
                &HttpRoute {
                    matches: Default::default(),
                    backends: vec![fsm_ir::WeightedCluster {
                        cluster: owner.clone(),
                        weight: 100,
                    }],
                    allowed,
                    timeout_ms: None,
                    retry: None,
                    rate_limit: None,
                },
                None,
                Some("cluster.local"),
            );
            route
                .typed_per_filter_config
                .insert(RATE_LIMIT_FILTER.into(), any(&rate_limit(&limit(), &owner)));
            route::RouteConfiguration {
                name: INBOUND_ROUTES.into(),
                virtual_hosts: vec![route::VirtualHost {
                    name: owner.to_string(),
                    domains: vec!["httpbin".into()],
                    routes: vec![route.clone(), route],
                    typed_per_filter_config: [(
                        RATE_LIMIT_FILTER.to_string(),
                        any(&rate_limit(&limit(), &owner)),
                    )]
                    .into_iter()
                    .collect(),
                    ..Default::default()
                }],
                ..Default::default()
            }
        };
        let first = encode_route_configuration(&config());
        // Each new HashMap has its own seed: some of these hold the two filters the other way.
        for _ in 0..32 {
            assert_eq!(encode_route_configuration(&config()), first);
        }
        let decoded =
            route::RouteConfiguration::decode(first.as_slice()).expect("a valid encoding");
        assert_eq!(decoded, config());
        assert_eq!(
            decoded.virtual_hosts[0].routes[0]
                .typed_per_filter_config
                .len(),
            2
        );
    }

    #[test]
    fn unset_circuit_breaker_limits_are_unlimited_not_envoys_default() {
        let limits = fsm_ir::CircuitBreaker {
            max_requests: Some(5),
            ..Default::default()
        };
        let http = circuit_breakers(&limits, true, false);
        let t = &http.thresholds[0];
        assert_eq!(t.max_requests.as_ref().map(|v| v.value), Some(5));
        assert_eq!(t.max_connections.as_ref().map(|v| v.value), Some(u32::MAX));
        assert_eq!(t.max_retries.as_ref().map(|v| v.value), Some(u32::MAX));
        // A tunnelled TCP cluster: each connection is a stream.
        let tcp = fsm_ir::CircuitBreaker {
            max_connections: Some(2),
            ..Default::default()
        };
        let tunnel = circuit_breakers(&tcp, false, true);
        assert_eq!(
            tunnel.thresholds[0].max_requests.as_ref().map(|v| v.value),
            Some(2)
        );
    }
}
