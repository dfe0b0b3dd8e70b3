//! Writes through the HTTP API, with admission in the real server's order: decode, mutating
//! webhooks, the registry's defaulting and validation, validating webhooks, storage.
//!
//! The store writes under a synchronous lock, so webhooks cannot be called from inside a write.
//! Instead each write runs twice: first as a dry run (which computes and validates exactly what
//! would be stored — generated name, uid, defaults), then, once the validating webhooks have
//! accepted that object, for real. Updates and deletes that did not name a resourceVersion are
//! pinned to the version the webhooks saw; if the object changed in between, the whole
//! admission runs again on the new state, as the real server's `GuaranteedUpdate` retries.
//! When no webhook is configured at all, writes go straight to the store.

use serde_json::{Value, json};

use super::{AppState, Query, Target};
use crate::admission::{Operation, Request};
use crate::meta;
use crate::patch::PatchKind;
use crate::registry::ResourceType;
use crate::status::ApiError;
use crate::store::{Filter, PatchTarget, Preconditions, Propagation, WriteOpts};

/// How often a write is admitted again after the object changed under it.
const RETRIES: usize = 5;

// === Create ===

pub(super) async fn create(
    app: &AppState,
    t: &Target,
    body: Value,
    opts: &WriteOpts,
    options: Value,
) -> Result<Value, ApiError> {
    let (rt, ns) = (&t.rt, t.namespace.as_deref());
    if !app.admission.configured() {
        return app.store.http_create(rt, ns, body, opts);
    }
    let obj = meta::decode(rt, ns, body)?;
    // NamespaceLifecycle runs before the webhooks: no calls for a namespace that is not there.
    let obj_ns = meta::namespace(&obj);
    if rt.namespaced
        && !obj_ns.is_empty()
        && app.store.get("v1", "Namespace", None, obj_ns).is_none()
    {
        return Err(ApiError::not_found("", "namespaces", obj_ns));
    }
    let req = request(
        rt,
        Operation::Create,
        false,
        meta::namespace(&obj),
        meta::name(&obj),
        opts.dry_run,
        options,
    );
    let obj = mutated(app, &req, obj, None).await?;
    let prepared = app.store.http_create(rt, ns, obj, &dry(opts))?;
    app.admission.validate(&req, Some(&prepared), None).await?;
    if opts.dry_run {
        return Ok(prepared);
    }
    let commit = WriteOpts {
        keep_identity: true,
        ..opts.clone()
    };
    app.store.http_create(rt, ns, prepared, &commit)
}

// === Update ===

pub(super) async fn update(
    app: &AppState,
    t: &Target,
    name: &str,
    body: Value,
    opts: &WriteOpts,
    options: Value,
) -> Result<Value, ApiError> {
    let (rt, ns) = (&t.rt, t.namespace.as_deref());
    if !app.admission.configured() {
        return app.store.http_update(rt, ns, name, body, opts);
    }
    let mut body = meta::decode(rt, ns, body)?;
    match meta::name(&body) {
        "" => meta::set(&mut body, "name", json!(name)),
        n if n != name => {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({n}) does not match the name on the URL ({name})"
            )));
        }
        _ => {}
    }
    // Built-ins may be updated unconditionally; custom resources get their 422 from the store.
    let pin = meta::resource_version(&body).is_empty() && !rt.is_custom();
    let mut attempt = 0;
    loop {
        let old = rt.render(app.store.http_get(rt, ns, name)?.as_ref(), false);
        let req = request(
            rt,
            Operation::Update,
            t.status,
            meta::namespace(&old),
            name,
            opts.dry_run,
            options.clone(),
        );
        let mut new = mutated(app, &req, body.clone(), Some(&old)).await?;
        if pin {
            meta::set(
                &mut new,
                "resourceVersion",
                json!(meta::resource_version(&old)),
            );
        }
        match admitted_update(app, t, name, new, &old, &req, opts).await {
            Err(e) if pin && is_conflict(&e) && attempt < RETRIES => attempt += 1,
            result => return result,
        }
    }
}

