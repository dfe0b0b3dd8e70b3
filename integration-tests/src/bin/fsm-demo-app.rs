//! The demo workload: a tiny HTTP echo and TCP line-echo server that says who answered.
//!
//! It stands in for the container images named in the demo manifests (httpbin, tcp-echo), so
//! tests and the demo can see which backend a request reached without pulling images.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};
use axum::Router;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use clap::Parser;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// Demo workload for the FSM integration tests and `make demo`.
///
/// Every HTTP request gets `200` and a JSON echo of the request (`/status/<code>` answers with that
/// code; `/flaky/<n>` answers 503 to one request in n, the first of every n it receives, to show
/// retries; `/delay/<ms>` answers after that many milliseconds, at most a minute, to hold a request
/// in flight); every line on a TCP connection is answered with `<NAME>: <line>`. Both carry NAME so
/// the caller can tell which backend answered.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Name reported in every answer (the demo uses the pod name).
    #[arg(long)]
    name: String,
    /// Address to serve HTTP on; repeatable.
    #[arg(long = "http", value_name = "ADDR")]
    http: Vec<SocketAddr>,
    /// Address to serve the TCP line echo on; repeatable.
    #[arg(long = "tcp", value_name = "ADDR")]
    tcp: Vec<SocketAddr>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    // One plain line instead of anyhow's report: the harness quotes the log tail, and an inherited
    // RUST_BACKTRACE would bury the cause under a backtrace.
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("fsm-demo-app: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<()> {
    anyhow::ensure!(
        !args.http.is_empty() || !args.tcp.is_empty(),
        "nothing to serve: give at least one --http or --tcp address"
    );
    let name: Arc<str> = Arc::from(args.name.as_str());
    let mut servers = JoinSet::new();
    for addr in args.http {
        // Bind before spawning so a taken address fails the process at once, not silently later.
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding HTTP {addr}"))?;
        eprintln!("{name}: HTTP on {addr}");
        let router = Router::new().fallback(echo).with_state(App {
            name: name.clone(),
            flaky: Arc::new(AtomicU64::new(0)),
        });
        servers.spawn(async move {
            axum::serve(listener, router)
                .await
                .with_context(|| format!("serving HTTP on {addr}"))
        });
    }
    for addr in args.tcp {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding TCP {addr}"))?;
        eprintln!("{name}: TCP echo on {addr}");
        servers.spawn(serve_tcp(listener, name.clone()));
    }
    // The harness waits for this line (fsm_integration_tests::apps::READY_LINE).
    eprintln!("{name}: ready on all addresses");
    // The servers run forever; the first one to stop ends the process with its error.
    match servers.join_next().await {
        Some(Ok(result)) => result,
        Some(Err(err)) => Err(err.into()),
        None => Ok(()),
    }
}

#[derive(Clone)]
struct App {
    name: Arc<str>,
    /// Requests to `/flaky/<n>` so far.
    flaky: Arc<AtomicU64>,
}

async fn echo(
    axum::extract::State(App { name, flaky }): axum::extract::State<App>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    if let Some(ms) = uri
        .path()
        .strip_prefix("/delay/")
        .and_then(|ms| ms.parse::<u64>().ok())
    {
        tokio::time::sleep(std::time::Duration::from_millis(ms.min(60_000))).await;
    }
    let flaky_failure = uri
        .path()
        .strip_prefix("/flaky/")
        .and_then(|n| n.parse::<u64>().ok())
        .filter(|n| *n > 0)
        .is_some_and(|n| flaky.fetch_add(1, Ordering::Relaxed) % n == 0);
    let status = if flaky_failure {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        uri.path()
            .strip_prefix("/status/")
            .and_then(|code| code.parse::<u16>().ok())
            .and_then(|code| StatusCode::from_u16(code).ok())
            .unwrap_or(StatusCode::OK)
    };
    let header_map: serde_json::Map<String, serde_json::Value> = headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                serde_json::Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned()),
            )
        })
        .collect();
    let host = headers
        .get(axum::http::header::HOST)
        .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned());
    let body = serde_json::json!({
        "server": &*name,
        "method": method.as_str(),
        "path": uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"),
        "host": host,
        "headers": header_map,
    });
    let mut response = (status, axum::Json(body)).into_response();
    if let Ok(value) = HeaderValue::from_str(&name) {
        response.headers_mut().insert("x-served-by", value);
    }
    response
}

async fn serve_tcp(listener: TcpListener, name: Arc<str>) -> Result<()> {
    loop {
        let (stream, peer) = listener
            .accept()
            .await
            .context("accepting TCP connection")?;
        let name = name.clone();
        tokio::spawn(async move {
            if let Err(err) = echo_lines(stream, &name).await {
                eprintln!("{name}: TCP connection from {peer}: {err:#}");
            }
        });
    }
}

async fn echo_lines(stream: TcpStream, name: &str) -> Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    while let Some(line) = lines.next_line().await? {
        write
            .write_all(format!("{name}: {line}\n").as_bytes())
            .await?;
    }
    Ok(())
}
