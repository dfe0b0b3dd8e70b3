//! fsm-sidecar's ADS client: SotW and delta, ACK/NACK, versions and reconnects.
//!
//! [`state`] is the protocol as a synchronous state machine (table-tested, no sockets);
//! [`client`] runs it over a tonic stream and reconnects with backoff; [`node`] builds the
//! `Node` FSM's control plane identifies a sidecar by.

pub mod client;
pub mod node;
pub mod state;

pub use client::{AdsTls, Backoff, ClientOptions, DEFAULT_ADS_SERVER_NAME, connect, run};
pub use node::{NodeInfo, build_node};
pub use state::{
    AdsMode, AdsState, ConfigSink, Nack, Outcome, RawResource, ResourceSet, TypeState,
};
