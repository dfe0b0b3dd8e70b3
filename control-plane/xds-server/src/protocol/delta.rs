//! Incremental (delta) ADS: only resources whose version differs from the client's go out, and
//! names the client has that no longer exist are listed as removed.
//!
//! Rules of the incremental protocol on top of the shared ones (`xds_protocol.rst`, "Incremental
//! xDS"):
//!
//! - Subscription changes are applied whatever the request's nonce. Envoy puts new subscriptions
//!   on its next request for the type, often an ACK of a response we have since superseded; the
//!   protocol says the nonce must not be used to reject such a request. Only the ACK or NACK of a
//!   stale-nonce request is ignored, since it refers to an older response.
//! - Every explicitly subscribed name is answered: with the resource, or, when the snapshot has no
//!   such resource, with its name in `removed_resources`, so the client knows at once instead of
//!   waiting for its initial-fetch timeout. A name is reported absent once per subscription.
//! - A name subscribed again is sent again even if unchanged (the client may have dropped it);
//!   names resumed with `initial_resource_versions` are not.
//! - A wildcard subscriber only ever sees removals of names it was sent or asked for by name.

use std::collections::BTreeMap;
use std::sync::Arc;

use fsm_cache::{Change, NameId, Resource, Snapshot, TypeSnapshot, TypeUrl, version_key};

use super::held::Held;
use super::ids::{IdSet, VersionMap};
use super::{
    DeltaRequest, Event, Nonces, Ordered, Output, ProtocolError, Response, XdsStream,
    empty_version, resolve,
};

/// The state of one delta stream.
#[derive(Debug, Default)]
pub struct DeltaStream {
    extra_types: &'static [TypeUrl],
    nonces: Nonces,
    types: BTreeMap<Ordered, TypeState>,
}

/// Names are interned ([`NameId`]) and versions kept as [`version_key`]s; what the client holds
/// is usually one shared type snapshot ([`Held`]), so a type costs a few dozen bytes however
/// many resources it has.
#[derive(Debug, Default)]
struct TypeState {
    wildcard: bool,
    names: IdSet,
    /// What the client has, name → version: seeded from its initial versions, updated when we
    /// send (optimistically: a NACK does not tell which resources the client kept).
    client: Held,
    /// Versions the client rejected, name → version, never sent again.
    nacked: VersionMap,
    /// Names subscribed by name and not answered since: each is sent, or listed as removed when
    /// the snapshot lacks it. Emptied whenever a snapshot is at hand, so it only holds names between
    /// a subscription and the first snapshot.
    unanswered: IdSet,
    last_nonce: Option<Arc<str>>,
    /// `system_version_info` of the last response, what an ACK or NACK refers to.
    sent_version: Option<Arc<str>>,
    /// The resources of the last response, parked per resource if it is NACKed; emptied by
    /// its ACK.
    in_flight: VersionMap,
    /// A fresh wildcard subscription (no initial versions) is answered even when the type is
    /// empty: Envoy holds its initialization until the first CDS/LDS response arrives.
    answer_empty: bool,
    /// The client resumed with initial versions (a reconnect, or another replica) and nothing
    /// has been answered since: if they match the snapshot, it has applied that snapshot.
    resumed: bool,
}

// === TypeState ===

impl TypeState {
    fn wants(&self, id: NameId) -> bool {
        self.wildcard || self.names.contains(id)
    }

    /// Applies a request's subscription changes. On the first request of a stream, names the
    /// client resumed with a version (`initial_resource_versions`) are not owed an answer;
    /// afterwards every subscribed name is, even one the client seemed to have.
    fn apply_subscriptions(
        &mut self,
        subscribe: Vec<String>,
        unsubscribe: Vec<String>,
        first: bool,
    ) {
        for name in subscribe {
            if name == "*" {
                self.wildcard = true;
                continue;
            }
            let id = NameId::of(&name);
            if first && self.client.contains(id) {
                self.names.insert(id);
                continue;
            }
            // Forgetting the client's version makes the resource go out again.
            self.client.remove(id);
            self.unanswered.insert(id);
            self.names.insert(id);
        }
        // Only unsubscribing takes names away from what the client may hold (and on the first
        // request, it may have resumed with versions of names it does not subscribe to). An ACK
        // changes nothing, and walking every held name for it would cost each stream the size of
        // the type on every ACK.
        let narrowed = first || !unsubscribe.is_empty();
        for name in unsubscribe {
            if name == "*" {
                self.wildcard = false;
                continue;
            }
            // A name never seen by the process is in no set of this stream.
            let Some(id) = NameId::find(&name) else {
                continue;
            };
            self.unanswered.remove(id);
            if self.names.remove(id) && self.wildcard && self.client.remove(id) {
                // The client cannot tell whether the wildcard covers a resource it held by name,
                // so it must be told: sent again if it exists, removed if not.
                self.unanswered.insert(id);
            }
        }
        // Forget what the client dropped with its unsubscriptions, so a later subscription to the
        // same name sends it again. Rejected versions stay parked: resubscribing must not bring
        // them back.
        if narrowed && !self.wildcard {
            let names = &self.names;
            self.client.retain(|id| names.contains(id));
        }
        self.names.shrink();
        self.unanswered.shrink();
    }

    fn is_new(&self, resource: &Resource) -> bool {
        let version = resource.version_key();
        self.client.version_of(resource) != Some(version)
            && self.nacked.get(resource.id()) != Some(version)
    }

    /// Whether the client, after being answered from `types`, holds exactly it: everything of
    /// it is wanted and nothing is parked (so every wanted resource was sent or already held,
    /// and every held name `types` lacks was removed).
    fn holds_all_of(&self, types: &TypeSnapshot) -> bool {
        self.nacked.is_empty()
            && (self.wildcard
                || (self.names.len() >= types.len()
                    && types.resources().all(|r| self.names.contains(r.id()))))
    }
}

