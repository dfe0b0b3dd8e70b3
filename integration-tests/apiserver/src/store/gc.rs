//! The garbage collector's part of kube-controller-manager, reduced to what tests need:
//! `metadata.ownerReferences` are followed when an owner goes away.
//!
//! - Deleting an object deletes its dependents (objects naming its uid among their
//!   `ownerReferences`) whose other owners are gone too; `propagationPolicy: Orphan` instead
//!   removes the reference, `Foreground` deletes the dependents first. Cascades recurse.
//! - A write that leaves an object with owners of which none exists (say, a Secret naming a pod
//!   uid that was deleted meanwhile) deletes that object right after the write.
//!
//! An owner is looked up by the reference's `apiVersion`, `kind`, `name` (in the dependent's
//! namespace unless the owner's kind is cluster-scoped) and must have the referenced `uid`. An
//! owner of a kind this server does not serve counts as present, as the real collector leaves
//! dependents alone when it cannot resolve an owner's kind. So does a *missing* owner of a
//! workload kind (Deployment, ReplicaSet, DaemonSet, StatefulSet, Job): their controllers,
//! which made them and their pods on a real cluster, do not run here, so fixtures carry pods
//! owned by ReplicaSets that were never created (the demo pods). A workload owner that exists
//! with another uid is gone, and deleting one that exists collects its dependents.
//! Unlike the real collector this runs synchronously, inside the deleting write: no delay, no
//! `deletionTimestamp`/`foregroundDeletion` finalizer phase, `blockOwnerDeletion` not enforced.

use std::sync::Arc;

use serde_json::Value;

use super::{EventKind, ObjKey, Propagation, State};
use crate::meta;
use crate::registry::GroupResource;

impl State {
    /// Deletes (or orphans) the dependents of `owner`, which is being or has been deleted.
    pub(super) fn collect_dependents(&mut self, owner: &Value, policy: Propagation) {
        let uid = meta::uid(owner).to_string();
        if uid.is_empty() {
            return;
        }
        let owner_ns = meta::namespace(owner).to_string();
        let mut dependents: Vec<(GroupResource, ObjKey, Arc<Value>)> = Vec::new();
        for (gr, objects) in &self.objects {
            for (key, obj) in objects {
                // A namespaced owner owns only objects of its namespace.
                if !owner_ns.is_empty() && key.0 != owner_ns {
                    continue;
                }
                if owner_refs(obj).any(|r| r.get("uid").and_then(Value::as_str) == Some(&uid)) {
                    dependents.push((gr.clone(), key.clone(), obj.clone()));
                }
            }
        }
        dependents.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        for (gr, key, dependent) in dependents {
            // An earlier cascade may have removed it already.
            if !self.current(&gr).contains_key(&key) {
                continue;
            }
            if policy == Propagation::Orphan {
                let mut orphan = (*dependent).clone();
                if let Some(refs) = orphan
                    .pointer_mut("/metadata/ownerReferences")
                    .and_then(Value::as_array_mut)
                {
                    refs.retain(|r| r.get("uid").and_then(Value::as_str) != Some(&uid));
                    if refs.is_empty()
                        && let Some(m) = orphan.get_mut("metadata").and_then(Value::as_object_mut)
                    {
                        m.remove("ownerReferences");
                    }
                }
                self.commit(gr, key, EventKind::Modified, orphan, Some(dependent));
                continue;
            }
            if self.has_live_owner(&dependent, Some(&uid)) {
                continue;
            }
            self.delete_collected(gr, key, dependent);
        }
    }

    /// After a write of `key`: deletes it when it has owners and every one of them is gone.
    pub(super) fn collect_if_orphaned(&mut self, gr: &GroupResource, key: &ObjKey) {
        let Some(obj) = self.current(gr).get(key).cloned() else {
            return;
        };
        if owner_refs(&obj).next().is_some() && !self.has_live_owner(&obj, None) {
            self.delete_collected(gr.clone(), key.clone(), obj);
        }
    }

    fn delete_collected(&mut self, gr: GroupResource, key: ObjKey, obj: Arc<Value>) {
        tracing::debug!(resource = %gr.resource, namespace = %key.0, name = %key.1, "garbage-collecting an object whose owners are gone");
        let deleted = self.commit(gr, key, EventKind::Deleted, (*obj).clone(), Some(obj));
        self.collect_dependents(&deleted, Propagation::Background);
    }

    /// Whether any owner named by `obj` exists (with the referenced uid), the one with uid
    /// `deleted` (being deleted) aside.
    fn has_live_owner(&self, obj: &Value, deleted: Option<&str>) -> bool {
        owner_refs(obj).any(|r| {
            let s = |k: &str| r.get(k).and_then(Value::as_str).unwrap_or_default();
            if deleted == Some(s("uid")) {
                return false;
            }
            let Some(rt) = self.registry.by_kind(s("apiVersion"), s("kind")) else {
                return true;
            };
            let ns = if rt.namespaced {
                meta::namespace(obj).to_string()
            } else {
                String::new()
            };
            match self
                .current(&rt.group_resource())
                .get(&(ns, s("name").to_string()))
            {
                Some(owner) => meta::uid(owner) == s("uid"),
                None => rt.is_workload(),
            }
        })
    }
}

