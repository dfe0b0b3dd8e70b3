//! mTLS for the ADS listener: the server certificate, the roots client certificates must chain
//! to, and an accept loop for [`crate::listen::serve`].
//!
//! ```no_run
//! # async fn run(
//! #     creds: fsm_xds_server::ServerCredentials,
//! #     ads: fsm_xds_server::AdsServer,
//! # ) -> Result<(), Box<dyn std::error::Error>> {
//! use fsm_xds_server::AdsTls;
//!
//! let tls = AdsTls::new(&creds)?; // E5009 when the credentials are unusable
//! let listener = tokio::net::TcpListener::bind("0.0.0.0:15128").await?;
//! let incoming = tls.incoming(listener);
//! // keep `tls` (a cheap clone) to call `tls.update(&rotated)` when the certificate rotates
//! fsm_xds_server::listen::serve(ads.require_client_certificates().into_service(), incoming)
//!     .await;
//! # Ok(()) }
//! ```
//!
//! Why our own accept loop rather than tonic's `ServerTlsConfig`: tonic's configuration is fixed
//! when the server starts, and the server certificate and client roots rotate (certificate
//! renewal, root rotation) while proxies stay connected. [`AdsTls::update`] swaps the
//! configuration that the *next* handshake uses; established connections keep theirs.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use fsm_errcode::{ErrCode, HasErrCode};
use futures::Stream;
use rustls::RootCertStore;
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::Sleep;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use zeroize::Zeroizing;

use crate::metrics::metrics;

/// How long a client may take to complete its handshake; a stuck client only holds its own task.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes in flight before the listener stops accepting (new clients then wait in the
/// kernel's backlog); bounds the memory a flood of silent connections can hold.
const MAX_PENDING_HANDSHAKES: usize = 1024;

/// Connections accepted in one poll before completed handshakes get their turn.
const ACCEPT_BATCH: usize = 64;

/// Backoff after an accept error such as EMFILE: retrying at once would spin on the error.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

// === ServerCredentials ===

/// The ADS server's certificate, its key, and the roots client certificates must chain to, all
/// PEM. `client_ca_pem` may hold several roots (during a root rotation, old and new).
#[derive(Clone)]
pub struct ServerCredentials {
    /// Leaf first, then intermediates.
    pub cert_chain_pem: String,
    /// PKCS#8, SEC1 or PKCS#1. Zeroed on drop, never printed.
    pub private_key_pem: Zeroizing<String>,
    pub client_ca_pem: String,
}

impl ServerCredentials {
    pub fn new(
        cert_chain_pem: impl Into<String>,
        private_key_pem: impl Into<String>,
        client_ca_pem: impl Into<String>,
    ) -> Self {
        ServerCredentials {
            cert_chain_pem: cert_chain_pem.into(),
            private_key_pem: Zeroizing::new(private_key_pem.into()),
            client_ca_pem: client_ca_pem.into(),
        }
    }
}

impl fmt::Debug for ServerCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerCredentials")
            .field("cert_chain_pem", &self.cert_chain_pem)
            .field("private_key_pem", &"<redacted>")
            .field("client_ca_pem", &self.client_ca_pem)
            .finish()
    }
}

// === TlsError ===

/// Why credentials cannot serve ADS; all FSM's E5009 (the ADS server cannot start, or keeps its
/// previous configuration on [`AdsTls::update`]). No variant carries key material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("server certificate chain: no CERTIFICATE block in the PEM")]
    NoServerCertificate,
    #[error("server certificate chain: bad PEM: {0}")]
    ServerCertificatePem(String),
    #[error("server certificate is not a valid X.509 certificate: {0}")]
    ServerCertificateInvalid(String),
    #[error("server certificate expired at {not_after}")]
    ServerCertificateExpired { not_after: String },
    #[error("server private key: no PRIVATE KEY block in the PEM")]
    NoPrivateKey,
    /// Only the kind of PEM error: the details could quote the key's text.
    #[error("server private key: bad PEM ({0})")]
    PrivateKeyPem(&'static str),
    #[error("server private key is not usable: {0}")]
    UnusableKey(rustls::Error),
    #[error("the server private key does not match the server certificate")]
    KeyMismatch,
    #[error("client CA bundle: no CERTIFICATE block in the PEM")]
    NoClientCa,
    #[error("client CA bundle: bad PEM: {0}")]
    ClientCaPem(String),
    #[error("client CA certificate #{index} is not a usable trust anchor: {error}")]
    ClientCa { index: usize, error: rustls::Error },
    #[error("client certificate verifier: {0}")]
    Verifier(rustls::server::VerifierBuilderError),
    #[error("TLS configuration: {0}")]
    Config(rustls::Error),
}

impl HasErrCode for TlsError {
    fn err_code(&self) -> ErrCode {
        ErrCode::E5009
    }
}

// === AdsTls ===

