//! What leader election and owned objects rely on: Leases with optimistic concurrency, and the
//! garbage collection of objects whose owner is deleted.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, OwnerReference};
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams};
use kube::discovery::Discovery;
use serde_json::json;

use crate::{api_status, server};

fn lease(holder: &str) -> Lease {
    Lease {
        metadata: ObjectMeta {
            name: Some("fsm-controller".into()),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(k8s_openapi::jiff::Timestamp::now())),
            lease_transitions: Some(0),
            ..LeaseSpec::default()
        }),
    }
}

#[tokio::test]
async fn leases_are_served_with_optimistic_concurrency() {
    let server = server().await;
    let client = server.client();
    let discovery = Discovery::new(client.clone())
        .run()
        .await
        .expect("discovery");
    let group = discovery
        .get("coordination.k8s.io")
        .expect("coordination.k8s.io served");
    let (resource, caps) = group.recommended_kind("Lease").expect("Lease");
    assert_eq!(
        (resource.plural.as_str(), resource.version.as_str()),
        ("leases", "v1")
    );
    assert_eq!(caps.scope, kube::discovery::Scope::Namespaced);

    let leases: Api<Lease> = Api::namespaced(client, "kube-node-lease");
    let created = leases
        .create(&PostParams::default(), &lease("a"))
        .await
        .expect("create");
    // A second candidate creating the same Lease loses the race.
    let status = api_status(
        leases
            .create(&PostParams::default(), &lease("b"))
            .await
            .expect_err("second create"),
    );
    assert_eq!(
        (status.code, status.reason.as_str()),
        (409, "AlreadyExists")
    );

    // Two candidates read the same version; the first replace wins, the second is a 409.
    let read = leases.get("fsm-controller").await.expect("get");
    assert_eq!(
        read.metadata.resource_version,
        created.metadata.resource_version
    );
    let renewed_micros = read
        .spec
        .as_ref()
        .and_then(|s| s.renew_time.clone())
        .expect("renewTime round-trips");
    let mut by_a = read.clone();
    by_a.spec.as_mut().expect("spec").renew_time =
        Some(MicroTime(k8s_openapi::jiff::Timestamp::now()));
    let mut by_b = read;
    by_b.spec.as_mut().expect("spec").holder_identity = Some("b".into());
    let renewed = leases
        .replace("fsm-controller", &PostParams::default(), &by_a)
        .await
        .expect("renew");
    assert_ne!(
        renewed.metadata.resource_version,
        created.metadata.resource_version
    );
    let status = api_status(
        leases
            .replace("fsm-controller", &PostParams::default(), &by_b)
            .await
            .expect_err("stale takeover"),
    );
    assert_eq!((status.code, status.reason.as_str()), (409, "Conflict"));
    let now = leases.get("fsm-controller").await.expect("get");
    let spec = now.spec.expect("spec");
    assert_eq!(spec.holder_identity.as_deref(), Some("a"));
    assert_ne!(spec.renew_time, Some(renewed_micros));

    leases
        .delete("fsm-controller", &DeleteParams::default())
        .await
        .expect("delete");
    assert!(
        leases
            .get_opt("fsm-controller")
            .await
            .expect("get")
            .is_none()
    );
}

fn pod(name: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"containers": [{"name": "app", "image": "app"}]},
    }))
    .expect("pod")
}

fn owned_by(name: &str, owner: &Pod) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            owner_references: Some(vec![OwnerReference {
                api_version: "v1".into(),
                kind: "Pod".into(),
                name: owner.metadata.name.clone().expect("name"),
                uid: owner.metadata.uid.clone().expect("uid"),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            ..ObjectMeta::default()
        },
        ..Secret::default()
    }
}

#[tokio::test]
async fn deleting_a_pod_deletes_what_it_owns_unless_orphaned() {
    let server = server().await;
    let client = server.client();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let secrets: Api<Secret> = Api::namespaced(client, "default");
    let a = pods
        .create(&PostParams::default(), &pod("a"))
        .await
        .expect("pod a");
    let b = pods
        .create(&PostParams::default(), &pod("b"))
        .await
        .expect("pod b");
    secrets
        .create(&PostParams::default(), &owned_by("of-a", &a))
        .await
        .expect("secret of a");
    secrets
        .create(&PostParams::default(), &owned_by("of-b", &b))
        .await
        .expect("secret of b");

    pods.delete("a", &DeleteParams::default())
        .await
        .expect("delete a");
    assert!(secrets.get_opt("of-a").await.expect("get").is_none());

    pods.delete("b", &DeleteParams::orphan())
        .await
        .expect("delete b");
    let orphan = secrets.get_opt("of-b").await.expect("get").expect("kept");
    assert!(
        orphan
            .metadata
            .owner_references
            .unwrap_or_default()
            .is_empty()
    );

    // A Secret naming a pod that no longer exists is collected right after it is written.
    let status = secrets
        .create(&PostParams::default(), &owned_by("late", &a))
        .await
        .map(|_| ());
    assert!(status.is_ok(), "the write itself succeeds: {status:?}");
    assert!(secrets.get_opt("late").await.expect("get").is_none());
}
