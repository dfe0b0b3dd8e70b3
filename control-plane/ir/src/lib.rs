//! Data-plane-neutral per-proxy configuration (the mesh IR).
//!
//! The compiler produces one [`ProxyIr`] per proxy; each adapter (Envoy today, the native sidecar
//! and Pipy later) turns it into its own resources. Nothing here knows about any data plane. The IR
//! is serde data so it is both a golden output of the compiler and a golden input of the adapters.
//! Every collection is sorted so that the same catalog gives byte-identical IR.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

mod log_level;

pub use log_level::{FsmLevel, LogLevel};

/// Ports the sidecar owns inside a pod (FSM's reserved ports).
pub mod ports {
    pub const ADMIN: u16 = 15000;
    pub const OUTBOUND: u16 = 15001;
    pub const INBOUND: u16 = 15003;
    pub const PROMETHEUS: u16 = 15010;
}

/// FSM's names for the listeners and route tables every sidecar has, whatever its data plane.
pub mod names {
    pub const OUTBOUND_LISTENER: &str = "outbound-listener";
    pub const INBOUND_LISTENER: &str = "inbound-listener";
    pub const OUTBOUND_ROUTES: &str = "outbound";
    pub const INBOUND_ROUTES: &str = "inbound";

    use super::ServiceIdentity;

    /// SDS name of a proxy's own certificate and key (its service identity). The same name in
    /// every proxy (a proxy has exactly one identity): the clusters that present it are then
    /// the same resource for every proxy that may reach a service, built and encoded once.
    pub const SERVICE_CERT: &str = "service-cert";

    /// The cluster of egress passthrough (MeshConfig `enableEgress`): a connection's or a
    /// request's original destination, outside the mesh, in plaintext.
    pub const PASSTHROUGH_CLUSTER: &str = "passthrough-outbound";
    /// The virtual host of `outbound` that takes every Host no service has, with egress on.
    pub const PASSTHROUGH_VIRTUAL_HOST: &str = "passthrough";

    /// SDS name of what a proxy checks its clients' certificates against.
    pub fn inbound_validation(identity: &ServiceIdentity) -> String {
        format!(
            "root-cert-for-mtls-inbound:{}/{}",
            identity.namespace, identity.service_account
        )
    }

    /// SDS name of what a proxy checks the certificates of clients outside the mesh against
    /// (IngressBackend `AuthenticatedPrincipal` sources): the mesh's roots and their names.
    pub fn ingress_validation(identity: &ServiceIdentity) -> String {
        format!(
            "root-cert-for-ingress:{}/{}",
            identity.namespace, identity.service_account
        )
    }

    /// SDS name of the roots a proxy checks every upstream sidecar's certificate against. One
    /// secret for all upstream services: which identities each service's servers may have travels
    /// with its clusters. OSM names one secret per service (`root-cert-for-mtls-outbound:<ns>/<svc>`),
    /// each repeating the trust bundle: at 1,000 services that was 40 % of every proxy's
    /// configuration, and a root rotation rewrote a thousand secrets per proxy instead of one.
    pub const OUTBOUND_ROOT: &str = "root-cert-for-mtls-outbound";

    /// The cluster spans are reported to (MeshConfig `observability.tracing`): FSM's name, which
    /// its troubleshooting guide has users look for in a proxy's config dump.
    pub const TRACING_CLUSTER: &str = "pipy-tracing-cluster";
}

/// Everything one proxy needs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyIr {
    pub proxy: ProxyInfo,
    pub mesh: MeshSettings,
    /// Traffic arriving at this proxy's pod, one entry per application (target) port.
    pub inbound: Vec<InboundPort>,
    /// Services this proxy may call, one entry per service port.
    pub outbound: Vec<OutboundService>,
    /// Every upstream cluster referenced by inbound or outbound routes.
    pub clusters: Vec<Cluster>,
    /// Retries this proxy applies to its HTTP requests to some services (Retry policies whose
    /// source is its service account), by service: they change the routes of those services'
    /// ports wherever the proxy's outbound routes are built.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outbound_retries: Vec<OutboundRetry>,
    /// Destinations outside the mesh this proxy may reach (FSM's Egress policies whose sources
    /// include its service account, with `featureFlags.enableEgressPolicy`).
    #[serde(default, skip_serializing_if = "Egress::is_empty")]
    pub egress: Egress,
}

/// See [`ProxyIr::egress`]. Each policy's grants merged: one entry per host and port (HTTP) or
/// per port (HTTPS, TCP), so that two policies allowing the same destination give one route or
/// one filter chain. Anything no entry allows is refused (unless MeshConfig `enableEgress`
/// passes everything through).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Egress {
    /// HTTP by Host, to the host by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http: Vec<EgressHttpHost>,
    /// TLS by the server name (SNI) of the ClientHello, to the connection's original
    /// destination, not terminated.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tls: Vec<EgressTlsPort>,
    /// Connections by destination address, to their original destination.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tcp: Vec<EgressTcpPort>,
}

impl Egress {
    pub fn is_empty(&self) -> bool {
        self.http.is_empty() && self.tls.is_empty() && self.tcp.is_empty()
    }

    /// Whether some connection goes to its original destination (the passthrough cluster).
    pub fn uses_original_destination(&self) -> bool {
        !self.tls.is_empty() || !self.tcp.is_empty()
    }
}

/// HTTP requests to `host` on `port` that an Egress policy allows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EgressHttpHost {
    /// A DNS name (no wildcard: the proxy resolves it to connect).
    pub host: String,
    pub port: u16,
    /// The requests allowed (the policies' HTTPRouteGroup matches); empty: any request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<RouteMatch>,
    /// The per-client limits of the policy's UpstreamTrafficSetting match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreaker>,
}

