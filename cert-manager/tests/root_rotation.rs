//! Root rotation in three phases, against a model of a mesh: 50 identities with two proxies
//! each, every proxy holding a service certificate (mesh mTLS) and a bootstrap certificate (its
//! ADS client certificate), and the ADS server holding its server certificate. Each holder gets
//! every announced (leaf, bundle) of its identity in order, applies it after a random delay and
//! then acknowledges. After every publish and every apply the test checks the invariant
//! "every leaf any holder presents chains to a root in every other holder's bundle", with real
//! signature checks. Time is tokio's paused clock: delays and the grace period cost no wall time.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use fsm_certs::tresor::TresorProvider;
use fsm_certs::{
    CertEvent, CertKey, CertManager, CertManagerConfig, IssuedCertificate, ProxyKind,
    RootRotationPhase, RootRotationTiming, RotationPolicy, RotationReason, ServiceIdentity,
    XdsCommonName, x509,
};
use parking_lot::Mutex;
use tokio::sync::{broadcast, mpsc};
use uuid::Uuid;

const IDENTITIES: usize = 50;
const PROXIES_PER_IDENTITY: usize = 2;
/// A holder applies (and acknowledges) each delivery 1 ms to this long after it is published.
const MAX_DELAY_MS: u64 = 400;
const DAY: Duration = Duration::from_secs(24 * 3600);
const TRUST_DOMAIN: &str = "cluster.local";
const ADS_SERVER: &str = "fsm-controller.fsm-system.svc.cluster.local";

fn config() -> CertManagerConfig {
    CertManagerConfig {
        rotation: RotationPolicy {
            jitter_fraction: 0.0,
            ..RotationPolicy::default()
        },
        ..CertManagerConfig::default()
    }
}

fn timing(grace: Duration) -> RootRotationTiming {
    RootRotationTiming {
        grace,
        poll: Duration::from_millis(50),
        retry: Duration::from_secs(1),
    }
}

// === the model ===

/// Which root a leaf chains to, or a bundle holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Root {
    Old,
    New,
}

struct Roots {
    old_pem: String,
    new_pem: String,
    old_serial: String,
    new_serial: String,
    /// Leaf serial → root, so each leaf's signature is checked once.
    leaves: Mutex<HashMap<String, Option<Root>>>,
}

impl Roots {
    /// The root `cert`'s leaf chains to, by signature.
    fn of_leaf(&self, cert: &IssuedCertificate) -> Option<Root> {
        *self
            .leaves
            .lock()
            .entry(cert.serial.clone())
            .or_insert_with(|| {
                if x509::verify_chain(&cert.cert_chain_pem, &self.old_pem).is_ok() {
                    Some(Root::Old)
                } else if x509::verify_chain(&cert.cert_chain_pem, &self.new_pem).is_ok() {
                    Some(Root::New)
                } else {
                    None
                }
            })
    }

    fn of_bundle(&self, bundle_pem: &str) -> BTreeSet<Root> {
        x509::all_info(bundle_pem)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|info| {
                if info.serial == self.old_serial {
                    Some(Root::Old)
                } else if info.serial == self.new_serial {
                    Some(Root::New)
                } else {
                    None
                }
            })
            .collect()
    }
}

struct Holder {
    name: String,
    /// The root of the leaf it presents (None: a leaf of no known root).
    leaf: Option<Root>,
    bundle: BTreeSet<Root>,
    serial: String,
    sent: usize,
    acked: usize,
    /// Stopped applying and acknowledging (see [`Model::stuck`]).
    stuck: bool,
}

type Delivery = (Arc<IssuedCertificate>, RotationReason);

#[derive(Default)]
struct State {
    holders: Vec<Holder>,
    by_key: HashMap<CertKey, Vec<usize>>,
    queues: Vec<mpsc::UnboundedSender<Delivery>>,
}

