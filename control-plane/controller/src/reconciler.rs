//! FSM's reconciler (`--enable-reconciler`): puts back the cluster objects the mesh depends on
//! when someone edits or deletes them: the sidecar injector's MutatingWebhookConfiguration, the
//! validating webhook's ValidatingWebhookConfiguration and the mesh's CRDs.
//!
//! As in FSM, it watches only what is labelled for it: webhook configurations labelled
//! `app.kubernetes.io/name: flomesh.io`, `app.kubernetes.io/instance: <mesh-name>` and
//! `flomesh.io/reconcile: "true"`, CRDs labelled `app.kubernetes.io/name: flomesh.io` and
//! `flomesh.io/reconcile: "true"`.
//!
//! The state it restores is the one it finds when it first sees each object (after an install
//! or upgrade, restart the controller to adopt the new one). What the control plane itself
//! changes is not an edit: a webhook's `caBundle`, which the injector and the controller rewrite
//! as their certificates rotate, and a CRD's `spec.conversion`, which the controller points at
//! its conversion webhook with the same roots. An edited object gets its adopted content back
//! (its current `caBundle`s and `spec.conversion` kept); a deleted one is created again from it
//! (with those last seen). Each restoration counts in
//! `fsm_reconciliation_total{kind}`; a failed one is logged with FSM's code (E7000-E7005). Of
//! several replicas only the leader writes. Removing the `flomesh.io/reconcile` label takes an
//! object out of the reconciler's hands.
//!
//! The decisions are a plain state machine ([`Adopted::step`]) over the watcher's events; the
//! loop around it only reads and writes.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;

use fsm_errcode::ErrCode;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::PostParams;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::watch;
use tokio_stream::StreamExt;

/// The label FSM's reconciler selects objects by.
pub const RECONCILE_LABEL: &str = "flomesh.io/reconcile";

/// One reconciled kind: its name in the metric and the codes of its failures.
struct Reconciled {
    kind: &'static str,
    update_failed: ErrCode,
    delete_failed: ErrCode,
}

const MUTATING: Reconciled = Reconciled {
    kind: "MutatingWebhookConfiguration",
    update_failed: ErrCode::E7002,
    delete_failed: ErrCode::E7003,
};
const VALIDATING: Reconciled = Reconciled {
    kind: "ValidatingWebhookConfiguration",
    update_failed: ErrCode::E7004,
    delete_failed: ErrCode::E7005,
};
const CRD: Reconciled = Reconciled {
    kind: "CustomResourceDefinition",
    update_failed: ErrCode::E7000,
    delete_failed: ErrCode::E7001,
};

/// Reconciles the mesh's webhook configurations and CRDs until the process ends; writes only
/// while `leading` says this replica leads.
pub async fn run(client: Client, mesh_name: String, leading: watch::Receiver<bool>) {
    let webhooks = format!(
        "app.kubernetes.io/name=flomesh.io,app.kubernetes.io/instance={mesh_name},{RECONCILE_LABEL}=true"
    );
    let crds = format!("app.kubernetes.io/name=flomesh.io,{RECONCILE_LABEL}=true");
    tracing::info!(%webhooks, %crds, "reconciler watching");
    tokio::join!(
        reconcile::<MutatingWebhookConfiguration>(
            Api::all(client.clone()),
            &webhooks,
            &MUTATING,
            leading.clone()
        ),
        reconcile::<ValidatingWebhookConfiguration>(
            Api::all(client.clone()),
            &webhooks,
            &VALIDATING,
            leading.clone()
        ),
        reconcile::<CustomResourceDefinition>(Api::all(client), &crds, &CRD, leading),
    );
}

async fn reconcile<K>(
    api: Api<K>,
    selector: &str,
    what: &Reconciled,
    leading: watch::Receiver<bool>,
) where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + Debug
        + DeserializeOwned
        + Serialize
        + Send
        + Sync
        + 'static,
{
    let mut adopted = Adopted::default();
    let events = watcher::watcher(api.clone(), watcher::Config::default().labels(selector))
        .default_backoff();
    let mut events = std::pin::pin!(events);
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(event) => event,
            Err(error) => {
                fsm_errcode::warn!(ErrCode::E1005, kind = what.kind, %error, "reconciler watch failed; retrying");
                continue;
            }
        };
        let event = match to_values(event) {
            Ok(event) => event,
            Err(error) => {
                fsm_errcode::warn!(ErrCode::E3002, kind = what.kind, %error, "cannot read a watched object");
                continue;
            }
        };
        for action in adopted.step(event) {
            if !*leading.borrow() {
                tracing::debug!(
                    kind = what.kind,
                    name = action.name(),
                    "not leading: leaving it to the leader"
                );
                continue;
            }
            act(&api, what, &mut adopted, action).await;
        }
    }
}

