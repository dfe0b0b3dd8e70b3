//! `fsm proxy status` (beyond FSM, like `istioctl proxy-status`): every proxy connected to the
//! controller, per resource type whether it holds what the controller last computed for it; and
//! `fsm proxy get <query> <pod>`: a sidecar's admin endpoint (Envoy's or fsm-sidecar's, the same
//! paths), through a port-forward as `kubectl port-forward` does.
//!
//! The controller is reached through the API server's service proxy
//! (`services/fsm-controller:9091/proxy/...`), so nothing but a kubeconfig is needed.

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use serde::Deserialize;

/// The controller's HTTP port (health, metrics, debug), as the chart's Service names it.
const CONTROLLER_HTTP_PORT: u16 = 9091;
/// The sidecars' admin port (Envoy's and fsm-sidecar's), on the pod's loopback.
pub const ADMIN_PORT: u16 = 15000;

/// `/debug/proxies`: per node id, per type URL, the versions the controller tracks.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct ProxyStatus {
    connected_streams: u64,
    types: BTreeMap<String, TypeStatus>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct TypeStatus {
    snapshot_version: Option<String>,
    sent_version: Option<String>,
    acked_version: Option<String>,
    nacked_version: Option<String>,
    last_nack_error: Option<String>,
}

/// `/debug/config`: per node id, the pod and what the controller could not give it.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct ProxyConfig {
    pod: Option<String>,
    data_planes: Vec<String>,
    error: Option<String>,
    warnings: Vec<String>,
}

/// The resource families in xDS order, with how their type URLs end (Envoy's and native).
const TYPES: [(&str, &str); 5] = [
    ("CDS", ".Cluster"),
    ("LDS", ".Listener"),
    ("EDS", ".ClusterLoadAssignment"),
    ("RDS", ".RouteConfiguration"),
    ("SDS", ".Secret"),
];

impl TypeStatus {
    /// SYNCED: the proxy acknowledged what the controller computed; NACK: it refused a version;
    /// STALE: it has not acknowledged the latest yet; NOT SENT: nothing computed for it.
    fn state(&self) -> &'static str {
        match (
            &self.snapshot_version,
            &self.acked_version,
            &self.nacked_version,
        ) {
            (_, _, Some(_)) => "NACK",
            (None, _, _) => "NOT SENT",
            (Some(s), Some(a), None) if s == a => "SYNCED",
            _ => "STALE",
        }
    }
}

/// How the CLI reaches fsm-controller's HTTP endpoints.
pub enum Controller {
    /// Through the API server's service proxy to `fsm-controller` in this namespace.
    Cluster {
        client: kube::Client,
        namespace: String,
    },
    /// Directly, at this base URL (a controller without a cluster, e.g. `make demo`'s).
    Url(String),
}

impl Controller {
    fn describe(&self) -> String {
        match self {
            Controller::Cluster { namespace, .. } => format!(
                "fsm-controller in namespace [{namespace}] (is the mesh installed there? see --fsm-namespace)"
            ),
            Controller::Url(url) => format!("fsm-controller at {url}"),
        }
    }
}

/// The MeshConfig field a 404 from a switched-off debug endpoint names: the controller's body
/// then says how to turn it on, and is what the user needs to read.
const DEBUG_SERVER_FIELD: &str = "enableDebugServer";

/// Why a request failed: the controller's debug server is off (its hint), or anything else.
enum Failure {
    DebugServerOff(String),
    Other(anyhow::Error),
}

pub async fn controller_get<T: serde::de::DeserializeOwned>(
    controller: &Controller,
    path: &str,
) -> Result<T> {
    let text = match controller {
        Controller::Cluster { client, namespace } => {
            let url = format!(
                "/api/v1/namespaces/{namespace}/services/fsm-controller:{CONTROLLER_HTTP_PORT}/proxy{path}"
            );
            let request = http::Request::get(&url).body(Vec::new())?;
            client.request_text(request).await.map_err(|e| match e {
                kube::Error::Api(status)
                    if status.code == 404 && status.message.contains(DEBUG_SERVER_FIELD) =>
                {
                    Failure::DebugServerOff(status.message.clone())
                }
                e => Failure::Other(e.into()),
            })
        }
        Controller::Url(base) => async {
            let response = reqwest::get(format!("{}{path}", base.trim_end_matches('/'))).await?;
            let status = response.status();
            let text = response.text().await?;
            if status == reqwest::StatusCode::NOT_FOUND && text.contains(DEBUG_SERVER_FIELD) {
                return Ok(Err(text));
            }
            if !status.is_success() {
                bail!("HTTP {status}: {}", text.trim());
            }
            anyhow::Ok(Ok(text))
        }
        .await
        .map_err(Failure::Other)
        .and_then(|answer| answer.map_err(Failure::DebugServerOff)),
    };
    let text = match text {
        Ok(text) => text,
        Err(Failure::DebugServerOff(hint)) => bail!("{}", hint.trim()),
        Err(Failure::Other(e)) => {
            return Err(e.context(format!("asking {} for {path}", controller.describe())));
        }
    };
    serde_json::from_str(&text)
        .with_context(|| format!("fsm-controller's {path} is not what this CLI reads"))
}

