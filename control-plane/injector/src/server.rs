//! An admission webhook's HTTPS server, shared by the injector (mutating) and the controller
//! (validating): a certificate for `<service>.<namespace>.svc` from the mesh's certificate
//! manager, renewed as it rotates; the mesh's roots written into every `caBundle` that points
//! kube-apiserver at the server (the webhook configuration's; the controller's also the
//! conversion webhook of each multi-version mesh CRD), which is how it learns to trust the
//! server; one connection per task, HTTP/1.1 or HTTP/2.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use bytes::Bytes;
use fsm_certs::setup::coded;
use fsm_certs::{CertKey, CertManager, IssuedCertificate};
use fsm_errcode::ErrCode;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Request, Response, StatusCode};
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceConversion, CustomResourceDefinition, ServiceReference, WebhookClientConfig,
    WebhookConversion,
};
use kube::Api;
use kube::api::PostParams;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::Value;
use tokio_rustls::TlsAcceptor;

/// Lifetime of a webhook's certificate; rotated at a third of it, like every certificate.
const CERT_VALIDITY: Duration = Duration::from_secs(24 * 3600);
/// The largest AdmissionReview read (kube-apiserver itself limits requests to 3 MiB).
pub const MAX_REVIEW_BYTES: usize = 3 * 1024 * 1024;
/// A client that does not finish its TLS handshake in this long is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Which kind of webhook configuration holds the server's caBundle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WebhookKind {
    Mutating,
    Validating,
}

impl WebhookKind {
    /// The server's certificate cannot be issued or used (FSM's E6101 / E6702).
    pub fn certificate_failed(self) -> ErrCode {
        match self {
            WebhookKind::Mutating => ErrCode::E6101,
            WebhookKind::Validating => ErrCode::E6702,
        }
    }

    /// The server cannot serve (FSM's E6102 / E6701).
    pub fn server_failed(self) -> ErrCode {
        match self {
            WebhookKind::Mutating => ErrCode::E6102,
            WebhookKind::Validating => ErrCode::E6701,
        }
    }

    /// The webhook configuration cannot be written (FSM's E6114; E6703 for the validating one,
    /// whose table names its creation only).
    pub fn configuration_failed(self) -> ErrCode {
        match self {
            WebhookKind::Mutating => ErrCode::E6114,
            WebhookKind::Validating => ErrCode::E6703,
        }
    }
}

/// Where a webhook server's roots are written for kube-apiserver to trust it.
#[derive(Clone, Debug, PartialEq)]
pub enum CaBundleTarget {
    /// Every webhook's `clientConfig.caBundle` of this webhook configuration (of the server's
    /// [`WebhookKind`]).
    WebhookConfiguration(String),
    /// This CRD's `spec.conversion`: a conversion webhook at `service`, trusted with the roots.
    CrdConversion {
        crd: String,
        service: ServiceReference,
    },
}

impl CaBundleTarget {
    fn name(&self) -> &str {
        match self {
            CaBundleTarget::WebhookConfiguration(name)
            | CaBundleTarget::CrdConversion { crd: name, .. } => name,
        }
    }
}

/// The TLS side of a webhook server, current across rotations.
pub type Tls = Arc<ArcSwap<ServerConfig>>;

/// Issues the server's certificate (DNS name `server_name`), publishes the mesh's roots into
/// the webhook configuration `config_name`, and keeps both current as the certificate rotates.
pub async fn webhook_tls(
    certs: &CertManager,
    server_name: &str,
    client: kube::Client,
    kind: WebhookKind,
    config_name: String,
) -> anyhow::Result<Tls> {
    webhook_tls_publishing(
        certs,
        server_name,
        client,
        kind,
        vec![CaBundleTarget::WebhookConfiguration(config_name)],
    )
    .await
}

