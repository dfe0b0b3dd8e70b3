//! A real Envoy started by the harness, before any control plane exists.

use std::net::{Ipv4Addr, SocketAddr};

use fsm_integration_tests::{
    AdsMode, SidecarConfig, free_port, start_envoy, write_standalone_bootstrap,
};

#[tokio::test]
async fn sidecar_starts_with_fsm_identity_and_waits_for_ads() {
    let logs = tempfile::tempdir().expect("temp dir");
    let bootstrap_dir = logs.path().join("bootstrap/demo/lonely");
    write_standalone_bootstrap(
        &bootstrap_dir,
        "6a1f3c2e-1b7d-4c1e-9a3f-0c5d2e8b7a10.sidecar.curl.demo",
    )
    .expect("credentials");
    let config = SidecarConfig {
        name: "lonely".into(),
        node_id: "u-1.sidecar.curl.demo".into(),
        node_cluster: "curl.demo".into(),
        admin: SocketAddr::from((Ipv4Addr::LOCALHOST, free_port().expect("free port"))),
        // Nothing listens here: the sidecar must come up anyway and keep waiting for config.
        ads: SocketAddr::from((Ipv4Addr::LOCALHOST, free_port().expect("free port"))),
        ads_replicas: Vec::new(),
        ads_mode: AdsMode::Delta,
        bootstrap_dir,
    };
    let envoy = start_envoy(&config, logs.path())
        .await
        .expect("envoy starts");

    let info: serde_json::Value =
        serde_json::from_str(&envoy.admin_get("/server_info").await.expect("server_info"))
            .expect("JSON");
    assert_eq!(info["node"]["id"], "u-1.sidecar.curl.demo");
    assert_eq!(info["node"]["cluster"], "curl.demo");
    let version = info["version"].as_str().unwrap_or_default();
    assert!(
        version.contains("/1.40."),
        "tests expect Envoy 1.40, got {version}"
    );

    let ready = envoy
        .admin_get("/ready")
        .await
        .expect_err("not ready without a control plane");
    assert!(format!("{ready:#}").contains("503"), "{ready:#}");
}
