//! Builds proxies' snapshots from shared parts, so that the work of a change is proportional to
//! what changed rather than to proxies × services.
//!
//! A proxy's configuration is two parts:
//!
//! - **shared**: per meshed service, its outbound clusters and ClusterLoadAssignments, the
//!   `outbound` route configuration, and the roots upstream servers are checked against. The same for every
//!   proxy (in permissive mode; SMI will key it by policy view), so it is translated and encoded
//!   once per service and data plane, and again only for the services a change touched
//!   ([`MeshView::refresh`]);
//! - **own**: the proxy's listeners, inbound routes, local clusters and certificate, recompiled
//!   only when a change is in the proxy's [`ProxyScope`] or its certificate changed.
//!
//! A proxy's set of one type is the union of both, interned by content: every proxy with the same
//! shared and own sets holds the same `Arc<TypeSnapshot>`, so an endpoint change builds one new
//! EDS set and hands it to every proxy, whose other types keep their versions (only EDS is
//! pushed).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Weak};

use fsm_cache::{Resource, Snapshot, TypeSnapshot, TypeUrl};
use fsm_catalog::{Catalog, ChangeSet};
use fsm_compiler::{Compiled, MeshView, ProxyScope};
use fsm_errcode::ErrCode;
use fsm_ir::{ProxyCredentials, ProxyIr, ServiceOutbound, ServiceRef};
use fsm_xds_server::DataPlane;
use prost::Message;

use crate::metrics::Work;

/// The shared part of one data plane for proxies whose certificates carry one trust bundle (the
/// upstream roots secret holds it; two bundles coexist during a root rotation).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SharedKey {
    pub data_plane: DataPlane,
    pub trust_bundle: Arc<str>,
    /// MeshConfig `enableEgress`: the shared `outbound` routes end with the passthrough.
    pub egress: bool,
}

/// What a proxy's own part was built from, and its sets per type.
pub struct Own {
    pub types: BTreeMap<TypeUrl, Arc<TypeSnapshot>>,
    pub warnings: Vec<String>,
    /// It holds its own outbound routes (its Retry policies change some of them): it reads
    /// every service port, whatever its data planes' own parts read.
    pub reads_every_port: bool,
    /// Compiled with egress passthrough on: which shared part it takes (see [`SharedKey`]).
    pub egress: bool,
}

/// Per service and data plane: the resources every proxy that may reach it shares.
struct SharedService {
    /// The view entry they were built from: rebuilt only when the entry is another `Arc`, and
    /// then only the resources of clusters that changed (see [`outbound_resources`]).
    from: Arc<ServiceOutbound>,
    /// Per type, one resource per cluster of `from`, in its order.
    types: Resources,
}

struct Shared {
    services: BTreeMap<ServiceRef, SharedService>,
    /// The roots every upstream server is checked against (the key's trust bundle).
    outbound_root: Arc<Resource>,
    /// Per type, every service's resources (and the outbound route configuration) as one set.
    types: BTreeMap<TypeUrl, Arc<TypeSnapshot>>,
}

/// The shared parts in use and the interned per-proxy sets.
#[derive(Default)]
pub struct Publisher {
    view: MeshView,
    shared: HashMap<SharedKey, Shared>,
    /// (shared set version, own set version) → the union, while some proxy holds it.
    merged: HashMap<(Arc<str>, Arc<str>), Weak<TypeSnapshot>>,
    /// Each proxy's own resources by (name, content version), while some proxy holds them:
    /// proxies of one identity have the same certificate secret, pods of one service the same
    /// local clusters, and each is kept once.
    own_resources: HashMap<(Arc<str>, Arc<str>), Weak<Resource>>,
    /// Work done since the last [`Publisher::take_work`].
    work: Work,
}

/// What one catalog change did to the shared parts.
pub struct Refreshed {
    /// Shared parts whose sets changed: every proxy using one gets a new snapshot.
    pub changed: BTreeSet<SharedKey>,
    /// Whose own part must be recompiled.
    pub scope: ProxyScope,
}

impl Publisher {
    /// Builds the view of the whole catalog (when it has loaded).
    pub fn load(&mut self, catalog: &Catalog) {
        self.view = MeshView::build(catalog);
        self.shared.clear();
    }

