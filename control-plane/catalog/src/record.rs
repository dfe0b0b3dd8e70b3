//! Compact records of the built-in objects the mesh reads.
//!
//! A `k8s-openapi` Pod is several kilobytes even after status and bookkeeping are dropped (every
//! optional field of the spec and its containers is a slot), and at 10,000 pods the catalog would
//! hold most of the controller's memory. A record keeps only the fields the compiler, the
//! catalog's indexes and the controller read, parsed once (addresses as [`IpAddr`]), with the
//! strings many objects repeat (namespaces, service accounts, label keys and values, port names)
//! shared. Records compare by value: an update that changes nothing a record keeps is no change.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Endpoints, Namespace, Pod, Service, ServicePort};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::{
    MONITORED_BY_LABEL, PROXY_UUID_LABEL, SERVICE_NAME_LABEL, SIDECAR_INJECTION_ANNOTATION,
    Workload, workload_of,
};

/// Below this many strings the interner never purges.
const MIN_PURGE: usize = 1024;

/// One shared allocation per distinct string the records repeat.
#[derive(Clone, Debug, Default)]
pub(crate) struct Strings {
    set: HashSet<Arc<str>>,
    /// Size at which strings no record uses any more are dropped.
    purge_at: usize,
}

impl Strings {
    pub(crate) fn intern(&mut self, s: &str) -> Arc<str> {
        if let Some(found) = self.set.get(s) {
            return Arc::clone(found);
        }
        if self.set.len() >= self.purge_at.max(MIN_PURGE) {
            // A string only this set still holds belonged to objects that are gone; purging at
            // twice the size left after the last purge keeps the cost amortized.
            self.set.retain(|s| Arc::strong_count(s) > 1);
            self.purge_at = 2 * self.set.len();
        }
        let new: Arc<str> = Arc::from(s);
        self.set.insert(Arc::clone(&new));
        new
    }

    fn intern_opt(&mut self, s: Option<&String>) -> Option<Arc<str>> {
        s.map(|s| self.intern(s))
    }
}

/// Objects of one namespaced kind, by namespace then name, looked up by `&str`.
#[derive(Clone, Debug)]
pub(crate) struct Namespaced<V> {
    map: BTreeMap<Arc<str>, BTreeMap<Arc<str>, V>>,
    len: usize,
}

impl<V> Default for Namespaced<V> {
    fn default() -> Self {
        Namespaced {
            map: BTreeMap::new(),
            len: 0,
        }
    }
}

impl<V> Namespaced<V> {
    pub(crate) fn get(&self, namespace: &str, name: &str) -> Option<&V> {
        self.map.get(namespace)?.get(name)
    }

    pub(crate) fn contains(&self, namespace: &str, name: &str) -> bool {
        self.get(namespace, name).is_some()
    }

    pub(crate) fn get_mut(&mut self, namespace: &str, name: &str) -> Option<&mut V> {
        self.map.get_mut(namespace)?.get_mut(name)
    }

    /// Inserts `value`, returning the one it replaced.
    pub(crate) fn insert(&mut self, namespace: Arc<str>, name: Arc<str>, value: V) -> Option<V> {
        let old = self.map.entry(namespace).or_default().insert(name, value);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    pub(crate) fn remove(&mut self, namespace: &str, name: &str) -> Option<V> {
        let names = self.map.get_mut(namespace)?;
        let old = names.remove(name)?;
        if names.is_empty() {
            self.map.remove(namespace);
        }
        self.len -= 1;
        Some(old)
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Every entry, sorted by namespace and name.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&Arc<str>, &Arc<str>, &V)> {
        self.map
            .iter()
            .flat_map(|(ns, names)| names.iter().map(move |(name, v)| (ns, name, v)))
    }

    /// The entries of one namespace, sorted by name.
    pub(crate) fn in_namespace(&self, namespace: &str) -> impl Iterator<Item = (&Arc<str>, &V)> {
        self.map.get(namespace).into_iter().flatten()
    }
}

/// Labels (or a selector), sorted by key.
type Labels = Box<[(Arc<str>, Arc<str>)]>;

fn labels(map: Option<&BTreeMap<String, String>>, strings: &mut Strings) -> Labels {
    map.into_iter()
        .flatten()
        .map(|(key, value)| {
            // A proxy UUID is one pod's own: nothing to share.
            let value = if key == PROXY_UUID_LABEL {
                Arc::from(value.as_str())
            } else {
                strings.intern(value)
            };
            (strings.intern(key), value)
        })
        .collect()
}

fn label<'a>(labels: &'a [(Arc<str>, Arc<str>)], key: &str) -> Option<&'a str> {
    labels
        .binary_search_by(|(k, _)| (**k).cmp(key))
        .ok()
        .map(|at| &*labels[at].1)
}

