//! Pure compiler from catalog and proxy to the per-proxy mesh IR.
//!
//! [`compile`] is a deterministic function of a [`Catalog`] and a [`ProxyRef`]: no I/O, no clock,
//! no randomness, every collection sorted. It covers permissive traffic mode today: every meshed
//! service can reach every other one, HTTP ports get L7 routes and TCP ports plain TCP proxying.
//! In SMI mode (permissive off) inbound traffic is denied until SMI policies allow it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use fsm_catalog::{Catalog, PodRecord, ServicePortRecord, ServiceRecord};
use fsm_crds::config::v1alpha3::{FeatureFlags, LocalProxyMode, MeshConfig, TracingSpec};
use fsm_crds::policy::v1alpha1::{
    AccessControl, BackendSpec, Egress as EgressPolicy, EgressSourceKind, HttpLocalRateLimitSpec,
    IngressBackend, IngressSourceKind, IngressSourceSpec, PortProtocol, Retry,
    TcpLocalRateLimitSpec, UpstreamTrafficSetting,
};
use fsm_crds::smi::access::v1alpha3::{TrafficTarget, TrafficTargetRuleKind};
use fsm_crds::smi::specs::v1alpha4::{HTTPRouteGroup, HttpMatch, TCPRoute};
use fsm_crds::smi::split::v1alpha4::TrafficSplit;
use fsm_errcode::{ErrCode, HasErrCode};
use fsm_ir::{
    AllowedSources, Bypass, CircuitBreaker, Cluster, ClusterKind, ClusterName, Egress,
    EgressHttpHost, EgressTcpPort, EgressTlsPort, Endpoint, FsmLevel, HttpRoute, InboundPort,
    InboundService, LocalRateLimit, LogLevel, MeshSettings, OutboundDetail, OutboundRetry,
    OutboundService, PathMatch, PrincipalsFrom, Protocol, ProxyInfo, ProxyIr, ResponseHeader,
    RetryPolicy, RouteMatch, ServiceIdentity, ServiceOutbound, ServiceRef, Tracing,
    WeightedCluster, WorkloadRef,
};

mod view;
pub use view::{MeshView, ProxyScope, ViewEntry};

/// Trust domain of service identities and certificates: the one mesh-wide constant, re-exported
/// under the name the controller already uses.
pub use fsm_identity::TRUST_DOMAIN;
/// How long a proxy waits for a TCP connection to an upstream.
const CONNECT_TIMEOUT_MS: u64 = 1000;

/// The proxy to compile for, as identified by its node id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyRef {
    pub uuid: String,
    pub service_account: String,
    pub namespace: String,
}

/// Why a proxy cannot be programmed at all.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CompileError {
    #[error("no pod carries label fsm-proxy-uuid={uuid}")]
    PodNotFound { uuid: String },
    /// The proxy's pod copies a UUID another pod holds.
    #[error("{0}")]
    UuidHeldByAnotherPod(fsm_catalog::UuidConflict),
    #[error(
        "pod {namespace}/{pod} runs as service account {actual:?} but the proxy's node id says {claimed:?}"
    )]
    ServiceAccountMismatch {
        namespace: String,
        pod: String,
        claimed: String,
        actual: String,
    },
    #[error(
        "pod {namespace}/{pod} is in namespace {namespace} but the proxy's node id says {claimed:?}"
    )]
    NamespaceMismatch {
        namespace: String,
        pod: String,
        claimed: String,
    },
    #[error("pod {namespace}/{pod} has no status.podIP yet")]
    NoPodIp { namespace: String, pod: String },
    #[error(
        "pod {namespace}/{pod} is not part of mesh: namespace not monitored or sidecar injection disabled"
    )]
    NotMeshed { namespace: String, pod: String },
}

impl HasErrCode for CompileError {
    fn err_code(&self) -> ErrCode {
        match self {
            // The pod holding the proxy's UUID is in another namespace than its identity names:
            // no pod of that namespace holds it (FSM's E5010 is only a service account that
            // differs).
            CompileError::PodNotFound { .. } | CompileError::NamespaceMismatch { .. } => {
                ErrCode::E5002
            }
            CompileError::UuidHeldByAnotherPod(_) => ErrCode::E5004,
            CompileError::ServiceAccountMismatch { .. } => ErrCode::E5010,
            CompileError::NoPodIp { .. } | CompileError::NotMeshed { .. } => ErrCode::E5007,
        }
    }
}

impl CompileError {
    /// Whether the proxy's identity matches no pod (rather than its pod not being ready): its
    /// streams are refused, not kept on their last configuration.
    pub fn is_identity_refusal(&self) -> bool {
        matches!(
            self,
            CompileError::PodNotFound { .. }
                | CompileError::UuidHeldByAnotherPod(_)
                | CompileError::ServiceAccountMismatch { .. }
                | CompileError::NamespaceMismatch { .. }
        )
    }
}

/// A problem that leaves part of the configuration out but does not stop the proxy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Warning {
    pub code: ErrCode,
    pub message: String,
}

/// The IR of one proxy and what had to be left out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compiled {
    pub ir: ProxyIr,
    pub warnings: Vec<Warning>,
}

/// Compiles the configuration of one proxy.
pub fn compile(catalog: &Catalog, proxy: &ProxyRef) -> Result<Compiled, CompileError> {
    compile_with_view(
        catalog,
        proxy,
        &MeshView::build(catalog),
        OutboundDetail::All,
    )
}

