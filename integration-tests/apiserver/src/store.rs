//! The object store: etcd-like storage with one global resourceVersion, a bounded event history
//! for watches, and the write rules of the real API server's generic registry.
//!
//! Everything that changes state runs under one write lock and emits exactly one event per
//! changed object, so HTTP writes and in-process writes ([`Store`] methods) are indistinguishable
//! to watchers.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use parking_lot::RwLock;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::watch;

use crate::meta;
use crate::patch::PatchKind;
use crate::registry::{GroupResource, Registry, ResourceType};
use crate::selector::{FieldSelector, LabelSelector};
use crate::services::IpAllocator;
use crate::status::ApiError;

mod gc;
mod read;
mod write;

// === Types ===

/// A handle on the server's state, for tests to load and inspect objects in-process. Cheap to
/// clone; every clone sees the same state.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    state: RwLock<State>,
    /// The latest resourceVersion; watchers wait on it.
    rv_tx: watch::Sender<u64>,
}

/// (namespace or "" for cluster-scoped, name): sorts like etcd keys within one resource.
pub(crate) type ObjKey = (String, String);

type Objects = BTreeMap<ObjKey, Arc<Value>>;

static EMPTY: Objects = BTreeMap::new();

struct State {
    rv: u64,
    registry: Registry,
    objects: HashMap<GroupResource, Objects>,
    history: VecDeque<Event>,
    /// Events with `rv <= dropped_rv` are gone from the history: a live watch behind it has
    /// missed events.
    dropped_rv: u64,
    /// Resuming (a watch from a resourceVersion, a list continuation, an exact list) from
    /// below this is a 410. Never below `dropped_rv`; above it after [`Store::compact`].
    oldest_valid_rv: u64,
    history_limit: usize,
    cluster_ips: IpAllocator,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EventKind {
    Added,
    Modified,
    Deleted,
}

/// One change, as kept in the history.
#[derive(Debug, Clone)]
pub(crate) struct Event {
    pub rv: u64,
    pub gr: GroupResource,
    pub kind: EventKind,
    /// The new state; for deletions the last state with the deletion's resourceVersion.
    pub object: Arc<Value>,
    /// The state before the change (selectors need it to turn "stopped matching" into DELETED).
    pub prev: Option<Arc<Value>>,
}

/// How a write treats parts of the object the caller may not own.
#[derive(Debug, Clone, Default)]
pub(crate) struct WriteOpts {
    /// The write came through the `/status` subresource.
    pub status: bool,
    /// In-process fixture loads: status is written as given and custom resources may be
    /// updated without a resourceVersion.
    pub fixture: bool,
    pub dry_run: bool,
    /// `fieldValidation=Strict`: unknown fields are errors instead of being dropped.
    pub strict: bool,
    /// The object is the result of a dry run of this same create (admission called validating
    /// webhooks with it): keep its `uid` and `creationTimestamp`.
    pub keep_identity: bool,
}

/// What a PATCH turns into, before admission sees it.
pub(crate) enum PatchTarget {
    /// Server-side apply of an object that does not exist: a create of this object.
    Create(Value),
    /// An update of `old` to `doc` (the patched object, carrying a resourceVersion).
    Update { old: Arc<Value>, doc: Value },
}

/// `DeleteOptions.preconditions`, and its `propagationPolicy`.
#[derive(Debug, Clone, Default)]
pub(crate) struct Preconditions {
    pub uid: Option<String>,
    pub resource_version: Option<String>,
    /// `None`: the resource's default ([`ResourceType::default_propagation`]).
    pub propagation: Option<Propagation>,
}

/// `DeleteOptions.propagationPolicy`: what happens to the objects the deleted one owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Propagation {
    /// Dependents are deleted after their owner (the default of most kinds).
    Background,
    /// Dependents are deleted before their owner.
    Foreground,
    /// Dependents stay; their references to the owner are removed.
    Orphan,
}

