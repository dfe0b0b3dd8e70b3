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
use fsm_xds_server::{AdsServer, ProxyEvent, ProxyKind};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};

mod support;

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
    support::sidecar_node(UUID, "envoy").id
}

fn key() -> ProxyKey {
    ProxyKey::new(UUID, ProxyKind::Sidecar, "bookbuyer", "bookstore")
}

/// Waits for the stream's `Connected` event, as the controller does before it publishes.
async fn connected(events: &mut mpsc::UnboundedReceiver<ProxyEvent>) -> ProxyEvent {
    let event = next_event(events).await;
    assert!(
        matches!(event, ProxyEvent::Connected { .. }),
        "expected Connected, got {event:?}"
    );
    event
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
    let (address, events) = support::serve(cache).await;
    (support::client(address).await, events)
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
    match connected(&mut events).await {
        ProxyEvent::Connected {
            node, data_plane, ..
        } => {
            assert_eq!(node.key(), key());
            assert_eq!(node.identity.service_identity(), "bookbuyer.bookstore");
            assert_eq!(data_plane, fsm_xds_server::DataPlane::Envoy);
        }
        other => panic!("expected Connected, got {other:?}"),
    }
    assert!(cache.set(&key(), v1));

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
    support::ack_sotw(&requests, CLUSTER, &first).await;
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
    assert!(matches!(
        next_event(&mut events).await,
        ProxyEvent::Disconnected { proxy, .. } if proxy == key()
    ));
    eventually("the proxy to be forgotten", || cache.connected().is_empty()).await;
}

#[tokio::test]
async fn delta_request_ack_and_update() {
    let cache = Arc::new(SnapshotCache::new());
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
    connected(&mut events).await;
    cache.set(&key(), snapshot(&[("c1", "one"), ("c2", "two")]));

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

/// Opens a SotW stream whose first request asks for `type_url`, as `user_agent`.
async fn open_sotw(
    client: &mut AggregatedDiscoveryServiceClient<Channel>,
    type_url: &str,
    user_agent: &str,
) -> (mpsc::Sender<DiscoveryRequest>, Streaming<DiscoveryResponse>) {
    support::open_sotw(client, support::sidecar_node(UUID, user_agent), type_url).await
}

#[tokio::test]
async fn nothing_is_sent_before_the_proxy_is_matched_and_a_refusal_closes_the_stream() {
    let cache = Arc::new(SnapshotCache::new());
    let (mut client, mut events) = start(cache.clone()).await;
    let (_requests, mut responses) = open_sotw(&mut client, CLUSTER, "envoy").await;
    connected(&mut events).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(300), responses.message())
            .await
            .is_err(),
        "no response while the controller has not matched the proxy to its pod"
    );
    assert!(cache.refuse(&key(), "E5004: pod demo/evil does not own the proxy UUID"));
    let status = next(&mut responses).await.expect_err("closed");
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status.message().starts_with("E5004"),
        "{}",
        status.message()
    );
    assert!(matches!(
        next_event(&mut events).await,
        ProxyEvent::Disconnected { .. }
    ));
    eventually("the proxy to be forgotten", || cache.connected().is_empty()).await;
}

