//! Every Envoy adapter golden case (`adapters/envoy/testdata/*/in.yaml`, a proxy's IR) translated
//! with real credentials and handed to the real Envoy binary as one static bootstrap
//! ([`fsm_adapter_envoy::bootstrap::static_bootstrap`], what `fsm translate -o bootstrap` prints):
//! `envoy --mode validate` must accept it. The goldens pin what the adapter writes; this proves
//! Envoy takes it (field constraints, extension types, regexes), which the Rust types cannot.
//! (Envoy 1.40's validate mode crashes on secrets named through SDS over ADS; the static
//! bootstrap names them statically, which also validates their contents.)

use std::path::Path;

use fsm_integration_tests::validate_bootstrap_file;
use prost::Message;

/// Real PEM credentials (the goldens' placeholders are not parseable).
fn credentials() -> fsm_ir::ProxyCredentials {
    let ca = fsm_certs::tresor::CertificateAuthority::generate_root(
        "fsm-test-root",
        std::time::Duration::from_secs(3600),
    )
    .expect("root");
    let cert = ca
        .issue(&fsm_certs::CertificateRequest::new(
            "httpbin.app.cluster.local",
            std::time::Duration::from_secs(3600),
        ))
        .expect("certificate");
    fsm_ir::ProxyCredentials {
        cert_chain_pem: cert.cert_chain_pem.clone(),
        private_key_pem: cert.private_key.expose_pem().to_owned(),
        trust_bundle_pem: cert.trust_bundle_pem.clone(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_accepts_every_adapter_golden() {
    let testdata = Path::new(env!("CARGO_MANIFEST_DIR")).join("../adapters/envoy/testdata");
    let credentials = credentials();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cases: Vec<_> = std::fs::read_dir(&testdata)
        .expect("testdata")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.join("in.yaml").exists())
        .collect();
    cases.sort();
    assert!(cases.len() >= 10, "found only {} cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let name = case.file_name().unwrap_or_default().to_string_lossy();
        let input = std::fs::read_to_string(case.join("in.yaml")).expect("in.yaml");
        let ir: fsm_ir::ProxyIr = serde_yaml_ng::from_str(&input).expect("ProxyIr");
        let out = fsm_adapter_envoy::translate(&ir, &credentials).expect("translates");
        let path = dir.path().join(format!("{name}.pb"));
        let bootstrap = fsm_adapter_envoy::bootstrap::static_bootstrap(
            &format!("{}.sidecar.validate.test", ir.proxy.uuid),
            "validate.test",
            &out,
        )
        .expect("static bootstrap");
        std::fs::write(&path, bootstrap.encode_to_vec()).expect("write");
        if let Err(e) = validate_bootstrap_file(&path).await {
            failures.push(format!("{name}: {e:#}"));
        }
    }
    assert!(
        failures.is_empty(),
        "Envoy rejected {} of {} cases:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
