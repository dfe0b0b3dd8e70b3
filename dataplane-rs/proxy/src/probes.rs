//! Kubernetes application probes that FSM's injector rewrote to the sidecar (`--probes`).
//!
//! The injector moves a container's `httpGet` liveness, readiness and startup probes to ports
//! 15901, 15902 and 15903. For `scheme: HTTP` it also rewrites the path (`/fsm-liveness-probe`…):
//! the sidecar answers that path by asking the application for the original path and port on
//! 127.0.0.1 in plain HTTP, and returns its status and body (503 when it cannot be reached in
//! time). For `scheme: HTTPS` only the port is rewritten: the whole port is relayed as TCP to the
//! application's port, so the kubelet's TLS handshake reaches the application.
//!
//! The probes come from the command line, not from xDS: they are served from start-up, with or
//! without a control plane.

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};

/// The type of a probe's target path (re-exported for the code that builds probes).
pub use http::uri::PathAndQuery;

/// The most of an application's probe answer passed back; the kubelet reads 10 KiB of it.
const BODY_LIMIT: usize = 64 * 1024;

/// How long a probe connection may take to send its request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// One probe the sidecar serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    /// The port the kubelet probes (bound on 0.0.0.0).
    pub listen_port: u16,
    /// The application's port, on 127.0.0.1.
    pub target_port: u16,
    /// How long the application has to answer (HTTP) or accept (HTTPS).
    pub timeout: Duration,
    pub kind: ProbeKind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeKind {
    /// `scheme: HTTP`: requests for `path` are sent to the application as `target_path`.
    Http {
        path: String,
        target_path: PathAndQuery,
    },
    /// `scheme: HTTPS`: the whole listen port is relayed as TCP (TLS passthrough).
    Https,
}

/// A probe port that could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("binding probe port {port}: {source}")]
pub struct BindError {
    pub port: u16,
    pub source: std::io::Error,
}

/// What one listen port serves.
#[derive(Clone, Debug)]
enum Served {
    /// HTTP probes, by path.
    Http(Arc<[Probe]>),
    /// The port relayed as TCP.
    Tcp {
        target: SocketAddr,
        timeout: Duration,
    },
}

/// The probe ports, bound and not yet served.
#[derive(Debug)]
pub struct ProbeListeners {
    ports: Vec<(TcpListener, Served)>,
}

impl ProbeListeners {
    /// Binds `0.0.0.0:<listenPort>` for every distinct listen port.
    pub async fn bind(probes: &[Probe]) -> Result<Self, BindError> {
        Self::bind_on(Ipv4Addr::UNSPECIFIED.into(), probes).await
    }

    async fn bind_on(ip: IpAddr, probes: &[Probe]) -> Result<Self, BindError> {
        let mut ports = Vec::new();
        let mut seen = Vec::new();
        for probe in probes {
            let port = probe.listen_port;
            if seen.contains(&port) {
                continue;
            }
            seen.push(port);
            let listener = TcpListener::bind((ip, port))
                .await
                .map_err(|source| BindError { port, source })?;
            let served = match probe.kind {
                ProbeKind::Https => Served::Tcp {
                    target: loopback(probe.target_port),
                    timeout: probe.timeout,
                },
                ProbeKind::Http { .. } => Served::Http(
                    probes
                        .iter()
                        .filter(|p| p.listen_port == port)
                        .cloned()
                        .collect(),
                ),
            };
            ports.push((listener, served));
        }
        Ok(Self { ports })
    }

    /// The bound addresses.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.ports
            .iter()
            .filter_map(|(l, _)| l.local_addr().ok())
            .collect()
    }

    /// Serves every port on its own task, for as long as the runtime runs.
    pub fn spawn(self) {
        for (listener, served) in self.ports {
            let port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
            match served {
                Served::Http(probes) => {
                    tracing::info!(port, paths = ?paths(&probes), "serving HTTP probes");
                    tokio::spawn(serve_http1(listener, move |req| {
                        let probes = probes.clone();
                        async move { answer(&probes, req).await }
                    }));
                }
                Served::Tcp { target, timeout } => {
                    tracing::info!(port, %target, "relaying HTTPS probes as TCP");
                    tokio::spawn(serve_tcp(listener, target, timeout));
                }
            }
        }
    }
}

