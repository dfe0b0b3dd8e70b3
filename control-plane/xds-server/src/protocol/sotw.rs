//! State-of-the-world ADS: a response carries the full subscribed set of its type, except that
//! an update of endpoints, routes or secrets carries only the resources that changed, and the
//! resources of names the proxy added to its subscription.
//!
//! The protocol allows it for every type but Listener and Cluster (`xds_protocol.rst`, "Grouping
//! Resources into Responses": the other types "are grouped into responses in the same way as in
//! the incremental protocol variants"), and Envoy applies such a response to just the watches
//! of the resources it carries (its `GrpcMuxImpl` calls a named watch only with the resources
//! found for it). It matters at scale: one endpoint change would otherwise send every proxy
//! every ClusterLoadAssignment of the mesh again, and a proxy that references one more secret
//! (its listeners' root after its clusters' thousand) every secret again.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use fsm_cache::{Change, NameId, Resource, Snapshot, TypeSnapshot, TypeUrl};

use super::{
    ENDPOINT, Event, Nonces, Ordered, Output, ProtocolError, ROUTE, ResourceNames, Response,
    SECRET, SotwRequest, XdsStream, empty_version, resolve,
};

/// Types whose updates carry only what changed (see the module documentation). Envoy's only:
/// other data planes are sent whole sets.
const UPDATED_IN_PART: [TypeUrl; 3] = [ENDPOINT, ROUTE, SECRET];

/// The state of one state-of-the-world stream.
#[derive(Debug, Default)]
pub struct SotwStream {
    extra_types: &'static [TypeUrl],
    nonces: Nonces,
    types: BTreeMap<Ordered, TypeState>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Subscription {
    Wildcard,
    /// Interned names in name order (the order responses list them in, so a subscription to
    /// every resource of a type is labelled with the type's version): 4 bytes per name.
    Names(Box<[NameId]>),
}

#[derive(Debug)]
struct TypeState {
    subscription: Subscription,
    last_nonce: Option<Arc<str>>,
    /// The version the proxy has or is being sent: our last response, or on a fresh stream the
    /// version the proxy reported (so a reconnect does not resend what it already has).
    sent_version: Option<Arc<str>>,
    /// The last NACKed version, never sent again.
    parked: Option<Arc<str>>,
    /// The type snapshot this subscription was last answered from: the same shared set again
    /// (a snapshot change in another type) has nothing new, found without looking at its names.
    seen: Option<Arc<TypeSnapshot>>,
    /// The [`TypeSnapshot::names_key`] of a set whose names are exactly this subscription's:
    /// a later set with the same key is answered whole (its version and shared section)
    /// without looking up each name, the common case of Envoy's EDS after an endpoint change.
    covers: Option<u64>,
    /// A hash of the names of the last request, in its order: Envoy repeats its list with every
    /// ACK (a thousand names for a thousand clusters), so an unchanged list is recognised by it
    /// without interning and sorting every name again.
    names_digest: u64,
    /// Names the proxy added to its subscription since it was last answered: the next answer
    /// carries their resources (beside what changed, for a type updated in part).
    fresh: Vec<NameId>,
    /// Names among `fresh` that the set did not have when last answered: answered when it has.
    missing: Vec<NameId>,
    /// The last response carried part of its set.
    sent_in_part: bool,
    /// The proxy rejected the last response: the next goes out whole.
    rejected: bool,
}

// === Subscription ===

impl Subscription {
    /// Empty names mean wildcard on a type's first request and keep a wildcard one wildcard;
    /// after explicit names they mean "none" (Envoy's EDS/RDS with nothing left to watch).
    fn from_names(names: &ResourceNames, previous: Option<&Subscription>) -> Self {
        let names: BTreeSet<Cow<'_, str>> = names.strs().collect();
        if names.contains("*") {
            return Subscription::Wildcard;
        }
        match previous {
            None | Some(Subscription::Wildcard) if names.is_empty() => Subscription::Wildcard,
            _ => Subscription::Names(names.iter().map(|name| NameId::of(name)).collect()),
        }
    }
}

// === SotwStream ===

impl SotwStream {
    pub fn new() -> Self {
        Self::default()
    }

    /// Also accept these type URLs before any snapshot carries them (native data-plane types a
    /// proxy may ask for before its first snapshot exists).
    pub fn with_type_urls(mut self, extra: &'static [TypeUrl]) -> Self {
        self.extra_types = extra;
        self
    }

    /// Whether `type_url` has been requested on this stream.
    pub fn is_requested(&self, type_url: TypeUrl) -> bool {
        self.types.contains_key(&Ordered(type_url))
    }
}

impl XdsStream for SotwStream {
    type Request = SotwRequest;

