//! The admin server (`/config_dump`, `/ready`, `/stats`, `/stats/prometheus`) and the metrics port.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use fsm_dataplane_proto::{type_url as urls, v1};
use fsm_sidecar_proxy::{Metrics, Store};
use fsm_sidecar_xds::NodeInfo;
use prost::Message;
use serde_json::{Value, json};

#[derive(Clone, Debug)]
pub struct Admin {
    pub store: Arc<Store>,
    pub metrics: Arc<Metrics>,
    pub node: NodeInfo,
}

impl Admin {
    pub fn router(self) -> Router {
        Router::new()
            .route("/config_dump", get(config_dump))
            .route("/ready", get(ready))
            .route("/stats", get(stats))
            .route("/stats/prometheus", get(prometheus))
            .with_state(Arc::new(self))
    }

    pub fn metrics_router(self) -> Router {
        Router::new()
            .route("/stats/prometheus", get(prometheus))
            .route("/metrics", get(prometheus))
            .with_state(Arc::new(self))
    }
}

pub async fn serve(listener: tokio::net::TcpListener, router: Router) {
    if let Err(e) = axum::serve(listener, router).await {
        tracing::error!(error = %e, "admin server stopped");
    }
}

async fn ready(State(admin): State<Arc<Admin>>) -> impl IntoResponse {
    if admin.store.is_ready() {
        (StatusCode::OK, "LIVE\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "PRE_INITIALIZING\n")
    }
}

async fn stats(
    State(admin): State<Arc<Admin>>,
    Query(q): Query<HashMap<String, String>>,
) -> impl IntoResponse {
    admin
        .metrics
        .stats_text(q.get("filter").map(String::as_str))
}

async fn prometheus(State(admin): State<Arc<Admin>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        admin.metrics.prometheus_text(),
    )
}

/// A resource in the JSON form the controller serves it in (private key redacted), with what an
/// operator checks of a secret added.
fn resource_json(type_url: &str, body: &[u8]) -> Value {
    match fsm_dataplane_proto::json::resource_json(type_url, body) {
        Ok(mut value) => {
            if type_url == urls::SECRET
                && let Ok(secret) = v1::Secret::decode(body)
            {
                describe_secret(&mut value, &secret);
            }
            value
        }
        Err(e) => json!({"undecodable": e}),
    }
}

/// Each certificate of a PEM bundle, parsed; unparsable blocks are reported, not skipped.
fn pem_certificates(pem: &[u8]) -> Vec<Value> {
    x509_parser::pem::Pem::iter_from_buffer(pem)
        .map(|block| {
            let block = match block {
                Ok(b) => b,
                Err(e) => return json!({"error": format!("invalid PEM: {e}")}),
            };
            match block.parse_x509() {
                Ok(cert) => {
                    let cn = cert
                        .subject()
                        .iter_common_name()
                        .next()
                        .and_then(|cn| cn.as_str().ok())
                        .unwrap_or("");
                    let sans: Vec<String> = cert
                        .subject_alternative_name()
                        .ok()
                        .flatten()
                        .map(|ext| {
                            ext.value
                                .general_names
                                .iter()
                                .map(ToString::to_string)
                                .collect()
                        })
                        .unwrap_or_default();
                    json!({
                        "subject_cn": cn,
                        "sans": sans,
                        "serial": cert.raw_serial_as_string(),
                        "not_after": cert.validity().not_after.to_string(),
                    })
                }
                Err(e) => json!({"error": format!("invalid certificate: {e}")}),
            }
        })
        .collect()
}

/// Adds what an operator checks during a rotation: the leaf's subject, SANs, serial and expiry,
/// and each trusted root's name and expiry. Public data only; the key stays redacted.
fn describe_secret(value: &mut Value, secret: &v1::Secret) {
    match &secret.kind {
        Some(v1::secret::Kind::TlsCertificate(c)) => {
            if let Some(obj) = value
                .get_mut("tlsCertificate")
                .and_then(Value::as_object_mut)
            {
                let leaf = pem_certificates(&c.certificate_chain)
                    .into_iter()
                    .next()
                    .unwrap_or(Value::Null);
                obj.insert("leaf".into(), leaf);
            }
        }
        Some(v1::secret::Kind::ValidationContext(v)) => {
            if let Some(obj) = value
                .get_mut("validationContext")
                .and_then(Value::as_object_mut)
            {
                let roots: Vec<Value> = pem_certificates(&v.trusted_ca)
                    .into_iter()
                    .map(|mut r| {
                        if let Some(o) = r.as_object_mut() {
                            o.remove("sans");
                            o.remove("serial");
                        }
                        r
                    })
                    .collect();
                obj.insert("trustedRoots".into(), json!(roots));
            }
        }
        None => {}
    }
}

