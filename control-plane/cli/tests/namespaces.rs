//! The `fsm` binary against the test API server: namespace and metrics commands write FSM's
//! labels and annotations, print FSM's messages, and refuse what they should with a hint.

use std::path::Path;
use std::process::Command;

use k8s_openapi::api::core::v1::Namespace;
use kube::Api;
use kube::api::PostParams;

/// Runs `fsm args…` with `kubeconfig`; returns (success, stdout, stderr).
fn fsm(kubeconfig: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fsm"))
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .expect("run fsm");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_join_and_leave_the_mesh_as_fsm_does_it() {
    let server = fsm_test_apiserver::ApiServer::builder()
        .start()
        .await
        .expect("api server");
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).expect("kubeconfig");
    let api: Api<Namespace> = Api::all(server.client());
    for name in ["demo", "other", "fsm-system"] {
        let ns: Namespace =
            serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).expect("ns");
        api.create(&PostParams::default(), &ns)
            .await
            .expect("create");
    }
    let meta = |name: &'static str| {
        let api = api.clone();
        async move {
            let ns = api.get(name).await.expect("get");
            (
                ns.metadata.labels.unwrap_or_default(),
                ns.metadata.annotations.unwrap_or_default(),
            )
        }
    };

    let (ok, out, _) = fsm(&kubeconfig, &["namespace", "add", "demo"]);
    assert!(ok);
    assert_eq!(out, "Namespace [demo] successfully added to mesh [fsm]\n");
    let (labels, annotations) = meta("demo").await;
    assert_eq!(labels["flomesh.io/monitored-by"], "fsm");
    assert_eq!(annotations["flomesh.io/sidecar-injection"], "enabled");

    let (ok, _, _) = fsm(
        &kubeconfig,
        &[
            "ns",
            "add",
            "other",
            "--mesh-name=fsm",
            "--disable-sidecar-injection",
        ],
    );
    assert!(ok);
    assert_eq!(
        meta("other").await.1["flomesh.io/sidecar-injection"],
        "disabled"
    );

    let (ok, out, _) = fsm(&kubeconfig, &["namespace", "list", "--mesh-name=fsm"]);
    assert!(ok);
    assert_eq!(
        out,
        "NAMESPACE  MESH  SIDECAR-INJECTION\ndemo       fsm   enabled\nother      fsm   disabled\n"
    );

    // Refusals name the namespace and say what to do.
    let (ok, _, err) = fsm(
        &kubeconfig,
        &["namespace", "add", "demo", "--mesh-name=mesh2"],
    );
    assert!(!ok);
    assert!(
        err.contains("Namespace [demo] already belongs to mesh [fsm]")
            && err.contains("fsm namespace remove demo --mesh-name=fsm"),
        "{err}"
    );
    let (ok, _, err) = fsm(&kubeconfig, &["namespace", "add", "fsm-system"]);
    assert!(!ok && err.contains("control plane's namespace"), "{err}");
    let (ok, _, err) = fsm(&kubeconfig, &["namespace", "add", "missing"]);
    assert!(
        !ok && err.contains("Namespace [missing] does not exist"),
        "{err}"
    );

    let (ok, out, _) = fsm(
        &kubeconfig,
        &["metrics", "enable", "--namespace", "demo, other"],
    );
    assert!(ok);
    assert_eq!(
        out,
        "Metrics successfully enabled in namespace [demo]\nMetrics successfully enabled in namespace [other]\n"
    );
    assert_eq!(meta("demo").await.1["flomesh.io/metrics"], "enabled");
    let (ok, out, _) = fsm(&kubeconfig, &["metrics", "disable", "--namespace", "other"]);
    assert!(ok, "{out}");
    assert!(!meta("other").await.1.contains_key("flomesh.io/metrics"));

    let (ok, out, _) = fsm(&kubeconfig, &["namespace", "remove", "demo"]);
    assert!(ok);
    assert_eq!(
        out,
        "Namespace [demo] successfully removed from mesh [fsm]\n"
    );
    let (labels, annotations) = meta("demo").await;
    assert!(!labels.contains_key("flomesh.io/monitored-by"));
    assert!(!annotations.contains_key("flomesh.io/sidecar-injection"));
    let (ok, _, err) = fsm(&kubeconfig, &["metrics", "enable", "--namespace", "demo"]);
    assert!(!ok && err.contains("is not a part of any mesh"), "{err}");

    let (ok, out, _) = fsm(&kubeconfig, &["namespace", "ignore", "demo"]);
    assert!(ok);
    assert_eq!(
        out,
        "Successfully configured namespace [demo] to be ignored\n"
    );
    assert_eq!(meta("demo").await.0["flomesh.io/ignore"], "true");
}

#[test]
fn error_info_and_completions_need_no_cluster() {
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_fsm"))
            .args(args)
            .env_remove("KUBECONFIG")
            .output()
            .expect("run fsm");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (ok, out) = run(&["support", "error-info", "E5004"]);
    assert!(ok && out.contains("| E5004      |"), "{out}");
    let (ok, out) = run(&["completion", "bash"]);
    assert!(ok && out.contains("_fsm()"), "{out}");
    let (ok, out) = run(&["namespace", "add", "--help"]);
    assert!(
        ok && out.contains("Examples:") && out.contains("--disable-sidecar-injection"),
        "{out}"
    );
    let (ok, _) = run(&["support", "error-info", "E0000"]);
    assert!(!ok);
    let (ok, out) = run(&["version", "--client-only"]);
    assert!(ok && out.starts_with("CLI Version: "), "{out}");
}