impl EgressHttpHost {
    /// FSM's name of the cluster of an egress host: `<host>:<port>`.
    pub fn cluster_name(&self) -> ClusterName {
        ClusterName(format!("{}:{}", self.host, self.port))
    }

    /// The Host values its requests carry: `host:port`, and the bare host on port 80 (where
    /// clients leave the port out).
    pub fn domains(&self) -> Vec<String> {
        let mut domains = vec![format!("{}:{}", self.host, self.port)];
        if self.port == 80 {
            domains.push(self.host.clone());
        }
        domains
    }

    /// Its routes: one per allowed match (any request without matches), each to its cluster.
    pub fn routes(&self) -> Vec<HttpRoute> {
        let matches = if self.matches.is_empty() {
            vec![RouteMatch::default()]
        } else {
            self.matches.clone()
        };
        matches
            .into_iter()
            .map(|matches| HttpRoute {
                matches,
                backends: vec![WeightedCluster {
                    cluster: self.cluster_name(),
                    weight: 100,
                }],
                allowed: AllowedSources::Any,
                timeout_ms: None,
                retry: None,
                rate_limit: None,
            })
            .collect()
    }
}

/// TLS connections to `port` whose server name is one of `server_names` (`*.` wildcards allowed).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EgressTlsPort {
    pub port: u16,
    pub server_names: Vec<String>,
}

/// Connections to `port` on an address in `ip_ranges` (CIDRs); empty: any address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EgressTcpPort {
    pub port: u16,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_ranges: Vec<String>,
}

/// See [`ProxyIr::outbound_retries`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OutboundRetry {
    pub service: ServiceRef,
    pub retry: RetryPolicy,
}

/// `ports` with `retries` applied to the routes of the services they name: what a proxy with
/// Retry policies sends its HTTP requests by.
pub fn with_retries<'a>(
    ports: impl IntoIterator<Item = &'a OutboundService>,
    retries: &[OutboundRetry],
) -> Vec<OutboundService> {
    ports
        .into_iter()
        .map(|port| {
            let mut port = port.clone();
            if let Some(r) = retries.iter().find(|r| r.service == port.service) {
                for route in &mut port.routes {
                    route.retry = Some(r.retry.clone());
                    route.timeout_ms = r.retry.route_timeout_ms();
                }
            }
            port
        })
        .collect()
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyInfo {
    pub uuid: String,
    pub identity: ServiceIdentity,
    pub pod: String,
    pub namespace: String,
    pub pod_ip: IpAddr,
    /// The pod's traffic is redirected to the proxy (FSM's `fsm-init` iptables rules): its
    /// listeners take redirected connections on every address by their original destination.
    /// Otherwise applications name the proxy (explicit mode, the demo's loopback pods).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub transparent: bool,
    /// What the pod's `fsm-init` rules leave alone (transparent mode): connections that never
    /// reach the proxy, so that its listeners have no chains for them.
    #[serde(default, skip_serializing_if = "Bypass::is_empty")]
    pub bypass: Bypass,
}

/// MeshConfig's and the pod's interception lists, as `fsm-init` applies them (see
/// `fsm_injector::Interception`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Bypass {
    /// Outbound connections to these ports are not redirected.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outbound_ports: Vec<u16>,
    /// Nor those to these address ranges (CIDRs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outbound_ip_ranges: Vec<String>,
    /// When not empty, only outbound connections to these ranges are redirected.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outbound_ip_inclusions: Vec<String>,
    /// Inbound connections to these ports reach the application directly.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inbound_ports: Vec<u16>,
}

impl Bypass {
    pub fn is_empty(&self) -> bool {
        self.outbound_ports.is_empty()
            && self.outbound_ip_ranges.is_empty()
            && self.outbound_ip_inclusions.is_empty()
            && self.inbound_ports.is_empty()
    }

    /// Whether outbound connections to `port` on any address of `ranges` reach the proxy: the
    /// port is not excluded, no range lies within an excluded one, and, with inclusions, each
    /// lies within one of them. Empty `ranges` (any address): only the port counts.
    pub fn redirects_outbound(&self, port: u16, ranges: &[String]) -> bool {
        if self.outbound_ports.contains(&port) {
            return false;
        }
        let within = |range: &str, of: &[String]| of.iter().any(|o| cidr_within(range, o));
        ranges.iter().all(|r| {
            !within(r, &self.outbound_ip_ranges)
                && (self.outbound_ip_inclusions.is_empty()
                    || within(r, &self.outbound_ip_inclusions))
        })
    }

    /// Whether inbound connections to the application port `port` reach the proxy.
    pub fn redirects_inbound(&self, port: u16) -> bool {
        !self.inbound_ports.contains(&port)
    }
}

/// Whether the CIDR `inner` lies within the CIDR `outer` (false when either is malformed or
/// they are of different families).
fn cidr_within(inner: &str, outer: &str) -> bool {
    fn parse(cidr: &str) -> Option<(u128, u32, bool)> {
        let (ip, len) = cidr.split_once('/')?;
        let len: u32 = len.parse().ok()?;
        match ip.parse::<IpAddr>().ok()? {
            IpAddr::V4(v4) if len <= 32 => Some((u128::from(u32::from(v4)) << 96, len, false)),
            IpAddr::V6(v6) if len <= 128 => Some((u128::from(v6), len, true)),
            _ => None,
        }
    }
    let (Some((inner_ip, inner_len, inner_v6)), Some((outer_ip, outer_len, outer_v6))) =
        (parse(inner), parse(outer))
    else {
        return false;
    };
    if inner_v6 != outer_v6 || inner_len < outer_len {
        return false;
    }
    // IPv4 sits in the top 32 bits, so both families mask from the top.
    let mask = u128::MAX.checked_shl(128 - outer_len).unwrap_or(0);
    inner_ip & mask == outer_ip & mask
}