/// Which objects a list or watch wants.
#[derive(Debug, Clone, Default)]
pub(crate) struct Filter {
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct ListRequest {
    pub limit: Option<usize>,
    pub continue_token: Option<String>,
    pub resource_version: Option<String>,
    pub resource_version_match: Option<String>,
}

pub(crate) struct ListPage {
    pub items: Vec<Arc<Value>>,
    pub resource_version: u64,
    pub continue_token: Option<String>,
    pub remaining: Option<usize>,
}

// === Filter ===

impl Filter {
    pub fn matches(&self, obj: &Value) -> bool {
        if let Some(ns) = &self.namespace
            && meta::namespace(obj) != ns
        {
            return false;
        }
        self.labels.matches_object(obj) && self.fields.matches_object(obj)
    }

    fn has_selectors(&self) -> bool {
        !self.labels.is_empty() || !self.fields.is_empty()
    }
}

// === Store ===

impl Store {
    /// A store holding only the built-in kinds, keeping the last `history_limit` events.
    pub fn new(history_limit: usize) -> Self {
        let (rv_tx, _) = watch::channel(1);
        Store {
            inner: Arc::new(Inner {
                state: RwLock::new(State {
                    // Like a fresh etcd, the first write gets resourceVersion 2.
                    rv: 1,
                    registry: Registry::with_builtins(),
                    objects: HashMap::new(),
                    history: VecDeque::new(),
                    dropped_rv: 1,
                    oldest_valid_rv: 1,
                    history_limit: history_limit.max(1),
                    cluster_ips: IpAllocator::default(),
                }),
                rv_tx,
            }),
        }
    }

    /// Runs a write under the lock, then wakes watchers if it changed anything.
    fn write<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let (out, rv) = {
            let mut st = self.inner.state.write();
            let out = f(&mut st);
            (out, st.rv)
        };
        // Only ever move forward: a writer that lost the race to notify is covered by the
        // later one, since watchers read everything up to the current version.
        self.inner.rv_tx.send_if_modified(|cur| {
            let newer = rv > *cur;
            if newer {
                *cur = rv;
            }
            newer
        });
        out
    }

