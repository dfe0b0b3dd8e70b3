//! Listeners `outbound-listener`, `outbound-tcp:<ns>/<svc>|<port>` and `inbound-listener`.

use std::collections::{BTreeMap, BTreeSet};

use fsm_dataplane_proto::v1;
use fsm_ir::{
    AllowedSources, Egress, ExplicitTcp, InboundPort, OutboundService, ProxyIr, names, ports,
};

use crate::{
    EXPLICIT_HTTP_CHAIN, INBOUND_LISTENER, INBOUND_ROUTES, INGRESS_CHAIN, INGRESS_ROUTES,
    OUTBOUND_LISTENER, OUTBOUND_ROUTES, allowed_sources, connect_authority, protocol,
    socket_address, weighted,
};

/// Every listener of the proxy; what had to be left out goes to `warnings`.
pub(crate) fn all(ir: &ProxyIr, warnings: &mut Vec<String>) -> Vec<v1::Listener> {
    let pod_ip = ir.proxy.pod_ip;
    let mut listeners = Vec::new();

    // Destinations the pod's rules leave alone get no chain: their connections never arrive.
    let bypass = &ir.proxy.bypass;
    let mut outbound = vec![explicit_http(ports::OUTBOUND, OUTBOUND_ROUTES)];
    let redirected = ir
        .outbound
        .iter()
        .filter(|svc| bypass.redirects_outbound(svc.port, &svc.destination_ip_ranges));
    outbound.extend(redirected.map(|svc| v1::FilterChain {
        name: format!("{}|{}", svc.service, svc.port),
        r#match: Some(v1::FilterChainMatch {
            destination_port: u32::from(svc.port),
            destination_ip_ranges: svc.destination_ip_ranges.clone(),
            ..Default::default()
        }),
        ..outbound_target(svc)
    }));
    outbound.extend(egress_chains(&ir.egress).into_iter().filter(|chain| {
        chain.r#match.as_ref().is_none_or(|m| {
            bypass.redirects_outbound(m.destination_port as u16, &m.destination_ip_ranges)
        })
    }));
    if ir.mesh.enable_egress {
        // Egress passthrough: a redirected connection no service's chain takes goes to where
        // it was going (the chain with no port and no ranges sorts last).
        outbound.push(to_original_destination(
            names::PASSTHROUGH_CLUSTER.into(),
            v1::FilterChainMatch::default(),
        ));
    }
    listeners.push(v1::Listener {
        name: OUTBOUND_LISTENER.into(),
        address: Some(socket_address(pod_ip, ports::OUTBOUND)),
        direction: v1::TrafficDirection::Outbound as i32,
        filter_chains: most_specific_first(OUTBOUND_LISTENER, outbound, warnings),
        tracing: None,
    });

    // Explicit-mode TCP (see `ProxyIr::explicit_tcp`).
    for tcp in ir.explicit_tcp() {
        let svc = match tcp {
            ExplicitTcp::Listener(svc) => svc,
            ExplicitTcp::PortTaken(svc) => {
                warnings.push(format!(
                    "outbound TCP {}|{}: port {} is taken on this pod (application or sidecar port); clients of this pod reach it only when their connections are redirected to {OUTBOUND_LISTENER}",
                    svc.service, svc.port, svc.port
                ));
                continue;
            }
            ExplicitTcp::PortServes { service, first } => {
                warnings.push(format!(
                    "outbound TCP {}|{}: port {} already serves {}|{} in explicit mode; clients of this pod reach it only when their connections are redirected to {OUTBOUND_LISTENER}",
                    service.service, service.port, service.port, first.service, first.port
                ));
                continue;
            }
        };
        let name = format!("{}|{}", svc.service, svc.port);
        listeners.push(v1::Listener {
            name: format!("outbound-tcp:{name}"),
            address: Some(socket_address(pod_ip, svc.port)),
            direction: v1::TrafficDirection::Outbound as i32,
            filter_chains: vec![v1::FilterChain {
                name,
                r#match: Some(v1::FilterChainMatch::default()),
                ..outbound_target(svc)
            }],
            tracing: None,
        });
    }

    let mut inbound = vec![explicit_http(ports::INBOUND, INBOUND_ROUTES)];
    // A port that admits TLS from outside the mesh takes that TLS when redirected (peers reach
    // it through 15003, as always): the first bytes cannot tell the two apart.
    let tls_ingress = |p: &InboundPort| {
        ir.proxy.transparent
            && !(p.ingress_principals().is_empty() && p.ingress_tls_sources().is_empty())
    };
    inbound.extend(
        ir.inbound
            .iter()
            .filter(|p| !tls_ingress(p) && bypass.redirects_inbound(p.target_port))
            .filter_map(redirected_inbound),
    );
    // Plaintext never reaches a meshed application from the mesh: every peer chain requires
    // mTLS. Clients outside the mesh an IngressBackend admits send plaintext HTTP, to chains
    // of their own that match their addresses only; the connection's first bytes tell them apart.
    let ingress = ingress_chains(ir);
    for chain in &mut inbound {
        chain.tls = Some(crate::downstream_tls(&ir.proxy.identity));
        if !ingress.is_empty()
            && let Some(m) = chain.r#match.as_mut()
        {
            m.transport_protocol = v1::TransportProtocol::Tls as i32;
        }
    }
    inbound.extend(ingress);
    listeners.push(v1::Listener {
        name: INBOUND_LISTENER.into(),
        address: Some(socket_address(pod_ip, ports::INBOUND)),
        direction: v1::TrafficDirection::Inbound as i32,
        filter_chains: most_specific_first(INBOUND_LISTENER, inbound, warnings),
        tracing: None,
    });
    listeners
}

