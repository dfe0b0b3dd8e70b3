//! Every Envoy adapter golden case (`adapters/envoy/testdata/*/in.yaml`, a proxy's IR) translated
//! with real credentials and handed to the real Envoy binary as one static bootstrap: `envoy
//! --mode validate` must accept it. The goldens pin what the adapter writes; this proves Envoy
//! takes it (field constraints, extension types, regexes), which the Rust types cannot.
//!
//! Listeners name their routes through RDS and clusters their endpoints through EDS over ADS; a
//! bootstrap cannot carry dynamic resources, so each listener's HTTP connection managers get
//! their route configuration inline and each EDS cluster its ClusterLoadAssignment, which Envoy
//! validates the same way. Secrets stay SDS references, as the adapter writes them, and are also
//! given as static secrets, so their TLS contents are validated too.

use std::path::Path;

use envoy_types::pb::envoy::config::bootstrap::v3::{Bootstrap, bootstrap};
use envoy_types::pb::envoy::config::cluster::v3::cluster;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::listener::v3::filter;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    self as tls, common_tls_context,
};
use envoy_types::pb::google::protobuf::Any;
use fsm_adapter_envoy::EnvoyResources;
use fsm_integration_tests::validate_bootstrap_file;
use prost::Message;

const HCM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";

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

/// The secrets a TLS context names through SDS over ADS, named instead from the bootstrap's
/// static secrets (`sds_config` unset): Envoy's validate mode crashes on ADS-sourced secrets,
/// and static ones get their contents validated.
fn static_secrets(common: &mut Option<tls::CommonTlsContext>) {
    let Some(common) = common else { return };
    for c in &mut common.tls_certificate_sds_secret_configs {
        c.sds_config = None;
    }
    match &mut common.validation_context_type {
        Some(common_tls_context::ValidationContextType::ValidationContextSdsSecretConfig(c)) => {
            c.sds_config = None;
        }
        Some(common_tls_context::ValidationContextType::CombinedValidationContext(c)) => {
            if let Some(sds) = &mut c.validation_context_sds_secret_config {
                sds.sds_config = None;
            }
        }
        _ => {}
    }
}

fn static_secrets_in(socket: &mut Option<core::TransportSocket>) {
    let Some(core::TransportSocket {
        config_type: Some(core::transport_socket::ConfigType::TypedConfig(any)),
        ..
    }) = socket
    else {
        return;
    };
    if any.type_url.ends_with(".UpstreamTlsContext") {
        let mut ctx = tls::UpstreamTlsContext::decode(any.value.as_slice()).expect("upstream tls");
        static_secrets(&mut ctx.common_tls_context);
        any.value = ctx.encode_to_vec();
    } else if any.type_url.ends_with(".DownstreamTlsContext") {
        let mut ctx =
            tls::DownstreamTlsContext::decode(any.value.as_slice()).expect("downstream tls");
        static_secrets(&mut ctx.common_tls_context);
        any.value = ctx.encode_to_vec();
    }
}

/// One bootstrap holding everything the adapter produced for a proxy.
fn bootstrap_of(ir: &fsm_ir::ProxyIr, out: &EnvoyResources) -> Bootstrap {
    let mut listeners = out.listeners.clone();
    for listener in &mut listeners {
        for chain in &mut listener.filter_chains {
            static_secrets_in(&mut chain.transport_socket);
            for f in &mut chain.filters {
                let Some(filter::ConfigType::TypedConfig(any)) = &mut f.config_type else {
                    continue;
                };
                if any.type_url != HCM_TYPE {
                    continue;
                }
                let mut hcm = HttpConnectionManager::decode(any.value.as_slice()).expect("hcm");
                if let Some(http_connection_manager::RouteSpecifier::Rds(rds)) =
                    &hcm.route_specifier
                {
                    let routes = out
                        .routes
                        .iter()
                        .find(|r| r.name == rds.route_config_name)
                        .unwrap_or_else(|| {
                            panic!(
                                "listener {} names routes {:?} the adapter did not produce",
                                listener.name, rds.route_config_name
                            )
                        })
                        .clone();
                    hcm.route_specifier =
                        Some(http_connection_manager::RouteSpecifier::RouteConfig(routes));
                }
                *any = Any {
                    type_url: HCM_TYPE.into(),
                    value: hcm.encode_to_vec(),
                };
            }
        }
    }
    let mut clusters = out.clusters.clone();
    for c in &mut clusters {
        static_secrets_in(&mut c.transport_socket);
        for m in &mut c.transport_socket_matches {
            static_secrets_in(&mut m.transport_socket);
        }
        if c.cluster_discovery_type
            == Some(cluster::ClusterDiscoveryType::Type(
                cluster::DiscoveryType::Eds as i32,
            ))
        {
            let assignment = out
                .endpoints
                .iter()
                .find(|e| e.cluster_name == c.name)
                .cloned()
                .unwrap_or_else(|| panic!("cluster {} has no ClusterLoadAssignment", c.name));
            c.cluster_discovery_type = Some(cluster::ClusterDiscoveryType::Type(
                cluster::DiscoveryType::Static as i32,
            ));
            c.eds_cluster_config = None;
            c.load_assignment = Some(assignment);
        }
    }
    // The ADS cluster the adapter's SDS references point at.
    clusters.push(envoy_types::pb::envoy::config::cluster::v3::Cluster {
        name: "fsm-controller".into(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Static as i32,
        )),
        typed_extension_protocol_options: [(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".to_string(),
            Any {
                type_url: "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions".into(),
                value: envoy_types::pb::envoy::extensions::upstreams::http::v3::HttpProtocolOptions {
                    upstream_protocol_options: Some(
                        envoy_types::pb::envoy::extensions::upstreams::http::v3::http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(
                            envoy_types::pb::envoy::extensions::upstreams::http::v3::http_protocol_options::ExplicitHttpConfig {
                                protocol_config: Some(envoy_types::pb::envoy::extensions::upstreams::http::v3::http_protocol_options::explicit_http_config::ProtocolConfig::Http2ProtocolOptions(Default::default())),
                            },
                        ),
                    ),
                    ..Default::default()
                }
                .encode_to_vec(),
            },
        )]
        .into(),
        ..Default::default()
    });
    Bootstrap {
        node: Some(core::Node {
            id: format!("{}.sidecar.validate.test", ir.proxy.uuid),
            cluster: "validate".into(),
            ..Default::default()
        }),
        static_resources: Some(bootstrap::StaticResources {
            listeners,
            clusters,
            secrets: out.secrets.clone(),
        }),
        dynamic_resources: Some(bootstrap::DynamicResources {
            ads_config: Some(core::ApiConfigSource {
                api_type: core::api_config_source::ApiType::Grpc as i32,
                transport_api_version: core::ApiVersion::V3 as i32,
                grpc_services: vec![core::GrpcService {
                    target_specifier: Some(core::grpc_service::TargetSpecifier::EnvoyGrpc(
                        core::grpc_service::EnvoyGrpc {
                            cluster_name: "fsm-controller".into(),
                            ..Default::default()
                        },
                    )),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
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
        std::fs::write(&path, bootstrap_of(&ir, &out).encode_to_vec()).expect("write");
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
