//! The ADS server over mTLS on 127.0.0.1: certificates from `fsm-certs`' Tresor CA, tonic
//! clients with `ClientTlsConfig`, and raw rustls handshakes where the server's certificate
//! itself is checked.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use fsm_cache::{ProxyKey, Resource, Snapshot, SnapshotCache};
use fsm_certs::tresor::CertificateAuthority;
use fsm_certs::{CertPurpose, CertificateRequest, IssuedCertificate};
use fsm_errcode::{ErrCode, HasErrCode};
use fsm_xds_server::protocol::{CLUSTER, LISTENER};
use fsm_xds_server::{AdsServer, AdsTls, ProxyEvent, ProxyKind, ServerCredentials, TlsError};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status, Streaming};

mod support;

type Client = AggregatedDiscoveryServiceClient<Channel>;

const UUID_A: &str = "0f9e3a52-2d4b-4c64-9a39-0c6f6fd1b6a5";
const UUID_B: &str = "7d1c0a4e-5b6f-4e2a-8c3d-9e8f7a6b5c4d";
const SERVER_NAME: &str = "fsm-controller.fsm-system.svc.cluster.local";
const TIMEOUT: Duration = Duration::from_secs(10);
const DAY: Duration = Duration::from_secs(24 * 3600);

// === PKI ===

fn root(name: &str) -> CertificateAuthority {
    CertificateAuthority::generate_root(name, 10 * DAY).expect("root")
}

fn issue(ca: &CertificateAuthority, cn: &str, validity: Duration) -> IssuedCertificate {
    ca.issue(&CertificateRequest::new(cn, validity).with_dns_san(SERVER_NAME))
        .expect("issue")
}

/// An xDS bootstrap certificate as the controller issues it: no SPIFFE URI SAN, clientAuth only.
fn proxy_cert(ca: &CertificateAuthority, uuid: &str, sa: &str) -> IssuedCertificate {
    ca.issue(
        &CertificateRequest::new(format!("{uuid}.sidecar.{sa}.bookstore"), DAY)
            .with_purpose(CertPurpose::XdsClient),
    )
    .expect("issue")
}

/// A service certificate (sidecar-to-sidecar mTLS) from `ca` with common name `cn`.
fn service_cert(ca: &CertificateAuthority, cn: &str, sa: &str) -> IssuedCertificate {
    ca.issue(
        &CertificateRequest::new(cn, DAY)
            .with_uri_san(format!("spiffe://cluster.local/ns/bookstore/sa/{sa}")),
    )
    .expect("issue")
}

/// `fsm_error_err_code_count{err_code}` in the default registry (0 before the first count).
fn err_code_count(code: ErrCode) -> u64 {
    prometheus::gather()
        .iter()
        .filter(|family| family.name() == "fsm_error_err_code_count")
        .flat_map(|family| family.get_metric())
        .filter(|m| {
            m.get_label()
                .iter()
                .any(|l| l.name() == "err_code" && l.value() == code.as_str())
        })
        .map(|m| m.get_counter().get_value() as u64)
        .sum()
}

fn server_credentials(server: &IssuedCertificate, client_ca_pem: &str) -> ServerCredentials {
    ServerCredentials::new(
        server.cert_chain_pem.clone(),
        server.private_key.expose_pem(),
        client_ca_pem,
    )
}

/// A CA, the server's credentials trusting only it for clients, and the `AdsTls` built from them.
struct Pki {
    ca: CertificateAuthority,
    server: IssuedCertificate,
    tls: AdsTls,
}

fn pki() -> Pki {
    let ca = root("fsm-ca");
    let server = issue(&ca, "fsm-controller.fsm-system.svc", DAY);
    let tls = AdsTls::new(&server_credentials(&server, ca.cert_pem())).expect("ADS TLS");
    Pki { ca, server, tls }
}

// === Server and clients ===

