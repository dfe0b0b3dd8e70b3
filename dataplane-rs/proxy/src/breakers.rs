//! Circuit-breaker bookkeeping: what one sidecar has in flight to each cluster, and the
//! HTTP/1.1 connection slots requests wait for. Kept in [`crate::Upstreams`] across config swaps,
//! so a config update does not forget requests already in flight.
//!
//! Checks are `fetch_update`s, not a load followed by an add: two requests racing for the last
//! unit cannot both get it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// One cluster's counters.
#[derive(Debug, Default)]
pub struct ClusterLimits {
    requests: AtomicUsize,
    pending: AtomicUsize,
    retries: AtomicUsize,
    connections: AtomicUsize,
    /// HTTP/1.1 connection slots and the `max_connections` they were made for.
    slots: Mutex<Option<(u32, Arc<Semaphore>)>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// HTTP requests in flight (`max_requests`).
    Requests,
    /// HTTP requests waiting for a connection slot (`max_pending_requests`).
    Pending,
    /// Retries scheduled or in flight (`max_retries`).
    Retries,
    /// TCP client connections relayed (`max_connections` of TCP clusters).
    Connections,
}

/// One unit of a counter, given back when dropped.
#[derive(Debug)]
pub struct Held {
    limits: Arc<ClusterLimits>,
    counter: Counter,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.limits
            .counter(self.counter)
            .fetch_sub(1, Ordering::AcqRel);
    }
}

/// An HTTP/1.1 connection slot, given back when dropped (when the response body is done).
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    /// Keeps the cluster's entry in use while the slot is held (see `Upstreams::limits`).
    _limits: Arc<ClusterLimits>,
}

impl ClusterLimits {
    fn counter(&self, counter: Counter) -> &AtomicUsize {
        match counter {
            Counter::Requests => &self.requests,
            Counter::Pending => &self.pending,
            Counter::Retries => &self.retries,
            Counter::Connections => &self.connections,
        }
    }

    pub fn count(&self, counter: Counter) -> usize {
        self.counter(counter).load(Ordering::Acquire)
    }

    /// Counts one more, whatever the count.
    pub fn hold(self: &Arc<Self>, counter: Counter) -> Held {
        self.counter(counter).fetch_add(1, Ordering::AcqRel);
        Held {
            limits: self.clone(),
            counter,
        }
    }

    /// Counts one more unless `max` are already counted.
    pub fn try_hold(self: &Arc<Self>, counter: Counter, max: u32) -> Option<Held> {
        let max = usize::try_from(max).unwrap_or(usize::MAX);
        self.counter(counter)
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        Some(Held {
            limits: self.clone(),
            counter,
        })
    }

    /// The semaphore of `max_connections` slots. A changed limit starts a new one: requests
    /// holding slots of the old one finish on it, so until they do the cluster may briefly have
    /// both limits' worth in flight.
    fn slots(&self, max_connections: u32) -> Arc<Semaphore> {
        let mut slots = self.slots.lock();
        match &*slots {
            Some((max, semaphore)) if *max == max_connections => semaphore.clone(),
            _ => {
                let permits = usize::try_from(max_connections)
                    .unwrap_or(usize::MAX)
                    .min(Semaphore::MAX_PERMITS);
                let semaphore = Arc::new(Semaphore::new(permits));
                *slots = Some((max_connections, semaphore.clone()));
                semaphore
            }
        }
    }

    /// A free slot, or the semaphore to wait on when every one is taken (Envoy counts that
    /// moment as `upstream_cx_overflow`).
    pub fn try_slot(self: &Arc<Self>, max_connections: u32) -> Result<Slot, Arc<Semaphore>> {
        let slots = self.slots(max_connections);
        match slots.clone().try_acquire_owned() {
            Ok(permit) => Ok(Slot {
                _permit: permit,
                _limits: self.clone(),
            }),
            Err(_) => Err(slots),
        }
    }

    /// Waits for a slot of `slots` as a pending request; `None` at once when `max_pending`
    /// requests are already waiting.
    pub async fn wait_slot(
        self: &Arc<Self>,
        slots: Arc<Semaphore>,
        max_pending: Option<u32>,
    ) -> Option<Slot> {
        let _pending = match max_pending {
            Some(max) => self.try_hold(Counter::Pending, max)?,
            None => self.hold(Counter::Pending),
        };
        let permit = slots.acquire_owned().await.ok()?;
        Some(Slot {
            _permit: permit,
            _limits: self.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn try_hold_stops_at_max_and_gives_back_on_drop() {
        let l = Arc::new(ClusterLimits::default());
        let a = l.try_hold(Counter::Retries, 2).expect("first");
        let b = l.try_hold(Counter::Retries, 2).expect("second");
        assert!(l.try_hold(Counter::Retries, 2).is_none());
        assert_eq!(l.count(Counter::Retries), 2);
        drop(a);
        let c = l.try_hold(Counter::Retries, 2).expect("freed");
        drop((b, c));
        assert_eq!(l.count(Counter::Retries), 0);
        // Other counters are independent, and 0 admits nothing.
        assert!(l.try_hold(Counter::Connections, 0).is_none());
        let _held = l.hold(Counter::Requests);
        assert_eq!(l.count(Counter::Requests), 1);
        assert_eq!(l.count(Counter::Connections), 0);
    }

    #[tokio::test]
    async fn slots_wait_in_order_and_pending_overflows() {
        let l = Arc::new(ClusterLimits::default());
        let first = l.try_slot(1).expect("a free slot");
        let Err(slots) = l.try_slot(1) else {
            panic!("second slot while the first is held");
        };
        // One may wait...
        let waiter = tokio::spawn({
            let l = l.clone();
            let slots = slots.clone();
            async move { l.wait_slot(slots, Some(1)).await.is_some() }
        });
        while l.count(Counter::Pending) == 0 {
            tokio::task::yield_now().await;
        }
        // ...a second is refused at once.
        assert!(l.wait_slot(slots.clone(), Some(1)).await.is_none());
        assert!(l.wait_slot(slots, Some(0)).await.is_none());
        drop(first);
        assert!(waiter.await.expect("join"));
        assert_eq!(l.count(Counter::Pending), 0);
    }

    #[test]
    fn a_changed_max_connections_makes_new_slots() {
        let l = Arc::new(ClusterLimits::default());
        let _held = l.try_slot(1).expect("free");
        assert!(l.try_slot(1).is_err());
        let _more = l.try_slot(2).expect("the new limit starts empty");
        let _again = l.try_slot(2).expect("two under the new limit");
        assert!(l.try_slot(2).is_err());
    }
}
