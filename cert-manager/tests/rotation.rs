//! CertManager: caching, rotation exactly at the documented threshold (1/3 of the lifetime
//! left, jitter up to 1/30 earlier), announcements, the three phases of a root rotation, and
//! expiry reported as E4016. Driven by a ManualClock. (The root rotation of a model mesh is in
//! `root_rotation.rs`.)

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use fsm_certs::tresor::TresorProvider;
use fsm_certs::{
    CertKey, CertManager, CertManagerConfig, Clock, ManualClock, RootRotationPhase, RotationPolicy,
    RotationReason, ServiceIdentity, x509,
};
use fsm_errcode::{ErrCode, HasErrCode};
use tokio::sync::broadcast::error::TryRecvError;

const DAY: Duration = Duration::from_secs(24 * 3600);

fn exact_policy() -> CertManagerConfig {
    CertManagerConfig {
        rotation: RotationPolicy {
            jitter_fraction: 0.0,
            ..RotationPolicy::default()
        },
        ..CertManagerConfig::default()
    }
}

fn key(sa: &str, ns: &str) -> CertKey {
    CertKey::Service {
        identity: ServiceIdentity::new(sa, ns),
        trust_domain: "cluster.local".into(),
    }
}

#[tokio::test]
async fn cached_until_one_third_of_lifetime_remains_then_rotated_and_announced() -> Result<()> {
    let clock = Arc::new(ManualClock::starting_now());
    let manager = CertManager::with_clock(
        Arc::new(TresorProvider::generate()?),
        exact_policy(),
        clock.clone(),
    );
    let mut events = manager.subscribe();
    let t0 = clock.now();

    let first = manager
        .issue_service_certificate("bookbuyer", "bookstore", "cluster.local", DAY)
        .await?;
    let again = manager
        .issue_service_certificate("bookbuyer", "bookstore", "cluster.local", DAY)
        .await?;
    assert_eq!(first.serial, again.serial, "second call must hit the cache");
    assert!(
        matches!(events.try_recv(), Err(TryRecvError::Empty)),
        "first issuance is not a rotation"
    );

    // Threshold: 16h after issuance (8h = 1/3 of 24h left). One second before: nothing.
    let threshold = t0 + Duration::from_secs(16 * 3600);
    clock.set(threshold - Duration::from_secs(1));
    let report = manager.rotate_due().await;
    ensure!(
        report.rotated.is_empty() && report.failed.is_empty(),
        "{report:?}"
    );
    let cached = manager
        .cached(&key("bookbuyer", "bookstore"))
        .await
        .context("not cached")??;
    assert_eq!(cached.serial, first.serial);
    assert!(matches!(events.try_recv(), Err(TryRecvError::Empty)));

    clock.set(threshold);
    let report = manager.rotate_due().await;
    assert_eq!(report.rotated, vec![key("bookbuyer", "bookstore")]);
    let event = events.try_recv()?;
    assert_eq!(event.key, key("bookbuyer", "bookstore"));
    assert_eq!(event.reason, RotationReason::Expiring);
    assert_ne!(event.cert.serial, first.serial);
    let info = x509::leaf_info(&event.cert.cert_chain_pem)?;
    assert_eq!(info.common_name, "bookbuyer.bookstore.cluster.local");
    let now = manager
        .issue_service_certificate("bookbuyer", "bookstore", "cluster.local", DAY)
        .await?;
    assert_eq!(
        now.serial, event.cert.serial,
        "the rotated certificate is served"
    );
    Ok(())
}

#[tokio::test]
async fn issuing_past_the_threshold_rotates_inline_and_announces() -> Result<()> {
    let clock = Arc::new(ManualClock::starting_now());
    let manager = CertManager::with_clock(
        Arc::new(TresorProvider::generate()?),
        exact_policy(),
        clock.clone(),
    );
    let mut events = manager.subscribe();
    let t0 = clock.now();
    let first = manager
        .issue_service_certificate("a", "ns", "cluster.local", DAY)
        .await?;
    clock.set(t0 + Duration::from_secs(16 * 3600));
    let second = manager
        .issue_service_certificate("a", "ns", "cluster.local", DAY)
        .await?;
    assert_ne!(first.serial, second.serial);
    assert_eq!(events.try_recv()?.cert.serial, second.serial);
    Ok(())
}

