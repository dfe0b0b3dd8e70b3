//! The `pods/portforward` subresource over WebSocket, the protocol kube-rs's
//! `Api::<Pod>::portforward` and client-go's WebSocket port-forwarder speak (the kubelet's
//! `portforward/websocket.go`): subprotocol `v4.channel.k8s.io` (or `portforward.k8s.io`, or
//! none), two channels per requested port (`2i` data, `2i+1` error), the first frame on each
//! carrying the port as two little-endian bytes, then binary frames prefixed by their channel
//! byte.
//!
//! The kubelet would connect to `localhost:<port>` inside the pod's network namespace; pods in
//! this test world are processes on loopback addresses, so the connection goes to
//! `status.podIP:<port>`. A port that cannot be reached gets the kubelet's message on its error
//! channel; when every port's connection has ended the WebSocket is closed, as the kubelet
//! closes it.

use std::net::{IpAddr, SocketAddr};

use axum::body::{Body, Bytes};
use axum::response::Response;
use futures::{SinkExt, StreamExt};
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

use crate::meta;
use crate::status::ApiError;

use super::proxy::{dial_error, pod_ip};
use super::{AppState, header_str};

/// Subprotocols served, as the kubelet's port-forward handler lists them (binary only).
const PROTOCOLS: [&str; 2] = ["v4.channel.k8s.io", "portforward.k8s.io"];

/// Checks the request and the pod, answers `101 Switching Protocols` and runs the session on
/// the upgraded connection.
pub(super) fn serve(
    app: &AppState,
    method: &Method,
    headers: &HeaderMap,
    raw_query: Option<&str>,
    upgrade: Option<OnUpgrade>,
    ns: &str,
    name: &str,
) -> Result<Response, ApiError> {
    if *method != Method::GET && *method != Method::POST {
        return Err(ApiError::method_not_allowed());
    }
    let ports = ports(raw_query)?;
    let pod = app
        .store
        .get("v1", "Pod", Some(ns), name)
        .ok_or_else(|| ApiError::not_found("", "pods", name))?;
    let ip = pod_ip(&pod, name)?;
    let uid = meta::uid(&pod).to_string();

    let header = |h: header::HeaderName| header_str(headers, h);
    let is_websocket = header(header::UPGRADE).eq_ignore_ascii_case("websocket")
        && header(header::CONNECTION)
            .split(',')
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if !is_websocket {
        return Err(ApiError::bad_request(
            "port-forward needs a WebSocket upgrade (Upgrade: websocket); \
             the test API server does not speak SPDY",
        ));
    }
    let key = header(header::SEC_WEBSOCKET_KEY);
    if key.is_empty() || header(header::SEC_WEBSOCKET_VERSION) != "13" {
        return Err(ApiError::bad_request(
            "a WebSocket upgrade needs Sec-WebSocket-Key and Sec-WebSocket-Version: 13",
        ));
    }
    let offered: Vec<&str> = header(header::SEC_WEBSOCKET_PROTOCOL)
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    let chosen = offered
        .iter()
        .find_map(|o| PROTOCOLS.iter().copied().find(|p| p == o));
    let protocol = match chosen {
        Some(p) => Some(p),
        None if offered.is_empty() => None,
        None => {
            return Err(ApiError::bad_request(format!(
                "requested protocol(s) are not supported: {offered:?}; supports {PROTOCOLS:?}"
            )));
        }
    };
    let upgrade =
        upgrade.ok_or_else(|| ApiError::bad_request("the connection cannot be upgraded"))?;

    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&derive_accept_key(key.as_bytes()))
            .map_err(|e| ApiError::internal(e.to_string()))?,
    );
    if let Some(p) = protocol {
        h.insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(p));
    }
    let pod_name = name.to_string();
    tokio::spawn(async move {
        match upgrade.await {
            Ok(upgraded) => {
                let ws =
                    WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None)
                        .await;
                session(ws, ports, ip, pod_name, uid).await;
            }
            Err(e) => tracing::debug!(error = %e, "port-forward upgrade failed"),
        }
    });
    Ok(response)
}

/// `ports=80&ports=8080` or `ports=80,8080` (kube-rs sends the latter), each 1–65535.
fn ports(raw_query: Option<&str>) -> Result<Vec<u16>, ApiError> {
    let mut ports = Vec::new();
    for (k, v) in form_urlencoded::parse(raw_query.unwrap_or_default().as_bytes()) {
        if k != "ports" {
            continue;
        }
        for p in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match p.parse::<u16>() {
                Ok(n) if n > 0 => ports.push(n),
                _ => {
                    return Err(ApiError::bad_request(format!(
                        "invalid port {p:?}: must be between 1 and 65535, inclusive"
                    )));
                }
            }
        }
    }
    if ports.is_empty() {
        return Err(ApiError::bad_request(
            "at least one port must be specified (ports=…)",
        ));
    }
    Ok(ports)
}

