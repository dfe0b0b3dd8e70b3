//! The Vault provider against a test Vault server over https: issuance through CertManager (CN,
//! SANs, chain, request shape); FSM-coded errors for a bad token (403), a bad role, an
//! unreachable server and a Vault certificate that the configured CA did not sign; and token
//! renewal before the TTL the server enforces.

#[path = "support/vault_server.rs"]
mod vault_server;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use fsm_certs::vault::{TokenStatus, VaultConfig, VaultProvider};
use fsm_certs::{
    CertError, CertManager, CertManagerConfig, CertificateProvider, CertificateRequest,
    ManualClock, x509,
};
use fsm_errcode::{ErrCode, HasErrCode};

const TOKEN: &str = "xyz";

fn config(server: &vault_server::VaultServer, token: &str) -> VaultConfig {
    let mut c = VaultConfig::new("127.0.0.1", token);
    c.protocol = server.protocol.into();
    c.ca_file = server.ca_file.clone();
    c.port = server.addr.port();
    c.timeout = Duration::from_secs(5);
    c
}

/// An https server with a root token.
async fn tls_server() -> Result<vault_server::VaultServer> {
    vault_server::start_with(vault_server::Options::new(TOKEN, "pki", "fsm")).await
}

#[tokio::test]
async fn issues_service_certificate_through_vault_pki() -> Result<()> {
    let server = tls_server().await?;
    assert_eq!(server.protocol, "https");
    let provider = Arc::new(VaultProvider::new(config(&server, TOKEN))?);
    assert_eq!(provider.name(), "vault");
    let manager = CertManager::new(provider, CertManagerConfig::default());
    let cert = manager
        .issue_service_certificate(
            "bookbuyer",
            "bookstore",
            "cluster.local",
            Duration::from_secs(86_400),
        )
        .await?;

    let info = x509::leaf_info(&cert.cert_chain_pem)?;
    assert_eq!(info.common_name, "bookbuyer.bookstore.cluster.local");
    assert_eq!(
        info.uri_sans,
        vec!["spiffe://cluster.local/ns/bookstore/sa/bookbuyer".to_owned()]
    );
    assert_eq!(
        x509::certificates_der(&cert.cert_chain_pem)?.len(),
        1,
        "root not in the chain"
    );
    x509::verify_chain(&cert.cert_chain_pem, &server.root_pem)?;
    x509::verify_chain(&cert.cert_chain_pem, &cert.trust_bundle_pem)?;
    assert_eq!(
        x509::leaf_info(&cert.trust_bundle_pem)?.common_name,
        "fsm.root"
    );
    assert!(cert.private_key.expose_pem().contains("PRIVATE KEY"));

    let requests = server.requests.lock().clone();
    let body = requests.first().context("no request")?;
    assert_eq!(body["common_name"], "bookbuyer.bookstore.cluster.local");
    assert_eq!(
        body["uri_sans"],
        "spiffe://cluster.local/ns/bookstore/sa/bookbuyer"
    );
    assert_eq!(body["alt_names"], "");
    assert_eq!(body["ttl"], "86400s");
    Ok(())
}

#[tokio::test]
async fn dns_sans_are_sent_as_alt_names() -> Result<()> {
    let server = tls_server().await?;
    let provider = VaultProvider::new(config(&server, TOKEN))?;
    let req = CertificateRequest::new("webhook.fsm-system.svc", Duration::from_secs(60))
        .with_dns_san("webhook.fsm-system.svc")
        .with_dns_san("webhook.fsm-system.svc.cluster.local");
    let cert = provider.issue(&req).await?;
    let info = x509::leaf_info(&cert.cert_chain_pem)?;
    assert_eq!(info.dns_sans, req.dns_sans);
    assert_eq!(
        server
            .requests
            .lock()
            .first()
            .map(|b| b["alt_names"].clone()),
        Some("webhook.fsm-system.svc,webhook.fsm-system.svc.cluster.local".into())
    );
    Ok(())
}

