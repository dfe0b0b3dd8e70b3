//! Tresor end to end: what it issues (CN, SANs, chain), how fast, and where its root lives
//! (the `fsm-ca-bundle` Secret with concurrent create-if-absent, or a 0600 file).

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use fsm_certs::tresor::{self, TresorProvider};
use fsm_certs::{
    CertManager, CertManagerConfig, CertificateProvider, CertificateRequest, ProxyKind,
    XdsCommonName, x509,
};
use fsm_test_apiserver::{ApiServer, Verb};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::Api;
use kube::api::{ObjectMeta, PostParams};

const NS: &str = "fsm-system";

#[tokio::test]
async fn service_certificate_has_fsm_cn_spiffe_san_and_verifies_to_root() -> Result<()> {
    let tresor = Arc::new(TresorProvider::generate()?);
    let root = tresor.ca().cert_pem().to_owned();
    let manager = CertManager::new(tresor, CertManagerConfig::default());
    let cert = manager
        .issue_service_certificate(
            "bookbuyer",
            "bookstore",
            "cluster.local",
            Duration::from_secs(3600),
        )
        .await?;

    let info = x509::leaf_info(&cert.cert_chain_pem)?;
    assert_eq!(info.common_name, "bookbuyer.bookstore.cluster.local");
    assert_eq!(
        info.uri_sans,
        vec!["spiffe://cluster.local/ns/bookstore/sa/bookbuyer".to_owned()]
    );
    assert!(!info.is_ca);
    assert_eq!(info.serial, cert.serial);
    assert_eq!(cert.lifetime(), Duration::from_secs(3600));
    assert_eq!(cert.trust_bundle_pem, root);
    x509::verify_chain(&cert.cert_chain_pem, &cert.trust_bundle_pem)?;
    ensure!(cert.private_key.expose_pem().contains("PRIVATE KEY"));
    ensure!(
        !format!("{cert:?}").contains("PRIVATE KEY"),
        "Debug leaks the key"
    );

    // A different root must not verify it: the check is not vacuous.
    let other = TresorProvider::generate()?;
    assert!(x509::verify_chain(&cert.cert_chain_pem, other.ca().cert_pem()).is_err());
    Ok(())
}

#[tokio::test]
async fn xds_certificate_cn_is_uuid_kind_sa_ns() -> Result<()> {
    let manager = CertManager::new(
        Arc::new(TresorProvider::generate()?),
        CertManagerConfig::default(),
    );
    let uuid = uuid::Uuid::new_v4();
    let cert = manager
        .issue_xds_certificate(uuid, ProxyKind::Sidecar, "bookbuyer", "bookstore")
        .await?;
    let info = x509::leaf_info(&cert.cert_chain_pem)?;
    assert_eq!(
        info.common_name,
        format!("{uuid}.sidecar.bookbuyer.bookstore")
    );
    let parsed: XdsCommonName = info.common_name.parse()?;
    assert_eq!(parsed.proxy_uuid, uuid);
    assert_eq!(parsed.kind, ProxyKind::Sidecar);
    assert_eq!(parsed.identity.to_string(), "bookbuyer.bookstore");
    x509::verify_chain(&cert.cert_chain_pem, &cert.trust_bundle_pem)?;
    Ok(())
}

