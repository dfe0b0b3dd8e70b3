//! `rbac.authorization.k8s.io/v1` through typed kube-rs APIs: stored and validated like a real
//! server (the chart's roles and bindings), never enforced.

use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::wait::await_condition;
use serde_json::json;

use crate::{api_status, eventually, namespace, server};

const GROUP: &str = "rbac.authorization.k8s.io";

fn cluster_role(name: &str, verbs: &[&str]) -> ClusterRole {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": "fsm-controller"}},
        "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": verbs}],
    }))
    .expect("cluster role")
}

fn service_account_binding(
    name: &str,
    role: &str,
    sa_namespace: Option<&str>,
) -> ClusterRoleBinding {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        // No apiGroup: the v1 default fills it in.
        "roleRef": {"kind": "ClusterRole", "name": role},
        "subjects": [{"kind": "ServiceAccount", "name": "fsm-controller", "namespace": sa_namespace}],
    }))
    .expect("binding")
}

#[tokio::test]
async fn cluster_roles_and_bindings_round_trip() {
    let server = server().await;
    let client = server.client();
    let roles: Api<ClusterRole> = Api::all(client.clone());
    let bindings: Api<ClusterRoleBinding> = Api::all(client);

    // RBAC names are path segments, not DNS names.
    let name = "system:fsm:controller";
    let created = roles
        .create(&PostParams::default(), &cluster_role(name, &["get"]))
        .await
        .expect("create");
    assert_eq!(created.metadata.generation, Some(1));
    assert_eq!(roles.get(name).await.expect("get").rules, created.rules);
    assert_eq!(
        roles
            .list(&ListParams::default().labels("app=fsm-controller"))
            .await
            .expect("list")
            .items
            .len(),
        1
    );

    // A watcher sees the server-side apply that adds a verb.
    let widened = tokio::spawn(await_condition(
        roles.clone(),
        name,
        |r: Option<&ClusterRole>| {
            r.and_then(|r| r.rules.as_ref())
                .is_some_and(|rules| rules[0].verbs.len() == 2)
        },
    ));
    let applied = roles
        .patch(
            name,
            &PatchParams::apply("fsm-install"),
            &Patch::Apply(cluster_role(name, &["get", "list"])),
        )
        .await
        .expect("apply");
    assert_eq!(applied.metadata.generation, Some(2));
    tokio::time::timeout(Duration::from_secs(10), widened)
        .await
        .expect("watched in time")
        .expect("task")
        .expect("condition");
    let merged = roles
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"a": "b"}}})),
        )
        .await
        .expect("merge patch");
    assert_eq!(merged.metadata.generation, Some(2));

    // No status subresource.
    let no_status = api_status(
        roles
            .patch_status(name, &PatchParams::default(), &Patch::Merge(json!({})))
            .await
            .expect_err("no status"),
    );
    assert_eq!(no_status.code, 404);

    let binding = bindings
        .create(
            &PostParams::default(),
            &service_account_binding("fsm-controller", name, Some("fsm-system")),
        )
        .await
        .expect("binding");
    assert_eq!(binding.role_ref.api_group, GROUP);
    let subject = &binding.subjects.as_ref().expect("subjects")[0];
    assert_eq!(subject.api_group, None);

    // roleRef is immutable.
    let err = api_status(
        bindings
            .patch(
                "fsm-controller",
                &PatchParams::default(),
                &Patch::Merge(json!({"roleRef": {"name": "other"}})),
            )
            .await
            .expect_err("roleRef changed"),
    );
    assert_eq!(
        (err.code, err.message.as_str()),
        (
            422,
            "ClusterRoleBinding.rbac.authorization.k8s.io \"fsm-controller\" is invalid: roleRef: Invalid value: rbac.RoleRef{APIGroup:\"rbac.authorization.k8s.io\", Kind:\"ClusterRole\", Name:\"other\"}: cannot change roleRef"
        )
    );

    // A ServiceAccount subject of a cluster binding needs its namespace.
    let err = api_status(
        bindings
            .create(
                &PostParams::default(),
                &service_account_binding("no-namespace", name, None),
            )
            .await
            .expect_err("subject without namespace"),
    );
    assert_eq!(err.code, 422);
    assert!(
        err.message
            .ends_with("is invalid: subjects[0].namespace: Required value"),
        "{}",
        err.message
    );

    let deleted = roles
        .delete(name, &DeleteParams::default())
        .await
        .expect("delete");
    assert!(deleted.is_right(), "a Status, as on a real server");
    assert_eq!(
        api_status(roles.get(name).await.expect_err("gone")).code,
        404
    );
}

#[tokio::test]
async fn roles_and_role_bindings_go_with_their_namespace() {
    let server = server().await;
    let client = server.client();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(&PostParams::default(), &namespace("fsm-system"))
        .await
        .expect("namespace");
    let roles: Api<Role> = Api::namespaced(client.clone(), "fsm-system");
    let bindings: Api<RoleBinding> = Api::namespaced(client.clone(), "fsm-system");
    let cluster_roles: Api<ClusterRole> = Api::all(client);

    let role: Role = serde_json::from_value(json!({
        "metadata": {"name": "fsm-leader-election"},
        "rules": [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                   "verbs": ["get", "create", "update"]}],
    }))
    .expect("role");
    roles
        .create(&PostParams::default(), &role)
        .await
        .expect("role");
    cluster_roles
        .create(&PostParams::default(), &cluster_role("fsm-view", &["get"]))
        .await
        .expect("cluster role");
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "fsm-leader-election"},
        "roleRef": {"apiGroup": GROUP, "kind": "Role", "name": "fsm-leader-election"},
        "subjects": [{"kind": "ServiceAccount", "name": "fsm-controller"},
                     {"kind": "User", "name": "alice"}],
    }))
    .expect("binding");
    let binding = bindings
        .create(&PostParams::default(), &binding)
        .await
        .expect("binding");
    let subjects = binding.subjects.expect("subjects");
    assert_eq!(subjects[1].api_group.as_deref(), Some(GROUP), "defaulted");

    // Namespaced rules cannot name non-resource URLs.
    let bad: Role = serde_json::from_value(json!({
        "metadata": {"name": "bad"},
        "rules": [{"nonResourceURLs": ["/healthz"], "verbs": ["get"]}],
    }))
    .expect("role");
    let err = api_status(
        roles
            .create(&PostParams::default(), &bad)
            .await
            .expect_err("invalid"),
    );
    assert_eq!(
        err.message,
        "Role.rbac.authorization.k8s.io \"bad\" is invalid: rules[0].nonResourceURLs: Invalid value: []string{\"/healthz\"}: namespaced rules cannot apply to non-resource URLs"
    );

    namespaces
        .delete("fsm-system", &DeleteParams::default())
        .await
        .expect("delete namespace");
    eventually("the namespace's RBAC objects are gone", || async {
        roles
            .list(&ListParams::default())
            .await
            .is_ok_and(|l| l.items.is_empty())
            && bindings
                .list(&ListParams::default())
                .await
                .is_ok_and(|l| l.items.is_empty())
    })
    .await;
    cluster_roles
        .get("fsm-view")
        .await
        .expect("cluster-scoped roles stay");
}