    // --- the public, in-process API ---

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.inner.state.read().rv
    }

    /// Number of events kept for watches.
    pub fn history_len(&self) -> usize {
        self.inner.state.read().history.len()
    }

    /// Drops the whole event history, like an etcd compaction, and expires every
    /// resourceVersion handed out so far: a watch started from any of them, a list continue
    /// token, or an exact list gets 410 Gone (so clients relist). To make that hold even for a
    /// client that is fully up to date, the global resourceVersion moves on by one (as if some
    /// unrelated write happened). Open watches keep streaming: they missed nothing. Returns
    /// the new oldest valid resourceVersion.
    pub fn compact(&self) -> u64 {
        self.write(|st| {
            st.history.clear();
            st.dropped_rv = st.rv;
            st.rv += 1;
            st.oldest_valid_rv = st.rv;
            st.rv
        })
    }

    /// `Err(oldest valid)` when a watch may not start from `rv` (it has been compacted).
    pub(crate) fn check_resume(&self, rv: u64) -> Result<(), u64> {
        let st = self.inner.state.read();
        if rv < st.oldest_valid_rv {
            Err(st.oldest_valid_rv)
        } else {
            Ok(())
        }
    }

    /// Creates an object given as a whole (`apiVersion`, `kind`, `metadata.namespace` — which
    /// defaults to `default` — all read from it). Unlike a POST, `status` is kept as given, so
    /// fixtures can carry pod IPs and conditions.
    pub fn create<T: Serialize + ?Sized>(&self, obj: &T) -> Result<Value, ApiError> {
        let obj = to_value(obj)?;
        self.write(|st| {
            let (rt, ns) = st.resolve_object(&obj)?;
            st.create(&rt, ns.as_deref(), obj, &fixture())
                .map(|o| st.output(&rt, &o))
        })
    }

    /// Creates the object, or merges it into the existing one (JSON merge semantics), status
    /// included. The in-process counterpart of server-side apply.
    pub fn apply<T: Serialize + ?Sized>(&self, obj: &T) -> Result<Value, ApiError> {
        let obj = to_value(obj)?;
        self.write(|st| st.apply_fixture(obj))
    }

    /// [`Store::apply`] for many objects under one lock: the fast way to load thousands of
    /// objects. Each still gets its own resourceVersion and watch event. Stops at the first
    /// error (earlier objects stay applied).
    pub fn apply_all<T, I>(&self, objs: I) -> Result<Vec<Value>, ApiError>
    where
        T: Serialize,
        I: IntoIterator<Item = T>,
    {
        let values = objs
            .into_iter()
            .map(|o| to_value(&o))
            .collect::<Result<Vec<_>, _>>()?;
        self.write(|st| values.into_iter().map(|o| st.apply_fixture(o)).collect())
    }

    /// Applies every document of a multi-document YAML string.
    pub fn apply_yaml(&self, yaml: &str) -> Result<Vec<Value>, ApiError> {
        let docs = parse_yaml_docs(yaml).map_err(|e| ApiError::bad_request(e.to_string()))?;
        self.apply_all(docs)
    }

    /// Replaces an object (status as given). Checks `metadata.resourceVersion` when set.
    pub fn update<T: Serialize + ?Sized>(&self, obj: &T) -> Result<Value, ApiError> {
        let obj = to_value(obj)?;
        self.write(|st| {
            let (rt, ns) = st.resolve_object(&obj)?;
            let name = meta::name(&obj).to_string();
            st.update(&rt, ns.as_deref(), &name, obj, &fixture())
                .map(|o| st.output(&rt, &o))
        })
    }

    /// Changes only the status of an object, as a PUT to `/status` does.
    pub fn update_status<T: Serialize + ?Sized>(&self, obj: &T) -> Result<Value, ApiError> {
        let obj = to_value(obj)?;
        self.write(|st| {
            let (rt, ns) = st.resolve_object(&obj)?;
            let name = meta::name(&obj).to_string();
            let opts = WriteOpts {
                status: true,
                ..fixture()
            };
            st.update(&rt, ns.as_deref(), &name, obj, &opts)
                .map(|o| st.output(&rt, &o))
        })
    }

    /// Deletes an object; returns its last state. Deleting a namespace deletes what it holds;
    /// deleting a CRD deletes its custom resources and stops serving them.
    pub fn delete(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Value, ApiError> {
        self.write(|st| {
            let rt = st.resolve_kind(api_version, kind)?;
            let ns = scoped_namespace(&rt, namespace);
            st.delete(&rt, ns.as_deref(), name, &Preconditions::default(), false)
                .map(|o| st.output(&rt, &o))
        })
    }

    pub fn get(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        let st = self.inner.state.read();
        let rt = st.resolve_kind(api_version, kind).ok()?;
        let ns = scoped_namespace(&rt, namespace);
        st.get(&rt, ns.as_deref(), name)
            .ok()
            .map(|o| st.output(&rt, &o))
    }

    /// All objects of a kind, in one namespace or (with `None`) in all.
    pub fn list(&self, api_version: &str, kind: &str, namespace: Option<&str>) -> Vec<Value> {
        let st = self.inner.state.read();
        let Ok(rt) = st.resolve_kind(api_version, kind) else {
            return Vec::new();
        };
        let filter = Filter {
            namespace: namespace.map(String::from),
            ..Filter::default()
        };
        st.current(&rt.group_resource())
            .values()
            .filter(|o| filter.matches(o))
            .map(|o| st.output(&rt, o))
            .collect()
    }

    /// Typed [`Store::get`].
    pub fn get_as<K>(&self, namespace: Option<&str>, name: &str) -> Option<K>
    where
        K: kube::Resource<DynamicType = ()> + DeserializeOwned,
    {
        let v = self.get(&K::api_version(&()), &K::kind(&()), namespace, name)?;
        serde_json::from_value(v).ok()
    }

    /// Typed [`Store::list`]; objects that fail to decode as `K` are skipped.
    pub fn list_as<K>(&self, namespace: Option<&str>) -> Vec<K>
    where
        K: kube::Resource<DynamicType = ()> + DeserializeOwned,
    {
        self.list(&K::api_version(&()), &K::kind(&()), namespace)
            .into_iter()
            .filter_map(|v| serde_json::from_value(v).ok())
            .collect()
    }

    /// Typed [`Store::delete`].
    pub fn delete_as<K>(&self, namespace: Option<&str>, name: &str) -> Result<Value, ApiError>
    where
        K: kube::Resource<DynamicType = ()>,
    {
        self.delete(&K::api_version(&()), &K::kind(&()), namespace, name)
    }

    /// Whether `apiVersion`/`kind` is served (built-in, or from an established CRD).
    pub fn is_served(&self, api_version: &str, kind: &str) -> bool {
        self.inner
            .state
            .read()
            .resolve_kind(api_version, kind)
            .is_ok()
    }

    /// Creates (or updates) every CustomResourceDefinition found in `*.yaml`, `*.yml` and
    /// `*.json` files under `dir` (recursively); other documents are ignored. Returns how many
    /// CRDs were loaded.
    pub fn load_crd_dir(&self, dir: &Path) -> anyhow::Result<usize> {
        let mut files = Vec::new();
        collect_files(dir, &mut files)
            .with_context(|| format!("reading CRD directory {}", dir.display()))?;
        files.sort();
        let mut count = 0;
        for file in files {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let docs =
                parse_yaml_docs(&text).with_context(|| format!("parsing {}", file.display()))?;
            for doc in docs {
                if doc.get("kind").and_then(Value::as_str) != Some("CustomResourceDefinition") {
                    continue;
                }
                let name = meta::name(&doc).to_string();
                self.apply(&doc)
                    .with_context(|| format!("loading CRD {name:?} from {}", file.display()))?;
                count += 1;
            }
        }
        Ok(count)
    }

    // --- what the HTTP layer uses ---

    pub(crate) fn registry(&self) -> Registry {
        self.inner.state.read().registry.clone()
    }

    pub(crate) fn resolve(
        &self,
        group: &str,
        version: &str,
        plural: &str,
    ) -> Option<Arc<ResourceType>> {
        self.inner.state.read().registry.get(group, version, plural)
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.rv_tx.subscribe()
    }

    pub(crate) fn http_create(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        obj: Value,
        opts: &WriteOpts,
    ) -> Result<Value, ApiError> {
        self.write(|st| st.create(rt, ns, obj, opts).map(|o| st.output(rt, &o)))
    }

    pub(crate) fn http_update(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        name: &str,
        obj: Value,
        opts: &WriteOpts,
    ) -> Result<Value, ApiError> {
        self.write(|st| {
            st.update(rt, ns, name, obj, opts)
                .map(|o| st.output(rt, &o))
        })
    }

    /// Returns the patched object and whether the patch created it (apply on a missing object).
    pub(crate) fn http_patch(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        name: &str,
        kind: &PatchKind,
        body: &[u8],
        opts: &WriteOpts,
    ) -> Result<(Value, bool), ApiError> {
        self.write(|st| {
            st.patch(rt, ns, name, kind, body, opts)
                .map(|(o, created)| (st.output(rt, &o), created))
        })
    }

    /// What a PATCH would write, computed against the current state without writing.
    pub(crate) fn http_patch_target(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        name: &str,
        kind: &PatchKind,
        body: &[u8],
        status: bool,
    ) -> Result<PatchTarget, ApiError> {
        self.inner
            .state
            .read()
            .patch_target(rt, ns, name, kind, body, status)
    }

    pub(crate) fn http_delete(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        name: &str,
        pre: &Preconditions,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        self.write(|st| {
            st.delete(rt, ns, name, pre, dry_run)
                .map(|o| st.output(rt, &o))
        })
    }

    pub(crate) fn http_delete_collection(
        &self,
        rt: &ResourceType,
        filter: &Filter,
        propagation: Option<Propagation>,
        dry_run: bool,
    ) -> Result<Vec<Value>, ApiError> {
        self.write(|st| {
            let keys: Vec<ObjKey> = st
                .current(&rt.group_resource())
                .iter()
                .filter(|(_, o)| filter.matches(o))
                .map(|(k, _)| k.clone())
                .collect();
            let mut out = Vec::new();
            for (ns, name) in keys {
                let ns = (!ns.is_empty()).then_some(ns);
                let pre = Preconditions {
                    propagation,
                    ..Preconditions::default()
                };
                let o = st.delete(rt, ns.as_deref(), &name, &pre, dry_run)?;
                out.push(st.output(rt, &o));
            }
            Ok(out)
        })
    }

    pub(crate) fn http_get(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        name: &str,
    ) -> Result<Arc<Value>, ApiError> {
        self.inner.state.read().get(rt, ns, name)
    }

    pub(crate) fn http_list(
        &self,
        rt: &ResourceType,
        filter: &Filter,
        req: &ListRequest,
    ) -> Result<ListPage, ApiError> {
        self.inner.state.read().list(rt, filter, req)
    }

    /// The objects a watch starts with (current state, filtered) and the resourceVersion they
    /// are as of.
    pub(crate) fn watch_snapshot(
        &self,
        rt: &ResourceType,
        filter: &Filter,
    ) -> (Vec<Arc<Value>>, u64) {
        let st = self.inner.state.read();
        let items = st
            .current(&rt.group_resource())
            .values()
            .filter(|o| filter.matches(o))
            .cloned()
            .collect();
        (items, st.rv)
    }

    /// Up to `max` events of `gr` after `cursor`, and the cursor to continue from. `Err` carries
    /// the oldest resourceVersion still watchable when events after `cursor` have been dropped.
    pub(crate) fn events_after(
        &self,
        gr: &GroupResource,
        cursor: u64,
        max: usize,
    ) -> Result<(Vec<Event>, u64), u64> {
        let st = self.inner.state.read();
        if cursor < st.dropped_rv {
            return Err(st.oldest_valid_rv.max(st.dropped_rv + 1));
        }
        let start = st.history.partition_point(|e| e.rv <= cursor);
        let mut events = Vec::new();
        for e in st.history.range(start..) {
            if e.gr != *gr {
                continue;
            }
            events.push(e.clone());
            if events.len() == max {
                return Ok((events, e.rv));
            }
        }
        Ok((events, cursor.max(st.rv)))
    }
}

