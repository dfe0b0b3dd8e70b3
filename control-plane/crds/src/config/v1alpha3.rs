//! `config.flomesh.io/v1alpha3` `MeshConfig`.
//!
//! Every struct here implements `Default` with FSM's default for each key and is
//! `#[serde(default)]`, so `spec: {}` reads as FSM's defaults and a partial object (a
//! `kubectl patch --type=merge` result) keeps the defaults for what it leaves out. The derived
//! CRD schema carries the same values as `default:`, so the API server fills them in too.
//!
//! Where a default comes from: the MeshConfig key table in `spec/mesh-core.md` §0.5 first; for
//! keys it does not list, FSM's CRD (`+kubebuilder:default`), then the fallback FSM's
//! configurator uses for an unset key, then FSM's chart `values.yaml`. Each field that needs it
//! says which one it took.
//!
//! As in FSM, `spec` itself is optional: a MeshConfig without one reads as the defaults, and
//! the generated CRD gives `spec` a `default: {}` so the API server fills it in too.
//!
//! Only the sections the mesh reads (plus `ingress` and `gatewayAPI`, which FSM docs patch at
//! runtime) are modelled; the API server prunes the others (`clusterSet`, `connector`, `image`,
//! `misc`, `flb`, `serviceLB`, `egressGateway`, `pluginChains`, `warmup`).

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::config::DEFAULT_FSM_NAMESPACE;
use crate::validate::{Errors, FieldError, Validate};

/// The mesh-wide configuration, `fsm-mesh-config` in the control-plane namespace.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[kube(
    group = "config.flomesh.io",
    version = "v1alpha3",
    kind = "MeshConfig",
    plural = "meshconfigs",
    shortname = "meshconfig",
    namespaced,
    derive = "PartialEq",
    derive = "Default",
    label("app.kubernetes.io/name", "flomesh.io"),
    label("flomesh.io/reconcile", "true"),
    doc = "MeshConfig is the mesh-wide configuration of an FSM-compatible control plane."
)]
// `remote = "Self"` turns the derives into inherent functions so the trait impls below can
// wrap them: FSM's `spec` is optional, but kube's derive makes it a required field of the root.
#[serde(remote = "Self", rename_all = "camelCase", default)]
pub struct MeshConfigSpec {
    /// Proxy sidecar settings.
    pub sidecar: SidecarSpec,
    /// Traffic management settings.
    pub traffic: TrafficSpec,
    /// Logging, tracing and debug settings.
    pub observability: ObservabilitySpec,
    /// Workload certificate settings.
    pub certificate: CertificateSpec,
    /// Feature flags.
    pub feature_flags: FeatureFlags,
    /// Pipy repo server the sidecars fetch their scripts and configuration from.
    pub repo_server: RepoServerSpec,
    /// FSM Ingress controller settings.
    pub ingress: IngressSpec,
    /// FSM Gateway (Gateway API) settings.
    #[serde(rename = "gatewayAPI")]
    pub gateway_api: GatewayApiSpec,
}

impl Serialize for MeshConfigSpec {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        MeshConfigSpec::serialize(self, serializer)
    }
}

/// A missing (or `null`) `spec` reads as the defaults: serde asks a missing field for an
/// option, so going through `deserialize_option` is what makes the root's `spec` optional.
impl<'de> Deserialize<'de> for MeshConfigSpec {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct OptionalSpec;

        impl<'de> serde::de::Visitor<'de> for OptionalSpec {
            type Value = MeshConfigSpec;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a MeshConfig spec")
            }

            fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
                Ok(MeshConfigSpec::default())
            }

            fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
                Ok(MeshConfigSpec::default())
            }

            fn visit_some<D: serde::Deserializer<'de>>(
                self,
                d: D,
            ) -> Result<Self::Value, D::Error> {
                MeshConfigSpec::deserialize(d)
            }
        }

        deserializer.deserialize_option(OptionalSpec)
    }
}

// === Sidecar ===

