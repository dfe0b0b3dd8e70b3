//! The ADS listener's HTTP/2 connections, served by hyper with the settings a control plane of
//! thousands of proxies needs.
//!
//! tonic's server cannot bound how much of a response h2 takes from a stream before the socket
//! has taken it: hyper's server default is 400 KiB per stream, so ten thousand proxies warming at
//! once could queue gigabytes, and every buffer the allocator handed out for that stays part of
//! the process. [`serve`] is the rest of what tonic's server did for the ADS service: HTTP/2
//! only, keep-alive pings, and the connection's peer certificates and addresses in each
//! request's extensions (where `tonic::Request::peer_certs` and `remote_addr` read them).

use std::fmt::Display;
use std::time::Duration;

use futures::{Stream, StreamExt};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tonic::codegen::Service;
use tonic::transport::server::Connected;

use crate::AdsService;

/// Bytes of responses h2 takes from one stream ahead of the socket. A response larger than
/// this is taken as the socket drains, so a stream's response costs this much buffered data,
/// not its size; 64 KiB keeps a loopback or LAN connection busy.
pub const SEND_BUFFER: usize = 64 << 10;

/// How often an idle connection is pinged (a proxy that stopped answering is dropped after
/// [`KEEPALIVE_TIMEOUT`]).
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Serves `service` on every connection `incoming` yields, each on its own task, until
/// `incoming` ends. An `Err` item (a connection that failed before it was yielded) is logged and
/// skipped; the listener goes on.
pub async fn serve<I, IO, E>(service: AdsService, incoming: I)
where
    I: Stream<Item = Result<IO, E>>,
    IO: Connected + AsyncRead + AsyncWrite + Unpin + Send + 'static,
    IO::ConnectInfo: Clone + Send + Sync + 'static,
    E: Display,
{
    let mut http = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http.timer(TokioTimer::new())
        .max_send_buf_size(SEND_BUFFER)
        .keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT);
    let mut incoming = std::pin::pin!(incoming);
    while let Some(io) = incoming.next().await {
        let io = match io {
            Ok(io) => io,
            Err(error) => {
                tracing::debug!(%error, "ADS connection not accepted");
                continue;
            }
        };
        let info = io.connect_info();
        let service = service.clone();
        let connection = http.serve_connection(
            TokioIo::new(io),
            hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
                let mut request = request.map(tonic::body::Body::new);
                request.extensions_mut().insert(info.clone());
                service.clone().call(request)
            }),
        );
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "ADS connection ended with an error");
            }
        });
    }
}
