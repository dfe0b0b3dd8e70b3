//! The Vault provider against a test PKI server: issuance through CertManager (CN, SANs,
//! chain, request shape), and FSM-coded errors for a bad token (403), a bad role and an
//! unreachable server.

#[path = "support/vault_server.rs"]
mod vault_server;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use fsm_certs::vault::{VaultConfig, VaultProvider};
use fsm_certs::{
    CertError, CertManager, CertManagerConfig, CertificateProvider, CertificateRequest, x509,
};
use fsm_errcode::{ErrCode, HasErrCode};

const TOKEN: &str = "xyz";

fn config(server: &vault_server::VaultServer, token: &str) -> VaultConfig {
    let mut c = VaultConfig::new("127.0.0.1", token);
    c.port = server.addr.port();
    c.timeout = Duration::from_secs(5);
    c
}

#[tokio::test]
async fn issues_service_certificate_through_vault_pki() -> Result<()> {
    let server = vault_server::start(TOKEN, "pki", "fsm").await?;
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
    let server = vault_server::start(TOKEN, "pki", "fsm").await?;
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
    let server = vault_server::start(TOKEN, "pki", "fsm").await?;
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
    let server = vault_server::start(TOKEN, "pki", "fsm").await?;
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
    let c = config(&server, TOKEN);
    drop(server);
    tokio::task::yield_now().await;
    let err = VaultProvider::new(c)?
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
    let server = vault_server::start(TOKEN, "pki", "fsm").await?;
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
