//! Integration tests with real processes, the demo workloads and the demo runner.
//!
//! The harness here is shared by the tests in `tests/` and by the `fsm-demo` runner, so `make
//! demo` and `make test` exercise the same start-up path: find the binaries ([`paths`]), run them
//! as [`ManagedProcess`]es that die with the test, read the mesh from a manifest directory
//! ([`mesh`]) or drive a test API server ([`cluster`]), start the workloads ([`apps`]), the control plane ([`controller`]) and real Envoy
//! sidecars ([`envoy`]), then talk to them with small clients ([`client`]) and assert eventual
//! state with [`eventually`]; [`prometheus`] runs the real Prometheus over them. Tests that play
//! a proxy or a peer use [`ads_client`] (a raw ADS stream with a pod's bootstrap credentials) and
//! [`tls_probe`] (a TLS client at a meshed inbound port).

pub mod ads_client;
pub mod apps;
pub mod client;
pub mod cluster;
pub mod controller;
pub mod demo_mesh;
pub mod envoy;
pub mod eventually;
pub mod mesh;
pub mod paths;
pub mod process;
pub mod prometheus;
pub mod sidecar;
pub mod tls_probe;

pub use ads_client::{
    SDS, SecretsWait, connect_ads, decode_secrets, fetch_secrets, inline_text, private_key_owners,
    tls_certificate, xds_node,
};
pub use apps::{
    localhost_get_egress_policy, start_demo_app, start_demo_apps, start_localhost_server,
};
pub use client::{
    HttpReply, backends_via, http_get_from, http_get_ok_via, http_get_via, http_get_with_headers,
    share_served_by, split_share_matches, stats_counter, tcp_roundtrip, unavailable_count,
    wait_tcp_unreachable,
};
pub use controller::{
    AdsTarget, Controller, ControllerOptions, ProxyDebug, TypeDebug, start_controller,
    start_controller_on_cluster, write_standalone_bootstrap,
};
pub use demo_mesh::{DemoMesh, PAIRINGS, Plane, Sidecar};
pub use envoy::{
    AdsMode, Envoy, SidecarConfig, bootstrap_json, bootstrap_secrets, envoy_bootstrap, start_envoy,
    start_envoy_with, validate_bootstrap, validate_bootstrap_file,
};
pub use eventually::eventually;
pub use mesh::{
    AppPort, AppProtocol, MeshPod, demo_manifests, edit_manifest, example_manifests, load_catalog,
    mesh_pods,
};
pub use paths::{binary, envoy_binary, repo_root};
pub use process::{ManagedProcess, free_port, wait_for_http_ok, wait_for_tcp};
pub use prometheus::{Prometheus, start_prometheus};
pub use sidecar::{FsmSidecar, FsmSidecarConfig, start_fsm_sidecar};
pub use tls_probe::{ProbeClient, probe};
