//! The one error type of the crate. Every variant maps to the FSM error code that fits it
//! (E4000–E4016 for certificates, E5001 for a malformed xDS certificate common name), so that the
//! controller can log it in the `code` field and count it in `fsm_error_err_code_count`.

use std::time::SystemTime;

use fsm_errcode::{ErrCode, HasErrCode};

/// Boxed source error, so that provider-specific errors (kube, reqwest, rcgen, io) can be kept as
/// the `#[source]` of a variant without leaking their types into the API.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong while issuing, loading, checking or rotating a certificate.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// The request is unusable (empty common name, zero validity, bad SAN …). Code E4014.
    #[error("invalid certificate request: {0}")]
    InvalidRequest(String),

    /// The Kubernetes Secret holding the CA could not be read. Code E4000.
    #[error("could not get secret {namespace}/{name}")]
    SecretGet {
        namespace: String,
        name: String,
        #[source]
        source: BoxError,
    },

    /// The Secret exists but lacks `key`. `ca.crt` → E4001, `private.key` → E4002,
    /// `expiration` → E4003, any other key → E4000.
    #[error("secret {namespace}/{name} has no {key:?} key")]
    SecretKeyMissing {
        namespace: String,
        name: String,
        key: &'static str,
    },

    /// The `expiration` entry of the CA Secret could not be parsed. Code E4004.
    #[error("secret {namespace}/{name}: expiration {value:?} could not be parsed")]
    ExpirationParse {
        namespace: String,
        name: String,
        value: String,
    },

    /// The Secret (or manifest-mode file) holding the CA could not be created. Code E4005.
    #[error("could not create CA store {what}")]
    SecretCreate {
        what: String,
        #[source]
        source: BoxError,
    },

    /// A private key could not be generated. Code E4006.
    #[error("private key generation failed")]
    KeyGeneration(#[source] BoxError),

    /// The CertificateRequest (cert-manager.io) could not be created. Code E4008.
    #[error("certificate request {0} could not be created")]
    RequestCreate(String, #[source] BoxError),

    /// The root certificate could not be created or loaded. Code E4009.
    #[error("root certificate could not be created: {0}")]
    RootCreate(String),

    /// A PEM certificate could not be decoded or parsed. Code E4011.
    #[error("PEM certificate could not be decoded: {0}")]
    CertificateDecode(String),

    /// The CA private key could not be decoded. Code E4012. (The key itself is never printed.)
    #[error("CA private key could not be decoded: {0}")]
    PrivateKeyDecode(String),

    /// The provider refused or failed to issue (bad token, Denied/Failed request, HTTP error,
    /// timeout …). Code E4013.
    #[error("{provider} could not issue {common_name}: {message}")]
    Issue {
        provider: &'static str,
        common_name: String,
        message: String,
        #[source]
        source: Option<BoxError>,
    },

    /// The provider rejected the credentials (Vault 401/403). Code E4013.
    #[error("{provider} rejected the credentials (HTTP {status}): {message}")]
    Unauthorized {
        provider: &'static str,
        status: u16,
        message: String,
    },

    /// cert-manager.io denied the CertificateRequest (`Denied` condition). Code E4013.
    #[error("certificate request {request} was denied: {message}")]
    Denied { request: String, message: String },

    /// Signing failed while building the certificate itself. Code E4014.
    #[error("certificate could not be created: {0}")]
    Build(String),

    /// The CA is unusable: expired, not yet valid, or not a CA. Code E4015.
    #[error("the certificate authority {subject} is invalid: {reason}")]
    InvalidCa { subject: String, reason: String },

    /// A leaf certificate is past its `not_after`. Code E4016 (it was not rotated in time).
    #[error("certificate {common_name} expired at {not_after:?}")]
    Expired {
        common_name: String,
        not_after: SystemTime,
    },

    /// A leaf certificate's `not_before` is in the future. Code E4016.
    #[error("certificate {common_name} is not valid before {not_before:?}")]
    NotYetValid {
        common_name: String,
        not_before: SystemTime,
    },

    /// Rotation of a cached certificate failed. Code E4016.
    #[error("certificate {common_name} could not be rotated")]
    Rotation {
        common_name: String,
        #[source]
        source: Box<CertError>,
    },

    /// An xDS certificate common name is not `<proxy-UUID>.<kind>.<sa>.<ns>`. Code E5001.
    #[error("xDS certificate common name {cn:?} could not be parsed: {reason}")]
    XdsCommonName { cn: String, reason: String },
}

impl HasErrCode for CertError {
    fn err_code(&self) -> ErrCode {
        match self {
            CertError::InvalidRequest(_) | CertError::Build(_) => ErrCode::E4014,
            CertError::SecretGet { .. } => ErrCode::E4000,
            CertError::SecretKeyMissing { key, .. } => match *key {
                crate::tresor::SECRET_KEY_CA_CERT => ErrCode::E4001,
                crate::tresor::SECRET_KEY_PRIVATE_KEY => ErrCode::E4002,
                crate::tresor::SECRET_KEY_EXPIRATION => ErrCode::E4003,
                // Any other key (e.g. the Vault token's): the secret is unusable as retrieved.
                _ => ErrCode::E4000,
            },
            CertError::ExpirationParse { .. } => ErrCode::E4004,
            CertError::SecretCreate { .. } => ErrCode::E4005,
            CertError::KeyGeneration(_) => ErrCode::E4006,
            CertError::RequestCreate(..) => ErrCode::E4008,
            CertError::RootCreate(_) => ErrCode::E4009,
            CertError::CertificateDecode(_) => ErrCode::E4011,
            CertError::PrivateKeyDecode(_) => ErrCode::E4012,
            CertError::Issue { .. } | CertError::Unauthorized { .. } | CertError::Denied { .. } => {
                ErrCode::E4013
            }
            CertError::InvalidCa { .. } => ErrCode::E4015,
            CertError::Expired { .. }
            | CertError::NotYetValid { .. }
            | CertError::Rotation { .. } => ErrCode::E4016,
            CertError::XdsCommonName { .. } => ErrCode::E5001,
        }
    }
}

impl CertError {
    /// The FSM error code of this error (same as [`HasErrCode::err_code`]).
    pub fn code(&self) -> ErrCode {
        self.err_code()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_key_codes_follow_fsm() {
        let missing = |key| CertError::SecretKeyMissing {
            namespace: "fsm-system".into(),
            name: "fsm-ca-bundle".into(),
            key,
        };
        assert_eq!(missing("ca.crt").code(), ErrCode::E4001);
        assert_eq!(missing("private.key").code(), ErrCode::E4002);
        assert_eq!(missing("expiration").code(), ErrCode::E4003);
    }

    #[test]
    fn expiry_and_cn_codes() {
        let expired = CertError::Expired {
            common_name: "a.b.cluster.local".into(),
            not_after: SystemTime::UNIX_EPOCH,
        };
        assert_eq!(expired.code(), ErrCode::E4016);
        let cn = CertError::XdsCommonName {
            cn: "x".into(),
            reason: "short".into(),
        };
        assert_eq!(cn.code(), ErrCode::E5001);
        assert_eq!(cn.code().to_string(), "E5001");
    }
}
