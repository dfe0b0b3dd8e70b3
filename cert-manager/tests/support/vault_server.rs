//! A small Vault test server (axum + rcgen + rustls) on 127.0.0.1 only, implementing:
//! - `POST /v1/<mount>/issue/<role>`: 403 `permission denied` on a bad or expired token, 400 on
//!   an unknown role, otherwise a fresh leaf signed by its own PKI root, in Vault's response
//!   shape;
//! - `GET /v1/auth/token/lookup-self` and `POST /v1/auth/token/renew-self`, with the token's TTL
//!   enforced on the server's clock (a [`fsm_certs::Clock`], shared with the test when it wants
//!   to move time), so that a client that never renews is refused once the TTL has passed.
//!
//! [`start_with`] serves TLS by default, with a certificate for `127.0.0.1` and `localhost`
//! signed by a test CA written to [`VaultServer::ca_file`]; [`start`] serves plaintext (for the
//! tests that configure `http`).

// Shared by several test crates; each uses a subset.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use fsm_certs::{Clock, SystemClock};
use parking_lot::Mutex;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use serde_json::{Value, json};

/// How [`start_with`] sets the server up.
pub struct Options {
    pub token: String,
    pub mount: String,
    pub role: String,
    /// Serve https (default) or plain http.
    pub tls: bool,
    /// The token's TTL from start (and after each renewal). `None`: a root token, `ttl: 0`,
    /// never expires, not renewable.
    pub token_ttl: Option<Duration>,
    /// Whether `renew-self` works (when the token has a TTL).
    pub renewable: bool,
    /// The clock the TTL is enforced on.
    pub clock: Arc<dyn Clock>,
}

impl Options {
    pub fn new(token: &str, mount: &str, role: &str) -> Self {
        Self {
            token: token.into(),
            mount: mount.into(),
            role: role.into(),
            tls: true,
            token_ttl: None,
            renewable: true,
            clock: Arc::new(SystemClock),
        }
    }
}

pub struct VaultServer {
    pub addr: SocketAddr,
    pub root_pem: String,
    /// `https` or `http`.
    pub protocol: &'static str,
    /// The CA that signed the server's TLS certificate (https only), and the file holding it.
    pub tls_ca_pem: Option<String>,
    pub ca_file: Option<PathBuf>,
    /// Every issue request body received, in order.
    pub requests: Arc<Mutex<Vec<Value>>>,
    /// Successful `renew-self` and `lookup-self` calls.
    pub renewals: Arc<AtomicUsize>,
    pub lookups: Arc<AtomicUsize>,
    _dir: Option<tempfile::TempDir>,
    task: tokio::task::JoinHandle<()>,
}

impl VaultServer {
    pub fn renewals(&self) -> usize {
        self.renewals.load(Ordering::SeqCst)
    }
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
    token_ttl: Option<Duration>,
    renewable: bool,
    clock: Arc<dyn Clock>,
    /// `None`: never expires.
    expires_at: Mutex<Option<SystemTime>>,
    renewals: Arc<AtomicUsize>,
    lookups: Arc<AtomicUsize>,
}

type Reply = (StatusCode, Json<Value>);

fn errors(status: StatusCode, msg: &str) -> Reply {
    (status, Json(json!({ "errors": [msg] })))
}

impl Pki {
    /// 403 for a wrong token and for one past its TTL, as Vault answers both.
    fn check_token(&self, headers: &HeaderMap) -> Result<(), Reply> {
        let token = headers
            .get("x-vault-token")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let expired = self
            .expires_at
            .lock()
            .is_some_and(|t| self.clock.now() >= t);
        if token != self.token || expired {
            return Err(errors(StatusCode::FORBIDDEN, "permission denied"));
        }
        Ok(())
    }

