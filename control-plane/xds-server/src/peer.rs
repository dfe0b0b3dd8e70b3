//! Which proxy a stream's client certificate names: the subject common name of the leaf of the
//! chain the TLS handshake verified, parsed by [`XdsCertIdentity::from_common_name`].
//!
//! The certificate is trusted as it comes: the listener ([`crate::tls`]) only completes
//! handshakes whose chain verifies to the client CA, so here only its name is read.

use fsm_errcode::{ErrCode, HasErrCode};
use rustls_pki_types::CertificateDer;

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
    Ok(XdsCertIdentity::from_common_name(cn)?)
}