#[tokio::test]
async fn default_jitter_renews_between_15h12m_and_16h_for_24h_certs() -> Result<()> {
    let clock = Arc::new(ManualClock::starting_now());
    let manager = CertManager::with_clock(
        Arc::new(TresorProvider::generate()?),
        CertManagerConfig::default(),
        clock.clone(),
    );
    let t0 = clock.now();
    for i in 0..20 {
        manager
            .issue_service_certificate(&format!("sa{i}"), "ns", "cluster.local", DAY)
            .await?;
    }
    // Just before the earliest jittered threshold (16h - 48m): none due.
    clock.set(t0 + Duration::from_secs(15 * 3600 + 12 * 60) - Duration::from_secs(1));
    assert!(manager.rotate_due().await.rotated.is_empty());
    // At the un-jittered threshold: all due.
    clock.set(t0 + Duration::from_secs(16 * 3600));
    assert_eq!(manager.rotate_due().await.rotated.len(), 20);
    Ok(())
}

#[tokio::test]
async fn expired_certificate_is_reported_with_e4016() -> Result<()> {
    let clock = Arc::new(ManualClock::starting_now());
    let manager = CertManager::with_clock(
        Arc::new(TresorProvider::generate()?),
        exact_policy(),
        clock.clone(),
    );
    let cert = manager
        .issue_service_certificate(
            "bookbuyer",
            "bookstore",
            "cluster.local",
            Duration::from_secs(3600),
        )
        .await?;
    clock.set(cert.not_after + Duration::from_secs(1));
    let err = manager
        .cached(&key("bookbuyer", "bookstore"))
        .await
        .context("not cached")?
        .err()
        .context("an expired certificate was served")?;
    assert_eq!(err.err_code(), ErrCode::E4016);
    assert!(
        err.to_string()
            .contains("bookbuyer.bookstore.cluster.local"),
        "{err}"
    );
    // Not yet valid, likewise.
    clock.set(cert.not_before - Duration::from_secs(60));
    assert_eq!(
        manager.check(&cert).err().map(|e| e.err_code()),
        Some(ErrCode::E4016)
    );
    Ok(())
}

#[tokio::test]
async fn root_rotation_adds_the_new_root_then_reissues_then_drops_the_old_root() -> Result<()> {
    let old = Arc::new(TresorProvider::generate()?);
    let new = Arc::new(TresorProvider::generate()?);
    let old_root = old.ca().cert_pem().to_owned();
    let new_root = new.ca().cert_pem().to_owned();
    let manager = CertManager::new(old, exact_policy());
    let before = manager
        .issue_service_certificate("a", "ns", "cluster.local", DAY)
        .await?;
    let mut events = manager.subscribe();
    // Out of order: nothing to re-issue or finish before a rotation began.
    assert_eq!(
        manager
            .reissue_from_new_root()
            .await
            .err()
            .map(|e| e.err_code()),
        Some(ErrCode::E4014)
    );
    assert!(manager.finish_root_rotation().await.is_err());

    // Phase 1: same leaf, both roots.
    let report = manager.begin_root_rotation(new.clone()).await?;
    assert_eq!(report.rotated, vec![key("a", "ns")]);
    assert_eq!(
        manager.root_rotation_phase(),
        Some(RootRotationPhase::TrustingBoth)
    );
    let event = events.try_recv()?;
    assert_eq!(event.reason, RotationReason::TrustBundleChanged);
    assert_eq!(event.cert.serial, before.serial);
    assert_eq!(x509::all_info(&event.cert.trust_bundle_pem)?.len(), 2);
    x509::verify_chain(&new_root, &event.cert.trust_bundle_pem)?;
    assert!(matches!(events.try_recv(), Err(TryRecvError::Empty)));
    // Leaves issued meanwhile still come from the old root (every peer trusts it), with both.
    let early = manager
        .issue_service_certificate("b", "ns", "cluster.local", DAY)
        .await?;
    x509::verify_chain(&early.cert_chain_pem, &old_root)?;
    assert_eq!(x509::all_info(&early.trust_bundle_pem)?.len(), 2);
    assert!(
        manager.begin_root_rotation(new).await.is_err(),
        "one at a time"
    );
    assert!(
        manager.finish_root_rotation().await.is_err(),
        "phase 2 first"
    );

    // Phase 2: leaves of the new root only, bundles still with both.
    let report = manager.reissue_from_new_root().await?;
    assert_eq!(report.rotated.len(), 2);
    let mut during = Vec::new();
    while let Ok(event) = events.try_recv() {
        assert_eq!(event.reason, RotationReason::RootRotation);
        x509::verify_chain(&event.cert.cert_chain_pem, &new_root)?;
        assert!(x509::verify_chain(&event.cert.cert_chain_pem, &old_root).is_err());
        assert_eq!(x509::all_info(&event.cert.trust_bundle_pem)?.len(), 2);
        x509::verify_chain(&before.cert_chain_pem, &event.cert.trust_bundle_pem)?;
        during.push(event.cert);
    }
    assert_eq!(during.len(), 2);
    // Called again, it re-issues only what is not from the new root yet: nothing.
    assert!(manager.reissue_from_new_root().await?.rotated.is_empty());
    let late = manager
        .issue_service_certificate("c", "ns", "cluster.local", DAY)
        .await?;
    x509::verify_chain(&late.cert_chain_pem, &new_root)?;
    assert_eq!(x509::all_info(&late.trust_bundle_pem)?.len(), 2);

    // Phase 3: the old root leaves every bundle; same leaves.
    let report = manager.finish_root_rotation().await?;
    assert_eq!(report.rotated.len(), 3);
    let mut changed = 0;
    while let Ok(ev) = events.try_recv() {
        assert_eq!(ev.reason, RotationReason::TrustBundleChanged);
        assert_eq!(x509::all_info(&ev.cert.trust_bundle_pem)?.len(), 1);
        x509::verify_chain(&ev.cert.cert_chain_pem, &ev.cert.trust_bundle_pem)?;
        assert!(x509::verify_chain(&before.cert_chain_pem, &ev.cert.trust_bundle_pem).is_err());
        changed += 1;
    }
    assert_eq!(changed, 3);
    assert_eq!(manager.root_rotation_phase(), None);
    let bundle = manager.trust_bundle_pem().context("no bundle")?;
    assert_eq!(x509::all_info(&bundle)?.len(), 1);
    x509::verify_chain(&new_root, &bundle)?;
    Ok(())
}

