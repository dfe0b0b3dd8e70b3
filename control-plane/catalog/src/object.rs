use std::fmt;

use fsm_crds::FieldError;
use k8s_openapi::api::core::v1::{
    Container, Endpoints, Namespace, Pod, PodSpec, PodStatus, Service, ServiceAccount,
};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Serialize;
use serde::de::DeserializeOwned;

use fsm_crds::config::v1alpha3::MeshConfig;
use fsm_crds::policy::v1alpha1::{
    AccessCert, AccessControl, Egress, EgressGateway, IngressBackend, Isolation, Retry,
    UpstreamTrafficSetting,
};
use fsm_crds::smi::access::v1alpha3::TrafficTarget;
use fsm_crds::smi::specs::v1alpha4::{HTTPRouteGroup, TCPRoute};
use fsm_crds::smi::split::v1alpha4::TrafficSplit;

/// Annotation `kubectl apply` stores the whole previous object in.
const LAST_APPLIED_ANNOTATION: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// A Rust type the mesh reads, tied to its [`Kind`]. Sources are generic over it (see
/// [`Kind::visit`]), so adding a kind to the table below is all it takes for the manifest
/// decoder and the Kubernetes watchers to handle it.
pub trait MeshKind:
    kube::Resource<DynamicType = ()>
    + Clone
    + fmt::Debug
    + Serialize
    + DeserializeOwned
    + Send
    + Sync
    + 'static
{
    const KIND: Kind;
    fn into_object(self) -> MeshObject;
    /// The object as this kind's type, if it is one.
    fn of_object(object: &MeshObject) -> Option<&Self>;
}

/// Something to do with the Rust type of a kind, chosen at run time by [`Kind::visit`].
pub trait KindVisitor {
    type Output;
    fn visit<K: MeshKind>(self) -> Self::Output;
}

/// Declares every kind once: its Rust type, API group, scope, whether every cluster must serve
/// it, and whether it is a CRD with FSM's semantic validation. Everything per kind derives from
/// this table.
macro_rules! mesh_kinds {
    ($( $kind:ident($ty:ty) = $group:literal, $scope:ident, $required:ident, $crd:ident; )*) => {
        /// The kinds of object the mesh reads.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
        pub enum Kind {
            $($kind,)*
        }

        impl Kind {
            pub const ALL: &'static [Kind] = &[$(Kind::$kind,)*];

            /// The API group (`""` for the core group).
            pub fn group(self) -> &'static str {
                match self {
                    $(Kind::$kind => $group,)*
                }
            }

            pub fn is_namespaced(self) -> bool {
                match self {
                    $(Kind::$kind => mesh_kinds!(@namespaced $scope),)*
                }
            }

            /// Built-in kinds, and FSM's MeshConfig installed with the chart: every cluster
            /// serves them. The others are CRDs a cluster may not have installed.
            pub fn is_required(self) -> bool {
                match self {
                    $(Kind::$kind => mesh_kinds!(@flag $required),)*
                }
            }

            /// The kind named `kind` in API group `group`.
            pub fn from_api(group: &str, kind: &str) -> Option<Kind> {
                match (group, kind) {
                    $(($group, stringify!($kind)) => Some(Kind::$kind),)*
                    _ => None,
                }
            }

            /// Calls `visitor` with this kind's Rust type.
            pub fn visit<V: KindVisitor>(self, visitor: V) -> V::Output {
                match self {
                    $(Kind::$kind => visitor.visit::<$ty>(),)*
                }
            }
        }

        $(
            impl MeshKind for $ty {
                const KIND: Kind = Kind::$kind;
                fn into_object(self) -> MeshObject {
                    MeshObject::$kind(self)
                }
                fn of_object(object: &MeshObject) -> Option<&Self> {
                    match object {
                        MeshObject::$kind(o) => Some(o),
                        _ => None,
                    }
                }
            }
        )*

        /// One mesh object, in the same Kubernetes types a cluster source would deliver.
        // Objects pass through once on their way into the catalog's maps; boxing the large
        // variants would only add an allocation per event.
        #[allow(clippy::large_enum_variant)]
        #[derive(Clone, Debug, PartialEq)]
        pub enum MeshObject {
            $($kind($ty),)*
        }

        impl MeshObject {
            pub fn kind(&self) -> Kind {
                match self {
                    $(MeshObject::$kind(_) => Kind::$kind,)*
                }
            }

            pub fn metadata(&self) -> &ObjectMeta {
                match self {
                    $(MeshObject::$kind(o) => &o.metadata,)*
                }
            }

            pub(crate) fn metadata_mut(&mut self) -> &mut ObjectMeta {
                match self {
                    $(MeshObject::$kind(o) => &mut o.metadata,)*
                }
            }

            /// What FSM checks beyond the schema (durations, CIDRs, subject kinds, ...).
            pub fn semantic_errors(&self) -> Vec<FieldError> {
                match self {
                    $(MeshObject::$kind(o) => mesh_kinds!(@validate $crd, o),)*
                }
            }

            /// Drops status written by controllers: it is never an input of the mesh.
            fn clear_crd_status(&mut self) {
                match self {
                    $(MeshObject::$kind(o) => mesh_kinds!(@clear_status $crd, o),)*
                }
            }
        }
    };
    (@namespaced namespaced) => { true };
    (@namespaced cluster) => { false };
    (@flag required) => { true };
    (@flag optional) => { false };
    (@validate crd, $o:ident) => { fsm_crds::Validate::validate($o) };
    (@validate builtin, $o:ident) => {{ let _ = $o; Vec::new() }};
    (@clear_status crd, $o:ident) => { $o.status = None };
    (@clear_status crd_without_status, $o:ident) => {{ let _ = $o; }};
    (@clear_status builtin, $o:ident) => {{ let _ = $o; }};
    (@validate crd_without_status, $o:ident) => { fsm_crds::Validate::validate($o) };
}

