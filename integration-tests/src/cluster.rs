//! Driving a (test) Kubernetes API server the way an operator would: `kubectl apply` of manifest
//! files, edits and deletes, through the real kube-rs client over HTTP.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use fsm_test_apiserver::{ApiServer, RunningApiServer};
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde::Deserialize;
use serde_json::Value;

/// The field manager our edits are recorded under, as `kubectl` records `kubectl-client-side-apply`.
const FIELD_MANAGER: &str = "fsm-integration-tests";

/// A test API server serving FSM's CRDs from `charts/fsm/crds`, with the demo manifests (moved to
/// 127.0.<subnet>.x) read but not yet applied, and a kubeconfig for the controller.
pub struct TestCluster {
    pub work: tempfile::TempDir,
    pub logs: PathBuf,
    /// The rewritten demo manifests, for the harness's own view of pods and ports.
    pub manifests: PathBuf,
    pub kubeconfig: PathBuf,
    pub server: RunningApiServer,
    pub client: kube::Client,
    /// Every document of `manifests`, in file order.
    pub objects: Vec<Value>,
}

impl TestCluster {
    pub async fn start_demo(subnet: u8) -> Result<TestCluster> {
        let work = tempfile::tempdir()?;
        let logs = work.path().join("logs");
        std::fs::create_dir_all(&logs)?;
        let manifests = crate::demo_manifests(&work.path().join("manifests"), subnet)?;
        // The cluster tests read the controller's /debug endpoints.
        crate::mesh::enable_debug_server(&manifests)?;
        let server = ApiServer::builder()
            .crd_dir(crate::repo_root().join("charts/fsm/crds"))
            .bookmark_interval(Duration::from_secs(1))
            .start()
            .await?;
        let kubeconfig = work.path().join("kubeconfig");
        server.write_kubeconfig(&kubeconfig)?;
        let client = server.client();
        let objects = read_manifests(&manifests, str::to_string)?;
        Ok(TestCluster {
            work,
            logs,
            manifests,
            kubeconfig,
            server,
            client,
            objects,
        })
    }
}

/// Every document of the `*.yaml` files in `dir` (sorted by name), with `rewrite` applied to each
/// file's text first (tests move addresses onto their own loopback subnet).
pub fn read_manifests(dir: &Path, rewrite: impl Fn(&str) -> String) -> Result<Vec<Value>> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    let mut documents = Vec::new();
    for file in files {
        let text = rewrite(&std::fs::read_to_string(&file)?);
        for document in serde_yaml_ng::Deserializer::from_str(&text) {
            let value = Value::deserialize(document)
                .with_context(|| format!("decoding {}", file.display()))?;
            if !value.is_null() {
                documents.push(value);
            }
        }
    }
    Ok(documents)
}

/// Kinds without a namespace, which `apply` addresses cluster-wide.
const CLUSTER_SCOPED: [&str; 6] = [
    "Namespace",
    "CustomResourceDefinition",
    "MutatingWebhookConfiguration",
    "ValidatingWebhookConfiguration",
    "ClusterRole",
    "ClusterRoleBinding",
];

/// The API for `object`'s kind, in its namespace when it has one.
fn api_for(client: &kube::Client, object: &Value) -> Result<(Api<DynamicObject>, String)> {
    let api_version = object["apiVersion"]
        .as_str()
        .context("object without apiVersion")?;
    let kind = object["kind"].as_str().context("object without kind")?;
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind));
    let name = object["metadata"]["name"]
        .as_str()
        .context("object without metadata.name")?
        .to_string();
    let api = match object["metadata"]["namespace"].as_str() {
        Some(namespace) => Api::namespaced_with(client.clone(), namespace, &resource),
        None if CLUSTER_SCOPED.contains(&kind) => Api::all_with(client.clone(), &resource),
        None => Api::namespaced_with(client.clone(), "default", &resource),
    };
    Ok((api, name))
}

/// `kubectl apply --server-side` of one object. Its `status`, which the API server ignores on
/// the main endpoint, is then written through the `/status` subresource, as the kubelet would
/// report a pod's IP.
pub async fn apply(client: &kube::Client, object: &Value) -> Result<()> {
    let (api, name) = api_for(client, object)?;
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(object),
    )
    .await
    .with_context(|| format!("applying {} {name}", object["kind"]))?;
    if let Some(status) = object.get("status") {
        let patch = serde_json::json!({ "status": status });
        api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .with_context(|| format!("writing the status of {} {name}", object["kind"]))?;
    }
    Ok(())
}

/// Applies every object, in order (namespaces are first in our manifest sets).
pub async fn apply_all(client: &kube::Client, objects: &[Value]) -> Result<()> {
    for object in objects {
        apply(client, object).await?;
    }
    Ok(())
}

/// `kubectl patch --type=merge`.
pub async fn merge_patch(client: &kube::Client, object: &Value, patch: &Value) -> Result<()> {
    let (api, name) = api_for(client, object)?;
    api.patch(&name, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .with_context(|| format!("patching {} {name}", object["kind"]))?;
    Ok(())
}

/// `kubectl delete`.
pub async fn delete(client: &kube::Client, object: &Value) -> Result<()> {
    let (api, name) = api_for(client, object)?;
    api.delete(&name, &DeleteParams::default())
        .await
        .with_context(|| format!("deleting {} {name}", object["kind"]))?;
    Ok(())
}

/// The object of `kind` named `name` among `objects`.
pub fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> Result<&'a Value> {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .with_context(|| format!("no {kind} {name} in the manifests"))
}
