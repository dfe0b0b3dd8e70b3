//! A proxy that stops reading its responses must not delay any other proxy: each stream writes
//! from its own bounded queue, and only its own task waits on it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use fsm_cache::{ProxyKey, Resource, Snapshot, SnapshotCache};
use fsm_xds_server::protocol::CLUSTER;
use fsm_xds_server::{ProxyEvent, ProxyKind};
use tokio::sync::mpsc;
use tonic::Streaming;

mod support;

const STUCK: &str = "5b1f8e2a-0c43-4d6e-9f0a-1e2d3c4b5a69";
const LIVELY: &str = "7d3a1c9e-2b4f-4e8a-8c6d-0f1e2d3c4b5a";
const TIMEOUT: Duration = Duration::from_secs(10);

fn key(uuid: &str) -> ProxyKey {
    ProxyKey::new(uuid, ProxyKind::Sidecar, "bookbuyer", "bookstore")
}

/// A snapshot with one large cluster: a response of about `size` bytes.
fn snapshot(tag: usize, size: usize) -> Snapshot {
    let body = vec![u8::try_from(tag % 251).expect("below 251"); size];
    Snapshot::new([(CLUSTER, vec![Resource::new("c", body)])])
}

/// A client on its own connection (as every Envoy has), its CDS stream opened.
async fn open(
    address: std::net::SocketAddr,
    uuid: &str,
) -> (
    mpsc::Sender<DiscoveryRequest>,
    Streaming<envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse>,
) {
    let mut client = support::client(address).await;
    support::open_sotw(&mut client, support::sidecar_node(uuid, "envoy"), CLUSTER).await
}

async fn connected(events: &mut mpsc::UnboundedReceiver<ProxyEvent>) {
    let event = tokio::time::timeout(TIMEOUT, events.recv())
        .await
        .expect("an event in time")
        .expect("server alive");
    assert!(matches!(event, ProxyEvent::Connected { .. }), "{event:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_proxy_delays_no_other() {
    let cache = Arc::new(SnapshotCache::new());
    let (address, mut events) = support::serve(cache.clone()).await;

    // The stuck proxy asks for CDS and never reads a response.
    let (_stuck_requests, _stuck_responses) = open(address, STUCK).await;
    connected(&mut events).await;
    const PUBLISHES: usize = 40;
    for tag in 0..PUBLISHES {
        assert!(cache.set(&key(STUCK), snapshot(tag, 1 << 20)));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let (_requests, mut responses) = open(address, LIVELY).await;
    connected(&mut events).await;
    for tag in 0..3 {
        let started = Instant::now();
        assert!(cache.set(&key(LIVELY), snapshot(1000 + tag, 1 << 10)));
        let response = tokio::time::timeout(TIMEOUT, responses.message())
            .await
            .expect("the lively proxy is served while the other is stuck")
            .expect("a response")
            .expect("stream open");
        assert_eq!(response.resources.len(), 1);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "served in {:?}",
            started.elapsed()
        );
    }

    // The stuck proxy really is stuck: its stream's task waits on its full queue, so far fewer
    // responses left than snapshots were published.
    let sent = cache.status()[&key(STUCK)].types[CLUSTER].responses_sent;
    assert!(
        (sent as usize) < PUBLISHES / 2,
        "{sent} of {PUBLISHES} responses sent"
    );
}