// === DeltaStream ===

impl DeltaStream {
    pub fn new() -> Self {
        Self::default()
    }

    /// Also accept these type URLs before any snapshot carries them.
    pub fn with_type_urls(mut self, extra: &'static [TypeUrl]) -> Self {
        self.extra_types = extra;
        self
    }

    pub fn is_requested(&self, type_url: TypeUrl) -> bool {
        self.types.contains_key(&Ordered(type_url))
    }
}

impl XdsStream for DeltaStream {
    type Request = DeltaRequest;

    fn on_request(
        &mut self,
        request: DeltaRequest,
        snapshot: Option<&Snapshot>,
    ) -> Result<Output, ProtocolError> {
        let type_url = resolve(&request.type_url, self.extra_types, &self.types, snapshot)?;
        let key = Ordered(type_url);
        let mut out = Output {
            type_url: Some(type_url),
            ..Output::default()
        };
        let stale =
            |out: &mut Output, nonce: String| out.events.push(Event::Stale { type_url, nonce });

        let first = !self.types.contains_key(&key);
        let state = match self.types.get_mut(&key) {
            None => {
                // We never sent this type on this stream, so a nonce can only come from another
                // stream (Envoy may repeat one after reconnecting): nothing to ACK, but the
                // subscription stands.
                if !request.response_nonce.is_empty() {
                    stale(&mut out, request.response_nonce);
                }
                let wildcard =
                    request.subscribe.is_empty() || request.subscribe.iter().any(|n| n == "*");
                let client = Held::from_versions(
                    request
                        .initial_resource_versions
                        .iter()
                        .map(|(name, version)| (NameId::of(name), version_key(version)))
                        .collect::<VersionMap>(),
                );
                self.types.entry(key).or_insert(TypeState {
                    wildcard,
                    answer_empty: wildcard && client.is_empty(),
                    resumed: !client.is_empty(),
                    client,
                    ..TypeState::default()
                })
            }
            Some(state) => {
                if request.response_nonce.is_empty() {
                    // A subscription change, answering no response.
                } else if state.last_nonce.as_deref() != Some(&*request.response_nonce) {
                    // It answers a response we have superseded: its ACK or NACK says nothing
                    // about what the client now holds, but its subscription changes stand.
                    stale(&mut out, request.response_nonce);
                } else {
                    let in_flight = std::mem::take(&mut state.in_flight);
                    if let Some(version) = state.sent_version.clone() {
                        match request.error_detail {
                            Some(error) => {
                                state.nacked.extend(in_flight.iter());
                                out.events.push(Event::Nack {
                                    type_url,
                                    version,
                                    error,
                                });
                            }
                            None => out.events.push(Event::Ack { type_url, version }),
                        }
                    }
                }
                state
            }
        };
        state.apply_subscriptions(request.subscribe, request.unsubscribe, first);
        if let Some(snapshot) = snapshot {
            out.responses.extend(respond_or_confirm(
                &mut self.nonces,
                type_url,
                state,
                snapshot,
                &mut out.events,
            ));
        }
        Ok(out)
    }

    fn on_snapshot(&mut self, snapshot: &Snapshot) -> Output {
        let mut events = Vec::new();
        let responses = self
            .types
            .iter_mut()
            .filter_map(|(key, state)| {
                respond_or_confirm(&mut self.nonces, key.0, state, snapshot, &mut events)
            })
            .collect();
        Output {
            type_url: None,
            responses,
            events,
        }
    }
}

/// [`respond`], and for a resumed client that needs nothing, the ACK its matching initial
/// versions amount to, so its sync state is known without a response.
fn respond_or_confirm(
    nonces: &mut Nonces,
    type_url: TypeUrl,
    state: &mut TypeState,
    snapshot: &Snapshot,
    events: &mut Vec<Event>,
) -> Option<Response> {
    let response = respond(nonces, type_url, state, snapshot);
    if state.resumed {
        match (&response, snapshot.get(type_url)) {
            (None, Some(types)) => events.push(Event::Ack {
                type_url,
                version: types.version().clone(),
            }),
            (None, None) => return None,
            (Some(_), _) => {}
        }
        state.resumed = false;
    }
    response
}

