//! Test tool: an in-process Kubernetes API server (list/watch, CRUD, patch, CRD validation) for
//! integration tests.
//!
//! **This is a test tool, not an API server.** It serves the Kubernetes API's JSON list/watch
//! protocol over plain HTTP on loopback, faithfully enough that unmodified kube-rs code
//! (`kube::Api`, `kube::runtime::watcher`, `reflector`, discovery) runs against it in tests
//! where no real cluster is available. It has no authentication, no authorization and no
//! controllers; it calls admission webhooks (Mutating/ValidatingWebhookConfigurations) for HTTP
//! writes. See `README.md` for exactly what it does and does not do.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use fsm_test_apiserver::ApiServer;
//! use k8s_openapi::api::core::v1::Namespace;
//!
//! let server = ApiServer::builder().crd_dir("testdata/crds").start().await?;
//! let namespaces: kube::Api<Namespace> = kube::Api::all(server.client());
//! let list = namespaces.list(&Default::default()).await?;
//! assert!(list.items.iter().any(|n| n.metadata.name.as_deref() == Some("default")));
//!
//! // Bulk-load fixtures in-process (same events and resourceVersions as over HTTP).
//! server.store().apply_yaml("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: demo\n")?;
//! # Ok(()) }
//! ```
//!
//! Modules, in reading order: [`store`] (state, the global resourceVersion, event history,
//! write rules), `http` (routing, query parameters, list envelopes), `watch` (event streams),
//! `registry` (built-in kinds and CRDs), `workloads` and `rbac` (the Deployment and RBAC
//! defaults and validation), [`schema`] (structural schemas: prune, default,
//! validate), [`selector`] (label and field selectors), [`patch`], `services` (ClusterIP
//! allocation, Service → endpoint resolution), `admission` (webhook configurations, matching
//! and calls; `http/writes.rs` runs writes through it), `http/proxy.rs` and
//! `http/portforward.rs` (the `services/proxy`, `pods/proxy` and `pods/portforward`
//! subresources), `discovery`, [`status`] (errors as `Status` objects), `server` (start, stop,
//! restart).

#![forbid(unsafe_code)]

mod admission;
mod counters;
mod discovery;
mod http;
mod meta;
mod names;
pub mod patch;
mod rbac;
mod registry;
pub mod schema;
pub mod selector;
mod server;
mod services;
pub mod status;
pub mod store;
mod watch;
mod workloads;

pub use counters::Verb;
pub use server::{ApiServer, ApiServerBuilder, RunningApiServer};
pub use status::ApiError;
pub use store::Store;