async fn serve(
    cache: Arc<SnapshotCache>,
    tls: &AdsTls,
) -> (SocketAddr, mpsc::UnboundedReceiver<ProxyEvent>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let (events_tx, events) = mpsc::unbounded_channel();
    let events = fake_controller(cache.clone(), events);
    let service = AdsServer::new(cache, events_tx)
        .require_client_certificates()
        .into_service();
    tokio::spawn(fsm_xds_server::listen::serve(
        service,
        tls.incoming(listener),
    ));
    (addr, events)
}

async fn client(
    addr: SocketAddr,
    server_root_pem: &str,
    identity: Option<&IssuedCertificate>,
) -> Result<Client, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(server_root_pem))
        .domain_name(SERVER_NAME);
    if let Some(cert) = identity {
        tls = tls.identity(Identity::from_pem(
            &cert.cert_chain_pem,
            cert.private_key.expose_pem(),
        ));
    }
    let channel = Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(tls)?
        .connect_timeout(TIMEOUT)
        .connect()
        .await?;
    Ok(AggregatedDiscoveryServiceClient::new(channel))
}

fn node_id(uuid: &str, sa: &str) -> String {
    format!("{uuid}.sidecar.{sa}.bookstore.cluster.local")
}

fn key(uuid: &str) -> ProxyKey {
    ProxyKey::new(uuid, ProxyKind::Sidecar, "bookbuyer", "bookstore")
}

/// What the fake controller publishes for each proxy, per cache: the cache keeps a proxy only
/// while it has a stream, so a snapshot is set when its `Connected` event arrives (as the
/// controller does) and again on every later `publish` while connected.
type Published = parking_lot::Mutex<Vec<(usize, ProxyKey, Snapshot)>>;
static PUBLISHED: Published = parking_lot::Mutex::new(Vec::new());

fn cache_id(cache: &Arc<SnapshotCache>) -> usize {
    Arc::as_ptr(cache) as usize
}

fn publish(cache: &Arc<SnapshotCache>, key: ProxyKey, snapshot: Snapshot) {
    cache.set(&key, snapshot.clone());
    let mut published = PUBLISHED.lock();
    published.retain(|(c, k, _)| !(*c == cache_id(cache) && *k == key));
    published.push((cache_id(cache), key, snapshot));
}

/// Forwards the server's events to the test, publishing each connecting proxy's snapshot first.
fn fake_controller(
    cache: Arc<SnapshotCache>,
    mut from_server: mpsc::UnboundedReceiver<ProxyEvent>,
) -> mpsc::UnboundedReceiver<ProxyEvent> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(event) = from_server.recv().await {
            if let ProxyEvent::Connected { node, .. } = &event {
                let snapshot = PUBLISHED
                    .lock()
                    .iter()
                    .find(|(c, k, _)| *c == cache_id(&cache) && *k == node.key())
                    .map(|(_, _, s)| s.clone());
                if let Some(snapshot) = snapshot {
                    cache.set(&node.key(), snapshot);
                }
            }
            if tx.send(event).is_err() {
                return;
            }
        }
    });
    rx
}

fn snapshot(body: &'static str) -> Snapshot {
    Snapshot::new([
        (CLUSTER, vec![Resource::new("c1", body.as_bytes())]),
        (LISTENER, vec![Resource::new("l", &b"listener"[..])]),
    ])
}

/// An open SotW stream: the request sender keeps it open.
struct Sotw {
    requests: mpsc::Sender<DiscoveryRequest>,
    responses: Streaming<DiscoveryResponse>,
}

/// Opens a SotW stream asking for CDS as `node_id`, and returns it with its first response, or
/// the status refusing it (at open or as the first message: tonic reports either).
async fn sotw(client: &mut Client, node_id: &str) -> Result<(Sotw, DiscoveryResponse), Status> {
    let (requests, rx) = mpsc::channel(4);
    requests
        .send(DiscoveryRequest {
            node: Some(Node {
                id: node_id.into(),
                user_agent_name: "envoy".into(),
                ..Node::default()
            }),
            type_url: CLUSTER.into(),
            ..DiscoveryRequest::default()
        })
        .await
        .expect("queue");
    let mut responses = tokio::time::timeout(
        TIMEOUT,
        client.stream_aggregated_resources(ReceiverStream::new(rx)),
    )
    .await
    .expect("open in time")?
    .into_inner();
    let first = next(&mut responses).await?;
    Ok((
        Sotw {
            requests,
            responses,
        },
        first,
    ))
}

