//! mTLS between two in-process sidecars on 127.0.23.x, with certificates from a test mesh CA:
//! the client sidecar's outbound clusters speak TLS to the server sidecar's inbound listener,
//! which checks client certificates and enforces `AllowedSources.identities`; on 127.0.27.2x,
//! an inbound listener whose mTLS chain and plaintext ingress chain are told apart by transport;
//! and, on 127.0.29.x, clients outside the mesh admitted by `AllowedSources.principals`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fsm_dataplane_proto::{type_url, v1};
use fsm_sidecar_proxy::tls::{self, DownstreamTls, Secrets, UpstreamTls};
use fsm_sidecar_proxy::upstream::{Alpn, Transport, connect};
use fsm_sidecar_proxy::{Config, Metrics, Proxy, RateLimits, Store, Upstreams, Workload};
use fsm_sidecar_xds::{RawResource, ResourceSet};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

const CLIENT: &str = "127.0.23.1";
const SERVER: &str = "127.0.23.2";
const APP_PORT: u32 = 18080;
const ECHO_PORT: u32 = 19000;
const SNI: &str = "httpbin.demo.svc.cluster.local";
const OUT_CA: &str = "root-cert-for-mtls-outbound:demo/httpbin";

// === Test PKI ===

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

fn ca(cn: &str) -> Ca {
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.distinguished_name.push(DnType::CommonName, cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key).expect("root");
    Ca {
        pem: cert.pem(),
        issuer: Issuer::new(params, key),
    }
}

/// A service certificate as the mesh issues it: CN `<sa>.<ns>.cluster.local`, one SPIFFE URI
/// SAN, server and client auth, no DNS SAN.
fn leaf(ca: &Ca, sa: &str, ns: &str) -> (String, String) {
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params
        .distinguished_name
        .push(DnType::CommonName, format!("{sa}.{ns}.cluster.local"));
    params.subject_alt_names = vec![SanType::URI(
        format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")
            .try_into()
            .expect("uri"),
    )];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    let cert = params.signed_by(&key, &ca.issuer).expect("leaf");
    (cert.pem(), key.serialize_pem())
}

/// An xDS bootstrap certificate as the controller issues it, from the same CA: CN
/// `<uuid>.sidecar.<sa>.<ns>`, no SAN, client auth only. It is for the ADS server alone.
fn bootstrap_leaf(ca: &Ca, sa: &str, ns: &str) -> (String, String) {
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.distinguished_name.push(
        DnType::CommonName,
        format!("0f9e3a52-2d4b-4c64-9a39-0c6f6fd1b6a5.sidecar.{sa}.{ns}"),
    );
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    let cert = params.signed_by(&key, &ca.issuer).expect("leaf");
    (cert.pem(), key.serialize_pem())
}

fn cert_secret(name: &str, (chain, key): &(String, String)) -> v1::Secret {
    v1::Secret {
        name: name.into(),
        kind: Some(v1::secret::Kind::TlsCertificate(v1::TlsCertificate {
            certificate_chain: chain.clone().into_bytes(),
            private_key: key.clone().into_bytes(),
        })),
    }
}

fn ca_secret(name: &str, pem: &str, sans: &[&str]) -> v1::Secret {
    v1::Secret {
        name: name.into(),
        kind: Some(v1::secret::Kind::ValidationContext(v1::ValidationContext {
            trusted_ca: pem.as_bytes().to_vec(),
            match_subject_alt_names: sans.iter().map(|s| s.to_string()).collect(),
        })),
    }
}

fn sid(sa: &str, ns: &str) -> v1::ServiceIdentity {
    v1::ServiceIdentity {
        service_account: sa.into(),
        namespace: ns.into(),
    }
}

struct Pki {
    mesh: Ca,
    curl: (String, String),
    httpbin: (String, String),
}

fn pki() -> Pki {
    let mesh = ca("fsm-ca.flomesh.io");
    let curl = leaf(&mesh, "curl", "demo");
    let httpbin = leaf(&mesh, "httpbin", "demo");
    Pki {
        mesh,
        curl,
        httpbin,
    }
}

// === Resources ===

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

fn route(
    path: v1::route_match::Path,
    cluster: &str,
    allowed: Option<v1::AllowedSources>,
) -> v1::Route {
    v1::Route {
        r#match: Some(v1::RouteMatch {
            path: Some(path),
            ..Default::default()
        }),
        action: Some(v1::RouteAction {
            clusters: wc(cluster),
            ..Default::default()
        }),
        allowed_sources: allowed,
        rate_limit: None,
    }
}

fn prefix() -> v1::route_match::Path {
    v1::route_match::Path::Prefix("/".into())
}

fn vhost(name: &str, routes: Vec<v1::Route>) -> v1::VirtualHost {
    v1::VirtualHost {
        name: name.into(),
        domains: vec![name.into()],
        routes,
        rate_limit: None,
    }
}