#[tokio::test]
async fn bad_token_is_403_unauthorized_with_e4013() -> Result<()> {
    let server = tls_server().await?;
    let provider = VaultProvider::new(config(&server, "wrong-token"))?;
    let err = provider
        .issue(&CertificateRequest::new(
            "a.b.cluster.local",
            Duration::from_secs(60),
        ))
        .await
        .err()
        .context("issued with a bad token")?;
    assert!(
        matches!(err, CertError::Unauthorized { status: 403, ref message, .. } if message == "permission denied"),
        "{err:?}"
    );
    assert_eq!(err.err_code(), ErrCode::E4013);
    assert!(
        !err.to_string().contains("wrong-token"),
        "token leaked: {err}"
    );
    Ok(())
}

#[tokio::test]
async fn unknown_role_and_unreachable_server_are_e4013() -> Result<()> {
    let server = tls_server().await?;
    let mut c = config(&server, TOKEN);
    c.role = "nope".into();
    let err = VaultProvider::new(c)?
        .issue(&CertificateRequest::new(
            "a.b.cluster.local",
            Duration::from_secs(60),
        ))
        .await
        .err()
        .context("issued with an unknown role")?;
    assert!(matches!(err, CertError::Issue { .. }), "{err:?}");
    assert!(err.to_string().contains("unknown role"), "{err}");
    assert_eq!(err.err_code(), ErrCode::E4013);

    // Nothing listens on the port once the server is gone.
    let provider = VaultProvider::new(config(&server, TOKEN))?;
    drop(server);
    tokio::task::yield_now().await;
    let err = provider
        .issue(&CertificateRequest::new(
            "a.b.cluster.local",
            Duration::from_secs(60),
        ))
        .await
        .err()
        .context("issued with no server")?;
    assert_eq!(err.err_code(), ErrCode::E4013);
    Ok(())
}

#[tokio::test]
async fn token_is_read_from_the_configured_secret() -> Result<()> {
    use k8s_openapi::api::core::v1::{Namespace, Secret};
    use kube::Api;
    use kube::api::{ObjectMeta, PostParams};

    let apiserver = fsm_test_apiserver::ApiServer::builder().start().await?;
    let client = apiserver.client();
    let meta = |name: &str, ns: Option<&str>| ObjectMeta {
        name: Some(name.into()),
        namespace: ns.map(Into::into),
        ..ObjectMeta::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: meta("fsm-system", None),
                ..Namespace::default()
            },
        )
        .await?;
    let secret = Secret {
        metadata: meta("vault-token", Some("fsm-system")),
        data: Some(
            [(
                "token".to_owned(),
                k8s_openapi::ByteString(format!("{TOKEN}\n").into_bytes()),
            )]
            .into(),
        ),
        ..Secret::default()
    };
    Api::<Secret>::namespaced(client.clone(), "fsm-system")
        .create(&PostParams::default(), &secret)
        .await?;

    let token =
        fsm_certs::vault::token_from_secret(client.clone(), "fsm-system", "vault-token", "token")
            .await?;
    let server = tls_server().await?;
    let provider = VaultProvider::new(config(&server, &token))?;
    provider
        .issue(&CertificateRequest::new(
            "a.b.cluster.local",
            Duration::from_secs(60),
        ))
        .await?;

    let err = fsm_certs::vault::token_from_secret(client, "fsm-system", "vault-token", "other")
        .await
        .err()
        .context("missing key accepted")?;
    assert!(
        matches!(err, CertError::SecretKeyMissing { key: "other", .. }),
        "{err:?}"
    );
    Ok(())
}

fn request() -> CertificateRequest {
    CertificateRequest::new("a.b.cluster.local", Duration::from_secs(60))
}