    pub fn view(&self) -> &MeshView {
        &self.view
    }

    /// The work done since the last call.
    pub fn take_work(&mut self) -> Work {
        std::mem::take(&mut self.work)
    }

    /// Counts a snapshot handed to a proxy's streams.
    pub fn published(&mut self) {
        self.work.snapshots_published += 1;
    }

    /// Applies one batch of catalog changes to the view and the shared parts in use.
    pub fn refresh(&mut self, catalog: &Catalog, changes: &ChangeSet) -> Refreshed {
        let (services, scope) = self.view.refresh_scoped(catalog, changes);
        let mut changed = BTreeSet::new();
        if !services.is_empty() {
            let keys: Vec<SharedKey> = self.shared.keys().cloned().collect();
            for key in keys {
                if self.rebuild_shared(&key, &services) {
                    changed.insert(key);
                }
            }
        }
        Refreshed { changed, scope }
    }

    /// The shared sets of `key`, built on first use.
    pub fn shared_types(
        &mut self,
        key: &SharedKey,
    ) -> Result<&BTreeMap<TypeUrl, Arc<TypeSnapshot>>, (ErrCode, String)> {
        if !self.shared.contains_key(key) {
            let mut shared = Shared {
                services: BTreeMap::new(),
                outbound_root: outbound_root(key),
                types: BTreeMap::new(),
            };
            self.work.resources_encoded += 1 + build_shared(&self.view, key, &mut shared, None)?;
            self.shared.insert(key.clone(), shared);
        }
        Ok(&self.shared[key].types)
    }

    /// Rebuilds the shared part `key` for the services whose view entry changed. Returns
    /// whether any of its sets changed.
    fn rebuild_shared(&mut self, key: &SharedKey, services: &BTreeSet<ServiceRef>) -> bool {
        let Some(shared) = self.shared.get_mut(key) else {
            return false;
        };
        let before: BTreeMap<TypeUrl, Arc<str>> = shared
            .types
            .iter()
            .map(|(t, s)| (*t, s.version().clone()))
            .collect();
        match build_shared(&self.view, key, shared, Some(services)) {
            Ok(encoded) => self.work.resources_encoded += encoded,
            Err((code, message)) => {
                // The previous shared sets keep serving.
                fsm_errcode::warn!(code, data_plane = %key.data_plane, "{message}");
                return false;
            }
        }
        let after: BTreeMap<TypeUrl, Arc<str>> = shared
            .types
            .iter()
            .map(|(t, s)| (*t, s.version().clone()))
            .collect();
        before != after
    }

    /// Forgets shared parts no proxy uses any more.
    pub fn retain_shared(&mut self, in_use: &BTreeSet<SharedKey>) {
        self.shared.retain(|key, _| in_use.contains(key));
        self.merged.retain(|_, set| set.strong_count() > 0);
        self.own_resources.retain(|_, r| r.strong_count() > 0);
    }

    /// Compiles and translates a proxy's own part for the data planes its streams speak.
    pub fn own(
        &mut self,
        compiled: &Compiled,
        credentials: &ProxyCredentials,
        data_planes: &[DataPlane],
    ) -> Result<Own, (ErrCode, String)> {
        self.work.proxies_recompiled += 1;
        let mut types = BTreeMap::new();
        let mut warnings = Vec::new();
        let retries = &compiled.ir.outbound_retries;
        let egress_hosts = &compiled.ir.egress.http;
        let own_routes = !retries.is_empty() || !egress_hosts.is_empty();
        for data_plane in data_planes {
            let (mut encoded, plane_warnings) =
                own_resources(*data_plane, &compiled.ir, credentials)?;
            warnings.extend(plane_warnings);
            if own_routes {
                // The shared outbound routes with this proxy's retries and the hosts outside
                // the mesh its Egress policies allow: its own, of the same name, win over the
                // shared ones. Proxies of one service account share it (interned by content).
                let ports = fsm_ir::with_retries(
                    self.view.entries().flat_map(|e| e.outbound.ports.iter()),
                    retries,
                );
                let routes = outbound_routes(
                    *data_plane,
                    ports.iter(),
                    egress_hosts,
                    compiled.ir.mesh.enable_egress,
                )?;
                encoded
                    .entry(routes_type_url(*data_plane))
                    .or_default()
                    .push(routes);
            }
            for (type_url, resources) in encoded {
                self.work.resources_encoded += resources.len() as u64;
                let resources: Vec<Arc<Resource>> =
                    resources.into_iter().map(|r| self.intern(r)).collect();
                types.insert(type_url, Arc::new(TypeSnapshot::from_shared(resources)));
            }
        }
        Ok(Own {
            types,
            warnings,
            // A transparent proxy's listeners match every service port by its original
            // destination, whatever the data plane.
            reads_every_port: own_routes || compiled.ir.proxy.transparent,
            egress: compiled.ir.mesh.enable_egress,
        })
    }

