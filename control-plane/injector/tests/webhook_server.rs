//! The webhook server's certificate: issued by the mesh's certificate manager, its roots
//! published into the webhook configuration's caBundle (here a ValidatingWebhookConfiguration in
//! the test API server), and rotated without a restart: after the certificate manager renews it,
//! new connections get the new certificate.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fsm_certs::clock::ManualClock;
use fsm_certs::tresor::{CertificateAuthority, TresorProvider};
use fsm_certs::{CertManager, CertManagerConfig};
use fsm_injector::server::{WebhookKind, reply, serve, webhook_tls};
use http_body_util::Full;
use hyper::{Response, StatusCode};
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use kube::Api;
use kube::api::PostParams;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SERVER_NAME: &str = "fsm-controller.fsm-system.svc";

/// The serial number of the certificate the server at `addr` presents (verified against `root`).
async fn served_serial(addr: SocketAddr, root: &str) -> String {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(root.as_bytes()) {
        roots.add(cert.expect("pem")).expect("root");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut tls = connector
        .connect(ServerName::try_from(SERVER_NAME).expect("name"), tcp)
        .await
        .expect("handshake with the mesh's root");
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut answer = Vec::new();
    tls.read_to_end(&mut answer).await.expect("read");
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
    let (_, session) = tls.get_ref();
    let leaf = &session.peer_certificates().expect("certificate")[0];
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf).expect("x509");
    parsed.raw_serial_as_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_certificate_is_published_and_rotates_without_a_restart() {
    let server = fsm_test_apiserver::ApiServer::builder()
        .start()
        .await
        .expect("api server");
    let client = server.client();
    let configs: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    let config: ValidatingWebhookConfiguration = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "fsm-validator-mesh-fsm"},
        "webhooks": [{
            "name": "fsm-validate.flomesh.io",
            "clientConfig": {"service": {"name": "fsm-controller", "namespace": "fsm-system", "path": "/validate", "port": 9093}},
            "rules": [{"operations": ["CREATE"], "apiGroups": ["policy.flomesh.io"], "apiVersions": ["v1alpha1"], "resources": ["retries"]}],
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
        }],
    }))
    .expect("config");
    configs
        .create(&PostParams::default(), &config)
        .await
        .expect("create");

    let clock = Arc::new(ManualClock::starting_now());
    let ca =
        CertificateAuthority::generate_root("fsm-test-root", Duration::from_secs(7 * 24 * 3600))
            .expect("root");
    let certs = CertManager::with_clock(
        Arc::new(TresorProvider::new(ca)),
        CertManagerConfig::default(),
        clock.clone(),
    );
    let tls = webhook_tls(
        &certs,
        SERVER_NAME,
        client,
        WebhookKind::Validating,
        "fsm-validator-mesh-fsm".into(),
    )
    .await
    .expect("webhook certificate");

    let published = configs.get("fsm-validator-mesh-fsm").await.expect("get");
    let bundle = published.webhooks.unwrap_or_default()[0]
        .client_config
        .ca_bundle
        .clone()
        .expect("caBundle published");
    let root = String::from_utf8(bundle.0).expect("utf-8");
    assert_eq!(Some(root.clone()), certs.trust_bundle_pem());

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(serve(
        listener,
        tls,
        WebhookKind::Validating,
        |_request| async { reply(StatusCode::OK, "\"ok\"".into()) as Response<Full<Bytes>> },
    ));
    let first = served_serial(addr, &root).await;

    // The certificate manager renews the certificate at a third of its life left.
    clock.advance(Duration::from_secs(20 * 3600));
    let report = certs.rotate_due().await;
    assert_eq!(report.rotated.len(), 1, "{report:?}");
    let mut second = first.clone();
    for _ in 0..50 {
        second = served_serial(addr, &root).await;
        if second != first {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_ne!(
        first, second,
        "the server kept its old certificate after the rotation"
    );
}
