//! `apps/v1` and `batch/v1` through typed kube-rs APIs, as `fsm install` uses them: the chart's
//! Deployments applied, then waited on while the test (playing the controllers) writes their
//! status through the `/status` subresource.

use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams,
};
use kube::discovery::{Discovery, Scope};
use kube::runtime::wait::await_condition;
use serde_json::{Value, json};

use crate::{api_status, server};

fn deployment_json(name: &str, selector: Value, labels: Value) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "selector": selector,
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "app", "image": "flomesh/fsm-controller"}]},
            },
        },
    })
}

fn deployment(name: &str) -> Deployment {
    serde_json::from_value(deployment_json(
        name,
        json!({"matchLabels": {"app": name}}),
        json!({"app": name}),
    ))
    .expect("deployment")
}

/// What kube-controller-manager writes once the pods of a one-replica Deployment are ready.
fn ready_status(replicas: i32, generation: i64) -> Value {
    json!({
        "observedGeneration": generation,
        "replicas": replicas,
        "updatedReplicas": replicas,
        "readyReplicas": replicas,
        "availableReplicas": replicas,
        "conditions": [{
            "type": "Available", "status": "True",
            "reason": "MinimumReplicasAvailable",
            "message": "Deployment has minimum availability.",
        }],
    })
}

fn is_available(d: Option<&Deployment>) -> bool {
    d.and_then(|d| d.status.as_ref()).is_some_and(|s| {
        s.ready_replicas == Some(1)
            && s.conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "Available" && c.status == "True")
    })
}

#[tokio::test]
async fn deployments_are_stored_with_status_as_a_subresource() {
    let server = server().await;
    let api: Api<Deployment> = Api::default_namespaced(server.client());

    // A status in the body of a create is dropped; the real defaults are filled in.
    let mut with_status = deployment("fsm-controller");
    with_status.status =
        Some(serde_json::from_value(ready_status(1, 1)).expect("deployment status"));
    let created = api
        .create(&PostParams::default(), &with_status)
        .await
        .expect("create");
    assert_eq!(created.metadata.generation, Some(1));
    assert!(created.status.is_none(), "status is a subresource");
    let spec = created.spec.clone().expect("spec");
    assert_eq!(spec.replicas, Some(1));
    assert_eq!(spec.revision_history_limit, Some(10));
    assert_eq!(spec.progress_deadline_seconds, Some(600));
    assert_eq!(
        spec.strategy.and_then(|s| s.type_).as_deref(),
        Some("RollingUpdate")
    );
    let listed = api
        .list(&ListParams::default().labels("app=fsm-controller"))
        .await
        .expect("list");
    assert_eq!(listed.items.len(), 1);

    // `fsm install` waits for readiness through a watch; nothing here writes status, so it
    // waits until the test, playing the controller, does.
    let waiting = tokio::spawn(await_condition(api.clone(), "fsm-controller", is_available));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiting.is_finished(), "no controller here writes status");

    // A write to /status changes only status (the spec in it is ignored) and keeps the
    // generation.
    let patched = api
        .patch_status(
            "fsm-controller",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 7}, "status": ready_status(1, 1)})),
        )
        .await
        .expect("patch status");
    assert_eq!(patched.metadata.generation, Some(1));
    assert_eq!(patched.spec.as_ref().and_then(|s| s.replicas), Some(1));
    assert_eq!(
        patched.status.as_ref().and_then(|s| s.available_replicas),
        Some(1)
    );
    let ready = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("ready in time")
        .expect("task")
        .expect("condition");
    assert!(is_available(ready.as_ref()));

    // A plain update cannot change status; a spec change bumps the generation.
    let mut scaled = patched.clone();
    scaled.spec.as_mut().expect("spec").replicas = Some(2);
    scaled.status.as_mut().expect("status").ready_replicas = Some(0);
    let scaled = api
        .replace("fsm-controller", &PostParams::default(), &scaled)
        .await
        .expect("replace");
    assert_eq!(scaled.metadata.generation, Some(2));
    assert_eq!(
        scaled.status.as_ref().and_then(|s| s.ready_replicas),
        Some(1)
    );

    // replace_status, with the real status validation.
    let mut status = scaled.clone();
    status.status = Some(serde_json::from_value(ready_status(2, 2)).expect("status"));
    let replaced = api
        .replace_status("fsm-controller", &PostParams::default(), &status)
        .await
        .expect("replace status");
    assert_eq!(replaced.metadata.generation, Some(2));
    assert_eq!(replaced.status.as_ref().and_then(|s| s.replicas), Some(2));
    status.metadata.resource_version = None;
    status.status.as_mut().expect("status").ready_replicas = Some(3);
    let err = api_status(
        api.replace_status("fsm-controller", &PostParams::default(), &status)
            .await
            .expect_err("more ready than replicas"),
    );
    assert_eq!(
        (err.code, err.message.as_str()),
        (
            422,
            "Deployment.apps \"fsm-controller\" is invalid: status.readyReplicas: Invalid value: 3: cannot be greater than status.replicas"
        )
    );

    // Metadata-only changes keep the generation; DELETE answers a Status, as for Deployments
    // on a real server.
    let labelled = api
        .patch(
            "fsm-controller",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"extra": "1"}}})),
        )
        .await
        .expect("label");
    assert_eq!(labelled.metadata.generation, Some(2));
    let deleted = api
        .delete("fsm-controller", &DeleteParams::default())
        .await
        .expect("delete");
    assert!(deleted.is_right(), "{deleted:?}");
    assert_eq!(
        api_status(api.get("fsm-controller").await.expect_err("gone")).code,
        404
    );
}

