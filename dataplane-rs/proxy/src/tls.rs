//! mTLS between sidecars: `Secret`s parsed into rustls material, the server config of a filter
//! chain, the client config of a cluster (with the mesh's own server-certificate check), and the
//! workload identity a peer certificate carries.
//!
//! rustls configs are built when a [`crate::Config`] is built, never per connection, and are
//! reused across configs while their inputs do not change (every EDS update rebuilds the config;
//! keeping the same rustls objects keeps their session caches and the connection pools keyed on
//! them warm).

use std::collections::HashMap;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, LazyLock, Weak};

use fsm_dataplane_proto::v1;
use parking_lot::Mutex;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    RootCertStore, ServerConfig, SignatureScheme,
};

/// The crypto provider of every rustls config the sidecar builds. Chosen explicitly so that the
/// process-wide default (which other crates may install, or leave ambiguous) never matters.
pub static PROVIDER: LazyLock<Arc<CryptoProvider>> =
    LazyLock::new(|| Arc::new(rustls::crypto::ring::default_provider()));

/// ALPN a TLS filter chain offers: Envoy peers send `h2` for HTTP/2 clusters and nothing for
/// HTTP/1 ones; hyper's auto builder tells the two apart by preface either way.
const SERVER_ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// A workload identity: the service account a peer's certificate names.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Identity {
    pub service_account: Arc<str>,
    pub namespace: Arc<str>,
}

impl Identity {
    pub fn new(service_account: &str, namespace: &str) -> Self {
        Identity {
            service_account: Arc::from(service_account),
            namespace: Arc::from(namespace),
        }
    }

    pub fn from_proto(id: &v1::ServiceIdentity) -> Self {
        Identity::new(&id.service_account, &id.namespace)
    }

    /// From `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`.
    pub fn from_spiffe(uri: &str) -> Option<Self> {
        let rest = uri.strip_prefix("spiffe://")?;
        let (_trust_domain, path) = rest.split_once('/')?;
        let mut parts = path.split('/');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None)
                if !ns.is_empty() && !sa.is_empty() =>
            {
                Some(Identity::new(sa, ns))
            }
            _ => None,
        }
    }

    /// From the common name `<sa>.<ns>.<trust-domain>`.
    pub fn from_common_name(cn: &str) -> Option<Self> {
        let mut parts = cn.splitn(3, '.');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(sa), Some(ns), Some(rest))
                if !sa.is_empty() && !ns.is_empty() && !rest.is_empty() =>
            {
                Some(Identity::new(sa, ns))
            }
            _ => None,
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.service_account)
    }
}

/// What a certificate says about its subject, as the mesh reads it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerCert {
    /// URI subject alternative names, as the certificate spells them.
    pub uris: Vec<String>,
    /// DNS-name subject alternative names, as the certificate spells them.
    pub dns_names: Vec<String>,
    /// The first SPIFFE workload ID (`spiffe://<td>/ns/<ns>/sa/<sa>`) among `uris`.
    pub workload: Option<Identity>,
    /// `workload`, else the common name `<sa>.<ns>.…` (how a server certificate is judged).
    pub identity: Option<Identity>,
}

impl PeerCert {
    /// Every URI and DNS subject alternative name.
    pub fn sans(&self) -> impl Iterator<Item = &str> {
        self.uris.iter().chain(&self.dns_names).map(String::as_str)
    }

    /// Whether one of the subject alternative names is one of `wanted`, compared exactly
    /// (`ValidationContext.match_subject_alt_names`).
    pub fn carries_any(&self, wanted: &[String]) -> bool {
        self.sans().any(|s| wanted.iter().any(|w| w == s))
    }
}

/// Reads a DER certificate's SANs and identity: the SPIFFE URI SAN, else the common name.
pub fn peer_cert(der: &[u8]) -> Option<PeerCert> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let mut peer = PeerCert::default();
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for name in &ext.value.general_names {
            match name {
                GeneralName::URI(uri) => {
                    if peer.workload.is_none() {
                        peer.workload = Identity::from_spiffe(uri);
                    }
                    peer.uris.push((*uri).to_string());
                }
                GeneralName::DNSName(dns) => peer.dns_names.push((*dns).to_string()),
                _ => {}
            }
        }
    }
    peer.identity = peer.workload.clone().or_else(|| {
        cert.subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .and_then(Identity::from_common_name)
    });
    Some(peer)
}

