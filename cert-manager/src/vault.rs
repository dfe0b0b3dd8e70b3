//! Vault: the PKI secrets engine over HTTP.
//!
//! Each certificate is one `POST {protocol}://{host}:{port}/v1/{pki mount}/issue/{role}` with the
//! `X-Vault-Token` header and a JSON body `{common_name, alt_names, uri_sans, ttl, format}`;
//! Vault generates the key and returns `certificate`, `issuing_ca`, `ca_chain`, `private_key`,
//! `serial_number`. Settings are FSM's (`fsm.vault.host`, `.port`, `.protocol`, `.token` or
//! `.secret.name`/`.secret.key`, `.role`); the root's key never leaves Vault. The token is never
//! logged.
//!
//! `https` needs a TLS-enabled `reqwest` (the workspace builds it without TLS features today).

use std::time::Duration;

use async_trait::async_trait;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use serde::Deserialize;
use zeroize::Zeroizing;

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
        }
    }

    /// The issue endpoint, `{protocol}://{host}:{port}/v1/{mount}/issue/{role}`.
    pub fn issue_url(&self) -> String {
        format!(
            "{}://{}:{}/v1/{}/issue/{}",
            self.protocol,
            self.host,
            self.port,
            self.pki_mount.trim_matches('/'),
            self.role
        )
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

/// The Vault PKI secrets engine as a [`CertificateProvider`].
#[derive(Debug)]
pub struct VaultProvider {
    config: VaultConfig,
    url: String,
    http: reqwest::Client,
}

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

impl VaultProvider {
    pub fn new(config: VaultConfig) -> Result<Self, CertError> {
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .build()
            .map_err(|e| CertError::InvalidRequest(format!("vault HTTP client: {e}")))?;
        let url = config.issue_url();
        Ok(Self { config, url, http })
    }

    fn issue_err(&self, req: &CertificateRequest, message: String) -> CertError {
        CertError::Issue {
            provider: NAME,
            common_name: req.common_name.clone(),
            message,
            source: None,
        }
    }
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
                message: format!("request to {} failed", self.url),
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
            tracing::warn!(url = %self.url, status = status.as_u16(), errors = %errors, "vault refused to issue");
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
