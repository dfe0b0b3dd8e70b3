//! Vault: the PKI secrets engine over HTTP or HTTPS.
//!
//! Each certificate is one `POST {protocol}://{host}:{port}/v1/{pki mount}/issue/{role}` with the
//! `X-Vault-Token` header and a JSON body `{common_name, alt_names, uri_sans, ttl, format}`;
//! Vault generates the key and returns `certificate`, `issuing_ca`, `ca_chain`, `private_key`,
//! `serial_number`. Settings are FSM's (`fsm.vault.host`, `.port`, `.protocol`, `.token` or
//! `.secret.name`/`.secret.key`, `.role`); the root's key never leaves Vault. The token is never
//! logged.
//!
//! `https` is rustls on ring. Vault's certificate is checked against the CA file of
//! [`VaultConfig::ca_file`] (what Vault's own clients call `VAULT_CACERT`) when one is given,
//! else against the system roots.
//!
//! The token is kept alive by [`VaultProvider::run_token_renewal`]: `auth/token/lookup-self`
//! gives its TTL, and `auth/token/renew-self` renews it when two thirds of that TTL have passed.
//! A token without a TTL (a root token) is left alone; a failed renewal or a token that cannot be
//! renewed is logged with E4013 and retried, while issuance goes on with the still-valid token.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use fsm_errcode::{ErrCode, HasErrCode};
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use parking_lot::Mutex;
use serde::Deserialize;
use zeroize::Zeroizing;

use crate::clock::{Clock, SystemClock};
use crate::error::CertError;
use crate::provider::CertificateProvider;
use crate::types::{CertificateRequest, IssuedCertificate, PrivateKeyPem};
use crate::x509;

const NAME: &str = "vault";

// === VaultConfig ===

/// FSM's Vault settings.
#[derive(Clone)]
pub struct VaultConfig {
    /// `fsm.vault.protocol`: `http` or `https`.
    pub protocol: String,
    /// `fsm.vault.host`, e.g. `vault.fsm-system.svc.cluster.local`.
    pub host: String,
    /// `fsm.vault.port`, default 8200.
    pub port: u16,
    /// `fsm.vault.token` (or read from `fsm.vault.secret.name`/`.key` with
    /// [`token_from_secret`]).
    pub token: Zeroizing<String>,
    /// `fsm.vault.role`, default `fsm`.
    pub role: String,
    /// The PKI secrets engine mount, default `pki`.
    pub pki_mount: String,
    /// Per-request timeout, default 30s.
    pub timeout: Duration,
    /// Roots to hand out as the trust bundle instead of the CA Vault returns (e.g. the
    /// `ca.crt` of `fsm-ca-bundle`, or old + new roots while the user rotates Vault's root).
    pub trust_bundle_pem: Option<String>,
    /// PEM file of the CA(s) that signed Vault's own TLS certificate (`https` only). When set,
    /// only these are trusted; when `None`, the system roots are.
    pub ca_file: Option<PathBuf>,
}

impl std::fmt::Debug for VaultConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaultConfig")
            .field("protocol", &self.protocol)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("token", &"<redacted>")
            .field("role", &self.role)
            .field("pki_mount", &self.pki_mount)
            .field("timeout", &self.timeout)
            .field("ca_file", &self.ca_file)
            .finish_non_exhaustive()
    }
}

impl VaultConfig {
    /// `http://<host>:8200`, role `fsm`, mount `pki`.
    pub fn new(host: impl Into<String>, token: impl Into<String>) -> Self {
        Self {
            protocol: "http".into(),
            host: host.into(),
            port: 8200,
            token: Zeroizing::new(token.into()),
            role: "fsm".into(),
            pki_mount: "pki".into(),
            timeout: Duration::from_secs(30),
            trust_bundle_pem: None,
            ca_file: None,
        }
    }

    /// `{protocol}://{host}:{port}/v1/`, the prefix of every API path.
    pub fn api_url(&self) -> String {
        format!("{}://{}:{}/v1/", self.protocol, self.host, self.port)
    }

