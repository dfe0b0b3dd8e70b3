//! A raw SotW ADS client, as a proxy (or an impostor) would open one with a pod's bootstrap
//! credentials: the tests use it to see what the ADS server gives, or refuses, to whom.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;
use envoy_types::pb::envoy::config::core::v3::{DataSource, Node};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use tonic::transport::Channel;

use crate::controller::ADS_SERVER_NAME;

/// The type URL of SDS secrets.
pub const SDS: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// How long [`fetch_secrets`] waits for secrets.
const SECRETS_TIMEOUT: Duration = Duration::from_secs(10);

/// Which SDS response [`fetch_secrets`] returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecretsWait {
    /// The first response, even one without secrets.
    FirstResponse,
    /// The first response with secrets, ACKing the empty ones before it: a stream whose data
    /// plane is new to this proxy may first be answered with no secrets until the controller
    /// has built them.
    FirstWithSecrets,
}

/// A node as an xDS client announces itself.
pub fn xds_node(id: &str, cluster: &str, user_agent: &str) -> Node {
    Node {
        id: id.to_string(),
        cluster: cluster.to_string(),
        user_agent_name: user_agent.to_string(),
        ..Default::default()
    }
}

/// Connects to the ADS server at `ads_addr` over mTLS with `ca.crt`, `tls.crt` and `tls.key` of
/// `credentials` (a pod's bootstrap credentials as the controller writes them).
pub async fn connect_ads(
    ads_addr: SocketAddr,
    credentials: &Path,
) -> Result<AggregatedDiscoveryServiceClient<Channel>> {
    let read = |name: &str| {
        std::fs::read_to_string(credentials.join(name))
            .with_context(|| format!("{}", credentials.join(name).display()))
    };
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(read("ca.crt")?))
        .identity(tonic::transport::Identity::from_pem(
            read("tls.crt")?,
            read("tls.key")?,
        ))
        .domain_name(ADS_SERVER_NAME);
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{ads_addr}"))?
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(AggregatedDiscoveryServiceClient::new(channel))
}

/// The secrets in an SDS response's resources.
pub fn decode_secrets(resources: &[Any]) -> Result<Vec<Secret>> {
    Ok(resources
        .iter()
        .map(|any| Secret::decode(any.value.as_slice()))
        .collect::<std::result::Result<_, _>>()?)
}

/// Opens a SotW ADS stream with the credentials in `credentials` (see [`connect_ads`]),
/// announcing `node`, asks for the secrets and returns those of the response `wait` names (or
/// the stream's error status).
pub async fn fetch_secrets(
    ads_addr: SocketAddr,
    credentials: &Path,
    node: Node,
    wait: SecretsWait,
) -> Result<std::result::Result<Vec<Secret>, tonic::Status>> {
    let mut client = connect_ads(ads_addr, credentials).await?;
    let request = DiscoveryRequest {
        node: Some(node),
        type_url: SDS.into(),
        ..Default::default()
    };
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(request).await?;
    let mut responses = match client
        .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
    {
        Ok(r) => r.into_inner(),
        Err(status) => return Ok(Err(status)),
    };
    let deadline = tokio::time::Instant::now() + SECRETS_TIMEOUT;
    loop {
        let next = tokio::time::timeout_at(deadline, responses.message()).await;
        let response = match next {
            Ok(Ok(Some(response))) => response,
            Ok(Ok(None)) => bail!("stream closed without a response or an error"),
            Ok(Err(status)) => return Ok(Err(status)),
            Err(_) => bail!(
                "no SDS response{} within {SECRETS_TIMEOUT:?}",
                match wait {
                    SecretsWait::FirstResponse => "",
                    SecretsWait::FirstWithSecrets => " with secrets",
                }
            ),
        };
        if wait == SecretsWait::FirstResponse || !response.resources.is_empty() {
            return Ok(Ok(decode_secrets(&response.resources)?));
        }
        tx.send(DiscoveryRequest {
            type_url: SDS.into(),
            version_info: response.version_info,
            response_nonce: response.nonce,
            ..Default::default()
        })
        .await?;
    }
}

/// The secrets that carry a private key (`TlsCertificate`s), each as `<secret name> of <common
/// name of its certificate>`: whose key a proxy was given.
pub fn private_key_owners(secrets: &[Secret]) -> Vec<String> {
    secrets
        .iter()
        .filter_map(|s| match &s.r#type {
            Some(secret::Type::TlsCertificate(c)) => Some((s, c)),
            _ => None,
        })
        .map(|(s, c)| {
            let subject = c
                .certificate_chain
                .as_ref()
                .and_then(|chain| inline_text(chain).ok())
                .and_then(|pem| common_name(&pem))
                .unwrap_or_else(|| "<no parsable certificate>".into());
            format!("{} of {subject}", s.name)
        })
        .collect()
}

/// The subject common name of the first certificate in `pem`.
fn common_name(pem: &str) -> Option<String> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).ok()?;
    let cert = pem.parse_x509().ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

/// The text of an inline data source (string or UTF-8 bytes).
pub fn inline_text(source: &DataSource) -> Result<String> {
    match source.specifier.as_ref() {
        Some(Specifier::InlineString(text)) => Ok(text.clone()),
        Some(Specifier::InlineBytes(bytes)) => Ok(String::from_utf8(bytes.clone())?),
        other => bail!("not inline: {other:?}"),
    }
}

/// The chain and key (PEM) of the `TlsCertificate` secret named `name`.
pub fn tls_certificate(secrets: &[Secret], name: &str) -> Result<(String, String)> {
    let cert = secrets
        .iter()
        .find(|s| s.name == name)
        .and_then(|s| match &s.r#type {
            Some(secret::Type::TlsCertificate(c)) => Some(c),
            _ => None,
        })
        .with_context(|| {
            format!(
                "no TlsCertificate {name} among {:?}",
                secrets
                    .iter()
                    .map(|s| (&s.name, s.r#type.is_some()))
                    .collect::<Vec<_>>()
            )
        })?;
    let text = |field: &str, source: &Option<DataSource>| {
        source
            .as_ref()
            .context("absent")
            .and_then(inline_text)
            .with_context(|| format!("{name}: {field}"))
    };
    Ok((
        text("certificate_chain", &cert.certificate_chain)?,
        text("private_key", &cert.private_key)?,
    ))
}
