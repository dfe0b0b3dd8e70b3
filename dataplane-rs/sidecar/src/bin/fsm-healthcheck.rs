//! fsm-healthcheck: FSM's `fsm-healthcheck` container. The injector rewrites `tcpSocket` probes
//! to `httpGet /fsm-healthcheck` on port 15904 with header `Original-Tcp-Port: "<port>"`; this
//! answers 200 when 127.0.0.1:<port> accepts a TCP connection within a second, 503 when it does
//! not (see [`fsm_sidecar_proxy::healthcheck`]).

use std::net::SocketAddr;

use anyhow::{Context, Result};
use clap::Parser;

/// fsm-healthcheck: answers the kubelet's tcpSocket probes that FSM's injector rewrote to
/// `GET /fsm-healthcheck` with header `Original-Tcp-Port`, by connecting to 127.0.0.1:<port>
/// (200 when it connects within 1 s, 503 when not, 400 without a valid header, 404 elsewhere).
#[derive(Debug, Parser)]
#[command(name = "fsm-healthcheck", version)]
struct Cli {
    /// Address to serve health checks on.
    #[arg(long, default_value = "0.0.0.0:15904")]
    listen: SocketAddr,

    /// Log filter, e.g. `info` or `debug`.
    #[arg(long, default_value = "info")]
    log_level: String,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cli.log_level)
                .with_context(|| format!("--log-level {:?}", cli.log_level))?,
        )
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(cli.listen)
            .await
            .with_context(|| format!("binding --listen {}", cli.listen))?;
        tracing::info!(listen = %cli.listen, "fsm-healthcheck serving {}", fsm_sidecar_proxy::healthcheck::PATH);
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .context("installing the SIGTERM handler")?;
        tokio::select! {
            () = fsm_sidecar_proxy::healthcheck::serve(listener) => {}
            _ = tokio::signal::ctrl_c() => tracing::info!("interrupted; exiting"),
            _ = terminate.recv() => tracing::info!("terminated; exiting"),
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn listens_on_15904_by_default() {
        Cli::command().debug_assert();
        let cli = Cli::parse_from(["fsm-healthcheck"]);
        assert_eq!(cli.listen, "0.0.0.0:15904".parse().expect("addr"));
    }
}