fn paths(probes: &[Probe]) -> Vec<&str> {
    probes
        .iter()
        .filter_map(|p| match &p.kind {
            ProbeKind::Http { path, .. } => Some(path.as_str()),
            ProbeKind::Https => None,
        })
        .collect()
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// A plain-text answer.
pub fn text_reply(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Accepts HTTP/1.1 connections on `listener` forever, answering each request with `handle`.
pub async fn serve_http1<F, Fut>(listener: TcpListener, handle: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let handle = handle.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let answer = handle(req);
                        async move { Ok::<_, Infallible>(answer.await) }
                    });
                    let connection = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(HEADER_READ_TIMEOUT)
                        .serve_connection(TokioIo::new(stream), service);
                    if let Err(e) = connection.await {
                        tracing::debug!(error = %e, "probe connection ended with an error");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Answers one request to an HTTP probe port: the probe at its path, else 404.
async fn answer(probes: &[Probe], req: Request<Incoming>) -> Response<Full<Bytes>> {
    let probe = probes.iter().find_map(|p| match &p.kind {
        ProbeKind::Http { path, target_path } if path == req.uri().path() => Some((p, target_path)),
        _ => None,
    });
    let Some((probe, target_path)) = probe else {
        let path = req.uri().path().to_string();
        return text_reply(StatusCode::NOT_FOUND, format!("no probe at {path}\n"));
    };
    let target = loopback(probe.target_port);
    match tokio::time::timeout(probe.timeout, ask(target, target_path, req)).await {
        Ok(Ok(response)) => response,
        Ok(Err(e)) => {
            tracing::info!(%target, error = %e, "probe target failed");
            text_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("probe target {target}: {e}\n"),
            )
        }
        Err(_) => {
            let secs = probe.timeout.as_secs();
            tracing::info!(%target, "probe target did not answer within {secs}s");
            text_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("probe target {target} did not answer within {secs}s\n"),
            )
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Aborts a task when dropped: the upstream connection of a probe that timed out.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Sends the kubelet's request to the application as `path` on a new connection and reads the
/// answer (at most [`BODY_LIMIT`] of its body).
async fn ask(
    target: SocketAddr,
    path: &PathAndQuery,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, BoxError> {
    let stream = TcpStream::connect(target).await?;
    stream.set_nodelay(true)?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let _connection = AbortOnDrop(tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "probe target connection ended with an error");
        }
    }));
    let (mut parts, body) = req.into_parts();
    parts.uri = Uri::from(path.clone());
    parts.version = Version::HTTP_11;
    crate::http::strip_hop_by_hop(&mut parts.headers);
    if !parts.headers.contains_key(header::HOST) {
        parts
            .headers
            .insert(header::HOST, HeaderValue::from_str(&target.to_string())?);
    }
    let response = sender
        .send_request(Request::from_parts(parts, body))
        .await?;
    let (mut parts, mut body) = response.into_parts();
    let mut read = BytesMut::new();
    let mut truncated = false;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        let room = BODY_LIMIT - read.len();
        if data.len() > room {
            read.extend_from_slice(&data[..room]);
            truncated = true;
            break;
        }
        read.extend_from_slice(&data);
    }
    crate::http::strip_hop_by_hop(&mut parts.headers);
    if truncated {
        parts.headers.remove(header::CONTENT_LENGTH);
    }
    Ok(Response::from_parts(parts, Full::new(read.freeze())))
}

