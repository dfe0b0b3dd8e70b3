//! The `services/proxy`, `pods/proxy` and `pods/portforward` subresources driven by kube-rs,
//! against a small HTTP server in the test that a Service (with Endpoints) and a Pod (with
//! `status.podIP: 127.0.0.1`) point at.

use std::net::SocketAddr;

use axum::Router;
use axum::body::Bytes;
use fsm_test_apiserver::RunningApiServer;
use http::{Method, StatusCode, Uri};
use http_body_util::BodyExt;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;

use crate::{api_status, server};

/// Answers `<tag> <METHOD> <path>[?<query>] body=<body>`: 418 on `/teapot`, 201 for POST,
/// else 200; every answer carries `x-upstream: <tag>`.
struct Upstream {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Upstream {
    async fn start(tag: &'static str) -> Upstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("addr");
        let app = Router::new().fallback(move |method: Method, uri: Uri, body: Bytes| async move {
            let code = if uri.path() == "/teapot" {
                StatusCode::IM_A_TEAPOT
            } else if method == Method::POST {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            let text = format!(
                "{tag} {method} {uri} body={}",
                String::from_utf8_lossy(&body)
            );
            (code, [("x-upstream", tag)], text)
        });
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Upstream { addr, task }
    }

    fn port(&self) -> u16 {
        self.addr.port()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A port nothing listens on.
async fn closed_port() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    l.local_addr().expect("addr").port()
}

/// Service `web` (port 80 named `http` → `targetPort: port`) with Endpoints at 127.0.0.1, and
/// pod `app` at 127.0.0.1 with container port `http` = `port`.
fn fixtures(server: &RunningApiServer, port: u16) {
    let store = server.store();
    store
        .apply(&json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"ports": [{"name": "http", "port": 80, "targetPort": port}]},
        }))
        .expect("service");
    store
        .apply(&json!({
            "apiVersion": "v1", "kind": "Endpoints",
            "metadata": {"name": "web", "namespace": "default"},
            "subsets": [{"addresses": [{"ip": "127.0.0.1"}], "ports": [{"name": "http", "port": port}]}],
        }))
        .expect("endpoints");
    store
        .apply(&json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "app", "namespace": "default"},
            "spec": {"containers": [{"name": "app", "image": "app",
                                     "ports": [{"name": "http", "containerPort": port}]}]},
            "status": {"podIP": "127.0.0.1", "phase": "Running"},
        }))
        .expect("pod");
}

/// A client that does not retry 503s (kube-rs retries 429/503/504 with backoff by default,
/// which would turn every expected 503 into a long wait).
fn no_retry_client(server: &RunningApiServer) -> kube::Client {
    let mut config = kube::Config::new(server.url().parse().expect("url"));
    config.default_retry = false;
    kube::Client::try_from(config).expect("client")
}

/// Sends a raw request through kube's client; (status, `x-upstream`, body).
async fn send(
    client: &kube::Client,
    method: Method,
    path: &str,
    body: &str,
) -> (StatusCode, Option<String>, String) {
    let request = http::Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "text/plain")
        .body(kube::client::Body::from(body.as_bytes().to_vec()))
        .expect("request");
    let response = client.send(request).await.expect("send");
    let status = response.status();
    let upstream = response
        .headers()
        .get("x-upstream")
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (
        status,
        upstream,
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

#[tokio::test]
async fn service_proxy_forwards_path_query_status_and_body() {
    let server = server().await;
    let upstream = Upstream::start("svc").await;
    fixtures(&server, upstream.port());
    let client = server.client();

    let base = "/api/v1/namespaces/default/services";
    // By port number, by port name, and with no port (the Service's only one).
    for id in ["web:80", "web:http", "web", "http:web:80"] {
        let (status, tag, body) = send(
            &client,
            Method::GET,
            &format!("{base}/{id}/proxy/hello/world?a=1&b=x%20y"),
            "",
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{id}: {body}");
        assert_eq!(tag.as_deref(), Some("svc"));
        assert_eq!(body, "svc GET /hello/world?a=1&b=x%20y body=", "{id}");
    }
    // No path after /proxy is the root; the upstream's own status comes back.
    let (_, _, body) = send(&client, Method::GET, &format!("{base}/web/proxy"), "").await;
    assert_eq!(body, "svc GET / body=");
    let (status, _, body) = send(
        &client,
        Method::GET,
        &format!("{base}/web/proxy/teapot"),
        "",
    )
    .await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::IM_A_TEAPOT, "svc GET /teapot body=")
    );

    // Bodies pass through, for every method.
    let (status, _, body) = send(
        &client,
        Method::POST,
        &format!("{base}/web:80/proxy/echo"),
        "ping",
    )
    .await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::CREATED, "svc POST /echo body=ping")
    );
    for method in [Method::PUT, Method::PATCH, Method::DELETE] {
        let (status, _, body) =
            send(&client, method.clone(), &format!("{base}/web/proxy/x"), "b").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, format!("svc {method} /x body=b"));
    }

    // kube's text helper sees the upstream's body.
    let text = client
        .request_text(
            http::Request::get(format!("{base}/web:http/proxy/text"))
                .body(Vec::new())
                .expect("request"),
        )
        .await
        .expect("request_text");
    assert_eq!(text, "svc GET /text body=");
}

