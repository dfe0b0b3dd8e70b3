//! FSM's sidecar injector: which pods get a sidecar ([`decision`]), what goes into them
//! ([`pod`]: the `fsm-proxy-uuid` label, the `fsm-init` container running the interception rules
//! of [`interception`], the Envoy or fsm-sidecar container with the bootstrap of [`envoy`], the
//! probes rewritten by [`probes`]), and the mutating admission webhook serving it ([`webhook`]),
//! with its metric and `/metrics` endpoint ([`metrics`]). FSM's log levels, for the sidecars it
//! starts and for the control plane's own logs (changed live from MeshConfig), are [`logging`]'s.

pub mod decision;
pub mod envoy;
pub mod interception;
pub mod logging;
pub mod metrics;
pub mod pod;
pub mod probes;
pub mod server;
pub mod webhook;

pub use decision::{Decision, decide};
pub use interception::{Interception, InterceptionError, PROXY_UID};
pub use pod::{InjectError, Injection, InjectorSettings, SidecarClass, inject};
