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
