//! Connections to upstreams: pooled HTTP/1.1 (hyper-util's client for plaintext, a small pool of
//! hyper connections for TLS and for clusters with `max_requests_per_connection`, which
//! hyper-util's pool cannot count), multiplexed HTTP/2 (one connection per endpoint and
//! transport, shared by requests and CONNECT tunnels), and plain TCP.
//!
//! Meshed endpoints of a cluster with `tls` are reached over mTLS; every pool is keyed on the
//! transport too ([`PoolKey`]), so plaintext connections, and connections made with different TLS
//! settings, are never handed to each other's requests.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::breakers::ClusterLimits;
use crate::config::{Cluster, DnsName, Endpoint};
use crate::lb::ActiveRequests;
use crate::tls::{ClusterTls, Identity, UpstreamTls, identity_of_chain};

/// An idle pooled HTTP/1.1 connection older than this is closed rather than reused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Idle pooled HTTP/1.1 connections kept per [`PoolKey`].
const MAX_IDLE: usize = 64;

pub type Body = BoxBody<Bytes, hyper::Error>;

/// Why an upstream exchange failed before response headers.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connection failure: {0}")]
    Connect(String),
    /// A DNS cluster's name has no address (or the resolver did not answer in time); the
    /// message says so, naming the name.
    #[error("{0}")]
    Resolve(String),
    #[error("connection termination: {0}")]
    Reset(String),
    #[error("timeout")]
    Timeout,
    #[error("tunnel refused with status {0}")]
    TunnelRefused(StatusCode),
    #[error("no endpoint")]
    NoEndpoint,
    #[error("circuit breaker open")]
    Overflow,
}

#[derive(Debug, Default)]
pub struct Upstreams {
    /// Plaintext HTTP/1.1 clients by connect timeout (the connector carries it); each pools per
    /// endpoint.
    http1: Mutex<HashMap<Duration, Client<HttpConnector, Body>>>,
    /// Idle HTTP/1.1 connections of our own pool (TLS, or counted per connection).
    http1_pool: Arc<Mutex<HashMap<PoolKey, Vec<Idle>>>>,
    http2: Mutex<HashMap<PoolKey, Http2Connection>>,
    pub active: ActiveRequests,
    /// Circuit-breaker counters per cluster.
    per_cluster: Mutex<HashMap<Arc<str>, Arc<ClusterLimits>>>,
}

#[derive(Debug)]
struct Idle {
    sender: http1::SendRequest<Body>,
    since: Instant,
    /// Requests this connection has carried.
    carried: u32,
}

/// The shared HTTP/2 connection of a [`PoolKey`].
#[derive(Debug)]
struct Http2Connection {
    sender: http2::SendRequest<Body>,
    /// Streams opened on it, counted only when the key has a per-connection limit.
    streams: u32,
}

/// Where an upstream connection goes: an endpoint's address, or a DNS cluster's name, resolved
/// each time a connection is made.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Dest {
    Addr(SocketAddr),
    Name(DnsName),
}

impl std::fmt::Display for Dest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dest::Addr(a) => a.fmt(f),
            Dest::Name(n) => n.fmt(f),
        }
    }
}

/// Which connections a request may share: same destination, same transport.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub dest: Dest,
    /// `None`: plaintext. Otherwise the cluster TLS fingerprint, and the endpoint identity the
    /// server certificate was checked against when the cluster checks per endpoint.
    pub tls: Option<(u64, Option<Identity>)>,
    /// `max_requests_per_connection`: connections counted against different limits are not
    /// shared, so none carries more than the limit of any request it carried.
    pub per_connection: Option<u32>,
}

/// How to reach one endpoint.
#[derive(Clone, Debug)]
pub enum Transport {
    Plain,
    Tls {
        tls: Arc<ClusterTls>,
        /// The identity the server certificate must carry, when the cluster checks per endpoint.
        expect: Option<Identity>,
    },
}

