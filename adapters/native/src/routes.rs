//! Route configurations `outbound` and `inbound`.

use std::collections::BTreeSet;

use fsm_dataplane_proto::v1;
use fsm_ir::{Domains, EgressHttpHost, HttpRoute, OutboundService, PathMatch, ProxyIr};

use crate::{
    AdapterError, INBOUND_ROUTES, INGRESS_ROUTES, OUTBOUND_ROUTES, allowed_sources,
    connect_authority, duration_ms, weighted,
};

/// One virtual host per HTTP service port this proxy may call, routed by Host: the same for every
/// proxy that may reach the same services.
pub fn outbound<'a>(
    services: impl IntoIterator<Item = &'a OutboundService>,
    egress_hosts: &[EgressHttpHost],
) -> Result<v1::RouteConfiguration, AdapterError> {
    let mut domains = Domains::default();
    let mut virtual_hosts = Vec::new();
    for svc in services.into_iter().filter(|s| s.protocol.is_http()) {
        let owner = format!("outbound[{}|{}]", svc.service, svc.port);
        virtual_hosts.push(v1::VirtualHost {
            name: format!("{}|{}", svc.service, svc.port),
            domains: domains.claim(&svc.hosts),
            routes: svc
                .routes
                .iter()
                .enumerate()
                .map(|(i, r)| route(r, &format!("{owner}.routes[{i}]"), false))
                .collect::<Result<_, _>>()?,
            rate_limit: None,
        });
    }
    for host in egress_hosts {
        let name = host.cluster_name().to_string();
        let owner = format!("egress[{name}]");
        virtual_hosts.push(v1::VirtualHost {
            domains: domains.claim(&host.domains()),
            routes: host
                .routes()
                .iter()
                .enumerate()
                .map(|(i, r)| route(r, &format!("{owner}.routes[{i}]"), false))
                .collect::<Result<_, _>>()?,
            name,
            rate_limit: None,
        });
    }
    Ok(v1::RouteConfiguration {
        name: OUTBOUND_ROUTES.into(),
        virtual_hosts,
    })
}

/// One virtual host per service port of this pod: its HTTP routes, or, for a TCP port, one CONNECT
/// route to the local cluster for tunnels from peer sidecars.
pub(crate) fn inbound(ir: &ProxyIr) -> Result<v1::RouteConfiguration, AdapterError> {
    let mut domains = Domains::default();
    let mut virtual_hosts = Vec::new();
    for port in &ir.inbound {
        for svc in &port.services {
            let (hosts, routes) = if port.protocol.is_http() {
                let owner = format!(
                    "inbound[{}].services[{}|{}]",
                    port.target_port, svc.service, svc.port
                );
                let routes = svc
                    .routes
                    .iter()
                    .enumerate()
                    .map(|(i, r)| route(r, &format!("{owner}.routes[{i}]"), true))
                    .collect::<Result<_, _>>()?;
                (svc.hosts.clone(), routes)
            } else {
                // A tunnel's authority is always this exact form; leaving the bare names
                // (`api`, `api.shop`) to HTTP virtual hosts of the same service.
                let route = to_cluster(
                    v1::route_match::Path::Connect(v1::ConnectMatch {}),
                    svc.local_cluster.as_str(),
                    Some(allowed_sources(&svc.allowed)),
                );
                (vec![connect_authority(&svc.service, svc.port)], vec![route])
            };
            virtual_hosts.push(v1::VirtualHost {
                name: svc.local_cluster.to_string(),
                domains: domains.claim(&hosts),
                routes,
                rate_limit: svc.rate_limit.as_ref().map(rate_limit),
            });
        }
    }
    Ok(v1::RouteConfiguration {
        name: INBOUND_ROUTES.into(),
        virtual_hosts,
    })
}

/// Route configuration `ingress`, for plaintext HTTP from outside the mesh (IngressBackend): one
/// virtual host per HTTP service port of this pod that admits some, its one route admitting the
/// admitted addresses only. `None` when no port admits any.
pub(crate) fn ingress(ir: &ProxyIr) -> Option<v1::RouteConfiguration> {
    let mut domains = Domains::default();
    let mut virtual_hosts = Vec::new();
    for svc in ir.ingress_services() {
        virtual_hosts.push(v1::VirtualHost {
            name: svc.local_cluster.to_string(),
            domains: domains.claim(&svc.hosts),
            routes: vec![to_cluster(
                v1::route_match::Path::Prefix("/".into()),
                svc.local_cluster.as_str(),
                Some(v1::AllowedSources {
                    any: false,
                    identities: vec![],
                    source_ip_ranges: svc
                        .ingress_sources
                        .iter()
                        .chain(&svc.ingress_tls_sources)
                        .cloned()
                        .collect::<BTreeSet<_>>()
                        .into_iter()
                        .collect(),
                    principals: svc.ingress_principals.clone(),
                    principals_from: svc
                        .ingress_principals_from
                        .iter()
                        .map(|from| v1::PrincipalsFrom {
                            principals: from.principals.clone(),
                            source_ip_ranges: from.sources.clone(),
                        })
                        .collect(),
                }),
            )],
            rate_limit: None,
        });
    }
    (!virtual_hosts.is_empty()).then(|| v1::RouteConfiguration {
        name: INGRESS_ROUTES.into(),
        virtual_hosts,
    })
}