/// A chain whose connections go to their original destination, as they are.
fn to_original_destination(name: String, m: v1::FilterChainMatch) -> v1::FilterChain {
    v1::FilterChain {
        name,
        r#match: Some(m),
        protocol: v1::Protocol::Tcp as i32,
        target: Some(v1::filter_chain::Target::Tcp(v1::TcpTarget {
            clusters: vec![v1::WeightedCluster {
                name: names::PASSTHROUGH_CLUSTER.into(),
                weight: 100,
            }],
            connect_authority: String::new(),
        })),
        allowed_sources: None,
        tls: None,
    }
}

/// The outbound chains of redirected connections an Egress policy lets out of the mesh: per
/// port, HTTP to the `outbound` routes (whose egress hosts pick the requests allowed), TLS by
/// server name and TCP by destination range to the original destination. A service's chains
/// match its ClusterIPs, so they win over these on the same port.
fn egress_chains(egress: &Egress) -> Vec<v1::FilterChain> {
    let http_ports: BTreeSet<u16> = egress.http.iter().map(|h| h.port).collect();
    let http = http_ports
        .into_iter()
        .map(|port| http_on_port(format!("egress-http|{port}"), port, OUTBOUND_ROUTES));
    let tls = egress.tls.iter().map(|t| {
        to_original_destination(
            format!("egress-tls|{}", t.port),
            v1::FilterChainMatch {
                destination_port: u32::from(t.port),
                server_names: t.server_names.clone(),
                ..Default::default()
            },
        )
    });
    let tcp = egress.tcp.iter().map(|t| {
        to_original_destination(
            format!("egress-tcp|{}", t.port),
            v1::FilterChainMatch {
                destination_port: u32::from(t.port),
                destination_ip_ranges: t.ip_ranges.clone(),
                ..Default::default()
            },
        )
    });
    http.chain(tls).chain(tcp).collect()
}

