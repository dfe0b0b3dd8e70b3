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
use fsm_sidecar_proxy::breakers::Counter;
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
        source_ip_ranges: vec![],
        principals: vec![],
        principals_from: vec![],
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
            source_ip_ranges: vec![],
            transport_protocol: v1::TransportProtocol::Any as i32,
            server_names: vec![],
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
        tracing: None,
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
        tracing: None,
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
        tracing: None,
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
    let metrics = Arc::new(Metrics::new(Workload::default()).expect("metrics"));
    let proxy = Arc::new(Proxy {
        store,
        upstreams: Upstreams::default(),
        rate_limits: RateLimits::default(),
        metrics: metrics.clone(),
        tracer: fsm_sidecar_proxy::Tracer::spawn(&metrics.registry).expect("tracing metrics"),
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
    headers: http::HeaderMap,
    body: String,
    trailers: Option<http::HeaderMap>,
}

async fn h1(host: &str, path: &str) -> Reply {
    h1_to(&format!("{CLIENT}:15001"), host, path).await
}

/// A GET over a new HTTP/1.1 connection to `to`.
async fn h1_to(to: &str, host: &str, path: &str) -> Reply {
    let stream = TcpStream::connect(to).await.expect("connect");
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
    h2_to(&format!("{CLIENT}:15001"), authority, path, grpc).await
}

/// A request over a new HTTP/2 (prior knowledge) connection to `to`.
async fn h2_to(to: &str, authority: &str, path: &str, grpc: bool) -> Reply {
    let stream = TcpStream::connect(to).await.expect("connect");
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
    let headers = response.headers().clone();
    let collected = response.into_body().collect().await.expect("body");
    let trailers = collected.trailers().cloned();
    Reply {
        status,
        headers,
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
        tracing: None,
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

// === Local rate limits and circuit breakers, each in one sidecar ===

fn limit(
    max_tokens: u32,
    tokens_per_fill: u32,
    status: u32,
    headers: &[(&str, &str)],
) -> Option<v1::LocalRateLimit> {
    Some(v1::LocalRateLimit {
        max_tokens,
        tokens_per_fill,
        // Long enough that no fill happens during a test.
        fill_interval: Some(prost_types::Duration {
            seconds: 60,
            nanos: 0,
        }),
        status,
        response_headers_to_add: headers
            .iter()
            .map(|(name, value)| v1::ResponseHeader {
                name: (*name).into(),
                value: (*value).into(),
            })
            .collect(),
    })
}

fn breakers(b: v1::CircuitBreakers) -> Option<v1::CircuitBreakers> {
    Some(b)
}

fn eds(name: &str, protocol: v1::UpstreamProtocol, b: Option<v1::CircuitBreakers>) -> v1::Cluster {
    v1::Cluster {
        circuit_breakers: b,
        ..cluster(name, protocol, None)
    }
}

const LIMITS: &str = "127.0.23.1";
const LIMITS_APP: &str = "127.0.23.2";

fn rate_limited_resources() -> ResourceSet {
    use v1::UpstreamProtocol::{Http1, Tcp};
    let mut own = route(prefix("/own"), "app", None, any());
    own.rate_limit = limit(1, 1, 418, &[("X-Limited-By", "route")]);
    let mut limited = vhost(
        "demo/limited|80|local",
        vec![
            own,
            // No allowed_sources: every request is denied.
            route(prefix("/denied"), "app", None, None),
            route(prefix("/"), "app", None, any()),
        ],
    );
    limited.domains = vec!["limited".into()];
    limited.rate_limit = limit(
        3,
        3,
        0,
        &[("x-rate-limited", "vh"), ("x-rate-limited", "again")],
    );
    let mut echo = vhost(
        "demo/echo|9000|local",
        vec![route(
            v1::route_match::Path::Connect(v1::ConnectMatch {}),
            "echo",
            None,
            any(),
        )],
    );
    echo.domains = vec!["echo.demo.svc.cluster.local:9000".into()];
    echo.rate_limit = limit(1, 1, 0, &[]);
    let routes = v1::RouteConfiguration {
        name: "inbound".into(),
        virtual_hosts: vec![
            limited,
            echo,
            vhost("free", vec![route(prefix("/"), "app", None, any())]),
        ],
    };
    let inbound = v1::Listener {
        name: "inbound-listener".into(),
        address: addr(LIMITS, 15003),
        direction: v1::TrafficDirection::Inbound as i32,
        filter_chains: vec![http_chain("explicit-http", 15003, "inbound")],
        tracing: None,
    };
    Set::default()
        .add(type_url::CLUSTER, "app", &eds("app", Http1, None))
        .add(type_url::CLUSTER, "echo", &eds("echo", Tcp, None))
        .add(
            type_url::CLUSTER_LOAD_ASSIGNMENT,
            "app",
            &cla("app", &[(LIMITS_APP, APP_PORT, false)]),
        )
        .add(
            type_url::CLUSTER_LOAD_ASSIGNMENT,
            "echo",
            &cla("echo", &[(LIMITS_APP, ECHO_PORT, false)]),
        )
        .add(type_url::ROUTE_CONFIGURATION, "inbound", &routes)
        .add(type_url::LISTENER, "inbound-listener", &inbound)
        .0
}

/// An HTTP/2 CONNECT to `to` for `authority`: the refusal, or the tunnel.
async fn connect_to(to: &str, authority: &str) -> Result<TokioIo<hyper::upgrade::Upgraded>, Reply> {
    let stream = TcpStream::connect(to).await.expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("handshake");
    tokio::spawn(conn);
    let req = Request::builder()
        .method(http::Method::CONNECT)
        .uri(authority)
        .body(Empty::<Bytes>::new())
        .expect("request");
    let response = sender.send_request(req).await.expect("response");
    if response.status() != StatusCode::OK {
        return Err(collect(response).await);
    }
    let upgraded = hyper::upgrade::on(response).await.expect("upgrade");
    Ok(TokioIo::new(upgraded))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_local_rate_limits() {
    serve_http(&format!("{LIMITS_APP}:{APP_PORT}"), None).await;
    serve_echo(&format!("{LIMITS_APP}:{ECHO_PORT}")).await;
    let resources = rate_limited_resources();
    let proxy = start_sidecar(resources.clone()).await;
    let to = format!("{LIMITS}:15003");
    wait_port(to.parse().expect("addr")).await;

    // Refused by allowed_sources before the bucket: these take no token.
    for _ in 0..2 {
        let r = h1_to(&to, "limited", "/denied").await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    }
    for i in 0..3 {
        let r = h1_to(&to, "limited", "/").await;
        assert_eq!(r.status, StatusCode::OK, "request {i}: {}", r.body);
    }
    // A rebuilt config (as every xDS update makes) keeps the bucket as it is.
    proxy.store.install(
        Config::build(&resources, type_url::CLUSTER_LOAD_ASSIGNMENT).expect("valid"),
        resources.clone(),
    );
    let r = h1_to(&to, "limited", "/").await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.body, "local_rate_limited");
    let added: Vec<&str> = r
        .headers
        .get_all("x-rate-limited")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    assert_eq!(added, ["vh", "again"]);
    // The route's own bucket replaces the empty one of its virtual host.
    let r = h1_to(&to, "limited", "/own").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = h1_to(&to, "limited", "/own").await;
    assert_eq!(r.status.as_u16(), 418);
    assert_eq!(r.body, "local_rate_limited");
    assert_eq!(
        r.headers.get("x-limited-by").map(|v| v.as_bytes()),
        Some(&b"route"[..])
    );
    assert!(r.headers.get("x-rate-limited").is_none());
    // Virtual hosts without a limit are not limited.
    for _ in 0..5 {
        assert_eq!(h1_to(&to, "free", "/").await.status, StatusCode::OK);
    }

    // The CONNECT virtual host of a TCP port: one tunnel, then the status.
    let authority = "echo.demo.svc.cluster.local:9000";
    let Ok(mut tunnel) = connect_to(&to, authority).await else {
        panic!("first tunnel refused");
    };
    tunnel.write_all(b"ping\n").await.expect("write");
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(5),
        BufReader::new(&mut tunnel).read_line(&mut line),
    )
    .await
    .expect("echo in time")
    .expect("read");
    assert_eq!(line, "echo: ping\n");
    let Err(refused) = connect_to(&to, authority).await else {
        panic!("second tunnel admitted");
    };
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);

    let stats = proxy.metrics.stats_text(Some("http_local_rate_limit"));
    assert_eq!(
        stats,
        "inbound_rate_limit.demo/echo|9000|local.http_local_rate_limit.ok: 1\n\
         inbound_rate_limit.demo/echo|9000|local.http_local_rate_limit.rate_limited: 1\n\
         inbound_rate_limit.demo/limited|80|local.http_local_rate_limit.ok: 4\n\
         inbound_rate_limit.demo/limited|80|local.http_local_rate_limit.rate_limited: 2\n"
    );
}

const BREAKERS: &str = "127.0.24.1";
const BREAKERS_APP: &str = "127.0.24.2";

fn breaker_resources() -> ResourceSet {
    use v1::UpstreamProtocol::Http1;
    let mut no_retry = route(prefix("/"), "no-retry", None, None);
    if let Some(action) = no_retry.action.as_mut() {
        action.retry_policy = Some(v1::RetryPolicy {
            retry_on: vec![v1::RetryOn::RetryOn5xx as i32],
            num_retries: 2,
            per_try_timeout: None,
            backoff_base_interval: None,
        });
    }
    let routes = v1::RouteConfiguration {
        name: "outbound".into(),
        virtual_hosts: vec![
            vhost("refusing", vec![route(prefix("/"), "refusing", None, None)]),
            vhost("queueing", vec![route(prefix("/"), "queueing", None, None)]),
            vhost(
                "one-request",
                vec![route(prefix("/"), "one-request", None, None)],
            ),
            vhost("no-retry", vec![no_retry]),
        ],
    };
    let outbound = v1::Listener {
        name: "outbound-listener".into(),
        address: addr(BREAKERS, 15001),
        direction: v1::TrafficDirection::Outbound as i32,
        filter_chains: vec![http_chain("explicit-http", 15001, "outbound")],
        tracing: None,
    };
    let one_connection = |pending| v1::CircuitBreakers {
        max_connections: Some(1),
        max_pending_requests: Some(pending),
        ..Default::default()
    };
    let app = [(BREAKERS_APP, APP_PORT, false)];
    Set::default()
        .add(
            type_url::CLUSTER,
            "refusing",
            &eds("refusing", Http1, breakers(one_connection(0))),
        )
        .add(
            type_url::CLUSTER,
            "queueing",
            &eds("queueing", Http1, breakers(one_connection(1))),
        )
        .add(
            type_url::CLUSTER,
            "one-request",
            &eds(
                "one-request",
                Http1,
                breakers(v1::CircuitBreakers {
                    max_requests: Some(1),
                    ..Default::default()
                }),
            ),
        )
        .add(
            type_url::CLUSTER_LOAD_ASSIGNMENT,
            "one-request",
            &cla("one-request", &app),
        )
        .add(
            type_url::CLUSTER,
            "no-retry",
            &eds(
                "no-retry",
                Http1,
                breakers(v1::CircuitBreakers {
                    max_retries: Some(0),
                    ..Default::default()
                }),
            ),
        )
        .add(
            type_url::CLUSTER_LOAD_ASSIGNMENT,
            "refusing",
            &cla("refusing", &app),
        )
        .add(
            type_url::CLUSTER_LOAD_ASSIGNMENT,
            "queueing",
            &cla("queueing", &app),
        )
        .add(
            type_url::CLUSTER_LOAD_ASSIGNMENT,
            "no-retry",
            &cla("no-retry", &[(BREAKERS_APP, FLAKY_PORT, false)]),
        )
        .add(type_url::ROUTE_CONFIGURATION, "outbound", &routes)
        .add(type_url::LISTENER, "outbound-listener", &outbound)
        .0
}

/// Waits until `cluster` has `n` requests in flight upstream.
async fn in_flight(proxy: &Proxy, cluster: &str, n: usize) {
    let limits = proxy.upstreams.limits(&Arc::from(cluster));
    for _ in 0..250 {
        if limits.count(Counter::Requests) == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{cluster} never had {n} requests in flight");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circuit_breakers_refuse_or_queue_http_requests() {
    let flaky = Arc::new(AtomicUsize::new(0));
    serve_http(&format!("{BREAKERS_APP}:{APP_PORT}"), None).await;
    serve_http(&format!("{BREAKERS_APP}:{FLAKY_PORT}"), Some(flaky.clone())).await;
    let proxy = start_sidecar(breaker_resources()).await;
    let to = format!("{BREAKERS}:15001");
    wait_port(to.parse().expect("addr")).await;

    // One connection each; the app takes 2 s over /slow.
    let slow_refusing = tokio::spawn({
        let to = to.clone();
        async move { h1_to(&to, "refusing", "/slow").await }
    });
    let slow_queueing = tokio::spawn({
        let to = to.clone();
        async move { h1_to(&to, "queueing", "/slow").await }
    });
    let slow_one_request = tokio::spawn({
        let to = to.clone();
        async move { h1_to(&to, "one-request", "/slow").await }
    });
    in_flight(&proxy, "refusing", 1).await;
    in_flight(&proxy, "queueing", 1).await;
    in_flight(&proxy, "one-request", 1).await;

    // max_requests 1 (no connection limit): refused while one is in flight.
    let r = h1_to(&to, "one-request", "/").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.body);

    // max_pending_requests 0: refused at once.
    let started = Instant::now();
    let r = h1_to(&to, "refusing", "/").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        r.body,
        "upstream connect error or disconnect/reset before headers. reset reason: overflow"
    );
    assert!(started.elapsed() < Duration::from_secs(1));

    // max_pending_requests 1: one waits for the connection, the next is refused.
    let waiting = tokio::spawn({
        let to = to.clone();
        async move { h1_to(&to, "queueing", "/after").await }
    });
    let limits = proxy.upstreams.limits(&Arc::from("queueing"));
    for _ in 0..250 {
        if limits.count(Counter::Pending) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(limits.count(Counter::Pending), 1);
    let r = h1_to(&to, "queueing", "/").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.body);

    for slow in [slow_refusing, slow_queueing, slow_one_request] {
        assert_eq!(slow.await.expect("join").status, StatusCode::OK);
    }
    let r = waiting.await.expect("join");
    assert_eq!(
        (r.status, r.body.as_str()),
        (StatusCode::OK, "HTTP/1.1 /after host=queueing")
    );
    // The connection is free again.
    assert_eq!(h1_to(&to, "refusing", "/").await.status, StatusCode::OK);

    // max_retries 0: the flaky app's first 503 is the answer, no retry is made.
    let r = h1_to(&to, "no-retry", "/").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(flaky.load(Ordering::SeqCst), 1);

    let stats = proxy.metrics.stats_text(Some("overflow"));
    assert_eq!(
        stats,
        "cluster.no-retry.upstream_rq_retry_overflow: 1\n\
         cluster.one-request.upstream_rq_active_overflow: 1\n\
         cluster.queueing.upstream_cx_overflow: 2\n\
         cluster.queueing.upstream_rq_pending_overflow: 1\n\
         cluster.refusing.upstream_cx_overflow: 1\n\
         cluster.refusing.upstream_rq_pending_overflow: 1\n"
    );
}