impl Transport {
    /// TLS for meshed endpoints of clusters with `tls`, plaintext otherwise. Fails (503) while a
    /// secret the cluster names has not arrived.
    pub fn for_endpoint(
        cluster: &Cluster,
        endpoint: &Endpoint,
    ) -> Result<Transport, UpstreamError> {
        match &cluster.tls {
            Some(UpstreamTls::Ready(tls)) if endpoint.meshed => Ok(Transport::Tls {
                tls: tls.clone(),
                expect: if tls.check_endpoint_identity {
                    endpoint.identity.clone()
                } else {
                    None
                },
            }),
            Some(UpstreamTls::Missing(secret)) if endpoint.meshed => Err(UpstreamError::Connect(
                format!("TLS secret {secret:?} not received yet"),
            )),
            _ => Ok(Transport::Plain),
        }
    }

    fn key(&self, dest: &Dest, per_connection: Option<u32>) -> PoolKey {
        PoolKey {
            dest: dest.clone(),
            tls: match self {
                Transport::Plain => None,
                Transport::Tls { tls, expect } => Some((tls.fingerprint, expect.clone())),
            },
            per_connection,
        }
    }
}

/// A connection to an upstream, plaintext or TLS.
#[derive(Debug)]
pub enum MeshStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for MeshStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            MeshStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MeshStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for MeshStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            MeshStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MeshStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            MeshStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            MeshStream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            MeshStream::Plain(s) => s.is_write_vectored(),
            MeshStream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            MeshStream::Plain(s) => Pin::new(s).poll_flush(cx),
            MeshStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            MeshStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MeshStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The application protocol a TLS connection is opened for (its ALPN offer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alpn {
    Http1,
    Http2,
}

/// Opens a connection to `addr` within `timeout` (TCP, plus the TLS handshake when used).
pub async fn connect(
    addr: SocketAddr,
    timeout: Duration,
    transport: &Transport,
    alpn: Alpn,
) -> Result<MeshStream, UpstreamError> {
    connect_dest(&Dest::Addr(addr), timeout, transport, alpn).await
}

/// [`connect`] to an address or a name (see [`connect_to`]).
pub async fn connect_dest(
    addr: &Dest,
    timeout: Duration,
    transport: &Transport,
    alpn: Alpn,
) -> Result<MeshStream, UpstreamError> {
    let Transport::Tls { tls, expect } = transport else {
        return connect_to(addr, timeout).await.map(MeshStream::Plain);
    };
    let handshake = async {
        let tcp = connect_to(addr, timeout).await?;
        let config = match alpn {
            Alpn::Http1 => tls.http1.clone(),
            Alpn::Http2 => tls.http2.clone(),
        };
        let stream = TlsConnector::from(config)
            .connect(tls.server_name.clone(), tcp)
            .await
            .map_err(|e| UpstreamError::Connect(format!("TLS handshake with {addr}: {e}")))?;
        if tls.check_endpoint_identity {
            let got = identity_of_chain(stream.get_ref().1.peer_certificates());
            if expect.is_none() || got != *expect {
                let expected = expect.as_ref().map_or_else(
                    || "none (endpoint identity unknown)".into(),
                    ToString::to_string,
                );
                let got = got.map_or_else(|| "none".into(), |g| g.to_string());
                tracing::debug!(%addr, %expected, %got, "upstream server identity mismatch");
                return Err(UpstreamError::Connect(format!(
                    "TLS with {addr}: server identity {got} is not the endpoint's identity {expected}"
                )));
            }
        }
        Ok(MeshStream::Tls(Box::new(stream)))
    };
    tokio::time::timeout(timeout, handshake)
        .await
        .map_err(|_| UpstreamError::Connect(format!("TLS connect to {addr} timed out")))?
}

impl Upstreams {
    /// The circuit-breaker counters of `cluster`.
    pub fn limits(&self, cluster: &Arc<str>) -> Arc<ClusterLimits> {
        let mut map = self.per_cluster.lock();
        if let Some(limits) = map.get(cluster) {
            return limits.clone();
        }
        // A new cluster name is the moment to forget clusters nothing holds a count of (they
        // are all zero and would be made again as they are), so that a control plane renaming
        // clusters cannot grow the map without end.
        map.retain(|_, l| Arc::strong_count(l) > 1);
        map.entry(cluster.clone()).or_default().clone()
    }

    fn http1_client(&self, connect_timeout: Duration) -> Client<HttpConnector, Body> {
        self.http1
            .lock()
            .entry(connect_timeout)
            .or_insert_with(|| {
                let mut connector = HttpConnector::new();
                connector.set_connect_timeout(Some(connect_timeout));
                connector.set_nodelay(true);
                Client::builder(TokioExecutor::new())
                    .pool_idle_timeout(Duration::from_secs(60))
                    .pool_timer(TokioTimer::new())
                    // The Host header is the client's, not the endpoint address the URI names.
                    .set_host(false)
                    .build(connector)
            })
            .clone()
    }

    /// Sends an HTTP/1.1 request to `dest`; `req`'s URI must be origin-form or absolute.
    /// A connection carries at most `per_connection` requests.
    pub async fn send_http1(
        &self,
        dest: &Dest,
        connect_timeout: Duration,
        transport: &Transport,
        per_connection: Option<u32>,
        mut req: Request<Body>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        // Names go through our own pool too: it resolves them with `connect_to`, which tells a
        // name without addresses from an address that refuses.
        let endpoint = match dest {
            Dest::Addr(a) if matches!(transport, Transport::Plain) && per_connection.is_none() => {
                *a
            }
            _ => {
                return self
                    .send_http1_pooled(dest, connect_timeout, transport, per_connection, req)
                    .await;
            }
        };
        let pq = req
            .uri()
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .to_string();
        *req.uri_mut() = Uri::try_from(format!("http://{endpoint}{pq}"))
            .map_err(|e| UpstreamError::Connect(e.to_string()))?;
        *req.version_mut() = Version::HTTP_11;
        self.http1_client(connect_timeout)
            .request(req)
            .await
            .map_err(|e| {
                if e.is_connect() {
                    UpstreamError::Connect(e.to_string())
                } else {
                    UpstreamError::Reset(e.to_string())
                }
            })
    }

    /// HTTP/1.1 through our own pool: reuses an idle connection of the same destination,
    /// transport and per-connection limit, or opens one, and puts it back once the response has
    /// been read, unless it has carried `per_connection` requests.
    async fn send_http1_pooled(
        &self,
        endpoint: &Dest,
        connect_timeout: Duration,
        transport: &Transport,
        per_connection: Option<u32>,
        mut req: Request<Body>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        // hyper's connection API sends the URI as given: origin-form, Host is already set.
        let pq = req
            .uri()
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .to_string();
        *req.uri_mut() = Uri::try_from(pq).map_err(|e| UpstreamError::Connect(e.to_string()))?;
        *req.version_mut() = Version::HTTP_11;
        let key = transport.key(endpoint, per_connection);
        loop {
            let idle = self.http1_pool.lock().get_mut(&key).and_then(Vec::pop);
            let Some(Idle {
                mut sender,
                since,
                carried,
            }) = idle
            else {
                break;
            };
            if since.elapsed() >= IDLE_TIMEOUT || !sender.is_ready() {
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(response) => {
                    self.recycle(key, sender, carried.saturating_add(1));
                    return Ok(response);
                }
                Err(mut e) => match e.take_message() {
                    // The server closed the idle connection before the request left: try the
                    // next one, or a new connection.
                    Some(unsent) => req = unsent,
                    None => return Err(UpstreamError::Reset(e.into_error().to_string())),
                },
            }
        }
        let stream = connect_dest(endpoint, connect_timeout, transport, Alpn::Http1).await?;
        let (mut sender, connection) =
            http1::handshake(TokioIo::new(stream)).await.map_err(|e| {
                UpstreamError::Connect(format!("HTTP/1.1 handshake with {endpoint}: {e}"))
            })?;
        let endpoint = endpoint.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%endpoint, error = %e, "HTTP/1.1 upstream connection ended");
            }
        });
        // A new connection is rare: the moment to drop idle ones nobody came back for.
        self.http1_pool.lock().retain(|_, idle| {
            idle.retain(|i| i.since.elapsed() < IDLE_TIMEOUT && !i.sender.is_closed());
            !idle.is_empty()
        });
        let response = sender
            .send_request(req)
            .await
            .map_err(|e| UpstreamError::Reset(e.to_string()))?;
        self.recycle(key, sender, 1);
        Ok(response)
    }

    /// Returns the connection to the pool once it can take another request (the response body
    /// has been read); a connection that closes instead, or has carried its limit, is dropped,
    /// which closes it.
    fn recycle(&self, key: PoolKey, mut sender: http1::SendRequest<Body>, carried: u32) {
        let pool = self.http1_pool.clone();
        tokio::spawn(async move {
            // Held until the response is read even when the connection is done, as dropping
            // the last sender is what closes it.
            if sender.ready().await.is_err() || key.per_connection.is_some_and(|max| carried >= max)
            {
                return;
            }
            let mut pool = pool.lock();
            let idle = pool.entry(key).or_default();
            idle.retain(|i| i.since.elapsed() < IDLE_TIMEOUT && !i.sender.is_closed());
            if idle.len() < MAX_IDLE {
                idle.push(Idle {
                    sender,
                    since: Instant::now(),
                    carried,
                });
            }
        });
    }

    /// The shared connection for one more stream. With `per_connection`, the stream that
    /// reaches the limit takes the connection out of the map: the next stream opens a new one,
    /// and the old one closes once its last stream ends and its last sender is dropped.
    async fn http2_sender(
        &self,
        endpoint: SocketAddr,
        connect_timeout: Duration,
        transport: &Transport,
        per_connection: Option<u32>,
    ) -> Result<http2::SendRequest<Body>, UpstreamError> {
        let dest = Dest::Addr(endpoint);
        let key = transport.key(&dest, per_connection);
        {
            let mut map = self.http2.lock();
            if let Some(conn) = map.get_mut(&key)
                && !conn.sender.is_closed()
            {
                let sender = conn.sender.clone();
                if let Some(max) = per_connection {
                    conn.streams = conn.streams.saturating_add(1);
                    if conn.streams >= max {
                        map.remove(&key);
                    }
                }
                return Ok(sender);
            }
        }
        let stream = connect_dest(&dest, connect_timeout, transport, Alpn::Http2).await?;
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| {
                UpstreamError::Connect(format!("HTTP/2 handshake with {endpoint}: {e}"))
            })?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%endpoint, error = %e, "HTTP/2 upstream connection ended");
            }
        });
        let mut map = self.http2.lock();
        // Closed connections (endpoints gone, TLS settings rotated) leave the map here.
        map.retain(|_, c| !c.sender.is_closed());
        if per_connection.is_none_or(|max| max > 1) {
            map.insert(
                key,
                Http2Connection {
                    sender: sender.clone(),
                    streams: 1,
                },
            );
        }
        Ok(sender)
    }

    /// Sends a request over the shared HTTP/2 connection to `endpoint`, with `authority` as
    /// `:authority` (the peer sidecar routes by it). A connection carries at most
    /// `per_connection` streams.
    pub async fn send_http2(
        &self,
        endpoint: SocketAddr,
        connect_timeout: Duration,
        transport: &Transport,
        authority: &str,
        per_connection: Option<u32>,
        mut req: Request<Body>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let pq = req
            .uri()
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .to_string();
        let scheme = match transport {
            Transport::Plain => "http",
            Transport::Tls { .. } => "https",
        };
        *req.uri_mut() = Uri::try_from(format!("{scheme}://{authority}{pq}"))
            .map_err(|e| UpstreamError::Reset(format!("bad authority {authority:?}: {e}")))?;
        *req.version_mut() = Version::HTTP_2;
        req.headers_mut().remove(http::header::HOST);
        let mut sender = self
            .http2_sender(endpoint, connect_timeout, transport, per_connection)
            .await?;
        sender
            .send_request(req)
            .await
            .map_err(|e| UpstreamError::Reset(e.to_string()))
    }

    /// Opens an HTTP/2 CONNECT tunnel to a peer sidecar, as Envoy's tcp_proxy tunnelling does.
    pub async fn connect_tunnel(
        &self,
        endpoint: SocketAddr,
        connect_timeout: Duration,
        transport: &Transport,
        authority: &str,
    ) -> Result<TokioIo<hyper::upgrade::Upgraded>, UpstreamError> {
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri(authority)
            .version(Version::HTTP_2)
            .body(
                Empty::<Bytes>::new()
                    .map_err(|never| match never {})
                    .boxed(),
            )
            .map_err(|e| UpstreamError::Connect(format!("bad authority {authority:?}: {e}")))?;
        // `max_requests_per_connection` is an HTTP setting; tunnels of TCP clusters share the
        // endpoint's connection without a count.
        let mut sender = self
            .http2_sender(endpoint, connect_timeout, transport, None)
            .await?;
        let response = sender
            .send_request(req)
            .await
            .map_err(|e| UpstreamError::Reset(e.to_string()))?;
        if response.status() != StatusCode::OK {
            return Err(UpstreamError::TunnelRefused(response.status()));
        }
        let upgraded = hyper::upgrade::on(response)
            .await
            .map_err(|e| UpstreamError::Reset(format!("tunnel upgrade: {e}")))?;
        Ok(TokioIo::new(upgraded))
    }
}