/// The identity of the leaf of a verified peer chain.
pub fn identity_of_chain(chain: Option<&[CertificateDer<'_>]>) -> Option<Identity> {
    chain
        .and_then(|c| c.first())
        .and_then(|leaf| peer_cert(leaf))
        .and_then(|p| p.identity)
}

/// A downstream client as its verified TLS client certificate names it, kept with the
/// connection for `AllowedSources`: its workload identity (`identities`) and, on chains that
/// require client certificates, its subject alternative names (`principals`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Peer {
    /// The SPIFFE workload ID; `None` for a certificate without one (an ingress controller's).
    /// Never read from the common name: a client certificate without a SPIFFE URI SAN is not a
    /// mesh workload's.
    pub identity: Option<Identity>,
    /// DNS-name SANs, lower-cased (DNS names compare without regard to case).
    pub dns_names: Vec<String>,
    /// URI SANs, as the certificate spells them.
    pub uris: Vec<String>,
}

impl Peer {
    /// The client behind a verified peer chain (leaf first, as rustls gives it); `None` when the
    /// client sent no certificate. `names`: keep the subject alternative names too (chains that
    /// require client certificates; elsewhere `principals` admit no one).
    pub fn of_chain(chain: Option<&[CertificateDer<'_>]>, names: bool) -> Option<Peer> {
        let cert = peer_cert(chain?.first()?)?;
        let mut peer = Peer {
            identity: cert.workload,
            ..Peer::default()
        };
        if names {
            peer.dns_names = cert
                .dns_names
                .iter()
                .map(|d| d.to_ascii_lowercase())
                .collect();
            peer.uris = cert.uris;
        }
        Some(peer)
    }
}

impl From<Identity> for Peer {
    fn from(identity: Identity) -> Self {
        Peer {
            identity: Some(identity),
            ..Peer::default()
        }
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.identity {
            Some(id) => write!(f, "{id}")?,
            None => f.write_str("no workload identity")?,
        }
        if !self.dns_names.is_empty() || !self.uris.is_empty() {
            write!(
                f,
                " (SANs: {})",
                [&self.uris[..], &self.dns_names[..]].concat().join(", ")
            )?;
        }
        Ok(())
    }
}

// === Secrets ===

/// A `TlsCertificate` secret, checked: the chain parses and the key is usable and matches it.
pub struct CertSecret {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    fingerprint: u64,
}

impl fmt::Debug for CertSecret {
    // The private key must never reach a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertSecret")
            .field("certificates", &self.chain.len())
            .finish_non_exhaustive()
    }
}

/// A `ValidationContext` secret, checked: at least one CA certificate, each a usable anchor.
#[derive(Debug)]
pub struct CaSecret {
    roots: Arc<RootCertStore>,
    sans: Vec<String>,
    fingerprint: u64,
}

/// The secrets received, by name.
#[derive(Debug, Default)]
pub struct Secrets {
    pub certificates: HashMap<String, CertSecret>,
    pub validation: HashMap<String, CaSecret>,
}

fn fingerprint(parts: &[&[u8]]) -> u64 {
    // SipHash with fixed keys: the same inputs give the same number in every config built by
    // this process, which is all the reuse cache and the connection pools need.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for p in parts {
        p.len().hash(&mut h);
        p.hash(&mut h);
    }
    h.finish()
}

