//! `config.flomesh.io`: the mesh-wide `MeshConfig`.

pub mod v1alpha3;

/// API group of [`v1alpha3::MeshConfig`].
pub const GROUP: &str = "config.flomesh.io";

/// Name of the one MeshConfig the control plane reads, in its own namespace.
pub const MESH_CONFIG_NAME: &str = "fsm-mesh-config";

/// FSM's default control-plane namespace (`fsm install --fsm-namespace`).
pub const DEFAULT_FSM_NAMESPACE: &str = "fsm-system";