    /// A proxy's snapshot: per type, the union of the shared and own sets, interned.
    pub fn assemble(
        &mut self,
        own: &Own,
        bundle: &Arc<str>,
        data_planes: &[DataPlane],
    ) -> Result<Snapshot, (ErrCode, String)> {
        let mut types = Vec::new();
        for data_plane in data_planes {
            let key = SharedKey {
                data_plane: *data_plane,
                trust_bundle: bundle.clone(),
                egress: own.egress,
            };
            let shared = self.shared_types(&key)?.clone();
            for type_url in type_urls(*data_plane) {
                let shared = shared.get(type_url);
                let own = own.types.get(type_url);
                let set = match (shared, own) {
                    (Some(s), Some(o)) if o.is_empty() => s.clone(),
                    (Some(s), None) => s.clone(),
                    (Some(s), Some(o)) if s.is_empty() => o.clone(),
                    (None, Some(o)) => o.clone(),
                    (None, None) => Arc::new(TypeSnapshot::from_shared([])),
                    (Some(s), Some(o)) => self.merge(s, o),
                };
                types.push((*type_url, set));
            }
        }
        Ok(Snapshot::from_types(types))
    }

    /// The resource already held with the same name and content, or this one.
    fn intern(&mut self, resource: Arc<Resource>) -> Arc<Resource> {
        let key = (resource.name.clone(), resource.version.clone());
        if let Some(held) = self.own_resources.get(&key).and_then(Weak::upgrade) {
            return held;
        }
        self.own_resources.insert(key, Arc::downgrade(&resource));
        resource
    }

    fn merge(&mut self, shared: &Arc<TypeSnapshot>, own: &Arc<TypeSnapshot>) -> Arc<TypeSnapshot> {
        let key = (shared.version().clone(), own.version().clone());
        if let Some(set) = self.merged.get(&key).and_then(Weak::upgrade) {
            return set;
        }
        let set = Arc::new(TypeSnapshot::merged(shared, own));
        self.merged.insert(key, Arc::downgrade(&set));
        set
    }
}

/// Builds (or, with `only`, updates for those services) the shared part `key`. Returns how many
/// resources it encoded.
fn build_shared(
    view: &MeshView,
    key: &SharedKey,
    shared: &mut Shared,
    only: Option<&BTreeSet<ServiceRef>>,
) -> Result<u64, (ErrCode, String)> {
    let mut encoded = 0;
    let mut routes_changed = only.is_none();
    let mut gone: Vec<ServiceRef> = Vec::new();
    if let Some(services) = only {
        for service in services {
            if view.get(service).is_none() {
                gone.push(service.clone());
            }
        }
    }
    for service in &gone {
        shared.services.remove(service);
        routes_changed = true;
    }
    let wanted = view
        .entries()
        .filter(|e| only.is_none_or(|s| s.contains(&e.outbound.service)));
    for entry in wanted {
        let outbound = &entry.outbound;
        if let Some(existing) = shared.services.get(&outbound.service)
            && Arc::ptr_eq(&existing.from, outbound)
        {
            continue;
        }
        let ports_changed = shared
            .services
            .get(&outbound.service)
            .is_none_or(|existing| existing.from.ports != outbound.ports);
        routes_changed |= ports_changed;
        let previous = shared.services.get(&outbound.service);
        let types = service_resources(key, outbound, previous, &mut encoded)?;
        shared.services.insert(
            outbound.service.clone(),
            SharedService {
                from: outbound.clone(),
                types,
            },
        );
    }
    // Per type, every service's resources as one set.
    let mut per_type: BTreeMap<TypeUrl, Vec<Arc<Resource>>> = BTreeMap::new();
    for service in shared.services.values() {
        for (type_url, resources) in &service.types {
            per_type
                .entry(type_url)
                .or_default()
                .extend(resources.iter().cloned());
        }
    }
    let routes_type = routes_type_url(key.data_plane);
    let kept = shared
        .types
        .get(routes_type)
        .and_then(|t| t.get(fsm_ir::names::OUTBOUND_ROUTES).cloned())
        .filter(|_| !routes_changed);
    let routes = match kept {
        Some(resource) => resource,
        None => {
            encoded += 1;
            outbound_routes(
                key.data_plane,
                view.entries().flat_map(|e| e.outbound.ports.iter()),
                &[],
                key.egress,
            )?
        }
    };
    per_type.entry(routes_type).or_default().push(routes);
    per_type
        .entry(secret_type_url(key.data_plane))
        .or_default()
        .push(shared.outbound_root.clone());
    let mut types = BTreeMap::new();
    for type_url in type_urls(key.data_plane) {
        let resources = per_type.remove(type_url).unwrap_or_default();
        let set = TypeSnapshot::from_shared(resources);
        // Keep the old `Arc` when the content is the same: proxies' interned unions stay valid.
        let set = match shared.types.get(type_url) {
            Some(old) if old.version() == set.version() => old.clone(),
            // Streams holding the old set then learn what changed without walking it.
            Some(old) => Arc::new(set.replacing(old)),
            None => Arc::new(set),
        };
        types.insert(*type_url, set);
    }
    shared.types = types;
    Ok(encoded)
}

