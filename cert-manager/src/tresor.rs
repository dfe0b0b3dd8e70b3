//! Tresor: the built-in CA. A self-signed root (P-256, 10 years) signs every leaf with rcgen.
//!
//! The root lives in the `fsm-ca-bundle` Secret of the control-plane namespace (keys `ca.crt`,
//! `private.key`, `expiration` — the three data keys FSM's secret has), created if absent and
//! reused if present. Two replicas starting at once are safe: the secret is created with a plain
//! POST (create-if-absent); the loser gets 409 AlreadyExists and adopts the winner's root. In
//! manifest mode (no cluster) the root lives in one PEM file (certificate + key), mode 0600,
//! created atomically with the same create-if-absent rule.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;
use zeroize::Zeroizing;

use crate::error::CertError;
use crate::provider::CertificateProvider;
use crate::types::{CertPurpose, CertificateRequest, IssuedCertificate, PrivateKeyPem};
use crate::x509::{self, CertInfo};

/// Secret key of the root certificate (PEM).
pub const SECRET_KEY_CA_CERT: &str = "ca.crt";
/// Secret key of the root private key (PEM).
pub const SECRET_KEY_PRIVATE_KEY: &str = "private.key";
/// Secret key of the root's expiry, `2036-11-21T17:55:59.000Z` (FSM/OSM `TimeDateLayout`).
pub const SECRET_KEY_EXPIRATION: &str = "expiration";
/// Default Secret name (`fsm.caBundleSecretName`).
pub const DEFAULT_CA_BUNDLE_SECRET: &str = "fsm-ca-bundle";
/// Subject CN of a root Tresor creates.
pub const ROOT_COMMON_NAME: &str = "fsm-ca.flomesh.io";
/// Subject O of every certificate Tresor creates.
pub const ORGANIZATION: &str = "Flomesh";
/// Lifetime of a root Tresor creates: 87600h, as FSM.
pub const ROOT_VALIDITY: Duration = Duration::from_secs(87_600 * 3600);

// === CertificateAuthority ===

/// A CA certificate and its signing key. Signs leaves ([`CertificateAuthority::issue`]) and
/// CSRs ([`CertificateAuthority::sign_csr_pem`], used by the test signers).
pub struct CertificateAuthority {
    cert_pem: String,
    info: CertInfo,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("subject", &self.info.common_name)
            .field("serial", &self.info.serial)
            .field("not_after", &self.info.not_after)
            .finish_non_exhaustive()
    }
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    for b in &mut bytes {
        *b = fastrand::u8(..);
    }
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // no leading zero byte
    SerialNumber::from_slice(&bytes)
}

/// PEM with `\n` line endings (rcgen and `pem` write `\r\n`); the input is zeroed.
fn lf(pem: String) -> Zeroizing<String> {
    let pem = Zeroizing::new(pem);
    Zeroizing::new(pem.replace("\r\n", "\n"))
}

fn build_err(e: rcgen::Error) -> CertError {
    CertError::Build(e.to_string())
}

impl CertificateAuthority {
    /// Generates a new self-signed root, valid from now for `validity`.
    pub fn generate_root(common_name: &str, validity: Duration) -> Result<Self, CertError> {
        let now = SystemTime::now();
        Self::generate_root_valid_between(common_name, now, now + validity)
    }

