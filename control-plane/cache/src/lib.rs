//! Per-proxy snapshot cache with content-derived versions and encoded-once resources.
//!
//! Adapters hand the cache already-encoded resources; the cache does not know which data plane
//! they are for. A resource's version is a hash of its bytes and a type's version is a hash of its
//! names and resource versions, so the same configuration gets the same versions in every
//! controller replica and across restarts: a reconnecting proxy that already has them gets nothing
//! resent. Streams learn about new snapshots through a `watch` channel, which coalesces bursts.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use serde::Serialize;
use tokio::sync::watch;

mod names;
mod wire;
pub use names::{NameId, Names, version_key};
pub use wire::{Flavor, Section};

/// A resource type URL (`type.googleapis.com/envoy.config.cluster.v3.Cluster`, …).
pub type TypeUrl = &'static str;

/// Content hash used for every version: 16 hex digits of XXH3-64.
pub fn content_version(parts: &[&[u8]]) -> Arc<str> {
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    for part in parts {
        hasher.update(&(part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    Arc::from(format!("{:016x}", hasher.digest()))
}

/// One encoded resource, shared by reference between snapshots and streams.
#[derive(Clone, PartialEq, Eq)]
pub struct Resource {
    pub name: Arc<str>,
    pub version: Arc<str>,
    /// The serialized message (what goes into `Any.value`).
    pub body: Bytes,
    /// Its response entries, encoded on first use ([`Resource::entry`]).
    wire: wire::Entries,
}

impl Resource {
    pub fn new(name: impl Into<Arc<str>>, body: impl Into<Bytes>) -> Self {
        let body = body.into();
        Resource {
            name: name.into(),
            version: content_version(&[&body]),
            body,
            wire: wire::Entries::default(),
        }
    }
}

impl fmt::Debug for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Resource({} @ {}, {} bytes)",
            self.name,
            self.version,
            self.body.len()
        )
    }
}

/// All resources of one type for one proxy.
///
/// A proxy's set is often a set many proxies share plus a few resources of its own (the mesh's
/// clusters and this pod's local ones): it is then kept as that shared `base` and a small layer,
/// so it costs the layer, not a copy of the whole set.
#[derive(Clone, Debug)]
pub struct TypeSnapshot {
    version: Arc<str>,
    /// The shared set this one extends (itself without a base).
    base: Option<Arc<TypeSnapshot>>,
    /// The resources of this set beyond `base` (all of them without a base); on a name both
    /// have, this one's wins.
    resources: BTreeMap<Arc<str>, Arc<Resource>>,
    /// Resources in the union.
    len: usize,
    /// The whole type's response section, encoded on first use ([`TypeSnapshot::section`]).
    sections: wire::Sections,
    /// A hash of the names alone ([`TypeSnapshot::names_key`]).
    names_key: u64,
    /// The set this one replaced, with the names that differ ([`TypeSnapshot::replacing`]).
    origin: Option<Origin>,
}

/// What a shared set changed from its predecessor: [`TypeSnapshot::changes`] between the two then
/// costs those names, not a walk of the set, for every stream that held the predecessor.
#[derive(Clone, Debug)]
struct Origin {
    /// Weak, so a set does not keep its predecessors alive; it also keeps the predecessor's
    /// address from being reused, so comparing addresses identifies it.
    from: std::sync::Weak<TypeSnapshot>,
    names: Box<[Arc<str>]>,
}

impl TypeSnapshot {
    pub fn new(resources: impl IntoIterator<Item = Resource>) -> Self {
        let resources: BTreeMap<Arc<str>, Arc<Resource>> = resources
            .into_iter()
            .map(|r| (r.name.clone(), Arc::new(r)))
            .collect();
        Self::with_base(None, resources)
    }

    /// The set of `base` and `layer` (and its version, names key and size, computed once).
    ///
    /// A layered set's version and names key hash the base's and the layer's own, not the whole
    /// union: building one costs its layer, not the size of the shared set (ten thousand proxies
    /// re-layered over a new shared set after one endpoint change). They stay content-derived and
    /// the same in every replica, since a proxy's set is split into shared and own the same way
    /// everywhere; equal content split differently only gets another version (one resend).
    fn with_base(
        base: Option<Arc<TypeSnapshot>>,
        resources: BTreeMap<Arc<str>, Arc<Resource>>,
    ) -> Self {
        let mut parts: Vec<&[u8]> = Vec::new();
        let mut names = xxhash_rust::xxh3::Xxh3::new();
        let mut len = 0;
        if let Some(base) = &base {
            parts.push(b"layered");
            parts.push(base.version.as_bytes());
            names.update(&base.names_key.to_le_bytes());
            len = base.len;
        }
        for r in resources.values() {
            parts.push(r.name.as_bytes());
            parts.push(r.version.as_bytes());
            names.update(&(r.name.len() as u64).to_le_bytes());
            names.update(r.name.as_bytes());
            if base
                .as_ref()
                .is_none_or(|b| !b.resources.contains_key(&r.name))
            {
                len += 1;
            }
        }
        let version = content_version(&parts);
        let names_key = names.digest();
        TypeSnapshot {
            version,
            base,
            resources,
            len,
            names_key,
            sections: wire::Sections::default(),
            origin: None,
        }
    }

