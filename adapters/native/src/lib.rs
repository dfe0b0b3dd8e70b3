//! Native adapter: mesh IR to fsm.dataplane.v1 resources for fsm-sidecar.
//!
//! [`translate`] is a pure function of a [`ProxyIr`]. It lays the proxy out as the Envoy adapter
//! does (same names, same ports, same wire conventions between sidecars, so a native sidecar and an
//! Envoy sidecar can call each other), and adds what transparent interception needs:
//!
//! - `outbound-listener` on `<pod-ip>:15001`: chain `explicit-http` for applications that send HTTP
//!   to the sidecar (routed by Host in route configuration `outbound`), and one chain per service
//!   port, matched on the ClusterIP(s) and port of a connection iptables redirected there.
//! - `outbound-tcp:<ns>/<svc>|<port>` on `<pod-ip>:<port>` for each TCP service port, for
//!   applications that connect to the sidecar explicitly (skipped, with a warning, when the port is
//!   taken on the pod).
//! - `inbound-listener` on `<pod-ip>:15003`: chain `explicit-http` for peer sidecars (HTTP routed by
//!   Host, TCP tunnelled in HTTP/2 CONNECT and routed by authority, in route configuration
//!   `inbound`), and one chain per application port for redirected connections.
//! - Clusters `<ns>/<svc>|<port>` discover endpoints through a `ClusterLoadAssignment`, where a
//!   meshed endpoint is addressed at its sidecar, `<pod-ip>:15003`; local clusters
//!   `<ns>/<svc>|<port>|local` carry the application's address themselves.
//!
//! Policy decisions stay with the sidecar: allowed sources travel with each inbound route and TCP
//! chain, and the sidecar answers 403 itself, where the Envoy adapter has to turn a denied route
//! into a direct response.
//!
//! mTLS uses the Envoy adapter's SDS names: every inbound chain requires a client certificate
//! (`service-cert`, checked against `root-cert-for-mtls-inbound:<ns>/<sa>`), and outbound
//! clusters with meshed endpoints verify the server against the mesh roots of
//! `root-cert-for-mtls-outbound` (one secret for every upstream service) and the identities the
//! cluster lists.

mod golden_view;
mod listeners;
mod routes;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::net::IpAddr;

use fsm_dataplane_proto::{type_url, v1};
use fsm_ir::{ClusterKind, Protocol, ProxyCredentials, ProxyIr, ServiceIdentity, names, ports};

pub use golden_view::{render, to_json};

pub use fsm_ir::names::{INBOUND_LISTENER, INBOUND_ROUTES, OUTBOUND_LISTENER, OUTBOUND_ROUTES};
/// The filter chain of both listeners that serves connections made to the sidecar's own port.
pub const EXPLICIT_HTTP_CHAIN: &str = "explicit-http";
/// Route configuration of the inbound listener's plaintext chains for clients outside the mesh
/// (IngressBackend), and the explicit-mode chain's name.
pub const INGRESS_ROUTES: &str = "ingress";
pub const INGRESS_CHAIN: &str = "ingress-http";

/// The native resources of one proxy, each list sorted by resource name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NativeResources {
    pub clusters: Vec<v1::Cluster>,
    pub endpoints: Vec<v1::ClusterLoadAssignment>,
    pub listeners: Vec<v1::Listener>,
    pub routes: Vec<v1::RouteConfiguration>,
    pub secrets: Vec<v1::Secret>,
    /// The proxy-wide settings: one resource, [`fsm_dataplane_proto::RUNTIME_NAME`], in a
    /// translated proxy.
    pub runtime: Vec<v1::Runtime>,
    /// Parts of the IR left out of the resources, with the reason.
    pub warnings: Vec<String>,
}

pub use fsm_cache::Encoded;
use fsm_cache::encode_sorted;

impl NativeResources {
    /// Every type URL of [`fsm_dataplane_proto::ALL_TYPE_URLS`] is present, with an empty list when
    /// the proxy has no resource of that type.
    pub fn encode(&self) -> Encoded {
        BTreeMap::from([
            (
                type_url::CLUSTER,
                encode_sorted(&self.clusters, |c| &c.name),
            ),
            (
                type_url::CLUSTER_LOAD_ASSIGNMENT,
                encode_sorted(&self.endpoints, |e| &e.cluster_name),
            ),
            (
                type_url::LISTENER,
                encode_sorted(&self.listeners, |l| &l.name),
            ),
            (
                type_url::ROUTE_CONFIGURATION,
                encode_sorted(&self.routes, |r| &r.name),
            ),
            (type_url::SECRET, encode_sorted(&self.secrets, |s| &s.name)),
            (type_url::RUNTIME, encode_sorted(&self.runtime, |r| &r.name)),
        ])
    }
}

