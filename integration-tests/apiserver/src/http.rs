//! The HTTP face: path routing, query parameters, request bodies, and responses shaped like the
//! real API server's (including `Status` errors and list envelopes).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, State};
use axum::response::Response;
use http::{HeaderMap, Method, StatusCode, Uri, header};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::admission::Admission;
use crate::counters::{Counters, Verb};
use crate::discovery;
use crate::meta;
use crate::patch::PatchKind;
use crate::registry::ResourceType;
use crate::selector::{FieldSelector, LabelSelector};
use crate::status::{ApiError, FieldError};
use crate::store::{Filter, ListRequest, Preconditions, Propagation, Store, WriteOpts};
use crate::watch::{self as watching, WatchRequest};

mod portforward;
mod proxy;
mod writes;

/// The real server's request body limit.
const BODY_LIMIT: usize = 3 * 1024 * 1024;
/// Watches without `timeoutSeconds` end after this long (the real server picks 30–60 minutes).
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

// === Types ===

#[derive(Clone)]
pub(crate) struct AppState {
    pub store: Store,
    pub counters: Arc<Counters>,
    pub admission: Arc<Admission>,
    pub bookmark_interval: Duration,
    pub addr: SocketAddr,
    /// Changes when open watches must end (`close_watches`).
    pub epoch: watch::Receiver<u64>,
    /// Becomes true when this serving generation stops; watches started after that end at once.
    pub shutdown: watch::Receiver<bool>,
}

/// A resource request after routing.
struct Target {
    rt: Arc<ResourceType>,
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
}

type Query = HashMap<String, String>;

// === Router ===

pub(crate) fn router(state: AppState) -> Router {
    Router::new()
        .fallback(handle)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

async fn handle(State(app): State<AppState>, request: axum::extract::Request) -> Response {
    let (mut parts, body) = request.into_parts();
    // Taken before the body is read: `pods/portforward` answers 101 and keeps the connection.
    let upgrade = parts.extensions.remove::<hyper::upgrade::OnUpgrade>();
    let (method, uri, headers) = (parts.method, parts.uri, parts.headers);
    let body = match axum::body::to_bytes(body, BODY_LIMIT).await {
        Ok(b) => b,
        Err(_) => {
            return error_response(&ApiError::new(
                413,
                "RequestEntityTooLarge",
                format!("Request entity too large: limit is {BODY_LIMIT}"),
            ));
        }
    };
    let query: Query = uri
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let request = Incoming {
        method: &method,
        uri: &uri,
        headers: &headers,
        query: &query,
        body: &body,
    };
    let response = match dispatch(&app, &request, upgrade).await {
        Ok(r) => r,
        Err(e) => error_response(&e),
    };
    tracing::debug!(%method, %uri, status = response.status().as_u16(), "request");
    response
}

/// One request, parsed.
struct Incoming<'a> {
    method: &'a Method,
    uri: &'a Uri,
    headers: &'a HeaderMap,
    query: &'a Query,
    body: &'a [u8],
}

async fn dispatch(
    app: &AppState,
    request: &Incoming<'_>,
    upgrade: Option<hyper::upgrade::OnUpgrade>,
) -> Result<Response, ApiError> {
    let Incoming {
        method,
        uri,
        headers,
        query,
        body,
    } = *request;
    let segments: Vec<&str> = uri.path().split('/').filter(|s| !s.is_empty()).collect();
    let accept = header_str(headers, header::ACCEPT);
    let discovery_get = |doc: Option<Value>| -> Result<Response, ApiError> {
        if method != Method::GET {
            return Err(ApiError::method_not_allowed());
        }
        app.counters.record(Verb::Discovery, "");
        doc.map(|d| json_response(StatusCode::OK, &d))
            .ok_or_else(ApiError::no_route)
    };
    match segments.as_slice() {
        ["version"] => discovery_get(Some(discovery::version())),
        ["healthz" | "readyz" | "livez", ..] => Ok(text_response(StatusCode::OK, "ok")),
        ["api"] if discovery::wants_aggregated(accept) => {
            discovery_get(Some(discovery::aggregated(&app.store.registry(), true))).map(aggregated)
        }
        ["api"] => discovery_get(Some(discovery::core_versions(app.addr))),
        ["api", "v1"] => discovery_get(discovery::resource_list(&app.store.registry(), "", "v1")),
        ["apis"] if discovery::wants_aggregated(accept) => {
            discovery_get(Some(discovery::aggregated(&app.store.registry(), false))).map(aggregated)
        }
        ["apis"] => discovery_get(Some(discovery::group_list(&app.store.registry()))),
        ["apis", group] => discovery_get(discovery::group(&app.store.registry(), group)),
        ["apis", group, version] => discovery_get(discovery::resource_list(
            &app.store.registry(),
            group,
            version,
        )),
        [
            "api",
            "v1",
            "namespaces",
            ns,
            kind @ ("services" | "pods"),
            id,
            "proxy",
            ..,
        ] => {
            let kind = if *kind == "services" {
                proxy::Kind::Service
            } else {
                proxy::Kind::Pod
            };
            let rest = proxy_rest(uri.path(), &segments[..7]);
            proxy::serve(app, kind, method, uri, headers, body, ns, id, &rest).await
        }
        ["api", "v1", "namespaces", ns, "pods", name, "portforward"] => {
            portforward::serve(app, method, headers, uri.query(), upgrade, ns, name)
        }
        ["api", "v1", rest @ ..] => {
            let target = route(&app.store, "", "v1", rest)?;
            resource(app, method, headers, query, body, target).await
        }
        ["apis", group, version, rest @ ..] => {
            let target = route(&app.store, group, version, rest)?;
            resource(app, method, headers, query, body, target).await
        }
        _ => Err(ApiError::no_route()),
    }
}

