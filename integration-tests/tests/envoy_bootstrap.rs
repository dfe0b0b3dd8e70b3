//! The sidecar bootstrap against the real Envoy binary (`make envoy` installs it).

use std::path::Path;

use fsm_integration_tests::{
    AdsMode, SidecarConfig, bootstrap_secrets, envoy_bootstrap, validate_bootstrap,
    write_standalone_bootstrap,
};

fn config(ads_mode: AdsMode, bootstrap_root: &Path) -> SidecarConfig {
    let bootstrap_dir = bootstrap_root.join("demo/curl");
    write_standalone_bootstrap(
        &bootstrap_dir,
        "6a1f3c2e-1b7d-4c1e-9a3f-0c5d2e8b7a10.sidecar.curl.demo",
    )
    .expect("credentials");
    SidecarConfig {
        name: "demo-curl".into(),
        node_id: "6a1f3c2e-1b7d-4c1e-9a3f-0c5d2e8b7a10.sidecar.curl.demo".into(),
        node_cluster: "curl.demo".into(),
        admin: "127.0.10.10:15000".parse().expect("addr"),
        ads: "127.0.0.1:15128".parse().expect("addr"),
        ads_replicas: Vec::new(),
        ads_mode,
        bootstrap_dir,
    }
}

#[tokio::test]
async fn envoy_accepts_the_bootstrap_in_both_ads_modes() {
    let dir = tempfile::tempdir().expect("tempdir");
    for mode in [AdsMode::Sotw, AdsMode::Delta] {
        let config = config(mode, dir.path());
        for (name, yaml) in bootstrap_secrets(&config) {
            std::fs::write(dir.path().join(name), yaml).expect("sds file");
        }
        let yaml = envoy_bootstrap(&config, dir.path());
        assert!(
            yaml.contains("UpstreamTlsContext"),
            "ADS must be mTLS: {yaml}"
        );
        assert!(yaml.contains(mode.api_type()), "{yaml}");
        validate_bootstrap(&yaml)
            .await
            .unwrap_or_else(|err| panic!("{mode:?}: {err:#}"));
    }
}

#[tokio::test]
async fn envoy_rejects_a_broken_bootstrap() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(AdsMode::Sotw, dir.path());
    for (name, yaml) in bootstrap_secrets(&config) {
        std::fs::write(dir.path().join(name), yaml).expect("sds file");
    }
    let yaml = envoy_bootstrap(&config, dir.path()).replace("STATIC", "NOT_A_TYPE");
    validate_bootstrap(&yaml)
        .await
        .expect_err("invalid cluster type must be rejected");
}