const PER_CONNECTION: &str = "127.0.25.1";
const PER_CONNECTION_APP: &str = "127.0.25.2";

/// The app, counting the connections it accepts.
async fn serve_counting(addr: &str) -> Arc<AtomicUsize> {
    serve_counting_on(TcpListener::bind(addr).await.expect("bind app"))
}

/// [`serve_counting`] on a socket already bound (to a port the system picked).
fn serve_counting_on(listener: TcpListener) -> Arc<AtomicUsize> {
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), hyper::service::service_fn(app))
                    .await;
            });
        }
    });
    accepted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_requests_per_connection_closes_connections() {
    use v1::UpstreamProtocol::{Http1, Http2};
    let ports = [18090, 18091, 18092];
    let mut accepted = Vec::new();
    for port in ports {
        accepted.push(serve_counting(&format!("{PER_CONNECTION_APP}:{port}")).await);
    }
    let per_connection = |n| {
        breakers(v1::CircuitBreakers {
            max_requests_per_connection: Some(n),
            ..Default::default()
        })
    };
    let names = ["pooled", "one-each", "h2-two-each"];
    let routes = v1::RouteConfiguration {
        name: "outbound".into(),
        virtual_hosts: names
            .iter()
            .map(|n| vhost(n, vec![route(prefix("/"), n, None, None)]))
            .collect(),
    };
    let outbound = v1::Listener {
        name: "outbound-listener".into(),
        address: addr(PER_CONNECTION, 15001),
        direction: v1::TrafficDirection::Outbound as i32,
        filter_chains: vec![http_chain("explicit-http", 15001, "outbound")],
        tracing: None,
    };
    let mut set = Set::default()
        .add(type_url::CLUSTER, "pooled", &eds("pooled", Http1, None))
        .add(
            type_url::CLUSTER,
            "one-each",
            &eds("one-each", Http1, per_connection(1)),
        )
        .add(
            type_url::CLUSTER,
            "h2-two-each",
            &eds("h2-two-each", Http2, per_connection(2)),
        );
    for (name, port) in names.iter().zip(ports) {
        set = set.add(
            type_url::CLUSTER_LOAD_ASSIGNMENT,
            name,
            &cla(name, &[(PER_CONNECTION_APP, port, false)]),
        );
    }
    let set = set
        .add(type_url::ROUTE_CONFIGURATION, "outbound", &routes)
        .add(type_url::LISTENER, "outbound-listener", &outbound)
        .0;
    let _proxy = start_sidecar(set).await;
    let to = format!("{PER_CONNECTION}:15001");
    wait_port(to.parse().expect("addr")).await;

    for name in names {
        for i in 0..4 {
            let r = h1_to(&to, name, "/").await;
            assert_eq!(r.status, StatusCode::OK, "{name} request {i}: {}", r.body);
        }
    }
    let seen: Vec<usize> = accepted.iter().map(|a| a.load(Ordering::SeqCst)).collect();
    // Kept alive without a limit; a new connection per request with 1; per two streams with 2.
    assert_eq!(seen, [1, 4, 2]);
}