async fn delta(client: &mut Client, node_id: &str) -> Result<DeltaDiscoveryResponse, Status> {
    let (requests, rx) = mpsc::channel(4);
    requests
        .send(DeltaDiscoveryRequest {
            node: Some(Node {
                id: node_id.into(),
                user_agent_name: "envoy".into(),
                ..Node::default()
            }),
            type_url: CLUSTER.into(),
            ..DeltaDiscoveryRequest::default()
        })
        .await
        .expect("queue");
    let mut responses = tokio::time::timeout(
        TIMEOUT,
        client.delta_aggregated_resources(ReceiverStream::new(rx)),
    )
    .await
    .expect("open in time")?
    .into_inner();
    let first = next(&mut responses).await;
    drop(requests);
    first
}

async fn next<T>(responses: &mut Streaming<T>) -> Result<T, Status> {
    tokio::time::timeout(TIMEOUT, responses.message())
        .await
        .expect("a response in time")
        .and_then(|m| m.ok_or_else(|| Status::unknown("stream ended")))
}

fn body(response: &DiscoveryResponse) -> &[u8] {
    &response.resources[0].value
}

/// The TLS layer refuses `identity`: either the handshake fails, or (TLS 1.3, where the client
/// finishes before the server has checked its certificate) the first RPC fails. Either way no
/// response arrives.
async fn assert_refused_by_tls(
    addr: SocketAddr,
    server_root_pem: &str,
    identity: Option<&IssuedCertificate>,
    node_id: &str,
) {
    let Ok(mut client) = client(addr, server_root_pem, identity).await else {
        return;
    };
    match sotw(&mut client, node_id).await {
        Ok((_, response)) => panic!("a refused client received {response:?}"),
        Err(status) => assert_ne!(status.code(), Code::Ok),
    }
}

async fn assert_no_connection(
    cache: &SnapshotCache,
    events: &mut mpsc::UnboundedReceiver<ProxyEvent>,
) {
    // Give a wrongly opened session time to announce itself before checking it did not.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(cache.connected().is_empty(), "{:?}", cache.connected());
    assert!(
        events.try_recv().is_err(),
        "no Connected event for a refused proxy"
    );
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

/// The certificate the server presents to a fresh connection, from a raw rustls handshake.
async fn server_leaf(
    addr: SocketAddr,
    server_root_pem: &str,
    identity: &IssuedCertificate,
) -> CertificateDer<'static> {
    let mut roots = rustls::RootCertStore::empty();
    for root in CertificateDer::pem_slice_iter(server_root_pem.as_bytes()) {
        roots.add(root.expect("root PEM")).expect("root");
    }
    let chain = CertificateDer::pem_slice_iter(identity.cert_chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .expect("chain PEM");
    let key = PrivateKeyDer::from_pem_slice(identity.private_key.expose_pem().as_bytes())
        .expect("key PEM");
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .expect("client config");
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from(SERVER_NAME).expect("name");
    let tls = tokio::time::timeout(TIMEOUT, connector.connect(name, tcp))
        .await
        .expect("handshake in time")
        .expect("handshake");
    let (_, session) = tls.get_ref();
    assert_eq!(session.alpn_protocol(), Some(&b"h2"[..]), "ALPN h2");
    session.peer_certificates().expect("server certificate")[0].clone()
}

fn serial_and_cn(der: &CertificateDer<'_>) -> (String, String) {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).expect("X.509");
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .expect("CN")
        .to_owned();
    (cert.raw_serial_as_string().replace(':', ""), cn)
}

fn der_of(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).expect("PEM")
}

// === Identity ===

