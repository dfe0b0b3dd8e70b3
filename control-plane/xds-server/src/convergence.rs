//! How long a change takes to reach a proxy: from the controller observing it (a catalog change
//! or a certificate, stamped on the types of the snapshot it changed, see
//! [`fsm_cache::SnapshotCache::set_observed`]) to the proxy's ACK of the first response that
//! carries it, per resource type (`fsm_proxy_convergence_seconds`).
//!
//! One [`Convergence`] per stream, a few words per type, updated in O(1) per stamp, response and
//! ACK. A stream that skips intermediate snapshots (bursts coalesce) still measures from the
//! earliest change it carries: stamps accumulate in the cache until a stream takes them, and
//! here until a response carries them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fsm_cache::TypeUrl;

/// Per type: the earliest change not yet sent, and the response in flight that carries the
/// earliest change not yet acknowledged.
#[derive(Debug, Default)]
pub struct Convergence {
    types: Vec<Track>,
}

#[derive(Debug)]
struct Track {
    type_url: TypeUrl,
    /// The proxy asked for the type on this stream: a snapshot change that sends it nothing
    /// means it already has (or was sent) what the change carries.
    requested: bool,
    /// The earliest change observed that no response has carried yet.
    changed: Option<Instant>,
    /// The last response sent since that change, and when the earliest change it carries was
    /// observed.
    in_flight: Option<(Arc<str>, Instant)>,
}

impl Convergence {
    fn track(&mut self, type_url: TypeUrl) -> &mut Track {
        let at = match self.types.iter().position(|t| t.type_url == type_url) {
            Some(at) => at,
            None => {
                self.types.push(Track {
                    type_url,
                    requested: false,
                    changed: None,
                    in_flight: None,
                });
                self.types.len() - 1
            }
        };
        &mut self.types[at]
    }

    /// A change to `type_url` was observed at `at` (the earliest stamp wins).
    pub fn observed(&mut self, type_url: TypeUrl, at: Instant) {
        let track = self.track(type_url);
        track.changed = Some(track.changed.map_or(at, |c| c.min(at)));
    }

    /// The proxy asked for `type_url` on this stream.
    pub fn requested(&mut self, type_url: TypeUrl) {
        self.track(type_url).requested = true;
    }

    /// A response of `type_url` labelled `version` went out: it carries every change observed
    /// so far, and those the previous response in flight carried.
    pub fn sent(&mut self, type_url: TypeUrl, version: &Arc<str>) {
        let track = self.track(type_url);
        let earliest = match (track.changed.take(), track.in_flight.take()) {
            (Some(c), Some((_, f))) => Some(c.min(f)),
            (c, f) => c.or(f.map(|(_, f)| f)),
        };
        track.in_flight = earliest.map(|at| (version.clone(), at));
    }

    /// A snapshot change sent nothing of `type_url`: if the proxy asked for the type, what it
    /// was last sent already matches the snapshot, so the change converges with that response
    /// (or already has, when nothing is in flight).
    pub fn unchanged(&mut self, type_url: TypeUrl) {
        let track = self.track(type_url);
        if !track.requested {
            // The first response, when the proxy asks, will carry it.
            return;
        }
        if let Some(changed) = track.changed.take()
            && let Some((_, at)) = &mut track.in_flight
        {
            *at = (*at).min(changed);
        }
    }