    /// The version of a set of resources: what a state-of-the-world response carrying exactly
    /// them is labelled with.
    pub fn version_of<'a>(resources: impl Iterator<Item = &'a Resource>) -> Arc<str> {
        let mut parts: Vec<&[u8]> = Vec::new();
        for r in resources {
            parts.push(r.name.as_bytes());
            parts.push(r.version.as_bytes());
        }
        content_version(&parts)
    }

    /// A set of resources already shared with other snapshots (content-addressed: equal
    /// resources are the same `Arc`).
    pub fn from_shared(resources: impl IntoIterator<Item = Arc<Resource>>) -> Self {
        let resources: BTreeMap<Arc<str>, Arc<Resource>> =
            resources.into_iter().map(|r| (r.name.clone(), r)).collect();
        Self::with_base(None, resources)
    }

    /// The union of a shared set and a proxy's own (`own` wins on a name both have), kept as
    /// `shared` plus `own`'s resources: it costs `own`, not a copy of `shared`.
    pub fn merged(shared: &Arc<TypeSnapshot>, own: &TypeSnapshot) -> Self {
        if shared.base.is_some() {
            // Layers stack one deep: a layered set is flattened before it is extended.
            return Self::from_shared(Union::of(shared).chain(own.resources()).cloned());
        }
        let layer = own
            .resources()
            .map(|r| (r.name.clone(), r.clone()))
            .collect();
        Self::with_base(Some(shared.clone()), layer)
    }

    /// This set, as the successor of `older`: it remembers the names that differ, so that
    /// streams holding `older` learn what changed without walking either set. Both must be flat
    /// (not layered), as shared sets are; otherwise nothing is remembered.
    pub fn replacing(mut self, older: &Arc<TypeSnapshot>) -> Self {
        if self.base.is_none() && older.base.is_none() {
            let names = self
                .changes(older)
                .iter()
                .map(|c| c.name().into())
                .collect();
            self.origin = Some(Origin {
                from: Arc::downgrade(older),
                names,
            });
        }
        self
    }

    /// The names that differ from `older`, when this set was made [`replacing`](Self::replacing)
    /// it.
    fn names_changed_since(&self, older: &TypeSnapshot) -> Option<&[Arc<str>]> {
        self.origin
            .as_ref()
            .filter(|o| std::ptr::eq(o.from.as_ptr(), older))
            .map(|o| &*o.names)
    }

    pub fn version(&self) -> &Arc<str> {
        &self.version
    }

    /// Equal for two sets with the same names (whatever their content): a stream subscribed to
    /// exactly one set's names is subscribed to exactly the other's, without comparing them.
    pub fn names_key(&self) -> u64 {
        self.names_key
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Resource>> {
        self.resources
            .get(name)
            .or_else(|| self.base.as_ref()?.resources.get(name))
    }

    /// Every resource, in name order.
    pub fn resources(&self) -> impl Iterator<Item = &Arc<Resource>> {
        Union::of(self)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether this set is a shared set plus resources of its own ([`TypeSnapshot::merged`]).
    pub fn is_layered(&self) -> bool {
        self.base.is_some()
    }
}

/// How a name's resource differs between two sets ([`TypeSnapshot::changes`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change<'a> {
    /// Only the newer set has the name.
    Added(&'a Arc<Resource>),
    /// Both have it, in different versions (the newer one's).
    Updated(&'a Arc<Resource>),
    /// Only the older set has it (the older one's).
    Removed(&'a Arc<Resource>),
}

impl Change<'_> {
    fn name(&self) -> &str {
        match self {
            Change::Added(r) | Change::Updated(r) | Change::Removed(r) => &r.name,
        }
    }
}

impl TypeSnapshot {
    /// What differs from `older` to `self`, in name order.
    ///
    /// Content-addressed resources are shared by reference between consecutive sets, so a
    /// resource both hold costs a pointer comparison, not a look-up by name: telling ten thousand
    /// streams that one of a thousand resources changed costs a thousand pointer comparisons
    /// each. Two layered sets are compared base against base (skipped when it is the same `Arc`)
    /// and then name by name over their small layers.
    pub fn changes<'a>(&'a self, older: &'a TypeSnapshot) -> Vec<Change<'a>> {
        let (Some(new_base), Some(old_base)) = (&self.base, &older.base) else {
            if let Some(names) = self.names_changed_since(older) {
                return names
                    .iter()
                    .filter_map(|name| change(older.get(name), self.get(name)))
                    .collect();
            }
            return diff_sorted(Union::of(older), Union::of(self)).collect();
        };
        let mut changes: Vec<Change<'a>> = match new_base.names_changed_since(old_base) {
            Some(names) => names
                .iter()
                .filter_map(|name| change(old_base.get(name), new_base.get(name)))
                .collect(),
            None if Arc::ptr_eq(new_base, old_base) => Vec::new(),
            None => diff_sorted(old_base.resources.values(), new_base.resources.values()).collect(),
        };
        // A name either layer has is decided by the layers below.
        changes.retain(|c| {
            !self.resources.contains_key(c.name()) && !older.resources.contains_key(c.name())
        });
        let layered: std::collections::BTreeSet<&Arc<str>> = self
            .resources
            .keys()
            .chain(older.resources.keys())
            .collect();
        changes.extend(
            layered
                .into_iter()
                .filter_map(|name| change(older.get(name), self.get(name))),
        );
        changes.sort_by(|a, b| a.name().cmp(b.name()));
        changes
    }
}

/// How a name's resource changed from `old` to `new`, if it did.
fn change<'a>(
    old: Option<&'a Arc<Resource>>,
    new: Option<&'a Arc<Resource>>,
) -> Option<Change<'a>> {
    match (old, new) {
        (None, Some(new)) => Some(Change::Added(new)),
        (Some(old), None) => Some(Change::Removed(old)),
        (Some(old), Some(new)) if !Arc::ptr_eq(old, new) && old.version != new.version => {
            Some(Change::Updated(new))
        }
        _ => None,
    }
}

