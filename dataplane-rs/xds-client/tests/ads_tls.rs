//! The ADS client against a tonic server that requires mTLS, as the FSM controller does: the
//! bootstrap files are read at every connect, the server name is checked, and a missing file is
//! named in the error.

use std::path::Path;
use std::pin::Pin;
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use fsm_sidecar_xds::{
    AdsMode, AdsState, AdsTls, ClientOptions, ConfigSink, NodeInfo, ResourceSet, build_node,
};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};

const SERVER_NAME: &str = "fsm-controller.fsm-system.svc.cluster.local";

/// Reports, per stream opened, how many certificates the client presented.
struct TlsAds(mpsc::Sender<usize>);

#[tonic::async_trait]
impl AggregatedDiscoveryService for TlsAds {
    type StreamAggregatedResourcesStream =
        Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;
    type DeltaAggregatedResourcesStream =
        Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let certs = request.peer_certs().map_or(0, |c| c.len());
        let _ = self.0.send(certs).await;
        let (tx, rx) = mpsc::channel(1);
        // Keep the stream open (and silent) for the test's lifetime.
        std::mem::forget(tx);
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delta_aggregated_resources(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        Err(Status::unimplemented("SotW only"))
    }
}

struct NoSink;

impl ConfigSink for NoSink {
    fn try_apply(&mut self, _: &ResourceSet, _: &'static str) -> Result<(), String> {
        Ok(())
    }
}

struct Pki {
    ca_pem: String,
    server: (String, String),
    client: (String, String),
}

fn pki() -> Pki {
    let ca_key = KeyPair::generate().expect("key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.distinguished_name.push(DnType::CommonName, "fsm-ca");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_pem = ca.self_signed(&ca_key).expect("ca").pem();
    let issuer = Issuer::new(ca, ca_key);
    let issue = |sans: Vec<String>, cn: &str, eku: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().expect("key");
        let mut p = CertificateParams::new(sans).expect("params");
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![eku];
        let cert = p.signed_by(&key, &issuer).expect("cert");
        (cert.pem(), key.serialize_pem())
    };
    Pki {
        server: issue(
            vec![SERVER_NAME.into()],
            SERVER_NAME,
            ExtendedKeyUsagePurpose::ServerAuth,
        ),
        client: issue(
            vec![],
            "6a1f3c2e-1b7d-4c1e-9a3f-0c5d2e8b7a10.sidecar.curl.demo",
            ExtendedKeyUsagePurpose::ClientAuth,
        ),
        ca_pem,
    }
}

fn write_bootstrap(dir: &Path, pki: &Pki) {
    std::fs::write(dir.join("ca.crt"), &pki.ca_pem).expect("ca.crt");
    std::fs::write(dir.join("tls.crt"), &pki.client.0).expect("tls.crt");
    std::fs::write(dir.join("tls.key"), &pki.client.1).expect("tls.key");
}

async fn tls_server(pki: &Pki) -> (String, mpsc::Receiver<usize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let (tx, rx) = mpsc::channel(4);
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(&pki.server.0, &pki.server.1))
        .client_ca_root(Certificate::from_pem(&pki.ca_pem));
    let server = Server::builder()
        .tls_config(tls)
        .expect("server TLS")
        .add_service(AggregatedDiscoveryServiceServer::new(TlsAds(tx)))
        .serve_with_incoming(TcpListenerStream::new(listener));
    tokio::spawn(server);
    (addr, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ads_client_connects_with_mtls_and_rereads_bootstrap_files() {
    let pki = pki();
    let (addr, mut streams) = tls_server(&pki).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let options = ClientOptions::new(addr).with_tls(AdsTls::new(dir.path()));

    // No bootstrap files yet: the error names the first one missing.
    let err = fsm_sidecar_xds::connect(&options)
        .await
        .expect_err("no bootstrap files");
    assert!(err.contains("ca.crt"), "{err}");

    // The files appear (the injector's secret is mounted): the next attempt reads them.
    write_bootstrap(dir.path(), &pki);
    fsm_sidecar_xds::connect(&options)
        .await
        .expect("mTLS connect");

    // The whole client: the control plane sees a stream from a client with a certificate.
    let mut run_options = options.clone();
    run_options.backoff_base = Duration::from_millis(10);
    let info = NodeInfo {
        id: "6a1f3c2e-1b7d-4c1e-9a3f-0c5d2e8b7a10.sidecar.curl.demo".into(),
        cluster: "curl.demo".into(),
        pod_ip: "127.0.0.1".into(),
        pod_name: None,
    };
    tokio::spawn(async move {
        let state = AdsState::new(AdsMode::Sotw, build_node(&info));
        fsm_sidecar_xds::run(run_options, state, &mut NoSink).await;
    });
    let certs = tokio::time::timeout(Duration::from_secs(10), streams.recv())
        .await
        .expect("a stream in time")
        .expect("stream");
    assert_eq!(certs, 1, "the client presented its bootstrap certificate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ads_client_refuses_a_server_with_another_name_and_a_bad_key() {
    let pki = pki();
    let (addr, _streams) = tls_server(&pki).await;
    let dir = tempfile::tempdir().expect("tempdir");
    write_bootstrap(dir.path(), &pki);
    let mut tls = AdsTls::new(dir.path());
    tls.server_name = "someone-else.fsm-system.svc.cluster.local".into();
    let options = ClientOptions::new(addr.clone()).with_tls(tls);
    assert!(fsm_sidecar_xds::connect(&options).await.is_err());

    // A key file that is not a key: a clear error, not a panic.
    std::fs::write(dir.path().join("tls.key"), "not a key").expect("write");
    let options = ClientOptions::new(addr).with_tls(AdsTls::new(dir.path()));
    assert!(fsm_sidecar_xds::connect(&options).await.is_err());
}
