//! The application side of a meshed pod: plain HTTP and TCP clients aimed at its sidecar.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Per-request bound, so a black-holed route fails the attempt instead of hanging the test.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// One HTTP response, fully read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpReply {
    pub status: u16,
    /// Lower-case names; repeated headers are joined with `, `.
    pub headers: BTreeMap<String, String>,
    pub body: String,
}

impl HttpReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }

    /// Which demo app answered (its `x-served-by` header).
    pub fn served_by(&self) -> Option<&str> {
        self.header("x-served-by")
    }

    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_str(&self.body)
            .with_context(|| format!("response body is not JSON: {}", self.body))
    }
}

/// A client that ignores `HTTP_PROXY` and friends from the environment: tests address sidecars
/// directly, and a developer's proxy settings must not reroute them.
pub(crate) fn plain_client() -> Result<reqwest::Client> {
    plain_client_builder()
        .build()
        .context("building HTTP client")
}

fn plain_client_builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(REQUEST_TIMEOUT)
        // Plain HTTP only: loading the system's root certificates (the workspace's reqwest has
        // rustls for Vault over https) took longer than the request itself, and a load loop
        // builds a client per request.
        .tls_built_in_root_certs(false)
}

/// GET `path` through the sidecar listener at `via`, as an app in explicit mode does: the TCP
/// connection goes to the sidecar and `host` (e.g. `httpbin.demo:14001`) picks the route.
pub async fn http_get_via(via: SocketAddr, host: &str, path: &str) -> Result<HttpReply> {
    http_get_with_headers(via, host, path, &[]).await
}

/// The share of `requests` GETs of `path` (Host `host`) through `via` that `backend` served
/// (`x-served-by`), each of which must be answered 200: how a split is measured.
pub async fn share_served_by(
    via: SocketAddr,
    host: &str,
    path: &str,
    backend: &str,
    requests: usize,
) -> Result<f64> {
    let mut served = 0;
    for _ in 0..requests {
        let r = http_get_via(via, host, path).await?;
        anyhow::ensure!(
            r.status == 200,
            "GET {path} (Host: {host}): status {}",
            r.status
        );
        if r.served_by() == Some(backend) {
            served += 1;
        }
    }
    Ok(served as f64 / requests as f64)
}

/// Whether `share`, measured over `requests` independent picks, is consistent with a split
/// that sends `expected` of the traffic to one backend: within five standard deviations of the
/// binomial, and exact for 0 and 1. A fair split fails this about once in 1.7 million checks;
/// the flat 0.05 it replaces was 3.2 sigma at 1,000 requests (about once in 640 checks) and
/// failed a CI run.
pub fn split_share_matches(share: f64, expected: f64, requests: usize) -> bool {
    let sigma = (expected * (1.0 - expected) / requests as f64).sqrt();
    (share - expected).abs() <= 5.0 * sigma
}

/// How many of `requests` GETs of `path` (Host `host`) through `via` were answered 503, the
/// others 200 (anything else is an error): how retries of a flaky server are measured.
pub async fn unavailable_count(
    via: SocketAddr,
    host: &str,
    path: &str,
    requests: usize,
) -> Result<usize> {
    let mut unavailable = 0;
    for _ in 0..requests {
        match http_get_via(via, host, path).await?.status {
            200 => {}
            503 => unavailable += 1,
            other => anyhow::bail!("GET {path} (Host: {host}): status {other}"),
        }
    }
    Ok(unavailable)
}

/// [`http_get_with_headers`] from the source address `from`, as a client outside the mesh (an
/// ingress controller on its own address) sends it.
pub async fn http_get_from(
    from: std::net::IpAddr,
    via: SocketAddr,
    host: &str,
    path: &str,
) -> Result<HttpReply> {
    let client = plain_client_builder().local_address(from).build()?;
    get_with(client, via, host, path, &[]).await
}