/// The changes between two sequences of resources in name order, walked side by side.
fn diff_sorted<'a>(
    old: impl Iterator<Item = &'a Arc<Resource>>,
    new: impl Iterator<Item = &'a Arc<Resource>>,
) -> impl Iterator<Item = Change<'a>> {
    let mut old = old.peekable();
    let mut new = new.peekable();
    std::iter::from_fn(move || {
        loop {
            let change = match (old.peek().copied(), new.peek().copied()) {
                (None, None) => return None,
                (Some(o), None) => Change::Removed(o),
                (None, Some(n)) => Change::Added(n),
                (Some(o), Some(n)) => {
                    if Arc::ptr_eq(o, n) {
                        old.next();
                        new.next();
                        continue;
                    }
                    match o.name.cmp(&n.name) {
                        std::cmp::Ordering::Less => Change::Removed(o),
                        std::cmp::Ordering::Greater => Change::Added(n),
                        std::cmp::Ordering::Equal => {
                            old.next();
                            new.next();
                            if o.version == n.version {
                                continue;
                            }
                            return Some(Change::Updated(n));
                        }
                    }
                }
            };
            match change {
                Change::Removed(_) => old.next(),
                _ => new.next(),
            };
            return Some(change);
        }
    })
}

/// Versions are content hashes: equal versions are equal content, however the sets are kept.
impl PartialEq for TypeSnapshot {
    fn eq(&self, other: &Self) -> bool {
        self.version == other.version
    }
}

impl Eq for TypeSnapshot {}

type Map = BTreeMap<Arc<str>, Arc<Resource>>;

/// The resources of a base map and a layer over it, in name order; the layer's wins on a name
/// both have.
///
/// The base is read in ranges between consecutive layer names, so a thousand shared resources
/// around a few of the proxy's own cost a few range look-ups, not a name comparison each.
struct Union<'a> {
    base: &'a Map,
    /// The base's resources before `pending` (after the previous layer resource).
    range: std::collections::btree_map::Range<'a, Arc<str>, Arc<Resource>>,
    /// The layer resource due once `range` is done.
    pending: Option<&'a Arc<Resource>>,
    layer: std::collections::btree_map::Values<'a, Arc<str>, Arc<Resource>>,
}

impl<'a> Union<'a> {
    fn of(set: &'a TypeSnapshot) -> Self {
        Union::new(set.base.as_deref().map(|b| &b.resources), &set.resources)
    }

    fn new(base: Option<&'a Map>, layer: &'a Map) -> Self {
        static EMPTY: Map = BTreeMap::new();
        let base = base.unwrap_or(&EMPTY);
        let mut layer = layer.values();
        let pending = layer.next();
        Union {
            base,
            range: Self::base_range(base, None, pending),
            pending,
            layer,
        }
    }

