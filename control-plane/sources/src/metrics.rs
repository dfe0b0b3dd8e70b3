//! The sources' Prometheus metrics, with FSM's names and labels verbatim:
//!
//! - `fsm_k8s_api_event_count{type,namespace}`: every object event a Kubernetes watch delivers,
//!   `type` as FSM's informers label it (`<kind>-added`, `<kind>-updated`, `<kind>-deleted`, kinds
//!   in FSM's words: `pod`, `endpoint`, `routegroup`, …) and `namespace` the object's (empty for
//!   cluster-scoped kinds). A relist is what an informer's resync is: objects already known are
//!   `updated`, new ones `added`, missing ones `deleted`.
//! - `fsm_events_queued`: events a source has seen and the control loop has not yet applied:
//!   raised as a source hands an event over ([`send`]), lowered by the control loop once the
//!   batch it belongs to has been applied to the proxies ([`processed`]).

use std::collections::HashSet;
use std::sync::OnceLock;

use fsm_catalog::{CatalogEvent, Kind, ObjectKey};
use prometheus::{IntCounterVec, IntGauge, Opts};
use tokio::sync::mpsc::Sender;

pub struct Metrics {
    /// `fsm_k8s_api_event_count{type,namespace}`
    pub k8s_api_event_count: IntCounterVec,
    /// `fsm_events_queued`
    pub events_queued: IntGauge,
}

/// The metrics, registered in the default registry on first use.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let metrics = Metrics {
            k8s_api_event_count: IntCounterVec::new(
                Opts::new(
                    "api_event_count",
                    "Represents the number of events received from the Kubernetes API Server",
                )
                .namespace("fsm")
                .subsystem("k8s"),
                &["type", "namespace"],
            )
            .expect("static metric options are valid"),
            events_queued: IntGauge::with_opts(
                Opts::new(
                    "events_queued",
                    "Number of events seen but not yet processed by the control plane",
                )
                .namespace("fsm"),
            )
            .expect("static metric options are valid"),
        };
        for collector in [
            Box::new(metrics.k8s_api_event_count.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(metrics.events_queued.clone()),
        ] {
            if let Err(error) = prometheus::register(collector) {
                // A clash leaves the metric counting but unexported: a defect of the build, which
                // the metrics tests catch (they read every metric back), not an operational error.
                tracing::debug!(%error, "could not register a source metric");
            }
        }
        metrics
    })
}

/// Hands `event` to the control loop, counted in `fsm_events_queued` from now until the loop
/// reports it [`processed`]. Waits for room in the channel (back-pressure); fails when the
/// control loop is gone.
pub(crate) async fn send(events: &Sender<CatalogEvent>, event: CatalogEvent) -> Result<(), ()> {
    send_counted(events, event, &metrics().events_queued).await
}

async fn send_counted(
    events: &Sender<CatalogEvent>,
    event: CatalogEvent,
    queued: &IntGauge,
) -> Result<(), ()> {
    queued.inc();
    events.send(event).await.map_err(|_| queued.dec())
}

/// The control loop has applied `count` events it received from a source.
pub fn processed(count: usize) {
    metrics().events_queued.sub(count as i64);
}

/// FSM's name of a kind in its event types (`pod-added`, `endpoint-updated`, …).
pub fn fsm_kind(kind: Kind) -> &'static str {
    match kind {
        Kind::Namespace => "namespace",
        Kind::Service => "service",
        Kind::Endpoints => "endpoint",
        Kind::EndpointSlice => "endpointslices",
        Kind::Pod => "pod",
        Kind::ServiceAccount => "serviceaccount",
        Kind::MeshConfig => "meshconfig",
        Kind::TrafficTarget => "traffictarget",
        Kind::HTTPRouteGroup => "routegroup",
        Kind::TCPRoute => "tcproute",
        Kind::TrafficSplit => "trafficsplit",
        Kind::Egress => "egress",
        Kind::EgressGateway => "egressgateway",
        Kind::IngressBackend => "ingressbackend",
        Kind::Retry => "retry",
        Kind::UpstreamTrafficSetting => "upstreamtrafficsetting",
        Kind::AccessControl => "accesscontrol",
        Kind::AccessCert => "accesscert",
        Kind::Isolation => "isolation",
    }
}

/// What an informer would have called an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    Added,
    Updated,
    Deleted,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "added",
            EventType::Updated => "updated",
            EventType::Deleted => "deleted",
        }
    }
}

/// Tells added from updated for one kind's watch, as an informer's store does: the keys of the
/// objects it holds (a name each, not the objects, which the catalog keeps), and during a relist
/// the keys listed so far.
#[derive(Debug, Default)]
pub struct EventTypes {
    known: HashSet<ObjectKey>,
    relisting: Option<HashSet<ObjectKey>>,
}

