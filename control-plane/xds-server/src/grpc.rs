//! The gRPC plumbing of the ADS service without tonic's per-stream encode buffer.
//!
//! tonic's generated service encodes every response into a buffer owned by the stream, which
//! grows to the largest response the stream ever sent and stays that size: most of a large
//! mesh's controller memory. Here each response leaves as the chunks of its [`Frames`] (a
//! per-stream head and shared resource bytes), each its own HTTP/2 data frame, taken from the
//! stream's bounded queue. Requests are decoded by [`Requests`], which, unlike tonic's
//! `Streaming`, does not keep a buffer as large as the largest request (an EDS request naming
//! every cluster, tens of KB) for the stream's lifetime.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http_body::{Body as _, Frame};
use tokio::sync::mpsc;
use tonic::Status;
use tonic::body::Body;
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

/// Chunks below this size are joined into one data frame (a copy of at most this much): each
/// chunk is an HTTP/2 frame that hyper queues in the connection's send buffer, whose slots are
/// kept at the most ever queued, so a response of a thousand small entries would leave a
/// thousand slots behind. Larger chunks (a type's shared groups) go out as they are.
const COALESCE: usize = 8 << 10;

/// `first`, joined with the small chunks after it when it is small itself.
fn coalesce(first: Bytes, rest: &mut std::vec::IntoIter<Bytes>) -> Bytes {
    let small = |b: &Bytes| b.len() < COALESCE;
    if !small(&first) || !rest.as_slice().first().is_some_and(small) {
        return first;
    }
    let mut joined = BytesMut::with_capacity(COALESCE);
    joined.extend_from_slice(&first);
    while joined.len() < COALESCE
        && let Some(next) = rest.as_slice().first()
        && small(next)
    {
        joined.extend_from_slice(next);
        rest.next();
    }
    joined.freeze()
}