/// The path after `…/proxy`, as sent (empty, or starting with `/`; trailing slashes kept).
fn proxy_rest(path: &str, head: &[&str]) -> String {
    let prefix = format!("/{}", head.join("/"));
    match path.strip_prefix(&prefix) {
        Some(rest) if rest.is_empty() || rest.starts_with('/') => rest.to_string(),
        // An unusual spelling of the prefix (doubled slashes): rebuild from the segments.
        _ => {
            let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
            let mut rest: String = segments[head.len().min(segments.len())..]
                .iter()
                .map(|s| format!("/{s}"))
                .collect();
            if path.ends_with('/') {
                rest.push('/');
            }
            rest
        }
    }
}

fn aggregated(mut r: Response) -> Response {
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static(discovery::AGGREGATED_CONTENT_TYPE),
    );
    r
}

/// Resolves `[namespaces/<ns>/]<plural>[/<name>[/status]]` under a group version.
fn route(store: &Store, group: &str, version: &str, rest: &[&str]) -> Result<Target, ApiError> {
    // `namespaces/<name>/status` is the namespace's own subresource, not a collection "status".
    let namespaced_path =
        rest.len() >= 3 && rest[0] == "namespaces" && !(rest.len() == 3 && rest[2] == "status");
    let (namespace, rest) = if namespaced_path {
        (Some(rest[1].to_string()), &rest[2..])
    } else {
        (None, rest)
    };
    let (plural, name, sub) = match rest {
        [p] => (*p, None, None),
        [p, n] => (*p, Some(n.to_string()), None),
        [p, n, s] => (*p, Some(n.to_string()), Some(*s)),
        _ => return Err(ApiError::no_route()),
    };
    let rt = store
        .resolve(group, version, plural)
        .ok_or_else(ApiError::no_route)?;
    let status = match sub {
        None => false,
        Some("status") if rt.status_subresource => true,
        Some(_) => return Err(ApiError::no_route()),
    };
    if rt.namespaced && namespace.is_none() && name.is_some() {
        return Err(ApiError::no_route());
    }
    if !rt.namespaced && namespace.is_some() {
        return Err(ApiError::no_route());
    }
    Ok(Target {
        rt,
        namespace,
        name,
        status,
    })
}

