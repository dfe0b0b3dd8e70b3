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
//!
//! # Root rotation
//!
//! A new root must never reach a proxy before every peer trusts it, and the old root must not
//! leave a bundle while a peer still holds a leaf it signed. So a root rotation has three
//! phases, each a method, and [`CertManager::rotate_root`] runs them with the waiting between:
//!
//! 1. [`CertManager::begin_root_rotation`]: every bundle gets the new root beside the old one;
//!    leaves are unchanged ([`RotationReason::TrustBundleChanged`]). New leaves still come from
//!    the old root, which every peer trusts.
//! 2. once every proxy acknowledged that bundle, [`CertManager::reissue_from_new_root`]: every
//!    leaf is re-issued by the new root ([`RotationReason::RootRotation`]), bundles still hold
//!    both roots.
//! 3. once every proxy acknowledged its new leaf, [`CertManager::finish_root_rotation`]: the old
//!    root leaves every bundle ([`RotationReason::TrustBundleChanged`]).
//!
//! A proxy that does not acknowledge holds a phase back for at most the grace period.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use fsm_errcode::HasErrCode;
use parking_lot::Mutex;
use tokio::sync::broadcast;
use uuid::Uuid;

use crate::clock::{Clock, SystemClock};
use crate::error::CertError;
use crate::identity::{
    CLUSTER_DOMAIN, ProxyKind, ServiceIdentity, XdsCommonName, checked_service_identity,
};
use crate::provider::CertificateProvider;
use crate::types::{CertPurpose, CertificateRequest, IssuedCertificate};
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
    /// Only the trust bundle changed (a root rotation added the new root, or dropped the old
    /// one); same leaf.
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

/// Where a root rotation stands; see the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RootRotationPhase {
    /// Phase 1: bundles hold both roots, leaves still come from the old root.
    TrustingBoth,
    /// Phase 2: leaves come from the new root, bundles still hold both roots.
    NewLeaves,
}

/// How [`CertManager::rotate_root`] waits between phases.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RootRotationTiming {
    /// Longest wait in each phase for every proxy to acknowledge (`--root-rotation-grace`).
    pub grace: Duration,
    /// How often "every proxy acknowledged" is checked.
    pub poll: Duration,
    /// How often leaves the new root failed to issue are tried again while phase 2 waits.
    pub retry: Duration,
}

impl RootRotationTiming {
    pub fn with_grace(grace: Duration) -> Self {
        Self {
            grace,
            poll: Duration::from_millis(100),
            retry: Duration::from_secs(1),
        }
    }
}

/// One phase of a [`CertManager::rotate_root`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PhaseOutcome {
    /// Identities announced in this phase.
    pub announced: usize,
    /// From the phase's start until every proxy acknowledged, or until the grace ran out.
    pub elapsed: Duration,
    /// Every proxy acknowledged (false: the grace period ended the phase).
    pub acked: bool,
}

/// What a [`CertManager::rotate_root`] did.
#[derive(Debug)]
pub struct RootRotationOutcome {
    /// Phase 1: both roots trusted.
    pub trusting_both: PhaseOutcome,
    /// Phase 2: leaves re-issued by the new root.
    pub new_leaves: PhaseOutcome,
    /// Phase 3: the old root dropped.
    pub old_root_dropped: PhaseOutcome,
    /// Leaves the new root could not issue before the old root was dropped (retried by the
    /// rotation loop).
    pub failed: Vec<(CertKey, CertError)>,
}

impl RootRotationOutcome {
    /// From the start of phase 1 until every proxy acknowledged phase 3 (or the grace ran out).
    pub fn elapsed(&self) -> Duration {
        self.trusting_both.elapsed + self.new_leaves.elapsed + self.old_root_dropped.elapsed
    }
}

struct Entry {
    request: CertificateRequest,
    cert: Arc<IssuedCertificate>,
    renew_at: SystemTime,
    /// [`Issuer::epoch`] of the provider that signed `cert`.
    epoch: u64,
}