#[tokio::test]
async fn server_side_apply_and_merge_patches_of_deployments() {
    let server = server().await;
    let api: Api<Deployment> = Api::namespaced(server.client(), "kube-system");
    let apply = PatchParams::apply("fsm-install");

    let mut desired = deployment("fsm-injector");
    desired.metadata.namespace = Some("kube-system".into());
    let created = api
        .patch("fsm-injector", &apply, &Patch::Apply(&desired))
        .await
        .expect("apply creates");
    assert_eq!(created.metadata.generation, Some(1));
    // Applying the same object again changes nothing.
    let again = api
        .patch("fsm-injector", &apply, &Patch::Apply(&desired))
        .await
        .expect("apply again");
    assert_eq!(
        again.metadata.resource_version,
        created.metadata.resource_version
    );
    desired.spec.as_mut().expect("spec").replicas = Some(3);
    let applied = api
        .patch("fsm-injector", &apply, &Patch::Apply(&desired))
        .await
        .expect("apply replicas");
    assert_eq!(applied.metadata.generation, Some(2));
    assert_eq!(applied.spec.as_ref().and_then(|s| s.replicas), Some(3));

    let merged = api
        .patch(
            "fsm-injector",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"template": {"metadata": {"annotations": {"restarted": "now"}}}}}),
            ),
        )
        .await
        .expect("merge patch");
    assert_eq!(merged.metadata.generation, Some(3));

    // apps/v1 selectors are immutable.
    let err = api_status(
        api.patch(
            "fsm-injector",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {
                "selector": {"matchLabels": {"app": "other"}},
                "template": {"metadata": {"labels": {"app": "other"}}},
            }})),
        )
        .await
        .expect_err("selector changed"),
    );
    assert_eq!(err.code, 422);
    assert!(
        err.message.ends_with(
            "spec.selector: Invalid value: v1.LabelSelector{MatchLabels:map[string]string{\"app\":\"other\"}, MatchExpressions:[]v1.LabelSelectorRequirement(nil)}: field is immutable"
        ),
        "{}",
        err.message
    );
}

