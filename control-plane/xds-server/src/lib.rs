//! ADS gRPC server (state-of-the-world and delta) over the snapshot cache.
//!
//! Reading order: [`node`] (who a stream belongs to, from FSM's node id), [`protocol`] (the xDS
//! rules as synchronous state machines, tested without sockets), [`server`] (the gRPC service
//! running one task per stream), [`frame`] (responses as a small per-stream head plus resource
//! bytes encoded once and shared by every stream), [`metrics`] (FSM's proxy metrics) and
//! [`convergence`] (how long a change takes to be acknowledged), [`listen`]
//! (the HTTP/2 connections, with a bounded per-stream send buffer). For mTLS: [`tls`] (the
//! listener, its rotatable certificate and client roots) and [`peer`] (the proxy named by a
//! stream's client certificate, checked against its node id).
//!
//! The server never decodes resource bodies: adapters encode them once into the
//! [`fsm_cache::SnapshotCache`], and every stream sends those bytes as they are.

pub mod convergence;
pub mod frame;
mod grpc;
pub mod listen;
pub mod metrics;
pub mod node;
pub mod peer;
pub mod protocol;
pub mod server;
pub mod tls;

pub use node::{
    DataPlane, FSM_SIDECAR_USER_AGENT, IdOrigin, IdentityMismatch, NodeError, ProxyIdentity,
    ProxyKind, ProxyNode, XdsCertIdentity, stream_data_plane,
};
pub use peer::PeerError;
pub use protocol::{
    DeltaRequest, DeltaStream, Event, Output, ProtocolError, Response, SotwRequest, SotwStream,
    XdsStream,
};
pub use server::{AdsServer, AdsService, ConnectionLimit, ProxyEvent, StreamId};
pub use tls::{AdsTls, HANDSHAKE_TIMEOUT, ServerCredentials, TlsError, TlsIncoming};
