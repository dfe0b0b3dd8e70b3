//! The resource types the server serves: built-in kinds, plus one entry per served version of
//! each established CustomResourceDefinition.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{
    ConfigMap, Endpoints, Event, Namespace, Pod, Secret, Service, ServiceAccount,
};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::names::NameRule;
use crate::rbac;
use crate::schema::Schema;
use crate::status::{FieldError, FieldErrorKind};
use crate::store::Propagation;

// === Types ===

/// Storage identity of a resource: objects live under (group, plural) whatever version serves
/// them, as in etcd.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GroupResource {
    pub group: String,
    pub resource: String,
}

/// One served (group, version, resource).
#[derive(Debug, Clone)]
pub struct ResourceType {
    pub group: String,
    pub version: String,
    pub kind: String,
    pub plural: String,
    pub singular: String,
    pub list_kind: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    pub status_subresource: bool,
    pub name_rule: NameRule,
    /// DELETE answers with the deleted object rather than a success `Status` (as the real
    /// registry does for pods, services, namespaces and custom resources).
    pub return_deleted_object: bool,
    /// Field selector fields beyond `metadata.name` / `metadata.namespace`.
    pub extra_fields: &'static [&'static str],
    pub source: Source,
}

#[derive(Debug, Clone)]
pub enum Source {
    Builtin(Builtin),
    Custom {
        crd_name: String,
        schema: Option<Arc<Schema>>,
        storage_version: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Builtin {
    Namespace,
    Service,
    Endpoints,
    Pod,
    ServiceAccount,
    Secret,
    ConfigMap,
    Event,
    EndpointSlice,
    Lease,
    CustomResourceDefinition,
    MutatingWebhookConfiguration,
    ValidatingWebhookConfiguration,
    Deployment,
    ReplicaSet,
    DaemonSet,
    StatefulSet,
    Job,
    Role,
    ClusterRole,
    RoleBinding,
    ClusterRoleBinding,
}

/// All served types, keyed by (group, version, plural).
#[derive(Debug, Clone)]
pub struct Registry {
    types: BTreeMap<(String, String, String), Arc<ResourceType>>,
}

pub const CRD_GROUP: &str = "apiextensions.k8s.io";
pub const ADMISSION_GROUP: &str = "admissionregistration.k8s.io";
pub const APPS_GROUP: &str = "apps";
pub const BATCH_GROUP: &str = "batch";

/// (builtin, Kind, plural, namespaced, short names, extra field-selector fields).
type BuiltinRow = (
    Builtin,
    &'static str,
    &'static str,
    bool,
    &'static [&'static str],
    &'static [&'static str],
);

// === ResourceType ===

impl ResourceType {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    pub fn group_resource(&self) -> GroupResource {
        GroupResource {
            group: self.group.clone(),
            resource: self.plural.clone(),
        }
    }

    pub fn is_custom(&self) -> bool {
        matches!(self.source, Source::Custom { .. })
    }

    pub fn schema(&self) -> Option<&Schema> {
        match &self.source {
            Source::Custom { schema, .. } => schema.as_deref(),
            Source::Builtin(_) => None,
        }
    }

    /// The `apiVersion` objects of this resource are stored with.
    pub fn storage_api_version(&self) -> String {
        match &self.source {
            Source::Custom {
                storage_version, ..
            } => format!("{}/{storage_version}", self.group),
            Source::Builtin(_) => self.api_version(),
        }
    }

    /// An object as this version serves it: custom resources are stored in their storage
    /// version and served with only `apiVersion` changed (the `None` conversion strategy);
    /// `metadata_only` gives a `PartialObjectMetadata`.
    pub fn render(&self, obj: &Value, metadata_only: bool) -> Value {
        if metadata_only {
            return json!({
                "apiVersion": "meta.k8s.io/v1",
                "kind": "PartialObjectMetadata",
                "metadata": obj.get("metadata").cloned().unwrap_or_else(|| json!({})),
            });
        }
        let mut out = obj.clone();
        if self.is_custom() {
            out["apiVersion"] = json!(self.api_version());
        }
        out
    }