/// The resources the client lacks or has in another version, and the names it has that are gone.
fn respond(
    nonces: &mut Nonces,
    type_url: TypeUrl,
    state: &mut TypeState,
    snapshot: &Snapshot,
) -> Option<Response> {
    let shared = snapshot.get_shared(type_url);
    if let Some(t) = shared
        && let Some(response) = respond_from_held(nonces, type_url, state, t)
    {
        return response;
    }
    let types = shared.map(|t| &**t);
    let lookup = |name: &str| types.and_then(|t| t.get(name));
    // The client holds this very type snapshot and rejected nothing: nothing of it is new.
    let unchanged = shared.is_some_and(|t| state.client.is_exactly(t)) && state.nacked.is_empty();
    let resources: Vec<Arc<Resource>> = match types {
        None => Vec::new(),
        Some(_) if unchanged => Vec::new(),
        // Explicit names are covered by the wildcard, so this sees every wanted resource once.
        Some(t) if state.wildcard => t.resources().filter(|r| state.is_new(r)).cloned().collect(),
        // Most of the type: walk it, which keeps its (name) order.
        Some(t) if 2 * state.names.len() >= t.len() => t
            .resources()
            .filter(|r| state.names.contains(r.id()) && state.is_new(r))
            .cloned()
            .collect(),
        Some(t) => {
            let mut resources: Vec<Arc<Resource>> = NameId::with_names(|names| {
                state
                    .names
                    .iter()
                    .filter_map(|id| t.get(names.str(id)))
                    .filter(|r| state.is_new(r))
                    .cloned()
                    .collect()
            });
            resources.sort_by(|a, b| a.name.cmp(&b.name));
            resources
        }
    };
    // Gone: what the client holds that no longer exists, and names it asked for that do not.
    // Only these two, so a wildcard subscriber never hears of names it does not know.
    let unanswered = std::mem::take(&mut state.unanswered);
    // A name answered with its resource exists: only the others are looked up by name (a
    // first subscription to a thousand endpoints names a thousand of them).
    let mut answered: Vec<NameId> = resources.iter().map(|r| r.id()).collect();
    answered.sort_unstable();
    let mut removed: Vec<(Arc<str>, NameId)> = NameId::with_names(|names| {
        let mut removed = Vec::new();
        state.client.absent_from(shared, names, |id, name| {
            if state.wants(id) {
                removed.push((name, id));
            }
        });
        removed.extend(
            unanswered
                .iter()
                .filter(|id| {
                    state.wants(*id)
                        && answered.binary_search(id).is_err()
                        && lookup(names.str(*id)).is_none()
                })
                .map(|id| (names.get(id), id)),
        );
        removed
    });
    removed.sort();
    removed.dedup();
    // A rejected version that is no longer current can never match again.
    if !state.nacked.is_empty() {
        NameId::with_names(|names| {
            state.nacked.retain(|id, version| {
                lookup(names.str(id)).is_some_and(|r| r.version_key() == version)
            });
        });
    }
    if resources.is_empty() && removed.is_empty() && !state.answer_empty {
        if let Some(t) = shared
            && state.holds_all_of(t)
        {
            state.client.rebase(t);
        }
        return None;
    }

    for (_, id) in &removed {
        state.client.remove(*id);
    }
    state.client.set(&resources);
    if let Some(t) = shared
        && state.holds_all_of(t)
    {
        state.client.rebase(t);
    }
    let version = types.map_or_else(empty_version, |t| t.version().clone());
    Some(sent(nonces, type_url, state, version, resources, removed))
}

/// [`respond`] for the usual case, in time proportional to what changed: the client holds
/// exactly an earlier type snapshot and owes nothing (no rejected version, no name awaiting its
/// first answer, not its first response), so what it lacks is the difference between the two
/// sets ([`TypeSnapshot::changes`]), not a look-up of every resource it holds. `None` when the
/// case does not apply; `Some(None)` when nothing is to be sent.
fn respond_from_held(
    nonces: &mut Nonces,
    type_url: TypeUrl,
    state: &mut TypeState,
    types: &Arc<TypeSnapshot>,
) -> Option<Option<Response>> {
    if !state.nacked.is_empty() || state.unanswered.len() != 0 || state.answer_empty {
        return None;
    }
    let held = state.client.exact()?.clone();
    if Arc::ptr_eq(&held, types) {
        return Some(None);
    }
    let mut resources = Vec::new();
    let mut removed = Vec::new();
    // Everything held was wanted (unsubscribing drops it from `client`), so the client ends up
    // holding all of `types` unless a resource it does not want was added.
    let mut holds_all = true;
    for change in types.changes(&held) {
        match change {
            Change::Added(r) | Change::Updated(r) => {
                if state.wants(r.id()) {
                    resources.push(r.clone());
                } else {
                    holds_all = false;
                }
            }
            Change::Removed(r) => {
                if state.wants(r.id()) {
                    removed.push((r.name.clone(), r.id()));
                }
            }
        }
    }
    if holds_all {
        state.client.rebase(types);
    } else {
        for (_, id) in &removed {
            state.client.remove(*id);
        }
        state.client.set(&resources);
    }
    if resources.is_empty() && removed.is_empty() {
        return Some(None);
    }
    let version = types.version().clone();
    Some(Some(sent(
        nonces, type_url, state, version, resources, removed,
    )))
}