#[tokio::test]
async fn root_rotation_is_refused_when_the_new_root_cannot_issue() -> Result<()> {
    let manager = CertManager::new(Arc::new(TresorProvider::generate()?), exact_policy());
    let first = manager
        .issue_service_certificate("a", "ns", "cluster.local", DAY)
        .await?;
    let mut events = manager.subscribe();
    let broken = scripted()?;
    broken.fail.store(true, std::sync::atomic::Ordering::SeqCst);
    let err = manager
        .begin_root_rotation(broken)
        .await
        .err()
        .context("a provider that cannot issue was accepted")?;
    assert_eq!(err.err_code(), ErrCode::E4013);
    assert_eq!(manager.root_rotation_phase(), None);
    assert!(matches!(events.try_recv(), Err(TryRecvError::Empty)));
    assert_eq!(
        manager.trust_bundle_pem().as_deref(),
        Some(first.trust_bundle_pem.as_str())
    );
    Ok(())
}

/// Wraps a provider: counts calls, and fails while `fail` is set.
struct Scripted {
    inner: TresorProvider,
    calls: std::sync::atomic::AtomicUsize,
    fail: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl fsm_certs::CertificateProvider for Scripted {
    async fn issue(
        &self,
        req: &fsm_certs::CertificateRequest,
    ) -> Result<fsm_certs::IssuedCertificate, fsm_certs::CertError> {
        use std::sync::atomic::Ordering;
        self.calls.fetch_add(1, Ordering::SeqCst);
        tokio::task::yield_now().await;
        if self.fail.load(Ordering::SeqCst) {
            return Err(fsm_certs::CertError::Issue {
                provider: "scripted",
                common_name: req.common_name.clone(),
                message: "backend down".into(),
                source: None,
            });
        }
        self.inner.issue(req).await
    }
    fn name(&self) -> &'static str {
        "scripted"
    }
}

