//! `fsm-test-apiserver`: runs the test API server by hand (a test tool; no auth, loopback only
//! by default).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use fsm_test_apiserver::ApiServer;

/// Test tool: a Kubernetes API server for integration tests (plain HTTP, no auth).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8001")]
    listen: SocketAddr,
    /// Directory of CustomResourceDefinition YAML to serve from the start.
    #[arg(long)]
    crd_dir: Option<PathBuf>,
    /// Write a kubeconfig pointing at this server here.
    #[arg(long)]
    kubeconfig_out: Option<PathBuf>,
    /// Events kept for watches to resume from.
    #[arg(long, default_value_t = 50_000)]
    history_limit: usize,
    /// Seconds between watch bookmarks.
    #[arg(long, default_value_t = 60)]
    bookmark_interval: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    if !args.listen.ip().is_loopback() {
        tracing::warn!(listen = %args.listen, "listening beyond loopback: this server has no authentication");
    }
    let mut builder = ApiServer::builder()
        .bind(args.listen)
        .history_limit(args.history_limit)
        .bookmark_interval(Duration::from_secs(args.bookmark_interval));
    if let Some(dir) = &args.crd_dir {
        builder = builder.crd_dir(dir);
    }
    let server = builder.start().await?;
    if let Some(path) = &args.kubeconfig_out {
        server.write_kubeconfig(path)?;
        tracing::info!(path = %path.display(), "wrote kubeconfig");
    }
    println!("{}", server.url());
    tokio::signal::ctrl_c().await?;
    server.stop().await;
    Ok(())
}