/// Records a response about to go out and builds it.
fn sent(
    nonces: &mut Nonces,
    type_url: TypeUrl,
    state: &mut TypeState,
    version: Arc<str>,
    resources: Vec<Arc<Resource>>,
    removed: Vec<(Arc<str>, NameId)>,
) -> Response {
    state.in_flight = resources
        .iter()
        .map(|r| (r.id(), r.version_key()))
        .collect();
    let removed = removed.into_iter().map(|(name, _)| name).collect();
    let nonce = nonces.next();
    state.sent_version = Some(version.clone());
    state.last_nonce = Some(nonce.clone());
    state.answer_empty = false;
    Response {
        type_url,
        version,
        nonce,
        resources,
        removed,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use test_case::test_case;

    use super::super::test_support::{render, snap};
    use super::super::{CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET, short_name};
    use super::*;

    #[derive(Clone, Copy, Debug)]
    enum Nonce {
        /// A request that answers no response: first for its type, or a subscription change.
        None,
        Last,
        Stale,
    }

    #[derive(Clone, Debug)]
    enum Step {
        Req {
            ty: TypeUrl,
            subscribe: &'static str,
            unsubscribe: &'static str,
            /// `name=version` pairs; a version of `@` means the resource's version in `v1()`.
            initial: &'static str,
            nonce: Nonce,
            error: Option<&'static str>,
        },
        Snap(Snapshot),
    }

    fn initial(ty: TypeUrl, subscribe: &'static str) -> Step {
        Step::Req {
            ty,
            subscribe,
            unsubscribe: "",
            initial: "",
            nonce: Nonce::None,
            error: None,
        }
    }

    fn resume(ty: TypeUrl, subscribe: &'static str, initial: &'static str) -> Step {
        Step::Req {
            ty,
            subscribe,
            unsubscribe: "",
            initial,
            nonce: Nonce::None,
            error: None,
        }
    }

    fn ack(ty: TypeUrl) -> Step {
        Step::Req {
            ty,
            subscribe: "",
            unsubscribe: "",
            initial: "",
            nonce: Nonce::Last,
            error: None,
        }
    }

    fn nack(ty: TypeUrl) -> Step {
        Step::Req {
            ty,
            subscribe: "",
            unsubscribe: "",
            initial: "",
            nonce: Nonce::Last,
            error: Some("rejected"),
        }
    }

    /// A subscription change, answering no response (as Envoy sends them).
    fn change(ty: TypeUrl, subscribe: &'static str, unsubscribe: &'static str) -> Step {
        Step::Req {
            ty,
            subscribe,
            unsubscribe,
            initial: "",
            nonce: Nonce::None,
            error: None,
        }
    }

    /// A request answering a superseded response, e.g. an ACK overtaken by a newer response,
    /// carrying subscriptions as Envoy's ACKs do.
    fn stale(ty: TypeUrl, subscribe: &'static str) -> Step {
        stale_change(ty, subscribe, "")
    }

    fn stale_change(ty: TypeUrl, subscribe: &'static str, unsubscribe: &'static str) -> Step {
        Step::Req {
            ty,
            subscribe,
            unsubscribe,
            initial: "",
            nonce: Nonce::Stale,
            error: None,
        }
    }

    fn stale_nack(ty: TypeUrl) -> Step {
        Step::Req {
            ty,
            subscribe: "",
            unsubscribe: "",
            initial: "",
            nonce: Nonce::Stale,
            error: Some("rejected"),
        }
    }

    fn run(script: Vec<(Step, &str)>) {
        let mut stream = DeltaStream::new();
        let mut snapshot: Option<Snapshot> = None;
        let mut last_nonce: BTreeMap<TypeUrl, Arc<str>> = BTreeMap::new();
        let mut nonces = BTreeSet::new();
        for (i, (step, expected)) in script.into_iter().enumerate() {
            let (out, current) = match step {
                Step::Req {
                    ty,
                    subscribe,
                    unsubscribe,
                    initial,
                    nonce,
                    error,
                } => {
                    let split =
                        |s: &str| s.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
                    let initial_resource_versions = initial
                        .split_whitespace()
                        .filter_map(|pair| pair.split_once('='))
                        .map(|(name, version)| {
                            let version = match version {
                                "@" => v1()
                                    .get(ty)
                                    .and_then(|t| t.get(name))
                                    .map(|r| r.version.to_string()),
                                other => Some(other.to_owned()),
                            };
                            (name.to_owned(), version.unwrap_or_default())
                        })
                        .collect();
                    let response_nonce = match nonce {
                        Nonce::None => String::new(),
                        Nonce::Last => last_nonce
                            .get(ty)
                            .map(|n| n.to_string())
                            .unwrap_or_default(),
                        Nonce::Stale => "stale".into(),
                    };
                    let request = DeltaRequest {
                        type_url: ty.to_owned(),
                        subscribe: split(subscribe),
                        unsubscribe: split(unsubscribe),
                        initial_resource_versions,
                        response_nonce,
                        error_detail: error.map(str::to_owned),
                    };
                    (
                        stream
                            .on_request(request, snapshot.as_ref())
                            .expect("known type"),
                        snapshot.clone(),
                    )
                }
                Step::Snap(new) => {
                    let out = stream.on_snapshot(&new);
                    snapshot = Some(new);
                    (out, snapshot.clone())
                }
            };
            for r in &out.responses {
                assert!(
                    stream.is_requested(r.type_url),
                    "step {i}: {} sent unrequested",
                    short_name(r.type_url)
                );
                let current = current.as_ref().and_then(|s| s.get(r.type_url));
                assert_eq!(
                    r.version,
                    current.map_or_else(empty_version, |t| t.version().clone()),
                    "step {i}"
                );
                assert!(
                    nonces.insert(r.nonce.clone()),
                    "step {i}: nonce {} reused",
                    r.nonce
                );
                last_nonce.insert(r.type_url, r.nonce.clone());
            }
            assert_eq!(render(&out), expected, "step {i}");
        }
    }

    fn v1() -> Snapshot {
        snap(&[
            (CLUSTER, &[("c1", "1"), ("c2", "1")]),
            (ENDPOINT, &[("c1", "1"), ("c2", "1")]),
        ])
    }

    fn all_types(body: &'static str) -> Snapshot {
        snap(&[
            (SECRET, &[("s", body)]),
            (ROUTE, &[("r", body)]),
            ("type.example/b", &[("b", body)]),
            (LISTENER, &[("l", body)]),
            ("type.example/a", &[("a", body)]),
            (ENDPOINT, &[("e", body)]),
            (CLUSTER, &[("c", body)]),
        ])
    }

    #[test_case(vec![
        (Step::Snap(v1()), ""),
        (initial(CLUSTER, ""), "CDS[c1,c2]"),
        (ack(CLUSTER), "ack CDS"),
        (Step::Snap(v1()), ""),
        (Step::Snap(snap(&[(CLUSTER, &[("c1", "2"), ("c2", "1")])])), "CDS[c1]"),
    ] ; "wildcard sends only what changed")]
    #[test_case(vec![
        (initial(CLUSTER, "*"), ""),
        (Step::Snap(v1()), "CDS[c1,c2]"),
    ] ; "star is wildcard and waits for the first snapshot")]
    #[test_case(vec![
        (Step::Snap(v1()), ""),
        (initial(LISTENER, ""), "LDS[]"),
        (ack(LISTENER), "ack LDS"),
        (Step::Snap(v1()), ""),
        (Step::Snap(snap(&[(LISTENER, &[("l", "1")])])), "LDS[l]"),
    ] ; "a fresh wildcard on an empty type gets one empty answer")]
    #[test_case(vec![
        (initial(LISTENER, ""), ""),
        (Step::Snap(v1()), "LDS[]"),
        (Step::Snap(snap(&[(CLUSTER, &[("c1", "1")])])), ""),
    ] ; "the empty answer waits for the first snapshot")]
    #[test_case(vec![
        (Step::Snap(v1()), ""),
        (resume(LISTENER, "", "l=old"), "LDS[] -[l]"),
        (Step::Snap(v1()), ""),
    ] ; "a resumed wildcard is only answered on difference")]
    #[test_case(vec![
        (Step::Snap(v1()), ""),
        (initial(SECRET, "s"), "SDS[] -[s]"),
        (Step::Snap(snap(&[(CLUSTER, &[("c1", "2")])])), ""),
        (Step::Snap(snap(&[(SECRET, &[("s", "1")])])), "SDS[s]"),
    ] ; "a name missing from an empty type is answered as removed once")]
    #[test_case(vec![
        (Step::Snap(v1()), ""),
        (initial(CLUSTER, ""), "CDS[c1,c2]"),
        (Step::Snap(snap(&[(CLUSTER, &[("c2", "1"), ("c3", "1")])])), "CDS[c3] -[c1]"),
        (Step::Snap(snap(&[(ENDPOINT, &[("c1", "1")])])), "CDS[] -[c2,c3]"),
        (Step::Snap(snap(&[(ENDPOINT, &[("c1", "2")])])), ""),
    ] ; "removals of resources and of the whole type")]
    #[test_case(vec![
        (Step::Snap(v1()), ""),
        (resume(CLUSTER, "", "c1=@ c2=@"), "ack CDS"),
        (Step::Snap(snap(&[(CLUSTER, &[("c1", "1"), ("c2", "2")])])), "CDS[c2]"),
    ] ; "initial versions that match are an ACK and send nothing")]
    #[test_case(vec![
        (Step::Snap(v1()), ""),
        (resume(CLUSTER, "", "c1=@ c2=old gone=old"), "CDS[c2] -[gone]"),
    ] ; "initial versions that differ resend and remove")]
    #[test_case(vec![
        (resume(ENDPOINT, "c1", "c1=@ c2=@"), ""),
        (Step::Snap(v1()), "ack EDS"),
        (Step::Snap(v1()), ""),
    ] ; "initial versions before the first snapshot are confirmed when it arrives")]
    #[test_case(vec![
        (Step::Snap(v1()), ""),
        (initial(ENDPOINT, "c1 missing"), "EDS[c1] -[missing]"),
        (ack(ENDPOINT), "ack EDS"),
        (Step::Snap(snap(&[(ENDPOINT, &[("c1", "1"), ("c2", "2")])])), ""),
        (Step::Snap(snap(&[(ENDPOINT, &[("c1", "1"), ("missing", "1")])])), "EDS[missing]"),
        (Step::Snap(snap(&[(ENDPOINT, &[("c2", "2")])])), "EDS[] -[c1,missing]"),
    ] ; "explicit names only see their names")]
    #[test_case(vec![
        (Step::Snap(v1()), ""),
        (initial(ENDPOINT, "c1"), "EDS[c1]"),
        (change(ENDPOINT, "c2", ""), "EDS[c2]"),
        (change(ENDPOINT, "", "c1"), ""),
        (Step::Snap(snap(&[(ENDPOINT, &[("c1", "2"), ("c2", "1")])])), ""),
        (change(ENDPOINT, "c1", ""), "EDS[c1]"),
    ] ; "subscribe and unsubscribe")]
    #[test_case(vec![
        (Step::Snap(v1()), ""),
        (initial(ENDPOINT, "c1"), "EDS[c1]"),
        (change(ENDPOINT, "*", ""), "EDS[c2]"),
        (change(ENDPOINT, "", "*"), ""),
        (Step::Snap(snap(&[(ENDPOINT, &[("c1", "2"), ("c2", "2")])])), "EDS[c1]"),
    ] ; "switching to and from wildcard")]
    #[test_case(vec![
        (Step::Snap(v1()), ""),
        (initial(CLUSTER, ""), "CDS[c1,c2]"),
        (ack(CLUSTER), "ack CDS"),
        (Step::Snap(snap(&[(CLUSTER, &[("c1", "2"), ("c2", "2")])])), "CDS[c1,c2]"),
        (nack(CLUSTER), "nack CDS"),
        (Step::Snap(snap(&[(CLUSTER, &[("c1", "2"), ("c2", "2"), ("c3", "1")])])), "CDS[c3]"),
        (Step::Snap(snap(&[(CLUSTER, &[("c1", "3"), ("c2", "2"), ("c3", "1")])])), "CDS[c1]"),
        (ack(CLUSTER), "ack CDS"),
    ] ; "nack parks the rejected versions")]
    #[test_case(vec![
        (Step::Snap(v1()), ""),
        (initial(ENDPOINT, "c1"), "EDS[c1]"),
        (Step::Snap(snap(&[(ENDPOINT, &[("c1", "2")])])), "EDS[c1]"),
        (nack(ENDPOINT), "nack EDS"),
        (change(ENDPOINT, "", "c1"), ""),
        (change(ENDPOINT, "c1", ""), ""),
        (Step::Snap(snap(&[(ENDPOINT, &[("c1", "3")])])), "EDS[c1]"),
    ] ; "a rejected version stays parked across resubscription")]
    #[test_case(vec![
        (Step::Snap(v1()), ""),
        (initial(CLUSTER, ""), "CDS[c1,c2]"),
        (Step::Snap(snap(&[(CLUSTER, &[("c1", "2"), ("c2", "1")])])), "CDS[c1]"),
        (stale(CLUSTER, ""), "stale CDS"),
        (ack(CLUSTER), "ack CDS"),
    ] ; "a stale ACK is ignored")]
    #[test_case(vec![
        (Step::Snap(v1()), ""),
        (initial(ENDPOINT, "c1"), "EDS[c1]"),
        (Step::Snap(snap(&[(ENDPOINT, &[("c1", "2"), ("c2", "1")])])), "EDS[c1]"),
        (stale(ENDPOINT, "c2 missing"), "stale EDS; EDS[c2] -[missing]"),
        (ack(ENDPOINT), "ack EDS"),
        (Step::Snap(snap(&[(ENDPOINT, &[("c1", "2"), ("c2", "2")])])), "EDS[c2]"),
    ] ; "subscriptions on a stale ACK are applied and answered")]
    #[test_case(vec![
        (Step::Snap(v1()), ""),
        (initial(ENDPOINT, "c1 c2"), "EDS[c1,c2]"),
        (Step::Snap(snap(&[(ENDPOINT, &[("c1", "2"), ("c2", "1")])])), "EDS[c1]"),
        (stale_change(ENDPOINT, "", "c2"), "stale EDS"),
        (Step::Snap(snap(&[(ENDPOINT, &[("c1", "2"), ("c2", "2")])])), ""),
    ] ; "unsubscriptions on a stale ACK are applied")]
    #[test_case(vec![
        (Step::Snap(v1()), ""),
        (initial(ENDPOINT, "c1"), "EDS[c1]"),
        (Step::Snap(snap(&[(ENDPOINT, &[("c1", "2")])])), "EDS[c1]"),
        (stale_nack(ENDPOINT), "stale EDS"),
        (Step::Snap(snap(&[(ENDPOINT, &[("c1", "2"), ("c2", "1")])])), ""),
        (change(ENDPOINT, "", "c1"), ""),
        (change(ENDPOINT, "c1", ""), "EDS[c1]"),
    ] ; "a stale NACK parks nothing")]
    #[test_case(vec![
        (Step::Snap(v1()), ""),
        (stale(ENDPOINT, "c1 missing"), "stale EDS; EDS[c1] -[missing]"),
        (ack(ENDPOINT), "ack EDS"),
    ] ; "a first request with a nonce from another stream still subscribes")]
    #[test_case(vec![
        (initial(ENDPOINT, "c1 missing"), ""),
        (Step::Snap(v1()), "EDS[c1] -[missing]"),
        (Step::Snap(snap(&[(ENDPOINT, &[("c1", "2")])])), "EDS[c1]"),
    ] ; "names missing before the first snapshot are answered when it arrives")]
    #[test_case(vec![
        (Step::Snap(v1()), ""),
        (initial(ENDPOINT, "c1 missing"), "EDS[c1] -[missing]"),
        (change(ENDPOINT, "", "missing"), ""),
        (change(ENDPOINT, "missing", ""), "EDS[] -[missing]"),
        (change(ENDPOINT, "c1", ""), "EDS[c1]"),
    ] ; "a name subscribed again is answered again")]
    #[test_case(vec![
        (Step::Snap(v1()), ""),
        (resume(ENDPOINT, "c1 c2 missing", "c1=@"), "EDS[c2] -[missing]"),
    ] ; "a resumed name is not resent but new and missing names are answered")]
    #[test_case(vec![
        (Step::Snap(v1()), ""),
        (initial(CLUSTER, ""), "CDS[c1,c2]"),
        (Step::Snap(snap(&[(CLUSTER, &[("c1", "1")])])), "CDS[] -[c2]"),
        (change(CLUSTER, "", "c3"), ""),
        (Step::Snap(snap(&[(ENDPOINT, &[("c1", "1")])])), "CDS[] -[c1]"),
        (Step::Snap(snap(&[(ENDPOINT, &[("c1", "2")])])), ""),
    ] ; "a wildcard subscriber hears only of removals of what it was sent")]
    #[test_case(vec![
        (Step::Snap(v1()), ""),
        (initial(CLUSTER, "* c1 x"), "CDS[c1,c2] -[x]"),
        (change(CLUSTER, "", "c1"), "CDS[c1]"),
        (change(CLUSTER, "", "x"), ""),
        (change(CLUSTER, "c2", ""), "CDS[c2]"),
        (Step::Snap(snap(&[(CLUSTER, &[("c1", "1")])])), "CDS[] -[c2]"),
        (change(CLUSTER, "", "c2"), ""),
    ] ; "wildcard with names: unsubscribing a held name answers it again")]
    #[test_case(vec![
        (Step::Snap(all_types("1")), ""),
        (initial("type.example/b", ""), "b[b]"),
        (initial(SECRET, "s"), "SDS[s]"),
        (initial(ROUTE, "r"), "RDS[r]"),
        (initial(ENDPOINT, "e"), "EDS[e]"),
        (initial("type.example/a", ""), "a[a]"),
        (initial(LISTENER, ""), "LDS[l]"),
        (initial(CLUSTER, ""), "CDS[c]"),
        (Step::Snap(all_types("2")), "CDS[c]; EDS[e]; LDS[l]; RDS[r]; SDS[s]; a[a]; b[b]"),
    ] ; "one change to several types goes out in order")]
    fn delta(script: Vec<(Step, &str)>) {
        run(script);
    }

    #[test]
    fn versions_in_events_and_responses() {
        let mut stream = DeltaStream::new();
        let s1 = v1();
        let request = DeltaRequest {
            type_url: CLUSTER.into(),
            ..DeltaRequest::default()
        };
        let out = stream.on_request(request, Some(&s1)).expect("known");
        let sent = &out.responses[0];
        assert_eq!(
            &sent.version,
            s1.get(CLUSTER).expect("cds").version(),
            "system version = type version"
        );
        let c1 = s1.get(CLUSTER).and_then(|t| t.get("c1")).expect("c1");
        assert_eq!(
            sent.resources[0].version, c1.version,
            "each resource keeps its own version"
        );
        let nack = DeltaRequest {
            type_url: CLUSTER.into(),
            response_nonce: sent.nonce.to_string(),
            error_detail: Some("bad".into()),
            ..DeltaRequest::default()
        };
        let out2 = stream.on_request(nack, Some(&s1)).expect("known");
        assert_eq!(
            out2.events,
            vec![Event::Nack {
                type_url: CLUSTER,
                version: sent.version.clone(),
                error: "bad".into()
            }]
        );
    }

    #[test]
    fn unknown_type_is_an_error() {
        let mut stream = DeltaStream::new();
        let request = DeltaRequest {
            type_url: "type.example/unknown".into(),
            ..DeltaRequest::default()
        };
        assert!(matches!(
            stream.on_request(request, Some(&v1())),
            Err(ProtocolError::UnknownType(_))
        ));
        assert!(!stream.is_requested("type.example/unknown"));
    }
}

