//! Sources that feed the catalog.
//!
//! Every source turns some outside store into the [`fsm_catalog::CatalogEvent`] vocabulary:
//! [`KubeSource`] watches a Kubernetes cluster; the embedded default [`ManifestSource`] reads a
//! directory of ordinary Kubernetes YAML manifests and follows edits to it.

mod kinds;
pub mod kube;
pub mod manifest;

pub use self::kube::{KubeSource, WatchStatus};
pub use manifest::{ManifestSource, SourceError};
