//! Mapping decisions, one test each, on small hand-built IRs.

use std::collections::BTreeMap;
use std::net::IpAddr;

use fsm_dataplane_proto::{ALL_TYPE_URLS, v1};
use fsm_ir::{
    AllowedSources, Cluster, ClusterKind, ClusterName, Endpoint, HttpRoute, InboundPort,
    InboundService, MeshSettings, OutboundService, PathMatch, Protocol, ProxyInfo, ProxyIr,
    RetryPolicy, RouteMatch, ServiceIdentity, ServiceRef, WeightedCluster,
};

use prost::Message;

use super::*;

// === builders ===

fn ip(text: &str) -> IpAddr {
    text.parse().expect("test IP")
}

fn svc(name: &str) -> ServiceRef {
    ServiceRef {
        namespace: "app".into(),
        name: name.into(),
    }
}

fn id(sa: &str) -> ServiceIdentity {
    ServiceIdentity {
        service_account: sa.into(),
        namespace: "app".into(),
    }
}

fn backend(name: &str, weight: u32) -> WeightedCluster {
    WeightedCluster {
        cluster: ClusterName(name.into()),
        weight,
    }
}

fn http_route(backends: Vec<WeightedCluster>, allowed: AllowedSources) -> HttpRoute {
    HttpRoute {
        matches: RouteMatch::default(),
        backends,
        allowed,
        timeout_ms: None,
        retry: None,
        rate_limit: None,
    }
}

fn outbound(name: &str, port: u16, protocol: Protocol, cluster_ip: &str) -> OutboundService {
    let backends = vec![backend(&format!("app/{name}|{port}"), 100)];
    OutboundService {
        service: svc(name),
        port,
        protocol,
        destination_ip_ranges: vec![format!("{cluster_ip}/32")],
        hosts: vec![name.into(), format!("{name}:{port}")],
        routes: if protocol.is_http() {
            vec![http_route(backends.clone(), AllowedSources::Any)]
        } else {
            vec![]
        },
        tcp_backends: if protocol.is_http() { vec![] } else { backends },
    }
}

fn inbound(
    target_port: u16,
    protocol: Protocol,
    name: &str,
    allowed: AllowedSources,
) -> InboundPort {
    let local = ClusterName(format!("app/{name}|{target_port}|local"));
    InboundPort {
        target_port,
        protocol,
        services: vec![InboundService {
            service: svc(name),
            port: target_port,
            hosts: vec![name.into(), format!("{name}:{target_port}")],
            routes: if protocol.is_http() {
                vec![http_route(
                    vec![backend(local.as_str(), 100)],
                    allowed.clone(),
                )]
            } else {
                vec![]
            },
            allowed,
            local_cluster: local,
            rate_limit: None,
            ingress_sources: vec![],
            ingress_principals: vec![],
            ingress_tls_sources: vec![],
            ingress_principals_from: vec![],
        }],
    }
}

fn cluster(name: &str, kind: ClusterKind, protocol: Protocol, endpoints: Vec<Endpoint>) -> Cluster {
    Cluster {
        name: ClusterName(name.into()),
        kind,
        service: svc("x"),
        protocol,
        endpoints,
        connect_timeout_ms: 1000,
        circuit_breaker: None,
    }
}

fn endpoint(addr: &str, port: u16, meshed: bool, identity: Option<ServiceIdentity>) -> Endpoint {
    Endpoint {
        ip: ip(addr),
        port,
        meshed,
        identity,
        workload: None,
    }
}

fn ir(
    inbound: Vec<InboundPort>,
    outbound: Vec<OutboundService>,
    clusters: Vec<Cluster>,
) -> ProxyIr {
    ProxyIr {
        proxy: ProxyInfo {
            uuid: "u".into(),
            identity: id("me"),
            pod: "me-0".into(),
            namespace: "app".into(),
            pod_ip: ip("127.0.0.9"),
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
        inbound,
        outbound,
        clusters,
        outbound_retries: vec![],
        egress: Default::default(),
    }
}

/// An outbound service of `protocol` on port 8080 with its cluster (one meshed endpoint).
fn one_outbound(protocol: Protocol) -> ProxyIr {
    ir(
        vec![],
        vec![outbound("web", 8080, protocol, "10.96.0.1")],
        vec![cluster(
            "app/web|8080",
            ClusterKind::Outbound,
            protocol,
            vec![endpoint("127.0.0.2", 8080, true, Some(id("web")))],
        )],
    )
}

/// One inbound port of `protocol` on 8080 and its local cluster.
fn one_inbound(protocol: Protocol, allowed: AllowedSources) -> ProxyIr {
    ir(
        vec![inbound(8080, protocol, "me", allowed)],
        vec![],
        vec![cluster(
            "app/me|8080|local",
            ClusterKind::Local,
            protocol,
            vec![endpoint("127.0.0.9", 8080, false, None)],
        )],
    )
}

// === lookups ===

fn listener<'a>(out: &'a NativeResources, name: &str) -> &'a v1::Listener {
    out.listeners
        .iter()
        .find(|l| l.name == name)
        .unwrap_or_else(|| panic!("no listener {name}"))
}