#[tokio::test]
async fn https_names_the_host_and_the_ca_when_vaults_certificate_is_not_trusted() -> Result<()> {
    let server = tls_server().await?;
    // A CA file holding another CA than the one that signed the server's certificate.
    let (other_ca, _) = vault_server::tls_material("another-ca")?;
    let dir = tempfile::tempdir()?;
    let other = dir.path().join("other-ca.pem");
    std::fs::write(&other, other_ca)?;
    let mut c = config(&server, TOKEN);
    c.ca_file = Some(other.clone());
    let err = VaultProvider::new(c)?
        .issue(&request())
        .await
        .err()
        .context("issued through an untrusted TLS certificate")?;
    let text = err.to_string();
    assert_eq!(err.err_code(), ErrCode::E4013);
    let port = server.addr.port();
    assert!(
        text.contains(&format!(
            "the certificate of Vault at 127.0.0.1:{port} is not signed by a CA in the CA file {}",
            other.display()
        )) && text.contains("UnknownIssuer"),
        "{text}"
    );

    // No CA file: the system roots do not hold the test CA either, and the error says so.
    let mut c = config(&server, TOKEN);
    c.ca_file = None;
    let err = VaultProvider::new(c)?
        .issue(&request())
        .await
        .err()
        .context("issued with the system roots")?;
    assert!(
        err.to_string()
            .contains("is not signed by a CA in the system roots"),
        "{err}"
    );

    // The right CA and the other name in the certificate (localhost) work.
    let mut c = config(&server, TOKEN);
    c.host = "localhost".into();
    VaultProvider::new(c)?.issue(&request()).await?;

    // Plain http to the https port is not mistaken for success.
    let mut c = config(&server, TOKEN);
    c.protocol = "http".into();
    let err = VaultProvider::new(c)?
        .issue(&request())
        .await
        .err()
        .context("http to an https server")?;
    assert_eq!(err.err_code(), ErrCode::E4013);
    Ok(())
}

#[tokio::test]
async fn unusable_ca_file_and_protocol_are_refused_at_start() -> Result<()> {
    let server = tls_server().await?;
    let dir = tempfile::tempdir()?;
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n")?;
    for path in [garbage.clone(), dir.path().join("missing.pem")] {
        let mut c = config(&server, TOKEN);
        c.ca_file = Some(path.clone());
        let err = VaultProvider::new(c)
            .err()
            .context("unusable CA file accepted")?;
        assert_eq!(err.err_code(), ErrCode::E4011, "{err}");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
    }
    let mut c = config(&server, TOKEN);
    c.protocol = "ftp".into();
    let err = VaultProvider::new(c)
        .err()
        .context("protocol ftp accepted")?;
    assert!(err.to_string().contains("must be http or https"), "{err}");
    Ok(())
}

/// A server whose token lives `ttl` on `clock`.
async fn expiring_server(
    clock: &Arc<ManualClock>,
    ttl: Duration,
    renewable: bool,
) -> Result<vault_server::VaultServer> {
    let mut opts = vault_server::Options::new(TOKEN, "pki", "fsm");
    opts.token_ttl = Some(ttl);
    opts.renewable = renewable;
    opts.clock = clock.clone();
    vault_server::start_with(opts).await
}

#[tokio::test]
async fn token_is_renewed_at_two_thirds_of_its_ttl_and_outlives_it() -> Result<()> {
    let clock = Arc::new(ManualClock::starting_now());
    let ttl = Duration::from_secs(60);
    let server = expiring_server(&clock, ttl, true).await?;
    let provider = VaultProvider::with_clock(config(&server, TOKEN), clock.clone())?;

    assert_eq!(
        provider.renew_token_if_due().await?,
        TokenStatus::LookedUp { ttl }
    );
    clock.advance(Duration::from_secs(39));
    assert_eq!(provider.renew_token_if_due().await?, TokenStatus::NotDue);
    assert_eq!(server.renewals(), 0);
    clock.advance(Duration::from_secs(2));
    assert_eq!(
        provider.renew_token_if_due().await?,
        TokenStatus::Renewed { ttl }
    );
    assert_eq!(server.renewals(), 1);
    // Past the first TTL (t = 75 s): the renewed token still issues.
    clock.advance(Duration::from_secs(34));
    provider.issue(&request()).await?;

    // The same timeline without renewal: the server refuses the expired token.
    let unrenewed = expiring_server(&clock, ttl, true).await?;
    let provider = VaultProvider::with_clock(config(&unrenewed, TOKEN), clock.clone())?;
    provider.issue(&request()).await?;
    clock.advance(Duration::from_secs(61));
    let err = provider
        .issue(&request())
        .await
        .err()
        .context("the server accepted an expired token")?;
    assert!(
        matches!(err, CertError::Unauthorized { status: 403, .. }),
        "{err:?}"
    );
    Ok(())
}