mesh_kinds! {
    Namespace(Namespace) = "", cluster, required, builtin;
    Service(Service) = "", namespaced, required, builtin;
    Endpoints(Endpoints) = "", namespaced, required, builtin;
    EndpointSlice(EndpointSlice) = "discovery.k8s.io", namespaced, required, builtin;
    Pod(Pod) = "", namespaced, required, builtin;
    ServiceAccount(ServiceAccount) = "", namespaced, required, builtin;
    MeshConfig(MeshConfig) = "config.flomesh.io", namespaced, required, crd_without_status;
    TrafficTarget(TrafficTarget) = "access.smi-spec.io", namespaced, optional, crd_without_status;
    HTTPRouteGroup(HTTPRouteGroup) = "specs.smi-spec.io", namespaced, optional, crd_without_status;
    TCPRoute(TCPRoute) = "specs.smi-spec.io", namespaced, optional, crd_without_status;
    TrafficSplit(TrafficSplit) = "split.smi-spec.io", namespaced, optional, crd_without_status;
    Egress(Egress) = "policy.flomesh.io", namespaced, optional, crd_without_status;
    EgressGateway(EgressGateway) = "policy.flomesh.io", namespaced, optional, crd_without_status;
    IngressBackend(IngressBackend) = "policy.flomesh.io", namespaced, optional, crd;
    Retry(Retry) = "policy.flomesh.io", namespaced, optional, crd_without_status;
    UpstreamTrafficSetting(UpstreamTrafficSetting) = "policy.flomesh.io", namespaced, optional, crd;
    AccessControl(AccessControl) = "policy.flomesh.io", namespaced, optional, crd;
    AccessCert(AccessCert) = "policy.flomesh.io", namespaced, optional, crd;
    Isolation(Isolation) = "policy.flomesh.io", cluster, optional, crd;
}