/// [`webhook_tls`] publishing the roots into each of `targets` (in order), at start-up and on
/// every rotation.
pub async fn webhook_tls_publishing(
    certs: &CertManager,
    server_name: &str,
    client: kube::Client,
    kind: WebhookKind,
    targets: Vec<CaBundleTarget>,
) -> anyhow::Result<Tls> {
    let targets = Arc::new(targets);
    let cert = certs
        .issue_server_certificate(server_name, CERT_VALIDITY)
        .await
        .map_err(coded)
        .with_context(|| {
            format!(
                "{}: cannot issue the webhook certificate",
                kind.certificate_failed()
            )
        })?;
    let tls = Arc::new(ArcSwap::from_pointee(server_config(&cert)?));
    for target in targets.iter() {
        publish_ca_bundle(&client, kind, target, &cert.trust_bundle_pem).await;
    }
    let rotating = tls.clone();
    certs.follow(
        CertKey::Server {
            common_name: server_name.to_owned(),
        },
        move |cert| {
            let (rotating, client, targets) = (rotating.clone(), client.clone(), targets.clone());
            async move {
                match server_config(&cert) {
                    Ok(config) => {
                        rotating.store(Arc::new(config));
                        for target in targets.iter() {
                            publish_ca_bundle(&client, kind, target, &cert.trust_bundle_pem).await;
                        }
                        tracing::info!(serial = %cert.serial, "webhook certificate rotated");
                    }
                    Err(e) => {
                        fsm_errcode::error!(kind.certificate_failed(), error = %e, "cannot use the rotated webhook certificate; keeping the previous one")
                    }
                }
            }
        },
    );
    Ok(tls)
}