/// Compiles one proxy against a [`MeshView`] of the same catalog: only what is the proxy's own
/// (its pod, inbound ports and local clusters) is computed here; what it may reach comes from
/// the view, computed once for every proxy, and is copied into the IR as far as `detail` asks
/// (an adapter's own part may need only the TCP services: copying all of them for every proxy
/// would make each proxy cost as much as the whole mesh). A transparent proxy gets every service
/// port whatever `detail` says: its listeners match each port by its original destination, in
/// every data plane.
pub fn compile_with_view(
    catalog: &Catalog,
    proxy: &ProxyRef,
    view: &MeshView,
    detail: OutboundDetail,
) -> Result<Compiled, CompileError> {
    let pod = catalog
        .pod_by_proxy_uuid(&proxy.uuid)
        .ok_or_else(|| CompileError::PodNotFound {
            uuid: proxy.uuid.clone(),
        })?;
    let pod_namespace = pod.namespace().to_owned();
    let pod_name = pod.name().to_owned();
    let owner_matches =
        pod_namespace == proxy.namespace && pod.service_account() == proxy.service_account;
    if !owner_matches
        && let Some(conflict) =
            catalog.uuid_conflict_for(&proxy.uuid, &proxy.namespace, &proxy.service_account)
    {
        // The proxy is the sidecar of a pod that copied the owner's UUID label.
        return Err(CompileError::UuidHeldByAnotherPod(conflict));
    }
    if pod_namespace != proxy.namespace {
        return Err(CompileError::NamespaceMismatch {
            namespace: pod_namespace,
            pod: pod_name,
            claimed: proxy.namespace.clone(),
        });
    }
    let service_account = pod.service_account().to_owned();
    if service_account != proxy.service_account {
        return Err(CompileError::ServiceAccountMismatch {
            namespace: pod_namespace,
            pod: pod_name,
            claimed: proxy.service_account.clone(),
            actual: service_account,
        });
    }
    if !catalog.pod_has_sidecar(&pod_namespace, &pod_name) {
        return Err(CompileError::NotMeshed {
            namespace: pod_namespace,
            pod: pod_name,
        });
    }
    let pod_ip: IpAddr = pod.ip().ok_or_else(|| CompileError::NoPodIp {
        namespace: pod_namespace.clone(),
        pod: pod_name.clone(),
    })?;

    let mesh_config = catalog.mesh_config();
    let mesh = mesh_settings(&mesh_config, &catalog.settings().fsm_namespace);
    let mut compiler = Compiler {
        catalog,
        mesh: &mesh,
        flags: &mesh_config.spec.feature_flags,
        clusters: BTreeMap::new(),
        warnings: unknown_sidecar_log_level(&mesh_config)
            .into_iter()
            .collect(),
    };
    // MeshConfig `sidecar.localProxyMode`: FSM's default reaches the application on localhost
    // (it listens on all addresses, and FSM's iptables rules leave the sidecar's localhost
    // connections alone); `PodIP` is for applications bound to the pod address only.
    let app_ip = match mesh_config.spec.sidecar.local_proxy_mode {
        LocalProxyMode::Localhost if pod_ip.is_ipv6() => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        LocalProxyMode::Localhost => IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        LocalProxyMode::PodIp => pod_ip,
    };
    // What the pod's fsm-init rules leave alone: its proxy needs no chains for it.
    let bypass = if pod.intercepted() {
        match fsm_injector::Interception::for_pod(
            &mesh_config.spec.traffic,
            &pod.interception_annotations(),
        ) {
            Ok(i) => Bypass {
                outbound_ports: i.outbound_port_exclusions,
                outbound_ip_ranges: i.outbound_ip_exclusions,
                outbound_ip_inclusions: i.outbound_ip_inclusions,
                inbound_ports: i.inbound_port_exclusions,
            },
            Err(errors) => {
                for e in errors {
                    compiler.warn(
                        ErrCode::E6110,
                        format!(
                            "pod {pod_namespace}/{pod_name} {}: {}; the proxy keeps every chain",
                            e.field, e.message
                        ),
                    );
                }
                Bypass::default()
            }
        }
    } else {
        Bypass::default()
    };
    let inbound = compiler.inbound(pod, app_ip);
    compiler.unknown_upstream_hosts(&pod_namespace);
    let retries = if mesh_config.spec.feature_flags.enable_retry_policy {
        compiler.outbound_retries(&pod_namespace, &service_account, view)
    } else {
        vec![]
    };
    let egress = if compiler.flags.enable_egress_policy {
        compiler.egress(&pod_namespace, &service_account)
    } else {
        Egress::default()
    };
    let mut warnings = compiler.warnings;
    let mut clusters = compiler.clusters;
    let mut outbound = Vec::new();
    let detail = if pod.intercepted() {
        OutboundDetail::All
    } else {
        detail
    };
    let (entries, warned) = view.read_at(detail);
    for entry in entries {
        let ports = entry
            .outbound
            .ports
            .iter()
            .filter(|p| detail == OutboundDetail::All || !p.protocol.is_http());
        for port in ports {
            outbound.push(port.clone());
            let backends = port
                .tcp_backends
                .iter()
                .chain(port.routes.iter().flat_map(|r| r.backends.iter()));
            for backend in backends {
                // A split root's backends are other services' clusters.
                let cluster = entry
                    .outbound
                    .clusters
                    .iter()
                    .find(|c| c.name == backend.cluster)
                    .or_else(|| view.cluster(&backend.cluster));
                if let Some(c) = cluster {
                    clusters.insert(c.name.clone(), c.clone());
                }
            }
        }
    }
    warnings.extend(warned.flat_map(|entry| entry.warnings.iter().cloned()));
    let ir = ProxyIr {
        proxy: ProxyInfo {
            uuid: proxy.uuid.clone(),
            identity: ServiceIdentity {
                service_account: proxy.service_account.clone(),
                namespace: pod_namespace.clone(),
            },
            pod: pod_name,
            namespace: pod_namespace,
            pod_ip,
            transparent: pod.intercepted(),
            bypass,
        },
        mesh: mesh.clone(),
        inbound,
        outbound,
        clusters: clusters.into_values().collect(),
        outbound_retries: retries,
        egress,
    };
    // Outbound and inbound look at the same ports: report each problem once.
    warnings.sort_by(|a, b| (a.code, &a.message).cmp(&(b.code, &b.message)));
    warnings.dedup();
    Ok(Compiled { ir, warnings })
}

/// Compiles one service's outbound entry: what every proxy that may reach it gets for it.
pub fn service_outbound(catalog: &Catalog, svc: &ServiceRecord) -> (ServiceOutbound, Vec<Warning>) {
    let mesh_config = catalog.mesh_config();
    let mesh = mesh_settings(&mesh_config, &catalog.settings().fsm_namespace);
    let mut compiler = Compiler {
        catalog,
        mesh: &mesh,
        flags: &mesh_config.spec.feature_flags,
        clusters: BTreeMap::new(),
        warnings: Vec::new(),
    };
    let ports = compiler.outbound(svc);
    let outbound = ServiceOutbound {
        service: service_ref(svc),
        ports,
        clusters: compiler.clusters.into_values().collect(),
    };
    (outbound, compiler.warnings)
}

fn mesh_settings(mesh_config: &MeshConfig, fsm_namespace: &str) -> MeshSettings {
    MeshSettings {
        permissive_traffic_policy_mode: mesh_config
            .spec
            .traffic
            .enable_permissive_traffic_policy_mode,
        enable_egress: mesh_config.spec.traffic.enable_egress,
        trust_domain: TRUST_DOMAIN.to_string(),
        tracing: tracing(&mesh_config.spec.observability.tracing, fsm_namespace),
        sidecar_log_level: sidecar_log_level(&mesh_config.spec.sidecar.log_level)
            .unwrap_or(Some(LogLevel::Error)),
    }
}

/// MeshConfig `spec.sidecar.logLevel` as fsm-sidecar's level: `None` when empty (the sidecar's
/// `--log-level`, which the injector set from the same field). An unknown level is E1001 (see
/// [`unknown_sidecar_log_level`]) and sidecars log at `error`, as the injector starts them.
fn sidecar_log_level(configured: &str) -> Result<Option<LogLevel>, String> {
    if configured.trim().is_empty() {
        return Ok(None);
    }
    Ok(Some(configured.parse::<FsmLevel>()?.log_level()))
}

/// The warning of an unknown `spec.sidecar.logLevel`, on every proxy's compile.
fn unknown_sidecar_log_level(mesh_config: &MeshConfig) -> Option<Warning> {
    sidecar_log_level(&mesh_config.spec.sidecar.log_level)
        .err()
        .map(|why| Warning {
            code: ErrCode::E1001,
            message: format!("MeshConfig spec.sidecar.logLevel: {why}; fsm-sidecar logs at error"),
        })
}

/// MeshConfig `observability.tracing` as the IR carries it: `None` when disabled. The catalog
/// has refused a MeshConfig whose port, endpoint or `sampledFraction` is invalid (the previous
/// one stays), so what is here is FSM's defaults filled in: the address
/// `jaeger.<fsm-namespace>.svc.cluster.local` when empty, the endpoint `/api/v2/spans` when
/// empty, every request when `sampledFraction` is unset.
fn tracing(spec: &TracingSpec, fsm_namespace: &str) -> Option<Tracing> {
    if !spec.enable {
        return None;
    }
    let sampled_per_million = match spec.sampled_fraction.as_deref() {
        None => Tracing::ALL,
        Some(fraction) => match fraction.trim().parse::<f64>() {
            // In 0..=1, so the product fits.
            Ok(f) if (0.0..=1.0).contains(&f) => (f * f64::from(Tracing::ALL)).round() as u32,
            _ => Tracing::ALL,
        },
    };
    Some(Tracing {
        address: spec.address_or_default(fsm_namespace),
        port: spec.port,
        endpoint: if spec.endpoint.is_empty() {
            TracingSpec::default().endpoint
        } else {
            spec.endpoint.clone()
        },
        sampled_per_million,
    })
}

