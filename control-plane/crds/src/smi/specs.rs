//! `specs.smi-spec.io`: the routes a TrafficTarget grants.

pub mod v1alpha4;

/// API group of [`v1alpha4::HTTPRouteGroup`] and [`v1alpha4::TCPRoute`].
pub const GROUP: &str = "specs.smi-spec.io";