// === The data planes (the one place that names each adapter) ===

/// The types a data plane is served.
pub fn type_urls(data_plane: DataPlane) -> &'static [TypeUrl] {
    match data_plane {
        DataPlane::Envoy => &fsm_xds_server::protocol::ENVOY_TYPES,
        DataPlane::FsmSidecar => &fsm_dataplane_proto::ALL_TYPE_URLS,
    }
}

/// How much of the view a proxy's own part needs for the data planes its streams speak (see
/// each adapter's `PROXY_RESOURCES_OUTBOUND`, which is for explicit mode; the compiler gives a
/// transparent proxy every service port).
pub fn outbound_detail(data_planes: &[DataPlane]) -> fsm_ir::OutboundDetail {
    data_planes
        .iter()
        .map(|plane| match plane {
            DataPlane::Envoy => fsm_adapter_envoy::PROXY_RESOURCES_OUTBOUND,
            DataPlane::FsmSidecar => fsm_adapter_native::PROXY_RESOURCES_OUTBOUND,
        })
        .max()
        .unwrap_or(fsm_ir::OutboundDetail::All)
}

fn secret_type_url(data_plane: DataPlane) -> TypeUrl {
    match data_plane {
        DataPlane::Envoy => fsm_adapter_envoy::SECRET_TYPE,
        DataPlane::FsmSidecar => fsm_dataplane_proto::type_url::SECRET,
    }
}

/// The secret of the roots upstream servers are checked against, encoded once per shared part.
fn outbound_root(key: &SharedKey) -> Arc<Resource> {
    let (name, body) = match key.data_plane {
        DataPlane::Envoy => {
            let secret = fsm_adapter_envoy::outbound_root(&key.trust_bundle);
            (secret.name.clone(), secret.encode_to_vec())
        }
        DataPlane::FsmSidecar => {
            let secret = fsm_adapter_native::outbound_root(&key.trust_bundle);
            (secret.name.clone(), secret.encode_to_vec())
        }
    };
    Arc::new(Resource::new(name, body))
}

fn routes_type_url(data_plane: DataPlane) -> TypeUrl {
    match data_plane {
        DataPlane::Envoy => fsm_adapter_envoy::ROUTE_TYPE,
        DataPlane::FsmSidecar => fsm_dataplane_proto::type_url::ROUTE_CONFIGURATION,
    }
}

fn adapter_error(e: &dyn std::fmt::Display) -> (ErrCode, String) {
    (ErrCode::E5007, e.to_string())
}

/// Resources per type, each encoded once and shared.
type Resources = BTreeMap<TypeUrl, Vec<Arc<Resource>>>;