    /// The issue endpoint, `{protocol}://{host}:{port}/v1/{mount}/issue/{role}`.
    pub fn issue_url(&self) -> String {
        format!(
            "{}{}/issue/{}",
            self.api_url(),
            self.pki_mount.trim_matches('/'),
            self.role
        )
    }

    /// Where Vault's TLS certificate is checked against, for error messages.
    fn roots(&self) -> String {
        match &self.ca_file {
            Some(path) => format!("the CA file {}", path.display()),
            None => "the system roots".into(),
        }
    }
}

/// Reads the Vault token from a Secret (`fsm.vault.secret.name` / `fsm.vault.secret.key`).
pub async fn token_from_secret(
    client: Client,
    namespace: &str,
    name: &str,
    key: &'static str,
) -> Result<Zeroizing<String>, CertError> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    let secret = api.get(name).await.map_err(|e| CertError::SecretGet {
        namespace: namespace.into(),
        name: name.into(),
        source: Box::new(e),
    })?;
    let missing = || CertError::SecretKeyMissing {
        namespace: namespace.into(),
        name: name.into(),
        key,
    };
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .ok_or_else(missing)?;
    String::from_utf8(bytes.0.clone())
        .map(|s| Zeroizing::new(s.trim().to_owned()))
        .map_err(|_| missing())
}

// === VaultProvider ===

/// When the token is renewed: after this fraction of its TTL (numerator, denominator).
const RENEW_AFTER: (u32, u32) = (2, 3);
/// First retry after a failed token lookup or renewal; doubled up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_secs(5);
const RETRY_MAX: Duration = Duration::from_secs(60);
/// How often [`VaultProvider::run_token_renewal`] looks at the clock. Short, so that a jump of
/// the wall clock (or of a test's manual clock) is noticed soon.
pub const TOKEN_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// The Vault PKI secrets engine as a [`CertificateProvider`].
#[derive(Debug)]
pub struct VaultProvider {
    config: VaultConfig,
    url: String,
    http: reqwest::Client,
    clock: Arc<dyn Clock>,
    token: Mutex<TokenState>,
}

/// What the provider knows of its token's lifetime.
#[derive(Debug)]
struct TokenState {
    /// When to look at the token next (lookup or renewal). `UNIX_EPOCH`: at once.
    next_check: SystemTime,
    /// `None` until looked up; then whether `renew-self` may be used.
    renewable: Option<bool>,
    /// When the token expires, as last reported by Vault.
    expires_at: Option<SystemTime>,
    /// Failed checks in a row, for the retry back-off.
    failures: u32,
    /// The token has no TTL (a root token): nothing to renew, ever.
    non_expiring: bool,
}

/// The outcome of one [`VaultProvider::renew_token_if_due`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenStatus {
    /// Nothing to do yet.
    NotDue,
    /// The token has no TTL (Vault reports `ttl: 0`, e.g. a root token); it is never renewed.
    NonExpiring,
    /// Looked up (first check): `ttl` left, renewal scheduled at two thirds of it.
    LookedUp { ttl: Duration },
    /// Renewed with `auth/token/renew-self`: the new TTL.
    Renewed { ttl: Duration },
}

/// A token lookup or renewal failed, or the token cannot be renewed. Code E4013: issuance will
/// fail once the token expires. Never holds the token.
#[derive(Debug, thiserror::Error)]
#[error("vault {host}: {action} failed: {message}")]
pub struct VaultTokenError {
    pub host: String,
    /// `token lookup (auth/token/lookup-self)` or `token renewal (auth/token/renew-self)`.
    pub action: &'static str,
    /// The HTTP status Vault answered with, if it answered.
    pub status: Option<u16>,
    pub message: String,
}

impl HasErrCode for VaultTokenError {
    fn err_code(&self) -> ErrCode {
        ErrCode::E4013
    }
}

const LOOKUP: &str = "token lookup (auth/token/lookup-self)";
const RENEW: &str = "token renewal (auth/token/renew-self)";

#[derive(Deserialize)]
struct IssueResponse {
    data: IssueData,
}

