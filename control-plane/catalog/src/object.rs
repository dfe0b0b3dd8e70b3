use std::fmt;

use k8s_openapi::api::core::v1::{Endpoints, Namespace, Pod, PodStatus, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Serialize;

use crate::MeshConfig;

/// Annotation `kubectl apply` stores the whole previous object in.
const LAST_APPLIED_ANNOTATION: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// The kinds of object the mesh reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Kind {
    Namespace,
    Service,
    Endpoints,
    EndpointSlice,
    Pod,
    ServiceAccount,
    MeshConfig,
}

impl Kind {
    pub fn is_namespaced(self) -> bool {
        !matches!(self, Kind::Namespace)
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

/// One mesh object, in the same Kubernetes types a cluster source would deliver.
// Objects pass through once on their way into the catalog's maps; boxing the large Pod variant
// would only add an allocation per event.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum MeshObject {
    Namespace(Namespace),
    Service(Service),
    Endpoints(Endpoints),
    EndpointSlice(EndpointSlice),
    Pod(Pod),
    ServiceAccount(ServiceAccount),
    MeshConfig(MeshConfig),
}

impl MeshObject {
    pub fn kind(&self) -> Kind {
        match self {
            MeshObject::Namespace(_) => Kind::Namespace,
            MeshObject::Service(_) => Kind::Service,
            MeshObject::Endpoints(_) => Kind::Endpoints,
            MeshObject::EndpointSlice(_) => Kind::EndpointSlice,
            MeshObject::Pod(_) => Kind::Pod,
            MeshObject::ServiceAccount(_) => Kind::ServiceAccount,
            MeshObject::MeshConfig(_) => Kind::MeshConfig,
        }
    }

    /// Drops what the API server changes without the mesh caring (resource versions, managed
    /// fields, timestamps, `kubectl apply` bookkeeping, status the compiler never reads), so that
    /// a status-only update or a relist compares equal to what the catalog holds and triggers no
    /// recomputation, and the catalog does not keep the bulk of large objects in memory.
    pub fn normalized(mut self) -> Self {
        let meta = self.metadata_mut();
        meta.resource_version = None;
        meta.managed_fields = None;
        meta.creation_timestamp = None;
        meta.generation = None;
        meta.uid = None;
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
                // The pod's addresses are the only status the mesh reads.
                o.status = o.status.take().map(|status| PodStatus {
                    pod_ip: status.pod_ip,
                    pod_ips: status.pod_ips,
                    ..Default::default()
                });
            }
            _ => {}
        }
        self
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        match self {
            MeshObject::Namespace(o) => &mut o.metadata,
            MeshObject::Service(o) => &mut o.metadata,
            MeshObject::Endpoints(o) => &mut o.metadata,
            MeshObject::EndpointSlice(o) => &mut o.metadata,
            MeshObject::Pod(o) => &mut o.metadata,
            MeshObject::ServiceAccount(o) => &mut o.metadata,
            MeshObject::MeshConfig(o) => &mut o.metadata,
        }
    }

    fn metadata(&self) -> &ObjectMeta {
        match self {
            MeshObject::Namespace(o) => &o.metadata,
            MeshObject::Service(o) => &o.metadata,
            MeshObject::Endpoints(o) => &o.metadata,
            MeshObject::EndpointSlice(o) => &o.metadata,
            MeshObject::Pod(o) => &o.metadata,
            MeshObject::ServiceAccount(o) => &o.metadata,
            MeshObject::MeshConfig(o) => &o.metadata,
        }
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