/// PATCH: the patched object is what webhooks see (a server-side apply of a missing object is
/// a CREATE). Returns whether the object was created.
pub(super) async fn patch(
    app: &AppState,
    t: &Target,
    name: &str,
    kind: &PatchKind,
    body: &[u8],
    opts: &WriteOpts,
    query: &Query,
) -> Result<(Value, bool), ApiError> {
    let (rt, ns) = (&t.rt, t.namespace.as_deref());
    if !app.admission.configured() {
        return app.store.http_patch(rt, ns, name, kind, body, opts);
    }
    let mut attempt = 0;
    loop {
        let (old, doc) = match app
            .store
            .http_patch_target(rt, ns, name, kind, body, t.status)?
        {
            PatchTarget::Create(applied) => {
                let options = write_options("CreateOptions", query);
                return create(app, t, applied, opts, options)
                    .await
                    .map(|o| (o, true));
            }
            PatchTarget::Update { old, doc } => (rt.render(&old, false), doc),
        };
        // Unless the patch named a resourceVersion, it applies to whatever is current.
        let pinned = meta::resource_version(&doc) == meta::resource_version(&old);
        let doc = meta::decode(rt, ns, doc)?;
        let req = request(
            rt,
            Operation::Update,
            t.status,
            meta::namespace(&old),
            name,
            opts.dry_run,
            write_options("UpdateOptions", query),
        );
        let mut new = mutated(app, &req, doc, Some(&old)).await?;
        if meta::resource_version(&new).is_empty() {
            meta::set(
                &mut new,
                "resourceVersion",
                json!(meta::resource_version(&old)),
            );
        }
        match admitted_update(app, t, name, new, &old, &req, opts).await {
            Err(e) if pinned && is_conflict(&e) && attempt < RETRIES => attempt += 1,
            result => return result.map(|o| (o, false)),
        }
    }
}

/// Dry run, validating webhooks on its result, then the write.
async fn admitted_update(
    app: &AppState,
    t: &Target,
    name: &str,
    new: Value,
    old: &Value,
    req: &Request<'_>,
    opts: &WriteOpts,
) -> Result<Value, ApiError> {
    let (rt, ns) = (&t.rt, t.namespace.as_deref());
    let prepared = app
        .store
        .http_update(rt, ns, name, new.clone(), &dry(opts))?;
    app.admission
        .validate(req, Some(&prepared), Some(old))
        .await?;
    if opts.dry_run {
        return Ok(prepared);
    }
    app.store.http_update(rt, ns, name, new, opts)
}

// === Delete ===

pub(super) async fn delete(
    app: &AppState,
    t: &Target,
    name: &str,
    pre: &Preconditions,
    dry_run: bool,
    options: Value,
) -> Result<Value, ApiError> {
    let (rt, ns) = (&t.rt, t.namespace.as_deref());
    if !app.admission.configured() {
        return app.store.http_delete(rt, ns, name, pre, dry_run);
    }
    let req = request(
        rt,
        Operation::Delete,
        false,
        ns.unwrap_or_default(),
        name,
        dry_run,
        options,
    );
    // Mutating webhooks see a DELETE without objects (and may not patch).
    app.admission.mutate(&req, None, None).await?;
    validated_delete(app, rt, ns, name, pre, &req).await
}