#[tokio::test]
async fn service_proxy_errors_are_statuses() {
    let server = server().await;
    let upstream = Upstream::start("svc").await;
    fixtures(&server, upstream.port());
    let client = no_retry_client(&server);
    let get = |path: &str| {
        let client = client.clone();
        let req = http::Request::get(path.to_string())
            .body(Vec::new())
            .expect("request");
        async move { api_status(client.request_text(req).await.expect_err("an error")) }
    };

    let store = server.store();
    store
        .apply(&json!({"apiVersion": "v1", "kind": "Service",
                       "metadata": {"name": "lonely", "namespace": "default"},
                       "spec": {"ports": [{"port": 80}]}}))
        .expect("service");
    let s = get("/api/v1/namespaces/default/services/lonely/proxy/").await;
    assert_eq!((s.code, s.reason.as_str()), (503, "ServiceUnavailable"));
    assert_eq!(s.message, "no endpoints available for service \"lonely\"");

    let s = get("/api/v1/namespaces/default/services/nope:80/proxy/").await;
    assert_eq!((s.code, s.reason.as_str()), (404, "NotFound"));
    assert_eq!(s.message, "services \"nope\" not found");

    let s = get("/api/v1/namespaces/default/services/web:81/proxy/").await;
    assert_eq!(s.code, 503);
    assert_eq!(s.message, "no service port 81 found for service \"web\"");

    // An endpoint nobody listens on.
    let port = closed_port().await;
    store
        .apply(&json!({"apiVersion": "v1", "kind": "Service",
                       "metadata": {"name": "dead", "namespace": "default"},
                       "spec": {"ports": [{"port": 80, "targetPort": port}]}}))
        .expect("service");
    store
        .apply(&json!({"apiVersion": "v1", "kind": "Endpoints",
                       "metadata": {"name": "dead", "namespace": "default"},
                       "subsets": [{"addresses": [{"ip": "127.0.0.1"}], "ports": [{"port": port}]}]}))
        .expect("endpoints");
    let s = get("/api/v1/namespaces/default/services/dead/proxy/").await;
    assert_eq!((s.code, s.reason.as_str()), (503, "ServiceUnavailable"));
    assert_eq!(
        s.message,
        format!(
            "error trying to reach service: dial tcp 127.0.0.1:{port}: connect: connection refused"
        )
    );

    let s = get("/api/v1/namespaces/default/services/https:web:80/proxy/").await;
    assert_eq!(s.code, 400);
}

