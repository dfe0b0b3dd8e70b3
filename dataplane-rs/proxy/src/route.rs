//! Picking the route for a request: virtual host by Host/`:authority`, then the first route whose
//! path, method and headers all match.

use std::net::IpAddr;

use http::{HeaderMap, Method};

use crate::config::{HeaderMatchKind, PathMatch, Route, RouteTable, VirtualHost};
use crate::tls::Peer;

/// Why a request got (or did not get) a route.
#[derive(Debug)]
pub enum Decision<'a> {
    /// 404: no virtual host has this domain.
    NoVirtualHost,
    /// 404: the virtual host has no route for this request.
    NoRoute,
    /// 403: the first matching route does not admit this client.
    Denied,
    Matched(&'a VirtualHost, &'a Route),
}

/// The request attributes routing looks at.
#[derive(Clone, Copy, Debug)]
pub struct RequestInfo<'a> {
    pub host: &'a str,
    pub method: &'a Method,
    /// Without the query string.
    pub path: &'a str,
    pub headers: &'a HeaderMap,
}

/// `peer` is an mTLS client as its verified certificate names it, `None` for a client without
/// one; `client` is the address the connection comes from.
pub fn select<'a>(
    table: &'a RouteTable,
    req: RequestInfo<'_>,
    inbound: bool,
    peer: Option<&Peer>,
    client: IpAddr,
) -> Decision<'a> {
    // An exact domain first; then the `*` virtual host, if the table has one.
    let Some(vh) = table
        .domains
        .get(&req.host.to_ascii_lowercase())
        .copied()
        .or(table.fallback)
        .and_then(|i| table.virtual_hosts.get(i))
    else {
        return Decision::NoVirtualHost;
    };
    let Some(route) = vh.routes.iter().find(|r| matches(r, req)) else {
        return Decision::NoRoute;
    };
    // Outbound routes carry no allowed sources and admit everyone; inbound ones fail closed.
    if inbound
        && !route
            .allowed
            .as_ref()
            .is_some_and(|a| a.admits(peer, client))
    {
        return Decision::Denied;
    }
    Decision::Matched(vh, route)
}