/// DELETE on a collection: mutating webhooks once (no name), then each object's deletion
/// validated on its own, as the real registry's `DeleteCollection` does.
pub(super) async fn delete_collection(
    app: &AppState,
    t: &Target,
    filter: &Filter,
    propagation: Option<Propagation>,
    dry_run: bool,
    options: Value,
) -> Result<Vec<Value>, ApiError> {
    let rt = &t.rt;
    if !app.admission.configured() {
        return app
            .store
            .http_delete_collection(rt, filter, propagation, dry_run);
    }
    let req = request(
        rt,
        Operation::Delete,
        false,
        t.namespace.as_deref().unwrap_or_default(),
        "",
        dry_run,
        options.clone(),
    );
    app.admission.mutate(&req, None, None).await?;
    let doomed = app
        .store
        .http_delete_collection(rt, filter, propagation, true)?;
    let pre = Preconditions {
        propagation,
        ..Preconditions::default()
    };
    let mut deleted = Vec::new();
    for obj in doomed {
        let (obj_ns, name) = (meta::namespace(&obj), meta::name(&obj));
        let req = request(
            rt,
            Operation::Delete,
            false,
            obj_ns,
            name,
            dry_run,
            options.clone(),
        );
        let ns = (!obj_ns.is_empty()).then_some(obj_ns);
        match validated_delete(app, rt, ns, name, &pre, &req).await {
            Ok(o) => deleted.push(o),
            // Deleted meanwhile (by a cascade, or someone else): nothing left to do.
            Err(e) if e.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(deleted)
}

/// Preconditions checked by a dry run, validating webhooks with the object as `oldObject`,
/// then the deletion, pinned to the version the webhooks saw.
async fn validated_delete(
    app: &AppState,
    rt: &ResourceType,
    ns: Option<&str>,
    name: &str,
    pre: &Preconditions,
    req: &Request<'_>,
) -> Result<Value, ApiError> {
    let mut attempt = 0;
    loop {
        let old = app.store.http_delete(rt, ns, name, pre, true)?;
        app.admission.validate(req, None, Some(&old)).await?;
        if req.dry_run {
            return Ok(old);
        }
        let pinned = Preconditions {
            resource_version: pre
                .resource_version
                .clone()
                .or_else(|| Some(meta::resource_version(&old).to_string())),
            ..pre.clone()
        };
        match app.store.http_delete(rt, ns, name, &pinned, false) {
            Err(e) if pre.resource_version.is_none() && is_conflict(&e) && attempt < RETRIES => {
                attempt += 1;
            }
            result => return result,
        }
    }
}

// === Helpers ===

/// The admission attributes of a write. A Namespace's requests carry its own name as the
/// namespace, as the real server's handlers set it.
fn request<'a>(
    rt: &'a ResourceType,
    operation: Operation,
    status: bool,
    namespace: &str,
    name: &str,
    dry_run: bool,
    options: Value,
) -> Request<'a> {
    let namespace = if rt.group.is_empty() && rt.plural == "namespaces" {
        name
    } else if rt.namespaced {
        namespace
    } else {
        ""
    };
    Request {
        rt,
        operation,
        subresource: if status { "status" } else { "" },
        namespace: namespace.to_string(),
        name: name.to_string(),
        dry_run,
        options,
    }
}

async fn mutated(
    app: &AppState,
    req: &Request<'_>,
    obj: Value,
    old: Option<&Value>,
) -> Result<Value, ApiError> {
    app.admission
        .mutate(req, Some(obj), old)
        .await?
        .ok_or_else(|| ApiError::internal("admission left no object to write"))
}

fn dry(opts: &WriteOpts) -> WriteOpts {
    WriteOpts {
        dry_run: true,
        ..opts.clone()
    }
}

fn is_conflict(e: &ApiError) -> bool {
    e.code == 409 && e.reason == "Conflict"
}

/// `CreateOptions` / `UpdateOptions` (`meta.k8s.io/v1`) from the query, as webhooks get them.
pub(super) fn write_options(kind: &str, query: &Query) -> Value {
    let mut options = json!({"kind": kind, "apiVersion": "meta.k8s.io/v1"});
    if query.get("dryRun").is_some_and(|d| d == "All") {
        options["dryRun"] = json!(["All"]);
    }
    for key in ["fieldManager", "fieldValidation"] {
        if let Some(v) = query.get(key).filter(|v| !v.is_empty()) {
            options[key] = json!(v);
        }
    }
    options
}

/// `DeleteOptions` (`meta.k8s.io/v1`) from the body and the query.
pub(super) fn delete_options(query: &Query, body: &[u8]) -> Value {
    let mut options = serde_json::from_slice::<Value>(body)
        .ok()
        .filter(Value::is_object)
        .unwrap_or_else(|| json!({}));
    options["kind"] = json!("DeleteOptions");
    options["apiVersion"] = json!("meta.k8s.io/v1");
    if let Some(p) = query.get("propagationPolicy") {
        options["propagationPolicy"] = json!(p);
    }
    if query.get("dryRun").is_some_and(|d| d == "All") {
        options["dryRun"] = json!(["All"]);
    }
    options
}