fn chain<'a>(listener: &'a v1::Listener, name: &str) -> &'a v1::FilterChain {
    listener
        .filter_chains
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no chain {name} in {}", listener.name))
}

fn routes<'a>(out: &'a NativeResources, name: &str) -> &'a v1::RouteConfiguration {
    out.routes
        .iter()
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("no route configuration {name}"))
}

fn first_route(config: &v1::RouteConfiguration) -> &v1::Route {
    &config.virtual_hosts[0].routes[0]
}

fn tcp_target(chain: &v1::FilterChain) -> &v1::TcpTarget {
    match &chain.target {
        Some(v1::filter_chain::Target::Tcp(tcp)) => tcp,
        other => panic!("chain {} has no TCP target: {other:?}", chain.name),
    }
}

fn http_target(chain: &v1::FilterChain) -> &str {
    match &chain.target {
        Some(v1::filter_chain::Target::Http(http)) => &http.route_config_name,
        other => panic!("chain {} has no HTTP target: {other:?}", chain.name),
    }
}

fn clusters(named: &[(&str, u32)]) -> Vec<v1::WeightedCluster> {
    named
        .iter()
        .map(|(name, weight)| v1::WeightedCluster {
            name: (*name).into(),
            weight: *weight,
        })
        .collect()
}

// === tests ===

#[test]
fn http_service_routes_by_host_and_has_no_tcp_listener() {
    let out = translate(
        &one_outbound(Protocol::Http),
        &fsm_golden::placeholder_credentials(),
    )
    .expect("translates");
    let chain = chain(listener(&out, OUTBOUND_LISTENER), "app/web|8080");
    assert_eq!(chain.protocol, v1::Protocol::Http as i32);
    assert_eq!(http_target(chain), OUTBOUND_ROUTES);
    let m = chain.r#match.as_ref().expect("match");
    assert_eq!(m.destination_port, 8080);
    assert_eq!(m.destination_ip_ranges, ["10.96.0.1/32"]);
    let vhost = &routes(&out, OUTBOUND_ROUTES).virtual_hosts[0];
    assert_eq!(vhost.name, "app/web|8080");
    assert_eq!(vhost.domains, ["web", "web:8080"]);
    assert!(
        out.listeners
            .iter()
            .all(|l| !l.name.starts_with("outbound-tcp:"))
    );
    assert_eq!(
        out.clusters[0].upstream_protocol,
        v1::UpstreamProtocol::Http1 as i32
    );
}

#[test]
fn grpc_service_is_http_with_an_http2_upstream() {
    let out = translate(
        &one_outbound(Protocol::Grpc),
        &fsm_golden::placeholder_credentials(),
    )
    .expect("translates");
    let chain = chain(listener(&out, OUTBOUND_LISTENER), "app/web|8080");
    assert_eq!(chain.protocol, v1::Protocol::Grpc as i32);
    assert_eq!(http_target(chain), OUTBOUND_ROUTES);
    assert_eq!(
        out.clusters[0].upstream_protocol,
        v1::UpstreamProtocol::Http2 as i32
    );
}