    /// The base's resources strictly between two layer resources (`None`: unbounded).
    fn base_range(
        base: &'a Map,
        after: Option<&'a Arc<Resource>>,
        before: Option<&'a Arc<Resource>>,
    ) -> std::collections::btree_map::Range<'a, Arc<str>, Arc<Resource>> {
        use std::ops::Bound::{Excluded, Unbounded};
        let lower = after.map_or(Unbounded, |r| Excluded(&*r.name));
        let upper = before.map_or(Unbounded, |r| Excluded(&*r.name));
        base.range::<str, _>((lower, upper))
    }
}

impl<'a> Iterator for Union<'a> {
    type Item = &'a Arc<Resource>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some((_, r)) = self.range.next() {
            return Some(r);
        }
        let current = self.pending?;
        self.pending = self.layer.next();
        self.range = Self::base_range(self.base, Some(current), self.pending);
        Some(current)
    }
}

/// Everything one proxy should have, per type. Each type's set is shared (by `Arc`) with every
/// proxy whose set of that type has the same content, so a snapshot costs a few pointers.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    types: BTreeMap<TypeUrl, Arc<TypeSnapshot>>,
}

/// Versions are content hashes: equal versions are equal content.
impl PartialEq for Snapshot {
    fn eq(&self, other: &Self) -> bool {
        self.types.len() == other.types.len()
            && self
                .types
                .iter()
                .zip(&other.types)
                .all(|((ta, a), (tb, b))| ta == tb && a.version == b.version)
    }
}

impl Eq for Snapshot {}

/// An adapter's output: per type URL, `(resource name, serialized message)` sorted by name.
pub type Encoded = BTreeMap<TypeUrl, Vec<(String, Vec<u8>)>>;

