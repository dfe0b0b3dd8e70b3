//! The running configuration: native protos converted into validated, immutable domain types.
//!
//! A [`Config`] is built from a whole [`ResourceSet`] and swapped in atomically; nothing in it is
//! ever mutated afterwards (load-balancer cursors are atomics). Every error names the resource
//! and the field, because it becomes the NACK's `error_detail` an operator reads.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use fsm_dataplane_proto::{type_url, v1};
use fsm_sidecar_xds::ResourceSet;
use prost::Message;
use regex::Regex;
use tracing::level_filters::LevelFilter;

use crate::metrics::Workload;
use crate::ratelimit::{BucketKey, Scope, Settings};
use crate::tls::{DownstreamTls, Identity, Peer, Secrets, UpstreamTls};

/// A rejected resource set: the NACK's `error_detail`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

#[derive(Debug, Default)]
pub struct Config {
    pub listeners: BTreeMap<Arc<str>, Arc<Listener>>,
    pub routes: HashMap<Arc<str>, Arc<RouteTable>>,
    pub clusters: HashMap<Arc<str>, Arc<Cluster>>,
    /// `Runtime.log_level` of the resource named `runtime`: the sidecar's default log level.
    /// `None` (unspecified, or no such resource): its `--log-level` flag's filter.
    pub log_level: Option<LevelFilter>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Inbound,
    Outbound,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Listener {
    pub name: Arc<str>,
    pub addr: SocketAddr,
    pub direction: Direction,
    pub chains: Vec<Chain>,
    /// Set: its HTTP requests are traced (see [`crate::trace`]).
    pub tracing: Option<Arc<TracingConfig>>,
}

/// `Listener.tracing`: how the requests of one listener are traced.
#[derive(Debug, PartialEq)]
pub struct TracingConfig {
    pub collector_cluster: Arc<str>,
    /// New traces per million requests, at most 1,000,000.
    pub sampled_per_million: u32,
    pub service_name: Arc<str>,
    /// Where reports go, from `collector_cluster` and `collector_endpoint`; `None` while the
    /// cluster has not arrived (spans are then dropped, and counted).
    pub collector: Option<Arc<Collector>>,
    /// `collector_endpoint`, kept to resolve `collector` once the cluster is known.
    pub endpoint: Arc<str>,
}

/// A tracing collector: where reports are POSTed.
#[derive(Debug, PartialEq)]
pub struct Collector {
    pub dest: crate::upstream::Dest,
    pub connect_timeout: Duration,
    /// The path: `/api/v2/spans`.
    pub endpoint: Arc<str>,
    /// The Host of the report: the collector's name and port.
    pub host: String,
}

impl Collector {
    /// The collector `cluster` names: a DNS cluster's name, or a listed cluster's first endpoint.
    fn of(cluster: &Cluster, endpoint: &Arc<str>) -> Option<Collector> {
        let dest = match &cluster.discovery {
            Discovery::Dns(name) => crate::upstream::Dest::Name(name.clone()),
            Discovery::Listed => crate::upstream::Dest::Addr(cluster.endpoints.first()?.addr),
            Discovery::OriginalDestination => return None,
        };
        Some(Collector {
            host: dest.to_string(),
            dest,
            connect_timeout: cluster.connect_timeout,
            endpoint: endpoint.clone(),
        })
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Chain {
    pub name: Arc<str>,
    /// 0: any port.
    pub port: u16,
    /// Destination ranges; empty: any destination.
    pub ranges: Vec<Cidr>,
    /// Client (source) ranges; empty: any client.
    pub sources: Vec<Cidr>,
    /// What the connection must carry, told from its first bytes.
    pub transport: TransportProtocol,
    /// Server names (SNI) one of which the TLS ClientHello must name; empty: any connection.
    pub server_names: Vec<ServerName>,
    pub kind: ChainKind,
    /// Unset: plaintext.
    pub tls: Option<DownstreamTls>,
    /// `tls.require_client_certificate`: every client presents a verified certificate, whose
    /// subject alternative names `AllowedSources.principals` may then admit.
    pub require_client_certificate: bool,
}

/// `FilterChainMatch.transport_protocol`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TransportProtocol {
    #[default]
    Any,
    Tls,
    Plaintext,
}

impl TransportProtocol {
    /// Whether a connection whose first bytes were told to be `seen` matches; `None` means the
    /// bytes were not read, which only chains accepting any transport match.
    pub fn accepts(self, seen: Option<TransportProtocol>) -> bool {
        self == TransportProtocol::Any || seen == Some(self)
    }
}

/// One entry of `FilterChainMatch.server_names`, lower-cased.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerName {
    /// `api.example.com`: that name only.
    Exact(String),
    /// `*.example.com`, kept as `.example.com`: any name ending in it, not `example.com`.
    Suffix(String),
}

impl ServerName {
    /// Checks an entry as the proto allows it: not empty, no `*` but one leading `*.` followed
    /// by a name.
    pub fn parse(text: &str) -> Result<ServerName, String> {
        if text.is_empty() {
            return Err("is empty".into());
        }
        let lower = text.to_ascii_lowercase();
        match lower.strip_prefix('*') {
            Some(suffix)
                if suffix.starts_with('.') && suffix.len() > 1 && !suffix.contains('*') =>
            {
                Ok(ServerName::Suffix(suffix.to_string()))
            }
            None if !lower.contains('*') => Ok(ServerName::Exact(lower)),
            _ => Err(format!(
                "{text:?}: the only wildcard is a leading \"*.\" (\"*.example.com\")"
            )),
        }
    }

    /// How closely this entry matches the server name `sni` (any case): `None` when it does not;
    /// an exact name beats every suffix, a longer suffix a shorter one (as Envoy ranks them).
    pub fn rank(&self, sni: &str) -> Option<usize> {
        match self {
            ServerName::Exact(name) => sni.eq_ignore_ascii_case(name).then_some(usize::MAX),
            ServerName::Suffix(suffix) => {
                let at = sni.len().checked_sub(suffix.len()).filter(|at| *at > 0)?;
                sni.get(at..)
                    .is_some_and(|end| end.eq_ignore_ascii_case(suffix))
                    .then_some(suffix.len())
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum ChainKind {
    Http { route_config: Arc<str> },
    Tcp(TcpTarget),
}

#[derive(Clone, Debug, PartialEq)]
pub struct TcpTarget {
    pub clusters: Weighted,
    pub connect_authority: Arc<str>,
    /// Who may connect (inbound only); unset admits no one.
    pub allowed: Allowed,
}

/// `AllowedSources`: `any`, the verified identities of mTLS clients, the names their verified
/// certificates carry, or the client addresses of ingress from outside the mesh.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Allowed {
    pub any: bool,
    pub identities: Vec<Identity>,
    /// Clients whose (source) address is in one of these, certificate or not.
    pub sources: Vec<Cidr>,
    /// Clients whose verified certificate carries one of these subject alternative names.
    pub principals: Vec<Principal>,
    /// Clients whose verified certificate carries one of an entry's names and whose address is
    /// in one of its ranges.
    pub principals_from: Vec<PrincipalsFrom>,
}

/// `PrincipalsFrom`: certificate names admitted from some addresses only.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PrincipalsFrom {
    pub principals: Vec<Principal>,
    pub sources: Vec<Cidr>,
}

impl Allowed {
    /// Errors name the field relative to the `AllowedSources` (`source_ip_ranges[1]`).
    pub fn from_proto(a: &v1::AllowedSources) -> Result<Self, FieldError> {
        Ok(Allowed {
            any: a.any,
            identities: a.identities.iter().map(Identity::from_proto).collect(),
            sources: cidrs(&a.source_ip_ranges, "source_ip_ranges")?,
            principals: principals(&a.principals, "principals")?,
            principals_from: a
                .principals_from
                .iter()
                .enumerate()
                .map(|(i, from)| {
                    let field = format!("principals_from[{i}]");
                    Ok::<_, FieldError>(PrincipalsFrom {
                        principals: principals(&from.principals, &format!("{field}.principals"))?,
                        sources: cidrs(
                            &from.source_ip_ranges,
                            &format!("{field}.source_ip_ranges"),
                        )?,
                    })
                })
                .collect::<Result<_, _>>()?,
        })
    }

    /// `peer` is the client as its verified certificate names it, `None` for any other client;
    /// `client` is the address the connection comes from.
    pub fn admits(&self, peer: Option<&Peer>, client: IpAddr) -> bool {
        self.any
            || peer.is_some_and(|p| {
                p.identity
                    .as_ref()
                    .is_some_and(|id| self.identities.contains(id))
                    || self.principals.iter().any(|name| name.names(p))
                    || self.principals_from.iter().any(|from| {
                        from.principals.iter().any(|name| name.names(p))
                            && from.sources.iter().any(|r| r.contains(client))
                    })
            })
            || self.sources.iter().any(|r| r.contains(client))
    }
}

/// `names` (a field named `field`) as [`Principal`]s; errors name the entry.
fn principals(names: &[String], field: &str) -> Result<Vec<Principal>, FieldError> {
    names
        .iter()
        .enumerate()
        .map(|(i, p)| Principal::parse(p).map_err(|e| field_err(format!("{field}[{i}]"), e)))
        .collect()
}

/// One entry of `AllowedSources.principals`: a subject alternative name a verified client
/// certificate must carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    /// A DNS name (`ingress.example.com`), lower-cased: compared without regard to case.
    Dns(String),
    /// A URI (it has a scheme, `spiffe://…`, `https://…`), compared exactly.
    Uri(String),
}

impl Principal {
    /// Any non-empty text; one with a `:` is a URI (a DNS name has none), the rest DNS names.
    pub fn parse(text: &str) -> Result<Principal, String> {
        if text.is_empty() {
            return Err("is empty".into());
        }
        Ok(if text.contains(':') {
            Principal::Uri(text.to_string())
        } else {
            Principal::Dns(text.to_ascii_lowercase())
        })
    }