/// Encodes each message once; the resource is shared from then on.
fn encode<M: Message>(items: &[M], name: impl Fn(&M) -> &str) -> Vec<Arc<Resource>> {
    items
        .iter()
        .map(|m| Arc::new(Resource::new(name(m).to_owned(), m.encode_to_vec())))
        .collect()
}

/// The resources of a service's outbound clusters, of the two types `[cluster, endpoints]`
/// (each named after its cluster), built from `previous` for what changed: a cluster as it was
/// keeps both, one whose outbound shape is as it was keeps its cluster resource (an endpoint
/// change encodes one ClusterLoadAssignment). Comparing the IR rather than the built messages
/// keeps no message: an Envoy cluster is 3 KiB in memory, per service. Counts what it encoded.
fn outbound_resources<C: Message, L: Message>(
    outbound: &ServiceOutbound,
    previous: Option<&SharedService>,
    [cluster_type, endpoints_type]: [TypeUrl; 2],
    cluster: impl Fn(&fsm_ir::Cluster) -> Result<C, (ErrCode, String)>,
    load_assignment: impl Fn(&fsm_ir::Cluster) -> L,
    encoded: &mut u64,
) -> Result<Resources, (ErrCode, String)> {
    type Built<'a> = (&'a fsm_ir::Cluster, &'a Arc<Resource>, &'a Arc<Resource>);
    let before: HashMap<&fsm_ir::ClusterName, Built<'_>> = previous
        .and_then(|p| {
            let clusters = p.types.get(cluster_type)?;
            let endpoints = p.types.get(endpoints_type)?;
            Some(
                p.from
                    .clusters
                    .iter()
                    .zip(clusters)
                    .zip(endpoints)
                    .map(|((c, cluster), endpoints)| (&c.name, (c, cluster, endpoints)))
                    .collect(),
            )
        })
        .unwrap_or_default();
    let mut resource = |c: &fsm_ir::Cluster, body: Vec<u8>| {
        *encoded += 1;
        Arc::new(Resource::new(c.name.to_string(), body))
    };
    let (mut clusters, mut endpoints) = (Vec::new(), Vec::new());
    for c in &outbound.clusters {
        let old = before.get(&c.name);
        let (cluster, assignment) = match old {
            Some((old, cluster, assignment)) if *old == c => {
                ((*cluster).clone(), (*assignment).clone())
            }
            Some((old, cluster, _)) if old.outbound_shape() == c.outbound_shape() => (
                (*cluster).clone(),
                resource(c, load_assignment(c).encode_to_vec()),
            ),
            _ => (
                resource(c, cluster(c)?.encode_to_vec()),
                resource(c, load_assignment(c).encode_to_vec()),
            ),
        };
        clusters.push(cluster);
        endpoints.push(assignment);
    }
    Ok(BTreeMap::from([
        (cluster_type, clusters),
        (endpoints_type, endpoints),
    ]))
}

fn service_resources(
    key: &SharedKey,
    outbound: &ServiceOutbound,
    previous: Option<&SharedService>,
    encoded: &mut u64,
) -> Result<Resources, (ErrCode, String)> {
    match key.data_plane {
        DataPlane::Envoy => outbound_resources(
            outbound,
            previous,
            [
                fsm_adapter_envoy::CLUSTER_TYPE,
                fsm_adapter_envoy::ENDPOINT_TYPE,
            ],
            |c| {
                Ok(fsm_adapter_envoy::outbound_cluster(
                    c,
                    fsm_compiler::TRUST_DOMAIN,
                ))
            },
            fsm_adapter_envoy::outbound_load_assignment,
            encoded,
        ),
        DataPlane::FsmSidecar => {
            use fsm_dataplane_proto::type_url::{CLUSTER, CLUSTER_LOAD_ASSIGNMENT};
            outbound_resources(
                outbound,
                previous,
                [CLUSTER, CLUSTER_LOAD_ASSIGNMENT],
                |c| fsm_adapter_native::outbound_cluster(c).map_err(|e| adapter_error(&e)),
                fsm_adapter_native::outbound_load_assignment,
                encoded,
            )
        }
    }
}