    /// Generates a new self-signed root valid between the two instants (which may both be in
    /// the past: tests use it to show how an expired root is refused).
    pub fn generate_root_valid_between(
        common_name: &str,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Self, CertError> {
        let key = KeyPair::generate().map_err(|e| CertError::KeyGeneration(Box::new(e)))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, ORGANIZATION);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = OffsetDateTime::from(not_before);
        params.not_after = OffsetDateTime::from(not_after);
        params.serial_number = Some(random_serial());
        let cert = params
            .self_signed(&key)
            .map_err(|e| CertError::RootCreate(e.to_string()))?;
        let cert_pem = lf(cert.pem()).to_string();
        let info = x509::leaf_info(&cert_pem)?;
        Ok(Self {
            cert_pem,
            info,
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA from its certificate and key PEM. An unparsable certificate is E4011, an
    /// unparsable key E4012, a certificate that is not a CA or is outside its validity E4015.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CertError> {
        let info = x509::leaf_info(cert_pem)?;
        if !info.is_ca {
            return Err(CertError::InvalidCa {
                subject: info.common_name,
                reason: "not a CA certificate".into(),
            });
        }
        let key =
            KeyPair::from_pem(key_pem).map_err(|e| CertError::PrivateKeyDecode(e.to_string()))?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)
            .map_err(|e| CertError::CertificateDecode(e.to_string()))?;
        Ok(Self {
            cert_pem: lf(cert_pem.to_owned()).to_string(),
            info,
            issuer,
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key, PEM. Never log it.
    pub fn key_pem(&self) -> PrivateKeyPem {
        PrivateKeyPem::new(lf(self.issuer.key().serialize_pem()).as_str())
    }

    pub fn info(&self) -> &CertInfo {
        &self.info
    }

    /// E4015 if `now` is outside the CA's validity.
    pub fn check_validity(&self, now: SystemTime) -> Result<(), CertError> {
        let reason = if now > self.info.not_after {
            "expired"
        } else if now < self.info.not_before {
            "not yet valid"
        } else {
            return Ok(());
        };
        Err(CertError::InvalidCa {
            subject: self.info.common_name.clone(),
            reason: reason.into(),
        })
    }

    /// Generates a key pair and signs a leaf for `req` (client + server auth), valid from now
    /// for `req.validity`, capped at the CA's own expiry.
    pub fn issue(&self, req: &CertificateRequest) -> Result<IssuedCertificate, CertError> {
        req.validate()?;
        self.check_validity(SystemTime::now())?;
        let key = KeyPair::generate().map_err(|e| CertError::KeyGeneration(Box::new(e)))?;
        let params = self.leaf_params(req)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(build_err)?;
        IssuedCertificate::from_pem(
            lf(cert.pem()).to_string(),
            PrivateKeyPem::new(lf(key.serialize_pem()).as_str()),
            self.cert_pem.clone(),
            self.cert_pem.clone(),
        )
    }

    /// Signs a PEM CSR for `validity`, keeping the CSR's subject and SANs; returns the leaf PEM.
    /// The leaf is for [`CertPurpose::Mesh`] (server and client auth).
    pub fn sign_csr_pem(&self, csr_pem: &str, validity: Duration) -> Result<String, CertError> {
        self.sign_csr_pem_for(csr_pem, validity, CertPurpose::Mesh)
    }

    /// [`CertificateAuthority::sign_csr_pem`] with the extended key usage of `purpose` (as
    /// cert-manager honours a CertificateRequest's `spec.usages`).
    pub fn sign_csr_pem_for(
        &self,
        csr_pem: &str,
        validity: Duration,
        purpose: CertPurpose,
    ) -> Result<String, CertError> {
        let mut csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CertError::CertificateDecode(format!("CSR: {e}")))?;
        let now = OffsetDateTime::now_utc();
        csr.params.not_before = now;
        csr.params.not_after = self.cap(now + validity);
        csr.params.serial_number = Some(random_serial());
        csr.params.is_ca = IsCa::ExplicitNoCa;
        csr.params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        csr.params.extended_key_usages = extended_key_usages(purpose);
        Ok(lf(csr.signed_by(&self.issuer).map_err(build_err)?.pem()).to_string())
    }

    fn cap(&self, t: OffsetDateTime) -> OffsetDateTime {
        let ca_end = OffsetDateTime::from(self.info.not_after);
        t.min(ca_end)
    }

    fn leaf_params(&self, req: &CertificateRequest) -> Result<CertificateParams, CertError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, req.common_name.as_str());
        dn.push(DnType::OrganizationName, ORGANIZATION);
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
        let now = OffsetDateTime::now_utc();
        params.not_before = now;
        params.not_after = self.cap(now + req.validity);
        params.serial_number = Some(random_serial());
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = extended_key_usages(req.purpose);
        params.use_authority_key_identifier_extension = true;
        Ok(params)
    }
}

/// The extended key usages of a leaf for `purpose`, so that a certificate cannot serve where
/// its purpose does not (an xDS bootstrap certificate as a TLS server, say).
fn extended_key_usages(purpose: CertPurpose) -> Vec<ExtendedKeyUsagePurpose> {
    let (server, client) = purpose.auth_usages();
    let mut out = Vec::new();
    if server {
        out.push(ExtendedKeyUsagePurpose::ServerAuth);
    }
    if client {
        out.push(ExtendedKeyUsagePurpose::ClientAuth);
    }
    out
}

// === TresorProvider ===

/// The built-in CA as a [`CertificateProvider`].
#[derive(Debug)]
pub struct TresorProvider {
    ca: CertificateAuthority,
}

impl TresorProvider {
    pub fn new(ca: CertificateAuthority) -> Self {
        Self { ca }
    }

