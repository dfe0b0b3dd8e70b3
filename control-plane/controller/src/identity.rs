//! The mesh's certificate authority as the controller runs it: which provider issues (Tresor,
//! Vault or cert-manager.io, FSM's `certificateProvider.kind`), the ADS server's own certificate,
//! and root rotation.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use fsm_certs::setup::coded;
pub use fsm_certs::setup::{CertArgs, ProviderKind, manager, provider};
use fsm_certs::tresor::TresorProvider;
use fsm_certs::{CertKey, CertManager, IssuedCertificate, RootRotationTiming};
use fsm_errcode::{ErrCode, HasErrCode};
use fsm_xds_server::tls::{AdsTls, ServerCredentials};

/// Lifetime of the ADS server's certificate; rotated at a third of it, like every certificate.
const ADS_CERT_VALIDITY: Duration = Duration::from_secs(24 * 3600);
/// How often the manifest-mode root file is checked for a new root.
const ROOT_FILE_CHECK: Duration = Duration::from_secs(1);

/// Issues the ADS server's certificate and keeps the TLS acceptor's certificate and client roots
/// current as they rotate. Returns the acceptor.
pub async fn ads_tls(certs: &CertManager, server_name: &str) -> anyhow::Result<AdsTls> {
    let cert = certs
        .issue_server_certificate(server_name, ADS_CERT_VALIDITY)
        .await
        .map_err(coded)
        .with_context(|| {
            format!(
                "{}: cannot issue the ADS server certificate",
                ErrCode::E5009
            )
        })?;
    let tls = AdsTls::new(&server_credentials(&cert))
        .with_context(|| format!("{}: unusable ADS server certificate", ErrCode::E5009))?;
    let updater = tls.clone();
    certs.follow(
        CertKey::Server {
            common_name: server_name.to_owned(),
        },
        move |cert| {
            match updater.update(&server_credentials(&cert)) {
                Ok(()) => tracing::info!(serial = %cert.serial, "ADS server certificate rotated"),
                Err(e) => {
                    fsm_errcode::error!(ErrCode::E5009, error = %e, "cannot use the rotated ADS server certificate; keeping the previous one")
                }
            }
            std::future::ready(())
        },
    );
    Ok(tls)
}

fn server_credentials(cert: &IssuedCertificate) -> ServerCredentials {
    ServerCredentials {
        cert_chain_pem: cert.cert_chain_pem.clone(),
        private_key_pem: cert.private_key.expose_pem().to_owned().into(),
        client_ca_pem: cert.trust_bundle_pem.clone(),
    }
}

/// Manifest mode, Tresor: an operator rotates the root by replacing the root file (certificate
/// and key PEM) with a new one. The rotation runs in [`CertManager::rotate_root`]'s three phases:
/// every proxy first trusts both roots, then gets leaves of the new root, then the old root is
/// dropped. Each phase ends once every connected proxy acknowledged it (`in_sync`), at the
/// latest after `grace`.
pub async fn watch_root_file(
    path: PathBuf,
    certs: CertManager,
    grace: Duration,
    in_sync: impl Fn() -> bool + Send + Sync + 'static,
) {
    let mut current = tokio::fs::read(&path).await.ok();
    let mut tick = tokio::time::interval(ROOT_FILE_CHECK);
    loop {
        tick.tick().await;
        let Ok(now) = tokio::fs::read(&path).await else {
            continue;
        };
        if current.as_deref() == Some(now.as_slice()) {
            continue;
        }
        current = Some(now);
        let provider = match TresorProvider::load_or_create_in_file(&path).await {
            Ok(p) => p,
            Err(e) => {
                // Keep the root in use; the operator sees why the new one was refused.
                fsm_errcode::error!(e.err_code(), path = %path.display(), error = %e, "new root CA file refused; keeping the current root");
                continue;
            }
        };
        tracing::info!(path = %path.display(), "new root CA: rotating the root in three phases");
        match certs
            .rotate_root(
                Arc::new(provider),
                &in_sync,
                RootRotationTiming::with_grace(grace),
            )
            .await
        {
            Ok(outcome) => tracing::info!(
                path = %path.display(),
                elapsed_ms = outcome.elapsed().as_millis() as u64,
                trusting_both_ms = outcome.trusting_both.elapsed.as_millis() as u64,
                new_leaves_ms = outcome.new_leaves.elapsed.as_millis() as u64,
                old_root_dropped_ms = outcome.old_root_dropped.elapsed.as_millis() as u64,
                failed = outcome.failed.len(),
                "root rotation finished: the old root is no longer trusted"
            ),
            Err(e) => {
                fsm_errcode::error!(e.err_code(), path = %path.display(), error = %e, "root rotation refused; keeping the current root");
            }
        }
    }
}

#[cfg(test)]
mod vault_flag_tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        certs: CertArgs,
    }

    fn parse(extra: &[&str]) -> Result<CertArgs, clap::Error> {
        let base = ["fsm-controller", "--certificate-provider", "vault"];
        Cli::try_parse_from(base.iter().chain(extra)).map(|c| c.certs)
    }

    #[test]
    fn vault_https_and_ca_file_flags() -> anyhow::Result<()> {
        let args = parse(&[
            "--vault-protocol",
            "https",
            "--vault-ca-file",
            "/etc/vault/ca.pem",
        ])?;
        assert_eq!(args.vault_protocol, "https");
        assert_eq!(
            args.vault_ca_file.as_deref(),
            Some(std::path::Path::new("/etc/vault/ca.pem"))
        );
        assert!(parse(&["--vault-protocol", "ftp"]).is_err());
        Ok(())
    }

    #[tokio::test]
    async fn unreadable_vault_ca_file_stops_the_start_with_e4011_naming_it() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let missing = dir.path().join("vault-ca.pem");
        let mut args = parse(&["--vault-host", "127.0.0.1", "--vault-protocol", "https"])?;
        args.vault_token = "t".into();
        args.vault_ca_file = Some(missing.clone());
        let err = provider(&args, None, "fsm-system", &dir.path().join("root.pem"))
            .await
            .err()
            .context("started with a missing Vault CA file")?;
        let text = format!("{err:#}");
        assert!(
            text.contains("E4011") && text.contains(&missing.display().to_string()),
            "{text}"
        );
        Ok(())
    }
}
