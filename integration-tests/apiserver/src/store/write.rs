//! The write rules of the generic registry: decode, default, validate, check concurrency,
//! commit one event per changed object.

use std::sync::Arc;

use serde_json::{Value, json};

use super::{
    Event, EventKind, ObjKey, PatchTarget, Preconditions, Propagation, State, WriteOpts, fixture,
    key_of,
};
use crate::meta;
use crate::patch::{PatchKind, parse_apply_body};
use crate::registry::{Builtin, GroupResource, ResourceType, Source, crd_status};
use crate::status::{ApiError, FieldError};

impl State {
    /// Creates, or merges into the existing object (JSON merge semantics, status included).
    pub(super) fn apply_fixture(&mut self, obj: Value) -> Result<Value, ApiError> {
        let (rt, ns) = self.resolve_object(&obj)?;
        let name = meta::name(&obj).to_string();
        let existing = self.get(&rt, ns.as_deref(), &name).ok();
        let result = match existing {
            None => self.create(&rt, ns.as_deref(), obj, &fixture())?,
            Some(old) => {
                let mut merged = self.output(&rt, &old);
                json_patch::merge(&mut merged, &obj);
                meta::set(
                    &mut merged,
                    "resourceVersion",
                    json!(meta::resource_version(&old)),
                );
                self.update(&rt, ns.as_deref(), &name, merged, &fixture())?
            }
        };
        Ok(self.output(&rt, &result))
    }

