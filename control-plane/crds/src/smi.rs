//! Service Mesh Interface resources, in the versions FSM serves: `access.smi-spec.io/v1alpha3`,
//! `specs.smi-spec.io/v1alpha4` and `split.smi-spec.io/v1alpha4` (plus `v1alpha2`, which FSM
//! still serves for TrafficSplit).
//!
//! Subject kinds stay plain strings, as in the SMI CRDs, so that a wrong kind is reported by
//! [`Validate`](crate::Validate) with a message rather than by a schema enum.

pub mod access;
pub mod specs;
pub mod split;