/// A rustls server configuration presenting `cert` (no client certificates: kube-apiserver
/// does not present one).
pub fn server_config(cert: &IssuedCertificate) -> anyhow::Result<ServerConfig> {
    let chain = CertificateDer::pem_slice_iter(cert.cert_chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("webhook certificate chain")?;
    let key = PrivateKeyDer::from_pem_slice(cert.private_key.expose_pem().as_bytes())
        .context("webhook private key")?;
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Writes `roots` into `target` (read, change, replace; a conflicting write is retried): every
/// webhook of a webhook configuration, or a CRD's conversion webhook. A missing object is
/// logged: the server still answers whoever calls it.
pub async fn publish_ca_bundle(
    client: &kube::Client,
    kind: WebhookKind,
    target: &CaBundleTarget,
    roots: &str,
) {
    let bundle = ByteString(roots.as_bytes().to_vec());
    let name = target.name();
    for _ in 0..5 {
        let result = match (target, kind) {
            (CaBundleTarget::WebhookConfiguration(_), WebhookKind::Mutating) => {
                let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
                update(&api, name, |c| {
                    set_bundles(
                        c.webhooks
                            .iter_mut()
                            .flatten()
                            .map(|w| &mut w.client_config.ca_bundle),
                        &bundle,
                    )
                })
                .await
            }
            (CaBundleTarget::WebhookConfiguration(_), WebhookKind::Validating) => {
                let api: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
                update(&api, name, |c| {
                    set_bundles(
                        c.webhooks
                            .iter_mut()
                            .flatten()
                            .map(|w| &mut w.client_config.ca_bundle),
                        &bundle,
                    )
                })
                .await
            }
            (CaBundleTarget::CrdConversion { service, .. }, _) => {
                let api: Api<CustomResourceDefinition> = Api::all(client.clone());
                update(&api, name, |crd| {
                    set_conversion(crd, conversion_webhook(service, &bundle))
                })
                .await
            }
        };
        match result {
            Ok(true) => {
                tracing::info!(name, "published the webhook's roots (caBundle)");
                return;
            }
            Ok(false) => return,
            Err(e) if e.contains("not found") => {
                fsm_errcode::warn!(
                    kind.configuration_failed(),
                    name,
                    "nothing of that name to publish the webhook's roots in"
                );
                return;
            }
            Err(e) => {
                fsm_errcode::warn!(kind.configuration_failed(), name, error = %e, "cannot publish the webhook's roots; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// A CRD's `spec.conversion` sending every conversion to the webhook at `service`
/// (ConversionReview `v1`), trusted with `bundle`.
pub fn conversion_webhook(
    service: &ServiceReference,
    bundle: &ByteString,
) -> CustomResourceConversion {
    CustomResourceConversion {
        strategy: "Webhook".into(),
        webhook: Some(WebhookConversion {
            conversion_review_versions: vec!["v1".into()],
            client_config: Some(WebhookClientConfig {
                service: Some(service.clone()),
                ca_bundle: Some(bundle.clone()),
                url: None,
            }),
        }),
    }
}

/// Sets `crd`'s `spec.conversion`; `false` when it already held it.
fn set_conversion(
    crd: &mut CustomResourceDefinition,
    conversion: CustomResourceConversion,
) -> bool {
    if crd.spec.conversion.as_ref() == Some(&conversion) {
        return false;
    }
    crd.spec.conversion = Some(conversion);
    true
}

/// Sets every bundle of `slots`; `false` when they all held it.
fn set_bundles<'a>(
    slots: impl Iterator<Item = &'a mut Option<ByteString>>,
    bundle: &ByteString,
) -> bool {
    let mut changed = false;
    for slot in slots {
        if slot.as_ref() != Some(bundle) {
            *slot = Some(bundle.clone());
            changed = true;
        }
    }
    changed
}

/// Reads object `name`, lets `edit` change it and replaces it when it did; `Ok(false)` when
/// there was nothing to change.
async fn update<K>(
    api: &Api<K>,
    name: &str,
    edit: impl FnOnce(&mut K) -> bool,
) -> Result<bool, String>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let mut object = match api.get_opt(name).await {
        Ok(Some(object)) => object,
        Ok(None) => return Err("not found".into()),
        Err(e) => return Err(e.to_string()),
    };
    if !edit(&mut object) {
        return Ok(false);
    }
    api.replace(name, &PostParams::default(), &object)
        .await
        .map(|_| true)
        .map_err(|e| e.to_string())
}

/// Serves `handler` over TLS on `listener` until the process ends (`kind` names the webhook in
/// the codes of its errors).
pub async fn serve<H, F>(listener: tokio::net::TcpListener, tls: Tls, kind: WebhookKind, handler: H)
where
    H: Fn(Request<hyper::body::Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                fsm_errcode::warn!(kind.server_failed(), error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let acceptor = TlsAcceptor::from(tls.load_full());
        let handler = handler.clone();
        tokio::spawn(async move {
            let stream =
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
            let service = hyper::service::service_fn(move |request| {
                let response = handler(request);
                async move { Ok::<_, Infallible>(response.await) }
            });
            let _ =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
        });
    }
}

/// A JSON reply.
pub fn reply(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}

/// The request's body as JSON, at most [`MAX_REVIEW_BYTES`]; the error is the 400 to answer
/// (FSM E6111 unreadable, E6103 not JSON), logged and counted.
pub async fn read_json(
    request: Request<hyper::body::Incoming>,
) -> Result<Value, Response<Full<Bytes>>> {
    let body = match Limited::new(request.into_body(), MAX_REVIEW_BYTES)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(e) => {
            fsm_errcode::warn!(ErrCode::E6111, error = %e, "unreadable request body");
            return Err(reply(
                StatusCode::BAD_REQUEST,
                Value::String(format!("{}: {e}", ErrCode::E6111)).to_string(),
            ));
        }
    };
    serde_json::from_slice(&body).map_err(|e| {
        fsm_errcode::warn!(ErrCode::E6103, error = %e, "request body is not JSON");
        reply(
            StatusCode::BAD_REQUEST,
            Value::String(format!("{}: {e}", ErrCode::E6103)).to_string(),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service() -> ServiceReference {
        ServiceReference {
            namespace: "fsm-system".into(),
            name: "fsm-controller".into(),
            path: Some("/convert".into()),
            port: Some(9093),
        }
    }

    #[test]
    fn a_crd_is_pointed_at_the_conversion_webhook_with_the_roots() {
        let mut crd: CustomResourceDefinition = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "trafficsplits.split.smi-spec.io"},
            "spec": {"group": "split.smi-spec.io", "scope": "Namespaced",
                     "names": {"plural": "trafficsplits", "kind": "TrafficSplit"},
                     "versions": []},
        }))
        .expect("a CRD");
        let roots = ByteString(b"-----BEGIN CERTIFICATE-----\nROOT\n".to_vec());
        assert!(set_conversion(
            &mut crd,
            conversion_webhook(&service(), &roots)
        ));
        assert_eq!(
            serde_json::to_value(&crd.spec.conversion).expect("serialisable"),
            serde_json::json!({
                "strategy": "Webhook",
                "webhook": {
                    "conversionReviewVersions": ["v1"],
                    "clientConfig": {
                        "service": {"namespace": "fsm-system", "name": "fsm-controller",
                                    "path": "/convert", "port": 9093},
                        "caBundle": "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tClJPT1QK",
                    },
                },
            })
        );
        assert!(
            !set_conversion(&mut crd, conversion_webhook(&service(), &roots)),
            "already published: no write"
        );
        let rotated = ByteString(b"NEW".to_vec());
        assert!(set_conversion(
            &mut crd,
            conversion_webhook(&service(), &rotated)
        ));
    }

    #[test]
    fn bundles_are_set_only_where_they_differ() {
        let bundle = ByteString(b"ROOT".to_vec());
        let mut slots = [None, Some(ByteString(b"OLD".to_vec()))];
        assert!(set_bundles(slots.iter_mut(), &bundle));
        assert!(slots.iter().all(|s| s.as_ref() == Some(&bundle)));
        assert!(!set_bundles(slots.iter_mut(), &bundle));
    }
}