    /// A provider with a fresh in-memory root (tests, or a root rotation's new root).
    pub fn generate() -> Result<Self, CertError> {
        CertificateAuthority::generate_root(ROOT_COMMON_NAME, ROOT_VALIDITY).map(Self::new)
    }

    pub fn ca(&self) -> &CertificateAuthority {
        &self.ca
    }

    /// Cluster mode: reads the root from Secret `namespace/name`; when it does not exist,
    /// generates one and creates the Secret (see [`TresorProvider::create_or_adopt_secret`]).
    pub async fn load_or_create_in_secret(
        client: Client,
        namespace: &str,
        name: &str,
    ) -> Result<Self, CertError> {
        let api: Api<Secret> = Api::namespaced(client, namespace);
        match api.get_opt(name).await {
            Ok(Some(secret)) => {
                tracing::info!(namespace, name, "using the existing root CA secret");
                Self::from_secret(&secret, namespace, name)
            }
            Ok(None) => Self::create_or_adopt_secret(&api, namespace, name).await,
            Err(e) => Err(CertError::SecretGet {
                namespace: namespace.into(),
                name: name.into(),
                source: Box::new(e),
            }),
        }
    }

    /// Generates a root and creates the Secret holding it; if another replica created it first
    /// (409 AlreadyExists), reads and adopts that replica's root instead.
    pub async fn create_or_adopt_secret(
        api: &Api<Secret>,
        namespace: &str,
        name: &str,
    ) -> Result<Self, CertError> {
        let ca = CertificateAuthority::generate_root(ROOT_COMMON_NAME, ROOT_VALIDITY)?;
        let secret = secret_for(&ca, namespace, name);
        match api.create(&PostParams::default(), &secret).await {
            Ok(_) => {
                tracing::info!(namespace, name, serial = %ca.info.serial, "created a new root CA secret");
                Ok(Self::new(ca))
            }
            Err(kube::Error::Api(status)) if status.code == 409 => {
                tracing::info!(
                    namespace,
                    name,
                    "root CA secret created by another replica; adopting it"
                );
                let secret = api.get(name).await.map_err(|e| CertError::SecretGet {
                    namespace: namespace.into(),
                    name: name.into(),
                    source: Box::new(e),
                })?;
                Self::from_secret(&secret, namespace, name)
            }
            Err(e) => Err(CertError::SecretCreate {
                what: format!("secret {namespace}/{name}"),
                source: Box::new(e),
            }),
        }
    }

    /// Parses a CA Secret: `ca.crt` (E4001), `private.key` (E4002), `expiration` (E4003 when
    /// missing, E4004 when unparsable); an expired root is E4015.
    pub fn from_secret(secret: &Secret, namespace: &str, name: &str) -> Result<Self, CertError> {
        let get = |key: &'static str| -> Result<Zeroizing<String>, CertError> {
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
                .map(Zeroizing::new)
                .map_err(|_| missing())
        };
        let cert_pem = get(SECRET_KEY_CA_CERT)?;
        let key_pem = get(SECRET_KEY_PRIVATE_KEY)?;
        let expiration = get(SECRET_KEY_EXPIRATION)?;
        parse_expiration(&expiration).ok_or_else(|| CertError::ExpirationParse {
            namespace: namespace.into(),
            name: name.into(),
            value: expiration.to_string(),
        })?;
        let ca = CertificateAuthority::from_pem(&cert_pem, &key_pem)?;
        ca.check_validity(SystemTime::now())?;
        Ok(Self::new(ca))
    }