struct Compiler<'a> {
    catalog: &'a Catalog,
    mesh: &'a MeshSettings,
    /// MeshConfig `featureFlags`, read once per compile (the catalog hands out a copy).
    flags: &'a FeatureFlags,
    clusters: BTreeMap<ClusterName, Cluster>,
    warnings: Vec<Warning>,
}

impl<'a> Compiler<'a> {
    /// The outbound entries of one service's ports (none for an ExternalName service).
    fn outbound(&mut self, svc: &ServiceRecord) -> Vec<OutboundService> {
        let mut out = Vec::new();
        if svc.is_external_name() {
            return out;
        }
        let service = service_ref(svc);
        let cluster_ips = svc.cluster_ips();
        let split = self.traffic_split(&service);
        let setting = self.upstream_setting(&service);
        let circuit_breaker = setting.and_then(circuit_breaker);
        let connect_timeout_ms = setting
            .and_then(|uts| uts.spec.connection_settings.as_ref()?.tcp.as_ref())
            .and_then(|tcp| tcp.connect_timeout.as_deref())
            .and_then(fsm_crds::duration::parse_go_duration)
            .map_or(CONNECT_TIMEOUT_MS, |d| d.as_millis() as u64);
        for port in svc.ports() {
            let Ok(number) = u16::try_from(port.port()) else {
                continue;
            };
            let protocol = self.protocol(&service, port);
            let cluster = ClusterName::outbound(&service, number);
            let endpoints = self.endpoints(svc, port);
            if endpoints.is_empty() {
                self.warn(
                    ErrCode::E3000,
                    format!("service {service} port {number} has no ready endpoints"),
                );
            }
            self.clusters.insert(
                cluster.clone(),
                Cluster {
                    name: cluster.clone(),
                    kind: ClusterKind::Outbound,
                    service: service.clone(),
                    protocol,
                    endpoints,
                    connect_timeout_ms,
                    circuit_breaker: circuit_breaker.clone(),
                },
            );
            let backends = split
                .and_then(|ts| self.split_backends(ts, &service, number))
                .unwrap_or_else(|| {
                    vec![WeightedCluster {
                        cluster,
                        weight: 100,
                    }]
                });
            let mut hosts = host_aliases(&service, number);
            hosts.extend(cluster_ips.iter().map(|ip| socket_host(*ip, number)));
            out.push(OutboundService {
                service: service.clone(),
                port: number,
                protocol,
                destination_ip_ranges: cluster_ips.iter().map(|ip| host_range(*ip)).collect(),
                hosts,
                routes: if protocol.is_http() {
                    vec![wildcard_route(backends.clone(), AllowedSources::Any)]
                } else {
                    vec![]
                },
                tcp_backends: if protocol.is_http() { vec![] } else { backends },
            });
        }
        out
    }

    /// Inbound ports of the pod; the sidecar reaches the application at `app_ip`.
    fn inbound(&mut self, pod: &PodRecord, app_ip: IpAddr) -> Vec<InboundPort> {
        // SMI mode: only what TrafficTargets allow (nothing without one, as FSM does).
        let access = (!self.mesh.permissive_traffic_policy_mode)
            .then(|| self.smi_access(pod.namespace(), pod.service_account()));
        let mut ports: BTreeMap<u16, InboundPort> = BTreeMap::new();
        for svc in self.catalog.services_selecting(pod) {
            let service = service_ref(svc);
            for port in svc.ports() {
                let Ok(number) = u16::try_from(port.port()) else {
                    continue;
                };
                let Some(target_port) = Catalog::target_port(port, pod) else {
                    self.warn(ErrCode::E5021, format!("service {service} port {number}: targetPort {:?} does not name a port of the pod", port.target_port()));
                    continue;
                };
                let protocol = self.protocol(&service, port);
                let local_cluster = ClusterName::local(&service, number);
                self.clusters.insert(
                    local_cluster.clone(),
                    Cluster {
                        name: local_cluster.clone(),
                        kind: ClusterKind::Local,
                        service: service.clone(),
                        protocol,
                        endpoints: vec![Endpoint {
                            ip: app_ip,
                            port: target_port,
                            meshed: false,
                            identity: None,
                            workload: None,
                        }],
                        connect_timeout_ms: CONNECT_TIMEOUT_MS,
                        circuit_breaker: None,
                    },
                );
                let entry = ports.entry(target_port).or_insert_with(|| InboundPort {
                    target_port,
                    protocol,
                    services: vec![],
                });
                if entry.protocol != protocol {
                    self.warn(
                        ErrCode::E5020,
                        format!("service {service} port {number} declares {protocol:?} for target port {target_port}, already used as {:?}; keeping {:?}", entry.protocol, entry.protocol),
                    );
                }
                let backends = vec![WeightedCluster {
                    cluster: local_cluster.clone(),
                    weight: 100,
                }];
                let (routes, allowed) = match &access {
                    None if entry.protocol.is_http() => (
                        vec![wildcard_route(backends, AllowedSources::Any)],
                        AllowedSources::Any,
                    ),
                    None => (vec![], AllowedSources::Any),
                    Some(access) if entry.protocol.is_http() => {
                        // Routes are tried in order and the first that matches decides, as
                        // in FSM/OSM (per-route RBAC): a request two different matches
                        // select is checked against the first one's sources only; equal
                        // matches are one route admitting all their sources. A request no
                        // rule matches is denied (403), not "no route" (404): the last route
                        // matches everything and admits nobody.
                        let routes: Vec<HttpRoute> = access
                            .http
                            .iter()
                            .map(|(matches, sources)| HttpRoute {
                                matches: matches.clone(),
                                backends: backends.clone(),
                                allowed: AllowedSources::Identities(sources.clone()),
                                timeout_ms: None,
                                retry: None,
                                rate_limit: None,
                            })
                            .chain([wildcard_route(
                                backends.clone(),
                                AllowedSources::Identities(vec![]),
                            )])
                            .collect();
                        (routes, AllowedSources::Identities(vec![]))
                    }
                    Some(access) => (vec![], access.tcp_sources(number, target_port)),
                };
                let (routes, rate_limit) =
                    self.inbound_rate_limits(&service, number, entry.protocol, routes);
                let Ingress {
                    sources: ingress_sources,
                    principals: ingress_principals,
                    tls_sources: ingress_tls_sources,
                    principals_from: ingress_principals_from,
                } = self.ingress(&service, target_port, entry.protocol);
                entry.services.push(InboundService {
                    service: service.clone(),
                    port: number,
                    hosts: host_aliases(&service, number),
                    routes,
                    allowed,
                    local_cluster,
                    rate_limit,
                    ingress_sources: ingress_sources.into_iter().collect(),
                    ingress_principals: ingress_principals.into_iter().collect(),
                    ingress_tls_sources: ingress_tls_sources.into_iter().collect(),
                    ingress_principals_from: ingress_principals_from.into_iter().collect(),
                });
            }
        }
        ports.into_values().collect()
    }

    fn endpoints(&self, svc: &ServiceRecord, port: &ServicePortRecord) -> Vec<Endpoint> {
        self.catalog
            .endpoints_of(svc, port)
            .into_iter()
            .map(|ep| {
                let pod = ep
                    .pod
                    .as_ref()
                    .and_then(|(ns, name)| self.catalog.pod(ns, name).map(|p| (ns, name, p)));
                Endpoint {
                    ip: ep.ip,
                    port: ep.port,
                    meshed: pod.is_some_and(|(ns, name, _)| self.catalog.pod_has_sidecar(ns, name)),
                    identity: pod.map(|(ns, _, p)| ServiceIdentity {
                        service_account: p.service_account().to_owned(),
                        namespace: ns.clone(),
                    }),
                    workload: pod.map(|(ns, name, p)| {
                        let workload = p.workload();
                        WorkloadRef {
                            namespace: ns.clone(),
                            pod: name.clone(),
                            kind: workload.kind,
                            name: workload.name,
                        }
                    }),
                }
            })
            .collect()
    }

