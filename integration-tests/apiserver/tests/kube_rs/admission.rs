//! Admission webhooks called like kube-apiserver calls them: a real HTTPS webhook server in the
//! test (certificate for `webhook.hooks.svc` from a test CA), reached through a Service and its
//! Endpoints, configured with Mutating/ValidatingWebhookConfigurations created through kube-rs.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::State;
use base64::Engine as _;
use fsm_test_apiserver::RunningApiServer;
use futures::StreamExt;
use http::Uri;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::core::v1::{ConfigMap, Endpoints, Namespace, Pod, Service};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams,
    PostParams, WatchEvent, WatchParams,
};
use parking_lot::Mutex;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use crate::{api_status, server};

const HOOK_NS: &str = "hooks";
const HOOK_SVC: &str = "webhook";
const INJECTED: &str = "fsm-injected";

// === The webhook server ===

/// (path, `request` of the AdmissionReview) of every review received.
type Seen = Arc<Mutex<Vec<(String, Value)>>>;

/// An HTTPS admission webhook. Paths: `/label` adds the label `fsm-injected: "true"` with a
/// JSON patch, `/invalid` adds an invalid label value, `/badtype` makes `spec.containers` a
/// string, `/deny` denies objects (new, or old on DELETE) labelled `deny=yes`, `/wrong-uid`
/// answers another uid, `/slow` answers after 3s; anything else allows.
struct WebhookServer {
    addr: SocketAddr,
    ca_pem: String,
    seen: Seen,
    task: JoinHandle<()>,
}

impl WebhookServer {
    async fn start() -> WebhookServer {
        let (ca_pem, config) = tls_material(&[&format!("{HOOK_SVC}.{HOOK_NS}.svc"), "localhost"]);
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind webhook");
        let addr = tcp.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let app = Router::new().fallback(review).with_state(seen.clone());
        let listener = TlsListener {
            tcp,
            acceptor: tokio_rustls::TlsAcceptor::from(config),
        };
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        WebhookServer {
            addr,
            ca_pem,
            seen,
            task,
        }
    }

    /// The `request`s of the reviews received on `path`, oldest first.
    fn requests(&self, path: &str) -> Vec<Value> {
        self.seen
            .lock()
            .iter()
            .filter(|(p, _)| p == path)
            .map(|(_, r)| r.clone())
            .collect()
    }
}

impl Drop for WebhookServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn review(State(seen): State<Seen>, uri: Uri, Json(review): Json<Value>) -> Json<Value> {
    let request = review["request"].clone();
    seen.lock().push((uri.path().to_string(), request.clone()));
    let mut response = json!({"uid": request["uid"], "allowed": true});
    let object = &request["object"];
    let patch =
        |patch: Value| json!(base64::engine::general_purpose::STANDARD.encode(patch.to_string()));
    match uri.path() {
        "/label" => {
            response["patchType"] = json!("JSONPatch");
            response["patch"] = patch(label_patch(object, "true"));
        }
        "/invalid" => {
            response["patchType"] = json!("JSONPatch");
            response["patch"] = patch(label_patch(object, "not valid!"));
        }
        "/badtype" => {
            response["patchType"] = json!("JSONPatch");
            response["patch"] =
                patch(json!([{"op": "replace", "path": "/spec/containers", "value": "nope"}]));
        }
        "/deny" => {
            let subject = if request["operation"] == "DELETE" {
                &request["oldObject"]
            } else {
                object
            };
            if subject.pointer("/metadata/labels/deny") == Some(&json!("yes")) {
                response["allowed"] = json!(false);
                response["status"] = json!({"code": 403, "reason": "Forbidden",
                    "message": "objects labelled deny=yes are not allowed"});
            }
        }
        "/wrong-uid" => response["uid"] = json!("not-the-request-uid"),
        "/slow" => tokio::time::sleep(Duration::from_secs(3)).await,
        _ => {}
    }
    Json(
        json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}),
    )
}

