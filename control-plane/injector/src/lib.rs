//! What FSM's sidecar injector puts into a meshed pod. Today: the `fsm-init` container's traffic
//! interception rules ([`Interception`]), one generator for the injector, the tests that run the
//! rules in network namespaces and anyone who wants to see what a pod will get.

pub mod interception;

pub use interception::{Interception, InterceptionError, PROXY_UID};
