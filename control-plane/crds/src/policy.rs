//! `policy.flomesh.io`: FSM's own mesh policies (egress, ingress backends, access control,
//! retries, upstream traffic settings, ...). Gateway API and `gateway.flomesh.io` policies are
//! not here.

pub mod v1alpha1;

/// API group of the kinds in [`v1alpha1`].
pub const GROUP: &str = "policy.flomesh.io";
