//! Connections to upstreams: pooled HTTP/1.1 (hyper-util's client), multiplexed HTTP/2 (one
//! connection per endpoint, shared by requests and CONNECT tunnels), and plain TCP.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use parking_lot::Mutex;
use tokio::net::TcpStream;

use crate::lb::ActiveRequests;

pub type Body = BoxBody<Bytes, hyper::Error>;

/// Why an upstream exchange failed before response headers.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connection failure: {0}")]
    Connect(String),
    #[error("connection termination: {0}")]
    Reset(String),
    #[error("timeout")]
    Timeout,
    #[error("tunnel refused with status {0}")]
    TunnelRefused(StatusCode),
    #[error("no endpoint")]
    NoEndpoint,
    #[error("circuit breaker open (max requests)")]
    Overflow,
}

#[derive(Debug, Default)]
pub struct Upstreams {
    /// HTTP/1.1 clients by connect timeout (the connector carries it); each pools per endpoint.
    http1: Mutex<HashMap<Duration, Client<HttpConnector, Body>>>,
    http2: Mutex<HashMap<SocketAddr, http2::SendRequest<Body>>>,
    pub active: ActiveRequests,
    /// Requests in flight per cluster, for `CircuitBreakers.max_requests`.
    per_cluster: Mutex<HashMap<Arc<str>, Arc<AtomicUsize>>>,
}

/// Counts one request in flight on a cluster until dropped.
#[derive(Debug)]
pub struct ClusterGuard(Arc<AtomicUsize>);

impl Drop for ClusterGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Upstreams {
    pub fn cluster_active(&self, cluster: &str) -> usize {
        self.per_cluster
            .lock()
            .get(cluster)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    pub fn cluster_start(&self, cluster: &Arc<str>) -> ClusterGuard {
        let counter = self
            .per_cluster
            .lock()
            .entry(cluster.clone())
            .or_default()
            .clone();
        counter.fetch_add(1, Ordering::Relaxed);
        ClusterGuard(counter)
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

    /// Sends an HTTP/1.1 request to `endpoint`; `req`'s URI must be origin-form or absolute.
    pub async fn send_http1(
        &self,
        endpoint: SocketAddr,
        connect_timeout: Duration,
        mut req: Request<Body>,
    ) -> Result<Response<Incoming>, UpstreamError> {
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

    async fn http2_sender(
        &self,
        endpoint: SocketAddr,
        connect_timeout: Duration,
    ) -> Result<http2::SendRequest<Body>, UpstreamError> {
        if let Some(sender) = self.http2.lock().get(&endpoint)
            && !sender.is_closed()
        {
            return Ok(sender.clone());
        }
        let stream = connect_tcp(endpoint, connect_timeout).await?;
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
        self.http2.lock().insert(endpoint, sender.clone());
        Ok(sender)
    }

    /// Sends a request over the shared HTTP/2 connection to `endpoint`, with `authority` as
    /// `:authority` (the peer sidecar routes by it).
    pub async fn send_http2(
        &self,
        endpoint: SocketAddr,
        connect_timeout: Duration,
        authority: &str,
        mut req: Request<Body>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let pq = req
            .uri()
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .to_string();
        *req.uri_mut() = Uri::try_from(format!("http://{authority}{pq}"))
            .map_err(|e| UpstreamError::Reset(format!("bad authority {authority:?}: {e}")))?;
        *req.version_mut() = Version::HTTP_2;
        req.headers_mut().remove(http::header::HOST);
        let mut sender = self.http2_sender(endpoint, connect_timeout).await?;
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
        let mut sender = self.http2_sender(endpoint, connect_timeout).await?;
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

pub async fn connect_tcp(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, UpstreamError> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| UpstreamError::Connect(format!("connect to {addr} timed out")))?
        .map_err(|e| UpstreamError::Connect(format!("connect to {addr}: {e}")))?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}