fn identities(ids: &[(&str, &str)]) -> Option<v1::AllowedSources> {
    Some(v1::AllowedSources {
        any: false,
        identities: ids.iter().map(|(sa, ns)| sid(sa, ns)).collect(),
        source_ip_ranges: vec![],
        principals: vec![],
        principals_from: vec![],
    })
}

fn cluster(
    name: &str,
    protocol: v1::UpstreamProtocol,
    local: Option<u32>,
    tls: Option<v1::UpstreamTls>,
) -> v1::Cluster {
    v1::Cluster {
        name: name.into(),
        discovery: Some(match local {
            None => v1::cluster::Discovery::Eds(v1::EdsDiscovery {}),
            Some(port) => v1::cluster::Discovery::StaticLocal(v1::StaticLocal {
                address: addr(SERVER, port),
            }),
        }),
        connect_timeout: Some(prost_types::Duration {
            seconds: 2,
            nanos: 0,
        }),
        upstream_protocol: protocol as i32,
        tls,
        ..Default::default()
    }
}

fn upstream_tls(validation: &str, ids: &[(&str, &str)]) -> Option<v1::UpstreamTls> {
    Some(v1::UpstreamTls {
        certificate_secret: "service-cert:demo/curl".into(),
        validation_secret: validation.into(),
        sni: SNI.into(),
        server_identities: ids.iter().map(|(sa, ns)| sid(sa, ns)).collect(),
    })
}

fn meshed(name: &str) -> v1::ClusterLoadAssignment {
    v1::ClusterLoadAssignment {
        cluster_name: name.into(),
        endpoints: vec![v1::Endpoint {
            address: addr(SERVER, 15003),
            weight: 1,
            meshed: true,
            identity: Some(sid("httpbin", "demo")),
            workload: None,
        }],
    }
}

fn http_chain(
    port: u32,
    rc: &str,
    tls: Option<v1::DownstreamTls>,
    allowed: Option<v1::AllowedSources>,
) -> v1::FilterChain {
    v1::FilterChain {
        name: "explicit-http".into(),
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
        allowed_sources: allowed,
        tls,
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

    fn secret(self, s: &v1::Secret) -> Self {
        let name = s.name.clone();
        self.add(type_url::SECRET, &name, s)
    }
}

fn client_resources(pki: &Pki) -> ResourceSet {
    use v1::UpstreamProtocol::{Http1, Http2, Tcp};
    let ok = upstream_tls(OUT_CA, &[("httpbin", "demo")]);
    let routes = v1::RouteConfiguration {
        name: "outbound".into(),
        virtual_hosts: ["web", "grpc", "denied", "wrong", "waiting"]
            .iter()
            .map(|n| vhost(n, vec![route(prefix(), n, None)]))
            .collect(),
    };
    let outbound = v1::Listener {
        name: "outbound-listener".into(),
        address: addr(CLIENT, 15001),
        direction: v1::TrafficDirection::Outbound as i32,
        filter_chains: vec![http_chain(15001, "outbound", None, None)],
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
    let mut set = Set::default()
        .add(
            type_url::CLUSTER,
            "web",
            &cluster("web", Http1, None, ok.clone()),
        )
        .add(
            type_url::CLUSTER,
            "grpc",
            &cluster("grpc", Http2, None, ok.clone()),
        )
        .add(
            type_url::CLUSTER,
            "denied",
            &cluster("denied", Http1, None, ok.clone()),
        )
        .add(type_url::CLUSTER, "echo", &cluster("echo", Tcp, None, ok))
        .add(
            type_url::CLUSTER,
            "wrong",
            &cluster(
                "wrong",
                Http1,
                None,
                upstream_tls(OUT_CA, &[("notbin", "demo")]),
            ),
        )
        .add(
            type_url::CLUSTER,
            "waiting",
            &cluster(
                "waiting",
                Http1,
                None,
                upstream_tls("root-cert-for-mtls-outbound:demo/later", &[]),
            ),
        );
    for name in ["web", "grpc", "denied", "echo", "wrong", "waiting"] {
        set = set.add(type_url::CLUSTER_LOAD_ASSIGNMENT, name, &meshed(name));
    }
    set.add(type_url::ROUTE_CONFIGURATION, "outbound", &routes)
        .add(type_url::LISTENER, "outbound-listener", &outbound)
        .add(type_url::LISTENER, "outbound-tcp:demo/echo|9000", &tcp)
        .secret(&cert_secret("service-cert:demo/curl", &pki.curl))
        .secret(&ca_secret(
            OUT_CA,
            &pki.mesh.pem,
            &["spiffe://cluster.local/ns/demo/sa/httpbin"],
        ))
        .0
}

fn server_resources(pki: &Pki) -> ResourceSet {
    use v1::UpstreamProtocol::{Http1, Http2, Tcp};
    let curl = [("curl", "demo")];
    let routes = v1::RouteConfiguration {
        name: "inbound".into(),
        virtual_hosts: vec![
            vhost("web", vec![route(prefix(), "web|local", identities(&curl))]),
            vhost(
                "grpc",
                vec![route(prefix(), "grpc|local", identities(&curl))],
            ),
            vhost(
                "denied",
                vec![route(
                    prefix(),
                    "web|local",
                    identities(&[("bookbuyer", "demo")]),
                )],
            ),
            v1::VirtualHost {
                name: "echo".into(),
                domains: vec!["echo.demo.svc.cluster.local:9000".into()],
                routes: vec![route(
                    v1::route_match::Path::Connect(v1::ConnectMatch {}),
                    "echo|local",
                    identities(&curl),
                )],
                rate_limit: None,
            },
        ],
    };
    let inbound = v1::Listener {
        name: "inbound-listener".into(),
        address: addr(SERVER, 15003),
        direction: v1::TrafficDirection::Inbound as i32,
        filter_chains: vec![http_chain(
            15003,
            "inbound",
            Some(v1::DownstreamTls {
                certificate_secret: "service-cert:demo/httpbin".into(),
                validation_secret: "root-cert-for-mtls-inbound:demo/httpbin".into(),
                require_client_certificate: true,
            }),
            None,
        )],
        tracing: None,
    };
    Set::default()
        .add(
            type_url::CLUSTER,
            "web|local",
            &cluster("web|local", Http1, Some(APP_PORT), None),
        )
        .add(
            type_url::CLUSTER,
            "grpc|local",
            &cluster("grpc|local", Http2, Some(APP_PORT), None),
        )
        .add(
            type_url::CLUSTER,
            "echo|local",
            &cluster("echo|local", Tcp, Some(ECHO_PORT), None),
        )
        .add(type_url::ROUTE_CONFIGURATION, "inbound", &routes)
        .add(type_url::LISTENER, "inbound-listener", &inbound)
        .secret(&cert_secret("service-cert:demo/httpbin", &pki.httpbin))
        .secret(&ca_secret(
            "root-cert-for-mtls-inbound:demo/httpbin",
            &pki.mesh.pem,
            &[],
        ))
        .0
}

// === Harness ===

async fn start_sidecar(resources: ResourceSet) -> Arc<Proxy> {
    let config = Config::build(&resources, type_url::SECRET).expect("valid config");
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

async fn app(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::new(Full::new(Bytes::from(format!(
        "{:?} {}",
        req.version(),
        req.uri().path()
    )))))
}

async fn serve_app(addr: &str) {
    let listener = TcpListener::bind(addr).await.expect("bind app");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), hyper::service::service_fn(app))
                    .await;
            });
        }
    });
}