    /// `appProtocol` first, then the port name's prefix (`http-web`, `tcp-db`), then HTTP.
    fn protocol(&mut self, service: &ServiceRef, port: &ServicePortRecord) -> Protocol {
        let declared = port.app_protocol().map(str::to_owned).or_else(|| {
            let name = port.name()?;
            let prefix = name.split('-').next()?;
            ["http", "grpc", "tcp"]
                .contains(&prefix)
                .then(|| prefix.to_string())
        });
        match declared.as_deref().map(str::to_ascii_lowercase).as_deref() {
            None | Some("http") => Protocol::Http,
            Some("grpc") => Protocol::Grpc,
            Some("tcp") => Protocol::Tcp,
            Some("tcp-server-first") => Protocol::TcpServerFirst,
            Some(other) => {
                self.warn(ErrCode::E5020, format!("service {service} port {}: appProtocol {other:?} is not supported; proxying as tcp", port.port()));
                Protocol::Tcp
            }
        }
    }

    /// What the TrafficTargets of `namespace` whose destination is its service account
    /// `service_account` allow. A TrafficTarget governs its own namespace's service accounts (a
    /// destination elsewhere is ignored, as FSM does); its rules name route groups of that
    /// namespace.
    fn smi_access(&mut self, namespace: &str, service_account: &str) -> SmiAccess {
        let mut http: BTreeMap<RouteMatch, BTreeSet<ServiceIdentity>> = BTreeMap::new();
        let mut tcp: Vec<(Vec<u16>, BTreeSet<ServiceIdentity>)> = Vec::new();
        let catalog = self.catalog;
        for tt in catalog.policies_of::<TrafficTarget>(namespace) {
            let tt_name = tt.metadata.name.as_deref().unwrap_or_default();
            let destination = &tt.spec.destination;
            if destination.kind != "ServiceAccount"
                || destination.name != service_account
                || destination.namespace_or(namespace) != namespace
            {
                continue;
            }
            let sources: BTreeSet<ServiceIdentity> = tt
                .spec
                .sources
                .iter()
                .filter(|s| s.kind == "ServiceAccount")
                .map(|s| ServiceIdentity {
                    service_account: s.name.clone(),
                    namespace: s.namespace_or(namespace).to_owned(),
                })
                .collect();
            for (i, rule) in tt.spec.rules.iter().enumerate() {
                let field = format!("TrafficTarget {namespace}/{tt_name} spec.rules[{i}]");
                match rule.kind {
                    TrafficTargetRuleKind::HttpRouteGroup => {
                        let Some(group) =
                            catalog.policy_of::<HTTPRouteGroup>(namespace, &rule.name)
                        else {
                            self.warn(ErrCode::E2005, format!("{field}: HTTPRouteGroup {namespace}/{} does not exist; the rule allows nothing", rule.name));
                            continue;
                        };
                        for wanted in &rule.matches {
                            if !group.spec.matches.iter().any(|m| &m.name == wanted) {
                                self.warn(ErrCode::E2009, format!("{field}: HTTPRouteGroup {namespace}/{} has no match named {wanted:?}", rule.name));
                            }
                        }
                        let selected =
                            group.spec.matches.iter().filter(|m| {
                                rule.matches.is_empty() || rule.matches.contains(&m.name)
                            });
                        for m in selected {
                            http.entry(route_match(m))
                                .or_default()
                                .extend(sources.iter().cloned());
                        }
                    }
                    TrafficTargetRuleKind::TcpRoute => {
                        let Some(route) = catalog.policy_of::<TCPRoute>(namespace, &rule.name)
                        else {
                            self.warn(ErrCode::E2009, format!("{field}: TCPRoute {namespace}/{} does not exist; the rule allows nothing", rule.name));
                            continue;
                        };
                        tcp.push((route.spec.matches.ports.clone(), sources.clone()));
                    }
                    TrafficTargetRuleKind::UdpRoute => {
                        self.warn(
                            ErrCode::E2009,
                            format!(
                                "{field}: UDPRoute rules are not supported; the rule allows nothing"
                            ),
                        );
                    }
                }
            }
        }
        SmiAccess {
            http: http
                .into_iter()
                .map(|(m, ids)| (m, ids.into_iter().collect()))
                .collect(),
            tcp,
        }
    }

    /// What the Retry policies of the proxy's namespace whose source is its service account
    /// retry, per destination service of the mesh. Several policies for one service join their
    /// `retryOn` conditions (as FSM does); the numbers come from the first by name. Status codes
    /// and classes in `retryOn` are not supported by the data planes yet: reported, left out.
    fn outbound_retries(
        &mut self,
        namespace: &str,
        service_account: &str,
        view: &MeshView,
    ) -> Vec<OutboundRetry> {
        let catalog = self.catalog;
        let mut retries: BTreeMap<ServiceRef, RetryPolicy> = BTreeMap::new();
        for retry in catalog.policies_of::<Retry>(namespace) {
            let source = &retry.spec.source;
            if source.name != service_account || source.namespace != namespace {
                continue;
            }
            let name = retry.metadata.name.as_deref().unwrap_or_default();
            let spec = &retry.spec.retry_policy;
            let mut retry_on = Vec::new();
            for condition in spec.retry_on_conditions() {
                if fsm_ir::RETRY_ON_CONDITIONS.contains(&condition) {
                    retry_on.push(condition.to_owned());
                } else {
                    self.warn(ErrCode::E2008, format!("Retry {namespace}/{name} spec.retryPolicy.retryOn: {condition:?} is not supported by the data planes yet; left out"));
                }
            }
            if retry_on.is_empty() {
                continue;
            }
            for (i, destination) in retry.spec.destinations.iter().enumerate() {
                let service = ServiceRef {
                    namespace: destination.namespace.clone(),
                    name: destination.name.clone(),
                };
                if view.get(&service).is_none() {
                    self.warn(ErrCode::E2008, format!("Retry {namespace}/{name} spec.destinations[{i}]: {service} is not a meshed service"));
                    continue;
                }
                let policy = RetryPolicy {
                    retry_on: retry_on.clone(),
                    num_retries: spec.num_retries,
                    per_try_timeout_ms: spec.per_try_timeout().map(|d| d.as_millis() as u64),
                    backoff_base_interval_ms: Some(spec.backoff_base().as_millis() as u64),
                };
                retries
                    .entry(service)
                    .and_modify(|p| {
                        for c in &policy.retry_on {
                            if !p.retry_on.contains(c) {
                                p.retry_on.push(c.clone());
                            }
                        }
                    })
                    .or_insert(policy);
            }
        }
        retries
            .into_iter()
            .map(|(service, retry)| OutboundRetry { service, retry })
            .collect()
    }