/// Plaintext HTTP chains for the clients an IngressBackend admits: one on the sidecar's own
/// inbound port (explicit mode), one per application port that admits some (redirected), each
/// matching the admitted addresses only; the `ingress` routes then admit each service's own.
fn ingress_chains(ir: &ProxyIr) -> Vec<v1::FilterChain> {
    let sources_of = |port: &InboundPort| -> BTreeSet<String> {
        port.services
            .iter()
            .flat_map(|s| s.ingress_sources.iter().cloned())
            .collect()
    };
    let chain = |name: String, port: u16, sources: BTreeSet<String>| v1::FilterChain {
        name,
        r#match: Some(v1::FilterChainMatch {
            destination_port: u32::from(port),
            source_ip_ranges: sources.into_iter().collect(),
            transport_protocol: v1::TransportProtocol::Plaintext as i32,
            ..Default::default()
        }),
        protocol: v1::Protocol::Http as i32,
        target: Some(http(INGRESS_ROUTES)),
        allowed_sources: None,
        tls: None,
    };
    // Each admitting port's sources, gathered once.
    let ports: Vec<(u16, BTreeSet<String>)> = ir
        .inbound
        .iter()
        .filter(|p| p.protocol.is_http() && ir.proxy.bypass.redirects_inbound(p.target_port))
        .map(|p| (p.target_port, sources_of(p)))
        .filter(|(_, sources)| !sources.is_empty())
        .collect();
    let mut chains = Vec::new();
    if !ports.is_empty() {
        let all: BTreeSet<String> = ports.iter().flat_map(|(_, s)| s.iter().cloned()).collect();
        chains.push(chain(INGRESS_CHAIN.into(), ports::INBOUND, all));
    }
    chains.extend(ports.into_iter().map(|(target_port, sources)| {
        chain(
            format!("ingress:target-port:{target_port}"),
            target_port,
            sources,
        )
    }));
    // TLS from outside the mesh, to the application port it was sent to (redirected), with a
    // client certificate that names one of the port's principals.
    let redirected_http = || {
        ir.inbound
            .iter()
            .filter(|p| ir.proxy.transparent && p.protocol.is_http())
            .filter(|p| ir.proxy.bypass.redirects_inbound(p.target_port))
    };
    // Without client certificates (`skipClientCertValidation`), from the admitted addresses.
    chains.extend(
        redirected_http()
            .map(|p| (p.target_port, p.ingress_tls_sources()))
            .filter(|(_, sources)| !sources.is_empty())
            .map(|(target_port, sources)| v1::FilterChain {
                name: format!("ingress-https-unchecked:target-port:{target_port}"),
                r#match: Some(v1::FilterChainMatch {
                    destination_port: u32::from(target_port),
                    source_ip_ranges: sources.into_iter().map(str::to_owned).collect(),
                    transport_protocol: v1::TransportProtocol::Tls as i32,
                    ..Default::default()
                }),
                protocol: v1::Protocol::Http as i32,
                target: Some(http(INGRESS_ROUTES)),
                allowed_sources: None,
                tls: Some(v1::DownstreamTls {
                    certificate_secret: names::SERVICE_CERT.into(),
                    validation_secret: String::new(),
                    require_client_certificate: false,
                }),
            }),
    );
    let tls_ports = redirected_http().filter(|p| !p.ingress_principals().is_empty());
    chains.extend(tls_ports.map(|port| v1::FilterChain {
        name: format!("ingress-https:target-port:{}", port.target_port),
        r#match: Some(v1::FilterChainMatch {
            destination_port: u32::from(port.target_port),
            transport_protocol: v1::TransportProtocol::Tls as i32,
            ..Default::default()
        }),
        protocol: v1::Protocol::Http as i32,
        target: Some(http(INGRESS_ROUTES)),
        allowed_sources: None,
        tls: Some(v1::DownstreamTls {
            certificate_secret: names::SERVICE_CERT.into(),
            validation_secret: names::ingress_validation(&ir.proxy.identity),
            require_client_certificate: true,
        }),
    }));
    chains
}

/// HTTP sent to the sidecar's own port, routed by Host.
fn explicit_http(port: u16, routes: &str) -> v1::FilterChain {
    http_on_port(EXPLICIT_HTTP_CHAIN.into(), port, routes)
}

/// Plaintext HTTP to `port` (any address), routed by Host with the route configuration `routes`.
fn http_on_port(name: String, port: u16, routes: &str) -> v1::FilterChain {
    v1::FilterChain {
        name,
        r#match: Some(v1::FilterChainMatch {
            destination_port: u32::from(port),
            ..Default::default()
        }),
        protocol: v1::Protocol::Http as i32,
        target: Some(http(routes)),
        allowed_sources: None,
        tls: None,
    }
}

fn http(routes: &str) -> v1::filter_chain::Target {
    v1::filter_chain::Target::Http(v1::HttpTarget {
        route_config_name: routes.into(),
    })
}

