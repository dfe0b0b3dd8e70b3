//! The part of every proxy's configuration that does not depend on the proxy, and the rules that
//! say what a catalog change touches.
//!
//! A [`MeshView`] holds one [`ServiceOutbound`] per meshed service, compiled once and shared (by
//! `Arc`) by every proxy that may reach the service. [`MeshView::refresh`] recompiles only the
//! services a [`ChangeSet`] touches, so an endpoint change rebuilds one entry however many proxies
//! there are; [`ProxyScope::of`] says whose own part (pod, inbound ports) must be recompiled.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use fsm_catalog::{Catalog, ChangeSet, Kind};
use fsm_ir::{Cluster, ClusterName, OutboundDetail, OutboundService, ServiceOutbound, ServiceRef};

use crate::{Warning, service_outbound};

/// One service's shared entry and the problems found compiling it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ViewEntry {
    pub outbound: Arc<ServiceOutbound>,
    pub warnings: Vec<Warning>,
}

/// The outbound entries of every meshed service.
#[derive(Clone, Debug, Default)]
pub struct MeshView {
    pub(crate) services: BTreeMap<ServiceRef, ViewEntry>,
    /// The services whose endpoints use each address: who a pod change concerns (a pod behind
    /// an endpoint decides whether it is meshed and which identity it presents).
    by_ip: HashMap<IpAddr, BTreeSet<ServiceRef>>,
    /// The service each outbound cluster belongs to: a split root's routes name its backends'.
    cluster_owners: HashMap<ClusterName, ServiceRef>,
    /// Services with a TCP port: all a data plane whose own part reads only those walks.
    tcp_services: BTreeSet<ServiceRef>,
    /// Services whose entry has warnings, which every proxy reports.
    with_warnings: BTreeSet<ServiceRef>,
}

/// Kinds whose change can alter what any proxy may reach or how: everything is recompiled.
/// (FSM policies are here until the compiler reads them; issue 17 narrows them to the proxies
/// and services they select.)
fn touches_everything(kind: Kind) -> bool {
    !matches!(
        kind,
        Kind::Service
            | Kind::Endpoints
            | Kind::EndpointSlice
            | Kind::Pod
            | Kind::ServiceAccount
            | Kind::TrafficTarget
            | Kind::HTTPRouteGroup
            | Kind::TCPRoute
            | Kind::TrafficSplit
            | Kind::Retry
            | Kind::Egress
            | Kind::UpstreamTrafficSetting
            | Kind::IngressBackend
            | Kind::AccessControl
    )
}

impl MeshView {
    pub fn build(catalog: &Catalog) -> Self {
        let mut view = MeshView::default();
        for svc in catalog.mesh_services() {
            let (outbound, warnings) = service_outbound(catalog, svc);
            view.insert(ViewEntry {
                outbound: Arc::new(outbound),
                warnings,
            });
        }
        view
    }

    /// Recompiles the services `changes` touches. Returns the services whose entry was added,
    /// removed or now has different content; an entry whose content did not change keeps its
    /// `Arc`, so whatever was derived from it stays valid.
    pub fn refresh(&mut self, catalog: &Catalog, changes: &ChangeSet) -> BTreeSet<ServiceRef> {
        self.refresh_scoped(catalog, changes).0
    }

    /// [`MeshView::refresh`], and whose own part must be recompiled: [`ProxyScope::of`] the
    /// changes, and the proxies whose own part reads a service port that appeared, left or
    /// changed (what a proxy may reach and how: its outbound TCP filter chains read every TCP
    /// port, wherever the proxy is; some data planes read the HTTP ones too).
    pub fn refresh_scoped(
        &mut self,
        catalog: &Catalog,
        changes: &ChangeSet,
    ) -> (BTreeSet<ServiceRef>, ProxyScope) {
        let mut reach = None;
        let changed = self.refresh_entries(catalog, changes, &mut reach);
        let mut scope = ProxyScope::of(changes);
        if let ProxyScope::Some {
            reach: r,
            namespaces,
            ..
        } = &mut scope
        {
            *r = reach;
            namespaces.extend(ingress_backends_of(catalog, &changes.endpoint_services));
        }
        (changed, scope)
    }