async fn serve_echo(addr: &str) {
    let listener = TcpListener::bind(addr).await.expect("bind echo");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
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

/// A plaintext request from the client app to its sidecar's outbound listener.
async fn plain_get(host: &str) -> (StatusCode, String) {
    let stream = TcpStream::connect((CLIENT, 15001)).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let req = Request::builder()
        .uri("/get")
        .header("host", host)
        .body(Empty::<Bytes>::new())
        .expect("request");
    let response = sender.send_request(req).await.expect("response");
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// A TLS client built with the sidecar's own upstream TLS code, as a peer sidecar connects.
fn transport(cert: &(String, String), trusted: &str, ids: &[(&str, &str)]) -> Transport {
    let mut secrets = Secrets::default();
    secrets.add(cert_secret("cert", cert)).expect("cert secret");
    secrets
        .add(ca_secret("ca", trusted, &[]))
        .expect("ca secret");
    let tls = v1::UpstreamTls {
        certificate_secret: "cert".into(),
        validation_secret: "ca".into(),
        sni: SNI.into(),
        server_identities: ids.iter().map(|(sa, ns)| sid(sa, ns)).collect(),
    };
    match tls::upstream(&tls, &secrets).expect("tls") {
        UpstreamTls::Ready(tls) => Transport::Tls { tls, expect: None },
        UpstreamTls::Missing(s) => panic!("missing {s}"),
    }
}

/// GET `/get` for `host` over an open connection, as HTTP/1.1; the status and body.
async fn get_over<S>(stream: S, host: &str) -> Result<(StatusCode, String), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // A peer that neither answers nor closes must fail the test, not hang the suite.
    tokio::time::timeout(Duration::from_secs(10), get_over_unbounded(stream, host))
        .await
        .map_err(|_| format!("no answer for host {host} within 10 s"))?
}

async fn get_over_unbounded<S>(stream: S, host: &str) -> Result<(StatusCode, String), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = Request::builder()
        .uri("/get")
        .header("host", host)
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// An HTTP/1.1 request straight to the server sidecar's mTLS inbound listener.
async fn tls_get(transport: &Transport, host: &str) -> Result<(StatusCode, String), String> {
    tls_get_to(SERVER, transport, host).await
}

/// An HTTP/1.1 request over TLS to the inbound listener on `server`.
async fn tls_get_to(
    server: &str,
    transport: &Transport,
    host: &str,
) -> Result<(StatusCode, String), String> {
    let server: SocketAddr = format!("{server}:15003").parse().expect("addr");
    let stream = connect(server, Duration::from_secs(2), transport, Alpn::Http1)
        .await
        .map_err(|e| e.to_string())?;
    get_over(stream, host).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_speak_mtls_and_enforce_identities() {
    let pki = pki();
    serve_app(&format!("{SERVER}:{APP_PORT}")).await;
    serve_echo(&format!("{SERVER}:{ECHO_PORT}")).await;
    let _client = start_sidecar(client_resources(&pki)).await;
    let server = start_sidecar(server_resources(&pki)).await;
    for a in [
        format!("{CLIENT}:15001"),
        format!("{CLIENT}:9000"),
        format!("{SERVER}:15003"),
    ] {
        wait_port(a.parse().expect("addr")).await;
    }

    // End to end: app -> client sidecar -> mTLS -> server sidecar -> app.
    let (status, body) = plain_get("web").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, "HTTP/1.1 /get");
    // Pooled TLS HTTP/1.1 connections are reused and keep working.
    for _ in 0..3 {
        assert_eq!(plain_get("web").await.0, StatusCode::OK);
    }
    // HTTP/2 cluster over TLS (ALPN h2).
    let (status, body) = plain_get("grpc").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, "HTTP/2.0 /get");

    // The server sidecar knows the client as demo/curl: a route for someone else refuses it.
    let (status, body) = plain_get("denied").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(body, "RBAC: access denied");

    // A server whose identity is not the expected one: connection failure.
    let (status, body) = plain_get("wrong").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("connection failure"), "{body}");

    // A cluster whose validation secret has not arrived fails closed.
    assert_eq!(
        plain_get("waiting").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );

    // TCP in an HTTP/2 CONNECT tunnel over TLS, admitted by identity.
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

    // Good clients straight to the inbound listener: their identity decides.
    let curl = transport(&pki.curl, &pki.mesh.pem, &[("httpbin", "demo")]);
    assert_eq!(
        tls_get(&curl, "web").await.expect("mTLS GET").0,
        StatusCode::OK
    );
    let bookbuyer = transport(
        &leaf(&pki.mesh, "bookbuyer", "demo"),
        &pki.mesh.pem,
        &[("httpbin", "demo")],
    );
    assert_eq!(
        tls_get(&bookbuyer, "web").await.expect("mTLS GET").0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        tls_get(&bookbuyer, "denied").await.expect("mTLS GET").0,
        StatusCode::OK
    );

    // The outbound check of the server identity, directly.
    let err = tls_get(
        &transport(&pki.curl, &pki.mesh.pem, &[("notbin", "demo")]),
        "web",
    )
    .await
    .expect_err("wrong server identity");
    assert!(err.contains("demo/notbin"), "{err}");

    // A client certificate from another CA is refused.
    let foreign = ca("someone-else");
    let stranger = transport(&leaf(&foreign, "curl", "demo"), &pki.mesh.pem, &[]);
    assert!(
        tls_get(&stranger, "web").await.is_err(),
        "foreign client admitted"
    );

    // One purpose per certificate: curl's xDS bootstrap certificate chains to the same root but
    // is no service certificate (no SPIFFE URI SAN): the handshake fails, no HTTP answer.
    let bootstrap = transport(
        &bootstrap_leaf(&pki.mesh, "curl", "demo"),
        &pki.mesh.pem,
        &[("httpbin", "demo")],
    );
    for host in ["web", "denied"] {
        let refused = tls_get(&bootstrap, host).await;
        assert!(
            refused.is_err(),
            "a bootstrap certificate got an HTTP answer from {host}: {refused:?}"
        );
    }
    // …while curl's service certificate, same root, still gets in.
    assert_eq!(
        tls_get(&curl, "web").await.expect("mTLS GET").0,
        StatusCode::OK
    );

    // Plaintext to the mTLS chain: closed without an HTTP answer.
    let mut plain = TcpStream::connect((SERVER, 15003)).await.expect("connect");
    plain
        .write_all(b"GET /get HTTP/1.1\r\nhost: web\r\n\r\n")
        .await
        .expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut answer)).await;
    assert!(
        !answer.starts_with(b"HTTP/"),
        "plaintext got an HTTP answer"
    );

    // Root rotation: the server trusts two roots and serves a certificate from the new one; a
    // client trusting both works over new connections.
    let next = ca("fsm-ca-next.flomesh.io");
    let bundle = format!("{}{}", pki.mesh.pem, next.pem);
    let rotated = Pki {
        httpbin: leaf(&next, "httpbin", "demo"),
        curl: pki.curl.clone(),
        mesh: Ca {
            issuer: next.issuer,
            pem: bundle,
        },
    };
    let set = server_resources(&rotated);
    let tls_of = |c: &Config| {
        c.listeners
            .get("inbound-listener")
            .and_then(|l| l.chains.first())
            .and_then(|c| c.tls.clone())
    };
    let before = tls_of(&server.store.config());
    server
        .store
        .install(Config::build(&set, type_url::SECRET).expect("valid"), set);
    assert_ne!(
        before,
        tls_of(&server.store.config()),
        "a new server config after rotation"
    );
    let both = transport(&pki.curl, &rotated.mesh.pem, &[("httpbin", "demo")]);
    assert_eq!(
        tls_get(&both, "web").await.expect("after rotation").0,
        StatusCode::OK
    );
}

