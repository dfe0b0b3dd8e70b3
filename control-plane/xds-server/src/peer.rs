//! Which proxy a stream's client certificate names: the subject common name of the leaf of the
//! chain the TLS handshake verified, parsed by [`XdsCertIdentity::from_common_name`].
//!
//! The certificate is trusted as it comes: the listener ([`crate::tls`]) only completes
//! handshakes whose chain verifies to the client CA (and, when it has an extended key usage,
//! allows clientAuth), so here only its names are read.
//!
//! One purpose per certificate: a service certificate, the one sidecars present to each other,
//! carries the SPIFFE URI SAN `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`; an xDS bootstrap
//! certificate never does. A client certificate with a SPIFFE URI SAN is therefore refused here
//! whatever its CN, so that a workload's service certificate can never open an ADS stream (and
//! peers refuse bootstrap certificates, which lack it, on their meshed inbound ports).

use fsm_errcode::{ErrCode, HasErrCode};
use rustls_pki_types::CertificateDer;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use crate::node::{NodeError, XdsCertIdentity};

/// Why a stream's peer has no usable xDS identity; every variant is FSM's E5001.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    #[error(
        "no client certificate: the ADS server requires mTLS with an xDS certificate whose CN is <proxy-UUID>.<kind>.<service-account>.<namespace>"
    )]
    NoCertificate,
    #[error("the client certificate could not be parsed: {0}")]
    Unparsable(String),
    #[error(
        "the client certificate subject has {0} common names, expected exactly one of the form <proxy-UUID>.<kind>.<service-account>.<namespace>"
    )]
    CommonNameCount(usize),
    #[error("the client certificate common name is not a string: {0}")]
    CommonNameEncoding(String),
    #[error(
        "the client certificate {common_name:?} carries the SPIFFE URI SAN {uri:?}: it is a service certificate for sidecar-to-sidecar mTLS, not an xDS certificate"
    )]
    ServiceCertificate { common_name: String, uri: String },
    #[error("the client certificate's subject alternative names could not be parsed: {0}")]
    SubjectAltNames(String),
    #[error(transparent)]
    CommonName(#[from] NodeError),
}

impl HasErrCode for PeerError {
    fn err_code(&self) -> ErrCode {
        ErrCode::E5001
    }
}

/// The identity in `chain` (leaf first, as rustls and tonic's `Request::peer_certs` give it);
/// `None` or an empty chain when the client presented no certificate.
pub fn identity_from_chain(
    chain: Option<&[CertificateDer<'_>]>,
) -> Result<XdsCertIdentity, PeerError> {
    let leaf = chain
        .and_then(<[_]>::first)
        .ok_or(PeerError::NoCertificate)?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| PeerError::Unparsable(e.to_string()))?;
    // Several CNs would leave it to us to pick one; a certificate FSM issued has exactly one.
    let names: Vec<_> = cert.subject().iter_common_name().collect();
    let [name] = names.as_slice() else {
        return Err(PeerError::CommonNameCount(names.len()));
    };
    let cn = name
        .as_str()
        .map_err(|e| PeerError::CommonNameEncoding(e.to_string()))?;
    if let Some(uri) = spiffe_uri_san(&cert)? {
        return Err(PeerError::ServiceCertificate {
            common_name: cn.to_owned(),
            uri,
        });
    }
    Ok(XdsCertIdentity::from_common_name(cn)?)
}

/// The first URI SAN whose scheme is `spiffe` (compared case-insensitively, as URI schemes are).
fn spiffe_uri_san(cert: &X509Certificate<'_>) -> Result<Option<String>, PeerError> {
    let Some(san) = cert
        .subject_alternative_name()
        .map_err(|e| PeerError::SubjectAltNames(e.to_string()))?
    else {
        return Ok(None);
    };
    Ok(san.value.general_names.iter().find_map(|name| match name {
        GeneralName::URI(uri)
            if uri
                .get(..9)
                .is_some_and(|scheme| scheme.eq_ignore_ascii_case("spiffe://")) =>
        {
            Some((*uri).to_owned())
        }
        _ => None,
    }))
}