/// Proxy sidecar settings. Most are read when a pod is injected, so they apply to pods created
/// after the change.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct SidecarSpec {
    /// Run the `fsm-init` init container privileged (needed on OpenShift).
    pub enable_privileged_init_container: bool,
    /// Sidecar log level, sent to the proxies as `SidecarLogLevel`.
    pub log_level: String,
    /// Sidecar container image; empty means the image the control plane was installed with.
    pub sidecar_image: String,
    /// Which sidecar injected pods run: `envoy` or `fsm-sidecar` (a pod's
    /// `flomesh.io/sidecar-class` annotation wins); empty means the injector's own default.
    pub sidecar_class: String,
    /// Maximum number of proxy connections to the controller; 0 means unlimited.
    pub max_data_plane_connections: u32,
    /// Interval for re-sending every proxy its configuration; `0s` disables it.
    pub config_resync_interval: String,
    /// Compress the configuration sent to sidecars.
    pub compress_config: bool,
    /// Start application containers only after the sidecar is ready.
    pub hold_application_until_proxy_starts: bool,
    /// Keep the sidecar alive until downstream connections have ended.
    pub graceful_exit_until_downstream_ends: bool,
    /// Disable mTLS between sidecars.
    #[serde(rename = "sidecarDisabledMTLS")]
    pub sidecar_disabled_mtls: bool,
    /// Sidecar connect/idle/read/write timeout, in seconds.
    pub sidecar_timeout: u32,
    /// How the sidecar reaches the application container.
    pub local_proxy_mode: LocalProxyMode,
    /// The sidecar's DNS proxy.
    #[serde(rename = "localDNSProxy")]
    pub local_dns_proxy: LocalDnsProxySpec,
}

impl Default for SidecarSpec {
    fn default() -> Self {
        Self {
            enable_privileged_init_container: false,
            log_level: "error".into(),
            sidecar_image: String::new(),
            sidecar_class: String::new(),
            max_data_plane_connections: 0,
            config_resync_interval: "0s".into(),
            // CRD defaults.
            compress_config: true,
            hold_application_until_proxy_starts: true,
            graceful_exit_until_downstream_ends: true,
            sidecar_disabled_mtls: false,
            // FSM's configurator uses 60 for an unset (or non-positive) timeout.
            sidecar_timeout: 60,
            local_proxy_mode: LocalProxyMode::Localhost,
            local_dns_proxy: LocalDnsProxySpec::default(),
        }
    }
}

/// How the sidecar sends inbound traffic to the application.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum LocalProxyMode {
    /// Over `127.0.0.1`.
    #[default]
    Localhost,
    /// Over the pod IP (for applications that do not listen on localhost).
    #[serde(rename = "PodIP")]
    PodIp,
}

/// The sidecar's DNS proxy.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct LocalDnsProxySpec {
    pub enable: bool,
    /// Primary upstream DNS server IP, e.g. the kube-dns ClusterIP.
    #[serde(rename = "primaryUpstreamDNSServerIPAddr")]
    pub primary_upstream_dns_server_ip_addr: String,
    /// Secondary upstream DNS server IP.
    #[serde(rename = "secondaryUpstreamDNSServerIPAddr")]
    pub secondary_upstream_dns_server_ip_addr: String,
}

// === Traffic ===

/// Traffic management settings. Permissive mode and egress apply at runtime; the interception
/// lists are read at injection time.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct TrafficSpec {
    /// Allow all traffic between meshed services without SMI policies.
    pub enable_permissive_traffic_policy_mode: bool,
    /// Let traffic to destinations outside the mesh pass through to its original destination.
    pub enable_egress: bool,
    /// Use HTTPS between the ingress gateway and backends.
    #[serde(rename = "useHTTPSIngress")]
    pub use_https_ingress: bool,
    /// Destination ports whose outbound traffic is not redirected to the sidecar.
    #[schemars(inner(range(min = 1)))]
    pub outbound_port_exclusion_list: Vec<u16>,
    /// Ports whose inbound traffic is not redirected to the sidecar.
    #[schemars(inner(range(min = 1)))]
    pub inbound_port_exclusion_list: Vec<u16>,
    /// Destination CIDRs whose outbound traffic is not redirected to the sidecar.
    #[serde(rename = "outboundIPRangeExclusionList")]
    pub outbound_ip_range_exclusion_list: Vec<String>,
    /// When non-empty, only outbound traffic to these CIDRs is redirected to the sidecar.
    #[serde(rename = "outboundIPRangeInclusionList")]
    pub outbound_ip_range_inclusion_list: Vec<String>,
    /// Network interfaces whose traffic is never intercepted.
    pub network_interface_exclusion_list: Vec<String>,
    /// How traffic is intercepted.
    pub interception_mode: InterceptionMode,
    /// Load-balance HTTP/1 per request rather than per connection.
    pub http1_per_request_load_balancing: bool,
    /// Load-balance HTTP/2 per request rather than per connection.
    pub http2_per_request_load_balancing: bool,
    /// How clients address services.
    pub service_access_mode: ServiceAccessMode,
    /// Remote external authorization for inbound and ingress traffic.
    pub inbound_external_authorization: ExternalAuthzSpec,
}

