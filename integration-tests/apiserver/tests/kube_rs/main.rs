//! The test API server driven by unmodified kube-rs: `Api`, `watcher`, `reflector`, discovery.
//!
//! One test binary (modules below) so the kube-rs stack is linked once.

mod admission;
mod crd;
mod crud;
mod lifecycle;
mod ownership;
mod proxy;
mod rbac;
mod watch;
mod workloads;

use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use fsm_test_apiserver::{ApiServer, RunningApiServer};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::ObjectMeta;

/// How long an eventual condition may take before the test fails.
const EVENTUALLY: Duration = Duration::from_secs(20);

pub fn crd_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/crds")
}

pub async fn server() -> RunningApiServer {
    ApiServer::builder()
        .crd_dir(crd_dir())
        .start()
        .await
        .expect("start test API server")
}

/// Polls `check` until it returns true; fails the test with `what` after [`EVENTUALLY`].
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < EVENTUALLY {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for: {what}");
}

pub fn namespace(name: &str) -> Namespace {
    Namespace {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    }
}

pub fn config_map(ns: &str, name: &str, labels: &[(&str, &str)]) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..ObjectMeta::default()
        },
        data: Some([("k".to_string(), "v".to_string())].into()),
        ..ConfigMap::default()
    }
}

/// The `Status` inside a kube API error.
pub fn api_status(err: kube::Error) -> Box<kube::core::Status> {
    match err {
        kube::Error::Api(status) => status,
        other => panic!("expected an API error, got {other:?}"),
    }
}