    /// The RBAC kind, for the RBAC types.
    pub(crate) fn rbac_kind(&self) -> Option<rbac::Kind> {
        match self.source {
            Source::Builtin(b) => b.rbac_kind(),
            Source::Custom { .. } => None,
        }
    }

    /// See [`Builtin::is_workload`].
    pub(crate) fn is_workload(&self) -> bool {
        matches!(self.source, Source::Builtin(b) if b.is_workload())
    }

    /// What a DELETE that names no `propagationPolicy` does with dependents: `batch/v1` Jobs
    /// orphan them (kept for compatibility by the real server), everything else deletes them
    /// in the background.
    pub(crate) fn default_propagation(&self) -> Propagation {
        if matches!(self.source, Source::Builtin(Builtin::Job)) {
            Propagation::Orphan
        } else {
            Propagation::Background
        }
    }

    pub fn supports_field(&self, field: &str) -> bool {
        field == "metadata.name"
            || (field == "metadata.namespace" && self.namespaced)
            || self.extra_fields.contains(&field)
    }

    /// Decodes a built-in object through its k8s-openapi type, as the real server decodes into
    /// Go structs: wrong types fail (400) and unknown fields disappear.
    pub fn normalize_builtin(&self, obj: Value) -> Result<Value, String> {
        let Source::Builtin(b) = self.source else {
            return Ok(obj);
        };
        let result = match b {
            Builtin::Namespace => roundtrip::<Namespace>(obj),
            Builtin::Service => roundtrip::<Service>(obj),
            Builtin::Endpoints => roundtrip::<Endpoints>(obj),
            Builtin::Pod => roundtrip::<Pod>(obj),
            Builtin::ServiceAccount => roundtrip::<ServiceAccount>(obj),
            Builtin::Secret => roundtrip::<Secret>(obj),
            Builtin::ConfigMap => roundtrip::<ConfigMap>(obj),
            Builtin::Event => roundtrip::<Event>(obj),
            Builtin::EndpointSlice => roundtrip::<EndpointSlice>(obj),
            Builtin::Lease => roundtrip::<Lease>(obj),
            Builtin::CustomResourceDefinition => roundtrip::<CustomResourceDefinition>(obj),
            Builtin::MutatingWebhookConfiguration => roundtrip::<MutatingWebhookConfiguration>(obj)
                .map(|o| crate::admission::config::default(o, true)),
            Builtin::ValidatingWebhookConfiguration => {
                roundtrip::<ValidatingWebhookConfiguration>(obj)
                    .map(|o| crate::admission::config::default(o, false))
            }
            Builtin::Deployment => {
                roundtrip_workload::<Deployment>(obj).map(crate::workloads::default_deployment)
            }
            Builtin::ReplicaSet => roundtrip_workload::<ReplicaSet>(obj),
            Builtin::DaemonSet => roundtrip_workload::<DaemonSet>(obj),
            Builtin::StatefulSet => roundtrip_workload::<StatefulSet>(obj),
            Builtin::Job => roundtrip::<Job>(obj),
            Builtin::Role => roundtrip::<Role>(obj),
            Builtin::ClusterRole => roundtrip::<ClusterRole>(obj),
            Builtin::RoleBinding => roundtrip::<RoleBinding>(obj),
            Builtin::ClusterRoleBinding => roundtrip::<ClusterRoleBinding>(obj),
        };
        let result = match self.rbac_kind() {
            Some(kind) => result.map(|o| rbac::default(kind, o)),
            None => result,
        };
        result.map_err(|e| {
            format!(
                "{} in version \"{}\" cannot be handled as a {}: {e}",
                self.kind, self.version, self.kind
            )
        })
    }
}