async fn act<K>(api: &Api<K>, what: &Reconciled, adopted: &mut Adopted, action: Action)
where
    K: kube::Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Serialize,
{
    let kind = what.kind;
    match action {
        Action::Restore { name, object } => {
            let result = match serde_json::from_value::<K>(object) {
                Ok(object) => api
                    .replace(&name, &PostParams::default(), &object)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match result {
                Ok(()) => {
                    tracing::info!(kind, %name, "restored an edited object to its installed state");
                    counted(kind);
                }
                Err(error) => {
                    // A conflict means it changed again: the next event brings it back here.
                    fsm_errcode::warn!(what.update_failed, kind, %name, %error, "cannot restore an edited object");
                }
            }
        }
        Action::Recreate { name, object } => {
            let result = match serde_json::from_value::<K>(object) {
                Ok(object) => api.create(&PostParams::default(), &object).await,
                Err(e) => {
                    fsm_errcode::warn!(what.delete_failed, kind, %name, error = %e, "cannot recreate a deleted object");
                    return;
                }
            };
            match result {
                Ok(_) => {
                    tracing::info!(kind, %name, "recreated a deleted object");
                    counted(kind);
                }
                Err(kube::Error::Api(status)) if status.code == 409 => {
                    // It exists without the reconcile label: taken out of our hands.
                    tracing::info!(kind, %name, "no longer labelled for reconciling; leaving it alone");
                    adopted.forget(&name);
                }
                Err(error) => {
                    fsm_errcode::warn!(what.delete_failed, kind, %name, %error, "cannot recreate a deleted object");
                }
            }
        }
    }
}

fn counted(kind: &str) {
    crate::metrics::fsm()
        .reconciliation_total
        .with_label_values(&[kind])
        .inc();
}

fn to_values<K: Serialize>(event: Event<K>) -> Result<Event<Value>, serde_json::Error> {
    Ok(match event {
        Event::Init => Event::Init,
        Event::InitApply(o) => Event::InitApply(serde_json::to_value(o)?),
        Event::InitDone => Event::InitDone,
        Event::Apply(o) => Event::Apply(serde_json::to_value(o)?),
        Event::Delete(o) => Event::Delete(serde_json::to_value(o)?),
    })
}

// === Adopted ===

/// What the reconciler restores: each object as first seen (its `caBundle`s kept current).
#[derive(Debug, Default)]
pub struct Adopted {
    objects: BTreeMap<String, Value>,
    /// The names listed so far during a relist.
    relisting: Option<BTreeSet<String>>,
}

/// A write the reconciler decided on.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Replace the object with this (its adopted content, current metadata and `caBundle`s).
    Restore { name: String, object: Value },
    /// Create this (its adopted content and identifying metadata) again.
    Recreate { name: String, object: Value },
}

impl Action {
    fn name(&self) -> &str {
        match self {
            Action::Restore { name, .. } | Action::Recreate { name, .. } => name,
        }
    }
}

impl Adopted {
    /// What to do about one watcher event.
    pub fn step(&mut self, event: Event<Value>) -> Vec<Action> {
        match event {
            Event::Init => {
                self.relisting = Some(BTreeSet::new());
                Vec::new()
            }
            Event::InitApply(object) => {
                if let (Some(listed), Some(name)) = (&mut self.relisting, name_of(&object)) {
                    listed.insert(name.to_owned());
                }
                self.seen(object).into_iter().collect()
            }
            Event::InitDone => {
                let listed = self.relisting.take().unwrap_or_default();
                self.objects
                    .iter()
                    .filter(|(name, _)| !listed.contains(*name))
                    .map(|(name, object)| Action::Recreate {
                        name: name.clone(),
                        object: fresh(object),
                    })
                    .collect()
            }
            Event::Apply(object) => self.seen(object).into_iter().collect(),
            Event::Delete(object) => name_of(&object)
                .and_then(|name| self.objects.get(name).map(|o| (name, o)))
                .map(|(name, adopted)| Action::Recreate {
                    name: name.to_owned(),
                    object: fresh(adopted),
                })
                .into_iter()
                .collect(),
        }
    }