fn label_patch(object: &Value, value: &str) -> Value {
    if object
        .pointer("/metadata/labels")
        .is_some_and(Value::is_object)
    {
        json!([{"op": "add", "path": format!("/metadata/labels/{INJECTED}"), "value": value}])
    } else {
        json!([{"op": "add", "path": "/metadata/labels", "value": {INJECTED: value}}])
    }
}

/// A test CA, and a server config with a certificate for `names` signed by it.
fn tls_material(names: &[&str]) -> (String, Arc<rustls::ServerConfig>) {
    let ca_key = KeyPair::generate().expect("ca key");
    let ca = ca_params("admission-test-ca");
    let ca_pem = ca.self_signed(&ca_key).expect("ca cert").pem();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().expect("key");
    let mut leaf = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
        .expect("leaf params");
    leaf.distinguished_name.push(DnType::CommonName, names[0]);
    let cert = leaf.signed_by(&key, &issuer).expect("leaf cert");
    let key_der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocols")
    .with_no_client_auth()
    .with_single_cert(vec![cert.der().clone()], key_der)
    .expect("server config");
    (ca_pem, Arc::new(config))
}

fn ca_params(name: &str) -> CertificateParams {
    let mut ca = CertificateParams::default();
    ca.distinguished_name.push(DnType::CommonName, name);
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca
}

/// Another CA's certificate: a caBundle the webhook's certificate does not chain to.
fn unrelated_ca_pem() -> String {
    let key = KeyPair::generate().expect("key");
    ca_params("unrelated-ca")
        .self_signed(&key)
        .expect("ca")
        .pem()
}

/// TLS over a TCP listener for `axum::serve`; a failed handshake drops that connection only.
struct TlsListener {
    tcp: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.tcp.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let handshake = self.acceptor.accept(tcp);
            if let Ok(Ok(tls)) = tokio::time::timeout(Duration::from_secs(5), handshake).await {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

// === Fixture ===

/// The API server, the webhook server behind Service `hooks/webhook` (port 443 → the webhook's
/// port, Endpoints on 127.0.0.1), and namespaces `injected` (labelled `inject=yes`) and `plain`.
struct Fixture {
    server: RunningApiServer,
    hook: WebhookServer,
}

async fn fixture() -> Fixture {
    let server = server().await;
    let hook = WebhookServer::start().await;
    let client = server.client();
    for (name, labels) in [
        (HOOK_NS, json!({})),
        ("injected", json!({"inject": "yes"})),
        ("plain", json!({})),
    ] {
        let ns: Namespace = typed(json!({"metadata": {"name": name, "labels": labels}}));
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .expect("namespace");
    }
    service(&server, HOOK_SVC, Some(hook.addr.port())).await;
    Fixture { server, hook }
}

/// Service `hooks/<name>` on port 443 with targetPort `port`, and Endpoints on 127.0.0.1:`port`
/// (none when `port` is `None`).
async fn service(server: &RunningApiServer, name: &str, port: Option<u16>) {
    let client = server.client();
    let target = port.unwrap_or(8443);
    let svc: Service = typed(json!({
        "metadata": {"name": name, "namespace": HOOK_NS},
        "spec": {"ports": [{"name": "https", "port": 443, "targetPort": target}]},
    }));
    Api::<Service>::namespaced(client.clone(), HOOK_NS)
        .create(&PostParams::default(), &svc)
        .await
        .expect("service");
    if let Some(port) = port {
        let eps: Endpoints = typed(json!({
            "metadata": {"name": name, "namespace": HOOK_NS},
            "subsets": [{"addresses": [{"ip": "127.0.0.1"}], "ports": [{"name": "https", "port": port}]}],
        }));
        Api::<Endpoints>::namespaced(client, HOOK_NS)
            .create(&PostParams::default(), &eps)
            .await
            .expect("endpoints");
    }
}

fn typed<T: serde::de::DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).expect("typed object")
}