    fn on_request(
        &mut self,
        request: SotwRequest,
        snapshot: Option<&Snapshot>,
    ) -> Result<Output, ProtocolError> {
        let type_url = resolve(&request.type_url, self.extra_types, &self.types, snapshot)?;
        let key = Ordered(type_url);
        let mut out = Output {
            type_url: Some(type_url),
            ..Output::default()
        };

        if request.response_nonce.is_empty()
            && self.types.get(&key).is_some_and(|s| s.last_nonce.is_some())
        {
            // No response seen yet, though one went out on this stream: the proxy changed its
            // subscription before our answer arrived (Envoy names its listeners' secrets while
            // the answer for its clusters' is on the way). As for any stale request, its names
            // come again with the ACK of that answer, which then only adds to it; answering now
            // would send the whole set a second time.
            out.events.push(Event::Stale {
                type_url,
                nonce: request.response_nonce,
            });
            return Ok(out);
        }
        if request.response_nonce.is_empty() {
            // A first request (or a fresh start for the type): take the proxy's word for what it has.
            // `version_info` is the last version the proxy applied, so a proxy resuming on a new
            // stream (after a reconnect, or to another replica) has ACKed it.
            let sent_version: Option<Arc<str>> =
                (!request.version_info.is_empty()).then(|| Arc::from(request.version_info));
            if let Some(version) = &sent_version {
                out.events.push(Event::Ack {
                    type_url,
                    version: version.clone(),
                });
            }
            let subscription = Subscription::from_names(&request.resource_names, None);
            let names_digest = request.resource_names.digest();
            match self.types.get_mut(&key) {
                Some(state) => {
                    state.subscription = subscription;
                    state.covers = None;
                    state.sent_version = sent_version;
                    state.seen = None;
                    state.names_digest = names_digest;
                    state.fresh.clear();
                    state.missing.clear();
                    state.sent_in_part = false;
                    state.rejected = false;
                }
                None => {
                    self.types.insert(
                        key,
                        TypeState {
                            subscription,
                            last_nonce: None,
                            sent_version,
                            parked: None,
                            seen: None,
                            covers: None,
                            names_digest,
                            fresh: Vec::new(),
                            missing: Vec::new(),
                            sent_in_part: false,
                            rejected: false,
                        },
                    );
                }
            }
        } else {
            let Some(state) = self
                .types
                .get_mut(&key)
                .filter(|s| s.last_nonce.as_deref() == Some(&*request.response_nonce))
            else {
                out.events.push(Event::Stale {
                    type_url,
                    nonce: request.response_nonce,
                });
                return Ok(out);
            };
            match request.error_detail {
                Some(error) => {
                    if let Some(version) = state.sent_version.clone() {
                        // A whole set is never sent again once rejected. An update in part only
                        // had part of it: the set may still be sent whole (it is, next time).
                        if !state.sent_in_part {
                            state.parked = Some(version.clone());
                        }
                        state.rejected = true;
                        out.events.push(Event::Nack {
                            type_url,
                            version,
                            error,
                        });
                    }
                }
                None => out.events.push(Event::Ack {
                    type_url,
                    version: Arc::from(request.version_info),
                }),
            }
            let names_digest = request.resource_names.digest();
            if names_digest == state.names_digest {
                return Ok(out);
            }
            state.names_digest = names_digest;
            let subscription =
                Subscription::from_names(&request.resource_names, Some(&state.subscription));
            if subscription == state.subscription {
                return Ok(out);
            }
            // The proxy forgets the names it dropped and still holds the others as it was sent
            // them: for a type updated in part, the next answer carries what changed and the
            // resources of the names it added. Other types are answered whole. Either way the
            // added names must be answered, even in a version the proxy was sent before (it may
            // have dropped and named them again since).
            match added_names(&state.subscription, &subscription) {
                Some(added) => {
                    state.fresh.extend(added);
                    state.fresh.sort_unstable();
                    state.fresh.dedup();
                    if !UPDATED_IN_PART.contains(&type_url) {
                        state.seen = None;
                    }
                }
                None => {
                    // To or from a wildcard: answered whole, whatever was sent before.
                    state.seen = None;
                    state.fresh.clear();
                    state.missing.clear();
                    state.sent_version = None;
                }
            }
            state.subscription = subscription;
            state.covers = None;
        }

        if let Some(snapshot) = snapshot
            && let Some(state) = self.types.get_mut(&key)
        {
            out.responses
                .extend(respond(&mut self.nonces, type_url, state, snapshot));
        }
        Ok(out)
    }