/// The ADS listener's TLS configuration, swappable while serving; clones share it.
#[derive(Clone)]
pub struct AdsTls {
    config: Arc<ArcSwap<ServerConfig>>,
    handshake_failures: Arc<AtomicU64>,
    handshake_timeout: Duration,
}

impl fmt::Debug for AdsTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdsTls")
            .field("handshake_timeout", &self.handshake_timeout)
            .finish_non_exhaustive()
    }
}

impl AdsTls {
    pub fn new(credentials: &ServerCredentials) -> Result<Self, TlsError> {
        Ok(AdsTls {
            config: Arc::new(ArcSwap::from_pointee(server_config(credentials)?)),
            handshake_failures: Arc::new(AtomicU64::new(0)),
            handshake_timeout: HANDSHAKE_TIMEOUT,
        })
    }

    /// Replaces [`HANDSHAKE_TIMEOUT`] for listeners created afterwards.
    pub fn with_handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// Applies rotated credentials to every handshake from now on, on every listener sharing
    /// this value; established connections keep the configuration they were accepted with.
    /// On error the previous configuration stays in force.
    pub fn update(&self, credentials: &ServerCredentials) -> Result<(), TlsError> {
        let config = server_config(credentials)?;
        self.config.store(Arc::new(config));
        tracing::info!("ADS TLS credentials updated; new connections use them");
        Ok(())
    }

    /// Handshakes that failed or timed out since creation (all listeners of this value).
    pub fn handshake_failures(&self) -> u64 {
        self.handshake_failures.load(Ordering::Relaxed)
    }

    /// The connections of `listener` that completed an mTLS handshake, for
    /// [`crate::listen::serve`] (which exposes the client chain as `Request::peer_certs()`).
    ///
    /// Handshakes run concurrently, each bounded by the handshake timeout. Neither failed
    /// handshakes nor accept errors are yielded, and the stream never ends: `serve` skips an
    /// `Err` item, but an accept error that repeats at once (EMFILE) would make it spin, so
    /// errors are handled here (logged, counted, and for accept errors backed off).
    /// Must be polled inside a Tokio runtime; dropping it closes the listener and abandons
    /// handshakes in flight.
    pub fn incoming(&self, listener: TcpListener) -> TlsIncoming {
        TlsIncoming {
            listener,
            tls: self.clone(),
            handshakes: JoinSet::new(),
            backoff: None,
            backoff_for: Duration::ZERO,
        }
    }
}

fn server_config(credentials: &ServerCredentials) -> Result<ServerConfig, TlsError> {
    // Explicitly ring, not the process default: nothing else in the process can change our
    // cipher suites, and there is no panic when no default provider was installed.
    let provider = Arc::new(rustls::crypto::ring::default_provider());

    let chain = CertificateDer::pem_slice_iter(credentials.cert_chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::ServerCertificatePem(e.to_string()))?;
    let leaf = chain.first().ok_or(TlsError::NoServerCertificate)?;
    check_not_expired(leaf)?;
    let key = PrivateKeyDer::from_pem_slice(credentials.private_key_pem.as_bytes()).map_err(
        |e| match e {
            rustls_pki_types::pem::Error::NoItemsFound => TlsError::NoPrivateKey,
            other => TlsError::PrivateKeyPem(pem_error_kind(&other)),
        },
    )?;

    let mut roots = RootCertStore::empty();
    let cas = CertificateDer::pem_slice_iter(credentials.client_ca_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::ClientCaPem(e.to_string()))?;
    if cas.is_empty() {
        return Err(TlsError::NoClientCa);
    }
    for (index, ca) in cas.into_iter().enumerate() {
        roots
            .add(ca)
            .map_err(|error| TlsError::ClientCa { index, error })?;
    }
    // Client certificates are mandatory: without one the handshake fails, so only proxies
    // holding a certificate from our CA ever reach the gRPC service. webpki also refuses a
    // client certificate whose extended key usage lacks clientAuth (such as this server's own,
    // issued serverAuth only); a service certificate is refused per stream (`crate::peer`).
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(TlsError::Verifier)?;

    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => TlsError::KeyMismatch,
            other => TlsError::UnusableKey(other),
        })?;
    // gRPC is HTTP/2 only.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// A server certificate that expired would fail every handshake; refusing it keeps the previous
/// one on `update` and names the problem at start-up. (Not-yet-valid is let through: issuers
/// backdate little, and clock skew should not stop the server.)
fn check_not_expired(leaf: &CertificateDer<'_>) -> Result<(), TlsError> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| TlsError::ServerCertificateInvalid(e.to_string()))?;
    let not_after = cert.validity().not_after;
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    if not_after.timestamp() < now {
        return Err(TlsError::ServerCertificateExpired {
            not_after: not_after.to_string(),
        });
    }
    Ok(())
}

