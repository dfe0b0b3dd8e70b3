//! The cert-manager.io provider through the test API server, with a test signer playing
//! cert-manager: a signed request (CN, SANs, chain, the CertificateRequest's shape, cleanup),
//! a Denied one and a Failed one (E4013), and a timeout when nobody signs.

#[path = "support/signer.rs"]
mod signer;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use base64::Engine;
use fsm_certs::cert_manager_io::{
    CertManagerIoConfig, CertManagerIoProvider, CmCertificateRequest,
};
use fsm_certs::{
    CertError, CertManager, CertManagerConfig, CertificateProvider, CertificateRequest, ProxyKind,
    x509,
};
use fsm_errcode::{ErrCode, HasErrCode};
use fsm_test_apiserver::{ApiServer, RunningApiServer};
use k8s_openapi::api::core::v1::Namespace;
use kube::Api;
use kube::api::{ListParams, ObjectMeta, PostParams};

const NS: &str = "fsm-system";

async fn setup() -> Result<(RunningApiServer, kube::Client)> {
    let crds = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/crds");
    let server = ApiServer::builder().crd_dir(crds).start().await?;
    let client = server.client();
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(NS.into()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await?;
    Ok((server, client))
}

fn provider(client: kube::Client, timeout: Duration) -> CertManagerIoProvider {
    let mut config = CertManagerIoConfig::new(NS);
    config.timeout = timeout;
    CertManagerIoProvider::new(client, config)
}

#[tokio::test]
async fn certificate_request_is_signed_and_cleaned_up() -> Result<()> {
    let (_server, client) = setup().await?;
    let signer = signer::start(client.clone(), NS)?;
    let p = Arc::new(provider(client.clone(), Duration::from_secs(20)));
    assert_eq!(p.name(), "cert-manager");
    let manager = CertManager::new(p, CertManagerConfig::default());
    let cert = tokio::time::timeout(
        Duration::from_secs(30),
        manager.issue_service_certificate(
            "bookbuyer",
            "bookstore",
            "cluster.local",
            Duration::from_secs(86_400),
        ),
    )
    .await??;

    let info = x509::leaf_info(&cert.cert_chain_pem)?;
    assert_eq!(info.common_name, "bookbuyer.bookstore.cluster.local");
    assert_eq!(
        info.uri_sans,
        vec!["spiffe://cluster.local/ns/bookstore/sa/bookbuyer".to_owned()]
    );
    x509::verify_chain(&cert.cert_chain_pem, signer.ca.cert_pem())?;
    assert_eq!(cert.trust_bundle_pem, signer.ca.cert_pem());
    assert_eq!(cert.lifetime(), Duration::from_secs(86_400));
    // The key we generated matches the certificate the issuer signed (the CSR carried it).
    let key = rcgen::KeyPair::from_pem(cert.private_key.expose_pem())?;
    let ders = x509::certificates_der(&cert.cert_chain_pem)?;
    let (_, leaf) = x509_parser::parse_x509_certificate(ders.first().context("empty chain")?)?;
    assert_eq!(
        leaf.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw()
    );

    let seen = signer.seen.lock().clone();
    let cr = seen.first().context("signer saw nothing")?;
    assert_eq!(cr.spec.issuer_ref.name, "fsm-ca");
    assert_eq!(cr.spec.issuer_ref.kind.as_deref(), Some("Issuer"));
    assert_eq!(cr.spec.issuer_ref.group.as_deref(), Some("cert-manager.io"));
    assert_eq!(cr.spec.duration.as_deref(), Some("86400s"));
    assert!(cr.spec.usages.iter().any(|u| u == "client auth"));
    let csr = base64::engine::general_purpose::STANDARD.decode(&cr.spec.request)?;
    assert!(String::from_utf8(csr)?.contains("BEGIN CERTIFICATE REQUEST"));

    // The CertificateRequest is deleted once used.
    let left = Api::<CmCertificateRequest>::namespaced(client, NS)
        .list(&ListParams::default())
        .await?;
    assert!(left.items.is_empty(), "{} requests left", left.items.len());
    Ok(())
}

/// One purpose per certificate through cert-manager.io: `spec.usages` follows the purpose, so
/// the xDS bootstrap certificate is clientAuth only and carries no SPIFFE URI SAN, and the
/// service certificate carries it and both usages.
#[tokio::test]
async fn each_purpose_gets_its_usages_and_sans() -> Result<()> {
    let (_server, client) = setup().await?;
    let _signer = signer::start(client.clone(), NS)?;
    let manager = CertManager::new(
        Arc::new(provider(client, Duration::from_secs(20))),
        CertManagerConfig::default(),
    );
    let day = Duration::from_secs(86_400);
    let (service, xds, server) = tokio::time::timeout(Duration::from_secs(60), async {
        Ok::<_, CertError>((
            manager
                .issue_service_certificate("bookbuyer", "bookstore", "cluster.local", day)
                .await?,
            manager
                .issue_xds_certificate(
                    uuid::Uuid::new_v4(),
                    ProxyKind::Sidecar,
                    "bookbuyer",
                    "bookstore",
                )
                .await?,
            manager
                .issue_server_certificate("fsm-controller.fsm-system.svc", day)
                .await?,
        ))
    })
    .await??;
    let service = x509::leaf_info(&service.cert_chain_pem)?;
    let xds = x509::leaf_info(&xds.cert_chain_pem)?;
    let server = x509::leaf_info(&server.cert_chain_pem)?;
    assert_eq!(
        service.uri_sans,
        ["spiffe://cluster.local/ns/bookstore/sa/bookbuyer"]
    );
    assert!(service.server_auth && service.client_auth);
    assert!(xds.uri_sans.is_empty(), "{:?}", xds.uri_sans);
    assert!(xds.client_auth && !xds.server_auth);
    assert!(server.server_auth && !server.client_auth);
    Ok(())
}

#[tokio::test]
async fn denied_request_is_an_error_with_e4013() -> Result<()> {
    let (_server, client) = setup().await?;
    let _signer = signer::start(client.clone(), NS)?;
    let p = provider(client, Duration::from_secs(20));
    let err = tokio::time::timeout(
        Duration::from_secs(30),
        p.issue(&CertificateRequest::new(
            "deny-me.ns.cluster.local",
            Duration::from_secs(60),
        )),
    )
    .await?
    .err()
    .context("a denied request produced a certificate")?;
    assert!(
        matches!(err, CertError::Denied { ref message, .. } if message == "denied by test approver"),
        "{err:?}"
    );
    assert_eq!(err.err_code(), ErrCode::E4013);
    Ok(())
}

#[tokio::test]
async fn failed_request_is_an_error_with_e4013() -> Result<()> {
    let (_server, client) = setup().await?;
    let _signer = signer::start(client.clone(), NS)?;
    let p = provider(client, Duration::from_secs(20));
    let err = tokio::time::timeout(
        Duration::from_secs(30),
        p.issue(&CertificateRequest::new(
            "fail-me.ns.cluster.local",
            Duration::from_secs(60),
        )),
    )
    .await?
    .err()
    .context("a failed request produced a certificate")?;
    assert!(matches!(err, CertError::Issue { .. }), "{err:?}");
    assert!(err.to_string().contains("issuer exploded"), "{err}");
    assert_eq!(err.err_code(), ErrCode::E4013);
    Ok(())
}

#[tokio::test]
async fn unsigned_request_times_out_with_e4013() -> Result<()> {
    let (_server, client) = setup().await?;
    let p = provider(client, Duration::from_millis(500));
    let err = p
        .issue(&CertificateRequest::new(
            "nobody.ns.cluster.local",
            Duration::from_secs(60),
        ))
        .await
        .err()
        .context("issued with no signer")?;
    assert_eq!(err.err_code(), ErrCode::E4013);
    assert!(err.to_string().contains("not signed within"), "{err}");
    Ok(())
}

#[tokio::test]
async fn missing_crd_is_e4008() -> Result<()> {
    let server = ApiServer::builder().start().await?;
    let p = provider(server.client(), Duration::from_secs(1));
    let err = p
        .issue(&CertificateRequest::new(
            "a.b.cluster.local",
            Duration::from_secs(60),
        ))
        .await
        .err()
        .context("issued with no CRD")?;
    assert_eq!(err.err_code(), ErrCode::E4008);
    Ok(())
}