fn rule(operations: &[&str], group: &str, version: &str, resources: &[&str]) -> Value {
    json!({"operations": operations, "apiGroups": [group], "apiVersions": [version], "resources": resources})
}

/// A webhook on Service `hooks/<svc>` at `path`, trusting `ca_pem`.
fn hook_on(name: &str, svc: &str, path: &str, ca_pem: &str, rules: Value) -> Value {
    json!({
        "name": name,
        "admissionReviewVersions": ["v1"],
        "sideEffects": "None",
        "clientConfig": {
            "service": {"namespace": HOOK_NS, "name": svc, "path": path},
            "caBundle": base64::engine::general_purpose::STANDARD.encode(ca_pem),
        },
        "rules": rules,
    })
}

impl Fixture {
    fn hook(&self, name: &str, path: &str, rules: Value) -> Value {
        hook_on(name, HOOK_SVC, path, &self.hook.ca_pem, rules)
    }

    async fn mutating(&self, name: &str, webhooks: Vec<Value>) {
        let config: MutatingWebhookConfiguration =
            typed(json!({"metadata": {"name": name}, "webhooks": webhooks}));
        Api::<MutatingWebhookConfiguration>::all(self.server.client())
            .create(&PostParams::default(), &config)
            .await
            .expect("create MutatingWebhookConfiguration");
    }

    async fn validating(&self, name: &str, webhooks: Vec<Value>) {
        let config: ValidatingWebhookConfiguration =
            typed(json!({"metadata": {"name": name}, "webhooks": webhooks}));
        Api::<ValidatingWebhookConfiguration>::all(self.server.client())
            .create(&PostParams::default(), &config)
            .await
            .expect("create ValidatingWebhookConfiguration");
    }

    fn pods(&self, ns: &str) -> Api<Pod> {
        Api::namespaced(self.server.client(), ns)
    }

    fn config_maps(&self, ns: &str) -> Api<ConfigMap> {
        Api::namespaced(self.server.client(), ns)
    }
}

fn pod(name: &str, labels: Value) -> Pod {
    typed(json!({
        "metadata": {"name": name, "labels": labels},
        "spec": {"containers": [{"name": "app", "image": "nginx"}]},
    }))
}

fn config_map(name: &str, labels: Value, value: &str) -> ConfigMap {
    typed(json!({"metadata": {"name": name, "labels": labels}, "data": {"k": value}}))
}

fn label<K: kube::Resource>(obj: &K, key: &str) -> Option<String> {
    obj.meta().labels.as_ref()?.get(key).cloned()
}

// === Tests ===