#[derive(Clone, Default)]
struct Captured(Arc<parking_lot::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock()).into_owned()
    }
}

fn capture_logs() -> (Captured, tracing::subscriber::DefaultGuard) {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    (captured, tracing::subscriber::set_default(subscriber))
}

/// The background loop (current-thread runtime, so the spawned task logs to this test's
/// subscriber): the clock runs 5 TTLs ahead in 10 s steps and the token stays valid.
#[tokio::test]
async fn renewal_loop_keeps_the_token_alive_across_many_ttls() -> Result<()> {
    let (logs, _guard) = capture_logs();
    let clock = Arc::new(ManualClock::starting_now());
    let ttl = Duration::from_secs(30);
    let server = expiring_server(&clock, ttl, true).await?;
    let provider = Arc::new(VaultProvider::with_clock(
        config(&server, TOKEN),
        clock.clone(),
    )?);
    let task = tokio::spawn(
        provider
            .clone()
            .run_token_renewal(Duration::from_millis(20)),
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    // The first lookup, at t = 0: renewal due at t = 20 s.
    while server.lookups.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "no lookup");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for step in 1..=15u32 {
        let renewals_before = server.renewals();
        clock.advance(Duration::from_secs(10));
        // Renewal is due at 20 s after each renewal: on every second step.
        if step % 2 == 0 {
            while server.renewals() == renewals_before {
                anyhow::ensure!(
                    tokio::time::Instant::now() < deadline,
                    "no renewal after step {step}; logs:\n{}",
                    logs.text()
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        provider
            .issue(&request())
            .await
            .with_context(|| format!("issuing at t = {} s", step * 10))?;
    }
    task.abort();
    assert!(server.renewals() >= 7, "renewals: {}", server.renewals());
    let logs = logs.text();
    assert!(logs.contains("vault token valid"), "{logs}");
    assert!(!logs.contains(TOKEN), "the token reached the logs");
    Ok(())
}

#[tokio::test]
async fn unrenewable_token_is_logged_with_e4013_retried_and_still_used() -> Result<()> {
    let (logs, _guard) = capture_logs();
    let clock = Arc::new(ManualClock::starting_now());
    let server = expiring_server(&clock, Duration::from_secs(600), false).await?;
    let provider = VaultProvider::with_clock(config(&server, TOKEN), clock.clone())?;

    let err = provider
        .renew_token_if_due()
        .await
        .err()
        .context("an unrenewable token was accepted silently")?;
    assert_eq!(err.err_code(), ErrCode::E4013);
    assert!(err.to_string().contains("not renewable"), "{err}");
    assert!(err.to_string().contains("127.0.0.1"), "{err}");
    // Retried after the back-off, not before.
    assert_eq!(provider.renew_token_if_due().await?, TokenStatus::NotDue);
    clock.advance(Duration::from_secs(5));
    assert!(provider.renew_token_if_due().await.is_err());
    assert_eq!(server.lookups.load(std::sync::atomic::Ordering::SeqCst), 2);
    // Meanwhile the token still issues.
    provider.issue(&request()).await?;

    // A token Vault refuses (revoked, expired): the same, with the status.
    let provider = VaultProvider::with_clock(config(&server, "revoked"), clock.clone())?;
    let err = provider
        .renew_token_if_due()
        .await
        .err()
        .context("a refused token passed the lookup")?;
    assert_eq!(err.status, Some(403), "{err}");

    let logs = logs.text();
    assert!(
        logs.contains("E4013") && logs.contains("vault token could not be renewed"),
        "{logs}"
    );
    assert!(!logs.contains(TOKEN), "the token reached the logs");
    Ok(())
}

#[tokio::test]
async fn root_token_without_ttl_is_never_renewed() -> Result<()> {
    let server = tls_server().await?;
    let provider = VaultProvider::new(config(&server, TOKEN))?;
    assert_eq!(
        provider.renew_token_if_due().await?,
        TokenStatus::NonExpiring
    );
    assert_eq!(
        provider.renew_token_if_due().await?,
        TokenStatus::NonExpiring
    );
    assert_eq!(server.lookups.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(server.renewals(), 0);
    Ok(())
}