/// FSM's pod annotations listing what `fsm-init` leaves out of (or alone puts into) the
/// redirection: `flomesh.io/outbound-port-exclusion-list` and the like.
fn is_interception_annotation(key: &str) -> bool {
    key.strip_prefix("flomesh.io/")
        .is_some_and(|k| k.ends_with("-exclusion-list") || k.ends_with("-inclusion-list"))
}

fn annotation(map: Option<&BTreeMap<String, String>>, key: &str) -> Option<String> {
    map.and_then(|a| a.get(key)).cloned()
}

/// A namespace: whether it is in a mesh and its injection default.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct NamespaceRecord {
    pub(crate) monitored_by: Option<Arc<str>>,
    pub(crate) sidecar_injection: Option<Arc<str>>,
}

impl NamespaceRecord {
    pub(crate) fn new(ns: &Namespace, strings: &mut Strings) -> Self {
        let meta = &ns.metadata;
        NamespaceRecord {
            monitored_by: strings
                .intern_opt(meta.labels.as_ref().and_then(|l| l.get(MONITORED_BY_LABEL))),
            sidecar_injection: strings.intern_opt(
                annotation(meta.annotations.as_ref(), SIDECAR_INJECTION_ANNOTATION).as_ref(),
            ),
        }
    }
}

/// A Service as the compiler reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceRecord {
    namespace: Arc<str>,
    name: Arc<str>,
    external_name: bool,
    cluster_ips: Box<[IpAddr]>,
    ports: Box<[ServicePortRecord]>,
    selector: Labels,
}

impl ServiceRecord {
    pub(crate) fn new(
        svc: &Service,
        namespace: Arc<str>,
        name: Arc<str>,
        strings: &mut Strings,
    ) -> Self {
        let spec = svc.spec.as_ref();
        let mut cluster_ips: Vec<IpAddr> = spec
            .into_iter()
            .flat_map(|s| s.cluster_ips.iter().flatten().chain(s.cluster_ip.iter()))
            .filter_map(|ip| ip.parse().ok())
            .collect();
        cluster_ips.sort();
        cluster_ips.dedup();
        ServiceRecord {
            namespace,
            name,
            external_name: spec.and_then(|s| s.type_.as_deref()) == Some("ExternalName"),
            cluster_ips: cluster_ips.into(),
            ports: spec
                .and_then(|s| s.ports.as_ref())
                .into_iter()
                .flatten()
                .map(|p| ServicePortRecord::new(p, strings))
                .collect(),
            selector: labels(spec.and_then(|s| s.selector.as_ref()), strings),
        }
    }

    /// `(namespace, name)`, shared.
    pub(crate) fn id(&self) -> (Arc<str>, Arc<str>) {
        (Arc::clone(&self.namespace), Arc::clone(&self.name))
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `spec.type: ExternalName`: a DNS alias, with no endpoints of its own.
    pub fn is_external_name(&self) -> bool {
        self.external_name
    }

    /// `spec.clusterIPs` and `spec.clusterIP` that are addresses, sorted, each once.
    pub fn cluster_ips(&self) -> &[IpAddr] {
        &self.cluster_ips
    }

    pub fn ports(&self) -> &[ServicePortRecord] {
        &self.ports
    }

    /// The label selector, sorted by key (empty when the service selects no pods itself).
    pub fn selector(&self) -> impl Iterator<Item = (&str, &str)> {
        self.selector.iter().map(|(k, v)| (&**k, &**v))
    }

    /// Whether the service selects a pod with these labels (a service without a selector selects
    /// none).
    pub(crate) fn selects(&self, pod: &PodRecord) -> bool {
        !self.selector.is_empty()
            && self
                .selector
                .iter()
                .all(|(k, v)| pod.label(k) == Some(&**v))
    }
}

/// One port of a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePortRecord {
    name: Option<Arc<str>>,
    port: i32,
    target_port: Option<IntOrString>,
    app_protocol: Option<Arc<str>>,
}

impl ServicePortRecord {
    fn new(port: &ServicePort, strings: &mut Strings) -> Self {
        ServicePortRecord {
            name: strings.intern_opt(port.name.as_ref()),
            port: port.port,
            target_port: port.target_port.clone(),
            app_protocol: strings.intern_opt(port.app_protocol.as_ref()),
        }
    }

    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    pub fn port(&self) -> i32 {
        self.port
    }

