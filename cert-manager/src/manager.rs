//! [`CertManager`]: the identity-level API on top of a provider — service and xDS certificates,
//! a cache per identity, rotation before expiry, rotation announcements and root rotation.
//!
//! # Rotation threshold
//!
//! A certificate is renewed once **less than a third of its lifetime remains**, moved earlier by
//! a random jitter of up to 1/30 of its lifetime (so that certificates issued together do not
//! all renew in the same tick). For the default 24h service certificate that is between 16h and
//! 15h12m after issuance. Both fractions are in [`RotationPolicy`]; the clock is a [`Clock`], so
//! tests set `jitter_fraction = 0` and move a [`crate::ManualClock`] across the threshold.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fsm_errcode::HasErrCode;
use parking_lot::{Mutex, RwLock};
use tokio::sync::broadcast;
use uuid::Uuid;

use crate::clock::{Clock, SystemClock};
use crate::error::CertError;
use crate::identity::{ProxyKind, ServiceIdentity, XdsCommonName};
use crate::provider::CertificateProvider;
use crate::types::{CertificateRequest, IssuedCertificate};
use crate::x509;

/// MeshConfig `spec.certificate.serviceCertValidityDuration` default.
pub const DEFAULT_SERVICE_CERT_VALIDITY: Duration = Duration::from_secs(24 * 3600);

// === Types ===

/// When to renew. See the module docs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RotationPolicy {
    /// Renew when `remaining < lifetime * renew_fraction`. Default `1/3`.
    pub renew_fraction: f64,
    /// Renew up to `lifetime * jitter_fraction` earlier than that, chosen at random per
    /// certificate when it is issued. Default `1/30`; `0` makes the threshold exact.
    pub jitter_fraction: f64,
}

impl Default for RotationPolicy {
    fn default() -> Self {
        Self {
            renew_fraction: 1.0 / 3.0,
            jitter_fraction: 1.0 / 30.0,
        }
    }
}

impl RotationPolicy {
    /// The instant at which a certificate of lifetime `cert.lifetime()`, received at
    /// `issued_at` (manager clock), is due for renewal, given a jitter draw in `[0, 1)`.
    ///
    /// Counted from `issued_at` rather than `not_before`, so that a provider clock skewed
    /// against ours (or a backdated `not_before`) cannot make a fresh certificate due at once.
    pub fn renew_at(
        &self,
        cert: &IssuedCertificate,
        issued_at: SystemTime,
        jitter_draw: f64,
    ) -> SystemTime {
        let lifetime = cert.lifetime().as_secs_f64();
        let early = lifetime * self.renew_fraction.clamp(0.0, 1.0)
            + lifetime * self.jitter_fraction.clamp(0.0, 1.0) * jitter_draw.clamp(0.0, 1.0);
        let early = early.min(lifetime);
        issued_at + Duration::from_secs_f64(lifetime - early)
    }
}

/// Settings of a [`CertManager`].
#[derive(Clone, Debug)]
pub struct CertManagerConfig {
    /// Validity of xDS client certificates. Default 24h.
    pub xds_cert_validity: Duration,
    pub rotation: RotationPolicy,
}

impl Default for CertManagerConfig {
    fn default() -> Self {
        Self {
            xds_cert_validity: DEFAULT_SERVICE_CERT_VALIDITY,
            rotation: RotationPolicy::default(),
        }
    }
}

/// The identity a cached certificate belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum CertKey {
    /// A service certificate (`<sa>.<ns>.cluster.local` + SPIFFE URI SAN). SDS name
    /// `service-cert:<ns>/<sa>`.
    Service {
        identity: ServiceIdentity,
        trust_domain: String,
    },
    /// A proxy's xDS client certificate.
    Xds(XdsCommonName),
    /// A control-plane server certificate (the ADS server's), by common name.
    Server { common_name: String },
}

/// Why a [`CertEvent`] was sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RotationReason {
    /// The certificate crossed the renewal threshold and was re-issued.
    Expiring,
    /// A new root was installed; the certificate was re-issued by it.
    RootRotation,
    /// Only the trust bundle changed (an old root was dropped); same leaf.
    TrustBundleChanged,
}

/// Announced on [`CertManager::subscribe`] whenever a cached identity gets a new certificate or
/// trust bundle: the controller pushes the new secret to the proxies of `key`.
#[derive(Clone, Debug)]
pub struct CertEvent {
    pub key: CertKey,
    pub cert: Arc<IssuedCertificate>,
    pub reason: RotationReason,
}

/// Outcome of one [`CertManager::rotate_due`] pass.
#[derive(Debug, Default)]
pub struct RotationReport {
    pub rotated: Vec<CertKey>,
    pub failed: Vec<(CertKey, CertError)>,
}

