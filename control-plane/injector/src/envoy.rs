//! The bootstrap of an injected Envoy sidecar: its node identity, one static cluster for the
//! controller's ADS server (mTLS with the pod's bootstrap credentials), everything else over ADS;
//! plus what must work without the control plane: the rewritten application probes
//! ([`crate::probes`]) and Prometheus metrics on 15010.
//!
//! The credentials come through file-based SDS, the one way Envoy reloads certificates from disk:
//! the kubelet swaps the Secret volume's `..data` link when the controller rotates the
//! certificate, and Envoy, watching the directory, re-reads them. The two SDS files are written by
//! the container's start-up command (they only name the mounted files).

use serde_json::{Value, json};

use crate::probes::Probes;

/// SDS names of the bootstrap credentials.
pub const BOOTSTRAP_CERT: &str = "fsm-bootstrap-cert";
pub const BOOTSTRAP_CA: &str = "fsm-bootstrap-ca";
/// The static cluster the ADS config points at.
pub const CONTROLLER_CLUSTER: &str = "fsm-controller";

/// What differs between two injected Envoys.
#[derive(Clone, Debug)]
pub struct EnvoyBootstrap<'a> {
    /// `<uuid>.sidecar.<service-account>.<namespace>`.
    pub node_id: &'a str,
    /// `host:port` of the ADS server (a DNS name is resolved by Envoy, STRICT_DNS).
    pub ads_address: &'a str,
    pub ads_server_name: &'a str,
    /// Where `ca.crt`, `tls.crt` and `tls.key` are mounted.
    pub credentials_dir: &'a str,
    /// Where the SDS files go (`cert.yaml`, `ca.yaml`).
    pub sds_dir: &'a str,
    pub admin_port: u16,
    pub metrics_port: u16,
    pub probes: &'a Probes,
}

/// The bootstrap and the two SDS files, as JSON text (valid YAML).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnvoyBootstrapFiles {
    pub bootstrap: String,
    pub sds_cert: String,
    pub sds_ca: String,
}

const SECRET_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

fn socket(host: &str, port: u16) -> Value {
    json!({"socket_address": {"address": host, "port_value": port}})
}

fn static_cluster(name: &str, host: &str, port: u16) -> Value {
    let kind = if host.parse::<std::net::IpAddr>().is_ok() {
        "STATIC"
    } else {
        "STRICT_DNS"
    };
    json!({
        "name": name,
        "type": kind,
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": socket(host, port)}}]}],
        },
    })
}

fn http_listener(name: &str, port: u16, routes: Vec<Value>) -> Value {
    json!({
        "name": name,
        "address": socket("0.0.0.0", port),
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": name,
                "route_config": {"name": name, "virtual_hosts": [{"name": name, "domains": ["*"], "routes": routes}]},
                "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
            },
        }]}],
    })
}

/// The bootstrap of one injected Envoy.
pub fn envoy_bootstrap(b: &EnvoyBootstrap<'_>) -> EnvoyBootstrapFiles {
    let file = |name: &str| format!("{}/{name}", b.credentials_dir);
    let sds_cert = json!({"resources": [{
        "@type": SECRET_TYPE,
        "name": BOOTSTRAP_CERT,
        "tls_certificate": {
            "certificate_chain": {"filename": file("tls.crt")},
            "private_key": {"filename": file("tls.key")},
        },
    }]});
    let sds_ca = json!({"resources": [{
        "@type": SECRET_TYPE,
        "name": BOOTSTRAP_CA,
        "validation_context": {
            "trusted_ca": {"filename": file("ca.crt")},
            "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": b.ads_server_name}}],
        },
    }]});
    let sds = |name: &str| {
        json!({
            "path_config_source": {
                "path": format!("{}/{name}.yaml", b.sds_dir),
                "watched_directory": {"path": b.credentials_dir},
            },
            "resource_api_version": "V3",
        })
    };
    let (ads_host, ads_port) = split_host_port(b.ads_address);
    let mut controller = static_cluster(CONTROLLER_CLUSTER, ads_host, ads_port);
    controller["transport_socket"] = json!({
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": b.ads_server_name,
            "common_tls_context": {
                "alpn_protocols": ["h2"],
                "tls_certificate_sds_secret_configs": [{"name": BOOTSTRAP_CERT, "sds_config": sds("cert")}],
                "validation_context_sds_secret_config": {"name": BOOTSTRAP_CA, "sds_config": sds("ca")},
            },
        },
    });
    controller["typed_extension_protocol_options"] = json!({
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        },
    });

    let mut clusters = vec![
        controller,
        static_cluster("fsm-admin", "127.0.0.1", b.admin_port),
    ];
    let mut listeners = vec![http_listener(
        "fsm-metrics",
        b.metrics_port,
        vec![json!({
            "match": {"path": "/stats/prometheus"},
            "route": {"cluster": "fsm-admin"},
        })],
    )];
    for port in b.probes.listen_ports() {
        let forwards: Vec<_> = b
            .probes
            .forwards
            .iter()
            .filter(|f| f.listen_port == port)
            .collect();
        let name = format!("fsm-probe-{port}");
        if forwards.iter().any(|f| f.scheme == "HTTPS") {
            // TLS to the application, untouched.
            let target = forwards[0].target_port;
            let cluster = format!("{name}-{target}");
            clusters.push(static_cluster(&cluster, "127.0.0.1", target));
            listeners.push(json!({
                "name": name,
                "address": socket("0.0.0.0", port),
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.tcp_proxy",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                        "stat_prefix": name,
                        "cluster": cluster,
                    },
                }]}],
            }));
            continue;
        }
        let mut routes = Vec::new();
        for f in forwards {
            let cluster = format!("{name}-{}", f.target_port);
            if !clusters.iter().any(|c| c["name"] == cluster.as_str()) {
                clusters.push(static_cluster(&cluster, "127.0.0.1", f.target_port));
            }
            routes.push(json!({
                "match": {"path": f.path.clone().unwrap_or_default()},
                "route": {
                    "cluster": cluster,
                    "prefix_rewrite": f.target_path.clone().unwrap_or_else(|| "/".into()),
                    "timeout": format!("{}s", f.timeout_seconds.max(1)),
                },
            }));
        }
        listeners.push(http_listener(&name, port, routes));
    }

    let bootstrap = json!({
        "node": {"id": b.node_id, "cluster": node_cluster(b.node_id)},
        "admin": {"address": socket("127.0.0.1", b.admin_port)},
        "static_resources": {"clusters": clusters, "listeners": listeners},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": CONTROLLER_CLUSTER}}],
                "set_node_on_first_message_only": true,
            },
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
        },
    });
    EnvoyBootstrapFiles {
        bootstrap: bootstrap.to_string(),
        sds_cert: sds_cert.to_string(),
        sds_ca: sds_ca.to_string(),
    }
}