#[tokio::test]
async fn proxy_whose_certificate_matches_its_node_id_gets_its_snapshot() {
    let pki = pki();
    let cache = Arc::new(SnapshotCache::new());
    publish(&cache, key(UUID_A), snapshot("a"));
    let (addr, mut events) = serve(cache.clone(), &pki.tls).await;

    let cert = proxy_cert(&pki.ca, UUID_A, "bookbuyer");
    let mut client = client(addr, pki.ca.cert_pem(), Some(&cert))
        .await
        .expect("mTLS connection");
    let (_stream, first) = sotw(&mut client, &node_id(UUID_A, "bookbuyer"))
        .await
        .expect("served");
    assert_eq!(first.type_url, CLUSTER);
    assert_eq!(body(&first), b"a");
    match tokio::time::timeout(TIMEOUT, events.recv()).await {
        Ok(Some(ProxyEvent::Connected { node, .. })) => {
            assert_eq!(node.key(), key(UUID_A));
            assert_eq!(node.identity.service_identity(), "bookbuyer.bookstore");
        }
        other => panic!("expected Connected, got {other:?}"),
    }

    // Delta, same connection: the identity is read per stream.
    let response = delta(&mut client, &node_id(UUID_A, "bookbuyer"))
        .await
        .expect("served over delta");
    assert_eq!(response.resources.len(), 1);
}

#[tokio::test]
async fn node_id_of_another_proxy_is_refused_with_e5010_or_e5004() {
    let pki = pki();
    let cache = Arc::new(SnapshotCache::new());
    publish(&cache, key(UUID_A), snapshot("a"));
    // The victims: another service account, and the same one under another UUID.
    publish(&cache, key(UUID_B), snapshot("secret of b"));
    let (addr, mut events) = serve(cache.clone(), &pki.tls).await;
    let cert = proxy_cert(&pki.ca, UUID_A, "bookbuyer");
    let cn = format!("{UUID_A}.sidecar.bookbuyer.bookstore");
    let mut client = client(addr, pki.ca.cert_pem(), Some(&cert))
        .await
        .expect("mTLS connection");

    // E5010 when the service account differs (FSM's service-account mismatch), E5004 when only
    // the proxy UUID or kind does; each refusal counted.
    let before = (
        fsm_errcode::counted(fsm_errcode::ErrCode::E5010),
        fsm_errcode::counted(fsm_errcode::ErrCode::E5004),
    );
    for (claimed, differs, code) in [
        (node_id(UUID_B, "bookstore"), "service account", "E5010"),
        (node_id(UUID_B, "bookbuyer"), "proxy UUID", "E5004"),
        (node_id(UUID_A, "bookstore"), "service account", "E5010"),
        (
            format!("{UUID_A}.gateway.bookbuyer.bookstore.cluster.local"),
            "proxy kind",
            "E5004",
        ),
    ] {
        let status = match sotw(&mut client, &claimed).await {
            Ok((_, response)) => panic!("{claimed}: a refused stream received {response:?}"),
            Err(status) => status,
        };
        assert_eq!(status.code(), Code::PermissionDenied, "{claimed}: {status}");
        let message = status.message();
        assert!(message.starts_with(code), "{claimed}: {message}");
        assert!(message.contains(&cn), "names the certificate CN: {message}");
        assert!(message.contains(&claimed), "names the node id: {message}");
        assert!(message.contains(differs), "names what differs: {message}");
    }
    let status = delta(&mut client, &node_id(UUID_B, "bookbuyer"))
        .await
        .expect_err("refused over delta too");
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status.message().starts_with("E5004"),
        "{}",
        status.message()
    );
    assert_no_connection(&cache, &mut events).await;
    assert!(fsm_errcode::counted(fsm_errcode::ErrCode::E5010) >= before.0 + 2);
    assert!(fsm_errcode::counted(fsm_errcode::ErrCode::E5004) >= before.1 + 3);

    // The same connection still serves the proxy's own identity.
    let (_stream, first) = sotw(&mut client, &node_id(UUID_A, "bookbuyer"))
        .await
        .expect("own identity served");
    assert_eq!(body(&first), b"a");
}