struct Entry {
    request: CertificateRequest,
    cert: Arc<IssuedCertificate>,
    renew_at: SystemTime,
}

type Slot = Arc<tokio::sync::Mutex<Option<Entry>>>;

struct Inner {
    provider: RwLock<Arc<dyn CertificateProvider>>,
    clock: Arc<dyn Clock>,
    config: CertManagerConfig,
    cache: Mutex<HashMap<CertKey, Slot>>,
    /// Roots kept trusted during a root rotation, PEM blocks.
    retained_roots: Mutex<Vec<String>>,
    /// The bundle of the last certificate issued (or re-bundled).
    trust_bundle: Mutex<Option<String>>,
    events: broadcast::Sender<CertEvent>,
}

/// Issues, caches and rotates the mesh's certificates. Cheap to clone (shared state).
#[derive(Clone)]
pub struct CertManager {
    inner: Arc<Inner>,
}

// === CertManager ===

impl CertManager {
    /// A manager on the system clock.
    pub fn new(provider: Arc<dyn CertificateProvider>, config: CertManagerConfig) -> Self {
        Self::with_clock(provider, config, Arc::new(SystemClock))
    }

    /// A manager on an injected clock (tests).
    pub fn with_clock(
        provider: Arc<dyn CertificateProvider>,
        config: CertManagerConfig,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let (events, _) = broadcast::channel(1024);
        Self {
            inner: Arc::new(Inner {
                provider: RwLock::new(provider),
                clock,
                config,
                cache: Mutex::new(HashMap::new()),
                retained_roots: Mutex::new(Vec::new()),
                trust_bundle: Mutex::new(None),
                events,
            }),
        }
    }