    pub fn target_port(&self) -> Option<&IntOrString> {
        self.target_port.as_ref()
    }

    pub fn app_protocol(&self) -> Option<&str> {
        self.app_protocol.as_deref()
    }
}

/// A Pod as the compiler, the catalog's indexes and the controller read it: identity, labels,
/// mesh membership, named ports and address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRecord {
    namespace: Arc<str>,
    name: Arc<str>,
    labels: Labels,
    sidecar_injection: Option<Arc<str>>,
    service_account: Arc<str>,
    host_network: bool,
    /// It runs FSM's `fsm-init` container: its traffic is redirected to its sidecar.
    intercepted: bool,
    /// Its annotations that shape that redirection (`flomesh.io/*-exclusion-list`,
    /// `flomesh.io/*-inclusion-list`), sorted by key; the others the mesh does not read.
    interception_annotations: Box<[(Arc<str>, Arc<str>)]>,
    ports: Box<[ContainerPortRecord]>,
    ip: Option<IpAddr>,
    /// Set once by the API server: what the pod's bootstrap Secret names as its owner.
    uid: Option<Box<str>>,
    /// Set once by the API server: which of two pods claiming one proxy UUID came first.
    created: Option<Time>,
    workload_kind: Arc<str>,
    workload_name: Arc<str>,
}

/// One port of one of a pod's containers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerPortRecord {
    pub name: Option<Arc<str>>,
    pub container_port: i32,
}

impl PodRecord {
    pub(crate) fn new(
        pod: &Pod,
        namespace: Arc<str>,
        name: Arc<str>,
        strings: &mut Strings,
    ) -> Self {
        let meta = &pod.metadata;
        let spec = pod.spec.as_ref();
        let workload = workload_of(pod);
        let workload_name = if workload.kind == "Pod" && workload.name == *name {
            Arc::clone(&name)
        } else {
            strings.intern(&workload.name)
        };
        PodRecord {
            labels: labels(meta.labels.as_ref(), strings),
            sidecar_injection: strings.intern_opt(
                annotation(meta.annotations.as_ref(), SIDECAR_INJECTION_ANNOTATION).as_ref(),
            ),
            service_account: strings.intern(
                spec.and_then(|s| s.service_account_name.as_deref())
                    .unwrap_or("default"),
            ),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            intercepted: spec
                .and_then(|s| s.init_containers.as_ref())
                .is_some_and(|init| init.iter().any(|c| c.name == crate::INIT_CONTAINER_NAME)),
            interception_annotations: meta
                .annotations
                .iter()
                .flatten()
                .filter(|(k, _)| is_interception_annotation(k))
                .map(|(k, v)| (strings.intern(k), Arc::from(v.as_str())))
                .collect(),
            ports: spec
                .into_iter()
                .flat_map(|s| s.containers.iter())
                .flat_map(|c| c.ports.iter().flatten())
                .map(|p| ContainerPortRecord {
                    name: strings.intern_opt(p.name.as_ref()),
                    container_port: p.container_port,
                })
                .collect(),
            ip: pod
                .status
                .as_ref()
                .and_then(|s| s.pod_ip.as_deref())
                .and_then(|ip| ip.parse().ok()),
            uid: meta.uid.as_deref().map(Box::from),
            created: meta.creation_timestamp.clone(),
            workload_kind: strings.intern(&workload.kind),
            workload_name,
            namespace,
            name,
        }
    }