async fn config_dump(State(admin): State<Arc<Admin>>) -> impl IntoResponse {
    let resources = admin.store.resources();
    let mut types = serde_json::Map::new();
    for (type_url, state) in &resources.types {
        let items: Vec<Value> = state
            .resources
            .values()
            .map(|r| {
                json!({
                    "name": &*r.name,
                    "version": &*r.version,
                    "resource": resource_json(type_url, &r.body),
                })
            })
            .collect();
        types.insert(
            (*type_url).to_string(),
            json!({
                "version": state.version,
                "received": state.received,
                "last_nack": state.last_nack.as_ref().map(|n| json!({"version": n.version, "error": n.error})),
                "resources": items,
            }),
        );
    }
    let body = json!({
        "node": {"id": admin.node.id, "cluster": admin.node.cluster, "user_agent_name": fsm_sidecar_xds::node::USER_AGENT_NAME},
        "ready": admin.store.is_ready(),
        "types": types,
    });
    (
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_string_pretty(&body).unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use fsm_dataplane_proto::{type_url, v1};
    use prost::Message;

    use super::*;

    #[test]
    fn resources_dump_as_json_with_private_keys_redacted() {
        let cluster = v1::Cluster {
            name: "demo/httpbin|14001".into(),
            upstream_protocol: v1::UpstreamProtocol::Http1 as i32,
            ..Default::default()
        };
        let json = resource_json(type_url::CLUSTER, &cluster.encode_to_vec());
        assert_eq!(json["name"], "demo/httpbin|14001");
        assert_eq!(json["upstreamProtocol"], "UPSTREAM_PROTOCOL_HTTP1");

        let secret = v1::Secret {
            name: "service-cert".into(),
            kind: Some(v1::secret::Kind::TlsCertificate(v1::TlsCertificate {
                certificate_chain: b"chain".to_vec(),
                private_key: b"-----BEGIN PRIVATE KEY-----".to_vec(),
            })),
        };
        let json = resource_json(type_url::SECRET, &secret.encode_to_vec());
        assert_eq!(json["tlsCertificate"]["privateKey"], "[redacted]");
        assert!(!json.to_string().contains("PRIVATE"), "{json}");
    }

    #[test]
    fn secrets_show_certificate_details_not_keys() {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "curl.demo.cluster.local");
        params.subject_alt_names = vec![rcgen::SanType::URI(
            "spiffe://cluster.local/ns/demo/sa/curl"
                .try_into()
                .expect("uri"),
        )];
        let cert = params.self_signed(&key).expect("cert");
        let secret = v1::Secret {
            name: "service-cert:demo/curl".into(),
            kind: Some(v1::secret::Kind::TlsCertificate(v1::TlsCertificate {
                certificate_chain: cert.pem().into_bytes(),
                private_key: key.serialize_pem().into_bytes(),
            })),
        };
        let json = resource_json(type_url::SECRET, &secret.encode_to_vec());
        let leaf = &json["tlsCertificate"]["leaf"];
        assert_eq!(leaf["subject_cn"], "curl.demo.cluster.local", "{json}");
        assert!(
            leaf["sans"]
                .to_string()
                .contains("spiffe://cluster.local/ns/demo/sa/curl"),
            "{json}"
        );
        assert!(
            leaf["serial"].as_str().is_some_and(|s| !s.is_empty()),
            "{json}"
        );
        assert!(leaf["not_after"].as_str().is_some(), "{json}");
        assert!(!json.to_string().contains("PRIVATE"), "{json}");

        let roots = v1::Secret {
            name: "root-cert-for-mtls-inbound:demo/curl".into(),
            kind: Some(v1::secret::Kind::ValidationContext(v1::ValidationContext {
                trusted_ca: format!("{}{}", cert.pem(), cert.pem()).into_bytes(),
                match_subject_alt_names: vec![],
            })),
        };
        let json = resource_json(type_url::SECRET, &roots.encode_to_vec());
        let trusted = json["validationContext"]["trustedRoots"]
            .as_array()
            .expect("roots");
        assert_eq!(trusted.len(), 2, "{json}");
        assert_eq!(trusted[0]["subject_cn"], "curl.demo.cluster.local");
    }
}
