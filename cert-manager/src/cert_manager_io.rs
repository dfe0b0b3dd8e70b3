//! cert-manager.io: certificates signed by a cert-manager `Issuer`/`ClusterIssuer`.
//!
//! For each certificate we generate the key pair ourselves (it never leaves the control plane),
//! create a `cert-manager.io/v1` `CertificateRequest` whose `spec.request` is the base64 PEM
//! CSR, referencing the configured issuer (FSM: Issuer `fsm-ca`, group `cert-manager.io`), and
//! watch it until cert-manager marks it `Ready` with `status.certificate`, or `Denied` /
//! `Failed`, which become errors (E4013). The request is deleted afterwards, as FSM does.

use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use kube::api::{DeleteParams, ObjectMeta, PostParams};
use kube::runtime::wait::await_condition;
use kube::{Api, Client, CustomResource};
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};
use serde::{Deserialize, Serialize};

use crate::error::CertError;
use crate::provider::CertificateProvider;
use crate::types::{CertPurpose, CertificateRequest, IssuedCertificate, PrivateKeyPem};

const NAME: &str = "cert-manager";

/// Key usages requested for a mesh (sidecar-to-sidecar) leaf (cert-manager's spellings).
pub const USAGES: [&str; 4] = [
    "digital signature",
    "key encipherment",
    "server auth",
    "client auth",
];

/// The `spec.usages` for a leaf of `purpose`: [`USAGES`] less the auth it is not for.
pub fn usages(purpose: CertPurpose) -> Vec<String> {
    let (server, client) = purpose.auth_usages();
    USAGES
        .iter()
        .filter(|u| match **u {
            "server auth" => server,
            "client auth" => client,
            _ => true,
        })
        .map(|u| (*u).to_owned())
        .collect()
}

// === The CertificateRequest resource (the fields we use) ===

/// `cert-manager.io/v1` `CertificateRequest` spec, as much of it as FSM uses.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "cert-manager.io",
    version = "v1",
    kind = "CertificateRequest",
    root = "CmCertificateRequest",
    namespaced,
    status = "CmCertificateRequestStatus",
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct CmCertificateRequestSpec {
    /// Base64 of the PEM CSR.
    pub request: String,
    pub issuer_ref: IssuerRef,
    /// Go duration, e.g. `86400s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub usages: Vec<String>,
    #[serde(rename = "isCA", default, skip_serializing_if = "Option::is_none")]
    pub is_ca: Option<bool>,
}

/// `spec.issuerRef`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct IssuerRef {
    pub name: String,
    /// `Issuer` (default) or `ClusterIssuer`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// `cert-manager.io` (default) or an external issuer's group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

/// `status` of a CertificateRequest.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CmCertificateRequestStatus {
    #[serde(default)]
    pub conditions: Vec<CmCondition>,
    /// Base64 of the PEM chain, set when Ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
    /// Base64 of the PEM CA, if the issuer reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_time: Option<String>,
}

/// One status condition (`Ready`, `Denied`, `Approved`, `InvalidRequest`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CmCondition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Where a CertificateRequest stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestState {
    Pending,
    /// Ready with a certificate (base64 chain, optional base64 CA).
    Ready {
        certificate: String,
        ca: Option<String>,
    },
    Denied(String),
    Failed(String),
}

impl CmCertificateRequest {
    /// Reads the conditions: `Denied=True` → Denied; `InvalidRequest=True` or `Ready=False`
    /// with reason `Failed`/`Denied` → Failed/Denied; `Ready=True` with a certificate → Ready.
    pub fn state(&self) -> RequestState {
        let Some(status) = &self.status else {
            return RequestState::Pending;
        };
        let cond = |t: &str| status.conditions.iter().find(|c| c.type_ == t);
        let msg = |c: &CmCondition| {
            c.message
                .clone()
                .or_else(|| c.reason.clone())
                .unwrap_or_default()
        };
        if let Some(c) = cond("Denied").filter(|c| c.status == "True") {
            return RequestState::Denied(msg(c));
        }
        if let Some(c) = cond("InvalidRequest").filter(|c| c.status == "True") {
            return RequestState::Failed(msg(c));
        }
        if let Some(c) = cond("Ready") {
            match (c.status.as_str(), c.reason.as_deref()) {
                ("True", _) => {
                    if let Some(certificate) = status.certificate.clone().filter(|s| !s.is_empty())
                    {
                        return RequestState::Ready {
                            certificate,
                            ca: status.ca.clone().filter(|s| !s.is_empty()),
                        };
                    }
                }
                ("False", Some("Denied")) => return RequestState::Denied(msg(c)),
                ("False", Some("Failed")) => return RequestState::Failed(msg(c)),
                _ => {}
            }
        }
        RequestState::Pending
    }
}