/// One purpose per certificate: peers tell a service certificate (SPIFFE URI SAN) from an xDS
/// bootstrap one (none), and the extended key usage keeps each to its side of a handshake.
#[tokio::test]
async fn each_purpose_has_its_san_and_extended_key_usage() -> Result<()> {
    let manager = CertManager::new(
        Arc::new(TresorProvider::generate()?),
        CertManagerConfig::default(),
    );
    let day = Duration::from_secs(86_400);
    let service = manager
        .issue_service_certificate("bookbuyer", "bookstore", "cluster.local", day)
        .await?;
    let xds = manager
        .issue_xds_certificate(
            uuid::Uuid::new_v4(),
            ProxyKind::Sidecar,
            "bookbuyer",
            "bookstore",
        )
        .await?;
    let server = manager
        .issue_server_certificate("fsm-controller.fsm-system.svc", day)
        .await?;
    let [service, xds, server] =
        [&service, &xds, &server].map(|c| x509::leaf_info(&c.cert_chain_pem));
    let (service, xds, server) = (service?, xds?, server?);
    assert_eq!(
        service.uri_sans,
        ["spiffe://cluster.local/ns/bookstore/sa/bookbuyer"]
    );
    assert!(service.server_auth && service.client_auth);
    assert!(xds.uri_sans.is_empty(), "{:?}", xds.uri_sans);
    assert!(xds.client_auth && !xds.server_auth);
    assert!(server.uri_sans.is_empty(), "{:?}", server.uri_sans);
    assert!(server.server_auth && !server.client_auth);
    Ok(())
}

