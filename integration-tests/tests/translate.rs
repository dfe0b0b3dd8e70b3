//! `fsm translate` over the example manifest sets: every pod with a sidecar, as a static Envoy
//! bootstrap that real Envoy validates and as fsm-sidecar's resources; a broken set is refused
//! with every problem named; and the time for a 1,000-service mesh.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use fsm_catalog::CatalogSettings;
use fsm_integration_tests::{binary, load_catalog, repo_root, validate_bootstrap_file};

fn fsm(args: &[&str]) -> std::process::Output {
    Command::new(binary("fsm").expect("fsm built"))
        .args(args)
        .output()
        .expect("run fsm")
}

/// The example sets that make a mesh by themselves, and demo with the resilience policies.
fn example_sets(work: &Path) -> Vec<PathBuf> {
    let examples = repo_root().join("examples");
    let combined = work.join("demo-resilience");
    std::fs::create_dir_all(&combined).expect("dir");
    for dir in ["demo", "resilience"] {
        for entry in std::fs::read_dir(examples.join(dir)).expect("examples") {
            let path = entry.expect("entry").path();
            std::fs::copy(&path, combined.join(path.file_name().expect("name"))).expect("copy");
        }
    }
    vec![examples.join("demo"), examples.join("bookstore"), combined]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_example_pod_translates_for_both_data_planes() {
    let work = tempfile::tempdir().expect("tempdir");
    let mut translated = 0;
    for set in example_sets(work.path()) {
        let catalog = load_catalog(&set, CatalogSettings::default()).expect("catalog");
        let proxies = catalog.sidecar_proxies();
        assert!(!proxies.is_empty(), "{}: no pods", set.display());
        for p in proxies {
            let proxy = format!("{}/{}", p.namespace, p.pod);
            let dir = set.display().to_string();
            let out = fsm(&[
                "translate",
                "-f",
                &dir,
                "--proxy",
                &proxy,
                "-o",
                "bootstrap",
            ]);
            assert!(
                out.status.success(),
                "{dir} {proxy}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let file = work.path().join(format!("{}-{}.pb", p.namespace, p.pod));
            std::fs::write(&file, &out.stdout).expect("write");
            validate_bootstrap_file(&file)
                .await
                .unwrap_or_else(|e| panic!("{dir} {proxy}: {e:#}"));

            let out = fsm(&[
                "translate",
                "-f",
                &dir,
                "--proxy",
                &proxy,
                "--data-plane",
                "fsm-sidecar",
                "-o",
                "json",
            ]);
            assert!(
                out.status.success(),
                "{dir} {proxy}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
            assert!(
                json["listeners"].as_array().is_some_and(|l| !l.is_empty()),
                "{dir} {proxy}: no listeners in {json}"
            );
            assert!(
                !String::from_utf8_lossy(&out.stdout).contains("PRIVATE KEY"),
                "a private key was printed"
            );
            translated += 1;
        }
    }
    assert!(translated >= 10, "only {translated} pods translated");
}

#[test]
fn a_broken_set_is_refused_with_every_problem_named() {
    let work = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(repo_root().join("examples/demo")).expect("demo") {
        let path = entry.expect("entry").path();
        std::fs::copy(&path, work.path().join(path.file_name().expect("name"))).expect("copy");
    }
    std::fs::write(
        work.path().join("90-broken.yaml"),
        "apiVersion: policy.flomesh.io/v1alpha1\nkind: Retry\nmetadata: {name: r, namespace: demo}\nspec:\n  source: {kind: ServiceAccount, name: curl, namespace: demo}\n  destinations: [{kind: Service, name: httpbin, namespace: demo}]\n  retryPolicy: {retryOn: 5xx, numRetries: 3, perTryTimeout: forever}\n---\nkind: [not, a, kind]\n",
    )
    .expect("write");
    let dir = work.path().display().to_string();
    let out = fsm(&["translate", "-f", &dir, "--proxy", "demo/curl"]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("2 problem(s)"), "{err}");
    assert!(
        err.contains(
            "90-broken.yaml:1 (document 0) Retry demo/r: field spec.retryPolicy.perTryTimeout"
        ),
        "{err}"
    );
    assert!(err.contains("(document 1)"), "{err}");
    // Asking for what the data plane does not print is refused before reading anything.
    let out = fsm(&[
        "translate",
        "-f",
        &dir,
        "--data-plane",
        "fsm-sidecar",
        "-o",
        "bootstrap",
    ]);
    assert!(!out.status.success());
}

/// 1,000 services, each with one pod, in one namespace; the time of one proxy's translation.
#[test]
fn a_thousand_service_mesh_translates() {
    let work = tempfile::tempdir().expect("tempdir");
    let mut text = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: big, labels: {flomesh.io/monitored-by: fsm}}\n",
    );
    for i in 0..1000u32 {
        let (a, b) = (i / 250, i % 250 + 1);
        text.push_str(&format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: big}}\nspec: {{clusterIP: 10.96.{a}.{b}, selector: {{app: svc-{i}}}, ports: [{{name: http, port: 8080, appProtocol: http}}]}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {{name: svc-{i}, namespace: big, labels: {{app: svc-{i}, fsm-proxy-uuid: 00000000-0000-4000-8000-{i:012}}}}}\nspec: {{serviceAccountName: svc-{i}, containers: [{{name: app, ports: [{{containerPort: 8080}}]}}]}}\nstatus: {{podIP: 10.1.{a}.{b}}}\n---\napiVersion: v1\nkind: Endpoints\nmetadata: {{name: svc-{i}, namespace: big}}\nsubsets: [{{addresses: [{{ip: 10.1.{a}.{b}, targetRef: {{kind: Pod, name: svc-{i}, namespace: big}}}}], ports: [{{name: http, port: 8080}}]}}]\n"
        ));
    }
    std::fs::write(work.path().join("mesh.yaml"), text).expect("write");
    let dir = work.path().display().to_string();
    let started = Instant::now();
    let out = fsm(&[
        "translate",
        "-f",
        &dir,
        "--proxy",
        "big/svc-0",
        "--data-plane",
        "fsm-sidecar",
        "-o",
        "json",
    ]);
    let elapsed = started.elapsed();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert!(
        json["clusters"].as_array().map_or(0, Vec::len) >= 1000,
        "every service is a cluster of the permissive-mode proxy? {}",
        json["clusters"].as_array().map_or(0, Vec::len)
    );
    eprintln!(
        "[translate] 1,000 services, one proxy, fsm-sidecar JSON: {:.2} s (this build)",
        elapsed.as_secs_f64()
    );
}