async fn resource(
    app: &AppState,
    method: &Method,
    headers: &HeaderMap,
    query: &Query,
    body: &[u8],
    t: Target,
) -> Result<Response, ApiError> {
    let plural = t.rt.plural.clone();
    let metadata_only = header_str(headers, header::ACCEPT).contains("as=PartialObjectMetadata");
    let watching = query.get("watch").is_some_and(|w| w == "true" || w == "1");
    let ns = t.namespace.as_deref();
    match (method.clone(), t.name.as_deref()) {
        (Method::GET, name) if watching => {
            app.counters.record(Verb::Watch, &plural);
            watch(app, &t, name, query, metadata_only)
        }
        (Method::GET, None) => {
            app.counters.record(Verb::List, &plural);
            list(app, &t, query, metadata_only)
        }
        (Method::GET, Some(name)) => {
            app.counters.record(Verb::Get, &plural);
            let obj = app.store.http_get(&t.rt, ns, name)?;
            Ok(json_response(
                StatusCode::OK,
                &t.rt.render(&obj, metadata_only),
            ))
        }
        (Method::POST, None) => {
            app.counters.record(Verb::Create, &plural);
            if t.rt.namespaced && ns.is_none() {
                return Err(ApiError::method_not_allowed());
            }
            let obj = parse_body(headers, body)?;
            let options = writes::write_options("CreateOptions", query);
            let created = writes::create(app, &t, obj, &write_opts(query, false), options).await?;
            Ok(json_response(StatusCode::CREATED, &created))
        }
        (Method::PUT, Some(name)) => {
            app.counters.record(Verb::Update, &plural);
            let obj = parse_body(headers, body)?;
            let options = writes::write_options("UpdateOptions", query);
            let opts = write_opts(query, t.status);
            let updated = writes::update(app, &t, name, obj, &opts, options).await?;
            Ok(json_response(StatusCode::OK, &updated))
        }
        (Method::PATCH, Some(name)) => {
            app.counters.record(Verb::Patch, &plural);
            let content_type = header_str(headers, header::CONTENT_TYPE);
            let kind = PatchKind::from_content_type(content_type)
                .ok_or_else(|| ApiError::unsupported_media_type(content_type))?;
            if kind == PatchKind::Apply && query.get("fieldManager").is_none_or(|m| m.is_empty()) {
                return Err(ApiError::invalid(
                    "meta.k8s.io",
                    "PatchOptions",
                    "",
                    &[FieldError::required(
                        "fieldManager",
                        "is required for apply patch",
                    )],
                ));
            }
            let opts = write_opts(query, t.status);
            let (obj, created) = writes::patch(app, &t, name, &kind, body, &opts, query).await?;
            let code = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            Ok(json_response(code, &obj))
        }
        (Method::DELETE, Some(name)) if !t.status => {
            app.counters.record(Verb::Delete, &plural);
            let (pre, dry_run) = delete_options(query, body)?;
            let options = writes::delete_options(query, body);
            let deleted = writes::delete(app, &t, name, &pre, dry_run, options).await?;
            if t.rt.return_deleted_object {
                Ok(json_response(StatusCode::OK, &deleted))
            } else {
                Ok(json_response(
                    StatusCode::OK,
                    &success_status(&t.rt, &deleted),
                ))
            }
        }
        (Method::DELETE, None) => {
            app.counters.record(Verb::DeleteCollection, &plural);
            let filter = filter(&t, query)?;
            let (pre, dry_run) = delete_options(query, body)?;
            let options = writes::delete_options(query, body);
            let deleted =
                writes::delete_collection(app, &t, &filter, pre.propagation, dry_run, options)
                    .await?;
            let list = json!({
                "kind": t.rt.list_kind,
                "apiVersion": t.rt.api_version(),
                "metadata": {"resourceVersion": app.store.resource_version().to_string()},
                "items": deleted,
            });
            Ok(json_response(StatusCode::OK, &list))
        }
        _ => Err(ApiError::method_not_allowed()),
    }
}

fn write_opts(query: &Query, status: bool) -> WriteOpts {
    WriteOpts {
        status,
        fixture: false,
        dry_run: query.get("dryRun").is_some_and(|d| d == "All"),
        strict: query.get("fieldValidation").is_some_and(|v| v == "Strict"),
        keep_identity: false,
    }
}

fn filter(t: &Target, query: &Query) -> Result<Filter, ApiError> {
    let labels = match query.get("labelSelector") {
        Some(s) => LabelSelector::parse(s).map_err(ApiError::bad_request)?,
        None => LabelSelector::default(),
    };
    let fields = match query.get("fieldSelector") {
        Some(s) => {
            FieldSelector::parse(s, |f| t.rt.supports_field(f)).map_err(ApiError::bad_request)?
        }
        None => FieldSelector::default(),
    };
    Ok(Filter {
        namespace: t.namespace.clone(),
        labels,
        fields,
    })
}

