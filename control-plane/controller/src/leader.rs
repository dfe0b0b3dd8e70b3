//! Leader election over a `coordination.k8s.io/v1` Lease, with client-go's protocol, so that of
//! several controller replicas only one writes to the cluster (the sidecars' bootstrap Secrets).
//!
//! Every `retry_period` a replica reads the Lease and
//! - creates it, naming itself holder, when there is none;
//! - renews it when it holds it (a new `renewTime`);
//! - takes it over when it has no holder, or when its record has not changed for the record's
//!   `leaseDurationSeconds` *as measured by this replica's own clock* since it first saw that
//!   record (clocks of different nodes are never compared, as in client-go);
//! - otherwise waits.
//!
//! Every write is a replace carrying the resourceVersion that was read, so of two replicas racing
//! for the same expired record one gets `409 Conflict` (a create races on `409 AlreadyExists`).
//! A leader that cannot renew for `renew_deadline` (shorter than the lease duration) stops leading
//! before anyone else may take over. On shutdown the leader releases the Lease (no holder), so a
//! successor takes over at its next retry instead of after the lease duration.
//!
//! Why not a crate: `kube-leader-election` needs kube 4 (we use kube 5); `kube-lease-manager`
//! acquires through server-side-apply field-ownership conflicts, renews with unconditional
//! patches, and compares the holder's wall-clock `renewTime` with the local clock.

use std::time::Duration;

use fsm_errcode::ErrCode;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use tokio::sync::watch;
use tokio::time::Instant;

/// Where the Lease is and how this replica takes part.
#[derive(Clone, Debug)]
pub struct Config {
    pub namespace: String,
    pub name: String,
    /// This replica's holder identity (unique per process).
    pub identity: String,
    /// How long a record stays valid without renewal (written as `leaseDurationSeconds`).
    pub lease_duration: Duration,
    /// A leader that has not renewed for this long stops leading.
    pub renew_deadline: Duration,
    /// Time between attempts to acquire or renew.
    pub retry_period: Duration,
}

impl Config {
    /// client-go's constraints: a leader gives up before its lease can be taken over, and
    /// retries several times before giving up.
    pub fn validate(&self) -> Result<(), String> {
        if self.lease_duration < Duration::from_secs(1) {
            return Err("the lease duration must be at least 1s".into());
        }
        if self.renew_deadline >= self.lease_duration {
            return Err(format!(
                "the renew deadline ({:?}) must be shorter than the lease duration ({:?})",
                self.renew_deadline, self.lease_duration
            ));
        }
        if self.retry_period.is_zero() || self.retry_period >= self.renew_deadline {
            return Err(format!(
                "the retry period ({:?}) must be positive and shorter than the renew deadline ({:?})",
                self.retry_period, self.renew_deadline
            ));
        }
        Ok(())
    }

    fn lease_seconds(&self) -> i32 {
        i32::try_from(self.lease_duration.as_secs_f64().ceil() as u64).unwrap_or(i32::MAX)
    }
}

/// A default identity like client-go's: the pod's (or host's) name and a random suffix, so that
/// a restarted process never mistakes its predecessor's record for its own.
pub fn default_identity() -> String {
    let host = std::env::var("POD_NAME")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty()))
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "fsm-controller".to_string());
    format!("{host}_{}", uuid::Uuid::new_v4())
}

/// Whether this replica leads, as a watch channel; kept alive by whoever holds it.
pub struct Leadership {
    rx: watch::Receiver<bool>,
    /// Keeps a fixed leadership's channel open.
    _fixed: Option<watch::Sender<bool>>,
    stop: Option<(watch::Sender<bool>, tokio::task::JoinHandle<()>)>,
}

impl Leadership {
    /// Without a cluster there is nothing to share: this process always leads.
    pub fn always() -> Leadership {
        leader_gauge().set(1);
        let (tx, rx) = watch::channel(true);
        Leadership {
            rx,
            _fixed: Some(tx),
            stop: None,
        }
    }