/// Route configuration `outbound` of `ports` (every service's, for the shared one) and
/// `egress_hosts` (a proxy's own, for its Egress policies).
fn outbound_routes<'a>(
    data_plane: DataPlane,
    ports: impl Iterator<Item = &'a fsm_ir::OutboundService>,
    egress_hosts: &[fsm_ir::EgressHttpHost],
    passthrough: bool,
) -> Result<Arc<Resource>, (ErrCode, String)> {
    let (name, body) = match data_plane {
        DataPlane::Envoy => {
            let routes = fsm_adapter_envoy::outbound_routes(ports, egress_hosts, passthrough);
            (
                routes.name.clone(),
                fsm_adapter_envoy::encode_route_configuration(&routes),
            )
        }
        DataPlane::FsmSidecar => {
            let routes = fsm_adapter_native::outbound_routes(ports, egress_hosts, passthrough)
                .map_err(|e| adapter_error(&e))?;
            (routes.name.clone(), routes.encode_to_vec())
        }
    };
    Ok(Arc::new(Resource::new(name, body)))
}

type OwnResources = (Resources, Vec<String>);

fn own_resources(
    data_plane: DataPlane,
    ir: &ProxyIr,
    credentials: &ProxyCredentials,
) -> Result<OwnResources, (ErrCode, String)> {
    Ok(match data_plane {
        DataPlane::Envoy => {
            let r = fsm_adapter_envoy::proxy_resources(ir, credentials)
                .map_err(|e| adapter_error(&e))?;
            (
                BTreeMap::from([
                    (
                        fsm_adapter_envoy::CLUSTER_TYPE,
                        encode(&r.clusters, |c| &c.name),
                    ),
                    (
                        fsm_adapter_envoy::LISTENER_TYPE,
                        encode(&r.listeners, |l| &l.name),
                    ),
                    (
                        fsm_adapter_envoy::ROUTE_TYPE,
                        // Its per-filter maps encoded in one order, so that the same routes
                        // are the same resource (prost writes a map in its hasher's order).
                        r.routes
                            .iter()
                            .map(|rc| {
                                Arc::new(Resource::new(
                                    rc.name.clone(),
                                    fsm_adapter_envoy::encode_route_configuration(rc),
                                ))
                            })
                            .collect(),
                    ),
                    (
                        fsm_adapter_envoy::SECRET_TYPE,
                        encode(&r.secrets, |s| &s.name),
                    ),
                ]),
                r.warnings,
            )
        }
        DataPlane::FsmSidecar => {
            let r = fsm_adapter_native::proxy_resources(ir, credentials)
                .map_err(|e| adapter_error(&e))?;
            use fsm_dataplane_proto::type_url;
            (
                BTreeMap::from([
                    (type_url::CLUSTER, encode(&r.clusters, |c| &c.name)),
                    (type_url::LISTENER, encode(&r.listeners, |l| &l.name)),
                    (
                        type_url::ROUTE_CONFIGURATION,
                        encode(&r.routes, |r| &r.name),
                    ),
                    (type_url::SECRET, encode(&r.secrets, |s| &s.name)),
                    (type_url::RUNTIME, encode(&r.runtime, |r| &r.name)),
                ]),
                r.warnings,
            )
        }
    })
}

#[cfg(test)]
mod tests {
    use fsm_catalog::{CatalogSettings, decode_manifests};
    use fsm_compiler::{ProxyRef, compile_with_view};
    use fsm_ir::OutboundDetail;
    use proptest::prelude::*;

    use super::*;

    fn catalog(yaml: &str) -> Catalog {
        let (objects, errors) = decode_manifests("in.yaml", yaml);
        assert!(errors.is_empty(), "{errors:?}");
        let mut catalog = Catalog::new(CatalogSettings::default());
        for object in objects {
            catalog.apply(object);
        }
        catalog
    }

    fn credentials() -> ProxyCredentials {
        ProxyCredentials {
            cert_chain_pem: "chain".into(),
            private_key_pem: "key".into(),
            trust_bundle_pem: "bundle".into(),
        }
    }

    fn outbound_cluster(endpoints: Vec<fsm_ir::Endpoint>) -> fsm_ir::Cluster {
        let service = fsm_ir::ServiceRef {
            namespace: "demo".into(),
            name: "httpbin".into(),
        };
        fsm_ir::Cluster {
            name: fsm_ir::ClusterName::outbound(&service, 14001),
            kind: fsm_ir::ClusterKind::Outbound,
            service,
            protocol: fsm_ir::Protocol::Http,
            endpoints,
            connect_timeout_ms: 1000,
            circuit_breaker: None,
        }
    }