#[tokio::test]
async fn deployments_are_validated_like_the_real_server() {
    let server = server().await;
    let client = server.client();
    let typed: Api<Deployment> = Api::default_namespaced(client.clone());
    // Untyped, to send what k8s-openapi cannot express (no selector at all).
    let ar = ApiResource::erase::<Deployment>(&());
    let raw: Api<DynamicObject> = Api::default_namespaced_with(client, &ar);
    let create = |v: Value| {
        let raw = raw.clone();
        async move {
            let obj: DynamicObject = serde_json::from_value(v).expect("object");
            api_status(
                raw.create(&PostParams::default(), &obj)
                    .await
                    .expect_err("invalid"),
            )
        }
    };

    let mismatch = create(deployment_json(
        "web",
        json!({"matchLabels": {"app": "web"}}),
        json!({"app": "api", "tier": "front"}),
    ))
    .await;
    assert_eq!(
        (
            mismatch.code,
            mismatch.reason.as_str(),
            mismatch.message.as_str()
        ),
        (
            422,
            "Invalid",
            "Deployment.apps \"web\" is invalid: spec.template.metadata.labels: Invalid value: map[string]string{\"app\":\"api\", \"tier\":\"front\"}: `selector` does not match template `labels`"
        )
    );
    let causes = mismatch.details.expect("details").causes;
    assert_eq!(causes[0].field, "spec.template.metadata.labels");

    let mut no_selector = deployment_json("web", json!(null), json!({"app": "web"}));
    if let Some(spec) = no_selector["spec"].as_object_mut() {
        spec.remove("selector");
    }
    let missing = create(no_selector).await;
    assert_eq!(
        missing.message,
        "Deployment.apps \"web\" is invalid: [spec.selector: Required value, spec.template.metadata.labels: Invalid value: map[string]string{\"app\":\"web\"}: `selector` does not match template `labels`]"
    );
    let no_template = create(json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {"selector": {"matchLabels": {"app": "web"}}}}))
    .await;
    assert_eq!(
        no_template.message,
        "Deployment.apps \"web\" is invalid: [spec.template.metadata.labels: Invalid value: map[string]string(nil): `selector` does not match template `labels`, spec.template.spec.containers: Required value]"
    );

    // Matching expressions are fine; nothing was stored by the failures.
    let mut expressions = deployment("web");
    expressions.spec.as_mut().expect("spec").selector = serde_json::from_value(
        json!({"matchExpressions": [{"key": "app", "operator": "In", "values": ["web", "api"]}]}),
    )
    .expect("selector");
    typed
        .create(&PostParams::default(), &expressions)
        .await
        .expect("expression selector");
    assert_eq!(
        typed
            .list(&ListParams::default())
            .await
            .expect("list")
            .items
            .len(),
        1
    );
}