/// Mesh-wide settings that shape every proxy's configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshSettings {
    pub permissive_traffic_policy_mode: bool,
    pub enable_egress: bool,
    pub trust_domain: String,
    /// MeshConfig `observability.tracing`, when enabled: every sidecar reports spans of the HTTP
    /// requests it proxies (Zipkin v2, B3 propagation) to one collector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracing: Option<Tracing>,
    /// MeshConfig `spec.sidecar.logLevel`: what fsm-sidecar logs, set live. `None` (MeshConfig's
    /// is empty): the sidecar's own `--log-level`. Envoy's level cannot be set over xDS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecar_log_level: Option<LogLevel>,
}

/// Where and how often sidecars report spans. One for the whole mesh; every proxy carries it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Tracing {
    /// The collector's host: a DNS name (`jaeger.fsm-system.svc.cluster.local`) or an IP address.
    pub address: String,
    pub port: u16,
    /// The HTTP path spans are POSTed to, as a JSON array (Zipkin v2): `/api/v2/spans`.
    pub endpoint: String,
    /// Requests that start a trace, per million (MeshConfig `sampledFraction` × 10⁶; 1,000,000
    /// when unset). A request that arrives with a sampling decision (B3) keeps it.
    pub sampled_per_million: u32,
}

impl Tracing {
    /// Every request is sampled.
    pub const ALL: u32 = 1_000_000;

    /// The first problem found, as (field of this struct in the IR's YAML, reason).
    pub fn problem(&self) -> Option<(&'static str, String)> {
        let host_ok = !self.address.is_empty()
            && !self.address.contains("://")
            && !self
                .address
                .chars()
                .any(|c| c.is_whitespace() || c == '/' || c == '@');
        if !host_ok {
            return Some((
                "address",
                format!(
                    "{:?} is not a host name or IP address (no scheme, path or port)",
                    self.address
                ),
            ));
        }
        if self.port == 0 {
            return Some(("port", "must be between 1 and 65535".into()));
        }
        if !self.endpoint.starts_with('/') || self.endpoint.chars().any(char::is_whitespace) {
            return Some((
                "endpoint",
                format!(
                    "{:?} is not an absolute path such as \"/api/v2/spans\"",
                    self.endpoint
                ),
            ));
        }
        if self.sampled_per_million > Self::ALL {
            return Some((
                "sampledPerMillion",
                format!(
                    "{} is more than 1000000 (all requests)",
                    self.sampled_per_million
                ),
            ));
        }
        None
    }
}

/// `<sa>.<ns>`; its certificate CN is `<sa>.<ns>.<trust-domain>`. The mesh-wide type, shared
/// with the certificate manager and the controller.
pub use fsm_identity::ServiceIdentity;

/// The mTLS material of one proxy, issued by the mesh CA for its service identity.
///
/// Not part of [`ProxyIr`]: certificates are not catalog data, and keeping them out keeps the
/// compiler a pure function of the catalog and the IR free of private keys. The controller hands
/// it to the adapters beside the IR.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyCredentials {
    /// PEM, leaf first.
    pub cert_chain_pem: String,
    /// PEM (PKCS#8). Never printed: `Debug` redacts it.
    pub private_key_pem: String,
    /// PEM roots peers' certificates must chain to (two during a root rotation).
    pub trust_bundle_pem: String,
}

impl fmt::Debug for ProxyCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProxyCredentials")
            .field("cert_chain_pem", &self.cert_chain_pem)
            .field("private_key_pem", &"<redacted>")
            .field("trust_bundle_pem", &self.trust_bundle_pem)
            .finish()
    }
}

/// A Kubernetes Service reference.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ServiceRef {
    pub namespace: String,
    pub name: String,
}

impl ServiceRef {
    pub fn fqdn(&self) -> String {
        format!("{}.{}.svc.cluster.local", self.name, self.namespace)
    }
}

impl fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// How a port's bytes are understood, from the Service port's `appProtocol`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    Http,
    Grpc,
    Tcp,
    TcpServerFirst,
}

impl Protocol {
    pub fn is_http(self) -> bool {
        matches!(self, Protocol::Http | Protocol::Grpc)
    }
}

/// Cluster names follow FSM: `ns/svc|port` outbound, `ns/svc|port|local` inbound.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ClusterName(pub String);