/// `fsm proxy status [pod]`.
pub async fn status(
    controller: &Controller,
    pod: Option<(&str, &str)>,
    proxy_admin_url: Option<&str>,
) -> Result<String> {
    let statuses: BTreeMap<String, ProxyStatus> =
        controller_get(controller, "/debug/proxies").await?;
    let configs: BTreeMap<String, ProxyConfig> =
        controller_get(controller, "/debug/config").await?;
    let pod_of = |node: &str| {
        configs
            .get(node)
            .and_then(|c| c.pod.clone())
            .unwrap_or_else(|| "-".into())
    };
    if let Some((namespace, name)) = pod {
        let wanted = format!("{namespace}/{name}");
        let Some(node) = statuses.keys().find(|n| pod_of(n) == wanted) else {
            bail!("No proxy of pod [{wanted}] is connected to the controller");
        };
        let mut out = detail(node, &statuses[node], configs.get(node), &wanted);
        out.push_str(&format!(
            "\nConfiguration computed by the controller now, against what the proxy holds:\n{}",
            config_diff(controller, node, namespace, name, proxy_admin_url).await?
        ));
        return Ok(out);
    }
    let mut rows = vec![
        ["NAME", "NODE ID", "DATA PLANE", "STREAMS"]
            .iter()
            .map(ToString::to_string)
            .chain(TYPES.iter().map(|(t, _)| t.to_string()))
            .collect::<Vec<_>>(),
    ];
    let mut nodes: Vec<(&String, &ProxyStatus)> = statuses.iter().collect();
    nodes.sort_by_key(|(node, _)| pod_of(node));
    for (node, status) in nodes {
        let planes = configs
            .get(node)
            .map(|c| c.data_planes.join(","))
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| "-".into());
        let mut row = vec![
            pod_of(node),
            node.clone(),
            planes,
            status.connected_streams.to_string(),
        ];
        for (_, suffix) in TYPES {
            row.push(
                type_of(status, suffix)
                    .map_or("-", TypeStatus::state)
                    .to_string(),
            );
        }
        rows.push(row);
    }
    Ok(crate::table::columns(&rows))
}

/// The controller's resources for `node` against the proxy's own dump (through a port-forward,
/// so only with a cluster).
async fn config_diff(
    controller: &Controller,
    node: &str,
    namespace: &str,
    pod: &str,
    proxy_admin_url: Option<&str>,
) -> Result<String> {
    let dump = match (proxy_admin_url, controller) {
        (Some(url), _) => {
            let url = format!(
                "{}/{}",
                url.trim_end_matches('/'),
                crate::config_diff::DUMP_QUERY
            );
            async { anyhow::Ok(reqwest::get(&url).await?.error_for_status()?.text().await?) }
                .await
                .with_context(|| format!("reading the proxy's dump at {url}"))?
        }
        (None, Controller::Cluster { client, .. }) => {
            get(client, namespace, pod, crate::config_diff::DUMP_QUERY).await?
        }
        (None, Controller::Url(_)) => {
            return Ok(
                "(without a cluster, give the sidecar's admin address: --proxy-admin-url)\n".into(),
            );
        }
    };
    let query: String = url::form_urlencoded::byte_serialize(node.as_bytes()).collect();
    let computed: crate::config_diff::Computed = controller_get(
        controller,
        &format!("/debug/proxies/resources?proxy={query}"),
    )
    .await?;
    let dump: serde_json::Value = serde_json::from_str(&dump)
        .with_context(|| format!("the config dump of pod [{namespace}/{pod}] is not JSON"))?;
    let held = crate::config_diff::held(&dump)?;
    Ok(crate::config_diff::compare(&computed, &held))
}

fn type_of<'a>(status: &'a ProxyStatus, suffix: &str) -> Option<&'a TypeStatus> {
    status
        .types
        .iter()
        .find(|(url, _)| url.ends_with(suffix))
        .map(|(_, t)| t)
}