#[test]
fn secrets_are_checked_and_named_in_errors() {
    let pki = pki();
    let build = |secrets: Vec<v1::Secret>| {
        let mut set = Set::default();
        for s in &secrets {
            set = set.secret(s);
        }
        Config::build(&set.0, type_url::SECRET)
    };
    let e = build(vec![ca_secret("root", "not pem", &[])]).expect_err("bad PEM");
    assert_eq!(
        e.0,
        "Secret \"root\": validation_context.trusted_ca: holds no PEM certificate"
    );
    let other_key = leaf(&pki.mesh, "x", "demo").1;
    let e = build(vec![cert_secret(
        "service-cert:demo/curl",
        &(pki.curl.0.clone(), other_key),
    )])
    .expect_err("mismatched key");
    assert!(
        e.0.starts_with(
            "Secret \"service-cert:demo/curl\": tls_certificate.private_key: is not usable"
        ),
        "{e}"
    );
    assert!(!e.0.contains("PRIVATE KEY"), "{e}");
    let e = build(vec![cert_secret(
        "service-cert:demo/curl",
        &(pki.curl.0.clone(), "garbage".into()),
    )])
    .expect_err("no key");
    assert!(e.0.contains("tls_certificate.private_key"), "{e}");
    assert!(
        build(vec![
            cert_secret("ok", &pki.curl),
            ca_secret("ca", &pki.mesh.pem, &[])
        ])
        .is_ok()
    );
}