    /// The active provider's name.
    pub fn provider_name(&self) -> &'static str {
        self.inner.provider.read().name()
    }

    /// Rotation announcements. A receiver that falls more than 1024 events behind gets
    /// `RecvError::Lagged` and should resync from [`CertManager::cached`].
    pub fn subscribe(&self) -> broadcast::Receiver<CertEvent> {
        self.inner.events.subscribe()
    }

    /// The service certificate of `<sa>.<ns>`: CN `<sa>.<ns>.cluster.local`, URI SAN
    /// `spiffe://<trust_domain>/ns/<ns>/sa/<sa>`, lifetime `validity`. Served from the cache
    /// while not due for renewal (and while `validity` is unchanged).
    pub async fn issue_service_certificate(
        &self,
        sa: &str,
        ns: &str,
        trust_domain: &str,
        validity: Duration,
    ) -> Result<Arc<IssuedCertificate>, CertError> {
        let identity = ServiceIdentity::new(sa, ns).checked()?;
        if trust_domain.is_empty() || trust_domain.contains('/') {
            return Err(CertError::InvalidRequest(format!(
                "bad trust domain {trust_domain:?}"
            )));
        }
        let request = CertificateRequest::new(identity.common_name(), validity)
            .with_uri_san(identity.spiffe_id(trust_domain));
        let key = CertKey::Service {
            identity,
            trust_domain: trust_domain.to_owned(),
        };
        self.get_or_issue(key, request).await
    }

    /// The xDS client certificate of a proxy: CN `<proxy-UUID>.<kind>.<sa>.<ns>` (FSM's
    /// `<proxy-UUID>.<kind>.<proxy-identity>`), lifetime [`CertManagerConfig::xds_cert_validity`].
    pub async fn issue_xds_certificate(
        &self,
        proxy_uuid: Uuid,
        kind: ProxyKind,
        sa: &str,
        ns: &str,
    ) -> Result<Arc<IssuedCertificate>, CertError> {
        let cn = XdsCommonName {
            proxy_uuid,
            kind,
            identity: ServiceIdentity::new(sa, ns).checked()?,
        };
        let request = CertificateRequest::new(cn.to_string(), self.inner.config.xds_cert_validity);
        self.get_or_issue(CertKey::Xds(cn), request).await
    }

    /// A server certificate for a control-plane endpoint (the ADS server): CN `common_name`, DNS
    /// SAN `common_name`, lifetime `validity`; cached and rotated like every other certificate.
    pub async fn issue_server_certificate(
        &self,
        common_name: &str,
        validity: Duration,
    ) -> Result<Arc<IssuedCertificate>, CertError> {
        let request = CertificateRequest::new(common_name, validity).with_dns_san(common_name);
        let key = CertKey::Server {
            common_name: common_name.to_owned(),
        };
        self.get_or_issue(key, request).await
    }

    /// The cached certificate of `key`, if any, checked against the clock: an expired (or not
    /// yet valid) one is an error with code E4016.
    pub async fn cached(&self, key: &CertKey) -> Option<Result<Arc<IssuedCertificate>, CertError>> {
        let slot = self.inner.cache.lock().get(key).cloned()?;
        let cert = slot.lock().await.as_ref()?.cert.clone();
        Some(self.check(&cert).map(|()| cert))
    }

    /// Every cached identity.
    pub fn cached_keys(&self) -> Vec<CertKey> {
        self.inner.cache.lock().keys().cloned().collect()
    }

    /// Forgets `key` (e.g. its ServiceAccount was deleted).
    pub fn release(&self, key: &CertKey) {
        self.inner.cache.lock().remove(key);
    }

    /// Checks `cert` against the manager's clock: E4016 when expired or not yet valid.
    pub fn check(&self, cert: &IssuedCertificate) -> Result<(), CertError> {
        cert.check_validity(self.inner.clock.now())
    }

    /// The trust bundle certificates are currently issued with (provider root plus any roots
    /// retained by [`CertManager::rotate_root`]), if anything was issued yet.
    pub fn trust_bundle_pem(&self) -> Option<String> {
        self.inner.trust_bundle.lock().clone()
    }

    /// Re-issues every cached certificate whose renewal time has passed, announcing each on
    /// [`CertManager::subscribe`]. A failure keeps the old certificate (logged with E4016).
    pub async fn rotate_due(&self) -> RotationReport {
        let now = self.inner.clock.now();
        self.reissue(RotationReason::Expiring, |entry| now >= entry.renew_at)
            .await
    }

    /// Runs [`CertManager::rotate_due`] every `check_every`, forever. Spawn it.
    pub async fn run_rotation(self, check_every: Duration) {
        let mut tick = tokio::time::interval(check_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let report = self.rotate_due().await;
            if !report.rotated.is_empty() {
                tracing::info!(count = report.rotated.len(), "rotated certificates");
            }
        }
    }

    /// Starts a root rotation: `new_provider` (signing with the new root) replaces the current
    /// one, the current trust bundle is retained so that peers holding certificates of the old
    /// root stay trusted, and every cached certificate is re-issued by the new root and
    /// announced ([`RotationReason::RootRotation`]). The bundle then holds old and new roots
    /// until [`CertManager::finish_root_rotation`].
    pub async fn rotate_root(&self, new_provider: Arc<dyn CertificateProvider>) -> RotationReport {
        if let Some(bundle) = self.trust_bundle_pem() {
            let mut retained = self.inner.retained_roots.lock();
            for root in split_pem_certs(&bundle) {
                if !retained.contains(&root) {
                    retained.push(root);
                }
            }
        }
        *self.inner.provider.write() = new_provider;
        self.reissue(RotationReason::RootRotation, |_| true).await
    }

    /// Re-issues every cached certificate `due` selects, announcing each with `reason`. A
    /// failure keeps the old certificate and is logged and counted with E4016.
    async fn reissue(
        &self,
        reason: RotationReason,
        due: impl Fn(&Entry) -> bool,
    ) -> RotationReport {
        let mut report = RotationReport::default();
        for (key, slot) in self.slots() {
            let mut guard = slot.lock().await;
            let Some(entry) = guard.as_mut().filter(|e| due(e)) else {
                continue;
            };
            match self.issue_entry(&entry.request).await {
                Ok(new) => {
                    *entry = new;
                    self.announce(&key, entry.cert.clone(), reason);
                    report.rotated.push(key);
                }
                Err(source) => {
                    let err = CertError::Rotation {
                        common_name: entry.request.common_name.clone(),
                        source: Box::new(source),
                    };
                    tracing::error!(code = %err.err_code(), error = %err, cn = %entry.request.common_name, ?reason, "certificate re-issue failed; keeping the previous one");
                    fsm_errcode::count(err.err_code());
                    report.failed.push((key, err));
                }
            }
        }
        report
    }

    /// The cache's slots, taken out of its lock so each can be awaited on.
    fn slots(&self) -> Vec<(CertKey, Slot)> {
        self.inner
            .cache
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Ends a root rotation: old roots leave the trust bundle, and every cached certificate is
    /// announced again with the new bundle ([`RotationReason::TrustBundleChanged`]). Call it once
    /// every proxy has received a certificate of the new root.
    pub async fn finish_root_rotation(&self) {
        let retained = std::mem::take(&mut *self.inner.retained_roots.lock());
        if retained.is_empty() {
            return;
        }
        let current = self.inner.trust_bundle.lock().clone();
        if let Some(bundle) = current {
            let kept: Vec<String> = split_pem_certs(&bundle)
                .into_iter()
                .filter(|r| !retained.contains(r))
                .collect();
            *self.inner.trust_bundle.lock() = Some(kept.concat());
        }
        for (key, slot) in self.slots() {
            let mut guard = slot.lock().await;
            let Some(entry) = guard.as_mut() else {
                continue;
            };
            let bundle: Vec<String> = split_pem_certs(&entry.cert.trust_bundle_pem)
                .into_iter()
                .filter(|r| !retained.contains(r))
                .collect();
            let mut cert = (*entry.cert).clone();
            cert.trust_bundle_pem = bundle.concat();
            entry.cert = Arc::new(cert);
            self.announce(&key, entry.cert.clone(), RotationReason::TrustBundleChanged);
        }
    }

    async fn get_or_issue(
        &self,
        key: CertKey,
        request: CertificateRequest,
    ) -> Result<Arc<IssuedCertificate>, CertError> {
        let slot = self
            .inner
            .cache
            .lock()
            .entry(key.clone())
            .or_default()
            .clone();
        let mut guard = slot.lock().await;
        let now = self.inner.clock.now();
        if let Some(entry) = guard.as_ref()
            && entry.request == request
            && now < entry.renew_at
        {
            return Ok(entry.cert.clone());
        }
        let rotating = guard.is_some();
        let entry = self.issue_entry(&request).await?;
        let cert = entry.cert.clone();
        *guard = Some(entry);
        if rotating {
            self.announce(&key, cert.clone(), RotationReason::Expiring);
        }
        Ok(cert)
    }

    async fn issue_entry(&self, request: &CertificateRequest) -> Result<Entry, CertError> {
        request.validate()?;
        let provider = self.inner.provider.read().clone();
        let mut cert = provider.issue(request).await.inspect_err(|e| {
            tracing::error!(code = %e.err_code(), error = %e, provider = provider.name(), cn = %request.common_name, "certificate issuance failed");
            fsm_errcode::count(e.err_code());
        })?;
        self.check(&cert)?;
        let retained = self.inner.retained_roots.lock().clone();
        if !retained.is_empty() {
            let mut roots = split_pem_certs(&cert.trust_bundle_pem);
            for r in retained {
                if !roots.contains(&r) {
                    roots.push(r);
                }
            }
            cert.trust_bundle_pem = roots.concat();
        }
        *self.inner.trust_bundle.lock() = Some(cert.trust_bundle_pem.clone());
        let renew_at =
            self.inner
                .config
                .rotation
                .renew_at(&cert, self.inner.clock.now(), fastrand::f64());
        tracing::debug!(cn = %cert.common_name, serial = %cert.serial, provider = provider.name(), "issued certificate");
        Ok(Entry {
            request: request.clone(),
            cert: Arc::new(cert),
            renew_at,
        })
    }

    fn announce(&self, key: &CertKey, cert: Arc<IssuedCertificate>, reason: RotationReason) {
        // No receivers is fine: nobody needs the push yet.
        let _ = self.inner.events.send(CertEvent {
            key: key.clone(),
            cert,
            reason,
        });
    }
}

