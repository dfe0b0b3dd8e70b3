//! The ADS server's metrics over real sockets: the connection limit (MeshConfig
//! `maxDataPlaneConnections`) refuses and counts, a proxy's series go with its last stream, and a
//! change stamped by the controller is measured until the proxy ACKs it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use fsm_cache::{ProxyKey, Resource, Snapshot, SnapshotCache};
use fsm_xds_server::metrics::metrics;
use fsm_xds_server::protocol::{CLUSTER, LISTENER};
use fsm_xds_server::{AdsServer, ConnectionLimit, ProxyEvent, ProxyKind};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Code, Status, Streaming};

mod support;

const TIMEOUT: Duration = Duration::from_secs(10);

fn key(uuid: &str) -> ProxyKey {
    ProxyKey::new(uuid, ProxyKind::Sidecar, "bookbuyer", "bookstore")
}

fn snapshot(body: &'static str) -> Snapshot {
    Snapshot::new([(CLUSTER, vec![Resource::new("c1", body.as_bytes())])])
}

async fn serve(
    cache: Arc<SnapshotCache>,
    limit: ConnectionLimit,
) -> (
    std::net::SocketAddr,
    AdsServer,
    mpsc::UnboundedReceiver<ProxyEvent>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    let (events_tx, events) = mpsc::unbounded_channel();
    let server = AdsServer::new(cache, events_tx).with_connection_limit(limit);
    tokio::spawn(fsm_xds_server::listen::serve(
        server.clone().into_service(),
        TcpListenerStream::new(listener),
    ));
    (address, server, events)
}

async fn next(responses: &mut Streaming<DiscoveryResponse>) -> Result<DiscoveryResponse, Status> {
    tokio::time::timeout(TIMEOUT, responses.message())
        .await
        .expect("an answer in time")
        .and_then(|m| m.ok_or_else(|| Status::unknown("stream ended")))
}

async fn connected(events: &mut mpsc::UnboundedReceiver<ProxyEvent>) {
    let event = tokio::time::timeout(TIMEOUT, events.recv())
        .await
        .expect("an event in time")
        .expect("server alive");
    assert!(matches!(event, ProxyEvent::Connected { .. }), "{event:?}");
}