#[tokio::test]
async fn each_stream_is_served_by_its_own_requests() {
    const NATIVE: &str = "type.googleapis.com/fsm.dataplane.v1.Cluster";
    const NATIVE_TYPES: &[&str] = &[NATIVE];
    let cache = Arc::new(SnapshotCache::new());
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let service = AdsServer::new(cache.clone(), events_tx)
        .with_type_urls(NATIVE_TYPES)
        .into_service();
    tokio::spawn(fsm_xds_server::listen::serve(
        service,
        TcpListenerStream::new(listener),
    ));
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");

    // A real Envoy, then a generic xDS client with no user agent asking for Envoy's types, then
    // a client claiming to be fsm-sidecar but asking for native types: three streams, one proxy.
    let (_envoy_requests, mut envoy) = open_sotw(&mut client, CLUSTER, "envoy").await;
    let (generic_requests, mut generic) = open_sotw(&mut client, CLUSTER, "").await;
    let (_native_requests, mut native) = open_sotw(&mut client, NATIVE, "fsm-sidecar").await;
    let mut planes = Vec::new();
    for _ in 0..3 {
        if let ProxyEvent::Connected { data_plane, .. } = connected(&mut events).await {
            planes.push(data_plane);
        }
    }
    planes.sort();
    use fsm_xds_server::DataPlane;
    assert_eq!(
        planes,
        [DataPlane::Envoy, DataPlane::Envoy, DataPlane::FsmSidecar]
    );
    // Only the native data plane computed so far: the Envoy streams wait rather than read
    // the missing types as empty.
    assert!(cache.set(
        &key(),
        Snapshot::new([(NATIVE, vec![Resource::new("native-cluster", &b"n"[..])])])
    ));
    for responses in [&mut envoy, &mut generic] {
        assert!(
            tokio::time::timeout(Duration::from_millis(300), responses.message())
                .await
                .is_err(),
            "an Envoy stream was answered from a snapshot without Envoy resources"
        );
    }
    let union = Snapshot::new([
        (CLUSTER, vec![Resource::new("envoy-cluster", &b"e"[..])]),
        (NATIVE, vec![Resource::new("native-cluster", &b"n"[..])]),
    ]);
    assert!(cache.set(&key(), union));
    for responses in [&mut envoy, &mut generic] {
        let r = next(responses).await.expect("CDS");
        assert_eq!(r.type_url, CLUSTER);
        assert_eq!(r.resources[0].value, b"e");
    }
    let r = next(&mut native).await.expect("native clusters");
    assert_eq!(r.type_url, NATIVE);
    assert_eq!(r.resources[0].value, b"n");
    assert!(
        tokio::time::timeout(Duration::from_millis(200), native.message())
            .await
            .is_err(),
        "the native stream gets nothing new when Envoy's resources are added"
    );

    // The generic stream asks for a native type: outside its data plane, not answered.
    generic_requests
        .send(DiscoveryRequest {
            type_url: NATIVE.into(),
            ..DiscoveryRequest::default()
        })
        .await
        .expect("queue");
    // The generic stream goes away: the others are untouched and keep receiving updates.
    drop(generic_requests);
    let gone = next(&mut generic).await;
    assert!(
        !matches!(&gone, Ok(r) if r.type_url == NATIVE),
        "a stream gets only its own data plane's types: {gone:?}"
    );
    let update = Snapshot::new([
        (CLUSTER, vec![Resource::new("envoy-cluster", &b"e2"[..])]),
        (NATIVE, vec![Resource::new("native-cluster", &b"n"[..])]),
    ]);
    assert!(cache.set(&key(), update));
    let r = next(&mut envoy)
        .await
        .expect("update after another stream left");
    assert_eq!(r.resources[0].value, b"e2");
}

/// The per-proxy counters of `uuid` in the default registry, as `name type value` lines.
fn proxy_series(uuid: &str) -> Vec<String> {
    let mut series = Vec::new();
    for family in prometheus::gather() {
        for metric in family.get_metric() {
            let labels = metric.get_label();
            if labels
                .iter()
                .any(|l| l.name() == "proxy_uuid" && l.value() == uuid)
            {
                let kind = labels
                    .iter()
                    .find(|l| l.name() == "type")
                    .map(|l| l.value());
                series.push(format!(
                    "{} {} {}",
                    family.name(),
                    kind.unwrap_or(""),
                    metric.get_counter().get_value()
                ));
            }
        }
    }
    series.sort();
    series
}

#[tokio::test]
async fn a_proxys_counters_are_kept_while_it_is_connected_and_then_removed() {
    // Its own proxy UUID: the registry is shared with the other tests of this binary.
    const OWN: &str = "5d0c3a4e-7c55-4c1e-8d0e-3f1f2b7a9c11";
    let cache = Arc::new(SnapshotCache::new());
    let (mut client, mut events) = start(cache.clone()).await;
    let (requests, mut responses) =
        support::open_sotw(&mut client, support::sidecar_node(OWN, "envoy"), CLUSTER).await;
    connected(&mut events).await;
    let own = ProxyKey::new(OWN, ProxyKind::Sidecar, "bookbuyer", "bookstore");
    assert!(cache.set(&own, snapshot(&[("c1", "one")])));
    let first: DiscoveryResponse = next(&mut responses).await.expect("CDS");
    support::ack_sotw(&requests, CLUSTER, &first).await;
    eventually("the ACK counted", || {
        proxy_series(OWN).contains(&"fsm_proxy_xds_request_count CDS 2".to_string())
    })
    .await;
    assert_eq!(
        proxy_series(OWN),
        [
            "fsm_proxy_response_send_success_count CDS 1",
            "fsm_proxy_xds_request_count CDS 2"
        ]
    );

    drop(requests);
    assert!(matches!(
        next_event(&mut events).await,
        ProxyEvent::Disconnected { proxy, .. } if proxy == own
    ));
    assert!(
        proxy_series(OWN).is_empty(),
        "a disconnected proxy's series stay: {:?}",
        proxy_series(OWN)
    );
}