impl std::fmt::Debug for CertManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertManager")
            .field("provider", &self.provider_name())
            .field("cached", &self.inner.cache.lock().len())
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// Splits a PEM bundle into one normalised PEM text per certificate.
fn split_pem_certs(bundle: &str) -> Vec<String> {
    x509::certificates_der(bundle)
        .map(|ders| ders.into_iter().map(|d| x509::der_to_pem(&d)).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::PrivateKeyPem;

    fn cert(lifetime: Duration) -> IssuedCertificate {
        let nb = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        IssuedCertificate {
            common_name: "x".into(),
            cert_chain_pem: String::new(),
            private_key: PrivateKeyPem::new(""),
            issuing_ca_pem: String::new(),
            trust_bundle_pem: String::new(),
            not_before: nb,
            not_after: nb + lifetime,
            serial: "01".into(),
        }
    }

    #[test]
    fn renew_at_one_third_remaining_with_bounded_jitter() {
        let day = Duration::from_secs(24 * 3600);
        let c = cert(day);
        let policy = RotationPolicy::default();
        // No jitter draw: exactly 16h after not_before.
        assert_eq!(
            policy.renew_at(&c, c.not_before, 0.0),
            c.not_before + Duration::from_secs(16 * 3600)
        );
        // Largest draw: 48 minutes earlier (1/30 of 24h), never later.
        let earliest = c.not_before + Duration::from_secs(16 * 3600 - 48 * 60);
        let t = policy.renew_at(&c, c.not_before, 0.999_999);
        assert!(
            t >= earliest - Duration::from_secs(1)
                && t < c.not_before + Duration::from_secs(16 * 3600)
        );
    }
}