/// A TCP connection to `dest` within `timeout`: to its address, or to the first address its
/// name resolves to that accepts (resolution included in the time).
pub async fn connect_to(dest: &Dest, timeout: Duration) -> Result<TcpStream, UpstreamError> {
    match dest {
        Dest::Addr(addr) => connect_tcp(*addr, timeout).await,
        Dest::Name(name) => connect_name(name, timeout).await,
    }
}

/// Resolves `name` with the system resolver (/etc/hosts, then DNS) and tries its addresses in
/// the order given until one connects, all within `timeout`. A name without addresses is
/// [`UpstreamError::Resolve`]; addresses that all refuse, or run out the time, are
/// [`UpstreamError::Connect`].
pub async fn connect_name(name: &DnsName, timeout: Duration) -> Result<TcpStream, UpstreamError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let unresolved = |why: String| {
        UpstreamError::Resolve(format!("name {:?} could not be resolved: {why}", name.host))
    };
    let addrs: Vec<SocketAddr> =
        tokio::time::timeout_at(deadline, tokio::net::lookup_host((&*name.host, name.port)))
            .await
            .map_err(|_| unresolved(format!("no answer within {timeout:?}")))?
            .map_err(|e| unresolved(e.to_string()))?
            .collect();
    if addrs.is_empty() {
        return Err(unresolved("no address".into()));
    }
    let mut failures = Vec::with_capacity(addrs.len());
    for addr in addrs {
        match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Ok(Err(e)) => failures.push(format!("{addr}: {e}")),
            Err(_) => {
                failures.push(format!("{addr}: timed out"));
                break;
            }
        }
    }
    Err(UpstreamError::Connect(format!(
        "connect to {name} ({}) within {timeout:?}",
        failures.join(", ")
    )))
}