struct Model {
    roots: Roots,
    state: Mutex<State>,
    /// This holder stops applying anything from the first delivery with this reason on.
    stuck: Option<(String, RotationReason)>,
    violations: Mutex<Vec<String>>,
    violation_count: AtomicUsize,
    checks: AtomicUsize,
    publishes: AtomicUsize,
}

impl Model {
    fn new(
        old: &TresorProvider,
        new: &TresorProvider,
        stuck: Option<(String, RotationReason)>,
    ) -> Result<Arc<Self>> {
        Ok(Arc::new(Model {
            roots: Roots {
                old_pem: old.ca().cert_pem().to_owned(),
                new_pem: new.ca().cert_pem().to_owned(),
                old_serial: x509::leaf_info(old.ca().cert_pem())?.serial,
                new_serial: x509::leaf_info(new.ca().cert_pem())?.serial,
                leaves: Mutex::default(),
            },
            state: Mutex::default(),
            stuck,
            violations: Mutex::default(),
            violation_count: AtomicUsize::new(0),
            checks: AtomicUsize::new(0),
            publishes: AtomicUsize::new(0),
        }))
    }

    /// A holder of `key` that starts out with `cert`, and its delivery task.
    fn add_holder(
        self: &Arc<Self>,
        name: String,
        key: CertKey,
        cert: &IssuedCertificate,
        seed: u64,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        let index = {
            let mut state = self.state.lock();
            let index = state.holders.len();
            state.holders.push(Holder {
                name,
                leaf: self.roots.of_leaf(cert),
                bundle: self.roots.of_bundle(&cert.trust_bundle_pem),
                serial: cert.serial.clone(),
                sent: 0,
                acked: 0,
                stuck: false,
            });
            state.by_key.entry(key).or_default().push(index);
            state.queues.push(tx);
            self.check(&state, "join");
            index
        };
        tokio::spawn(self.clone().deliver(index, rx, seed));
    }

    /// One holder's stream: applies deliveries in order, each after a random delay.
    async fn deliver(
        self: Arc<Self>,
        index: usize,
        mut rx: mpsc::UnboundedReceiver<Delivery>,
        seed: u64,
    ) {
        let mut rng = fastrand::Rng::with_seed(seed);
        while let Some((cert, reason)) = rx.recv().await {
            {
                let mut state = self.state.lock();
                let holder = &mut state.holders[index];
                if holder.stuck
                    || self
                        .stuck
                        .as_ref()
                        .is_some_and(|(name, r)| *name == holder.name && *r == reason)
                {
                    holder.stuck = true;
                    continue;
                }
            }
            tokio::time::sleep(Duration::from_millis(rng.u64(1..=MAX_DELAY_MS))).await;
            let leaf = self.roots.of_leaf(&cert);
            let bundle = self.roots.of_bundle(&cert.trust_bundle_pem);
            let mut state = self.state.lock();
            let holder = &mut state.holders[index];
            holder.leaf = leaf;
            holder.bundle = bundle;
            holder.serial = cert.serial.clone();
            holder.acked += 1;
            self.check(&state, &format!("apply {reason:?}"));
        }
    }

    /// What the controller does with an announcement: publish it to every holder of its key.
    fn publish(&self, event: CertEvent) {
        self.publishes.fetch_add(1, Ordering::Relaxed);
        let mut state = self.state.lock();
        let targets = state.by_key.get(&event.key).cloned().unwrap_or_default();
        for index in targets {
            state.holders[index].sent += 1;
            let _ = state.queues[index].send((event.cert.clone(), event.reason));
        }
        self.check(&state, &format!("publish {:?}", event.reason));
    }

    /// Every delivery published was acknowledged (the controller's `all_in_sync`).
    fn in_sync(&self) -> bool {
        self.state.lock().holders.iter().all(|h| h.acked == h.sent)
    }