impl ClusterName {
    pub fn outbound(service: &ServiceRef, port: u16) -> Self {
        ClusterName(format!("{service}|{port}"))
    }
    pub fn local(service: &ServiceRef, port: u16) -> Self {
        ClusterName(format!("{service}|{port}|local"))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ClusterName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Traffic to one application port of this proxy's pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InboundPort {
    /// The container port the application listens on.
    pub target_port: u16,
    pub protocol: Protocol,
    /// Services that expose this port (usually one).
    pub services: Vec<InboundService>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InboundService {
    pub service: ServiceRef,
    pub port: u16,
    /// Host names (and `host:port` forms) clients use for this service.
    pub hosts: Vec<String>,
    /// L7 routes for HTTP ports; empty for TCP.
    pub routes: Vec<HttpRoute>,
    /// Who may open TCP connections (for TCP ports).
    pub allowed: AllowedSources,
    pub local_cluster: ClusterName,
    /// This pod's limit on what the service's clients send it (FSM's UpstreamTrafficSetting
    /// local rate limit): requests for an HTTP port (`rateLimit.local.http`, replaced by a
    /// route's own [`HttpRoute::rate_limit`]), connections for a TCP port
    /// (`rateLimit.local.tcp`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<LocalRateLimit>,
    /// Clients outside the mesh this port admits, by address (CIDRs): FSM's IngressBackend
    /// `IPRange` sources and the endpoints of its `Service` sources. They send plaintext HTTP,
    /// which the proxy otherwise refuses (its inbound port takes mTLS only). Empty: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress_sources: Vec<String>,
    /// Clients outside the mesh this port admits over TLS, by a subject alternative name (DNS
    /// name or URI) of their certificate, which must chain to the mesh's roots: FSM's
    /// IngressBackend `AuthenticatedPrincipal` sources of an `https` backend. They connect to
    /// the port itself, which the pod's rules redirect to the proxy (transparent mode only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress_principals: Vec<String>,
    /// Clients outside the mesh this port admits over TLS without a client certificate, by
    /// address (CIDRs): FSM's `https` backends with `tls.skipClientCertValidation`, whose
    /// `IPRange` and `Service` sources alone decide (transparent mode only, as above).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress_tls_sources: Vec<String>,
    /// Clients outside the mesh this port admits over TLS only when their certificate and their
    /// address both match: FSM's `https` backends whose IngressBackend names
    /// `AuthenticatedPrincipal` sources beside `IPRange` or `Service` ones (FSM's documented
    /// ingress set-up: the ingress controller's Service and its certificate's name). One entry
    /// per such policy, sorted (transparent mode only, as above).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress_principals_from: Vec<PrincipalsFrom>,
}

/// Certificate names admitted from some addresses only (see
/// [`InboundService::ingress_principals_from`]): a client must present one of `principals`
/// (subject alternative names, as in [`InboundService::ingress_principals`]) and connect from
/// one of `sources` (CIDRs). Empty `sources` admit no one.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PrincipalsFrom {
    pub principals: Vec<String>,
    pub sources: Vec<String>,
}

/// A token bucket in each instance of a service (Envoy's and FSM's local rate limit): it starts
/// full; a request or connection takes a token; every `fill_interval_ms`, `tokens_per_fill`
/// tokens are added up to `max_tokens`. With none left, a request gets `status` and
/// `response_headers`, a connection is closed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LocalRateLimit {
    /// The rate plus the burst allowed on top of it.
    pub max_tokens: u32,
    pub tokens_per_fill: u32,
    pub fill_interval_ms: u64,
    /// 400-599 (FSM's default 429).
    pub status: u16,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub response_headers: Vec<ResponseHeader>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResponseHeader {
    pub name: String,
    pub value: String,
}

/// What every proxy that may reach one service gets for it, whichever proxy it is: the service's
/// ports and its outbound clusters (with their endpoints). The compiler builds it once per
/// service and shares it between proxies; a proxy's [`ProxyIr`] lists the entries of every
/// service it may reach.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceOutbound {
    pub service: ServiceRef,
    /// One entry per service port, in the Service's port order.
    pub ports: Vec<OutboundService>,
    /// The outbound cluster of each port, by name.
    pub clusters: Vec<Cluster>,
}

/// How much of what a proxy may reach its [`ProxyIr`] lists: a proxy's own resources (its
/// listeners) need all of it in some data planes and only the TCP services in others, while the
/// shared resources of every service are built once from the compiler's view.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum OutboundDetail {
    /// The non-HTTP service ports and their clusters only.
    TcpOnly,
    /// Every service port and cluster.
    All,
}

/// One service port this proxy may reach.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OutboundService {
    pub service: ServiceRef,
    pub port: u16,
    pub protocol: Protocol,
    /// `DestinationIPRanges`: the ClusterIP(s) of the service as `/32` (or `/128`).
    pub destination_ip_ranges: Vec<String>,
    /// FSM's `HttpHostPort2Service` keys: `svc`, `svc.ns`, … each also with `:port`.
    pub hosts: Vec<String>,
    /// L7 routes (HTTP ports).
    pub routes: Vec<HttpRoute>,
    /// Weighted backends for TCP ports.
    pub tcp_backends: Vec<WeightedCluster>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRoute {
    pub matches: RouteMatch,
    pub backends: Vec<WeightedCluster>,
    pub allowed: AllowedSources,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
    /// Inbound only: the route's own rate limit, replacing the service's
    /// ([`InboundService::rate_limit`]) for the requests it takes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<LocalRateLimit>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteMatch {
    pub path: PathMatch,
    /// Empty means any method.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum PathMatch {
    Exact(String),
    Prefix(String),
    /// RE2-compatible regular expression matched against the whole path.
    Regex(String),
}

impl Default for PathMatch {
    /// FSM's permissive wildcard route `.*`.
    fn default() -> Self {
        PathMatch::Regex(".*".to_string())
    }
}