fn pem_error_kind(error: &rustls_pki_types::pem::Error) -> &'static str {
    use rustls_pki_types::pem::Error;
    match error {
        Error::MissingSectionEnd { .. } => "missing END line",
        Error::IllegalSectionStart { .. } => "malformed BEGIN line",
        Error::Base64Decode(_) => "invalid base64",
        Error::NoItemsFound => "no private key",
        Error::SectionTooLarge => "section too large",
        _ => "unreadable",
    }
}

// === TlsIncoming ===

/// The stream returned by [`AdsTls::incoming`].
pub struct TlsIncoming {
    listener: TcpListener,
    tls: AdsTls,
    handshakes: JoinSet<Option<TlsStream<TcpStream>>>,
    backoff: Option<Pin<Box<Sleep>>>,
    backoff_for: Duration,
}

impl fmt::Debug for TlsIncoming {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsIncoming")
            .field("listener", &self.listener)
            .field("pending_handshakes", &self.handshakes.len())
            .finish_non_exhaustive()
    }
}

impl TlsIncoming {
    /// Accepts what the listener has ready and starts their handshakes. Returns having
    /// registered a wakeup (listener, backoff timer), or with `cx` woken to come back.
    fn accept_ready(&mut self, cx: &mut Context<'_>) {
        for _ in 0..ACCEPT_BATCH {
            if self.handshakes.len() >= MAX_PENDING_HANDSHAKES {
                // A completing handshake wakes us through the JoinSet.
                return;
            }
            if let Some(sleep) = self.backoff.as_mut() {
                if sleep.as_mut().poll(cx).is_pending() {
                    return;
                }
                self.backoff = None;
            }
            match self.listener.poll_accept(cx) {
                Poll::Pending => return,
                Poll::Ready(Ok((stream, peer))) => {
                    self.backoff_for = Duration::ZERO;
                    self.start_handshake(stream, peer);
                }
                Poll::Ready(Err(error)) if is_connection_error(&error) => {
                    // That one connection died before we took it; the listener is fine.
                    tracing::debug!(%error, "ADS connection lost while being accepted");
                }
                Poll::Ready(Err(error)) => {
                    // EMFILE, ENFILE, ENOBUFS…: wait before retrying so we neither spin nor log
                    // at full speed; the warning repeats at most once per maximal backoff.
                    let first = self.backoff_for.is_zero();
                    self.backoff_for =
                        (self.backoff_for * 2).clamp(ACCEPT_BACKOFF_MIN, ACCEPT_BACKOFF_MAX);
                    if first || self.backoff_for == ACCEPT_BACKOFF_MAX {
                        fsm_errcode::warn!(ErrCode::E5005, %error, retry_in = ?self.backoff_for, "ADS listener cannot accept connections");
                    }
                    metrics()
                        .ads_tls_handshake_failure_count
                        .with_label_values(&["accept"])
                        .inc();
                    self.backoff = Some(Box::pin(tokio::time::sleep(self.backoff_for)));
                }
            }
        }
        // A full batch: there may be more, but let completed handshakes through first.
        cx.waker().wake_by_ref();
    }

    fn start_handshake(&mut self, stream: TcpStream, peer: SocketAddr) {
        // gRPC sends small frames it wants delivered now; tonic's own listener does the same.
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, %peer, "could not set TCP_NODELAY");
        }
        // The configuration at accept time: an `update` during the handshake applies to the
        // next connection.
        let acceptor = TlsAcceptor::from(self.tls.config.load_full());
        let timeout = self.tls.handshake_timeout;
        let failures = self.tls.handshake_failures.clone();
        self.handshakes.spawn(async move {
            let reason = match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => return Some(tls),
                Ok(Err(error)) => {
                    // Expected noise (plaintext clients, port scans, proxies without a valid
                    // certificate): debug per failure, the counter for dashboards.
                    tracing::debug!(%peer, %error, "ADS TLS handshake failed");
                    "handshake"
                }
                Err(_) => {
                    tracing::debug!(%peer, ?timeout, "ADS TLS handshake timed out");
                    "timeout"
                }
            };
            failures.fetch_add(1, Ordering::Relaxed);
            metrics()
                .ads_tls_handshake_failure_count
                .with_label_values(&[reason])
                .inc();
            None
        });
    }
}

impl Stream for TlsIncoming {
    type Item = Result<TlsStream<TcpStream>, io::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        this.accept_ready(cx);
        loop {
            match this.handshakes.poll_join_next(cx) {
                Poll::Ready(Some(Ok(Some(tls)))) => return Poll::Ready(Some(Ok(tls))),
                // Failed, already logged and counted.
                Poll::Ready(Some(Ok(None))) => {}
                Poll::Ready(Some(Err(error))) => {
                    // Only a panic in rustls could get here; one connection is lost, not the
                    // listener.
                    fsm_errcode::warn!(ErrCode::E5005, %error, "ADS TLS handshake task failed");
                }
                // Nothing in flight: `accept_ready` registered the wakeup.
                Poll::Ready(None) | Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Errors about the one connection being accepted, not the listener (as tonic's own loop).
fn is_connection_error(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
            | io::ErrorKind::TimedOut
    )
}