/// A route taking every request `path` matches to `cluster` alone, admitting `allowed` (unset
/// on outbound routes).
pub(crate) fn to_cluster(
    path: v1::route_match::Path,
    cluster: &str,
    allowed: Option<v1::AllowedSources>,
) -> v1::Route {
    v1::Route {
        r#match: Some(v1::RouteMatch {
            path: Some(path),
            ..Default::default()
        }),
        action: Some(v1::RouteAction {
            clusters: vec![v1::WeightedCluster {
                name: cluster.to_owned(),
                weight: 100,
            }],
            timeout: None,
            retry_policy: None,
        }),
        allowed_sources: allowed,
        rate_limit: None,
    }
}

/// `field` is the IR path of `r`, for errors. Allowed sources are kept for inbound routes only.
fn route(r: &HttpRoute, field: &str, inbound: bool) -> Result<v1::Route, AdapterError> {
    use v1::route_match::Path;
    let path = match &r.matches.path {
        PathMatch::Exact(p) => Path::Exact(p.clone()),
        PathMatch::Prefix(p) => Path::Prefix(p.clone()),
        // FSM's permissive wildcard: a prefix test is cheaper than running a regex per request.
        PathMatch::Regex(re) if re == ".*" => Path::Prefix("/".into()),
        PathMatch::Regex(re) => Path::Regex(re.clone()),
    };
    let methods = if r.matches.methods.iter().any(|m| m == "*") {
        vec![]
    } else {
        r.matches.methods.clone()
    };
    let headers = r
        .matches
        .headers
        .iter()
        // Header values in the IR are regular expressions (SMI HTTPRouteGroup headers).
        .map(|(name, value)| v1::HeaderMatch {
            name: name.to_ascii_lowercase(),
            r#match: Some(v1::header_match::Match::Regex(value.clone())),
        })
        .collect();
    let retry_policy = match &r.retry {
        Some(retry) => Some(retry_policy(retry, &format!("{field}.retry"))?),
        None => None,
    };
    Ok(v1::Route {
        r#match: Some(v1::RouteMatch {
            path: Some(path),
            methods,
            headers,
        }),
        action: Some(v1::RouteAction {
            clusters: weighted(&r.backends),
            timeout: r.timeout_ms.map(duration_ms),
            retry_policy,
        }),
        allowed_sources: inbound.then(|| allowed_sources(&r.allowed)),
        rate_limit: r.rate_limit.as_ref().filter(|_| inbound).map(rate_limit),
    })
}

fn rate_limit(limit: &fsm_ir::LocalRateLimit) -> v1::LocalRateLimit {
    v1::LocalRateLimit {
        max_tokens: limit.max_tokens,
        tokens_per_fill: limit.tokens_per_fill,
        fill_interval: Some(duration_ms(limit.fill_interval_ms)),
        status: u32::from(limit.status),
        response_headers_to_add: limit
            .response_headers
            .iter()
            .map(|h| v1::ResponseHeader {
                name: h.name.clone(),
                value: h.value.clone(),
            })
            .collect(),
    }
}

fn retry_policy(retry: &fsm_ir::RetryPolicy, field: &str) -> Result<v1::RetryPolicy, AdapterError> {
    // Each name once (`RetryPolicy::conditions`), and each name is its own condition.
    let retry_on = retry
        .conditions()
        .into_iter()
        .map(|condition| {
            retry_on_condition(condition)
                .map(|value| value as i32)
                .ok_or_else(|| AdapterError::Unsupported {
                    field: format!("{field}.retryOn"),
                    reason: format!(
                        "retry condition {condition:?} is not one fsm-sidecar implements"
                    ),
                })
        })
        .collect::<Result<Vec<i32>, _>>()?;
    Ok(v1::RetryPolicy {
        retry_on,
        num_retries: retry.num_retries,
        per_try_timeout: retry.per_try_timeout_ms.map(duration_ms),
        backoff_base_interval: retry.backoff_base_interval_ms.map(duration_ms),
    })
}

/// Envoy's `retry_on` names, which FSM's Retry policy uses.
fn retry_on_condition(name: &str) -> Option<v1::RetryOn> {
    use v1::RetryOn;
    Some(match name {
        "5xx" => RetryOn::RetryOn5xx,
        "gateway-error" => RetryOn::GatewayError,
        "reset" => RetryOn::Reset,
        "connect-failure" => RetryOn::ConnectFailure,
        "retriable-4xx" => RetryOn::Retriable4xx,
        "refused-stream" => RetryOn::RefusedStream,
        "cancelled" => RetryOn::GrpcCancelled,
        "deadline-exceeded" => RetryOn::GrpcDeadlineExceeded,
        "internal" => RetryOn::GrpcInternal,
        "resource-exhausted" => RetryOn::GrpcResourceExhausted,
        "unavailable" => RetryOn::GrpcUnavailable,
        _ => return None,
    })
}