#[test]
fn tcp_service_gets_a_chain_and_an_explicit_listener_with_a_connect_authority() {
    for protocol in [Protocol::Tcp, Protocol::TcpServerFirst] {
        let out = translate(
            &one_outbound(protocol),
            &fsm_golden::placeholder_credentials(),
        )
        .expect("translates");
        let redirected = chain(listener(&out, OUTBOUND_LISTENER), "app/web|8080");
        let explicit = listener(&out, "outbound-tcp:app/web|8080");
        assert_eq!(
            explicit.address,
            Some(v1::SocketAddress {
                ip: "127.0.0.9".into(),
                port: 8080
            })
        );
        let explicit = chain(explicit, "app/web|8080");
        assert_eq!(explicit.r#match, Some(v1::FilterChainMatch::default()));
        for chain in [redirected, explicit] {
            assert_eq!(chain.protocol, super::protocol(protocol) as i32);
            let tcp = tcp_target(chain);
            assert_eq!(tcp.clusters, clusters(&[("app/web|8080", 100)]));
            assert_eq!(tcp.connect_authority, "web.app.svc.cluster.local:8080");
        }
        assert!(routes(&out, OUTBOUND_ROUTES).virtual_hosts.is_empty());
        assert_eq!(
            out.clusters[0].upstream_protocol,
            v1::UpstreamProtocol::Tcp as i32
        );
    }
}

#[test]
fn weighted_backends_keep_their_weights_for_http_and_tcp() {
    let mut ir = one_outbound(Protocol::Http);
    ir.outbound[0].routes[0].backends =
        vec![backend("app/web|8080", 90), backend("app/v2|8080", 10)];
    ir.clusters.push(cluster(
        "app/v2|8080",
        ClusterKind::Outbound,
        Protocol::Http,
        vec![],
    ));
    let out = translate(&ir, &fsm_golden::placeholder_credentials()).expect("translates");
    let action = first_route(routes(&out, OUTBOUND_ROUTES))
        .action
        .as_ref()
        .expect("action");
    assert_eq!(
        action.clusters,
        clusters(&[("app/web|8080", 90), ("app/v2|8080", 10)])
    );

    let mut ir = one_outbound(Protocol::Tcp);
    ir.outbound[0].tcp_backends = vec![backend("app/web|8080", 1), backend("app/v2|8080", 3)];
    ir.clusters.push(cluster(
        "app/v2|8080",
        ClusterKind::Outbound,
        Protocol::Tcp,
        vec![],
    ));
    let out = translate(&ir, &fsm_golden::placeholder_credentials()).expect("translates");
    let tcp = tcp_target(chain(listener(&out, OUTBOUND_LISTENER), "app/web|8080"));
    assert_eq!(
        tcp.clusters,
        clusters(&[("app/web|8080", 1), ("app/v2|8080", 3)])
    );
}

#[test]
fn meshed_endpoints_are_addressed_at_their_sidecar() {
    let mut ir = one_outbound(Protocol::Http);
    ir.clusters[0].endpoints = vec![
        endpoint("127.0.0.3", 8080, false, None),
        Endpoint {
            workload: Some(fsm_ir::WorkloadRef {
                namespace: "app".into(),
                pod: "web-7d9f8b6c5d-x2k4q".into(),
                kind: "Deployment".into(),
                name: "web".into(),
            }),
            ..endpoint("127.0.0.2", 8080, true, Some(id("web")))
        },
    ];
    let out = translate(&ir, &fsm_golden::placeholder_credentials()).expect("translates");
    assert_eq!(out.endpoints.len(), 1);
    let cla = &out.endpoints[0];
    assert_eq!(cla.cluster_name, "app/web|8080");
    let expected = vec![
        v1::Endpoint {
            address: Some(v1::SocketAddress {
                ip: "127.0.0.2".into(),
                port: 15003,
            }),
            weight: 1,
            meshed: true,
            identity: Some(v1::ServiceIdentity {
                service_account: "web".into(),
                namespace: "app".into(),
            }),
            workload: Some(v1::Workload {
                namespace: "app".into(),
                pod: "web-7d9f8b6c5d-x2k4q".into(),
                kind: "Deployment".into(),
                name: "web".into(),
            }),
        },
        v1::Endpoint {
            address: Some(v1::SocketAddress {
                ip: "127.0.0.3".into(),
                port: 8080,
            }),
            weight: 1,
            meshed: false,
            identity: None,
            workload: None,
        },
    ];
    assert_eq!(cla.endpoints, expected, "sorted by address");
    assert_eq!(
        out.clusters[0].discovery,
        Some(v1::cluster::Discovery::Eds(v1::EdsDiscovery {}))
    );
}

#[test]
fn local_clusters_are_static_and_have_no_load_assignment() {
    let out = translate(
        &one_inbound(Protocol::Http, AllowedSources::Any),
        &fsm_golden::placeholder_credentials(),
    )
    .expect("translates");
    assert!(out.endpoints.is_empty());
    let local = &out.clusters[0];
    assert_eq!(local.name, "app/me|8080|local");
    assert_eq!(
        local.discovery,
        Some(v1::cluster::Discovery::StaticLocal(v1::StaticLocal {
            address: Some(v1::SocketAddress {
                ip: "127.0.0.9".into(),
                port: 8080
            }),
        }))
    );
    assert_eq!(
        local.connect_timeout,
        Some(prost_types::Duration {
            seconds: 1,
            nanos: 0
        })
    );
}

#[test]
fn local_cluster_without_exactly_one_endpoint_is_unsupported() {
    let mut ir = one_inbound(Protocol::Http, AllowedSources::Any);
    ir.clusters[0]
        .endpoints
        .push(endpoint("127.0.0.10", 8080, false, None));
    assert_eq!(
        translate(&ir, &fsm_golden::placeholder_credentials()),
        Err(AdapterError::Unsupported {
            field: "clusters[app/me|8080|local].endpoints".into(),
            reason: "a local cluster reaches exactly one application address, found 2".into(),
        })
    );
}

#[test]
fn retry_policy_and_timeouts_map_to_typed_fields() {
    let mut ir = one_outbound(Protocol::Http);
    let route = &mut ir.outbound[0].routes[0];
    route.timeout_ms = Some(1500);
    route.retry = Some(RetryPolicy {
        retry_on: vec![
            "5xx,retriable-4xx".into(),
            "unavailable".into(),
            "5xx".into(),
        ],
        num_retries: 3,
        per_try_timeout_ms: Some(250),
        backoff_base_interval_ms: Some(100),
    });
    let out = translate(&ir, &fsm_golden::placeholder_credentials()).expect("translates");
    let action = first_route(routes(&out, OUTBOUND_ROUTES))
        .action
        .clone()
        .expect("action");
    assert_eq!(
        action.timeout,
        Some(prost_types::Duration {
            seconds: 1,
            nanos: 500_000_000
        })
    );
    assert_eq!(
        action.retry_policy,
        Some(v1::RetryPolicy {
            retry_on: vec![
                v1::RetryOn::RetryOn5xx as i32,
                v1::RetryOn::Retriable4xx as i32,
                v1::RetryOn::GrpcUnavailable as i32,
            ],
            num_retries: 3,
            per_try_timeout: Some(prost_types::Duration {
                seconds: 0,
                nanos: 250_000_000
            }),
            backoff_base_interval: Some(prost_types::Duration {
                seconds: 0,
                nanos: 100_000_000
            }),
        })
    );

    // No timeout in the IR: no deadline at all (not a default one).
    let out = translate(
        &one_outbound(Protocol::Http),
        &fsm_golden::placeholder_credentials(),
    )
    .expect("translates");
    let action = first_route(routes(&out, OUTBOUND_ROUTES))
        .action
        .clone()
        .expect("action");
    assert_eq!((action.timeout, action.retry_policy), (None, None));
}

/// The compiler passes on the conditions of `fsm_ir::RETRY_ON_CONDITIONS` only: each must be one
/// fsm-sidecar implements.
#[test]
fn every_condition_the_compiler_passes_on_is_implemented() {
    let mut ir = one_outbound(Protocol::Http);
    ir.outbound[0].routes[0].retry = Some(RetryPolicy {
        retry_on: fsm_ir::RETRY_ON_CONDITIONS.map(String::from).to_vec(),
        num_retries: 1,
        per_try_timeout_ms: None,
        backoff_base_interval_ms: None,
    });
    let out = translate(&ir, &fsm_golden::placeholder_credentials()).expect("translates");
    let action = first_route(routes(&out, OUTBOUND_ROUTES))
        .action
        .clone()
        .expect("action");
    let retry = action.retry_policy.expect("retry policy");
    assert_eq!(retry.retry_on.len(), fsm_ir::RETRY_ON_CONDITIONS.len());
}

#[test]
fn unknown_retry_condition_names_the_field() {
    let mut ir = one_outbound(Protocol::Http);
    ir.outbound[0].routes[0].retry = Some(RetryPolicy {
        retry_on: vec!["5xx".into(), "sometimes".into()],
        num_retries: 1,
        per_try_timeout_ms: None,
        backoff_base_interval_ms: None,
    });
    let err = translate(&ir, &fsm_golden::placeholder_credentials()).expect_err("must fail");
    assert_eq!(
        err.to_string(),
        "outbound[app/web|8080].routes[0].retry.retryOn: retry condition \"sometimes\" is not one fsm-sidecar implements"
    );
}

#[test]
fn route_matches_map_paths_methods_and_headers() {
    let cases = [
        (
            PathMatch::Regex(".*".into()),
            v1::route_match::Path::Prefix("/".into()),
        ),
        (
            PathMatch::Regex("/a/[0-9]+".into()),
            v1::route_match::Path::Regex("/a/[0-9]+".into()),
        ),
        (
            PathMatch::Prefix("/api".into()),
            v1::route_match::Path::Prefix("/api".into()),
        ),
        (
            PathMatch::Exact("/x".into()),
            v1::route_match::Path::Exact("/x".into()),
        ),
    ];
    for (path, expected) in cases {
        let mut ir = one_outbound(Protocol::Http);
        ir.outbound[0].routes[0].matches = RouteMatch {
            path,
            methods: vec!["GET".into(), "POST".into()],
            headers: BTreeMap::from([("User-Agent".into(), ".*curl.*".into())]),
        };
        let out = translate(&ir, &fsm_golden::placeholder_credentials()).expect("translates");
        let m = first_route(routes(&out, OUTBOUND_ROUTES))
            .r#match
            .clone()
            .expect("match");
        assert_eq!(m.path, Some(expected));
        assert_eq!(m.methods, ["GET", "POST"]);
        assert_eq!(
            m.headers,
            [v1::HeaderMatch {
                name: "user-agent".into(),
                r#match: Some(v1::header_match::Match::Regex(".*curl.*".into())),
            }]
        );
    }
    let mut ir = one_outbound(Protocol::Http);
    ir.outbound[0].routes[0].matches.methods = vec!["*".into()];
    let out = translate(&ir, &fsm_golden::placeholder_credentials()).expect("translates");
    let m = first_route(routes(&out, OUTBOUND_ROUTES))
        .r#match
        .clone()
        .expect("match");
    assert!(m.methods.is_empty(), "`*` means any method");
}

#[test]
fn allowed_identities_travel_with_inbound_routes_only() {
    let allowed = AllowedSources::Identities(vec![id("b"), id("a"), id("b")]);
    let out = translate(
        &one_inbound(Protocol::Http, allowed),
        &fsm_golden::placeholder_credentials(),
    )
    .expect("translates");
    let route = first_route(routes(&out, INBOUND_ROUTES));
    assert_eq!(
        route.allowed_sources,
        Some(v1::AllowedSources {
            any: false,
            identities: vec![
                v1::ServiceIdentity {
                    service_account: "a".into(),
                    namespace: "app".into()
                },
                v1::ServiceIdentity {
                    service_account: "b".into(),
                    namespace: "app".into()
                },
            ],
            source_ip_ranges: vec![],
            principals: vec![],
            principals_from: vec![],
        }),
        "sorted, without duplicates"
    );

    // SMI mode without a TrafficTarget: an explicit deny, which is also the unset default.
    let out = translate(
        &one_inbound(Protocol::Http, AllowedSources::Identities(vec![])),
        &fsm_golden::placeholder_credentials(),
    )
    .expect("translates");
    let route = first_route(routes(&out, INBOUND_ROUTES));
    assert_eq!(route.allowed_sources, Some(v1::AllowedSources::default()));

    // Outbound routes: not consulted, not sent.
    let out = translate(
        &one_outbound(Protocol::Http),
        &fsm_golden::placeholder_credentials(),
    )
    .expect("translates");
    assert_eq!(
        first_route(routes(&out, OUTBOUND_ROUTES)).allowed_sources,
        None
    );
}

#[test]
fn inbound_tcp_port_is_a_connect_route_and_a_redirect_chain() {
    let allowed = AllowedSources::Identities(vec![id("client")]);
    let mut ir = one_inbound(Protocol::Tcp, allowed.clone());
    // A second service on the same application port admits someone else.
    let mut other = ir.inbound[0].services[0].clone();
    other.service = svc("alias");
    other.allowed = AllowedSources::Identities(vec![id("other")]);
    ir.inbound[0].services.push(other);
    let out = translate(&ir, &fsm_golden::placeholder_credentials()).expect("translates");

    let vhost = &routes(&out, INBOUND_ROUTES).virtual_hosts[0];
    assert_eq!(vhost.name, "app/me|8080|local");
    assert_eq!(
        vhost.domains,
        ["me.app.svc.cluster.local:8080"],
        "only the CONNECT authority"
    );
    let route = &vhost.routes[0];
    assert_eq!(
        route.r#match.as_ref().and_then(|m| m.path.clone()),
        Some(v1::route_match::Path::Connect(v1::ConnectMatch {}))
    );
    assert_eq!(
        route.action.as_ref().map(|a| a.clusters.clone()),
        Some(clusters(&[("app/me|8080|local", 100)]))
    );
    assert_eq!(route.allowed_sources, Some(allowed_sources(&allowed)));

    let chain = chain(listener(&out, INBOUND_LISTENER), "target-port:8080");
    assert_eq!(
        chain.r#match.as_ref().map(|m| m.destination_port),
        Some(8080)
    );
    assert_eq!(
        tcp_target(chain).clusters,
        clusters(&[("app/me|8080|local", 100)])
    );
    assert_eq!(
        chain.allowed_sources,
        Some(allowed_sources(&AllowedSources::Identities(vec![
            id("client"),
            id("other")
        ]))),
        "a redirected connection may be meant for either service"
    );
}

#[test]
fn inbound_http_port_goes_through_the_inbound_routes() {
    let out = translate(
        &one_inbound(Protocol::Http, AllowedSources::Any),
        &fsm_golden::placeholder_credentials(),
    )
    .expect("translates");
    let inbound = listener(&out, INBOUND_LISTENER);
    assert_eq!(inbound.direction, v1::TrafficDirection::Inbound as i32);
    let redirected = chain(inbound, "target-port:8080");
    assert_eq!(http_target(redirected), INBOUND_ROUTES);
    assert_eq!(redirected.allowed_sources, None, "decided per route");
    let explicit = chain(inbound, EXPLICIT_HTTP_CHAIN);
    assert_eq!(http_target(explicit), INBOUND_ROUTES);
    assert_eq!(
        explicit.r#match.as_ref().map(|m| m.destination_port),
        Some(15003)
    );
}

#[test]
fn chains_are_ordered_most_specific_first_and_shadowed_ones_dropped() {
    let mut ir = one_outbound(Protocol::Tcp);
    let mut headless = outbound("db", 5432, Protocol::Tcp, "unused");
    headless.destination_ip_ranges.clear();
    let mut headless2 = outbound("db2", 5432, Protocol::Tcp, "unused");
    headless2.destination_ip_ranges.clear();
    ir.outbound.extend([headless, headless2]);
    for name in ["app/db|5432", "app/db2|5432"] {
        ir.clusters
            .push(cluster(name, ClusterKind::Outbound, Protocol::Tcp, vec![]));
    }
    let out = translate(&ir, &fsm_golden::placeholder_credentials()).expect("translates");
    let names: Vec<&str> = listener(&out, OUTBOUND_LISTENER)
        .filter_chains
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(names, ["app/web|8080", "app/db|5432", EXPLICIT_HTTP_CHAIN]);
    assert!(
        out.warnings
            .iter()
            .any(|w| w.contains("chain app/db2|5432 matches the same destinations as app/db|5432")),
        "{:?}",
        out.warnings
    );
    assert!(
        out.warnings
            .iter()
            .any(|w| w
                .starts_with("outbound TCP app/db2|5432: port 5432 already serves app/db|5432")),
        "{:?}",
        out.warnings
    );
}

#[test]
fn explicit_tcp_listener_is_skipped_when_the_port_is_taken() {
    let mut ir = one_outbound(Protocol::Tcp);
    ir.inbound
        .push(inbound(8080, Protocol::Http, "me", AllowedSources::Any));
    ir.clusters.push(cluster(
        "app/me|8080|local",
        ClusterKind::Local,
        Protocol::Http,
        vec![endpoint("127.0.0.9", 8080, false, None)],
    ));
    let out = translate(&ir, &fsm_golden::placeholder_credentials()).expect("translates");
    assert!(
        out.listeners
            .iter()
            .all(|l| l.name != "outbound-tcp:app/web|8080")
    );
    assert!(out.warnings[0].starts_with("outbound TCP app/web|8080: port 8080 is taken"));
    // Redirected connections still reach the service.
    tcp_target(chain(listener(&out, OUTBOUND_LISTENER), "app/web|8080"));
}

#[test]
fn invalid_ir_is_rejected() {
    let mut ir = one_outbound(Protocol::Http);
    ir.outbound[0].routes[0].backends = vec![backend("app/missing|1", 1)];
    assert_eq!(
        translate(&ir, &fsm_golden::placeholder_credentials()),
        Err(AdapterError::InvalidIr(fsm_ir::IrError::UnknownCluster(
            ClusterName("app/missing|1".into())
        )))
    );
}

#[test]
fn encode_lists_every_type_sorted_by_name() {
    let mut ir = one_outbound(Protocol::Http);
    ir.outbound
        .push(outbound("api", 80, Protocol::Http, "10.96.0.2"));
    ir.clusters.insert(
        0,
        cluster("app/api|80", ClusterKind::Outbound, Protocol::Http, vec![]),
    );
    let out = translate(&ir, &fsm_golden::placeholder_credentials()).expect("translates");
    let encoded = out.encode();
    let mut urls: Vec<&str> = encoded.keys().copied().collect();
    let mut all = ALL_TYPE_URLS.to_vec();
    urls.sort();
    all.sort();
    assert_eq!(urls, all);
    let names =
        |url: &str| -> Vec<String> { encoded[url].iter().map(|(n, _)| n.clone()).collect() };
    assert_eq!(names(type_url::CLUSTER), ["app/api|80", "app/web|8080"]);
    assert_eq!(
        names(type_url::LISTENER),
        [INBOUND_LISTENER, OUTBOUND_LISTENER]
    );
    assert_eq!(
        names(type_url::ROUTE_CONFIGURATION),
        [INBOUND_ROUTES, OUTBOUND_ROUTES]
    );
    // One upstream roots secret, however many services: each cluster names its identities.
    assert_eq!(
        names(type_url::SECRET),
        [
            "root-cert-for-mtls-inbound:app/me",
            "root-cert-for-mtls-outbound",
            "service-cert"
        ]
    );
    assert_eq!(
        names(type_url::RUNTIME),
        [fsm_dataplane_proto::RUNTIME_NAME]
    );
    let (_, bytes) = &encoded[type_url::CLUSTER][1];
    assert_eq!(
        v1::Cluster::decode(bytes.as_slice()).as_ref(),
        Ok(&out.clusters[1])
    );
    assert_eq!(
        translate(&ir, &fsm_golden::placeholder_credentials())
            .expect("translates")
            .encode(),
        encoded,
        "deterministic"
    );
}

#[test]
fn render_never_shows_private_keys() {
    let resources = NativeResources {
        secrets: vec![v1::Secret {
            name: "service-cert".into(),
            kind: Some(v1::secret::Kind::TlsCertificate(v1::TlsCertificate {
                certificate_chain: b"CERT".to_vec(),
                private_key: b"KEY MATERIAL".to_vec(),
            })),
        }],
        ..Default::default()
    };
    let files = render(&resources);
    let secrets = &files["out.secrets.yaml"];
    assert!(secrets.contains("service-cert"), "{secrets}");
    assert!(secrets.contains("certificate_chain"), "{secrets}");
    assert!(!secrets.contains("private_key"), "{secrets}");
}

/// MeshConfig `spec.sidecar.logLevel` in the IR becomes `Runtime.log_level`; none leaves the
/// sidecar its `--log-level`.
#[test]
fn runtime_carries_the_sidecar_log_level() {
    let mut ir = one_outbound(Protocol::Http);
    let level = |ir: &ProxyIr| {
        let out = proxy_resources(ir, &fsm_golden::placeholder_credentials()).expect("translates");
        assert_eq!(out.runtime.len(), 1);
        assert_eq!(out.runtime[0].name, fsm_dataplane_proto::RUNTIME_NAME);
        out.runtime[0].log_level()
    };
    assert_eq!(level(&ir), v1::LogLevel::Unspecified);
    for (ir_level, wire) in [
        (fsm_ir::LogLevel::Trace, v1::LogLevel::Trace),
        (fsm_ir::LogLevel::Debug, v1::LogLevel::Debug),
        (fsm_ir::LogLevel::Info, v1::LogLevel::Info),
        (fsm_ir::LogLevel::Warn, v1::LogLevel::Warn),
        (fsm_ir::LogLevel::Error, v1::LogLevel::Error),
        (fsm_ir::LogLevel::Off, v1::LogLevel::Off),
    ] {
        ir.mesh.sidecar_log_level = Some(ir_level);
        assert_eq!(level(&ir), wire);
    }
}
