//! `access.smi-spec.io`: who may talk to whom.

pub mod v1alpha3;

/// API group of [`v1alpha3::TrafficTarget`].
pub const GROUP: &str = "access.smi-spec.io";