/// Properties over arbitrary interleavings of snapshot changes and requests with fresh, absent or
/// stale nonces, checked against a model of the client (what Envoy holds and still waits for).
#[cfg(test)]
mod properties {
    use std::collections::BTreeSet;

    use fsm_cache::TypeSnapshot;

    use proptest::prelude::*;

    use super::super::ENDPOINT;
    use super::*;

    const NAMES: [&str; 4] = ["a", "b", "c", "d"];

    #[derive(Clone, Copy, Debug)]
    enum Nonce {
        /// A subscription change answering nothing.
        None,
        /// An ACK of the latest response.
        Last,
        /// An ACK of a superseded response, or a nonce from another stream.
        Stale,
        /// A NACK of a superseded response: must not park anything.
        StaleNack,
    }

    #[derive(Clone, Debug)]
    enum Op {
        /// A new snapshot: per name, absent or present with one of two bodies.
        Snap([Option<bool>; 4]),
        /// Bit masks over [`NAMES`]; a name in both only subscribes.
        Req {
            subscribe: u8,
            unsubscribe: u8,
            nonce: Nonce,
        },
        /// The client reconnects on a new stream, resuming with what it holds
        /// (`initial_resource_versions`) and its subscriptions.
        Reconnect,
        /// The controller publishes a new snapshot sharing the type's set with the current one
        /// (another type changed): nothing is owed.
        Republish,
    }

