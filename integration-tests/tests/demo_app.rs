//! The demo workload on its own: no controller, no sidecar.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use fsm_integration_tests::{free_port, http_get_via, start_demo_app, tcp_roundtrip};

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

#[tokio::test]
async fn answers_http_and_tcp_with_its_name() {
    let logs = tempfile::tempdir().expect("temp dir");
    let http = loopback(free_port().expect("free port"));
    let tcp = loopback(free_port().expect("free port"));
    let _app = start_demo_app("echo-1", &[http], &[tcp], logs.path())
        .await
        .expect("demo app starts");

    let reply = http_get_via(http, "httpbin.demo:14001", "/get?x=1")
        .await
        .expect("GET /get");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.served_by(), Some("echo-1"));
    let json = reply.json().expect("JSON body");
    assert_eq!(json["server"], "echo-1");
    assert_eq!(json["method"], "GET");
    assert_eq!(json["path"], "/get?x=1");
    assert_eq!(
        json["host"], "httpbin.demo:14001",
        "the Host header given by the client is what the app sees"
    );
    assert_eq!(json["headers"]["host"], "httpbin.demo:14001");

    let teapot = http_get_via(http, "anything", "/status/418")
        .await
        .expect("GET /status/418");
    assert_eq!(teapot.status, 418);
    assert_eq!(teapot.served_by(), Some("echo-1"));

    assert_eq!(
        tcp_roundtrip(tcp, "ping").await.expect("TCP round trip"),
        "echo-1: ping"
    );
    assert_eq!(
        tcp_roundtrip(tcp, "second connection")
            .await
            .expect("TCP round trip"),
        "echo-1: second connection"
    );
}

#[tokio::test]
async fn a_taken_address_fails_fast_with_the_log() {
    let logs = tempfile::tempdir().expect("temp dir");
    let taken = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    let addr = taken.local_addr().expect("addr");
    let started = tokio::time::Instant::now();
    let err = start_demo_app("clash", &[addr], &[], logs.path())
        .await
        .expect_err("address in use");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "should not wait for the full timeout"
    );
    let text = format!("{err:#}");
    assert!(
        text.contains("exited") && text.contains("binding HTTP"),
        "{text}"
    );
}