/// Protocol and target of a chain for one outbound service port (name and match left default).
fn outbound_target(svc: &OutboundService) -> v1::FilterChain {
    let target = if svc.protocol.is_http() {
        http(OUTBOUND_ROUTES)
    } else {
        v1::filter_chain::Target::Tcp(v1::TcpTarget {
            clusters: weighted(&svc.tcp_backends),
            connect_authority: connect_authority(&svc.service, svc.port),
        })
    };
    v1::FilterChain {
        protocol: protocol(svc.protocol) as i32,
        target: Some(target),
        ..Default::default()
    }
}

/// The chain for connections iptables redirected from one application port. HTTP goes through
/// route configuration `inbound`; TCP straight to the application. When several services expose
/// one TCP port the destination cannot tell which one a client meant, so the chain admits whoever
/// any of them admits; their local clusters all reach the same application address.
fn redirected_inbound(port: &InboundPort) -> Option<v1::FilterChain> {
    let first = port.services.first()?;
    let (target, allowed) = if port.protocol.is_http() {
        (http(INBOUND_ROUTES), None)
    } else {
        let allowed = port
            .services
            .iter()
            .skip(1)
            .fold(first.allowed.clone(), |all, svc| union(all, &svc.allowed));
        let target = v1::filter_chain::Target::Tcp(v1::TcpTarget {
            clusters: vec![v1::WeightedCluster {
                name: first.local_cluster.to_string(),
                weight: 100,
            }],
            connect_authority: String::new(),
        });
        (target, Some(allowed_sources(&allowed)))
    };
    Some(v1::FilterChain {
        name: format!("target-port:{}", port.target_port),
        r#match: Some(v1::FilterChainMatch {
            destination_port: u32::from(port.target_port),
            ..Default::default()
        }),
        protocol: protocol(port.protocol) as i32,
        target: Some(target),
        allowed_sources: allowed,
        tls: None,
    })
}

fn union(a: AllowedSources, b: &AllowedSources) -> AllowedSources {
    match (a, b) {
        (AllowedSources::Identities(mut a), AllowedSources::Identities(b)) => {
            a.extend(b.iter().cloned());
            AllowedSources::Identities(a)
        }
        _ => AllowedSources::Any,
    }
}

/// Orders chains so that the first match is the most specific one: chains with address ranges
/// before chains without, an exact port before any port, then by port, keeping the IR's order
/// among equals. A chain whose match equals an earlier chain's can never be chosen: it is dropped
/// with a warning (the explicit TCP listeners keep the same, first, service of a port).
fn most_specific_first(
    listener: &str,
    mut chains: Vec<v1::FilterChain>,
    warnings: &mut Vec<String>,
) -> Vec<v1::FilterChain> {
    fn key(chain: &v1::FilterChain) -> (bool, bool, u32, bool, bool) {
        let m = chain.r#match.as_ref();
        let port = m.map_or(0, |m| m.destination_port);
        let ranges = m.is_some_and(|m| !m.destination_ip_ranges.is_empty());
        let names = m.is_some_and(|m| !m.server_names.is_empty());
        let sources = m.is_some_and(|m| !m.source_ip_ranges.is_empty());
        (!ranges, port == 0, port, !names, !sources)
    }
    // Stable: equal keys stay in IR order, which is deterministic.
    chains.sort_by_key(key);
    type Match = (u32, Vec<String>, Vec<String>, Vec<String>, i32);
    let mut seen: BTreeMap<Match, String> = BTreeMap::new();
    chains.retain(|chain| {
        let m = chain.r#match.clone().unwrap_or_default();
        let mut ranges = m.destination_ip_ranges;
        ranges.sort();
        let mut names = m.server_names;
        names.sort();
        let mut sources = m.source_ip_ranges;
        sources.sort();
        let m = (
            m.destination_port,
            ranges,
            names,
            sources,
            m.transport_protocol,
        );
        match seen.get(&m) {
            Some(first) => {
                warnings.push(format!(
                    "{listener}: chain {} matches the same destinations as {first} and is never used",
                    chain.name
                ));
                false
            }
            None => {
                seen.insert(m, chain.name.clone());
                true
            }
        }
    });
    chains
}