#[tokio::test]
async fn malformed_certificate_cn_is_refused_with_e5001() {
    let pki = pki();
    let cache = Arc::new(SnapshotCache::new());
    publish(&cache, key(UUID_A), snapshot("a"));
    let (addr, mut events) = serve(cache.clone(), &pki.tls).await;
    for cn in [
        "bookbuyer.bookstore".to_owned(),
        format!("{UUID_A}.sidecar.bookbuyer"),
        format!("{UUID_A}.pipy.bookbuyer.bookstore"),
    ] {
        let cert = issue(&pki.ca, &cn, DAY);
        let mut client = client(addr, pki.ca.cert_pem(), Some(&cert))
            .await
            .expect("the handshake itself succeeds: the certificate is from our CA");
        let status = match sotw(&mut client, &node_id(UUID_A, "bookbuyer")).await {
            Ok((_, response)) => panic!("{cn}: a refused stream received {response:?}"),
            Err(status) => status,
        };
        assert_eq!(status.code(), Code::Unauthenticated, "{cn}: {status}");
        assert!(
            status.message().starts_with("E5001"),
            "{}",
            status.message()
        );
        assert!(status.message().contains(&cn), "{}", status.message());
    }
    assert_no_connection(&cache, &mut events).await;
}

/// One purpose per certificate: a service certificate chains to the same trusted root, but it
/// is for sidecar-to-sidecar mTLS and opens no ADS stream, whatever its CN says; the refusal is
/// E5001 and counted in `fsm_error_err_code_count`.
#[tokio::test]
async fn service_certificate_is_refused_with_e5001_and_counted() {
    let pki = pki();
    let cache = Arc::new(SnapshotCache::new());
    publish(&cache, key(UUID_A), snapshot("a"));
    let (addr, mut events) = serve(cache.clone(), &pki.tls).await;
    let node = node_id(UUID_A, "bookbuyer");
    for cert in [
        // As the CertManager issues it for bookbuyer.bookstore.
        service_cert(&pki.ca, "bookbuyer.bookstore.cluster.local", "bookbuyer"),
        // Naming the proxy in its CN does not make it an xDS certificate.
        service_cert(
            &pki.ca,
            &format!("{UUID_A}.sidecar.bookbuyer.bookstore"),
            "bookbuyer",
        ),
    ] {
        let before = err_code_count(ErrCode::E5001);
        let mut client = client(addr, pki.ca.cert_pem(), Some(&cert))
            .await
            .expect("the handshake itself succeeds: the certificate is from our CA");
        let status = match sotw(&mut client, &node).await {
            Ok((_, response)) => panic!(
                "{}: a service certificate was served {response:?}",
                cert.common_name
            ),
            Err(status) => status,
        };
        assert_eq!(status.code(), Code::Unauthenticated, "{status}");
        assert!(
            status.message().starts_with("E5001"),
            "{}",
            status.message()
        );
        assert!(
            status.message().contains(&cert.common_name),
            "{}",
            status.message()
        );
        assert!(
            err_code_count(ErrCode::E5001) > before,
            "the refusal of {} was not counted",
            cert.common_name
        );
    }
    assert_no_connection(&cache, &mut events).await;

    // The proxy's own bootstrap certificate, same root, is served.
    let bootstrap = proxy_cert(&pki.ca, UUID_A, "bookbuyer");
    let mut client = client(addr, pki.ca.cert_pem(), Some(&bootstrap))
        .await
        .expect("mTLS connection");
    let (_stream, first) = sotw(&mut client, &node).await.expect("served");
    assert_eq!(body(&first), b"a");
}

