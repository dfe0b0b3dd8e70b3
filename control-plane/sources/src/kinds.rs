//! The kinds the Kubernetes source watches, in one table.

use fsm_catalog::{Kind, MeshObject};
use k8s_openapi::api::core::v1::{Endpoints, Namespace, Pod, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Client;
use tokio::task::JoinHandle;

use crate::kube::{WatchContext, spawn_watch};

pub(crate) struct Watched {
    pub kind: Kind,
    /// Kinds every cluster serves (and FSM's own MeshConfig, installed with the chart): the
    /// source is not `Synced` before they have listed. Optional kinds are CRDs a cluster may
    /// lack.
    pub required: bool,
    pub spawn: fn(Client, WatchContext) -> JoinHandle<()>,
}

pub(crate) const WATCHED: &[Watched] = &[
    Watched {
        kind: Kind::Namespace,
        required: true,
        spawn: |c, x| spawn_watch::<Namespace>(c, Kind::Namespace, MeshObject::Namespace, x),
    },
    Watched {
        kind: Kind::Service,
        required: true,
        spawn: |c, x| spawn_watch::<Service>(c, Kind::Service, MeshObject::Service, x),
    },
    Watched {
        kind: Kind::Endpoints,
        required: true,
        spawn: |c, x| spawn_watch::<Endpoints>(c, Kind::Endpoints, MeshObject::Endpoints, x),
    },
    Watched {
        kind: Kind::EndpointSlice,
        required: true,
        spawn: |c, x| {
            spawn_watch::<EndpointSlice>(c, Kind::EndpointSlice, MeshObject::EndpointSlice, x)
        },
    },
    Watched {
        kind: Kind::Pod,
        required: true,
        spawn: |c, x| spawn_watch::<Pod>(c, Kind::Pod, MeshObject::Pod, x),
    },
    Watched {
        kind: Kind::ServiceAccount,
        required: true,
        spawn: |c, x| {
            spawn_watch::<ServiceAccount>(c, Kind::ServiceAccount, MeshObject::ServiceAccount, x)
        },
    },
];