fn trailers(status: &Status) -> Frame<Bytes> {
    let mut headers = http::HeaderMap::new();
    if let Err(error) = status.add_header(&mut headers) {
        // Only a status whose details cannot be written as a header; its code still goes.
        fsm_errcode::warn!(
            fsm_errcode::ErrCode::E5006,
            %error,
            "cannot write a gRPC status trailer in full"
        );
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
                return Poll::Ready(Some(Ok(Frame::data(coalesce(chunk, &mut this.pending)))));
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
    pub incoming: Requests<T>,
}

/// Length of the gRPC message prefix: a compression flag and a big-endian `u32` length.
const PREFIX: usize = 5;

/// The request messages of a call.
pub(crate) struct Requests<T> {
    body: Body,
    /// The last chunk received while nothing else was waiting: a message that lies whole in it
    /// (most requests do) is decoded from it, without a copy.
    chunk: Bytes,
    /// Bytes of a message that spans chunks, gathered in a buffer of the message's size; empty
    /// (no allocation) between such messages.
    buf: BytesMut,
    max_message_size: usize,
    ended: bool,
    message: std::marker::PhantomData<fn() -> T>,
}

/// A request message read from the bytes of one gRPC message.
pub(crate) trait Decode: Sized {
    fn decode_message(message: Bytes) -> Result<Self, Status>;
}

/// [`Decode`] for a message prost decodes whole; `bytes` fields are slices of `message`.
pub(crate) fn prost_decode<T: prost::Message + Default>(message: Bytes) -> Result<T, Status> {
    T::decode(message).map_err(|error| Status::internal(error.to_string()))
}

impl Decode for envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest {
    fn decode_message(message: Bytes) -> Result<Self, Status> {
        prost_decode(message)
    }
}

impl<T: Decode> Requests<T> {
    pub(crate) fn new(body: Body, max_message_size: usize) -> Self {
        Requests {
            body,
            chunk: Bytes::new(),
            buf: BytesMut::new(),
            max_message_size,
            ended: false,
            message: std::marker::PhantomData,
        }
    }

    /// The next message; `None` once the client half-closed the stream. Cancel-safe: what was
    /// received stays buffered.
    pub(crate) async fn message(&mut self) -> Result<Option<T>, Status> {
        loop {
            if let Some(message) = self.decode_buffered()? {
                return Ok(Some(message));
            }
            if self.ended {
                return if self.buf.is_empty() && self.chunk.is_empty() {
                    Ok(None)
                } else {
                    Err(Status::internal("Unexpected EOF decoding stream."))
                };
            }
            let frame = std::future::poll_fn(|cx| Pin::new(&mut self.body).poll_frame(cx)).await;
            match frame {
                // Trailers carry nothing for a request stream.
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        if self.buf.is_empty() && self.chunk.is_empty() {
                            self.chunk = data;
                        } else {
                            self.buf.extend_from_slice(&data);
                        }
                    }
                }
                Some(Err(status)) => return Err(status),
                None => self.ended = true,
            }
        }
    }

    fn decode_buffered(&mut self) -> Result<Option<T>, Status> {
        if self.buf.is_empty() {
            if self.chunk.is_empty() {
                return Ok(None);
            }
            match self.message_len(&self.chunk)? {
                Some(total) if total <= self.chunk.len() => {
                    let mut message = self.chunk.split_to(total);
                    message.advance(PREFIX);
                    return T::decode_message(message).map(Some);
                }
                // The message goes on in later chunks.
                total => {
                    self.buf.reserve(total.unwrap_or(self.chunk.len()));
                    self.buf.extend_from_slice(&self.chunk);
                    self.chunk = Bytes::new();
                    return Ok(None);
                }
            }
        }
        let Some(total) = self.message_len(&self.buf)? else {
            return Ok(None);
        };
        if self.buf.len() < total {
            self.buf.reserve(total - self.buf.len());
            return Ok(None);
        }
        // Decoded from shared bytes: `bytes` fields are slices of the message, not copies.
        let mut message = self.buf.split_to(total).freeze();
        message.advance(PREFIX);
        let message = T::decode_message(message)?;
        if self.buf.is_empty() {
            // Requests are rare (subscription changes, ACKs): free the buffer between them.
            self.buf = BytesMut::new();
        }
        Ok(Some(message))
    }

    /// The length, prefix included, of the message `received` starts with, once its prefix is
    /// there.
    fn message_len(&self, received: &[u8]) -> Result<Option<usize>, Status> {
        let Some(prefix) = received.get(..PREFIX) else {
            return Ok(None);
        };
        if prefix[0] != 0 {
            return Err(Status::internal(
                "protocol error: received message with compressed-flag but no grpc-encoding was specified",
            ));
        }
        let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
        if len > self.max_message_size {
            return Err(Status::out_of_range(format!(
                "Error, decoded message length too large: found {len} bytes, the limit is: {} bytes",
                self.max_message_size
            )));
        }
        Ok(Some(PREFIX + len))
    }
}

