//! The data that crosses the provider seam: what is asked for ([`CertificateRequest`]) and what
//! comes back ([`IssuedCertificate`], whose private key is a [`PrivateKeyPem`]).

use std::fmt;
use std::time::{Duration, SystemTime};

use zeroize::Zeroizing;

use crate::error::CertError;
use crate::x509;

// === CertPurpose ===

/// What a leaf certificate is for. Each purpose is told apart by its subject alternative names
/// (a service certificate carries the SPIFFE URI SAN, the others never do; checked by every
/// peer) and, where the provider lets the requester choose, by its extended key usage.
/// A Vault role fixes the extended key usage of everything it issues (`server_flag`,
/// `client_flag`), so Vault certificates of every purpose carry the role's usages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum CertPurpose {
    /// Sidecar-to-sidecar mTLS: the same certificate serves inbound and dials outbound, so
    /// serverAuth and clientAuth. Must carry the SPIFFE URI SAN.
    #[default]
    Mesh,
    /// A proxy's xDS bootstrap certificate, presented only to the ADS server: clientAuth only.
    XdsClient,
    /// A control-plane server's certificate (the ADS server's): serverAuth only.
    Server,
}

impl CertPurpose {
    /// (serverAuth, clientAuth)
    pub fn auth_usages(self) -> (bool, bool) {
        match self {
            CertPurpose::Mesh => (true, true),
            CertPurpose::XdsClient => (false, true),
            CertPurpose::Server => (true, false),
        }
    }
}

// === CertificateRequest ===

/// What a provider is asked to issue: a leaf (end-entity) certificate for one [`CertPurpose`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CertificateRequest {
    /// Subject common name, e.g. `bookbuyer.bookstore.cluster.local`.
    pub common_name: String,
    /// DNS subject alternative names.
    pub dns_sans: Vec<String>,
    /// URI subject alternative names, e.g. `spiffe://cluster.local/ns/bookstore/sa/bookbuyer`.
    pub uri_sans: Vec<String>,
    /// Requested lifetime (`not_after - not_before`).
    pub validity: Duration,
    /// Sets the extended key usage where the provider allows it. Default [`CertPurpose::Mesh`].
    pub purpose: CertPurpose,
}

/// The longest CommonName a request may carry. FSM's node ids, which its certificates carry as
/// CommonName, exceed X.509's 64-byte ub-common-name for ordinary names (its own bookstore demo:
/// `<uuid>.sidecar.bookwarehouse.bookwarehouse`, 72 bytes), and FSM issues them (Go, BoringSSL,
/// webpki and rcgen all take longer names). This bounds what such a name can be: a UUID, a
/// service account of up to 253 bytes, a namespace of up to 63.
const MAX_COMMON_NAME: usize = 512;

impl CertificateRequest {
    /// A request with no SANs.
    pub fn new(common_name: impl Into<String>, validity: Duration) -> Self {
        Self {
            common_name: common_name.into(),
            dns_sans: Vec::new(),
            uri_sans: Vec::new(),
            validity,
            purpose: CertPurpose::Mesh,
        }
    }

    /// Sets what the certificate is for.
    pub fn with_purpose(mut self, purpose: CertPurpose) -> Self {
        self.purpose = purpose;
        self
    }

    /// Adds a DNS SAN.
    pub fn with_dns_san(mut self, san: impl Into<String>) -> Self {
        self.dns_sans.push(san.into());
        self
    }

    /// Adds a URI SAN.
    pub fn with_uri_san(mut self, san: impl Into<String>) -> Self {
        self.uri_sans.push(san.into());
        self
    }

    /// Rejects requests no provider should see (E4014).
    pub fn validate(&self) -> Result<(), CertError> {
        if self.common_name.is_empty() {
            return Err(CertError::InvalidRequest("empty common name".into()));
        }
        if self.common_name.len() > MAX_COMMON_NAME {
            return Err(CertError::InvalidRequest(format!(
                "common name {:?} is longer than {MAX_COMMON_NAME} bytes",
                self.common_name
            )));
        }
        if self.validity.is_zero() {
            return Err(CertError::InvalidRequest(format!(
                "zero validity for {}",
                self.common_name
            )));
        }
        if let Some(bad) = self
            .dns_sans
            .iter()
            .chain(&self.uri_sans)
            .find(|s| s.is_empty() || s.contains(','))
        {
            return Err(CertError::InvalidRequest(format!(
                "bad SAN {bad:?} for {}",
                self.common_name
            )));
        }
        // Peers accept a client certificate on a meshed port only with a SPIFFE URI SAN, and
        // the ADS server refuses one that has it: only mesh certificates may carry it.
        if self.purpose != CertPurpose::Mesh
            && let Some(spiffe) = self.uri_sans.iter().find(|u| is_spiffe_uri(u))
        {
            return Err(CertError::InvalidRequest(format!(
                "{:?} certificate {} must not carry the SPIFFE URI SAN {spiffe:?}",
                self.purpose, self.common_name
            )));
        }
        Ok(())
    }
}

