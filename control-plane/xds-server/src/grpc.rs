//! The gRPC plumbing of the ADS service without tonic's per-stream encode buffer.
//!
//! tonic's generated service encodes every response into a buffer owned by the stream, which
//! grows to the largest response the stream ever sent and stays that size: most of a large
//! mesh's controller memory. Here each response leaves as the chunks of its [`Frames`] (a
//! per-stream head and shared resource bytes), each its own HTTP/2 data frame, taken from the
//! stream's bounded queue; requests are still decoded by tonic ([`Streaming`]).

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::Frame;
use tokio::sync::mpsc;
use tonic::Status;
use tonic::body::Body;
use tonic::codec::Codec;
use tonic::metadata::MetadataMap;

use crate::frame::Frames;

/// What a stream's task hands its response body.
#[derive(Debug)]
pub(crate) enum Outgoing {
    Message(Frames),
    /// Ends the stream with this status (its message percent-encoded into `grpc-message`).
    Error(Status),
}

/// The response body of one stream: the chunks of each queued message, then the gRPC status
/// in the trailers (OK when the stream's task ended without an error).
pub(crate) struct ResponseBody {
    rx: mpsc::Receiver<Outgoing>,
    /// The chunks of the message being written.
    pending: std::vec::IntoIter<Bytes>,
    done: bool,
}

impl ResponseBody {
    pub(crate) fn new(rx: mpsc::Receiver<Outgoing>) -> Self {
        ResponseBody {
            rx,
            pending: Vec::new().into_iter(),
            done: false,
        }
    }
}

fn trailers(status: &Status) -> Frame<Bytes> {
    let mut headers = http::HeaderMap::new();
    if let Err(error) = status.add_header(&mut headers) {
        // Only a status whose details cannot be written as a header; its code still goes.
        tracing::warn!(%error, "cannot write a gRPC status trailer in full");
        headers.clear();
        let _ = Status::new(status.code(), "").add_header(&mut headers);
    }
    Frame::trailers(headers)
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = &mut *self;
        loop {
            if let Some(chunk) = this.pending.next() {
                return Poll::Ready(Some(Ok(Frame::data(chunk))));
            }
            if this.done {
                return Poll::Ready(None);
            }
            match std::task::ready!(this.rx.poll_recv(cx)) {
                Some(Outgoing::Message(frames)) => {
                    this.pending = frames.into_chunks().collect::<Vec<_>>().into_iter();
                }
                Some(Outgoing::Error(status)) => {
                    this.done = true;
                    this.rx.close();
                    return Poll::Ready(Some(Ok(trailers(&status))));
                }
                None => {
                    this.done = true;
                    return Poll::Ready(Some(Ok(trailers(&Status::ok("")))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.pending.len() == 0
    }
}

/// The parts of an incoming gRPC call a handler needs.
pub(crate) struct Call<T> {
    /// Headers and connection info (client certificates, remote address), as tonic's
    /// `Request::peer_certs` reads them.
    pub request: tonic::Request<()>,
    pub incoming: tonic::codec::Streaming<T>,
}

/// Decodes a bidirectional call's request stream, refusing compressed requests (no ADS client
/// compresses them, and none was negotiated).
pub(crate) fn accept<T>(
    request: http::Request<Body>,
    max_message_size: usize,
) -> Result<Call<T>, Status>
where
    T: prost::Message + Default + Send + 'static,
{
    let (parts, body) = request.into_parts();
    if let Some(encoding) = parts.headers.get("grpc-encoding")
        && encoding.as_bytes() != b"identity"
    {
        return Err(Status::unimplemented(format!(
            "request compressed with {encoding:?}, which this server does not accept"
        )));
    }
    let mut codec = tonic_prost::ProstCodec::<(), T>::default();
    let incoming =
        tonic::codec::Streaming::new_request(codec.decoder(), body, None, Some(max_message_size));
    let request = tonic::Request::from_parts(
        MetadataMap::from_headers(parts.headers),
        parts.extensions,
        (),
    );
    Ok(Call { request, incoming })
}

/// The HTTP response of a call: its body, or a refusal in trailers-only form.
pub(crate) fn respond(result: Result<ResponseBody, Status>) -> http::Response<Body> {
    match result {
        Ok(body) => {
            let mut response = http::Response::new(Body::new(body));
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/grpc"),
            );
            response
        }
        Err(status) => status.into_http(),
    }
}

/// The fully qualified gRPC service name of ADS.
pub(crate) const ADS: &str = "envoy.service.discovery.v3.AggregatedDiscoveryService";