    /// What the Egress policies (of any namespace) whose sources include the service account
    /// `namespace/service_account` allow it to reach outside the mesh, merged per destination.
    ///
    /// - `http` ports: each host by name, with the requests the policy's HTTPRouteGroup matches
    ///   allow (any without); a policy with addresses but no hosts allows connections to them
    ///   as `tcp` does (the Host of a request to an address names no host to resolve).
    /// - `https` ports: each host by the ClientHello's server name, each address range by the
    ///   connection's destination.
    /// - `tcp` ports: the address ranges; none: any address on the port.
    ///
    /// What a policy names that cannot be honoured is reported (FSM's E2003/E2004) and allows
    /// nothing: a missing HTTPRouteGroup leaves its policy's HTTP hosts out rather than opening
    /// every path.
    fn egress(&mut self, namespace: &str, service_account: &str) -> Egress {
        let catalog = self.catalog;
        let mut http: BTreeMap<(String, u16), EgressHttpHost> = BTreeMap::new();
        // Per host and port: whether some policy allows any request (its matches are then moot).
        let mut http_any: BTreeSet<(String, u16)> = BTreeSet::new();
        let mut tls: BTreeMap<u16, BTreeSet<String>> = BTreeMap::new();
        let mut tcp: BTreeMap<u16, BTreeSet<String>> = BTreeMap::new();
        // A port with a range-less grant is open to any address: its ranges are moot.
        let mut tcp_any: BTreeSet<u16> = BTreeSet::new();
        for object in catalog.policies(fsm_catalog::Kind::Egress) {
            let fsm_catalog::MeshObject::Egress(policy) = object else {
                continue;
            };
            let spec = &policy.spec;
            let applies = spec.sources.iter().any(|s| {
                s.kind == EgressSourceKind::ServiceAccount
                    && s.namespace == namespace
                    && s.name == service_account
            });
            if !applies {
                continue;
            }
            let policy_ns = policy.metadata.namespace.as_deref().unwrap_or_default();
            let policy_name = format!(
                "Egress {policy_ns}/{}",
                policy.metadata.name.as_deref().unwrap_or_default()
            );
            let Some((matches, circuit_breaker)) = self.egress_matches(&policy_name, policy) else {
                // Its HTTP grants are void; its HTTPS and TCP ones do not read matches.
                self.egress_l4(spec, &mut tls, &mut tcp, &mut tcp_any, true);
                continue;
            };
            self.egress_l4(spec, &mut tls, &mut tcp, &mut tcp_any, false);
            for (i, port) in spec.ports.iter().enumerate() {
                if !matches!(port.protocol, PortProtocol::Http | PortProtocol::Grpc) {
                    continue;
                }
                if spec.hosts.is_empty() && spec.ip_addresses.is_empty() {
                    self.warn(ErrCode::E2003, format!("{policy_name} spec.ports[{i}]: an http port needs spec.hosts or spec.ipAddresses; it allows nothing"));
                }
                for (h, host) in spec.hosts.iter().enumerate() {
                    if host.starts_with("*.") {
                        self.warn(ErrCode::E2003, format!("{policy_name} spec.hosts[{h}]: {host:?} is a wildcard, which an http port cannot resolve to connect; it is allowed on https ports only"));
                        continue;
                    }
                    let key = (host.to_ascii_lowercase(), port.number);
                    let entry = http.entry(key.clone()).or_insert_with(|| EgressHttpHost {
                        host: key.0.clone(),
                        port: port.number,
                        matches: vec![],
                        circuit_breaker: None,
                    });
                    if matches.is_empty() {
                        http_any.insert(key.clone());
                    }
                    for m in &matches {
                        if !entry.matches.contains(m) {
                            entry.matches.push(m.clone());
                        }
                    }
                    match (&entry.circuit_breaker, &circuit_breaker) {
                        (None, Some(cb)) => entry.circuit_breaker = Some(cb.clone()),
                        (Some(held), Some(cb)) if held != cb => self.warn(ErrCode::E2001, format!("{policy_name}: {}:{} already has the connection settings of another Egress policy's UpstreamTrafficSetting; this one's are ignored", key.0, key.1)),
                        _ => {}
                    }
                }
            }
        }
        for (key, host) in &mut http {
            if http_any.contains(key) {
                host.matches.clear();
            } else {
                host.matches.sort();
            }
        }
        Egress {
            http: http.into_values().collect(),
            tls: tls
                .into_iter()
                .map(|(port, names)| EgressTlsPort {
                    port,
                    server_names: names.into_iter().collect(),
                })
                .collect(),
            tcp: tcp
                .into_iter()
                .map(|(port, ranges)| EgressTcpPort {
                    port,
                    ip_ranges: if tcp_any.contains(&port) {
                        vec![]
                    } else {
                        ranges.into_iter().collect()
                    },
                })
                .collect(),
        }
    }

    /// The grants of an Egress policy's ports that are not HTTP routes: `https` hosts by server
    /// name, address ranges of `https` and `tcp` ports, and of `http` ports without hosts (and,
    /// when `http_void`, of none: the policy's matches could not be read).
    fn egress_l4(
        &mut self,
        spec: &fsm_crds::policy::v1alpha1::EgressSpec,
        tls: &mut BTreeMap<u16, BTreeSet<String>>,
        tcp: &mut BTreeMap<u16, BTreeSet<String>>,
        tcp_any: &mut BTreeSet<u16>,
        http_void: bool,
    ) {
        for port in &spec.ports {
            let ranges = match port.protocol {
                PortProtocol::Https => {
                    if !spec.hosts.is_empty() {
                        tls.entry(port.number)
                            .or_default()
                            .extend(spec.hosts.iter().map(|h| h.to_ascii_lowercase()));
                    }
                    !spec.ip_addresses.is_empty()
                }
                PortProtocol::Http | PortProtocol::Grpc => {
                    !http_void && spec.hosts.is_empty() && !spec.ip_addresses.is_empty()
                }
                PortProtocol::Tcp | PortProtocol::TcpServerFirst => {
                    if spec.ip_addresses.is_empty() {
                        tcp_any.insert(port.number);
                        tcp.entry(port.number).or_default();
                    }
                    !spec.ip_addresses.is_empty()
                }
            };
            if ranges {
                tcp.entry(port.number)
                    .or_default()
                    .extend(spec.ip_addresses.iter().cloned());
            }
        }
    }

    /// The request matches of an Egress policy's HTTPRouteGroups (every match of each; none:
    /// any request) and the connection settings of its UpstreamTrafficSetting, both in the
    /// policy's namespace; `None` when a group it names does not exist.
    fn egress_matches(
        &mut self,
        policy_name: &str,
        policy: &EgressPolicy,
    ) -> Option<(Vec<RouteMatch>, Option<CircuitBreaker>)> {
        let catalog = self.catalog;
        let namespace = policy.metadata.namespace.as_deref().unwrap_or_default();
        let mut matches = Vec::new();
        let mut limits = None;
        let mut found = true;
        for (i, m) in policy.spec.matches.iter().enumerate() {
            match m.kind.as_str() {
                "HTTPRouteGroup" => match catalog.policy_of::<HTTPRouteGroup>(namespace, &m.name) {
                    Some(group) => {
                        matches.extend(group.spec.matches.iter().map(route_match));
                    }
                    None => {
                        self.warn(ErrCode::E2004, format!("{policy_name} spec.matches[{i}]: HTTPRouteGroup {namespace}/{} does not exist; the policy's http hosts allow nothing", m.name));
                        found = false;
                    }
                },
                "UpstreamTrafficSetting" => {
                    match catalog.policy_of::<UpstreamTrafficSetting>(namespace, &m.name) {
                        Some(uts) => limits = circuit_breaker(uts),
                        None => self.warn(ErrCode::E2003, format!("{policy_name} spec.matches[{i}]: UpstreamTrafficSetting {namespace}/{} does not exist; ignored", m.name)),
                    }
                }
                other => self.warn(ErrCode::E2003, format!("{policy_name} spec.matches[{i}]: kind {other:?} is not a match an Egress policy takes; ignored")),
            }
        }
        found.then_some((matches, limits))
    }