/// Why a proxy's IR cannot be given to fsm-sidecar.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AdapterError {
    #[error("invalid IR: {0}")]
    InvalidIr(#[from] fsm_ir::IrError),
    /// The IR is valid but holds something `fsm.dataplane.v1` cannot express. `field` is the path
    /// of the offending IR field, as it is spelled in the IR's YAML.
    #[error("{field}: {reason}")]
    Unsupported { field: String, reason: String },
}

/// Translates one proxy's IR into native resources, with its mTLS material as secrets: the shared
/// resources of every service it may reach ([`service_resources`], [`outbound_routes`]) and its
/// own ([`proxy_resources`]).
pub fn translate(
    ir: &ProxyIr,
    credentials: &ProxyCredentials,
) -> Result<NativeResources, AdapterError> {
    let mut out = proxy_resources(ir, credentials)?;
    for service in ir.service_outbounds() {
        let shared = service_resources(&service)?;
        out.clusters.extend(shared.clusters);
        out.endpoints.extend(shared.endpoints);
    }
    out.secrets
        .push(outbound_root(&credentials.trust_bundle_pem));
    out.routes.push(outbound_routes(
        ir.outbound.iter(),
        &ir.egress.http,
        ir.mesh.enable_egress,
    )?);
    out.clusters.sort_by(|a, b| a.name.cmp(&b.name));
    out.endpoints
        .sort_by(|a, b| a.cluster_name.cmp(&b.cluster_name));
    out.routes.sort_by(|a, b| a.name.cmp(&b.name));
    out.secrets.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// One service's resources shared by every proxy that may reach it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServiceResources {
    pub clusters: Vec<v1::Cluster>,
    pub endpoints: Vec<v1::ClusterLoadAssignment>,
}

/// The resources of one service that are the same for every proxy that may reach it: its
/// outbound clusters (naming the identities its servers must have) and their
/// ClusterLoadAssignments. Built once per service and shared.
pub fn service_resources(
    service: &fsm_ir::ServiceOutbound,
) -> Result<ServiceResources, AdapterError> {
    Ok(ServiceResources {
        clusters: service
            .clusters
            .iter()
            .map(outbound_cluster)
            .collect::<Result<_, _>>()?,
        endpoints: service
            .clusters
            .iter()
            .map(outbound_load_assignment)
            .collect(),
    })
}

/// An outbound cluster of [`service_resources`]: made of [`fsm_ir::Cluster::outbound_shape`]
/// alone.
pub fn outbound_cluster(c: &fsm_ir::Cluster) -> Result<v1::Cluster, AdapterError> {
    cluster(c)
}

/// The ClusterLoadAssignment of an outbound cluster of [`service_resources`].
pub fn outbound_load_assignment(c: &fsm_ir::Cluster) -> v1::ClusterLoadAssignment {
    load_assignment(c)
}

/// Secret [`names::OUTBOUND_ROOT`]: the roots every upstream sidecar's certificate must chain to.
/// The same for every proxy whose certificate carries this trust bundle.
pub fn outbound_root(trust_bundle_pem: &str) -> v1::Secret {
    validation(names::OUTBOUND_ROOT.into(), vec![], trust_bundle_pem)
}

/// Route configuration `outbound` (see [`routes::outbound`]): the services' virtual hosts, then
/// those of the hosts outside the mesh Egress policies allow (`egress_hosts`); with
/// `passthrough` (MeshConfig `enableEgress`) its last virtual host takes every other Host to the
/// original-destination cluster.
pub fn outbound_routes<'a>(
    services: impl IntoIterator<Item = &'a fsm_ir::OutboundService>,
    egress_hosts: &[fsm_ir::EgressHttpHost],
    passthrough: bool,
) -> Result<v1::RouteConfiguration, AdapterError> {
    let mut routes = routes::outbound(services, egress_hosts)?;
    if passthrough {
        routes.virtual_hosts.push(v1::VirtualHost {
            name: names::PASSTHROUGH_VIRTUAL_HOST.into(),
            domains: vec!["*".into()],
            routes: vec![routes::to_cluster(
                v1::route_match::Path::Prefix("/".into()),
                names::PASSTHROUGH_CLUSTER,
                None,
            )],
            rate_limit: None,
        });
    }
    Ok(routes)
}