    /// Takes part in the election until [`Leadership::release`].
    pub fn elect(client: kube::Client, config: Config) -> Leadership {
        let (tx, rx) = watch::channel(false);
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run(
            Api::namespaced(client, &config.namespace),
            config,
            tx,
            stop_rx,
        ));
        Leadership {
            rx,
            _fixed: None,
            stop: Some((stop_tx, task)),
        }
    }

    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.rx.clone()
    }

    /// Stops taking part; a leader hands the Lease back (bounded wait, for shutdown).
    pub async fn release(self) {
        if let Some((stop, task)) = self.stop {
            let _ = stop.send(true);
            let _ = tokio::time::timeout(Duration::from_secs(3), task).await;
        }
    }
}

fn leader_gauge() -> &'static prometheus::IntGauge {
    static GAUGE: std::sync::OnceLock<prometheus::IntGauge> = std::sync::OnceLock::new();
    GAUGE.get_or_init(|| {
        let gauge = prometheus::IntGauge::new(
            "fsm_controller_leader",
            "1 while this replica holds the controller Lease and writes to the cluster, else 0",
        )
        .expect("valid metric name");
        // Registration fails only on a duplicate name, which this OnceLock rules out.
        let _ = prometheus::register(Box::new(gauge.clone()));
        gauge
    })
}

/// What to do with the Lease as read.
#[derive(Clone, Debug, PartialEq)]
enum Step {
    /// Someone else holds a lease that has not expired yet.
    Wait { holder: String },
    /// Write this record (create, renew or take over).
    Write(LeaseSpec),
}

/// The protocol's decisions, free of I/O so that they can be tested on a fake clock.
#[derive(Debug)]
struct Elector {
    identity: String,
    lease_seconds: i32,
    /// The record last read or written, and when (by this replica's clock) it was first seen.
    observed: Option<(LeaseSpec, Instant)>,
}

impl Elector {
    fn new(config: &Config) -> Elector {
        Elector {
            identity: config.identity.clone(),
            lease_seconds: config.lease_seconds(),
            observed: None,
        }
    }

    /// `current`: the Lease's spec, `None` when there is no Lease.
    fn step(&mut self, current: Option<&LeaseSpec>, now: Instant, wall: Timestamp) -> Step {
        let Some(current) = current else {
            return Step::Write(self.record(None, wall));
        };
        let observed_at = match &self.observed {
            Some((spec, at)) if spec == current => *at,
            _ => {
                self.observed = Some((current.clone(), now));
                now
            }
        };
        let holder = current.holder_identity.clone().unwrap_or_default();
        let valid_for = Duration::from_secs(
            u64::try_from(current.lease_duration_seconds.unwrap_or(0)).unwrap_or(0),
        );
        if !holder.is_empty() && holder != self.identity && observed_at + valid_for > now {
            return Step::Wait { holder };
        }
        Step::Write(self.record(Some(current), wall))
    }

    fn record(&self, current: Option<&LeaseSpec>, wall: Timestamp) -> LeaseSpec {
        let held = current.is_some_and(|c| c.holder_identity.as_deref() == Some(&self.identity));
        let transitions = current.and_then(|c| c.lease_transitions).unwrap_or(0);
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.lease_seconds),
            acquire_time: if held {
                current.and_then(|c| c.acquire_time.clone())
            } else {
                Some(MicroTime(wall))
            },
            renew_time: Some(MicroTime(wall)),
            lease_transitions: Some(if held || current.is_none() {
                transitions
            } else {
                transitions + 1
            }),
            ..LeaseSpec::default()
        }
    }

    /// The record was written: it is what others now see, from now.
    fn written(&mut self, spec: LeaseSpec, now: Instant) {
        self.observed = Some((spec, now));
    }
}

/// The outcome of one attempt.
#[derive(Debug)]
enum Attempt {
    /// This replica holds the Lease (renewed, created or taken over).
    Held,
    /// Someone else holds it.
    Other(String),
    /// Another replica wrote first (409); try again later.
    Raced,
}