#[test]
fn missing_secrets_fail_closed_and_unchanged_ones_are_reused() {
    let pki = pki();
    let mut set = server_resources(&pki);
    set.types
        .entry(type_url::SECRET)
        .or_default()
        .resources
        .clear();
    let config = Config::build(&set, type_url::LISTENER).expect("a missing secret is no error");
    let tls = config.listeners["inbound-listener"].chains[0].tls.clone();
    assert!(
        matches!(&tls, Some(DownstreamTls::Missing(s)) if &**s == "service-cert:demo/httpbin"),
        "{tls:?}"
    );
    let config = Config::build(&server_resources(&pki), type_url::SECRET).expect("valid");
    let ready = config.listeners["inbound-listener"].chains[0].tls.clone();
    assert!(matches!(ready, Some(DownstreamTls::Ready(_))));
    // Unchanged inputs reuse the built rustls config (pools and session caches stay warm).
    let again = Config::build(&server_resources(&pki), type_url::SECRET).expect("valid");
    assert_eq!(again.listeners["inbound-listener"].chains[0].tls, ready);
}

// === An mTLS chain and a plaintext ingress chain on one inbound listener ===

const INGRESS_SERVER: &str = "127.0.27.20";
const INGRESS_APP: &str = "127.0.27.21";
/// The ingress controller: the one address the ingress chain and route admit.
const INGRESS_CLIENT: &str = "127.0.27.30";
const OTHER_CLIENT: &str = "127.0.27.31";