    fn on_snapshot(&mut self, snapshot: &Snapshot) -> Output {
        let responses = self
            .types
            .iter_mut()
            .filter_map(|(key, state)| respond(&mut self.nonces, key.0, state, snapshot))
            .collect();
        Output {
            type_url: None,
            responses,
            events: Vec::new(),
        }
    }
}

/// The response for one type, if the proxy's subscription now has a version it has neither got
/// nor rejected.
fn respond(
    nonces: &mut Nonces,
    type_url: TypeUrl,
    state: &mut TypeState,
    snapshot: &Snapshot,
) -> Option<Response> {
    let shared = snapshot.get_shared(type_url);
    if shared.is_some()
        && state.fresh.is_empty()
        && let Some(seen) = &state.seen
        && shared.is_some_and(|t| Arc::ptr_eq(t, seen))
    {
        return None;
    }
    let previous = std::mem::replace(&mut state.seen, shared.cloned());
    let types = shared.map(|t| &**t);
    let mut fresh = std::mem::take(&mut state.fresh);
    if !state.missing.is_empty() {
        fresh.append(&mut state.missing);
        fresh.sort_unstable();
        fresh.dedup();
    }
    // Added names this set does not have stay to be answered when a later one has them.
    if !fresh.is_empty() {
        state.missing = NameId::with_names(|names| {
            fresh
                .iter()
                .copied()
                .filter(|id| types.is_none_or(|t| t.get(names.str(*id)).is_none()))
                .collect()
        });
    }
    let (version, resources) = match &state.subscription {
        Subscription::Wildcard => {
            let version = types.map_or_else(empty_version, |t| t.version().clone());
            if is_known(state, false, &version) {
                return None;
            }
            (
                version,
                types
                    .map(|t| t.resources().cloned().collect())
                    .unwrap_or_default(),
            )
        }
        Subscription::Names(ids) => {
            if let Some(t) = types
                && covers_exactly(&mut state.covers, ids, t)
            {
                let version = t.version().clone();
                if is_known(state, !fresh.is_empty(), &version) {
                    return None;
                }
                let resources = match previous {
                    // The proxy holds the resources of the set it was last answered from that
                    // it then named (its subscription has only grown since: `previous` is
                    // forgotten on any other change), and did not reject that answer: it lacks
                    // what changed since and the resources of the names it added.
                    Some(previous) if UPDATED_IN_PART.contains(&type_url) && !state.rejected => {
                        let mut lacking: Vec<Arc<Resource>> = t
                            .changes(&previous)
                            .into_iter()
                            .filter_map(|change| match change {
                                Change::Added(r) | Change::Updated(r) => Some(r.clone()),
                                Change::Removed(_) => None,
                            })
                            .collect();
                        NameId::with_names(|names| {
                            lacking.extend(
                                fresh.iter().filter_map(|id| t.get(names.str(*id))).cloned(),
                            );
                        });
                        lacking.sort_by(|a, b| a.name.cmp(&b.name));
                        lacking.dedup_by(|a, b| Arc::ptr_eq(a, b));
                        if lacking.is_empty() {
                            // It holds all it names as the set has them (the set lost names
                            // it does not name, or it dropped names): nothing to send.
                            return None;
                        }
                        return Some(response(nonces, type_url, state, version, lacking, true));
                    }
                    _ => t.resources().cloned().collect(),
                };
                return Some(response(nonces, type_url, state, version, resources, false));
            }
            let resources: Vec<Arc<Resource>> = types.map_or_else(Vec::new, |t| {
                NameId::with_names(|names| {
                    ids.iter()
                        .filter_map(|id| t.get(names.str(*id)))
                        .cloned()
                        .collect()
                })
            });
            let version = TypeSnapshot::version_of(resources.iter().map(|r| &**r));
            let lacks_named = !fresh.is_empty()
                && resources
                    .iter()
                    .any(|r| fresh.binary_search(&r.id()).is_ok());
            if is_known(state, lacks_named, &version) {
                return None;
            }
            // Part of the set named, updated in part as above: what changed among the named
            // resources, and those of the names added (a service removed from the mesh leaves
            // every proxy's endpoints as they were until its clusters drop the name).
            if let Some(previous) =
                previous.filter(|_| UPDATED_IN_PART.contains(&type_url) && !state.rejected)
            {
                let lacking: Vec<Arc<Resource>> = resources
                    .into_iter()
                    .filter(|r| {
                        fresh.binary_search(&r.id()).is_ok()
                            || previous
                                .get(&r.name)
                                .is_none_or(|held| held.version != r.version)
                    })
                    .collect();
                if lacking.is_empty() {
                    return None;
                }
                return Some(response(nonces, type_url, state, version, lacking, true));
            }
            (version, resources)
        }
    };
    Some(response(nonces, type_url, state, version, resources, false))
}

fn response(
    nonces: &mut Nonces,
    type_url: TypeUrl,
    state: &mut TypeState,
    version: Arc<str>,
    resources: Vec<Arc<Resource>>,
    in_part: bool,
) -> Response {
    let nonce = nonces.next();
    state.sent_version = Some(version.clone());
    state.last_nonce = Some(nonce.clone());
    state.sent_in_part = in_part;
    state.rejected = false;
    Response {
        type_url,
        version,
        nonce,
        resources,
        removed: Vec::new(),
    }
}

/// The names `new` has and `old` has not (`None` when either is a wildcard).
fn added_names(old: &Subscription, new: &Subscription) -> Option<Vec<NameId>> {
    let (Subscription::Names(old), Subscription::Names(new)) = (old, new) else {
        return None;
    };
    let had: std::collections::HashSet<NameId> = old.iter().copied().collect();
    Some(new.iter().copied().filter(|id| !had.contains(id)).collect())
}

/// Whether the subscription `ids` names exactly the resources of `t`, remembered by names key.
fn covers_exactly(covers: &mut Option<u64>, ids: &[NameId], t: &TypeSnapshot) -> bool {
    if *covers == Some(t.names_key()) {
        return true;
    }
    // Both in name order: compared id by id, without looking up a name.
    let exact = ids.len() == t.len() && t.resources().zip(ids).all(|(r, id)| r.id() == *id);
    if exact {
        *covers = Some(t.names_key());
    }
    exact
}

/// Whether the proxy has `version` or rejected it. A version it was sent does not count when it
/// named some of its resources since (`lacks_named`): it may have dropped them in between.
fn is_known(state: &TypeState, lacks_named: bool, version: &Arc<str>) -> bool {
    (!lacks_named && state.sent_version.as_ref() == Some(version))
        || state.parked.as_ref() == Some(version)
}

#[cfg(test)]
mod tests {
    use test_case::test_case;

    use super::super::test_support::{render, snap};
    use super::super::{CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET, short_name};
    use super::*;

    /// Where a request's `version_info` or nonce comes from.
    #[derive(Clone, Copy, Debug)]
    enum From {
        Empty,
        /// The last response received for the type.
        Last,
        Lit(&'static str),
        /// The current snapshot's version of the type (a proxy resuming after reconnect).
        TypeVersion,
        /// The type's version in the given snapshot.
        VersionIn(fn() -> Snapshot),
    }

    #[derive(Clone, Debug)]
    enum Step {
        Req {
            ty: TypeUrl,
            names: &'static str,
            version: From,
            nonce: From,
            error: Option<&'static str>,
        },
        Snap(Snapshot),
    }