    /// The invariant: for every holder q, every root some other holder's leaf chains to is in
    /// q's bundle.
    fn check(&self, state: &State, when: &str) {
        self.checks.fetch_add(1, Ordering::Relaxed);
        let mut presented: HashMap<Option<Root>, usize> = HashMap::new();
        for h in &state.holders {
            *presented.entry(h.leaf).or_default() += 1;
        }
        for q in &state.holders {
            for (root, count) in &presented {
                let by_others = count - usize::from(q.leaf == *root);
                let trusted = root.is_some_and(|r| q.bundle.contains(&r));
                if by_others > 0 && !trusted {
                    self.violation_count.fetch_add(1, Ordering::Relaxed);
                    let mut v = self.violations.lock();
                    if v.len() < 10 {
                        let peer = state
                            .holders
                            .iter()
                            .find(|p| p.leaf == *root && p.name != q.name)
                            .map(|p| format!("{} (serial {})", p.name, p.serial))
                            .unwrap_or_default();
                        v.push(format!(
                            "at {when}: {} trusts {:?} but {peer} presents a leaf of {root:?}",
                            q.name, q.bundle
                        ));
                    }
                }
            }
        }
    }

    fn violations(&self) -> (usize, Vec<String>) {
        (
            self.violation_count.load(Ordering::Relaxed),
            self.violations.lock().clone(),
        )
    }
}

/// Forwards the manager's announcements to the model, like the controller's runner does.
fn dispatch(
    model: Arc<Model>,
    mut events: broadcast::Receiver<CertEvent>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            match events.recv().await {
                Ok(event) => model.publish(event),
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    panic!("the model missed {n} announcements")
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    })
}

fn xds_key(uuid: Uuid, sa: &str, ns: &str) -> CertKey {
    CertKey::Xds(XdsCommonName {
        proxy_uuid: uuid,
        kind: ProxyKind::Sidecar,
        identity: ServiceIdentity::new(sa, ns),
    })
}

fn service_key(sa: &str, ns: &str) -> CertKey {
    CertKey::Service {
        identity: ServiceIdentity::new(sa, ns),
        trust_domain: TRUST_DOMAIN.into(),
    }
}

/// Issues the mesh's certificates from the old root and registers every holder. Returns how
/// many holders there are.
async fn mesh(manager: &CertManager, model: &Arc<Model>) -> Result<usize> {
    let server = manager.issue_server_certificate(ADS_SERVER, DAY).await?;
    model.add_holder(
        "ads-server".into(),
        CertKey::Server {
            common_name: ADS_SERVER.into(),
        },
        &server,
        1,
    );
    for i in 0..IDENTITIES {
        let (sa, ns) = (format!("sa{i}"), format!("ns{}", i % 5));
        let service = manager
            .issue_service_certificate(&sa, &ns, TRUST_DOMAIN, DAY)
            .await?;
        for j in 0..PROXIES_PER_IDENTITY {
            let n = (i * PROXIES_PER_IDENTITY + j) as u64;
            let uuid = Uuid::from_u128(u128::from(n) + 1);
            let xds = manager
                .issue_xds_certificate(uuid, ProxyKind::Sidecar, &sa, &ns)
                .await?;
            model.add_holder(
                format!("{ns}/{sa}-{j}"),
                service_key(&sa, &ns),
                &service,
                100 + n,
            );
            model.add_holder(
                format!("{ns}/{sa}-{j} bootstrap"),
                xds_key(uuid, &sa, &ns),
                &xds,
                10_000 + n,
            );
        }
    }
    Ok(1 + IDENTITIES * PROXIES_PER_IDENTITY * 2)
}

/// A proxy of a new identity connecting `after` the rotation started.
fn late_joiner(
    manager: CertManager,
    model: Arc<Model>,
    sa: &'static str,
    after: Duration,
) -> tokio::task::JoinHandle<Result<Option<RootRotationPhase>>> {
    tokio::spawn(async move {
        tokio::time::sleep(after).await;
        let phase = manager.root_rotation_phase();
        let cert = manager
            .issue_service_certificate(sa, "late", TRUST_DOMAIN, DAY)
            .await?;
        model.add_holder(format!("late/{sa}"), service_key(sa, "late"), &cert, 7);
        Ok(phase)
    })
}