const TCP_LIMIT: &str = "127.0.26.1";
const TCP_LIMIT_APP: &str = "127.0.26.2";

/// Sends a line and reads the answer: `None` when the connection is closed instead.
async fn echo_line(stream: &mut TcpStream, text: &str) -> Option<String> {
    let (r, mut w) = stream.split();
    let _ = w.write_all(format!("{text}\n").as_bytes()).await;
    let mut line = String::new();
    let n = tokio::time::timeout(
        Duration::from_secs(5),
        BufReader::new(r).read_line(&mut line),
    )
    .await
    .expect("an answer or a close in time")
    .unwrap_or(0);
    (n > 0).then_some(line)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_max_connections_closes_the_extra_client() {
    serve_echo(&format!("{TCP_LIMIT_APP}:{ECHO_PORT}")).await;
    let tcp = v1::Listener {
        name: "outbound-tcp:demo/echo|9000".into(),
        address: addr(TCP_LIMIT, 9000),
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
        tracing: None,
    };
    let set = Set::default()
        .add(
            type_url::CLUSTER,
            "echo",
            &eds(
                "echo",
                v1::UpstreamProtocol::Tcp,
                breakers(v1::CircuitBreakers {
                    max_connections: Some(1),
                    ..Default::default()
                }),
            ),
        )
        .add(
            type_url::CLUSTER_LOAD_ASSIGNMENT,
            "echo",
            &cla("echo", &[(TCP_LIMIT_APP, ECHO_PORT, false)]),
        )
        .add(type_url::LISTENER, "outbound-tcp:demo/echo|9000", &tcp)
        .0;
    let proxy = start_sidecar(set).await;
    let to = format!("{TCP_LIMIT}:9000");
    wait_port(to.parse().expect("addr")).await;
    // wait_port's own connection is relayed too; it must be gone before counting. It is first
    // seen taking the slot (counted as an upstream request), or, handled late, it could take the
    // slot from the first client below, or overflow in place of the second.
    let limits = proxy.upstreams.limits(&Arc::from("echo"));
    for _ in 0..250 {
        let relayed = proxy
            .metrics
            .stats_text(Some("cluster.echo.upstream_rq_total"))
            .contains("upstream_rq_total: 1");
        if relayed && limits.count(Counter::Connections) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let mut first = TcpStream::connect(&to).await.expect("connect");
    assert_eq!(
        echo_line(&mut first, "one").await.as_deref(),
        Some("echo: one\n")
    );
    let mut second = TcpStream::connect(&to).await.expect("connect");
    assert_eq!(
        echo_line(&mut second, "two").await,
        None,
        "second connection relayed"
    );
    let stats = proxy.metrics.stats_text(Some("upstream_cx_overflow"));
    assert_eq!(stats, "cluster.echo.upstream_cx_overflow: 1\n");

    // Once the first closes, a new client is relayed again.
    drop(first);
    for _ in 0..250 {
        if limits.count(Counter::Connections) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut third = TcpStream::connect(&to).await.expect("connect");
    assert_eq!(
        echo_line(&mut third, "three").await.as_deref(),
        Some("echo: three\n")
    );
}

// === Ingress from outside the mesh: chains by source range and transport ===

/// The inbound listener (15003) and the server-first listener (3306) of the sidecar.
const INGRESS_SIDECAR: &str = "127.0.27.1";
const INGRESS_APP: &str = "127.0.27.2";
/// The one client address the ingress route (and the server-first chain) admits.
const INGRESS_CLIENT: &str = "127.0.27.10";
/// In the ingress chain's /24, not in the route's /32.
const NEIGHBOUR_CLIENT: &str = "127.0.27.11";
/// Outside the ingress chain's /24.
const OUTSIDE_CLIENT: &str = "127.0.26.10";
const SERVER_FIRST_PORT: u32 = 3306;

fn sources(ranges: &[&str]) -> Option<v1::AllowedSources> {
    Some(v1::AllowedSources {
        any: false,
        identities: vec![],
        source_ip_ranges: ranges.iter().map(|r| r.to_string()).collect(),
        principals: vec![],
        principals_from: vec![],
    })
}

fn local_cluster(name: &str, protocol: v1::UpstreamProtocol, port: u32) -> v1::Cluster {
    v1::Cluster {
        discovery: Some(v1::cluster::Discovery::StaticLocal(v1::StaticLocal {
            address: addr(INGRESS_APP, port),
        })),
        ..cluster(name, protocol, None)
    }
}

fn tcp_chain(
    name: &str,
    protocol: v1::Protocol,
    m: v1::FilterChainMatch,
    cluster: &str,
    allowed: Option<v1::AllowedSources>,
) -> v1::FilterChain {
    v1::FilterChain {
        name: name.into(),
        r#match: Some(m),
        protocol: protocol as i32,
        target: Some(v1::filter_chain::Target::Tcp(v1::TcpTarget {
            clusters: wc(cluster),
            connect_authority: String::new(),
        })),
        allowed_sources: allowed,
        tls: None,
    }
}

/// An inbound listener as the native adapter lays it out with an IngressBackend: a chain for
/// TLS (here passed through to an echo app, standing in for the mTLS chain) first, then the
/// plaintext ingress chain for the clients' /24 routed by `ingress`, which admits one /32; and
/// a server-first TCP listener, whose only chain names no transport, admitting that /32.
fn ingress_resources() -> ResourceSet {
    use v1::UpstreamProtocol::{Http1, Tcp};
    let tls = tcp_chain(
        "target-port:9000",
        v1::Protocol::Tcp,
        v1::FilterChainMatch {
            destination_port: 15003,
            transport_protocol: v1::TransportProtocol::Tls as i32,
            ..Default::default()
        },
        "echo|local",
        any(),
    );
    let mut ingress = http_chain("ingress-http", 15003, "ingress");
    if let Some(m) = ingress.r#match.as_mut() {
        m.source_ip_ranges = vec!["127.0.27.0/24".into()];
        m.transport_protocol = v1::TransportProtocol::Plaintext as i32;
    }
    let inbound = v1::Listener {
        name: "inbound-listener".into(),
        address: addr(INGRESS_SIDECAR, 15003),
        direction: v1::TrafficDirection::Inbound as i32,
        filter_chains: vec![tls, ingress],
        tracing: None,
    };
    let routes = v1::RouteConfiguration {
        name: "ingress".into(),
        virtual_hosts: vec![vhost(
            "web",
            vec![route(
                prefix("/"),
                "web|local",
                None,
                sources(&[&format!("{INGRESS_CLIENT}/32")]),
            )],
        )],
    };
    let server_first = v1::Listener {
        name: "inbound-server-first".into(),
        address: addr(INGRESS_SIDECAR, SERVER_FIRST_PORT),
        direction: v1::TrafficDirection::Inbound as i32,
        filter_chains: vec![tcp_chain(
            "target-port:3306",
            v1::Protocol::TcpServerFirst,
            v1::FilterChainMatch::default(),
            "db|local",
            sources(&[&format!("{INGRESS_CLIENT}/32")]),
        )],
        tracing: None,
    };
    Set::default()
        .add(
            type_url::CLUSTER,
            "web|local",
            &local_cluster("web|local", Http1, APP_PORT),
        )
        .add(
            type_url::CLUSTER,
            "echo|local",
            &local_cluster("echo|local", Tcp, ECHO_PORT),
        )
        .add(
            type_url::CLUSTER,
            "db|local",
            &local_cluster("db|local", Tcp, SERVER_FIRST_PORT),
        )
        .add(type_url::ROUTE_CONFIGURATION, "ingress", &routes)
        .add(type_url::LISTENER, "inbound-listener", &inbound)
        .add(type_url::LISTENER, "inbound-server-first", &server_first)
        .0
}

/// A connection to `to` from the loopback address `from`.
async fn connect_from(from: &str, to: &str) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    let from: std::net::IpAddr = from.parse().expect("ip");
    socket.bind(SocketAddr::new(from, 0)).expect("bind client");
    socket
        .connect(to.parse().expect("addr"))
        .await
        .expect("connect")
}

/// A GET over a new HTTP/1.1 connection from `from`; `Err` when the connection is closed
/// without an answer.
async fn h1_from(from: &str, to: &str, host: &str, path: &str) -> Result<Reply, hyper::Error> {
    let stream = connect_from(from, to).await;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = Request::builder()
        .uri(path)
        .header("host", host)
        .body(Empty::<Bytes>::new())
        .expect("request");
    let response = sender.send_request(req).await?;
    Ok(collect(response).await)
}

/// A server-first app: greets each client before reading anything, then holds the connection.
async fn serve_greeter(addr: &str) {
    let listener = TcpListener::bind(addr).await.expect("bind greeter");
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let _ = stream.write_all(b"220 ready\n").await;
                let mut sink = tokio::io::sink();
                let _ = tokio::io::copy(&mut stream, &mut sink).await;
            });
        }
    });
}