    /// Manifest mode: reads the root from `path` (PEM certificate + key), or generates one and
    /// writes it there with mode 0600. Concurrent starts agree on one root (the file is linked
    /// into place atomically; the loser reads the winner's).
    pub async fn load_or_create_in_file(path: impl Into<PathBuf>) -> Result<Self, CertError> {
        let path = path.into();
        tokio::task::spawn_blocking(move || load_or_create_file_blocking(&path))
            .await
            .map_err(|e| CertError::RootCreate(format!("CA file task failed: {e}")))?
    }
}

#[async_trait]
impl CertificateProvider for TresorProvider {
    async fn issue(&self, req: &CertificateRequest) -> Result<IssuedCertificate, CertError> {
        self.ca.issue(req)
    }

    fn name(&self) -> &'static str {
        "tresor"
    }
}

/// FSM/OSM's `expiration` layout, `2006-01-02T15:04:05.000Z`.
pub fn format_expiration(t: SystemTime) -> String {
    let t = OffsetDateTime::from(t);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

/// Parses an `expiration` value (RFC 3339, as FSM writes it).
pub fn parse_expiration(s: &str) -> Option<SystemTime> {
    OffsetDateTime::parse(s.trim(), &time::format_description::well_known::Rfc3339)
        .ok()
        .map(SystemTime::from)
}

fn secret_for(ca: &CertificateAuthority, namespace: &str, name: &str) -> Secret {
    let key_pem = ca.key_pem();
    let data = BTreeMap::from([
        (
            SECRET_KEY_CA_CERT.to_owned(),
            ByteString(ca.cert_pem.clone().into_bytes()),
        ),
        (
            SECRET_KEY_PRIVATE_KEY.to_owned(),
            ByteString(key_pem.expose_pem().as_bytes().to_vec()),
        ),
        (
            SECRET_KEY_EXPIRATION.to_owned(),
            ByteString(format_expiration(ca.info.not_after).into_bytes()),
        ),
    ]);
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        data: Some(data),
        ..Secret::default()
    }
}

fn load_or_create_file_blocking(path: &Path) -> Result<TresorProvider, CertError> {
    match std::fs::read_to_string(path) {
        Ok(text) => return from_file_text(path, &Zeroizing::new(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(CertError::SecretGet {
                namespace: String::new(),
                name: path.display().to_string(),
                source: Box::new(e),
            });
        }
    }
    let ca = CertificateAuthority::generate_root(ROOT_COMMON_NAME, ROOT_VALIDITY)?;
    let key_pem = ca.key_pem();
    let contents = Zeroizing::new(format!("{}{}", ca.cert_pem, key_pem.expose_pem()));
    let create_err = |e: std::io::Error| CertError::SecretCreate {
        what: format!("file {}", path.display()),
        source: Box::new(e),
    };
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    std::fs::create_dir_all(dir).map_err(create_err)?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        uuid::Uuid::new_v4()
    ));
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(create_err)?;
        f.write_all(contents.as_bytes()).map_err(create_err)?;
        f.sync_all().map_err(create_err)?;
    }
    // hard_link fails with AlreadyExists if another process won: then use its root.
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            tracing::info!(path = %path.display(), "created a new root CA file");
            Ok(TresorProvider::new(ca))
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let text = Zeroizing::new(std::fs::read_to_string(path).map_err(create_err)?);
            from_file_text(path, &text)
        }
        Err(e) => Err(create_err(e)),
    }
}