/// The inbound listener as the native adapter lays it out for an IngressBackend: the mTLS chain
/// for TLS connections first, then the plaintext chain for the ingress controller's address,
/// routed by `ingress`, whose route admits that address.
fn ingress_server_resources(pki: &Pki) -> ResourceSet {
    let only_ingress = format!("{INGRESS_CLIENT}/32");
    let mut mtls = http_chain(
        15003,
        "inbound",
        Some(v1::DownstreamTls {
            certificate_secret: "service-cert:demo/httpbin".into(),
            validation_secret: "root-cert-for-mtls-inbound:demo/httpbin".into(),
            require_client_certificate: true,
        }),
        None,
    );
    mtls.name = "mtls".into();
    if let Some(m) = mtls.r#match.as_mut() {
        m.transport_protocol = v1::TransportProtocol::Tls as i32;
    }
    let mut ingress = http_chain(15003, "ingress", None, None);
    ingress.name = "ingress-http".into();
    if let Some(m) = ingress.r#match.as_mut() {
        m.source_ip_ranges = vec![only_ingress.clone()];
        m.transport_protocol = v1::TransportProtocol::Plaintext as i32;
    }
    let inbound = v1::Listener {
        name: "inbound-listener".into(),
        address: addr(INGRESS_SERVER, 15003),
        direction: v1::TrafficDirection::Inbound as i32,
        filter_chains: vec![mtls, ingress],
        tracing: None,
    };
    let meshed = v1::RouteConfiguration {
        name: "inbound".into(),
        virtual_hosts: vec![vhost(
            "web",
            vec![route(
                prefix(),
                "web|local",
                identities(&[("curl", "demo")]),
            )],
        )],
    };
    let from_ingress = v1::RouteConfiguration {
        name: "ingress".into(),
        virtual_hosts: vec![vhost(
            "web",
            vec![route(
                prefix(),
                "web|local",
                Some(v1::AllowedSources {
                    any: false,
                    identities: vec![],
                    source_ip_ranges: vec![only_ingress],
                    principals: vec![],
                    principals_from: vec![],
                }),
            )],
        )],
    };
    let app = v1::Cluster {
        discovery: Some(v1::cluster::Discovery::StaticLocal(v1::StaticLocal {
            address: addr(INGRESS_APP, APP_PORT),
        })),
        ..cluster("web|local", v1::UpstreamProtocol::Http1, None, None)
    };
    Set::default()
        .add(type_url::CLUSTER, "web|local", &app)
        .add(type_url::ROUTE_CONFIGURATION, "inbound", &meshed)
        .add(type_url::ROUTE_CONFIGURATION, "ingress", &from_ingress)
        .add(type_url::LISTENER, "inbound-listener", &inbound)
        .secret(&cert_secret("service-cert:demo/httpbin", &pki.httpbin))
        .secret(&ca_secret(
            "root-cert-for-mtls-inbound:demo/httpbin",
            &pki.mesh.pem,
            &[],
        ))
        .0
}

/// A plaintext HTTP/1.1 GET from the loopback address `from` to the inbound listener on `to`;
/// `Err` when the connection is closed without an answer.
async fn plain_get_from(from: &str, to: &str, host: &str) -> Result<(StatusCode, String), String> {
    let socket = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
    let from: std::net::IpAddr = from.parse().expect("ip");
    socket
        .bind(SocketAddr::new(from, 0))
        .map_err(|e| e.to_string())?;
    let stream = socket
        .connect(format!("{to}:15003").parse().expect("addr"))
        .await
        .map_err(|e| e.to_string())?;
    get_over(stream, host).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_and_plaintext_ingress_share_the_inbound_listener() {
    let pki = pki();
    serve_app(&format!("{INGRESS_APP}:{APP_PORT}")).await;
    let _server = start_sidecar(ingress_server_resources(&pki)).await;
    wait_port(format!("{INGRESS_SERVER}:15003").parse().expect("addr")).await;

    // A real ClientHello is told apart by peeking, and the handshake then sees all of it: the
    // mTLS chain serves it and its route checks the identity as before.
    let curl = transport(&pki.curl, &pki.mesh.pem, &[("httpbin", "demo")]);
    let (status, body) = tls_get_to(INGRESS_SERVER, &curl, "web")
        .await
        .expect("mTLS GET");
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, "HTTP/1.1 /get");
    let bookbuyer = transport(
        &leaf(&pki.mesh, "bookbuyer", "demo"),
        &pki.mesh.pem,
        &[("httpbin", "demo")],
    );
    assert_eq!(
        tls_get_to(INGRESS_SERVER, &bookbuyer, "web")
            .await
            .expect("mTLS GET")
            .0,
        StatusCode::FORBIDDEN
    );

    // Plaintext from the ingress controller: the ingress chain, admitted by its address.
    let (status, body) = plain_get_from(INGRESS_CLIENT, INGRESS_SERVER, "web")
        .await
        .expect("ingress GET");
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, "HTTP/1.1 /get");

    // Plaintext from anyone else matches no chain: closed, never handed to the mTLS chain.
    let refused = plain_get_from(OTHER_CLIENT, INGRESS_SERVER, "web").await;
    assert!(refused.is_err(), "other client answered: {refused:?}");
}

// === Clients outside the mesh admitted by a name of their certificate (`principals`) ===

/// HTTP chain; its validation secret lists no SANs.
const PRINCIPAL_SERVER: &str = "127.0.29.2";
/// HTTP chain whose validation secret lists `match_subject_alt_names`.
const PINNED_SERVER: &str = "127.0.29.3";
/// TCP chain admitting by `principals`.
const PRINCIPAL_TCP_SERVER: &str = "127.0.29.4";
const PRINCIPAL_APP: &str = "127.0.29.21";
const INGRESS_NAME: &str = "ingress.example.com";

/// A client certificate for a client outside the mesh (an ingress controller's) from `ca`: CN
/// and DNS SAN `dns`, no SPIFFE URI, the extended key usages `usages`.
fn dns_leaf(ca: &Ca, dns: &str, usages: Vec<ExtendedKeyUsagePurpose>) -> (String, String) {
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(vec![dns.to_string()]).expect("params");
    params.distinguished_name.push(DnType::CommonName, dns);
    params.extended_key_usages = usages;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    let cert = params.signed_by(&key, &ca.issuer).expect("leaf");
    (cert.pem(), key.serialize_pem())
}

