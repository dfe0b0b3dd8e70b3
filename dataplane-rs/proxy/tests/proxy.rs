//! Two sidecars in one process, configured directly (no control plane): a client sidecar whose
//! outbound listener routes to a server sidecar's inbound listener, which routes to a test app.
//! Covers what the demo mesh does not: HTTP/2 both ways, gRPC trailers, timeouts, retries, 403,
//! 404, 503, and the CONNECT tunnel, each through real sockets on 127.0.21.x.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fsm_dataplane_proto::{type_url, v1};
use fsm_sidecar_proxy::{Config, Metrics, Proxy, RateLimits, Store, Upstreams, Workload};
use fsm_sidecar_xds::{RawResource, ResourceSet};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

const CLIENT: &str = "127.0.21.1";
const SERVER: &str = "127.0.21.2";
const APP_PORT: u32 = 18080;
const ECHO_PORT: u32 = 19000;
const FLAKY_PORT: u32 = 18081;

fn addr(ip: &str, port: u32) -> Option<v1::SocketAddress> {
    Some(v1::SocketAddress {
        ip: ip.into(),
        port,
    })
}

fn wc(name: &str) -> Vec<v1::WeightedCluster> {
    vec![v1::WeightedCluster {
        name: name.into(),
        weight: 100,
    }]
}

fn any() -> Option<v1::AllowedSources> {
    Some(v1::AllowedSources {
        any: true,
        identities: vec![],
    })
}

fn route(
    path: v1::route_match::Path,
    cluster: &str,
    timeout: Option<Duration>,
    allowed: Option<v1::AllowedSources>,
) -> v1::Route {
    v1::Route {
        r#match: Some(v1::RouteMatch {
            path: Some(path),
            ..Default::default()
        }),
        action: Some(v1::RouteAction {
            clusters: wc(cluster),
            timeout: timeout.and_then(|t| prost_types::Duration::try_from(t).ok()),
            retry_policy: None,
        }),
        allowed_sources: allowed,
        rate_limit: None,
    }
}

fn prefix(p: &str) -> v1::route_match::Path {
    v1::route_match::Path::Prefix(p.into())
}

fn vhost(name: &str, routes: Vec<v1::Route>) -> v1::VirtualHost {
    v1::VirtualHost {
        name: name.into(),
        domains: vec![name.into()],
        routes,
        rate_limit: None,
    }
}

fn cluster(name: &str, protocol: v1::UpstreamProtocol, local: Option<u32>) -> v1::Cluster {
    v1::Cluster {
        name: name.into(),
        discovery: Some(match local {
            None => v1::cluster::Discovery::Eds(v1::EdsDiscovery {}),
            Some(port) => v1::cluster::Discovery::StaticLocal(v1::StaticLocal {
                address: addr(SERVER, port),
            }),
        }),
        connect_timeout: Some(prost_types::Duration {
            seconds: 1,
            nanos: 0,
        }),
        upstream_protocol: protocol as i32,
        ..Default::default()
    }
}

fn cla(name: &str, endpoints: &[(&str, u32, bool)]) -> v1::ClusterLoadAssignment {
    v1::ClusterLoadAssignment {
        cluster_name: name.into(),
        endpoints: endpoints
            .iter()
            .map(|(ip, port, meshed)| v1::Endpoint {
                address: addr(ip, *port),
                weight: 1,
                meshed: *meshed,
                identity: None,
                workload: None,
            })
            .collect(),
    }
}

fn http_chain(name: &str, port: u32, rc: &str) -> v1::FilterChain {
    v1::FilterChain {
        name: name.into(),
        r#match: Some(v1::FilterChainMatch {
            destination_port: port,
            destination_ip_ranges: vec![],
        }),
        protocol: v1::Protocol::Http as i32,
        target: Some(v1::filter_chain::Target::Http(v1::HttpTarget {
            route_config_name: rc.into(),
        })),
        ..Default::default()
    }
}

#[derive(Default)]
struct Set(ResourceSet);

