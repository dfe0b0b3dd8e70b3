use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use fsm_crds::policy::v1alpha1::Egress;
use fsm_crds::smi::access::v1alpha3::{TrafficTarget, TrafficTargetRuleKind};
use fsm_crds::smi::split::v1alpha4::TrafficSplit;
use fsm_errcode::ErrCode;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::record::{
    EndpointsRecord, NamespaceRecord, Namespaced, PodRecord, ServicePortRecord, ServiceRecord,
    SliceRecord, Strings,
};
use crate::{
    CatalogEvent, Kind, MESH_CONFIG_NAME, MeshConfig, MeshKind, MeshObject, ObjectKey,
    PROXY_UUID_LABEL, Scope,
};

/// Settings of the control plane that decide which objects belong to the mesh.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CatalogSettings {
    /// Namespaces labelled `flomesh.io/monitored-by=<mesh_name>` are part of the mesh.
    pub mesh_name: String,
    /// Where `fsm-mesh-config` lives.
    pub fsm_namespace: String,
}

impl Default for CatalogSettings {
    fn default() -> Self {
        CatalogSettings {
            mesh_name: "fsm".into(),
            fsm_namespace: "fsm-system".into(),
        }
    }
}

type NsName = (String, String);

/// A stored pod's namespace and name, sharing the record's strings.
type PodId = (Arc<str>, Arc<str>);

fn ns_name((namespace, name): &PodId) -> NsName {
    (namespace.to_string(), name.to_string())
}

/// A pod's sidecar as the control plane authenticates it: `<uuid>.sidecar.<sa>.<ns>`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SidecarProxy {
    pub namespace: String,
    pub pod: String,
    pub uuid: String,
    pub service_account: String,
    /// The pod's `metadata.uid` (absent in manifests that do not set one): what the pod's
    /// bootstrap Secret names as its owner, so that Kubernetes deletes it with the pod.
    pub pod_uid: Option<String>,
}

/// A pod whose `fsm-proxy-uuid` label names a UUID another pod holds: it gets no credentials and
/// no configuration (FSM's E5004) while the owner keeps both.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UuidConflict {
    pub uuid: String,
    /// `(namespace, name)` of the pod that holds the UUID.
    pub owner: NsName,
    /// `(namespace, name)` of the pod refused.
    pub claimant: NsName,
}

impl std::fmt::Display for UuidConflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pod {}/{} carries label {PROXY_UUID_LABEL}={}, which pod {}/{} already holds; it gets no credentials and no configuration",
            self.claimant.0, self.claimant.1, self.uuid, self.owner.0, self.owner.1
        )
    }
}

/// When a pod claimed its proxy UUID: the API server's creation time (which no pod author can
/// set), then the order the catalog first saw the pod. Pods without a creation time (manifests)
/// come after those with one, in the order they were seen.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct ClaimOrder {
    untimed: bool,
    created: Option<Time>,
    seen: u64,
}

/// A stored pod: its record, and when the catalog first saw it (kept across updates of the pod so
/// an update never moves its UUID claim behind a later pod's).
#[derive(Clone, Debug)]
struct StoredPod {
    record: PodRecord,
    seen: u64,
}

/// An object ready to store: validated, and for the built-in kinds reduced to its record.
#[derive(Clone, Debug)]
enum Record {
    Namespace(NamespaceRecord),
    Service(ServiceRecord),
    Endpoints(EndpointsRecord),
    EndpointSlice(SliceRecord),
    Pod(PodRecord),
    ServiceAccount,
    MeshConfig(Box<MeshConfig>),
    Policy(Box<MeshObject>),
}

/// The current mesh objects and the indexes the compiler needs.
///
/// Built-in objects are kept as compact records of what the mesh reads (see [`PodRecord`],
/// [`ServiceRecord`]); MeshConfig and the policies (few, read whole by the compiler) as they are.
#[derive(Clone, Debug, Default)]
pub struct Catalog {
    settings: CatalogSettings,
    /// Strings the records share (namespaces, service accounts, labels, port names).
    strings: Strings,
    namespaces: BTreeMap<Arc<str>, NamespaceRecord>,
    services: Namespaced<ServiceRecord>,
    endpoints: Namespaced<EndpointsRecord>,
    slices: Namespaced<SliceRecord>,
    pods: Namespaced<Box<StoredPod>>,
    service_accounts: Namespaced<()>,
    mesh_config: Option<MeshConfig>,
    /// SMI and FSM policy objects, whole.
    policies: BTreeMap<ObjectKey, MeshObject>,
    /// Objects refused for failing FSM's semantic validation, with why; the previous version of
    /// each (if any) stays in force.
    rejected: BTreeMap<ObjectKey, Rejection>,
    /// Objects of the relists in progress (between `Init` and `InitDone`), by scope, already
    /// reduced to records (`None`: refused) so a relist of every pod never holds them whole.
    relists: BTreeMap<Scope, Vec<(ObjectKey, Option<Record>)>>,
    /// Pods labelled with each proxy UUID, earliest claim first: the first one owns the UUID.
    /// Normally exactly one; more only when a pod copies another pod's label.
    uuid_claims: HashMap<Arc<str>, Vec<(ClaimOrder, PodId)>>,
    next_seen: u64,
    pods_by_ip: HashMap<IpAddr, PodId>,
    /// (namespace, service name) → names of its EndpointSlices.
    slices_by_service: Namespaced<BTreeSet<Arc<str>>>,
    /// What changed since the last [`Catalog::take_changes`].
    changes: ChangeSet,
}

/// What changed in the catalog, in terms the compiler's dependency rules need: the objects, and
/// for the objects whose old version is gone once replaced, what the old version referred to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChangeSet {
    /// Every object applied, updated or deleted.
    pub objects: BTreeSet<ObjectKey>,
    /// Services (namespace, name) whose Endpoints or EndpointSlices changed.
    pub endpoint_services: BTreeSet<(String, String)>,
    /// Proxy UUID labels of changed pods, old and new.
    pub pod_uuids: BTreeSet<String>,
    /// Addresses of changed pods, old and new.
    pub pod_ips: BTreeSet<IpAddr>,
    /// Service accounts (namespace, name) whose proxies' own part a policy change may have
    /// changed: the destinations of changed TrafficTargets, old and new, and of the
    /// TrafficTargets whose rules name a changed HTTPRouteGroup or TCPRoute (their inbound);
    /// the sources of changed Retry policies, old and new (their outbound routes).
    pub policy_service_accounts: BTreeSet<(String, String)>,
    /// Services (namespace, name) whose shared outbound entry a policy change may have changed:
    /// the root of a changed TrafficSplit, old and new, or of a TrafficSplit one of whose
    /// backends is a changed Service; the host of a changed UpstreamTrafficSetting, old and new
    /// (its circuit breakers; its rate limits are the service's pods' own part, in the
    /// setting's namespace).
    pub policy_services: BTreeSet<(String, String)>,
}

impl ChangeSet {
    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }

    /// Notes what an Endpoints object, old or new, refers to: its service.
    fn endpoints(&mut self, namespace: &str, name: &str) {
        self.endpoint_services
            .insert((namespace.to_owned(), name.to_owned()));
    }

    /// Notes what an EndpointSlice, old or new, refers to: its service.
    fn slice(&mut self, namespace: &str, slice: &SliceRecord) {
        if let Some(service) = &slice.service {
            self.endpoint_services
                .insert((namespace.to_owned(), service.to_string()));
        }
    }

    /// Notes what a pod, old or new, refers to: its proxy UUID and address.
    fn pod(&mut self, pod: &PodRecord) {
        if let Some(uuid) = pod.proxy_uuid() {
            self.pod_uuids.insert(uuid.to_owned());
        }
        if let Some(ip) = pod.ip() {
            self.pod_ips.insert(ip);
        }
    }
}

