//! `split.smi-spec.io`: weighted traffic splitting.
//!
//! FSM stores `v1alpha4` and also serves `v1alpha2` (003's bookstore demo and `fsm mesh list`
//! use it), so both are here; the generated CRD carries both versions.

pub mod v1alpha2;
pub mod v1alpha4;

/// API group of [`v1alpha4::TrafficSplit`].
pub const GROUP: &str = "split.smi-spec.io";