    fn endpoint(last: u8, service_account: Option<&str>) -> fsm_ir::Endpoint {
        fsm_ir::Endpoint {
            ip: std::net::IpAddr::from([10, 0, 0, last]),
            port: 14001,
            meshed: service_account.is_some(),
            identity: service_account.map(|sa| fsm_ir::ServiceIdentity::new(sa, "demo")),
            workload: None,
        }
    }

    /// Rebuilt for what changed only: nothing for the same IR, the ClusterLoadAssignment for
    /// new addresses, both when the identities its servers present change.
    #[test]
    fn a_service_rebuild_encodes_what_its_change_touched() {
        let key = SharedKey {
            data_plane: DataPlane::Envoy,
            trust_bundle: "bundle".into(),
            egress: false,
        };
        let build = |clusters: Vec<fsm_ir::Cluster>, previous: Option<&SharedService>| {
            let outbound = Arc::new(ServiceOutbound {
                service: clusters[0].service.clone(),
                ports: vec![],
                clusters,
            });
            let mut encoded = 0;
            let types = service_resources(&key, &outbound, previous, &mut encoded).expect("builds");
            (
                SharedService {
                    from: outbound,
                    types,
                },
                encoded,
            )
        };
        let resources = |s: &SharedService| -> [Arc<Resource>; 2] {
            [
                s.types[fsm_adapter_envoy::CLUSTER_TYPE][0].clone(),
                s.types[fsm_adapter_envoy::ENDPOINT_TYPE][0].clone(),
            ]
        };
        let first = vec![outbound_cluster(vec![
            endpoint(1, Some("httpbin")),
            endpoint(2, Some("httpbin")),
        ])];
        let (built, encoded) = build(first.clone(), None);
        assert_eq!(encoded, 2);
        let [cluster, assignment] = resources(&built);

        let (same, encoded) = build(first, Some(&built));
        assert_eq!(encoded, 0, "the same IR encodes nothing");
        assert!(
            Arc::ptr_eq(&resources(&same)[0], &cluster)
                && Arc::ptr_eq(&resources(&same)[1], &assignment)
        );

        let moved = vec![outbound_cluster(vec![
            endpoint(1, Some("httpbin")),
            endpoint(3, Some("httpbin")),
        ])];
        let (moved, encoded) = build(moved, Some(&same));
        assert_eq!(encoded, 1, "a new address: the ClusterLoadAssignment only");
        let [moved_cluster, moved_assignment] = resources(&moved);
        assert!(Arc::ptr_eq(&moved_cluster, &cluster));
        assert_ne!(moved_assignment.version, assignment.version);

        let other = vec![outbound_cluster(vec![
            endpoint(1, Some("httpbin")),
            endpoint(3, Some("legacy")),
        ])];
        let (other, encoded) = build(other, Some(&moved));
        assert_eq!(
            encoded, 2,
            "another server identity: the cluster's SANs change too"
        );
        assert_ne!(resources(&other)[0].version, cluster.version);
    }

    fn any_endpoint() -> impl Strategy<Value = fsm_ir::Endpoint> {
        (0u8..4, 1u16..3, proptest::option::of(prop_oneof!["a", "b"])).prop_map(
            |(last, port, service_account)| fsm_ir::Endpoint {
                port,
                ..endpoint(last, service_account.as_deref())
            },
        )
    }

    fn any_outbound_cluster() -> impl Strategy<Value = fsm_ir::Cluster> {
        (
            proptest::collection::vec(any_endpoint(), 0..4),
            prop_oneof![
                Just(fsm_ir::Protocol::Http),
                Just(fsm_ir::Protocol::Grpc),
                Just(fsm_ir::Protocol::Tcp),
                Just(fsm_ir::Protocol::TcpServerFirst),
            ],
            prop_oneof![Just(1000u64), Just(2000)],
            prop_oneof![
                Just(None),
                Just(Some(fsm_ir::CircuitBreaker {
                    max_requests: Some(5),
                    ..Default::default()
                })),
                Just(Some(fsm_ir::CircuitBreaker {
                    max_connections: Some(2),
                    max_requests_per_connection: Some(1),
                    ..Default::default()
                })),
            ],
        )
            .prop_map(
                |(endpoints, protocol, connect_timeout_ms, circuit_breaker)| fsm_ir::Cluster {
                    protocol,
                    connect_timeout_ms,
                    circuit_breaker,
                    ..outbound_cluster(endpoints)
                },
            )
    }