/// Reads one line without sending anything first: `None` when the connection is closed.
async fn greeting(stream: &mut TcpStream, within: Duration) -> Option<String> {
    let mut line = String::new();
    let n = tokio::time::timeout(within, BufReader::new(stream).read_line(&mut line))
        .await
        .expect("a greeting or a close in time")
        .unwrap_or(0);
    (n > 0).then_some(line)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingress_chains_match_source_ranges_and_transport() {
    serve_http(&format!("{INGRESS_APP}:{APP_PORT}"), None).await;
    serve_echo(&format!("{INGRESS_APP}:{ECHO_PORT}")).await;
    serve_greeter(&format!("{INGRESS_APP}:{SERVER_FIRST_PORT}")).await;
    let _proxy = start_sidecar(ingress_resources()).await;
    let inbound = format!("{INGRESS_SIDECAR}:15003");
    let server_first = format!("{INGRESS_SIDECAR}:{SERVER_FIRST_PORT}");
    wait_port(inbound.parse().expect("addr")).await;
    wait_port(server_first.parse().expect("addr")).await;

    // A client that sends nothing cannot be told TLS from plaintext: closed after 5 s.
    let silent = tokio::spawn({
        let inbound = inbound.clone();
        async move {
            let mut stream = connect_from(INGRESS_CLIENT, &inbound).await;
            let started = Instant::now();
            let line = greeting(&mut stream, Duration::from_secs(10)).await;
            (line, started.elapsed())
        }
    });

    // (1) Plaintext HTTP from the admitted address: the ingress chain, the route admits it.
    let r = h1_from(INGRESS_CLIENT, &inbound, "web", "/hello")
        .await
        .expect("answered");
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(r.body.contains("/hello host=web"), "{}", r.body);

    // (2) In the chain's /24 but not the route's /32: the chain matches, the route refuses.
    let r = h1_from(NEIGHBOUR_CLIENT, &inbound, "web", "/hello")
        .await
        .expect("answered");
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.body, "RBAC: access denied");
    // Outside the /24: no chain matches a plaintext connection, which is closed.
    let closed = h1_from(OUTSIDE_CLIENT, &inbound, "web", "/hello").await;
    assert!(
        closed.is_err(),
        "outside client answered {:?}",
        closed.map(|r| r.status)
    );

    // (3) The first bytes of a TLS handshake from the admitted address go to the TLS chain (the
    // echo app), not to the plaintext HTTP chain its address also matches.
    let mut hello = connect_from(INGRESS_CLIENT, &inbound).await;
    assert_eq!(
        echo_line(&mut hello, "\u{16}\u{3}\u{1}client-hello")
            .await
            .as_deref(),
        Some("echo: \u{16}\u{3}\u{1}client-hello\n")
    );
    // Whatever its address: the TLS chain names no source range.
    let mut hello = connect_from(OUTSIDE_CLIENT, &inbound).await;
    assert_eq!(
        echo_line(&mut hello, "\u{16}from-outside").await.as_deref(),
        Some("echo: \u{16}from-outside\n")
    );

    // (4) No chain names a transport: nothing is peeked, the server speaks first at once; the
    // TCP chain admits the /32 by address and closes anyone else.
    let mut db = connect_from(INGRESS_CLIENT, &server_first).await;
    assert_eq!(
        greeting(&mut db, Duration::from_secs(2)).await.as_deref(),
        Some("220 ready\n")
    );
    let mut db = connect_from(NEIGHBOUR_CLIENT, &server_first).await;
    assert_eq!(greeting(&mut db, Duration::from_secs(2)).await, None);

    let (line, waited) = silent.await.expect("join");
    assert_eq!(line, None, "a silent client got an answer");
    assert!(
        waited >= Duration::from_millis(4500) && waited < Duration::from_secs(8),
        "closed after {waited:?}"
    );
}