impl Set {
    fn add<M: Message>(mut self, url: &'static str, name: &str, m: &M) -> Self {
        let state = self.0.types.entry(url).or_default();
        state.received = true;
        state.version = "test".into();
        state.resources.insert(
            Arc::from(name),
            RawResource {
                name: Arc::from(name),
                version: Arc::from("test"),
                body: Arc::from(m.encode_to_vec()),
            },
        );
        self
    }
}

fn client_resources() -> ResourceSet {
    use v1::UpstreamProtocol::{Http1, Http2, Tcp};
    let mut retry = route(prefix("/"), "flaky", None, None);
    if let Some(action) = retry.action.as_mut() {
        action.retry_policy = Some(v1::RetryPolicy {
            retry_on: vec![v1::RetryOn::RetryOn5xx as i32],
            num_retries: 2,
            per_try_timeout: None,
            backoff_base_interval: Some(prost_types::Duration {
                seconds: 0,
                nanos: 1_000_000,
            }),
        });
    }
    let routes = v1::RouteConfiguration {
        name: "outbound".into(),
        virtual_hosts: vec![
            vhost(
                "web",
                vec![
                    route(
                        prefix("/slow"),
                        "web",
                        Some(Duration::from_millis(300)),
                        None,
                    ),
                    route(prefix("/"), "web", None, None),
                ],
            ),
            vhost("grpc", vec![route(prefix("/"), "grpc", None, None)]),
            vhost("denied", vec![route(prefix("/"), "denied", None, None)]),
            vhost("empty", vec![route(prefix("/"), "empty", None, None)]),
            vhost("retry", vec![retry]),
        ],
    };
    let outbound = v1::Listener {
        name: "outbound-listener".into(),
        address: addr(CLIENT, 15001),
        direction: v1::TrafficDirection::Outbound as i32,
        filter_chains: vec![http_chain("explicit-http", 15001, "outbound")],
    };
    let tcp = v1::Listener {
        name: "outbound-tcp:demo/echo|9000".into(),
        address: addr(CLIENT, 9000),
        direction: v1::TrafficDirection::Outbound as i32,
        filter_chains: vec![v1::FilterChain {
            name: "demo/echo|9000".into(),
            protocol: v1::Protocol::Tcp as i32,
            target: Some(v1::filter_chain::Target::Tcp(v1::TcpTarget {
                clusters: wc("echo"),
                connect_authority: "echo.demo.svc.cluster.local:9000".into(),
            })),
            ..Default::default()
        }],
    };
    let meshed = [(SERVER, 15003, true)];
    Set::default()
        .add(type_url::CLUSTER, "web", &cluster("web", Http1, None))
        .add(type_url::CLUSTER, "grpc", &cluster("grpc", Http2, None))
        .add(type_url::CLUSTER, "denied", &cluster("denied", Http1, None))
        .add(type_url::CLUSTER, "empty", &cluster("empty", Http1, None))
        .add(type_url::CLUSTER, "echo", &cluster("echo", Tcp, None))
        .add(type_url::CLUSTER, "flaky", &cluster("flaky", Http1, None))
        .add(
            type_url::CLUSTER_LOAD_ASSIGNMENT,
            "web",
            &cla("web", &meshed),
        )
        .add(
            type_url::CLUSTER_LOAD_ASSIGNMENT,
            "grpc",
            &cla("grpc", &meshed),
        )
        .add(
            type_url::CLUSTER_LOAD_ASSIGNMENT,
            "denied",
            &cla("denied", &meshed),
        )
        .add(
            type_url::CLUSTER_LOAD_ASSIGNMENT,
            "echo",
            &cla("echo", &meshed),
        )
        .add(
            type_url::CLUSTER_LOAD_ASSIGNMENT,
            "flaky",
            &cla("flaky", &[(SERVER, FLAKY_PORT, false)]),
        )
        .add(type_url::ROUTE_CONFIGURATION, "outbound", &routes)
        .add(type_url::LISTENER, "outbound-listener", &outbound)
        .add(type_url::LISTENER, "outbound-tcp:demo/echo|9000", &tcp)
        .0
}