/// Relays every connection to `target` as bytes; one whose target does not accept within
/// `timeout` is closed.
async fn serve_tcp(listener: TcpListener, target: SocketAddr, timeout: Duration) {
    loop {
        match listener.accept().await {
            Ok((client, _)) => {
                tokio::spawn(relay(client, target, timeout));
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn relay(mut client: TcpStream, target: SocketAddr, timeout: Duration) {
    let mut upstream = match tokio::time::timeout(timeout, TcpStream::connect(target)).await {
        Ok(Ok(upstream)) => upstream,
        Ok(Err(e)) => {
            tracing::info!(%target, error = %e, "HTTPS probe target failed; closing");
            return;
        }
        Err(_) => {
            tracing::info!(%target, "HTTPS probe target did not accept in time; closing");
            return;
        }
    };
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(%target, error = %e, "HTTPS probe relay ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn http(listen_port: u16, path: &str, target_port: u16, target_path: &str) -> Probe {
        Probe {
            listen_port,
            target_port,
            timeout: Duration::from_secs(1),
            kind: ProbeKind::Http {
                path: path.to_string(),
                target_path: target_path.parse().expect("path"),
            },
        }
    }

    /// A one-shot HTTP app: answers one request with `status` and a body echoing the request
    /// line and its `x-probe` and `host` headers.
    async fn app(status: u16) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.expect("accept");
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                stream.read_exact(&mut byte).await.expect("read");
                head.push(byte[0]);
            }
            let head = String::from_utf8(head).expect("utf-8");
            let line = head.lines().next().unwrap_or_default().to_string();
            let header = |name: &str| {
                head.lines()
                    .find_map(|l| {
                        let (n, v) = l.split_once(':')?;
                        n.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
                    })
                    .unwrap_or_default()
            };
            let body = format!(
                "{line} x-probe={} host={} connection={}",
                header("x-probe"),
                header("host"),
                header("connection")
            );
            let answer = format!(
                "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nx-app: yes\r\n\r\n{body}",
                body.len()
            );
            stream.write_all(answer.as_bytes()).await.expect("write");
        });
        (addr, task)
    }

    /// Sends one raw HTTP/1.1 request and returns the status and body.
    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let request = format!(
            "GET {path} HTTP/1.1\r\nhost: 10.0.0.7:15901\r\nx-probe: kubelet\r\nconnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.expect("read");
        let status = answer[9..12].parse().expect("status");
        let body = answer
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (status, body)
    }

    async fn serve(probes: &[Probe]) -> SocketAddr {
        let listeners = ProbeListeners::bind_on(Ipv4Addr::LOCALHOST.into(), probes)
            .await
            .expect("bind");
        let addr = listeners.local_addrs()[0];
        listeners.spawn();
        addr
    }

    #[tokio::test]
    async fn http_probe_asks_the_app_at_its_path_and_passes_its_answer_back() {
        for status in [200, 500] {
            let (app, task) = app(status).await;
            let probes = [
                http(0, "/fsm-liveness-probe", app.port(), "/healthz?x=1"),
                http(0, "/other", 1, "/"),
            ];
            let addr = serve(&probes).await;
            let (got, body) = get(addr, "/fsm-liveness-probe").await;
            assert_eq!(got, status);
            // The path is rewritten; the kubelet's headers pass, hop-by-hop ones do not.
            assert_eq!(
                body,
                "GET /healthz?x=1 HTTP/1.1 x-probe=kubelet host=10.0.0.7:15901 connection="
            );
            task.await.expect("app");
            assert_eq!(get(addr, "/nope").await.0, 404);
        }
    }

    #[tokio::test]
    async fn unreachable_or_slow_app_is_503() {
        let closed = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let closed_port = closed.local_addr().expect("addr").port();
        drop(closed);
        let silent = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let silent_port = silent.local_addr().expect("addr").port();
        let addr = serve(&[
            http(0, "/down", closed_port, "/"),
            http(0, "/slow", silent_port, "/"),
        ])
        .await;
        let (status, body) = get(addr, "/down").await;
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("refused"), "{body}");
        let started = std::time::Instant::now();
        let (status, body) = get(addr, "/slow").await;
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("did not answer within 1s"), "{body}");
        assert!(started.elapsed() < Duration::from_secs(3));
        drop(silent);
    }

    #[tokio::test]
    async fn https_probe_port_is_relayed_as_bytes() {
        let echo = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let echo_port = echo.local_addr().expect("addr").port();
        tokio::spawn(async move {
            let (mut stream, _) = echo.accept().await.expect("accept");
            let (mut r, mut w) = stream.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
        let addr = serve(&[Probe {
            listen_port: 0,
            target_port: echo_port,
            timeout: Duration::from_secs(1),
            kind: ProbeKind::Https,
        }])
        .await;
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let hello = b"\x16\x03\x01 not really a ClientHello";
        stream.write_all(hello).await.expect("write");
        let mut back = vec![0u8; hello.len()];
        stream.read_exact(&mut back).await.expect("read");
        assert_eq!(back, hello);
    }
}