    fn op() -> impl Strategy<Value = Op> {
        let nonce = prop_oneof![
            Just(Nonce::None),
            Just(Nonce::Last),
            Just(Nonce::Stale),
            Just(Nonce::StaleNack)
        ];
        prop_oneof![
            proptest::array::uniform4(proptest::option::of(any::<bool>())).prop_map(Op::Snap),
            (0u8..16, 0u8..16, nonce).prop_map(|(subscribe, unsubscribe, nonce)| Op::Req {
                subscribe,
                unsubscribe: unsubscribe & !subscribe,
                nonce,
            }),
            Just(Op::Reconnect),
            Just(Op::Republish),
        ]
    }

    fn snapshot(present: [Option<bool>; 4]) -> Snapshot {
        let resources = NAMES
            .iter()
            .zip(present)
            .filter_map(|(name, body)| {
                body.map(|b| Resource::new(*name, if b { &b"one"[..] } else { &b"two"[..] }))
            })
            .collect();
        Snapshot::new([(ENDPOINT, resources)])
    }

    fn names(mask: u8) -> Vec<String> {
        NAMES
            .iter()
            .enumerate()
            .filter(|(i, _)| mask & (1 << i) != 0)
            .map(|(_, n)| (*n).to_owned())
            .collect()
    }