impl Default for TrafficSpec {
    fn default() -> Self {
        Self {
            enable_permissive_traffic_policy_mode: false,
            // mesh-core.md §0.5 (the chart installs with `true`; see its §15 item 3).
            enable_egress: false,
            use_https_ingress: false,
            outbound_port_exclusion_list: Vec::new(),
            inbound_port_exclusion_list: Vec::new(),
            outbound_ip_range_exclusion_list: Vec::new(),
            outbound_ip_range_inclusion_list: Vec::new(),
            network_interface_exclusion_list: Vec::new(),
            interception_mode: InterceptionMode::PodLevel,
            // Chart defaults.
            http1_per_request_load_balancing: false,
            http2_per_request_load_balancing: true,
            service_access_mode: ServiceAccessMode::Mixed,
            inbound_external_authorization: ExternalAuthzSpec::default(),
        }
    }
}

/// Where traffic is intercepted.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum InterceptionMode {
    /// iptables (or eBPF) in each pod's network namespace.
    #[default]
    PodLevel,
    /// On the node, for all meshed pods.
    NodeLevel,
}

/// How clients address services.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ServiceAccessMode {
    Ip,
    Domain,
    #[default]
    Mixed,
}

/// Remote external authorization.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct ExternalAuthzSpec {
    pub enable: bool,
    /// Address of the authorization service.
    pub address: String,
    /// Port of the authorization service.
    pub port: u16,
    /// Prefix for the authorization filter's stats.
    pub stat_prefix: String,
    /// Go duration to wait for the authorization service.
    pub timeout: String,
    /// Allow traffic when the authorization service does not answer.
    pub failure_mode_allow: bool,
}

// === Observability ===

/// Logging, tracing and debug settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct ObservabilitySpec {
    /// Control-plane log level.
    #[serde(rename = "fsmLogLevel")]
    pub fsm_log_level: LogLevel,
    /// Serve the control plane's debug endpoints.
    pub enable_debug_server: bool,
    /// Sidecar tracing.
    pub tracing: TracingSpec,
}

/// Control-plane and gateway log levels.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Trace,
    Debug,
    #[default]
    Info,
    Warn,
    Error,
    Fatal,
    Panic,
    Disabled,
}

/// Where sidecars send trace spans.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct TracingSpec {
    pub enable: bool,
    // `TracingSpec::address_or_default` fills in the namespace-dependent default.
    /// Collector host; empty means `jaeger.<fsm-namespace>.svc.cluster.local`.
    pub address: String,
    /// Collector port.
    #[schemars(range(min = 1))]
    pub port: u16,
    /// Collector API path.
    pub endpoint: String,
    /// Fraction of requests to trace, as a decimal string such as `"0.1"`; unset traces all.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sampled_fraction: Option<String>,
}

impl Default for TracingSpec {
    fn default() -> Self {
        Self {
            enable: false,
            // The documented default depends on the control-plane namespace, which a default
            // value cannot know; empty stands for it, as in FSM's configurator.
            address: String::new(),
            port: 9411,
            endpoint: "/api/v2/spans".into(),
            sampled_fraction: None,
        }
    }
}

impl TracingSpec {
    /// The collector host, filling in FSM's namespace-dependent default.
    pub fn address_or_default(&self, fsm_namespace: &str) -> String {
        if self.address.is_empty() {
            let ns = if fsm_namespace.is_empty() {
                DEFAULT_FSM_NAMESPACE
            } else {
                fsm_namespace
            };
            format!("jaeger.{ns}.svc.cluster.local")
        } else {
            self.address.clone()
        }
    }
}

// === Certificate ===

/// Workload certificate settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct CertificateSpec {
    /// Validity of service (workload) certificates, as a Go duration.
    pub service_cert_validity_duration: String,
    /// RSA key size of issued certificates, 2048 to 4096.
    pub cert_key_bit_size: u32,
}

impl Default for CertificateSpec {
    fn default() -> Self {
        Self {
            service_cert_validity_duration: "24h".into(),
            // FSM's configurator falls back to 2048 outside 2048..=4096.
            cert_key_bit_size: 2048,
        }
    }
}

// === Feature flags ===