/// `<service-account>.<namespace>` of a node id, FSM's node cluster.
fn node_cluster(node_id: &str) -> String {
    node_id
        .splitn(5, '.')
        .skip(2)
        .take(2)
        .collect::<Vec<_>>()
        .join(".")
}

/// `host:port` (`[v6]:port` too); a missing or bad port is the ADS default, 15128.
fn split_host_port(address: &str) -> (&str, u16) {
    match address.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() => (
            host.trim_start_matches('[').trim_end_matches(']'),
            port.parse().unwrap_or(15128),
        ),
        _ => (address, 15128),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probes::ProbeForward;

    #[test]
    fn names_the_node_reaches_the_controller_by_dns_and_serves_probes() {
        let probes = Probes {
            forwards: vec![
                ProbeForward {
                    listen_port: 15901,
                    path: Some("/fsm-liveness-probe".into()),
                    scheme: "HTTP".into(),
                    target_port: 14001,
                    target_path: Some("/healthz".into()),
                    timeout_seconds: 1,
                },
                ProbeForward {
                    listen_port: 15902,
                    path: None,
                    scheme: "HTTPS".into(),
                    target_port: 8443,
                    target_path: None,
                    timeout_seconds: 1,
                },
            ],
            tcp: false,
        };
        let files = envoy_bootstrap(&EnvoyBootstrap {
            node_id: "6f0e0b8e-0000-4000-8000-000000000001.sidecar.curl.demo",
            ads_address: "fsm-controller.fsm-system.svc.cluster.local:15128",
            ads_server_name: "fsm-controller.fsm-system.svc.cluster.local",
            credentials_dir: "/etc/fsm/bootstrap",
            sds_dir: "/tmp/fsm-sds",
            admin_port: 15000,
            metrics_port: 15010,
            probes: &probes,
        });
        let b: Value = serde_json::from_str(&files.bootstrap).expect("json");
        assert_eq!(b["node"]["cluster"], "curl.demo");
        let clusters = b["static_resources"]["clusters"]
            .as_array()
            .expect("clusters");
        assert_eq!(clusters[0]["type"], "STRICT_DNS");
        let listeners = b["static_resources"]["listeners"]
            .as_array()
            .expect("listeners");
        let names: Vec<_> = listeners
            .iter()
            .map(|l| l["name"].as_str().unwrap_or_default())
            .collect();
        assert_eq!(names, ["fsm-metrics", "fsm-probe-15901", "fsm-probe-15902"]);
        let route = &listeners[1]["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]
            ["virtual_hosts"][0]["routes"][0];
        assert_eq!(route["match"]["path"], "/fsm-liveness-probe");
        assert_eq!(route["route"]["prefix_rewrite"], "/healthz");
        assert!(files.sds_cert.contains("/etc/fsm/bootstrap/tls.key"));
        assert_eq!(split_host_port("10.0.0.1:1"), ("10.0.0.1", 1));
        assert_eq!(split_host_port("[fd00::1]:15128"), ("fd00::1", 15128));
    }
}