fn server_resources() -> ResourceSet {
    use v1::UpstreamProtocol::{Http1, Http2, Tcp};
    let routes = v1::RouteConfiguration {
        name: "inbound".into(),
        virtual_hosts: vec![
            vhost("web", vec![route(prefix("/"), "web|local", None, any())]),
            vhost("grpc", vec![route(prefix("/"), "grpc|local", None, any())]),
            vhost("denied", vec![route(prefix("/"), "web|local", None, None)]),
            v1::VirtualHost {
                name: "echo".into(),
                domains: vec!["echo.demo.svc.cluster.local:9000".into()],
                routes: vec![route(
                    v1::route_match::Path::Connect(v1::ConnectMatch {}),
                    "echo|local",
                    None,
                    any(),
                )],
                rate_limit: None,
            },
        ],
    };
    let inbound = v1::Listener {
        name: "inbound-listener".into(),
        address: addr(SERVER, 15003),
        direction: v1::TrafficDirection::Inbound as i32,
        filter_chains: vec![http_chain("explicit-http", 15003, "inbound")],
    };
    Set::default()
        .add(
            type_url::CLUSTER,
            "web|local",
            &cluster("web|local", Http1, Some(APP_PORT)),
        )
        .add(
            type_url::CLUSTER,
            "grpc|local",
            &cluster("grpc|local", Http2, Some(APP_PORT)),
        )
        .add(
            type_url::CLUSTER,
            "echo|local",
            &cluster("echo|local", Tcp, Some(ECHO_PORT)),
        )
        .add(type_url::ROUTE_CONFIGURATION, "inbound", &routes)
        .add(type_url::LISTENER, "inbound-listener", &inbound)
        .0
}

async fn start_sidecar(resources: ResourceSet) -> Arc<Proxy> {
    let config = Config::build(&resources, type_url::ROUTE_CONFIGURATION).expect("valid config");
    let store = Arc::new(Store::default());
    store.install(config, resources);
    let proxy = Arc::new(Proxy {
        store,
        upstreams: Upstreams::default(),
        rate_limits: RateLimits::default(),
        metrics: Arc::new(Metrics::new(Workload::default()).expect("metrics")),
        transparent: false,
    });
    tokio::spawn(fsm_sidecar_proxy::listeners::run(proxy.clone()));
    proxy
}

type AppBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// The application: answers with its view of the request; `/slow` takes 2 s; gRPC requests get
/// a `grpc-status` trailer.
async fn app(req: Request<Incoming>) -> Result<Response<AppBody>, Infallible> {
    if req.uri().path() == "/echo-body" {
        let body = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        return Ok(Response::new(Full::new(body).boxed()));
    }
    if req.uri().path() == "/slow" {
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let text = format!(
        "{:?} {} host={}",
        req.version(),
        req.uri().path(),
        req.headers()
            .get("host")
            .and_then(|h| h.to_str().ok())
            .or(req.uri().authority().map(|a| a.as_str()))
            .unwrap_or("")
    );
    let text = match req.headers().get("te").and_then(|v| v.to_str().ok()) {
        Some(te) => format!("{text} te={te}"),
        None => text,
    };
    let is_grpc = req
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let body = Full::new(Bytes::from(text));
    let body: AppBody = if is_grpc {
        body.with_trailers(async {
            let mut t = http::HeaderMap::new();
            t.insert("grpc-status", http::HeaderValue::from_static("0"));
            Some(Ok(t))
        })
        .boxed()
    } else {
        body.boxed()
    };
    Ok(Response::new(body))
}

async fn serve_http(addr: &str, flaky: Option<Arc<AtomicUsize>>) {
    let listener = TcpListener::bind(addr).await.expect("bind app");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let flaky = flaky.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let flaky = flaky.clone();
                    async move {
                        if let Some(n) = flaky
                            && n.fetch_add(1, Ordering::SeqCst) % 3 != 2
                        {
                            let mut r = Response::new(Full::new(Bytes::new()).boxed());
                            *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                            return Ok(r);
                        }
                        app(req).await
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}

async fn serve_echo(addr: &str) {
    let listener = TcpListener::bind(addr).await.expect("bind echo");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let (r, mut w) = stream.into_split();
                let mut lines = BufReader::new(r).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if w.write_all(format!("echo: {line}\n").as_bytes())
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            });
        }
    });
}