    fn refresh_entries(
        &mut self,
        catalog: &Catalog,
        changes: &ChangeSet,
        reach: &mut Option<OutboundDetail>,
    ) -> BTreeSet<ServiceRef> {
        let candidates: BTreeSet<ServiceRef> =
            if changes.objects.iter().any(|k| touches_everything(k.kind)) {
                self.services
                    .keys()
                    .cloned()
                    .chain(catalog.mesh_services().map(crate::service_ref))
                    .collect()
            } else {
                let services = changes
                    .objects
                    .iter()
                    .filter(|k| k.kind == Kind::Service)
                    .map(|k| ServiceRef {
                        namespace: k.namespace.clone(),
                        name: k.name.clone(),
                    });
                let with_endpoints =
                    changes
                        .endpoint_services
                        .iter()
                        .map(|(namespace, name)| ServiceRef {
                            namespace: namespace.clone(),
                            name: name.clone(),
                        });
                let behind_pods = changes
                    .pod_ips
                    .iter()
                    .filter_map(|ip| self.by_ip.get(ip))
                    .flatten()
                    .cloned();
                // A TrafficSplit changes where its root's traffic goes, an
                // UpstreamTrafficSetting its host's circuit breakers.
                let policy_services =
                    changes
                        .policy_services
                        .iter()
                        .map(|(namespace, name)| ServiceRef {
                            namespace: namespace.clone(),
                            name: name.clone(),
                        });
                services
                    .chain(with_endpoints)
                    .chain(behind_pods)
                    .chain(policy_services)
                    .collect()
            };
        let mut changed = BTreeSet::new();
        for service in candidates {
            let now = catalog
                .mesh_service(&service.namespace, &service.name)
                .map(|svc| service_outbound(catalog, svc));
            let before = self.services.get(&service);
            match (before, now) {
                (None, None) => {}
                (Some(before), None) => {
                    let read_by = ports_read_by(&before.outbound.ports, &[]);
                    self.remove(&service);
                    changed.insert(service);
                    *reach = more_readers(*reach, read_by);
                }
                (Some(before), Some((outbound, warnings)))
                    if *before.outbound == outbound && before.warnings == warnings => {}
                (before, Some((outbound, warnings))) => {
                    let read_by = ports_read_by(
                        before.map_or(&[][..], |b| &b.outbound.ports[..]),
                        &outbound.ports,
                    );
                    *reach = more_readers(*reach, read_by);
                    self.remove(&service);
                    self.insert(ViewEntry {
                        outbound: Arc::new(outbound),
                        warnings,
                    });
                    changed.insert(service);
                }
            }
        }
        changed
    }

    pub fn get(&self, service: &ServiceRef) -> Option<&ViewEntry> {
        self.services.get(service)
    }

    /// Every entry, by service.
    pub fn entries(&self) -> impl Iterator<Item = &ViewEntry> {
        self.services.values()
    }

    pub fn len(&self) -> usize {
        self.services.len()
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }

    /// The outbound cluster `name`, whichever service's it is.
    pub fn cluster(&self, name: &ClusterName) -> Option<&Cluster> {
        let owner = self.cluster_owners.get(name)?;
        self.services
            .get(owner)?
            .outbound
            .clusters
            .iter()
            .find(|c| &c.name == name)
    }

    fn insert(&mut self, entry: ViewEntry) {
        let service = entry.outbound.service.clone();
        for ip in endpoint_ips(&entry.outbound) {
            self.by_ip.entry(ip).or_default().insert(service.clone());
        }
        for cluster in &entry.outbound.clusters {
            self.cluster_owners
                .insert(cluster.name.clone(), service.clone());
        }
        if entry.outbound.ports.iter().any(|p| !p.protocol.is_http()) {
            self.tcp_services.insert(service.clone());
        }
        if !entry.warnings.is_empty() {
            self.with_warnings.insert(service.clone());
        }
        self.services.insert(service, entry);
    }