// === CertManagerIoProvider ===

/// Settings of the cert-manager.io provider.
#[derive(Clone, Debug)]
pub struct CertManagerIoConfig {
    /// Where CertificateRequests are created (the control-plane namespace).
    pub namespace: String,
    /// FSM: `{name: fsm-ca, kind: Issuer, group: cert-manager.io}`.
    pub issuer_ref: IssuerRef,
    /// How long to wait for a request to be signed. Default 60s.
    pub timeout: Duration,
    /// Roots to hand out as the trust bundle when the issuer does not report `status.ca`
    /// (FSM: `ca.crt` of `fsm-ca-bundle`). When both exist this one wins.
    pub trust_bundle_pem: Option<String>,
}

impl CertManagerIoConfig {
    /// FSM's defaults: Issuer `fsm-ca` (`cert-manager.io`) in `namespace`.
    pub fn new(namespace: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            issuer_ref: IssuerRef {
                name: "fsm-ca".into(),
                kind: Some("Issuer".into()),
                group: Some("cert-manager.io".into()),
            },
            timeout: Duration::from_secs(60),
            trust_bundle_pem: None,
        }
    }
}

/// cert-manager.io as a [`CertificateProvider`].
pub struct CertManagerIoProvider {
    api: Api<CmCertificateRequest>,
    config: CertManagerIoConfig,
}

impl std::fmt::Debug for CertManagerIoProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertManagerIoProvider")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

impl CertManagerIoProvider {
    pub fn new(client: Client, config: CertManagerIoConfig) -> Self {
        Self {
            api: Api::namespaced(client, &config.namespace),
            config,
        }
    }

    fn err(
        &self,
        req: &CertificateRequest,
        message: String,
        source: Option<crate::error::BoxError>,
    ) -> CertError {
        CertError::Issue {
            provider: NAME,
            common_name: req.common_name.clone(),
            message,
            source,
        }
    }

    fn csr(req: &CertificateRequest) -> Result<(KeyPair, String), CertError> {
        let key = KeyPair::generate().map_err(|e| CertError::KeyGeneration(Box::new(e)))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, req.common_name.as_str());
        params.distinguished_name = dn;
        let ia5 = |s: &str| {
            rcgen::string::Ia5String::try_from(s)
                .map_err(|e| CertError::InvalidRequest(format!("SAN {s:?}: {e}")))
        };
        for dns in &req.dns_sans {
            params.subject_alt_names.push(SanType::DnsName(ia5(dns)?));
        }
        for uri in &req.uri_sans {
            params.subject_alt_names.push(SanType::URI(ia5(uri)?));
        }
        let csr = params
            .serialize_request(&key)
            .and_then(|c| c.pem())
            .map_err(|e| CertError::Build(e.to_string()))?;
        Ok((key, csr))
    }

    async fn wait(&self, req: &CertificateRequest, name: &str) -> Result<RequestState, CertError> {
        let done = |obj: Option<&CmCertificateRequest>| {
            obj.is_some_and(|o| o.state() != RequestState::Pending)
        };
        let waited = tokio::time::timeout(
            self.config.timeout,
            await_condition(self.api.clone(), name, done),
        )
        .await
        .map_err(|_| {
            self.err(
                req,
                format!(
                    "CertificateRequest {name} not signed within {:?}",
                    self.config.timeout
                ),
                None,
            )
        })?
        .map_err(|e| {
            self.err(
                req,
                format!("watching CertificateRequest {name}"),
                Some(Box::new(e)),
            )
        })?;
        match waited {
            Some(obj) => Ok(obj.state()),
            None => Err(self.err(req, format!("CertificateRequest {name} was deleted"), None)),
        }
    }
}

