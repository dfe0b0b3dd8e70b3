//! The `services/proxy` and `pods/proxy` subresources: a request to
//! `…/services/<name>[:<port>]/proxy[/<path>]` (or `pods/…`) is forwarded over plain HTTP/1.1 to
//! a ready endpoint of the Service (or the pod's `status.podIP`), and the upstream's status,
//! headers (hop-by-hop ones removed) and body come back, as kube-apiserver's proxy does.

use std::net::{IpAddr, SocketAddr};

use axum::body::{Body, Bytes};
use axum::response::Response;
use http::{HeaderMap, HeaderName, Method, StatusCode, Uri, header};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpStream;

use crate::services::{self, ResolveError, ServicePort};
use crate::status::ApiError;

use super::AppState;

/// Headers that belong to one connection and are never forwarded (RFC 9110 §7.6.1), as Go's
/// `httputil.ReverseProxy` drops them.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "proxy-connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// What is proxied to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Service,
    Pod,
}

/// Splits `name`, `name:port` or `scheme:name:port` (the real `SplitSchemeNamePort`). Only
/// plain HTTP is proxied: an `https` scheme is a 400.
pub(super) fn split_name(id: &str, kind: Kind) -> Result<(String, String), ApiError> {
    let what = match kind {
        Kind::Service => "service",
        Kind::Pod => "pod",
    };
    let invalid = || ApiError::bad_request(format!("invalid {what} request {id:?}"));
    let parts: Vec<&str> = id.split(':').collect();
    let (scheme, name, port) = match parts.as_slice() {
        [name] => ("", *name, ""),
        [name, port] => ("", *name, *port),
        [scheme, name, port] if matches!(*scheme, "http" | "https") => (*scheme, *name, *port),
        _ => return Err(invalid()),
    };
    if name.is_empty() {
        return Err(invalid());
    }
    if scheme == "https" {
        return Err(ApiError::bad_request(format!(
            "invalid {what} request {id:?}: the test API server proxies plain HTTP only (no https: scheme)"
        )));
    }
    Ok((name.to_string(), port.to_string()))
}

/// Serves one proxied request. `id` is the `name[:port]` segment; `rest` the path after
/// `/proxy` (empty or starting with `/`).
#[allow(clippy::too_many_arguments)]
pub(super) async fn serve(
    app: &AppState,
    kind: Kind,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
    ns: &str,
    id: &str,
    rest: &str,
) -> Result<Response, ApiError> {
    if !matches!(
        *method,
        Method::GET
            | Method::POST
            | Method::PUT
            | Method::PATCH
            | Method::DELETE
            | Method::HEAD
            | Method::OPTIONS
    ) {
        return Err(ApiError::method_not_allowed());
    }
    let (name, port) = split_name(id, kind)?;
    let addr = match kind {
        Kind::Service => service_location(app, ns, &name, &port)?,
        Kind::Pod => pod_location(app, ns, &name, &port)?,
    };
    let path = if rest.is_empty() { "/" } else { rest };
    let path_and_query = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    let what = match kind {
        Kind::Service => "service",
        Kind::Pod => "pod",
    };
    forward(addr, method, &path_and_query, headers, body)
        .await
        .map_err(|e| {
            ApiError::new(
                503,
                "ServiceUnavailable",
                format!("error trying to reach {what}: {e}"),
            )
        })
}

fn service_location(
    app: &AppState,
    ns: &str,
    name: &str,
    port: &str,
) -> Result<SocketAddr, ApiError> {
    services::endpoint(&app.store, ns, name, &ServicePort::parse(port)).map_err(|e| match e {
        ResolveError::NotFound(_) => ApiError::not_found("", "services", name),
        other => ApiError::new(503, "ServiceUnavailable", other.to_string()),
    })
}

