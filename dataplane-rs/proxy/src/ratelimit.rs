//! Local rate limits: Envoy's token bucket, and the registry that keeps each bucket across
//! configuration rebuilds.
//!
//! [`Bucket`] is pure arithmetic on instants it is given, so tests drive it with a fake clock.
//! [`RateLimits`] lives on the [`crate::Proxy`], not in the [`Config`]: a config is rebuilt on
//! every xDS update (an endpoint change included), and a bucket rebuilt with it would start full
//! again, letting a client through `max_tokens` more requests after every update.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};

use crate::config::{Config, LocalRateLimit};

/// What a bucket does; part of its [`BucketKey`], so a change starts a fresh bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Settings {
    /// At least 1.
    pub max_tokens: u32,
    /// At least 1.
    pub tokens_per_fill: u32,
    /// Not zero (configs hold at least 50ms).
    pub fill_interval: Duration,
}

/// Which requests share a bucket.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BucketKey {
    pub route_config: Arc<str>,
    pub virtual_host: Arc<str>,
    pub scope: Scope,
    pub settings: Settings,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    /// The virtual host's own `rate_limit`, shared by its routes without one.
    VirtualHost,
    /// The `rate_limit` of the route at this index of the virtual host.
    Route(usize),
}

/// A token bucket as Envoy's local rate limit keeps it: full at first, one token per admitted
/// request, and `tokens_per_fill` more at the end of every whole `fill_interval` since it was
/// made (discrete fills on a fixed schedule, not a continuous trickle), never above `max_tokens`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bucket {
    tokens: u32,
    /// The start of the interval now running: fills happen at `last_fill + k * fill_interval`.
    last_fill: Instant,
}

impl Bucket {
    pub fn new(settings: &Settings, now: Instant) -> Self {
        Bucket {
            tokens: settings.max_tokens,
            last_fill: now,
        }
    }

    /// Adds the fills due by `now`. An instant before the last fill (a caller that read the
    /// clock just before another took the lock) adds nothing.
    pub fn refill(&mut self, settings: &Settings, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last_fill).as_nanos();
        let interval = settings.fill_interval.as_nanos().max(1);
        let fills = elapsed / interval;
        if fills == 0 {
            return;
        }
        let added = fills.saturating_mul(u128::from(settings.tokens_per_fill));
        let tokens = u128::from(self.tokens).saturating_add(added);
        self.tokens = u32::try_from(tokens.min(u128::from(settings.max_tokens)))
            .unwrap_or(settings.max_tokens);
        // Keep the schedule: the next fill is a whole interval after the last one due, not
        // after `now`.
        let into_interval = elapsed % interval;
        let back = Duration::new(
            u64::try_from(into_interval / 1_000_000_000).unwrap_or(u64::MAX),
            u32::try_from(into_interval % 1_000_000_000).unwrap_or(0),
        );
        self.last_fill = now.checked_sub(back).unwrap_or(now);
    }

    /// Takes one token if there is one after the fills due by `now`.
    pub fn take(&mut self, settings: &Settings, now: Instant) -> bool {
        self.refill(settings, now);
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }

    pub fn tokens(&self) -> u32 {
        self.tokens
    }
}

/// Every bucket of the running configuration, by key.
///
/// Bounded: whenever a bucket is made (the only way the map grows), entries whose key the
/// installed config no longer has are dropped first, at most once per installed config. So the
/// map holds the installed config's buckets, plus those a request still running on the
/// previous config made after the swap, until the next new bucket.
#[derive(Debug, Default)]
pub struct RateLimits {
    inner: RwLock<Registry>,
}

#[derive(Debug, Default)]
struct Registry {
    buckets: HashMap<BucketKey, Mutex<Bucket>>,
    /// The config the map was last pruned against. A `Weak` keeps the allocation, so a new
    /// config can never be mistaken for it by address.
    pruned_for: Weak<Config>,
}

impl RateLimits {
    /// Takes a token from `limit`'s bucket at `now`; `false`: the request is refused.
    /// `installed` gives the running config, read only when a new bucket is made.
    pub fn admit(
        &self,
        limit: &LocalRateLimit,
        installed: impl FnOnce() -> Arc<Config>,
        now: Instant,
    ) -> bool {
        let settings = &limit.key.settings;
        if let Some(bucket) = self.inner.read().buckets.get(&limit.key) {
            return bucket.lock().take(settings, now);
        }
        let installed = installed();
        let mut registry = self.inner.write();
        if !std::ptr::eq(registry.pruned_for.as_ptr(), Arc::as_ptr(&installed)) {
            let live = keys_of(&installed);
            registry.buckets.retain(|k, _| live.contains(k));
            registry.pruned_for = Arc::downgrade(&installed);
        }
        registry
            .buckets
            .entry(limit.key.clone())
            .or_insert_with(|| Mutex::new(Bucket::new(settings, now)))
            .get_mut()
            .take(settings, now)
    }