    /// The UpstreamTrafficSetting of `service`: the one in its namespace whose `spec.host` is
    /// its FQDN, the first by name when several are (the others are reported: FSM's webhook
    /// refuses a second setting for a host).
    fn upstream_setting(&mut self, service: &ServiceRef) -> Option<&'a UpstreamTrafficSetting> {
        let catalog = self.catalog;
        let fqdn = service.fqdn();
        let mut settings = catalog
            .policies_of::<UpstreamTrafficSetting>(&service.namespace)
            .filter(|uts| uts.spec.host == fqdn);
        let first = settings.next()?;
        let first_name = first.metadata.name.as_deref().unwrap_or_default();
        for ignored in settings {
            self.warn(
                ErrCode::E2008,
                format!(
                    "UpstreamTrafficSetting {}/{} is ignored: UpstreamTrafficSetting {}/{first_name} already sets host {fqdn}",
                    service.namespace,
                    ignored.metadata.name.as_deref().unwrap_or_default(),
                    service.namespace,
                ),
            );
        }
        Some(first)
    }

    /// The rate limits `service`'s UpstreamTrafficSetting puts on its port `port` in this pod:
    /// the port's own (requests for HTTP, connections for TCP) and each allowed route's whose
    /// path an `httpRoutes` entry names. A route limit applies only to a path an access policy
    /// already allows (FSM: `.*` in permissive mode, an HTTPRouteGroup's path in SMI mode);
    /// others are reported and left out.
    fn inbound_rate_limits(
        &mut self,
        service: &ServiceRef,
        port: u16,
        protocol: Protocol,
        mut routes: Vec<HttpRoute>,
    ) -> (Vec<HttpRoute>, Option<LocalRateLimit>) {
        let Some(uts) = self.upstream_setting(service) else {
            return (routes, None);
        };
        let name = uts.metadata.name.as_deref().unwrap_or_default();
        let local = uts.spec.rate_limit.as_ref().and_then(|r| r.local.as_ref());
        if !protocol.is_http() {
            if !uts.spec.http_routes.is_empty() || local.is_some_and(|l| l.http.is_some()) {
                self.warn(ErrCode::E2008, format!("UpstreamTrafficSetting {}/{name}: port {port} of {service} is TCP; its HTTP rate limits do not apply there", service.namespace));
            }
            return (
                routes,
                local.and_then(|l| l.tcp.as_ref()).map(connection_limit),
            );
        }
        if local.is_some_and(|l| l.tcp.is_some()) {
            self.warn(ErrCode::E2008, format!("UpstreamTrafficSetting {}/{name} spec.rateLimit.local.tcp: port {port} of {service} is HTTP, whose requests reach this pod over connections its clients' sidecars share; the connection limit applies to its TCP ports only", service.namespace));
        }
        for (i, route_spec) in uts.spec.http_routes.iter().enumerate() {
            let Some(limit) = route_spec
                .rate_limit
                .as_ref()
                .and_then(|r| r.local.as_ref())
            else {
                continue;
            };
            let mut matched = false;
            for route in routes.iter_mut().filter(|r| !is_denied(&r.allowed)) {
                if route.matches.path == PathMatch::Regex(route_spec.path.clone()) {
                    route.rate_limit = Some(request_limit(limit));
                    matched = true;
                }
            }
            if !matched {
                self.warn(ErrCode::E2008, format!("UpstreamTrafficSetting {}/{name} spec.httpRoutes[{i}].path: {:?} is not the path of a route an access policy allows to {service} port {port}; the limit is ignored", service.namespace, route_spec.path));
            }
        }
        (
            routes,
            local.and_then(|l| l.http.as_ref()).map(request_limit),
        )
    }

    /// Who outside the mesh may send `service`'s pod port `target_port` requests: the sources of
    /// the IngressBackends (MeshConfig `enableIngressBackendPolicy`) and AccessControls
    /// (`enableAccessControlPolicy`) of its namespace naming it and that port (FSM: a backend's
    /// port is the target port; an AccessControl without backends names every service of its
    /// namespace). Of a plaintext (`http`) backend, `IPRange` sources as they are and `Service`
    /// sources as the addresses of their endpoints (monitored namespace or not: an ingress
    /// controller's may not be); of a TLS (`https`) backend, the `AuthenticatedPrincipal`
    /// sources, which the client certificate must name. What cannot be honoured is reported and
    /// admits no one (fail closed).
    fn ingress(&mut self, service: &ServiceRef, target_port: u16, protocol: Protocol) -> Ingress {
        let catalog = self.catalog;
        let flags = self.flags;
        let mut admitted = Ingress::default();
        if flags.enable_ingress_backend_policy {
            for ib in catalog.policies_of::<IngressBackend>(&service.namespace) {
                let policy = format!(
                    "IngressBackend {}/{}",
                    service.namespace,
                    ib.metadata.name.as_deref().unwrap_or_default()
                );
                let named = self.backends_naming(
                    &policy,
                    &ib.spec.backends,
                    false,
                    service,
                    target_port,
                    protocol,
                );
                self.admit(
                    &policy,
                    &ib.spec.sources,
                    &service.namespace,
                    named,
                    &mut admitted,
                );
            }
        }
        if flags.enable_access_control_policy {
            for ac in catalog.policies_of::<AccessControl>(&service.namespace) {
                let policy = format!(
                    "AccessControl {}/{}",
                    service.namespace,
                    ac.metadata.name.as_deref().unwrap_or_default()
                );
                let named = self.backends_naming(
                    &policy,
                    &ac.spec.backends,
                    true,
                    service,
                    target_port,
                    protocol,
                );
                self.admit(
                    &policy,
                    &ac.spec.sources,
                    &service.namespace,
                    named,
                    &mut admitted,
                );
            }
        }
        admitted
    }

    /// How `backends` (of `policy`) let ingress into `service`'s pod port `target_port`
    /// (`all_when_empty`: an empty list names every HTTP service of the namespace, in
    /// plaintext). A TCP port, or a TLS backend that skips client certificate validation, is
    /// reported: not supported yet.
    fn backends_naming(
        &mut self,
        policy: &str,
        backends: &[BackendSpec],
        all_when_empty: bool,
        service: &ServiceRef,
        target_port: u16,
        protocol: Protocol,
    ) -> Named {
        let mut named = Named::default();
        if backends.is_empty() {
            named.plaintext = all_when_empty && protocol.is_http();
            return named;
        }
        for (i, backend) in backends.iter().enumerate() {
            if backend.name != service.name || backend.port.number != target_port {
                continue;
            }
            let tls = backend.port.protocol == PortProtocol::Https || backend.tls.is_some();
            if !protocol.is_http() {
                self.warn(ErrCode::E2008, format!("{policy} spec.backends[{i}]: port {target_port} of {service} is TCP; ingress is HTTP only so far"));
            } else if tls
                && backend
                    .tls
                    .as_ref()
                    .is_some_and(|t| t.skip_client_cert_validation)
            {
                named.tls_unchecked = true;
            } else if tls {
                named.tls = true;
            } else {
                named.plaintext = true;
            }
        }
        named
    }

    /// Adds to `admitted` whom `sources` (of `policy`, in `namespace`) admit to the backends
    /// `named`: addresses in plaintext, certificate names over TLS. A TLS backend whose sources
    /// also name `IPRange`s or `Service`s admits those names from those addresses only, as FSM
    /// does (one [`PrincipalsFrom`] per policy).
    fn admit(
        &mut self,
        policy: &str,
        sources: &[IngressSourceSpec],
        namespace: &str,
        named: Named,
        admitted: &mut Ingress,
    ) {
        if named.tls {
            let principals: Vec<&IngressSourceSpec> = sources
                .iter()
                .filter(|s| s.kind == IngressSourceKind::AuthenticatedPrincipal)
                .collect();
            // DNS names compare without regard to case; URIs (with a scheme) exactly.
            let names: BTreeSet<String> = principals
                .iter()
                .map(|s| {
                    if s.name.contains(':') {
                        s.name.clone()
                    } else {
                        s.name.to_ascii_lowercase()
                    }
                })
                .collect();
            if principals.len() == sources.len() {
                admitted.principals.extend(names);
            } else if names.is_empty() {
                self.warn(ErrCode::E2008, format!("{policy} spec.sources: a TLS backend needs an AuthenticatedPrincipal source (the client certificate's name to require) or tls.skipClientCertValidation; it admits no TLS ingress"));
            } else {
                let mut from = BTreeSet::new();
                self.addresses_of(policy, sources, namespace, &mut from);
                if from.is_empty() {
                    self.warn(ErrCode::E2008, format!("{policy} spec.sources: its IPRange and Service sources name no address, so its AuthenticatedPrincipal sources admit no one"));
                } else {
                    admitted.principals_from.insert(PrincipalsFrom {
                        principals: names.into_iter().collect(),
                        sources: from.into_iter().collect(),
                    });
                }
            }
        }
        if named.tls_unchecked {
            // No client certificate is asked for, so no name can be checked: the addresses
            // alone decide, and without any the backend would admit every TLS client.
            let mut by_address = BTreeSet::new();
            for (j, source) in sources.iter().enumerate() {
                if source.kind == IngressSourceKind::AuthenticatedPrincipal {
                    self.warn(ErrCode::E2008, format!("{policy} spec.sources[{j}]: an AuthenticatedPrincipal cannot be checked with tls.skipClientCertValidation (no client certificate is asked for); left out"));
                }
            }
            self.addresses_of(policy, sources, namespace, &mut by_address);
            if by_address.is_empty() {
                self.warn(ErrCode::E2008, format!("{policy} spec.sources: a TLS backend with tls.skipClientCertValidation needs IPRange or Service sources (it would admit every TLS client); it admits no ingress"));
            }
            admitted.tls_sources.extend(by_address);
        }
        if named.plaintext {
            let mut by_address = BTreeSet::new();
            self.addresses_of(policy, sources, namespace, &mut by_address);
            for (j, source) in sources.iter().enumerate() {
                if source.kind == IngressSourceKind::AuthenticatedPrincipal {
                    self.warn(ErrCode::E2008, format!("{policy} spec.sources[{j}]: an AuthenticatedPrincipal admits TLS clients only (a backend with protocol https); a plaintext backend ignores it"));
                }
            }
            admitted.sources.extend(by_address);
        }
    }

    /// The addresses (CIDRs) the `IPRange` and `Service` sources of `policy` name: ranges as
    /// they are, Services by their endpoints (monitored namespace or not).
    fn addresses_of(
        &mut self,
        policy: &str,
        sources: &[IngressSourceSpec],
        namespace: &str,
        admitted: &mut BTreeSet<String>,
    ) {
        let catalog = self.catalog;
        for (j, source) in sources.iter().enumerate() {
            match source.kind {
                IngressSourceKind::IpRange => {
                    if fsm_crds::parse_cidr(&source.name).is_some() {
                        admitted.insert(source.name.clone());
                    }
                }
                IngressSourceKind::Service => {
                    let source_ns = if source.namespace.is_empty() {
                        namespace
                    } else {
                        source.namespace.as_str()
                    };
                    let Some(svc) = catalog.service(source_ns, &source.name) else {
                        self.warn(ErrCode::E2008, format!("{policy} spec.sources[{j}]: Service {source_ns}/{} does not exist; it admits no one", source.name));
                        continue;
                    };
                    for port in svc.ports() {
                        for endpoint in catalog.endpoints_of(svc, port) {
                            admitted.insert(host_range(endpoint.ip));
                        }
                    }
                }
                IngressSourceKind::AuthenticatedPrincipal => {}
            }
        }
    }

    /// UpstreamTrafficSettings in `namespace` whose host is no service there (nor, until Egress
    /// policies are compiled, anything else): reported to the proxies of that namespace.
    fn unknown_upstream_hosts(&mut self, namespace: &str) {
        let catalog = self.catalog;
        for uts in catalog.policies_of::<UpstreamTrafficSetting>(namespace) {
            let host = uts.spec.host.as_str();
            let known = host
                .strip_suffix(".svc.cluster.local")
                .and_then(|rest| rest.split_once('.'))
                .is_some_and(|(name, ns)| {
                    ns == namespace && catalog.mesh_service(namespace, name).is_some()
                });
            let name = uts.metadata.name.as_deref().unwrap_or_default();
            // An Egress policy's setting is for a host outside the mesh.
            let egress_match = catalog.policies_of::<EgressPolicy>(namespace).any(|e| {
                e.spec
                    .matches
                    .iter()
                    .any(|m| m.kind == "UpstreamTrafficSetting" && m.name == name)
            });
            if !known && !egress_match {
                self.warn(ErrCode::E2008, format!("UpstreamTrafficSetting {namespace}/{} spec.host: {host:?} is not the FQDN <service>.{namespace}.svc.cluster.local of a meshed service in {namespace}; the setting applies to nothing", uts.metadata.name.as_deref().unwrap_or_default()));
            }
        }
    }

    /// The TrafficSplit whose root is `service`: the first by name, when several are (E2007, as
    /// FSM, which processes the first it meets).
    fn traffic_split(&mut self, service: &ServiceRef) -> Option<&'a TrafficSplit> {
        let catalog = self.catalog;
        let mut splits = catalog
            .policies_of::<TrafficSplit>(&service.namespace)
            .filter(|ts| ts.spec.root_service_name() == service.name);
        let first = splits.next()?;
        let ignored: Vec<String> = splits
            .map(|ts| ts.metadata.name.clone().unwrap_or_default())
            .collect();
        if !ignored.is_empty() {
            self.warn(
                ErrCode::E2007,
                format!(
                    "TrafficSplits {} of {} are ignored: TrafficSplit {}/{} already splits it",
                    ignored.join(", "),
                    service,
                    service.namespace,
                    first.metadata.name.as_deref().unwrap_or_default()
                ),
            );
        }
        Some(first)
    }

    /// Where a split sends the traffic of `root`'s port `port`: each backend service's cluster
    /// of the same port, weighted. A backend that is not a service of the namespace with that
    /// port is left out (reported); a backend weighted 0 gets nothing. `None` when no backend
    /// remains: the root's own endpoints keep the traffic.
    fn split_backends(
        &mut self,
        ts: &TrafficSplit,
        root: &ServiceRef,
        port: u16,
    ) -> Option<Vec<WeightedCluster>> {
        let name = ts.metadata.name.as_deref().unwrap_or_default();
        let mut backends = Vec::new();
        for (i, backend) in ts.spec.backends.iter().enumerate() {
            let Ok(weight) = u32::try_from(backend.weight) else {
                continue;
            };
            if weight == 0 {
                continue;
            }
            let backend_ref = ServiceRef {
                namespace: root.namespace.clone(),
                name: backend.service.clone(),
            };
            let has_port = self
                .catalog
                .mesh_service(&root.namespace, &backend.service)
                .is_some_and(|svc| svc.ports().iter().any(|p| p.port() == i32::from(port)));
            if !has_port {
                self.warn(
                    ErrCode::E2008,
                    format!(
                        "TrafficSplit {}/{name} spec.backends[{i}]: {backend_ref} is not a meshed service with port {port}; it gets no traffic",
                        root.namespace
                    ),
                );
                continue;
            }
            backends.push(WeightedCluster {
                cluster: ClusterName::outbound(&backend_ref, port),
                weight,
            });
        }
        if backends.is_empty() {
            self.warn(
                ErrCode::E2008,
                format!(
                    "TrafficSplit {}/{name}: no backend of {root} port {port} can take traffic; {root} keeps it",
                    root.namespace
                ),
            );
            return None;
        }
        Some(backends)
    }

    fn warn(&mut self, code: ErrCode, message: String) {
        self.warnings.push(Warning { code, message });
    }
}