/// The pod's `status.podIP` at `port`: a number, a named container port, or (none given) the
/// first declared container port, else 80.
fn pod_location(app: &AppState, ns: &str, name: &str, port: &str) -> Result<SocketAddr, ApiError> {
    let pod = app
        .store
        .get("v1", "Pod", Some(ns), name)
        .ok_or_else(|| ApiError::not_found("", "pods", name))?;
    let ip = pod_ip(&pod, name)?;
    let container_ports = || {
        pod.pointer("/spec/containers")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|c| c.get("ports").and_then(Value::as_array))
            .flatten()
    };
    let number = |p: &Value| {
        p.get("containerPort")
            .and_then(Value::as_u64)
            .and_then(|n| u16::try_from(n).ok())
    };
    let port = if port.is_empty() {
        container_ports().find_map(number).unwrap_or(80)
    } else if let Ok(n) = port.parse::<u16>() {
        n
    } else {
        container_ports()
            .find(|p| p.get("name").and_then(Value::as_str) == Some(port))
            .and_then(number)
            .ok_or_else(|| {
                ApiError::bad_request(format!("no container port named {port:?} in pod {name:?}"))
            })?
    };
    Ok(SocketAddr::new(ip, port))
}

/// `status.podIP`; a pod without one cannot be reached (503).
pub(super) fn pod_ip(pod: &Value, name: &str) -> Result<IpAddr, ApiError> {
    pod.pointer("/status/podIP")
        .and_then(Value::as_str)
        .filter(|ip| !ip.is_empty())
        .and_then(|ip| ip.parse().ok())
        .ok_or_else(|| {
            ApiError::new(
                503,
                "ServiceUnavailable",
                format!("pod {name:?} has no IP address (status.podIP)"),
            )
        })
}

/// `dial tcp 127.0.0.1:1: connect: connection refused`, as Go words it.
pub(super) fn dial_error(addr: SocketAddr, e: &std::io::Error) -> String {
    let why = match e.kind() {
        std::io::ErrorKind::ConnectionRefused => "connection refused".to_string(),
        _ => e.to_string(),
    };
    format!("dial tcp {addr}: connect: {why}")
}

async fn forward(
    addr: SocketAddr,
    method: &Method,
    path_and_query: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, String> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| dial_error(addr, &e))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut request = http::Request::builder()
        .method(method.clone())
        .uri(path_and_query)
        .body(Full::new(Bytes::copy_from_slice(body)))
        .map_err(|e| e.to_string())?;
    let forwarded = request.headers_mut();
    *forwarded = end_to_end(headers);
    forwarded.insert(
        header::HOST,
        http::HeaderValue::from_str(&addr.to_string()).map_err(|e| e.to_string())?,
    );
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let (parts, incoming) = response.into_parts();
    let mut out = Response::new(Body::new(incoming));
    *out.status_mut() = parts.status;
    *out.headers_mut() = end_to_end(&parts.headers);
    if parts.status == StatusCode::SWITCHING_PROTOCOLS {
        return Err("upgrades are not proxied by the test API server".into());
    }
    Ok(out)
}

/// `headers` without the hop-by-hop ones (and those the `Connection` header names).
fn end_to_end(headers: &HeaderMap) -> HeaderMap {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .collect();
    let mut out = headers.clone();
    for name in HOP_BY_HOP
        .iter()
        .copied()
        .chain(named.iter().map(String::as_str))
    {
        if let Ok(h) = HeaderName::from_bytes(name.as_bytes()) {
            out.remove(h);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let ok = |id: &str| split_name(id, Kind::Service).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(ok("web"), ("web".into(), String::new()));
        assert_eq!(ok("web:http"), ("web".into(), "http".into()));
        assert_eq!(ok("http:web:80"), ("web".into(), "80".into()));
        for bad in ["https:web:443", ":80", "a:b:c:d", "ftp:web:21"] {
            assert_eq!(
                split_name(bad, Kind::Pod).map_err(|e| e.code),
                Err(400),
                "{bad}"
            );
        }
    }

    #[test]
    fn hop_by_hop_headers_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            "keep-alive, x-private"
                .parse()
                .unwrap_or_else(|e| panic!("{e}")),
        );
        h.insert("x-private", "1".parse().unwrap_or_else(|e| panic!("{e}")));
        h.insert(
            "transfer-encoding",
            "chunked".parse().unwrap_or_else(|e| panic!("{e}")),
        );
        h.insert("x-kept", "2".parse().unwrap_or_else(|e| panic!("{e}")));
        let out = end_to_end(&h);
        assert_eq!(out.len(), 1);
        assert_eq!(out["x-kept"], "2");
    }
}