    /// Prepares and validates a decoded object: schema processing for custom resources,
    /// metadata rules, per-kind rules (CRDs, webhook configurations, Deployments, RBAC; `old`
    /// is the stored object on an update). Errors are one 422 with every cause.
    fn validate(
        &self,
        rt: &ResourceType,
        obj: &mut Value,
        old: Option<&Value>,
        opts: &WriteOpts,
    ) -> Result<(), ApiError> {
        let mut errors: Vec<FieldError> = meta::validate(rt, obj);
        if let Some(schema) = rt.schema() {
            let outcome = schema.process(obj, opts.strict);
            errors.extend(outcome.errors);
        }
        if matches!(
            rt.source,
            Source::Builtin(Builtin::CustomResourceDefinition)
        ) && let Err(errs) = crate::registry::parse_crd(obj)
        {
            errors.extend(errs);
        }
        if matches!(
            rt.source,
            Source::Builtin(
                Builtin::MutatingWebhookConfiguration | Builtin::ValidatingWebhookConfiguration
            )
        ) {
            errors.extend(crate::admission::config::validate(obj));
        }
        if matches!(rt.source, Source::Builtin(Builtin::Deployment)) {
            // As the real registry: the status strategy checks only status, the main one
            // only the spec (status is the stored one there).
            if opts.status || opts.fixture {
                errors.extend(crate::workloads::validate_deployment_status(obj));
            }
            if !opts.status {
                errors.extend(crate::workloads::validate_deployment(obj, old));
            }
        }
        if let Some(kind) = rt.rbac_kind() {
            errors.extend(crate::rbac::validate(kind, obj, old));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ApiError::invalid(
                &rt.group,
                &rt.kind,
                meta::name(obj),
                &errors,
            ))
        }
    }

    fn check_namespace(&self, rt: &ResourceType, obj: &Value) -> Result<(), ApiError> {
        if !rt.namespaced {
            return Ok(());
        }
        let ns = meta::namespace(obj);
        let key = (String::new(), ns.to_string());
        let namespaces = GroupResource {
            group: String::new(),
            resource: "namespaces".into(),
        };
        if ns.is_empty() || self.current(&namespaces).contains_key(&key) {
            Ok(())
        } else {
            Err(ApiError::not_found("", "namespaces", ns))
        }
    }

    pub(super) fn create(
        &mut self,
        rt: &ResourceType,
        ns: Option<&str>,
        obj: Value,
        opts: &WriteOpts,
    ) -> Result<Arc<Value>, ApiError> {
        if !opts.fixture && !meta::resource_version(&obj).is_empty() {
            return Err(ApiError::internal(
                "resourceVersion should not be set on objects to be created",
            ));
        }
        let mut obj = meta::decode(rt, ns, obj)?;
        if meta::name(&obj).is_empty()
            && let Some(prefix) = obj
                .pointer("/metadata/generateName")
                .and_then(Value::as_str)
        {
            let generated = meta::generate_name(prefix);
            meta::set(&mut obj, "name", json!(generated));
        }
        self.check_namespace(rt, &obj)?;
        if rt.status_subresource
            && !opts.fixture
            && let Some(m) = obj.as_object_mut()
        {
            m.remove("status");
        }
        let now = meta::now();
        {
            let m = meta::meta_mut(&mut obj);
            let keep = |m: &serde_json::Map<String, Value>, k: &str| {
                opts.keep_identity
                    && m.get(k)
                        .and_then(Value::as_str)
                        .is_some_and(|v| !v.is_empty())
            };
            if !keep(m, "uid") {
                m.insert("uid".into(), json!(meta::new_uid()));
            }
            if !keep(m, "creationTimestamp") {
                m.insert("creationTimestamp".into(), json!(now));
            }
            m.insert("generation".into(), json!(1));
            m.remove("resourceVersion");
            m.remove("deletionTimestamp");
        }
        self.set_server_status(rt, &mut obj, &now);
        let key = key_of(&obj);
        self.prepare_service(rt, &mut obj, None, &key)?;
        self.validate(rt, &mut obj, None, opts)?;
        let gr = rt.group_resource();
        if self.current(&gr).contains_key(&key) {
            return Err(ApiError::already_exists(&rt.group, &rt.plural, &key.1));
        }
        obj["apiVersion"] = json!(rt.storage_api_version());
        if opts.dry_run {
            meta::set(&mut obj, "resourceVersion", json!(""));
            return Ok(Arc::new(obj));
        }
        let stored = self.commit(gr.clone(), key.clone(), EventKind::Added, obj, None);
        self.after_crd_write(rt, &stored);
        self.collect_if_orphaned(&gr, &key);
        Ok(stored)
    }

    /// Status the server itself maintains: namespaces are `Active`, CRDs are established.
    fn set_server_status(&self, rt: &ResourceType, obj: &mut Value, created: &str) {
        match rt.source {
            Source::Builtin(Builtin::Namespace) if obj.pointer("/status/phase").is_none() => {
                obj["status"]["phase"] = json!("Active");
            }
            Source::Builtin(Builtin::CustomResourceDefinition) => {
                obj["status"] = crd_status(obj, created);
            }
            _ => {}
        }
    }

    /// Service defaults and ClusterIP allocation (422 on a taken or changed address).
    fn prepare_service(
        &mut self,
        rt: &ResourceType,
        obj: &mut Value,
        old: Option<&Value>,
        key: &ObjKey,
    ) -> Result<(), ApiError> {
        if !matches!(rt.source, Source::Builtin(Builtin::Service)) {
            return Ok(());
        }
        let errors = self.cluster_ips.prepare(obj, old, key);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ApiError::invalid(
                &rt.group,
                &rt.kind,
                meta::name(obj),
                &errors,
            ))
        }
    }

    fn after_crd_write(&mut self, rt: &ResourceType, crd: &Value) {
        if matches!(
            rt.source,
            Source::Builtin(Builtin::CustomResourceDefinition)
        ) {
            // Validated before commit, so registering cannot fail here.
            if let Err(errs) = self.registry.register_crd(crd) {
                tracing::warn!(?errs, "registering a validated CRD failed");
            }
        }
    }

    pub(super) fn update(
        &mut self,
        rt: &ResourceType,
        ns: Option<&str>,
        name: &str,
        obj: Value,
        opts: &WriteOpts,
    ) -> Result<Arc<Value>, ApiError> {
        let old = self.get(rt, ns, name)?;
        let mut new = meta::decode(rt, ns, obj)?;
        let body_name = meta::name(&new).to_string();
        if body_name.is_empty() {
            meta::set(&mut new, "name", json!(name));
        } else if body_name != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        let given_rv = meta::resource_version(&new).to_string();
        if !given_rv.is_empty() {
            if given_rv != meta::resource_version(&old) {
                return Err(ApiError::stale(&rt.group, &rt.plural, name));
            }
        } else if rt.is_custom() && !opts.fixture {
            return Err(ApiError::invalid(
                &rt.group,
                &rt.kind,
                name,
                &[FieldError::invalid(
                    "metadata.resourceVersion",
                    json!("0x0"),
                    "must be specified for an update",
                )],
            ));
        }

        let mut new = if opts.status {
            // Through /status only the status changes.
            let mut merged = self.output(rt, &old);
            match new.get("status") {
                Some(s) => merged["status"] = s.clone(),
                None => {
                    if let Some(m) = merged.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
            merged
        } else {
            if rt.status_subresource && !opts.fixture {
                match old.get("status") {
                    Some(s) => new["status"] = s.clone(),
                    None => {
                        if let Some(m) = new.as_object_mut() {
                            m.remove("status");
                        }
                    }
                }
            }
            new
        };
        {
            let m = meta::meta_mut(&mut new);
            for k in [
                "uid",
                "creationTimestamp",
                "generation",
                "deletionTimestamp",
            ] {
                match old.pointer(&format!("/metadata/{k}")) {
                    Some(v) => m.insert(k.into(), v.clone()),
                    None => m.remove(k),
                };
            }
            m.insert(
                "resourceVersion".into(),
                json!(meta::resource_version(&old)),
            );
        }
        let created = old
            .pointer("/metadata/creationTimestamp")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        self.set_server_status(rt, &mut new, &created);
        self.prepare_service(rt, &mut new, Some(&old), &key_of(&old))?;
        self.validate(rt, &mut new, Some(&old), opts)?;
        new["apiVersion"] = json!(rt.storage_api_version());

        if meta::spec_changed(rt, &old, &new) {
            meta::set(&mut new, "generation", json!(meta::generation(&old) + 1));
        }
        if new == *old || opts.dry_run {
            // A no-op update keeps the resourceVersion and emits no event, as on a real server.
            return Ok(if opts.dry_run { Arc::new(new) } else { old });
        }
        let key = key_of(&new);
        let stored = self.commit(
            rt.group_resource(),
            key.clone(),
            EventKind::Modified,
            new,
            Some(old),
        );
        self.after_crd_write(rt, &stored);
        self.collect_if_orphaned(&rt.group_resource(), &key);
        Ok(stored)
    }

    pub(super) fn patch(
        &mut self,
        rt: &ResourceType,
        ns: Option<&str>,
        name: &str,
        kind: &PatchKind,
        body: &[u8],
        opts: &WriteOpts,
    ) -> Result<(Arc<Value>, bool), ApiError> {
        match self.patch_target(rt, ns, name, kind, body, opts.status)? {
            PatchTarget::Create(applied) => self.create(rt, ns, applied, opts).map(|o| (o, true)),
            PatchTarget::Update { doc, .. } => {
                self.update(rt, ns, name, doc, opts).map(|o| (o, false))
            }
        }
    }

    /// The object a patch produces (or, for server-side apply of a missing object, the object
    /// to create). Patches are unconditional unless they carry a resourceVersion themselves:
    /// the result carries the current one otherwise.
    pub(super) fn patch_target(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        name: &str,
        kind: &PatchKind,
        body: &[u8],
        status: bool,
    ) -> Result<PatchTarget, ApiError> {
        let old = match self.get(rt, ns, name) {
            Ok(o) => o,
            // Server-side apply creates what does not exist yet.
            Err(_) if *kind == PatchKind::Apply && !status => {
                let applied = parse_apply_body(body)?;
                check_applied_identity(rt, name, &applied)?;
                return Ok(PatchTarget::Create(applied));
            }
            Err(e) => return Err(e),
        };
        if *kind == PatchKind::Apply {
            check_applied_identity(rt, name, &parse_apply_body(body)?)?;
        }
        let mut doc = self.output(rt, &old);
        kind.apply(&mut doc, body)?;
        if meta::resource_version(&doc).is_empty() {
            meta::set(
                &mut doc,
                "resourceVersion",
                json!(meta::resource_version(&old)),
            );
        }
        Ok(PatchTarget::Update { old, doc })
    }

    pub(super) fn delete(
        &mut self,
        rt: &ResourceType,
        ns: Option<&str>,
        name: &str,
        pre: &Preconditions,
        dry_run: bool,
    ) -> Result<Arc<Value>, ApiError> {
        let old = self.get(rt, ns, name)?;
        if let Some(uid) = &pre.uid
            && uid != meta::uid(&old)
        {
            return Err(ApiError::conflict(
                &rt.group,
                &rt.plural,
                name,
                &format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    meta::uid(&old)
                ),
            ));
        }
        if let Some(rv) = &pre.resource_version
            && rv != meta::resource_version(&old)
        {
            return Err(ApiError::conflict(
                &rt.group,
                &rt.plural,
                name,
                &format!(
                    "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                    meta::resource_version(&old)
                ),
            ));
        }
        if dry_run {
            return Ok(old);
        }
        match rt.source {
            Source::Builtin(Builtin::Namespace) => self.delete_namespace_contents(name),
            Source::Builtin(Builtin::CustomResourceDefinition) => self.delete_crd_contents(&old),
            _ => {}
        }
        let propagation = pre.propagation.unwrap_or_else(|| rt.default_propagation());
        if propagation == Propagation::Foreground {
            self.collect_dependents(&old, propagation);
        }
        let key = key_of(&old);
        let deleted = self.commit(
            rt.group_resource(),
            key,
            EventKind::Deleted,
            (*old).clone(),
            Some(old),
        );
        if propagation != Propagation::Foreground {
            self.collect_dependents(&deleted, propagation);
        }
        Ok(deleted)
    }

    fn delete_namespace_contents(&mut self, ns: &str) {
        let mut doomed = Vec::new();
        for (gr, objs) in &self.objects {
            for (key, obj) in objs {
                if key.0 == ns {
                    doomed.push((gr.clone(), key.clone(), obj.clone()));
                }
            }
        }
        doomed.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        for (gr, key, obj) in doomed {
            self.commit(gr, key, EventKind::Deleted, (*obj).clone(), Some(obj));
        }
    }

    fn delete_crd_contents(&mut self, crd: &Value) {
        let s = |p: &str| {
            crd.pointer(p)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        let gr = GroupResource {
            group: s("/spec/group"),
            resource: s("/spec/names/plural"),
        };
        let doomed: Vec<(ObjKey, Arc<Value>)> = self
            .current(&gr)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (key, obj) in doomed {
            self.commit(
                gr.clone(),
                key,
                EventKind::Deleted,
                (*obj).clone(),
                Some(obj),
            );
        }
        self.registry.unregister_crd(meta::name(crd));
    }

    /// Stores (or removes) one object under a new resourceVersion and records the event.
    pub(super) fn commit(
        &mut self,
        gr: GroupResource,
        key: ObjKey,
        kind: EventKind,
        mut obj: Value,
        prev: Option<Arc<Value>>,
    ) -> Arc<Value> {
        self.rv += 1;
        meta::set(&mut obj, "resourceVersion", json!(self.rv.to_string()));
        let obj = Arc::new(obj);
        if gr.group.is_empty() && gr.resource == "services" {
            let new = (kind != EventKind::Deleted).then_some(obj.as_ref());
            self.cluster_ips.record(&key, prev.as_deref(), new);
        }
        let objects = self.objects.entry(gr.clone()).or_default();
        if kind == EventKind::Deleted {
            objects.remove(&key);
        } else {
            objects.insert(key, obj.clone());
        }
        self.history.push_back(Event {
            rv: self.rv,
            gr,
            kind,
            object: obj.clone(),
            prev,
        });
        while self.history.len() > self.history_limit {
            if let Some(e) = self.history.pop_front() {
                self.dropped_rv = e.rv;
                self.oldest_valid_rv = self.oldest_valid_rv.max(e.rv);
            }
        }
        obj
    }
}

/// An apply body must name the object the URL names, with the URL's type.
fn check_applied_identity(rt: &ResourceType, name: &str, applied: &Value) -> Result<(), ApiError> {
    let body_name = meta::name(applied);
    if body_name != name {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({body_name}) does not match the name on the URL ({name})"
        )));
    }
    let api_version = applied
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let kind = applied
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if api_version.is_empty() || kind.is_empty() {
        return Err(ApiError::bad_request(
            "invalid object type: apiVersion and kind are required for apply",
        ));
    }
    if api_version != rt.api_version() || kind != rt.kind {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({api_version}) does not match the expected API version ({})",
            rt.api_version()
        )));
    }
    Ok(())
}