async fn wait_port(addr: SocketAddr) {
    for _ in 0..100 {
        if TcpStream::connect(addr).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{addr} never listened");
}

struct Reply {
    status: StatusCode,
    body: String,
    trailers: Option<http::HeaderMap>,
}

async fn h1(host: &str, path: &str) -> Reply {
    let stream = TcpStream::connect((CLIENT, 15001)).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let req = Request::builder()
        .uri(path)
        .header("host", host)
        .body(Empty::<Bytes>::new())
        .expect("request");
    let response = sender.send_request(req).await.expect("response");
    collect(response).await
}

/// An HTTP/1.1 POST of `body`, with a `content-length` or, `chunked`, without one.
async fn h1_post(host: &str, path: &str, body: &'static str, chunked: bool) -> Reply {
    let stream = TcpStream::connect((CLIENT, 15001)).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let body: http_body_util::combinators::BoxBody<Bytes, Infallible> = if chunked {
        let chunks = futures::stream::iter([Ok(hyper::body::Frame::data(Bytes::from_static(
            body.as_bytes(),
        )))]);
        http_body_util::StreamBody::new(chunks).boxed()
    } else {
        Full::new(Bytes::from_static(body.as_bytes())).boxed()
    };
    let req = Request::builder()
        .method("POST")
        .uri(path)
        .header("host", host)
        .body(body)
        .expect("request");
    let response = sender.send_request(req).await.expect("response");
    collect(response).await
}

async fn h2(authority: &str, path: &str, grpc: bool) -> Reply {
    let stream = TcpStream::connect((CLIENT, 15001)).await.expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("handshake");
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(if grpc { "POST" } else { "GET" })
        .uri(format!("http://{authority}{path}"));
    if grpc {
        req = req
            .header("content-type", "application/grpc")
            .header("te", "trailers");
    }
    let req = req
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
        .expect("request");
    let response = sender.send_request(req).await.expect("response");
    collect(response).await
}

async fn collect(response: Response<Incoming>) -> Reply {
    let status = response.status();
    let collected = response.into_body().collect().await.expect("body");
    let trailers = collected.trailers().cloned();
    Reply {
        status,
        body: String::from_utf8_lossy(&collected.to_bytes()).into_owned(),
        trailers,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sidecars_in_one_process() {
    let flaky = Arc::new(AtomicUsize::new(0));
    serve_http(&format!("{SERVER}:{APP_PORT}"), None).await;
    serve_http(&format!("{SERVER}:{FLAKY_PORT}"), Some(flaky.clone())).await;
    serve_echo(&format!("{SERVER}:{ECHO_PORT}")).await;
    let client = start_sidecar(client_resources()).await;
    let server = start_sidecar(server_resources()).await;
    for port in [15001, 9000] {
        wait_port(format!("{CLIENT}:{port}").parse().expect("addr")).await;
    }
    wait_port(format!("{SERVER}:15003").parse().expect("addr")).await;

    // HTTP/1.1 in, HTTP/1.1 across, HTTP/1.1 to the app; Host kept end to end.
    let r = h1("web", "/hello").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body, "HTTP/1.1 /hello host=web");

    // HTTP/2 (prior knowledge) in, HTTP/1.1 cluster: converted, Host from :authority.
    let r = h2("web", "/h2", false).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body, "HTTP/1.1 /h2 host=web");

    // gRPC: HTTP/2 all the way, trailers passed through both sidecars.
    let r = h2("grpc", "/pkg.Service/Method", true).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(
        r.body.starts_with("HTTP/2.0 /pkg.Service/Method"),
        "{}",
        r.body
    );
    assert!(r.body.ends_with(" te=trailers"), "{}", r.body);
    let trailers = r.trailers.expect("gRPC trailers");
    assert_eq!(
        trailers.get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"0"[..])
    );

    // Local replies.
    assert_eq!(h1("nowhere", "/").await.status, StatusCode::NOT_FOUND);
    let r = h1("denied", "/").await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.body, "RBAC: access denied");
    let r = h1("empty", "/").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.body, "no healthy upstream");

    // Route timeout: the app takes 2 s, the route allows 300 ms.
    let started = Instant::now();
    let r = h1("web", "/slow").await;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(started.elapsed() < Duration::from_millis(1500));

    // Retries: the flaky app fails twice, then answers; two retries hide that.
    let r = h1("retry", "/").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(flaky.load(Ordering::SeqCst), 3);
    // A small body with its length is kept and sent again with each attempt.
    let r = h1_post("retry", "/echo-body", "order-42", false).await;
    assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "order-42"));
    assert_eq!(flaky.load(Ordering::SeqCst), 6);
    // A chunked one (no length) is streamed once: the first failure is the answer.
    let r = h1_post("retry", "/echo-body", "order-43", true).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.body);
    assert_eq!(flaky.load(Ordering::SeqCst), 7);

    // TCP through the outbound-tcp listener and an HTTP/2 CONNECT tunnel.
    let stream = TcpStream::connect((CLIENT, 9000)).await.expect("connect");
    let (r, mut w) = stream.into_split();
    w.write_all(b"ping\n").await.expect("write");
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(5),
        BufReader::new(r).read_line(&mut line),
    )
    .await
    .expect("echo in time")
    .expect("read");
    assert_eq!(line, "echo: ping\n");

    // Both sides counted what they forwarded.
    let stats = server.metrics.stats_text(Some("upstream_rq_total"));
    assert!(
        stats.contains("cluster.web|local.upstream_rq_total"),
        "{stats}"
    );
    assert!(
        stats.contains("cluster.echo|local.upstream_rq_total"),
        "{stats}"
    );
    let prom = client.metrics.prometheus_text();
    assert!(prom.contains("fsm_request_total{"), "{prom}");
}