fn list(
    app: &AppState,
    t: &Target,
    query: &Query,
    metadata_only: bool,
) -> Result<Response, ApiError> {
    let filter = filter(t, query)?;
    let req = ListRequest {
        limit: match query.get("limit") {
            Some(l) => Some(
                l.parse::<usize>()
                    .map_err(|_| ApiError::bad_request(format!("invalid limit: {l}")))?,
            ),
            None => None,
        },
        continue_token: query.get("continue").filter(|c| !c.is_empty()).cloned(),
        resource_version: query.get("resourceVersion").cloned(),
        resource_version_match: query
            .get("resourceVersionMatch")
            .filter(|m| !m.is_empty())
            .cloned(),
    };
    check_list_options(&req)?;
    let page = app.store.http_list(&t.rt, &filter, &req)?;

    // Hand-written envelope so big lists are serialised once, straight from the stored objects.
    let (api_version, kind) = if metadata_only {
        (
            "meta.k8s.io/v1".to_string(),
            "PartialObjectMetadataList".to_string(),
        )
    } else {
        (t.rt.api_version(), t.rt.list_kind.clone())
    };
    let mut list_meta = json!({"resourceVersion": page.resource_version.to_string()});
    if let Some(c) = &page.continue_token {
        list_meta["continue"] = json!(c);
    }
    if let Some(n) = page.remaining {
        list_meta["remainingItemCount"] = json!(n);
    }
    let mut buf = Vec::with_capacity(256 + page.items.len() * 512);
    let head = json!({"kind": kind, "apiVersion": api_version, "metadata": list_meta}).to_string();
    buf.extend_from_slice(&head.as_bytes()[..head.len() - 1]);
    buf.extend_from_slice(b",\"items\":[");
    for (i, item) in page.items.iter().enumerate() {
        if i > 0 {
            buf.push(b',');
        }
        let rendered;
        let out: &Value = if metadata_only || t.rt.is_custom() {
            rendered = t.rt.render(item, metadata_only);
            &rendered
        } else {
            item
        };
        serde_json::to_writer(&mut buf, out).map_err(|e| ApiError::internal(e.to_string()))?;
    }
    buf.extend_from_slice(b"]}");
    Ok(bytes_response(StatusCode::OK, "application/json", buf))
}

/// The `resourceVersionMatch` rules of `ListOptions` validation.
fn check_list_options(req: &ListRequest) -> Result<(), ApiError> {
    let forbidden = |msg: &str| {
        ApiError::invalid(
            "meta.k8s.io",
            "ListOptions",
            "",
            &[FieldError::forbidden("resourceVersionMatch", msg)],
        )
    };
    let Some(m) = &req.resource_version_match else {
        return Ok(());
    };
    if req.continue_token.is_some() {
        return Err(forbidden(
            "resourceVersionMatch is forbidden when continue is provided",
        ));
    }
    let rv = req.resource_version.as_deref().unwrap_or_default();
    if rv.is_empty() {
        return Err(forbidden(
            "resourceVersionMatch is forbidden unless resourceVersion is provided",
        ));
    }
    match m.as_str() {
        "NotOlderThan" => Ok(()),
        "Exact" if rv == "0" => Err(forbidden(
            "resourceVersionMatch \"exact\" is forbidden for resourceVersion \"0\"",
        )),
        "Exact" => Ok(()),
        other => Err(ApiError::invalid(
            "meta.k8s.io",
            "ListOptions",
            "",
            &[FieldError::new(
                "resourceVersionMatch",
                crate::status::FieldErrorKind::NotSupported {
                    value: json!(other),
                    supported: vec![json!("Exact"), json!("NotOlderThan"), json!("")],
                },
            )],
        )),
    }
}