#[tokio::test]
async fn mutating_webhook_patches_pods_in_selected_namespaces() {
    let f = fixture().await;
    let mut inject = f.hook(
        "inject.flomesh.io",
        "/label",
        json!([rule(&["CREATE"], "", "v1", &["pods"])]),
    );
    inject["namespaceSelector"] = json!({"matchLabels": {"inject": "yes"}});
    inject["objectSelector"] =
        json!({"matchExpressions": [{"key": "skip-injection", "operator": "DoesNotExist"}]});
    f.mutating("fsm-injector", vec![inject]).await;
    let calls = || f.server.admission_calls("inject.flomesh.io");

    let pods = f.pods("injected");
    let rv = pods
        .list(&Default::default())
        .await
        .expect("list")
        .metadata
        .resource_version
        .expect("rv");
    let mut events = pods
        .watch(&WatchParams::default().timeout(10), &rv)
        .await
        .expect("watch")
        .boxed();

    // A pod in a namespace labelled inject=yes comes back patched, and is stored patched.
    let created = pods
        .create(&PostParams::default(), &pod("a", json!({"app": "web"})))
        .await
        .expect("create");
    assert_eq!(label(&created, INJECTED).as_deref(), Some("true"));
    assert_eq!(label(&created, "app").as_deref(), Some("web"));
    let read = pods.get("a").await.expect("get");
    assert_eq!(label(&read, INJECTED).as_deref(), Some("true"));
    let stored: Pod = f
        .server
        .store()
        .get_as(Some("injected"), "a")
        .expect("stored");
    assert_eq!(label(&stored, INJECTED).as_deref(), Some("true"));
    let added = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(event) = events.next().await {
            if let Ok(WatchEvent::Added(p)) = event {
                return p;
            }
        }
        panic!("watch ended without ADDED");
    })
    .await
    .expect("ADDED event");
    assert_eq!(label(&added, INJECTED).as_deref(), Some("true"));
    assert_eq!(calls(), 1);

    let requests = f.hook.requests("/label");
    let request = &requests[0];
    assert_eq!(request["operation"], "CREATE");
    assert_eq!(request["name"], "a");
    assert_eq!(request["namespace"], "injected");
    assert_eq!(
        request["kind"],
        json!({"group": "", "version": "v1", "kind": "Pod"})
    );
    assert_eq!(
        request["resource"],
        json!({"group": "", "version": "v1", "resource": "pods"})
    );
    assert_eq!(request["requestKind"], request["kind"]);
    assert_eq!(request["userInfo"]["username"], "system:admin");
    assert_eq!(request["object"]["metadata"]["labels"]["app"], "web");
    assert_eq!(request["object"]["spec"]["containers"][0]["image"], "nginx");
    assert_eq!(request["oldObject"], Value::Null);
    assert_eq!(request["dryRun"], false);
    assert_eq!(request["options"]["kind"], "CreateOptions");
    assert!(
        request["uid"].as_str().is_some_and(|u| !u.is_empty()),
        "fresh uid"
    );

    // A namespace without the label: the webhook is not called.
    let plain = f
        .pods("plain")
        .create(&PostParams::default(), &pod("b", json!({})))
        .await
        .expect("create in plain");
    assert_eq!(label(&plain, INJECTED), None);
    assert_eq!(calls(), 1);

    // The objectSelector excludes.
    let skipped = pods
        .create(
            &PostParams::default(),
            &pod("c", json!({"skip-injection": "true"})),
        )
        .await
        .expect("create skipped");
    assert_eq!(label(&skipped, INJECTED), None);
    assert_eq!(calls(), 1);

    // generateName: the request carries no name; the stored pod has a generated one.
    let mut generated = pod("", json!({}));
    generated.metadata.name = None;
    generated.metadata.generate_name = Some("gen-".into());
    let generated = pods
        .create(&PostParams::default(), &generated)
        .await
        .expect("create generated");
    let name = generated.metadata.name.clone().expect("generated name");
    assert!(name.starts_with("gen-") && name.len() > 4, "{name}");
    assert_eq!(label(&generated, INJECTED).as_deref(), Some("true"));
    let request = &f.hook.requests("/label")[1];
    assert_eq!(request["name"].as_str().unwrap_or_default(), "");
    assert_eq!(request["object"]["metadata"]["generateName"], "gen-");

    // dryRun: the webhook is told, nothing is stored.
    let dry = pods
        .create(
            &PostParams {
                dry_run: true,
                ..PostParams::default()
            },
            &pod("d", json!({})),
        )
        .await
        .expect("dry run");
    assert_eq!(label(&dry, INJECTED).as_deref(), Some("true"));
    assert_eq!(f.hook.requests("/label")[2]["dryRun"], true);
    assert!(pods.get_opt("d").await.expect("get").is_none());
    assert_eq!(calls(), 3);

    // In-process fixture loads are not admitted.
    f.server
        .store()
        .create(&json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "fixture", "namespace": "injected"},
            "spec": {"containers": [{"name": "app", "image": "nginx"}]}}))
        .expect("fixture");
    assert_eq!(calls(), 3);
}

