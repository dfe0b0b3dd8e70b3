use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use fsm_errcode::ErrCode;
use k8s_openapi::api::core::v1::{Endpoints, Namespace, Pod, Service, ServicePort};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::{
    CatalogEvent, Kind, MESH_CONFIG_NAME, MONITORED_BY_LABEL, MeshConfig, MeshObject, ObjectKey,
    PROXY_UUID_LABEL, SERVICE_NAME_LABEL, SIDECAR_INJECTION_ANNOTATION, Scope,
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
    created: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    seen: u64,
}

/// The current mesh objects and the indexes the compiler needs.
#[derive(Clone, Debug, Default)]
pub struct Catalog {
    settings: CatalogSettings,
    namespaces: BTreeMap<String, Namespace>,
    services: BTreeMap<NsName, Service>,
    endpoints: BTreeMap<NsName, Endpoints>,
    slices: BTreeMap<NsName, EndpointSlice>,
    pods: BTreeMap<NsName, Pod>,
    service_accounts: BTreeSet<NsName>,
    mesh_config: Option<MeshConfig>,
    /// SMI and FSM policy objects, whole.
    policies: BTreeMap<ObjectKey, MeshObject>,
    /// Objects refused for failing FSM's semantic validation, with why; the previous version of
    /// each (if any) stays in force.
    rejected: BTreeMap<ObjectKey, Rejection>,
    /// Objects of the relists in progress (between `Init` and `InitDone`), by scope.
    relists: BTreeMap<Scope, Vec<MeshObject>>,
    /// Pods labelled with each proxy UUID, earliest claim first: the first one owns the UUID.
    /// Normally exactly one; more only when a pod copies another pod's label.
    uuid_claims: HashMap<String, Vec<(ClaimOrder, NsName)>>,
    /// When each pod was first seen, kept across updates of the pod so an update never moves
    /// its claim behind a later pod's.
    pod_seen: HashMap<NsName, u64>,
    next_seen: u64,
    pods_by_ip: HashMap<IpAddr, NsName>,
    /// (namespace, service name) → names of its EndpointSlices.
    slices_by_service: BTreeMap<NsName, BTreeSet<String>>,
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
}