/// Whether `uri` is a SPIFFE ID (scheme compared case-insensitively, as URI schemes are).
pub fn is_spiffe_uri(uri: &str) -> bool {
    uri.get(..9)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("spiffe://"))
}

// === PrivateKeyPem ===

/// A PEM-encoded private key. The buffer is zeroed on drop, and neither `Debug` nor `Display`
/// ever print it; read it with [`PrivateKeyPem::expose_pem`] only to hand it to its owner.
#[derive(Clone, PartialEq, Eq)]
pub struct PrivateKeyPem(Zeroizing<String>);

impl PrivateKeyPem {
    pub fn new(pem: impl Into<String>) -> Self {
        Self(Zeroizing::new(pem.into()))
    }

    /// The PEM text. Callers must not log it.
    pub fn expose_pem(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for PrivateKeyPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKeyPem(<redacted>)")
    }
}

// === IssuedCertificate ===

/// A certificate as issued by a provider.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuedCertificate {
    /// Subject common name, as issued.
    pub common_name: String,
    /// The leaf first, then any intermediates, PEM.
    pub cert_chain_pem: String,
    /// The leaf's private key.
    pub private_key: PrivateKeyPem,
    /// The CA that signed the leaf, PEM.
    pub issuing_ca_pem: String,
    /// Every root a peer should trust, PEM, concatenated. During a root rotation it holds the
    /// old and the new root (see [`crate::CertManager::rotate_root`]).
    pub trust_bundle_pem: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// Serial number, lower-case hex without separators.
    pub serial: String,
}

impl IssuedCertificate {
    /// Builds the record from the PEM a provider got back, reading dates and serial from the
    /// leaf (the first certificate of `cert_chain_pem`).
    pub fn from_pem(
        cert_chain_pem: String,
        private_key: PrivateKeyPem,
        issuing_ca_pem: String,
        trust_bundle_pem: String,
    ) -> Result<Self, CertError> {
        let info = x509::leaf_info(&cert_chain_pem)?;
        Ok(Self {
            common_name: info.common_name,
            cert_chain_pem,
            private_key,
            issuing_ca_pem,
            trust_bundle_pem,
            not_before: info.not_before,
            not_after: info.not_after,
            serial: info.serial,
        })
    }

    /// Total lifetime, `not_after - not_before` (zero if inverted).
    pub fn lifetime(&self) -> Duration {
        self.not_after
            .duration_since(self.not_before)
            .unwrap_or_default()
    }

    /// `Ok` if `now` is within `[not_before, not_after]`; otherwise
    /// [`CertError::NotYetValid`] or [`CertError::Expired`] (both E4016).
    pub fn check_validity(&self, now: SystemTime) -> Result<(), CertError> {
        if now < self.not_before {
            return Err(CertError::NotYetValid {
                common_name: self.common_name.clone(),
                not_before: self.not_before,
            });
        }
        if now > self.not_after {
            return Err(CertError::Expired {
                common_name: self.common_name.clone(),
                not_after: self.not_after,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_key_debug_is_redacted() {
        let key = PrivateKeyPem::new("-----BEGIN PRIVATE KEY-----\nSECRET\n");
        let printed = format!("{key:?}");
        assert!(!printed.contains("SECRET"), "{printed}");
        assert!(printed.contains("redacted"));
    }

    #[test]
    fn request_validation() {
        let ok = CertificateRequest::new("a.b.cluster.local", Duration::from_secs(60));
        assert!(ok.validate().is_ok());
        assert!(
            CertificateRequest::new("", Duration::from_secs(60))
                .validate()
                .is_err()
        );
        assert!(
            CertificateRequest::new("a", Duration::ZERO)
                .validate()
                .is_err()
        );
        assert!(ok.clone().with_dns_san("a,b").validate().is_err());
        let spiffe = "spiffe://cluster.local/ns/b/sa/a";
        assert!(ok.clone().with_uri_san(spiffe).validate().is_ok());
        for purpose in [CertPurpose::XdsClient, CertPurpose::Server] {
            let wrong = ok
                .clone()
                .with_purpose(purpose)
                .with_uri_san("SPIFFE://td/ns/b/sa/a");
            assert!(wrong.validate().is_err(), "{purpose:?}");
        }
        let bookwarehouse =
            "5b1e3c2a-0d4f-4a6b-8c9d-0e1f2a3b4c55.sidecar.bookwarehouse.bookwarehouse";
        assert!(
            CertificateRequest::new(bookwarehouse, Duration::from_secs(1))
                .validate()
                .is_ok(),
            "FSM's node ids exceed 64 bytes"
        );
        assert!(
            CertificateRequest::new("x".repeat(513), Duration::from_secs(1))
                .validate()
                .is_err()
        );
    }
}