/// Decodes a bidirectional call's request stream, refusing compressed requests (no ADS client
/// compresses them, and none was negotiated).
pub(crate) fn accept<T>(
    request: http::Request<Body>,
    max_message_size: usize,
) -> Result<Call<T>, Status>
where
    T: Decode + Send + 'static,
{
    let (parts, body) = request.into_parts();
    if let Some(encoding) = parts.headers.get("grpc-encoding")
        && encoding.as_bytes() != b"identity"
    {
        return Err(Status::unimplemented(format!(
            "request compressed with {encoding:?}, which this server does not accept"
        )));
    }
    let incoming = Requests::new(body, max_message_size);
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

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
    use prost::Message;
    use tonic::Code;

    use super::*;

    impl Decode for DiscoveryRequest {
        fn decode_message(message: Bytes) -> Result<Self, Status> {
            prost_decode(message)
        }
    }

    /// A request body arriving in the given chunks.
    struct Chunks(VecDeque<Bytes>);

    impl http_body::Body for Chunks {
        type Data = Bytes;
        type Error = Status;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
            Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
        }
    }

    fn framed(message: &DiscoveryRequest) -> Vec<u8> {
        let mut out = vec![0];
        out.extend((message.encoded_len() as u32).to_be_bytes());
        out.extend(message.encode_to_vec());
        out
    }

    fn requests(bytes: &[u8], chunk: usize, max: usize) -> Requests<DiscoveryRequest> {
        let chunks = bytes.chunks(chunk).map(Bytes::copy_from_slice).collect();
        Requests::new(Body::new(Chunks(chunks)), max)
    }

    fn request(names: usize) -> DiscoveryRequest {
        DiscoveryRequest {
            type_url: crate::protocol::ENDPOINT.into(),
            resource_names: (0..names).map(|i| format!("ns/svc-{i}|80")).collect(),
            ..DiscoveryRequest::default()
        }
    }

    #[tokio::test]
    async fn messages_split_anyhow_decode_and_free_their_buffer() {
        let (a, b) = (request(1000), request(1));
        let bytes = [framed(&a), framed(&b)].concat();
        for chunk in [1, 7, 4096, bytes.len()] {
            let mut incoming = requests(&bytes, chunk, 1 << 20);
            assert_eq!(incoming.message().await.expect("decodes"), Some(a.clone()));
            assert_eq!(incoming.message().await.expect("decodes"), Some(b.clone()));
            assert_eq!(
                incoming.buf.capacity(),
                0,
                "nothing kept once a request is decoded"
            );
            assert!(incoming.chunk.is_empty(), "no chunk kept once decoded");
            assert_eq!(incoming.message().await.expect("ends"), None);
        }
    }

    #[test]
    fn small_chunks_are_joined_and_large_ones_pass_untouched() {
        let large = Bytes::from(vec![1u8; COALESCE]);
        let chunks: Vec<Bytes> = std::iter::once(Bytes::from_static(b"head"))
            .chain(std::iter::repeat_n(Bytes::from_static(b"entry"), 3000))
            .chain([large.clone(), Bytes::from_static(b"tail")])
            .collect();
        let expected: Vec<u8> = chunks.iter().flat_map(|b| b.to_vec()).collect();
        let mut rest = chunks.into_iter();
        let mut out = Vec::new();
        while let Some(first) = rest.next() {
            out.push(coalesce(first, &mut rest));
        }
        assert_eq!(
            out.iter().flat_map(|b| b.to_vec()).collect::<Vec<_>>(),
            expected
        );
        assert!(out.len() <= 5, "{} frames", out.len());
        assert!(
            out.iter().any(|b| b.as_ptr() == large.as_ptr()),
            "a large chunk is not copied"
        );
    }

    /// A message's bytes, undecoded.
    struct Raw(Bytes);

    impl Decode for Raw {
        fn decode_message(message: Bytes) -> Result<Self, Status> {
            Ok(Raw(message))
        }
    }

    /// Messages that lie whole in one chunk are its bytes; one that spans chunks is gathered in
    /// a buffer of its own size, allocated once.
    #[tokio::test]
    async fn a_message_within_a_chunk_is_not_copied() {
        let (a, b, c) = (request(2), request(3), request(1000));
        let whole = Bytes::from([framed(&a), framed(&b)].concat());
        let spanning = framed(&c);
        let (first, second) = spanning.split_at(spanning.len() / 2);
        let chunks = VecDeque::from([
            whole.clone(),
            Bytes::copy_from_slice(first),
            Bytes::copy_from_slice(second),
        ]);
        let mut incoming: Requests<Raw> = Requests::new(Body::new(Chunks(chunks)), 1 << 20);
        let within = |bytes: &Bytes| {
            let range = whole.as_ptr_range();
            range.contains(&bytes.as_ptr())
        };
        let Some(Raw(first)) = incoming.message().await.expect("decodes") else {
            panic!("no first message");
        };
        assert!(
            within(&first) && first == a.encode_to_vec(),
            "first message copied"
        );
        let Some(Raw(second)) = incoming.message().await.expect("decodes") else {
            panic!("no second message");
        };
        assert!(
            within(&second) && second == b.encode_to_vec(),
            "second message copied"
        );
        let Some(Raw(third)) = incoming.message().await.expect("decodes") else {
            panic!("no third message");
        };
        assert_eq!(third, c.encode_to_vec());
        assert!(incoming.message().await.expect("ends").is_none());
    }

    #[tokio::test]
    async fn oversized_and_truncated_messages_are_errors() {
        let bytes = framed(&request(100));
        let error = requests(&bytes, 100, 64)
            .message()
            .await
            .expect_err("too large");
        assert_eq!(error.code(), Code::OutOfRange);
        let error = requests(&bytes[..bytes.len() - 1], 100, 1 << 20)
            .message()
            .await
            .expect_err("truncated");
        assert_eq!(error.code(), Code::Internal);
    }
}