/// The original-destination cluster of egress passthrough: where each connection or request
/// meant to go, in plaintext.
fn passthrough_cluster() -> v1::Cluster {
    v1::Cluster {
        name: names::PASSTHROUGH_CLUSTER.into(),
        discovery: Some(v1::cluster::Discovery::OriginalDestination(
            v1::OriginalDestination {},
        )),
        lb_policy: v1::LbPolicy::RoundRobin as i32,
        connect_timeout: Some(duration_ms(1000)),
        upstream_protocol: v1::UpstreamProtocol::Tcp as i32,
        circuit_breakers: None,
        tls: None,
    }
}

/// The cluster of a host outside the mesh an Egress policy allows: resolved by name when
/// connections are made, plaintext (the application's own TLS goes through untouched).
fn egress_host_cluster(host: &fsm_ir::EgressHttpHost) -> v1::Cluster {
    v1::Cluster {
        name: host.cluster_name().to_string(),
        discovery: Some(v1::cluster::Discovery::Dns(v1::DnsName {
            host: host.host.clone(),
            port: u32::from(host.port),
        })),
        lb_policy: v1::LbPolicy::RoundRobin as i32,
        connect_timeout: Some(duration_ms(1000)),
        upstream_protocol: v1::UpstreamProtocol::Http1 as i32,
        circuit_breakers: host.circuit_breaker.as_ref().map(circuit_breakers),
        tls: None,
    }
}

/// What [`proxy_resources`] reads of the services the proxy may reach: every service port, since
/// the outbound listener has a filter chain per service port (matched on its ClusterIPs).
pub const PROXY_RESOURCES_OUTBOUND: fsm_ir::OutboundDetail = fsm_ir::OutboundDetail::All;

