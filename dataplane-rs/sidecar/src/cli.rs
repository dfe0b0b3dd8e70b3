//! The command line.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::{Parser, ValueEnum};
use fsm_sidecar_xds::AdsMode;

/// fsm-sidecar: the mesh's native Rust sidecar. It fetches its listeners, routes, clusters and
/// endpoints from the FSM control plane over ADS and proxies the pod's traffic: outbound on
/// 15001 (explicit HTTP by Host, and `outbound-tcp:` listeners), inbound on 15003.
#[derive(Debug, Parser)]
#[command(name = "fsm-sidecar", version)]
pub struct Cli {
    /// Node id in FSM's format: `<proxy-uuid>.sidecar.<service-account>.<namespace>`.
    #[arg(long, env = "FSM_SIDECAR_NODE_ID")]
    pub node_id: String,

    /// Node cluster, `<service-account>.<namespace>` (derived from the node id when omitted).
    #[arg(long)]
    pub node_cluster: Option<String>,

    /// The control plane's ADS address, `host:port` (mTLS gRPC with the bootstrap certificate,
    /// or plaintext with --ads-insecure).
    #[arg(long, env = "FSM_SIDECAR_ADS", default_value = "127.0.0.1:15128")]
    pub ads: String,

    /// Directory holding the bootstrap certificate for mTLS to the control plane: `ca.crt`,
    /// `tls.crt`, `tls.key` (a Kubernetes TLS secret mounted as files). Re-read at every
    /// (re)connect. Required unless --ads-insecure is given.
    #[arg(
        long,
        env = "FSM_SIDECAR_BOOTSTRAP_DIR",
        conflicts_with = "ads_insecure"
    )]
    pub bootstrap_dir: Option<PathBuf>,

    /// The name the control plane's ADS certificate carries (checked as a DNS SAN).
    #[arg(long, default_value = fsm_sidecar_xds::DEFAULT_ADS_SERVER_NAME)]
    pub ads_server_name: String,

    /// Speak plaintext gRPC to the control plane, without --bootstrap-dir. Only for tests against
    /// a scripted ADS server: anyone on the path could then read this proxy's private keys.
    #[arg(long)]
    pub ads_insecure: bool,

    /// ADS flavour: state of the world or incremental.
    #[arg(long, value_enum, default_value_t = Mode::Sotw)]
    pub ads_mode: Mode,

    /// This pod's IP, announced in the node metadata.
    #[arg(long)]
    pub pod_ip: Option<IpAddr>,

    // FSM's injector hands its sidecar the pod's identity through the environment (the downward
    // API), so each of these also reads the variable an injected container would have.
    /// This pod's name, for node metadata and the `source_pod` metric label.
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,

    /// This pod's namespace, for the `source_namespace` label; the node id's namespace when
    /// omitted.
    #[arg(long, env = "POD_NAMESPACE")]
    pub pod_namespace: Option<String>,

    /// The workload kind (`Deployment`, `StatefulSet`, `DaemonSet`…) for the `source_kind` label.
    #[arg(long, env = "WORKLOAD_KIND")]
    pub workload_kind: Option<String>,

    /// The workload name for the `source_name` label; the pod name when omitted, then the
    /// service account.
    #[arg(long, env = "WORKLOAD_NAME")]
    pub workload_name: Option<String>,

    /// Admin server: /config_dump, /ready, /stats, /stats/prometheus.
    #[arg(long, default_value = "127.0.0.1:15000")]
    pub admin: SocketAddr,

    /// Prometheus scrape address (/stats/prometheus and /metrics).
    #[arg(long, default_value = "127.0.0.1:15010")]
    pub metrics: SocketAddr,

    /// Log filter, e.g. `info` or `fsm_sidecar_proxy=debug,info`.
    #[arg(long, default_value = "info")]
    pub log_level: String,

    /// Transparent mode: bind listeners on the unspecified address and match filter chains on
    /// the original destination of iptables-redirected connections.
    #[arg(long)]
    pub transparent: bool,

    /// Application probes FSM's injector rewrote, served from start-up with or without a control
    /// plane: a JSON array of `{"listenPort": 15901, "path": "/fsm-liveness-probe", "scheme":
    /// "HTTP", "targetPort": 14001, "targetPath": "/healthz", "timeoutSeconds": 1}`. HTTP probes
    /// are answered by asking 127.0.0.1:<targetPort> for <targetPath>; an HTTPS probe's listen
    /// port is relayed as TCP to 127.0.0.1:<targetPort>.
    #[arg(long, env = "FSM_SIDECAR_PROBES", value_name = "JSON")]
    pub probes: Option<String>,

    /// Tokio worker threads.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Mode {
    Sotw,
    Delta,
}

