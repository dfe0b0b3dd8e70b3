//! Runs [`AdsState`] over a tonic ADS stream, forever: connect, subscribe with the versions held,
//! ACK/NACK each response, and on any failure reconnect with jittered exponential backoff while
//! the sink keeps serving the last accepted config.

use std::path::PathBuf;
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::state::{AdsMode, AdsState, ConfigSink, Outcome, Request, short};

/// How to reach the control plane.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// `host:port` of the ADS server.
    pub addr: String,
    pub connect_timeout: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// mTLS to the control plane; `None`: plaintext gRPC (tests against a scripted server).
    pub tls: Option<AdsTls>,
}

/// mTLS to the control plane with the bootstrap certificate the injector mounts.
#[derive(Clone, Debug)]
pub struct AdsTls {
    /// Holds `ca.crt`, `tls.crt` and `tls.key` (a Kubernetes TLS secret's key names). Read at
    /// every (re)connect, so a rotated bootstrap certificate is picked up without a restart.
    pub bootstrap_dir: PathBuf,
    /// The name the control plane's certificate must carry (a DNS SAN).
    pub server_name: String,
}

/// The name FSM's controller certificate carries for ADS.
pub const DEFAULT_ADS_SERVER_NAME: &str = "fsm-controller.fsm-system.svc.cluster.local";

impl AdsTls {
    pub fn new(bootstrap_dir: impl Into<PathBuf>) -> Self {
        AdsTls {
            bootstrap_dir: bootstrap_dir.into(),
            server_name: DEFAULT_ADS_SERVER_NAME.into(),
        }
    }

    /// Reads the bootstrap files into tonic's TLS config; the error names the file.
    pub fn client_config(&self) -> Result<ClientTlsConfig, String> {
        let read = |name: &str| {
            let path = self.bootstrap_dir.join(name);
            match std::fs::read(&path) {
                Ok(bytes) if bytes.is_empty() => {
                    Err(format!("bootstrap file {} is empty", path.display()))
                }
                Ok(bytes) => Ok(bytes),
                Err(e) => Err(format!("reading bootstrap file {}: {e}", path.display())),
            }
        };
        let ca = read("ca.crt")?;
        let cert = read("tls.crt")?;
        let key = read("tls.key")?;
        Ok(ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .identity(Identity::from_pem(cert, key))
            .domain_name(self.server_name.clone()))
    }
}

impl ClientOptions {
    /// Plaintext options; set `tls` for mTLS.
    pub fn new(addr: impl Into<String>) -> Self {
        ClientOptions {
            addr: addr.into(),
            connect_timeout: Duration::from_secs(1),
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            tls: None,
        }
    }

    pub fn with_tls(mut self, tls: AdsTls) -> Self {
        self.tls = Some(tls);
        self
    }
}

/// Connects to the control plane (mTLS when configured). The error says what failed: a
/// bootstrap file, the address, the TCP connection or the TLS handshake.
pub async fn connect(options: &ClientOptions) -> Result<Channel, String> {
    let scheme = if options.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{}", options.addr))
        .map_err(|e| format!("bad ADS address {:?}: {e}", options.addr))?
        .connect_timeout(options.connect_timeout)
        .tcp_nodelay(true);
    if let Some(tls) = &options.tls {
        endpoint = endpoint
            .tls_config(tls.client_config()?)
            .map_err(|e| format!("ADS TLS configuration: {e}"))?;
    }
    endpoint.connect().await.map_err(|e| {
        // tonic's top-level message is generic; the cause (refused, bad certificate) is below.
        let mut message = format!("connecting to {}: {e}", options.addr);
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            message.push_str(&format!(": {s}"));
            source = s.source();
        }
        message
    })
}

/// Exponential backoff: base * 2^n, capped, with the wait drawn from [cap/2, cap] so that many
/// sidecars losing the same control plane do not reconnect in lockstep.
#[derive(Clone, Debug)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max,
            failures: 0,
        }
    }

    /// The ceiling of the next wait, before jitter.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.failures.min(20)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }

    /// The next wait, and one more failure counted.
    pub fn next_wait(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.failures = self.failures.saturating_add(1);
        let half = ceiling / 2;
        half + half.mul_f64(fastrand::f64())
    }

    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