#[tokio::test]
async fn validating_webhooks_see_the_mutated_object_and_deny_with_their_message() {
    let f = fixture().await;
    f.mutating(
        "label",
        vec![f.hook(
            "label.flomesh.io",
            "/label",
            json!([rule(&["CREATE"], "", "v1", &["configmaps"])]),
        )],
    )
    .await;
    f.validating(
        "checks",
        vec![
            f.hook(
                "record.flomesh.io",
                "/allow",
                json!([rule(&["*"], "", "v1", &["configmaps"])]),
            ),
            f.hook(
                "deny.flomesh.io",
                "/deny",
                json!([rule(&["CREATE"], "*", "*", &["*"])]),
            ),
        ],
    )
    .await;
    let cms = f.config_maps("plain");

    let ok = cms
        .create(&PostParams::default(), &config_map("ok", json!({}), "v"))
        .await
        .expect("allowed");
    let recorded = &f.hook.requests("/allow")[0];
    assert_eq!(recorded["object"]["metadata"]["labels"][INJECTED], "true");
    // The validating webhook saw exactly what was stored (generated fields included).
    assert_eq!(
        recorded["object"]["metadata"]["uid"].as_str(),
        ok.metadata.uid.as_deref()
    );

    let status = api_status(
        cms.create(
            &PostParams::default(),
            &config_map("bad", json!({"deny": "yes"}), "v"),
        )
        .await
        .expect_err("denied"),
    );
    assert_eq!((status.code, status.reason.as_str()), (403, "Forbidden"));
    assert_eq!(
        status.message,
        "admission webhook \"deny.flomesh.io\" denied the request: objects labelled deny=yes are not allowed"
    );
    assert!(cms.get_opt("bad").await.expect("get").is_none());

    // Cluster-scoped objects too; a Namespace's request names it as its namespace.
    let ns: Namespace = typed(json!({"metadata": {"name": "nope", "labels": {"deny": "yes"}}}));
    let status = api_status(
        Api::<Namespace>::all(f.server.client())
            .create(&PostParams::default(), &ns)
            .await
            .expect_err("namespace denied"),
    );
    assert_eq!(status.code, 403);
    let last = f.hook.requests("/deny").pop().expect("deny called");
    assert_eq!(
        (last["name"].as_str(), last["namespace"].as_str()),
        (Some("nope"), Some("nope"))
    );
}

#[tokio::test]
async fn updates_and_deletes_carry_the_old_object() {
    let f = fixture().await;
    f.validating(
        "checks",
        vec![
            f.hook(
                "record.flomesh.io",
                "/allow",
                json!([rule(&["UPDATE"], "", "v1", &["configmaps"])]),
            ),
            f.hook(
                "deny.flomesh.io",
                "/deny",
                json!([rule(&["DELETE"], "", "v1", &["configmaps"])]),
            ),
        ],
    )
    .await;
    let cms = f.config_maps("plain");
    cms.create(&PostParams::default(), &config_map("x", json!({}), "v"))
        .await
        .expect("create");
    assert!(
        f.hook.requests("/allow").is_empty(),
        "CREATE is not in the rules"
    );

    // PUT
    let mut current = cms.get("x").await.expect("get");
    current.data = Some([("k".to_string(), "w".to_string())].into());
    cms.replace("x", &PostParams::default(), &current)
        .await
        .expect("replace");
    let update = &f.hook.requests("/allow")[0];
    assert_eq!(update["operation"], "UPDATE");
    assert_eq!(update["name"], "x");
    assert_eq!(update["oldObject"]["data"]["k"], "v");
    assert_eq!(update["object"]["data"]["k"], "w");
    assert_eq!(update["options"]["kind"], "UpdateOptions");

    // PATCH
    cms.patch(
        "x",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"k": "patched"}})),
    )
    .await
    .expect("patch");
    let update = &f.hook.requests("/allow")[1];
    assert_eq!(update["oldObject"]["data"]["k"], "w");
    assert_eq!(update["object"]["data"]["k"], "patched");

    // DELETE: validating webhooks get the object as oldObject.
    cms.create(
        &PostParams::default(),
        &config_map("keep", json!({"deny": "yes"}), "v"),
    )
    .await
    .expect("create keep");
    let status = api_status(
        cms.delete("keep", &DeleteParams::default())
            .await
            .expect_err("delete denied"),
    );
    assert_eq!(status.code, 403);
    assert_eq!(
        status.message,
        "admission webhook \"deny.flomesh.io\" denied the request: objects labelled deny=yes are not allowed"
    );
    assert!(cms.get_opt("keep").await.expect("get").is_some());
    let delete = &f.hook.requests("/deny")[0];
    assert_eq!(delete["operation"], "DELETE");
    assert_eq!(delete["name"], "keep");
    assert_eq!(delete["object"], Value::Null);
    assert_eq!(delete["oldObject"]["metadata"]["name"], "keep");
    assert_eq!(delete["options"]["kind"], "DeleteOptions");

    cms.delete("x", &DeleteParams::default())
        .await
        .expect("delete allowed");
    assert!(cms.get_opt("x").await.expect("get").is_none());
    assert_eq!(f.server.admission_calls("deny.flomesh.io"), 2);
}