#[tokio::test]
async fn owned_workloads_are_collected_and_jobs_orphan_their_pods() {
    let server = server().await;
    let client = server.client();
    let deployments: Api<Deployment> = Api::default_namespaced(client.clone());
    let replica_sets: Api<ReplicaSet> = Api::default_namespaced(client.clone());
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let jobs: Api<Job> = Api::default_namespaced(client);

    let owner_ref = |kind: &str, meta: &kube::api::ObjectMeta, api_version: &str| {
        json!([{"apiVersion": api_version, "kind": kind, "name": meta.name,
                "uid": meta.uid, "controller": true}])
    };
    let pod = |name: &str, owners: Value| -> Pod {
        serde_json::from_value(
            json!({"metadata": {"name": name, "ownerReferences": owners},
            "spec": {"containers": [{"name": "c", "image": "i"}]}}),
        )
        .expect("pod")
    };

    // What the Deployment controller would have made, made by the test.
    let d = deployments
        .create(&PostParams::default(), &deployment("web"))
        .await
        .expect("deployment");
    let rs: ReplicaSet = serde_json::from_value(json!({
        "metadata": {"name": "web-5d4f8", "ownerReferences": owner_ref("Deployment", &d.metadata, "apps/v1")},
        "spec": {"selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}},
                              "spec": {"containers": [{"name": "c", "image": "i"}]}}},
    }))
    .expect("replica set");
    let rs = replica_sets
        .create(&PostParams::default(), &rs)
        .await
        .expect("replica set");
    pods.create(
        &PostParams::default(),
        &pod(
            "web-5d4f8-a",
            owner_ref("ReplicaSet", &rs.metadata, "apps/v1"),
        ),
    )
    .await
    .expect("pod");
    // A pod whose ReplicaSet was never created (a fixture of a cluster whose controllers do
    // not run here) stays.
    let never = json!([{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "gone-1",
                        "uid": "3e8e1f7a-0000-4000-8000-00000000abcd", "controller": true}]);
    pods.create(&PostParams::default(), &pod("fixture", never))
        .await
        .expect("fixture pod");

    deployments
        .delete("web", &DeleteParams::default())
        .await
        .expect("delete deployment");
    assert_eq!(
        api_status(replica_sets.get("web-5d4f8").await.expect_err("collected")).code,
        404
    );
    assert_eq!(
        api_status(pods.get("web-5d4f8-a").await.expect_err("collected")).code,
        404
    );
    pods.get("fixture").await.expect("fixture pod kept");

    // batch/v1 Jobs orphan their pods when the delete names no propagationPolicy.
    let job: Job = serde_json::from_value(json!({"metadata": {"name": "once"},
        "spec": {"template": {"spec": {"restartPolicy": "Never",
                 "containers": [{"name": "c", "image": "i"}]}}}}))
    .expect("job");
    let job = jobs
        .create(&PostParams::default(), &job)
        .await
        .expect("job");
    assert_eq!(job.metadata.generation, Some(1));
    let completed = jobs
        .patch_status(
            "once",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"succeeded": 1}})),
        )
        .await
        .expect("job status");
    assert_eq!(completed.status.and_then(|s| s.succeeded), Some(1));
    pods.create(
        &PostParams::default(),
        &pod("once-a", owner_ref("Job", &job.metadata, "batch/v1")),
    )
    .await
    .expect("job pod");
    jobs.delete("once", &DeleteParams::default())
        .await
        .expect("delete job");
    let orphan = pods.get("once-a").await.expect("orphaned pod stays");
    assert!(orphan.metadata.owner_references.is_none());
}

#[tokio::test]
async fn discovery_resolves_workloads_and_rbac() {
    let server = server().await;
    let client = server.client();
    let plain = Discovery::new(client.clone())
        .run()
        .await
        .expect("discovery");
    let aggregated = Discovery::new(client)
        .run_aggregated()
        .await
        .expect("aggregated discovery");
    for discovery in [plain, aggregated] {
        for (group, kind, plural, scope, status) in [
            ("apps", "Deployment", "deployments", Scope::Namespaced, true),
            ("apps", "ReplicaSet", "replicasets", Scope::Namespaced, true),
            ("apps", "DaemonSet", "daemonsets", Scope::Namespaced, true),
            (
                "apps",
                "StatefulSet",
                "statefulsets",
                Scope::Namespaced,
                true,
            ),
            ("batch", "Job", "jobs", Scope::Namespaced, true),
            (
                "rbac.authorization.k8s.io",
                "ClusterRole",
                "clusterroles",
                Scope::Cluster,
                false,
            ),
            (
                "rbac.authorization.k8s.io",
                "ClusterRoleBinding",
                "clusterrolebindings",
                Scope::Cluster,
                false,
            ),
            (
                "rbac.authorization.k8s.io",
                "Role",
                "roles",
                Scope::Namespaced,
                false,
            ),
            (
                "rbac.authorization.k8s.io",
                "RoleBinding",
                "rolebindings",
                Scope::Namespaced,
                false,
            ),
        ] {
            let gvk = GroupVersionKind::gvk(group, "v1", kind);
            let (ar, caps) = discovery
                .resolve_gvk(&gvk)
                .unwrap_or_else(|| panic!("{kind} resolves"));
            assert_eq!(ar.plural, plural);
            assert_eq!(caps.scope, scope, "{kind}");
            let has_status = caps
                .subresources
                .iter()
                .any(|(sub, _)| sub.plural.ends_with("status"));
            assert_eq!(has_status, status, "{kind} status subresource");
        }
        let apps = discovery.get("apps").expect("apps group");
        assert_eq!(apps.preferred_version_or_latest(), "v1");
    }
}