// Defaults are FSM's chart values: none of these is in mesh-core.md §0.5 with a stated default.
/// Feature flags.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct FeatureFlags {
    /// Enable the `Egress` policy API.
    pub enable_egress_policy: bool,
    pub enable_snapshot_cache_mode: bool,
    pub enable_async_proxy_service_mapping: bool,
    /// Enable the `IngressBackend` policy API.
    pub enable_ingress_backend_policy: bool,
    /// Enable the `AccessControl` policy API.
    pub enable_access_control_policy: bool,
    /// Enable the `AccessCert` policy API.
    pub enable_access_cert_policy: bool,
    pub enable_traffic_warmup_policy: bool,
    pub enable_sidecar_pretty_config: bool,
    pub enable_sidecar_active_health_checks: bool,
    /// Enable the `Retry` policy API.
    pub enable_retry_policy: bool,
    pub enable_plugin_policy: bool,
    pub enable_auto_default_route: bool,
    pub enable_validate_gateway_listener_hostname: bool,
    #[serde(rename = "enableValidateHTTPRouteHostnames")]
    pub enable_validate_http_route_hostnames: bool,
    #[serde(rename = "enableValidateGRPCRouteHostnames")]
    pub enable_validate_grpc_route_hostnames: bool,
    #[serde(rename = "enableValidateTLSRouteHostnames")]
    pub enable_validate_tls_route_hostnames: bool,
    pub use_endpoint_slices_for_gateway: bool,
    pub drop_route_rule_if_no_available_backends: bool,
}

impl Default for FeatureFlags {
    fn default() -> Self {
        Self {
            enable_egress_policy: true,
            enable_snapshot_cache_mode: false,
            enable_async_proxy_service_mapping: false,
            enable_ingress_backend_policy: true,
            enable_access_control_policy: true,
            enable_access_cert_policy: false,
            enable_traffic_warmup_policy: false,
            enable_sidecar_pretty_config: true,
            enable_sidecar_active_health_checks: false,
            enable_retry_policy: false,
            enable_plugin_policy: false,
            enable_auto_default_route: false,
            enable_validate_gateway_listener_hostname: true,
            enable_validate_http_route_hostnames: true,
            enable_validate_grpc_route_hostnames: true,
            enable_validate_tls_route_hostnames: true,
            use_endpoint_slices_for_gateway: true,
            drop_route_rule_if_no_available_backends: false,
        }
    }
}

// === Repo server ===

/// The Pipy repo server.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct RepoServerSpec {
    /// Repo server address.
    #[serde(rename = "ipaddr")]
    pub ip_addr: String,
    /// Repo server port.
    #[schemars(range(min = 1))]
    pub port: u16,
    /// Codebase path the controller publishes to.
    pub codebase: String,
}

impl Default for RepoServerSpec {
    fn default() -> Self {
        Self {
            // FSM's configurator falls back to 127.0.0.1; the port is the chart's.
            ip_addr: "127.0.0.1".into(),
            port: 6060,
            codebase: String::new(),
        }
    }
}

// === Ingress ===

/// FSM Ingress controller settings (mutually exclusive with `gatewayAPI.enabled`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct IngressSpec {
    // Off by default as ingress-gateway.md §2.1 says, although FSM's CRD default is `true`.
    /// Run the FSM Ingress controller.
    pub enabled: bool,
    pub namespaced: bool,
    /// Type of the ingress Service.
    #[serde(rename = "type")]
    pub service_type: IngressServiceType,
    pub log_level: LogLevel,
    pub http: IngressHttpSpec,
    pub tls: IngressTlsSpec,
}

impl Default for IngressSpec {
    fn default() -> Self {
        Self {
            enabled: false,
            namespaced: false,
            service_type: IngressServiceType::LoadBalancer,
            log_level: LogLevel::Info,
            http: IngressHttpSpec::default(),
            tls: IngressTlsSpec::default(),
        }
    }
}

/// Type of the ingress controller's Service.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum IngressServiceType {
    #[default]
    LoadBalancer,
    NodePort,
}

/// Plain-HTTP listener of the ingress controller.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct IngressHttpSpec {
    pub enabled: bool,
    /// Service port.
    #[schemars(range(min = 1))]
    pub bind: u16,
    /// Container port.
    #[schemars(range(min = 1))]
    pub listen: u16,
    pub node_port: u16,
}

impl Default for IngressHttpSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            bind: 80,
            listen: 8000,
            node_port: 30508,
        }
    }
}

/// TLS listener of the ingress controller.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct IngressTlsSpec {
    pub enabled: bool,
    /// Service port.
    #[schemars(range(min = 1))]
    pub bind: u16,
    /// Container port.
    #[schemars(range(min = 1))]
    pub listen: u16,
    pub node_port: u16,
    /// Require client certificates.
    #[serde(rename = "mTLS")]
    pub mtls: bool,
    pub ssl_passthrough: SslPassthroughSpec,
}

impl Default for IngressTlsSpec {
    fn default() -> Self {
        Self {
            enabled: false,
            bind: 443,
            listen: 8443,
            node_port: 30607,
            mtls: false,
            ssl_passthrough: SslPassthroughSpec::default(),
        }
    }
}