const PASSTHROUGH: &str = "127.0.28.1";
const PASSTHROUGH_APP: &str = "127.0.28.2";
/// The sidecar of the TCP test, which runs alongside.
const PASSTHROUGH_TCP: &str = "127.0.28.3";

/// Egress passthrough (MeshConfig `enableEgress`) as the control plane lays it out: an
/// original-destination cluster `passthrough-outbound` (protocol TCP), reached by the last
/// virtual host of `outbound`, `*`, and by the outbound listener's catch-all TCP chain; next to
/// it an ordinary virtual host.
fn passthrough_resources(sidecar: &str) -> ResourceSet {
    use v1::UpstreamProtocol::{Http1, Tcp};
    let passthrough = v1::Cluster {
        discovery: Some(v1::cluster::Discovery::OriginalDestination(
            v1::OriginalDestination {},
        )),
        ..cluster("passthrough-outbound", Tcp, None)
    };
    let routes = v1::RouteConfiguration {
        name: "outbound".into(),
        virtual_hosts: vec![
            vhost("known", vec![route(prefix("/"), "known", None, None)]),
            v1::VirtualHost {
                domains: vec!["*".into()],
                ..vhost(
                    "passthrough",
                    vec![route(prefix("/"), "passthrough-outbound", None, None)],
                )
            },
        ],
    };
    let outbound = v1::Listener {
        name: "outbound-listener".into(),
        address: addr(sidecar, 15001),
        direction: v1::TrafficDirection::Outbound as i32,
        filter_chains: vec![http_chain("explicit-http", 15001, "outbound")],
        tracing: None,
    };
    let tcp = v1::Listener {
        name: "outbound-tcp".into(),
        address: addr(sidecar, 15002),
        direction: v1::TrafficDirection::Outbound as i32,
        filter_chains: vec![tcp_chain(
            "passthrough",
            v1::Protocol::Tcp,
            v1::FilterChainMatch::default(),
            "passthrough-outbound",
            None,
        )],
        tracing: None,
    };
    Set::default()
        .add(type_url::CLUSTER, "passthrough-outbound", &passthrough)
        .add(type_url::CLUSTER, "known", &cluster("known", Http1, None))
        .add(
            type_url::CLUSTER_LOAD_ASSIGNMENT,
            "known",
            &cla("known", &[(PASSTHROUGH_APP, 18101, false)]),
        )
        .add(type_url::ROUTE_CONFIGURATION, "outbound", &routes)
        .add(type_url::LISTENER, "outbound-listener", &outbound)
        .add(type_url::LISTENER, "outbound-tcp", &tcp)
        .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_passthrough_goes_to_the_host_address() {
    let outside = serve_counting(&format!("{PASSTHROUGH_APP}:18100")).await;
    let known = serve_counting(&format!("{PASSTHROUGH_APP}:18101")).await;
    let _proxy = start_sidecar(passthrough_resources(PASSTHROUGH)).await;
    let to = format!("{PASSTHROUGH}:15001");
    wait_port(to.parse().expect("addr")).await;

    // A Host no virtual host has, `<ip>:<port>`: straight to that address, plaintext HTTP/1.1.
    let host = format!("{PASSTHROUGH_APP}:18100");
    let r = h1_to(&to, &host, "/out").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body, format!("HTTP/1.1 /out host={host}"));
    assert_eq!(outside.load(Ordering::SeqCst), 1);
    // HTTP/2 from the client goes out as HTTP/1.1 all the same.
    let r = h2_to(&to, &host, "/out2", false).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body, format!("HTTP/1.1 /out2 host={host}"));
    assert_eq!(known.load(Ordering::SeqCst), 0);

    // An exact host still has its own virtual host.
    let r = h1_to(&to, "known", "/in").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body, "HTTP/1.1 /in host=known");
    assert_eq!(known.load(Ordering::SeqCst), 1);

    // The sidecar resolves no names.
    let r = h1_to(&to, "httpbin.org", "/").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        r.body,
        "no original destination: Host \"httpbin.org\" is not <ip>:<port>"
    );
    let r = h1_to(&to, PASSTHROUGH_APP, "/").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        r.body,
        format!("no original destination: Host \"{PASSTHROUGH_APP}\" is not <ip>:<port>")
    );

    // Its own listener would be a loop: refused without connecting.
    for own in [to.clone(), format!("{PASSTHROUGH}:15002")] {
        let r = h1_to(&to, &own, "/").await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{own}");
        assert!(
            r.body.starts_with(&format!(
                "no original destination: Host \"{own}\" is this sidecar's listener"
            )),
            "{own}: {}",
            r.body
        );
    }

    // Nothing listening there: the usual connection failure.
    let r = h1_to(&to, &format!("{PASSTHROUGH_APP}:18199"), "/").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.body.contains("connection failure"), "{}", r.body);
}