/// Who signs, and what every bundle holds. Changed only between phases of a root rotation.
struct Issuer {
    provider: Arc<dyn CertificateProvider>,
    /// Bumped each time `provider` is replaced.
    epoch: u64,
    /// Bumped on every change here: an issuance that started under an older generation does not
    /// overwrite `trust_bundle`.
    generation: u64,
    /// Roots added to every issued bundle besides the provider's own: during a root rotation,
    /// the root that is not signing.
    extra_roots: Vec<String>,
    /// The bundle certificates are issued with.
    trust_bundle: Option<String>,
    rotation: Option<Rotation>,
}

struct Rotation {
    phase: RootRotationPhase,
    /// The new root's provider, until phase 2 installs it.
    pending: Option<Arc<dyn CertificateProvider>>,
    /// Roots only the old CA has: dropped by phase 3.
    old_only: Vec<String>,
    new_roots: Vec<String>,
}

type Slot = Arc<tokio::sync::Mutex<Option<Entry>>>;

struct Inner {
    issuer: Mutex<Issuer>,
    clock: Arc<dyn Clock>,
    config: CertManagerConfig,
    cache: Mutex<HashMap<CertKey, Slot>>,
    /// No cached certificate is due for renewal before this (`None`: none is cached). The
    /// once-a-second check reads it instead of visiting every certificate: at ten thousand
    /// proxies that visit cost more than everything else the controller did in a quiet second.
    next_due: Mutex<Option<SystemTime>>,
    events: broadcast::Sender<CertEvent>,
    /// How many announcements were made, for writers that report how far they have caught up.
    announced: std::sync::atomic::AtomicU64,
    /// One [`CertManager::rotate_root`] at a time.
    rotating: tokio::sync::Mutex<()>,
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
                issuer: Mutex::new(Issuer {
                    provider,
                    epoch: 0,
                    generation: 0,
                    extra_roots: Vec::new(),
                    trust_bundle: None,
                    rotation: None,
                }),
                clock,
                config,
                cache: Mutex::new(HashMap::new()),
                next_due: Mutex::new(None),
                events,
                announced: std::sync::atomic::AtomicU64::new(0),
                rotating: tokio::sync::Mutex::new(()),
            }),
        }
    }

    /// The active provider's name.
    pub fn provider_name(&self) -> &'static str {
        self.inner.issuer.lock().provider.name()
    }

    /// How many rotation announcements have been made so far. A consumer that records this
    /// before acting on the certificates it reads, and reports it afterwards, has caught up with
    /// every announcement up to it (the bootstrap writer does, so a root rotation's phases can
    /// wait for the files it writes).
    pub fn announcements(&self) -> u64 {
        self.inner
            .announced
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Rotation announcements. A receiver that falls more than 1024 events behind gets
    /// `RecvError::Lagged` and should resync from [`CertManager::cached`].
    pub fn subscribe(&self) -> broadcast::Receiver<CertEvent> {
        self.inner.events.subscribe()
    }

    /// Runs `on_new` with every new certificate of `key` (renewals and root rotation phases),
    /// in a task of its own, until the manager's announcements end. After falling behind the
    /// announcements it runs with the cached certificate, so no rotation is missed.
    pub fn follow<F, Fut>(&self, key: CertKey, mut on_new: F)
    where
        F: FnMut(Arc<IssuedCertificate>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let mut rotations = self.subscribe();
        let manager = self.clone();
        tokio::spawn(async move {
            loop {
                match rotations.recv().await {
                    Ok(event) if event.key == key => on_new(event.cert).await,
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        if let Some(Ok(cert)) = manager.cached(&key).await {
                            on_new(cert).await;
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
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
        let identity = checked_service_identity(sa, ns)?;
        if trust_domain.is_empty() || trust_domain.contains('/') {
            return Err(CertError::InvalidRequest(format!(
                "bad trust domain {trust_domain:?}"
            )));
        }
        let request = CertificateRequest::new(identity.common_name(CLUSTER_DOMAIN), validity)
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
            identity: checked_service_identity(sa, ns)?,
        };
        // No SPIFFE URI SAN and clientAuth only: a peer's meshed inbound port refuses it, and
        // it can serve no TLS server.
        let request = CertificateRequest::new(cn.to_string(), self.inner.config.xds_cert_validity)
            .with_purpose(CertPurpose::XdsClient);
        self.get_or_issue(CertKey::Xds(cn), request).await
    }

    /// A server certificate for a control-plane endpoint (the ADS server): CN `common_name`, DNS
    /// SAN `common_name`, lifetime `validity`; cached and rotated like every other certificate.
    pub async fn issue_server_certificate(
        &self,
        common_name: &str,
        validity: Duration,
    ) -> Result<Arc<IssuedCertificate>, CertError> {
        // serverAuth only: a client presenting it is refused by the ADS server and by peers.
        let request = CertificateRequest::new(common_name, validity)
            .with_dns_san(common_name)
            .with_purpose(CertPurpose::Server);
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

    /// The trust bundle certificates are currently issued with (the provider's roots, and
    /// during a root rotation the other root too), if anything was issued yet.
    pub fn trust_bundle_pem(&self) -> Option<String> {
        self.inner.issuer.lock().trust_bundle.clone()
    }

    /// The phase of the root rotation in progress, if any.
    pub fn root_rotation_phase(&self) -> Option<RootRotationPhase> {
        self.inner.issuer.lock().rotation.as_ref().map(|r| r.phase)
    }

    /// Re-issues every cached certificate whose renewal time has passed, announcing each on
    /// [`CertManager::subscribe`]. A failure keeps the old certificate (logged with E4016).
    pub async fn rotate_due(&self) -> RotationReport {
        let now = self.inner.clock.now();
        {
            let mut next_due = self.inner.next_due.lock();
            if next_due.is_none_or(|due| now < due) {
                return RotationReport::default();
            }
            // The visit below notes every certificate's renewal time again.
            *next_due = None;
        }
        self.reissue(RotationReason::Expiring, |entry| now >= entry.renew_at)
            .await
    }

    /// Remembers that a cached certificate is due for renewal at `at`.
    fn note_due(&self, at: SystemTime) {
        let mut next_due = self.inner.next_due.lock();
        *next_due = Some(next_due.map_or(at, |due| due.min(at)));
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

    /// Rotates the root to `new_provider`'s, in the three phases of the module docs. Between
    /// phases it waits until every announcement was received by every subscriber and `in_sync`
    /// says every proxy acknowledged what it was sent, or until `timing.grace` has passed in
    /// that phase. Then it waits the same way for the old root to have left every proxy's bundle.
    /// Refused (nothing changed) when the new provider cannot issue. One rotation at a time.
    pub async fn rotate_root(
        &self,
        new_provider: Arc<dyn CertificateProvider>,
        in_sync: impl Fn() -> bool + Send + Sync,
        timing: RootRotationTiming,
    ) -> Result<RootRotationOutcome, CertError> {
        let _one_at_a_time = self.inner.rotating.lock().await;
        let started = Instant::now();
        let announced = self.begin_root_rotation(new_provider).await?.rotated.len();
        tracing::info!(
            announced,
            "root rotation 1/3: every bundle trusts the old and the new root"
        );
        let acked = self
            .wait_for_acks(&in_sync, started + timing.grace, timing.poll)
            .await;
        let trusting_both = self.phase_done(1, started, announced, acked);

        let started = Instant::now();
        let report = self.reissue_from_new_root().await?;
        let announced = report.rotated.len();
        tracing::info!(
            announced,
            failed = report.failed.len(),
            "root rotation 2/3: leaves re-issued by the new root"
        );
        let deadline = started + timing.grace;
        let mut failed = report.failed;
        // Leaves the new root could not issue yet are tried again every `retry` while the
        // others are acknowledged; the phase is over when every leaf is of the new root and
        // acknowledged, or at the deadline.
        let acked = loop {
            let until = deadline.min(Instant::now() + timing.retry);
            let acked = self.wait_for_acks(&in_sync, until, timing.poll).await;
            if acked && failed.is_empty() {
                break true;
            }
            tokio::time::sleep_until(until).await;
            if Instant::now() >= deadline {
                break false;
            }
            if !failed.is_empty() {
                failed = self.reissue_from_new_root().await?.failed;
            }
        };
        let new_leaves = self.phase_done(2, started, announced, acked);

        let started = Instant::now();
        let report = self.finish_root_rotation().await?;
        let announced = report.rotated.len();
        tracing::info!(
            announced,
            "root rotation 3/3: the old root is no longer trusted"
        );
        let acked = self
            .wait_for_acks(&in_sync, started + timing.grace, timing.poll)
            .await;
        let old_root_dropped = self.phase_done(3, started, announced, acked);
        let outcome = RootRotationOutcome {
            trusting_both,
            new_leaves,
            old_root_dropped,
            failed: report.failed,
        };
        tracing::info!(
            elapsed_ms = outcome.elapsed().as_millis() as u64,
            failed = outcome.failed.len(),
            "root rotation finished"
        );
        Ok(outcome)
    }

    fn phase_done(
        &self,
        phase: u8,
        started: Instant,
        announced: usize,
        acked: bool,
    ) -> PhaseOutcome {
        let elapsed = started.elapsed();
        if acked {
            tracing::info!(
                phase,
                elapsed_ms = elapsed.as_millis() as u64,
                "root rotation: every proxy acknowledged"
            );
        } else {
            // Going on regardless: a proxy that never acknowledges must not keep the old root
            // trusted forever. Its peers may refuse it until it catches up.
            fsm_errcode::warn!(
                fsm_errcode::ErrCode::E4016,
                phase,
                elapsed_ms = elapsed.as_millis() as u64,
                "root rotation: not every proxy acknowledged within the grace period; going on"
            );
        }
        PhaseOutcome {
            announced,
            elapsed,
            acked,
        }
    }

    /// Waits until every announcement was received by every subscriber (so the controller has
    /// published it) and `in_sync()`, checking every `poll`; false at `deadline`.
    async fn wait_for_acks(
        &self,
        in_sync: &(impl Fn() -> bool + Send + Sync),
        deadline: Instant,
        poll: Duration,
    ) -> bool {
        loop {
            if self.inner.events.is_empty() && in_sync() {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            tokio::time::sleep(poll.min(deadline - now)).await;
        }
    }

    /// Phase 1 of a root rotation: the new root is added to every bundle, and each cached
    /// certificate is announced with it ([`RotationReason::TrustBundleChanged`], same leaf).
    /// Leaves are still issued by the current provider, with both roots in their bundle, until
    /// [`CertManager::reissue_from_new_root`]. Refused when a rotation is in progress, or when
    /// `new_provider` cannot issue (tried with a cached certificate's request, which is
    /// discarded): nothing changes then.
    pub async fn begin_root_rotation(
        &self,
        new_provider: Arc<dyn CertificateProvider>,
    ) -> Result<RotationReport, CertError> {
        self.expect_phase(None)?;
        let Some(request) = self.any_request().await else {
            // Nothing issued: no peer to keep in sync.
            let mut issuer = self.inner.issuer.lock();
            issuer.provider = new_provider;
            issuer.epoch += 1;
            issuer.generation += 1;
            issuer.trust_bundle = None;
            return Ok(RotationReport::default());
        };
        let probe = new_provider.issue(&request).await.inspect_err(|e| {
            fsm_errcode::error!(e.err_code(), error = %e, provider = new_provider.name(), "the new root cannot issue; root rotation not started");
        })?;
        self.check(&probe)?;
        // A root whose own leaves do not verify against its bundle would break every peer.
        x509::verify_chain(&probe.cert_chain_pem, &probe.trust_bundle_pem)?;
        let new_roots = split_pem_certs(&probe.trust_bundle_pem);
        let added = {
            let mut issuer = self.inner.issuer.lock();
            if let Some(rotation) = &issuer.rotation {
                return Err(out_of_order(Some(rotation.phase), None));
            }
            let old_roots = split_pem_certs(issuer.trust_bundle.as_deref().unwrap_or_default());
            let added: Vec<String> = new_roots
                .iter()
                .filter(|r| !old_roots.contains(r))
                .cloned()
                .collect();
            let old_only: Vec<String> = old_roots
                .iter()
                .filter(|r| !new_roots.contains(r))
                .cloned()
                .collect();
            issuer.extra_roots = added.clone();
            issuer.generation += 1;
            issuer.trust_bundle = Some(merge_roots(&old_roots, &added).concat());
            issuer.rotation = Some(Rotation {
                phase: RootRotationPhase::TrustingBoth,
                pending: Some(new_provider),
                old_only,
                new_roots,
            });
            added
        };
        Ok(self.rebundle(|roots| merge_roots(roots, &added)).await)
    }

    /// Phase 2 of a root rotation: the new root's provider signs from now on, and every cached
    /// certificate not yet signed by it is re-issued and announced
    /// ([`RotationReason::RootRotation`]); bundles keep both roots. Call it once every proxy
    /// acknowledged the bundles of phase 1; call it again to retry the failures it reports.
    pub async fn reissue_from_new_root(&self) -> Result<RotationReport, CertError> {
        let epoch = {
            let mut guard = self.inner.issuer.lock();
            let issuer = &mut *guard;
            match &mut issuer.rotation {
                Some(rotation) if rotation.phase == RootRotationPhase::TrustingBoth => {
                    if let Some(provider) = rotation.pending.take() {
                        issuer.provider = provider;
                    }
                    rotation.phase = RootRotationPhase::NewLeaves;
                    // The provider's bundle holds the new root; the old one rides along.
                    issuer.extra_roots = rotation.old_only.clone();
                    issuer.epoch += 1;
                    issuer.generation += 1;
                }
                Some(_) => {}
                None => {
                    return Err(out_of_order(None, Some(RootRotationPhase::TrustingBoth)));
                }
            }
            issuer.epoch
        };
        Ok(self
            .reissue(RotationReason::RootRotation, |entry| entry.epoch < epoch)
            .await)
    }

    /// Phase 3 of a root rotation: the old root leaves every bundle, and each cached
    /// certificate is announced again ([`RotationReason::TrustBundleChanged`]). Call it once
    /// every proxy acknowledged its leaf of the new root (or when the grace period is over).
    /// A leaf the new root still could not issue is reported in `failed` and renewed by the
    /// next [`CertManager::rotate_due`].
    pub async fn finish_root_rotation(&self) -> Result<RotationReport, CertError> {
        self.expect_phase(Some(RootRotationPhase::NewLeaves))?;
        let last_try = self.reissue_from_new_root().await?;
        let old_only = {
            let mut issuer = self.inner.issuer.lock();
            let Some(rotation) = issuer.rotation.take() else {
                return Err(out_of_order(None, Some(RootRotationPhase::NewLeaves)));
            };
            issuer.extra_roots.clear();
            issuer.generation += 1;
            issuer.trust_bundle = Some(rotation.new_roots.concat());
            rotation.old_only
        };
        let mut report = self
            .rebundle(|roots| {
                let kept: Vec<String> = roots
                    .iter()
                    .filter(|r| !old_only.contains(r))
                    .cloned()
                    .collect();
                // Never an empty bundle (a certificate issued by nothing we know of).
                if kept.is_empty() {
                    roots.to_vec()
                } else {
                    kept
                }
            })
            .await;
        report.failed = last_try.failed;
        Ok(report)
    }

    fn expect_phase(&self, expected: Option<RootRotationPhase>) -> Result<(), CertError> {
        let current = self.root_rotation_phase();
        if current == expected {
            Ok(())
        } else {
            Err(out_of_order(current, expected))
        }
    }

    /// The request of some cached certificate.
    async fn any_request(&self) -> Option<CertificateRequest> {
        for (_, slot) in self.slots() {
            if let Some(entry) = slot.lock().await.as_ref() {
                return Some(entry.request.clone());
            }
        }
        None
    }

    /// Gives every cached certificate the bundle `roots` makes of its roots, and announces the
    /// ones that changed ([`RotationReason::TrustBundleChanged`]; same leaf).
    async fn rebundle(&self, roots: impl Fn(&[String]) -> Vec<String>) -> RotationReport {
        let mut report = RotationReport::default();
        for (key, slot) in self.slots() {
            let mut guard = slot.lock().await;
            let Some(entry) = guard.as_mut() else {
                continue;
            };
            let bundle = roots(&split_pem_certs(&entry.cert.trust_bundle_pem)).concat();
            if bundle == entry.cert.trust_bundle_pem {
                continue;
            }
            let mut cert = (*entry.cert).clone();
            cert.trust_bundle_pem = bundle;
            entry.cert = Arc::new(cert);
            self.announce(&key, entry.cert.clone(), RotationReason::TrustBundleChanged);
            report.rotated.push(key);
        }
        report
    }

    /// Re-issues every cached certificate `due` selects, announcing each with `reason`. A
    /// failure keeps the old certificate, makes it due for the next [`CertManager::rotate_due`],
    /// and is logged and counted with E4016.
    async fn reissue(
        &self,
        reason: RotationReason,
        due: impl Fn(&Entry) -> bool,
    ) -> RotationReport {
        let mut report = RotationReport::default();
        for (key, slot) in self.slots() {
            let mut guard = slot.lock().await;
            let Some(entry) = guard.as_mut() else {
                continue;
            };
            if !due(entry) {
                self.note_due(entry.renew_at);
                continue;
            }
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
                    fsm_errcode::error!(err.err_code(), error = %err, cn = %entry.request.common_name, ?reason, "certificate re-issue failed; keeping the previous one");
                    entry.renew_at = entry.renew_at.min(self.inner.clock.now());
                    self.note_due(entry.renew_at);
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
        let started = std::time::Instant::now();
        request.validate()?;
        let (provider, epoch, generation, extra_roots) = {
            let issuer = self.inner.issuer.lock();
            let i = &*issuer;
            (
                i.provider.clone(),
                i.epoch,
                i.generation,
                i.extra_roots.clone(),
            )
        };
        let mut cert = provider.issue(request).await.inspect_err(|e| {
            fsm_errcode::error!(e.err_code(), error = %e, provider = provider.name(), cn = %request.common_name, "certificate issuance failed");
        })?;
        self.check(&cert)?;
        if !extra_roots.is_empty() {
            cert.trust_bundle_pem =
                merge_roots(&split_pem_certs(&cert.trust_bundle_pem), &extra_roots).concat();
        }
        {
            let mut issuer = self.inner.issuer.lock();
            // A rotation phase that began meanwhile has set the bundle itself.
            if issuer.generation == generation {
                issuer.trust_bundle = Some(cert.trust_bundle_pem.clone());
            }
        }
        let renew_at =
            self.inner
                .config
                .rotation
                .renew_at(&cert, self.inner.clock.now(), fastrand::f64());
        tracing::debug!(cn = %cert.common_name, serial = %cert.serial, provider = provider.name(), "issued certificate");
        crate::metrics::issued(started.elapsed());
        self.note_due(renew_at);
        Ok(Entry {
            request: request.clone(),
            cert: Arc::new(cert),
            renew_at,
            epoch,
        })
    }

    fn announce(&self, key: &CertKey, cert: Arc<IssuedCertificate>, reason: RotationReason) {
        // Counted before it is sent, so a consumer never sees an announcement it cannot count.
        self.inner
            .announced
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
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

/// `roots`, then those of `more` not among them.
fn merge_roots(roots: &[String], more: &[String]) -> Vec<String> {
    let mut merged = roots.to_vec();
    for root in more {
        if !merged.contains(root) {
            merged.push(root.clone());
        }
    }
    merged
}

/// A root rotation phase method called in the wrong phase.
fn out_of_order(
    current: Option<RootRotationPhase>,
    expected: Option<RootRotationPhase>,
) -> CertError {
    let name = |p: Option<RootRotationPhase>| match p {
        None => "no root rotation",
        Some(RootRotationPhase::TrustingBoth) => "root rotation phase 1 (both roots trusted)",
        Some(RootRotationPhase::NewLeaves) => "root rotation phase 2 (leaves of the new root)",
    };
    CertError::InvalidRequest(format!(
        "root rotation step needs {}, but the manager is in {}",
        name(expected),
        name(current)
    ))
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

    #[tokio::test]
    async fn every_certificate_issued_is_counted_and_timed_and_a_cached_one_is_not() {
        let tresor = crate::tresor::TresorProvider::generate().expect("a root");
        let manager = CertManager::new(Arc::new(tresor), CertManagerConfig::default());
        let m = crate::metrics::metrics();
        let (count, timed) = (
            m.cert_issued_count.get(),
            m.cert_issued_time.get_sample_count(),
        );
        let validity = Duration::from_secs(3600);
        let issue = || manager.issue_service_certificate("sa", "ns", "cluster.local", validity);
        issue().await.expect("issued");
        issue().await.expect("from the cache");
        manager
            .issue_xds_certificate(uuid::Uuid::new_v4(), crate::ProxyKind::Sidecar, "sa", "ns")
            .await
            .expect("issued");
        assert_eq!(m.cert_issued_count.get(), count + 2);
        assert_eq!(m.cert_issued_time.get_sample_count(), timed + 2);
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