impl EventTypes {
    /// Classifies one watcher event, returning what FSM counts for it (a relist's end may count
    /// several deletions, a start or a sync marker nothing).
    pub fn classify(&mut self, event: &CatalogEvent) -> Vec<(EventType, ObjectKey)> {
        match event {
            CatalogEvent::Init(_) => {
                self.relisting = Some(HashSet::new());
                Vec::new()
            }
            CatalogEvent::InitApply(object) => {
                let key = object.key();
                let kind = if self.known.contains(&key) {
                    EventType::Updated
                } else {
                    EventType::Added
                };
                self.relisting
                    .get_or_insert_with(HashSet::new)
                    .insert(key.clone());
                vec![(kind, key)]
            }
            CatalogEvent::InitDone(_) => {
                let listed = self.relisting.take().unwrap_or_default();
                let gone: Vec<(EventType, ObjectKey)> = self
                    .known
                    .iter()
                    .filter(|k| !listed.contains(*k))
                    .map(|k| (EventType::Deleted, k.clone()))
                    .collect();
                self.known = listed;
                gone
            }
            CatalogEvent::Apply(object) => {
                let key = object.key();
                let kind = if self.known.insert(key.clone()) {
                    EventType::Added
                } else {
                    EventType::Updated
                };
                vec![(kind, key)]
            }
            CatalogEvent::Delete(key) => {
                self.known.remove(key);
                vec![(EventType::Deleted, key.clone())]
            }
            CatalogEvent::Synced => Vec::new(),
        }
    }
}

/// Counts one event in `fsm_k8s_api_event_count`.
pub fn count_k8s_event(kind: EventType, key: &ObjectKey) {
    let event_type = format!("{}-{}", fsm_kind(key.kind), kind.as_str());
    metrics()
        .k8s_api_event_count
        .with_label_values(&[event_type.as_str(), key.namespace.as_str()])
        .inc();
}

#[cfg(test)]
mod tests {
    use fsm_catalog::{MeshObject, Scope};
    use k8s_openapi::api::core::v1::Pod;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn pod(name: &str) -> MeshObject {
        MeshObject::Pod(Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("demo".into()),
                ..ObjectMeta::default()
            },
            ..Pod::default()
        })
    }

    fn kinds(out: Vec<(EventType, ObjectKey)>) -> Vec<(EventType, String)> {
        out.into_iter().map(|(t, k)| (t, k.name)).collect()
    }

    #[test]
    fn added_updated_and_deleted_as_an_informer_tells_them() {
        use EventType::*;
        let mut types = EventTypes::default();
        let scope = Scope::Kind(Kind::Pod);
        assert!(types.classify(&CatalogEvent::Init(scope)).is_empty());
        assert_eq!(
            kinds(types.classify(&CatalogEvent::InitApply(pod("a")))),
            [(Added, "a".into())]
        );
        assert_eq!(
            kinds(types.classify(&CatalogEvent::InitApply(pod("b")))),
            [(Added, "b".into())]
        );
        assert!(types.classify(&CatalogEvent::InitDone(scope)).is_empty());
        assert_eq!(
            kinds(types.classify(&CatalogEvent::Apply(pod("a")))),
            [(Updated, "a".into())]
        );
        assert_eq!(
            kinds(types.classify(&CatalogEvent::Apply(pod("c")))),
            [(Added, "c".into())]
        );
        assert_eq!(
            kinds(types.classify(&CatalogEvent::Delete(pod("c").key()))),
            [(Deleted, "c".into())]
        );
        // A relist after 410 Gone: b is still there, a went while the watch was down, d is new.
        types.classify(&CatalogEvent::Init(scope));
        assert_eq!(
            kinds(types.classify(&CatalogEvent::InitApply(pod("b")))),
            [(Updated, "b".into())]
        );
        assert_eq!(
            kinds(types.classify(&CatalogEvent::InitApply(pod("d")))),
            [(Added, "d".into())]
        );
        assert_eq!(
            kinds(types.classify(&CatalogEvent::InitDone(scope))),
            [(Deleted, "a".into())]
        );
        assert!(types.classify(&CatalogEvent::Synced).is_empty());
    }

    #[test]
    fn events_are_counted_under_fsms_type_names() {
        count_k8s_event(EventType::Updated, &pod("x").key());
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&prometheus::gather())
            .expect("encode");
        assert!(
            text.contains(r#"fsm_k8s_api_event_count{namespace="demo",type="pod-updated"}"#),
            "{text}"
        );
    }

    #[tokio::test]
    async fn an_event_is_queued_from_its_send_until_it_is_received_or_refused() {
        // A gauge of its own: the manifest tests of this binary send through the global one.
        let queued = IntGauge::new("queued", "test").expect("gauge");
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        send_counted(&tx, CatalogEvent::Synced, &queued)
            .await
            .expect("open");
        assert_eq!(queued.get(), 1);
        rx.recv().await.expect("event");
        drop(rx);
        assert!(
            send_counted(&tx, CatalogEvent::Synced, &queued)
                .await
                .is_err()
        );
        assert_eq!(queued.get(), 1, "a refused event was never queued");
    }
}