impl Secrets {
    /// Parses one secret; the error names the field (the caller adds the secret's name).
    pub fn add(&mut self, secret: v1::Secret) -> Result<(), (String, String)> {
        match secret.kind {
            None => Err(("kind".into(), "is not set".into())),
            Some(v1::secret::Kind::TlsCertificate(c)) => {
                let chain = CertificateDer::pem_slice_iter(&c.certificate_chain)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| {
                        (
                            "tls_certificate.certificate_chain".into(),
                            format!("invalid PEM: {e}"),
                        )
                    })?;
                if chain.is_empty() {
                    return Err((
                        "tls_certificate.certificate_chain".into(),
                        "holds no PEM certificate".into(),
                    ));
                }
                // The key's own parse error could quote key material; say only what is wrong.
                let key = PrivateKeyDer::from_pem_slice(&c.private_key).map_err(|_| {
                    (
                        "tls_certificate.private_key".into(),
                        "holds no PEM private key (PKCS#8, SEC1 or PKCS#1)".into(),
                    )
                })?;
                rustls::sign::CertifiedKey::from_der(chain.clone(), key.clone_key(), &PROVIDER)
                    .map_err(|e| {
                        (
                            "tls_certificate.private_key".into(),
                            format!("is not usable with the certificate chain: {e}"),
                        )
                    })?;
                let fingerprint = fingerprint(&[&c.certificate_chain, &c.private_key]);
                self.certificates.insert(
                    secret.name,
                    CertSecret {
                        chain,
                        key,
                        fingerprint,
                    },
                );
                Ok(())
            }
            Some(v1::secret::Kind::ValidationContext(v)) => {
                let mut roots = RootCertStore::empty();
                for (i, cert) in CertificateDer::pem_slice_iter(&v.trusted_ca).enumerate() {
                    let cert = cert.map_err(|e| {
                        (
                            "validation_context.trusted_ca".into(),
                            format!("invalid PEM: {e}"),
                        )
                    })?;
                    roots.add(cert).map_err(|e| {
                        (
                            "validation_context.trusted_ca".into(),
                            format!("certificate {i} is not a usable CA: {e}"),
                        )
                    })?;
                }
                if roots.is_empty() {
                    return Err((
                        "validation_context.trusted_ca".into(),
                        "holds no PEM certificate".into(),
                    ));
                }
                let mut parts: Vec<&[u8]> = vec![&v.trusted_ca];
                parts.extend(v.match_subject_alt_names.iter().map(|s| s.as_bytes()));
                let fingerprint = fingerprint(&parts);
                self.validation.insert(
                    secret.name,
                    CaSecret {
                        roots: Arc::new(roots),
                        sans: v.match_subject_alt_names,
                        fingerprint,
                    },
                );
                Ok(())
            }
        }
    }
}

// === Server side (filter chains) ===

/// A filter chain's TLS, resolved against the secrets received.
#[derive(Clone, Debug)]
pub enum DownstreamTls {
    Ready(Arc<ServerConfig>),
    /// A secret it names has not arrived yet: connections are closed until it does.
    Missing(Arc<str>),
}

impl PartialEq for DownstreamTls {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (DownstreamTls::Ready(a), DownstreamTls::Ready(b)) => Arc::ptr_eq(a, b),
            (DownstreamTls::Missing(a), DownstreamTls::Missing(b)) => a == b,
            _ => false,
        }
    }
}

/// Built configs by fingerprint, held weakly: alive while some config uses them.
static SERVER_CACHE: LazyLock<Mutex<HashMap<u64, Weak<ServerConfig>>>> =
    LazyLock::new(Mutex::default);
static CLIENT_CACHE: LazyLock<Mutex<HashMap<u64, Weak<ClusterTls>>>> =
    LazyLock::new(Mutex::default);

fn cached<T>(cache: &Mutex<HashMap<u64, Weak<T>>>, key: u64) -> Option<Arc<T>> {
    cache.lock().get(&key).and_then(Weak::upgrade)
}

fn remember<T>(cache: &Mutex<HashMap<u64, Weak<T>>>, key: u64, value: &Arc<T>) {
    let mut map = cache.lock();
    // Building is rare (secrets or TLS settings changed): drop what no config uses any more.
    map.retain(|_, w| w.strong_count() > 0);
    map.insert(key, Arc::downgrade(value));
}