#[derive(Deserialize)]
struct IssueData {
    certificate: String,
    #[serde(default)]
    issuing_ca: String,
    #[serde(default)]
    ca_chain: Vec<String>,
    private_key: Zeroizing<String>,
}

#[derive(Deserialize, Default)]
struct ErrorResponse {
    #[serde(default)]
    errors: Vec<String>,
}

/// `auth/token/lookup-self`. Only the lifetime is read: the response also holds the token
/// itself (`id`), which is left unparsed.
#[derive(Deserialize)]
struct LookupResponse {
    data: LookupData,
}

#[derive(Deserialize)]
struct LookupData {
    #[serde(default)]
    ttl: u64,
    #[serde(default)]
    renewable: bool,
}

/// `auth/token/renew-self`. `client_token` is left unparsed.
#[derive(Deserialize)]
struct RenewResponse {
    auth: RenewAuth,
}

#[derive(Deserialize)]
struct RenewAuth {
    #[serde(default)]
    lease_duration: u64,
    #[serde(default)]
    renewable: bool,
}

impl VaultProvider {
    /// A provider on the system clock.
    pub fn new(config: VaultConfig) -> Result<Self, CertError> {
        Self::with_clock(config, Arc::new(SystemClock))
    }

    /// A provider whose token renewal follows `clock` (tests use a [`crate::ManualClock`]).
    pub fn with_clock(config: VaultConfig, clock: Arc<dyn Clock>) -> Result<Self, CertError> {
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .timeout(config.timeout);
        match config.protocol.as_str() {
            "https" => {
                if let Some(path) = &config.ca_file {
                    let pem = std::fs::read(path).map_err(|e| {
                        CertError::CertificateDecode(format!(
                            "vault CA file {}: cannot read it: {e}",
                            path.display()
                        ))
                    })?;
                    let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                        CertError::CertificateDecode(format!(
                            "vault CA file {}: {e}",
                            path.display()
                        ))
                    })?;
                    if certs.is_empty() {
                        return Err(CertError::CertificateDecode(format!(
                            "vault CA file {}: no PEM certificate in it",
                            path.display()
                        )));
                    }
                    // Only the given CA, as Vault's own clients do with VAULT_CACERT: a Vault
                    // certificate from some public CA is not what the operator pointed us at.
                    builder = builder.tls_built_in_root_certs(false);
                    for cert in certs {
                        builder = builder.add_root_certificate(cert);
                    }
                }
            }
            "http" => {
                if let Some(path) = &config.ca_file {
                    fsm_errcode::warn!(ErrCode::E1000, host = %config.host, ca_file = %path.display(), "vault: a CA file is set but the protocol is http; it is not used");
                }
            }
            other => {
                return Err(CertError::InvalidRequest(format!(
                    "vault protocol {other:?}: must be http or https"
                )));
            }
        }
        let http = builder
            .build()
            .map_err(|e| CertError::InvalidRequest(format!("vault HTTP client: {e}")))?;
        let url = config.issue_url();
        Ok(Self {
            config,
            url,
            http,
            clock,
            token: Mutex::new(TokenState {
                next_check: SystemTime::UNIX_EPOCH,
                renewable: None,
                expires_at: None,
                failures: 0,
                non_expiring: false,
            }),
        })
    }

    fn issue_err(&self, req: &CertificateRequest, message: String) -> CertError {
        CertError::Issue {
            provider: NAME,
            common_name: req.common_name.clone(),
            message,
            source: None,
        }
    }

    /// Says why a request to `url` got no answer. A TLS failure names Vault's host and what
    /// its certificate was checked against; the rest is the error chain, outermost first.
    fn describe_send_error(&self, url: &str, e: &reqwest::Error) -> String {
        let (host, port) = (&self.config.host, self.config.port);
        let mut chain: Vec<String> = Vec::new();
        let mut tls: Option<&rustls::Error> = None;
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(err) = cur {
            if let Some(r) = find_rustls_error(err) {
                tls = Some(r);
            }
            let text = err.to_string();
            if chain.last() != Some(&text) {
                chain.push(text);
            }
            cur = err.source();
        }
        use rustls::CertificateError as C;
        match tls {
            Some(r @ rustls::Error::InvalidCertificate(C::UnknownIssuer | C::BadSignature)) => {
                format!(
                    "TLS: the certificate of Vault at {host}:{port} is not signed by a CA in {} ({r})",
                    self.config.roots()
                )
            }
            Some(
                r @ rustls::Error::InvalidCertificate(
                    C::NotValidForName | C::NotValidForNameContext { .. },
                ),
            ) => format!(
                "TLS: the certificate of Vault at {host}:{port} is not valid for the name {host} ({r})"
            ),
            Some(r) => format!("TLS handshake with Vault at {host}:{port} failed: {r}"),
            None => format!("request to {url} failed: {}", chain.join(": ")),
        }
    }

    /// One token call (`lookup-self` or `renew-self`): the body on success, the error otherwise.
    async fn token_call(
        &self,
        action: &'static str,
        path: &str,
    ) -> Result<Zeroizing<String>, VaultTokenError> {
        let url = format!("{}{path}", self.config.api_url());
        let fail = |status: Option<u16>, message: String| VaultTokenError {
            host: self.config.host.clone(),
            action,
            status,
            message,
        };
        let request = if action == RENEW {
            // No increment: Vault renews to the token's own period or default TTL.
            self.http.post(&url).json(&serde_json::json!({}))
        } else {
            self.http.get(&url)
        };
        let resp = request
            .header("X-Vault-Token", self.config.token.as_str())
            .send()
            .await
            .map_err(|e| fail(None, self.describe_send_error(&url, &e)))?;
        let status = resp.status();
        let text = Zeroizing::new(
            resp.text()
                .await
                .map_err(|e| fail(Some(status.as_u16()), format!("reading the response: {e}")))?,
        );
        if !status.is_success() {
            let errors = serde_json::from_str::<ErrorResponse>(&text)
                .unwrap_or_default()
                .errors
                .join("; ");
            return Err(fail(
                Some(status.as_u16()),
                format!("HTTP {}: {errors}", status.as_u16()),
            ));
        }
        Ok(text)
    }

    /// Looks the token up or renews it if its time has come (see [`TokenStatus`]). On failure
    /// the next attempt is scheduled with back-off (5 s doubling to 60 s, and never later than
    /// a third of the time the token has left). Logs the outcome; never the token.
    pub async fn renew_token_if_due(&self) -> Result<TokenStatus, VaultTokenError> {
        // Lifetimes count from before the request: the time it takes is not left to the token.
        let now = self.clock.now();
        let (renew, expires_at) = {
            let st = self.token.lock();
            if st.non_expiring {
                return Ok(TokenStatus::NonExpiring);
            }
            if now < st.next_check {
                return Ok(TokenStatus::NotDue);
            }
            (st.renewable == Some(true), st.expires_at)
        };
        let host = self.config.host.as_str();
        let result = if renew {
            self.renew_self().await
        } else {
            self.lookup_self().await
        };
        let mut st = self.token.lock();
        match result {
            Ok((ttl, renewable)) if ttl.is_zero() => {
                st.non_expiring = true;
                st.renewable = Some(renewable);
                st.failures = 0;
                tracing::info!(host, "vault token has no TTL; it is not renewed");
                Ok(TokenStatus::NonExpiring)
            }
            Ok((ttl, renewable)) => {
                st.expires_at = Some(now + ttl);
                st.failures = 0;
                st.renewable = Some(renewable);
                if renewable {
                    st.next_check = now + ttl * RENEW_AFTER.0 / RENEW_AFTER.1;
                    tracing::info!(
                        host,
                        ttl_secs = ttl.as_secs(),
                        renew_in_secs = (ttl * RENEW_AFTER.0 / RENEW_AFTER.1).as_secs(),
                        renewed = renew,
                        "vault token valid"
                    );
                    Ok(if renew {
                        TokenStatus::Renewed { ttl }
                    } else {
                        TokenStatus::LookedUp { ttl }
                    })
                } else {
                    let err = VaultTokenError {
                        host: host.to_owned(),
                        action: RENEW,
                        status: None,
                        message: format!(
                            "the token is not renewable; it expires in {}s, after which Vault refuses to issue",
                            ttl.as_secs()
                        ),
                    };
                    Err(self.schedule_retry(&mut st, now, Some(now + ttl), err))
                }
            }
            Err(err) => Err(self.schedule_retry(&mut st, now, expires_at, err)),
        }
    }

    fn schedule_retry(
        &self,
        st: &mut TokenState,
        now: SystemTime,
        expires_at: Option<SystemTime>,
        err: VaultTokenError,
    ) -> VaultTokenError {
        st.failures = st.failures.saturating_add(1);
        let mut delay = RETRY_MIN
            .saturating_mul(1 << st.failures.saturating_sub(1).min(8))
            .min(RETRY_MAX);
        let left = expires_at.and_then(|t| t.duration_since(now).ok());
        if let Some(left) = left {
            delay = delay.min((left / 3).max(Duration::from_secs(1)));
        }
        st.next_check = now + delay;
        fsm_errcode::error!(
            err.err_code(),
            host = %self.config.host,
            error = %err,
            failures = st.failures,
            retry_in_secs = delay.as_secs(),
            expires_in_secs = left.map(|d| d.as_secs()),
            "vault token could not be renewed; certificates are issued with it until it expires"
        );
        err
    }

    /// Decodes a token endpoint's JSON reply; a reply of another shape is a token error.
    fn token_reply<T: serde::de::DeserializeOwned>(
        &self,
        action: &'static str,
        text: &str,
    ) -> Result<T, VaultTokenError> {
        serde_json::from_str(text).map_err(|e| VaultTokenError {
            host: self.config.host.clone(),
            action,
            status: Some(200),
            message: format!(
                "unexpected response: {:?} error at line {} column {}",
                e.classify(),
                e.line(),
                e.column()
            ),
        })
    }

    async fn lookup_self(&self) -> Result<(Duration, bool), VaultTokenError> {
        let text = self.token_call(LOOKUP, "auth/token/lookup-self").await?;
        let parsed: LookupResponse = self.token_reply(LOOKUP, &text)?;
        Ok((Duration::from_secs(parsed.data.ttl), parsed.data.renewable))
    }

    async fn renew_self(&self) -> Result<(Duration, bool), VaultTokenError> {
        let text = self.token_call(RENEW, "auth/token/renew-self").await?;
        let parsed: RenewResponse = self.token_reply(RENEW, &text)?;
        Ok((
            Duration::from_secs(parsed.auth.lease_duration),
            parsed.auth.renewable,
        ))
    }

    /// Keeps the token alive for as long as the provider lives: checks it every `tick` (at
    /// most) and renews it when due. Returns once the token turns out to have no TTL.
    pub async fn run_token_renewal(self: Arc<Self>, tick: Duration) {
        loop {
            // Errors are logged (with their code) and rescheduled inside.
            if let Ok(TokenStatus::NonExpiring) = self.renew_token_if_due().await {
                return;
            }
            let until = self
                .token
                .lock()
                .next_check
                .duration_since(self.clock.now())
                .unwrap_or_default();
            tokio::time::sleep(until.min(tick).max(Duration::from_millis(10))).await;
        }
    }
}

