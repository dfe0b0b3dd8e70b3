//! Kubernetes CRD types the mesh reads (MeshConfig, SMI, FSM policies) and the CRD YAML generator
//!
//! Each kind lives under `<group>::<version>` with FSM's JSON field names, closed sets as enums
//! (so the generated schema rejects what FSM rejects) and a [`Validate`] impl for the rules a
//! schema cannot express. [`all_crds`] and [`crd_yaml`] produce `charts/fsm/crds/`, which the
//! `fsm-crdgen` binary writes and `tests/crd_drift.rs` checks.

pub mod config;
pub mod crdgen;
pub mod duration;
pub mod policy;
pub mod smi;
pub mod validate;

pub use crdgen::{all_crds, crd_yaml};
pub use duration::parse_go_duration;
pub use validate::{FieldError, Validate, parse_cidr};
