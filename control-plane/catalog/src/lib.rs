//! Typed, indexed store of the mesh objects the compiler reads.
//!
//! Sources (the manifest directory today, Kubernetes watchers later) turn the outside world into
//! [`MeshObject`]s and feed them to [`Catalog::apply`] / [`Catalog::delete`]. The catalog keeps the
//! indexes the compiler needs (pods by proxy UUID and by IP, endpoint slices by service) and
//! answers the compiler's questions; it never does I/O.
//!
//! Built-in objects are kept as compact records of what the mesh reads ([`PodRecord`],
//! [`ServiceRecord`], and endpoints reduced to ready addresses): under 1 KiB per object at
//! 1,000 services and 10,000 pods, where whole `k8s-openapi` objects took 9 KiB
//! (`tests/memory.rs`).

mod decode;
mod event;
mod object;
mod record;
mod store;
mod workload;

pub use decode::{DecodeError, decode_manifests};
pub use event::{CatalogEvent, Scope};
pub use fsm_crds::config::v1alpha3::{MeshConfig, MeshConfigSpec};
pub use fsm_crds::parse_go_duration as parse_duration;
pub use object::{Kind, KindVisitor, MeshKind, MeshObject, ObjectKey};
pub use record::{ContainerPortRecord, PodRecord, ServicePortRecord, ServiceRecord};
pub use store::{
    Catalog, CatalogSettings, ChangeSet, Rejection, ResolvedEndpoint, SidecarProxy, UuidConflict,
};
pub use workload::{Workload, workload_of};

/// Namespace label that puts a namespace under a mesh's control.
pub const MONITORED_BY_LABEL: &str = "flomesh.io/monitored-by";
/// Pod/namespace annotation that turns sidecar injection on or off.
pub const SIDECAR_INJECTION_ANNOTATION: &str = "flomesh.io/sidecar-injection";
/// Pod label carrying the proxy UUID that appears in the proxy's node id.
pub const PROXY_UUID_LABEL: &str = "fsm-proxy-uuid";
/// The init container FSM's injector adds to a meshed pod: it installs the iptables rules that
/// redirect the pod's traffic to its sidecar (transparent mode). A pod without it is reached
/// and sends through its sidecar explicitly.
pub const INIT_CONTAINER_NAME: &str = "fsm-init";
/// EndpointSlice label naming its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The one MeshConfig the control plane reads.
pub const MESH_CONFIG_NAME: &str = "fsm-mesh-config";