    fn ttl_left(&self) -> u64 {
        self.expires_at.lock().map_or(0, |t| {
            t.duration_since(self.clock.now())
                .unwrap_or_default()
                .as_secs()
        })
    }
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

async fn lookup_self(State(pki): State<Arc<Pki>>, headers: HeaderMap) -> Reply {
    if let Err(reply) = pki.check_token(&headers) {
        return reply;
    }
    pki.lookups.fetch_add(1, Ordering::SeqCst);
    // Vault's shape, including the token itself in `id` (so a client that logs bodies leaks it).
    (
        StatusCode::OK,
        Json(json!({
            "data": {
                "id": pki.token,
                "ttl": pki.ttl_left(),
                "renewable": pki.token_ttl.is_some() && pki.renewable,
                "policies": ["default", "fsm"],
            }
        })),
    )
}

async fn renew_self(State(pki): State<Arc<Pki>>, headers: HeaderMap) -> Reply {
    if let Err(reply) = pki.check_token(&headers) {
        return reply;
    }
    let Some(ttl) = pki.token_ttl.filter(|_| pki.renewable) else {
        return errors(StatusCode::BAD_REQUEST, "lease is not renewable");
    };
    *pki.expires_at.lock() = Some(pki.clock.now() + ttl);
    pki.renewals.fetch_add(1, Ordering::SeqCst);
    (
        StatusCode::OK,
        Json(json!({
            "auth": {
                "client_token": pki.token,
                "lease_duration": ttl.as_secs(),
                "renewable": true,
                "policies": ["default", "fsm"],
            }
        })),
    )
}

async fn issue(
    State(pki): State<Arc<Pki>>,
    Path((mount, role)): Path<(String, String)>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Reply {
    pki.requests.lock().push(body.clone());
    if let Err(reply) = pki.check_token(&headers) {
        return reply;
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

/// A plaintext server with a root token (no TTL), root CN `fsm.root` (as FSM's dev Vault).
pub async fn start(token: &str, mount: &str, role: &str) -> anyhow::Result<VaultServer> {
    let mut opts = Options::new(token, mount, role);
    opts.tls = false;
    start_with(opts).await
}

/// A CA named `ca_name` and a server certificate for 127.0.0.1 and localhost signed by it.
/// Returns (CA PEM, server config).
pub fn tls_material(ca_name: &str) -> anyhow::Result<(String, Arc<rustls::ServerConfig>)> {
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name.push(DnType::CommonName, ca_name);
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_pem = ca.self_signed(&ca_key)?.pem();
    let ca_issuer = Issuer::new(ca, ca_key);

    let key = KeyPair::generate()?;
    let mut leaf = CertificateParams::new(vec!["localhost".to_owned()])?;
    leaf.subject_alt_names
        .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
    leaf.distinguished_name.push(DnType::CommonName, "vault");
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = leaf.signed_by(&key, &ca_issuer)?;
    let key_der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(vec![cert.der().clone()], key_der)?;
    Ok((ca_pem, Arc::new(config)))
}

/// TLS over a TCP listener for `axum::serve`. A failed handshake (a client that does not trust
/// the CA) drops that connection only.
struct TlsListener {
    tcp: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.tcp.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let handshake = self.acceptor.accept(tcp);
            if let Ok(Ok(tls)) = tokio::time::timeout(Duration::from_secs(5), handshake).await {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

pub async fn start_with(opts: Options) -> anyhow::Result<VaultServer> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "fsm.root");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let root_pem = params.self_signed(&key)?.pem();
    let requests = Arc::new(Mutex::new(Vec::new()));
    let (renewals, lookups) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let pki = Arc::new(Pki {
        token: opts.token,
        mount: opts.mount,
        role: opts.role,
        root_pem: root_pem.clone(),
        issuer: Issuer::new(params, key),
        requests: requests.clone(),
        token_ttl: opts.token_ttl,
        renewable: opts.renewable,
        expires_at: Mutex::new(opts.token_ttl.map(|ttl| opts.clock.now() + ttl)),
        clock: opts.clock,
        renewals: renewals.clone(),
        lookups: lookups.clone(),
    });
    let app = Router::new()
        .route("/v1/{mount}/issue/{role}", post(issue))
        .route("/v1/auth/token/lookup-self", get(lookup_self))
        .route("/v1/auth/token/renew-self", post(renew_self))
        .with_state(pki);
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = tcp.local_addr()?;
    let (protocol, tls_ca_pem, ca_file, dir, task) = if opts.tls {
        let (ca_pem, config) = tls_material("vault-test-tls-ca")?;
        let dir = tempfile::tempdir()?;
        let ca_file = dir.path().join("vault-ca.pem");
        std::fs::write(&ca_file, &ca_pem)?;
        let listener = TlsListener {
            tcp,
            acceptor: tokio_rustls::TlsAcceptor::from(config),
        };
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        ("https", Some(ca_pem), Some(ca_file), Some(dir), task)
    } else {
        let task = tokio::spawn(async move {
            let _ = axum::serve(tcp, app).await;
        });
        ("http", None, None, None, task)
    };
    Ok(VaultServer {
        addr,
        root_pem,
        protocol,
        tls_ca_pem,
        ca_file,
        requests,
        renewals,
        lookups,
        _dir: dir,
        task,
    })
}
