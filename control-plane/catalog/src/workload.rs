//! Which workload a pod belongs to, the way FSM names it in its metrics' `*_kind` and `*_name`
//! labels.

use k8s_openapi::api::core::v1::Pod;

/// The Kubernetes workload that runs a pod.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Workload {
    /// `Deployment`, `StatefulSet`, `DaemonSet`, `Job`, … or `Pod` for a bare pod.
    pub kind: String,
    pub name: String,
}

/// The workload of `pod`, from its controlling owner reference (the first owner when none is
/// marked as controller). A ReplicaSet `<deployment>-<pod-template-hash>` stands for its
/// Deployment, as in FSM: the last `-` segment is the hash. Other owners (StatefulSet, DaemonSet,
/// Job, …) are the workload themselves. A pod nobody owns is its own workload, of kind `Pod`.
pub fn workload_of(pod: &Pod) -> Workload {
    let owners = pod.metadata.owner_references.as_deref().unwrap_or_default();
    let owner = owners
        .iter()
        .find(|o| o.controller == Some(true))
        .or(owners.first());
    match owner {
        Some(o) if o.kind == "ReplicaSet" => match o.name.rsplit_once('-') {
            Some((deployment, _hash)) if !deployment.is_empty() => Workload {
                kind: "Deployment".to_string(),
                name: deployment.to_string(),
            },
            // A ReplicaSet created by hand: no Deployment behind it.
            _ => Workload {
                kind: o.kind.clone(),
                name: o.name.clone(),
            },
        },
        Some(o) => Workload {
            kind: o.kind.clone(),
            name: o.name.clone(),
        },
        None => Workload {
            kind: "Pod".to_string(),
            name: pod.metadata.name.clone().unwrap_or_default(),
        },
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

    use super::*;

    fn pod(name: &str, owners: &[(&str, &str, Option<bool>)]) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                namespace: Some("demo".to_string()),
                owner_references: (!owners.is_empty()).then(|| {
                    owners
                        .iter()
                        .map(|(kind, name, controller)| OwnerReference {
                            api_version: "apps/v1".to_string(),
                            kind: kind.to_string(),
                            name: name.to_string(),
                            uid: format!("uid-{name}"),
                            controller: *controller,
                            block_owner_deletion: None,
                        })
                        .collect()
                }),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn workload(kind: &str, name: &str) -> Workload {
        Workload {
            kind: kind.to_string(),
            name: name.to_string(),
        }
    }

    #[test]
    fn replica_set_stands_for_its_deployment() {
        let p = pod(
            "httpbin-v1-6c5d8f7b9d-x2k4q",
            &[("ReplicaSet", "httpbin-v1-6c5d8f7b9d", Some(true))],
        );
        assert_eq!(workload_of(&p), workload("Deployment", "httpbin-v1"));
    }

    #[test]
    fn replica_set_without_a_hash_is_kept() {
        let p = pod("rs-x2k4q", &[("ReplicaSet", "standalone", Some(true))]);
        assert_eq!(workload_of(&p), workload("ReplicaSet", "standalone"));
    }

    #[test]
    fn other_controllers_are_the_workload() {
        for kind in ["StatefulSet", "DaemonSet", "Job"] {
            let p = pod("db-0", &[(kind, "db", Some(true))]);
            assert_eq!(workload_of(&p), workload(kind, "db"), "{kind}");
        }
    }

    #[test]
    fn the_controller_wins_over_other_owners() {
        let p = pod(
            "db-0",
            &[
                ("ConfigMap", "extra", None),
                ("StatefulSet", "db", Some(true)),
            ],
        );
        assert_eq!(workload_of(&p), workload("StatefulSet", "db"));
    }

    #[test]
    fn a_pod_without_owner_is_its_own_workload() {
        assert_eq!(workload_of(&pod("curl", &[])), workload("Pod", "curl"));
    }
}