    /// The entries a proxy's own part reads at `detail`, and those whose warnings it reports:
    /// walking only them keeps a proxy's compile independent of the number of HTTP services.
    pub(crate) fn read_at(
        &self,
        detail: OutboundDetail,
    ) -> (
        Box<dyn Iterator<Item = &ViewEntry> + '_>,
        impl Iterator<Item = &ViewEntry> + '_,
    ) {
        let entries: Box<dyn Iterator<Item = &ViewEntry>> = match detail {
            OutboundDetail::All => Box::new(self.services.values()),
            OutboundDetail::TcpOnly => Box::new(
                self.tcp_services
                    .iter()
                    .filter_map(|service| self.services.get(service)),
            ),
        };
        let warned = self
            .with_warnings
            .iter()
            .filter_map(|service| self.services.get(service));
        (entries, warned)
    }

    fn remove(&mut self, service: &ServiceRef) {
        let Some(entry) = self.services.remove(service) else {
            return;
        };
        for cluster in &entry.outbound.clusters {
            self.cluster_owners.remove(&cluster.name);
        }
        self.tcp_services.remove(service);
        self.with_warnings.remove(service);
        for ip in endpoint_ips(&entry.outbound) {
            if let Some(services) = self.by_ip.get_mut(&ip) {
                services.remove(service);
                if services.is_empty() {
                    self.by_ip.remove(&ip);
                }
            }
        }
    }
}

/// Whose own part a change of a service's ports from `before` to `after` concerns: the
/// proxies reading TCP ports (all of them) when a TCP port differs, else those reading every
/// port when an HTTP one does; `None` when the ports are the same.
fn ports_read_by(before: &[OutboundService], after: &[OutboundService]) -> Option<OutboundDetail> {
    // Compared in place: this runs for every entry a change rebuilds.
    let same = |http: bool| {
        let of = |p: &&OutboundService| p.protocol.is_http() == http;
        before.iter().filter(of).eq(after.iter().filter(of))
    };
    if !same(false) {
        Some(OutboundDetail::TcpOnly)
    } else if !same(true) {
        Some(OutboundDetail::All)
    } else {
        None
    }
}

/// The reach covering the proxies of both: TCP-port readers are every proxy.
fn more_readers(a: Option<OutboundDetail>, b: Option<OutboundDetail>) -> Option<OutboundDetail> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn endpoint_ips(outbound: &ServiceOutbound) -> BTreeSet<IpAddr> {
    outbound
        .clusters
        .iter()
        .flat_map(|c| c.endpoints.iter().map(|e| e.ip))
        .collect()
}

/// The namespaces of the IngressBackends and AccessControls with a `Service` source among
/// `services`: the addresses those admit moved, and with them the ingress sources of the pods
/// of their namespace.
fn ingress_backends_of(
    catalog: &Catalog,
    services: &BTreeSet<(String, String)>,
) -> BTreeSet<String> {
    use fsm_catalog::MeshKind;
    use fsm_crds::policy::v1alpha1::{
        AccessControl, IngressBackend, IngressSourceKind, IngressSourceSpec,
    };
    if services.is_empty() {
        return BTreeSet::new();
    }
    let names_one = |namespace: &str, sources: &[IngressSourceSpec]| {
        sources.iter().any(|s| {
            let source_ns = if s.namespace.is_empty() {
                namespace
            } else {
                &s.namespace
            };
            s.kind == IngressSourceKind::Service
                && services.contains(&(source_ns.to_owned(), s.name.clone()))
        })
    };
    let backends = catalog
        .policies(Kind::IngressBackend)
        .filter_map(IngressBackend::of_object)
        .map(|ib| (&ib.metadata, &ib.spec.sources[..]));
    let access = catalog
        .policies(Kind::AccessControl)
        .filter_map(AccessControl::of_object)
        .map(|ac| (&ac.metadata, &ac.spec.sources[..]));
    backends
        .chain(access)
        .filter_map(|(meta, sources)| {
            let namespace = meta.namespace.as_deref().unwrap_or_default();
            names_one(namespace, sources).then(|| namespace.to_owned())
        })
        .collect()
}