fn fixture() -> WriteOpts {
    WriteOpts {
        fixture: true,
        ..WriteOpts::default()
    }
}

fn to_value<T: Serialize + ?Sized>(obj: &T) -> Result<Value, ApiError> {
    serde_json::to_value(obj).map_err(|e| ApiError::bad_request(format!("encoding object: {e}")))
}

fn scoped_namespace(rt: &ResourceType, namespace: Option<&str>) -> Option<String> {
    rt.namespaced
        .then(|| namespace.unwrap_or("default").to_string())
}

fn parse_yaml_docs(text: &str) -> Result<Vec<Value>, serde_yaml_ng::Error> {
    use serde::Deserialize;
    let mut docs = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(text) {
        let v = Value::deserialize(doc)?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    Ok(docs)
}

fn collect_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_files(&path, out)?;
        } else if path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
        {
            out.push(path);
        }
    }
    Ok(())
}

fn key_of(obj: &Value) -> ObjKey {
    (
        meta::namespace(obj).to_string(),
        meta::name(obj).to_string(),
    )
}

// === State ===

impl State {
    fn current(&self, gr: &GroupResource) -> &Objects {
        self.objects.get(gr).unwrap_or(&EMPTY)
    }

    fn resolve_kind(&self, api_version: &str, kind: &str) -> Result<Arc<ResourceType>, ApiError> {
        self.registry.by_kind(api_version, kind).ok_or_else(|| {
            ApiError::new(
                404,
                "NotFound",
                format!("the server could not find the requested resource (kind {kind} in {api_version})"),
            )
        })
    }