/// The ADS server's own certificate (serverAuth only) is no client certificate.
#[tokio::test]
async fn server_only_certificate_is_refused_as_a_client_certificate() {
    let pki = pki();
    let cache = Arc::new(SnapshotCache::new());
    publish(&cache, key(UUID_A), snapshot("a"));
    let (addr, mut events) = serve(cache.clone(), &pki.tls).await;
    let server_only = pki
        .ca
        .issue(
            &CertificateRequest::new(format!("{UUID_A}.sidecar.bookbuyer.bookstore"), DAY)
                .with_dns_san(SERVER_NAME)
                .with_purpose(CertPurpose::Server),
        )
        .expect("issue");
    let failures = pki.tls.handshake_failures();
    assert_refused_by_tls(
        addr,
        pki.ca.cert_pem(),
        Some(&server_only),
        &node_id(UUID_A, "bookbuyer"),
    )
    .await;
    eventually("the handshake failure to be counted", || {
        pki.tls.handshake_failures() > failures
    })
    .await;
    assert_no_connection(&cache, &mut events).await;
}

#[tokio::test]
async fn required_certificates_over_plaintext_refuse_every_stream() {
    let cache = Arc::new(SnapshotCache::new());
    publish(&cache, key(UUID_A), snapshot("a"));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let (events_tx, mut events) = mpsc::unbounded_channel();
    tokio::spawn(fsm_xds_server::listen::serve(
        AdsServer::new(cache.clone(), events_tx)
            .require_client_certificates()
            .into_service(),
        TcpListenerStream::new(listener),
    ));
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    let status = match sotw(&mut client, &node_id(UUID_A, "bookbuyer")).await {
        Ok((_, response)) => panic!("received {response:?}"),
        Err(status) => status,
    };
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(
        status.message().starts_with("E5001"),
        "{}",
        status.message()
    );
    assert!(
        status.message().contains("no client certificate"),
        "{}",
        status.message()
    );
    assert_no_connection(&cache, &mut events).await;
}

// === Handshake ===

#[tokio::test]
async fn clients_without_a_trusted_certificate_fail_the_handshake_and_others_are_served() {
    let pki = pki();
    let cache = Arc::new(SnapshotCache::new());
    publish(&cache, key(UUID_A), snapshot("a"));
    let (addr, mut events) = serve(cache.clone(), &pki.tls).await;
    let node = node_id(UUID_A, "bookbuyer");

    // A client that connects and never speaks must not hold up anyone.
    let mut silent = TcpStream::connect(addr).await.expect("connect");

    // No client certificate.
    assert_refused_by_tls(addr, pki.ca.cert_pem(), None, &node).await;
    // A certificate with the right CN from another CA.
    let rogue_ca = root("fsm-ca");
    let rogue = proxy_cert(&rogue_ca, UUID_A, "bookbuyer");
    assert_refused_by_tls(addr, pki.ca.cert_pem(), Some(&rogue), &node).await;
    // Plaintext HTTP/2.
    let plaintext = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}")).await;
    if let Ok(mut plaintext) = plaintext {
        assert!(sotw(&mut plaintext, &node).await.is_err());
    }
    assert_no_connection(&cache, &mut events).await;
    eventually("the failures to be counted", || {
        pki.tls.handshake_failures() >= 3
    })
    .await;

    // The server still serves a proxy with a good certificate, the silent client still pending.
    let cert = proxy_cert(&pki.ca, UUID_A, "bookbuyer");
    let mut client = client(addr, pki.ca.cert_pem(), Some(&cert))
        .await
        .expect("mTLS connection");
    let (_stream, first) = sotw(&mut client, &node).await.expect("served");
    assert_eq!(body(&first), b"a");
    let mut byte = [0u8; 1];
    assert!(
        tokio::time::timeout(Duration::from_millis(50), silent.read(&mut byte))
            .await
            .is_err(),
        "the silent client is still waiting for its handshake"
    );
}

#[tokio::test]
async fn expired_client_certificate_is_refused() {
    let pki = pki();
    let cache = Arc::new(SnapshotCache::new());
    publish(&cache, key(UUID_A), snapshot("a"));
    let (addr, mut events) = serve(cache.clone(), &pki.tls).await;
    let short = issue(
        &pki.ca,
        &format!("{UUID_A}.sidecar.bookbuyer.bookstore"),
        Duration::from_secs(1),
    );
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_refused_by_tls(
        addr,
        pki.ca.cert_pem(),
        Some(&short),
        &node_id(UUID_A, "bookbuyer"),
    )
    .await;
    eventually("the handshake failure", || {
        pki.tls.handshake_failures() >= 1
    })
    .await;
    assert_no_connection(&cache, &mut events).await;
}