/// In explicit mode a connection has no original destination: the catch-all TCP chain closes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_passthrough_without_original_destination_closes() {
    let _proxy = start_sidecar(passthrough_resources(PASSTHROUGH_TCP)).await;
    let to: SocketAddr = format!("{PASSTHROUGH_TCP}:15002").parse().expect("addr");
    wait_port(to).await;
    let mut stream = TcpStream::connect(to).await.expect("connect");
    assert_eq!(echo_line(&mut stream, "hello").await, None);
}

// === DNS clusters (egress to a name) and server-name (SNI) chains ===

/// The sidecar of the DNS-cluster HTTP test.
const DNS_SIDECAR: &str = "127.0.29.1";
/// The sidecar of the SNI test.
const SNI_SIDECAR: &str = "127.0.29.2";
/// A name that never resolves (RFC 2606).
const NO_SUCH_HOST: &str = "no-such-host.invalid";

/// A DNS cluster for `host:port`, as the control plane makes one for an Egress policy.
fn dns_cluster(
    name: &str,
    protocol: v1::UpstreamProtocol,
    host: &str,
    port: u16,
    b: Option<v1::CircuitBreakers>,
) -> v1::Cluster {
    v1::Cluster {
        discovery: Some(v1::cluster::Discovery::Dns(v1::DnsName {
            host: host.into(),
            port: port.into(),
        })),
        circuit_breakers: b,
        ..cluster(name, protocol, None)
    }
}