fn detail(node: &str, status: &ProxyStatus, config: Option<&ProxyConfig>, pod: &str) -> String {
    let mut out = format!("Proxy {node} (pod {pod})\n");
    if let Some(config) = config {
        if let Some(error) = &config.error {
            out.push_str(&format!("Error: {error}\n"));
        }
        for warning in &config.warnings {
            out.push_str(&format!("Warning: {warning}\n"));
        }
    }
    let mut rows = vec![
        ["TYPE", "STATE", "COMPUTED", "SENT", "ACKED", "LAST NACK"]
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
    ];
    let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    for (url, t) in &status.types {
        rows.push(vec![
            url.rsplit('/').next().unwrap_or(url).to_string(),
            t.state().to_string(),
            dash(&t.snapshot_version),
            dash(&t.sent_version),
            dash(&t.acked_version),
            dash(&t.last_nack_error),
        ]);
    }
    out.push_str(&crate::table::columns(&rows));
    out
}

/// `fsm proxy get <query> <pod>`: GET `/<query>` of the pod's sidecar admin port through a
/// port-forward.
pub async fn get(client: &kube::Client, namespace: &str, pod: &str, query: &str) -> Result<String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    pods.get(pod)
        .await
        .with_context(|| format!("Pod [{namespace}/{pod}] not found"))?;
    let mut forwarder = pods
        .portforward(pod, &[ADMIN_PORT])
        .await
        .with_context(|| format!("port-forwarding to pod [{namespace}/{pod}] port {ADMIN_PORT}"))?;
    let stream = forwarder
        .take_stream(ADMIN_PORT)
        .context("the port-forward opened no stream")?;
    let path = format!("/{}", query.trim_start_matches('/'));
    let no_http = || {
        format!("the sidecar of pod [{namespace}/{pod}] did not answer HTTP on port {ADMIN_PORT}")
    };
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .with_context(no_http)?;
    tokio::spawn(connection);
    let request = http::Request::get(&path)
        .header(http::header::HOST, "localhost")
        .body(http_body_util::Empty::<bytes::Bytes>::new())?;
    let response = sender.send_request(request).await.with_context(no_http)?;
    let status = response.status();
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .with_context(no_http)?
        .to_bytes();
    drop(sender);
    let _ = forwarder.join().await;
    if !status.is_success() {
        bail!("the sidecar of pod [{namespace}/{pod}] answered {status} for {path}");
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_type_is_synced_only_when_the_latest_is_acknowledged() {
        let t = |s: Option<&str>, a: Option<&str>, n: Option<&str>| TypeStatus {
            snapshot_version: s.map(Into::into),
            acked_version: a.map(Into::into),
            nacked_version: n.map(Into::into),
            ..Default::default()
        };
        assert_eq!(t(Some("v2"), Some("v2"), None).state(), "SYNCED");
        assert_eq!(t(Some("v2"), Some("v1"), None).state(), "STALE");
        assert_eq!(t(Some("v2"), None, None).state(), "STALE");
        assert_eq!(t(Some("v2"), Some("v1"), Some("v2")).state(), "NACK");
        assert_eq!(t(None, None, None).state(), "NOT SENT");
    }

    /// A controller answering every request with `status` and `body`.
    async fn answering(status: &'static str, body: &'static str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut request = [0u8; 4096];
                let _ = stream.read(&mut request).await;
                let reply = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(reply.as_bytes()).await;
            }
        });
        url
    }

    #[tokio::test]
    async fn a_switched_off_debug_server_is_told_with_the_controllers_hint() {
        let hint = "the debug server is off: MeshConfig fsm-system/fsm-mesh-config has spec.observability.enableDebugServer false (FSM's default). Turn it on with:\n  kubectl patch meshconfig fsm-mesh-config -n fsm-system --type=merge -p '{\"spec\":{\"observability\":{\"enableDebugServer\":true}}}'\n";
        let url = answering("404 Not Found", hint).await;
        let error = status(&Controller::Url(url), None, None)
            .await
            .expect_err("the debug server is off");
        assert_eq!(format!("{error:#}"), hint.trim());

        // Any other failure names the controller and the path.
        let url = answering("500 Internal Server Error", "boom").await;
        let error = status(&Controller::Url(url.clone()), None, None)
            .await
            .expect_err("a failing controller");
        let text = format!("{error:#}");
        assert!(
            text.contains(&format!("fsm-controller at {url}"))
                && text.contains("/debug/proxies")
                && text.contains("boom"),
            "{text}"
        );
    }
}