/// Whose own part of the configuration (pod, identity checks, inbound ports, local clusters) a
/// change touches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProxyScope {
    /// Every proxy (MeshConfig, a namespace, a policy changed).
    All,
    Some {
        /// Proxies claiming these UUIDs (their pod, or a pod copying the label, changed).
        uuids: BTreeSet<String>,
        /// Proxies whose pods are in these namespaces (a Service there changed: which of
        /// their ports it exposes may have changed; or an UpstreamTrafficSetting: the rate
        /// limits of the pods behind its host).
        namespaces: BTreeSet<String>,
        /// Proxies running as these service accounts (namespace, name): a policy about them
        /// changed (an SMI access policy whose destination they are, a Retry whose source).
        service_accounts: BTreeSet<(String, String)>,
        /// Proxies whose own part reads at least this much of what they may reach (a service
        /// port they read appeared, left or changed); see [`MeshView::refresh_scoped`].
        reach: Option<OutboundDetail>,
    },
}

impl ProxyScope {
    pub fn of(changes: &ChangeSet) -> Self {
        if changes.objects.iter().any(|k| touches_everything(k.kind)) {
            return ProxyScope::All;
        }
        ProxyScope::Some {
            uuids: changes.pod_uuids.clone(),
            // An UpstreamTrafficSetting's rate limits are enforced by the pods of its host, a
            // service of its own namespace; an IngressBackend or AccessControl admits clients
            // into pods of its namespace.
            namespaces: changes
                .objects
                .iter()
                .filter(|k| {
                    matches!(
                        k.kind,
                        Kind::Service
                            | Kind::UpstreamTrafficSetting
                            | Kind::IngressBackend
                            | Kind::AccessControl
                    )
                })
                .map(|k| k.namespace.clone())
                .collect(),
            // SMI access policies decide what enters their destinations' pods, Retry policies
            // how their sources send; neither changes what any proxy reaches.
            service_accounts: changes.policy_service_accounts.clone(),
            reach: None,
        }
    }

    /// Whether the proxy `uuid` whose pod is in `namespace` and runs as `service_account`,
    /// whose own part reads `detail` of what it may reach, must be recompiled.
    pub fn covers(
        &self,
        uuid: &str,
        namespace: &str,
        service_account: &str,
        detail: OutboundDetail,
    ) -> bool {
        match self {
            ProxyScope::All => true,
            ProxyScope::Some {
                uuids,
                namespaces,
                service_accounts,
                reach,
            } => {
                reach.is_some_and(|r| detail >= r)
                    || uuids.contains(uuid)
                    || namespaces.contains(namespace)
                    || (!service_accounts.is_empty()
                        && service_accounts
                            .contains(&(namespace.to_owned(), service_account.to_owned())))
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        matches!(self, ProxyScope::Some { uuids, namespaces, service_accounts, reach } if uuids.is_empty() && namespaces.is_empty() && service_accounts.is_empty() && reach.is_none())
    }
}

#[cfg(test)]
mod tests {
    use fsm_catalog::{CatalogSettings, MeshObject, ObjectKey, decode_manifests};

    use super::*;

    const DEMO: &str = include_str!("../testdata/permissive-demo/in.yaml");

    fn demo() -> (Catalog, Vec<MeshObject>) {
        let (objects, errors) = decode_manifests("in.yaml", DEMO);
        assert!(errors.is_empty(), "{errors:?}");
        let mut catalog = Catalog::new(CatalogSettings::default());
        for object in objects.clone() {
            catalog.apply(object);
        }
        catalog.take_changes();
        (catalog, objects)
    }

    fn service(name: &str) -> ServiceRef {
        ServiceRef {
            namespace: "demo".into(),
            name: name.into(),
        }
    }

    fn find<'a>(objects: &'a [MeshObject], kind: Kind, name: &str) -> &'a MeshObject {
        objects
            .iter()
            .find(|o| o.key().kind == kind && o.key().name == name)
            .expect("object in the demo")
    }