/// [`http_get_via`] with more request headers.
pub async fn http_get_with_headers(
    via: SocketAddr,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<HttpReply> {
    get_with(plain_client()?, via, host, path, headers).await
}

async fn get_with(
    client: reqwest::Client,
    via: SocketAddr,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<HttpReply> {
    let url = format!("http://{via}{path}");
    let mut request = client.get(&url).header(reqwest::header::HOST, host);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request
        .send()
        .await
        .with_context(|| format!("GET {url} (Host: {host})"))?;
    let status = response.status().as_u16();
    let mut headers: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in response.headers() {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        headers
            .entry(name.as_str().to_string())
            .and_modify(|v| *v = format!("{v}, {value}"))
            .or_insert(value);
    }
    let body = response
        .text()
        .await
        .with_context(|| format!("reading body of GET {url} (Host: {host})"))?;
    Ok(HttpReply {
        status,
        headers,
        body,
    })
}

/// [`http_get_via`] that must be answered `200`: anything else is an error naming the status
/// and the body.
pub async fn http_get_ok_via(via: SocketAddr, host: &str, path: &str) -> Result<HttpReply> {
    let reply = http_get_via(via, host, path).await?;
    anyhow::ensure!(
        reply.status == 200,
        "GET {path} (Host: {host}) via {via}: status {}: {}",
        reply.status,
        reply.body
    );
    Ok(reply)
}

/// The value of counter `name` in an admin `/stats` text (`<name>: <value>` lines, the format
/// both Envoy and fsm-sidecar use), 0 when the sidecar has not created it.
pub fn stats_counter(stats: &str, name: &str) -> u64 {
    stats
        .lines()
        .find_map(|l| {
            l.strip_prefix(name)?
                .strip_prefix(": ")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// Sends `n` GETs of `/get` for `host` through `via`, requiring 200, and returns which backends
/// answered (their `x-served-by`): how tests see load balancing and endpoint changes.
pub async fn backends_via(via: SocketAddr, host: &str, n: usize) -> Result<BTreeSet<String>> {
    let mut seen = BTreeSet::new();
    for _ in 0..n {
        let reply = http_get_via(via, host, "/get").await?;
        anyhow::ensure!(
            reply.status == 200,
            "status {} body {}",
            reply.status,
            reply.body
        );
        seen.insert(reply.served_by().context("no x-served-by")?.to_string());
    }
    Ok(seen)
}

/// Waits until a line sent to `addr` no longer comes back (its listener closed or its route went
/// away).
pub async fn wait_tcp_unreachable(addr: SocketAddr, timeout: std::time::Duration) -> Result<()> {
    crate::eventually(timeout, || async {
        match tcp_roundtrip(addr, "ping").await {
            Ok(reply) => anyhow::bail!("{addr} still answers: {reply:?}"),
            Err(_) => Ok(()),
        }
    })
    .await
}

/// Sends one line to `addr` and returns the first line that comes back, without its newline.
pub async fn tcp_roundtrip(addr: SocketAddr, line: &str) -> Result<String> {
    let exchange = async {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        let (read, mut write) = stream.into_split();
        write
            .write_all(format!("{line}\n").as_bytes())
            .await
            .with_context(|| format!("writing to {addr}"))?;
        let mut reply = String::new();
        let read_bytes = BufReader::new(read)
            .read_line(&mut reply)
            .await
            .with_context(|| format!("reading from {addr}"))?;
        if read_bytes == 0 {
            return Err(anyhow!("{addr} closed the connection without answering"));
        }
        Ok(reply.trim_end_matches(['\r', '\n']).to_string())
    };
    tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .map_err(|_| anyhow!("no answer from {addr} within {REQUEST_TIMEOUT:?}"))?
}

/// GETs `url` and returns the body, failing on a non-2xx status with the body in the error.
pub async fn get_text(url: &str) -> Result<String> {
    let response = plain_client()?
        .get(url)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    let status = response.status();
    let body = response
        .text()
        .await
        .with_context(|| format!("reading GET {url}"))?;
    if !status.is_success() {
        anyhow::bail!("GET {url}: {status}: {}", body.trim());
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::split_share_matches;

    #[test]
    fn a_split_share_is_judged_by_the_binomial_spread() {
        // The CI failure: 0.551 of 1,000 is 3.2 sigma off a fair split, well within chance.
        assert!(split_share_matches(0.551, 0.5, 1000));
        // A split that ignored its weights, or weighed 60/40, is far outside it.
        assert!(!split_share_matches(0.6, 0.5, 1000));
        assert!(!split_share_matches(1.0, 0.5, 1000));
        // An all-or-nothing split must be exact.
        assert!(split_share_matches(1.0, 1.0, 1000));
        assert!(!split_share_matches(0.999, 1.0, 1000));
        assert!(!split_share_matches(0.001, 0.0, 1000));
    }
}