async fn try_acquire_or_renew(
    api: &Api<Lease>,
    config: &Config,
    elector: &mut Elector,
) -> Result<Attempt, kube::Error> {
    let current = api.get_opt(&config.name).await?;
    let spec = current.as_ref().map(|l| l.spec.clone().unwrap_or_default());
    let record = match elector.step(spec.as_ref(), Instant::now(), Timestamp::now()) {
        Step::Wait { holder } => return Ok(Attempt::Other(holder)),
        Step::Write(record) => record,
    };
    let written = match current {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(config.name.clone()),
                    namespace: Some(config.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(record.clone()),
            };
            api.create(&PostParams::default(), &lease).await
        }
        Some(mut lease) => {
            // The read resourceVersion stays in the metadata: a concurrent write makes this a 409.
            lease.spec = Some(record.clone());
            api.replace(&config.name, &PostParams::default(), &lease)
                .await
        }
    };
    match written {
        Ok(_) => {
            elector.written(record, Instant::now());
            Ok(Attempt::Held)
        }
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(Attempt::Raced),
        Err(e) => Err(e),
    }
}

async fn run(
    api: Api<Lease>,
    config: Config,
    leading: watch::Sender<bool>,
    mut stop: watch::Receiver<bool>,
) {
    let mut elector = Elector::new(&config);
    let mut last_renew: Option<Instant> = None;
    let mut holder_seen = String::new();
    let gauge = leader_gauge();
    gauge.set(0);
    tracing::info!(lease = %format!("{}/{}", config.namespace, config.name), identity = %config.identity, lease_duration = ?config.lease_duration, renew_deadline = ?config.renew_deadline, retry_period = ?config.retry_period, "taking part in leader election");
    loop {
        let is_leader = *leading.borrow();
        // A leader must give up by its renew deadline even when the API server does not answer.
        let budget = match last_renew {
            Some(at) if is_leader => config
                .renew_deadline
                .saturating_sub(at.elapsed())
                .max(Duration::from_millis(10)),
            _ => config.renew_deadline,
        };
        let attempt = tokio::select! {
            attempt = tokio::time::timeout(budget, try_acquire_or_renew(&api, &config, &mut elector)) => attempt,
            _ = stop.changed() => break,
        };
        match attempt {
            Ok(Ok(Attempt::Held)) => {
                last_renew = Some(Instant::now());
                if !is_leader {
                    tracing::info!(lease = %format!("{}/{}", config.namespace, config.name), identity = %config.identity, "became the leader: this replica writes to the cluster");
                    gauge.set(1);
                    leading.send_replace(true);
                }
            }
            Ok(Ok(Attempt::Other(holder))) => {
                if is_leader {
                    step_down(&leading, &config, &format!("{holder} holds the lease"));
                }
                if holder != holder_seen {
                    tracing::info!(lease = %format!("{}/{}", config.namespace, config.name), leader = %holder, "another replica leads");
                    holder_seen = holder;
                }
            }
            Ok(Ok(Attempt::Raced)) => {
                tracing::debug!(lease = %config.name, "another replica wrote the lease first");
            }
            Ok(Err(e)) => {
                fsm_errcode::warn!(ErrCode::E4000, lease = %format!("{}/{}", config.namespace, config.name), error = %e, "cannot read or write the leader election Lease");
            }
            Err(_) => {
                fsm_errcode::warn!(ErrCode::E4000, lease = %format!("{}/{}", config.namespace, config.name), "the API server did not answer in time for leader election");
            }
        }
        if *leading.borrow() && last_renew.is_none_or(|at| at.elapsed() >= config.renew_deadline) {
            step_down(&leading, &config, "could not renew the lease in time");
        }
        // Followers retry with jitter (client-go's factor 1.2) so that they do not move in step.
        let pause = if *leading.borrow() {
            config.retry_period
        } else {
            config
                .retry_period
                .mul_f64(1.0 + 0.2 * (uuid::Uuid::new_v4().as_u128() % 1000) as f64 / 1000.0)
        };
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            _ = stop.changed() => break,
        }
    }
    if *leading.borrow() {
        step_down(&leading, &config, "shutting down");
        release(&api, &config).await;
    }
}