fn scripted() -> Result<Arc<Scripted>> {
    Ok(Arc::new(Scripted {
        inner: TresorProvider::generate()?,
        calls: Default::default(),
        fail: Default::default(),
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_for_one_identity_issue_once() -> Result<()> {
    let provider = scripted()?;
    let manager = CertManager::new(provider.clone(), exact_policy());
    let calls = (0..10).map(|_| {
        let m = manager.clone();
        tokio::spawn(async move {
            m.issue_service_certificate("a", "ns", "cluster.local", DAY)
                .await
        })
    });
    let mut serials = std::collections::HashSet::new();
    for c in calls {
        serials.insert(c.await??.serial.clone());
    }
    assert_eq!(serials.len(), 1);
    assert_eq!(provider.calls.load(std::sync::atomic::Ordering::SeqCst), 1);
    Ok(())
}

#[tokio::test]
async fn failed_rotation_keeps_the_old_certificate_and_reports_e4016() -> Result<()> {
    let provider = scripted()?;
    let clock = Arc::new(ManualClock::starting_now());
    let manager = CertManager::with_clock(provider.clone(), exact_policy(), clock.clone());
    let t0 = clock.now();
    let first = manager
        .issue_service_certificate("a", "ns", "cluster.local", DAY)
        .await?;
    provider
        .fail
        .store(true, std::sync::atomic::Ordering::SeqCst);
    clock.set(t0 + Duration::from_secs(17 * 3600));
    let report = manager.rotate_due().await;
    assert!(report.rotated.is_empty());
    let (failed_key, err) = report.failed.first().context("no failure reported")?;
    assert_eq!(failed_key, &key("a", "ns"));
    assert_eq!(err.err_code(), ErrCode::E4016);
    let cached = manager.cached(&key("a", "ns")).await.context("evicted")??;
    assert_eq!(
        cached.serial, first.serial,
        "the old, still valid cert keeps serving"
    );
    // Recovered backend: the next pass rotates.
    provider
        .fail
        .store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(manager.rotate_due().await.rotated.len(), 1);
    Ok(())
}

#[tokio::test]
async fn background_rotation_loop_announces() -> Result<()> {
    let clock = Arc::new(ManualClock::starting_now());
    let manager = CertManager::with_clock(
        Arc::new(TresorProvider::generate()?),
        exact_policy(),
        clock.clone(),
    );
    let t0 = clock.now();
    let first = manager
        .issue_service_certificate("a", "ns", "cluster.local", DAY)
        .await?;
    let mut events = manager.subscribe();
    let task = tokio::spawn(manager.clone().run_rotation(Duration::from_millis(10)));
    clock.set(t0 + Duration::from_secs(16 * 3600));
    let ev = tokio::time::timeout(Duration::from_secs(5), events.recv()).await??;
    task.abort();
    assert_eq!(ev.key, key("a", "ns"));
    assert_ne!(ev.cert.serial, first.serial);
    Ok(())
}

/// Fails the calls after the first `succeed_first`, `then_fail` times, then issues again.
struct Flaky {
    inner: TresorProvider,
    calls: std::sync::atomic::AtomicUsize,
    succeed_first: usize,
    then_fail: usize,
}

#[async_trait::async_trait]
impl fsm_certs::CertificateProvider for Flaky {
    async fn issue(
        &self,
        req: &fsm_certs::CertificateRequest,
    ) -> Result<fsm_certs::IssuedCertificate, fsm_certs::CertError> {
        let call = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if call >= self.succeed_first && call < self.succeed_first + self.then_fail {
            return Err(fsm_certs::CertError::Issue {
                provider: "flaky",
                common_name: req.common_name.clone(),
                message: "backend down".into(),
                source: None,
            });
        }
        self.inner.issue(req).await
    }
    fn name(&self) -> &'static str {
        "flaky"
    }
}

/// Leaves the new root fails to issue in phase 2 are retried every `retry` while the phase
/// waits, and the phase ends (acknowledged) once they are issued, not at the grace period.
#[tokio::test(start_paused = true)]
async fn root_rotation_retries_leaves_the_new_root_failed_to_issue() -> Result<()> {
    let manager = CertManager::new(Arc::new(TresorProvider::generate()?), exact_policy());
    for sa in ["a", "b", "c"] {
        manager
            .issue_service_certificate(sa, "ns", "cluster.local", DAY)
            .await?;
    }
    // The probe of phase 1 succeeds; two of the three re-issues of phase 2 fail once.
    let new = Arc::new(Flaky {
        inner: TresorProvider::generate()?,
        calls: Default::default(),
        succeed_first: 2,
        then_fail: 2,
    });
    let new_root = new.inner.ca().cert_pem().to_owned();
    let timing = fsm_certs::RootRotationTiming {
        grace: Duration::from_secs(60),
        poll: Duration::from_millis(50),
        retry: Duration::from_secs(1),
    };
    let outcome = manager.rotate_root(new, || true, timing).await?;
    ensure!(outcome.new_leaves.acked, "{outcome:?}");
    ensure!(
        outcome.new_leaves.elapsed >= timing.retry
            && outcome.new_leaves.elapsed < timing.retry + Duration::from_millis(100),
        "{outcome:?}"
    );
    ensure!(outcome.failed.is_empty(), "{outcome:?}");
    for sa in ["a", "b", "c"] {
        let cert = manager.cached(&key(sa, "ns")).await.context("evicted")??;
        x509::verify_chain(&cert.cert_chain_pem, &new_root)?;
        assert_eq!(x509::all_info(&cert.trust_bundle_pem)?.len(), 1);
    }
    Ok(())
}