/// Which clients an inbound route or port admits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AllowedSources {
    /// Permissive mode: any client.
    Any,
    /// Only these identities; empty denies everyone (SMI mode without a matching TrafficTarget).
    Identities(Vec<ServiceIdentity>),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WeightedCluster {
    pub cluster: ClusterName,
    pub weight: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RetryPolicy {
    pub retry_on: Vec<String>,
    pub num_retries: u32,
    pub per_try_timeout_ms: Option<u64>,
    /// Base B of the back-off before retry N: random in [0, (2^N - 1) * B], at most 10 * B
    /// (Envoy's and FSM's `retryBackoffBaseInterval`). Unset: the data plane's default, 25 ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_base_interval_ms: Option<u64>,
}

/// The `retryOn` conditions every data plane implements (Envoy's names, which FSM's Retry uses):
/// the compiler passes on these only.
pub const RETRY_ON_CONDITIONS: [&str; 11] = [
    "5xx",
    "gateway-error",
    "reset",
    "connect-failure",
    "retriable-4xx",
    "refused-stream",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

impl RetryPolicy {
    /// How long the whole request may take with every retry the policy allows: each attempt's
    /// `per_try_timeout_ms` plus the longest back-off before each retry. Without a per-try
    /// timeout nothing bounds an attempt, so the route gets no timeout either (FSM: the per-try
    /// timeout defaults to "the global route timeout", which no setting defines).
    pub fn route_timeout_ms(&self) -> Option<u64> {
        let per_try = self.per_try_timeout_ms?;
        let base = self.backoff_base_interval_ms.unwrap_or(25);
        let backoffs: u64 = (1..=self.num_retries.min(64))
            .map(|n| {
                let factor = 1u64.checked_shl(n).unwrap_or(u64::MAX).saturating_sub(1);
                base.saturating_mul(factor).min(base.saturating_mul(10))
            })
            .fold(0u64, u64::saturating_add);
        Some(
            per_try
                .saturating_mul(u64::from(self.num_retries) + 1)
                .saturating_add(backoffs),
        )
    }

    /// The `retryOn` conditions, each once, in order: an entry may be FSM's one
    /// comma-separated string, and several policies' lists are joined.
    pub fn conditions(&self) -> Vec<&str> {
        let mut conditions: Vec<&str> = Vec::new();
        for condition in self
            .retry_on
            .iter()
            .flat_map(|c| c.split(','))
            .map(str::trim)
            .filter(|c| !c.is_empty())
        {
            if !conditions.contains(&condition) {
                conditions.push(condition);
            }
        }
        conditions
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Cluster {
    pub name: ClusterName,
    pub kind: ClusterKind,
    pub service: ServiceRef,
    pub protocol: Protocol,
    pub endpoints: Vec<Endpoint>,
    pub connect_timeout_ms: u64,
    /// Outbound only: the per-client limits of the service's UpstreamTrafficSetting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreaker>,
}

/// Per-client limits on traffic to one upstream service (FSM's UpstreamTrafficSetting
/// `connectionSettings`): each client sidecar counts for itself and, over a limit, fails at once
/// (503, or a closed connection) instead of queueing. Unset: no limit.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CircuitBreaker {
    /// `tcp.maxConnections`: TCP and HTTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests_per_connection: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
}

impl Cluster {
    /// Whether some endpoint is reached through its sidecar, hence over mTLS.
    pub fn has_meshed_endpoints(&self) -> bool {
        self.endpoints.iter().any(|e| e.meshed)
    }

    /// Identities the sidecars of this cluster's endpoints may present (sorted, deduplicated):
    /// what a client checks the server certificate against.
    pub fn server_identities(&self) -> Vec<&ServiceIdentity> {
        let set: std::collections::BTreeSet<&ServiceIdentity> = self
            .endpoints
            .iter()
            .filter(|e| e.meshed)
            .filter_map(|e| e.identity.as_ref())
            .collect();
        set.into_iter().collect()
    }

    /// What a data plane's cluster is made of when its endpoints come by EDS (outbound): all
    /// but the endpoints, of which only whether some are meshed and the identities they
    /// present count; the addresses go in the ClusterLoadAssignment. Adapters hold to it (the
    /// controller's tests check that equal shapes make equal clusters in each), so an endpoint
    /// change that leaves the shape as it was encodes no cluster again.
    pub fn outbound_shape(&self) -> OutboundClusterShape<'_> {
        OutboundClusterShape {
            name: &self.name,
            kind: self.kind,
            service: &self.service,
            protocol: self.protocol,
            connect_timeout_ms: self.connect_timeout_ms,
            circuit_breaker: self.circuit_breaker.as_ref(),
            meshed: self.has_meshed_endpoints(),
            server_identities: self.server_identities(),
        }
    }
}

/// See [`Cluster::outbound_shape`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboundClusterShape<'a> {
    pub name: &'a ClusterName,
    pub kind: ClusterKind,
    pub service: &'a ServiceRef,
    pub protocol: Protocol,
    pub connect_timeout_ms: u64,
    pub circuit_breaker: Option<&'a CircuitBreaker>,
    pub meshed: bool,
    pub server_identities: Vec<&'a ServiceIdentity>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ClusterKind {
    /// To a service's endpoints, through their sidecars when they are meshed.
    Outbound,
    /// From this proxy to the application in its own pod.
    Local,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    pub ip: IpAddr,
    pub port: u16,
    /// The endpoint's pod runs a sidecar: traffic must enter through that sidecar's inbound
    /// listener rather than reach the application directly.
    pub meshed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<ServiceIdentity>,
    /// The pod behind the address and its workload, when known: the `destination_*` labels of
    /// FSM's request metrics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<WorkloadRef>,
}

/// A pod and the workload (Deployment, StatefulSet, …) that runs it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadRef {
    pub namespace: String,
    pub pod: String,
    /// `Deployment`, `StatefulSet`, `DaemonSet`, `Job`, … or `Pod` for a pod nobody owns.
    pub kind: String,
    pub name: String,
}

/// Domains already given to a virtual host of one route configuration: a domain belongs to the
/// first virtual host that claims it (Envoy refuses a configuration naming one twice, and a
/// Host must pick one virtual host in every data plane).
#[derive(Default)]
pub struct Domains(std::collections::BTreeSet<String>);