impl Builtin {
    /// The kinds whose objects a controller this server does not run makes as the owners of
    /// other objects (Deployments own ReplicaSets, which own pods; DaemonSets, StatefulSets
    /// and Jobs own pods): the garbage collector assumes a missing one exists (`store::gc`).
    /// All have a `/status` subresource.
    pub fn is_workload(self) -> bool {
        matches!(
            self,
            Builtin::Deployment
                | Builtin::ReplicaSet
                | Builtin::DaemonSet
                | Builtin::StatefulSet
                | Builtin::Job
        )
    }

    pub(crate) fn rbac_kind(self) -> Option<rbac::Kind> {
        match self {
            Builtin::Role => Some(rbac::Kind::Role),
            Builtin::ClusterRole => Some(rbac::Kind::ClusterRole),
            Builtin::RoleBinding => Some(rbac::Kind::RoleBinding),
            Builtin::ClusterRoleBinding => Some(rbac::Kind::ClusterRoleBinding),
            _ => None,
        }
    }
}

fn roundtrip<T: Serialize + DeserializeOwned>(obj: Value) -> Result<Value, serde_json::Error> {
    let typed: T = serde_json::from_value(obj)?;
    serde_json::to_value(typed)
}

/// [`roundtrip`] for the apps/v1 workloads, whose `spec.selector` k8s-openapi makes required
/// and decodes from nothing as `{}`: the Go type is a pointer, so an absent selector stays
/// absent (validation tells "required" from "empty").
fn roundtrip_workload<T: Serialize + DeserializeOwned>(
    obj: Value,
) -> Result<Value, serde_json::Error> {
    let absent = obj.pointer("/spec/selector").is_none_or(Value::is_null);
    let mut out = roundtrip::<T>(obj)?;
    if absent && let Some(spec) = out.get_mut("spec").and_then(Value::as_object_mut) {
        spec.remove("selector");
    }
    Ok(out)
}

// === Registry ===