pub async fn connect_tcp(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, UpstreamError> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| UpstreamError::Connect(format!("connect to {addr} timed out")))?
        .map_err(|e| UpstreamError::Connect(format!("connect to {addr}: {e}")))?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(host: &str, port: u16) -> DnsName {
        DnsName {
            host: Arc::from(host),
            port,
        }
    }

    #[tokio::test]
    async fn a_name_is_resolved_and_its_addresses_tried() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        // /etc/hosts has localhost, perhaps as ::1 before 127.0.0.1: the one that accepts wins.
        let stream = connect_to(&Dest::Name(name("localhost", port)), Duration::from_secs(2))
            .await
            .expect("connected");
        assert_eq!(
            stream.peer_addr().expect("peer").to_string(),
            format!("127.0.0.1:{port}")
        );
        // Nothing listens once the socket is gone: a connect failure, naming what was tried.
        drop(listener);
        match connect_name(&name("localhost", port), Duration::from_secs(2)).await {
            Err(UpstreamError::Connect(e)) => {
                assert!(
                    e.starts_with(&format!("connect to localhost:{port} (")),
                    "{e}"
                );
                assert!(e.contains(&format!("127.0.0.1:{port}: ")), "{e}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_name_without_addresses_is_a_resolution_failure() {
        match connect_name(&name("no-such-host.invalid", 80), Duration::from_secs(2)).await {
            Err(UpstreamError::Resolve(e)) => assert!(
                e.starts_with("name \"no-such-host.invalid\" could not be resolved: "),
                "{e}"
            ),
            other => panic!("{other:?}"),
        }
    }
}