    fn resolve_object(&self, obj: &Value) -> Result<(Arc<ResourceType>, Option<String>), ApiError> {
        let api_version = obj
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let kind = obj.get("kind").and_then(Value::as_str).unwrap_or_default();
        let rt = self.resolve_kind(api_version, kind)?;
        let ns = meta::namespace(obj);
        let ns = scoped_namespace(&rt, (!ns.is_empty()).then_some(ns));
        Ok((rt, ns))
    }

    fn output(&self, rt: &ResourceType, obj: &Value) -> Value {
        rt.render(obj, false)
    }

    fn get(&self, rt: &ResourceType, ns: Option<&str>, name: &str) -> Result<Arc<Value>, ApiError> {
        let key = (ns.unwrap_or_default().to_string(), name.to_string());
        self.current(&rt.group_resource())
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(&rt.group, &rt.plural, name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ns(name: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    }

    fn cm(ns: &str, name: &str, labels: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": name, "namespace": ns, "labels": labels}, "data": {"k": "v"}})
    }

    fn ok<T>(r: Result<T, ApiError>) -> T {
        r.unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn resource_versions_are_global_and_increasing() {
        let s = Store::new(100);
        let a = ok(s.create(&ns("a")));
        let b = ok(s.create(&cm("a", "x", json!({}))));
        let ra: u64 = meta::resource_version(&a).parse().unwrap_or_default();
        let rb: u64 = meta::resource_version(&b).parse().unwrap_or_default();
        assert!(rb > ra && ra > 1);
        assert_eq!(s.resource_version(), rb);
        assert_eq!(a["status"]["phase"], "Active");
        assert!(!meta::uid(&b).is_empty());
        assert_eq!(meta::generation(&b), 1);
    }

    #[test]
    fn namespace_must_exist_and_names_are_unique() {
        let s = Store::new(100);
        let err = s.create(&cm("nope", "x", json!({})));
        assert!(err.is_err_and(|e| e.code == 404 && e.message == "namespaces \"nope\" not found"));
        ok(s.create(&ns("a")));
        ok(s.create(&cm("a", "x", json!({}))));
        let err = s.create(&cm("a", "x", json!({})));
        assert!(err.is_err_and(|e| e.code == 409 && e.reason == "AlreadyExists"));
    }

    #[test]
    fn no_op_updates_keep_the_resource_version() {
        let s = Store::new(100);
        ok(s.create(&ns("a")));
        let first = ok(s.apply(&cm("a", "x", json!({"l": "1"}))));
        let again = ok(s.apply(&cm("a", "x", json!({"l": "1"}))));
        assert_eq!(
            meta::resource_version(&first),
            meta::resource_version(&again)
        );
        let changed = ok(s.apply(&cm("a", "x", json!({"l": "2"}))));
        assert_ne!(
            meta::resource_version(&first),
            meta::resource_version(&changed)
        );
        // Labels are metadata: no generation bump.
        assert_eq!(meta::generation(&changed), 1);
        let mut data = cm("a", "x", json!({"l": "2"}));
        data["data"]["k"] = json!("w");
        assert_eq!(meta::generation(&ok(s.apply(&data))), 2);
    }

    #[test]
    fn stale_updates_conflict() {
        let s = Store::new(100);
        ok(s.create(&ns("a")));
        let mut obj = ok(s.create(&cm("a", "x", json!({}))));
        ok(s.apply(&cm("a", "x", json!({"changed": "yes"}))));
        obj["data"]["k"] = json!("stale");
        let err = s.update(&obj);
        assert!(err.is_err_and(|e| e.code == 409 && e.reason == "Conflict"));
    }

    #[test]
    fn paginated_lists_read_a_consistent_snapshot() {
        let s = Store::new(1000);
        ok(s.create(&ns("a")));
        let cms: Vec<Value> = (0..10)
            .map(|i| cm("a", &format!("c{i:02}"), json!({})))
            .collect();
        ok(s.apply_all(cms));
        let rt = s
            .resolve("", "v1", "configmaps")
            .unwrap_or_else(|| panic!("configmaps"));
        let filter = Filter::default();
        let mut req = ListRequest {
            limit: Some(4),
            ..ListRequest::default()
        };
        let first = ok(s.http_list(&rt, &filter, &req));
        assert_eq!(first.items.len(), 4);
        assert_eq!(first.remaining, Some(6));
        // Changes after the first page do not show up in later pages.
        ok(s.delete("v1", "ConfigMap", Some("a"), "c09"));
        ok(s.create(&cm("a", "c99", json!({}))));
        let mut names = Vec::new();
        req.continue_token = first.continue_token.clone();
        loop {
            let page = ok(s.http_list(&rt, &filter, &req));
            assert_eq!(page.resource_version, first.resource_version);
            names.extend(page.items.iter().map(|o| meta::name(o).to_string()));
            match page.continue_token {
                Some(t) => req.continue_token = Some(t),
                None => break,
            }
        }
        assert_eq!(names, vec!["c04", "c05", "c06", "c07", "c08", "c09"]);

        // After compaction the old token is expired.
        s.compact();
        req.continue_token = first.continue_token;
        let err = s.http_list(&rt, &filter, &req);
        assert!(err.is_err_and(|e| e.code == 410 && e.reason == "Expired"));
    }

    #[test]
    fn history_is_bounded() {
        let s = Store::new(3);
        ok(s.create(&ns("a")));
        for i in 0..5 {
            ok(s.create(&cm("a", &format!("c{i}"), json!({}))));
        }
        assert_eq!(s.history_len(), 3);
        let gr = GroupResource {
            group: String::new(),
            resource: "configmaps".into(),
        };
        assert!(s.events_after(&gr, 2, 100).is_err());
        let cur = s.resource_version();
        assert!(
            s.events_after(&gr, cur - 3, 100)
                .is_ok_and(|(e, c)| e.len() == 3 && c == cur)
        );
    }

    #[test]
    fn compaction_expires_resume_points_but_not_live_watches() {
        let s = Store::new(100);
        ok(s.create(&ns("a")));
        let before = s.resource_version();
        let oldest = s.compact();
        assert_eq!(oldest, before + 1);
        assert_eq!(s.resource_version(), oldest);
        assert_eq!(s.history_len(), 0);
        assert_eq!(s.check_resume(before), Err(oldest));
        assert_eq!(s.check_resume(oldest), Ok(()));
        // A watch that had seen everything up to `before` keeps going.
        let gr = GroupResource {
            group: String::new(),
            resource: "configmaps".into(),
        };
        ok(s.create(&cm("a", "x", json!({}))));
        assert!(
            s.events_after(&gr, before, 10)
                .is_ok_and(|(e, _)| e.len() == 1)
        );
        // One that was behind the compaction missed events.
        assert!(s.events_after(&gr, before - 1, 10).is_err());
    }

    #[test]
    fn deleting_a_namespace_deletes_its_contents() {
        let s = Store::new(100);
        ok(s.create(&ns("a")));
        ok(s.create(&ns("b")));
        ok(s.create(&cm("a", "x", json!({}))));
        ok(s.create(&cm("b", "y", json!({}))));
        let rbac = "rbac.authorization.k8s.io/v1";
        let role_ref = json!({"kind": "ClusterRole", "name": "view"});
        ok(
            s.create(&json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "a"},
            "spec": {"selector": {"matchLabels": {"app": "web"}},
                     "template": {"metadata": {"labels": {"app": "web"}},
                                  "spec": {"containers": [{"name": "c", "image": "i"}]}}}})),
        );
        ok(s.create(&json!({"apiVersion": rbac, "kind": "RoleBinding",
            "metadata": {"name": "view", "namespace": "a"}, "roleRef": role_ref})));
        ok(s.create(&json!({"apiVersion": rbac, "kind": "ClusterRole",
            "metadata": {"name": "view"}})));
        ok(s.delete("v1", "Namespace", None, "a"));
        assert!(s.list("v1", "ConfigMap", None).len() == 1);
        assert!(s.get("v1", "ConfigMap", Some("b"), "y").is_some());
        assert!(s.list("apps/v1", "Deployment", None).is_empty());
        assert!(s.list(rbac, "RoleBinding", None).is_empty());
        assert!(s.get(rbac, "ClusterRole", None, "view").is_some());
    }