    #[test]
    fn an_endpoint_change_recompiles_its_service_only() {
        let (mut catalog, objects) = demo();
        let mut view = MeshView::build(&catalog);
        let tcp_before = view
            .get(&service("tcp-echo"))
            .expect("entry")
            .outbound
            .clone();
        let MeshObject::Endpoints(mut endpoints) =
            find(&objects, Kind::Endpoints, "httpbin").clone()
        else {
            unreachable!()
        };
        let subset = &mut endpoints.subsets.as_mut().expect("subsets")[0];
        subset.addresses.as_mut().expect("addresses").pop();
        assert!(catalog.apply(MeshObject::Endpoints(endpoints)));
        let changes = catalog.take_changes();
        assert_eq!(
            ProxyScope::of(&changes),
            ProxyScope::Some {
                uuids: BTreeSet::new(),
                namespaces: BTreeSet::new(),
                service_accounts: BTreeSet::new(),
                reach: None,
            },
            "no proxy's own part depends on endpoints"
        );
        assert!(ProxyScope::of(&changes).is_empty());
        let (changed, scope) = view.refresh_scoped(&catalog, &changes);
        assert_eq!(changed, BTreeSet::from([service("httpbin")]));
        assert!(scope.is_empty(), "its ports are as they were: {scope:?}");
        let httpbin = &view.get(&service("httpbin")).expect("entry").outbound;
        assert_eq!(httpbin.clusters[0].endpoints.len(), 1);
        assert!(
            Arc::ptr_eq(
                &tcp_before,
                &view.get(&service("tcp-echo")).expect("entry").outbound
            ),
            "an untouched service keeps its entry"
        );
        // Applying the same thing again changes nothing.
        assert!(
            view.refresh(&catalog, &catalog.clone().take_changes())
                .is_empty()
        );
    }

    #[test]
    fn a_pod_change_recompiles_the_services_whose_endpoints_it_backs_and_its_proxy() {
        let (mut catalog, objects) = demo();
        let mut view = MeshView::build(&catalog);
        let MeshObject::Pod(mut pod) = find(&objects, Kind::Pod, "tcp-echo-1").clone() else {
            unreachable!()
        };
        // Leaving the mesh: its endpoint is no longer reached through a sidecar.
        pod.metadata
            .annotations
            .get_or_insert_default()
            .insert("flomesh.io/sidecar-injection".into(), "disabled".into());
        assert!(catalog.apply(MeshObject::Pod(pod)));
        let changes = catalog.take_changes();
        let scope = ProxyScope::of(&changes);
        let uuid = changes
            .pod_uuids
            .iter()
            .next()
            .expect("the pod's uuid")
            .clone();
        assert!(scope.covers(&uuid, "demo", "httpbin", OutboundDetail::All));
        assert!(!scope.covers("another-proxy", "demo", "httpbin", OutboundDetail::All));
        assert_eq!(
            view.refresh(&catalog, &changes),
            BTreeSet::from([service("tcp-echo")])
        );
        let entry = view.get(&service("tcp-echo")).expect("entry");
        assert!(!entry.outbound.clusters[0].endpoints[0].meshed);
    }

    /// A TrafficSplit rebuilds its root's entry only; a backend service's change does too.
    #[test]
    fn a_traffic_split_rebuilds_its_root() {
        let (mut catalog, objects) = demo();
        let mut view = MeshView::build(&catalog);
        let (split, errors) = fsm_catalog::decode_manifests(
            "ts.yaml",
            "apiVersion: split.smi-spec.io/v1alpha4\nkind: TrafficSplit\nmetadata: {name: split, namespace: demo}\nspec:\n  service: httpbin.demo.svc.cluster.local\n  backends: [{service: httpbin, weight: 1}, {service: tcp-echo, weight: 0}]\n",
        );
        assert!(errors.is_empty(), "{errors:?}");
        for object in split {
            assert!(catalog.apply(object));
        }
        let changes = catalog.take_changes();
        let (changed, scope) = view.refresh_scoped(&catalog, &changes);
        assert_eq!(changed, BTreeSet::from([service("httpbin")]));
        // httpbin is HTTP: only the own parts that read HTTP ports (not Envoy's) are recompiled.
        assert!(scope.covers("x", "elsewhere", "sa", OutboundDetail::All));
        assert!(
            !scope.covers("x", "elsewhere", "sa", OutboundDetail::TcpOnly),
            "{scope:?}"
        );
        // A backend service changes: the root is looked at again (its entry is the same).
        assert!(catalog.delete(&find(&objects, Kind::Service, "tcp-echo").key()));
        let changes = catalog.take_changes();
        assert!(
            changes
                .policy_services
                .contains(&("demo".to_string(), "httpbin".to_string()))
        );
    }