    fn seen(&mut self, object: Value) -> Option<Action> {
        let name = name_of(&object)?.to_owned();
        let Some(adopted) = self.objects.get(&name) else {
            self.objects.insert(name, object);
            return None;
        };
        if content(&object) == content(adopted) {
            // Unchanged, or only what the control plane itself rewrites: keep it current.
            self.objects.insert(name, object);
            return None;
        }
        Some(Action::Restore {
            object: restored(&object, adopted),
            name,
        })
    }

    fn forget(&mut self, name: &str) {
        self.objects.remove(name);
    }
}

fn name_of(object: &Value) -> Option<&str> {
    object.pointer("/metadata/name").and_then(Value::as_str)
}

/// What is compared: everything but metadata, status, the webhooks' `caBundle`s and a CRD's
/// `spec.conversion` (control-plane-owned).
fn content(object: &Value) -> Value {
    let mut content = object.clone();
    if let Some(fields) = content.as_object_mut() {
        fields.remove("metadata");
        fields.remove("status");
    }
    if let Some(spec) = content.get_mut("spec").and_then(Value::as_object_mut) {
        spec.remove("conversion");
    }
    for webhook in webhooks_mut(&mut content) {
        if let Some(config) = webhook
            .get_mut("clientConfig")
            .and_then(Value::as_object_mut)
        {
            config.remove("caBundle");
        }
    }
    content
}

fn webhooks_mut(object: &mut Value) -> impl Iterator<Item = &mut Value> {
    object
        .get_mut("webhooks")
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
}

/// `current` with the adopted content back, keeping its metadata (resourceVersion included),
/// the `caBundle` each webhook of that name has now and a CRD's current `spec.conversion`.
fn restored(current: &Value, adopted: &Value) -> Value {
    let mut object = adopted.clone();
    if let (Some(fields), Some(metadata)) = (object.as_object_mut(), current.get("metadata")) {
        fields.insert("metadata".into(), metadata.clone());
        fields.remove("status");
    }
    if let Some(spec) = object.get_mut("spec").and_then(Value::as_object_mut) {
        match current.pointer("/spec/conversion") {
            Some(conversion) => spec.insert("conversion".into(), conversion.clone()),
            None => spec.remove("conversion"),
        };
    }
    let bundles: BTreeMap<String, Value> = current
        .get("webhooks")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|w| {
            Some((
                w.get("name")?.as_str()?.to_owned(),
                w.pointer("/clientConfig/caBundle")?.clone(),
            ))
        })
        .collect();
    for webhook in webhooks_mut(&mut object) {
        let name = webhook
            .get("name")
            .and_then(Value::as_str)
            .map(str::to_owned);
        if let (Some(bundle), Some(config)) = (
            name.and_then(|n| bundles.get(&n)),
            webhook
                .get_mut("clientConfig")
                .and_then(Value::as_object_mut),
        ) {
            config.insert("caBundle".into(), bundle.clone());
        }
    }
    object
}