/// Applies `object` (a JSON manifest) through the dynamic API.
async fn create(client: &kube::Client, object: serde_json::Value) {
    use kube::api::{DynamicObject, Patch, PatchParams};
    use kube::core::{ApiResource, GroupVersionKind};
    let api_version = object["apiVersion"].as_str().expect("apiVersion");
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let kind = object["kind"].as_str().expect("kind");
    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind));
    let name = object["metadata"]["name"]
        .as_str()
        .expect("name")
        .to_string();
    let api: Api<DynamicObject> = match object["metadata"]["namespace"].as_str() {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
        None => Api::all_with(client.clone(), &resource),
    };
    api.patch(
        &name,
        &PatchParams::apply("test").force(),
        &Patch::Apply(&object),
    )
    .await
    .unwrap_or_else(|e| panic!("{kind} {name}: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uninstall_removes_the_mesh_and_keeps_the_crds_unless_asked() {
    let crds = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../charts/fsm/crds");
    let server = fsm_test_apiserver::ApiServer::builder()
        .crd_dir(crds)
        .start()
        .await
        .expect("api server");
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).expect("kubeconfig");
    let client = server.client();
    let install = || async {
        for object in [
            serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "fsm-system"}}),
            serde_json::json!({"apiVersion": "config.flomesh.io/v1alpha3", "kind": "MeshConfig",
                               "metadata": {"name": "fsm-mesh-config", "namespace": "fsm-system"}, "spec": {}}),
            serde_json::json!({"apiVersion": "v1", "kind": "Service",
                               "metadata": {"name": "fsm-controller", "namespace": "fsm-system"},
                               "spec": {"ports": [{"name": "http", "port": 9091}]}}),
            serde_json::json!({"apiVersion": "v1", "kind": "Secret",
                               "metadata": {"name": "fsm-ca-bundle", "namespace": "fsm-system"}}),
            serde_json::json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
                               "metadata": {"name": "fsm-webhook-fsm"},
                               "webhooks": [{"name": "fsm-inject.flomesh.io", "sideEffects": "NoneOnDryRun",
                                             "admissionReviewVersions": ["v1"],
                                             "clientConfig": {"service": {"name": "fsm-injector", "namespace": "fsm-system"}}}]}),
        ] {
            create(&client, object).await;
        }
    };
    install().await;
    let fsm = |args: &[&str], input: &str| {
        use std::io::Write;
        let mut child = Command::new(env!("CARGO_BIN_EXE_fsm"))
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run fsm");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("answer");
        let out = child.wait_with_output().expect("wait");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let exists = |kind: &'static str, name: &'static str| {
        let client = client.clone();
        async move {
            let path = match kind {
                "MeshConfig" => format!(
                    "/apis/config.flomesh.io/v1alpha3/namespaces/fsm-system/meshconfigs/{name}"
                ),
                "Service" => format!("/api/v1/namespaces/fsm-system/services/{name}"),
                "Secret" => format!("/api/v1/namespaces/fsm-system/secrets/{name}"),
                "Namespace" => format!("/api/v1/namespaces/{name}"),
                "Webhook" => format!(
                    "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{name}"
                ),
                _ => format!("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}"),
            };
            client
                .request_text(http::Request::get(path).body(Vec::new()).expect("request"))
                .await
                .is_ok()
        }
    };

    // Declined: nothing goes.
    let (ok, _, err) = fsm(&["uninstall", "mesh"], "n\n");
    assert!(
        !ok && err.contains("Uninstall FSM [mesh name: fsm] ? [y/n]: ") && err.contains("aborted"),
        "{err}"
    );
    assert!(exists("MeshConfig", "fsm-mesh-config").await);

    // Confirmed: the control plane goes; CRDs, the namespace and the root stay.
    let (ok, out, err) = fsm(&["uninstall", "mesh"], "y\n");
    assert!(ok, "{err}");
    assert_eq!(out, "FSM [mesh name: fsm] uninstalled\n");
    assert!(!exists("MeshConfig", "fsm-mesh-config").await);
    assert!(!exists("Service", "fsm-controller").await);
    assert!(!exists("Webhook", "fsm-webhook-fsm").await);
    assert!(exists("Secret", "fsm-ca-bundle").await);
    assert!(exists("Namespace", "fsm-system").await);
    assert!(exists("CRD", "retries.policy.flomesh.io").await);

    // Nothing left: said so.
    let (ok, _, err) = fsm(&["uninstall", "mesh", "-f"], "");
    assert!(
        !ok && err.contains("No mesh [fsm] found in namespace [fsm-system]"),
        "{err}"
    );

    // Everything, without asking.
    install().await;
    let (ok, _, err) = fsm(
        &[
            "uninstall",
            "mesh",
            "-f",
            "--delete-namespace",
            "--delete-cluster-wide-resources",
        ],
        "",
    );
    assert!(ok, "{err}");
    assert!(!exists("Secret", "fsm-ca-bundle").await);
    assert!(!exists("CRD", "retries.policy.flomesh.io").await);
    assert!(!exists("CRD", "traffictargets.access.smi-spec.io").await);
    assert!(!exists("Namespace", "fsm-system").await);
}
