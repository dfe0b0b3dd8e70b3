//! A small Vault PKI test server (axum + rcgen) implementing
//! `POST /v1/<mount>/issue/<role>` with `X-Vault-Token`: 403 `permission denied` on a bad
//! token, 400 on an unknown role, otherwise a fresh leaf signed by its own root, in Vault's
//! response shape. Listens on 127.0.0.1 only.

// Shared by several test crates; each uses a subset.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use parking_lot::Mutex;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use serde_json::{Value, json};

pub struct VaultServer {
    pub addr: SocketAddr,
    pub root_pem: String,
    /// Every request body received, in order.
    pub requests: Arc<Mutex<Vec<Value>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for VaultServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Pki {
    token: String,
    mount: String,
    role: String,
    root_pem: String,
    issuer: Issuer<'static, KeyPair>,
    requests: Arc<Mutex<Vec<Value>>>,
}

fn errors(status: StatusCode, msg: &str) -> (StatusCode, Json<Value>) {
    (status, Json(json!({ "errors": [msg] })))
}

fn split(v: &Value) -> Vec<String> {
    v.as_str()
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

async fn issue(
    State(pki): State<Arc<Pki>>,
    Path((mount, role)): Path<(String, String)>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    pki.requests.lock().push(body.clone());
    let token = headers
        .get("x-vault-token")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if token != pki.token {
        return errors(StatusCode::FORBIDDEN, "permission denied");
    }
    if mount != pki.mount {
        return errors(StatusCode::NOT_FOUND, "no handler for route");
    }
    if role != pki.role {
        return errors(StatusCode::BAD_REQUEST, &format!("unknown role: {role}"));
    }
    let Some(cn) = body["common_name"].as_str().filter(|s| !s.is_empty()) else {
        return errors(StatusCode::BAD_REQUEST, "missing common name");
    };
    let ttl_secs: i64 = body["ttl"]
        .as_str()
        .and_then(|t| t.strip_suffix('s'))
        .and_then(|t| t.parse().ok())
        .unwrap_or(3600);
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, cn);
    for d in split(&body["alt_names"]) {
        match d.try_into() {
            Ok(d) => params.subject_alt_names.push(SanType::DnsName(d)),
            Err(_) => return errors(StatusCode::BAD_REQUEST, "bad alt name"),
        }
    }
    for u in split(&body["uri_sans"]) {
        match u.try_into() {
            Ok(u) => params.subject_alt_names.push(SanType::URI(u)),
            Err(_) => return errors(StatusCode::BAD_REQUEST, "bad uri san"),
        }
    }
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::seconds(30);
    params.not_after = now + time::Duration::seconds(ttl_secs);
    params.is_ca = IsCa::ExplicitNoCa;
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let signed = KeyPair::generate().and_then(|key| {
        params
            .signed_by(&key, &pki.issuer)
            .map(|c| (c.pem(), key.serialize_pem()))
    });
    let Ok((cert, key)) = signed else {
        return errors(StatusCode::INTERNAL_SERVER_ERROR, "signing failed");
    };
    (
        StatusCode::OK,
        Json(json!({
            "request_id": "test",
            "lease_id": "",
            "renewable": false,
            "lease_duration": 0,
            "data": {
                "certificate": cert,
                "issuing_ca": pki.root_pem,
                "ca_chain": [pki.root_pem],
                "private_key": key,
                "private_key_type": "ec",
                "serial_number": "00:01",
                "expiration": (now.unix_timestamp() + ttl_secs),
            },
            "warnings": null,
        })),
    )
}

/// Starts the server on 127.0.0.1 with root CN `fsm.root` (as FSM's dev Vault).
pub async fn start(token: &str, mount: &str, role: &str) -> anyhow::Result<VaultServer> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "fsm.root");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let root_pem = params.self_signed(&key)?.pem();
    let requests = Arc::new(Mutex::new(Vec::new()));
    let pki = Arc::new(Pki {
        token: token.into(),
        mount: mount.into(),
        role: role.into(),
        root_pem: root_pem.clone(),
        issuer: Issuer::new(params, key),
        requests: requests.clone(),
    });
    let app = Router::new()
        .route("/v1/{mount}/issue/{role}", post(issue))
        .with_state(pki);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(VaultServer {
        addr,
        root_pem,
        requests,
        task,
    })
}