impl Kind {
    /// Policy kinds: stored as they are, read by the compiler through [`crate::Catalog::policies`].
    pub fn is_policy(self) -> bool {
        !self.is_required()
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Identifies one object: kind, namespace (empty for cluster-scoped kinds) and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ObjectKey {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

impl MeshObject {
    /// Drops what the API server changes without the mesh caring (resource versions, managed
    /// fields, timestamps, `kubectl apply` bookkeeping, status the compiler never reads), so that
    /// a status-only update or a relist compares equal to what the catalog holds and triggers no
    /// recomputation. The catalog applies it to the kinds it keeps whole (MeshConfig, policies);
    /// the built-in kinds it reduces to records of what the mesh reads (see `record.rs`), which
    /// drop even more.
    pub fn normalized(mut self) -> Self {
        // A pod keeps its uid (what its bootstrap Secret's ownerReference names) and its creation
        // time (which of two pods claiming one proxy UUID came first): both are set once by the
        // API server, so they never churn.
        let keeps_identity = matches!(self, MeshObject::Pod(_));
        let meta = self.metadata_mut();
        meta.resource_version = None;
        meta.managed_fields = None;
        meta.generation = None;
        if !keeps_identity {
            meta.creation_timestamp = None;
            meta.uid = None;
        }
        if let Some(annotations) = &mut meta.annotations {
            annotations.remove(LAST_APPLIED_ANNOTATION);
            if annotations.is_empty() {
                meta.annotations = None;
            }
        }
        match &mut self {
            MeshObject::Namespace(o) => o.status = None,
            MeshObject::Service(o) => o.status = None,
            MeshObject::Pod(o) => {
                // Of a pod the mesh reads its identity, network mode, named container ports,
                // whether `fsm-init` intercepts its traffic, and addresses; the rest (images,
                // probes, volumes, conditions) is most of a pod's size and churn.
                o.spec = o.spec.take().map(|spec| PodSpec {
                    service_account_name: spec.service_account_name,
                    host_network: spec.host_network,
                    init_containers: spec.init_containers.map(|init| {
                        init.into_iter()
                            .filter(|c| c.name == crate::INIT_CONTAINER_NAME)
                            .map(|c| Container {
                                name: c.name,
                                ..Default::default()
                            })
                            .collect()
                    }),
                    containers: spec
                        .containers
                        .into_iter()
                        .map(|c| Container {
                            name: c.name,
                            ports: c.ports,
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                });
                o.status = o.status.take().map(|status| PodStatus {
                    pod_ip: status.pod_ip,
                    pod_ips: status.pod_ips,
                    ..Default::default()
                });
            }
            other => other.clear_crd_status(),
        }
        self
    }

    pub fn key(&self) -> ObjectKey {
        let meta = self.metadata();
        let kind = self.kind();
        ObjectKey {
            kind,
            namespace: if kind.is_namespaced() {
                meta.namespace.clone().unwrap_or_default()
            } else {
                String::new()
            },
            name: meta.name.clone().unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TypeName;

    impl KindVisitor for TypeName {
        type Output = (Kind, String, bool);
        fn visit<K: MeshKind>(self) -> (Kind, String, bool) {
            let namespaced = std::any::TypeId::of::<K::Scope>()
                == std::any::TypeId::of::<kube::core::NamespaceResourceScope>();
            (K::KIND, K::kind(&()).to_string(), namespaced)
        }
    }

    #[test]
    fn the_table_agrees_with_the_rust_types() {
        for kind in Kind::ALL {
            let (visited, api_kind, namespaced) = kind.visit(TypeName);
            assert_eq!(visited, *kind);
            assert_eq!(kind.is_namespaced(), namespaced, "scope of {kind}");
            assert_eq!(api_kind, kind.to_string(), "Kind names match the API kind");
            assert_eq!(Kind::from_api(kind.group(), &api_kind), Some(*kind));
        }
        assert!(Kind::MeshConfig.is_required() && !Kind::TrafficTarget.is_required());
        assert!(!Kind::Namespace.is_namespaced() && Kind::Retry.is_namespaced());
    }

    /// A normalized pod keeps whether `fsm-init` intercepts its traffic, and nothing else of its
    /// init containers.
    #[test]
    fn a_normalized_pod_keeps_its_fsm_init_container_only() {
        use k8s_openapi::api::core::v1::{Container, Pod, PodSpec};
        let init = |names: &[&str]| {
            MeshObject::Pod(Pod {
                spec: Some(PodSpec {
                    init_containers: Some(
                        names
                            .iter()
                            .map(|n| Container {
                                name: (*n).into(),
                                image: Some("image".into()),
                                ..Default::default()
                            })
                            .collect(),
                    ),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .normalized()
        };
        let MeshObject::Pod(pod) = init(&["wait", crate::INIT_CONTAINER_NAME]) else {
            panic!("not a pod");
        };
        let kept = pod.spec.and_then(|s| s.init_containers).unwrap_or_default();
        assert_eq!(
            kept,
            [Container {
                name: crate::INIT_CONTAINER_NAME.into(),
                ..Default::default()
            }]
        );
    }
}
