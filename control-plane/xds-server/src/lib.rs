//! ADS gRPC server (state-of-the-world and delta) over the snapshot cache.
//!
//! Reading order: [`node`] (who a stream belongs to, from FSM's node id), [`protocol`] (the xDS
//! rules as synchronous state machines, tested without sockets), [`server`] (the tonic service
//! running one task per stream), [`metrics`] (FSM's proxy metrics).
//!
//! The server never decodes resource bodies: adapters encode them once into the
//! [`fsm_cache::SnapshotCache`], and every stream sends those bytes as they are.

pub mod metrics;
pub mod node;
pub mod protocol;
pub mod server;

pub use node::{DataPlane, FSM_SIDECAR_USER_AGENT, NodeError, ProxyKind, ProxyNode};
pub use protocol::{
    DeltaRequest, DeltaStream, Event, Output, ProtocolError, Response, SotwRequest, SotwStream,
    XdsStream,
};
pub use server::{AdsServer, ProxyEvent};
