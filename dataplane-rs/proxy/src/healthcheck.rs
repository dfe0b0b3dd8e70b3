//! `fsm-healthcheck`: the kubelet's `tcpSocket` probes, which FSM's injector rewrites to
//! `httpGet /fsm-healthcheck` on port 15904 with the original port in the `Original-Tcp-Port`
//! header. The answer is 200 when 127.0.0.1:<port> accepts a TCP connection within a second, 503
//! when it does not; 400 without a valid header, 404 for any other path.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tokio::net::{TcpListener, TcpStream};

use crate::probes::{serve_http1, text_reply};

/// The path the injector points rewritten `tcpSocket` probes at.
pub const PATH: &str = "/fsm-healthcheck";

/// The header carrying the probe's original port (matched in any case, as header names are).
pub const PORT_HEADER: &str = "Original-Tcp-Port";

/// How long the application's port has to accept.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Serves health checks on `listener` forever.
pub async fn serve(listener: TcpListener) {
    serve_http1(listener, |req| async move { answer(&req).await }).await;
}

/// Answers one health check.
pub async fn answer<B>(req: &Request<B>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if path != PATH {
        return text_reply(
            StatusCode::NOT_FOUND,
            format!("{path} not found: health checks are at {PATH}\n"),
        );
    }
    let port = match target_port(req) {
        Ok(port) => port,
        Err(message) => {
            tracing::info!("refused a health check: {message}");
            return text_reply(StatusCode::BAD_REQUEST, format!("{message}\n"));
        }
    };
    let target = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await {
        Ok(Ok(_)) => text_reply(
            StatusCode::OK,
            format!("established a connection to {target}\n"),
        ),
        Ok(Err(e)) => {
            tracing::info!(%target, error = %e, "health check failed");
            text_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("failed to connect to {target}: {e}\n"),
            )
        }
        Err(_) => {
            tracing::info!(%target, "health check timed out");
            text_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "failed to connect to {target}: no answer within {}s\n",
                    CONNECT_TIMEOUT.as_secs()
                ),
            )
        }
    }
}

/// The port named by the request's `Original-Tcp-Port` header.
fn target_port<B>(req: &Request<B>) -> Result<u16, String> {
    let value = req
        .headers()
        .get(PORT_HEADER)
        .ok_or_else(|| format!("header {PORT_HEADER} is missing"))?;
    let text = String::from_utf8_lossy(value.as_bytes());
    text.trim()
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("header {PORT_HEADER}: {text:?} is not a port"))
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    fn request(path: &str, header: Option<(&str, &str)>) -> Request<()> {
        let mut builder = Request::get(path);
        if let Some((name, value)) = header {
            builder = builder.header(name, value);
        }
        builder.body(()).expect("request")
    }

    async fn check(req: Request<()>) -> (StatusCode, String) {
        let response = answer(&req).await;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn open_port_is_200_closed_port_503() {
        let open = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let open_port = open.local_addr().expect("addr").port().to_string();
        let closed = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let closed_port = closed.local_addr().expect("addr").port().to_string();
        drop(closed);
        let (status, body) = check(request(PATH, Some(("original-tcp-port", &open_port)))).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let (status, body) = check(request(PATH, Some(("Original-Tcp-Port", &closed_port)))).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(body.contains(&format!("127.0.0.1:{closed_port}")), "{body}");
    }

    #[tokio::test]
    async fn bad_requests() {
        let cases = [
            (
                request(PATH, None),
                400,
                "header Original-Tcp-Port is missing",
            ),
            (
                request(PATH, Some(("ORIGINAL-TCP-PORT", "http"))),
                400,
                "header Original-Tcp-Port: \"http\" is not a port",
            ),
            (
                request(PATH, Some(("Original-Tcp-Port", "0"))),
                400,
                "is not a port",
            ),
            (
                request(PATH, Some(("Original-Tcp-Port", "65536"))),
                400,
                "is not a port",
            ),
            (
                request("/healthz", Some(("Original-Tcp-Port", "80"))),
                404,
                "/healthz not found",
            ),
        ];
        for (req, want_status, want_body) in cases {
            let (status, body) = check(req).await;
            assert_eq!(status.as_u16(), want_status, "{body}");
            assert!(body.contains(want_body), "{body:?} lacks {want_body:?}");
        }
    }
}