fn listener_only(name: &str, ip: &str, port: u32) -> ResourceSet {
    let routes = v1::RouteConfiguration {
        name: "outbound".into(),
        virtual_hosts: vec![],
    };
    let listener = v1::Listener {
        name: name.into(),
        address: addr(ip, port),
        direction: v1::TrafficDirection::Outbound as i32,
        filter_chains: vec![http_chain("explicit-http", 0, "outbound")],
    };
    Set::default()
        .add(type_url::ROUTE_CONFIGURATION, "outbound", &routes)
        .add(type_url::LISTENER, name, &listener)
        .add(
            type_url::CLUSTER,
            "unused",
            &cluster("unused", v1::UpstreamProtocol::Http1, None),
        )
        .0
}

async fn refused(addr: SocketAddr) -> bool {
    for _ in 0..100 {
        if TcpStream::connect(addr).await.is_err() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_follow_the_config() {
    let first: SocketAddr = "127.0.22.1:15001".parse().expect("addr");
    let moved: SocketAddr = "127.0.22.1:15011".parse().expect("addr");
    let proxy = start_sidecar(listener_only("l", "127.0.22.1", 15001)).await;
    wait_port(first).await;

    // An HTTP keep-alive connection accepted before the change.
    let stream = TcpStream::connect(first).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    let conn = tokio::spawn(conn);

    // The address changes: the old socket closes, the new one opens.
    let set = listener_only("l", "127.0.22.1", 15011);
    proxy
        .store
        .install(Config::build(&set, type_url::LISTENER).expect("valid"), set);
    wait_port(moved).await;
    assert!(refused(first).await, "old address still accepting");

    // The connection accepted before was told to finish: it closes instead of lingering.
    let req = Request::builder()
        .uri("/")
        .header("host", "x")
        .body(Empty::<Bytes>::new())
        .expect("request");
    let _ = sender.send_request(req).await;
    tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("drained connection closes")
        .expect("join")
        .ok();

    // The listener goes away: its socket closes.
    let mut set = listener_only("l", "127.0.22.1", 15011);
    set.types
        .entry(type_url::LISTENER)
        .or_default()
        .resources
        .clear();
    proxy
        .store
        .install(Config::build(&set, type_url::LISTENER).expect("valid"), set);
    assert!(refused(moved).await, "removed listener still accepting");
}