/// A plain HTTP app on 127.0.0.1 (where `localhost` resolves), on a port the system picks.
async fn serve_counting_on_localhost() -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
    let port = listener.local_addr().expect("addr").port();
    (port, serve_counting_on(listener))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_routes_reach_a_dns_cluster_by_name() {
    use v1::UpstreamProtocol::Http1;
    let (port, accepted) = serve_counting_on_localhost().await;
    let routes = v1::RouteConfiguration {
        name: "outbound".into(),
        virtual_hosts: vec![
            vhost(
                "web",
                vec![route(prefix("/"), "egress|localhost", None, None)],
            ),
            vhost(
                "nowhere",
                vec![route(prefix("/"), "egress|nowhere", None, None)],
            ),
            vhost(
                "limited",
                vec![route(prefix("/"), "egress|limited", None, None)],
            ),
        ],
    };
    let outbound = v1::Listener {
        name: "outbound-listener".into(),
        address: addr(DNS_SIDECAR, 15001),
        direction: v1::TrafficDirection::Outbound as i32,
        filter_chains: vec![http_chain("explicit-http", 15001, "outbound")],
        tracing: None,
    };
    let no_requests = breakers(v1::CircuitBreakers {
        max_requests: Some(0),
        ..Default::default()
    });
    let set = Set::default()
        .add(
            type_url::CLUSTER,
            "egress|localhost",
            &dns_cluster("egress|localhost", Http1, "localhost", port, None),
        )
        .add(
            type_url::CLUSTER,
            "egress|nowhere",
            &dns_cluster("egress|nowhere", Http1, NO_SUCH_HOST, 80, None),
        )
        .add(
            type_url::CLUSTER,
            "egress|limited",
            &dns_cluster("egress|limited", Http1, "localhost", port, no_requests),
        )
        .add(type_url::ROUTE_CONFIGURATION, "outbound", &routes)
        .add(type_url::LISTENER, "outbound-listener", &outbound)
        .0;
    let proxy = start_sidecar(set).await;
    let to = format!("{DNS_SIDECAR}:15001");
    wait_port(to.parse().expect("addr")).await;

    // The name resolves to the app: plaintext HTTP/1.1 there, the client's Host kept.
    let r = h1_to(&to, "web", "/hello").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body, "HTTP/1.1 /hello host=web");
    assert!(accepted.load(Ordering::SeqCst) >= 1);
    // HTTP/2 from the client goes out as HTTP/1.1, Host from :authority.
    let r = h2_to(&to, "web", "/h2", false).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body, "HTTP/1.1 /h2 host=web");
    let reached = accepted.load(Ordering::SeqCst);

    // A name without addresses: 503 saying so, counted as a connect failure.
    let r = h1_to(&to, "nowhere", "/").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        r.body
            .contains(&format!("name \"{NO_SUCH_HOST}\" could not be resolved")),
        "{}",
        r.body
    );
    assert_eq!(
        proxy.metrics.stats_text(Some("upstream_cx_connect_fail")),
        "cluster.egress|nowhere.upstream_cx_connect_fail: 1\n"
    );
    assert!(
        proxy
            .metrics
            .stats_text(Some("cluster.egress|nowhere.upstream_rq_5xx"))
            .contains("upstream_rq_5xx: 1"),
        "{}",
        proxy.metrics.stats_text(Some("egress|nowhere"))
    );

    // Circuit breakers hold for a DNS cluster as for any: no request may be in flight.
    let r = h1_to(&to, "limited", "/").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.body.ends_with("reset reason: overflow"), "{}", r.body);
    assert_eq!(
        proxy
            .metrics
            .stats_text(Some("egress|limited.upstream_rq_active_overflow")),
        "cluster.egress|limited.upstream_rq_active_overflow: 1\n"
    );
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        reached,
        "the app was reached"
    );
}