impl Domains {
    /// Those of `hosts` no earlier virtual host claimed, now claimed.
    pub fn claim(&mut self, hosts: &[String]) -> Vec<String> {
        hosts
            .iter()
            .filter(|h| self.0.insert((*h).clone()))
            .cloned()
            .collect()
    }
}

/// An IR that cannot be turned into data-plane resources.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IrError {
    #[error("route references unknown cluster {0}")]
    UnknownCluster(ClusterName),
    #[error("duplicate cluster {0}")]
    DuplicateCluster(ClusterName),
    #[error("{0} has weighted backends whose weights sum to 0")]
    ZeroWeights(String),
    #[error("outbound {service}|{port}: {reason}")]
    InvalidOutbound {
        service: ServiceRef,
        port: u16,
        reason: &'static str,
    },
    #[error("mesh.tracing.{field}: {reason}")]
    InvalidTracing { field: &'static str, reason: String },
}

impl InboundPort {
    /// The addresses its services admit over TLS without a client certificate
    /// ([`InboundService::ingress_tls_sources`]), each once, sorted.
    pub fn ingress_tls_sources(&self) -> std::collections::BTreeSet<&str> {
        self.services
            .iter()
            .flat_map(|s| s.ingress_tls_sources.iter().map(String::as_str))
            .collect()
    }

    /// The certificate names its services admit over TLS from outside the mesh, from any
    /// address ([`InboundService::ingress_principals`]) or some
    /// ([`InboundService::ingress_principals_from`]), each once, sorted: what the TLS handshake
    /// requires before the routes check the rest.
    pub fn ingress_principals(&self) -> std::collections::BTreeSet<&str> {
        self.services
            .iter()
            .flat_map(|s| {
                s.ingress_principals.iter().chain(
                    s.ingress_principals_from
                        .iter()
                        .flat_map(|from| &from.principals),
                )
            })
            .map(String::as_str)
            .collect()
    }
}