fn watch(
    app: &AppState,
    t: &Target,
    name: Option<&str>,
    query: &Query,
    metadata_only: bool,
) -> Result<Response, ApiError> {
    let mut filter = filter(t, query)?;
    if let Some(name) = name {
        // Watching one object is a watch on the collection narrowed by name.
        let escaped = name
            .replace('\\', "\\\\")
            .replace(',', "\\,")
            .replace('=', "\\=");
        let selector = match query.get("fieldSelector").filter(|s| !s.is_empty()) {
            Some(s) => format!("{s},metadata.name={escaped}"),
            None => format!("metadata.name={escaped}"),
        };
        filter.fields = FieldSelector::parse(&selector, |f| t.rt.supports_field(f))
            .map_err(ApiError::bad_request)?;
    }
    let flag = |k: &str| query.get(k).map(|v| v == "true" || v == "1");
    let send_initial = flag("sendInitialEvents");
    let bookmarks = flag("allowWatchBookmarks").unwrap_or(false);
    let rv_match = query.get("resourceVersionMatch").filter(|m| !m.is_empty());
    let forbidden = |field: &str, msg: &str| {
        ApiError::invalid(
            "meta.k8s.io",
            "ListOptions",
            "",
            &[FieldError::forbidden(field, msg)],
        )
    };
    match (send_initial, rv_match) {
        (Some(_), m) if m.map(String::as_str) != Some("NotOlderThan") => {
            return Err(forbidden(
                "resourceVersionMatch",
                "sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
            ));
        }
        (Some(_), _) if !bookmarks => {
            return Err(forbidden(
                "allowWatchBookmarks",
                "sendInitialEvents requires setting allowWatchBookmarks to true",
            ));
        }
        (None, Some(_)) => {
            return Err(forbidden(
                "resourceVersionMatch",
                "resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided",
            ));
        }
        _ => {}
    }
    let rv = query.get("resourceVersion").filter(|r| !r.is_empty());
    let start = match rv.map(String::as_str) {
        None | Some("0") => None,
        Some(s) => Some(
            s.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("invalid resource version: {s}")))?,
        ),
    };
    // Legacy semantics: no resourceVersion (or "0") means "current state, then changes".
    let initial_events = send_initial.unwrap_or(start.is_none());
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|s| *s > 0)
        .map_or(DEFAULT_WATCH_TIMEOUT, Duration::from_secs);
    let req = WatchRequest {
        rt: t.rt.clone(),
        filter,
        initial_events,
        initial_events_end: send_initial == Some(true),
        start,
        bookmarks,
        bookmark_interval: app.bookmark_interval,
        timeout,
        metadata_only,
    };
    Ok(watching::serve(
        app.store.clone(),
        req,
        app.epoch.clone(),
        app.shutdown.clone(),
    ))
}

fn delete_options(query: &Query, body: &[u8]) -> Result<(Preconditions, bool), ApiError> {
    let mut pre = Preconditions::default();
    let mut dry_run = query.get("dryRun").is_some_and(|d| d == "All");
    if let Some(policy) = query.get("propagationPolicy") {
        pre.propagation = Some(propagation(policy)?);
    }
    if !body.iter().all(u8::is_ascii_whitespace) {
        let opts: Value = serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("invalid DeleteOptions: {e}")))?;
        let s = |p: &str| opts.pointer(p).and_then(Value::as_str).map(String::from);
        pre.uid = s("/preconditions/uid");
        pre.resource_version = s("/preconditions/resourceVersion");
        if let Some(policy) = s("/propagationPolicy") {
            pre.propagation = Some(propagation(&policy)?);
        }
        if let Some(list) = opts.get("dryRun").and_then(Value::as_array) {
            dry_run |= list.iter().any(|v| v == "All");
        }
    }
    Ok((pre, dry_run))
}

fn propagation(policy: &str) -> Result<Propagation, ApiError> {
    match policy {
        "Background" => Ok(Propagation::Background),
        "Foreground" => Ok(Propagation::Foreground),
        "Orphan" => Ok(Propagation::Orphan),
        other => Err(ApiError::bad_request(format!(
            "propagationPolicy: Unsupported value: \"{other}\": supported values: \"Foreground\", \"Background\", \"Orphan\""
        ))),
    }
}

/// What DELETE answers for kinds whose registry does not return the object.
fn success_status(rt: &ResourceType, deleted: &Value) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": {
            "name": meta::name(deleted),
            "group": rt.group,
            "kind": rt.plural,
            "uid": meta::uid(deleted),
        },
    })
}

fn parse_body(headers: &HeaderMap, body: &[u8]) -> Result<Value, ApiError> {
    let content_type = header_str(headers, header::CONTENT_TYPE);
    let parsed = if content_type.contains("yaml") {
        serde_yaml_ng::from_slice::<Value>(body).map_err(|e| e.to_string())
    } else {
        serde_json::from_slice::<Value>(body).map_err(|e| e.to_string())
    };
    parsed.map_err(|e| {
        ApiError::bad_request(format!("couldn't get version/kind; json parse error: {e}"))
    })
}

fn header_str(headers: &HeaderMap, name: header::HeaderName) -> &str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

fn json_response(code: StatusCode, v: &Value) -> Response {
    let body = serde_json::to_vec(v).unwrap_or_default();
    bytes_response(code, "application/json", body)
}

fn text_response(code: StatusCode, text: &'static str) -> Response {
    bytes_response(code, "text/plain; charset=utf-8", text.as_bytes().to_vec())
}

fn bytes_response(code: StatusCode, content_type: &'static str, body: Vec<u8>) -> Response {
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    r
}

fn error_response(e: &ApiError) -> Response {
    let code = StatusCode::from_u16(e.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(code, &e.to_status())
}