#[tokio::test]
async fn failed_calls_follow_the_failure_policy() {
    let f = fixture().await;
    // A service whose endpoint refuses connections, and one without endpoints.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let closed_port = closed.local_addr().expect("addr").port();
    drop(closed);
    service(&f.server, "gone", Some(closed_port)).await;
    service(&f.server, "empty", None).await;

    let cm_rule = || json!([rule(&["CREATE"], "", "v1", &["configmaps"])]);
    let case = |mut hook: Value, case: &str| {
        hook["objectSelector"] = json!({"matchLabels": {"case": case}});
        hook
    };
    let mut ignore = case(
        hook_on(
            "ignore.flomesh.io",
            "gone",
            "/label",
            &f.hook.ca_pem,
            cm_rule(),
        ),
        "ignore",
    );
    ignore["failurePolicy"] = json!("Ignore");
    let mut slow = case(f.hook("slow.flomesh.io", "/slow", cm_rule()), "slow");
    slow["timeoutSeconds"] = json!(1);
    f.validating(
        "failing",
        vec![
            case(
                hook_on(
                    "fail.flomesh.io",
                    "gone",
                    "/label",
                    &f.hook.ca_pem,
                    cm_rule(),
                ),
                "fail",
            ),
            ignore,
            case(
                hook_on("empty.flomesh.io", "empty", "/", &f.hook.ca_pem, cm_rule()),
                "empty",
            ),
            case(
                hook_on(
                    "badca.flomesh.io",
                    HOOK_SVC,
                    "/badca",
                    &unrelated_ca_pem(),
                    cm_rule(),
                ),
                "badca",
            ),
            case(
                f.hook("baduid.flomesh.io", "/wrong-uid", cm_rule()),
                "baduid",
            ),
            slow,
        ],
    )
    .await;
    let cms = f.config_maps("plain");
    let failure = |case: &'static str| {
        let cms = cms.clone();
        async move {
            let err = cms
                .create(
                    &PostParams::default(),
                    &config_map(case, json!({"case": case}), "v"),
                )
                .await
                .expect_err(case);
            let status = api_status(err);
            assert_eq!(
                (status.code, status.reason.as_str()),
                (500, "InternalError"),
                "{case}"
            );
            assert!(cms.get_opt(case).await.expect("get").is_none());
            status.message
        }
    };

    assert_eq!(
        failure("fail").await,
        format!(
            "Internal error occurred: failed calling webhook \"fail.flomesh.io\": failed to call webhook: \
             Post \"https://gone.hooks.svc:443/label?timeout=10s\": dial tcp 127.0.0.1:{closed_port}: connect: connection refused"
        )
    );
    cms.create(
        &PostParams::default(),
        &config_map("ignore", json!({"case": "ignore"}), "v"),
    )
    .await
    .expect("Ignore lets the request through");
    assert_eq!(f.server.admission_calls("ignore.flomesh.io"), 1);

    let message = failure("empty").await;
    assert!(
        message.ends_with("no endpoints available for service \"empty\""),
        "{message}"
    );
    let message = failure("badca").await;
    assert!(
        message.starts_with(
            "Internal error occurred: failed calling webhook \"badca.flomesh.io\": failed to call webhook: \
             Post \"https://webhook.hooks.svc:443/badca?timeout=10s\": tls: failed to verify certificate"
        ),
        "{message}"
    );
    assert!(
        f.hook.requests("/badca").is_empty(),
        "no request over an untrusted connection"
    );
    let message = failure("baduid").await;
    assert!(
        message.contains("received invalid webhook response: expected response.uid="),
        "{message}"
    );
    let message = failure("slow").await;
    assert!(
        message.ends_with(
            "Post \"https://webhook.hooks.svc:443/slow?timeout=1s\": context deadline exceeded"
        ),
        "{message}"
    );
}