    /// The client: what it holds, what it asked for and what it still waits to hear about.
    #[derive(Debug, Default)]
    struct Client {
        wildcard: bool,
        subscribed: BTreeSet<String>,
        holds: BTreeMap<String, Arc<str>>,
        /// Asked for (or made ambiguous by an unsubscription under a wildcard) and not answered.
        waiting: BTreeSet<String>,
        nonces: Vec<Arc<str>>,
    }

    impl Client {
        fn request(&mut self, subscribe: u8, unsubscribe: u8, nonce: Nonce) -> DeltaRequest {
            let (subscribe, unsubscribe) = (names(subscribe), names(unsubscribe));
            for name in &subscribe {
                self.subscribed.insert(name.clone());
                self.waiting.insert(name.clone());
            }
            for name in &unsubscribe {
                self.waiting.remove(name);
                if self.subscribed.remove(name) && self.wildcard && self.holds.contains_key(name) {
                    // Envoy keeps it as "ambiguous" until the server says whether the wildcard
                    // covers it.
                    self.waiting.insert(name.clone());
                } else if !self.wildcard {
                    self.holds.remove(name);
                }
            }
            let response_nonce = match nonce {
                Nonce::None => String::new(),
                Nonce::Last => self
                    .nonces
                    .last()
                    .map(|n| n.to_string())
                    .unwrap_or_default(),
                // The response before the latest, or a nonce this stream never sent.
                Nonce::Stale | Nonce::StaleNack => match self.nonces.len() {
                    0 | 1 => "other-stream".to_owned(),
                    n => self.nonces[n - 2].to_string(),
                },
            };
            DeltaRequest {
                type_url: ENDPOINT.to_owned(),
                subscribe,
                unsubscribe,
                initial_resource_versions: BTreeMap::new(),
                response_nonce,
                error_detail: matches!(nonce, Nonce::StaleNack).then(|| "rejected".to_owned()),
            }
        }