/// Every holder, and every cached certificate, presents a leaf of the new root and trusts
/// only the new root.
async fn only_new_root_left(
    manager: &CertManager,
    model: &Model,
    except: Option<&str>,
) -> Result<()> {
    for h in model
        .state
        .lock()
        .holders
        .iter()
        .filter(|h| Some(h.name.as_str()) != except)
    {
        ensure!(
            h.leaf == Some(Root::New) && h.bundle == BTreeSet::from([Root::New]),
            "{} presents a leaf of {:?} and trusts {:?}",
            h.name,
            h.leaf,
            h.bundle
        );
    }
    let bundle = manager.trust_bundle_pem().context("no bundle")?;
    ensure!(model.roots.of_bundle(&bundle) == BTreeSet::from([Root::New]));
    for key in manager.cached_keys() {
        let cert = manager.cached(&key).await.context("evicted")??;
        ensure!(
            model.roots.of_leaf(&cert) == Some(Root::New)
                && model.roots.of_bundle(&cert.trust_bundle_pem) == BTreeSet::from([Root::New]),
            "{key:?} still carries the old root"
        );
    }
    Ok(())
}

// === tests ===

#[tokio::test(start_paused = true)]
async fn fifty_identities_rotate_root_with_every_leaf_verifiable_by_every_peer() -> Result<()> {
    let old = TresorProvider::generate()?;
    let new = TresorProvider::generate()?;
    let model = Model::new(&old, &new, None)?;
    let manager = CertManager::new(Arc::new(old), config());
    let holders = mesh(&manager, &model).await?;
    let dispatcher = dispatch(model.clone(), manager.subscribe());
    let joiners = [
        late_joiner(
            manager.clone(),
            model.clone(),
            "early",
            Duration::from_millis(150),
        ),
        late_joiner(
            manager.clone(),
            model.clone(),
            "middle",
            Duration::from_millis(700),
        ),
    ];

    let wall = std::time::Instant::now();
    let in_sync = {
        let model = model.clone();
        move || model.in_sync()
    };
    let rotation = manager.rotate_root(Arc::new(new), in_sync, timing(Duration::from_secs(60)));
    assert_send(&rotation);
    let outcome = rotation.await?;
    let wall = wall.elapsed();
    let mut phases = Vec::new();
    for joiner in joiners {
        phases.push(joiner.await??);
    }
    dispatcher.abort();

    println!(
        "ROOT_ROTATION_FIGURES: {IDENTITIES} identities, {holders} holders: phases {:?} / {:?} / {:?} (model time, deliveries delayed up to {MAX_DELAY_MS} ms), {:.2} s wall (issuance and checks); {} publishes, {} invariant checks; late joiners in {phases:?}",
        outcome.trusting_both.elapsed,
        outcome.new_leaves.elapsed,
        outcome.old_root_dropped.elapsed,
        wall.as_secs_f64(),
        model.publishes.load(Ordering::Relaxed),
        model.checks.load(Ordering::Relaxed),
    );
    let (count, examples) = model.violations();
    ensure!(
        count == 0,
        "{count} invariant violations, e.g. {examples:#?}"
    );
    ensure!(
        outcome.trusting_both.acked && outcome.new_leaves.acked && outcome.old_root_dropped.acked,
        "{outcome:?}"
    );
    ensure!(outcome.failed.is_empty(), "{outcome:?}");
    // Every identity was announced in each phase: bundle, leaf, bundle.
    let identities = 1 + IDENTITIES + IDENTITIES * PROXIES_PER_IDENTITY;
    ensure!(outcome.trusting_both.announced >= identities, "{outcome:?}");
    ensure!(outcome.new_leaves.announced >= identities, "{outcome:?}");
    ensure!(
        outcome.old_root_dropped.announced >= identities,
        "{outcome:?}"
    );
    // Both joiners came in during the rotation, in phases 1 and 2.
    ensure!(
        phases
            == [
                Some(RootRotationPhase::TrustingBoth),
                Some(RootRotationPhase::NewLeaves)
            ],
        "joiners arrived in {phases:?}; retune their delays"
    );
    ensure!(manager.root_rotation_phase().is_none());
    only_new_root_left(&manager, &model, None).await
}