pub fn matches(route: &Route, req: RequestInfo<'_>) -> bool {
    let is_connect = req.method == Method::CONNECT;
    let path_ok = match &route.path {
        PathMatch::Connect => is_connect,
        _ if is_connect => false,
        PathMatch::Exact(p) => req.path == p,
        PathMatch::Prefix(p) => req.path.starts_with(p.as_str()),
        PathMatch::Regex(re) => re.is_match(req.path),
    };
    path_ok
        && (route.methods.is_empty() || route.methods.iter().any(|m| m == req.method))
        && route.headers.iter().all(|h| {
            let values: Vec<&str> = req
                .headers
                .get_all(&h.name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            if req.headers.get(&h.name).is_none() {
                return false;
            }
            let joined = values.join(",");
            match &h.kind {
                HeaderMatchKind::Present => true,
                HeaderMatchKind::Exact(v) => joined == *v,
                HeaderMatchKind::Regex(re) => re.is_match(&joined),
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_support::set;
    use crate::config::{Config, Weighted};
    use fsm_dataplane_proto::{type_url, v1};
    use prost::Message;
    use std::sync::Arc;
    use test_case::test_case;

    fn route(
        path: v1::route_match::Path,
        methods: &[&str],
        headers: Vec<v1::HeaderMatch>,
        cluster: &str,
        any: Option<bool>,
    ) -> v1::Route {
        v1::Route {
            r#match: Some(v1::RouteMatch {
                path: Some(path),
                methods: methods.iter().map(|m| m.to_string()).collect(),
                headers,
            }),
            action: Some(v1::RouteAction {
                clusters: vec![v1::WeightedCluster {
                    name: cluster.into(),
                    weight: 1,
                }],
                ..Default::default()
            }),
            allowed_sources: any.map(|any| v1::AllowedSources {
                any,
                identities: vec![v1::ServiceIdentity {
                    service_account: "curl".into(),
                    namespace: "demo".into(),
                }],
                source_ip_ranges: vec!["192.168.5.0/24".into()],
                principals: vec![
                    "Ingress.Example.com".into(),
                    "spiffe://cluster.local/ns/ingress/sa/edge".into(),
                ],
                principals_from: vec![],
            }),
            rate_limit: None,
        }
    }

    fn header(name: &str, m: v1::header_match::Match) -> v1::HeaderMatch {
        v1::HeaderMatch {
            name: name.into(),
            r#match: Some(m),
        }
    }

    fn table(any: Option<bool>) -> Arc<RouteTable> {
        use v1::header_match::Match as H;
        use v1::route_match::Path as P;
        let rc = v1::RouteConfiguration {
            name: "rc".into(),
            virtual_hosts: vec![v1::VirtualHost {
                name: "vh".into(),
                domains: vec!["httpbin.demo:14001".into(), "httpbin".into()],
                routes: vec![
                    route(P::Exact("/exact".into()), &[], vec![], "exact", any),
                    route(
                        P::Regex("/items/[0-9]+".into()),
                        &["GET"],
                        vec![],
                        "regex",
                        any,
                    ),
                    route(
                        P::Prefix("/api".into()),
                        &[],
                        vec![header("x-canary", H::Exact("yes".into()))],
                        "canary",
                        any,
                    ),
                    route(
                        P::Prefix("/api".into()),
                        &[],
                        vec![header("x-user", H::Regex("a.*".into()))],
                        "user",
                        any,
                    ),
                    route(
                        P::Prefix("/api".into()),
                        &[],
                        vec![header("x-debug", H::Present(true))],
                        "debug",
                        any,
                    ),
                    route(P::Connect(v1::ConnectMatch {}), &[], vec![], "tunnel", any),
                    route(
                        P::Prefix("/".into()),
                        &["GET", "POST"],
                        vec![],
                        "default",
                        any,
                    ),
                ],
                rate_limit: None,
            }],
        };
        built(&rc)
    }

    /// The route table the sidecar builds from `rc` (named `rc`).
    fn built(rc: &v1::RouteConfiguration) -> Arc<RouteTable> {
        let set = set(vec![(
            type_url::ROUTE_CONFIGURATION,
            "rc",
            rc.encode_to_vec(),
        )]);
        let config = Config::build(&set, type_url::CLUSTER).expect("valid");
        config.routes.get("rc").cloned().expect("rc")
    }

    /// `httpbin` to cluster `exact`, then (when `star`) `*` to cluster `passthrough`.
    fn with_fallback(star: bool) -> Arc<RouteTable> {
        let vh = |name: &str, domain: &str, cluster: &str| v1::VirtualHost {
            name: name.into(),
            domains: vec![domain.into()],
            routes: vec![route(
                v1::route_match::Path::Prefix("/".into()),
                &[],
                vec![],
                cluster,
                None,
            )],
            rate_limit: None,
        };
        let mut virtual_hosts = vec![vh("demo/httpbin|14001", "httpbin", "exact")];
        if star {
            virtual_hosts.push(vh("passthrough", "*", "passthrough"));
        }
        let rc = v1::RouteConfiguration {
            name: "rc".into(),
            virtual_hosts,
        };
        built(&rc)
    }

    #[test_case(true, "httpbin", "exact" ; "exact host before the fallback")]
    #[test_case(true, "HTTPBIN", "exact" ; "exact host case insensitive before the fallback")]
    #[test_case(true, "10.0.0.7:8080", "passthrough" ; "unknown address to the fallback")]
    #[test_case(true, "example.com", "passthrough" ; "unknown name to the fallback")]
    #[test_case(true, "", "passthrough" ; "no host to the fallback")]
    #[test_case(false, "10.0.0.7:8080", "404-host" ; "no fallback no virtual host")]
    #[test_case(false, "httpbin", "exact" ; "exact host without a fallback")]
    fn unknown_hosts_fall_back_to_star(star: bool, host: &str, want: &str) {
        let t = with_fallback(star);
        let map = HeaderMap::new();
        let req = RequestInfo {
            host,
            method: &Method::GET,
            path: "/x",
            headers: &map,
        };
        let got = match select(&t, req, false, None, OUTSIDE) {
            Decision::NoVirtualHost => "404-host".to_string(),
            Decision::Matched(_, r) => first_cluster(&r.clusters).to_string(),
            other => format!("{other:?}"),
        };
        assert_eq!(got, want);
    }

    const OUTSIDE: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));

    fn first_cluster(w: &Weighted) -> &str {
        &w.entries[0].0
    }

    #[test_case("httpbin", "GET", "/exact", &[], "exact" ; "exact path")]
    #[test_case("HTTPBIN.demo:14001", "GET", "/exact", &[], "exact" ; "host is case insensitive")]
    #[test_case("httpbin", "GET", "/exact/more", &[], "default" ; "exact is not prefix")]
    #[test_case("httpbin", "GET", "/items/42", &[], "regex" ; "regex path")]
    #[test_case("httpbin", "GET", "/items/42x", &[], "default" ; "regex must match the whole path")]
    #[test_case("httpbin", "POST", "/items/42", &[], "default" ; "method must match")]
    #[test_case("httpbin", "GET", "/api/x", &[("x-canary", "yes")], "canary" ; "exact header")]
    #[test_case("httpbin", "GET", "/api/x", &[("x-canary", "no")], "default" ; "exact header mismatch")]
    #[test_case("httpbin", "GET", "/api/x", &[("x-user", "alice")], "user" ; "regex header")]
    #[test_case("httpbin", "GET", "/api/x", &[("x-debug", "")], "debug" ; "present header even empty")]
    #[test_case("httpbin", "CONNECT", "", &[], "tunnel" ; "connect")]
    #[test_case("httpbin", "DELETE", "/", &[], "404-route" ; "no route")]
    #[test_case("other", "GET", "/", &[], "404-host" ; "no virtual host")]
    #[test_case("httpbin:14001", "GET", "/", &[], "404-host" ; "port is part of the domain")]
    fn selects(host: &str, method: &str, path: &str, headers: &[(&str, &str)], want: &str) {
        let t = table(None);
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(
                http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                v.parse().expect("value"),
            );
        }
        let method = Method::from_bytes(method.as_bytes()).expect("method");
        let req = RequestInfo {
            host,
            method: &method,
            path,
            headers: &map,
        };
        let got = match select(&t, req, false, None, OUTSIDE) {
            Decision::NoVirtualHost => "404-host".to_string(),
            Decision::NoRoute => "404-route".to_string(),
            Decision::Denied => "403".to_string(),
            Decision::Matched(_, r) => first_cluster(&r.clusters).to_string(),
        };
        assert_eq!(got, want);
    }

    #[test_case(None, None, "10.0.0.1", "403" ; "unset admits no one inbound")]
    #[test_case(None, Some(("curl", "demo")), "10.0.0.1", "403" ; "unset admits no one even with mTLS")]
    #[test_case(None, None, "192.168.5.7", "403" ; "unset admits no one even from an ingress address")]
    #[test_case(Some(false), None, "10.0.0.1", "403" ; "identities admit no one without mTLS")]
    #[test_case(Some(false), Some(("curl", "demo")), "10.0.0.1", "default" ; "listed identity admitted")]
    #[test_case(Some(false), Some(("curl", "other")), "10.0.0.1", "403" ; "same account other namespace refused")]
    #[test_case(Some(false), Some(("bookbuyer", "demo")), "10.0.0.1", "403" ; "unlisted identity refused")]
    #[test_case(Some(false), None, "192.168.5.7", "default" ; "source range admits without a certificate")]
    #[test_case(Some(false), Some(("bookbuyer", "demo")), "192.168.5.7", "default" ; "source range admits whatever the identity")]
    #[test_case(Some(false), None, "192.168.6.7", "403" ; "address outside the source ranges refused")]
    #[test_case(Some(true), None, "10.0.0.1", "default" ; "any admits")]
    fn inbound_rbac(any: Option<bool>, peer: Option<(&str, &str)>, client: &str, want: &str) {
        let peer = peer.map(|(sa, ns)| Peer::from(crate::tls::Identity::new(sa, ns)));
        let t = table(any);
        let map = HeaderMap::new();
        let req = RequestInfo {
            host: "httpbin",
            method: &Method::GET,
            path: "/",
            headers: &map,
        };
        let got = match select(&t, req, true, peer.as_ref(), client.parse().expect("ip")) {
            Decision::Denied => "403".to_string(),
            Decision::Matched(_, r) => first_cluster(&r.clusters).to_string(),
            other => format!("{other:?}"),
        };
        assert_eq!(got, want);
    }

    /// A client certificate's names (`dns:` or `uri:` entries), kept as the listener keeps them
    /// on a chain requiring client certificates (DNS names lower-cased).
    fn named(sans: &[&str]) -> Peer {
        let mut peer = Peer::default();
        for san in sans {
            match san.split_once(':') {
                Some(("dns", d)) => peer.dns_names.push(d.to_ascii_lowercase()),
                Some(("uri", u)) => peer.uris.push(u.to_string()),
                _ => panic!("{san}: dns:… or uri:…"),
            }
        }
        peer
    }

    #[test_case(Some(&["dns:ingress.example.com"]), "default" ; "listed DNS name admitted")]
    #[test_case(Some(&["dns:INGRESS.example.COM"]), "default" ; "DNS names compare without regard to case")]
    #[test_case(Some(&["dns:other.example.com", "dns:ingress.example.com"]), "default" ; "any SAN of the certificate")]
    #[test_case(Some(&["dns:other.example.com"]), "403" ; "unlisted DNS name refused")]
    #[test_case(Some(&["dns:sub.ingress.example.com"]), "403" ; "no suffix match")]
    #[test_case(Some(&["uri:spiffe://cluster.local/ns/ingress/sa/edge"]), "default" ; "listed URI admitted")]
    #[test_case(Some(&["uri:SPIFFE://cluster.local/ns/ingress/sa/edge"]), "403" ; "URIs compare exactly")]
    #[test_case(Some(&["uri:spiffe://cluster.local/ns/ingress/sa/edge/x"]), "403" ; "URI prefix refused")]
    #[test_case(Some(&["uri:ingress.example.com"]), "403" ; "a DNS principal is no URI SAN")]
    #[test_case(Some(&["dns:spiffe://cluster.local/ns/ingress/sa/edge"]), "403" ; "a URI principal is no DNS SAN")]
    #[test_case(Some(&[]), "403" ; "certificate without SANs refused")]
    #[test_case(None, "403" ; "no certificate never admitted by principals")]
    fn inbound_rbac_by_principal(sans: Option<&[&str]>, want: &str) {
        let peer = sans.map(named);
        let t = table(Some(false));
        let map = HeaderMap::new();
        let req = RequestInfo {
            host: "httpbin",
            method: &Method::GET,
            path: "/",
            headers: &map,
        };
        // Not from an ingress address: only the certificate can admit.
        let got = match select(
            &t,
            req,
            true,
            peer.as_ref(),
            "10.0.0.1".parse().expect("ip"),
        ) {
            Decision::Denied => "403".to_string(),
            Decision::Matched(_, r) => first_cluster(&r.clusters).to_string(),
            other => format!("{other:?}"),
        };
        assert_eq!(got, want);
    }
}