/// Keeps an ADS session up forever. Returns only if the sink's owner drops everything (never in
/// practice); errors are logged and retried.
pub async fn run(options: ClientOptions, mut state: AdsState, sink: &mut (dyn ConfigSink + Send)) {
    let mut backoff = Backoff::new(options.backoff_base, options.backoff_max);
    loop {
        match run_stream(&options, &mut state, sink).await {
            Ok(responses) => {
                tracing::warn!(responses, "ADS stream closed by the control plane");
                if responses > 0 {
                    backoff.reset();
                }
            }
            Err((responses, error)) => {
                tracing::warn!(responses, %error, addr = %options.addr, "ADS stream failed");
                if responses > 0 {
                    backoff.reset();
                }
            }
        }
        let wait = backoff.next_wait();
        tracing::info!(
            ?wait,
            "reconnecting to the control plane, keeping the last config"
        );
        tokio::time::sleep(wait).await;
    }
}

/// One stream, until it ends. Returns how many responses it handled, so a stream that worked for
/// a while resets the backoff.
async fn run_stream(
    options: &ClientOptions,
    state: &mut AdsState,
    sink: &mut (dyn ConfigSink + Send),
) -> Result<usize, (usize, String)> {
    let channel = connect(options).await.map_err(|e| (0, e))?;
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    let mut handled = 0usize;
    match state.mode() {
        AdsMode::Sotw => {
            let (tx, rx) = mpsc::channel(16);
            for request in state.on_connect() {
                if let Request::Sotw(r) = request {
                    tx.try_send(r).map_err(|e| (0, e.to_string()))?;
                }
            }
            let mut responses = client
                .stream_aggregated_resources(ReceiverStream::new(rx))
                .await
                .map_err(|e| (0, format!("opening the ADS stream: {e}")))?
                .into_inner();
            tracing::info!(addr = %options.addr, "ADS stream open (state of the world)");
            while let Some(response) = responses.next().await {
                let response = response.map_err(|e| (handled, e.to_string()))?;
                let (request, outcome) = state.on_sotw(response, sink);
                log_outcome(&outcome);
                handled += 1;
                if let Request::Sotw(r) = request
                    && tx.send(r).await.is_err()
                {
                    return Err((handled, "request stream closed".into()));
                }
            }
        }
        AdsMode::Delta => {
            let (tx, rx) = mpsc::channel(16);
            for request in state.on_connect() {
                if let Request::Delta(r) = request {
                    tx.try_send(r).map_err(|e| (0, e.to_string()))?;
                }
            }
            let mut responses = client
                .delta_aggregated_resources(ReceiverStream::new(rx))
                .await
                .map_err(|e| (0, format!("opening the delta ADS stream: {e}")))?
                .into_inner();
            tracing::info!(addr = %options.addr, "ADS stream open (delta)");
            while let Some(response) = responses.next().await {
                let response = response.map_err(|e| (handled, e.to_string()))?;
                let (request, outcome) = state.on_delta(response, sink);
                log_outcome(&outcome);
                handled += 1;
                if let Request::Delta(r) = request
                    && tx.send(r).await.is_err()
                {
                    return Err((handled, "request stream closed".into()));
                }
            }
        }
    }
    Ok(handled)
}

fn log_outcome(outcome: &Outcome) {
    match outcome {
        Outcome::Ack { type_url, version } => {
            tracing::info!(r#type = short(type_url), %version, "config accepted (ACK)");
        }
        Outcome::Nack { type_url, error } => {
            tracing::warn!(r#type = short(type_url), %error, "config rejected (NACK); keeping the previous one");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let mut ceilings = Vec::new();
        for _ in 0..6 {
            ceilings.push(b.ceiling().as_millis());
            let wait = b.next_wait();
            assert!(wait <= Duration::from_secs(1));
        }
        assert_eq!(ceilings, vec![100, 200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(100));
        let w = b.next_wait();
        assert!(
            w >= Duration::from_millis(50) && w <= Duration::from_millis(100),
            "{w:?}"
        );
    }
}