/// A TLS server on 127.0.0.1 with a self-signed certificate for `localhost`, echoing lines;
/// returns its port, the certificate to trust, and a count of the connections it accepts.
async fn serve_tls_echo_on_localhost() -> (
    u16,
    rustls::pki_types::CertificateDer<'static>,
    Arc<AtomicUsize>,
) {
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("certificate");
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(signing_key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(vec![cert.der().clone()], key)
    .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind TLS app");
    let port = listener.local_addr().expect("addr").port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            count.fetch_add(1, Ordering::SeqCst);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(stream).await else {
                    return;
                };
                let (r, mut w) = tokio::io::split(stream);
                let mut lines = BufReader::new(r).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if w.write_all(format!("echo: {line}\n").as_bytes())
                        .await
                        .is_err()
                        || w.flush().await.is_err()
                    {
                        break;
                    }
                }
            });
        }
    });
    (port, cert.der().clone(), accepted)
}

/// A rustls client trusting only `trusted`, connecting to `to` with SNI `server`: the line
/// the server echoes to `ping`, or the handshake's error.
async fn tls_ping(
    to: &str,
    server: &str,
    trusted: &rustls::pki_types::CertificateDer<'static>,
) -> Result<String, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trusted.clone()).expect("trust");
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(server.to_string()).expect("name");
    let tcp = TcpStream::connect(to).await.expect("connect");
    let handshake = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp);
    let stream = tokio::time::timeout(Duration::from_secs(5), handshake)
        .await
        .map_err(|_| "handshake timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let (r, mut w) = tokio::io::split(stream);
    w.write_all(b"ping\n").await.map_err(|e| e.to_string())?;
    w.flush().await.map_err(|e| e.to_string())?;
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(5),
        BufReader::new(r).read_line(&mut line),
    )
    .await
    .map_err(|_| "no answer".to_string())?
    .map_err(|e| e.to_string())?;
    Ok(line)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_chain_picked_by_server_name_relays_tls_to_a_dns_cluster() {
    let (port, trusted, accepted) = serve_tls_echo_on_localhost().await;
    let egress = v1::Listener {
        name: "egress-tls".into(),
        address: addr(SNI_SIDECAR, 8443),
        direction: v1::TrafficDirection::Outbound as i32,
        filter_chains: vec![tcp_chain(
            "localhost",
            v1::Protocol::Tcp,
            v1::FilterChainMatch {
                server_names: vec!["localhost".into()],
                ..Default::default()
            },
            "egress|localhost:tls",
            None,
        )],
        tracing: None,
    };
    let set = Set::default()
        .add(
            type_url::CLUSTER,
            "egress|localhost:tls",
            &dns_cluster(
                "egress|localhost:tls",
                v1::UpstreamProtocol::Tcp,
                "localhost",
                port,
                None,
            ),
        )
        .add(type_url::LISTENER, "egress-tls", &egress)
        .add(
            type_url::CLUSTER,
            "egress|nowhere:tls",
            &dns_cluster(
                "egress|nowhere:tls",
                v1::UpstreamProtocol::Tcp,
                NO_SUCH_HOST,
                443,
                None,
            ),
        )
        .add(
            type_url::LISTENER,
            "egress-nowhere",
            &v1::Listener {
                name: "egress-nowhere".into(),
                address: addr(SNI_SIDECAR, 8444),
                direction: v1::TrafficDirection::Outbound as i32,
                filter_chains: vec![tcp_chain(
                    "nowhere",
                    v1::Protocol::Tcp,
                    v1::FilterChainMatch::default(),
                    "egress|nowhere:tls",
                    None,
                )],
                tracing: None,
            },
        )
        .0;
    let proxy = start_sidecar(set).await;
    let to = format!("{SNI_SIDECAR}:8443");
    wait_port(to.parse().expect("addr")).await;
    let nowhere: SocketAddr = format!("{SNI_SIDECAR}:8444").parse().expect("addr");
    wait_port(nowhere).await;
    // wait_port's connection sends nothing: it names no server and reaches nobody.

    // SNI `localhost`: the chain matches and the bytes go through unchanged, so the client's
    // handshake with the app (whose certificate it checks) completes through the sidecar.
    assert_eq!(
        tls_ping(&to, "localhost", &trusted).await.as_deref(),
        Ok("echo: ping\n")
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    assert!(
        proxy
            .metrics
            .stats_text(Some("upstream_rq_total"))
            .contains("cluster.egress|localhost:tls.upstream_rq_total: 1"),
        "{}",
        proxy.metrics.stats_text(None)
    );

    // Another server name: no chain matches, the connection is closed before the app.
    let other = tls_ping(&to, "other.example", &trusted).await;
    assert!(other.is_err(), "answered {other:?}");
    // Plaintext names no server either.
    let mut plain = TcpStream::connect(&to).await.expect("connect");
    assert_eq!(echo_line(&mut plain, "hello").await, None);
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "the app was reached");

    // The first again, case aside: still relayed.
    assert_eq!(
        tls_ping(&to, "LocalHost", &trusted).await.as_deref(),
        Ok("echo: ping\n")
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    assert_eq!(
        proxy
            .metrics
            .stats_text(Some("egress|localhost:tls.upstream_cx_connect_fail")),
        ""
    );

    // A TCP chain to a name that does not resolve: the client is closed, a connect failure
    // counted. (wait_port's connection was one already: it is relayed at once, names or not.)
    let mut stream = TcpStream::connect(nowhere).await.expect("connect");
    assert_eq!(echo_line(&mut stream, "hello").await, None);
    let counted = || {
        proxy
            .metrics
            .stats_text(Some("egress|nowhere:tls.upstream_cx_connect_fail"))
    };
    for _ in 0..250 {
        if counted().ends_with(": 2\n") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        counted(),
        "cluster.egress|nowhere:tls.upstream_cx_connect_fail: 2\n"
    );
}
