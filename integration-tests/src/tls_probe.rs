//! A client at a meshed inbound port that sends one HTTP request in plaintext, over TLS without
//! a client certificate, or over TLS with a given one, and returns whatever came back: the tests
//! use it to see which certificates a sidecar answers and which it refuses.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long a probe reads the reply before it takes what it has.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// How a [`probe`] talks to the port.
#[derive(Clone, Copy, Debug)]
pub enum ProbeClient<'a> {
    /// No TLS at all.
    Plaintext,
    /// TLS without a client certificate.
    Anonymous,
    /// TLS with this client certificate: PEM chain and PEM key.
    Certificate { chain: &'a str, key: &'a str },
}

/// Accepts any server certificate: the probes only check what the *server* does with the
/// client (and its certificate), not who the server is.
#[derive(Debug)]
struct AnyServer(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Sends `GET /get` with `Host: host` to `addr` as `client` says (over TLS, with SNI
/// `server_name`), and returns what came back before the connection closed: "" when the TLS
/// handshake or the request was refused.
pub async fn probe(
    addr: SocketAddr,
    host: &str,
    server_name: &str,
    client: ProbeClient<'_>,
) -> Result<String> {
    let request = format!("GET /get HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let mut reply = Vec::new();
    if let ProbeClient::Plaintext = client {
        stream.write_all(request.as_bytes()).await?;
        let _ = tokio::time::timeout(READ_TIMEOUT, stream.read_to_end(&mut reply)).await;
        return Ok(String::from_utf8_lossy(&reply).into_owned());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)));
    let config = match client {
        ProbeClient::Plaintext | ProbeClient::Anonymous => builder.with_no_client_auth(),
        ProbeClient::Certificate { chain, key } => {
            let certs =
                CertificateDer::pem_slice_iter(chain.as_bytes()).collect::<Result<Vec<_>, _>>()?;
            let key = PrivateKeyDer::from_pem_slice(key.as_bytes())?;
            builder.with_client_auth_cert(certs, key)?
        }
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from(server_name.to_string())?;
    // With TLS 1.3 the server judges the client certificate after the client's handshake is
    // done, so a refusal shows up as an alert or a close on the first read.
    let Ok(mut tls) = connector.connect(name, stream).await else {
        return Ok(String::new());
    };
    if tls.write_all(request.as_bytes()).await.is_err() {
        return Ok(String::new());
    }
    let _ = tokio::time::timeout(READ_TIMEOUT, tls.read_to_end(&mut reply)).await;
    Ok(String::from_utf8_lossy(&reply).into_owned())
}