    /// An UpstreamTrafficSetting rebuilds its host's entry (circuit breakers) and recompiles the
    /// proxies of its namespace (the host's pods enforce its rate limits), nothing else; its
    /// deletion does the same.
    #[test]
    fn an_upstream_traffic_setting_rebuilds_its_host_and_its_namespace() {
        let (mut catalog, _) = demo();
        let mut view = MeshView::build(&catalog);
        let (setting, errors) = fsm_catalog::decode_manifests(
            "uts.yaml",
            "apiVersion: policy.flomesh.io/v1alpha1\nkind: UpstreamTrafficSetting\nmetadata: {name: httpbin, namespace: demo}\nspec:\n  host: httpbin.demo.svc.cluster.local\n  connectionSettings: {http: {maxRequests: 5}}\n",
        );
        assert!(errors.is_empty(), "{errors:?}");
        let key = setting[0].key();
        for object in setting {
            assert!(catalog.apply(object));
        }
        for step in ["applied", "deleted"] {
            let changes = catalog.take_changes();
            let (changed, scope) = view.refresh_scoped(&catalog, &changes);
            assert_eq!(changed, BTreeSet::from([service("httpbin")]), "{step}");
            let limits = view
                .get(&service("httpbin"))
                .expect("entry")
                .outbound
                .clusters[0]
                .circuit_breaker
                .clone();
            assert_eq!(
                limits.and_then(|l| l.max_requests),
                (step == "applied").then_some(5)
            );
            assert!(
                scope.covers("x", "demo", "anyone", OutboundDetail::TcpOnly),
                "{step}"
            );
            assert!(
                !scope.covers("x", "elsewhere", "anyone", OutboundDetail::TcpOnly),
                "{step}: {scope:?}"
            );
            assert!(catalog.delete(&key) || step == "deleted");
        }
    }

    /// The endpoints of an IngressBackend's `Service` source are the addresses its backends
    /// admit: their change recompiles the proxies of the IngressBackend's namespace.
    #[test]
    fn a_source_services_endpoints_recompile_the_ingress_backends_namespace() {
        let (mut catalog, objects) = demo();
        let mut view = MeshView::build(&catalog);
        let (ib, errors) = fsm_catalog::decode_manifests(
            "ib.yaml",
            "apiVersion: policy.flomesh.io/v1alpha1\nkind: IngressBackend\nmetadata: {name: echo, namespace: demo}\nspec:\n  backends: [{name: tcp-echo, port: {number: 9000, protocol: http}}]\n  sources: [{kind: Service, name: httpbin, namespace: demo}]\n",
        );
        assert!(errors.is_empty(), "{errors:?}");
        let key = ib[0].key();
        for object in ib {
            assert!(catalog.apply(object));
        }
        let changes = catalog.take_changes();
        let (changed, scope) = view.refresh_scoped(&catalog, &changes);
        assert!(changed.is_empty(), "no shared entry reads it: {changed:?}");
        assert!(scope.covers("x", "demo", "tcp-echo", OutboundDetail::TcpOnly));
        assert!(
            !scope.covers("x", "elsewhere", "tcp-echo", OutboundDetail::All),
            "{scope:?}"
        );
        let MeshObject::Endpoints(endpoints) = find(&objects, Kind::Endpoints, "httpbin").clone()
        else {
            unreachable!()
        };
        let mut fewer = endpoints.clone();
        fewer.subsets.as_mut().expect("subsets")[0]
            .addresses
            .as_mut()
            .expect("addresses")
            .pop();
        assert!(catalog.apply(MeshObject::Endpoints(fewer)));
        let changes = catalog.take_changes();
        let (_, scope) = view.refresh_scoped(&catalog, &changes);
        assert!(
            scope.covers("x", "demo", "tcp-echo", OutboundDetail::TcpOnly),
            "{scope:?}"
        );
        // Without the IngressBackend, the same change recompiles no proxy's own part.
        assert!(catalog.delete(&key));
        let changes = catalog.take_changes();
        view.refresh_scoped(&catalog, &changes);
        assert!(catalog.apply(MeshObject::Endpoints(endpoints)));
        let changes = catalog.take_changes();
        let (_, scope) = view.refresh_scoped(&catalog, &changes);
        assert!(
            !scope.covers("x", "demo", "tcp-echo", OutboundDetail::TcpOnly),
            "{scope:?}"
        );
    }

