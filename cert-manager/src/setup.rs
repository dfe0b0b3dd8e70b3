//! Choosing and running the mesh's certificate provider from a command line, shared by every
//! binary that issues certificates (the controller, the injector): FSM's `certificateProvider`
//! settings as flags ([`CertArgs`]), the provider they name ([`provider`]) and a
//! [`CertManager`] with rotation running ([`manager`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use fsm_errcode::{ErrCode, HasErrCode};

use crate::cert_manager_io::{CertManagerIoConfig, CertManagerIoProvider, IssuerRef};
use crate::tresor::TresorProvider;
use crate::vault::{TOKEN_CHECK_INTERVAL, VaultConfig, VaultProvider};
use crate::{CertManager, CertManagerConfig, CertificateProvider};

/// FSM keeps the Tresor root in this Secret of the control-plane namespace.
pub const CA_BUNDLE_SECRET: &str = "fsm-ca-bundle";

/// How often certificates are checked for renewal. Cheap (a scan of the cache), and short enough
/// for short-lived certificates (MeshConfig may ask for minutes).
const ROTATION_CHECK: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ProviderKind {
    /// Built-in CA: root in the `fsm-ca-bundle` Secret (cluster) or `<state-dir>/fsm-ca-bundle.pem`.
    Tresor,
    /// HashiCorp Vault's PKI secrets engine.
    Vault,
    /// cert-manager.io: CertificateRequests signed by the configured issuer (cluster only).
    CertManager,
}

/// Certificate settings, named after FSM's Helm values and `fsm install` flags.
#[derive(Clone, Debug, Args)]
pub struct CertArgs {
    /// Who issues the mesh's certificates (FSM `certificateProvider.kind`).
    #[arg(long, value_enum, default_value_t = ProviderKind::Tresor)]
    pub certificate_provider: ProviderKind,
    /// Vault host (FSM `vault.host`).
    #[arg(long, default_value = "")]
    pub vault_host: String,
    /// Vault port (FSM `vault.port`).
    #[arg(long, default_value_t = 8200)]
    pub vault_port: u16,
    /// `http` or `https` (FSM `vault.protocol`).
    #[arg(long, default_value = "http", value_parser = ["http", "https"])]
    pub vault_protocol: String,
    /// PEM file of the CA that signed Vault's TLS certificate, for `--vault-protocol https`
    /// (`VAULT_CACERT`, as Vault's own clients, FSM's included, read it). Without it, the system
    /// roots are trusted.
    #[arg(long, env = "VAULT_CACERT")]
    pub vault_ca_file: Option<PathBuf>,
    /// Vault token (FSM `vault.token`).
    #[arg(
        long,
        env = "FSM_VAULT_TOKEN",
        default_value = "",
        hide_env_values = true
    )]
    pub vault_token: String,
    /// Vault PKI role (FSM `vault.role`).
    #[arg(long, default_value = "fsm")]
    pub vault_role: String,
    /// Mount path of Vault's PKI secrets engine.
    #[arg(long, default_value = "pki")]
    pub vault_pki_mount: String,
    /// cert-manager.io issuer name (FSM `certmanager.issuerName`).
    #[arg(long, default_value = "fsm-ca")]
    pub cert_manager_issuer_name: String,
    /// cert-manager.io issuer kind (FSM `certmanager.issuerKind`).
    #[arg(long, default_value = "Issuer")]
    pub cert_manager_issuer_kind: String,
    /// cert-manager.io issuer group (FSM `certmanager.issuerGroup`).
    #[arg(long, default_value = "cert-manager.io")]
    pub cert_manager_issuer_group: String,
}

/// The provider chosen by `args`. `client` is the cluster (None in manifest mode); `root_file`
/// is where Tresor keeps its root without a cluster.
pub async fn provider(
    args: &CertArgs,
    client: Option<kube::Client>,
    fsm_namespace: &str,
    root_file: &std::path::Path,
) -> anyhow::Result<Arc<dyn CertificateProvider>> {
    let provider: Arc<dyn CertificateProvider> = match (args.certificate_provider, client) {
        (ProviderKind::Tresor, Some(client)) => Arc::new(
            TresorProvider::load_or_create_in_secret(client, fsm_namespace, CA_BUNDLE_SECRET)
                .await
                .map_err(coded)
                .with_context(|| {
                    format!("cannot load or create Secret {fsm_namespace}/{CA_BUNDLE_SECRET}")
                })?,
        ),
        (ProviderKind::Tresor, None) => Arc::new(
            TresorProvider::load_or_create_in_file(root_file)
                .await
                .map_err(coded)
                .with_context(|| {
                    format!("cannot load or create root CA file {}", root_file.display())
                })?,
        ),
        (ProviderKind::Vault, _) => {
            if args.vault_host.is_empty() || args.vault_token.is_empty() {
                anyhow::bail!(
                    "{}: --certificate-provider vault needs --vault-host and --vault-token (or FSM_VAULT_TOKEN)",
                    ErrCode::E1000
                );
            }
            let mut config = VaultConfig::new(args.vault_host.clone(), args.vault_token.clone());
            config.protocol = args.vault_protocol.clone();
            config.port = args.vault_port;
            config.role = args.vault_role.clone();
            config.pki_mount = args.vault_pki_mount.clone();
            config.ca_file = args.vault_ca_file.clone();
            let vault = Arc::new(
                VaultProvider::new(config)
                    .map_err(coded)
                    .context("cannot set up the Vault client")?,
            );
            // Keeps the token alive (lookup-self, then renew-self at 2/3 of its TTL); failures
            // are logged with E4013 and retried.
            tokio::spawn(vault.clone().run_token_renewal(TOKEN_CHECK_INTERVAL));
            vault
        }
        (ProviderKind::CertManager, Some(client)) => {
            let mut config = CertManagerIoConfig::new(fsm_namespace);
            config.issuer_ref = IssuerRef {
                name: args.cert_manager_issuer_name.clone(),
                kind: Some(args.cert_manager_issuer_kind.clone()),
                group: Some(args.cert_manager_issuer_group.clone()),
            };
            Arc::new(CertManagerIoProvider::new(client, config))
        }
        (ProviderKind::CertManager, None) => anyhow::bail!(
            "{}: --certificate-provider cert-manager needs a cluster (--kubeconfig or in-cluster), not --manifest-dir",
            ErrCode::E1000
        ),
    };
    Ok(provider)
}

pub fn coded(e: crate::CertError) -> anyhow::Error {
    anyhow::anyhow!("{}: {e}", e.err_code())
}

/// The certificate manager with rotation running.
pub fn manager(provider: Arc<dyn CertificateProvider>) -> CertManager {
    let certs = CertManager::new(provider, CertManagerConfig::default());
    tokio::spawn(certs.clone().run_rotation(ROTATION_CHECK));
    certs
}