#[tokio::test]
async fn stuck_handshake_times_out() {
    let pki = pki();
    let tls = pki
        .tls
        .clone()
        .with_handshake_timeout(Duration::from_millis(200));
    let (addr, _events) = serve(Arc::new(SnapshotCache::new()), &tls).await;
    let mut silent = TcpStream::connect(addr).await.expect("connect");
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(TIMEOUT, silent.read(&mut byte))
        .await
        .expect("the server hangs up in time");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    eventually("the timeout to be counted", || {
        tls.handshake_failures() >= 1
    })
    .await;
}

// === Rotation ===

#[tokio::test]
async fn rotated_server_certificate_applies_to_new_connections_only() {
    let pki = pki();
    let cache = Arc::new(SnapshotCache::new());
    publish(&cache, key(UUID_A), snapshot("v1"));
    let (addr, _events) = serve(cache.clone(), &pki.tls).await;
    let cert = proxy_cert(&pki.ca, UUID_A, "bookbuyer");
    let node = node_id(UUID_A, "bookbuyer");

    let before = server_leaf(addr, pki.ca.cert_pem(), &cert).await;
    assert_eq!(before, der_of(&pki.server.cert_chain_pem));
    let mut old_client = client(addr, pki.ca.cert_pem(), Some(&cert))
        .await
        .expect("mTLS connection");
    let (mut open, first) = sotw(&mut old_client, &node).await.expect("served");
    assert_eq!(body(&first), b"v1");

    let rotated = issue(&pki.ca, "fsm-controller-rotated.fsm-system.svc", DAY);
    pki.tls
        .update(&server_credentials(&rotated, pki.ca.cert_pem()))
        .expect("update");

    let after = server_leaf(addr, pki.ca.cert_pem(), &cert).await;
    let (serial, cn) = serial_and_cn(&after);
    assert_eq!(serial, rotated.serial, "the new certificate's serial");
    assert_eq!(cn, "fsm-controller-rotated.fsm-system.svc");
    assert_ne!(serial_and_cn(&before).0, serial);

    // The open stream keeps working: it is sent the next snapshot.
    support::ack_sotw(&open.requests, CLUSTER, &first).await;
    publish(&cache, key(UUID_A), snapshot("v2"));
    let update = next(&mut open.responses)
        .await
        .expect("update on the old stream");
    assert_eq!(body(&update), b"v2");

    // And a new client is served under the new certificate.
    let mut new_client = client(addr, pki.ca.cert_pem(), Some(&cert))
        .await
        .expect("mTLS connection");
    let (_stream, first) = sotw(&mut new_client, &node).await.expect("served");
    assert_eq!(body(&first), b"v2");
}