    /// Types with a change observed and not sent, for [`Convergence::unchanged`].
    pub fn pending(&self) -> impl Iterator<Item = TypeUrl> + '_ {
        self.types
            .iter()
            .filter(|t| t.changed.is_some())
            .map(|t| t.type_url)
    }

    /// The proxy ACKed `version` of `type_url`: the time since the earliest change that response
    /// carried, if it was the one in flight.
    pub fn acked(&mut self, type_url: TypeUrl, version: &str, now: Instant) -> Option<Duration> {
        let track = self.track(type_url);
        match &track.in_flight {
            Some((sent, at)) if &**sent == version => {
                let elapsed = now.saturating_duration_since(*at);
                track.in_flight = None;
                Some(elapsed)
            }
            _ => None,
        }
    }

    /// The proxy rejected `version`: the changes it carried did not converge, and are not
    /// measured (a later fix converges its own change).
    pub fn nacked(&mut self, type_url: TypeUrl, version: &str) {
        let track = self.track(type_url);
        if track
            .in_flight
            .as_ref()
            .is_some_and(|(sent, _)| &**sent == version)
        {
            track.in_flight = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CDS: TypeUrl = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
    const EDS: TypeUrl = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

    fn v(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn a_change_converges_when_the_response_carrying_it_is_acked() {
        let t0 = Instant::now();
        let mut c = Convergence::default();
        c.requested(CDS);
        c.observed(CDS, t0);
        c.sent(CDS, &v("v2"));
        assert_eq!(c.acked(CDS, "v1", at(t0, 5)), None, "an older version");
        assert_eq!(
            c.acked(CDS, "v2", at(t0, 30)),
            Some(Duration::from_millis(30))
        );
        assert_eq!(c.acked(CDS, "v2", at(t0, 40)), None, "measured once");
    }

    #[test]
    fn a_response_not_caused_by_a_change_measures_nothing() {
        let t0 = Instant::now();
        let mut c = Convergence::default();
        c.requested(CDS);
        c.sent(CDS, &v("v1"));
        assert_eq!(c.acked(CDS, "v1", t0), None);
    }

    #[test]
    fn coalesced_changes_are_measured_from_the_earliest() {
        let t0 = Instant::now();
        let mut c = Convergence::default();
        c.requested(EDS);
        c.observed(EDS, at(t0, 10));
        c.observed(EDS, t0);
        c.sent(EDS, &v("v2"));
        // A newer change goes out before the first response is acknowledged: the first change
        // converges only with the response that replaces it.
        c.observed(EDS, at(t0, 50));
        c.sent(EDS, &v("v3"));
        assert_eq!(c.acked(EDS, "v2", at(t0, 60)), None);
        assert_eq!(
            c.acked(EDS, "v3", at(t0, 100)),
            Some(Duration::from_millis(100))
        );
    }

    #[test]
    fn a_change_the_proxy_needs_nothing_for_is_dropped_or_joins_what_is_in_flight() {
        let t0 = Instant::now();
        let mut c = Convergence::default();
        c.requested(CDS);
        c.observed(CDS, t0);
        c.unchanged(CDS);
        assert_eq!(c.pending().count(), 0, "nothing to converge");
        c.sent(CDS, &v("v5"));
        assert_eq!(
            c.acked(CDS, "v5", at(t0, 10)),
            None,
            "not from the old stamp"
        );

        c.observed(CDS, at(t0, 20));
        c.sent(CDS, &v("v6"));
        c.observed(CDS, at(t0, 15));
        c.unchanged(CDS);
        assert_eq!(
            c.acked(CDS, "v6", at(t0, 40)),
            Some(Duration::from_millis(25))
        );
    }

    #[test]
    fn a_type_not_requested_yet_keeps_its_change_for_the_first_response() {
        let t0 = Instant::now();
        let mut c = Convergence::default();
        c.observed(EDS, t0);
        c.unchanged(EDS);
        assert_eq!(c.pending().collect::<Vec<_>>(), vec![EDS]);
        c.requested(EDS);
        c.sent(EDS, &v("v1"));
        assert_eq!(
            c.acked(EDS, "v1", at(t0, 7)),
            Some(Duration::from_millis(7))
        );
    }

    #[test]
    fn a_nack_drops_the_change_it_carried() {
        let t0 = Instant::now();
        let mut c = Convergence::default();
        c.requested(CDS);
        c.observed(CDS, t0);
        c.sent(CDS, &v("bad"));
        c.nacked(CDS, "bad");
        c.sent(CDS, &v("bad"));
        assert_eq!(c.acked(CDS, "bad", at(t0, 9)), None);
    }

    #[test]
    fn types_are_tracked_apart() {
        let t0 = Instant::now();
        let mut c = Convergence::default();
        c.requested(CDS);
        c.requested(EDS);
        c.observed(CDS, t0);
        c.observed(EDS, at(t0, 3));
        c.sent(CDS, &v("c"));
        c.sent(EDS, &v("e"));
        assert_eq!(
            c.acked(EDS, "e", at(t0, 10)),
            Some(Duration::from_millis(7))
        );
        assert_eq!(
            c.acked(CDS, "c", at(t0, 10)),
            Some(Duration::from_millis(10))
        );
    }
}