type Ws = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// One port-forward connection: frames in both directions until every port's upstream
/// connection has ended (then the WebSocket is closed) or the client goes away.
async fn session(ws: Ws, ports: Vec<u16>, ip: IpAddr, pod: String, uid: String) {
    let (mut sink, mut stream) = ws.split();
    let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(64);
    let mut to_pod = Vec::with_capacity(ports.len());
    let mut forwards = JoinSet::new();
    for (i, &port) in ports.iter().enumerate() {
        let data_ch = u8::try_from(2 * i).unwrap_or(u8::MAX - 1);
        for ch in [data_ch, data_ch + 1] {
            let [lo, hi] = port.to_le_bytes();
            if sink.send(Message::binary(vec![ch, lo, hi])).await.is_err() {
                return;
            }
        }
        let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
        to_pod.push(tx);
        let target = Port {
            addr: SocketAddr::new(ip, port),
            data_ch,
            pod: pod.clone(),
            uid: uid.clone(),
        };
        forwards.spawn(target.forward(rx, out_tx.clone()));
    }
    drop(out_tx);
    let mut done = false;
    while !done {
        tokio::select! {
            msg = stream.next() => match msg {
                Some(Ok(Message::Binary(bytes))) if bytes.len() > 1 => {
                    let ch = usize::from(bytes[0]);
                    // Only data channels carry bytes to the pod; writes to an error channel
                    // or an unknown one are ignored, as the kubelet ignores them.
                    if ch % 2 == 0
                        && let Some(tx) = to_pod.get(ch / 2)
                    {
                        let _ = tx.send(bytes.slice(1..));
                    }
                }
                Some(Ok(Message::Close(_)) | Err(_)) | None => return,
                Some(Ok(_)) => {}
            },
            Some(frame) = out_rx.recv() => {
                if sink.send(Message::binary(frame)).await.is_err() {
                    return;
                }
            }
            joined = forwards.join_next() => {
                done = joined.is_none() || forwards.is_empty();
            }
        }
    }
    // Every port has ended: send what they left, then close.
    while let Ok(frame) = out_rx.try_recv() {
        if sink.send(Message::binary(frame)).await.is_err() {
            return;
        }
    }
    let _ = sink.close().await;
    // Wait (briefly) for the client's close frame so the connection ends cleanly.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
        while let Some(Ok(msg)) = stream.next().await {
            if msg.is_close() {
                break;
            }
        }
    })
    .await;
}

/// One forwarded port.
struct Port {
    addr: SocketAddr,
    data_ch: u8,
    pod: String,
    uid: String,
}

impl Port {
    /// Connects, then copies bytes both ways; ends when the pod side has no more to send (or
    /// the connection failed, reported on the error channel).
    async fn forward(
        self,
        mut from_client: mpsc::UnboundedReceiver<Bytes>,
        out: mpsc::Sender<Vec<u8>>,
    ) {
        let tcp = match TcpStream::connect(self.addr).await {
            Ok(tcp) => tcp,
            Err(e) => {
                let message = format!(
                    "error forwarding port {} to pod {}, uid {}: {}",
                    self.addr.port(),
                    self.pod,
                    self.uid,
                    dial_error(self.addr, &e)
                );
                let mut frame = vec![self.data_ch + 1];
                frame.extend_from_slice(message.as_bytes());
                let _ = out.send(frame).await;
                return;
            }
        };
        let (mut read, mut write) = tcp.into_split();
        // Client → pod runs until the session drops its sender (or the pod stops reading).
        tokio::spawn(async move {
            while let Some(bytes) = from_client.recv().await {
                if write.write_all(&bytes).await.is_err() {
                    break;
                }
            }
            let _ = write.shutdown().await;
        });
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let mut frame = Vec::with_capacity(n + 1);
                    frame.push(self.data_ch);
                    frame.extend_from_slice(&buf[..n]);
                    if out.send(frame).await.is_err() {
                        break;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_lists() {
        assert_eq!(
            ports(Some("ports=80%2C1234")).map_err(|e| e.code),
            Ok(vec![80, 1234])
        );
        assert_eq!(
            ports(Some("ports=80&ports=81")).map_err(|e| e.code),
            Ok(vec![80, 81])
        );
        for bad in [None, Some("ports=0"), Some("ports=70000"), Some("ports=x")] {
            assert_eq!(ports(bad).map_err(|e| e.code), Err(400), "{bad:?}");
        }
    }
}
