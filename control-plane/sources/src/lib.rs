//! Sources that feed the catalog.
//!
//! Every source turns some outside store into the [`fsm_catalog::CatalogEvent`] vocabulary. The
//! embedded default is [`ManifestSource`]: a directory of ordinary Kubernetes YAML manifests,
//! watched for changes.

pub mod manifest;

pub use manifest::{ManifestSource, SourceError};