/// Serializes `items` for [`Encoded`], sorted by resource name so equal content gives equal bytes
/// in every replica.
pub fn encode_sorted<M: prost::Message>(
    items: &[M],
    name: impl Fn(&M) -> &str,
) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = items
        .iter()
        .map(|m| (name(m).to_string(), m.encode_to_vec()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

impl Snapshot {
    /// The snapshot of an adapter's encoded output.
    pub fn from_encoded(encoded: Encoded) -> Self {
        Snapshot::new(encoded.into_iter().map(|(type_url, items)| {
            (
                type_url,
                items
                    .into_iter()
                    .map(|(name, body)| Resource::new(name, body))
                    .collect(),
            )
        }))
    }

    pub fn new(types: impl IntoIterator<Item = (TypeUrl, Vec<Resource>)>) -> Self {
        Snapshot {
            types: types
                .into_iter()
                .map(|(t, rs)| (t, Arc::new(TypeSnapshot::new(rs))))
                .collect(),
        }
    }

    /// A snapshot of sets shared with other snapshots.
    pub fn from_types(types: impl IntoIterator<Item = (TypeUrl, Arc<TypeSnapshot>)>) -> Self {
        Snapshot {
            types: types.into_iter().collect(),
        }
    }

    /// Resources of `type_url`; an empty set for a type the adapter did not produce.
    pub fn get(&self, type_url: &str) -> Option<&TypeSnapshot> {
        self.types.get(type_url).map(|t| &**t)
    }

    /// The shared set of `type_url`.
    pub fn get_shared(&self, type_url: &str) -> Option<&Arc<TypeSnapshot>> {
        self.types.get(type_url)
    }

    pub fn types(&self) -> impl Iterator<Item = (TypeUrl, &Arc<TypeSnapshot>)> {
        self.types.iter().map(|(t, s)| (*t, s))
    }

    pub fn versions(&self) -> BTreeMap<TypeUrl, Arc<str>> {
        self.types
            .iter()
            .map(|(t, s)| (*t, s.version.clone()))
            .collect()
    }
}

/// A proxy's whole identity: what its snapshot is keyed by (never the UUID alone).
pub use fsm_identity::ProxyIdentity as ProxyKey;

/// What the streams of one proxy are to serve.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Published {
    /// Nothing yet: the controller has not matched the proxy's certificate to its pod, or its
    /// service certificate is not issued yet. A stream sends nothing meanwhile.
    #[default]
    Pending,
    Snapshot(Arc<Snapshot>),
    /// The proxy's identity does not (or no longer) match a pod: its streams stop receiving
    /// updates and are closed with this reason, which starts with the FSM error code.
    Refused(Arc<str>),
}

impl Published {
    pub fn snapshot(&self) -> Option<&Arc<Snapshot>> {
        match self {
            Published::Snapshot(s) => Some(s),
            _ => None,
        }
    }
}

/// What a stream reports back about one type, for `/debug` and `fsm proxy status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SyncEvent {
    Sent { version: Arc<str>, nonce: Arc<str> },
    Acked { version: Arc<str> },
    Nacked { version: Arc<str>, error: String },
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TypeStatus {
    /// Version of the whole type in the proxy's current snapshot.
    pub snapshot_version: Option<Arc<str>>,
    pub sent_version: Option<Arc<str>>,
    pub acked_version: Option<Arc<str>>,
    pub nacked_version: Option<Arc<str>>,
    pub last_nack_error: Option<String>,
    pub responses_sent: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyStatus {
    pub connected_streams: usize,
    pub types: BTreeMap<TypeUrl, TypeStatus>,
}

struct Entry {
    published: watch::Sender<Published>,
    /// Its own lock: streams record sends and ACKs of one proxy without stopping the others.
    status: Mutex<ProxyStatus>,
    observed: Observed,
}

impl Entry {
    fn new() -> Self {
        Entry {
            published: watch::Sender::new(Published::Pending),
            status: Mutex::new(ProxyStatus::default()),
            observed: Observed::default(),
        }
    }
}

/// When the changes a proxy's streams have not taken yet were observed, per type: the earliest
/// of each type, a few words per proxy. Written by [`SnapshotCache::set_observed`] inside the
/// proxy's watch (so a stream reading the snapshot it wakes for takes the stamps with it) and
/// taken by the stream, which holds this handle rather than looking the proxy up again.
#[derive(Clone, Debug, Default)]
pub struct Observed(Arc<Mutex<Vec<(TypeUrl, Instant)>>>);

impl Observed {
    fn stamp(&self, type_url: TypeUrl, at: Instant) {
        let mut stamps = self.0.lock();
        match stamps.iter_mut().find(|(t, _)| *t == type_url) {
            Some((_, earliest)) => *earliest = (*earliest).min(at),
            None => stamps.push((type_url, at)),
        }
    }

    /// Takes the stamps of `types` (those of other types stay for the streams serving them).
    pub fn take(&self, types: &[TypeUrl]) -> Vec<(TypeUrl, Instant)> {
        let mut stamps = self.0.lock();
        if stamps.is_empty() {
            return Vec::new();
        }
        let mut taken = Vec::new();
        stamps.retain(|(t, at)| {
            let ours = types.contains(t);
            if ours {
                taken.push((*t, *at));
            }
            !ours
        });
        taken
    }
}

/// The per-proxy snapshot store shared by the controller (writer) and the ADS streams (readers).
/// Only a stream opening or closing takes the write lock; publishing, sending and ACKs take the
/// read lock and the one proxy's entry.
#[derive(Default)]
pub struct SnapshotCache {
    entries: RwLock<HashMap<ProxyKey, Entry>>,
}

impl SnapshotCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Stores a proxy's snapshot and wakes its streams. Returns false, and wakes nobody, when the
    /// content is unchanged or the proxy has no stream: a proxy is known to the cache only while
    /// one of its streams is open, so a publish racing a disconnect leaves nothing behind.
    pub fn set(&self, key: &ProxyKey, snapshot: Snapshot) -> bool {
        self.set_observed(key, snapshot, None)
    }

    /// [`set`](Self::set), and when the snapshot carries a change the controller observed at
    /// `observed`, stamps every type whose version it changes with that time (the earliest
    /// stamp not yet taken wins), for the streams to measure how long the change takes to be
    /// acknowledged ([`SnapshotCache::observed`]).
    pub fn set_observed(
        &self,
        key: &ProxyKey,
        snapshot: Snapshot,
        observed: Option<Instant>,
    ) -> bool {
        let entries = self.entries.read();
        let Some(entry) = entries.get(key) else {
            return false;
        };
        let versions = snapshot.versions();
        let snapshot = Arc::new(snapshot);
        let changed = entry.published.send_if_modified(|current| {
            let previous = current.snapshot();
            if previous.map(|s| &**s) == Some(&*snapshot) {
                return false;
            }
            if let Some(at) = observed {
                for (type_url, set) in snapshot.types() {
                    let before = previous
                        .and_then(|p| p.get(type_url))
                        .map(TypeSnapshot::version);
                    if before != Some(set.version()) {
                        entry.observed.stamp(type_url, at);
                    }
                }
            }
            *current = Published::Snapshot(snapshot.clone());
            true
        });
        let mut status = entry.status.lock();
        for (type_url, status) in status.types.iter_mut() {
            status.snapshot_version = versions.get(type_url).cloned();
        }
        for (type_url, version) in versions {
            status.types.entry(type_url).or_default().snapshot_version = Some(version);
        }
        changed
    }

    /// Closes the proxy's streams with `reason` (which starts with its FSM error code): its
    /// identity matches no pod. Returns whether any stream was told.
    pub fn refuse(&self, key: &ProxyKey, reason: impl Into<Arc<str>>) -> bool {
        let entries = self.entries.read();
        let Some(entry) = entries.get(key) else {
            return false;
        };
        let reason = reason.into();
        entry.published.send_if_modified(|current| {
            if matches!(current, Published::Refused(r) if *r == reason) {
                return false;
            }
            *current = Published::Refused(reason);
            true
        })
    }

    pub fn get(&self, key: &ProxyKey) -> Option<Arc<Snapshot>> {
        self.entries
            .read()
            .get(key)
            .and_then(|e| e.published.borrow().snapshot().cloned())
    }

    /// A receiver that sees what the proxy's streams are to serve now and every later change.
    pub fn subscribe(&self, key: &ProxyKey) -> watch::Receiver<Published> {
        let mut entries = self.entries.write();
        let entry = entries.entry(key.clone()).or_insert_with(Entry::new);
        entry.status.get_mut().connected_streams += 1;
        entry.published.subscribe()
    }

    /// Where the streams of the proxy subscribed with [`subscribe`](Self::subscribe) take the
    /// change stamps of [`set_observed`](Self::set_observed): read while holding the snapshot the
    /// watch woke them for, so a stamp is never taken with an older snapshot.
    pub fn observed(&self, key: &ProxyKey) -> Option<Observed> {
        self.entries.read().get(key).map(|e| e.observed.clone())
    }

    /// Called when a stream of the proxy ends; forgets the proxy once no stream is left.
    pub fn unsubscribe(&self, key: &ProxyKey) {
        let mut entries = self.entries.write();
        if let Some(entry) = entries.get_mut(key) {
            let status = entry.status.get_mut();
            status.connected_streams = status.connected_streams.saturating_sub(1);
            if status.connected_streams == 0 {
                entries.remove(key);
            }
        }
    }

    /// Proxies with at least one open stream.
    pub fn connected(&self) -> Vec<ProxyKey> {
        let mut keys: Vec<ProxyKey> = self
            .entries
            .read()
            .iter()
            .filter(|(_, e)| e.status.lock().connected_streams > 0)
            .map(|(k, _)| k.clone())
            .collect();
        keys.sort();
        keys
    }

    pub fn record(&self, key: &ProxyKey, type_url: TypeUrl, event: SyncEvent) {
        let entries = self.entries.read();
        let Some(entry) = entries.get(key) else {
            return;
        };
        let mut status = entry.status.lock();
        let status = status.types.entry(type_url).or_default();
        match event {
            SyncEvent::Sent { version, .. } => {
                status.sent_version = Some(version);
                status.responses_sent += 1;
            }
            SyncEvent::Acked { version } => {
                status.acked_version = Some(version);
            }
            SyncEvent::Nacked { version, error } => {
                status.nacked_version = Some(version);
                status.last_nack_error = Some(error);
            }
        }
    }

    pub fn status(&self) -> BTreeMap<ProxyKey, ProxyStatus> {
        self.entries
            .read()
            .iter()
            .map(|(k, e)| (k.clone(), e.status.lock().clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: TypeUrl = "type.example/T";

    fn snap(body: &'static [u8]) -> Snapshot {
        Snapshot::new([(T, vec![Resource::new("a", body)])])
    }

    #[test]
    fn versions_are_content_derived() {
        assert_eq!(snap(b"x"), snap(b"x"));
        assert_eq!(snap(b"x").versions(), snap(b"x").versions());
        assert_ne!(snap(b"x").versions(), snap(b"y").versions());
        let renamed = Snapshot::new([(T, vec![Resource::new("b", &b"x"[..])])]);
        assert_ne!(
            snap(b"x").versions(),
            renamed.versions(),
            "the name is part of the type version"
        );
    }

    /// A set's content as a map, for comparing with [`TypeSnapshot::changes`].
    fn content(set: &TypeSnapshot) -> BTreeMap<Arc<str>, Arc<str>> {
        set.resources()
            .map(|r| (r.name.clone(), r.version.clone()))
            .collect()
    }

    /// Up to 8 names, each absent or in one of two bodies; shared (`Arc`) resources come from
    /// `pool` so that consecutive sets share what they have in common, as the publisher's do.
    fn set_of(
        picks: &[Option<bool>],
        pool: &BTreeMap<(usize, bool), Arc<Resource>>,
    ) -> Vec<Arc<Resource>> {
        picks
            .iter()
            .enumerate()
            .filter_map(|(i, pick)| pick.map(|body| pool[&(i, body)].clone()))
            .collect()
    }

    proptest::proptest! {
        #[test]
        fn changes_are_exactly_the_difference(
            old in proptest::collection::vec(proptest::option::of(proptest::bool::ANY), 8),
            new in proptest::collection::vec(proptest::option::of(proptest::bool::ANY), 8),
            layer_old in proptest::collection::vec(proptest::option::of(proptest::bool::ANY), 8),
            layer_new in proptest::collection::vec(proptest::option::of(proptest::bool::ANY), 8),
            fresh in proptest::bool::ANY,
            same_base in proptest::bool::ANY,
            flatten in proptest::option::of(proptest::bool::ANY),
            remember in proptest::bool::ANY,
        ) {
            let pool: BTreeMap<(usize, bool), Arc<Resource>> = (0..8)
                .flat_map(|i| [false, true].map(move |body| (i, body)))
                .map(|(i, body)| {
                    let r = Resource::new(format!("r{i}"), if body { &b"one"[..] } else { &b"two"[..] });
                    ((i, body), Arc::new(r))
                })
                .collect();
            let older = Arc::new(TypeSnapshot::from_shared(set_of(&old, &pool)));
            // Equal content in other allocations must read as unchanged too.
            let newer_base: Vec<Arc<Resource>> = set_of(&new, &pool)
                .into_iter()
                .map(|r| if fresh { Arc::new(Resource::new(r.name.clone(), r.body.clone())) } else { r })
                .collect();
            // Consecutive snapshots of one proxy often share the base itself.
            // A shared set made `replacing` its predecessor knows what changed without a walk.
            let successor = |set: TypeSnapshot, of: &Arc<TypeSnapshot>| {
                if remember { set.replacing(of) } else { set }
            };
            let newer = if same_base {
                older.clone()
            } else {
                Arc::new(successor(TypeSnapshot::from_shared(newer_base), &older))
            };
            let older = TypeSnapshot::merged(&older, &TypeSnapshot::from_shared(set_of(&layer_old, &pool)));
            let newer = TypeSnapshot::merged(&newer, &TypeSnapshot::from_shared(set_of(&layer_new, &pool)));
            // Flat sets (a proxy without own resources of the type) compare as well, with each
            // other and with layered ones.
            let flat = |set: &TypeSnapshot| TypeSnapshot::from_shared(set.resources().cloned());
            let (older, newer) = match flatten {
                None => (Arc::new(older), newer),
                Some(true) => {
                    let older = Arc::new(flat(&older));
                    let newer = successor(flat(&newer), &older);
                    (older, newer)
                }
                Some(false) => (Arc::new(flat(&older)), newer),
            };
            let (before, after) = (content(&older), content(&newer));
            let mut expected = Vec::new();
            for name in before.keys().chain(after.keys()).collect::<std::collections::BTreeSet<_>>() {
                match (before.get(name), after.get(name)) {
                    (Some(_), None) => expected.push(("removed", name.clone(), before[name].clone())),
                    (None, Some(v)) => expected.push(("added", name.clone(), v.clone())),
                    (Some(a), Some(b)) if a != b => expected.push(("updated", name.clone(), b.clone())),
                    _ => {}
                }
            }
            let actual: Vec<(&str, Arc<str>, Arc<str>)> = newer
                .changes(&older)
                .into_iter()
                .map(|c| match c {
                    Change::Added(r) => ("added", r.name.clone(), r.version.clone()),
                    Change::Updated(r) => ("updated", r.name.clone(), r.version.clone()),
                    Change::Removed(r) => ("removed", r.name.clone(), r.version.clone()),
                })
                .collect();
            proptest::prop_assert_eq!(actual, expected);
        }
    }

    #[test]
    fn a_layered_set_is_the_union_and_keeps_only_its_layer() {
        let r = |name: &str, body: &'static [u8]| Arc::new(Resource::new(name, body));
        let shared = Arc::new(TypeSnapshot::from_shared([
            r("a", b"1"),
            r("c", b"1"),
            r("e", b"1"),
        ]));
        let own = TypeSnapshot::from_shared([r("b", b"2"), r("c", b"2")]);
        let layered = TypeSnapshot::merged(&shared, &own);
        // The same split of the same content (another replica, another proxy): the same version.
        let again = TypeSnapshot::merged(
            &Arc::new(TypeSnapshot::from_shared([
                r("a", b"1"),
                r("c", b"1"),
                r("e", b"1"),
            ])),
            &TypeSnapshot::from_shared([r("b", b"2"), r("c", b"2")]),
        );
        assert_eq!(layered.version(), again.version());
        assert_eq!(layered.names_key(), again.names_key());
        // Any change of the base or of the layer: another version; of a name: another key.
        let base_changed = TypeSnapshot::merged(
            &Arc::new(TypeSnapshot::from_shared([
                r("a", b"2"),
                r("c", b"1"),
                r("e", b"1"),
            ])),
            &own,
        );
        assert_ne!(layered.version(), base_changed.version());
        assert_eq!(layered.names_key(), base_changed.names_key());
        let layer_changed = TypeSnapshot::merged(
            &shared,
            &TypeSnapshot::from_shared([r("b", b"3"), r("c", b"2")]),
        );
        assert_ne!(layered.version(), layer_changed.version());
        let renamed = TypeSnapshot::merged(
            &shared,
            &TypeSnapshot::from_shared([r("d", b"2"), r("c", b"2")]),
        );
        assert_ne!(layered.names_key(), renamed.names_key());
        assert_eq!(layered.len(), 4);
        let names: Vec<&str> = layered.resources().map(|r| &*r.name).collect();
        assert_eq!(names, ["a", "b", "c", "e"]);
        assert_eq!(
            layered.get("c").map(|r| &r.body[..]),
            Some(&b"2"[..]),
            "the own resource wins"
        );
        assert!(layered.get("e").is_some() && layered.get("z").is_none());
        assert_eq!(layered.resources.len(), 2, "only the layer is held");
        assert!(Arc::ptr_eq(
            layered.get("a").expect("a"),
            shared.get("a").expect("a")
        ));
        // A layered set extended again is flattened first.
        let again = TypeSnapshot::merged(
            &Arc::new(layered),
            &TypeSnapshot::from_shared([r("f", b"1")]),
        );
        assert_eq!(again.len(), 5);
        assert!(again.base.is_none());
    }

    #[tokio::test]
    async fn set_wakes_subscribers_only_on_change() {
        let cache = SnapshotCache::new();
        let key = ProxyKey::new("p", fsm_identity::ProxyKind::Sidecar, "sa", "ns");
        assert!(
            !cache.set(&key, snap(b"x")),
            "a proxy without a stream gets no entry"
        );
        assert!(cache.status().is_empty());
        let mut rx = cache.subscribe(&key);
        assert!(cache.set(&key, snap(b"x")));
        assert!(rx.has_changed().expect("open"));
        rx.borrow_and_update();
        assert!(!cache.set(&key, snap(b"x")));
        assert!(!rx.has_changed().expect("open"));
        assert_eq!(cache.connected(), vec![key.clone()]);
        cache.record(
            &key,
            T,
            SyncEvent::Acked {
                version: "v".into(),
            },
        );
        assert_eq!(
            cache.status()[&key].types[T].acked_version.as_deref(),
            Some("v")
        );
        cache.unsubscribe(&key);
        assert!(cache.connected().is_empty());
        assert!(
            cache.get(&key).is_none(),
            "a disconnected proxy is forgotten"
        );
    }

    #[tokio::test]
    async fn changed_types_are_stamped_with_the_earliest_observation_until_taken() {
        const U: TypeUrl = "type.example/U";
        let cache = SnapshotCache::new();
        let key = ProxyKey::new("p", fsm_identity::ProxyKind::Sidecar, "sa", "ns");
        let _rx = cache.subscribe(&key);
        let observed = cache.observed(&key).expect("subscribed");
        let both = |t: &'static [u8], u: &'static [u8]| {
            Snapshot::new([
                (T, vec![Resource::new("a", t)]),
                (U, vec![Resource::new("b", u)]),
            ])
        };
        let t0 = Instant::now();
        let t1 = t0 + std::time::Duration::from_millis(5);
        assert!(
            cache.set(&key, both(b"1", b"1")),
            "no observation: no stamp"
        );
        assert!(observed.take(&[T, U]).is_empty());
        assert!(cache.set_observed(&key, both(b"2", b"1"), Some(t1)));
        assert!(cache.set_observed(&key, both(b"3", b"1"), Some(t0)));
        assert!(
            !cache.set_observed(&key, both(b"3", b"1"), Some(t1)),
            "unchanged"
        );
        assert_eq!(observed.take(&[U]), vec![], "U never changed");
        assert_eq!(observed.take(&[T, U]), vec![(T, t0)], "the earliest of T");
        assert!(observed.take(&[T]).is_empty(), "taken once");
    }

    #[tokio::test]
    async fn refusing_a_proxy_tells_its_streams_once() {
        let cache = SnapshotCache::new();
        let key = ProxyKey::new("p", fsm_identity::ProxyKind::Sidecar, "sa", "ns");
        let other = ProxyKey::new("p", fsm_identity::ProxyKind::Sidecar, "evil", "ns");
        assert!(!cache.refuse(&key, "E5004: no"), "nobody to tell");
        let mut rx = cache.subscribe(&key);
        let mut other_rx = cache.subscribe(&other);
        assert_eq!(*rx.borrow_and_update(), Published::Pending);
        assert!(cache.set(&other, snap(b"x")));
        assert!(
            !rx.has_changed().expect("open"),
            "the same UUID under another identity is another proxy"
        );
        assert!(cache.refuse(&key, "E5004: no"));
        assert_eq!(
            *rx.borrow_and_update(),
            Published::Refused("E5004: no".into())
        );
        assert!(!cache.refuse(&key, "E5004: no"));
        assert!(other_rx.borrow_and_update().snapshot().is_some());
        assert!(cache.get(&key).is_none());
    }
}
