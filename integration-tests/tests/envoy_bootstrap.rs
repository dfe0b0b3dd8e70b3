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

/// The bootstrap the injector gives an injected Envoy (ADS by DNS name, credentials and SDS files
/// at the pod's paths, the rewritten probes and the metrics listener) is one Envoy accepts.
#[tokio::test]
async fn envoy_accepts_the_injected_bootstrap() {
    use fsm_injector::envoy::{EnvoyBootstrap, envoy_bootstrap as injected_bootstrap};
    use fsm_injector::probes::{ProbeForward, Probes};
    let dir = tempfile::tempdir().expect("tempdir");
    let node_id = "6a1f3c2e-1b7d-4c1e-9a3f-0c5d2e8b7a10.sidecar.curl.demo";
    let credentials = dir.path().join("credentials");
    write_standalone_bootstrap(&credentials, node_id).expect("credentials");
    let sds = dir.path().join("sds");
    std::fs::create_dir_all(&sds).expect("sds dir");
    let forward = |listen_port, scheme: &str, path: Option<&str>| ProbeForward {
        listen_port,
        path: path.map(Into::into),
        scheme: scheme.into(),
        target_port: 14001,
        target_path: path.map(|_| "/healthz".into()),
        timeout_seconds: 1,
    };
    let probes = Probes {
        forwards: vec![
            forward(15901, "HTTP", Some("/fsm-liveness-probe")),
            forward(15901, "HTTP", Some("/fsm-liveness-probe/second")),
            forward(15903, "HTTPS", None),
        ],
        tcp: true,
    };
    let (credentials_dir, sds_dir) = (credentials.display().to_string(), sds.display().to_string());
    let files = injected_bootstrap(&EnvoyBootstrap {
        node_id,
        ads_address: "fsm-controller.fsm-system.svc.cluster.local:15128",
        ads_server_name: "fsm-controller.fsm-system.svc.cluster.local",
        credentials_dir: &credentials_dir,
        sds_dir: &sds_dir,
        admin_port: 15000,
        metrics_port: 15010,
        probes: &probes,
    });
    std::fs::write(sds.join("cert.yaml"), &files.sds_cert).expect("sds cert");
    std::fs::write(sds.join("ca.yaml"), &files.sds_ca).expect("sds ca");
    validate_bootstrap(&files.bootstrap)
        .await
        .unwrap_or_else(|err| panic!("{err:#}\n{}", files.bootstrap));
}
