//! The HTTPS call to a webhook: where to connect, TLS verified against `caBundle` only, one
//! POST with the webhook's timeout. Errors are worded like the Go client's
//! (`failed to call webhook: Post "https://…?timeout=10s": …`).
//!
//! There is no DNS for services here, so a `clientConfig.service` is resolved the way a
//! cluster's network would route it: to a ready endpoint of the Service (its Endpoints, then its
//! EndpointSlices), while the certificate is verified for `<name>.<namespace>.svc`, as
//! kube-apiserver does.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::admissionregistration::v1::WebhookClientConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use tokio::net::TcpStream;

use crate::services::ServicePort;
use crate::store::Store;

/// Where one call goes.
struct Target {
    /// `https://host:port/path`, as the request line names it in errors.
    url: String,
    /// The name the certificate must carry (and the `Host` header).
    host: String,
    port: u16,
    path: String,
    service: Option<(String, String)>,
}

/// POSTs `body` to the webhook and returns the decoded response. `Err` is the reason of a
/// failed call (`failed to call webhook: …`), which `failurePolicy` decides about.
pub(super) async fn post(
    store: &Store,
    client: &WebhookClientConfig,
    timeout: Duration,
    body: Vec<u8>,
) -> Result<Value, String> {
    let target = target(client).map_err(|e| format!("could not get REST client: {e}"))?;
    let url = format!("{}?timeout={}s", target.url, timeout.as_secs());
    let fail = |detail: String| format!("failed to call webhook: Post {url:?}: {detail}");
    let ca_bundle = client
        .ca_bundle
        .as_ref()
        .map_or(&[][..], |b| b.0.as_slice());
    let exchange = exchange(store, &target, ca_bundle, timeout, body);
    let (status, bytes) = match tokio::time::timeout(timeout, exchange).await {
        Err(_) => return Err(fail("context deadline exceeded".into())),
        Ok(Err(detail)) => return Err(fail(detail)),
        Ok(Ok(r)) => r,
    };
    if !status.is_success() {
        return Err(format!(
            "failed to call webhook: {}",
            unsuccessful(status, &bytes)
        ));
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| format!("failed to call webhook: couldn't decode the webhook's response: {e}"))
}

fn target(client: &WebhookClientConfig) -> Result<Target, String> {
    if let Some(svc) = &client.service {
        let host = format!("{}.{}.svc", svc.name, svc.namespace);
        let port = u16::try_from(svc.port.unwrap_or(443)).map_err(|e| e.to_string())?;
        let path = svc.path.clone().unwrap_or_default();
        return Ok(Target {
            url: format!("https://{host}:{port}{path}"),
            host,
            port,
            path,
            service: Some((svc.namespace.clone(), svc.name.clone())),
        });
    }
    let url = client.url.as_deref().unwrap_or_default();
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("invalid URL {url:?}: {e}"))?;
    if uri.scheme_str() != Some("https") {
        return Err(format!("webhook URL {url:?} is not https"));
    }
    let host = uri
        .host()
        .unwrap_or_default()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    Ok(Target {
        url: url.to_string(),
        host,
        port: uri.port_u16().unwrap_or(443),
        path: uri.path().to_string(),
        service: None,
    })
}

/// Connect, handshake, send, read: everything the timeout covers. `Err` is the detail after
/// `Post "<url>": `.
async fn exchange(
    store: &Store,
    target: &Target,
    ca_bundle: &[u8],
    timeout: Duration,
    body: Vec<u8>,
) -> Result<(http::StatusCode, Bytes), String> {
    let addr = match &target.service {
        Some((ns, name)) => {
            crate::services::endpoint(store, ns, name, &ServicePort::Number(target.port))
                .map_err(|e| e.to_string())?
        }
        None => tokio::net::lookup_host((target.host.as_str(), target.port))
            .await
            .map_err(|e| format!("dial tcp: lookup {}: {e}", target.host))?
            .next()
            .ok_or_else(|| format!("dial tcp: lookup {}: no such host", target.host))?,
    };
    let tcp = TcpStream::connect(addr).await.map_err(|e| {
        let why = match e.kind() {
            std::io::ErrorKind::ConnectionRefused => "connection refused".to_string(),
            _ => e.to_string(),
        };
        format!("dial tcp {addr}: connect: {why}")
    })?;
    let server_name = ServerName::try_from(target.host.clone()).map_err(|e| format!("tls: {e}"))?;
    let tls = tokio_rustls::TlsConnector::from(tls_config(ca_bundle)?)
        .connect(server_name, tcp)
        .await
        .map_err(tls_error)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let path = if target.path.is_empty() {
        "/"
    } else {
        &target.path
    };
    let request = http::Request::post(format!("{path}?timeout={}s", timeout.as_secs()))
        .header(http::header::HOST, target.host.as_str())
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::ACCEPT, "application/json, */*")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, bytes))
}

/// Trusts `caBundle` and nothing else (no system roots): an empty or wrong bundle fails
/// verification.
fn tls_config(ca_bundle: &[u8]) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_bundle).flatten() {
        // A certificate webpki cannot use as a trust anchor is skipped, as Go skips it.
        let _ = roots.add(cert);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("tls: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn tls_error(e: std::io::Error) -> String {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::InvalidCertificate(_)) => {
            format!("tls: failed to verify certificate: {e}")
        }
        Some(other) => format!("tls: {other}"),
        None => format!("remote error: tls: {e}"),
    }
}

/// A non-2xx answer, as client-go words it.
fn unsuccessful(status: http::StatusCode, body: &[u8]) -> String {
    if let Ok(v) = serde_json::from_slice::<Value>(body)
        && v.get("kind").and_then(Value::as_str) == Some("Status")
        && let Some(m) = v
            .get("message")
            .and_then(Value::as_str)
            .filter(|m| !m.is_empty())
    {
        return m.to_string();
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        format!(
            "the server responded with the status code {} but did not return more information",
            status.as_u16()
        )
    } else {
        format!("an error on the server ({text:?}) has prevented the request from succeeding")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn targets() {
        let cc: WebhookClientConfig = serde_json::from_value(
            json!({"service": {"namespace": "sys", "name": "hook", "path": "/mutate"}}),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let t = target(&cc).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.url, "https://hook.sys.svc:443/mutate");
        assert_eq!(t.host, "hook.sys.svc");
        let cc: WebhookClientConfig =
            serde_json::from_value(json!({"url": "https://[::1]:8443/v"}))
                .unwrap_or_else(|e| panic!("{e}"));
        let t = target(&cc).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("::1", 8443, "/v")
        );
    }
}