    #[test]
    fn deployment_generation_and_status() {
        let s = Store::new(100);
        ok(s.create(&ns("default")));
        let created = s.create(&json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web"},
            "spec": {"selector": {"matchLabels": {"app": "web"}},
                     "template": {"metadata": {"labels": {"app": "web"}},
                                  "spec": {"containers": [{"name": "c", "image": "i"}]}}}}));
        let created = created.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(created["metadata"]["generation"], 1);
        assert_eq!(created["spec"]["replicas"], 1, "defaulted");
        let mut status = created.clone();
        status["status"] = json!({"replicas": 1, "readyReplicas": 1, "availableReplicas": 1});
        let written = s.update_status(&status).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(written["metadata"]["generation"], 1);
        assert_eq!(written["status"]["readyReplicas"], 1);
        let mut scaled = written.clone();
        scaled["spec"]["replicas"] = json!(2);
        let scaled = s.update(&scaled).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(scaled["metadata"]["generation"], 2);
        let mut bad = scaled.clone();
        bad["status"]["readyReplicas"] = json!(3);
        let err = s.update_status(&bad).err();
        assert!(err.is_some_and(|e| e.code == 422
            && e.message.contains(
                "status.readyReplicas: Invalid value: 3: cannot be greater than status.replicas"
            )));
    }
}