fn owner_refs(obj: &Value) -> impl Iterator<Item = &Value> {
    obj.pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::super::Store;
    use serde_json::{Value, json};

    fn pod(name: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "namespace": "default"},
               "spec": {"containers": [{"name": "c", "image": "i"}]}})
    }

    fn owned_secret(name: &str, owners: &[&Value]) -> Value {
        let refs: Vec<Value> = owners
            .iter()
            .map(|o| {
                json!({"apiVersion": "v1", "kind": "Pod", "name": o["metadata"]["name"],
                            "uid": o["metadata"]["uid"], "controller": false})
            })
            .collect();
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": {"name": name, "namespace": "default", "ownerReferences": refs}})
    }

    fn store() -> Store {
        let store = Store::new(100);
        store
            .create(
                &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}}),
            )
            .expect("namespace");
        store
    }

    fn exists(store: &Store, kind: &str, name: &str) -> bool {
        store.get("v1", kind, Some("default"), name).is_some()
    }

    #[test]
    fn deleting_the_last_owner_deletes_the_dependent() {
        let store = store();
        let a = store.create(&pod("a")).expect("pod a");
        let b = store.create(&pod("b")).expect("pod b");
        store
            .create(&owned_secret("only-a", &[&a]))
            .expect("secret");
        store
            .create(&owned_secret("a-and-b", &[&a, &b]))
            .expect("secret");
        store
            .create(&json!({"apiVersion": "v1", "kind": "Secret",
                            "metadata": {"name": "unowned", "namespace": "default"}}))
            .expect("secret");

        store
            .delete("v1", "Pod", Some("default"), "a")
            .expect("delete a");
        assert!(!exists(&store, "Secret", "only-a"));
        assert!(exists(&store, "Secret", "a-and-b"), "b still owns it");
        assert!(exists(&store, "Secret", "unowned"));

        store
            .delete("v1", "Pod", Some("default"), "b")
            .expect("delete b");
        assert!(!exists(&store, "Secret", "a-and-b"));
        assert!(exists(&store, "Secret", "unowned"));
    }

    #[test]
    fn an_object_whose_owner_is_gone_is_collected_after_its_write() {
        let store = store();
        let a = store.create(&pod("a")).expect("pod a");
        store
            .delete("v1", "Pod", Some("default"), "a")
            .expect("delete a");
        // Same name, new uid: the reference names the old pod.
        store.create(&pod("a")).expect("pod a again");
        store
            .create(&owned_secret("stale", &[&a]))
            .expect("created");
        assert!(!exists(&store, "Secret", "stale"));
        // Owners of kinds this server does not serve count as present.
        let mut kept = owned_secret("kept", &[]);
        kept["metadata"]["ownerReferences"] = json!([{"apiVersion": "example.io/v1",
            "kind": "Widget", "name": "w", "uid": "u"}]);
        store.create(&kept).expect("created");
        assert!(exists(&store, "Secret", "kept"));
    }

    fn replica_set(name: &str) -> Value {
        json!({"apiVersion": "apps/v1", "kind": "ReplicaSet",
               "metadata": {"name": name, "namespace": "default"},
               "spec": {"selector": {"matchLabels": {"app": "web"}},
                        "template": {"metadata": {"labels": {"app": "web"}},
                                     "spec": {"containers": [{"name": "c", "image": "i"}]}}}})
    }

    fn owned_pod(name: &str, owner: &Value) -> Value {
        let mut p = pod(name);
        p["metadata"]["ownerReferences"] = json!([{"apiVersion": owner["apiVersion"],
            "kind": owner["kind"], "name": owner["metadata"]["name"],
            "uid": owner["metadata"]["uid"], "controller": true}]);
        p
    }

    #[test]
    fn missing_workload_owners_count_as_present() {
        let store = store();
        // A demo pod: its ReplicaSet was never created (no Deployment controller here).
        let mut never_created = replica_set("web-7c9f5f9cdf");
        never_created["metadata"]["uid"] = json!("3e8e1f7a-0000-4000-8000-00000000abcd");
        store
            .create(&owned_pod("demo", &never_created))
            .expect("pod");
        assert!(exists(&store, "Pod", "demo"));

        // A ReplicaSet that exists owns its pods: deleting it collects them, and a pod naming
        // an older ReplicaSet of the same name (another uid) is collected after its write.
        let rs = store.create(&replica_set("web-1")).expect("replica set");
        store.create(&owned_pod("web-1-a", &rs)).expect("pod");
        let mut stale = rs.clone();
        stale["metadata"]["uid"] = json!("not-the-current-one");
        store.create(&owned_pod("stale", &stale)).expect("pod");
        assert!(!exists(&store, "Pod", "stale"));
        store
            .delete("apps/v1", "ReplicaSet", Some("default"), "web-1")
            .expect("delete");
        assert!(!exists(&store, "Pod", "web-1-a"));
        assert!(exists(&store, "Pod", "demo"));
    }

    #[test]
    fn foreground_and_default_policies() {
        let store = store();
        let rs = store.create(&replica_set("fg")).expect("replica set");
        store.create(&owned_pod("fg-a", &rs)).expect("pod");
        let rt = store.resolve("apps", "v1", "replicasets").expect("served");
        let pre = super::super::Preconditions {
            propagation: Some(super::Propagation::Foreground),
            ..Default::default()
        };
        store
            .http_delete(&rt, Some("default"), "fg", &pre, false)
            .expect("foreground delete");
        assert!(!exists(&store, "Pod", "fg-a"), "dependents go first");

        // batch/v1 Jobs orphan their pods unless told otherwise, as on a real server.
        let job = store
            .create(&json!({"apiVersion": "batch/v1", "kind": "Job",
                "metadata": {"name": "once", "namespace": "default"},
                "spec": {"template": {"spec": {"restartPolicy": "Never",
                    "containers": [{"name": "c", "image": "i"}]}}}}))
            .expect("job");
        store.create(&owned_pod("once-a", &job)).expect("pod");
        store
            .delete("batch/v1", "Job", Some("default"), "once")
            .expect("delete job");
        let orphan = store.get("v1", "Pod", Some("default"), "once-a");
        assert!(orphan.is_some_and(|p| p.pointer("/metadata/ownerReferences").is_none()));
    }
}