#[tokio::test]
async fn tresor_issuance_time_per_certificate() -> Result<()> {
    let tresor = TresorProvider::generate()?;
    const N: u32 = 200;
    let start = Instant::now();
    for i in 0..N {
        let req = CertificateRequest::new(
            format!("sa{i}.ns.cluster.local"),
            Duration::from_secs(86_400),
        )
        .with_uri_san(format!("spiffe://cluster.local/ns/ns/sa/sa{i}"));
        tresor.issue(&req).await?;
    }
    let per = start.elapsed() / N;
    println!(
        "tresor issuance: {N} certificates (P-256 key + sign + parse), {per:?} per certificate ({} build)",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    assert!(
        per < Duration::from_millis(200),
        "issuance too slow: {per:?}"
    );
    Ok(())
}

async fn api_server() -> Result<(fsm_test_apiserver::RunningApiServer, kube::Client)> {
    let server = ApiServer::builder().start().await?;
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
    server.reset_request_counts();
    Ok((server, client))
}

fn secret_text(secret: &Secret, key: &str) -> Result<String> {
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .with_context(|| format!("secret has no {key}"))?;
    Ok(String::from_utf8(bytes.0.clone())?)
}

#[tokio::test]
async fn two_replicas_starting_at_once_share_one_root() -> Result<()> {
    let (server, client) = api_server().await?;
    let (a, b) = tokio::join!(
        TresorProvider::load_or_create_in_secret(
            client.clone(),
            NS,
            tresor::DEFAULT_CA_BUNDLE_SECRET
        ),
        TresorProvider::load_or_create_in_secret(
            client.clone(),
            NS,
            tresor::DEFAULT_CA_BUNDLE_SECRET
        ),
    );
    let (a, b) = (a?, b?);
    assert_eq!(
        a.ca().cert_pem(),
        b.ca().cert_pem(),
        "replicas ended with different roots"
    );

    let secret = Api::<Secret>::namespaced(client.clone(), NS)
        .get(tresor::DEFAULT_CA_BUNDLE_SECRET)
        .await?;
    assert_eq!(secret.type_.as_deref(), Some("Opaque"));
    let keys: Vec<&String> = secret
        .data
        .as_ref()
        .map(|d| d.keys().collect())
        .unwrap_or_default();
    assert_eq!(
        keys,
        ["ca.crt", "expiration", "private.key"],
        "FSM's three keys"
    );
    assert_eq!(secret_text(&secret, "ca.crt")?, a.ca().cert_pem());
    let expiration = tresor::parse_expiration(&secret_text(&secret, "expiration")?)
        .context("expiration does not parse")?;
    let not_after = a.ca().info().not_after;
    let diff = expiration
        .duration_since(not_after)
        .or_else(|_| not_after.duration_since(expiration))?;
    ensure!(
        diff < Duration::from_secs(1),
        "expiration does not match the root"
    );
    let lifetime = a
        .ca()
        .info()
        .not_after
        .duration_since(a.ca().info().not_before)?;
    assert_eq!(lifetime, tresor::ROOT_VALIDITY);

    // A third start reuses it and creates nothing.
    server.reset_request_counts();
    let c = TresorProvider::load_or_create_in_secret(
        client.clone(),
        NS,
        tresor::DEFAULT_CA_BUNDLE_SECRET,
    )
    .await?;
    assert_eq!(c.ca().cert_pem(), a.ca().cert_pem());
    assert_eq!(server.request_count(Verb::Create), 0);

    // Certificates issued by either replica verify against the shared root.
    let cert = b
        .issue(&CertificateRequest::new(
            "x.y.cluster.local",
            Duration::from_secs(60),
        ))
        .await?;
    x509::verify_chain(&cert.cert_chain_pem, a.ca().cert_pem())?;
    Ok(())
}

#[tokio::test]
async fn create_if_absent_loser_adopts_the_winners_root_on_409() -> Result<()> {
    let (server, client) = api_server().await?;
    let api: Api<Secret> = Api::namespaced(client.clone(), NS);
    // Skip the initial GET so both really POST: exactly one wins, the other sees 409.
    let (a, b) = tokio::join!(
        TresorProvider::create_or_adopt_secret(&api, NS, "fsm-ca-bundle"),
        TresorProvider::create_or_adopt_secret(&api, NS, "fsm-ca-bundle"),
    );
    let (a, b) = (a?, b?);
    assert_eq!(a.ca().cert_pem(), b.ca().cert_pem());
    assert_eq!(server.request_count(Verb::Create), 2);
    let stored = api.get("fsm-ca-bundle").await?;
    assert_eq!(secret_text(&stored, "ca.crt")?, a.ca().cert_pem());
    Ok(())
}

#[tokio::test]
async fn broken_ca_secret_reports_fsm_code() -> Result<()> {
    use fsm_errcode::{ErrCode, HasErrCode};
    let (_server, client) = api_server().await?;
    let mut broken = Secret {
        metadata: ObjectMeta {
            name: Some("fsm-ca-bundle".into()),
            namespace: Some(NS.into()),
            ..ObjectMeta::default()
        },
        ..Secret::default()
    };
    broken.string_data = Some([("ca.crt".to_owned(), "not a cert".to_owned())].into());
    Api::<Secret>::namespaced(client.clone(), NS)
        .create(&PostParams::default(), &broken)
        .await?;
    let err = TresorProvider::load_or_create_in_secret(client, NS, "fsm-ca-bundle")
        .await
        .err()
        .context("a broken secret was accepted")?;
    // stringData may or may not be folded into data by the test server; either way the
    // private key is missing or the certificate is unreadable.
    assert!(
        matches!(err.err_code(), ErrCode::E4001 | ErrCode::E4002),
        "{err} ({})",
        err.err_code()
    );
    Ok(())
}

#[tokio::test]
async fn manifest_mode_root_file_is_0600_and_reused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("ca").join("fsm-ca-bundle.pem");
    let (a, b) = tokio::join!(
        TresorProvider::load_or_create_in_file(path.clone()),
        TresorProvider::load_or_create_in_file(path.clone()),
    );
    let (a, b) = (a?, b?);
    assert_eq!(a.ca().cert_pem(), b.ca().cert_pem());
    let mode = std::fs::metadata(&path)?.permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "mode {mode:o}");
    let leftovers: Vec<_> = std::fs::read_dir(path.parent().context("parent")?)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "temp files left: {leftovers:?}");

    let again = TresorProvider::load_or_create_in_file(path.clone()).await?;
    assert_eq!(again.ca().cert_pem(), a.ca().cert_pem());
    let cert = again
        .issue(&CertificateRequest::new(
            "x.y.cluster.local",
            Duration::from_secs(60),
        ))
        .await?;
    x509::verify_chain(&cert.cert_chain_pem, a.ca().cert_pem())?;
    Ok(())
}
