//! Sources that feed the catalog.
//!
//! Every source turns some outside store into the [`fsm_catalog::CatalogEvent`] vocabulary:
//! [`KubeSource`] watches a Kubernetes cluster; the embedded default [`ManifestSource`] reads a
//! directory of ordinary Kubernetes YAML manifests and follows edits to it.

mod kinds;
pub mod kube;
pub mod manifest;
pub mod metrics;

pub use self::kube::{KubeSource, WatchStatus};

/// Capacity of the bounded channel from a source to the control loop: enough for a burst to be
/// applied as one batch, small enough that a control loop behind its sources holds them back
/// (a Kubernetes watch then buffers in the API server, as client-go's informers do) instead of
/// queueing without limit.
pub const EVENT_QUEUE: usize = 1024;
pub use manifest::{ManifestSource, SourceError, read_manifest_dir};