#[tokio::test]
async fn a_patch_that_breaks_the_object_fails_the_request() {
    let f = fixture().await;
    let pods_rule = || json!([rule(&["CREATE"], "", "v1", &["pods"])]);
    let mut invalid = f.hook("invalid.flomesh.io", "/invalid", pods_rule());
    invalid["objectSelector"] = json!({"matchLabels": {"case": "invalid"}});
    let mut badtype = f.hook("badtype.flomesh.io", "/badtype", pods_rule());
    badtype["objectSelector"] = json!({"matchLabels": {"case": "badtype"}});
    f.mutating("breakers", vec![invalid, badtype]).await;
    let pods = f.pods("plain");

    let status = api_status(
        pods.create(
            &PostParams::default(),
            &pod("p", json!({"case": "invalid"})),
        )
        .await
        .expect_err("invalid label"),
    );
    assert_eq!((status.code, status.reason.as_str()), (422, "Invalid"));
    assert!(
        status.message.starts_with(
            "Pod \"p\" is invalid: metadata.labels.fsm-injected: Invalid value: \"not valid!\""
        ),
        "{}",
        status.message
    );
    assert!(pods.get_opt("p").await.expect("get").is_none());

    let status = api_status(
        pods.create(
            &PostParams::default(),
            &pod("q", json!({"case": "badtype"})),
        )
        .await
        .expect_err("wrong type"),
    );
    assert_eq!(
        (status.code, status.reason.as_str()),
        (500, "InternalError")
    );
    assert!(
        status.message.starts_with(
            "Internal error occurred: Pod in version \"v1\" cannot be handled as a Pod"
        ),
        "{}",
        status.message
    );
}