fn step_down(leading: &watch::Sender<bool>, config: &Config, why: &str) {
    // The failures that led here were logged, with their code, as they happened.
    tracing::info!(lease = %format!("{}/{}", config.namespace, config.name), identity = %config.identity, reason = why, "stopped leading: this replica no longer writes to the cluster");
    leader_gauge().set(0);
    leading.send_replace(false);
}

/// Clears the holder of a Lease this replica holds, so that a successor need not wait for it
/// to expire.
async fn release(api: &Api<Lease>, config: &Config) {
    let Ok(Some(mut lease)) = api.get_opt(&config.name).await else {
        return;
    };
    let Some(spec) = lease.spec.as_mut() else {
        return;
    };
    if spec.holder_identity.as_deref() != Some(&config.identity) {
        return;
    }
    spec.holder_identity = None;
    spec.lease_duration_seconds = Some(1);
    spec.renew_time = Some(MicroTime(Timestamp::now()));
    match api
        .replace(&config.name, &PostParams::default(), &lease)
        .await
    {
        Ok(_) => {
            tracing::info!(lease = %format!("{}/{}", config.namespace, config.name), "released the lease")
        }
        Err(e) => {
            fsm_errcode::warn!(ErrCode::E4000, lease = %config.name, error = %e, "cannot release the lease")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(identity: &str) -> Config {
        Config {
            namespace: "fsm-system".into(),
            name: "fsm-controller".into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }

    fn wall(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).expect("valid time")
    }

    fn written(step: Step) -> LeaseSpec {
        match step {
            Step::Write(spec) => spec,
            Step::Wait { holder } => panic!("expected a write, {holder} holds the lease"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_expires_by_the_observers_clock_only() {
        let mut a = Elector::new(&config("a"));
        let mut b = Elector::new(&config("b"));
        let t0 = Instant::now();
        // a creates the lease.
        let record = written(a.step(None, t0, wall(0)));
        assert_eq!(record.holder_identity.as_deref(), Some("a"));
        assert_eq!(record.lease_transitions, Some(0));
        a.written(record.clone(), t0);

        // b first sees it much later by its wall clock (skewed): it still waits a full lease
        // duration from when *it* saw the record.
        tokio::time::advance(Duration::from_secs(1)).await;
        let seen = Instant::now();
        assert_eq!(
            b.step(Some(&record), seen, wall(10_000)),
            Step::Wait { holder: "a".into() }
        );
        tokio::time::advance(Duration::from_secs(14)).await;
        assert!(matches!(
            b.step(Some(&record), Instant::now(), wall(10_014)),
            Step::Wait { .. }
        ));

        // a renews: the changed record restarts b's wait.
        let renewed = written(a.step(Some(&record), Instant::now(), wall(15)));
        assert_eq!(renewed.acquire_time, record.acquire_time);
        assert_ne!(renewed.renew_time, record.renew_time);
        assert_eq!(renewed.lease_transitions, Some(0));
        tokio::time::advance(Duration::from_secs(14)).await;
        assert!(matches!(
            b.step(Some(&renewed), Instant::now(), wall(29)),
            Step::Wait { .. }
        ));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(matches!(
            b.step(Some(&renewed), Instant::now(), wall(30)),
            Step::Wait { .. }
        ));

        // a dies: 15 s after b last saw a change, b takes over.
        tokio::time::advance(Duration::from_secs(14)).await;
        let taken = written(b.step(Some(&renewed), Instant::now(), wall(44)));
        assert_eq!(taken.holder_identity.as_deref(), Some("b"));
        assert_eq!(taken.lease_transitions, Some(1));
        assert_eq!(taken.acquire_time, Some(MicroTime(wall(44))));
        assert_eq!(taken.lease_duration_seconds, Some(15));
    }

    #[tokio::test(start_paused = true)]
    async fn a_released_lease_is_taken_at_once() {
        let mut b = Elector::new(&config("b"));
        let released = LeaseSpec {
            holder_identity: None,
            lease_duration_seconds: Some(1),
            lease_transitions: Some(3),
            ..LeaseSpec::default()
        };
        let taken = written(b.step(Some(&released), Instant::now(), wall(0)));
        assert_eq!(taken.holder_identity.as_deref(), Some("b"));
        assert_eq!(taken.lease_transitions, Some(4));
    }

    fn fast(identity: &str) -> Config {
        Config {
            lease_duration: Duration::from_secs(2),
            renew_deadline: Duration::from_millis(1500),
            retry_period: Duration::from_millis(100),
            ..config(identity)
        }
    }

    async fn leaders(candidates: &[&Leadership]) -> usize {
        candidates.iter().filter(|c| *c.rx.borrow()).count()
    }

    /// Real candidates against the test API server: exactly one leads; a released lease is taken
    /// over at once; a dead leader's (not released) after its lease duration.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_leader_among_candidates_and_takeover() {
        let server = fsm_test_apiserver::ApiServer::builder()
            .start()
            .await
            .expect("test API server");
        server
            .store()
            .apply_yaml("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: fsm-system\n")
            .expect("namespace");
        let a = Leadership::elect(server.client(), fast("a"));
        let b = Leadership::elect(server.client(), fast("b"));
        let c = Leadership::elect(server.client(), fast("c"));
        let start = Instant::now();
        while leaders(&[&a, &b, &c]).await == 0 {
            assert!(start.elapsed() < Duration::from_secs(5), "nobody leads");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Over several renewals, never two leaders.
        for _ in 0..100 {
            assert_eq!(leaders(&[&a, &b, &c]).await, 1);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut rest = Vec::new();
        let mut leader = None;
        for candidate in [a, b, c] {
            if *candidate.rx.borrow() {
                leader = Some(candidate);
            } else {
                rest.push(candidate);
            }
        }
        let leader = leader.expect("one leader");

        // A leader that shuts down hands over at the next retry.
        let released_at = Instant::now();
        leader.release().await;
        while leaders(&[&rest[0], &rest[1]]).await == 0 {
            assert!(
                released_at.elapsed() < Duration::from_millis(1500),
                "no takeover of a released lease"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(leaders(&[&rest[0], &rest[1]]).await, 1);

        // A leader that dies: its lease must expire first (2 s from its last renewal).
        let (second, other) = if *rest[0].rx.borrow() {
            (rest.remove(0), rest.remove(0))
        } else {
            (rest.remove(1), rest.remove(0))
        };
        let died_at = Instant::now();
        if let Some((_, task)) = &second.stop {
            task.abort();
        }
        while !*other.rx.borrow() {
            assert!(
                died_at.elapsed() < Duration::from_secs(4),
                "no takeover of an expired lease"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let took = died_at.elapsed();
        assert!(
            took >= Duration::from_millis(1800),
            "took over a lease that had not expired, after {took:?}"
        );
        let lease: Lease = Api::namespaced(server.client(), "fsm-system")
            .get("fsm-controller")
            .await
            .expect("lease");
        let spec = lease.spec.expect("spec");
        assert_eq!(spec.lease_transitions, Some(2));
        assert_eq!(spec.lease_duration_seconds, Some(2));
        other.release().await;
    }

    #[test]
    fn configuration_keeps_a_leader_from_outliving_its_lease() {
        assert!(config("a").validate().is_ok());
        let mut bad = config("a");
        bad.renew_deadline = Duration::from_secs(15);
        assert!(bad.validate().is_err());
        let mut bad = config("a");
        bad.retry_period = Duration::from_secs(10);
        assert!(bad.validate().is_err());
        let mut sub_second = config("a");
        sub_second.lease_duration = Duration::from_millis(1500);
        assert_eq!(sub_second.lease_seconds(), 2);
    }
}