/// Without the wait of phase 1 (leaves of the new root published while peers may still hold
/// the old bundle), the model sees peers that cannot verify each other: the check can fail.
#[tokio::test(start_paused = true)]
async fn reissuing_before_every_proxy_trusts_the_new_root_is_caught() -> Result<()> {
    let old = TresorProvider::generate()?;
    let new = TresorProvider::generate()?;
    let model = Model::new(&old, &new, None)?;
    let manager = CertManager::new(Arc::new(old), config());
    mesh(&manager, &model).await?;
    let dispatcher = dispatch(model.clone(), manager.subscribe());
    manager.begin_root_rotation(Arc::new(new)).await?;
    manager.reissue_from_new_root().await?;
    while !(model.in_sync() && model.publishes.load(Ordering::Relaxed) > 0) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    manager.finish_root_rotation().await?;
    dispatcher.abort();
    let (count, examples) = model.violations();
    ensure!(count > 0, "no violation seen without the phase-1 wait");
    println!(
        "unphased rotation: {count} violations, e.g. {}",
        examples[0]
    );
    Ok(())
}

/// A proxy that acknowledges the two-root bundle but never its new leaf holds phase 2 for the
/// grace period only; then the old root is dropped everywhere else.
#[tokio::test(start_paused = true)]
async fn grace_period_drops_the_old_root_when_a_proxy_never_acknowledges_its_new_leaf() -> Result<()>
{
    let old = TresorProvider::generate()?;
    let new = TresorProvider::generate()?;
    let stuck = "ns3/sa3-1".to_string();
    let model = Model::new(
        &old,
        &new,
        Some((stuck.clone(), RotationReason::RootRotation)),
    )?;
    let manager = CertManager::new(Arc::new(old), config());
    mesh(&manager, &model).await?;
    let dispatcher = dispatch(model.clone(), manager.subscribe());
    let grace = Duration::from_secs(30);
    let in_sync = {
        let model = model.clone();
        move || model.in_sync()
    };
    let started = tokio::time::Instant::now();
    let outcome = manager
        .rotate_root(Arc::new(new), in_sync, timing(grace))
        .await?;
    let elapsed = started.elapsed();
    dispatcher.abort();

    ensure!(outcome.trusting_both.acked, "{outcome:?}");
    ensure!(
        outcome.trusting_both.elapsed < Duration::from_secs(1),
        "{outcome:?}"
    );
    // Phase 2 ended by the grace period, not earlier and not much later.
    ensure!(!outcome.new_leaves.acked, "{outcome:?}");
    ensure!(
        outcome.new_leaves.elapsed >= grace
            && outcome.new_leaves.elapsed < grace + Duration::from_millis(200),
        "{outcome:?}"
    );
    // The stuck proxy never acknowledges phase 3 either: its grace ends it too.
    ensure!(!outcome.old_root_dropped.acked, "{outcome:?}");
    ensure!(elapsed < outcome.trusting_both.elapsed + 2 * grace + Duration::from_secs(1));
    ensure!(!model.in_sync());
    // Everybody else has moved on; only the stuck proxy still presents an old-root leaf, which
    // is the only thing its peers cannot verify.
    only_new_root_left(&manager, &model, Some(&stuck)).await?;
    let (_, examples) = model.violations();
    ensure!(
        examples.iter().all(|v| v.contains(&stuck)),
        "violations not caused by the stuck proxy: {examples:#?}"
    );
    Ok(())
}

fn assert_send<T: Send>(_: &T) {}