impl Registry {
    pub fn with_builtins() -> Self {
        let mut r = Registry {
            types: BTreeMap::new(),
        };
        use Builtin::*;
        let core: [BuiltinRow; 8] = [
            (
                Namespace,
                "Namespace",
                "namespaces",
                false,
                &["ns"],
                &["status.phase"],
            ),
            (
                Service,
                "Service",
                "services",
                true,
                &["svc"],
                &["spec.clusterIP", "spec.type"],
            ),
            (Endpoints, "Endpoints", "endpoints", true, &["ep"], &[]),
            (
                Pod,
                "Pod",
                "pods",
                true,
                &["po"],
                &[
                    "spec.nodeName",
                    "spec.serviceAccountName",
                    "spec.restartPolicy",
                    "spec.schedulerName",
                    "status.phase",
                    "status.podIP",
                ],
            ),
            (
                ServiceAccount,
                "ServiceAccount",
                "serviceaccounts",
                true,
                &["sa"],
                &[],
            ),
            (Secret, "Secret", "secrets", true, &[], &["type"]),
            (ConfigMap, "ConfigMap", "configmaps", true, &["cm"], &[]),
            (
                Event,
                "Event",
                "events",
                true,
                &["ev"],
                &[
                    "involvedObject.kind",
                    "involvedObject.namespace",
                    "involvedObject.name",
                    "involvedObject.uid",
                    "involvedObject.apiVersion",
                    "involvedObject.resourceVersion",
                    "involvedObject.fieldPath",
                    "reason",
                    "reportingComponent",
                    "source",
                    "type",
                ],
            ),
        ];
        for (b, kind, plural, namespaced, short, fields) in core {
            r.add_builtin("", "v1", b, kind, plural, namespaced, short, fields);
        }
        r.add_builtin(
            "discovery.k8s.io",
            "v1",
            EndpointSlice,
            "EndpointSlice",
            "endpointslices",
            true,
            &[],
            &[],
        );
        r.add_builtin(
            "coordination.k8s.io",
            "v1",
            Lease,
            "Lease",
            "leases",
            true,
            &[],
            &[],
        );
        let apps: [BuiltinRow; 4] = [
            (
                Deployment,
                "Deployment",
                "deployments",
                true,
                &["deploy"],
                &[],
            ),
            (ReplicaSet, "ReplicaSet", "replicasets", true, &["rs"], &[]),
            (DaemonSet, "DaemonSet", "daemonsets", true, &["ds"], &[]),
            (
                StatefulSet,
                "StatefulSet",
                "statefulsets",
                true,
                &["sts"],
                &[],
            ),
        ];
        for (b, kind, plural, namespaced, short, fields) in apps {
            r.add_builtin(APPS_GROUP, "v1", b, kind, plural, namespaced, short, fields);
        }
        r.add_builtin(BATCH_GROUP, "v1", Job, "Job", "jobs", true, &[], &[]);
        let rbac: [BuiltinRow; 4] = [
            (Role, "Role", "roles", true, &[], &[]),
            (ClusterRole, "ClusterRole", "clusterroles", false, &[], &[]),
            (RoleBinding, "RoleBinding", "rolebindings", true, &[], &[]),
            (
                ClusterRoleBinding,
                "ClusterRoleBinding",
                "clusterrolebindings",
                false,
                &[],
                &[],
            ),
        ];
        for (b, kind, plural, namespaced, short, fields) in rbac {
            r.add_builtin(
                rbac::GROUP,
                "v1",
                b,
                kind,
                plural,
                namespaced,
                short,
                fields,
            );
        }
        r.add_builtin(
            CRD_GROUP,
            "v1",
            CustomResourceDefinition,
            "CustomResourceDefinition",
            "customresourcedefinitions",
            false,
            &["crd", "crds"],
            &[],
        );
        r.add_builtin(
            ADMISSION_GROUP,
            "v1",
            MutatingWebhookConfiguration,
            "MutatingWebhookConfiguration",
            "mutatingwebhookconfigurations",
            false,
            &[],
            &[],
        );
        r.add_builtin(
            ADMISSION_GROUP,
            "v1",
            ValidatingWebhookConfiguration,
            "ValidatingWebhookConfiguration",
            "validatingwebhookconfigurations",
            false,
            &[],
            &[],
        );
        r
    }

    #[allow(clippy::too_many_arguments)]
    fn add_builtin(
        &mut self,
        group: &str,
        version: &str,
        b: Builtin,
        kind: &str,
        plural: &str,
        namespaced: bool,
        short_names: &[&str],
        extra_fields: &'static [&'static str],
    ) {
        let return_deleted_object = matches!(
            b,
            Builtin::Namespace
                | Builtin::Service
                | Builtin::Pod
                | Builtin::CustomResourceDefinition
        );
        let status_subresource = return_deleted_object || b.is_workload();
        let name_rule = match b {
            Builtin::Namespace => NameRule::Dns1123Label,
            Builtin::Service => NameRule::Dns1035Label,
            _ if b.rbac_kind().is_some() => NameRule::PathSegment,
            _ => NameRule::Dns1123Subdomain,
        };
        let rt = ResourceType {
            group: group.to_string(),
            version: version.to_string(),
            kind: kind.to_string(),
            plural: plural.to_string(),
            singular: kind.to_lowercase(),
            list_kind: format!("{kind}List"),
            namespaced,
            short_names: short_names.iter().map(|s| s.to_string()).collect(),
            categories: Vec::new(),
            status_subresource,
            name_rule,
            return_deleted_object,
            extra_fields,
            source: Source::Builtin(b),
        };
        self.insert(rt);
    }

    fn insert(&mut self, rt: ResourceType) {
        self.types.insert(
            (rt.group.clone(), rt.version.clone(), rt.plural.clone()),
            Arc::new(rt),
        );
    }

    pub fn get(&self, group: &str, version: &str, plural: &str) -> Option<Arc<ResourceType>> {
        self.types
            .get(&(group.to_string(), version.to_string(), plural.to_string()))
            .cloned()
    }

    /// Looks a type up by `apiVersion` and `kind` (for in-process writes of whole objects).
    pub fn by_kind(&self, api_version: &str, kind: &str) -> Option<Arc<ResourceType>> {
        let (group, version) = split_api_version(api_version);
        self.types
            .values()
            .find(|rt| rt.group == group && rt.version == version && rt.kind == kind)
            .cloned()
    }

    pub fn all(&self) -> impl Iterator<Item = &Arc<ResourceType>> {
        self.types.values()
    }

    /// Replaces whatever a CRD of this name served before with what `crd` declares now.
    pub fn register_crd(&mut self, crd: &Value) -> Result<(), Vec<FieldError>> {
        let types = parse_crd(crd)?;
        let name = crd_name(crd);
        self.unregister_crd(&name);
        for rt in types {
            self.insert(rt);
        }
        Ok(())
    }

    pub fn unregister_crd(&mut self, crd_name: &str) {
        self.types.retain(
            |_, rt| !matches!(&rt.source, Source::Custom { crd_name: n, .. } if n == crd_name),
        );
    }
}