    /// An SMI access policy recompiles the proxies of its destination and no shared entry.
    #[test]
    fn an_smi_access_policy_recompiles_its_destination_only() {
        let (mut catalog, _) = demo();
        let mut view = MeshView::build(&catalog);
        let (objects, errors) = fsm_catalog::decode_manifests(
            "tt.yaml",
            "apiVersion: access.smi-spec.io/v1alpha3\nkind: TrafficTarget\nmetadata: {name: allow, namespace: demo}\nspec:\n  destination: {kind: ServiceAccount, name: httpbin, namespace: demo}\n  sources: [{kind: ServiceAccount, name: curl, namespace: demo}]\n  rules: [{kind: HTTPRouteGroup, name: routes}]\n---\napiVersion: specs.smi-spec.io/v1alpha4\nkind: HTTPRouteGroup\nmetadata: {name: routes, namespace: demo}\nspec:\n  matches: [{name: all, pathRegex: '.*'}]\n",
        );
        assert!(errors.is_empty(), "{errors:?}");
        for object in objects {
            assert!(catalog.apply(object));
        }
        let changes = catalog.take_changes();
        assert_eq!(
            ProxyScope::of(&changes),
            ProxyScope::Some {
                uuids: BTreeSet::new(),
                namespaces: BTreeSet::new(),
                service_accounts: BTreeSet::from([("demo".to_string(), "httpbin".to_string())]),
                reach: None,
            }
        );
        assert!(view.refresh(&catalog, &changes).is_empty());
    }

    #[test]
    fn mesh_config_and_service_changes_reach_further() {
        let (mut catalog, objects) = demo();
        let mut view = MeshView::build(&catalog);
        assert!(catalog.delete(&find(&objects, Kind::Service, "tcp-echo").key()));
        let changes = catalog.take_changes();
        assert_eq!(
            ProxyScope::of(&changes),
            ProxyScope::Some {
                uuids: BTreeSet::new(),
                namespaces: BTreeSet::from(["demo".to_string()]),
                service_accounts: BTreeSet::new(),
                reach: None,
            }
        );
        let (changed, scope) = view.refresh_scoped(&catalog, &changes);
        assert_eq!(changed, BTreeSet::from([service("tcp-echo")]));
        assert!(
            scope.covers("a-proxy", "elsewhere", "sa", OutboundDetail::TcpOnly),
            "every proxy, wherever it is, loses its outbound listener for tcp-echo: {scope:?}"
        );
        assert!(view.get(&service("tcp-echo")).is_none());

        let namespace = ObjectKey {
            kind: Kind::Namespace,
            namespace: String::new(),
            name: "demo".into(),
        };
        assert!(catalog.delete(&namespace));
        let changes = catalog.take_changes();
        assert_eq!(ProxyScope::of(&changes), ProxyScope::All);
        assert_eq!(
            view.refresh(&catalog, &changes),
            BTreeSet::from([service("httpbin")]),
            "the namespace left the mesh with its services"
        );
        assert!(view.is_empty());
    }
}