fn client_dns_leaf(ca: &Ca, dns: &str) -> (String, String) {
    dns_leaf(ca, dns, vec![ExtendedKeyUsagePurpose::ClientAuth])
}

fn principals(names: &[&str]) -> Option<v1::AllowedSources> {
    Some(v1::AllowedSources {
        principals: names.iter().map(|n| n.to_string()).collect(),
        principals_from: vec![],
        ..Default::default()
    })
}

fn mtls(validation: &str) -> Option<v1::DownstreamTls> {
    Some(v1::DownstreamTls {
        certificate_secret: "service-cert:demo/httpbin".into(),
        validation_secret: validation.into(),
        require_client_certificate: true,
    })
}

/// Three inbound listeners requiring client certificates: HTTP routes admitting
/// `ingress.example.com` (`web`) or the workload demo/curl (`mesh`) behind a validation secret
/// that lists the names of the clients it expects (as the control plane's ingress chains do),
/// the same routes behind the mesh peers' validation secret (no names: a SPIFFE ID required),
/// and a TCP chain to an echo server admitting `ingress.example.com`.
fn principal_server_resources(pki: &Pki) -> ResourceSet {
    const INBOUND_CA: &str = "root-cert-for-mtls-inbound:demo/httpbin";
    const PINNED_CA: &str = "root-cert-for-ingress:demo/httpbin";
    let listener = |ip: &str, chain: v1::FilterChain| v1::Listener {
        name: format!("inbound-{ip}"),
        address: addr(ip, 15003),
        direction: v1::TrafficDirection::Inbound as i32,
        filter_chains: vec![chain],
        tracing: None,
    };
    let http = listener(
        PRINCIPAL_SERVER,
        http_chain(15003, "inbound", mtls(PINNED_CA), None),
    );
    let pinned = listener(
        PINNED_SERVER,
        http_chain(15003, "inbound", mtls(INBOUND_CA), None),
    );
    let tcp = listener(
        PRINCIPAL_TCP_SERVER,
        v1::FilterChain {
            name: "tcp-from-ingress".into(),
            protocol: v1::Protocol::Tcp as i32,
            target: Some(v1::filter_chain::Target::Tcp(v1::TcpTarget {
                clusters: wc("echo|local"),
                connect_authority: String::new(),
            })),
            // Any case: DNS names compare without regard to it.
            allowed_sources: principals(&["Ingress.Example.COM"]),
            tls: mtls(PINNED_CA),
            ..Default::default()
        },
    );
    let routes = v1::RouteConfiguration {
        name: "inbound".into(),
        virtual_hosts: vec![
            vhost(
                "web",
                vec![route(prefix(), "web|local", principals(&[INGRESS_NAME]))],
            ),
            vhost(
                "mesh",
                vec![route(
                    prefix(),
                    "web|local",
                    identities(&[("curl", "demo")]),
                )],
            ),
        ],
    };
    let local = |name: &str, protocol: v1::UpstreamProtocol, port: u32| v1::Cluster {
        discovery: Some(v1::cluster::Discovery::StaticLocal(v1::StaticLocal {
            address: addr(PRINCIPAL_APP, port),
        })),
        ..cluster(name, protocol, None, None)
    };
    let mut set = Set::default()
        .add(
            type_url::CLUSTER,
            "web|local",
            &local("web|local", v1::UpstreamProtocol::Http1, APP_PORT),
        )
        .add(
            type_url::CLUSTER,
            "echo|local",
            &local("echo|local", v1::UpstreamProtocol::Tcp, ECHO_PORT),
        )
        .add(type_url::ROUTE_CONFIGURATION, "inbound", &routes);
    for l in [http, pinned, tcp] {
        let name = l.name.clone();
        set = set.add(type_url::LISTENER, &name, &l);
    }
    set.secret(&cert_secret("service-cert:demo/httpbin", &pki.httpbin))
        .secret(&ca_secret(INBOUND_CA, &pki.mesh.pem, &[]))
        .secret(&ca_secret(
            PINNED_CA,
            &pki.mesh.pem,
            &[
                INGRESS_NAME,
                "other.example.com",
                "spiffe://cluster.local/ns/demo/sa/curl",
            ],
        ))
        .0
}