impl ChangeSet {
    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }

    /// Whether any changed object is of `kind`.
    pub fn has_kind(&self, kind: Kind) -> bool {
        self.objects.iter().any(|k| k.kind == kind)
    }

    /// Adds `other`'s changes to these.
    pub fn merge(&mut self, other: ChangeSet) {
        self.objects.extend(other.objects);
        self.endpoint_services.extend(other.endpoint_services);
        self.pod_uuids.extend(other.pod_uuids);
        self.pod_ips.extend(other.pod_ips);
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

fn ns_name(key: &ObjectKey) -> NsName {
    (key.namespace.clone(), key.name.clone())
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
                match self.relists.get_mut(&scope) {
                    Some(buffer) => {
                        buffer.push(object);
                        false
                    }
                    None => self.apply(object),
                }
            }
            CatalogEvent::InitDone(scope) => {
                let listed = self.relists.remove(&scope).unwrap_or_default();
                let keep: BTreeSet<ObjectKey> = listed.iter().map(MeshObject::key).collect();
                let stale: Vec<ObjectKey> = self
                    .keys()
                    .filter(|k| scope.covers(k.kind) && !keep.contains(k))
                    .collect();
                let mut changed = false;
                for key in stale {
                    changed |= self.delete(&key);
                }
                for object in listed {
                    changed |= self.apply(object);
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
        let key = |kind, (namespace, name): &NsName| ObjectKey {
            kind,
            namespace: namespace.clone(),
            name: name.clone(),
        };
        self.namespaces
            .keys()
            .map(|name| ObjectKey {
                kind: Kind::Namespace,
                namespace: String::new(),
                name: name.clone(),
            })
            .chain(self.services.keys().map(move |id| key(Kind::Service, id)))
            .chain(
                self.endpoints
                    .keys()
                    .map(move |id| key(Kind::Endpoints, id)),
            )
            .chain(
                self.slices
                    .keys()
                    .map(move |id| key(Kind::EndpointSlice, id)),
            )
            .chain(self.pods.keys().map(move |id| key(Kind::Pod, id)))
            .chain(
                self.service_accounts
                    .iter()
                    .map(move |id| key(Kind::ServiceAccount, id)),
            )
            .chain(
                self.mesh_config
                    .iter()
                    .map(|mc| MeshObject::MeshConfig(mc.clone()).key()),
            )
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

    /// Objects currently refused, with the FSM error code and the field at fault.
    pub fn rejected(&self) -> &BTreeMap<ObjectKey, Rejection> {
        &self.rejected
    }

    /// Refuses `object` if it fails FSM's semantic validation. Returns whether it was refused.
    fn reject_invalid(&mut self, object: &MeshObject) -> bool {
        let key = object.key();
        let errors = object.semantic_errors();
        let Some(first) = errors.first() else {
            self.rejected.remove(&key);
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
        if self.rejected.get(&key) != Some(&rejection) {
            tracing::warn!(code = %code, object = %key, "{}; the previous version stays in force", rejection.message);
            fsm_errcode::count(code);
        }
        self.rejected.insert(key, rejection);
        true
    }

    /// Inserts or replaces an object. Returns whether anything changed.
    /// An object failing FSM's semantic validation is refused (see [`Catalog::rejected`]) and the
    /// stored version, if any, stays.
    pub fn apply(&mut self, object: MeshObject) -> bool {
        let object = object.normalized();
        if self.reject_invalid(&object) {
            return false;
        }
        let key = object.key();
        if self.get(&key).as_ref() == Some(&object) {
            return false;
        }
        let id = ns_name(&key);
        let seen_before = (key.kind == Kind::Pod)
            .then(|| self.pod_seen.get(&id).copied())
            .flatten();
        // The old version's references matter too (a pod that moved, a slice that changed service).
        self.delete(&key);
        self.changes.objects.insert(key.clone());
        self.record_references(&object);
        match object {
            MeshObject::Namespace(o) => {
                self.namespaces.insert(key.name, o);
            }
            MeshObject::Service(o) => {
                self.services.insert(id, o);
            }
            MeshObject::Endpoints(o) => {
                self.endpoints.insert(id, o);
            }
            MeshObject::EndpointSlice(o) => {
                if let Some(service) = o
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(SERVICE_NAME_LABEL))
                {
                    self.slices_by_service
                        .entry((id.0.clone(), service.clone()))
                        .or_default()
                        .insert(id.1.clone());
                }
                self.slices.insert(id, o);
            }
            MeshObject::Pod(o) => {
                let seen = seen_before.unwrap_or_else(|| {
                    self.next_seen += 1;
                    self.next_seen
                });
                self.pod_seen.insert(id.clone(), seen);
                if let Some(uuid) = proxy_uuid(&o) {
                    let order = ClaimOrder {
                        untimed: o.metadata.creation_timestamp.is_none(),
                        created: o.metadata.creation_timestamp.clone(),
                        seen,
                    };
                    let claims = self.uuid_claims.entry(uuid.to_owned()).or_default();
                    let at = claims.partition_point(|(o, _)| *o < order);
                    claims.insert(at, (order, id.clone()));
                    if claims.len() > 1 && seen_before.is_none() {
                        let conflict = UuidConflict {
                            uuid: uuid.to_owned(),
                            owner: claims[0].1.clone(),
                            claimant: claims[if at == 0 { 1 } else { at }].1.clone(),
                        };
                        tracing::warn!(code = %ErrCode::E5004, "{conflict}");
                        fsm_errcode::count(ErrCode::E5004);
                    }
                }
                if let Some(ip) = pod_ip(&o) {
                    self.pods_by_ip.insert(ip, id.clone());
                }
                self.pods.insert(id, o);
            }
            MeshObject::ServiceAccount(_) => {
                self.service_accounts.insert(id);
            }
            MeshObject::MeshConfig(o) => {
                self.mesh_config = Some(o);
            }
            policy => {
                self.policies.insert(key, policy);
            }
        }
        true
    }

    /// Removes an object. Returns whether it was present.
    pub fn delete(&mut self, key: &ObjectKey) -> bool {
        if let Some(old) = self.get(key) {
            self.changes.objects.insert(key.clone());
            self.record_references(&old);
        }
        self.remove(key)
    }

    /// What changed since the last call; the next call starts afresh.
    pub fn take_changes(&mut self) -> ChangeSet {
        std::mem::take(&mut self.changes)
    }

    /// Notes what a changed object referred to, which its replacement may not.
    fn record_references(&mut self, object: &MeshObject) {
        match object {
            MeshObject::Endpoints(o) => {
                if let (Some(ns), Some(name)) = (&o.metadata.namespace, &o.metadata.name) {
                    self.changes
                        .endpoint_services
                        .insert((ns.clone(), name.clone()));
                }
            }
            MeshObject::EndpointSlice(o) => {
                if let (Some(ns), Some(service)) = (
                    &o.metadata.namespace,
                    o.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get(SERVICE_NAME_LABEL)),
                ) {
                    self.changes
                        .endpoint_services
                        .insert((ns.clone(), service.clone()));
                }
            }
            MeshObject::Pod(o) => {
                if let Some(uuid) = proxy_uuid(o) {
                    self.changes.pod_uuids.insert(uuid.to_owned());
                }
                if let Some(ip) = pod_ip(o) {
                    self.changes.pod_ips.insert(ip);
                }
            }
            _ => {}
        }
    }

    fn remove(&mut self, key: &ObjectKey) -> bool {
        self.rejected.remove(key);
        let id = ns_name(key);
        match key.kind {
            Kind::Namespace => self.namespaces.remove(&key.name).is_some(),
            Kind::Service => self.services.remove(&id).is_some(),
            Kind::Endpoints => self.endpoints.remove(&id).is_some(),
            Kind::EndpointSlice => {
                let Some(old) = self.slices.remove(&id) else {
                    return false;
                };
                if let Some(service) = old
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(SERVICE_NAME_LABEL))
                {
                    let index_key = (id.0.clone(), service.clone());
                    if let Some(names) = self.slices_by_service.get_mut(&index_key) {
                        names.remove(&id.1);
                        if names.is_empty() {
                            self.slices_by_service.remove(&index_key);
                        }
                    }
                }
                true
            }
            Kind::Pod => {
                let Some(old) = self.pods.remove(&id) else {
                    return false;
                };
                self.pod_seen.remove(&id);
                if let Some(uuid) = proxy_uuid(&old)
                    && let Some(claims) = self.uuid_claims.get_mut(uuid)
                {
                    claims.retain(|(_, pod)| *pod != id);
                    if claims.is_empty() {
                        self.uuid_claims.remove(uuid);
                    }
                }
                if let Some(ip) = pod_ip(&old)
                    && self.pods_by_ip.get(&ip) == Some(&id)
                {
                    self.pods_by_ip.remove(&ip);
                }
                true
            }
            Kind::ServiceAccount => self.service_accounts.remove(&id),
            Kind::MeshConfig => {
                let matches = self
                    .mesh_config
                    .as_ref()
                    .map(|mc| mc.metadata.namespace.as_deref() == Some(&key.namespace))
                    .unwrap_or(false);
                matches && self.mesh_config.take().is_some()
            }
            _ => self.policies.remove(key).is_some(),
        }
    }

    /// The object currently stored under `key`.
    pub fn get(&self, key: &ObjectKey) -> Option<MeshObject> {
        let id = ns_name(key);
        match key.kind {
            Kind::Namespace => self
                .namespaces
                .get(&key.name)
                .cloned()
                .map(MeshObject::Namespace),
            Kind::Service => self.services.get(&id).cloned().map(MeshObject::Service),
            Kind::Endpoints => self.endpoints.get(&id).cloned().map(MeshObject::Endpoints),
            Kind::EndpointSlice => self.slices.get(&id).cloned().map(MeshObject::EndpointSlice),
            Kind::Pod => self.pods.get(&id).cloned().map(MeshObject::Pod),
            Kind::ServiceAccount => self.service_accounts.contains(&id).then(|| {
                MeshObject::ServiceAccount(k8s_openapi::api::core::v1::ServiceAccount {
                    metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                        name: Some(id.1.clone()),
                        namespace: Some(id.0.clone()),
                        ..Default::default()
                    },
                    ..Default::default()
                })
            }),
            Kind::MeshConfig => self
                .mesh_config
                .clone()
                .filter(|mc| mc.metadata.namespace.as_deref() == Some(&key.namespace))
                .map(MeshObject::MeshConfig),
            _ => self.policies.get(key).cloned(),
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
            .and_then(|ns| ns.metadata.labels.as_ref())
            .and_then(|labels| labels.get(MONITORED_BY_LABEL))
            .is_some_and(|mesh| *mesh == self.settings.mesh_name)
    }

    /// Whether the pod runs a sidecar: it is in a monitored namespace and injection is not
    /// disabled on the pod or (without a pod annotation) on its namespace.
    pub fn pod_has_sidecar(&self, namespace: &str, name: &str) -> bool {
        let Some(pod) = self.pods.get(&(namespace.to_string(), name.to_string())) else {
            return false;
        };
        if !self.is_monitored(namespace)
            || pod
                .spec
                .as_ref()
                .and_then(|s| s.host_network)
                .unwrap_or(false)
        {
            return false;
        }
        let annotation = |meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
            meta.annotations
                .as_ref()
                .and_then(|a| a.get(SIDECAR_INJECTION_ANNOTATION))
                .cloned()
        };
        let pod_setting = annotation(&pod.metadata);
        let ns_setting = self
            .namespaces
            .get(namespace)
            .and_then(|ns| annotation(&ns.metadata));
        pod_setting.or(ns_setting).is_none_or(|v| v != "disabled")
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<&Pod> {
        self.pods.get(&(namespace.to_string(), name.to_string()))
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
                let pod = self.pods.get(&(ns.clone(), name.clone()))?;
                Some(SidecarProxy {
                    namespace: ns.clone(),
                    pod: name.clone(),
                    uuid: uuid.clone(),
                    service_account: pod_service_account(pod),
                    pod_uid: pod.metadata.uid.clone(),
                })
            })
            .collect();
        out.sort();
        out
    }

    /// The pod that owns proxy UUID `uuid`: of the pods labelled `fsm-proxy-uuid=<uuid>`, the
    /// one that claimed it first.
    pub fn pod_by_proxy_uuid(&self, uuid: &str) -> Option<&Pod> {
        self.uuid_claims
            .get(uuid)
            .and_then(|claims| claims.first())
            .and_then(|(_, id)| self.pods.get(id))
    }

    /// Pods refused because another pod holds their proxy UUID.
    pub fn uuid_conflicts(&self) -> Vec<UuidConflict> {
        let mut out: Vec<UuidConflict> = self
            .uuid_claims
            .iter()
            .filter(|(_, claims)| claims.len() > 1)
            .flat_map(|(uuid, claims)| {
                claims[1..].iter().map(|(_, claimant)| UuidConflict {
                    uuid: uuid.clone(),
                    owner: claims[0].1.clone(),
                    claimant: claimant.clone(),
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
            .find(|id| {
                id.0 == namespace
                    && self
                        .pods
                        .get(*id)
                        .is_some_and(|pod| pod_service_account(pod) == service_account)
            })
            .map(|claimant| UuidConflict {
                uuid: uuid.to_owned(),
                owner: owner.clone(),
                claimant: claimant.clone(),
            })
    }

    pub fn pod_by_ip(&self, ip: IpAddr) -> Option<&Pod> {
        self.pods_by_ip.get(&ip).and_then(|id| self.pods.get(id))
    }

    /// Services of monitored namespaces, sorted by namespace and name.
    pub fn mesh_services(&self) -> impl Iterator<Item = &Service> {
        self.services
            .iter()
            .filter(|((ns, _), _)| self.is_monitored(ns))
            .map(|(_, svc)| svc)
    }

    /// The service `namespace/name` if it is part of the mesh (its namespace is monitored).
    pub fn mesh_service(&self, namespace: &str, name: &str) -> Option<&Service> {
        if !self.is_monitored(namespace) {
            return None;
        }
        self.services.get(&(namespace.to_owned(), name.to_owned()))
    }

    /// Services in the pod's namespace whose selector matches the pod's labels.
    pub fn services_selecting(&self, pod: &Pod) -> Vec<&Service> {
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        self.services
            .range((namespace.clone(), String::new())..)
            .take_while(|((ns, _), _)| *ns == namespace)
            .filter_map(|(_, svc)| {
                let selector = svc.spec.as_ref()?.selector.as_ref()?;
                (!selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v)))
                    .then_some(svc)
            })
            .collect()
    }

    /// Ready addresses of one service port: from its EndpointSlices when it has any, otherwise
    /// from its Endpoints object.
    pub fn endpoints_of(&self, service: &Service, port: &ServicePort) -> Vec<ResolvedEndpoint> {
        let namespace = service.metadata.namespace.clone().unwrap_or_default();
        let name = service.metadata.name.clone().unwrap_or_default();
        let port_name = port.name.clone().unwrap_or_default();
        let mut out = BTreeSet::new();
        if let Some(slice_names) = self
            .slices_by_service
            .get(&(namespace.clone(), name.clone()))
        {
            for slice_name in slice_names {
                let Some(slice) = self.slices.get(&(namespace.clone(), slice_name.clone())) else {
                    continue;
                };
                let Some(number) = slice
                    .ports
                    .iter()
                    .flatten()
                    .find(|p| p.name.clone().unwrap_or_default() == port_name)
                    .and_then(|p| p.port)
                    .and_then(|p| u16::try_from(p).ok())
                else {
                    continue;
                };
                for endpoint in &slice.endpoints {
                    if endpoint.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                        continue;
                    }
                    for addr in &endpoint.addresses {
                        if let Ok(ip) = addr.parse() {
                            out.insert(self.resolved(ip, number));
                        }
                    }
                }
            }
        } else if let Some(endpoints) = self.endpoints.get(&(namespace, name)) {
            for subset in endpoints.subsets.iter().flatten() {
                let Some(number) = subset
                    .ports
                    .iter()
                    .flatten()
                    .find(|p| p.name.clone().unwrap_or_default() == port_name)
                    .and_then(|p| u16::try_from(p.port).ok())
                else {
                    continue;
                };
                for addr in subset.addresses.iter().flatten() {
                    if let Ok(ip) = addr.ip.parse() {
                        out.insert(self.resolved(ip, number));
                    }
                }
            }
        }
        out.into_iter().collect()
    }

    fn resolved(&self, ip: IpAddr, port: u16) -> ResolvedEndpoint {
        ResolvedEndpoint {
            ip,
            port,
            pod: self.pods_by_ip.get(&ip).cloned(),
        }
    }

    /// Resolves a Service port's `targetPort` against a pod's named container ports.
    pub fn target_port(port: &ServicePort, pod: &Pod) -> Option<u16> {
        match &port.target_port {
            None => u16::try_from(port.port).ok(),
            Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
            Some(IntOrString::String(name)) => pod
                .spec
                .as_ref()?
                .containers
                .iter()
                .flat_map(|c| c.ports.iter().flatten())
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

fn pod_ip(pod: &Pod) -> Option<IpAddr> {
    pod.status.as_ref()?.pod_ip.as_deref()?.parse().ok()
}

fn proxy_uuid(pod: &Pod) -> Option<&str> {
    pod.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(PROXY_UUID_LABEL))
        .map(String::as_str)
}

/// The service account a pod runs as (Kubernetes' `default` when unset).
pub fn pod_service_account(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".to_string())
}

#[cfg(test)]
mod tests {
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
        let port = &services[0]
            .spec
            .as_ref()
            .expect("spec")
            .ports
            .as_ref()
            .expect("ports")[0];
        assert_eq!(Catalog::target_port(port, pod), Some(14001));
        let eps = catalog.endpoints_of(services[0], port);
        assert_eq!(eps.len(), 1, "not-ready endpoints are skipped");
        assert_eq!(eps[0].pod, Some(("app".into(), "httpbin-1".into())));
    }

    #[test]
    fn apply_is_idempotent_and_delete_cleans_indexes() {
        let mut catalog = catalog();
        let pod = MeshObject::Pod(catalog.pod("app", "httpbin-1").expect("pod").clone());
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
        let mut pod = catalog.pod("app", "httpbin-1").expect("pod").clone();
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
        assert_eq!(catalog.get(&good.key()), Some(good.clone().normalized()));
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
            .and_then(|p| p.metadata.name.clone())
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
        let mut updated = catalog.pod("app", "httpbin-1").expect("pod").clone();
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