/// What only this proxy has: its listeners (bound to its pod address), the inbound route
/// configuration, its own application's clusters, and its certificate with the roots its
/// clients must chain to.
pub fn proxy_resources(
    ir: &ProxyIr,
    credentials: &ProxyCredentials,
) -> Result<NativeResources, AdapterError> {
    ir.validate()?;
    let mut out = NativeResources {
        secrets: own_secrets(ir, credentials),
        runtime: vec![runtime(&ir.mesh)],
        ..Default::default()
    };
    for c in ir.clusters.iter().filter(|c| c.kind == ClusterKind::Local) {
        out.clusters.push(cluster(c)?);
    }
    if ir.mesh.enable_egress || ir.egress.uses_original_destination() {
        out.clusters.push(passthrough_cluster());
    }
    out.clusters
        .extend(ir.egress.http.iter().map(egress_host_cluster));
    out.routes = vec![routes::inbound(ir)?];
    out.routes.extend(routes::ingress(ir));
    out.listeners = listeners::all(ir, &mut out.warnings);
    if let Some(tracing) = &ir.mesh.tracing {
        out.clusters.push(tracing_cluster(tracing));
        let config = v1::Tracing {
            collector_cluster: names::TRACING_CLUSTER.into(),
            collector_endpoint: tracing.endpoint.clone(),
            sampled_per_million: tracing.sampled_per_million,
            // Envoy's spans are named after its node cluster, `<sa>.<ns>`: the same name
            // whichever data plane a workload runs.
            service_name: ir.proxy.identity.to_string(),
        };
        for listener in &mut out.listeners {
            let http = listener
                .filter_chains
                .iter()
                .any(|c| matches!(c.target, Some(v1::filter_chain::Target::Http(_))));
            if http {
                listener.tracing = Some(config.clone());
            }
        }
    }
    out.listeners.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// The proxy-wide settings: MeshConfig `spec.sidecar.logLevel`, unspecified when empty (the
/// sidecar keeps its `--log-level`).
pub fn runtime(mesh: &fsm_ir::MeshSettings) -> v1::Runtime {
    use fsm_ir::LogLevel;
    let log_level = match mesh.sidecar_log_level {
        None => v1::LogLevel::Unspecified,
        Some(LogLevel::Trace) => v1::LogLevel::Trace,
        Some(LogLevel::Debug) => v1::LogLevel::Debug,
        Some(LogLevel::Info) => v1::LogLevel::Info,
        Some(LogLevel::Warn) => v1::LogLevel::Warn,
        Some(LogLevel::Error) => v1::LogLevel::Error,
        Some(LogLevel::Off) => v1::LogLevel::Off,
    };
    v1::Runtime {
        name: fsm_dataplane_proto::RUNTIME_NAME.into(),
        log_level: log_level as i32,
    }
}

/// FSM's tracing cluster, `pipy-tracing-cluster`: the collector by name (or address) and port,
/// resolved when reports are sent, plaintext HTTP/1.1, connect timeout 1s.
fn tracing_cluster(tracing: &fsm_ir::Tracing) -> v1::Cluster {
    v1::Cluster {
        name: names::TRACING_CLUSTER.into(),
        discovery: Some(v1::cluster::Discovery::Dns(v1::DnsName {
            host: tracing.address.clone(),
            port: u32::from(tracing.port),
        })),
        lb_policy: v1::LbPolicy::RoundRobin as i32,
        connect_timeout: Some(duration_ms(1000)),
        upstream_protocol: v1::UpstreamProtocol::Http1 as i32,
        circuit_breakers: None,
        tls: None,
    }
}

fn validation(name: String, sans: Vec<String>, trust_bundle_pem: &str) -> v1::Secret {
    v1::Secret {
        name,
        kind: Some(v1::secret::Kind::ValidationContext(v1::ValidationContext {
            trusted_ca: trust_bundle_pem.as_bytes().to_vec(),
            match_subject_alt_names: sans,
        })),
    }
}

/// The proxy's own certificate and the roots its clients must chain to.
fn own_secrets(ir: &ProxyIr, credentials: &ProxyCredentials) -> Vec<v1::Secret> {
    // The certificate names clients outside the mesh may present (see `listeners`).
    let principals: std::collections::BTreeSet<&str> = ir
        .inbound
        .iter()
        .filter(|_| ir.proxy.transparent)
        .flat_map(|p| p.ingress_principals())
        .collect();
    let ingress = (!principals.is_empty()).then(|| {
        validation(
            names::ingress_validation(&ir.proxy.identity),
            principals.iter().map(|p| (*p).to_owned()).collect(),
            &credentials.trust_bundle_pem,
        )
    });
    let mut secrets = vec![
        v1::Secret {
            name: names::SERVICE_CERT.into(),
            kind: Some(v1::secret::Kind::TlsCertificate(v1::TlsCertificate {
                certificate_chain: credentials.cert_chain_pem.as_bytes().to_vec(),
                private_key: credentials.private_key_pem.as_bytes().to_vec(),
            })),
        },
        validation(
            names::inbound_validation(&ir.proxy.identity),
            vec![],
            &credentials.trust_bundle_pem,
        ),
    ];
    secrets.extend(ingress);
    secrets
}

/// This proxy's certificate, the roots its clients must chain to, and the roots its servers
/// must chain to.
pub fn secrets(ir: &ProxyIr, credentials: &ProxyCredentials) -> Vec<v1::Secret> {
    let mut out = own_secrets(ir, credentials);
    out.push(outbound_root(&credentials.trust_bundle_pem));
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Server-side mTLS of every inbound chain: clients must present a mesh service certificate.
/// fsm-sidecar also requires a SPIFFE workload ID on it (so a proxy's xDS bootstrap certificate,
/// from the same CA, is refused); `match_subject_alt_names` compares exactly, so no prefix is sent.
fn downstream_tls(own: &ServiceIdentity) -> v1::DownstreamTls {
    v1::DownstreamTls {
        certificate_secret: names::SERVICE_CERT.into(),
        validation_secret: names::inbound_validation(own),
        require_client_certificate: true,
    }
}

// === helpers shared by the modules ===

fn socket_address(ip: IpAddr, port: u16) -> v1::SocketAddress {
    v1::SocketAddress {
        ip: ip.to_string(),
        port: u32::from(port),
    }
}

fn duration_ms(ms: u64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(ms / 1000).unwrap_or(i64::MAX),
        // < 1e9: always fits.
        nanos: i32::try_from((ms % 1000) * 1_000_000).unwrap_or(0),
    }
}

fn identity(id: &fsm_ir::ServiceIdentity) -> v1::ServiceIdentity {
    v1::ServiceIdentity {
        service_account: id.service_account.clone(),
        namespace: id.namespace.clone(),
    }
}

fn protocol(p: Protocol) -> v1::Protocol {
    match p {
        Protocol::Http => v1::Protocol::Http,
        Protocol::Grpc => v1::Protocol::Grpc,
        Protocol::Tcp => v1::Protocol::Tcp,
        Protocol::TcpServerFirst => v1::Protocol::TcpServerFirst,
    }
}

fn weighted(backends: &[fsm_ir::WeightedCluster]) -> Vec<v1::WeightedCluster> {
    backends
        .iter()
        .map(|b| v1::WeightedCluster {
            name: b.cluster.to_string(),
            weight: b.weight,
        })
        .collect()
}

fn allowed_sources(allowed: &fsm_ir::AllowedSources) -> v1::AllowedSources {
    match allowed {
        fsm_ir::AllowedSources::Any => v1::AllowedSources {
            any: true,
            identities: vec![],
            source_ip_ranges: vec![],
            principals: vec![],
            principals_from: vec![],
        },
        fsm_ir::AllowedSources::Identities(ids) => {
            let mut ids = ids.clone();
            ids.sort();
            ids.dedup();
            v1::AllowedSources {
                any: false,
                identities: ids.iter().map(identity).collect(),
                source_ip_ranges: vec![],
                principals: vec![],
                principals_from: vec![],
            }
        }
    }
}

/// `<svc>.<ns>.svc.cluster.local:<port>`: how a peer sidecar knows a service port, in the authority
/// of a CONNECT tunnel. The Envoy adapter uses the same form, so the two data planes interoperate.
fn connect_authority(service: &fsm_ir::ServiceRef, port: u16) -> String {
    format!("{}:{port}", service.fqdn())
}

// === clusters ===

fn cluster(c: &fsm_ir::Cluster) -> Result<v1::Cluster, AdapterError> {
    let discovery = match c.kind {
        ClusterKind::Outbound => v1::cluster::Discovery::Eds(v1::EdsDiscovery {}),
        // The application in this pod never moves while the pod lives: no EDS round trip needed.
        ClusterKind::Local => match c.endpoints.as_slice() {
            [app] => v1::cluster::Discovery::StaticLocal(v1::StaticLocal {
                address: Some(socket_address(app.ip, app.port)),
            }),
            other => {
                return Err(AdapterError::Unsupported {
                    field: format!("clusters[{}].endpoints", c.name),
                    reason: format!(
                        "a local cluster reaches exactly one application address, found {}",
                        other.len()
                    ),
                });
            }
        },
    };
    let upstream_protocol = match c.protocol {
        Protocol::Http => v1::UpstreamProtocol::Http1,
        Protocol::Grpc => v1::UpstreamProtocol::Http2,
        Protocol::Tcp | Protocol::TcpServerFirst => v1::UpstreamProtocol::Tcp,
    };
    Ok(v1::Cluster {
        name: c.name.to_string(),
        discovery: Some(discovery),
        lb_policy: v1::LbPolicy::RoundRobin as i32,
        connect_timeout: Some(duration_ms(c.connect_timeout_ms)),
        upstream_protocol: upstream_protocol as i32,
        circuit_breakers: c.circuit_breaker.as_ref().map(circuit_breakers),
        // Only meshed endpoints terminate TLS; the sidecar connects to unmeshed ones in plaintext.
        tls: (c.kind == ClusterKind::Outbound && c.has_meshed_endpoints()).then(|| {
            v1::UpstreamTls {
                // One name in every proxy, so the cluster is shared (see `names::SERVICE_CERT`).
                certificate_secret: names::SERVICE_CERT.into(),
                validation_secret: names::OUTBOUND_ROOT.into(),
                sni: c.service.fqdn(),
                server_identities: c.server_identities().into_iter().map(identity).collect(),
            }
        }),
    })
}

fn circuit_breakers(l: &fsm_ir::CircuitBreaker) -> v1::CircuitBreakers {
    v1::CircuitBreakers {
        max_connections: l.max_connections,
        max_pending_requests: l.max_pending_requests,
        max_requests: l.max_requests,
        max_requests_per_connection: l.max_requests_per_connection,
        max_retries: l.max_retries,
    }
}

fn load_assignment(c: &fsm_ir::Cluster) -> v1::ClusterLoadAssignment {
    let mut endpoints: Vec<&fsm_ir::Endpoint> = c.endpoints.iter().collect();
    endpoints.sort();
    v1::ClusterLoadAssignment {
        cluster_name: c.name.to_string(),
        endpoints: endpoints
            .into_iter()
            .map(|e| v1::Endpoint {
                // A meshed endpoint is reached through its sidecar, so traffic always crosses both.
                address: Some(socket_address(
                    e.ip,
                    if e.meshed { ports::INBOUND } else { e.port },
                )),
                weight: 1,
                meshed: e.meshed,
                identity: e.identity.as_ref().map(identity),
                workload: e.workload.as_ref().map(|w| v1::Workload {
                    namespace: w.namespace.clone(),
                    pod: w.pod.clone(),
                    kind: w.kind.clone(),
                    name: w.name.clone(),
                }),
            })
            .collect(),
    }
}
