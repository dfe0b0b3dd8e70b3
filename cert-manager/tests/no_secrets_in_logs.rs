//! Private keys and the Vault token never reach the logs, at any level: every provider path
//! (Tresor with its Secret, Vault success and 403, cert-manager.io) runs under a TRACE
//! subscriber whose output is then searched.

#[path = "support/signer.rs"]
mod signer;
#[path = "support/vault_server.rs"]
mod vault_server;

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use fsm_certs::cert_manager_io::{CertManagerIoConfig, CertManagerIoProvider};
use fsm_certs::tresor::TresorProvider;
use fsm_certs::vault::{VaultConfig, VaultProvider};
use fsm_certs::{CertManager, CertManagerConfig, CertificateProvider, CertificateRequest};
use k8s_openapi::api::core::v1::Namespace;
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use parking_lot::Mutex;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const TOKEN: &str = "vault-token-must-not-be-logged";

#[tokio::test]
async fn no_private_key_or_token_in_trace_logs() -> Result<()> {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let crds = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/crds");
    let apiserver = fsm_test_apiserver::ApiServer::builder()
        .crd_dir(crds)
        .start()
        .await?;
    let client = apiserver.client();
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some("fsm-system".into()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await?;

    let mut keys = Vec::new();
    // Tresor, root in a Secret.
    let tresor =
        TresorProvider::load_or_create_in_secret(client.clone(), "fsm-system", "fsm-ca-bundle")
            .await?;
    keys.push(tresor.ca().key_pem().expose_pem().to_owned());
    let manager = CertManager::new(Arc::new(tresor), CertManagerConfig::default());
    let c = manager
        .issue_service_certificate("a", "ns", "cluster.local", Duration::from_secs(600))
        .await?;
    keys.push(c.private_key.expose_pem().to_owned());

    // Vault, success and 403.
    let vault = vault_server::start(TOKEN, "pki", "fsm").await?;
    let mut config = VaultConfig::new("127.0.0.1", TOKEN);
    config.port = vault.addr.port();
    let req = CertificateRequest::new("b.ns.cluster.local", Duration::from_secs(600));
    let c = VaultProvider::new(config.clone())?.issue(&req).await?;
    keys.push(c.private_key.expose_pem().to_owned());
    config.token = "wrong".to_owned().into();
    assert!(VaultProvider::new(config)?.issue(&req).await.is_err());

    // cert-manager.io.
    let _signer = signer::start(client.clone(), "fsm-system")?;
    let c = CertManagerIoProvider::new(client, CertManagerIoConfig::new("fsm-system"))
        .issue(&CertificateRequest::new(
            "c.ns.cluster.local",
            Duration::from_secs(600),
        ))
        .await?;
    keys.push(c.private_key.expose_pem().to_owned());

    let logs = String::from_utf8_lossy(&captured.0.lock()).into_owned();
    assert!(
        logs.len() > 100,
        "nothing was logged; the test would be vacuous"
    );
    assert!(
        !logs.contains("PRIVATE KEY"),
        "a private key header reached the logs"
    );
    assert!(!logs.contains(TOKEN), "the Vault token reached the logs");
    for key in &keys {
        // The base64 body of each key, line by line (a key split across log lines still shows).
        for line in key
            .lines()
            .filter(|l| !l.starts_with("-----") && l.len() > 20)
        {
            assert!(
                !logs.contains(line),
                "private key material reached the logs"
            );
        }
    }
    Ok(())
}