    fn initial(ty: TypeUrl, names: &'static str) -> Step {
        Step::Req {
            ty,
            names,
            version: From::Empty,
            nonce: From::Empty,
            error: None,
        }
    }

    fn resume(ty: TypeUrl, names: &'static str, version: From) -> Step {
        Step::Req {
            ty,
            names,
            version,
            nonce: From::Empty,
            error: None,
        }
    }

    fn ack(ty: TypeUrl, names: &'static str) -> Step {
        Step::Req {
            ty,
            names,
            version: From::Last,
            nonce: From::Last,
            error: None,
        }
    }

    fn nack(ty: TypeUrl, names: &'static str) -> Step {
        // A NACK carries the last accepted version; tests do not track it, so send none.
        Step::Req {
            ty,
            names,
            version: From::Empty,
            nonce: From::Last,
            error: Some("rejected"),
        }
    }

    fn stale(ty: TypeUrl, names: &'static str) -> Step {
        Step::Req {
            ty,
            names,
            version: From::Empty,
            nonce: From::Lit("stale"),
            error: None,
        }
    }

    /// Runs the script, checking each step's rendered output and the invariants every response
    /// must keep (version is `version_of` its resources, nonces unique, types only after request).
    fn run(script: Vec<(Step, &str)>) {
        let mut stream = SotwStream::new();
        let mut snapshot: Option<Snapshot> = None;
        // Per type: [version, nonce] of the last response.
        let mut last: BTreeMap<TypeUrl, [Arc<str>; 2]> = BTreeMap::new();
        let mut nonces = BTreeSet::new();
        for (i, (step, expected)) in script.into_iter().enumerate() {
            let out = match step {
                Step::Req {
                    ty,
                    names,
                    version,
                    nonce,
                    error,
                } => {
                    let pick = |from: From, field: usize| match from {
                        From::Empty => String::new(),
                        From::Last => last
                            .get(ty)
                            .map(|l| l[field].to_string())
                            .unwrap_or_default(),
                        From::Lit(s) => s.to_owned(),
                        From::TypeVersion => snapshot
                            .as_ref()
                            .and_then(|s| s.get(ty))
                            .map(|t| t.version().to_string())
                            .unwrap_or_default(),
                        From::VersionIn(make) => make()
                            .get(ty)
                            .map(|t| t.version().to_string())
                            .unwrap_or_default(),
                    };
                    let request = SotwRequest {
                        type_url: ty.to_owned(),
                        version_info: pick(version, 0),
                        resource_names: names
                            .split_whitespace()
                            .map(str::to_owned)
                            .collect::<Vec<String>>()
                            .into(),
                        response_nonce: pick(nonce, 1),
                        error_detail: error.map(str::to_owned),
                    };
                    stream
                        .on_request(request, snapshot.as_ref())
                        .expect("known type")
                }
                Step::Snap(new) => {
                    let out = stream.on_snapshot(&new);
                    snapshot = Some(new);
                    out
                }
            };
            for r in &out.responses {
                assert!(
                    stream.is_requested(r.type_url),
                    "step {i}: {} sent unrequested",
                    short_name(r.type_url)
                );
                // Labelled with what it carries; an update in part, with what it brings the
                // proxy to (the Envoy model below checks what it holds).
                assert!(
                    r.version == TypeSnapshot::version_of(r.resources.iter().map(|r| &**r))
                        || UPDATED_IN_PART.contains(&r.type_url),
                    "step {i}"
                );
                assert!(r.removed.is_empty());
                assert!(
                    nonces.insert(r.nonce.clone()),
                    "step {i}: nonce {} reused",
                    r.nonce
                );
                last.insert(r.type_url, [r.version.clone(), r.nonce.clone()]);
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

    fn v2() -> Snapshot {
        snap(&[
            (CLUSTER, &[("c1", "2"), ("c2", "1")]),
            (ENDPOINT, &[("c1", "1"), ("c2", "2")]),
        ])
    }

    fn all_types(body: &'static str) -> Snapshot {
        snap(&[
            (SECRET, &[("s", body)]),
            (ROUTE, &[("r", body)]),
            ("type.example/zz", &[("z", body)]),
            (LISTENER, &[("l", body)]),
            ("type.example/aa", &[("a", body)]),
            (ENDPOINT, &[("e", body)]),
            (CLUSTER, &[("c", body)]),
        ])
    }

    #[test_case(vec![
        (Step::Snap(v1()), ""),
        (initial(CLUSTER, ""), "CDS[c1,c2]"),
        (ack(CLUSTER, ""), "ack CDS"),
    ] ; "wildcard request then ack")]
    #[test_case(vec![
        (initial(CLUSTER, ""), ""),
        (Step::Snap(v1()), "CDS[c1,c2]"),
        (ack(CLUSTER, ""), "ack CDS"),
        (Step::Snap(v1()), ""),
        (Step::Snap(v2()), "CDS[c1,c2]"),
    ] ; "request before first snapshot waits for it")]
    #[test_case(vec![
        (Step::Snap(v1()), ""),
        (Step::Snap(v2()), ""),
    ] ; "nothing is sent before a request")]
    #[test_case(vec![
        (Step::Snap(v1()), ""),
        (initial(CLUSTER, ""), "CDS[c1,c2]"),
        (Step::Snap(snap(&[(CLUSTER, &[("c1", "1"), ("c2", "1")]), (ENDPOINT, &[("c1", "9")])])), ""),
    ] ; "a change to another type sends nothing")]
    #[test_case(vec![
        (Step::Snap(v1()), ""),
        (initial(CLUSTER, ""), "CDS[c1,c2]"),
        (nack(CLUSTER, ""), "nack CDS"),
        (Step::Snap(v1()), ""),
        (Step::Snap(v2()), "CDS[c1,c2]"),
        (ack(CLUSTER, ""), "ack CDS"),
    ] ; "nack parks the version until a different one exists")]
    #[test_case(vec![
        (Step::Snap(v1()), ""),
        (initial(CLUSTER, ""), "CDS[c1,c2]"),
        (ack(CLUSTER, ""), "ack CDS"),
        (Step::Snap(v2()), "CDS[c1,c2]"),
        (nack(CLUSTER, ""), "nack CDS"),
        (Step::Snap(v1()), "CDS[c1,c2]"),
        (Step::Snap(v2()), ""),
    ] ; "going back to the accepted version is sent, the parked one is not")]
    #[test_case(vec![
        (Step::Snap(v1()), ""),
        (initial(CLUSTER, ""), "CDS[c1,c2]"),
        (Step::Snap(v2()), "CDS[c1,c2]"),
        (nack(CLUSTER, ""), "nack CDS"),
        (stale(CLUSTER, ""), "stale CDS"),
    ] ; "requests for old nonces are stale")]
    #[test_case(vec![
        (Step::Snap(v1()), ""),
        (initial(ENDPOINT, "c1"), "EDS[c1]"),
        (stale(ENDPOINT, "c1 c2"), "stale EDS"),
        (ack(ENDPOINT, "c1"), "ack EDS"),
    ] ; "a stale request does not change the subscription")]
    #[test_case(vec![
        (Step::Snap(v1()), ""),
        (resume(CLUSTER, "", From::TypeVersion), "ack CDS"),
        (Step::Snap(v2()), "CDS[c1,c2]"),
    ] ; "resume with the current version is an ACK and sends nothing")]
    #[test_case(vec![
        (Step::Snap(v1()), ""),
        (resume(CLUSTER, "", From::Lit("0123456789abcdef")), "ack CDS; CDS[c1,c2]"),
    ] ; "resume with another version resends")]
    #[test_case(vec![
        (resume(CLUSTER, "", From::VersionIn(v1)), "ack CDS"),
        (Step::Snap(v1()), ""),
        (Step::Snap(v2()), "CDS[c1,c2]"),
    ] ; "resume before the first snapshot compares when it arrives")]
    #[test_case(vec![
        (Step::Snap(v1()), ""),
        (initial(ENDPOINT, "c2 missing"), "EDS[c2]"),
        (ack(ENDPOINT, "c2 missing"), "ack EDS"),
        (Step::Snap(snap(&[(ENDPOINT, &[("c1", "2"), ("c2", "1")])])), ""),
        (Step::Snap(snap(&[(ENDPOINT, &[("c1", "2"), ("c2", "1"), ("missing", "1")])])), "EDS[missing]"),
    ] ; "named subscription only sees its names")]
    #[test_case(vec![
        (Step::Snap(v1()), ""),
        (initial(ENDPOINT, "c1"), "EDS[c1]"),
        (ack(ENDPOINT, "c1 c2"), "ack EDS; EDS[c2]"),
        (ack(ENDPOINT, "c2"), "ack EDS"),
        (ack(ENDPOINT, "c2"), "ack EDS"),
        (ack(ENDPOINT, ""), "ack EDS"),
        (ack(ENDPOINT, "c1"), "ack EDS; EDS[c1]"),
    ] ; "subscription changes on ack send the added names only")]
    #[test_case(vec![
        (Step::Snap(v1()), ""),
        (initial(ENDPOINT, "c1"), "EDS[c1]"),
        (nack(ENDPOINT, "c1 c2"), "nack EDS; EDS[c1,c2]"),
    ] ; "subscription change on nack sends the new subset")]
    #[test_case(vec![
        (Step::Snap(v1()), ""),
        (initial(ENDPOINT, "c1"), "EDS[c1]"),
        (nack(ENDPOINT, "c1"), "nack EDS"),
        (Step::Snap(snap(&[(ENDPOINT, &[("c1", "1"), ("c2", "7")])])), ""),
        (Step::Snap(snap(&[(ENDPOINT, &[("c1", "2")])])), "EDS[c1]"),
    ] ; "nack of a named subset parks it")]
    #[test_case(vec![
        (Step::Snap(v1()), ""),
        (initial(CLUSTER, ""), "CDS[c1,c2]"),
        (ack(CLUSTER, ""), "ack CDS"),
        (Step::Snap(snap(&[(ENDPOINT, &[("c1", "1")])])), "CDS[]"),
    ] ; "a type missing from the snapshot is sent empty")]
    #[test_case(vec![
        (Step::Snap(v1()), ""),
        (initial(CLUSTER, "*"), "CDS[c1,c2]"),
        (ack(CLUSTER, ""), "ack CDS"),
        (Step::Snap(v2()), "CDS[c1,c2]"),
    ] ; "star is wildcard and empty names keep it")]
    #[test_case(vec![
        (Step::Snap(all_types("1")), ""),
        (initial(SECRET, "s"), "SDS[s]"),
        (initial("type.example/zz", ""), "zz[z]"),
        (initial(ROUTE, "r"), "RDS[r]"),
        (initial("type.example/aa", ""), "aa[a]"),
        (initial(LISTENER, ""), "LDS[l]"),
        (initial(ENDPOINT, "e"), "EDS[e]"),
        (initial(CLUSTER, ""), "CDS[c]"),
        (Step::Snap(all_types("2")), "CDS[c]; EDS[e]; LDS[l]; RDS[r]; SDS[s]; aa[a]; zz[z]"),
    ] ; "one change to several types goes out in order")]
    #[test_case(vec![
        (Step::Snap(all_types("1")), ""),
        (initial(LISTENER, ""), "LDS[l]"),
        (initial(CLUSTER, ""), "CDS[c]"),
        (Step::Snap(all_types("2")), "CDS[c]; LDS[l]"),
    ] ; "ordering only covers requested types")]
    fn sotw(script: Vec<(Step, &str)>) {
        run(script);
    }

    /// A request naming `names`, ACKing `answered` (a first request without it).
    fn naming(type_url: TypeUrl, names: &[&str], answered: Option<&Response>) -> SotwRequest {
        SotwRequest {
            type_url: type_url.into(),
            resource_names: names.to_vec().into(),
            version_info: answered.map(|o| o.version.to_string()).unwrap_or_default(),
            response_nonce: answered.map(|o| o.nonce.to_string()).unwrap_or_default(),
            ..SotwRequest::default()
        }
    }

    #[test]
    fn a_proxy_adding_names_is_sent_their_resources_and_what_changed() {
        let mut stream = SotwStream::new();
        let sds = |a: &'static str| snap(&[(SECRET, &[("a", a), ("b", "1"), ("c", "1")][..])]);
        let request = |names: &[&str], out: Option<&Response>| naming(SECRET, names, out);
        // Envoy's secrets: its clusters' first, then its listeners' one more.
        let s1 = sds("1");
        let first = stream
            .on_request(request(&["a", "b"], None), Some(&s1))
            .expect("known");
        assert_eq!(render(&first), "SDS[a,b]");
        let out = stream
            .on_request(
                request(&["a", "b", "c"], first.responses.first()),
                Some(&s1),
            )
            .expect("known");
        assert_eq!(render(&out), "ack SDS; SDS[c]", "only the added name");
        assert_eq!(
            out.responses[0].version,
            s1.get(SECRET).expect("sds").version().clone(),
            "labelled with the set it brings the proxy to"
        );
        // An added name together with a change: both, once each.
        let acked = request(&["a", "b", "c"], out.responses.first());
        stream.on_request(acked, Some(&s1)).expect("known");
        let grown = request(&["a", "b", "c", "d"], None);
        let s2 = snap(&[(
            SECRET,
            &[("a", "2"), ("b", "1"), ("c", "1"), ("d", "1")][..],
        )]);
        let out = stream
            .on_request(
                SotwRequest {
                    response_nonce: out.responses[0].nonce.to_string(),
                    version_info: out.responses[0].version.to_string(),
                    ..grown
                },
                Some(&s1),
            )
            .expect("known");
        assert_eq!(render(&out), "ack SDS", "d does not exist yet");
        let out = stream.on_snapshot(&s2);
        assert_eq!(render(&out), "SDS[a,d]");
        // Dropping a name: it holds the rest, nothing to send.
        let dropped = request(&["a", "c", "d"], out.responses.first());
        let out = stream.on_request(dropped, Some(&s2)).expect("known");
        assert_eq!(render(&out), "ack SDS");
        // Naming one again before its answer arrived: stale, as the ACK will name it again.
        let early = request(&["a", "b", "c", "d"], None);
        let out = stream.on_request(early, Some(&s2)).expect("known");
        assert_eq!(render(&out), "stale SDS");
    }

    /// What Envoy holds of a type it subscribes to by name, over a state-of-the-world stream:
    /// each response updates the resources it carries that are subscribed; a name dropped from
    /// the subscription is forgotten; a rejected response changes nothing.
    mod envoy_model {
        use proptest::prelude::*;

        use super::super::super::test_support::snap;
        use super::*;

        const NAMES: [&str; 4] = ["a", "b", "c", "d"];
        const BODIES: [&str; 3] = ["1", "2", "3"];

        #[derive(Clone, Debug)]
        enum Op {
            /// Which names are subscribed.
            Subscribe([bool; 4]),
            /// Each name's body in the snapshot, if present.
            Snap([Option<usize>; 4]),
            /// Reject the next response.
            RejectNext,
            /// The set changes and, before reading the answer, the proxy changes its
            /// subscription (its request names the last response it read).
            SnapThenSubscribe([Option<usize>; 4], [bool; 4]),
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                proptest::array::uniform4(any::<bool>()).prop_map(Op::Subscribe),
                proptest::array::uniform4(proptest::option::of(0..BODIES.len())).prop_map(Op::Snap),
                Just(Op::RejectNext),
                (
                    proptest::array::uniform4(proptest::option::of(0..BODIES.len())),
                    proptest::array::uniform4(any::<bool>())
                )
                    .prop_map(|(bodies, mask)| Op::SnapThenSubscribe(bodies, mask)),
            ]
        }

        fn snapshot(bodies: &[Option<usize>; 4]) -> Snapshot {
            let resources: Vec<(&str, &'static str)> = NAMES
                .iter()
                .zip(bodies)
                .filter_map(|(n, b)| b.map(|b| (*n, BODIES[b])))
                .collect();
            snap(&[(SECRET, &resources[..])])
        }

        struct Envoy {
            subscribed: BTreeSet<&'static str>,
            held: BTreeMap<String, String>,
            reject_next: bool,
            last: Option<Response>,
            last_rejected: bool,
            /// Resources (name, version) of responses it rejected: the server need not offer
            /// them again.
            rejected: BTreeSet<(String, String)>,
        }

        impl Envoy {
            fn request(&self, error: Option<String>) -> SotwRequest {
                SotwRequest {
                    type_url: SECRET.into(),
                    resource_names: self
                        .subscribed
                        .iter()
                        .map(|n| n.to_string())
                        .collect::<Vec<String>>()
                        .into(),
                    version_info: String::new(),
                    response_nonce: self
                        .last
                        .as_ref()
                        .map(|r| r.nonce.to_string())
                        .unwrap_or_default(),
                    error_detail: error,
                }
            }

            /// Applies (or rejects) each response and answers it, in order, until the server
            /// is quiet.
            fn settle(&mut self, stream: &mut SotwStream, snapshot: &Snapshot, out: Output) {
                let mut pending: std::collections::VecDeque<Response> = out.responses.into();
                while let Some(response) = pending.pop_front() {
                    self.last_rejected = self.reject_next;
                    let error = if std::mem::take(&mut self.reject_next) {
                        self.rejected.extend(
                            response
                                .resources
                                .iter()
                                .map(|r| (r.name.to_string(), r.version.to_string())),
                        );
                        Some("rejected".to_string())
                    } else {
                        for r in &response.resources {
                            if self.subscribed.contains(&*r.name) {
                                self.held.insert(r.name.to_string(), r.version.to_string());
                            }
                        }
                        None
                    };
                    self.last = Some(response);
                    let out = stream
                        .on_request(self.request(error), Some(snapshot))
                        .expect("known type");
                    pending.extend(out.responses);
                }
            }

            fn subscribe(&mut self, mask: [bool; 4]) {
                self.subscribed = NAMES
                    .iter()
                    .zip(mask)
                    .filter(|(_, s)| *s)
                    .map(|(n, _)| *n)
                    .collect();
                self.held
                    .retain(|name, _| self.subscribed.contains(name.as_str()));
            }
        }

        proptest! {
            /// Whatever the proxy subscribes to and however the set changes, while the last
            /// response it got was one it accepted, it holds every subscribed resource as the
            /// snapshot has it (but content it once rejected, which is not offered again):
            /// updates in part never leave a resource behind.
            #[test]
            fn envoy_holds_every_subscribed_resource_after_each_accepted_response(
                start in proptest::array::uniform4(any::<bool>()),
                ops in proptest::collection::vec(op(), 0..30),
            ) {
                let mut snapshot = snapshot(&[Some(0); 4]);
                let mut stream = SotwStream::new();
                // Envoy names what it needs from the first request on (an empty first list
                // would be a wildcard).
                let mut start = start;
                start[0] |= !start.contains(&true);
                let mut envoy = Envoy {
                    subscribed: NAMES.iter().zip(start).filter(|(_, s)| *s).map(|(n, _)| *n).collect(),
                    held: BTreeMap::new(),
                    reject_next: false,
                    last: None,
                    last_rejected: false,
                    rejected: BTreeSet::new(),
                };
                let out = stream.on_request(envoy.request(None), Some(&snapshot)).expect("known");
                envoy.settle(&mut stream, &snapshot, out);
                for (step, op) in ops.into_iter().enumerate() {
                    let out = match op {
                        Op::Subscribe(mask) => {
                            envoy.subscribe(mask);
                            stream.on_request(envoy.request(None), Some(&snapshot)).expect("known")
                        }
                        Op::SnapThenSubscribe(bodies, mask) => {
                            snapshot = self::snapshot(&bodies);
                            let mut out = stream.on_snapshot(&snapshot);
                            envoy.subscribe(mask);
                            let more = stream.on_request(envoy.request(None), Some(&snapshot)).expect("known");
                            out.responses.extend(more.responses);
                            out
                        }
                        Op::Snap(bodies) => {
                            snapshot = self::snapshot(&bodies);
                            stream.on_snapshot(&snapshot)
                        }
                        Op::RejectNext => {
                            envoy.reject_next = true;
                            Output::default()
                        }
                    };
                    envoy.settle(&mut stream, &snapshot, out);
                    if envoy.last_rejected {
                        continue;
                    }
                    let types = snapshot.get(SECRET).expect("sds");
                    for name in &envoy.subscribed {
                        let Some(want) = types.get(name) else { continue };
                        let held = envoy.held.get(*name).map(String::as_str);
                        let refused = envoy.rejected.contains(&(name.to_string(), want.version.to_string()));
                        prop_assert!(
                            held == Some(&*want.version) || refused,
                            "step {}: {} held {:?}, the snapshot has {}", step, name, held, want.version
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn ack_and_nack_carry_the_right_versions() {
        let mut stream = SotwStream::new();
        let s1 = v1();
        let out = stream
            .on_request(
                SotwRequest {
                    type_url: CLUSTER.into(),
                    ..SotwRequest::default()
                },
                Some(&s1),
            )
            .expect("known");
        let sent = &out.responses[0];
        assert_eq!(
            sent.version,
            s1.get(CLUSTER).expect("cds").version().clone(),
            "wildcard = type version"
        );
        assert_eq!(&*sent.nonce, "1");
        let nack = SotwRequest {
            type_url: CLUSTER.into(),
            version_info: "previous".into(),
            response_nonce: sent.nonce.to_string(),
            error_detail: Some("bad cluster".into()),
            ..SotwRequest::default()
        };
        let out = stream.on_request(nack, Some(&s1)).expect("known");
        assert_eq!(
            out.events,
            vec![Event::Nack {
                type_url: CLUSTER,
                version: sent.version.clone(),
                error: "bad cluster".into()
            }],
            "the NACKed version is the one sent, not the proxy's version_info"
        );
        let s2 = v2();
        let out = stream.on_snapshot(&s2);
        let ack = SotwRequest {
            type_url: CLUSTER.into(),
            version_info: out.responses[0].version.to_string(),
            response_nonce: out.responses[0].nonce.to_string(),
            ..SotwRequest::default()
        };
        let out2 = stream.on_request(ack, Some(&s2)).expect("known");
        assert_eq!(
            out2.events,
            vec![Event::Ack {
                type_url: CLUSTER,
                version: out.responses[0].version.clone()
            }]
        );
        assert_eq!(&*out.responses[0].nonce, "2");
    }

    #[test]
    fn a_subscription_to_every_name_is_answered_with_the_whole_set_and_a_subset_with_its_part() {
        let mut stream = SotwStream::new();
        let eds = |bodies: &[(&str, &'static str)]| snap(&[(ENDPOINT, bodies)]);
        let s1 = eds(&[("a", "1"), ("b", "1")]);
        let out = stream
            .on_request(
                SotwRequest {
                    type_url: ENDPOINT.into(),
                    resource_names: vec!["b".to_string(), "a".to_string()].into(),
                    ..SotwRequest::default()
                },
                Some(&s1),
            )
            .expect("known");
        assert_eq!(
            out.responses[0].version,
            s1.get(ENDPOINT).expect("eds").version().clone(),
            "every name subscribed: labelled with the type's version"
        );
        // One resource changes: only it goes out, under the new set's version.
        let s2 = eds(&[("a", "2"), ("b", "1")]);
        let out = stream.on_snapshot(&s2);
        assert_eq!(render(&out), "EDS[a]");
        assert_eq!(
            out.responses[0].version,
            s2.get(ENDPOINT).expect("eds").version().clone()
        );
        // A resource the proxy did not ask for appears: of its two, the one that changed,
        // labelled with the two it then holds.
        let s3 = eds(&[("a", "3"), ("b", "1"), ("c", "1")]);
        let out = stream.on_snapshot(&s3);
        assert_eq!(render(&out), "EDS[a]");
        let subset = TypeSnapshot::version_of(
            ["a", "b"]
                .iter()
                .map(|n| &**s3.get(ENDPOINT).expect("eds").get(n).expect("named")),
        );
        assert_eq!(out.responses[0].version, subset);
        // …and nothing when only that other resource changes.
        let s4 = eds(&[("a", "3"), ("b", "1"), ("c", "2")]);
        assert_eq!(render(&stream.on_snapshot(&s4)), "");
    }

    #[test]
    fn endpoint_and_route_updates_carry_what_changed_and_the_whole_set_after_a_nack() {
        let mut stream = SotwStream::new();
        let both = |a: &'static str, b: &'static str| {
            snap(&[
                (ENDPOINT, &[("a", a), ("b", b)][..]),
                (ROUTE, &[("a", a), ("b", b)][..]),
                (CLUSTER, &[("a", a), ("b", b)][..]),
            ])
        };
        let s1 = both("1", "1");
        for (type_url, names) in [
            (CLUSTER, &[][..]),
            (ENDPOINT, &["a", "b"]),
            (ROUTE, &["a", "b"]),
        ] {
            let out = stream
                .on_request(naming(type_url, names, None), Some(&s1))
                .expect("known");
            assert_eq!(
                out.responses[0].resources.len(),
                2,
                "first answers are whole"
            );
        }
        let s2 = both("2", "1");
        let out = stream.on_snapshot(&s2);
        assert_eq!(
            render(&out),
            "CDS[a,b]; EDS[a]; RDS[a]",
            "clusters are always whole; endpoints and routes only what changed"
        );
        // The proxy rejects the endpoints; the next change sends them whole again.
        let eds = out
            .responses
            .iter()
            .find(|r| r.type_url == ENDPOINT)
            .expect("eds");
        let mut nack = naming(ENDPOINT, &["a", "b"], Some(eds));
        nack.error_detail = Some("bad endpoint".into());
        stream.on_request(nack, Some(&s2)).expect("known");
        let s3 = both("2", "3");
        let out = stream.on_snapshot(&s3);
        assert_eq!(render(&out), "CDS[a,b]; EDS[a,b]; RDS[b]");
    }

    #[test]
    fn unknown_type_is_an_error_and_leaves_the_stream_usable() {
        let mut stream = SotwStream::new();
        let s1 = v1();
        let unknown = SotwRequest {
            type_url: "type.example/unknown".into(),
            ..SotwRequest::default()
        };
        assert_eq!(
            stream.on_request(unknown, Some(&s1)),
            Err(ProtocolError::UnknownType("type.example/unknown".into()))
        );
        let cds = SotwRequest {
            type_url: CLUSTER.into(),
            ..SotwRequest::default()
        };
        assert_eq!(
            stream
                .on_request(cds, Some(&s1))
                .expect("known")
                .responses
                .len(),
            1
        );
    }

    #[test]
    fn extra_types_are_accepted_before_any_snapshot() {
        const NATIVE: &[TypeUrl] = &["type.googleapis.com/fsm.dataplane.v1.Inbound"];
        let mut stream = SotwStream::new().with_type_urls(NATIVE);
        let request = SotwRequest {
            type_url: NATIVE[0].into(),
            ..SotwRequest::default()
        };
        assert_eq!(
            stream.on_request(request, None),
            Ok(Output {
                type_url: Some(NATIVE[0]),
                ..Output::default()
            })
        );
        let out = stream.on_snapshot(&snap(&[(NATIVE[0], &[("in", "1")])]));
        assert_eq!(render(&out), "fsm.dataplane.v1.Inbound[in]");
    }
}
