//! Reading certificates back with `x509-parser`: the fields the manager needs (CN, SANs, dates,
//! serial) and signature checks along a chain. Used by every provider on what it got back, and
//! by tests to check what was issued.

use std::time::{Duration, SystemTime};

use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::pem::Pem;
use x509_parser::prelude::FromDer;

use crate::error::CertError;

// === CertInfo ===

/// The fields of one certificate the mesh cares about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    pub common_name: String,
    pub dns_sans: Vec<String>,
    pub uri_sans: Vec<String>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// Lower-case hex, no separators.
    pub serial: String,
    pub is_ca: bool,
    /// Usable as a TLS server certificate by its extended key usage (true without the extension).
    pub server_auth: bool,
    /// Usable as a TLS client certificate by its extended key usage (true without the extension).
    pub client_auth: bool,
}

/// The DER of every `CERTIFICATE` block in `pem`, in order.
pub fn certificates_der(pem: &str) -> Result<Vec<Vec<u8>>, CertError> {
    let mut out = Vec::new();
    for block in Pem::iter_from_buffer(pem.as_bytes()) {
        let block = block.map_err(|e| CertError::CertificateDecode(e.to_string()))?;
        if block.label == "CERTIFICATE" {
            out.push(block.contents);
        }
    }
    if out.is_empty() {
        return Err(CertError::CertificateDecode(
            "no CERTIFICATE block in PEM".into(),
        ));
    }
    Ok(out)
}

fn parse_der(der: &[u8]) -> Result<X509Certificate<'_>, CertError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| CertError::CertificateDecode(e.to_string()))?;
    Ok(cert)
}

fn to_system_time(ts: i64) -> SystemTime {
    if ts >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(ts.unsigned_abs())
    } else {
        SystemTime::UNIX_EPOCH - Duration::from_secs(ts.unsigned_abs())
    }
}

fn info_of(cert: &X509Certificate<'_>) -> Result<CertInfo, CertError> {
    let common_name = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or_default()
        .to_owned();
    let mut dns_sans = Vec::new();
    let mut uri_sans = Vec::new();
    if let Some(san) = cert
        .subject_alternative_name()
        .map_err(|e| CertError::CertificateDecode(e.to_string()))?
    {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(d) => dns_sans.push((*d).to_owned()),
                GeneralName::URI(u) => uri_sans.push((*u).to_owned()),
                _ => {}
            }
        }
    }
    let (server_auth, client_auth) = match cert
        .extended_key_usage()
        .map_err(|e| CertError::CertificateDecode(e.to_string()))?
    {
        Some(eku) => (
            eku.value.any || eku.value.server_auth,
            eku.value.any || eku.value.client_auth,
        ),
        None => (true, true),
    };
    let serial = cert
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>();
    Ok(CertInfo {
        common_name,
        dns_sans,
        uri_sans,
        not_before: to_system_time(cert.validity().not_before.timestamp()),
        not_after: to_system_time(cert.validity().not_after.timestamp()),
        serial,
        is_ca: cert.is_ca(),
        server_auth,
        client_auth,
    })
}

/// Parses the first certificate of `pem`.
pub fn leaf_info(pem: &str) -> Result<CertInfo, CertError> {
    let ders = certificates_der(pem)?;
    let der = ders
        .first()
        .ok_or_else(|| CertError::CertificateDecode("empty chain".into()))?;
    info_of(&parse_der(der)?)
}

/// Parses every certificate of `pem`.
pub fn all_info(pem: &str) -> Result<Vec<CertInfo>, CertError> {
    certificates_der(pem)?
        .iter()
        .map(|der| parse_der(der).and_then(|c| info_of(&c)))
        .collect()
}

/// Checks that `chain_pem` (leaf first) is signed link by link and that its last certificate is
/// signed by one of the roots in `trust_bundle_pem`. Dates are not checked here.
pub fn verify_chain(chain_pem: &str, trust_bundle_pem: &str) -> Result<(), CertError> {
    let chain_der = certificates_der(chain_pem)?;
    let roots_der = certificates_der(trust_bundle_pem)?;
    let chain: Vec<X509Certificate<'_>> = chain_der
        .iter()
        .map(|d| parse_der(d))
        .collect::<Result<_, _>>()?;
    let roots: Vec<X509Certificate<'_>> = roots_der
        .iter()
        .map(|d| parse_der(d))
        .collect::<Result<_, _>>()?;
    for pair in chain.windows(2) {
        pair[0]
            .verify_signature(Some(pair[1].public_key()))
            .map_err(|e| {
                CertError::CertificateDecode(format!("chain link does not verify: {e}"))
            })?;
    }
    let last = chain
        .last()
        .ok_or_else(|| CertError::CertificateDecode("empty chain".into()))?;
    // A chain may end with the root itself; then it must be one of the trusted roots.
    let last_der = chain_der.last().map(Vec::as_slice);
    let verified = roots.iter().zip(&roots_der).any(|(root, root_der)| {
        last_der == Some(root_der.as_slice())
            || last.verify_signature(Some(root.public_key())).is_ok()
    });
    if verified {
        Ok(())
    } else {
        Err(CertError::InvalidCa {
            subject: last.issuer().to_string(),
            reason: "chain does not verify to any root of the trust bundle".into(),
        })
    }
}

/// PEM text of one DER certificate.
pub fn der_to_pem(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}