    /// Whether the certificate of `peer` carries this name (a DNS name among its DNS SANs, a URI
    /// among its URI SANs).
    pub fn names(&self, peer: &Peer) -> bool {
        match self {
            Principal::Dns(name) => peer.dns_names.iter().any(|d| d.eq_ignore_ascii_case(name)),
            Principal::Uri(uri) => peer.uris.iter().any(|u| u == uri),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

/// Clusters and their relative weights; the total is never 0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Weighted {
    pub entries: Vec<(Arc<str>, u32)>,
    pub total: u64,
}

#[derive(Debug)]
pub struct RouteTable {
    pub name: Arc<str>,
    /// Lower-cased domain -> index into `virtual_hosts`.
    pub domains: HashMap<String, usize>,
    /// The virtual host whose domains hold `*`: every Host no other virtual host has.
    pub fallback: Option<usize>,
    pub virtual_hosts: Vec<VirtualHost>,
}

#[derive(Debug)]
pub struct VirtualHost {
    pub name: Arc<str>,
    pub routes: Vec<Route>,
    /// Inbound chains only: the bucket of routes without their own.
    pub rate_limit: Option<LocalRateLimit>,
}

/// `LocalRateLimit`: a token bucket (kept in [`crate::ratelimit::RateLimits`] under `key`) and
/// the reply a request gets when it finds the bucket empty.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalRateLimit {
    pub key: BucketKey,
    /// 400-599.
    pub status: http::StatusCode,
    pub response_headers: Vec<(http::HeaderName, http::HeaderValue)>,
}

/// Envoy refuses shorter fill intervals.
pub const MIN_FILL_INTERVAL: Duration = Duration::from_millis(50);

#[derive(Debug)]
pub struct Route {
    pub path: PathMatch,
    pub methods: Vec<http::Method>,
    pub headers: Vec<HeaderMatch>,
    pub clusters: Weighted,
    pub timeout: Option<Duration>,
    pub retry: Option<RetryPolicy>,
    /// `None`: no `allowed_sources` (admits no one on an inbound listener).
    pub allowed: Option<Allowed>,
    /// Inbound chains only: replaces the virtual host's bucket for this route.
    pub rate_limit: Option<LocalRateLimit>,
}

#[derive(Debug)]
pub enum PathMatch {
    Exact(String),
    Prefix(String),
    Regex(Regex),
    Connect,
}

#[derive(Debug)]
pub struct HeaderMatch {
    pub name: http::HeaderName,
    pub kind: HeaderMatchKind,
}

#[derive(Debug)]
pub enum HeaderMatchKind {
    Exact(String),
    Regex(Regex),
    Present,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    pub on_5xx: bool,
    pub on_gateway_error: bool,
    pub on_reset: bool,
    pub on_connect_failure: bool,
    pub on_409: bool,
    pub num_retries: u32,
    pub per_try_timeout: Option<Duration>,
    pub backoff_base: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LbPolicy {
    RoundRobin,
    LeastRequest,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamProtocol {
    Http1,
    Http2,
    Tcp,
}

#[derive(Debug)]
pub struct Cluster {
    pub name: Arc<str>,
    pub lb: LbPolicy,
    pub connect_timeout: Duration,
    pub protocol: UpstreamProtocol,
    /// Empty unless `discovery` is [`Discovery::Listed`].
    pub endpoints: Vec<Endpoint>,
    pub discovery: Discovery,
    pub breakers: CircuitBreakers,
    /// TLS to meshed endpoints; unset: plaintext.
    pub tls: Option<UpstreamTls>,
    /// Round-robin cursor. Resets when the cluster or its endpoints change, which is harmless.
    pub cursor: AtomicUsize,
}

/// Where a cluster's endpoints come from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Discovery {
    /// `eds` or `static_local`: the endpoints listed in [`Cluster::endpoints`].
    #[default]
    Listed,
    /// `original_destination` (egress passthrough): no endpoints; each TCP connection goes to
    /// its original destination and each HTTP request to the `<ip>:<port>` of its Host, in
    /// plaintext (HTTP requests as HTTP/1.1 whatever `upstream_protocol` says).
    OriginalDestination,
    /// `dns` (a host outside the mesh, by name): no endpoints; the name is resolved each time a
    /// connection is made and its addresses tried in order. Plaintext, HTTP requests as
    /// HTTP/1.1 whatever `upstream_protocol` says.
    Dns(DnsName),
}

/// A DNS cluster's host and port.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DnsName {
    /// Never empty, never a wildcard.
    pub host: Arc<str>,
    /// Not 0.
    pub port: u16,
}

impl std::fmt::Display for DnsName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

impl DnsName {
    /// Errors name the field relative to the cluster (`dns.host`).
    fn from_proto(d: &v1::DnsName) -> Result<Self, FieldError> {
        if d.host.is_empty() {
            return Err(field_err("dns.host", "is empty"));
        }
        if d.host.contains('*') {
            return Err(field_err(
                "dns.host",
                format!("{:?} is a wildcard, not a name", d.host),
            ));
        }
        let port = u16::try_from(d.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| field_err("dns.port", format!("{} is not in 1-65535", d.port)))?;
        Ok(DnsName {
            host: Arc::from(d.host.as_str()),
            port,
        })
    }
}

/// `CircuitBreakers`, per cluster and per sidecar; `None`: no limit. Over a limit a request fails
/// at once with 503 overflow and a TCP connection is closed (see `http::attempt`, `tcp::proxy`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CircuitBreakers {
    /// HTTP/1.1: requests holding a connection at once (one each), the others wait. TCP: client
    /// connections relayed at once. HTTP/2: no effect, as each endpoint gets one multiplexed
    /// connection whatever the load, and Envoy's limit counts connections.
    pub max_connections: Option<u32>,
    /// Requests waiting for an HTTP/1.1 connection (`max_connections` reached).
    pub max_pending_requests: Option<u32>,
    /// HTTP requests in flight.
    pub max_requests: Option<u32>,
    /// Requests one upstream connection carries before it is closed; 0 is read as unset, as
    /// Envoy does.
    pub max_requests_per_connection: Option<u32>,
    /// Retries in flight (from the back-off before a retry until its answer).
    pub max_retries: Option<u32>,
}

impl CircuitBreakers {
    pub fn from_proto(b: &v1::CircuitBreakers) -> Self {
        CircuitBreakers {
            max_connections: b.max_connections,
            max_pending_requests: b.max_pending_requests,
            max_requests: b.max_requests,
            max_requests_per_connection: b.max_requests_per_connection.filter(|n| *n > 0),
            max_retries: b.max_retries,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub weight: u32,
    pub meshed: bool,
    /// The service account of the endpoint's pod, when known.
    pub identity: Option<Identity>,
    /// Whose pod this is, for the `destination_*` metric labels; shared because every request
    /// to the endpoint carries it.
    pub workload: Option<Arc<Workload>>,
}

impl Cluster {
    /// What HTTP requests to this cluster are sent as: `protocol`, except for an
    /// original-destination or DNS cluster, which speaks HTTP/1.1 to whatever it reaches (its
    /// `protocol`, TCP from the control plane, applies to the TCP chains that use it).
    pub fn http_protocol(&self) -> UpstreamProtocol {
        match self.discovery {
            Discovery::Listed => self.protocol,
            Discovery::OriginalDestination | Discovery::Dns(_) => UpstreamProtocol::Http1,
        }
    }
}

impl Endpoint {
    /// The destination of one connection or request to an original-destination cluster:
    /// unmeshed (plaintext, no tunnel), known to no workload.
    pub fn original_destination(addr: SocketAddr) -> Endpoint {
        Endpoint {
            addr,
            weight: 1,
            meshed: false,
            identity: None,
            workload: None,
        }
    }
}

// === Config ===

impl Config {
    /// Converts and validates every resource. References *from* resources of type `changed`
    /// to clusters must resolve; other dangling references mean "not received yet" and fail
    /// requests with 503 until they do.
    pub fn build(set: &ResourceSet, changed: &str) -> Result<Config, ConfigError> {
        // Secrets first: clusters and chains resolve their TLS against them. A secret that is
        // named but not here yet is not an error (ADS sends secrets last).
        let mut secrets = Secrets::default();
        for raw in set.resources(type_url::SECRET) {
            let what = format!("Secret {:?}", raw.name);
            let secret = v1::Secret::decode(&*raw.body).map_err(|e| err(&what, "", e))?;
            secrets.add(secret).map_err(|(f, m)| err(&what, &f, m))?;
        }
        let mut endpoints: HashMap<String, Vec<Endpoint>> = HashMap::new();
        for raw in set.resources(type_url::CLUSTER_LOAD_ASSIGNMENT) {
            let what = format!("ClusterLoadAssignment {:?}", raw.name);
            let cla =
                v1::ClusterLoadAssignment::decode(&*raw.body).map_err(|e| err(&what, "", e))?;
            let mut list = Vec::with_capacity(cla.endpoints.len());
            for (i, e) in cla.endpoints.iter().enumerate() {
                let field = format!("endpoints[{i}].address");
                list.push(Endpoint {
                    addr: socket_addr(e.address.as_ref()).map_err(|m| err(&what, &field, m))?,
                    weight: e.weight.max(1),
                    meshed: e.meshed,
                    identity: e.identity.as_ref().map(Identity::from_proto),
                    workload: e.workload.as_ref().map(|w| {
                        Arc::new(Workload {
                            namespace: w.namespace.clone(),
                            name: w.name.clone(),
                            pod: w.pod.clone(),
                            kind: w.kind.clone(),
                        })
                    }),
                });
            }
            endpoints.insert(cla.cluster_name, list);
        }
        let mut clusters = HashMap::new();
        for raw in set.resources(type_url::CLUSTER) {
            let what = format!("Cluster {:?}", raw.name);
            let c = v1::Cluster::decode(&*raw.body).map_err(|e| err(&what, "", e))?;
            let cluster =
                build_cluster(c, &endpoints, &secrets).map_err(|(f, m)| err(&what, &f, m))?;
            clusters.insert(cluster.name.clone(), Arc::new(cluster));
        }
        let strict = |t: &str| changed == t;
        let check = |w: &Weighted, on: bool| -> Result<(), String> {
            if on && let Some((name, _)) = w.entries.iter().find(|(n, _)| !clusters.contains_key(n))
            {
                return Err(format!("refers to unknown cluster {name:?}"));
            }
            Ok(())
        };
        let mut listeners = BTreeMap::new();
        for raw in set.resources(type_url::LISTENER) {
            let what = format!("Listener {:?}", raw.name);
            let l = v1::Listener::decode(&*raw.body).map_err(|e| err(&what, "", e))?;
            let mut listener = build_listener(l, &secrets).map_err(|(f, m)| err(&what, &f, m))?;
            if let Some(tracing) = &mut listener.tracing {
                let cluster = clusters.get(&tracing.collector_cluster);
                if cluster.is_none() && strict(type_url::LISTENER) {
                    return Err(err(
                        &what,
                        "tracing.collector_cluster",
                        format!("refers to unknown cluster {:?}", tracing.collector_cluster),
                    ));
                }
                if let Some(c) = cluster
                    && c.discovery == Discovery::OriginalDestination
                {
                    return Err(err(
                        &what,
                        "tracing.collector_cluster",
                        format!(
                            "cluster {:?} is an original-destination cluster: it names no collector",
                            tracing.collector_cluster
                        ),
                    ));
                }
                let collector = cluster
                    .and_then(|c| Collector::of(c, &tracing.endpoint))
                    .map(Arc::new);
                // Built just above: not shared yet.
                if let Some(t) = Arc::get_mut(tracing) {
                    t.collector = collector;
                }
            }
            for (i, chain) in listener.chains.iter().enumerate() {
                if let ChainKind::Tcp(t) = &chain.kind {
                    check(&t.clusters, strict(type_url::LISTENER))
                        .map_err(|m| err(&what, &format!("filter_chains[{i}].tcp.clusters"), m))?;
                }
            }
            listeners.insert(listener.name.clone(), Arc::new(listener));
        }
        let mut by_addr: HashMap<SocketAddr, &Arc<str>> = HashMap::new();
        for l in listeners.values() {
            if let Some(other) = by_addr.insert(l.addr, &l.name) {
                return Err(err(
                    &format!("Listener {:?}", l.name),
                    "address",
                    format!("{} is also the address of listener {other:?}", l.addr),
                ));
            }
        }
        let mut routes = HashMap::new();
        for raw in set.resources(type_url::ROUTE_CONFIGURATION) {
            let what = format!("RouteConfiguration {:?}", raw.name);
            let rc = v1::RouteConfiguration::decode(&*raw.body).map_err(|e| err(&what, "", e))?;
            let table = build_routes(rc).map_err(|(f, m)| err(&what, &f, m))?;
            for (v, vh) in table.virtual_hosts.iter().enumerate() {
                for (r, route) in vh.routes.iter().enumerate() {
                    check(&route.clusters, strict(type_url::ROUTE_CONFIGURATION)).map_err(|m| {
                        err(
                            &what,
                            &format!("virtual_hosts[{v}].routes[{r}].action.clusters"),
                            m,
                        )
                    })?;
                }
            }
            routes.insert(table.name.clone(), Arc::new(table));
        }
        let mut log_level = None;
        for raw in set.resources(type_url::RUNTIME) {
            let what = format!("Runtime {:?}", raw.name);
            let runtime = v1::Runtime::decode(&*raw.body).map_err(|e| err(&what, "", e))?;
            let level =
                runtime_log_level(runtime.log_level).map_err(|m| err(&what, "log_level", m))?;
            if *raw.name == *fsm_dataplane_proto::RUNTIME_NAME {
                log_level = level;
            }
        }
        Ok(Config {
            listeners,
            routes,
            clusters,
            log_level,
        })
    }
}

/// `Runtime.log_level` as a default level; `None` for unspecified. An unknown value (a newer
/// control plane's level) is refused, so the level in force stays.
fn runtime_log_level(value: i32) -> Result<Option<LevelFilter>, String> {
    Ok(Some(match v1::LogLevel::try_from(value) {
        Ok(v1::LogLevel::Unspecified) => return Ok(None),
        Ok(v1::LogLevel::Trace) => LevelFilter::TRACE,
        Ok(v1::LogLevel::Debug) => LevelFilter::DEBUG,
        Ok(v1::LogLevel::Info) => LevelFilter::INFO,
        Ok(v1::LogLevel::Warn) => LevelFilter::WARN,
        Ok(v1::LogLevel::Error) => LevelFilter::ERROR,
        Ok(v1::LogLevel::Off) => LevelFilter::OFF,
        Err(_) => return Err(format!("unknown log level {value}")),
    }))
}

fn err(what: &str, field: &str, message: impl std::fmt::Display) -> ConfigError {
    if field.is_empty() {
        ConfigError(format!("{what}: {message}"))
    } else {
        ConfigError(format!("{what}: {field}: {message}"))
    }
}

pub type FieldError = (String, String);

fn field_err(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    (field.into(), message.into())
}

fn socket_addr(a: Option<&v1::SocketAddress>) -> Result<SocketAddr, String> {
    let a = a.ok_or("missing")?;
    let ip: IpAddr =
        a.ip.parse()
            .map_err(|_| format!("ip {:?} is not an IP address", a.ip))?;
    let port = u16::try_from(a.port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("port {} is not in 1-65535", a.port))?;
    Ok(SocketAddr::new(ip, port))
}

fn duration(d: Option<&prost_types::Duration>) -> Result<Option<Duration>, String> {
    match d {
        None => Ok(None),
        Some(d) => Duration::try_from(*d)
            .map(Some)
            .map_err(|_| format!("{}s {}ns is not a valid duration", d.seconds, d.nanos)),
    }
}

fn weighted(list: &[v1::WeightedCluster], field: &str) -> Result<Weighted, FieldError> {
    if list.is_empty() {
        return Err(field_err(field, "is empty"));
    }
    let mut entries = Vec::with_capacity(list.len());
    for (i, w) in list.iter().enumerate() {
        if w.name.is_empty() {
            return Err(field_err(format!("{field}[{i}].name"), "is empty"));
        }
        entries.push((Arc::from(w.name.as_str()), w.weight));
    }
    let total = entries.iter().map(|(_, w)| u64::from(*w)).sum();
    if total == 0 {
        return Err(field_err(field, "weights sum to 0"));
    }
    Ok(Weighted { entries, total })
}

fn build_cluster(
    c: v1::Cluster,
    endpoints: &HashMap<String, Vec<Endpoint>>,
    secrets: &Secrets,
) -> Result<Cluster, FieldError> {
    let endpoints = match &c.discovery {
        None => {
            return Err(field_err(
                "discovery",
                "none of eds, static_local, original_destination, dns is set",
            ));
        }
        Some(v1::cluster::Discovery::OriginalDestination(_)) => {
            if c.tls.is_some() {
                return Err(field_err(
                    "tls",
                    "is set on an original_destination cluster (egress passthrough is plaintext)",
                ));
            }
            vec![]
        }
        Some(v1::cluster::Discovery::Dns(_)) => {
            if c.tls.is_some() {
                return Err(field_err(
                    "tls",
                    "is set on a dns cluster (egress to a name is plaintext)",
                ));
            }
            vec![]
        }
        Some(v1::cluster::Discovery::Eds(_)) => endpoints.get(&c.name).cloned().unwrap_or_default(),
        Some(v1::cluster::Discovery::StaticLocal(s)) => vec![Endpoint {
            addr: socket_addr(s.address.as_ref())
                .map_err(|m| field_err("static_local.address", m))?,
            weight: 1,
            meshed: false,
            identity: None,
            workload: None,
        }],
    };
    let protocol = match v1::UpstreamProtocol::try_from(c.upstream_protocol) {
        Ok(v1::UpstreamProtocol::Http1) => UpstreamProtocol::Http1,
        Ok(v1::UpstreamProtocol::Http2) => UpstreamProtocol::Http2,
        Ok(v1::UpstreamProtocol::Tcp) => UpstreamProtocol::Tcp,
        Ok(v1::UpstreamProtocol::Unspecified) => {
            return Err(field_err("upstream_protocol", "is unspecified"));
        }
        Err(_) => {
            return Err(field_err(
                "upstream_protocol",
                format!("unknown value {}", c.upstream_protocol),
            ));
        }
    };
    let lb = match v1::LbPolicy::try_from(c.lb_policy) {
        Ok(v1::LbPolicy::RoundRobin) => LbPolicy::RoundRobin,
        Ok(v1::LbPolicy::LeastRequest) => LbPolicy::LeastRequest,
        Err(_) => {
            return Err(field_err(
                "lb_policy",
                format!("unknown value {}", c.lb_policy),
            ));
        }
    };
    let connect_timeout = duration(c.connect_timeout.as_ref())
        .map_err(|m| field_err("connect_timeout", m))?
        .unwrap_or(Duration::from_secs(5));
    let tls = match &c.tls {
        None => None,
        Some(t) => Some(crate::tls::upstream(t, secrets).map_err(|(f, m)| field_err(f, m))?),
    };
    let discovery = match &c.discovery {
        Some(v1::cluster::Discovery::OriginalDestination(_)) => Discovery::OriginalDestination,
        Some(v1::cluster::Discovery::Dns(d)) => Discovery::Dns(DnsName::from_proto(d)?),
        _ => Discovery::Listed,
    };
    Ok(Cluster {
        name: Arc::from(c.name.as_str()),
        lb,
        connect_timeout,
        protocol,
        endpoints,
        discovery,
        breakers: c
            .circuit_breakers
            .as_ref()
            .map(CircuitBreakers::from_proto)
            .unwrap_or_default(),
        tls,
        cursor: AtomicUsize::new(0),
    })
}

fn build_listener(l: v1::Listener, secrets: &Secrets) -> Result<Listener, FieldError> {
    let addr = socket_addr(l.address.as_ref()).map_err(|m| field_err("address", m))?;
    let direction = match v1::TrafficDirection::try_from(l.direction) {
        Ok(v1::TrafficDirection::Inbound) => Direction::Inbound,
        Ok(v1::TrafficDirection::Outbound) => Direction::Outbound,
        _ => {
            return Err(field_err(
                "direction",
                format!("invalid value {}", l.direction),
            ));
        }
    };
    let mut chains = Vec::with_capacity(l.filter_chains.len());
    for (i, fc) in l.filter_chains.into_iter().enumerate() {
        let at = |f: &str| format!("filter_chains[{i}] {:?}.{f}", fc.name);
        let m = fc.r#match.clone().unwrap_or_default();
        let port = u16::try_from(m.destination_port)
            .map_err(|_| field_err(at("match.destination_port"), "is not in 0-65535"))?;
        let ranges = cidrs(&m.destination_ip_ranges, "destination_ip_ranges")
            .map_err(|(f, e)| field_err(at(&format!("match.{f}")), e))?;
        let sources = cidrs(&m.source_ip_ranges, "source_ip_ranges")
            .map_err(|(f, e)| field_err(at(&format!("match.{f}")), e))?;
        let transport = match v1::TransportProtocol::try_from(m.transport_protocol) {
            Ok(v1::TransportProtocol::Any) => TransportProtocol::Any,
            Ok(v1::TransportProtocol::Tls) => TransportProtocol::Tls,
            Ok(v1::TransportProtocol::Plaintext) => TransportProtocol::Plaintext,
            Err(_) => {
                return Err(field_err(
                    at("match.transport_protocol"),
                    format!("unknown value {}", m.transport_protocol),
                ));
            }
        };
        let server_names = m
            .server_names
            .iter()
            .enumerate()
            .map(|(n, name)| {
                ServerName::parse(name)
                    .map_err(|e| field_err(at(&format!("match.server_names[{n}]")), e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let protocol = v1::Protocol::try_from(fc.protocol)
            .map_err(|_| field_err(at("protocol"), format!("unknown value {}", fc.protocol)))?;
        let kind = match (protocol, &fc.target) {
            (v1::Protocol::Unspecified, _) => {
                return Err(field_err(at("protocol"), "is unspecified"));
            }
            (v1::Protocol::Http | v1::Protocol::Grpc, Some(v1::filter_chain::Target::Http(h))) => {
                if h.route_config_name.is_empty() {
                    return Err(field_err(at("http.route_config_name"), "is empty"));
                }
                ChainKind::Http {
                    route_config: Arc::from(h.route_config_name.as_str()),
                }
            }
            (
                v1::Protocol::Tcp | v1::Protocol::TcpServerFirst,
                Some(v1::filter_chain::Target::Tcp(t)),
            ) => ChainKind::Tcp(TcpTarget {
                clusters: weighted(&t.clusters, &at("tcp.clusters"))?,
                connect_authority: Arc::from(t.connect_authority.as_str()),
                allowed: match &fc.allowed_sources {
                    None => Allowed::default(),
                    Some(a) => Allowed::from_proto(a)
                        .map_err(|(f, e)| field_err(at(&format!("allowed_sources.{f}")), e))?,
                },
            }),
            (p, _) => {
                return Err(field_err(
                    at("target"),
                    format!(
                        "protocol {} needs {} target",
                        p.as_str_name(),
                        match p {
                            v1::Protocol::Http | v1::Protocol::Grpc => "an http",
                            _ => "a tcp",
                        }
                    ),
                ));
            }
        };
        let tls = match &fc.tls {
            None => None,
            Some(t) => {
                Some(crate::tls::downstream(t, secrets).map_err(|(f, m)| field_err(at(&f), m))?)
            }
        };
        let require_client_certificate = fc
            .tls
            .as_ref()
            .is_some_and(|t| t.require_client_certificate);
        chains.push(Chain {
            name: Arc::from(fc.name.as_str()),
            port,
            ranges,
            sources,
            transport,
            server_names,
            kind,
            tls,
            require_client_certificate,
        });
    }
    let tracing = l.tracing.as_ref().map(tracing_config).transpose()?;
    Ok(Listener {
        name: Arc::from(l.name.as_str()),
        addr,
        direction,
        chains,
        tracing: tracing.map(Arc::new),
    })
}

/// `Listener.tracing`, its collector not resolved yet.
fn tracing_config(t: &v1::Tracing) -> Result<TracingConfig, FieldError> {
    if t.collector_cluster.is_empty() {
        return Err(field_err("tracing.collector_cluster", "is empty"));
    }
    if !t.collector_endpoint.starts_with('/')
        || t.collector_endpoint
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(field_err(
            "tracing.collector_endpoint",
            format!(
                "{:?} is not an absolute path such as \"/api/v2/spans\"",
                t.collector_endpoint
            ),
        ));
    }
    if t.sampled_per_million > crate::trace::ALL {
        return Err(field_err(
            "tracing.sampled_per_million",
            format!("{} is more than 1000000", t.sampled_per_million),
        ));
    }
    Ok(TracingConfig {
        collector_cluster: Arc::from(t.collector_cluster.as_str()),
        sampled_per_million: t.sampled_per_million,
        service_name: Arc::from(t.service_name.as_str()),
        collector: None,
        endpoint: Arc::from(t.collector_endpoint.as_str()),
    })
}

fn build_routes(rc: v1::RouteConfiguration) -> Result<RouteTable, FieldError> {
    let table_name: Arc<str> = Arc::from(rc.name.as_str());
    let mut domains = HashMap::new();
    let mut fallback = None;
    let mut virtual_hosts = Vec::with_capacity(rc.virtual_hosts.len());
    for (v, vh) in rc.virtual_hosts.into_iter().enumerate() {
        for (d, domain) in vh.domains.iter().enumerate() {
            let at = || format!("virtual_hosts[{v}].domains[{d}]");
            if domain == "*" {
                if let Some(first) = fallback.replace(v) {
                    return Err(field_err(
                        at(),
                        format!("\"*\" also appears in virtual_hosts[{first}]"),
                    ));
                }
                continue;
            }
            if domain.contains('*') {
                return Err(field_err(
                    at(),
                    format!("{domain:?}: the only wildcard is \"*\" alone"),
                ));
            }
            if domains.insert(domain.to_ascii_lowercase(), v).is_some() {
                return Err(field_err(
                    at(),
                    format!("{domain:?} appears in two virtual hosts"),
                ));
            }
        }
        let name: Arc<str> = Arc::from(vh.name.as_str());
        let bucket = |scope| BucketAt {
            route_config: &table_name,
            virtual_host: &name,
            scope,
        };
        let mut routes = Vec::with_capacity(vh.routes.len());
        for (r, mut route) in vh.routes.into_iter().enumerate() {
            let at = |f: &str| format!("virtual_hosts[{v}].routes[{r}].{f}");
            let rate_limit = match route.rate_limit.take() {
                None => None,
                Some(l) => Some(local_rate_limit(&l, bucket(Scope::Route(r)), &|f| {
                    at(&format!("rate_limit.{f}"))
                })?),
            };
            routes.push(Route {
                rate_limit,
                ..build_route(route, &at)?
            });
        }
        let rate_limit = match &vh.rate_limit {
            None => None,
            Some(l) => Some(local_rate_limit(l, bucket(Scope::VirtualHost), &|f| {
                format!("virtual_hosts[{v}].rate_limit.{f}")
            })?),
        };
        virtual_hosts.push(VirtualHost {
            name,
            routes,
            rate_limit,
        });
    }
    Ok(RouteTable {
        name: table_name,
        domains,
        fallback,
        virtual_hosts,
    })
}

/// Where a `LocalRateLimit` is: its bucket's key without the settings.
struct BucketAt<'a> {
    route_config: &'a Arc<str>,
    virtual_host: &'a Arc<str>,
    scope: Scope,
}

/// Checks a `LocalRateLimit` against what route.proto allows.
fn local_rate_limit(
    l: &v1::LocalRateLimit,
    bucket: BucketAt<'_>,
    at: &dyn Fn(&str) -> String,
) -> Result<LocalRateLimit, FieldError> {
    if l.max_tokens == 0 {
        return Err(field_err(at("max_tokens"), "must be at least 1"));
    }
    if l.tokens_per_fill == 0 {
        return Err(field_err(at("tokens_per_fill"), "must be at least 1"));
    }
    let fill_interval = duration(l.fill_interval.as_ref())
        .map_err(|e| field_err(at("fill_interval"), e))?
        .ok_or_else(|| field_err(at("fill_interval"), "is not set"))?;
    if fill_interval < MIN_FILL_INTERVAL {
        return Err(field_err(
            at("fill_interval"),
            format!("{fill_interval:?} is less than {MIN_FILL_INTERVAL:?}"),
        ));
    }
    let status = match l.status {
        0 => http::StatusCode::TOO_MANY_REQUESTS,
        s @ 400..=599 => u16::try_from(s)
            .ok()
            .and_then(|s| http::StatusCode::from_u16(s).ok())
            .ok_or_else(|| field_err(at("status"), format!("{s} is not a status")))?,
        s => {
            return Err(field_err(
                at("status"),
                format!("{s} is not in 400-599 (0 means 429)"),
            ));
        }
    };
    let mut response_headers = Vec::with_capacity(l.response_headers_to_add.len());
    for (i, h) in l.response_headers_to_add.iter().enumerate() {
        let f = |x: &str| at(&format!("response_headers_to_add[{i}].{x}"));
        let name = http::HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| field_err(f("name"), format!("{:?} is not a header name", h.name)))?;
        let value = http::HeaderValue::from_str(&h.value).map_err(|_| {
            field_err(
                f("value"),
                format!("{:?} is not a valid header value", h.value),
            )
        })?;
        response_headers.push((name, value));
    }
    Ok(LocalRateLimit {
        key: BucketKey {
            route_config: bucket.route_config.clone(),
            virtual_host: bucket.virtual_host.clone(),
            scope: bucket.scope,
            settings: Settings {
                max_tokens: l.max_tokens,
                tokens_per_fill: l.tokens_per_fill,
                fill_interval,
            },
        },
        status,
        response_headers,
    })
}

/// RE2 semantics: the whole input must match.
fn full_regex(pattern: &str) -> Result<Regex, String> {
    Regex::new(&format!("^(?:{pattern})$")).map_err(|e| format!("invalid regex {pattern:?}: {e}"))
}

fn build_route(route: v1::Route, at: &dyn Fn(&str) -> String) -> Result<Route, FieldError> {
    let m = route.r#match.unwrap_or_default();
    let path = match m.path {
        None => return Err(field_err(at("match.path"), "is not set")),
        Some(v1::route_match::Path::Exact(p)) => PathMatch::Exact(p),
        Some(v1::route_match::Path::Prefix(p)) => PathMatch::Prefix(p),
        Some(v1::route_match::Path::Regex(p)) => {
            PathMatch::Regex(full_regex(&p).map_err(|e| field_err(at("match.regex"), e))?)
        }
        Some(v1::route_match::Path::Connect(_)) => PathMatch::Connect,
    };
    let mut methods = Vec::with_capacity(m.methods.len());
    for (i, method) in m.methods.iter().enumerate() {
        methods.push(http::Method::from_bytes(method.as_bytes()).map_err(|_| {
            field_err(
                at(&format!("match.methods[{i}]")),
                format!("{method:?} is not a method"),
            )
        })?);
    }
    let mut headers = Vec::with_capacity(m.headers.len());
    for (i, h) in m.headers.into_iter().enumerate() {
        let f = |x: &str| at(&format!("match.headers[{i}].{x}"));
        let name = http::HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| field_err(f("name"), format!("{:?} is not a header name", h.name)))?;
        let kind = match h.r#match {
            None => return Err(field_err(f("match"), "is not set")),
            Some(v1::header_match::Match::Exact(v)) => HeaderMatchKind::Exact(v),
            Some(v1::header_match::Match::Regex(p)) => {
                HeaderMatchKind::Regex(full_regex(&p).map_err(|e| field_err(f("regex"), e))?)
            }
            Some(v1::header_match::Match::Present(_)) => HeaderMatchKind::Present,
        };
        headers.push(HeaderMatch { name, kind });
    }
    let action = route
        .action
        .ok_or_else(|| field_err(at("action"), "is not set"))?;
    let clusters = weighted(&action.clusters, &at("action.clusters"))?;
    let timeout =
        duration(action.timeout.as_ref()).map_err(|e| field_err(at("action.timeout"), e))?;
    let retry = match action.retry_policy {
        None => None,
        Some(p) => Some(
            retry_policy(p)
                .map_err(|(f, e)| field_err(at(&format!("action.retry_policy.{f}")), e))?,
        ),
    };
    let allowed = match &route.allowed_sources {
        None => None,
        Some(a) => Some(
            Allowed::from_proto(a)
                .map_err(|(f, e)| field_err(at(&format!("allowed_sources.{f}")), e))?,
        ),
    };
    Ok(Route {
        path,
        methods,
        headers,
        clusters,
        timeout,
        retry,
        allowed,
        rate_limit: None,
    })
}

fn retry_policy(p: v1::RetryPolicy) -> Result<RetryPolicy, FieldError> {
    let mut policy = RetryPolicy {
        on_5xx: false,
        on_gateway_error: false,
        on_reset: false,
        on_connect_failure: false,
        on_409: false,
        num_retries: p.num_retries,
        per_try_timeout: duration(p.per_try_timeout.as_ref())
            .map_err(|e| field_err("per_try_timeout", e))?,
        backoff_base: duration(p.backoff_base_interval.as_ref())
            .map_err(|e| field_err("backoff_base_interval", e))?
            .unwrap_or(Duration::from_millis(25)),
    };
    for on in p.retry_on {
        match v1::RetryOn::try_from(on) {
            Ok(v1::RetryOn::RetryOn5xx) => policy.on_5xx = true,
            Ok(v1::RetryOn::GatewayError) => policy.on_gateway_error = true,
            Ok(v1::RetryOn::Reset) => policy.on_reset = true,
            Ok(v1::RetryOn::ConnectFailure) => policy.on_connect_failure = true,
            Ok(v1::RetryOn::Retriable4xx) => policy.on_409 = true,
            // gRPC and refused-stream conditions are accepted and not acted on yet.
            Ok(_) => {}
            Err(_) => return Err(field_err("retry_on", format!("unknown value {on}"))),
        }
    }
    Ok(policy)
}

/// Parses a list of CIDR ranges; an error names `field[i]`.
fn cidrs(list: &[String], field: &str) -> Result<Vec<Cidr>, FieldError> {
    list.iter()
        .enumerate()
        .map(|(i, text)| parse_cidr(text).map_err(|e| field_err(format!("{field}[{i}]"), e)))
        .collect()
}

pub fn parse_cidr(text: &str) -> Result<Cidr, String> {
    let (ip, prefix) = text
        .split_once('/')
        .ok_or_else(|| format!("{text:?} is not a CIDR range (no /)"))?;
    let addr: IpAddr = ip
        .parse()
        .map_err(|_| format!("{text:?}: {ip:?} is not an IP address"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix: u8 = prefix
        .parse()
        .ok()
        .filter(|p| *p <= max)
        .ok_or_else(|| format!("{text:?}: prefix length is not in 0-{max}"))?;
    Ok(Cidr { addr, prefix })
}

// === Cidr ===

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// Hand-built resource sets for the unit tests of this crate.
#[cfg(test)]
pub(crate) mod test_support {
    use std::sync::Arc;

    use fsm_sidecar_xds::{RawResource, ResourceSet, TypeState};

    /// A set holding `resources` as (type URL, name, encoded body).
    pub(crate) fn set(resources: Vec<(&'static str, &str, Vec<u8>)>) -> ResourceSet {
        let mut set = ResourceSet::default();
        for (url, name, body) in resources {
            set.types
                .entry(url)
                .or_insert_with(TypeState::default)
                .resources
                .insert(
                    Arc::from(name),
                    RawResource {
                        name: Arc::from(name),
                        version: Arc::from("v1"),
                        body: Arc::from(body),
                    },
                );
        }
        set
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::set;
    use super::*;
    use test_case::test_case;

    fn cluster(name: &str) -> Vec<u8> {
        v1::Cluster {
            name: name.into(),
            discovery: Some(v1::cluster::Discovery::Eds(v1::EdsDiscovery {})),
            upstream_protocol: v1::UpstreamProtocol::Http1 as i32,
            ..Default::default()
        }
        .encode_to_vec()
    }

    fn routes(cluster: &str, path: v1::route_match::Path) -> Vec<u8> {
        v1::RouteConfiguration {
            name: "outbound".into(),
            virtual_hosts: vec![v1::VirtualHost {
                name: "demo/httpbin|14001".into(),
                domains: vec!["httpbin".into()],
                routes: vec![v1::Route {
                    r#match: Some(v1::RouteMatch {
                        path: Some(path),
                        ..Default::default()
                    }),
                    action: Some(v1::RouteAction {
                        clusters: vec![v1::WeightedCluster {
                            name: cluster.into(),
                            weight: 100,
                        }],
                        ..Default::default()
                    }),
                    allowed_sources: None,
                    rate_limit: None,
                }],
                rate_limit: None,
            }],
        }
        .encode_to_vec()
    }

    fn runtime(name: &str, log_level: i32) -> Vec<u8> {
        v1::Runtime {
            name: name.into(),
            log_level,
        }
        .encode_to_vec()
    }

    #[test_case(v1::LogLevel::Unspecified as i32, Ok(None) ; "unspecified")]
    #[test_case(v1::LogLevel::Debug as i32, Ok(Some(LevelFilter::DEBUG)) ; "debug")]
    #[test_case(v1::LogLevel::Off as i32, Ok(Some(LevelFilter::OFF)) ; "off")]
    #[test_case(42, Err("Runtime \"runtime\": log_level: unknown log level 42".to_string()) ; "unknown")]
    fn runtime_log_level(value: i32, expected: Result<Option<LevelFilter>, String>) {
        let s = set(vec![(
            type_url::RUNTIME,
            "runtime",
            runtime("runtime", value),
        )]);
        assert_eq!(
            Config::build(&s, type_url::RUNTIME)
                .map(|c| c.log_level)
                .map_err(|e| e.0),
            expected
        );
    }

    /// No Runtime (an older control plane) or one of another name: the flag's level.
    #[test]
    fn runtime_absent_or_otherwise_named_keeps_the_flag() {
        let config = Config::build(&set(vec![]), type_url::CLUSTER).expect("valid");
        assert_eq!(config.log_level, None);
        let s = set(vec![(
            type_url::RUNTIME,
            "other",
            runtime("other", v1::LogLevel::Trace as i32),
        )]);
        let config = Config::build(&s, type_url::RUNTIME).expect("valid");
        assert_eq!(config.log_level, None);
    }

    #[test_case("c", v1::route_match::Path::Prefix("/".into()), None ; "valid")]
    #[test_case("nope", v1::route_match::Path::Prefix("/".into()),
        Some("RouteConfiguration \"outbound\": virtual_hosts[0].routes[0].action.clusters: refers to unknown cluster \"nope\"") ; "unknown cluster")]
    #[test_case("c", v1::route_match::Path::Regex("/(".into()),
        Some("RouteConfiguration \"outbound\": virtual_hosts[0].routes[0].match.regex: invalid regex") ; "bad regex")]
    fn route_validation(cluster_ref: &str, path: v1::route_match::Path, error: Option<&str>) {
        let s = set(vec![
            (type_url::CLUSTER, "c", cluster("c")),
            (
                type_url::ROUTE_CONFIGURATION,
                "outbound",
                routes(cluster_ref, path),
            ),
        ]);
        match (Config::build(&s, type_url::ROUTE_CONFIGURATION), error) {
            (Ok(_), None) => {}
            (Err(e), Some(want)) => assert!(e.0.starts_with(want), "{e}"),
            (got, want) => panic!("got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn removing_a_cluster_still_referenced_is_not_refused() {
        let s = set(vec![(
            type_url::ROUTE_CONFIGURATION,
            "outbound",
            routes("gone", v1::route_match::Path::Prefix("/".into())),
        )]);
        assert!(Config::build(&s, type_url::CLUSTER).is_ok());
    }

    #[test]
    fn listener_protocol_and_target_must_agree() {
        let l = v1::Listener {
            name: "outbound-listener".into(),
            address: Some(v1::SocketAddress {
                ip: "127.0.0.1".into(),
                port: 15001,
            }),
            direction: v1::TrafficDirection::Outbound as i32,
            filter_chains: vec![v1::FilterChain {
                name: "explicit-http".into(),
                protocol: v1::Protocol::Tcp as i32,
                target: Some(v1::filter_chain::Target::Http(v1::HttpTarget {
                    route_config_name: "outbound".into(),
                })),
                ..Default::default()
            }],
            tracing: None,
        };
        let s = set(vec![(
            type_url::LISTENER,
            "outbound-listener",
            l.encode_to_vec(),
        )]);
        let e = Config::build(&s, type_url::LISTENER).expect_err("mismatch");
        assert_eq!(
            e.0,
            "Listener \"outbound-listener\": filter_chains[0] \"explicit-http\".target: protocol PROTOCOL_TCP needs a tcp target"
        );
    }

    #[test]
    fn tracing_names_its_collector_cluster() {
        let listener = |tracing: v1::Tracing| v1::Listener {
            name: "outbound-listener".into(),
            address: Some(v1::SocketAddress {
                ip: "127.0.0.1".into(),
                port: 15001,
            }),
            direction: v1::TrafficDirection::Outbound as i32,
            filter_chains: vec![v1::FilterChain {
                name: "explicit-http".into(),
                protocol: v1::Protocol::Http as i32,
                target: Some(v1::filter_chain::Target::Http(v1::HttpTarget {
                    route_config_name: "outbound".into(),
                })),
                ..Default::default()
            }],
            tracing: Some(tracing),
        };
        let good = v1::Tracing {
            collector_cluster: "pipy-tracing-cluster".into(),
            collector_endpoint: "/api/v2/spans".into(),
            sampled_per_million: 1_000_000,
            service_name: "curl.demo".into(),
        };
        let collector = v1::Cluster {
            name: "pipy-tracing-cluster".into(),
            discovery: Some(v1::cluster::Discovery::Dns(v1::DnsName {
                host: "jaeger.fsm-system.svc.cluster.local".into(),
                port: 9411,
            })),
            connect_timeout: Some(prost_types::Duration {
                seconds: 1,
                nanos: 0,
            }),
            upstream_protocol: v1::UpstreamProtocol::Http1 as i32,
            ..Default::default()
        };
        let with = |t: v1::Tracing, cluster: bool| {
            let mut resources = vec![(
                type_url::LISTENER,
                "outbound-listener",
                listener(t).encode_to_vec(),
            )];
            if cluster {
                resources.push((
                    type_url::CLUSTER,
                    "pipy-tracing-cluster",
                    collector.encode_to_vec(),
                ));
            }
            Config::build(&set(resources), type_url::LISTENER)
        };
        let config = with(good.clone(), true).expect("valid");
        let tracing = config.listeners["outbound-listener"]
            .tracing
            .clone()
            .expect("traced");
        let resolved = tracing.collector.as_ref().expect("collector resolved");
        assert_eq!(resolved.host, "jaeger.fsm-system.svc.cluster.local:9411");
        assert_eq!(&*resolved.endpoint, "/api/v2/spans");
        assert_eq!(resolved.connect_timeout, Duration::from_secs(1));

        let e = with(good.clone(), false).expect_err("no cluster");
        assert_eq!(
            e.0,
            "Listener \"outbound-listener\": tracing.collector_cluster: refers to unknown cluster \"pipy-tracing-cluster\""
        );
        let e = with(
            v1::Tracing {
                collector_endpoint: "api/v2/spans".into(),
                ..good.clone()
            },
            true,
        )
        .expect_err("relative endpoint");
        assert!(
            e.0.contains("tracing.collector_endpoint: \"api/v2/spans\" is not an absolute path"),
            "{e}"
        );
        let e = with(
            v1::Tracing {
                sampled_per_million: 1_000_001,
                ..good
            },
            true,
        )
        .expect_err("over a million");
        assert!(e.0.contains("tracing.sampled_per_million"), "{e}");
    }

    #[test]
    fn undecodable_resource_names_itself() {
        let s = set(vec![(type_url::CLUSTER, "c", vec![0xff])]);
        let e = Config::build(&s, type_url::CLUSTER).expect_err("garbage");
        assert!(e.0.starts_with("Cluster \"c\": "), "{e}");
    }

    fn rate_limit(max_tokens: u32, tokens_per_fill: u32, millis: i32) -> v1::LocalRateLimit {
        v1::LocalRateLimit {
            max_tokens,
            tokens_per_fill,
            fill_interval: Some(prost_types::Duration {
                seconds: i64::from(millis / 1000),
                nanos: millis % 1000 * 1_000_000,
            }),
            status: 0,
            response_headers_to_add: vec![],
        }
    }

    /// An inbound route configuration with one virtual host and one route, each limited as
    /// given.
    fn limited(vh: Option<v1::LocalRateLimit>, route: Option<v1::LocalRateLimit>) -> Config {
        try_limited(vh, route).expect("valid")
    }

    fn try_limited(
        vh: Option<v1::LocalRateLimit>,
        route: Option<v1::LocalRateLimit>,
    ) -> Result<Config, ConfigError> {
        let mut rc = v1::RouteConfiguration::decode(&*routes(
            "c",
            v1::route_match::Path::Prefix("/".into()),
        ))
        .expect("decode");
        rc.name = "inbound".into();
        rc.virtual_hosts[0].rate_limit = vh;
        rc.virtual_hosts[0].routes[0].rate_limit = route;
        let s = set(vec![
            (type_url::CLUSTER, "c", cluster("c")),
            (type_url::ROUTE_CONFIGURATION, "inbound", rc.encode_to_vec()),
        ]);
        Config::build(&s, type_url::ROUTE_CONFIGURATION)
    }

    #[test]
    fn rate_limits_parse_with_their_bucket_keys() {
        let mut vh = rate_limit(10, 5, 50);
        vh.response_headers_to_add = vec![v1::ResponseHeader {
            name: "X-RateLimit-Reason".into(),
            value: "local".into(),
        }];
        let mut route = rate_limit(1, 1, 60_000 - 1);
        route.status = 503;
        let config = limited(Some(vh), Some(route));
        let vh = &config.routes["inbound"].virtual_hosts[0];
        let l = vh.rate_limit.as_ref().expect("virtual host limit");
        assert_eq!(l.status, http::StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            l.response_headers,
            vec![(
                http::HeaderName::from_static("x-ratelimit-reason"),
                http::HeaderValue::from_static("local"),
            )]
        );
        assert_eq!(
            l.key,
            BucketKey {
                route_config: Arc::from("inbound"),
                virtual_host: Arc::from("demo/httpbin|14001"),
                scope: Scope::VirtualHost,
                settings: Settings {
                    max_tokens: 10,
                    tokens_per_fill: 5,
                    fill_interval: MIN_FILL_INTERVAL,
                },
            }
        );
        let r = vh.routes[0].rate_limit.as_ref().expect("route limit");
        assert_eq!(r.status, http::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.key.scope, Scope::Route(0));
        assert_eq!(r.key.settings.fill_interval, Duration::from_millis(59_999));
        // Unset stays unset.
        let config = limited(None, None);
        let vh = &config.routes["inbound"].virtual_hosts[0];
        assert!(vh.rate_limit.is_none() && vh.routes[0].rate_limit.is_none());
    }

    fn with<F: FnOnce(&mut v1::LocalRateLimit)>(f: F) -> Option<v1::LocalRateLimit> {
        let mut l = rate_limit(3, 3, 1000);
        f(&mut l);
        Some(l)
    }

    fn header(name: &str, value: &str) -> Option<v1::LocalRateLimit> {
        with(|l| {
            l.response_headers_to_add = vec![
                v1::ResponseHeader {
                    name: "x-ok".into(),
                    value: "fine".into(),
                },
                v1::ResponseHeader {
                    name: name.into(),
                    value: value.into(),
                },
            ]
        })
    }

    #[test_case(with(|l| l.max_tokens = 0), None,
        "virtual_hosts[0].rate_limit.max_tokens: must be at least 1" ; "no tokens")]
    #[test_case(with(|l| l.tokens_per_fill = 0), None,
        "virtual_hosts[0].rate_limit.tokens_per_fill: must be at least 1" ; "no fill")]
    #[test_case(with(|l| l.fill_interval = None), None,
        "virtual_hosts[0].rate_limit.fill_interval: is not set" ; "no interval")]
    #[test_case(with(|l| l.fill_interval = Some(prost_types::Duration { seconds: 0, nanos: 49_999_999 })), None,
        "virtual_hosts[0].rate_limit.fill_interval: 49.999999ms is less than 50ms" ; "short interval")]
    #[test_case(with(|l| l.fill_interval = Some(prost_types::Duration { seconds: -1, nanos: 0 })), None,
        "virtual_hosts[0].rate_limit.fill_interval: -1s 0ns is not a valid duration" ; "negative interval")]
    #[test_case(with(|l| l.status = 399), None,
        "virtual_hosts[0].rate_limit.status: 399 is not in 400-599 (0 means 429)" ; "status too low")]
    #[test_case(with(|l| l.status = 600), None,
        "virtual_hosts[0].rate_limit.status: 600 is not in 400-599 (0 means 429)" ; "status too high")]
    #[test_case(header("bad name", "v"), None,
        "virtual_hosts[0].rate_limit.response_headers_to_add[1].name: \"bad name\" is not a header name" ; "header name")]
    #[test_case(header("", "v"), None,
        "virtual_hosts[0].rate_limit.response_headers_to_add[1].name: \"\" is not a header name" ; "empty header name")]
    #[test_case(None, header("x-why", "two\nlines"),
        "virtual_hosts[0].routes[0].rate_limit.response_headers_to_add[1].value: \"two\\nlines\" is not a valid header value" ; "route header value")]
    #[test_case(None, with(|l| l.max_tokens = 0),
        "virtual_hosts[0].routes[0].rate_limit.max_tokens: must be at least 1" ; "route field")]
    fn rate_limit_errors_name_their_field(
        vh: Option<v1::LocalRateLimit>,
        route: Option<v1::LocalRateLimit>,
        want: &str,
    ) {
        let e = try_limited(vh, route).expect_err("invalid");
        assert_eq!(e.0, format!("RouteConfiguration \"inbound\": {want}"));
    }

    #[test_case(400 ; "lowest")]
    #[test_case(429 ; "too many")]
    #[test_case(599 ; "highest")]
    fn rate_limit_statuses_in_range_are_kept(status: u32) {
        let config = limited(with(|l| l.status = status), None);
        let l = config.routes["inbound"].virtual_hosts[0]
            .rate_limit
            .as_ref();
        assert_eq!(l.map(|l| u32::from(l.status.as_u16())), Some(status));
    }

    #[test]
    fn all_circuit_breakers_are_kept() {
        let build = |b: Option<v1::CircuitBreakers>| {
            let mut c = v1::Cluster::decode(&*cluster("c")).expect("decode");
            c.circuit_breakers = b;
            let s = set(vec![(type_url::CLUSTER, "c", c.encode_to_vec())]);
            let config = Config::build(&s, type_url::CLUSTER).expect("valid");
            config.clusters["c"].breakers
        };
        assert_eq!(build(None), CircuitBreakers::default());
        assert_eq!(
            build(Some(v1::CircuitBreakers {
                max_connections: Some(1),
                max_pending_requests: Some(0),
                max_requests: Some(3),
                max_requests_per_connection: Some(4),
                max_retries: Some(5),
            })),
            CircuitBreakers {
                max_connections: Some(1),
                max_pending_requests: Some(0),
                max_requests: Some(3),
                max_requests_per_connection: Some(4),
                max_retries: Some(5),
            }
        );
        // Envoy reads a per-connection limit of 0 as none.
        let b = build(Some(v1::CircuitBreakers {
            max_requests_per_connection: Some(0),
            ..Default::default()
        }));
        assert_eq!(b, CircuitBreakers::default());
    }

    /// An inbound listener with one plaintext ingress TCP chain, edited by `f`.
    fn ingress_listener(f: impl FnOnce(&mut v1::FilterChain)) -> Result<Config, ConfigError> {
        let mut fc = v1::FilterChain {
            name: "ingress".into(),
            r#match: Some(v1::FilterChainMatch {
                destination_port: 8080,
                destination_ip_ranges: vec![],
                source_ip_ranges: vec!["10.0.0.0/8".into(), "fd00::/8".into()],
                transport_protocol: v1::TransportProtocol::Plaintext as i32,
                server_names: vec![],
            }),
            protocol: v1::Protocol::Tcp as i32,
            target: Some(v1::filter_chain::Target::Tcp(v1::TcpTarget {
                clusters: vec![v1::WeightedCluster {
                    name: "c".into(),
                    weight: 1,
                }],
                connect_authority: String::new(),
            })),
            allowed_sources: Some(v1::AllowedSources {
                any: false,
                identities: vec![],
                source_ip_ranges: vec!["10.1.2.3/32".into()],
                principals: vec![],
                principals_from: vec![],
            }),
            tls: None,
        };
        f(&mut fc);
        let l = v1::Listener {
            name: "inbound-listener".into(),
            address: Some(v1::SocketAddress {
                ip: "127.0.0.1".into(),
                port: 15003,
            }),
            direction: v1::TrafficDirection::Inbound as i32,
            filter_chains: vec![fc],
            tracing: None,
        };
        let s = set(vec![
            (type_url::CLUSTER, "c", cluster("c")),
            (type_url::LISTENER, "inbound-listener", l.encode_to_vec()),
        ]);
        Config::build(&s, type_url::LISTENER)
    }

    #[test]
    fn source_ranges_and_transport_are_parsed() {
        let config = ingress_listener(|_| {}).expect("valid");
        let chain = &config.listeners["inbound-listener"].chains[0];
        assert_eq!(
            chain.sources,
            vec![
                parse_cidr("10.0.0.0/8").expect("cidr"),
                parse_cidr("fd00::/8").expect("cidr")
            ]
        );
        assert_eq!(chain.transport, TransportProtocol::Plaintext);
        let ChainKind::Tcp(t) = &chain.kind else {
            panic!("tcp chain");
        };
        assert_eq!(
            t.allowed.sources,
            vec![parse_cidr("10.1.2.3/32").expect("cidr")]
        );
        for (value, want) in [
            (v1::TransportProtocol::Any, TransportProtocol::Any),
            (v1::TransportProtocol::Tls, TransportProtocol::Tls),
        ] {
            let config = ingress_listener(|fc| {
                if let Some(m) = fc.r#match.as_mut() {
                    m.transport_protocol = value as i32;
                }
            })
            .expect("valid");
            assert_eq!(
                config.listeners["inbound-listener"].chains[0].transport,
                want
            );
        }
        // No match at all: any client, any transport.
        let config = ingress_listener(|fc| fc.r#match = None).expect("valid");
        let chain = &config.listeners["inbound-listener"].chains[0];
        assert!(chain.sources.is_empty() && chain.transport == TransportProtocol::Any);
    }

    fn with_match(f: impl FnOnce(&mut v1::FilterChainMatch)) -> impl FnOnce(&mut v1::FilterChain) {
        move |fc| f(fc.r#match.get_or_insert_with(Default::default))
    }

    #[test_case(with_match(|m| m.source_ip_ranges[1] = "fd00::/129".into()),
        "match.source_ip_ranges[1]: \"fd00::/129\": prefix length is not in 0-128" ; "prefix too long")]
    #[test_case(with_match(|m| m.source_ip_ranges[0] = "10.0.0.300/8".into()),
        "match.source_ip_ranges[0]: \"10.0.0.300/8\": \"10.0.0.300\" is not an IP address" ; "bad address")]
    #[test_case(with_match(|m| m.source_ip_ranges[0] = "10.0.0.1".into()),
        "match.source_ip_ranges[0]: \"10.0.0.1\" is not a CIDR range (no /)" ; "no prefix")]
    #[test_case(with_match(|m| m.destination_ip_ranges = vec!["x/1".into()]),
        "match.destination_ip_ranges[0]: \"x/1\": \"x\" is not an IP address" ; "destination still checked")]
    #[test_case(with_match(|m| m.transport_protocol = 3),
        "match.transport_protocol: unknown value 3" ; "unknown transport")]
    #[test_case(with_match(|m| m.server_names = vec!["api.example.com".into(), "".into()]),
        "match.server_names[1]: is empty" ; "empty server name")]
    #[test_case(with_match(|m| m.server_names = vec!["*".into()]),
        "match.server_names[0]: \"*\": the only wildcard is a leading \"*.\" (\"*.example.com\")" ; "star alone")]
    #[test_case(with_match(|m| m.server_names = vec!["*.*.example.com".into()]),
        "match.server_names[0]: \"*.*.example.com\": the only wildcard is a leading \"*.\" (\"*.example.com\")" ; "two stars")]
    #[test_case(with_match(|m| m.server_names = vec!["x".into(), "api.*.com".into()]),
        "match.server_names[1]: \"api.*.com\": the only wildcard is a leading \"*.\" (\"*.example.com\")" ; "inner star")]
    #[test_case(with_match(|m| m.server_names = vec!["*example.com".into()]),
        "match.server_names[0]: \"*example.com\": the only wildcard is a leading \"*.\" (\"*.example.com\")" ; "star without dot")]
    #[test_case(with_match(|m| m.server_names = vec!["*.".into()]),
        "match.server_names[0]: \"*.\": the only wildcard is a leading \"*.\" (\"*.example.com\")" ; "star dot alone")]
    #[test_case(|fc: &mut v1::FilterChain| if let Some(a) = fc.allowed_sources.as_mut() {
            a.source_ip_ranges.push("10.0.0.0/-1".into());
        },
        "allowed_sources.source_ip_ranges[1]: \"10.0.0.0/-1\": prefix length is not in 0-32" ; "chain allowed sources")]
    fn ingress_chain_errors_name_their_field(f: impl FnOnce(&mut v1::FilterChain), want: &str) {
        let e = ingress_listener(f).expect_err("invalid");
        assert_eq!(
            e.0,
            format!("Listener \"inbound-listener\": filter_chains[0] \"ingress\".{want}")
        );
    }

    #[test]
    fn server_names_are_parsed_lower_cased() {
        let config = ingress_listener(with_match(|m| {
            m.server_names = vec!["API.Example.com".into(), "*.Example.COM".into()]
        }))
        .expect("valid");
        assert_eq!(
            config.listeners["inbound-listener"].chains[0].server_names,
            vec![
                ServerName::Exact("api.example.com".into()),
                ServerName::Suffix(".example.com".into()),
            ]
        );
        let config = ingress_listener(|_| {}).expect("valid");
        assert!(
            config.listeners["inbound-listener"].chains[0]
                .server_names
                .is_empty()
        );
    }

    #[test_case("api.example.com", "API.EXAMPLE.COM", Some(usize::MAX) ; "exact any case")]
    #[test_case("api.example.com", "www.example.com", None ; "exact other")]
    #[test_case("*.example.com", "www.Example.com", Some(12) ; "suffix")]
    #[test_case("*.example.com", "a.b.example.com", Some(12) ; "suffix deeper")]
    #[test_case("*.example.com", "example.com", None ; "not the bare domain")]
    #[test_case("*.example.com", ".example.com", None ; "not an empty label")]
    #[test_case("*.example.com", "badexample.com", None ; "not a lookalike")]
    #[test_case("*.example.com", "ü.example.com", Some(12) ; "multibyte label")]
    #[test_case("*.example.com", "éxample.com", None ; "multibyte lookalike")]
    fn server_name_rank(entry: &str, sni: &str, want: Option<usize>) {
        assert_eq!(ServerName::parse(entry).expect("valid").rank(sni), want);
    }

    #[test]
    fn route_source_ranges_are_parsed_and_named_in_errors() {
        let build = |ranges: &[&str]| {
            let mut rc = v1::RouteConfiguration::decode(&*routes(
                "c",
                v1::route_match::Path::Prefix("/".into()),
            ))
            .expect("decode");
            rc.name = "ingress".into();
            rc.virtual_hosts[0].routes[0].allowed_sources = Some(v1::AllowedSources {
                any: false,
                identities: vec![],
                source_ip_ranges: ranges.iter().map(|r| r.to_string()).collect(),
                principals: vec![],
                principals_from: vec![],
            });
            let s = set(vec![
                (type_url::CLUSTER, "c", cluster("c")),
                (type_url::ROUTE_CONFIGURATION, "ingress", rc.encode_to_vec()),
            ]);
            Config::build(&s, type_url::ROUTE_CONFIGURATION)
        };
        let config = build(&["10.0.0.0/8"]).expect("valid");
        let allowed = config.routes["ingress"].virtual_hosts[0].routes[0]
            .allowed
            .clone()
            .expect("allowed");
        assert_eq!(
            allowed.sources,
            vec![parse_cidr("10.0.0.0/8").expect("cidr")]
        );
        let e = build(&["10.0.0.0/8", "ingress"]).expect_err("invalid");
        assert_eq!(
            e.0,
            "RouteConfiguration \"ingress\": virtual_hosts[0].routes[0].allowed_sources.source_ip_ranges[1]: \"ingress\" is not a CIDR range (no /)"
        );
    }

    #[test]
    fn allowed_admits_any_listed_identity_or_source_address() {
        let ip = |s: &str| -> IpAddr { s.parse().expect("ip") };
        let curl = Peer::from(Identity::new("curl", "demo"));
        let other = Peer::from(Identity::new("bookbuyer", "demo"));
        let ingress = Allowed {
            any: false,
            identities: vec![Identity::new("curl", "demo")],
            sources: vec![
                parse_cidr("10.1.0.0/16").expect("cidr"),
                parse_cidr("fd00::1/128").expect("cidr"),
            ],
            ..Allowed::default()
        };
        assert!(ingress.admits(None, ip("10.1.200.3")));
        assert!(ingress.admits(Some(&other), ip("10.1.0.1")));
        assert!(ingress.admits(None, ip("fd00::1")));
        assert!(ingress.admits(Some(&curl), ip("192.168.0.1")));
        assert!(!ingress.admits(None, ip("10.2.0.1")));
        assert!(!ingress.admits(Some(&other), ip("fd00::2")));
        // An IPv4 range never contains an IPv6 address and vice versa.
        assert!(!ingress.admits(None, ip("::ffff:10.1.0.1")));
        let nobody = Allowed::default();
        assert!(!nobody.admits(Some(&curl), ip("10.1.0.1")));
        let any = Allowed {
            any: true,
            ..Allowed::default()
        };
        assert!(any.admits(None, ip("203.0.113.9")));
    }

    #[test]
    fn allowed_admits_principals_named_by_the_client_certificate() {
        let ip: IpAddr = "10.1.0.1".parse().expect("ip");
        let principals = |names: &[&str]| Allowed {
            principals: names
                .iter()
                .map(|n| Principal::parse(n).expect("principal"))
                .collect(),
            ..Allowed::default()
        };
        let allowed = principals(&["Ingress.Example.com", "https://edge.example.com/ingress"]);
        let peer = |dns: &[&str], uris: &[&str]| Peer {
            identity: None,
            dns_names: dns.iter().map(|d| d.to_ascii_lowercase()).collect(),
            uris: uris.iter().map(|u| u.to_string()).collect(),
        };
        // DNS names: any case, on either side.
        assert!(allowed.admits(Some(&peer(&["ingress.example.com"], &[])), ip));
        assert!(allowed.admits(Some(&peer(&["INGRESS.example.com"], &[])), ip));
        assert!(allowed.admits(
            Some(&peer(&["a.example.com", "ingress.example.com"], &[])),
            ip
        ));
        // URIs: exactly.
        assert!(allowed.admits(Some(&peer(&[], &["https://edge.example.com/ingress"])), ip));
        assert!(!allowed.admits(Some(&peer(&[], &["https://EDGE.example.com/ingress"])), ip));
        assert!(!allowed.admits(Some(&peer(&[], &["https://edge.example.com/ingress/"])), ip));
        // No SAN matching: refused, whatever the workload identity.
        assert!(!allowed.admits(Some(&peer(&["other.example.com"], &[])), ip));
        let workload = Peer {
            identity: Some(Identity::new("ingress", "demo")),
            ..peer(
                &["other.example.com"],
                &["spiffe://cluster.local/ns/demo/sa/ingress"],
            )
        };
        assert!(!allowed.admits(Some(&workload), ip));
        // Without a verified certificate principals admit no one.
        assert!(!allowed.admits(None, ip));
        // Identities still need the workload identity, not a name.
        let by_identity = Allowed {
            identities: vec![Identity::new("ingress", "demo")],
            ..Allowed::default()
        };
        assert!(by_identity.admits(Some(&workload), ip));
        assert!(!by_identity.admits(Some(&peer(&["ingress.demo"], &[])), ip));
    }

    #[test]
    fn principals_from_need_the_name_and_the_address_together() {
        let ip = |s: &str| -> IpAddr { s.parse().expect("ip") };
        let allowed = Allowed::from_proto(&v1::AllowedSources {
            principals_from: vec![v1::PrincipalsFrom {
                principals: vec!["Ingress-Nginx.ingress.cluster.local".into()],
                source_ip_ranges: vec!["10.1.0.0/16".into()],
            }],
            ..Default::default()
        })
        .expect("valid");
        let named = |dns: &str| Peer {
            identity: None,
            dns_names: vec![dns.into()],
            uris: vec![],
        };
        let nginx = named("ingress-nginx.ingress.cluster.local");
        assert!(allowed.admits(Some(&nginx), ip("10.1.2.3")));
        // The right certificate from elsewhere, another from the right address, or none.
        assert!(!allowed.admits(Some(&nginx), ip("10.2.0.1")));
        assert!(!allowed.admits(Some(&named("other.example.com")), ip("10.1.2.3")));
        assert!(!allowed.admits(None, ip("10.1.2.3")));
        // A bad entry is named by its place.
        let err = Allowed::from_proto(&v1::AllowedSources {
            principals_from: vec![v1::PrincipalsFrom {
                principals: vec!["a.example.com".into()],
                source_ip_ranges: vec!["10.1.0.0".into()],
            }],
            ..Default::default()
        })
        .expect_err("no prefix length");
        assert_eq!(err.0, "principals_from[0].source_ip_ranges[0]", "{err:?}");
    }

    #[test]
    fn principals_are_parsed_and_named_in_errors() {
        assert_eq!(
            Principal::parse("Ingress.Example.COM"),
            Ok(Principal::Dns("ingress.example.com".into()))
        );
        assert_eq!(
            Principal::parse("spiffe://Cluster.local/ns/a/sa/B"),
            Ok(Principal::Uri("spiffe://Cluster.local/ns/a/sa/B".into()))
        );
        assert_eq!(Principal::parse(""), Err("is empty".to_string()));
        // On a route and on a TCP filter chain.
        let build = |principals: &[&str]| {
            let mut rc = v1::RouteConfiguration::decode(&*routes(
                "c",
                v1::route_match::Path::Prefix("/".into()),
            ))
            .expect("decode");
            rc.name = "inbound".into();
            rc.virtual_hosts[0].routes[0].allowed_sources = Some(v1::AllowedSources {
                principals: principals.iter().map(|p| p.to_string()).collect(),
                ..Default::default()
            });
            let s = set(vec![
                (type_url::CLUSTER, "c", cluster("c")),
                (type_url::ROUTE_CONFIGURATION, "inbound", rc.encode_to_vec()),
            ]);
            Config::build(&s, type_url::ROUTE_CONFIGURATION)
        };
        let config = build(&["Ingress.Example.com", "urn:example:ingress"]).expect("valid");
        let allowed = config.routes["inbound"].virtual_hosts[0].routes[0]
            .allowed
            .clone()
            .expect("allowed");
        assert_eq!(
            allowed.principals,
            vec![
                Principal::Dns("ingress.example.com".into()),
                Principal::Uri("urn:example:ingress".into())
            ]
        );
        let e = build(&[""]).expect_err("empty");
        assert_eq!(
            e.0,
            "RouteConfiguration \"inbound\": virtual_hosts[0].routes[0].allowed_sources.principals[0]: is empty"
        );
        let e = ingress_listener(|fc| {
            if let Some(a) = fc.allowed_sources.as_mut() {
                a.principals = vec!["ingress.example.com".into(), String::new()];
            }
        })
        .expect_err("empty");
        assert_eq!(
            e.0,
            "Listener \"inbound-listener\": filter_chains[0] \"ingress\".allowed_sources.principals[1]: is empty"
        );
        let config = ingress_listener(|fc| {
            if let Some(a) = fc.allowed_sources.as_mut() {
                a.principals = vec!["INGRESS.example.com".into()];
            }
        })
        .expect("valid");
        let ChainKind::Tcp(t) = &config.listeners["inbound-listener"].chains[0].kind else {
            panic!("tcp chain");
        };
        assert_eq!(
            t.allowed.principals,
            vec![Principal::Dns("ingress.example.com".into())]
        );
        assert!(!config.listeners["inbound-listener"].chains[0].require_client_certificate);
    }

    fn passthrough(tls: bool) -> Result<Config, ConfigError> {
        let c = v1::Cluster {
            name: "passthrough-outbound".into(),
            discovery: Some(v1::cluster::Discovery::OriginalDestination(
                v1::OriginalDestination {},
            )),
            upstream_protocol: v1::UpstreamProtocol::Tcp as i32,
            tls: tls.then(Default::default),
            ..Default::default()
        };
        // A ClusterLoadAssignment of the same name is ignored.
        let cla = v1::ClusterLoadAssignment {
            cluster_name: "passthrough-outbound".into(),
            endpoints: vec![v1::Endpoint {
                address: Some(v1::SocketAddress {
                    ip: "10.0.0.1".into(),
                    port: 80,
                }),
                ..Default::default()
            }],
        };
        let s = set(vec![
            (type_url::CLUSTER, "passthrough-outbound", c.encode_to_vec()),
            (
                type_url::CLUSTER_LOAD_ASSIGNMENT,
                "passthrough-outbound",
                cla.encode_to_vec(),
            ),
        ]);
        Config::build(&s, type_url::CLUSTER)
    }

    #[test]
    fn original_destination_cluster_has_no_endpoints() {
        let config = passthrough(false).expect("valid");
        let c = &config.clusters["passthrough-outbound"];
        assert_eq!(c.discovery, Discovery::OriginalDestination);
        assert!(c.endpoints.is_empty() && c.tls.is_none());
        assert_eq!(c.protocol, UpstreamProtocol::Tcp);
        // HTTP requests to it go as HTTP/1.1.
        assert_eq!(c.http_protocol(), UpstreamProtocol::Http1);
        let eds = set(vec![(type_url::CLUSTER, "c", cluster("c"))]);
        let config = Config::build(&eds, type_url::CLUSTER).expect("valid");
        assert_eq!(config.clusters["c"].discovery, Discovery::Listed);
    }

    #[test]
    fn original_destination_cluster_with_tls_is_refused() {
        let e = passthrough(true).expect_err("tls");
        assert_eq!(
            e.0,
            "Cluster \"passthrough-outbound\": tls: is set on an original_destination cluster (egress passthrough is plaintext)"
        );
    }

    /// A DNS cluster `egress|<host>:<port>` with `tls` set or not, and a ClusterLoadAssignment of
    /// the same name (ignored).
    fn dns_cluster(host: &str, port: u32, tls: bool) -> Result<Config, ConfigError> {
        let c = v1::Cluster {
            name: "egress|httpbin.org:80".into(),
            discovery: Some(v1::cluster::Discovery::Dns(v1::DnsName {
                host: host.into(),
                port,
            })),
            upstream_protocol: v1::UpstreamProtocol::Http1 as i32,
            tls: tls.then(Default::default),
            ..Default::default()
        };
        let cla = v1::ClusterLoadAssignment {
            cluster_name: "egress|httpbin.org:80".into(),
            endpoints: vec![v1::Endpoint {
                address: Some(v1::SocketAddress {
                    ip: "10.0.0.1".into(),
                    port: 80,
                }),
                ..Default::default()
            }],
        };
        let s = set(vec![
            (
                type_url::CLUSTER,
                "egress|httpbin.org:80",
                c.encode_to_vec(),
            ),
            (
                type_url::CLUSTER_LOAD_ASSIGNMENT,
                "egress|httpbin.org:80",
                cla.encode_to_vec(),
            ),
        ]);
        Config::build(&s, type_url::CLUSTER)
    }

    #[test]
    fn dns_cluster_keeps_its_name_and_has_no_endpoints() {
        let config = dns_cluster("httpbin.org", 80, false).expect("valid");
        let c = &config.clusters["egress|httpbin.org:80"];
        assert_eq!(
            c.discovery,
            Discovery::Dns(DnsName {
                host: Arc::from("httpbin.org"),
                port: 80,
            })
        );
        assert!(c.endpoints.is_empty() && c.tls.is_none());
        assert_eq!(c.http_protocol(), UpstreamProtocol::Http1);
        let config = dns_cluster("localhost", 65535, false).expect("valid");
        let Discovery::Dns(name) = &config.clusters["egress|httpbin.org:80"].discovery else {
            panic!("dns");
        };
        assert_eq!(name.to_string(), "localhost:65535");
    }

    #[test_case("httpbin.org", 80, true,
        "tls: is set on a dns cluster (egress to a name is plaintext)" ; "tls")]
    #[test_case("", 80, false, "dns.host: is empty" ; "empty host")]
    #[test_case("*.httpbin.org", 80, false,
        "dns.host: \"*.httpbin.org\" is a wildcard, not a name" ; "wildcard host")]
    #[test_case("*", 443, false, "dns.host: \"*\" is a wildcard, not a name" ; "star host")]
    #[test_case("httpbin.org", 0, false, "dns.port: 0 is not in 1-65535" ; "port 0")]
    #[test_case("httpbin.org", 65536, false, "dns.port: 65536 is not in 1-65535" ; "port too big")]
    fn dns_cluster_errors_name_their_field(host: &str, port: u32, tls: bool, want: &str) {
        let e = dns_cluster(host, port, tls).expect_err("invalid");
        assert_eq!(e.0, format!("Cluster \"egress|httpbin.org:80\": {want}"));
    }

    #[test]
    fn a_cluster_without_discovery_lists_every_kind() {
        let c = v1::Cluster {
            name: "c".into(),
            upstream_protocol: v1::UpstreamProtocol::Http1 as i32,
            ..Default::default()
        };
        let s = set(vec![(type_url::CLUSTER, "c", c.encode_to_vec())]);
        let e = Config::build(&s, type_url::CLUSTER).expect_err("no discovery");
        assert_eq!(
            e.0,
            "Cluster \"c\": discovery: none of eds, static_local, original_destination, dns is set"
        );
    }

    /// An outbound route configuration whose virtual hosts have these domains.
    fn with_domains(domains: &[&[&str]]) -> Result<Config, ConfigError> {
        let mut rc = v1::RouteConfiguration::decode(&*routes(
            "c",
            v1::route_match::Path::Prefix("/".into()),
        ))
        .expect("decode");
        let template = rc.virtual_hosts[0].clone();
        rc.virtual_hosts = domains
            .iter()
            .enumerate()
            .map(|(i, d)| v1::VirtualHost {
                name: format!("vh{i}"),
                domains: d.iter().map(|d| d.to_string()).collect(),
                ..template.clone()
            })
            .collect();
        let s = set(vec![
            (type_url::CLUSTER, "c", cluster("c")),
            (
                type_url::ROUTE_CONFIGURATION,
                "outbound",
                rc.encode_to_vec(),
            ),
        ]);
        Config::build(&s, type_url::ROUTE_CONFIGURATION)
    }

    #[test]
    fn star_alone_is_the_fallback_virtual_host() {
        let config = with_domains(&[&["httpbin"], &["*"]]).expect("valid");
        let t = &config.routes["outbound"];
        assert_eq!(t.fallback, Some(1));
        assert!(!t.domains.contains_key("*"));
        assert_eq!(t.domains.get("httpbin"), Some(&0));
        let config = with_domains(&[&["httpbin"]]).expect("valid");
        assert_eq!(config.routes["outbound"].fallback, None);
    }

    #[test_case(&[&["*"], &["httpbin"], &["x", "*"]],
        "virtual_hosts[2].domains[1]: \"*\" also appears in virtual_hosts[0]" ; "star twice")]
    #[test_case(&[&["*", "*"]],
        "virtual_hosts[0].domains[1]: \"*\" also appears in virtual_hosts[0]" ; "star twice in one virtual host")]
    #[test_case(&[&["httpbin"], &["*.example.com"]],
        "virtual_hosts[1].domains[0]: \"*.example.com\": the only wildcard is \"*\" alone" ; "suffix wildcard")]
    #[test_case(&[&["httpbin:*"]],
        "virtual_hosts[0].domains[0]: \"httpbin:*\": the only wildcard is \"*\" alone" ; "port wildcard")]
    #[test_case(&[&["httpbin"], &["HTTPBIN"]],
        "virtual_hosts[1].domains[0]: \"HTTPBIN\" appears in two virtual hosts" ; "duplicate exact still refused")]
    fn bad_wildcards_name_their_field(domains: &[&[&str]], want: &str) {
        let e = with_domains(domains).expect_err("invalid");
        assert_eq!(e.0, format!("RouteConfiguration \"outbound\": {want}"));
    }

    #[test_case("10.96.0.10/32", "10.96.0.10", true)]
    #[test_case("10.96.0.10/32", "10.96.0.11", false)]
    #[test_case("10.0.0.0/8", "10.200.1.1", true)]
    #[test_case("0.0.0.0/0", "1.2.3.4", true)]
    #[test_case("fd00::/8", "fd00::1", true)]
    #[test_case("fd00::/8", "10.0.0.1", false)]
    fn cidr_contains(cidr: &str, ip: &str, expected: bool) {
        let c = parse_cidr(cidr).expect("cidr");
        assert_eq!(c.contains(ip.parse().expect("ip")), expected);
    }
}
