//! A proxy that stops reading holds a bounded share of the server's memory: h2 takes at most
//! `listen::SEND_BUFFER` of a stream's responses ahead of the socket (hyper's default is 400
//! KiB), however large the proxy's flow-control window (Envoy's is 256 MiB).

use std::alloc::System;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use fsm_cache::{Flavor, Resource, Snapshot, SnapshotCache, TypeSnapshot};
use fsm_xds_server::listen::SEND_BUFFER;
use fsm_xds_server::protocol::CLUSTER;
use fsm_xds_server::{AdsServer, ProxyEvent};
use futures::StreamExt;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Endpoint;
use tonic::transport::server::{Connected, TcpConnectInfo};

mod support;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const UUID: &str = "00000000-0000-4000-8000-000000000001";

/// 4 MB of clusters of 7 KB each: small enough that the response body joins them into frames
/// (copies, which is what h2's buffer holds), large enough that the copies outweigh the
/// response's own bookkeeping.
const CLUSTERS: usize = 600;
const CLUSTER_BYTES: usize = 7000;

/// The server's side of a connection, whose writes stop once `stalled` is set: the socket of a
/// proxy that stopped reading, once the kernel's buffers are full.
struct Stalling {
    tcp: TcpStream,
    stalled: Arc<AtomicBool>,
}

impl Connected for Stalling {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.tcp.connect_info()
    }
}

impl AsyncRead for Stalling {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Stalling {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.stalled.load(Ordering::Relaxed) {
            return Poll::Pending;
        }
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.stalled.load(Ordering::Relaxed) {
            return Poll::Pending;
        }
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_stops_reading_holds_at_most_the_send_buffer() {
    let cache = Arc::new(SnapshotCache::new());
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let stalled = Arc::new(AtomicBool::new(false));
    let incoming = {
        let stalled = stalled.clone();
        TcpListenerStream::new(listener).map(move |tcp| {
            tcp.map(|tcp| Stalling {
                tcp,
                stalled: stalled.clone(),
            })
        })
    };
    tokio::spawn(fsm_xds_server::listen::serve(
        AdsServer::new(cache.clone(), events_tx).into_service(),
        incoming,
    ));
    // The proxy's clusters, in a set only it holds: sent as the resources' own entries. They
    // are encoded before counting (every stream would share them) and published, as the
    // controller does once the proxy connected, when the test says so.
    let clusters: Vec<Arc<Resource>> = (0..CLUSTERS)
        .map(|i| {
            let resource = Resource::new(format!("ns/svc-{i:04}|80"), vec![7u8; CLUSTER_BYTES]);
            resource.entry(Flavor::Sotw, CLUSTER);
            Arc::new(resource)
        })
        .collect();
    let (publish, published) = oneshot::channel::<()>();
    let publisher = {
        let cache = cache.clone();
        tokio::spawn(async move {
            let Some(ProxyEvent::Connected { node, .. }) = events.recv().await else {
                panic!("the proxy connects first");
            };
            published.await.expect("told to publish");
            let own = TypeSnapshot::from_shared(clusters.iter().cloned());
            cache.set(
                &node.key(),
                Snapshot::from_types([(CLUSTER, Arc::new(own))]),
            );
            // Keep the channel open.
            while events.recv().await.is_some() {}
        })
    };
    // Envoy's windows: flow control lets the server send as much as it likes.
    let channel = Endpoint::from_shared(format!("http://{address}"))
        .expect("endpoint")
        .initial_stream_window_size(1 << 30)
        .initial_connection_window_size(1 << 30)
        .connect()
        .await
        .expect("connect");
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    let node = support::sidecar_node(UUID, "envoy");
    let (_requests, _responses) = support::open_sotw(&mut client, node, CLUSTER).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    // The socket takes nothing more: what the server holds for the stream is its response and
    // what h2 takes of it.
    stalled.store(true, Ordering::Relaxed);
    let region = Region::new(GLOBAL);
    publish.send(()).expect("publisher waits");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stats = region.change();
    let live = stats.bytes_allocated as isize - stats.bytes_deallocated as isize;
    println!(
        "a stalled {} MB response holds {live} bytes (send buffer {SEND_BUFFER})",
        (CLUSTERS * CLUSTER_BYTES) >> 20
    );
    // The send buffer and the response's bookkeeping (about 170 KB); hyper's default send
    // buffer held 585 KB here.
    assert!(live < 256 << 10, "{live} bytes for one stalled stream");
    publisher.abort();
}