/// How an explicit-mode proxy serves one outbound TCP service port (see
/// [`ProxyIr::explicit_tcp`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExplicitTcp<'a> {
    /// A listener on `<pod-ip>:<port>`.
    Listener(&'a OutboundService),
    /// The port is the application's or the sidecar's own: no listener.
    PortTaken(&'a OutboundService),
    /// An earlier service (in outbound order) has the port: no listener.
    PortServes {
        service: &'a OutboundService,
        first: &'a OutboundService,
    },
}

impl ProxyIr {
    /// Explicit mode: applications reach a TCP service at `<pod-ip>:<service port>`, so a port
    /// serves one service, the first in outbound order, and only if neither the application nor
    /// the sidecar listens there. A transparent proxy binds none (its outbound listener takes
    /// every redirected connection), so this is empty for it.
    pub fn explicit_tcp(&self) -> Vec<ExplicitTcp<'_>> {
        if self.proxy.transparent {
            return Vec::new();
        }
        let taken: BTreeSet<u16> = self.inbound.iter().map(|p| p.target_port).collect();
        let mut bound: BTreeMap<u16, &OutboundService> = BTreeMap::new();
        self.outbound
            .iter()
            .filter(|s| !s.protocol.is_http())
            .map(|svc| {
                if taken.contains(&svc.port)
                    || (ports::ADMIN..=ports::PROMETHEUS).contains(&svc.port)
                {
                    ExplicitTcp::PortTaken(svc)
                } else if let Some(first) = bound.get(&svc.port) {
                    ExplicitTcp::PortServes {
                        service: svc,
                        first,
                    }
                } else {
                    bound.insert(svc.port, svc);
                    ExplicitTcp::Listener(svc)
                }
            })
            .collect()
    }

    /// The HTTP service ports of this pod that admit clients outside the mesh, by address
    /// ([`InboundService::ingress_sources`]) or certificate ([`InboundService::ingress_principals`]),
    /// in inbound order.
    pub fn ingress_services(&self) -> impl Iterator<Item = &InboundService> {
        self.inbound
            .iter()
            .filter(|p| p.protocol.is_http())
            .flat_map(|p| p.services.iter())
            .filter(|s| {
                !s.ingress_sources.is_empty()
                    || !s.ingress_principals.is_empty()
                    || !s.ingress_tls_sources.is_empty()
                    || !s.ingress_principals_from.is_empty()
            })
    }

    /// The proxy's outbound entries and clusters grouped by service, as the compiler's view
    /// shares them.
    pub fn service_outbounds(&self) -> Vec<ServiceOutbound> {
        let mut services: BTreeMap<&ServiceRef, ServiceOutbound> = BTreeMap::new();
        let entry = |service: &ServiceRef| ServiceOutbound {
            service: service.clone(),
            ports: vec![],
            clusters: vec![],
        };
        for port in &self.outbound {
            services
                .entry(&port.service)
                .or_insert_with(|| entry(&port.service))
                .ports
                .push(port.clone());
        }
        for cluster in self
            .clusters
            .iter()
            .filter(|c| c.kind == ClusterKind::Outbound)
        {
            services
                .entry(&cluster.service)
                .or_insert_with(|| entry(&cluster.service))
                .clusters
                .push(cluster.clone());
        }
        services.into_values().collect()
    }

    /// Checks the invariants adapters rely on: every referenced cluster exists exactly once and
    /// every set of weighted backends can carry traffic.
    pub fn validate(&self) -> Result<(), IrError> {
        if let Some((field, reason)) = self.mesh.tracing.as_ref().and_then(Tracing::problem) {
            return Err(IrError::InvalidTracing { field, reason });
        }
        let mut names = std::collections::BTreeSet::new();
        for cluster in &self.clusters {
            if !names.insert(&cluster.name) {
                return Err(IrError::DuplicateCluster(cluster.name.clone()));
            }
        }
        let check = |owner: String, backends: &[WeightedCluster]| -> Result<(), IrError> {
            for backend in backends {
                if !names.contains(&backend.cluster) {
                    return Err(IrError::UnknownCluster(backend.cluster.clone()));
                }
            }
            if !backends.is_empty()
                && backends.iter().map(|b| u64::from(b.weight)).sum::<u64>() == 0
            {
                return Err(IrError::ZeroWeights(owner));
            }
            Ok(())
        };
        for out in &self.outbound {
            if out.protocol.is_http() {
                if out.routes.is_empty() {
                    return Err(IrError::InvalidOutbound {
                        service: out.service.clone(),
                        port: out.port,
                        reason: "HTTP port without routes",
                    });
                }
            } else if out.tcp_backends.is_empty() {
                return Err(IrError::InvalidOutbound {
                    service: out.service.clone(),
                    port: out.port,
                    reason: "TCP port without backends",
                });
            }
            for route in &out.routes {
                check(
                    format!("route of {}|{}", out.service, out.port),
                    &route.backends,
                )?;
            }
            check(format!("{}|{}", out.service, out.port), &out.tcp_backends)?;
        }
        for port in &self.inbound {
            for svc in &port.services {
                if !names.contains(&svc.local_cluster) {
                    return Err(IrError::UnknownCluster(svc.local_cluster.clone()));
                }
                for route in &svc.routes {
                    check(
                        format!("inbound route of {}|{}", svc.service, svc.port),
                        &route.backends,
                    )?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc() -> ServiceRef {
        ServiceRef {
            namespace: "app".into(),
            name: "httpbin".into(),
        }
    }

    fn ir(clusters: Vec<Cluster>, backends: Vec<WeightedCluster>) -> ProxyIr {
        ProxyIr {
            proxy: ProxyInfo {
                uuid: "u".into(),
                identity: ServiceIdentity {
                    service_account: "sa".into(),
                    namespace: "app".into(),
                },
                pod: "p".into(),
                namespace: "app".into(),
                pod_ip: "127.0.0.1".parse().expect("ip"),
                transparent: false,
                bypass: Default::default(),
            },
            mesh: MeshSettings {
                permissive_traffic_policy_mode: true,
                enable_egress: false,
                trust_domain: "cluster.local".into(),
                tracing: None,
                sidecar_log_level: None,
            },
            inbound: vec![],
            outbound: vec![OutboundService {
                service: svc(),
                port: 14001,
                protocol: Protocol::Tcp,
                destination_ip_ranges: vec![],
                hosts: vec![],
                routes: vec![],
                tcp_backends: backends,
            }],
            clusters,
            outbound_retries: vec![],
            egress: Default::default(),
        }
    }

    fn cluster(name: &str) -> Cluster {
        Cluster {
            name: ClusterName(name.into()),
            kind: ClusterKind::Outbound,
            service: svc(),
            protocol: Protocol::Tcp,
            endpoints: vec![],
            connect_timeout_ms: 1000,
            circuit_breaker: None,
        }
    }

    fn backend(name: &str, weight: u32) -> WeightedCluster {
        WeightedCluster {
            cluster: ClusterName(name.into()),
            weight,
        }
    }

    #[test]
    fn a_retried_route_may_take_every_attempt_and_back_off() {
        let retry = RetryPolicy {
            retry_on: vec!["5xx".into()],
            num_retries: 5,
            per_try_timeout_ms: Some(4000),
            backoff_base_interval_ms: Some(2),
        };
        // FSM's second example: 6 attempts of 4 s, back-offs capped at 2, 6, 14, 20, 20 ms.
        assert_eq!(
            retry.route_timeout_ms(),
            Some(6 * 4000 + 2 + 6 + 14 + 20 + 20)
        );
        let unbounded = RetryPolicy {
            per_try_timeout_ms: None,
            ..retry.clone()
        };
        assert_eq!(unbounded.route_timeout_ms(), None);
        let defaults = RetryPolicy {
            num_retries: 1,
            backoff_base_interval_ms: None,
            ..retry
        };
        assert_eq!(defaults.route_timeout_ms(), Some(2 * 4000 + 25));
        let huge = RetryPolicy {
            num_retries: u32::MAX,
            per_try_timeout_ms: Some(u64::MAX),
            ..defaults
        };
        assert_eq!(huge.route_timeout_ms(), Some(u64::MAX));
    }

    #[test]
    fn with_retries_gives_the_retried_routes_their_timeout() {
        let mut port = ir(vec![cluster("a")], vec![backend("a", 100)]).outbound[0].clone();
        port.protocol = Protocol::Http;
        port.routes = vec![HttpRoute {
            matches: RouteMatch::default(),
            backends: vec![backend("a", 100)],
            allowed: AllowedSources::Any,
            timeout_ms: None,
            retry: None,
            rate_limit: None,
        }];
        let retry = RetryPolicy {
            retry_on: vec!["5xx".into()],
            num_retries: 1,
            per_try_timeout_ms: Some(1000),
            backoff_base_interval_ms: None,
        };
        let retried = with_retries(
            [&port],
            &[OutboundRetry {
                service: svc(),
                retry: retry.clone(),
            }],
        );
        assert_eq!(retried[0].routes[0].retry.as_ref(), Some(&retry));
        assert_eq!(retried[0].routes[0].timeout_ms, Some(2025));
        let untouched = with_retries([&port], &[]);
        assert_eq!(untouched[0].routes[0].timeout_ms, None);
    }

    #[test]
    fn cluster_names_follow_fsm() {
        assert_eq!(
            ClusterName::outbound(&svc(), 14001).as_str(),
            "app/httpbin|14001"
        );
        assert_eq!(
            ClusterName::local(&svc(), 14001).as_str(),
            "app/httpbin|14001|local"
        );
        assert_eq!(svc().fqdn(), "httpbin.app.svc.cluster.local");
    }

    #[test]
    fn bypass_follows_the_interception_lists() {
        let ranges = |r: &[&str]| r.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let bypass = Bypass {
            outbound_ports: vec![9000],
            outbound_ip_ranges: ranges(&["10.96.5.0/24", "fd00::/64"]),
            outbound_ip_inclusions: vec![],
            inbound_ports: vec![8080],
        };
        assert!(!bypass.redirects_outbound(9000, &ranges(&["10.96.0.1/32"])));
        assert!(!bypass.redirects_outbound(80, &ranges(&["10.96.5.7/32"])));
        assert!(!bypass.redirects_outbound(80, &ranges(&["fd00::7/128"])));
        assert!(bypass.redirects_outbound(80, &ranges(&["10.96.6.7/32"])));
        assert!(
            bypass.redirects_outbound(80, &ranges(&["10.96.0.0/16"])),
            "a wider range is only partly excluded"
        );
        assert!(bypass.redirects_outbound(80, &[]));
        assert!(!bypass.redirects_inbound(8080) && bypass.redirects_inbound(14001));
        let only = Bypass {
            outbound_ip_inclusions: ranges(&["10.96.0.0/12"]),
            ..Default::default()
        };
        assert!(only.redirects_outbound(80, &ranges(&["10.96.5.7/32"])));
        assert!(!only.redirects_outbound(80, &ranges(&["192.0.2.1/32"])));
        assert!(!only.redirects_outbound(80, &ranges(&["10.96.5.7/32", "192.0.2.1/32"])));
        assert!(!cidr_within("10.0.0.1/32", "nonsense") && !cidr_within("::1/128", "0.0.0.0/0"));
        assert!(cidr_within("10.0.0.1/32", "0.0.0.0/0") && cidr_within("::1/128", "::/0"));
    }

    #[test]
    fn validate_table() {
        let cases: Vec<(&str, ProxyIr, Result<(), IrError>)> = vec![
            (
                "valid",
                ir(vec![cluster("a")], vec![backend("a", 100)]),
                Ok(()),
            ),
            (
                "unknown cluster",
                ir(vec![cluster("a")], vec![backend("b", 100)]),
                Err(IrError::UnknownCluster(ClusterName("b".into()))),
            ),
            (
                "duplicate cluster",
                ir(vec![cluster("a"), cluster("a")], vec![backend("a", 1)]),
                Err(IrError::DuplicateCluster(ClusterName("a".into()))),
            ),
            (
                "zero weights",
                ir(vec![cluster("a")], vec![backend("a", 0)]),
                Err(IrError::ZeroWeights("app/httpbin|14001".into())),
            ),
            (
                "tcp without backends",
                ir(vec![cluster("a")], vec![]),
                Err(IrError::InvalidOutbound {
                    service: svc(),
                    port: 14001,
                    reason: "TCP port without backends",
                }),
            ),
        ];
        for (name, ir, expected) in cases {
            assert_eq!(ir.validate(), expected, "{name}");
        }
    }

    #[test]
    fn tracing_table() {
        let good = Tracing {
            address: "jaeger.fsm-system.svc.cluster.local".into(),
            port: 9411,
            endpoint: "/api/v2/spans".into(),
            sampled_per_million: Tracing::ALL,
        };
        let with = |f: &dyn Fn(&mut Tracing)| {
            let mut t = good.clone();
            f(&mut t);
            let mut ir = ir(vec![cluster("a")], vec![backend("a", 100)]);
            ir.mesh.tracing = Some(t);
            ir.validate().map_err(|e| e.to_string())
        };
        assert_eq!(with(&|_| {}), Ok(()));
        assert_eq!(with(&|t| t.address = "127.0.0.1".into()), Ok(()));
        assert_eq!(with(&|t| t.address = "::1".into()), Ok(()));
        assert_eq!(with(&|t| t.sampled_per_million = 0), Ok(()));
        for (name, change, field) in [
            (
                "empty address",
                &(|t: &mut Tracing| t.address.clear()) as &dyn Fn(&mut Tracing),
                "address",
            ),
            (
                "a URL",
                &|t: &mut Tracing| t.address = "http://jaeger".into(),
                "address",
            ),
            (
                "a path",
                &|t: &mut Tracing| t.address = "jaeger/api".into(),
                "address",
            ),
            (
                "a space",
                &|t: &mut Tracing| t.address = "jae ger".into(),
                "address",
            ),
            ("port 0", &|t: &mut Tracing| t.port = 0, "port"),
            (
                "relative endpoint",
                &|t: &mut Tracing| t.endpoint = "api/v2/spans".into(),
                "endpoint",
            ),
            (
                "empty endpoint",
                &|t: &mut Tracing| t.endpoint.clear(),
                "endpoint",
            ),
            (
                "over all",
                &|t: &mut Tracing| t.sampled_per_million = Tracing::ALL + 1,
                "sampledPerMillion",
            ),
        ] {
            let got = with(change).expect_err(name);
            assert!(
                got.starts_with(&format!("mesh.tracing.{field}: ")),
                "{name}: {got}"
            );
        }
    }
}