pub fn split_api_version(api_version: &str) -> (&str, &str) {
    match api_version.split_once('/') {
        Some((g, v)) => (g, v),
        None => ("", api_version),
    }
}

fn crd_name(crd: &Value) -> String {
    crd.pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

/// Checks a CRD the way the real server does (the parts that matter for serving) and turns it
/// into one [`ResourceType`] per served version.
pub fn parse_crd(crd: &Value) -> Result<Vec<ResourceType>, Vec<FieldError>> {
    let mut errors = Vec::new();
    let s = |p: &str| {
        crd.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let name = crd_name(crd);
    let group = s("/spec/group");
    let plural = s("/spec/names/plural");
    let kind = s("/spec/names/kind");
    if group.is_empty() {
        errors.push(FieldError::required("spec.group", ""));
    }
    if plural.is_empty() {
        errors.push(FieldError::required("spec.names.plural", ""));
    }
    if kind.is_empty() {
        errors.push(FieldError::required("spec.names.kind", ""));
    }
    if !group.is_empty() && !plural.is_empty() && name != format!("{plural}.{group}") {
        errors.push(FieldError::invalid(
            "metadata.name",
            json!(name),
            "must be spec.names.plural+\".\"+spec.group",
        ));
    }
    let namespaced = match s("/spec/scope").as_str() {
        "Namespaced" => true,
        "Cluster" => false,
        other => {
            errors.push(FieldError::new(
                "spec.scope",
                FieldErrorKind::NotSupported {
                    value: json!(other),
                    supported: vec![json!("Cluster"), json!("Namespaced")],
                },
            ));
            true
        }
    };
    let versions = crd
        .pointer("/spec/versions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if versions.is_empty() {
        errors.push(FieldError::required(
            "spec.versions",
            "must have exactly one version marked as storage version",
        ));
    }
    let storage: Vec<String> = versions
        .iter()
        .filter(|v| v.get("storage").and_then(Value::as_bool) == Some(true))
        .filter_map(|v| v.get("name").and_then(Value::as_str).map(String::from))
        .collect();
    if !versions.is_empty() && storage.len() != 1 {
        errors.push(FieldError::invalid(
            "spec.versions",
            Value::Array(versions.clone()),
            "must have exactly one version marked as storage version",
        ));
    }
    let storage_version = storage.first().cloned().unwrap_or_default();
    let singular = match s("/spec/names/singular") {
        x if x.is_empty() => kind.to_lowercase(),
        x => x,
    };
    let list_kind = match s("/spec/names/listKind") {
        x if x.is_empty() => format!("{kind}List"),
        x => x,
    };
    let strings = |p: &str| -> Vec<String> {
        crd.pointer(p)
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let short_names = strings("/spec/names/shortNames");
    let categories = strings("/spec/names/categories");

    let mut types = Vec::new();
    for (i, v) in versions.iter().enumerate() {
        let vname = v.get("name").and_then(Value::as_str).unwrap_or_default();
        if vname.is_empty() {
            errors.push(FieldError::required(format!("spec.versions[{i}].name"), ""));
            continue;
        }
        let schema_path = format!("spec.versions[{i}].schema.openAPIV3Schema");
        let schema = match v.pointer("/schema/openAPIV3Schema") {
            None => {
                errors.push(FieldError::required(&schema_path, "schemas are required"));
                None
            }
            Some(raw) => match Schema::compile(raw, &schema_path) {
                Ok(s) => Some(Arc::new(s)),
                Err(errs) => {
                    errors.extend(errs);
                    None
                }
            },
        };
        if v.get("served").and_then(Value::as_bool) != Some(true) {
            continue;
        }
        types.push(ResourceType {
            group: group.clone(),
            version: vname.to_string(),
            kind: kind.clone(),
            plural: plural.clone(),
            singular: singular.clone(),
            list_kind: list_kind.clone(),
            namespaced,
            short_names: short_names.clone(),
            categories: categories.clone(),
            status_subresource: v.pointer("/subresources/status").is_some(),
            name_rule: NameRule::Dns1123Subdomain,
            return_deleted_object: true,
            extra_fields: &[],
            source: Source::Custom {
                crd_name: name.clone(),
                schema,
                storage_version: storage_version.clone(),
            },
        });
    }
    if errors.is_empty() {
        Ok(types)
    } else {
        Err(errors)
    }
}

/// The status a real server writes on an accepted CRD; controllers wait for `Established`.
pub fn crd_status(crd: &Value, now: &str) -> Value {
    let names = crd
        .pointer("/spec/names")
        .cloned()
        .unwrap_or_else(|| json!({}));
    let storage: Vec<Value> = crd
        .pointer("/spec/versions")
        .and_then(Value::as_array)
        .map(|vs| {
            vs.iter()
                .filter(|v| v.get("storage").and_then(Value::as_bool) == Some(true))
                .filter_map(|v| v.get("name").cloned())
                .collect()
        })
        .unwrap_or_default();
    let condition = |t: &str, reason: &str, message: &str| json!({"type": t, "status": "True", "lastTransitionTime": now, "reason": reason, "message": message});
    json!({
        "acceptedNames": names,
        "conditions": [
            condition("NamesAccepted", "NoConflicts", "no conflicts found"),
            condition("Established", "InitialNamesAccepted", "the initial names have been accepted"),
        ],
        "storedVersions": storage,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crd() -> Value {
        json!({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": "widgets.example.io"},
            "spec": {
                "group": "example.io",
                "scope": "Namespaced",
                "names": {"plural": "widgets", "kind": "Widget"},
                "versions": [
                    {"name": "v1", "served": true, "storage": true,
                     "schema": {"openAPIV3Schema": {"type": "object"}},
                     "subresources": {"status": {}}},
                    {"name": "v1alpha1", "served": false, "storage": false,
                     "schema": {"openAPIV3Schema": {"type": "object"}}}
                ]
            }
        })
    }

    #[test]
    fn builtins_are_served() {
        let r = Registry::with_builtins();
        assert!(
            r.get("", "v1", "pods")
                .is_some_and(|p| p.namespaced && p.status_subresource)
        );
        assert!(r.get("", "v1", "namespaces").is_some_and(|p| !p.namespaced));
        assert!(r.by_kind("discovery.k8s.io/v1", "EndpointSlice").is_some());
        assert!(r.by_kind("coordination.k8s.io/v1", "Lease").is_some());
        assert!(
            r.get(CRD_GROUP, "v1", "customresourcedefinitions")
                .is_some()
        );
        for plural in [
            "mutatingwebhookconfigurations",
            "validatingwebhookconfigurations",
        ] {
            assert!(
                r.get(ADMISSION_GROUP, "v1", plural)
                    .is_some_and(|t| !t.namespaced && !t.status_subresource)
            );
        }
        // (group, plural, namespaced, status, short names): as kube-apiserver 1.33 serves them.
        let workloads_and_rbac: [(&str, &str, bool, bool, &[&str]); 9] = [
            (APPS_GROUP, "deployments", true, true, &["deploy"]),
            (APPS_GROUP, "replicasets", true, true, &["rs"]),
            (APPS_GROUP, "daemonsets", true, true, &["ds"]),
            (APPS_GROUP, "statefulsets", true, true, &["sts"]),
            (BATCH_GROUP, "jobs", true, true, &[]),
            (rbac::GROUP, "roles", true, false, &[]),
            (rbac::GROUP, "rolebindings", true, false, &[]),
            (rbac::GROUP, "clusterroles", false, false, &[]),
            (rbac::GROUP, "clusterrolebindings", false, false, &[]),
        ];
        for (group, plural, namespaced, status, short) in workloads_and_rbac {
            let t = r.get(group, "v1", plural);
            let t = t.unwrap_or_else(|| panic!("{group}/{plural} served"));
            assert_eq!(
                (t.namespaced, t.status_subresource, t.short_names.clone()),
                (
                    namespaced,
                    status,
                    short.iter().map(|s| s.to_string()).collect()
                ),
                "{plural}"
            );
            assert!(
                !t.return_deleted_object,
                "{plural}: DELETE answers a Status"
            );
        }
        let job = r.by_kind("batch/v1", "Job");
        assert!(job.is_some_and(|j| j.default_propagation() == Propagation::Orphan));
        let deploy = r.by_kind("apps/v1", "Deployment");
        assert!(deploy.is_some_and(|d| d.default_propagation() == Propagation::Background));
    }

    #[test]
    fn workloads_keep_an_absent_selector_absent() {
        let r = Registry::with_builtins();
        let deploy = r
            .get(APPS_GROUP, "v1", "deployments")
            .unwrap_or_else(|| panic!("deployments"));
        let out = deploy
            .normalize_builtin(json!({"metadata": {"name": "d"}, "spec": {"template": {}}}))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(out.pointer("/spec/selector").is_none());
        assert_eq!(out["spec"]["replicas"], 1);
        let out = deploy
            .normalize_builtin(json!({"metadata": {"name": "d"}, "spec": {"selector": {}}}))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(out["spec"]["selector"], json!({}));
        let binding = r
            .get(rbac::GROUP, "v1", "rolebindings")
            .unwrap_or_else(|| panic!("rolebindings"));
        let out = binding
            .normalize_builtin(json!({"metadata": {"name": "b"},
                "roleRef": {"kind": "Role", "name": "r"}}))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(out["roleRef"]["apiGroup"], rbac::GROUP);
    }

    #[test]
    fn crd_registers_served_versions_only() {
        let mut r = Registry::with_builtins();
        assert!(r.register_crd(&crd()).is_ok());
        let w = r.get("example.io", "v1", "widgets");
        assert!(
            w.as_ref()
                .is_some_and(|w| w.status_subresource && w.singular == "widget")
        );
        assert!(r.get("example.io", "v1alpha1", "widgets").is_none());
        r.unregister_crd("widgets.example.io");
        assert!(r.get("example.io", "v1", "widgets").is_none());
    }

    #[test]
    fn crd_errors() {
        let mut bad = crd();
        bad["metadata"]["name"] = json!("wrong");
        bad["spec"]["scope"] = json!("Galaxy");
        bad["spec"]["versions"][1]["storage"] = json!(true);
        let errs = parse_crd(&bad).err().unwrap_or_default();
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, vec!["metadata.name", "spec.scope", "spec.versions"]);
    }
}
