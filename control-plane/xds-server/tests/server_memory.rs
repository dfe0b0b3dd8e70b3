//! The ADS server's heap per connected proxy, on real connections: a child process (this test
//! binary again) opens N Envoy-like streams, each on its own HTTP/2 connection, asks for CDS
//! (wildcard) and EDS (every cluster by name) of a 1,000-service mesh and ACKs; the server
//! process counts what its heap grew by. Shared configuration is built before counting starts,
//! so what is counted is what each proxy costs: its connection, stream task, queue, protocol
//! state and cache entry.

use std::alloc::System;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use fsm_cache::{Flavor, Resource, Snapshot, SnapshotCache, TypeSnapshot};
use fsm_xds_server::ProxyEvent;
use fsm_xds_server::protocol::{CLUSTER, ENDPOINT};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

mod support;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const SERVICES: usize = 1000;
const PROXIES: usize = 200;
const ADDRESS_VAR: &str = "FSM_XDS_MEMORY_TEST_SERVER";

fn cluster(i: usize) -> String {
    format!("bookstore/svc-{i:04}|14001")
}

fn uuid(i: usize) -> String {
    format!("00000000-0000-4000-8000-{i:012x}")
}

/// The mesh every proxy gets: the same shared type sets, as the controller shares them.
fn mesh() -> Snapshot {
    let types = |kind: u8| {
        Arc::new(TypeSnapshot::new(
            (0..SERVICES).map(|i| Resource::new(cluster(i), vec![kind; 200])),
        ))
    };
    Snapshot::from_types([(CLUSTER, types(1)), (ENDPOINT, types(2))])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_heap_per_connected_proxy() {
    let cache = Arc::new(SnapshotCache::new());
    let (address, mut events) = support::serve(cache.clone()).await;
    let mesh = mesh();
    for (type_url, types) in mesh.types() {
        types.section(Flavor::Sotw, type_url);
    }
    // The controller's part: publish the mesh for every proxy that connects.
    let publisher = {
        let (cache, mesh) = (cache.clone(), mesh.clone());
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                if let ProxyEvent::Connected { node, .. } = event {
                    cache.set(&node.key(), mesh.clone());
                }
            }
        })
    };

    let region = Region::new(GLOBAL);
    let mut child = tokio::process::Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "clients", "--ignored", "--nocapture"])
        .env(ADDRESS_VAR, address.to_string())
        .stdin(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("client process");
    let versions = mesh.versions();
    let all_acked = || {
        let status = cache.status();
        status.len() == PROXIES
            && status.values().all(|s| {
                [CLUSTER, ENDPOINT].iter().all(|t| {
                    s.types.get(t).and_then(|t| t.acked_version.as_ref()) == versions.get(t)
                })
            })
    };
    for _ in 0..600 {
        if all_acked() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(all_acked(), "every proxy ACKed CDS and EDS");
    // Let the last ACKs' buffers settle.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stats = region.change();
    let live = stats.bytes_allocated as isize - stats.bytes_deallocated as isize;
    let per_proxy = live / PROXIES as isize;
    println!(
        "server heap per connected proxy (SotW, CDS wildcard + EDS by name, {SERVICES} services, \
         {PROXIES} proxies on their own connections): {per_proxy} bytes ({live} in all)"
    );
    // tonic's encode buffer alone kept a whole response (~260 KB here) per stream.
    assert!(
        per_proxy < 100 << 10,
        "{per_proxy} bytes per proxy, the target is 100 KB"
    );
    child.kill().await.expect("stop the clients");
    publisher.abort();
}

/// The child process: N proxies, each on its own connection, SotW CDS then EDS, ACKing both.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
#[ignore = "run by server_heap_per_connected_proxy in its own process"]
async fn clients() {
    let Ok(address) = std::env::var(ADDRESS_VAR) else {
        return;
    };
    let mut proxies = Vec::new();
    for i in 0..PROXIES {
        let address = address.clone();
        proxies.push(tokio::spawn(proxy(address, i)));
    }
    let mut held = Vec::new();
    for proxy in proxies {
        held.push(proxy.await.expect("proxy task"));
    }
    // Keep the streams open until the server process has measured and kills us.
    std::future::pending::<()>().await;
    drop(held);
}

async fn proxy(address: String, i: usize) -> impl Sized {
    let mut client = support::client(address.parse().expect("a socket address")).await;
    let (requests, rx) = mpsc::channel(4);
    let mut responses = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .expect("stream")
        .into_inner();
    let node = Some(support::sidecar_node(&uuid(i), "envoy"));
    let names: Vec<String> = (0..SERVICES).map(cluster).collect();
    for (type_url, resource_names) in [(CLUSTER, Vec::new()), (ENDPOINT, names)] {
        let request = DiscoveryRequest {
            node: node.clone(),
            type_url: type_url.into(),
            resource_names: resource_names.clone(),
            ..DiscoveryRequest::default()
        };
        requests.send(request).await.expect("queue");
        let response = responses
            .message()
            .await
            .expect("a response")
            .expect("open");
        assert_eq!(response.resources.len(), SERVICES);
        let ack = DiscoveryRequest {
            type_url: type_url.into(),
            version_info: response.version_info,
            response_nonce: response.nonce,
            resource_names,
            ..DiscoveryRequest::default()
        };
        requests.send(ack).await.expect("queue");
    }
    (client, requests, responses)
}