    pub fn len(&self) -> usize {
        self.inner.read().buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn keys_of(config: &Config) -> HashSet<&BucketKey> {
    let mut keys = HashSet::new();
    for table in config.routes.values() {
        for vh in &table.virtual_hosts {
            keys.extend(vh.rate_limit.iter().map(|l| &l.key));
            for route in &vh.routes {
                keys.extend(route.rate_limit.iter().map(|l| &l.key));
            }
        }
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn settings(max_tokens: u32, tokens_per_fill: u32, millis: u64) -> Settings {
        Settings {
            max_tokens,
            tokens_per_fill,
            fill_interval: Duration::from_millis(millis),
        }
    }

    /// Admitted requests out of `n` back to back at `at`.
    fn burst(b: &mut Bucket, s: &Settings, at: Instant, n: u32) -> u32 {
        (0..n).map(|_| u32::from(b.take(s, at))).sum()
    }

    #[test]
    fn a_full_bucket_admits_max_tokens_back_to_back_then_refuses() {
        let t0 = Instant::now();
        // 3 per interval plus a burst of 2.
        let s = settings(5, 3, 1000);
        let mut b = Bucket::new(&s, t0);
        assert_eq!(burst(&mut b, &s, t0, 5), 5);
        assert!(!b.take(&s, t0 + Duration::from_millis(999)));
    }

    #[test]
    fn one_interval_adds_tokens_per_fill() {
        let t0 = Instant::now();
        let s = settings(5, 3, 1000);
        let mut b = Bucket::new(&s, t0);
        assert_eq!(burst(&mut b, &s, t0, 5), 5);
        // Discrete: nothing before the interval ends, all three when it does.
        assert!(!b.take(&s, t0 + Duration::from_millis(999)));
        assert_eq!(burst(&mut b, &s, t0 + Duration::from_millis(1000), 10), 3);
    }

    #[test]
    fn fills_stop_at_max_tokens() {
        let t0 = Instant::now();
        let s = settings(5, 3, 1000);
        let mut b = Bucket::new(&s, t0);
        assert_eq!(burst(&mut b, &s, t0, 1), 1);
        b.refill(&s, t0 + Duration::from_millis(1000));
        assert_eq!(b.tokens(), 5);
        b.refill(&s, t0 + Duration::from_millis(3000));
        assert_eq!(b.tokens(), 5);
    }

    #[test]
    fn many_intervals_at_once_add_each_fill_and_keep_the_schedule() {
        let t0 = Instant::now();
        let s = settings(100, 2, 1000);
        let mut b = Bucket::new(&s, t0);
        assert_eq!(burst(&mut b, &s, t0, 100), 100);
        // 7.5 intervals: 7 fills, and the next fill is still due at t0 + 8s, not 8.5s.
        b.refill(&s, t0 + Duration::from_millis(7500));
        assert_eq!(b.tokens(), 14);
        b.refill(&s, t0 + Duration::from_millis(7999));
        assert_eq!(b.tokens(), 14);
        b.refill(&s, t0 + Duration::from_millis(8000));
        assert_eq!(b.tokens(), 16);
    }

    #[test]
    fn an_instant_before_the_last_fill_adds_nothing() {
        let t0 = Instant::now();
        let s = settings(1, 1, 1000);
        let mut b = Bucket::new(&s, t0 + Duration::from_secs(5));
        assert!(b.take(&s, t0 + Duration::from_secs(5)));
        assert!(!b.take(&s, t0));
    }

    #[test]
    fn huge_gaps_and_settings_saturate() {
        let t0 = Instant::now();
        let s = settings(u32::MAX, u32::MAX, 50);
        let mut b = Bucket::new(&s, t0);
        assert_eq!(burst(&mut b, &s, t0, 3), 3);
        b.refill(&s, t0 + Duration::from_secs(365 * 24 * 3600));
        assert_eq!(b.tokens(), u32::MAX);
    }

    /// A config with one inbound virtual host `vh` limited to `max_tokens` per minute, built
    /// anew on each call as every xDS update builds it.
    fn config(vh: &str, max_tokens: u32) -> Arc<Config> {
        use crate::config::test_support::set;
        use fsm_dataplane_proto::{type_url, v1};
        use prost::Message;
        let rc = v1::RouteConfiguration {
            name: "inbound".into(),
            virtual_hosts: vec![v1::VirtualHost {
                name: vh.into(),
                domains: vec![vh.into()],
                routes: vec![v1::Route {
                    r#match: Some(v1::RouteMatch {
                        path: Some(v1::route_match::Path::Prefix("/".into())),
                        ..Default::default()
                    }),
                    action: Some(v1::RouteAction {
                        clusters: vec![v1::WeightedCluster {
                            name: "c".into(),
                            weight: 1,
                        }],
                        ..Default::default()
                    }),
                    allowed_sources: None,
                    rate_limit: None,
                }],
                rate_limit: Some(v1::LocalRateLimit {
                    max_tokens,
                    tokens_per_fill: 1,
                    fill_interval: Some(prost_types::Duration {
                        seconds: 60,
                        nanos: 0,
                    }),
                    status: 0,
                    response_headers_to_add: vec![],
                }),
            }],
        };
        let set = set(vec![(
            type_url::ROUTE_CONFIGURATION,
            "inbound",
            rc.encode_to_vec(),
        )]);
        Arc::new(Config::build(&set, type_url::CLUSTER_LOAD_ASSIGNMENT).expect("valid"))
    }

    fn limit_of(config: &Config) -> &LocalRateLimit {
        config.routes["inbound"].virtual_hosts[0]
            .rate_limit
            .as_ref()
            .expect("limit")
    }

    fn admit(limits: &RateLimits, config: &Arc<Config>, now: Instant) -> bool {
        limits.admit(limit_of(config), || config.clone(), now)
    }

    #[test]
    fn buckets_survive_a_rebuilt_config() {
        let limits = RateLimits::default();
        let t0 = Instant::now();
        let first = config("vh", 3);
        assert!((0..3).all(|_| admit(&limits, &first, t0)));
        // An endpoint change rebuilds everything: same key, same (empty) bucket.
        let rebuilt = config("vh", 3);
        assert!(!Arc::ptr_eq(&first, &rebuilt));
        assert!(!admit(&limits, &rebuilt, t0));
        assert_eq!(limits.len(), 1);
        // Its fills stay on the first bucket's schedule.
        assert!(admit(&limits, &rebuilt, t0 + Duration::from_secs(60)));
    }

    #[test]
    fn a_changed_setting_starts_a_fresh_bucket() {
        let limits = RateLimits::default();
        let t0 = Instant::now();
        let three = config("vh", 3);
        assert!((0..3).all(|_| admit(&limits, &three, t0)));
        let four = config("vh", 4);
        assert!((0..4).all(|_| admit(&limits, &four, t0)));
        assert!(!admit(&limits, &four, t0));
        // The old key left when the new bucket was made.
        assert_eq!(limits.len(), 1);
    }

    #[test]
    fn buckets_gone_from_the_installed_config_are_dropped() {
        let limits = RateLimits::default();
        let t0 = Instant::now();
        for i in 0..100 {
            let c = config(&format!("vh-{i}"), 1);
            assert!(admit(&limits, &c, t0));
            assert_eq!(limits.len(), 1, "after virtual host {i}");
        }
        // A request still on an older config keeps its bucket only until the installed one
        // makes a new bucket.
        let installed = config("kept", 1);
        let old = config("old", 1);
        assert!(admit(&limits, &installed, t0));
        assert!(limits.admit(limit_of(&old), || installed.clone(), t0));
        assert_eq!(limits.len(), 2);
        let next = config("next", 1);
        assert!(admit(&limits, &next, t0));
        assert_eq!(limits.len(), 1);
    }

    proptest! {
        /// However requests arrive, no more than `max_tokens + T * tokens_per_fill` are
        /// admitted within the first T whole intervals (and at least the burst is).
        #[test]
        fn never_more_than_the_burst_plus_one_fill_per_interval(
            max_tokens in 1u32..20,
            tokens_per_fill in 1u32..10,
            interval_ms in 50u64..2000,
            mut offsets in proptest::collection::vec(0u64..20_000, 0..300),
        ) {
            let s = settings(max_tokens, tokens_per_fill, interval_ms);
            let t0 = Instant::now();
            let mut b = Bucket::new(&s, t0);
            offsets.sort_unstable();
            let mut admitted = 0u64;
            for (i, at) in offsets.iter().enumerate() {
                if b.take(&s, t0 + Duration::from_millis(*at)) {
                    admitted += 1;
                }
                let intervals = at / interval_ms;
                let most = u64::from(max_tokens) + intervals * u64::from(tokens_per_fill);
                prop_assert!(admitted <= most, "{admitted} admitted by {at}ms, at most {most}");
                prop_assert!(admitted >= (i as u64 + 1).min(u64::from(max_tokens)));
            }
        }
    }
}