/// The rustls error in `err`, which travels inside (possibly nested) `io::Error`s, whose
/// `source()` skips what they wrap.
fn find_rustls_error<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    if let Some(r) = err.downcast_ref::<rustls::Error>() {
        return Some(r);
    }
    let inner = err.downcast_ref::<std::io::Error>()?.get_ref()?;
    find_rustls_error(inner)
}

fn ensure_newline(mut s: String) -> String {
    if !s.ends_with('\n') {
        s.push('\n');
    }
    s
}

#[async_trait]
impl CertificateProvider for VaultProvider {
    async fn issue(&self, req: &CertificateRequest) -> Result<IssuedCertificate, CertError> {
        req.validate()?;
        let body = serde_json::json!({
            "common_name": req.common_name,
            "alt_names": req.dns_sans.join(","),
            "uri_sans": req.uri_sans.join(","),
            "ttl": format!("{}s", req.validity.as_secs().max(1)),
            "format": "pem",
        });
        tracing::debug!(url = %self.url, cn = %req.common_name, "vault: issuing certificate");
        let resp = self
            .http
            .post(&self.url)
            .header("X-Vault-Token", self.config.token.as_str())
            .json(&body)
            .send()
            .await
            .map_err(|e| CertError::Issue {
                provider: NAME,
                common_name: req.common_name.clone(),
                message: self.describe_send_error(&self.url, &e),
                source: Some(Box::new(e)),
            })?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| CertError::Issue {
            provider: NAME,
            common_name: req.common_name.clone(),
            message: "reading the response failed".into(),
            source: Some(Box::new(e)),
        })?;
        if !status.is_success() {
            let errors = serde_json::from_str::<ErrorResponse>(&text)
                .unwrap_or_default()
                .errors
                .join("; ");
            // Returned, and logged with its code by the certificate manager.
            tracing::debug!(url = %self.url, status = status.as_u16(), errors = %errors, "vault refused to issue");
            if status.as_u16() == 401 || status.as_u16() == 403 {
                return Err(CertError::Unauthorized {
                    provider: NAME,
                    status: status.as_u16(),
                    message: errors,
                });
            }
            return Err(self.issue_err(req, format!("HTTP {}: {errors}", status.as_u16())));
        }
        // The body holds a private key: never include it in an error message.
        let parsed: IssueResponse = serde_json::from_str(&text).map_err(|e| {
            self.issue_err(
                req,
                format!(
                    "unexpected response: {:?} error at line {} column {}",
                    e.classify(),
                    e.line(),
                    e.column()
                ),
            )
        })?;
        drop(Zeroizing::new(text));
        let data = parsed.data;
        let root = data
            .ca_chain
            .last()
            .cloned()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| data.issuing_ca.clone());
        if root.is_empty() && self.config.trust_bundle_pem.is_none() {
            return Err(self.issue_err(req, "response has no issuing_ca".into()));
        }
        // Leaf, then every CA in the chain but the root.
        let mut chain = ensure_newline(data.certificate.clone());
        let intermediates: Vec<&String> = if data.ca_chain.is_empty() {
            if data.issuing_ca != root {
                vec![&data.issuing_ca]
            } else {
                vec![]
            }
        } else {
            data.ca_chain[..data.ca_chain.len() - 1].iter().collect()
        };
        for ca in intermediates {
            chain.push_str(&ensure_newline(ca.clone()));
        }
        let issuing_ca = if data.issuing_ca.is_empty() {
            root.clone()
        } else {
            data.issuing_ca.clone()
        };
        let trust_bundle = self
            .config
            .trust_bundle_pem
            .clone()
            .unwrap_or_else(|| ensure_newline(root));
        // The leaf must parse, and must be the one we asked for.
        let issued = IssuedCertificate::from_pem(
            chain,
            PrivateKeyPem::new(data.private_key.as_str()),
            ensure_newline(issuing_ca),
            trust_bundle,
        )?;
        if issued.common_name != req.common_name {
            return Err(self.issue_err(req, format!("vault issued CN {:?}", issued.common_name)));
        }
        let _ = x509::certificates_der(&issued.trust_bundle_pem)?;
        Ok(issued)
    }

    fn name(&self) -> &'static str {
        NAME
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_and_debug() {
        let mut c = VaultConfig::new("127.0.0.1", "s3cr3t-token");
        c.pki_mount = "/pki_int/".into();
        assert_eq!(c.issue_url(), "http://127.0.0.1:8200/v1/pki_int/issue/fsm");
        let printed = format!("{c:?}");
        assert!(!printed.contains("s3cr3t-token"), "{printed}");
    }
}