#[tokio::test]
async fn custom_and_cluster_scoped_resources_go_through_url_webhooks() {
    let f = fixture().await;
    let mut widgets_hook = f.hook(
        "widgets.flomesh.io",
        "/",
        json!([rule(&["CREATE"], "example.io", "v1", &["widgets"])]),
    );
    // A url clientConfig (certificate for localhost); a namespaceSelector never excludes a
    // cluster-scoped object that is not a namespace.
    widgets_hook["clientConfig"] = json!({
        "url": format!("https://localhost:{}/label", f.hook.addr.port()),
        "caBundle": base64::engine::general_purpose::STANDARD.encode(&f.hook.ca_pem),
    });
    widgets_hook["namespaceSelector"] = json!({"matchLabels": {"inject": "yes"}});
    widgets_hook["rules"][0]["scope"] = json!("Cluster");
    f.mutating("widgets", vec![widgets_hook]).await;

    let gvk = GroupVersionKind::gvk("example.io", "v1", "Widget");
    let widgets: Api<DynamicObject> =
        Api::all_with(f.server.client(), &ApiResource::from_gvk(&gvk));
    let widget: DynamicObject = typed(json!({"apiVersion": "example.io/v1", "kind": "Widget",
        "metadata": {"name": "w1"}, "spec": {"size": 2}}));
    let created = widgets
        .create(&PostParams::default(), &widget)
        .await
        .expect("create widget");
    assert_eq!(label(&created, INJECTED).as_deref(), Some("true"));
    let request = &f.hook.requests("/label")[0];
    assert_eq!(
        request["kind"],
        json!({"group": "example.io", "version": "v1", "kind": "Widget"})
    );
    assert!(request.get("namespace").is_none_or(|n| n == ""));
}

#[tokio::test]
async fn webhook_configurations_are_served_and_validated() {
    let f = fixture().await;
    let client = f.server.client();
    let resources = client
        .list_api_group_resources("admissionregistration.k8s.io/v1")
        .await
        .expect("discovery");
    let names: Vec<&str> = resources
        .resources
        .iter()
        .map(|r| r.name.as_str())
        .collect();
    assert!(
        names.contains(&"mutatingwebhookconfigurations"),
        "{names:?}"
    );
    assert!(
        names.contains(&"validatingwebhookconfigurations"),
        "{names:?}"
    );

    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let bad: MutatingWebhookConfiguration = typed(json!({
        "metadata": {"name": "bad"},
        "webhooks": [{"name": "inject", "admissionReviewVersions": ["v1"],
                      "clientConfig": {}}],
    }));
    let status = api_status(
        api.create(&PostParams::default(), &bad)
            .await
            .expect_err("invalid"),
    );
    assert_eq!((status.code, status.reason.as_str()), (422, "Invalid"));
    assert!(
        status.message.starts_with(
            "MutatingWebhookConfiguration.admissionregistration.k8s.io \"bad\" is invalid: \
             [webhooks[0].name: Invalid value: \"inject\": should be a domain with at least three segments separated by dots"
        ),
        "{}",
        status.message
    );
    let fields: Vec<String> = status
        .details
        .expect("details")
        .causes
        .into_iter()
        .map(|c| c.field)
        .collect();
    assert_eq!(
        fields,
        vec![
            "webhooks[0].name",
            "webhooks[0].sideEffects",
            "webhooks[0].clientConfig"
        ]
    );

    // Defaults are filled in, and configurations are exempt from webhooks themselves.
    f.validating(
        "deny-all",
        vec![f.hook(
            "deny.flomesh.io",
            "/deny",
            json!([rule(&["*"], "*", "*", &["*"])]),
        )],
    )
    .await;
    let good: MutatingWebhookConfiguration = typed(json!({
        "metadata": {"name": "good", "labels": {"deny": "yes"}},
        "webhooks": [f.hook("inject.flomesh.io", "/label", json!([rule(&["CREATE"], "", "v1", &["pods"])]))],
    }));
    let created = api
        .create(&PostParams::default(), &good)
        .await
        .expect("valid configuration");
    let hook = &created.webhooks.expect("webhooks")[0];
    assert_eq!(hook.failure_policy.as_deref(), Some("Fail"));
    assert_eq!(hook.timeout_seconds, Some(10));
    assert_eq!(hook.reinvocation_policy.as_deref(), Some("Never"));
    assert_eq!(
        hook.client_config.service.as_ref().and_then(|s| s.port),
        Some(443)
    );
    assert_eq!(f.server.admission_calls("deny.flomesh.io"), 0);
    let listed = Api::<ValidatingWebhookConfiguration>::all(client)
        .list(&Default::default())
        .await
        .expect("list");
    assert_eq!(listed.items.len(), 1);
}
