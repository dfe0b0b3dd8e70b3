//! Workload identities behind one provider trait: Tresor, Vault and cert-manager.io.
//!
//! Reading order: [`CertificateProvider`] (the seam) and its data ([`CertificateRequest`],
//! [`IssuedCertificate`]); [`CertManager`] (identities, cache, rotation, announcements); then
//! the providers: [`tresor`], [`vault`], [`cert_manager_io`]. Errors are [`CertError`], each
//! with its FSM code ([`fsm_errcode::HasErrCode`]).
//!
//! How the delivery layer (SDS, mTLS) is meant to use it:
//!
//! ```no_run
//! # async fn wire(client: kube::Client) -> Result<(), fsm_certs::CertError> {
//! use std::{sync::Arc, time::Duration};
//! use fsm_certs::{CertManager, CertManagerConfig, ProxyKind, tresor::TresorProvider};
//!
//! let tresor = TresorProvider::load_or_create_in_secret(client, "fsm-system", "fsm-ca-bundle").await?;
//! let certs = CertManager::new(Arc::new(tresor), CertManagerConfig::default());
//! tokio::spawn(certs.clone().run_rotation(Duration::from_secs(30)));
//! let mut rotated = certs.subscribe();
//!
//! // SDS `service-cert:bookstore/bookbuyer` and the mTLS trust roots:
//! let cert = certs
//!     .issue_service_certificate("bookbuyer", "bookstore", "cluster.local", Duration::from_secs(24 * 3600))
//!     .await?;
//! let (_chain, _key, _roots) = (&cert.cert_chain_pem, cert.private_key.expose_pem(), &cert.trust_bundle_pem);
//!
//! // The proxy's ADS client certificate, CN `<uuid>.sidecar.bookbuyer.bookstore`:
//! let _xds = certs.issue_xds_certificate(uuid::Uuid::new_v4(), ProxyKind::Sidecar, "bookbuyer", "bookstore").await?;
//!
//! // Re-push whatever rotates:
//! while let Ok(event) = rotated.recv().await {
//!     let _ = (event.key, event.cert, event.reason);
//! }
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]

pub mod cert_manager_io;
pub mod clock;
pub mod error;
pub mod identity;
pub mod manager;
pub mod metrics;
pub mod provider;
pub mod setup;
pub mod tresor;
pub mod types;
pub mod vault;
pub mod x509;

pub use clock::{Clock, ManualClock, SystemClock};
pub use error::CertError;
pub use identity::{ProxyKind, ServiceIdentity, XdsCommonName};
pub use manager::{
    CertEvent, CertKey, CertManager, CertManagerConfig, DEFAULT_SERVICE_CERT_VALIDITY,
    PhaseOutcome, RootRotationOutcome, RootRotationPhase, RootRotationTiming, RotationPolicy,
    RotationReason, RotationReport,
};
pub use provider::CertificateProvider;
pub use types::{CertPurpose, CertificateRequest, IssuedCertificate, PrivateKeyPem};