/// The adopted object as a new one: its content, name, labels and annotations.
fn fresh(adopted: &Value) -> Value {
    let mut object = adopted.clone();
    if let Some(fields) = object.as_object_mut() {
        fields.remove("status");
        let metadata = fields.get("metadata").cloned().unwrap_or_default();
        let mut kept = serde_json::Map::new();
        for key in ["name", "labels", "annotations"] {
            if let Some(value) = metadata.get(key) {
                kept.insert(key.into(), value.clone());
            }
        }
        fields.insert("metadata".into(), Value::Object(kept));
    }
    object
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn webhook_config(rv: &str, failure_policy: &str, bundle: &str) -> Value {
        json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": "fsm-webhook-fsm", "resourceVersion": rv, "uid": "u1",
                         "labels": {RECONCILE_LABEL: "true"}},
            "webhooks": [{"name": "fsm-inject.flomesh.io", "failurePolicy": failure_policy,
                          "clientConfig": {"caBundle": bundle,
                                           "service": {"name": "fsm-injector", "namespace": "fsm-system"}}}],
        })
    }

    #[test]
    fn an_edit_is_undone_and_a_ca_bundle_rotation_is_not_an_edit() {
        let mut adopted = Adopted::default();
        assert!(adopted.step(Event::Init).is_empty());
        assert!(
            adopted
                .step(Event::InitApply(webhook_config("1", "Fail", "")))
                .is_empty(),
            "adopted as first seen"
        );
        assert!(adopted.step(Event::InitDone).is_empty());
        assert!(
            adopted
                .step(Event::Apply(webhook_config("2", "Fail", "Uk9PVA==")))
                .is_empty(),
            "the injector publishing its roots"
        );
        let actions = adopted.step(Event::Apply(webhook_config("3", "Ignore", "Uk9PVA==")));
        assert_eq!(
            actions,
            [Action::Restore {
                name: "fsm-webhook-fsm".into(),
                object: webhook_config("3", "Fail", "Uk9PVA=="),
            }],
            "the adopted policy, the current resourceVersion and caBundle"
        );
        // Our own write comes back: nothing more to do.
        assert!(
            adopted
                .step(Event::Apply(webhook_config("4", "Fail", "Uk9PVA==")))
                .is_empty()
        );
    }

    fn crd(rv: &str, scope: &str, conversion: Option<Value>) -> Value {
        let mut crd = json!({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": "trafficsplits.split.smi-spec.io", "resourceVersion": rv,
                         "labels": {RECONCILE_LABEL: "true"}},
            "spec": {"group": "split.smi-spec.io", "scope": scope},
        });
        if let Some(conversion) = conversion {
            crd["spec"]["conversion"] = conversion;
        }
        crd
    }

    fn conversion_webhook(bundle: &str) -> Value {
        json!({"strategy": "Webhook", "webhook": {"conversionReviewVersions": ["v1"], "clientConfig": {
            "service": {"namespace": "fsm-system", "name": "fsm-controller", "path": "/convert", "port": 9093},
            "caBundle": bundle}}})
    }

    #[test]
    fn a_crd_conversion_written_by_the_controller_is_not_an_edit_and_survives_a_restore() {
        let mut adopted = Adopted::default();
        assert!(
            adopted
                .step(Event::Apply(crd("1", "Namespaced", None)))
                .is_empty(),
            "adopted as installed: no conversion"
        );
        assert!(
            adopted
                .step(Event::Apply(crd(
                    "2",
                    "Namespaced",
                    Some(conversion_webhook("Uk9PVA=="))
                )))
                .is_empty(),
            "the controller pointing it at its webhook"
        );
        assert!(
            adopted
                .step(Event::Apply(crd(
                    "3",
                    "Namespaced",
                    Some(conversion_webhook("TkVX"))
                )))
                .is_empty(),
            "a rotation"
        );
        let actions = adopted.step(Event::Apply(crd(
            "4",
            "Cluster",
            Some(conversion_webhook("TkVX")),
        )));
        assert_eq!(
            actions,
            [Action::Restore {
                name: "trafficsplits.split.smi-spec.io".into(),
                object: crd("4", "Namespaced", Some(conversion_webhook("TkVX"))),
            }],
            "the adopted scope, the current conversion"
        );
        let actions = adopted.step(Event::Delete(crd(
            "5",
            "Namespaced",
            Some(conversion_webhook("TkVX")),
        )));
        let [Action::Recreate { object, .. }] = &actions[..] else {
            panic!("{actions:?}");
        };
        assert_eq!(
            object["spec"]["conversion"],
            conversion_webhook("TkVX"),
            "recreated with the conversion last seen"
        );
    }

    #[test]
    fn a_deletion_recreates_with_identifying_metadata_only() {
        let mut adopted = Adopted::default();
        adopted.step(Event::Apply(webhook_config("1", "Fail", "Uk9PVA==")));
        let actions = adopted.step(Event::Delete(webhook_config("2", "Fail", "Uk9PVA==")));
        let Action::Recreate { name, object } = &actions[0] else {
            panic!("{actions:?}");
        };
        assert_eq!(name, "fsm-webhook-fsm");
        assert_eq!(
            object["metadata"],
            json!({"name": "fsm-webhook-fsm", "labels": {RECONCILE_LABEL: "true"}})
        );
        assert_eq!(
            object["webhooks"][0]["clientConfig"]["caBundle"],
            "Uk9PVA=="
        );
        assert!(
            adopted
                .step(Event::Delete(json!({"metadata": {"name": "unknown"}})))
                .is_empty(),
            "never adopted"
        );
    }

    #[test]
    fn an_object_deleted_while_the_watch_was_down_is_recreated_after_the_relist() {
        let mut adopted = Adopted::default();
        adopted.step(Event::Apply(webhook_config("1", "Fail", "")));
        adopted.step(Event::Init);
        let actions = adopted.step(Event::InitDone);
        assert!(
            matches!(&actions[..], [Action::Recreate { name, .. }] if name == "fsm-webhook-fsm"),
            "{actions:?}"
        );
    }
}