fn from_file_text(path: &Path, text: &str) -> Result<TresorProvider, CertError> {
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path)
            && meta.permissions().mode() & 0o077 != 0
        {
            fsm_errcode::warn!(fsm_errcode::ErrCode::E4015, path = %path.display(), mode = format!("{:o}", meta.permissions().mode() & 0o777), "root CA file is readable by others; expected 0600");
        }
    }
    let blocks = pem::parse_many(text).map_err(|e| CertError::CertificateDecode(e.to_string()))?;
    let cert = blocks
        .iter()
        .find(|b| b.tag() == "CERTIFICATE")
        .ok_or_else(|| {
            CertError::CertificateDecode(format!("{}: no CERTIFICATE", path.display()))
        })?;
    let key = blocks
        .iter()
        .find(|b| b.tag().ends_with("PRIVATE KEY"))
        .ok_or_else(|| {
            CertError::PrivateKeyDecode(format!("{}: no PRIVATE KEY", path.display()))
        })?;
    let cert_pem = x509::der_to_pem(cert.contents());
    let key_pem = lf(pem::encode(key));
    let ca = CertificateAuthority::from_pem(&cert_pem, &key_pem)?;
    ca.check_validity(SystemTime::now())?;
    Ok(TresorProvider::new(ca))
}

#[cfg(test)]
mod tests {
    use super::*;
    use fsm_errcode::{ErrCode, HasErrCode};

    #[test]
    fn expiration_round_trips_in_fsm_layout() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(2_000_000_000_123);
        let s = format_expiration(t);
        assert_eq!(s, "2033-05-18T03:33:20.123Z");
        assert_eq!(parse_expiration(&s), Some(t));
        assert_eq!(parse_expiration("tomorrow"), None);
    }

    #[test]
    fn secret_missing_keys_have_fsm_codes() -> Result<(), CertError> {
        let ca = CertificateAuthority::generate_root("test-root", Duration::from_secs(3600))?;
        let full = secret_for(&ca, "fsm-system", "fsm-ca-bundle");
        assert!(TresorProvider::from_secret(&full, "fsm-system", "fsm-ca-bundle").is_ok());
        for (key, code) in [
            (SECRET_KEY_CA_CERT, ErrCode::E4001),
            (SECRET_KEY_PRIVATE_KEY, ErrCode::E4002),
            (SECRET_KEY_EXPIRATION, ErrCode::E4003),
        ] {
            let mut s = full.clone();
            if let Some(d) = s.data.as_mut() {
                d.remove(key);
            }
            let err = TresorProvider::from_secret(&s, "fsm-system", "fsm-ca-bundle").err();
            assert_eq!(err.map(|e| e.err_code()), Some(code), "{key}");
        }
        let mut s = full.clone();
        if let Some(d) = s.data.as_mut() {
            d.insert(SECRET_KEY_EXPIRATION.into(), ByteString(b"never".to_vec()));
        }
        let err = TresorProvider::from_secret(&s, "fsm-system", "fsm-ca-bundle").err();
        assert_eq!(err.map(|e| e.err_code()), Some(ErrCode::E4004));
        let mut s = full;
        if let Some(d) = s.data.as_mut() {
            d.insert(
                SECRET_KEY_PRIVATE_KEY.into(),
                ByteString(b"garbage".to_vec()),
            );
        }
        let err = TresorProvider::from_secret(&s, "fsm-system", "fsm-ca-bundle").err();
        assert_eq!(err.map(|e| e.err_code()), Some(ErrCode::E4012));
        Ok(())
    }

    #[test]
    fn expired_root_is_e4015() -> Result<(), CertError> {
        let ca = CertificateAuthority::generate_root("test-root", Duration::from_secs(60))?;
        let later = SystemTime::now() + Duration::from_secs(120);
        assert_eq!(
            ca.check_validity(later).err().map(|e| e.err_code()),
            Some(ErrCode::E4015)
        );
        Ok(())
    }

    #[test]
    fn ca_debug_does_not_print_the_key() -> Result<(), CertError> {
        let ca = CertificateAuthority::generate_root("test-root", Duration::from_secs(60))?;
        let key = ca.key_pem();
        let printed = format!("{ca:?} {key:?}");
        assert!(!printed.contains("PRIVATE KEY"), "{printed}");
        Ok(())
    }
}
