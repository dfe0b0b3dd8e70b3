//! What the ADS server's integration tests share: the server on a loopback port and an
//! Envoy-like SotW stream. Each test binary compiles this module and uses part of it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use fsm_cache::SnapshotCache;
use fsm_xds_server::{AdsServer, ProxyEvent};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::Streaming;
use tonic::transport::Channel;

/// Serves `cache` over plaintext gRPC on a loopback port; returns the address and the server's
/// proxy events.
pub async fn serve(cache: Arc<SnapshotCache>) -> (SocketAddr, mpsc::UnboundedReceiver<ProxyEvent>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    let (events_tx, events) = mpsc::unbounded_channel();
    tokio::spawn(fsm_xds_server::listen::serve(
        AdsServer::new(cache, events_tx).into_service(),
        TcpListenerStream::new(listener),
    ));
    (address, events)
}

/// A client on its own connection to `address`, as every Envoy has.
pub async fn client(address: SocketAddr) -> AggregatedDiscoveryServiceClient<Channel> {
    AggregatedDiscoveryServiceClient::connect(format!("http://{address}"))
        .await
        .expect("connect")
}

/// A sidecar's node as Envoy sends it: `<uuid>.sidecar.bookbuyer.bookstore.cluster.local`.
pub fn sidecar_node(uuid: &str, user_agent: &str) -> Node {
    Node {
        id: format!("{uuid}.sidecar.bookbuyer.bookstore.cluster.local"),
        user_agent_name: user_agent.into(),
        ..Node::default()
    }
}

/// Opens a SotW stream as `node` whose first request asks for `type_url`.
pub async fn open_sotw(
    client: &mut AggregatedDiscoveryServiceClient<Channel>,
    node: Node,
    type_url: &str,
) -> (mpsc::Sender<DiscoveryRequest>, Streaming<DiscoveryResponse>) {
    let (requests, rx) = mpsc::channel(4);
    requests
        .send(DiscoveryRequest {
            node: Some(node),
            type_url: type_url.into(),
            ..DiscoveryRequest::default()
        })
        .await
        .expect("queue");
    let responses = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .expect("stream")
        .into_inner();
    (requests, responses)
}

/// ACKs `response` of `type_url` on a stream opened with [`open_sotw`], as Envoy does.
pub async fn ack_sotw(
    requests: &mpsc::Sender<DiscoveryRequest>,
    type_url: &str,
    response: &DiscoveryResponse,
) {
    requests
        .send(DiscoveryRequest {
            type_url: type_url.into(),
            version_info: response.version_info.clone(),
            response_nonce: response.nonce.clone(),
            ..DiscoveryRequest::default()
        })
        .await
        .expect("queue the ACK");
}
