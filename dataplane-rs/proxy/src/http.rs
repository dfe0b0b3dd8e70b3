//! HTTP filter chains: terminate HTTP/1.1 or HTTP/2, route each request with the chain's route
//! configuration, and forward it (or relay a CONNECT tunnel) to the picked cluster.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

use crate::Proxy;
use crate::breakers::{Counter, Held, Slot};
use crate::config::{
    Cluster, Direction, Discovery, Listener, LocalRateLimit, RetryPolicy, Route, UpstreamProtocol,
};
use crate::lb::{choose_cluster, pick_endpoint};
use crate::metrics::Workload;
use crate::route::{Decision, RequestInfo, select};
use crate::tls::Peer;
use crate::trace::{ActiveSpan, RequestFacts};
use crate::upstream::{Body, Dest, Transport, UpstreamError, connect_to};

/// Headers that describe one hop and must not be forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
];

/// What an HTTP connection was accepted for.
#[derive(Clone, Debug)]
pub struct HttpChain {
    pub listener: Arc<str>,
    pub route_config: Arc<str>,
    pub inbound: bool,
    /// The client as its verified certificate names it (mTLS chains only).
    pub peer: Option<Peer>,
    /// The address the connection comes from (`AllowedSources.source_ip_ranges` checks it).
    pub client: SocketAddr,
}

/// Serves one downstream connection until it closes, or until `stop` fires (listener removed),
/// then lets in-flight requests finish.
pub async fn serve<S>(
    proxy: Arc<Proxy>,
    chain: HttpChain,
    stream: S,
    mut stop: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let chain = Arc::new(chain);
    let service = service_fn(move |req: Request<Incoming>| {
        let proxy = proxy.clone();
        let chain = chain.clone();
        async move { Ok::<_, Infallible>(handle(&proxy, &chain, req).await) }
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "downstream connection ended with an error");
            }
            return;
        }
        () = crate::listeners::stopped(&mut stop) => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
}

/// Envoy's body for a request its local rate limit refused.
pub const RATE_LIMITED_BODY: &str = "local_rate_limited";

const OVERFLOW_BODY: &str =
    "upstream connect error or disconnect/reset before headers. reset reason: overflow";

const CONNECT_FAILURE_BODY: &str =
    "upstream connect error or disconnect/reset before headers. reset reason: connection failure";

/// The body of the 503 for a DNS cluster whose name did not resolve: Envoy's connection failure,
/// with the reason.
fn unresolved_body(reason: &str) -> String {
    format!("{CONNECT_FAILURE_BODY}, transport failure reason: {reason}")
}