/// Why an object was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub code: ErrCode,
    /// The object, the field and what is wrong with it.
    pub message: String,
}

/// One address a service port resolves to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ResolvedEndpoint {
    pub ip: IpAddr,
    pub port: u16,
    /// The pod behind the address, when the catalog knows it.
    pub pod: Option<NsName>,
}

impl Catalog {
    pub fn new(settings: CatalogSettings) -> Self {
        Catalog {
            settings,
            ..Default::default()
        }
    }

    pub fn settings(&self) -> &CatalogSettings {
        &self.settings
    }

    /// Applies one source event. Returns whether the mesh changed.
    pub fn handle(&mut self, event: CatalogEvent) -> bool {
        match event {
            CatalogEvent::Init(scope) => {
                self.relists.insert(scope, Vec::new());
                false
            }
            CatalogEvent::InitApply(object) => {
                let kind = object.kind();
                let scope = if self.relists.contains_key(&Scope::Kind(kind)) {
                    Scope::Kind(kind)
                } else {
                    Scope::All
                };
                if !self.relists.contains_key(&scope) {
                    return self.apply(object);
                }
                let prepared = self.prepare(object);
                if let Some(buffer) = self.relists.get_mut(&scope) {
                    buffer.push(prepared);
                }
                false
            }
            CatalogEvent::InitDone(scope) => {
                let listed = self.relists.remove(&scope).unwrap_or_default();
                let keep: BTreeSet<&ObjectKey> = listed.iter().map(|(key, _)| key).collect();
                let stale: Vec<ObjectKey> = self
                    .keys()
                    .filter(|k| scope.covers(k.kind) && !keep.contains(k))
                    .collect();
                let mut changed = false;
                for key in stale {
                    changed |= self.delete(&key);
                }
                for (key, record) in listed {
                    if let Some(record) = record {
                        changed |= self.store(key, record);
                    }
                }
                changed
            }
            CatalogEvent::Synced => false,
            CatalogEvent::Apply(object) => self.apply(object),
            CatalogEvent::Delete(key) => self.delete(&key),
        }
    }