impl From<Mode> for AdsMode {
    fn from(m: Mode) -> Self {
        match m {
            Mode::Sotw => AdsMode::Sotw,
            Mode::Delta => AdsMode::Delta,
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_is_consistent_and_has_fsm_defaults() {
        Cli::command().debug_assert();
        let cli = Cli::parse_from([
            "fsm-sidecar",
            "--node-id",
            "6a1f3c2e-1b7d-4c1e-9a3f-0c5d2e8b7a10.sidecar.curl.demo",
            "--ads-mode",
            "delta",
        ]);
        assert_eq!(cli.admin.port(), 15000);
        assert_eq!(cli.metrics.port(), 15010);
        assert!(matches!(AdsMode::from(cli.ads_mode), AdsMode::Delta));
        assert_eq!(
            cli.ads_server_name,
            "fsm-controller.fsm-system.svc.cluster.local"
        );
        assert!(cli.bootstrap_dir.is_none() && !cli.ads_insecure);
    }

    #[test]
    fn ads_tls_flags() {
        let cli = Cli::parse_from([
            "fsm-sidecar",
            "--node-id",
            "6a1f3c2e-1b7d-4c1e-9a3f-0c5d2e8b7a10.sidecar.curl.demo",
            "--bootstrap-dir",
            "/etc/fsm/bootstrap",
            "--ads-server-name",
            "ads.example",
        ]);
        assert_eq!(
            cli.bootstrap_dir.as_deref(),
            Some(std::path::Path::new("/etc/fsm/bootstrap"))
        );
        assert_eq!(cli.ads_server_name, "ads.example");
        let both = Cli::try_parse_from([
            "fsm-sidecar",
            "--node-id",
            "x.sidecar.curl.demo",
            "--bootstrap-dir",
            "/b",
            "--ads-insecure",
        ]);
        assert!(both.is_err(), "--bootstrap-dir and --ads-insecure conflict");
    }

    #[test]
    fn workload_flags() {
        let cli = Cli::parse_from([
            "fsm-sidecar",
            "--node-id",
            "6a1f3c2e-1b7d-4c1e-9a3f-0c5d2e8b7a10.sidecar.curl.demo",
            "--pod-name",
            "curl-7b9f6d8c4f-q5z2m",
            "--pod-namespace",
            "demo",
            "--workload-kind",
            "Deployment",
            "--workload-name",
            "curl",
        ]);
        assert_eq!(cli.pod_name.as_deref(), Some("curl-7b9f6d8c4f-q5z2m"));
        assert_eq!(cli.pod_namespace.as_deref(), Some("demo"));
        assert_eq!(cli.workload_kind.as_deref(), Some("Deployment"));
        assert_eq!(cli.workload_name.as_deref(), Some("curl"));
    }

    #[test]
    fn probes_flag_takes_json() {
        let json = r#"[{"listenPort": 15901, "path": "/fsm-liveness-probe", "targetPort": 14001}]"#;
        let cli = Cli::parse_from([
            "fsm-sidecar",
            "--node-id",
            "x.sidecar.a.b",
            "--probes",
            json,
        ]);
        assert_eq!(cli.probes.as_deref(), Some(json));
    }
}