        /// The first request on a new stream: what Envoy sends after a reconnect. Names it holds
        /// are not owed an answer; the others it subscribed to are.
        fn resume(&mut self) -> DeltaRequest {
            self.nonces.clear();
            self.waiting = self
                .subscribed
                .iter()
                .filter(|n| !self.holds.contains_key(*n))
                .cloned()
                .collect();
            let wildcard = self.wildcard.then(|| "*".to_owned());
            DeltaRequest {
                type_url: ENDPOINT.to_owned(),
                subscribe: wildcard
                    .into_iter()
                    .chain(self.subscribed.iter().cloned())
                    .collect(),
                initial_resource_versions: self
                    .holds
                    .iter()
                    .map(|(n, v)| (n.clone(), v.to_string()))
                    .collect(),
                ..DeltaRequest::default()
            }
        }

        /// Nothing the client resumed with in its current version may be sent again.
        fn check_resumed(&self, out: &Output) -> Result<(), String> {
            for resource in out.responses.iter().flat_map(|r| &r.resources) {
                if self.holds.get(&*resource.name) == Some(&resource.version) {
                    return Err(format!(
                        "{} resent after a resume that held it",
                        resource.name
                    ));
                }
            }
            Ok(())
        }

        /// Takes in the responses, checking each against the snapshot they were built from.
        fn receive(&mut self, out: &Output, snapshot: Option<&Snapshot>) -> Result<(), String> {
            let current = snapshot.and_then(|s| s.get(ENDPOINT));
            for response in &out.responses {
                for resource in &response.resources {
                    let name = resource.name.to_string();
                    if !self.wildcard && !self.subscribed.contains(&name) {
                        return Err(format!("{name} sent but not subscribed"));
                    }
                    if current.and_then(|t| t.get(&name)).map(|r| &r.version)
                        != Some(&resource.version)
                    {
                        return Err(format!("{name} sent in a version the snapshot lacks"));
                    }
                    self.waiting.remove(&name);
                    self.holds.insert(name, resource.version.clone());
                }
                for name in response.removed.iter().map(|n| n.to_string()) {
                    if current.and_then(|t| t.get(&name)).is_some() {
                        return Err(format!("{name} removed but exists"));
                    }
                    if !self.holds.contains_key(&name) && !self.waiting.contains(&name) {
                        return Err(format!(
                            "{name} removed, but the client neither holds nor waits for it"
                        ));
                    }
                    self.waiting.remove(&name);
                    self.holds.remove(&name);
                }
                self.nonces.push(response.nonce.clone());
            }
            Ok(())
        }

        /// After any interleaving: every subscribed name is held in the snapshot's version or
        /// was reported absent, nothing else is held, and nothing is still awaited.
        fn settled(&self, snapshot: &Snapshot) -> Result<(), String> {
            let current = snapshot.get(ENDPOINT);
            let wanted: BTreeMap<String, Arc<str>> = current
                .into_iter()
                .flat_map(TypeSnapshot::resources)
                .filter(|r| self.wildcard || self.subscribed.contains(&*r.name))
                .map(|r| (r.name.to_string(), r.version.clone()))
                .collect();
            if self.holds != wanted {
                return Err(format!("holds {:?}, want {wanted:?}", self.holds));
            }
            if !self.waiting.is_empty() {
                return Err(format!("still waiting for {:?}", self.waiting));
            }
            Ok(())
        }
    }

    fn run(
        wildcard: bool,
        first: u8,
        start: [Option<bool>; 4],
        ops: Vec<Op>,
    ) -> Result<(), String> {
        let mut stream = DeltaStream::new();
        let mut client = Client {
            wildcard,
            ..Client::default()
        };
        let mut snapshot = snapshot(start);
        stream.on_snapshot(&snapshot);
        // The wildcard stream starts the legacy way (no names); the other names at least one.
        let first = if wildcard { 0 } else { first.max(1) };
        let request = client.request(first, 0, Nonce::None);
        let out = stream
            .on_request(request, Some(&snapshot))
            .map_err(|e| e.to_string())?;
        client.receive(&out, Some(&snapshot))?;
        for op in ops {
            let out = match op {
                Op::Snap(present) => {
                    snapshot = self::snapshot(present);
                    stream.on_snapshot(&snapshot)
                }
                Op::Req {
                    subscribe,
                    unsubscribe,
                    nonce,
                } => {
                    let request = client.request(subscribe, unsubscribe, nonce);
                    stream
                        .on_request(request, Some(&snapshot))
                        .map_err(|e| e.to_string())?
                }
                // With no names, Envoy has nothing to ask for on a new stream (an empty first
                // request would mean wildcard).
                Op::Republish => {
                    snapshot = Snapshot::from_types(snapshot.types().map(|(t, s)| (t, s.clone())));
                    let out = stream.on_snapshot(&snapshot);
                    if !out.responses.is_empty() {
                        return Err(format!("{out:?} sent for an unchanged type"));
                    }
                    out
                }
                Op::Reconnect if !client.wildcard && client.subscribed.is_empty() => {
                    Output::default()
                }
                Op::Reconnect => {
                    stream = DeltaStream::new();
                    let request = client.resume();
                    let out = stream
                        .on_request(request, Some(&snapshot))
                        .map_err(|e| e.to_string())?;
                    client.check_resumed(&out)?;
                    out
                }
            };
            client.receive(&out, Some(&snapshot))?;
        }
        client.settled(&snapshot)
    }

    proptest! {
        #[test]
        fn named_subscriptions_are_always_answered(
            first in 0u8..16,
            start in proptest::array::uniform4(proptest::option::of(any::<bool>())),
            ops in proptest::collection::vec(op(), 0..40),
        ) {
            if let Err(error) = run(false, first, start, ops) {
                return Err(TestCaseError::fail(error));
            }
        }

        #[test]
        fn wildcard_subscribers_get_everything_and_no_stray_removals(
            start in proptest::array::uniform4(proptest::option::of(any::<bool>())),
            ops in proptest::collection::vec(op(), 0..40),
        ) {
            if let Err(error) = run(true, 0, start, ops) {
                return Err(TestCaseError::fail(error));
            }
        }
    }
}