#[tokio::test]
async fn pod_proxy_by_number_and_named_port() {
    let server = server().await;
    let upstream = Upstream::start("pod").await;
    fixtures(&server, upstream.port());
    let client = no_retry_client(&server);
    let base = "/api/v1/namespaces/default/pods";
    let port = upstream.port();
    for id in [format!("app:{port}"), "app:http".into(), "app".into()] {
        let (status, tag, body) = send(
            &client,
            Method::GET,
            &format!("{base}/{id}/proxy/p?q=1"),
            "",
        )
        .await;
        assert_eq!(
            (status, tag.as_deref()),
            (StatusCode::OK, Some("pod")),
            "{id}: {body}"
        );
        assert_eq!(body, "pod GET /p?q=1 body=");
    }
    let (status, _, body) = send(
        &client,
        Method::POST,
        &format!("{base}/app:http/proxy/"),
        "hi",
    )
    .await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::CREATED, "pod POST / body=hi")
    );

    let get = |path: String| {
        let client = client.clone();
        let req = http::Request::get(path).body(Vec::new()).expect("request");
        async move { api_status(client.request_text(req).await.expect_err("an error")) }
    };
    let s = get(format!("{base}/ghost/proxy/")).await;
    assert_eq!(
        (s.code, s.message.as_str()),
        (404, "pods \"ghost\" not found")
    );
    server
        .store()
        .apply(&json!({"apiVersion": "v1", "kind": "Pod",
                       "metadata": {"name": "pending", "namespace": "default"},
                       "spec": {"containers": [{"name": "c", "image": "c"}]}}))
        .expect("pod");
    let s = get(format!("{base}/pending:80/proxy/")).await;
    assert_eq!((s.code, s.reason.as_str()), (503, "ServiceUnavailable"));
}

/// Writes one HTTP/1.1 request into a forwarded stream and reads the answer to its end.
async fn http_over<S>(mut stream: S, path: &str) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stream.read_to_end(&mut out),
    )
    .await
    .expect("the answer within 10s")
    .expect("read");
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn port_forward_carries_http() {
    let server = server().await;
    let upstream = Upstream::start("pf").await;
    fixtures(&server, upstream.port());
    let pods: Api<Pod> = Api::default_namespaced(server.client());

    let port = upstream.port();
    let mut forwarder = pods.portforward("app", &[port]).await.expect("portforward");
    let stream = forwarder.take_stream(port).expect("stream");
    let answer = http_over(stream, "/through?x=1").await;
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(answer.contains("x-upstream: pf"), "{answer}");
    assert!(answer.ends_with("pf GET /through?x=1 body="), "{answer}");
    // The upstream closed its connection, so the kubelet-like server ends the session.
    let error = forwarder.take_error(port).expect("error future").await;
    assert_eq!(error, None);
}

#[tokio::test]
async fn port_forward_two_ports_at_once() {
    let server = server().await;
    let one = Upstream::start("one").await;
    let two = Upstream::start("two").await;
    fixtures(&server, one.port());
    let pods: Api<Pod> = Api::default_namespaced(server.client());

    let mut forwarder = pods
        .portforward("app", &[one.port(), two.port()])
        .await
        .expect("portforward");
    let a = forwarder.take_stream(one.port()).expect("stream one");
    let b = forwarder.take_stream(two.port()).expect("stream two");
    let (a, b) = tokio::join!(http_over(a, "/a"), http_over(b, "/b"));
    assert!(a.ends_with("one GET /a body="), "{a}");
    assert!(b.ends_with("two GET /b body="), "{b}");
}

#[tokio::test]
async fn port_forward_reports_a_closed_port() {
    let server = server().await;
    let upstream = Upstream::start("pf").await;
    fixtures(&server, upstream.port());
    let pods: Api<Pod> = Api::default_namespaced(server.client());
    let uid = pods
        .get("app")
        .await
        .expect("pod")
        .metadata
        .uid
        .expect("uid");

    let closed = closed_port().await;
    let mut forwarder = pods
        .portforward("app", &[closed])
        .await
        .expect("portforward");
    let error = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        forwarder.take_error(closed).expect("error future"),
    )
    .await
    .expect("an error within 10s");
    assert_eq!(
        error.as_deref(),
        Some(
            format!(
                "error forwarding port {closed} to pod app, uid {uid}: dial tcp 127.0.0.1:{closed}: connect: connection refused"
            )
            .as_str()
        )
    );
    // The data stream ends with nothing in it.
    let mut stream = forwarder.take_stream(closed).expect("stream");
    let mut out = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stream.read_to_end(&mut out),
    )
    .await
    .expect("end within 10s")
    .expect("read");
    assert!(out.is_empty());

    // A pod that does not exist is an API error.
    let Err(err) = pods.portforward("ghost", &[80]).await else {
        panic!("port-forward to a missing pod succeeded");
    };
    assert_eq!(api_status(err).code, 404);
}
