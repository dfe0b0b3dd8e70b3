//! Load balancing: weighted choice among clusters, and round-robin or least-request among a
//! cluster's endpoints.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;

use crate::config::{Cluster, Endpoint, LbPolicy, Weighted};

/// Requests in flight per endpoint, shared by every cluster and kept across config swaps, so
/// least-request sees the real load.
#[derive(Debug, Default)]
pub struct ActiveRequests {
    counts: Mutex<HashMap<SocketAddr, Arc<AtomicUsize>>>,
}

/// Counts one request in flight until dropped.
#[derive(Debug)]
pub struct ActiveGuard(Arc<AtomicUsize>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ActiveRequests {
    pub fn get(&self, addr: SocketAddr) -> usize {
        self.counts
            .lock()
            .get(&addr)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    pub fn start(&self, addr: SocketAddr) -> ActiveGuard {
        let counter = self.counts.lock().entry(addr).or_default().clone();
        counter.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(counter)
    }
}

/// Picks a cluster with probability weight / total; `roll` is uniform in [0, total).
pub fn pick_weighted(w: &Weighted, roll: u64) -> &str {
    let mut left = roll % w.total.max(1);
    for (name, weight) in &w.entries {
        let weight = u64::from(*weight);
        if left < weight {
            return name;
        }
        left -= weight;
    }
    // Unreachable with a validated total; the last entry is a safe answer anyway.
    w.entries.last().map_or("", |(n, _)| n)
}

/// A random cluster of a weighted set.
pub fn choose_cluster(w: &Weighted) -> &str {
    if w.entries.len() == 1 {
        return &w.entries[0].0;
    }
    pick_weighted(w, fastrand::u64(0..w.total.max(1)))
}

/// The endpoint for the next request or connection; `None` when the cluster has none.
pub fn pick_endpoint<'a>(cluster: &'a Cluster, active: &ActiveRequests) -> Option<&'a Endpoint> {
    let eps = &cluster.endpoints;
    match eps.len() {
        0 => None,
        1 => eps.first(),
        n => match cluster.lb {
            LbPolicy::RoundRobin => {
                let total: u64 = eps.iter().map(|e| u64::from(e.weight)).sum();
                let turn = cluster.cursor.fetch_add(1, Ordering::Relaxed) as u64;
                let mut left = turn % total.max(1);
                eps.iter()
                    .find(|e| {
                        let w = u64::from(e.weight);
                        if left < w {
                            true
                        } else {
                            left -= w;
                            false
                        }
                    })
                    .or(eps.first())
            }
            LbPolicy::LeastRequest => {
                // Power of two choices: two distinct endpoints at random, the less loaded wins.
                let a = fastrand::usize(0..n);
                let b = (a + 1 + fastrand::usize(0..n - 1)) % n;
                let (ea, eb) = (&eps[a], &eps[b]);
                Some(if active.get(eb.addr) < active.get(ea.addr) {
                    eb
                } else {
                    ea
                })
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UpstreamProtocol;
    use std::collections::BTreeMap;
    use std::time::Duration;

    fn cluster(lb: LbPolicy, weights: &[u32]) -> Cluster {
        Cluster {
            name: Arc::from("c"),
            lb,
            connect_timeout: Duration::from_secs(1),
            protocol: UpstreamProtocol::Http1,
            endpoints: weights
                .iter()
                .enumerate()
                .map(|(i, w)| Endpoint {
                    addr: SocketAddr::from(([127, 0, 0, 1], 1000 + i as u16)),
                    weight: *w,
                    meshed: true,
                    identity: None,
                    workload: None,
                })
                .collect(),
            discovery: Default::default(),
            breakers: Default::default(),
            tls: None,
            cursor: AtomicUsize::new(0),
        }
    }

    fn tally(c: &Cluster, active: &ActiveRequests, n: usize) -> BTreeMap<u16, usize> {
        let mut seen = BTreeMap::new();
        for _ in 0..n {
            let e = pick_endpoint(c, active).expect("endpoint");
            *seen.entry(e.addr.port()).or_default() += 1;
        }
        seen
    }

    #[test]
    fn round_robin_alternates_and_honours_weights() {
        let active = ActiveRequests::default();
        let c = cluster(LbPolicy::RoundRobin, &[1, 1]);
        let order: Vec<u16> = (0..4)
            .map(|_| pick_endpoint(&c, &active).expect("e").addr.port())
            .collect();
        assert_eq!(order, vec![1000, 1001, 1000, 1001]);
        let c = cluster(LbPolicy::RoundRobin, &[3, 1]);
        assert_eq!(
            tally(&c, &active, 8),
            BTreeMap::from([(1000, 6), (1001, 2)])
        );
    }

    #[test]
    fn least_request_avoids_the_busy_endpoint() {
        let active = ActiveRequests::default();
        let c = cluster(LbPolicy::LeastRequest, &[1, 1]);
        let _busy: Vec<ActiveGuard> = (0..5).map(|_| active.start(c.endpoints[0].addr)).collect();
        // With two endpoints both are always compared, so the idle one always wins.
        assert_eq!(tally(&c, &active, 20), BTreeMap::from([(1001, 20)]));
        drop(_busy);
        assert_eq!(active.get(c.endpoints[0].addr), 0);
    }

    #[test]
    fn no_endpoints_means_none() {
        let c = cluster(LbPolicy::RoundRobin, &[]);
        assert!(pick_endpoint(&c, &ActiveRequests::default()).is_none());
    }

    #[test]
    fn weighted_clusters_split_by_roll() {
        let w = Weighted {
            entries: vec![
                (Arc::from("a"), 90),
                (Arc::from("b"), 10),
                (Arc::from("z"), 0),
            ],
            total: 100,
        };
        assert_eq!(pick_weighted(&w, 0), "a");
        assert_eq!(pick_weighted(&w, 89), "a");
        assert_eq!(pick_weighted(&w, 90), "b");
        assert_eq!(pick_weighted(&w, 99), "b");
    }
}