/// Resolves `DownstreamTls`; the error names the field inside `tls`.
pub fn downstream(
    tls: &v1::DownstreamTls,
    secrets: &Secrets,
) -> Result<DownstreamTls, (String, String)> {
    if tls.certificate_secret.is_empty() {
        return Err(("tls.certificate_secret".into(), "is empty".into()));
    }
    if tls.require_client_certificate && tls.validation_secret.is_empty() {
        return Err((
            "tls.validation_secret".into(),
            "is empty but require_client_certificate is set".into(),
        ));
    }
    let Some(cert) = secrets.certificates.get(&tls.certificate_secret) else {
        return Ok(DownstreamTls::Missing(Arc::from(
            tls.certificate_secret.as_str(),
        )));
    };
    let ca = if tls.validation_secret.is_empty() {
        None
    } else {
        match secrets.validation.get(&tls.validation_secret) {
            Some(ca) => Some(ca),
            None => {
                return Ok(DownstreamTls::Missing(Arc::from(
                    tls.validation_secret.as_str(),
                )));
            }
        }
    };
    let key = fingerprint(&[
        &cert.fingerprint.to_le_bytes(),
        &ca.map_or(0, |c| c.fingerprint).to_le_bytes(),
        &[u8::from(tls.require_client_certificate)],
    ]);
    if let Some(config) = cached(&SERVER_CACHE, key) {
        return Ok(DownstreamTls::Ready(config));
    }
    let verifier = match ca {
        None => WebPkiClientVerifier::no_client_auth(),
        Some(ca) => {
            let builder =
                WebPkiClientVerifier::builder_with_provider(ca.roots.clone(), PROVIDER.clone());
            let builder = if tls.require_client_certificate {
                builder
            } else {
                builder.allow_unauthenticated()
            };
            let webpki = builder
                .build()
                .map_err(|e| ("tls.validation_secret".into(), e.to_string()))?;
            Arc::new(MeshClientVerifier {
                webpki,
                sans: ca.sans.clone(),
            })
        }
    };
    let mut config = ServerConfig::builder_with_provider(PROVIDER.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ("tls".into(), e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(cert.chain.clone(), cert.key.clone_key())
        .map_err(|e| ("tls.certificate_secret".into(), e.to_string()))?;
    config.alpn_protocols = SERVER_ALPN.iter().map(|p| p.to_vec()).collect();
    let config = Arc::new(config);
    remember(&SERVER_CACHE, key, &config);
    Ok(DownstreamTls::Ready(config))
}

/// Admits on an inbound chain only client certificates issued to name their holder.
///
/// One purpose per certificate: the mesh CA also signs each proxy's xDS bootstrap certificate
/// (CN `<uuid>.<kind>.<sa>.<ns>`, clientAuth, for the ADS server only), which chains to the same
/// roots. A service certificate carries the workload's SPIFFE ID as a URI SAN, and a certificate
/// for a client outside the mesh (an ingress controller's, admitted by
/// `AllowedSources.principals`) carries the DNS names or URIs it is known by; a bootstrap
/// certificate carries no subject alternative name at all. So, after webpki verified the chain
/// and its clientAuth usage (which also keeps out the ADS server's serverAuth-only certificate):
/// when the validation secret lists `match_subject_alt_names` (a chain for clients outside the
/// mesh), the certificate must carry one of them, compared exactly; when it lists none (a chain
/// for mesh peers), it must carry a SPIFFE workload ID. A certificate from the mesh CA for a
/// client outside the mesh therefore never reaches a peer's chain, where `AllowedSources.any`
/// would admit it. (A SPIFFE ID's trust domain is not compared: the roots are the mesh's own,
/// and the sidecar is not told its trust domain.)
#[derive(Debug)]
struct MeshClientVerifier {
    webpki: Arc<dyn ClientCertVerifier>,
    /// `ValidationContext.match_subject_alt_names`; empty: any.
    sans: Vec<String>,
}

impl ClientCertVerifier for MeshClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.webpki.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.webpki.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.webpki.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .webpki
            .verify_client_cert(end_entity, intermediates, now)?;
        let peer = peer_cert(end_entity).ok_or(rustls::Error::InvalidCertificate(
            CertificateError::BadEncoding,
        ))?;
        check_client_names(&peer, &self.sans)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// The names a chain-verified client certificate must carry (see [`MeshClientVerifier`]).
fn check_client_names(peer: &PeerCert, wanted: &[String]) -> Result<(), rustls::Error> {
    if wanted.is_empty() && peer.workload.is_none() {
        tracing::debug!(
            got = ?peer.sans().collect::<Vec<_>>(),
            "client certificate carries no SPIFFE workload ID (an xDS bootstrap certificate, or one for a client outside the mesh) on a chain for mesh peers: refused"
        );
        return Err(rustls::Error::InvalidCertificate(
            CertificateError::ApplicationVerificationFailure,
        ));
    }
    if !wanted.is_empty() && !peer.carries_any(wanted) {
        tracing::debug!(
            expected = ?wanted, got = ?peer.sans().collect::<Vec<_>>(),
            "client certificate carries none of the validation context's match_subject_alt_names: refused"
        );
        return Err(rustls::Error::InvalidCertificate(
            CertificateError::ApplicationVerificationFailure,
        ));
    }
    Ok(())
}

// === Client side (clusters) ===

/// A cluster's TLS to its meshed endpoints, resolved against the secrets received.
#[derive(Clone, Debug)]
pub enum UpstreamTls {
    Ready(Arc<ClusterTls>),
    /// A secret it names has not arrived yet: requests to meshed endpoints fail with 503.
    Missing(Arc<str>),
}

/// The client side of a cluster's mTLS.
#[derive(Debug)]
pub struct ClusterTls {
    /// Same inputs, same number: connection pools are keyed on it so that connections made with
    /// different TLS settings are never shared.
    pub fingerprint: u64,
    /// ALPN `http/1.1`, for HTTP/1.1 clusters.
    pub http1: Arc<ClientConfig>,
    /// ALPN `h2`, for HTTP/2 clusters and CONNECT tunnels.
    pub http2: Arc<ClientConfig>,
    pub server_name: ServerName<'static>,
    /// Neither `server_identities` nor `match_subject_alt_names` was given: the certificate must
    /// carry the identity of the endpoint connected to (`Endpoint.identity`).
    pub check_endpoint_identity: bool,
}

/// Resolves `UpstreamTls`; the error names the field inside `tls`.
pub fn upstream(tls: &v1::UpstreamTls, secrets: &Secrets) -> Result<UpstreamTls, (String, String)> {
    if tls.certificate_secret.is_empty() {
        return Err(("tls.certificate_secret".into(), "is empty".into()));
    }
    if tls.validation_secret.is_empty() {
        return Err(("tls.validation_secret".into(), "is empty".into()));
    }
    let server_name = if tls.sni.is_empty() {
        // No SNI to send: rustls then sends none, as for an IP address.
        ServerName::IpAddress(std::net::Ipv4Addr::UNSPECIFIED.into())
    } else {
        ServerName::try_from(tls.sni.clone())
            .map_err(|e| ("tls.sni".into(), format!("{:?}: {e}", tls.sni)))?
    };
    let Some(cert) = secrets.certificates.get(&tls.certificate_secret) else {
        return Ok(UpstreamTls::Missing(Arc::from(
            tls.certificate_secret.as_str(),
        )));
    };
    let Some(ca) = secrets.validation.get(&tls.validation_secret) else {
        return Ok(UpstreamTls::Missing(Arc::from(
            tls.validation_secret.as_str(),
        )));
    };
    let identities: Vec<Identity> = tls
        .server_identities
        .iter()
        .map(Identity::from_proto)
        .collect();
    let mut parts: Vec<Vec<u8>> = vec![
        cert.fingerprint.to_le_bytes().to_vec(),
        ca.fingerprint.to_le_bytes().to_vec(),
        tls.sni.as_bytes().to_vec(),
    ];
    for id in &identities {
        parts.push(id.service_account.as_bytes().to_vec());
        parts.push(id.namespace.as_bytes().to_vec());
    }
    let key = fingerprint(&parts.iter().map(Vec::as_slice).collect::<Vec<_>>());
    if let Some(tls) = cached(&CLIENT_CACHE, key) {
        return Ok(UpstreamTls::Ready(tls));
    }
    let check_endpoint_identity = identities.is_empty() && ca.sans.is_empty();
    let verifier = Arc::new(MeshServerVerifier {
        roots: ca.roots.clone(),
        sans: ca.sans.clone(),
        identities,
        algorithms: PROVIDER.signature_verification_algorithms,
    });
    let config = ClientConfig::builder_with_provider(PROVIDER.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ("tls".into(), e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(cert.chain.clone(), cert.key.clone_key())
        .map_err(|e| ("tls.certificate_secret".into(), e.to_string()))?;
    let mut http1 = config.clone();
    http1.alpn_protocols = vec![b"http/1.1".to_vec()];
    let mut http2 = config;
    http2.alpn_protocols = vec![b"h2".to_vec()];
    let built = Arc::new(ClusterTls {
        fingerprint: key,
        http1: Arc::new(http1),
        http2: Arc::new(http2),
        server_name,
        check_endpoint_identity,
    });
    remember(&CLIENT_CACHE, key, &built);
    Ok(UpstreamTls::Ready(built))
}

/// Checks an upstream sidecar's certificate the mesh's way: the chain must end at the cluster's
/// CA bundle, and the subject is judged by its SANs and workload identity, not by the host name
/// (mesh certificates carry no DNS SAN for the service).
#[derive(Debug)]
struct MeshServerVerifier {
    roots: Arc<RootCertStore>,
    sans: Vec<String>,
    identities: Vec<Identity>,
    algorithms: WebPkiSupportedAlgorithms,
}

fn pki_error(e: webpki::Error) -> rustls::Error {
    use webpki::Error as E;
    rustls::Error::InvalidCertificate(match e {
        E::BadDer | E::BadDerTime => CertificateError::BadEncoding,
        E::CertExpired { .. } => CertificateError::Expired,
        E::CertNotValidYet { .. } => CertificateError::NotValidYet,
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        other => CertificateError::Other(OtherError(Arc::new(other))),
    })
}

fn list(ids: &[Identity]) -> String {
    ids.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

impl ServerCertVerifier for MeshServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(pki_error)?;
        cert.verify_for_usage(
            self.algorithms.all,
            &self.roots.roots,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(pki_error)?;
        if self.sans.is_empty() && self.identities.is_empty() {
            return Ok(ServerCertVerified::assertion());
        }
        let peer = peer_cert(end_entity).ok_or(rustls::Error::InvalidCertificate(
            CertificateError::BadEncoding,
        ))?;
        if !self.sans.is_empty() && !peer.carries_any(&self.sans) {
            let got: Vec<&str> = peer.sans().collect();
            tracing::debug!(
                expected = ?self.sans, ?got,
                "upstream certificate carries none of the expected SANs"
            );
            return Err(rustls::Error::General(format!(
                "server certificate SANs {got:?} include none of {:?}",
                self.sans
            )));
        }
        if !self.identities.is_empty()
            && !peer
                .identity
                .as_ref()
                .is_some_and(|id| self.identities.contains(id))
        {
            let got = peer
                .identity
                .as_ref()
                .map_or_else(|| "none".to_string(), ToString::to_string);
            tracing::debug!(
                expected = %list(&self.identities), %got,
                "upstream server identity mismatch"
            );
            return Err(rustls::Error::General(format!(
                "server identity {got} is not one of the expected identities [{}]",
                list(&self.identities)
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_from_spiffe_and_common_name() {
        assert_eq!(
            Identity::from_spiffe("spiffe://cluster.local/ns/demo/sa/httpbin"),
            Some(Identity::new("httpbin", "demo"))
        );
        assert_eq!(
            Identity::from_spiffe("spiffe://other.domain/ns/a/sa/b"),
            Some(Identity::new("b", "a"))
        );
        assert_eq!(
            Identity::from_spiffe("spiffe://cluster.local/ns/demo"),
            None
        );
        assert_eq!(Identity::from_spiffe("spiffe://td/ns/a/sa/b/extra"), None);
        assert_eq!(Identity::from_spiffe("https://td/ns/a/sa/b"), None);
        assert_eq!(
            Identity::from_common_name("httpbin.demo.cluster.local"),
            Some(Identity::new("httpbin", "demo"))
        );
        assert_eq!(Identity::from_common_name("httpbin.demo"), None);
    }

    /// A self-signed certificate with common name `cn` and these SANs (`dns:` or `uri:`).
    fn cert(cn: &str, sans: &[&str]) -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.subject_alt_names = sans
            .iter()
            .map(|s| match s.split_once(':') {
                Some(("dns", d)) => rcgen::SanType::DnsName(d.try_into().expect("dns")),
                Some(("uri", u)) => rcgen::SanType::URI(u.try_into().expect("uri")),
                _ => panic!("{s}: dns:… or uri:…"),
            })
            .collect();
        params.self_signed(&key).expect("cert").der().clone()
    }

    #[test]
    fn a_client_keeps_its_workload_identity_and_certificate_names() {
        let ingress = cert(
            "ingress.example.com",
            &[
                "dns:Ingress.Example.com",
                "uri:https://Edge.example.com/ingress",
            ],
        );
        let peer = Peer::of_chain(Some(&[ingress.clone()][..]), true).expect("peer");
        assert_eq!(
            peer,
            Peer {
                // Not from the common name: only a SPIFFE URI names a workload.
                identity: None,
                dns_names: vec!["ingress.example.com".into()],
                uris: vec!["https://Edge.example.com/ingress".into()],
            }
        );
        // Names are kept only on chains requiring client certificates.
        assert_eq!(
            Peer::of_chain(Some(&[ingress][..]), false),
            Some(Peer::default())
        );
        let curl = cert(
            "curl.demo.cluster.local",
            &["uri:spiffe://cluster.local/ns/demo/sa/curl"],
        );
        let peer = Peer::of_chain(Some(&[curl.clone()][..]), true).expect("peer");
        assert_eq!(peer.identity, Some(Identity::new("curl", "demo")));
        assert_eq!(peer.uris, vec!["spiffe://cluster.local/ns/demo/sa/curl"]);
        assert_eq!(
            Peer::of_chain(Some(&[curl][..]), false),
            Some(Peer::from(Identity::new("curl", "demo")))
        );
        // No certificate, no peer.
        assert_eq!(Peer::of_chain(None, true), None);
        assert_eq!(Peer::of_chain(Some(&[]), true), None);
    }

    #[test]
    fn client_certificates_must_name_their_holder() {
        let read = |c: &CertificateDer<'_>| peer_cert(c).expect("parses");
        let wanted = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let bootstrap = read(&cert("0f9e3a52.sidecar.curl.demo", &[]));
        let ingress = read(&cert("ingress", &["dns:ingress.example.com"]));
        let curl = read(&cert(
            "curl",
            &["uri:spiffe://cluster.local/ns/demo/sa/curl"],
        ));
        // A bootstrap certificate (no SAN at all) never passes, listed names or not.
        assert!(check_client_names(&bootstrap, &[]).is_err());
        assert!(check_client_names(&bootstrap, &wanted(&["ingress.example.com"])).is_err());
        // Only a workload's SPIFFE ID passes when the validation context lists none (a chain
        // for mesh peers): a certificate for a client outside the mesh does not…
        assert!(check_client_names(&ingress, &[]).is_err());
        assert!(check_client_names(&curl, &[]).is_ok());
        // …else one of those listed, DNS name or URI, exactly.
        let listed = wanted(&[
            "ingress.example.com",
            "spiffe://cluster.local/ns/demo/sa/curl",
        ]);
        assert!(check_client_names(&ingress, &listed).is_ok());
        assert!(check_client_names(&curl, &listed).is_ok());
        assert!(check_client_names(&ingress, &wanted(&["other.example.com"])).is_err());
        assert!(check_client_names(&curl, &wanted(&["ingress.example.com"])).is_err());
    }
}