/// TLS passthrough: forward encrypted bytes to the upstream untouched.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct SslPassthroughSpec {
    pub enabled: bool,
    #[schemars(range(min = 1))]
    pub upstream_port: u16,
}

impl Default for SslPassthroughSpec {
    fn default() -> Self {
        Self {
            enabled: false,
            upstream_port: 443,
        }
    }
}

// === Gateway API ===

// Defaults are FSM's chart values (ingress-gateway.md §2.2).
/// FSM Gateway settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct GatewayApiSpec {
    pub enabled: bool,
    pub log_level: LogLevel,
    pub fgw_log_level: LogLevel,
    /// Ignore `:port` in the Host header when matching hostnames.
    pub strip_any_host_port: bool,
    /// Forward the original Host header upstream.
    pub proxy_preserve_host: bool,
    #[schemars(range(min = 1))]
    pub ssl_passthrough_upstream_port: u16,
    pub http1_per_request_load_balancing: bool,
    pub http2_per_request_load_balancing: bool,
    pub proxy_tag: ProxyTagSpec,
}

impl Default for GatewayApiSpec {
    fn default() -> Self {
        Self {
            enabled: false,
            log_level: LogLevel::Info,
            fgw_log_level: LogLevel::Info,
            strip_any_host_port: true,
            proxy_preserve_host: true,
            ssl_passthrough_upstream_port: 443,
            http1_per_request_load_balancing: false,
            http2_per_request_load_balancing: true,
            proxy_tag: ProxyTagSpec::default(),
        }
    }
}

/// Header names the gateway uses to tag proxied requests.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct ProxyTagSpec {
    pub src_host_header: String,
    pub dst_host_header: String,
}

impl Default for ProxyTagSpec {
    fn default() -> Self {
        Self {
            src_host_header: "orig-host".into(),
            dst_host_header: "proxy-tag".into(),
        }
    }
}

// === Validation ===

/// `spec.sidecar.sidecarClass` values: empty (the injector's default) or a data plane.
const SIDECAR_CLASSES: [&str; 3] = ["", "envoy", "fsm-sidecar"];

impl Validate for MeshConfig {
    fn validate(&self) -> Vec<FieldError> {
        self.spec.validate()
    }
}

