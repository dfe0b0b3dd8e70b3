//! The client against a scripted ADS server on a real socket (ztunnel's `AdsServer` habit): each
//! stream the client opens is handed to the test as `(requests, responses)`, so the test plays
//! the control plane step by step and any unexpected request fails it.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::Any;
use fsm_dataplane_proto::{type_url, v1};
use fsm_sidecar_xds::{
    AdsMode, AdsState, ClientOptions, ConfigSink, NodeInfo, ResourceSet, build_node,
};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

type Responses = mpsc::Sender<Result<DiscoveryResponse, Status>>;

/// One SotW stream as the test sees it.
struct FakeStream {
    requests: Streaming<DiscoveryRequest>,
    responses: Responses,
}

struct FakeAds {
    streams: mpsc::Sender<FakeStream>,
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for FakeAds {
    type StreamAggregatedResourcesStream =
        Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;
    type DeltaAggregatedResourcesStream =
        Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let (tx, rx) = mpsc::channel(16);
        self.streams
            .send(FakeStream {
                requests: request.into_inner(),
                responses: tx,
            })
            .await
            .map_err(|_| Status::unavailable("test is gone"))?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delta_aggregated_resources(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        Err(Status::unimplemented("this fake speaks SotW"))
    }
}

/// Accepts clusters whose name does not start with `bad`, counting what it applied.
struct Sink(Arc<AtomicUsize>);

impl ConfigSink for Sink {
    fn try_apply(&mut self, candidate: &ResourceSet, changed: &'static str) -> Result<(), String> {
        if let Some(bad) = candidate
            .resources(changed)
            .find(|r| r.name.starts_with("bad"))
        {
            return Err(format!("Cluster {:?}: rejected by the test sink", bad.name));
        }
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

fn cluster(name: &str) -> Any {
    Any {
        type_url: type_url::CLUSTER.into(),
        value: v1::Cluster {
            name: name.into(),
            ..Default::default()
        }
        .encode_to_vec(),
    }
}

async fn next(requests: &mut Streaming<DiscoveryRequest>) -> DiscoveryRequest {
    tokio::time::timeout(Duration::from_secs(10), requests.next())
        .await
        .expect("a request in time")
        .expect("stream open")
        .expect("request decodes")
}

/// Reads the five initial subscriptions and returns them by type.
async fn initial(stream: &mut FakeStream) -> Vec<DiscoveryRequest> {
    let mut out = Vec::new();
    for _ in fsm_dataplane_proto::ALL_TYPE_URLS {
        out.push(next(&mut stream.requests).await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_nack_and_resume_against_a_scripted_server() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (streams_tx, mut streams) = mpsc::channel(4);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AggregatedDiscoveryServiceServer::new(FakeAds {
                streams: streams_tx,
            }))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );

    let info = NodeInfo {
        id: "6a1f3c2e-1b7d-4c1e-9a3f-0c5d2e8b7a10.sidecar.curl.demo".into(),
        cluster: "curl.demo".into(),
        pod_ip: "127.0.0.1".into(),
        pod_name: None,
    };
    let applied = Arc::new(AtomicUsize::new(0));
    let mut options = ClientOptions::new(addr.to_string());
    options.backoff_base = Duration::from_millis(10);
    let state = AdsState::new(AdsMode::Sotw, build_node(&info));
    let counter = applied.clone();
    tokio::spawn(async move {
        let mut sink = Sink(counter);
        fsm_sidecar_xds::run(options, state, &mut sink).await;
    });

    // Stream 1: the node comes first, once, and every type is subscribed as a wildcard.
    let mut s1 = tokio::time::timeout(Duration::from_secs(10), streams.recv())
        .await
        .expect("stream in time")
        .expect("stream");
    let subs = initial(&mut s1).await;
    let node = subs[0].node.clone().expect("node on the first request");
    assert_eq!(node.id, info.id);
    assert_eq!(node.user_agent_name, "fsm-sidecar");
    assert!(subs[1..].iter().all(|r| r.node.is_none()));
    let types: Vec<&str> = subs.iter().map(|r| r.type_url.as_str()).collect();
    assert_eq!(types, fsm_dataplane_proto::ALL_TYPE_URLS.to_vec());
    assert!(
        subs.iter()
            .all(|r| r.resource_names.is_empty() && r.version_info.is_empty())
    );

    // A good response is ACKed with its version and nonce.
    let send = |version: &str, nonce: &str, resources: Vec<Any>| DiscoveryResponse {
        version_info: version.into(),
        resources,
        type_url: type_url::CLUSTER.into(),
        nonce: nonce.into(),
        ..Default::default()
    };
    s1.responses
        .send(Ok(send("v1", "n1", vec![cluster("a")])))
        .await
        .expect("send");
    let ack = next(&mut s1.requests).await;
    assert_eq!(
        (ack.version_info.as_str(), ack.response_nonce.as_str()),
        ("v1", "n1")
    );
    assert!(ack.error_detail.is_none());
    assert_eq!(applied.load(Ordering::SeqCst), 1);

    // A bad one is NACKed: the previous version, the new nonce, and a detail naming the resource.
    s1.responses
        .send(Ok(send("v2", "n2", vec![cluster("bad-cluster")])))
        .await
        .expect("send");
    let nack = next(&mut s1.requests).await;
    assert_eq!(
        (nack.version_info.as_str(), nack.response_nonce.as_str()),
        ("v1", "n2")
    );
    let detail = nack.error_detail.expect("error_detail");
    assert!(
        detail.message.contains("\"bad-cluster\""),
        "{}",
        detail.message
    );

    // Undecodable bytes are NACKed too, and say so.
    s1.responses
        .send(Ok(send(
            "v3",
            "n3",
            vec![Any {
                type_url: type_url::CLUSTER.into(),
                value: vec![0x0a, 0xff],
            }],
        )))
        .await
        .expect("send");
    let nack = next(&mut s1.requests).await;
    assert_eq!(nack.version_info, "v1");
    assert!(
        nack.error_detail
            .expect("error_detail")
            .message
            .starts_with("Cluster resource #0: cannot decode"),
    );
    assert_eq!(applied.load(Ordering::SeqCst), 1, "nothing bad was applied");

    // The control plane goes away; the client comes back with the version it holds.
    drop(s1);
    let mut s2 = tokio::time::timeout(Duration::from_secs(10), streams.recv())
        .await
        .expect("reconnect in time")
        .expect("stream");
    let subs = initial(&mut s2).await;
    assert!(subs[0].node.is_some(), "a new stream names the node again");
    let cds = subs
        .iter()
        .find(|r| r.type_url == type_url::CLUSTER)
        .expect("CDS subscription");
    assert_eq!(cds.version_info, "v1");
    assert!(cds.response_nonce.is_empty());
}