/// Whom an inbound service port admits from outside the mesh (see `Compiler::ingress`).
#[derive(Default)]
struct Ingress {
    /// Plaintext clients, by address (CIDRs).
    sources: BTreeSet<String>,
    /// TLS clients, by a subject alternative name of their certificate.
    principals: BTreeSet<String>,
    /// TLS clients without client certificates, by address (CIDRs).
    tls_sources: BTreeSet<String>,
    /// TLS clients by certificate name and address together.
    principals_from: BTreeSet<PrincipalsFrom>,
}

/// How a policy's backends name one service port (see `Compiler::backends_naming`).
#[derive(Clone, Copy, Default)]
struct Named {
    plaintext: bool,
    tls: bool,
    /// TLS without client certificates (`tls.skipClientCertValidation`).
    tls_unchecked: bool,
}

pub(crate) fn service_ref(svc: &ServiceRecord) -> ServiceRef {
    ServiceRef {
        namespace: svc.namespace().to_owned(),
        name: svc.name().to_owned(),
    }
}

/// What SMI policies allow into one pod: per HTTP match, the identities allowed (routes with
/// the same match from several rules are one route allowing all their sources); per TCPRoute
/// rule, its ports (empty: all) and sources.
struct SmiAccess {
    http: Vec<(RouteMatch, Vec<ServiceIdentity>)>,
    tcp: Vec<(Vec<u16>, BTreeSet<ServiceIdentity>)>,
}