    /// `(namespace, name)`, shared.
    pub(crate) fn id(&self) -> (Arc<str>, Arc<str>) {
        (Arc::clone(&self.namespace), Arc::clone(&self.name))
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The value of label `key`.
    pub fn label(&self, key: &str) -> Option<&str> {
        label(&self.labels, key)
    }

    /// Every label, sorted by key.
    pub fn labels(&self) -> impl Iterator<Item = (&str, &str)> {
        self.labels.iter().map(|(k, v)| (&**k, &**v))
    }

    /// The `fsm-proxy-uuid` label.
    pub fn proxy_uuid(&self) -> Option<&str> {
        self.label(PROXY_UUID_LABEL)
    }

    pub(crate) fn proxy_uuid_shared(&self) -> Option<&Arc<str>> {
        self.labels
            .binary_search_by(|(k, _)| (**k).cmp(PROXY_UUID_LABEL))
            .ok()
            .map(|at| &self.labels[at].1)
    }

    /// The `flomesh.io/sidecar-injection` annotation.
    pub fn sidecar_injection(&self) -> Option<&str> {
        self.sidecar_injection.as_deref()
    }

    /// The service account the pod runs as (Kubernetes' `default` when unset).
    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    pub fn host_network(&self) -> bool {
        self.host_network
    }

    /// Whether FSM's `fsm-init` container redirects the pod's traffic to its sidecar.
    pub fn intercepted(&self) -> bool {
        self.intercepted
    }

    /// The annotations that shape that redirection (FSM's per-pod exclusion and inclusion
    /// lists), by key.
    pub fn interception_annotations(&self) -> BTreeMap<String, String> {
        self.interception_annotations
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The ports of every container, in declaration order.
    pub fn container_ports(&self) -> &[ContainerPortRecord] {
        &self.ports
    }

    /// `status.podIP`, when it is set and an address.
    pub fn ip(&self) -> Option<IpAddr> {
        self.ip
    }

    /// `metadata.uid`.
    pub fn uid(&self) -> Option<&str> {
        self.uid.as_deref()
    }

    pub(crate) fn created(&self) -> Option<&Time> {
        self.created.as_ref()
    }

    /// The workload that runs the pod (see [`workload_of`]).
    pub fn workload(&self) -> Workload {
        Workload {
            kind: self.workload_kind.to_string(),
            name: self.workload_name.to_string(),
        }
    }
}

/// A port of an Endpoints subset or an EndpointSlice: its name (`""` when unnamed) and number
/// (`None` when absent or out of range, which skips it as before).
type EndpointPort = (Arc<str>, Option<u16>);

fn find_port(ports: &[EndpointPort], name: &str) -> Option<Option<u16>> {
    ports.iter().find(|(n, _)| **n == *name).map(|(_, p)| *p)
}

/// One subset of an Endpoints object: its ports and ready addresses.
type Subset = (Box<[EndpointPort]>, Box<[IpAddr]>);

/// An Endpoints object: the ready addresses and ports of each subset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct EndpointsRecord {
    subsets: Box<[Subset]>,
}

impl EndpointsRecord {
    pub(crate) fn new(endpoints: &Endpoints, strings: &mut Strings) -> Self {
        EndpointsRecord {
            subsets: endpoints
                .subsets
                .iter()
                .flatten()
                .map(|subset| {
                    let ports = subset
                        .ports
                        .iter()
                        .flatten()
                        .map(|p| {
                            (
                                strings.intern(p.name.as_deref().unwrap_or_default()),
                                u16::try_from(p.port).ok(),
                            )
                        })
                        .collect();
                    let addresses = sorted_addresses(
                        subset
                            .addresses
                            .iter()
                            .flatten()
                            .filter_map(|a| a.ip.parse().ok()),
                    );
                    (ports, addresses)
                })
                .collect(),
        }
    }

    /// `(port number, addresses)` of each subset with a port named `port_name`.
    pub(crate) fn addresses(&self, port_name: &str) -> impl Iterator<Item = (u16, &[IpAddr])> {
        self.subsets.iter().filter_map(move |(ports, addresses)| {
            Some((find_port(ports, port_name)??, &**addresses))
        })
    }
}

/// An EndpointSlice: its service, ports and ready addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SliceRecord {
    pub(crate) service: Option<Arc<str>>,
    ports: Box<[EndpointPort]>,
    ready: Box<[IpAddr]>,
}

impl SliceRecord {
    pub(crate) fn new(slice: &EndpointSlice, strings: &mut Strings) -> Self {
        SliceRecord {
            service: strings.intern_opt(
                slice
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(SERVICE_NAME_LABEL)),
            ),
            ports: slice
                .ports
                .iter()
                .flatten()
                .map(|p| {
                    (
                        strings.intern(p.name.as_deref().unwrap_or_default()),
                        p.port.and_then(|n| u16::try_from(n).ok()),
                    )
                })
                .collect(),
            // An endpoint is ready unless it says it is not.
            ready: sorted_addresses(
                slice
                    .endpoints
                    .iter()
                    .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
                    .flat_map(|e| e.addresses.iter())
                    .filter_map(|a| a.parse().ok()),
            ),
        }
    }

    /// The number of the port named `port_name` and the ready addresses, if the slice has it.
    pub(crate) fn addresses(&self, port_name: &str) -> Option<(u16, &[IpAddr])> {
        Some((find_port(&self.ports, port_name)??, &self.ready))
    }
}

/// Addresses sorted, each once: their order never matters to the mesh, so a reordering is no
/// change.
fn sorted_addresses(addresses: impl Iterator<Item = IpAddr>) -> Box<[IpAddr]> {
    let mut out: Vec<IpAddr> = addresses.collect();
    out.sort();
    out.dedup();
    out.into()
}