#[async_trait]
impl CertificateProvider for CertManagerIoProvider {
    async fn issue(&self, req: &CertificateRequest) -> Result<IssuedCertificate, CertError> {
        req.validate()?;
        let (key, csr_pem) = Self::csr(req)?;
        let object = CmCertificateRequest {
            metadata: ObjectMeta {
                generate_name: Some("fsm-".into()),
                namespace: Some(self.config.namespace.clone()),
                ..ObjectMeta::default()
            },
            spec: CmCertificateRequestSpec {
                request: b64().encode(csr_pem.as_bytes()),
                issuer_ref: self.config.issuer_ref.clone(),
                duration: Some(format!("{}s", req.validity.as_secs().max(1))),
                usages: usages(req.purpose),
                is_ca: Some(false),
            },
            status: None,
        };
        let created = self
            .api
            .create(&PostParams::default(), &object)
            .await
            .map_err(|e| CertError::RequestCreate(req.common_name.clone(), Box::new(e)))?;
        let name = created.metadata.name.clone().unwrap_or_default();
        tracing::debug!(request = %name, cn = %req.common_name, "cert-manager: waiting for CertificateRequest");
        let state = self.wait(req, &name).await;
        if let Err(e) = self.api.delete(&name, &DeleteParams::default()).await {
            tracing::debug!(request = %name, error = %e, "could not delete CertificateRequest");
        }
        match state? {
            RequestState::Ready { certificate, ca } => {
                let decode = |what: &str, s: &str| -> Result<String, CertError> {
                    b64()
                        .decode(s.trim())
                        .ok()
                        .and_then(|b| String::from_utf8(b).ok())
                        .ok_or_else(|| {
                            CertError::CertificateDecode(format!("status.{what} of {name}"))
                        })
                };
                let chain = decode("certificate", &certificate)?;
                let ca = ca.map(|c| decode("ca", &c)).transpose()?;
                let trust_bundle = self
                    .config
                    .trust_bundle_pem
                    .clone()
                    .or_else(|| ca.clone())
                    .ok_or_else(|| {
                        self.err(
                            req,
                            format!("{name}: no status.ca and no configured trust bundle"),
                            None,
                        )
                    })?;
                let issued = IssuedCertificate::from_pem(
                    chain,
                    PrivateKeyPem::new(key.serialize_pem()),
                    ca.unwrap_or_else(|| trust_bundle.clone()),
                    trust_bundle,
                )?;
                Ok(issued)
            }
            RequestState::Denied(message) => Err(CertError::Denied {
                request: name,
                message,
            }),
            RequestState::Failed(message) => Err(self.err(
                req,
                format!("CertificateRequest {name} failed: {message}"),
                None,
            )),
            RequestState::Pending => Err(self.err(
                req,
                format!("CertificateRequest {name} still pending"),
                None,
            )),
        }
    }

    fn name(&self) -> &'static str {
        NAME
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(conds: &[(&str, &str, Option<&str>)], cert: Option<&str>) -> CmCertificateRequest {
        let mut cr = CmCertificateRequest::new("x", CmCertificateRequestSpec::default());
        cr.status = Some(CmCertificateRequestStatus {
            conditions: conds
                .iter()
                .map(|(t, s, r)| CmCondition {
                    type_: (*t).into(),
                    status: (*s).into(),
                    reason: r.map(Into::into),
                    message: Some(format!("{t} {s}")),
                })
                .collect(),
            certificate: cert.map(Into::into),
            ..Default::default()
        });
        cr
    }

    #[test]
    fn states() {
        assert_eq!(
            CmCertificateRequest::new("x", Default::default()).state(),
            RequestState::Pending
        );
        assert_eq!(
            with(&[("Approved", "True", None)], None).state(),
            RequestState::Pending
        );
        assert!(matches!(
            with(&[("Denied", "True", None)], None).state(),
            RequestState::Denied(_)
        ));
        assert!(matches!(
            with(&[("Ready", "False", Some("Failed"))], None).state(),
            RequestState::Failed(_)
        ));
        assert!(matches!(
            with(&[("InvalidRequest", "True", None)], None).state(),
            RequestState::Failed(_)
        ));
        // Ready without a certificate is not done yet.
        assert_eq!(
            with(&[("Ready", "True", None)], None).state(),
            RequestState::Pending
        );
        assert!(matches!(
            with(&[("Ready", "True", None)], Some("Zm9v")).state(),
            RequestState::Ready { .. }
        ));
    }

    #[test]
    fn serializes_like_cert_manager() -> Result<(), serde_json::Error> {
        let spec = CmCertificateRequestSpec {
            request: "Q1NS".into(),
            issuer_ref: CertManagerIoConfig::new("fsm-system").issuer_ref,
            duration: Some("86400s".into()),
            usages: USAGES.iter().map(|s| (*s).to_owned()).collect(),
            is_ca: Some(false),
        };
        let v = serde_json::to_value(CmCertificateRequest::new("r", spec))?;
        assert_eq!(v["apiVersion"], "cert-manager.io/v1");
        assert_eq!(v["kind"], "CertificateRequest");
        assert_eq!(v["spec"]["issuerRef"]["name"], "fsm-ca");
        assert_eq!(v["spec"]["issuerRef"]["group"], "cert-manager.io");
        assert_eq!(v["spec"]["isCA"], false, "cert-manager spells it isCA");
        Ok(())
    }

    #[test]
    fn usages_follow_the_purpose() {
        assert_eq!(usages(CertPurpose::Mesh), USAGES);
        assert_eq!(
            usages(CertPurpose::XdsClient),
            ["digital signature", "key encipherment", "client auth"]
        );
        assert_eq!(
            usages(CertPurpose::Server),
            ["digital signature", "key encipherment", "server auth"]
        );
    }
}