pub fn local_reply(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut response = Response::new(full(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    if !body.is_empty() {
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    }
    response
}

/// A local reply whose body is built per request.
fn text_reply(status: StatusCode, body: String) -> Response<Body> {
    let mut response = Response::new(full(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

/// Where an HTTP request to an original-destination cluster goes: its Host (or `:authority`)
/// when that is `<ip>:<port>` (IPv6 in brackets), unless it is one of this proxy's own
/// listeners. `Err` is the body of the 503 the request gets instead.
pub fn original_destination<'a>(
    host: &str,
    listeners: impl IntoIterator<Item = &'a Arc<Listener>>,
    transparent: bool,
) -> Result<SocketAddr, String> {
    let Some(dest) = host.parse::<SocketAddr>().ok().filter(|a| a.port() != 0) else {
        return Err(format!(
            "no original destination: Host {host:?} is not <ip>:<port>"
        ));
    };
    if let Some(l) = crate::listeners::own_listener(listeners, dest, transparent) {
        return Err(format!(
            "no original destination: Host {host:?} is this sidecar's listener {:?} (a loop)",
            l.name
        ));
    }
    Ok(dest)
}

fn host_of(req: &Request<Incoming>) -> Option<String> {
    if let Some(authority) = req.uri().authority() {
        return Some(authority.as_str().to_string());
    }
    req.headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
}

/// Handles one request; on a traced listener, within its span (see [`crate::trace`]): the span's
/// B3 context goes upstream with the request, and the span is reported once the response
/// headers are back (or the request was answered here).
async fn handle(proxy: &Proxy, chain: &HttpChain, mut req: Request<Incoming>) -> Response<Body> {
    let config = proxy.store.config();
    let tracing = config
        .listeners
        .get(&chain.listener)
        .and_then(|l| l.tracing.clone())
        .filter(|_| req.method() != Method::CONNECT);
    let Some(tracing) = tracing else {
        return route(proxy, chain, config, req, &mut None).await;
    };
    let direction = if chain.inbound {
        Direction::Inbound
    } else {
        Direction::Outbound
    };
    let span = ActiveSpan::start(&tracing, req.headers(), direction);
    span.inject(req.headers_mut());
    let facts = RequestFacts::of(&req, &host_of(&req).unwrap_or_default(), chain.client.ip());
    let mut cluster = None;
    let response = route(proxy, chain, config, req, &mut cluster).await;
    proxy.tracer.finish(
        &span,
        &tracing,
        &facts,
        response.status().as_u16(),
        cluster.as_deref(),
    );
    response
}

/// Routes and forwards one request; `upstream` is set to the cluster it was sent to.
async fn route(
    proxy: &Proxy,
    chain: &HttpChain,
    config: Arc<crate::config::Config>,
    mut req: Request<Incoming>,
    upstream: &mut Option<Arc<str>>,
) -> Response<Body> {
    let Some(table) = config.routes.get(&chain.route_config) else {
        return local_reply(StatusCode::NOT_FOUND, "");
    };
    let host = host_of(&req).unwrap_or_default();
    let decision = select(
        table,
        RequestInfo {
            host: &host,
            method: req.method(),
            path: req.uri().path(),
            headers: req.headers(),
        },
        chain.inbound,
        chain.peer.as_ref(),
        chain.client.ip(),
    );
    let (vh, route) = match decision {
        Decision::NoVirtualHost | Decision::NoRoute => {
            return local_reply(StatusCode::NOT_FOUND, "");
        }
        Decision::Denied => return local_reply(StatusCode::FORBIDDEN, "RBAC: access denied"),
        Decision::Matched(vh, route) => (vh, route),
    };
    // After `allowed_sources`: a client refused there takes no token from those admitted.
    // CONNECT tunnels too: the virtual host of a TCP port carries its connection limit.
    if chain.inbound
        && let Some(limit) = route.rate_limit.as_ref().or(vh.rate_limit.as_ref())
    {
        let admitted = proxy
            .rate_limits
            .admit(limit, || proxy.store.config(), Instant::now());
        proxy.metrics.local_rate_limit(&vh.name, admitted);
        if !admitted {
            return rate_limited(limit);
        }
    }
    let cluster_name = choose_cluster(&route.clusters);
    let Some(cluster) = config.clusters.get(cluster_name).cloned() else {
        return local_reply(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream");
    };
    *upstream = Some(cluster.name.clone());
    if req.method() == Method::CONNECT {
        return tunnel_in(proxy, &cluster, &mut req).await;
    }
    let dest = match &cluster.discovery {
        Discovery::Listed => None,
        Discovery::Dns(name) => Some(Dest::Name(name.clone())),
        Discovery::OriginalDestination => {
            match original_destination(&host, config.listeners.values(), proxy.transparent) {
                Ok(dest) => Some(Dest::Addr(dest)),
                Err(body) => {
                    tracing::debug!(cluster = %cluster.name, %host, "{body}");
                    return text_reply(StatusCode::SERVICE_UNAVAILABLE, body);
                }
            }
        }
    };
    let started = Instant::now();
    let to = Target {
        cluster: &cluster,
        dest: dest.as_ref(),
        host: &host,
    };
    let (response, served_by) = forward(proxy, route, to, req).await;
    let status = response.status().as_u16();
    if !chain.inbound {
        proxy.metrics.outbound_request(
            &cluster.name,
            served_by.as_deref(),
            status,
            started.elapsed().as_secs_f64() * 1000.0,
        );
    }
    response
}

/// The reply to a request the bucket had no token for, as Envoy's local rate limit sends it.
fn rate_limited(limit: &LocalRateLimit) -> Response<Body> {
    let mut response = local_reply(limit.status, RATE_LIMITED_BODY);
    for (name, value) in &limit.response_headers {
        response.headers_mut().append(name.clone(), value.clone());
    }
    response
}

/// A CONNECT from a peer sidecar: connect to the cluster (the local app) and relay bytes.
async fn tunnel_in(
    proxy: &Proxy,
    cluster: &Arc<Cluster>,
    req: &mut Request<Incoming>,
) -> Response<Body> {
    let dest = match &cluster.discovery {
        Discovery::Dns(name) => Dest::Name(name.clone()),
        Discovery::Listed | Discovery::OriginalDestination => {
            match pick_endpoint(cluster, &proxy.upstreams.active) {
                Some(endpoint) => Dest::Addr(endpoint.addr),
                None => return local_reply(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream"),
            }
        }
    };
    // A tunnel is one TCP connection to the cluster, counted as `tcp::proxy` counts them.
    let Ok(connection) = proxy.hold_connection(cluster) else {
        return local_reply(StatusCode::SERVICE_UNAVAILABLE, OVERFLOW_BODY);
    };
    let upstream = match connect_to(&dest, cluster.connect_timeout).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(cluster = %cluster.name, error = %e, "tunnel target unreachable");
            proxy.metrics.connect_fail(&cluster.name);
            proxy.metrics.upstream(&cluster.name, 503);
            return match e {
                UpstreamError::Resolve(reason) => {
                    text_reply(StatusCode::SERVICE_UNAVAILABLE, unresolved_body(&reason))
                }
                _ => local_reply(StatusCode::SERVICE_UNAVAILABLE, CONNECT_FAILURE_BODY),
            };
        }
    };
    proxy.metrics.upstream(&cluster.name, 200);
    let on_upgrade = hyper::upgrade::on(req);
    let name = cluster.name.clone();
    tokio::spawn(async move {
        let _connection = connection;
        match on_upgrade.await {
            Ok(upgraded) => {
                let mut downstream = TokioIo::new(upgraded);
                let mut upstream = upstream;
                if let Err(e) = tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await
                {
                    tracing::debug!(cluster = %name, error = %e, "tunnel closed with an error");
                }
            }
            Err(e) => tracing::debug!(cluster = %name, error = %e, "tunnel upgrade failed"),
        }
    });
    Response::new(
        http_body_util::Empty::new()
            .map_err(|never| match never {})
            .boxed(),
    )
}

/// Removes the headers that describe one hop (and `transfer-encoding`) before forwarding.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Headers named in `Connection` are hop-by-hop too.
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|s| s.trim().to_ascii_lowercase()))
        .collect();
    for name in HOP_BY_HOP
        .iter()
        .copied()
        .chain(named.iter().map(String::as_str))
    {
        headers.remove(name);
    }
    headers.remove(header::TRANSFER_ENCODING);
}

/// Request bodies of at most this many bytes (by `content-length`) are kept to be sent again
/// when the route retries; larger or chunked ones are sent once, without retries.
const RETRY_BODY_LIMIT: u64 = 64 * 1024;

/// How a request goes upstream.
enum Upstream<'a> {
    /// Once, its body streamed.
    Once(Body),
    /// With the route's retries, its body (possibly empty) read whole to send with each attempt.
    Retried(&'a RetryPolicy, Bytes),
}

fn full(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Where a request goes.
#[derive(Clone, Copy)]
struct Target<'a> {
    cluster: &'a Arc<Cluster>,
    /// The request's original destination, when the cluster is an original-destination one, or
    /// the cluster's name, when it is a DNS one: each attempt goes there (plaintext HTTP/1.1)
    /// instead of to a picked endpoint.
    dest: Option<&'a Dest>,
    /// The request's Host or `:authority`.
    host: &'a str,
}

/// Sends the request to the cluster, with the route's retries and timeout. Also returns the
/// workload of the endpoint last tried, which the response (or the error) came from.
async fn forward(
    proxy: &Proxy,
    route: &Route,
    to: Target<'_>,
    req: Request<Incoming>,
) -> (Response<Body>, Option<Arc<Workload>>) {
    let Target { cluster, host, .. } = to;
    let (mut parts, body) = req.into_parts();
    // `te: trailers` is the one hop-by-hop value HTTP/2 keeps, and gRPC servers expect it.
    let wants_trailers = parts.headers.get_all(header::TE).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.to_ascii_lowercase().contains("trailers"))
    });
    strip_hop_by_hop(&mut parts.headers);
    if wants_trailers && cluster.http_protocol() == UpstreamProtocol::Http2 {
        parts
            .headers
            .insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if !parts.headers.contains_key(header::HOST)
        && let Ok(value) = HeaderValue::from_str(host)
    {
        parts.headers.insert(header::HOST, value);
    }
    // Retrying needs the body again: a body that declares at most RETRY_BODY_LIMIT bytes is
    // read first and sent with each attempt; a larger or unsized one is streamed once, without
    // retries.
    let send = match route.retry.as_ref().filter(|r| r.num_retries > 0) {
        None => Upstream::Once(body.boxed()),
        Some(policy) if body.is_end_stream() => Upstream::Retried(policy, Bytes::new()),
        Some(policy) if content_length(&parts.headers).is_some_and(|n| n <= RETRY_BODY_LIMIT) => {
            match http_body_util::Limited::new(body, RETRY_BODY_LIMIT as usize)
                .collect()
                .await
            {
                Ok(collected) => Upstream::Retried(policy, collected.to_bytes()),
                Err(error) => {
                    tracing::debug!(%error, "request body not read");
                    return (
                        local_reply(StatusCode::BAD_REQUEST, "request body could not be read"),
                        None,
                    );
                }
            }
        }
        Some(_) => Upstream::Once(body.boxed()),
    };
    let mut served_by = None;
    let tried = &mut served_by;
    let attempts = async move {
        match send {
            Upstream::Once(body) => {
                let req = Request::from_parts(parts, body);
                attempt(proxy, to, req, None, tried).await
            }
            Upstream::Retried(policy, body) => {
                let mut tries = 0u32;
                // Envoy counts a retry against `max_retries` from its back-off until its
                // answer is in.
                let mut retry: Option<Held> = None;
                loop {
                    let req = Request::from_parts(parts.clone(), full(body.clone()));
                    let result = attempt(proxy, to, req, policy.per_try_timeout, tried).await;
                    drop(retry.take());
                    if tries >= policy.num_retries || !should_retry(policy, &result) {
                        break result;
                    }
                    if let Some(max) = cluster.breakers.max_retries {
                        retry = proxy
                            .upstreams
                            .limits(&cluster.name)
                            .try_hold(Counter::Retries, max);
                        if retry.is_none() {
                            proxy.metrics.retry_overflow(&cluster.name);
                            break result;
                        }
                    }
                    // The failed answer gives its connection slot back before the back-off.
                    drop(result);
                    tries += 1;
                    tokio::time::sleep(retry_backoff(policy, tries)).await;
                }
            }
        }
    };
    let result = match route.timeout {
        Some(limit) => tokio::time::timeout(limit, attempts)
            .await
            .unwrap_or(Err(UpstreamError::Timeout)),
        None => attempts.await,
    };
    let response = match result {
        Ok(response) => {
            let (mut parts, body) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Response::from_parts(parts, body)
        }
        Err(UpstreamError::Timeout) => {
            local_reply(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout")
        }
        Err(UpstreamError::NoEndpoint) => {
            local_reply(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream")
        }
        Err(UpstreamError::Overflow) => local_reply(StatusCode::SERVICE_UNAVAILABLE, OVERFLOW_BODY),
        Err(UpstreamError::Connect(e)) => {
            tracing::debug!(cluster = %cluster.name, error = %e, "upstream connect failed");
            local_reply(StatusCode::SERVICE_UNAVAILABLE, CONNECT_FAILURE_BODY)
        }
        Err(UpstreamError::Resolve(e)) => {
            tracing::debug!(cluster = %cluster.name, error = %e, "upstream name not resolved");
            text_reply(StatusCode::SERVICE_UNAVAILABLE, unresolved_body(&e))
        }
        Err(e) => {
            tracing::debug!(cluster = %cluster.name, error = %e, "upstream request failed");
            local_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream connect error or disconnect/reset before headers. reset reason: connection termination",
            )
        }
    };
    (response, served_by)
}

fn should_retry(policy: &RetryPolicy, result: &Result<Response<Body>, UpstreamError>) -> bool {
    match result {
        Ok(r) => {
            let s = r.status().as_u16();
            (policy.on_5xx && s >= 500)
                || (policy.on_gateway_error && matches!(s, 502..=504))
                || (policy.on_409 && s == 409)
        }
        Err(UpstreamError::Connect(_) | UpstreamError::Resolve(_) | UpstreamError::NoEndpoint) => {
            policy.on_5xx || policy.on_connect_failure || policy.on_gateway_error
        }
        Err(UpstreamError::Reset(_) | UpstreamError::Timeout) => policy.on_5xx || policy.on_reset,
        Err(_) => false,
    }
}

/// Envoy's full-jitter back-off: uniform in [0, (2^n - 1) * base], capped at 10 * base.
fn retry_backoff(policy: &RetryPolicy, n: u32) -> Duration {
    let factor = (1u32.checked_shl(n.min(16)).unwrap_or(u32::MAX)).saturating_sub(1);
    let ceiling = policy
        .backoff_base
        .saturating_mul(factor)
        .min(policy.backoff_base.saturating_mul(10));
    ceiling.mul_f64(fastrand::f64())
}

/// A response body that holds its HTTP/1.1 connection slot until it is read or dropped: the
/// connection carries nothing else until then.
struct SlotBody {
    body: Incoming,
    _slot: Slot,
}

impl HttpBody for SlotBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A connection slot for one HTTP/1.1 request to `cluster`, waiting as a pending request when
/// all `max_connections` are taken; `Overflow` when `max_pending_requests` already wait.
async fn connection_slot(
    proxy: &Proxy,
    cluster: &Cluster,
    max_connections: u32,
) -> Result<Slot, UpstreamError> {
    let limits = proxy.upstreams.limits(&cluster.name);
    match limits.try_slot(max_connections) {
        Ok(slot) => Ok(slot),
        Err(slots) => {
            // Envoy's count of the connections its breaker did not let it open.
            proxy.metrics.cx_overflow(&cluster.name);
            match limits
                .wait_slot(slots, cluster.breakers.max_pending_requests)
                .await
            {
                Some(slot) => Ok(slot),
                None => {
                    proxy.metrics.pending_overflow(&cluster.name);
                    Err(UpstreamError::Overflow)
                }
            }
        }
    }
}

/// One try: pick an endpoint, note its workload in `tried`, pass the circuit breakers, and
/// send.
async fn attempt(
    proxy: &Proxy,
    to: Target<'_>,
    req: Request<Body>,
    per_try: Option<Duration>,
    tried: &mut Option<Arc<Workload>>,
) -> Result<Response<Body>, UpstreamError> {
    let Target {
        cluster,
        dest,
        host,
    } = to;
    // An original destination or a DNS name is unmeshed (plaintext) and no known workload.
    let (dest, endpoint) = match dest {
        Some(dest) => (dest.clone(), None),
        None => match pick_endpoint(cluster, &proxy.upstreams.active) {
            Some(e) => (Dest::Addr(e.addr), Some(e)),
            None => return Err(UpstreamError::NoEndpoint),
        },
    };
    *tried = endpoint.and_then(|e| e.workload.clone());
    let breakers = &cluster.breakers;
    // One HTTP/1.1 connection carries one request at a time, so limiting requests holding a
    // slot limits the connections in use. HTTP/2 needs none: each endpoint has one multiplexed
    // connection, which `max_connections` (a count of connections) never limits. Outside the
    // per-try timeout, as Envoy starts it once a connection is there; the route timeout bounds
    // the wait.
    let slot = match breakers.max_connections {
        Some(max) if cluster.http_protocol() != UpstreamProtocol::Http2 => {
            Some(connection_slot(proxy, cluster, max).await?)
        }
        _ => None,
    };
    // As Envoy, `max_requests` is checked when the request gets its connection (after any
    // wait for one).
    let limits = proxy.upstreams.limits(&cluster.name);
    let _cluster_guard = match breakers.max_requests {
        None => limits.hold(Counter::Requests),
        Some(max) => match limits.try_hold(Counter::Requests, max) {
            Some(held) => held,
            None => {
                proxy.metrics.active_overflow(&cluster.name);
                return Err(UpstreamError::Overflow);
            }
        },
    };
    // Least-request counts by address; a name has none until it is resolved.
    let _guard = match &dest {
        Dest::Addr(addr) => Some(proxy.upstreams.active.start(*addr)),
        Dest::Name(_) => None,
    };
    let per_connection = breakers.max_requests_per_connection;
    let send = async {
        let transport = match endpoint {
            Some(endpoint) => Transport::for_endpoint(cluster, endpoint)?,
            None => Transport::Plain,
        };
        match (cluster.http_protocol(), &dest) {
            (UpstreamProtocol::Http2, Dest::Addr(addr)) => {
                proxy
                    .upstreams
                    .send_http2(
                        *addr,
                        cluster.connect_timeout,
                        &transport,
                        host,
                        per_connection,
                        req,
                    )
                    .await
            }
            // `http_protocol` is HTTP/1.1 for every cluster that has no endpoints.
            _ => {
                proxy
                    .upstreams
                    .send_http1(
                        &dest,
                        cluster.connect_timeout,
                        &transport,
                        per_connection,
                        req,
                    )
                    .await
            }
        }
    };
    let result = match per_try {
        Some(limit) => tokio::time::timeout(limit, send)
            .await
            .unwrap_or(Err(UpstreamError::Timeout)),
        None => send.await,
    };
    if let Err(UpstreamError::Connect(_) | UpstreamError::Resolve(_)) = &result {
        proxy.metrics.connect_fail(&cluster.name);
    }
    proxy.metrics.upstream(
        &cluster.name,
        match &result {
            Ok(r) => r.status().as_u16(),
            Err(UpstreamError::Timeout) => 504,
            Err(_) => 503,
        },
    );
    result.map(|response| match slot {
        None => response.map(BodyExt::boxed),
        Some(slot) => response.map(|body| SlotBody { body, _slot: slot }.boxed()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use test_case::test_case;

    #[test_case("10.0.0.7:8080", Ok("10.0.0.7:8080") ; "ipv4 and port")]
    #[test_case("[fd00::7]:8080", Ok("[fd00::7]:8080") ; "ipv6 in brackets")]
    #[test_case("10.0.0.5:8080", Ok("10.0.0.5:8080") ; "another port of the pod")]
    #[test_case("httpbin.org", Err("no original destination: Host \"httpbin.org\" is not <ip>:<port>") ; "a name")]
    #[test_case("httpbin.org:80", Err("no original destination: Host \"httpbin.org:80\" is not <ip>:<port>") ; "a name and port")]
    #[test_case("10.0.0.7", Err("no original destination: Host \"10.0.0.7\" is not <ip>:<port>") ; "no port")]
    #[test_case("10.0.0.7:0", Err("no original destination: Host \"10.0.0.7:0\" is not <ip>:<port>") ; "port 0")]
    #[test_case("fd00::7:8080", Err("no original destination: Host \"fd00::7:8080\" is not <ip>:<port>") ; "ipv6 without brackets")]
    #[test_case("", Err("no original destination: Host \"\" is not <ip>:<port>") ; "no host")]
    #[test_case("10.0.0.5:15001", Err("no original destination: Host \"10.0.0.5:15001\" is this sidecar's listener \"outbound-listener\" (a loop)") ; "own listener")]
    fn original_destination_is_the_host(host: &str, want: Result<&str, &str>) {
        let listeners = [Arc::new(Listener {
            name: Arc::from("outbound-listener"),
            addr: "10.0.0.5:15001".parse().expect("addr"),
            direction: Direction::Outbound,
            chains: vec![],
            tracing: None,
        })];
        let got = original_destination(host, &listeners, false);
        assert_eq!(
            got.as_ref()
                .map(ToString::to_string)
                .map_err(String::as_str),
            want.map(str::to_string)
        );
    }

    #[test]
    fn hop_by_hop_headers_and_those_named_in_connection_are_dropped() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, x-hop"),
            ("keep-alive", "timeout=5"),
            ("x-hop", "1"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("x-end-to-end", "kept"),
            ("host", "httpbin.demo:14001"),
        ] {
            h.append(
                http::HeaderName::from_static(k),
                HeaderValue::from_static(v),
            );
        }
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, vec!["host", "x-end-to-end"]);
    }

    #[test]
    fn retry_backoff_stays_under_ten_times_the_base() {
        let policy = RetryPolicy {
            on_5xx: true,
            on_gateway_error: false,
            on_reset: false,
            on_connect_failure: false,
            on_409: false,
            num_retries: 5,
            per_try_timeout: None,
            backoff_base: Duration::from_millis(25),
        };
        for n in 1..8 {
            let wait = retry_backoff(&policy, n);
            let ceiling =
                Duration::from_millis(25 * ((1u64 << n) - 1)).min(Duration::from_millis(250));
            assert!(wait <= ceiling, "retry {n}: {wait:?} > {ceiling:?}");
        }
    }
}