    /// A proxy's own routes with RBAC and a rate limit on one route (two per-filter entries)
    /// are the same bytes however often they are built: else every recompile would look like a
    /// change to its Envoy.
    #[test]
    fn own_envoy_routes_encode_the_same_each_time() {
        #[derive(serde::Deserialize)]
        struct Golden {
            ir: ProxyIr,
        }
        let golden: Golden = serde_yaml_ng::from_str(include_str!(
            "../../compiler/testdata/upstream-traffic-setting-smi/out.app.httpbin-0.yaml"
        ))
        .expect("compiler golden");
        let credentials = ProxyCredentials {
            cert_chain_pem: "chain".into(),
            private_key_pem: "key".into(),
            trust_bundle_pem: "roots".into(),
        };
        let routes = || {
            let (types, _) =
                own_resources(DataPlane::Envoy, &golden.ir, &credentials).expect("translates");
            types[fsm_adapter_envoy::ROUTE_TYPE]
                .iter()
                .map(|r| r.body.to_vec())
                .collect::<Vec<_>>()
        };
        let first = routes();
        for _ in 0..16 {
            assert_eq!(routes(), first);
        }
    }

    proptest::proptest! {
        /// What lets a rebuild keep a cluster whose endpoints changed: both adapters make an
        /// outbound cluster of its shape alone.
        #[test]
        fn equal_outbound_shapes_make_equal_clusters(a in any_outbound_cluster(), b in any_outbound_cluster()) {
            if a.outbound_shape() == b.outbound_shape() {
                prop_assert_eq!(
                    fsm_adapter_envoy::outbound_cluster(&a, "cluster.local"),
                    fsm_adapter_envoy::outbound_cluster(&b, "cluster.local")
                );
                prop_assert_eq!(
                    fsm_adapter_native::outbound_cluster(&a),
                    fsm_adapter_native::outbound_cluster(&b)
                );
            }
        }
    }

    /// The Envoy adapter declares it reads only the TCP services for a proxy's own part: the
    /// runner compiles that much, and the result must be what the whole IR gives.
    #[test]
    fn the_outbound_detail_each_adapter_declares_is_enough_for_its_own_part() {
        let mut compared = 0;
        for case in ["ports-protocols-and-endpoints", "permissive-demo"] {
            let text = std::fs::read_to_string(format!(
                "{}/../compiler/testdata/{case}/in.yaml",
                env!("CARGO_MANIFEST_DIR")
            ))
            .expect("compiler test case");
            let catalog = catalog(&text);
            let view = MeshView::build(&catalog);
            for proxy in catalog.sidecar_proxies() {
                let proxy = ProxyRef {
                    uuid: proxy.uuid,
                    service_account: proxy.service_account,
                    namespace: proxy.namespace,
                };
                // Pods that cannot be programmed (no IP yet) have no own part to compare.
                let Ok(all) = compile_with_view(&catalog, &proxy, &view, OutboundDetail::All)
                else {
                    continue;
                };
                compared += 1;
                let envoy = compile_with_view(
                    &catalog,
                    &proxy,
                    &view,
                    fsm_adapter_envoy::PROXY_RESOURCES_OUTBOUND,
                )
                .expect("compiles");
                assert!(
                    envoy.ir.outbound.len() < all.ir.outbound.len(),
                    "{case}: the HTTP services are left out"
                );
                assert_eq!(
                    fsm_adapter_envoy::proxy_resources(&envoy.ir, &credentials()),
                    fsm_adapter_envoy::proxy_resources(&all.ir, &credentials()),
                    "{case}: {proxy:?}"
                );
                let native = compile_with_view(
                    &catalog,
                    &proxy,
                    &view,
                    fsm_adapter_native::PROXY_RESOURCES_OUTBOUND,
                )
                .expect("compiles");
                assert_eq!(native, all, "the native adapter reads every service");
            }
        }
        assert!(compared >= 4, "only {compared} proxies compared");
    }
}