#[tokio::test]
async fn client_ca_update_dropping_the_old_root_refuses_its_certificates() {
    let old_ca = root("fsm-ca");
    let new_ca = root("fsm-ca-next");
    let server = issue(&old_ca, "fsm-controller.fsm-system.svc", DAY);
    let both = format!("{}{}", old_ca.cert_pem(), new_ca.cert_pem());
    let tls = AdsTls::new(&server_credentials(&server, &both)).expect("ADS TLS");
    let cache = Arc::new(SnapshotCache::new());
    publish(&cache, key(UUID_A), snapshot("a1"));
    publish(&cache, key(UUID_B), snapshot("b1"));
    let (addr, _events) = serve(cache.clone(), &tls).await;
    let old_cert = proxy_cert(&old_ca, UUID_A, "bookbuyer");
    let new_cert = proxy_cert(&new_ca, UUID_B, "bookbuyer");

    // During the rotation both roots are trusted.
    let mut old_client = client(addr, old_ca.cert_pem(), Some(&old_cert))
        .await
        .expect("old-root client");
    let (mut open, first) = sotw(&mut old_client, &node_id(UUID_A, "bookbuyer"))
        .await
        .expect("old root served");
    assert_eq!(body(&first), b"a1");
    let mut new_client = client(addr, old_ca.cert_pem(), Some(&new_cert))
        .await
        .expect("new-root client");
    // Kept open: the cache forgets a proxy (and its snapshot) when its last stream ends.
    let (_b_stream, _) = sotw(&mut new_client, &node_id(UUID_B, "bookbuyer"))
        .await
        .expect("new root served");

    // The rotation ends: only the new root.
    tls.update(&server_credentials(&server, new_ca.cert_pem()))
        .expect("update");
    assert_eq!(tls.handshake_failures(), 0);
    assert_refused_by_tls(
        addr,
        old_ca.cert_pem(),
        Some(&old_cert),
        &node_id(UUID_A, "bookbuyer"),
    )
    .await;
    eventually("the handshake failure", || tls.handshake_failures() >= 1).await;
    let mut new_client = client(addr, old_ca.cert_pem(), Some(&new_cert))
        .await
        .expect("new-root client");
    sotw(&mut new_client, &node_id(UUID_B, "bookbuyer"))
        .await
        .expect("new root still served");

    // The stream opened with the old root stays until it reconnects.
    support::ack_sotw(&open.requests, CLUSTER, &first).await;
    publish(&cache, key(UUID_A), snapshot("a2"));
    let update = next(&mut open.responses).await.expect("update");
    assert_eq!(body(&update), b"a2");
}

// === Credentials ===

#[test]
fn unusable_credentials_are_named_with_e5009() {
    let ca = root("fsm-ca");
    let server = issue(&ca, "fsm-controller.fsm-system.svc", DAY);
    let other = issue(&ca, "other", DAY);
    let good = server_credentials(&server, ca.cert_pem());
    AdsTls::new(&good).expect("good credentials");

    let with = |f: &dyn Fn(&mut ServerCredentials)| {
        let mut creds = good.clone();
        f(&mut creds);
        creds
    };
    let cases: Vec<(&str, ServerCredentials, &str)> = vec![
        (
            "key of another certificate",
            with(&|c| c.private_key_pem = other.private_key.expose_pem().to_owned().into()),
            "does not match",
        ),
        (
            "no certificate",
            with(&|c| c.cert_chain_pem = String::new()),
            "no CERTIFICATE",
        ),
        (
            "garbage certificate",
            with(&|c| {
                c.cert_chain_pem =
                    "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n".into()
            }),
            "server certificate",
        ),
        (
            "no key",
            with(&|c| c.private_key_pem = String::new().into()),
            "no PRIVATE KEY",
        ),
        (
            "truncated key",
            with(&|c| {
                let pem = other.private_key.expose_pem();
                c.private_key_pem = pem[..pem.len() - 30].to_owned().into();
            }),
            "server private key",
        ),
        (
            "no client CA",
            with(&|c| c.client_ca_pem = String::new()),
            "client CA bundle",
        ),
    ];
    for (name, creds, needle) in cases {
        let error: TlsError = AdsTls::new(&creds).expect_err(name);
        let message = error.to_string();
        assert!(message.contains(needle), "{name}: {message}");
        assert_eq!(error.err_code(), ErrCode::E5009, "{name}");
        assert!(
            !message.contains("PRIVATE KEY-----"),
            "{name}: no key material in {message}"
        );
    }

    // A failed update keeps the previous configuration.
    let tls = AdsTls::new(&good).expect("good");
    assert!(
        tls.update(&with(&|c| c.client_ca_pem = String::new()))
            .is_err()
    );
}

#[test]
fn debug_never_prints_the_private_key() {
    let ca = root("fsm-ca");
    let server = issue(&ca, "fsm-controller.fsm-system.svc", DAY);
    let creds = server_credentials(&server, ca.cert_pem());
    let printed = format!("{creds:?}");
    assert!(printed.contains("<redacted>"), "{printed}");
    assert!(
        !printed.contains(server.private_key.expose_pem()),
        "{printed}"
    );
    assert!(!printed.contains("PRIVATE KEY"), "{printed}");
}
