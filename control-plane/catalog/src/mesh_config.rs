use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

/// `config.flomesh.io` MeshConfig, the keys the control plane reads today, with FSM's defaults.
/// Unknown keys are accepted (FSM has many more) but every known key is type-checked, so
/// `enableEgress: "no"` is rejected with the field's path.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MeshConfig {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: MeshConfigSpec,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshConfigSpec {
    #[serde(default)]
    pub traffic: TrafficSpec,
    #[serde(default)]
    pub certificate: CertificateSpec,
    #[serde(default)]
    pub sidecar: SidecarSpec,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TrafficSpec {
    /// FSM's default is SMI mode (deny unless allowed), i.e. `false`.
    #[serde(default)]
    pub enable_permissive_traffic_policy_mode: bool,
    #[serde(default)]
    pub enable_egress: bool,
    #[serde(default, rename = "useHTTPSIngress")]
    pub use_https_ingress: bool,
    #[serde(default)]
    pub outbound_port_exclusion_list: Vec<u16>,
    #[serde(default)]
    pub inbound_port_exclusion_list: Vec<u16>,
    #[serde(default, rename = "outboundIPRangeExclusionList")]
    pub outbound_ip_range_exclusion_list: Vec<String>,
    #[serde(default, rename = "outboundIPRangeInclusionList")]
    pub outbound_ip_range_inclusion_list: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateSpec {
    #[serde(default = "default_cert_validity")]
    pub service_cert_validity_duration: String,
}

impl Default for CertificateSpec {
    fn default() -> Self {
        CertificateSpec {
            service_cert_validity_duration: default_cert_validity(),
        }
    }
}

fn default_cert_validity() -> String {
    "24h".to_string()
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SidecarSpec {
    #[serde(default = "default_log_level")]
    pub log_level: String,
}

impl Default for SidecarSpec {
    fn default() -> Self {
        SidecarSpec {
            log_level: default_log_level(),
        }
    }
}

fn default_log_level() -> String {
    "error".to_string()
}