/// A line through the TCP chain on `server` over TLS: the echo's answer, `Err` when the
/// connection fails or is closed without one.
async fn tls_echo(server: &str, transport: &Transport) -> Result<String, String> {
    let server: SocketAddr = format!("{server}:15003").parse().expect("addr");
    let stream = connect(server, Duration::from_secs(2), transport, Alpn::Http1)
        .await
        .map_err(|e| e.to_string())?;
    let (r, mut w) = tokio::io::split(stream);
    w.write_all(b"ping\n").await.map_err(|e| e.to_string())?;
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(5),
        BufReader::new(r).read_line(&mut line),
    )
    .await
    .map_err(|_| "no answer in time".to_string())?
    .map_err(|e| e.to_string())?;
    if line.is_empty() {
        return Err("closed without an answer".into());
    }
    Ok(line)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn principals_admit_clients_outside_the_mesh_by_certificate_name() {
    let pki = pki();
    serve_app(&format!("{PRINCIPAL_APP}:{APP_PORT}")).await;
    serve_echo(&format!("{PRINCIPAL_APP}:{ECHO_PORT}")).await;
    let _server = start_sidecar(principal_server_resources(&pki)).await;
    for ip in [PRINCIPAL_SERVER, PINNED_SERVER, PRINCIPAL_TCP_SERVER] {
        wait_port(format!("{ip}:15003").parse().expect("addr")).await;
    }
    let client = |cert: &(String, String)| transport(cert, &pki.mesh.pem, &[("httpbin", "demo")]);
    let ingress = client(&client_dns_leaf(&pki.mesh, INGRESS_NAME));
    let other = client(&client_dns_leaf(&pki.mesh, "other.example.com"));
    let curl = client(&pki.curl);

    // The ingress controller's certificate (same CA, DNS SAN only, no SPIFFE ID) completes the
    // handshake and its name admits it on the route listing it…
    let (status, body) = tls_get_to(PRINCIPAL_SERVER, &ingress, "web")
        .await
        .expect("ingress GET");
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, "HTTP/1.1 /get");
    // …but gives it no workload identity.
    let (status, body) = tls_get_to(PRINCIPAL_SERVER, &ingress, "mesh")
        .await
        .expect("ingress GET");
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::FORBIDDEN, "RBAC: access denied")
    );

    // Another name from the same CA: the handshake completes, the route refuses it.
    let (status, body) = tls_get_to(PRINCIPAL_SERVER, &other, "web")
        .await
        .expect("other GET");
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::FORBIDDEN, "RBAC: access denied")
    );

    // A mesh workload is admitted by identity, not by principals.
    assert_eq!(
        tls_get_to(PRINCIPAL_SERVER, &curl, "mesh")
            .await
            .expect("curl GET")
            .0,
        StatusCode::OK
    );
    assert_eq!(
        tls_get_to(PRINCIPAL_SERVER, &curl, "web")
            .await
            .expect("curl GET")
            .0,
        StatusCode::FORBIDDEN
    );

    // The right name from another CA: the handshake fails, no HTTP answer.
    let foreign = ca("someone-else");
    let stranger = client(&client_dns_leaf(&foreign, INGRESS_NAME));
    let refused = tls_get_to(PRINCIPAL_SERVER, &stranger, "web").await;
    assert!(refused.is_err(), "foreign client answered: {refused:?}");

    // A serverAuth-only certificate (as the ADS server's) is no client certificate.
    let server_only = client(&dns_leaf(
        &pki.mesh,
        INGRESS_NAME,
        vec![ExtendedKeyUsagePurpose::ServerAuth],
    ));
    let refused = tls_get_to(PRINCIPAL_SERVER, &server_only, "web").await;
    assert!(
        refused.is_err(),
        "server-only certificate answered: {refused:?}"
    );

    // The validation secret lists the names it expects: another name from the mesh CA fails
    // the handshake.
    let unlisted = client(&client_dns_leaf(&pki.mesh, "unlisted.example.com"));
    let refused = tls_get_to(PRINCIPAL_SERVER, &unlisted, "web").await;
    assert!(refused.is_err(), "unlisted name answered: {refused:?}");

    // Behind the mesh peers' validation secret (no names) only a workload's SPIFFE ID passes
    // the handshake: a certificate for a client outside the mesh never reaches a chain whose
    // `any` would admit it.
    assert_eq!(
        tls_get_to(PINNED_SERVER, &curl, "mesh")
            .await
            .expect("curl GET on the peers' chain")
            .0,
        StatusCode::OK
    );
    for (who, t) in [
        ("ingress.example.com", &ingress),
        ("other.example.com", &other),
    ] {
        let refused = tls_get_to(PINNED_SERVER, t, "web").await;
        assert!(
            refused.is_err(),
            "{who} passed the mesh peers' handshake: {refused:?}"
        );
    }

    // A TCP chain admits by principal too, and closes the connection of anyone else.
    assert_eq!(
        tls_echo(PRINCIPAL_TCP_SERVER, &ingress)
            .await
            .expect("echo"),
        "echo: ping\n"
    );
    for (who, t) in [("other.example.com", &other), ("demo/curl", &curl)] {
        let refused = tls_echo(PRINCIPAL_TCP_SERVER, t).await;
        assert!(
            refused.is_err(),
            "{who} got through the TCP chain: {refused:?}"
        );
    }
}