impl SmiAccess {
    /// Who may open connections to the TCP service port `port`, which the pod serves on
    /// `target_port`. A TCPRoute port may name either: SMI says "destination port", and users
    /// write the one they know (FSM's examples have both equal).
    fn tcp_sources(&self, port: u16, target_port: u16) -> AllowedSources {
        let ids: BTreeSet<&ServiceIdentity> = self
            .tcp
            .iter()
            .filter(|(ports, _)| {
                ports.is_empty() || ports.contains(&port) || ports.contains(&target_port)
            })
            .flat_map(|(_, ids)| ids)
            .collect();
        AllowedSources::Identities(ids.into_iter().cloned().collect())
    }
}

/// An HTTPRouteGroup match as a route match: the path regex (absent: any path), the methods
/// (`*` or none: any), the header regexes.
fn route_match(m: &HttpMatch) -> RouteMatch {
    let methods: Vec<String> = m.methods.iter().map(|m| m.as_str().to_owned()).collect();
    RouteMatch {
        path: PathMatch::Regex(if m.path_regex.is_empty() {
            ".*".to_owned()
        } else {
            m.path_regex.clone()
        }),
        methods: if methods.iter().any(|m| m == "*") {
            vec![]
        } else {
            methods
        },
        headers: m
            .header_map()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
    }
}

/// `connectionSettings` as circuit-breaker limits; `None` when it sets none.
fn circuit_breaker(uts: &UpstreamTrafficSetting) -> Option<CircuitBreaker> {
    let settings = uts.spec.connection_settings.as_ref()?;
    let tcp = settings.tcp.as_ref();
    let http = settings.http.as_ref();
    let limits = CircuitBreaker {
        max_connections: tcp.and_then(|t| t.max_connections),
        max_pending_requests: http.and_then(|h| h.max_pending_requests),
        max_requests: http.and_then(|h| h.max_requests),
        max_requests_per_connection: http.and_then(|h| h.max_requests_per_connection),
        max_retries: http.and_then(|h| h.max_retries),
    };
    (limits != CircuitBreaker::default()).then_some(limits)
}

/// FSM's bucket arithmetic: `n + burst` tokens, `n` more every `unit`; refused with 429.
fn token_bucket(n: u32, burst: u32, unit: std::time::Duration) -> LocalRateLimit {
    LocalRateLimit {
        max_tokens: n.saturating_add(burst),
        tokens_per_fill: n,
        fill_interval_ms: unit.as_millis() as u64,
        status: 429,
        response_headers: vec![],
    }
}

fn connection_limit(tcp: &TcpLocalRateLimitSpec) -> LocalRateLimit {
    token_bucket(tcp.connections, tcp.burst, tcp.unit.as_duration())
}

fn request_limit(http: &HttpLocalRateLimitSpec) -> LocalRateLimit {
    LocalRateLimit {
        status: http.status_code(),
        response_headers: http
            .response_headers_to_add
            .iter()
            .map(|h| ResponseHeader {
                name: h.name.clone(),
                value: h.value.clone(),
            })
            .collect(),
        ..token_bucket(http.requests, http.burst, http.unit.as_duration())
    }
}

fn is_denied(allowed: &AllowedSources) -> bool {
    matches!(allowed, AllowedSources::Identities(ids) if ids.is_empty())
}

fn wildcard_route(backends: Vec<WeightedCluster>, allowed: AllowedSources) -> HttpRoute {
    HttpRoute {
        matches: RouteMatch::default(),
        backends,
        allowed,
        timeout_ms: None,
        retry: None,
        rate_limit: None,
    }
}

/// FSM's `HttpHostPort2Service` keys: `svc`, `svc.ns`, `svc.ns.svc`, `svc.ns.svc.cluster`,
/// `svc.ns.svc.cluster.local`, then each again with `:port`.
pub fn host_aliases(service: &ServiceRef, port: u16) -> Vec<String> {
    let names = [
        service.name.clone(),
        format!("{}.{}", service.name, service.namespace),
        format!("{}.{}.svc", service.name, service.namespace),
        format!("{}.{}.svc.cluster", service.name, service.namespace),
        service.fqdn(),
    ];
    let with_port: Vec<String> = names.iter().map(|n| format!("{n}:{port}")).collect();
    names.into_iter().chain(with_port).collect()
}

fn host_range(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(_) => format!("{ip}/32"),
        IpAddr::V6(_) => format!("{ip}/128"),
    }
}

fn socket_host(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(_) => format!("{ip}:{port}"),
        IpAddr::V6(_) => format!("[{ip}]:{port}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// FSM's codes: E5010 is only a service account that differs from the proxy's identity; a pod
    /// in another namespace than the identity's is no pod of that namespace (E5002).
    #[test]
    fn identity_errors_carry_fsm_codes() {
        let (namespace, pod) = ("demo".to_string(), "curl".to_string());
        let sa = CompileError::ServiceAccountMismatch {
            namespace: namespace.clone(),
            pod: pod.clone(),
            claimed: "other".into(),
            actual: "curl".into(),
        };
        let ns = CompileError::NamespaceMismatch {
            namespace,
            pod,
            claimed: "elsewhere".into(),
        };
        assert_eq!(sa.err_code(), ErrCode::E5010);
        assert_eq!(ns.err_code(), ErrCode::E5002);
    }

    /// MeshConfig `spec.sidecar.logLevel` as fsm-sidecar's live level: FSM's mapping (fatal and
    /// panic log errors, disabled nothing), empty leaves the sidecar's flag, unknown is E1001 and
    /// `error`, as the injector starts a sidecar.
    #[test]
    fn sidecar_log_level_follows_fsms_levels() {
        let mut mesh_config = MeshConfig::default();
        for (configured, expected) in [
            ("", None),
            ("  ", None),
            ("debug", Some(LogLevel::Debug)),
            ("Trace", Some(LogLevel::Trace)),
            ("panic", Some(LogLevel::Error)),
            ("fatal", Some(LogLevel::Error)),
            ("disabled", Some(LogLevel::Off)),
            ("verbose", Some(LogLevel::Error)),
        ] {
            mesh_config.spec.sidecar.log_level = configured.into();
            let mesh = mesh_settings(&mesh_config, "fsm-system");
            assert_eq!(mesh.sidecar_log_level, expected, "{configured:?}");
            let warning = unknown_sidecar_log_level(&mesh_config);
            assert_eq!(
                warning.map(|w| w.code),
                (configured == "verbose").then_some(ErrCode::E1001),
                "{configured:?}"
            );
        }
    }
}