impl Validate for MeshConfigSpec {
    fn validate(&self) -> Vec<FieldError> {
        let mut errs = Errors::new();

        let sidecar = &self.sidecar;
        errs.duration(
            "spec.sidecar.configResyncInterval",
            &sidecar.config_resync_interval,
            true,
        );
        if !SIDECAR_CLASSES.contains(&sidecar.sidecar_class.as_str()) {
            errs.push(
                "spec.sidecar.sidecarClass",
                format!(
                    "{:?} is not a sidecar this mesh runs (envoy or fsm-sidecar)",
                    sidecar.sidecar_class
                ),
            );
        }

        let traffic = &self.traffic;
        for (i, cidr) in traffic.outbound_ip_range_exclusion_list.iter().enumerate() {
            errs.cidr(
                format!("spec.traffic.outboundIPRangeExclusionList[{i}]"),
                cidr,
            );
        }
        for (i, cidr) in traffic.outbound_ip_range_inclusion_list.iter().enumerate() {
            errs.cidr(
                format!("spec.traffic.outboundIPRangeInclusionList[{i}]"),
                cidr,
            );
        }
        for (i, port) in traffic.outbound_port_exclusion_list.iter().enumerate() {
            errs.port(
                format!("spec.traffic.outboundPortExclusionList[{i}]"),
                *port,
            );
        }
        for (i, port) in traffic.inbound_port_exclusion_list.iter().enumerate() {
            errs.port(format!("spec.traffic.inboundPortExclusionList[{i}]"), *port);
        }
        for (i, name) in traffic.network_interface_exclusion_list.iter().enumerate() {
            errs.non_empty(
                format!("spec.traffic.networkInterfaceExclusionList[{i}]"),
                name,
            );
        }
        let authz = &traffic.inbound_external_authorization;
        if authz.enable {
            let base = "spec.traffic.inboundExternalAuthorization";
            errs.non_empty(format!("{base}.address"), &authz.address);
            errs.port(format!("{base}.port"), authz.port);
            if !authz.timeout.is_empty() {
                errs.duration(format!("{base}.timeout"), &authz.timeout, false);
            }
        }

        let tracing = &self.observability.tracing;
        if tracing.enable {
            // Empty stands for FSM's default (`jaeger.<fsm-namespace>.svc.cluster.local`).
            let address = &tracing.address;
            if address.contains("://")
                || address
                    .chars()
                    .any(|c| c.is_whitespace() || c == '/' || c == '@')
            {
                errs.push(
                    "spec.observability.tracing.address",
                    format!(
                        "address {address:?} must be a host name or IP address (no scheme, path or port), such as \"jaeger.fsm-system.svc.cluster.local\""
                    ),
                );
            }
            errs.port("spec.observability.tracing.port", tracing.port);
            if !tracing.endpoint.is_empty() && !tracing.endpoint.starts_with('/') {
                errs.push(
                    "spec.observability.tracing.endpoint",
                    format!(
                        "endpoint {:?} must be an absolute path such as \"/api/v2/spans\"",
                        tracing.endpoint
                    ),
                );
            }
        }
        if let Some(fraction) = &tracing.sampled_fraction
            && !matches!(fraction.parse::<f64>(), Ok(f) if (0.0..=1.0).contains(&f))
        {
            errs.push(
                "spec.observability.tracing.sampledFraction",
                format!("sampled fraction {fraction:?} must be a number between 0 and 1"),
            );
        }

        let cert = &self.certificate;
        errs.duration(
            "spec.certificate.serviceCertValidityDuration",
            &cert.service_cert_validity_duration,
            false,
        );
        if !(2048..=4096).contains(&cert.cert_key_bit_size) {
            errs.push(
                "spec.certificate.certKeyBitSize",
                format!(
                    "key size {} must be between 2048 and 4096",
                    cert.cert_key_bit_size
                ),
            );
        }

        errs.port("spec.repoServer.port", self.repo_server.port);

        let ingress = &self.ingress;
        for (field, port) in [
            ("spec.ingress.http.bind", ingress.http.bind),
            ("spec.ingress.http.listen", ingress.http.listen),
            ("spec.ingress.tls.bind", ingress.tls.bind),
            ("spec.ingress.tls.listen", ingress.tls.listen),
            (
                "spec.ingress.tls.sslPassthrough.upstreamPort",
                ingress.tls.ssl_passthrough.upstream_port,
            ),
            (
                "spec.gatewayAPI.sslPassthroughUpstreamPort",
                self.gateway_api.ssl_passthrough_upstream_port,
            ),
        ] {
            errs.port(field, port);
        }
        if ingress.enabled && self.gateway_api.enabled {
            errs.push(
                "spec.gatewayAPI.enabled",
                "FSM Ingress (spec.ingress.enabled) and FSM Gateway are mutually exclusive",
            );
        }

        errs.into_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::test_support::fields;

    #[test]
    fn defaults_are_valid() {
        assert!(MeshConfigSpec::default().validate().is_empty());
    }

    #[test]
    fn empty_spec_is_fsm_defaults() {
        let spec: MeshConfigSpec = serde_json::from_str("{}").expect("empty spec");
        assert_eq!(spec, MeshConfigSpec::default());
        assert!(!spec.traffic.enable_permissive_traffic_policy_mode);
        assert!(!spec.traffic.enable_egress);
        assert_eq!(spec.certificate.service_cert_validity_duration, "24h");
        assert_eq!(spec.sidecar.log_level, "error");
        assert_eq!(spec.sidecar.config_resync_interval, "0s");
        assert_eq!(spec.observability.tracing.port, 9411);
        assert_eq!(spec.observability.tracing.endpoint, "/api/v2/spans");
    }

    #[test]
    fn missing_or_null_spec_is_fsm_defaults() {
        for yaml in [
            "apiVersion: config.flomesh.io/v1alpha3\nkind: MeshConfig\nmetadata: {name: fsm-mesh-config}\n",
            "apiVersion: config.flomesh.io/v1alpha3\nkind: MeshConfig\nmetadata: {name: fsm-mesh-config}\nspec:\n",
        ] {
            let mc: MeshConfig = serde_yaml_ng::from_str(yaml).expect(yaml);
            assert_eq!(mc.spec, MeshConfigSpec::default());
        }
        let json = serde_json::json!({"apiVersion": "config.flomesh.io/v1alpha3", "kind": "MeshConfig", "metadata": {"name": "m"}});
        let mc: MeshConfig = serde_json::from_value(json).expect("no spec");
        assert_eq!(mc.spec, MeshConfigSpec::default());
        // Wrong types inside a present spec still fail, with the field's path.
        let bad = serde_json::json!({"apiVersion": "config.flomesh.io/v1alpha3", "kind": "MeshConfig", "metadata": {"name": "m"}, "spec": {"traffic": {"enableEgress": "no"}}});
        let err = serde_path_to_error::deserialize::<_, MeshConfig>(bad).expect_err("bad type");
        assert_eq!(err.path().to_string(), "spec.traffic.enableEgress");
        assert!(serde_json::from_value::<MeshConfigSpec>(serde_json::json!([1])).is_err());
    }

    #[test]
    fn partial_section_keeps_other_defaults() {
        let spec: MeshConfigSpec =
            serde_json::from_str(r#"{"traffic":{"enableEgress":true}}"#).expect("partial spec");
        assert!(spec.traffic.enable_egress);
        assert_eq!(spec.traffic.service_access_mode, ServiceAccessMode::Mixed);
        assert_eq!(spec.sidecar, SidecarSpec::default());
    }

    #[test]
    fn wrong_types_are_rejected() {
        for bad in [
            r#"{"traffic":{"enableEgress":"no"}}"#,
            r#"{"traffic":{"outboundPortExclusionList":[70000]}}"#,
            r#"{"traffic":{"outboundPortExclusionList":"6379,7070"}}"#,
            r#"{"traffic":{"interceptionMode":"Sideways"}}"#,
            r#"{"observability":{"fsmLogLevel":"verbose"}}"#,
        ] {
            assert!(
                serde_json::from_str::<MeshConfigSpec>(bad).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn fsm_json_names_round_trip() {
        let json = serde_json::json!({
            "traffic": {
                "enablePermissiveTrafficPolicyMode": true,
                "useHTTPSIngress": true,
                "outboundIPRangeExclusionList": ["10.0.0.1/32"],
                "outboundIPRangeInclusionList": ["10.0.0.0/8"],
                "outboundPortExclusionList": [6379, 7070],
                "inboundPortExclusionList": [8080],
            },
            "sidecar": {"sidecarDisabledMTLS": true, "localProxyMode": "PodIP",
                        "localDNSProxy": {"enable": true, "primaryUpstreamDNSServerIPAddr": "10.43.0.10"}},
            "featureFlags": {"enableValidateHTTPRouteHostnames": false},
            "gatewayAPI": {"enabled": true},
            "ingress": {"type": "NodePort", "tls": {"mTLS": true}},
            "repoServer": {"ipaddr": "10.0.0.5"},
        });
        let spec: MeshConfigSpec = serde_json::from_value(json).expect("spec");
        let t = &spec.traffic;
        assert!(t.enable_permissive_traffic_policy_mode && t.use_https_ingress);
        assert_eq!(t.outbound_ip_range_exclusion_list, ["10.0.0.1/32"]);
        assert_eq!(t.outbound_ip_range_inclusion_list, ["10.0.0.0/8"]);
        assert_eq!(t.outbound_port_exclusion_list, [6379, 7070]);
        assert_eq!(t.inbound_port_exclusion_list, [8080]);
        assert!(spec.sidecar.sidecar_disabled_mtls);
        assert_eq!(spec.sidecar.local_proxy_mode, LocalProxyMode::PodIp);
        assert_eq!(
            spec.sidecar
                .local_dns_proxy
                .primary_upstream_dns_server_ip_addr,
            "10.43.0.10"
        );
        assert!(!spec.feature_flags.enable_validate_http_route_hostnames);
        assert!(spec.gateway_api.enabled);
        assert_eq!(spec.ingress.service_type, IngressServiceType::NodePort);
        assert!(spec.ingress.tls.mtls);
        assert_eq!(spec.repo_server.ip_addr, "10.0.0.5");

        let back = serde_json::to_value(&spec).expect("serialize");
        assert_eq!(back["traffic"]["useHTTPSIngress"], true);
        assert_eq!(back["gatewayAPI"]["enabled"], true);
    }

    #[test]
    fn tracing_address_default_depends_on_namespace() {
        let tracing = TracingSpec::default();
        assert_eq!(
            tracing.address_or_default("mesh-ns"),
            "jaeger.mesh-ns.svc.cluster.local"
        );
        assert_eq!(
            tracing.address_or_default(""),
            "jaeger.fsm-system.svc.cluster.local"
        );
        let custom = TracingSpec {
            address: "otel.obs".into(),
            ..TracingSpec::default()
        };
        assert_eq!(custom.address_or_default("mesh-ns"), "otel.obs");
    }

    #[test]
    fn cert_validity_must_be_a_positive_go_duration() {
        for bad in ["24", "1d", "", "0s", "-1h"] {
            let mut spec = MeshConfigSpec::default();
            spec.certificate.service_cert_validity_duration = bad.into();
            assert_eq!(
                fields(&spec.validate()),
                ["spec.certificate.serviceCertValidityDuration"],
                "{bad:?}"
            );
        }
        let mut spec = MeshConfigSpec::default();
        spec.certificate.service_cert_validity_duration = "1h30m".into();
        assert!(spec.validate().is_empty());
    }

    #[test]
    fn resync_interval_must_parse() {
        let mut spec = MeshConfigSpec::default();
        spec.sidecar.config_resync_interval = "30".into();
        assert_eq!(
            fields(&spec.validate()),
            ["spec.sidecar.configResyncInterval"]
        );
        spec.sidecar.config_resync_interval = "30s".into();
        assert!(spec.validate().is_empty());
    }

    #[test]
    fn sidecar_class_names_a_data_plane() {
        let mut spec = MeshConfigSpec::default();
        for good in ["", "envoy", "fsm-sidecar"] {
            spec.sidecar.sidecar_class = good.into();
            assert!(spec.validate().is_empty(), "{good:?}");
        }
        spec.sidecar.sidecar_class = "pipy".into();
        assert_eq!(fields(&spec.validate()), ["spec.sidecar.sidecarClass"]);
    }

    #[test]
    fn interception_lists_are_checked() {
        let mut spec = MeshConfigSpec::default();
        spec.traffic.outbound_ip_range_exclusion_list =
            vec!["1.1.1.1/32".into(), "10.244.0.0,10.96.0.0/16".into()];
        spec.traffic.outbound_ip_range_inclusion_list = vec!["10.0.0.0".into()];
        spec.traffic.outbound_port_exclusion_list = vec![6379, 0];
        spec.traffic.inbound_port_exclusion_list = vec![0];
        spec.traffic.network_interface_exclusion_list = vec!["net1".into(), " ".into()];
        assert_eq!(
            fields(&spec.validate()),
            [
                "spec.traffic.outboundIPRangeExclusionList[1]",
                "spec.traffic.outboundIPRangeInclusionList[0]",
                "spec.traffic.outboundPortExclusionList[1]",
                "spec.traffic.inboundPortExclusionList[0]",
                "spec.traffic.networkInterfaceExclusionList[1]",
            ]
        );
    }

    #[test]
    fn tracing_is_checked_when_enabled() {
        let mut spec = MeshConfigSpec::default();
        spec.observability.tracing.port = 0;
        spec.observability.tracing.endpoint = "api/v2/spans".into();
        assert!(
            spec.validate().is_empty(),
            "disabled tracing is not checked"
        );
        spec.observability.tracing.enable = true;
        spec.observability.tracing.address = "http://jaeger:9411/".into();
        assert_eq!(
            fields(&spec.validate()),
            [
                "spec.observability.tracing.address",
                "spec.observability.tracing.port",
                "spec.observability.tracing.endpoint"
            ]
        );
        for good in [
            "",
            "jaeger.fsm-system.svc.cluster.local",
            "10.0.0.7",
            "fd00::7",
        ] {
            spec.observability.tracing.address = good.into();
            assert!(
                !fields(&spec.validate()).contains(&"spec.observability.tracing.address"),
                "{good:?}"
            );
        }
    }

    #[test]
    fn sampled_fraction_is_a_probability() {
        let mut spec = MeshConfigSpec::default();
        for (value, ok) in [
            ("1.0", true),
            ("0.25", true),
            ("1.5", false),
            ("half", false),
        ] {
            spec.observability.tracing.sampled_fraction = Some(value.into());
            assert_eq!(spec.validate().is_empty(), ok, "{value}");
        }
    }

    #[test]
    fn external_authz_is_checked_when_enabled() {
        let mut spec = MeshConfigSpec::default();
        spec.traffic.inbound_external_authorization.enable = true;
        spec.traffic.inbound_external_authorization.timeout = "1".into();
        assert_eq!(
            fields(&spec.validate()),
            [
                "spec.traffic.inboundExternalAuthorization.address",
                "spec.traffic.inboundExternalAuthorization.port",
                "spec.traffic.inboundExternalAuthorization.timeout",
            ]
        );
    }

    #[test]
    fn key_size_range() {
        let mut spec = MeshConfigSpec::default();
        spec.certificate.cert_key_bit_size = 1024;
        assert_eq!(
            fields(&spec.validate()),
            ["spec.certificate.certKeyBitSize"]
        );
        spec.certificate.cert_key_bit_size = 4096;
        assert!(spec.validate().is_empty());
    }

    #[test]
    fn ingress_and_gateway_are_exclusive() {
        let mut spec = MeshConfigSpec::default();
        spec.ingress.enabled = true;
        spec.gateway_api.enabled = true;
        spec.repo_server.port = 0;
        assert_eq!(
            fields(&spec.validate()),
            ["spec.repoServer.port", "spec.gatewayAPI.enabled"]
        );
    }
}
