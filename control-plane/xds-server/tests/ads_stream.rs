//! The ADS server over real sockets, driven by the generated Envoy client.

use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use fsm_cache::{ProxyKey, Resource, Snapshot, SnapshotCache};
use fsm_xds_server::protocol::{CLUSTER, LISTENER};
use fsm_xds_server::{AdsServer, ProxyEvent};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};

const UUID: &str = "0f9e3a52-2d4b-4c64-9a39-0c6f6fd1b6a5";
const TIMEOUT: Duration = Duration::from_secs(10);

fn node(id: &str) -> Option<Node> {
    Some(Node {
        id: id.into(),
        user_agent_name: "envoy".into(),
        ..Node::default()
    })
}

fn node_id() -> String {
    format!("{UUID}.sidecar.bookbuyer.bookstore.cluster.local")
}

fn key() -> ProxyKey {
    ProxyKey(UUID.into())
}

fn snapshot(clusters: &[(&str, &'static str)]) -> Snapshot {
    let clusters = clusters
        .iter()
        .map(|(name, body)| Resource::new(*name, body.as_bytes()))
        .collect();
    Snapshot::new([
        (CLUSTER, clusters),
        (LISTENER, vec![Resource::new("l", &b"listener"[..])]),
    ])
}

async fn start(
    cache: Arc<SnapshotCache>,
) -> (
    AggregatedDiscoveryServiceClient<Channel>,
    mpsc::UnboundedReceiver<ProxyEvent>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let (events_tx, events) = mpsc::unbounded_channel();
    let service = AdsServer::new(cache, events_tx).into_service();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let client = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    (client, events)
}

async fn next<T>(responses: &mut Streaming<T>) -> Result<T, Status> {
    tokio::time::timeout(TIMEOUT, responses.message())
        .await
        .expect("a response in time")
        .and_then(|m| m.ok_or_else(|| Status::unknown("stream ended")))
}

async fn next_event(events: &mut mpsc::UnboundedReceiver<ProxyEvent>) -> ProxyEvent {
    tokio::time::timeout(TIMEOUT, events.recv())
        .await
        .expect("an event in time")
        .expect("server alive")
}

/// Waits until the cache reports what the stream recorded (the server records after sending).
async fn eventually(what: &str, check: impl Fn() -> bool) {
    for _ in 0..200 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn sotw_request_ack_and_update() {
    let cache = Arc::new(SnapshotCache::new());
    let v1 = snapshot(&[("c1", "one"), ("c2", "two")]);
    let v1_version = v1.get(CLUSTER).expect("cds").version().clone();
    cache.set(&key(), v1);
    let (mut client, mut events) = start(cache.clone()).await;

    let (requests, rx) = mpsc::channel(4);
    requests
        .send(DiscoveryRequest {
            node: node(&node_id()),
            type_url: CLUSTER.into(),
            ..DiscoveryRequest::default()
        })
        .await
        .expect("queue");
    let mut responses = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .expect("stream")
        .into_inner();

    let first: DiscoveryResponse = next(&mut responses).await.expect("CDS");
    assert_eq!(first.type_url, CLUSTER);
    assert_eq!(first.version_info, *v1_version);
    let bodies: Vec<(&str, &[u8])> = first
        .resources
        .iter()
        .map(|a| (a.type_url.as_str(), a.value.as_slice()))
        .collect();
    assert_eq!(
        bodies,
        vec![(CLUSTER, &b"one"[..]), (CLUSTER, &b"two"[..])],
        "bodies go out untouched"
    );
    match next_event(&mut events).await {
        ProxyEvent::Connected(proxy) => {
            assert_eq!(proxy.key(), key());
            assert_eq!(proxy.identity(), "bookbuyer.bookstore");
        }
        other => panic!("expected Connected, got {other:?}"),
    }

    requests
        .send(DiscoveryRequest {
            type_url: CLUSTER.into(),
            version_info: first.version_info.clone(),
            response_nonce: first.nonce.clone(),
            ..DiscoveryRequest::default()
        })
        .await
        .expect("queue");
    eventually("the ACK", || {
        cache
            .status()
            .get(&key())
            .and_then(|s| s.types.get(CLUSTER)?.acked_version.clone())
            == Some(v1_version.clone())
    })
    .await;

    let v2 = snapshot(&[("c1", "one"), ("c2", "two, changed")]);
    let v2_version = v2.get(CLUSTER).expect("cds").version().clone();
    assert!(cache.set(&key(), v2));
    let second = next(&mut responses).await.expect("updated CDS");
    assert_eq!(second.version_info, *v2_version);
    assert_ne!(second.nonce, first.nonce);
    assert_eq!(
        second.resources.len(),
        2,
        "state of the world sends every cluster"
    );
    eventually("the Sent record", || {
        cache
            .status()
            .get(&key())
            .and_then(|s| s.types.get(CLUSTER)?.sent_version.clone())
            == Some(v2_version.clone())
    })
    .await;

    drop(requests);
    assert_eq!(
        next_event(&mut events).await,
        ProxyEvent::Disconnected(key())
    );
    eventually("the proxy to be forgotten", || cache.connected().is_empty()).await;
}

#[tokio::test]
async fn delta_request_ack_and_update() {
    let cache = Arc::new(SnapshotCache::new());
    cache.set(&key(), snapshot(&[("c1", "one"), ("c2", "two")]));
    let (mut client, mut events) = start(cache.clone()).await;

    let (requests, rx) = mpsc::channel(4);
    requests
        .send(DeltaDiscoveryRequest {
            node: node(&node_id()),
            type_url: CLUSTER.into(),
            ..DeltaDiscoveryRequest::default()
        })
        .await
        .expect("queue");
    let mut responses = client
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await
        .expect("stream")
        .into_inner();

    let first: DeltaDiscoveryResponse = next(&mut responses).await.expect("CDS");
    assert_eq!(first.type_url, CLUSTER);
    let names: Vec<&str> = first.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["c1", "c2"]);
    let c1 = &first.resources[0];
    assert_eq!(c1.version, *Resource::new("c1", &b"one"[..]).version);
    assert_eq!(
        c1.resource.as_ref().map(|a| a.value.as_slice()),
        Some(&b"one"[..])
    );
    assert!(matches!(
        next_event(&mut events).await,
        ProxyEvent::Connected(_)
    ));

    requests
        .send(DeltaDiscoveryRequest {
            type_url: CLUSTER.into(),
            response_nonce: first.nonce.clone(),
            ..DeltaDiscoveryRequest::default()
        })
        .await
        .expect("queue");
    let system_version = first.system_version_info.clone();
    eventually("the ACK", || {
        cache.status().get(&key()).and_then(|s| {
            s.types
                .get(CLUSTER)?
                .acked_version
                .as_deref()
                .map(str::to_owned)
        }) == Some(system_version.clone())
    })
    .await;

    cache.set(&key(), snapshot(&[("c1", "one, changed"), ("c3", "three")]));
    let second = next(&mut responses).await.expect("delta");
    let names: Vec<&str> = second.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["c1", "c3"], "only what changed");
    assert_eq!(second.removed_resources, ["c2"]);
    assert_ne!(second.nonce, first.nonce);
}

#[tokio::test]
async fn malformed_node_id_is_refused_with_e5001() {
    let cache = Arc::new(SnapshotCache::new());
    let (mut client, mut events) = start(cache.clone()).await;
    let (requests, rx) = mpsc::channel(4);
    requests
        .send(DiscoveryRequest {
            node: node("not-a-uuid.sidecar.bookbuyer.bookstore"),
            type_url: CLUSTER.into(),
            ..DiscoveryRequest::default()
        })
        .await
        .expect("queue");
    let status = match client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
    {
        Err(status) => status,
        Ok(response) => next(&mut response.into_inner())
            .await
            .expect_err("the stream is refused"),
    };
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("E5001"), "{}", status.message());
    assert!(
        status.message().contains("not-a-uuid"),
        "names the bad part: {}",
        status.message()
    );
    assert!(cache.connected().is_empty());
    assert!(
        events.try_recv().is_err(),
        "no Connected event for a refused proxy"
    );
}

#[tokio::test]
async fn missing_node_is_refused_with_e5001() {
    let cache = Arc::new(SnapshotCache::new());
    let (mut client, _events) = start(cache).await;
    let (requests, rx) = mpsc::channel(4);
    requests
        .send(DeltaDiscoveryRequest {
            type_url: CLUSTER.into(),
            ..DeltaDiscoveryRequest::default()
        })
        .await
        .expect("queue");
    let status = match client
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await
    {
        Err(status) => status,
        Ok(response) => next(&mut response.into_inner())
            .await
            .expect_err("the stream is refused"),
    };
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("E5001"), "{}", status.message());
}