    /// Keys of every stored object.
    pub fn keys(&self) -> impl Iterator<Item = ObjectKey> + '_ {
        fn key<V>(kind: Kind) -> impl Fn((&Arc<str>, &Arc<str>, &V)) -> ObjectKey {
            move |(namespace, name, _)| ObjectKey {
                kind,
                namespace: namespace.to_string(),
                name: name.to_string(),
            }
        }
        self.namespaces
            .keys()
            .map(|name| ObjectKey {
                kind: Kind::Namespace,
                namespace: String::new(),
                name: name.to_string(),
            })
            .chain(self.services.iter().map(key(Kind::Service)))
            .chain(self.endpoints.iter().map(key(Kind::Endpoints)))
            .chain(self.slices.iter().map(key(Kind::EndpointSlice)))
            .chain(self.pods.iter().map(key(Kind::Pod)))
            .chain(self.service_accounts.iter().map(key(Kind::ServiceAccount)))
            .chain(self.mesh_config.iter().map(|mc| ObjectKey {
                kind: Kind::MeshConfig,
                namespace: mc.metadata.namespace.clone().unwrap_or_default(),
                name: mc.metadata.name.clone().unwrap_or_default(),
            }))
            .chain(self.policies.keys().cloned())
    }

    /// Stored policy objects of `kind`, by namespace and name.
    pub fn policies(&self, kind: Kind) -> impl Iterator<Item = &MeshObject> {
        self.policies
            .range(
                ObjectKey {
                    kind,
                    namespace: String::new(),
                    name: String::new(),
                }..,
            )
            .take_while(move |(key, _)| key.kind == kind)
            .map(|(_, object)| object)
    }

    /// The policy object stored under `key`.
    /// The policies of `kind` in `namespace`, in name order: what a proxy there reads, without
    /// walking the other namespaces' (policies select workloads of their own namespace).
    pub fn policies_in<'a>(
        &'a self,
        kind: Kind,
        namespace: &str,
    ) -> impl Iterator<Item = &'a MeshObject> {
        self.policies
            .range(
                ObjectKey {
                    kind,
                    namespace: namespace.to_owned(),
                    name: String::new(),
                }..,
            )
            .take_while(move |(key, _)| key.kind == kind && key.namespace == namespace)
            .map(|(_, object)| object)
    }

    /// [`Catalog::policies_in`] as their type.
    pub fn policies_of<'a, K: MeshKind>(&'a self, namespace: &str) -> impl Iterator<Item = &'a K> {
        self.policies_in(K::KIND, namespace)
            .filter_map(K::of_object)
    }

    /// The policy of type `K` named `name` in `namespace`.
    pub fn policy_of<K: MeshKind>(&self, namespace: &str, name: &str) -> Option<&K> {
        self.policy(&ObjectKey {
            kind: K::KIND,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
        .and_then(K::of_object)
    }

    pub fn policy(&self, key: &ObjectKey) -> Option<&MeshObject> {
        self.policies.get(key)
    }

    /// Objects currently refused, with the FSM error code and the field at fault.
    pub fn rejected(&self) -> &BTreeMap<ObjectKey, Rejection> {
        &self.rejected
    }

    /// Refuses `object` if it fails FSM's semantic validation. Returns whether it was refused.
    fn reject_invalid(&mut self, key: &ObjectKey, object: &MeshObject) -> bool {
        let errors = object.semantic_errors();
        let Some(first) = errors.first() else {
            self.rejected.remove(key);
            return false;
        };
        let code = rejection_code(key.kind, &first.field);
        let message = format!(
            "{key} is invalid: {}",
            errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        );
        let rejection = Rejection { code, message };
        if self.rejected.get(key) != Some(&rejection) {
            fsm_errcode::warn!(code, object = %key, "{}; the previous version stays in force", rejection.message);
        }
        self.rejected.insert(key.clone(), rejection);
        true
    }

    /// Validates `object` and reduces it to what the catalog stores (`None`: refused).
    fn prepare(&mut self, object: MeshObject) -> (ObjectKey, Option<Record>) {
        let kind = object.kind();
        // Kinds kept whole drop what the API server churns; the others keep only their record.
        let object = if kind == Kind::MeshConfig || kind.is_policy() {
            object.normalized()
        } else {
            object
        };
        let key = object.key();
        if self.reject_invalid(&key, &object) {
            return (key, None);
        }
        let strings = &mut self.strings;
        let record = match object {
            MeshObject::Namespace(o) => Record::Namespace(NamespaceRecord::new(&o, strings)),
            MeshObject::Service(o) => {
                let (namespace, name) = (strings.intern(&key.namespace), strings.intern(&key.name));
                Record::Service(ServiceRecord::new(&o, namespace, name, strings))
            }
            MeshObject::Endpoints(o) => Record::Endpoints(EndpointsRecord::new(&o, strings)),
            MeshObject::EndpointSlice(o) => Record::EndpointSlice(SliceRecord::new(&o, strings)),
            MeshObject::Pod(o) => {
                // A pod's name is its own: nothing to share.
                let (namespace, name) =
                    (strings.intern(&key.namespace), Arc::from(key.name.as_str()));
                Record::Pod(PodRecord::new(&o, namespace, name, strings))
            }
            MeshObject::ServiceAccount(_) => Record::ServiceAccount,
            MeshObject::MeshConfig(o) => Record::MeshConfig(Box::new(o)),
            policy => Record::Policy(Box::new(policy)),
        };
        (key, Some(record))
    }

    /// Inserts or replaces an object. Returns whether anything changed: an update that changes
    /// nothing the catalog keeps of the object (status, bookkeeping, fields the mesh never reads)
    /// is no change.
    /// An object failing FSM's semantic validation is refused (see [`Catalog::rejected`]) and the
    /// stored version, if any, stays.
    pub fn apply(&mut self, object: MeshObject) -> bool {
        match self.prepare(object) {
            (key, Some(record)) => self.store(key, record),
            (_, None) => false,
        }
    }

    /// Whether `record` is what is stored under `key`.
    fn holds(&self, key: &ObjectKey, record: &Record) -> bool {
        let (ns, name) = (key.namespace.as_str(), key.name.as_str());
        match record {
            Record::Namespace(r) => self.namespaces.get(name) == Some(r),
            Record::Service(r) => self.services.get(ns, name) == Some(r),
            Record::Endpoints(r) => self.endpoints.get(ns, name) == Some(r),
            Record::EndpointSlice(r) => self.slices.get(ns, name) == Some(r),
            Record::Pod(r) => self.pods.get(ns, name).map(|p| &p.record) == Some(r),
            Record::ServiceAccount => self.service_accounts.contains(ns, name),
            Record::MeshConfig(r) => self.contains(key) && self.mesh_config.as_ref() == Some(&**r),
            Record::Policy(r) => self.policies.get(key) == Some(&**r),
        }
    }

    fn store(&mut self, key: ObjectKey, record: Record) -> bool {
        if self.holds(&key, &record) {
            return false;
        }
        let seen_before = match &record {
            Record::Pod(_) => self.pods.get(&key.namespace, &key.name).map(|p| p.seen),
            _ => None,
        };
        // The old version's references matter too (a pod that moved, a slice that changed service).
        self.delete(&key);
        self.changes.objects.insert(key.clone());
        if let Record::Policy(object) = &record {
            self.note_policy_service_accounts(&key, object);
            self.note_policy_services(&key, Some(object));
        }
        if key.kind == Kind::Service {
            self.note_policy_services(&key, None);
        }
        match record {
            Record::Namespace(r) => {
                let name = self.strings.intern(&key.name);
                self.namespaces.insert(name, r);
            }
            Record::Service(r) => {
                let (namespace, name) = r.id();
                self.services.insert(namespace, name, r);
            }
            Record::Endpoints(r) => {
                self.changes.endpoints(&key.namespace, &key.name);
                let namespace = self.strings.intern(&key.namespace);
                let name = self.strings.intern(&key.name);
                self.endpoints.insert(namespace, name, r);
            }
            Record::EndpointSlice(r) => {
                self.changes.slice(&key.namespace, &r);
                let namespace = self.strings.intern(&key.namespace);
                let name: Arc<str> = Arc::from(key.name.as_str());
                if let Some(service) = &r.service {
                    match self.slices_by_service.get_mut(&namespace, service) {
                        Some(names) => {
                            names.insert(Arc::clone(&name));
                        }
                        None => {
                            self.slices_by_service.insert(
                                Arc::clone(&namespace),
                                Arc::clone(service),
                                BTreeSet::from([Arc::clone(&name)]),
                            );
                        }
                    }
                }
                self.slices.insert(namespace, name, r);
            }
            Record::Pod(record) => self.store_pod(record, seen_before),
            Record::ServiceAccount => {
                let namespace = self.strings.intern(&key.namespace);
                let name = self.strings.intern(&key.name);
                self.service_accounts.insert(namespace, name, ());
            }
            Record::MeshConfig(o) => {
                self.mesh_config = Some(*o);
            }
            Record::Policy(policy) => {
                self.policies.insert(key, *policy);
            }
        }
        true
    }

    fn store_pod(&mut self, record: PodRecord, seen_before: Option<u64>) {
        self.changes.pod(&record);
        let seen = seen_before.unwrap_or_else(|| {
            self.next_seen += 1;
            self.next_seen
        });
        let id: PodId = record.id();
        if let Some(uuid) = record.proxy_uuid_shared() {
            let order = ClaimOrder {
                untimed: record.created().is_none(),
                created: record.created().cloned(),
                seen,
            };
            let claims = self.uuid_claims.entry(Arc::clone(uuid)).or_default();
            let at = claims.partition_point(|(o, _)| *o < order);
            claims.insert(at, (order, id.clone()));
            // Nearly every UUID has one claim; a Vec's first growth would reserve four.
            claims.shrink_to_fit();
            if claims.len() > 1 && seen_before.is_none() {
                let conflict = UuidConflict {
                    uuid: uuid.to_string(),
                    owner: ns_name(&claims[0].1),
                    claimant: ns_name(&claims[if at == 0 { 1 } else { at }].1),
                };
                fsm_errcode::warn!(ErrCode::E5004, "{conflict}");
            }
        }
        if let Some(ip) = record.ip() {
            self.pods_by_ip.insert(ip, id.clone());
        }
        let (namespace, name) = id;
        self.pods
            .insert(namespace, name, Box::new(StoredPod { record, seen }));
    }

    /// Removes an object. Returns whether it was present.
    pub fn delete(&mut self, key: &ObjectKey) -> bool {
        let (ns, name) = (key.namespace.as_str(), key.name.as_str());
        // What the old version referred to, without copying it.
        let present = match key.kind {
            Kind::Endpoints => {
                let present = self.endpoints.contains(ns, name);
                if present {
                    self.changes.endpoints(ns, name);
                }
                present
            }
            Kind::EndpointSlice => self
                .slices
                .get(ns, name)
                .map(|slice| self.changes.slice(ns, slice))
                .is_some(),
            Kind::Pod => self
                .pods
                .get(ns, name)
                .map(|pod| self.changes.pod(&pod.record))
                .is_some(),
            Kind::TrafficTarget
            | Kind::HTTPRouteGroup
            | Kind::TCPRoute
            | Kind::TrafficSplit
            | Kind::Retry
            | Kind::Egress
            | Kind::UpstreamTrafficSetting => match self.policies.get(key).cloned() {
                Some(old) => {
                    self.note_policy_service_accounts(key, &old);
                    self.note_policy_services(key, Some(&old));
                    true
                }
                None => false,
            },
            Kind::Service => {
                let present = self.contains(key);
                if present {
                    self.note_policy_services(key, None);
                }
                present
            }
            _ => self.contains(key),
        };
        if present {
            self.changes.objects.insert(key.clone());
        }
        self.remove(key)
    }

    /// Notes which services' outbound entries a change concerns: a TrafficSplit's root or an
    /// UpstreamTrafficSetting's host (`object`), or, for the Service `key` (no `object`), the
    /// roots of the TrafficSplits of its namespace it is a backend of.
    fn note_policy_services(&mut self, key: &ObjectKey, object: Option<&MeshObject>) {
        match object {
            Some(MeshObject::UpstreamTrafficSetting(uts)) => {
                // `<svc>.<ns>.svc.cluster.local` names a service of the setting's namespace;
                // any other host selects nothing, and noting its first label costs one lookup.
                let service = uts.spec.host.split('.').next().unwrap_or_default();
                self.changes
                    .policy_services
                    .insert((key.namespace.clone(), service.to_owned()));
            }
            Some(MeshObject::TrafficSplit(ts)) => {
                self.changes.policy_services.insert((
                    key.namespace.clone(),
                    ts.spec.root_service_name().to_owned(),
                ));
            }
            Some(_) => {}
            None => {
                let roots: Vec<(String, String)> = self
                    .policies_of::<TrafficSplit>(&key.namespace)
                    .filter(|ts| ts.spec.backends.iter().any(|b| b.service == key.name))
                    .map(|ts| {
                        (
                            key.namespace.clone(),
                            ts.spec.root_service_name().to_owned(),
                        )
                    })
                    .collect();
                self.changes.policy_services.extend(roots);
            }
        }
    }

    /// Notes whose inbound access the SMI access policy `object` (stored under `key`) decides:
    /// a TrafficTarget's destination, or the destinations of the TrafficTargets of its namespace
    /// whose rules name the route group `object` is.
    fn note_policy_service_accounts(&mut self, key: &ObjectKey, object: &MeshObject) {
        let destination = |tt: &TrafficTarget| {
            let d = &tt.spec.destination;
            (d.namespace_or(&key.namespace).to_owned(), d.name.clone())
        };
        let rule_kind = match object {
            MeshObject::TrafficTarget(tt) => {
                self.changes.policy_service_accounts.insert(destination(tt));
                return;
            }
            MeshObject::Retry(retry) => {
                let source = &retry.spec.source;
                self.changes
                    .policy_service_accounts
                    .insert((source.namespace.clone(), source.name.clone()));
                return;
            }
            MeshObject::Egress(egress) => {
                self.note_egress_sources(egress);
                return;
            }
            MeshObject::HTTPRouteGroup(_) => {
                self.note_egress_matching(key);
                TrafficTargetRuleKind::HttpRouteGroup
            }
            MeshObject::UpstreamTrafficSetting(_) => {
                self.note_egress_matching(key);
                return;
            }
            MeshObject::TCPRoute(_) => TrafficTargetRuleKind::TcpRoute,
            _ => return,
        };
        let naming: Vec<(String, String)> = self
            .policies_of::<TrafficTarget>(&key.namespace)
            .filter(|tt| {
                tt.spec
                    .rules
                    .iter()
                    .any(|r| r.kind == rule_kind && r.name == key.name)
            })
            .map(destination)
            .collect();
        self.changes.policy_service_accounts.extend(naming);
    }

    /// Notes the service accounts an Egress policy lets out of the mesh.
    fn note_egress_sources(&mut self, egress: &Egress) {
        self.changes.policy_service_accounts.extend(
            egress
                .spec
                .sources
                .iter()
                .map(|s| (s.namespace.clone(), s.name.clone())),
        );
    }

    /// Notes the sources of the Egress policies of its namespace that name the match `key` (an
    /// HTTPRouteGroup or an UpstreamTrafficSetting).
    fn note_egress_matching(&mut self, key: &ObjectKey) {
        let kind = key.kind.to_string();
        let naming: Vec<Egress> = self
            .policies_of::<Egress>(&key.namespace)
            .filter(|e| {
                e.spec
                    .matches
                    .iter()
                    .any(|m| m.kind == kind && m.name == key.name)
            })
            .cloned()
            .collect();
        for egress in &naming {
            self.note_egress_sources(egress);
        }
    }

    /// What changed since the last call; the next call starts afresh.
    pub fn take_changes(&mut self) -> ChangeSet {
        std::mem::take(&mut self.changes)
    }

    fn remove(&mut self, key: &ObjectKey) -> bool {
        self.rejected.remove(key);
        let (ns, name) = (key.namespace.as_str(), key.name.as_str());
        match key.kind {
            Kind::Namespace => self.namespaces.remove(name).is_some(),
            Kind::Service => self.services.remove(ns, name).is_some(),
            Kind::Endpoints => self.endpoints.remove(ns, name).is_some(),
            Kind::EndpointSlice => {
                let Some(old) = self.slices.remove(ns, name) else {
                    return false;
                };
                if let Some(service) = &old.service
                    && let Some(names) = self.slices_by_service.get_mut(ns, service)
                {
                    names.remove(name);
                    if names.is_empty() {
                        self.slices_by_service.remove(ns, service);
                    }
                }
                true
            }
            Kind::Pod => {
                let Some(old) = self.pods.remove(ns, name) else {
                    return false;
                };
                let is_old = |id: &PodId| &*id.0 == ns && &*id.1 == name;
                if let Some(uuid) = old.record.proxy_uuid()
                    && let Some(claims) = self.uuid_claims.get_mut(uuid)
                {
                    claims.retain(|(_, id)| !is_old(id));
                    claims.shrink_to_fit();
                    if claims.is_empty() {
                        self.uuid_claims.remove(uuid);
                    }
                }
                if let Some(ip) = old.record.ip()
                    && self.pods_by_ip.get(&ip).is_some_and(is_old)
                {
                    self.pods_by_ip.remove(&ip);
                }
                true
            }
            Kind::ServiceAccount => self.service_accounts.remove(ns, name).is_some(),
            Kind::MeshConfig => self.contains(key) && self.mesh_config.take().is_some(),
            _ => self.policies.remove(key).is_some(),
        }
    }

    /// Whether an object is stored under `key`.
    pub fn contains(&self, key: &ObjectKey) -> bool {
        let (ns, name) = (key.namespace.as_str(), key.name.as_str());
        match key.kind {
            Kind::Namespace => self.namespaces.contains_key(name),
            Kind::Service => self.services.contains(ns, name),
            Kind::Endpoints => self.endpoints.contains(ns, name),
            Kind::EndpointSlice => self.slices.contains(ns, name),
            Kind::Pod => self.pods.contains(ns, name),
            Kind::ServiceAccount => self.service_accounts.contains(ns, name),
            Kind::MeshConfig => self
                .mesh_config
                .as_ref()
                .is_some_and(|mc| mc.metadata.namespace.as_deref() == Some(ns)),
            _ => self.policies.contains_key(key),
        }
    }

    /// The effective MeshConfig: `fsm-mesh-config` in the control-plane namespace, or FSM's
    /// defaults when it is absent.
    pub fn mesh_config(&self) -> MeshConfig {
        self.mesh_config
            .as_ref()
            .filter(|mc| {
                mc.metadata.namespace.as_deref() == Some(self.settings.fsm_namespace.as_str())
                    && mc.metadata.name.as_deref() == Some(MESH_CONFIG_NAME)
            })
            .cloned()
            .unwrap_or_default()
    }

    /// Whether the namespace is labelled `flomesh.io/monitored-by=<mesh-name>`.
    pub fn is_monitored(&self, namespace: &str) -> bool {
        self.namespaces
            .get(namespace)
            .and_then(|ns| ns.monitored_by.as_deref())
            .is_some_and(|mesh| *mesh == self.settings.mesh_name)
    }

    /// Whether the pod runs a sidecar: it is in a monitored namespace and injection is not
    /// disabled on the pod or (without a pod annotation) on its namespace.
    pub fn pod_has_sidecar(&self, namespace: &str, name: &str) -> bool {
        let Some(pod) = self.pod(namespace, name) else {
            return false;
        };
        if !self.is_monitored(namespace) || pod.host_network() {
            return false;
        }
        let setting = pod.sidecar_injection().or_else(|| {
            self.namespaces
                .get(namespace)
                .and_then(|ns| ns.sidecar_injection.as_deref())
        });
        setting.is_none_or(|v| v != "disabled")
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<&PodRecord> {
        self.pods.get(namespace, name).map(|p| &p.record)
    }

    /// Every pod that runs a sidecar and owns a proxy UUID, sorted by namespace and name: the
    /// proxies that need bootstrap credentials to reach the control plane. A pod whose UUID
    /// another pod holds is left out (see [`Catalog::uuid_conflicts`]).
    pub fn sidecar_proxies(&self) -> Vec<SidecarProxy> {
        let mut out: Vec<SidecarProxy> = self
            .uuid_claims
            .iter()
            .filter_map(|(uuid, claims)| Some((uuid, &claims.first()?.1)))
            .filter(|(_, (ns, name))| self.pod_has_sidecar(ns, name))
            .filter_map(|(uuid, (ns, name))| {
                let pod = self.pod(ns, name)?;
                Some(SidecarProxy {
                    namespace: ns.to_string(),
                    pod: name.to_string(),
                    uuid: uuid.to_string(),
                    service_account: pod.service_account().to_owned(),
                    pod_uid: pod.uid().map(str::to_owned),
                })
            })
            .collect();
        out.sort();
        out
    }

    /// The pod that owns proxy UUID `uuid`: of the pods labelled `fsm-proxy-uuid=<uuid>`, the
    /// one that claimed it first.
    pub fn pod_by_proxy_uuid(&self, uuid: &str) -> Option<&PodRecord> {
        self.uuid_claims
            .get(uuid)
            .and_then(|claims| claims.first())
            .and_then(|(_, (ns, name))| self.pod(ns, name))
    }

    /// Pods refused because another pod holds their proxy UUID.
    pub fn uuid_conflicts(&self) -> Vec<UuidConflict> {
        let mut out: Vec<UuidConflict> = self
            .uuid_claims
            .iter()
            .filter(|(_, claims)| claims.len() > 1)
            .flat_map(|(uuid, claims)| {
                claims[1..].iter().map(|(_, claimant)| UuidConflict {
                    uuid: uuid.to_string(),
                    owner: ns_name(&claims[0].1),
                    claimant: ns_name(claimant),
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.claimant, &a.uuid).cmp(&(&b.claimant, &b.uuid)));
        out
    }

    /// Why a proxy claiming `uuid` as `service_account` in `namespace` is refused, when a pod
    /// with that identity carries the UUID but another pod holds it.
    pub fn uuid_conflict_for(
        &self,
        uuid: &str,
        namespace: &str,
        service_account: &str,
    ) -> Option<UuidConflict> {
        let claims = self.uuid_claims.get(uuid)?;
        let (_, owner) = claims.first()?;
        claims[1..]
            .iter()
            .map(|(_, id)| id)
            .find(|(ns, name)| {
                **ns == *namespace
                    && self
                        .pod(ns, name)
                        .is_some_and(|pod| pod.service_account() == service_account)
            })
            .map(|claimant| UuidConflict {
                uuid: uuid.to_owned(),
                owner: ns_name(owner),
                claimant: ns_name(claimant),
            })
    }

    pub fn pod_by_ip(&self, ip: IpAddr) -> Option<&PodRecord> {
        self.pods_by_ip
            .get(&ip)
            .and_then(|(ns, name)| self.pod(ns, name))
    }

    /// Services of monitored namespaces, sorted by namespace and name.
    pub fn mesh_services(&self) -> impl Iterator<Item = &ServiceRecord> {
        self.services
            .iter()
            .filter(|(ns, _, _)| self.is_monitored(ns))
            .map(|(_, _, svc)| svc)
    }

    /// The service `namespace/name` if it is part of the mesh (its namespace is monitored).
    pub fn mesh_service(&self, namespace: &str, name: &str) -> Option<&ServiceRecord> {
        if !self.is_monitored(namespace) {
            return None;
        }
        self.services.get(namespace, name)
    }

    /// The service `namespace/name`, monitored or not (an IngressBackend's source may be an
    /// ingress controller outside the mesh).
    pub fn service(&self, namespace: &str, name: &str) -> Option<&ServiceRecord> {
        self.services.get(namespace, name)
    }

    /// Services in the pod's namespace whose selector matches the pod's labels.
    pub fn services_selecting(&self, pod: &PodRecord) -> Vec<&ServiceRecord> {
        self.services
            .in_namespace(pod.namespace())
            .map(|(_, svc)| svc)
            .filter(|svc| svc.selects(pod))
            .collect()
    }

    /// Ready addresses of one service port: from its EndpointSlices when it has any, otherwise
    /// from its Endpoints object.
    pub fn endpoints_of(
        &self,
        service: &ServiceRecord,
        port: &ServicePortRecord,
    ) -> Vec<ResolvedEndpoint> {
        let (namespace, name) = (service.namespace(), service.name());
        let port_name = port.name().unwrap_or_default();
        let mut out = BTreeSet::new();
        if let Some(slice_names) = self.slices_by_service.get(namespace, name) {
            for slice_name in slice_names {
                let Some((number, addresses)) = self
                    .slices
                    .get(namespace, slice_name)
                    .and_then(|slice| slice.addresses(port_name))
                else {
                    continue;
                };
                out.extend(addresses.iter().map(|ip| self.resolved(*ip, number)));
            }
        } else if let Some(endpoints) = self.endpoints.get(namespace, name) {
            for (number, addresses) in endpoints.addresses(port_name) {
                out.extend(addresses.iter().map(|ip| self.resolved(*ip, number)));
            }
        }
        out.into_iter().collect()
    }

    fn resolved(&self, ip: IpAddr, port: u16) -> ResolvedEndpoint {
        ResolvedEndpoint {
            ip,
            port,
            pod: self.pods_by_ip.get(&ip).map(ns_name),
        }
    }

    /// Resolves a Service port's `targetPort` against a pod's named container ports.
    pub fn target_port(port: &ServicePortRecord, pod: &PodRecord) -> Option<u16> {
        match port.target_port() {
            None => u16::try_from(port.port()).ok(),
            Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
            Some(IntOrString::String(name)) => pod
                .container_ports()
                .iter()
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .and_then(|p| u16::try_from(p.container_port).ok()),
        }
    }

    /// Counts per kind, for the debug endpoint and logs.
    pub fn counts(&self) -> BTreeMap<Kind, usize> {
        BTreeMap::from([
            (Kind::Namespace, self.namespaces.len()),
            (Kind::Service, self.services.len()),
            (Kind::Endpoints, self.endpoints.len()),
            (Kind::EndpointSlice, self.slices.len()),
            (Kind::Pod, self.pods.len()),
            (Kind::ServiceAccount, self.service_accounts.len()),
            (Kind::MeshConfig, usize::from(self.mesh_config.is_some())),
        ])
        .into_iter()
        .chain(
            Kind::ALL
                .iter()
                .filter(|k| k.is_policy())
                .map(|k| (*k, self.policies(*k).count())),
        )
        .collect()
    }
}

/// FSM's code for an invalid object, where FSM has a specific one.
fn rejection_code(kind: Kind, field: &str) -> ErrCode {
    match (kind, field) {
        (Kind::TrafficTarget, f) if f.starts_with("spec.destination") => ErrCode::E2010,
        (Kind::TrafficTarget, f) if f.starts_with("spec.sources") => ErrCode::E2011,
        (Kind::Egress, f) if f.starts_with("spec.ipAddresses") => ErrCode::E2002,
        (Kind::HTTPRouteGroup, f) if f.starts_with("spec.matches") => ErrCode::E2006,
        _ => ErrCode::E3002,
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Pod;

    use super::*;
    use crate::decode_manifests;

    const MANIFEST: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: app, labels: {flomesh.io/monitored-by: fsm}}
---
apiVersion: v1
kind: Namespace
metadata: {name: other}
---
apiVersion: v1
kind: Service
metadata: {name: httpbin, namespace: app}
spec:
  selector: {app: httpbin}
  ports: [{name: http, port: 14001, targetPort: web}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: httpbin-abc, namespace: app, labels: {kubernetes.io/service-name: httpbin}}
addressType: IPv4
ports: [{name: http, port: 14001}]
endpoints:
- addresses: ["127.0.1.1"]
- addresses: ["127.0.1.2"]
  conditions: {ready: false}
---
apiVersion: v1
kind: Pod
metadata: {name: httpbin-1, namespace: app, labels: {app: httpbin, fsm-proxy-uuid: u-1}}
spec:
  serviceAccountName: httpbin
  containers: [{name: c, ports: [{name: web, containerPort: 14001}]}]
status: {podIP: 127.0.1.1}
"#;

    /// The pod of [`MANIFEST`], as a source delivers it.
    fn manifest_pod() -> Pod {
        let (objects, _) = decode_manifests("t.yaml", MANIFEST);
        objects
            .into_iter()
            .find_map(|o| match o {
                MeshObject::Pod(pod) => Some(pod),
                _ => None,
            })
            .expect("the manifest has a pod")
    }

    fn catalog() -> Catalog {
        let (objects, errors) = decode_manifests("t.yaml", MANIFEST);
        assert!(errors.is_empty(), "{errors:?}");
        let mut catalog = Catalog::new(CatalogSettings::default());
        for o in objects {
            assert!(catalog.apply(o));
        }
        catalog
    }

    #[test]
    fn indexes_answer_the_compilers_questions() {
        let catalog = catalog();
        assert!(catalog.is_monitored("app"));
        assert!(!catalog.is_monitored("other"));
        let pod = catalog.pod_by_proxy_uuid("u-1").expect("pod by uuid");
        assert!(catalog.pod_has_sidecar("app", "httpbin-1"));
        let services = catalog.services_selecting(pod);
        assert_eq!(services.len(), 1);
        let port = &services[0].ports()[0];
        assert_eq!(Catalog::target_port(port, pod), Some(14001));
        let eps = catalog.endpoints_of(services[0], port);
        assert_eq!(eps.len(), 1, "not-ready endpoints are skipped");
        assert_eq!(eps[0].pod, Some(("app".into(), "httpbin-1".into())));
    }

    #[test]
    fn apply_is_idempotent_and_delete_cleans_indexes() {
        let mut catalog = catalog();
        let pod = MeshObject::Pod(manifest_pod());
        assert!(
            !catalog.apply(pod.clone()),
            "same object twice is no change"
        );
        assert!(catalog.delete(&pod.key()));
        assert!(catalog.pod_by_proxy_uuid("u-1").is_none());
        assert!(
            catalog
                .pod_by_ip("127.0.1.1".parse().expect("ip"))
                .is_none()
        );
        let slice = ObjectKey {
            kind: Kind::EndpointSlice,
            namespace: "app".into(),
            name: "httpbin-abc".into(),
        };
        assert!(catalog.delete(&slice));
        assert!(!catalog.delete(&slice));
    }

    #[test]
    fn relist_swaps_atomically_and_drops_missing_objects() {
        let mut catalog = catalog();
        let before = catalog.keys().count();
        let (objects, _) = decode_manifests("t.yaml", MANIFEST);
        assert!(!catalog.handle(CatalogEvent::Init(Scope::All)));
        let mut kept = 0;
        for o in objects.into_iter().filter(|o| o.kind() != Kind::Pod) {
            kept += 1;
            assert!(
                !catalog.handle(CatalogEvent::InitApply(o)),
                "buffered until InitDone"
            );
        }
        assert_eq!(
            catalog.keys().count(),
            before,
            "nothing changes before InitDone"
        );
        assert!(catalog.handle(CatalogEvent::InitDone(Scope::All)));
        assert_eq!(catalog.keys().count(), kept);
        assert!(catalog.pod_by_proxy_uuid("u-1").is_none());
        assert!(!catalog.handle(CatalogEvent::Init(Scope::All)));
        assert!(
            catalog.handle(CatalogEvent::InitDone(Scope::All)),
            "an empty relist empties the catalog"
        );
        assert_eq!(catalog.keys().count(), 0);
    }

    #[test]
    fn status_and_bookkeeping_changes_are_no_change() {
        let mut catalog = catalog();
        let mut pod = manifest_pod();
        pod.metadata.resource_version = Some("42".into());
        pod.metadata.managed_fields = Some(vec![Default::default()]);
        let status = pod.status.get_or_insert_with(Default::default);
        status.phase = Some("Running".into());
        status.conditions = Some(vec![k8s_openapi::api::core::v1::PodCondition {
            type_: "Ready".into(),
            status: "True".into(),
            ..Default::default()
        }]);
        assert!(!catalog.apply(MeshObject::Pod(pod.clone())));
        status_ip(&mut pod, "127.0.1.9");
        assert!(
            catalog.apply(MeshObject::Pod(pod)),
            "a new pod IP is a change"
        );
        assert!(
            catalog
                .pod_by_ip("127.0.1.9".parse().expect("ip"))
                .is_some()
        );
    }

    #[test]
    fn fields_the_mesh_never_reads_are_no_change() {
        let mut catalog = catalog();
        let mut pod = manifest_pod();
        let container = &mut pod.spec.as_mut().expect("spec").containers[0];
        container.image = Some("httpbin:v2".into());
        container.env = Some(vec![k8s_openapi::api::core::v1::EnvVar {
            name: "LOG_LEVEL".into(),
            value: Some("debug".into()),
            ..Default::default()
        }]);
        pod.metadata
            .annotations
            .get_or_insert_default()
            .insert("prometheus.io/scrape".into(), "true".into());
        assert!(
            !catalog.apply(MeshObject::Pod(pod.clone())),
            "image, env and unrelated annotations are no change"
        );
        pod.spec.as_mut().expect("spec").containers[0]
            .ports
            .as_mut()
            .expect("ports")[0]
            .container_port = 14002;
        assert!(
            catalog.apply(MeshObject::Pod(pod.clone())),
            "a named port's number is a change"
        );
        pod.metadata
            .labels
            .get_or_insert_default()
            .insert("version".into(), "v2".into());
        assert!(
            catalog.apply(MeshObject::Pod(pod)),
            "a label is a change (selectors read labels)"
        );

        // An EndpointSlice: not-ready endpoints, hints and the address order are no change.
        catalog.take_changes();
        let (objects, _) = decode_manifests("t.yaml", MANIFEST);
        let Some(MeshObject::EndpointSlice(mut slice)) = objects
            .into_iter()
            .find(|o| o.kind() == Kind::EndpointSlice)
        else {
            panic!("the manifest has an EndpointSlice")
        };
        slice.endpoints[1].addresses.push("127.0.1.3".into());
        slice.endpoints[0].node_name = Some("node-1".into());
        slice.endpoints.reverse();
        assert!(!catalog.apply(MeshObject::EndpointSlice(slice.clone())));
        assert!(catalog.take_changes().endpoint_services.is_empty());
        slice.endpoints[0].conditions = None;
        assert!(
            catalog.apply(MeshObject::EndpointSlice(slice)),
            "an endpoint becoming ready is a change"
        );
        assert_eq!(
            catalog.take_changes().endpoint_services,
            BTreeSet::from([("app".to_string(), "httpbin".to_string())])
        );
        let service = catalog.mesh_service("app", "httpbin").expect("service");
        assert_eq!(
            catalog.endpoints_of(service, &service.ports()[0]).len(),
            3,
            "127.0.1.1, and 127.0.1.2 and .3 now ready"
        );
    }

    fn status_ip(pod: &mut Pod, ip: &str) {
        pod.status.get_or_insert_with(Default::default).pod_ip = Some(ip.into());
    }

    const TRAFFIC_TARGET: &str = r#"
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: allow, namespace: app}
spec:
  destination: {kind: ServiceAccount, name: httpbin, namespace: app}
  sources: [{kind: ServiceAccount, name: curl, namespace: app}]
  rules: [{kind: HTTPRouteGroup, name: routes}]
"#;

    fn traffic_target() -> MeshObject {
        let (mut objects, errors) = decode_manifests("tt.yaml", TRAFFIC_TARGET);
        assert!(errors.is_empty(), "{errors:?}");
        objects.remove(0)
    }

    /// Whose inbound an SMI access change may change: a TrafficTarget's destination, old and
    /// new, and the destinations of the TrafficTargets naming a changed route group.
    #[test]
    fn access_policy_changes_name_their_destinations() {
        let mut catalog = catalog();
        let destinations = |catalog: &mut Catalog| -> Vec<(String, String)> {
            catalog
                .take_changes()
                .policy_service_accounts
                .into_iter()
                .collect()
        };
        let pair = |sa: &str| ("app".to_string(), sa.to_string());
        let good = traffic_target();
        assert!(catalog.apply(good.clone()));
        assert_eq!(destinations(&mut catalog), [pair("httpbin")]);

        let MeshObject::TrafficTarget(mut moved) = good.clone() else {
            panic!("not a TrafficTarget")
        };
        moved.spec.destination.name = "bookstore".into();
        assert!(catalog.apply(MeshObject::TrafficTarget(moved)));
        assert_eq!(
            destinations(&mut catalog),
            [pair("bookstore"), pair("httpbin")],
            "the old destination loses access, the new one gains it"
        );

        let group = |name: &str| {
            let (mut objects, errors) = decode_manifests(
                "g.yaml",
                &format!(
                    "apiVersion: specs.smi-spec.io/v1alpha4\nkind: HTTPRouteGroup\nmetadata: {{name: {name}, namespace: app}}\nspec:\n  matches: [{{name: all, pathRegex: '.*'}}]\n"
                ),
            );
            assert!(errors.is_empty(), "{errors:?}");
            objects.remove(0)
        };
        assert!(catalog.apply(group("routes")));
        assert_eq!(destinations(&mut catalog), [pair("bookstore")]);
        assert!(catalog.apply(group("unnamed")));
        assert!(destinations(&mut catalog).is_empty());

        assert!(catalog.delete(&good.key()));
        assert_eq!(destinations(&mut catalog), [pair("bookstore")]);
    }

    /// Whose egress an Egress change may change: its sources, old and new, on apply and delete,
    /// and the sources of the Egress policies naming a changed route group or setting.
    #[test]
    fn egress_policy_changes_name_their_sources() {
        let mut catalog = catalog();
        let sources = |catalog: &mut Catalog| -> Vec<(String, String)> {
            catalog
                .take_changes()
                .policy_service_accounts
                .into_iter()
                .collect()
        };
        let one = |text: String| {
            let (mut objects, errors) = decode_manifests("e.yaml", &text);
            assert!(errors.is_empty(), "{errors:?}");
            objects.remove(0)
        };
        let egress = |source: &str| {
            one(format!(
                "apiVersion: policy.flomesh.io/v1alpha1\nkind: Egress\nmetadata: {{name: out, namespace: policies}}\nspec:\n  sources: [{{kind: ServiceAccount, name: {source}, namespace: app}}]\n  hosts: [httpbin.org]\n  ports: [{{number: 80, protocol: http}}]\n  matches: [{{apiGroup: specs.smi-spec.io/v1alpha4, kind: HTTPRouteGroup, name: get}}]\n"
            ))
        };
        let pair = |sa: &str| ("app".to_string(), sa.to_string());
        assert!(catalog.apply(egress("curl")));
        assert_eq!(sources(&mut catalog), [pair("curl")]);
        assert!(catalog.apply(egress("bookbuyer")));
        assert_eq!(
            sources(&mut catalog),
            [pair("bookbuyer"), pair("curl")],
            "the old source loses the destination, the new one gains it"
        );
        let group = |namespace: &str| {
            one(format!(
                "apiVersion: specs.smi-spec.io/v1alpha4\nkind: HTTPRouteGroup\nmetadata: {{name: get, namespace: {namespace}}}\nspec:\n  matches: [{{name: get, pathRegex: /get}}]\n"
            ))
        };
        assert!(catalog.apply(group("policies")));
        assert_eq!(sources(&mut catalog), [pair("bookbuyer")]);
        assert!(catalog.apply(group("app")));
        assert!(
            sources(&mut catalog).is_empty(),
            "a group of another namespace"
        );
        assert!(catalog.delete(&egress("bookbuyer").key()));
        assert_eq!(sources(&mut catalog), [pair("bookbuyer")]);
    }

    /// An invalid TrafficSplit is refused with the field at fault, and the last valid one keeps
    /// deciding where traffic goes.
    #[test]
    fn an_invalid_traffic_split_leaves_the_last_valid_one() {
        let mut catalog = catalog();
        let split = |weight: i32| {
            let (mut objects, errors) = decode_manifests(
                "ts.yaml",
                &format!(
                    "apiVersion: split.smi-spec.io/v1alpha4\nkind: TrafficSplit\nmetadata: {{name: split, namespace: app}}\nspec:\n  service: bookstore.app\n  backends: [{{service: bookstore-v1, weight: {weight}}}, {{service: bookstore-v2, weight: 10}}]\n"
                ),
            );
            assert!(errors.is_empty(), "{errors:?}");
            objects.remove(0)
        };
        let good = split(90);
        assert!(catalog.apply(good.clone()));
        // As the API server hands it over (a manifest's decoder refuses it already).
        let MeshObject::TrafficSplit(mut bad) = good.clone() else {
            panic!("not a TrafficSplit")
        };
        bad.spec.backends[0].weight = -1;
        assert!(
            !catalog.apply(MeshObject::TrafficSplit(bad)),
            "a negative weight is refused"
        );
        let rejection = &catalog.rejected()[&good.key()];
        assert!(
            rejection.message.contains("spec.backends[0].weight"),
            "{rejection:?}"
        );
        assert_eq!(catalog.policy(&good.key()), Some(&good));
        assert!(catalog.apply(split(50)));
        assert!(catalog.rejected().is_empty());
    }

    #[test]
    fn policies_of_one_namespace_are_read_without_the_others() {
        let mut catalog = catalog();
        for (namespace, name) in [("aaa", "x"), ("app", "b"), ("app", "a"), ("zzz", "y")] {
            let MeshObject::TrafficTarget(mut tt) = traffic_target() else {
                panic!("not a TrafficTarget")
            };
            tt.metadata.namespace = Some(namespace.into());
            tt.metadata.name = Some(name.into());
            tt.spec.destination.namespace = namespace.into();
            assert!(catalog.apply(MeshObject::TrafficTarget(tt)));
        }
        let names = |namespace| -> Vec<String> {
            catalog
                .policies_in(Kind::TrafficTarget, namespace)
                .map(|o| o.metadata().name.clone().unwrap_or_default())
                .collect()
        };
        assert_eq!(names("app"), ["a", "b"]);
        assert_eq!(names("aaa"), ["x"]);
        assert!(names("ap").is_empty() && names("none").is_empty());
        assert_eq!(catalog.policies_in(Kind::HTTPRouteGroup, "app").count(), 0);
    }

    #[test]
    fn invalid_policies_are_refused_and_the_previous_version_stays() {
        let mut catalog = catalog();
        let good = traffic_target();
        assert!(catalog.apply(good.clone()));
        assert_eq!(catalog.policies(Kind::TrafficTarget).count(), 1);
        let MeshObject::TrafficTarget(mut bad) = good.clone() else {
            panic!("not a TrafficTarget")
        };
        bad.spec.sources[0].kind = "Service".into();
        assert!(!catalog.apply(MeshObject::TrafficTarget(bad)));
        assert_eq!(
            catalog.policy(&good.key()),
            Some(&good.clone().normalized())
        );
        let rejection = &catalog.rejected()[&good.key()];
        assert_eq!(rejection.code, ErrCode::E2011);
        assert!(
            rejection.message.contains("TrafficTarget app/allow")
                && rejection.message.contains("spec.sources[0].kind"),
            "{}",
            rejection.message
        );
        assert!(!catalog.apply(good.clone()), "same as the stored version");
        assert!(
            catalog.rejected().is_empty(),
            "a valid version clears the rejection"
        );
        assert!(catalog.delete(&good.key()));
        assert_eq!(catalog.policies(Kind::TrafficTarget).count(), 0);
    }

    #[test]
    fn a_relist_of_one_kind_leaves_the_others_alone() {
        let mut catalog = catalog();
        assert!(catalog.apply(traffic_target()));
        let before = catalog.counts();
        assert!(!catalog.handle(CatalogEvent::Init(Scope::Kind(Kind::Service))));
        assert!(catalog.handle(CatalogEvent::InitDone(Scope::Kind(Kind::Service))));
        let after = catalog.counts();
        assert_eq!(
            after[&Kind::Service],
            0,
            "the empty service list deleted services"
        );
        for (kind, count) in before {
            if kind != Kind::Service {
                assert_eq!(after[&kind], count, "{kind} untouched");
            }
        }
        // Two kinds relisting at once buffer separately.
        let (objects, _) = decode_manifests("t.yaml", MANIFEST);
        catalog.handle(CatalogEvent::Init(Scope::Kind(Kind::Service)));
        catalog.handle(CatalogEvent::Init(Scope::Kind(Kind::TrafficTarget)));
        for o in objects.into_iter().filter(|o| o.kind() == Kind::Service) {
            catalog.handle(CatalogEvent::InitApply(o));
        }
        assert!(catalog.handle(CatalogEvent::InitDone(Scope::Kind(Kind::TrafficTarget))));
        assert_eq!(catalog.policies(Kind::TrafficTarget).count(), 0);
        assert_eq!(
            catalog.counts()[&Kind::Service],
            0,
            "services still buffered"
        );
        assert!(catalog.handle(CatalogEvent::InitDone(Scope::Kind(Kind::Service))));
        assert_eq!(catalog.counts()[&Kind::Service], 1);
    }

    fn pod(name: &str, service_account: &str, ip: &str, created: Option<&str>) -> MeshObject {
        let created = created
            .map(|t| format!(", creationTimestamp: \"{t}\""))
            .unwrap_or_default();
        let yaml = format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: app, labels: {{fsm-proxy-uuid: u-1}}{created}}}\nspec: {{serviceAccountName: {service_account}, containers: [{{name: c}}]}}\nstatus: {{podIP: {ip}}}\n"
        );
        let (mut objects, errors) = decode_manifests("pod.yaml", &yaml);
        assert!(errors.is_empty(), "{errors:?}");
        objects.remove(0)
    }

    fn owner(catalog: &Catalog) -> Option<String> {
        catalog
            .pod_by_proxy_uuid("u-1")
            .map(|p| p.name().to_owned())
    }

    #[test]
    fn the_first_pod_keeps_a_proxy_uuid_another_pod_copies() {
        let mut catalog = catalog();
        assert_eq!(owner(&catalog).as_deref(), Some("httpbin-1"));
        assert!(catalog.apply(pod("evil", "evil", "127.0.1.9", None)));
        assert_eq!(owner(&catalog).as_deref(), Some("httpbin-1"));
        let proxies = catalog.sidecar_proxies();
        assert_eq!(proxies.len(), 1, "{proxies:?}");
        assert_eq!(proxies[0].pod, "httpbin-1");
        let conflicts = catalog.uuid_conflicts();
        assert_eq!(conflicts.len(), 1);
        assert_eq!(conflicts[0].claimant, ("app".into(), "evil".into()));
        assert_eq!(conflicts[0].owner, ("app".into(), "httpbin-1".into()));
        assert!(conflicts[0].to_string().contains("fsm-proxy-uuid=u-1"));
        assert!(
            catalog.uuid_conflict_for("u-1", "app", "evil").is_some(),
            "the impostor's identity is refused"
        );
        assert!(catalog.uuid_conflict_for("u-1", "app", "httpbin").is_none());

        // An update of the owner (a status change) does not move its claim behind the impostor.
        let mut updated = manifest_pod();
        updated
            .metadata
            .labels
            .get_or_insert_default()
            .insert("version".into(), "2".into());
        assert!(catalog.apply(MeshObject::Pod(updated)));
        assert_eq!(owner(&catalog).as_deref(), Some("httpbin-1"));

        // Deleting the impostor changes nothing for the owner.
        assert!(catalog.delete(&pod("evil", "evil", "127.0.1.9", None).key()));
        assert_eq!(owner(&catalog).as_deref(), Some("httpbin-1"));
        assert!(catalog.uuid_conflicts().is_empty());
        assert_eq!(catalog.sidecar_proxies().len(), 1);
    }

    #[test]
    fn creation_time_decides_before_the_order_pods_are_seen() {
        let mut catalog = Catalog::new(CatalogSettings::default());
        // A relist may deliver the impostor first; the API server's creation time, which no pod
        // author can set, still names the owner.
        assert!(catalog.apply(pod(
            "evil",
            "evil",
            "127.0.1.9",
            Some("2026-12-06T10:00:05Z")
        )));
        assert!(catalog.apply(pod(
            "curl",
            "curl",
            "127.0.1.1",
            Some("2026-12-06T10:00:00Z")
        )));
        assert_eq!(owner(&catalog).as_deref(), Some("curl"));
        // The owner gone, the remaining pod holds the UUID.
        assert!(catalog.delete(&pod("curl", "curl", "127.0.1.1", None).key()));
        assert_eq!(owner(&catalog).as_deref(), Some("evil"));
    }
}