async fn eventually(what: &str, check: impl Fn() -> bool) {
    for _ in 0..500 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Series of `fsm_proxy_*` labelled with `uuid`.
fn series_of(uuid: &str) -> usize {
    prometheus::gather()
        .iter()
        .flat_map(|f| f.get_metric())
        .filter(|m| {
            m.get_label()
                .iter()
                .any(|l| l.name() == "proxy_uuid" && l.value() == uuid)
        })
        .count()
}

#[tokio::test]
async fn streams_beyond_the_limit_are_refused_and_counted_and_the_limit_follows_changes() {
    let cache = Arc::new(SnapshotCache::new());
    let limit = ConnectionLimit::default();
    limit.set(1);
    let (address, server, mut events) = serve(cache.clone(), limit.clone()).await;
    let uuid_a = "5b7e1c1e-0000-4000-8000-00000000000a";
    let uuid_b = "5b7e1c1e-0000-4000-8000-00000000000b";

    let mut client = support::client(address).await;
    let (first_requests, mut first) =
        support::open_sotw(&mut client, support::sidecar_node(uuid_a, "envoy"), CLUSTER).await;
    connected(&mut events).await;
    assert_eq!(server.open_streams(), 1);

    let rejected = metrics().proxy_max_connections_rejected.get();
    let mut other = support::client(address).await;
    let refused = other
        .stream_aggregated_resources(tokio_stream::iter(Vec::<DiscoveryRequest>::new()))
        .await
        .map(|_| ())
        .expect_err("a second stream is one too many");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(
        refused.message().contains("maxDataPlaneConnections")
            && refused.message().contains("at most 1"),
        "{}",
        refused.message()
    );
    assert_eq!(metrics().proxy_max_connections_rejected.get(), rejected + 1);

    // MeshConfig raised the limit: the next stream is served.
    limit.set(2);
    let (_requests, _second) =
        support::open_sotw(&mut other, support::sidecar_node(uuid_b, "envoy"), CLUSTER).await;
    connected(&mut events).await;
    assert_eq!(server.open_streams(), 2);

    // 0 is no limit; a stream that ends gives its place back.
    limit.set(0);
    drop(first_requests);
    let _ = next(&mut first).await;
    eventually("the first stream's place back", || {
        server.open_streams() == 1
    })
    .await;
}

#[tokio::test]
async fn a_proxys_series_vanish_with_its_last_stream_and_a_change_is_measured_until_acked() {
    let cache = Arc::new(SnapshotCache::new());
    let (address, server, mut events) = serve(cache.clone(), ConnectionLimit::default()).await;
    let uuid = "5b7e1c1e-0000-4000-8000-0000000000c1";
    let mut client = support::client(address).await;
    let (requests, mut responses) =
        support::open_sotw(&mut client, support::sidecar_node(uuid, "envoy"), CLUSTER).await;
    connected(&mut events).await;
    assert!(cache.set(&key(uuid), snapshot("one")));
    let first = next(&mut responses).await.expect("CDS");
    support::ack_sotw(&requests, CLUSTER, &first).await;

    let histogram = metrics().convergence(CLUSTER);
    let (before, sum_before) = (histogram.get_sample_count(), histogram.get_sample_sum());
    let observed = Instant::now() - Duration::from_millis(250);
    assert!(cache.set_observed(&key(uuid), snapshot("two"), Some(observed)));
    let second = next(&mut responses).await.expect("updated CDS");
    support::ack_sotw(&requests, CLUSTER, &second).await;
    eventually("the convergence of the change", || {
        histogram.get_sample_count() == before + 1
    })
    .await;
    assert!(
        histogram.get_sample_sum() - sum_before >= 0.25,
        "measured from when the change was observed: {}",
        histogram.get_sample_sum() - sum_before
    );
    assert!(series_of(uuid) >= 2, "request and response series");
    assert_eq!(server.proxies_with_series(), 1);

    drop(requests);
    eventually("the proxy's series to go", || {
        series_of(uuid) == 0 && server.proxies_with_series() == 0
    })
    .await;
}

/// A response that cannot be sent (over the 64 MiB gRPC limit, as Envoy would refuse it; or to a
/// proxy already gone) counts in `fsm_proxy_response_send_error_count` under the proxy's labels.
/// The proxy keeps a second stream open so its series outlive the failed one, as they do while
/// any stream of the proxy is open.
#[tokio::test]
async fn a_response_that_cannot_be_sent_is_counted_as_a_send_error() {
    let cache = Arc::new(SnapshotCache::new());
    let (address, _server, mut events) = serve(cache.clone(), ConnectionLimit::default()).await;
    let uuid = "5b7e1c1e-0000-4000-8000-0000000000e1";
    let errors = || {
        metrics()
            .proxy_response_send_error_count
            .with_label_values(&[uuid, "bookbuyer.bookstore", "CDS"])
            .get()
    };
    let mut client = support::client(address).await;
    let (_keep, _listeners) =
        support::open_sotw(&mut client, support::sidecar_node(uuid, "envoy"), LISTENER).await;
    connected(&mut events).await;
    let huge = Resource::new("huge", vec![b'x'; (64 << 20) + 1]);
    assert!(cache.set(&key(uuid), Snapshot::new([(CLUSTER, vec![huge])])));
    let before = errors();
    let mut other = support::client(address).await;
    let (_requests, mut clusters) =
        support::open_sotw(&mut other, support::sidecar_node(uuid, "envoy"), CLUSTER).await;
    let refused = next(&mut clusters)
        .await
        .expect_err("a response over the limit");
    assert_eq!(refused.code(), Code::OutOfRange, "{refused:?}");
    assert!(
        refused.message().contains("too large"),
        "{}",
        refused.message()
    );
    assert_eq!(errors(), before + 1);
}
