//! `fsm proxy status <pod>`'s comparison (like `istioctl proxy-status <pod>`): the resources the
//! controller would send the proxy now (`/debug/proxies/resources`) against those the proxy
//! holds (its own `/config_dump`, Envoy's or fsm-sidecar's), resource by resource, in the data
//! plane's own JSON form, with a unified diff of each one that differs.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use serde::Deserialize;
use serde_json::Value;

/// `/debug/proxies/resources`: per type URL, the resources the controller computed.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Computed {
    pub types: BTreeMap<String, ComputedType>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ComputedType {
    pub resources: Vec<NamedResource>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct NamedResource {
    pub name: String,
    pub resource: Value,
}

/// Per type URL, by name, each resource's JSON.
type ByType = BTreeMap<String, BTreeMap<String, Value>>;

/// The admin path of the dump to compare: Envoy leaves endpoints out unless asked.
pub const DUMP_QUERY: &str = "config_dump?include_eds";

/// Where Envoy's `/config_dump` keeps each dynamic resource type: (dump section type, list
/// field, path to the resource in an entry, the resource's type URL).
const ENVOY_SECTIONS: [(&str, &str, &[&str], &str); 5] = [
    (
        "type.googleapis.com/envoy.admin.v3.ClustersConfigDump",
        "dynamic_active_clusters",
        &["cluster"],
        "type.googleapis.com/envoy.config.cluster.v3.Cluster",
    ),
    (
        "type.googleapis.com/envoy.admin.v3.EndpointsConfigDump",
        "dynamic_endpoint_configs",
        &["endpoint_config"],
        "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
    ),
    (
        "type.googleapis.com/envoy.admin.v3.ListenersConfigDump",
        "dynamic_listeners",
        &["active_state", "listener"],
        "type.googleapis.com/envoy.config.listener.v3.Listener",
    ),
    (
        "type.googleapis.com/envoy.admin.v3.RoutesConfigDump",
        "dynamic_route_configs",
        &["route_config"],
        "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
    ),
    (
        "type.googleapis.com/envoy.admin.v3.SecretsConfigDump",
        "dynamic_active_secrets",
        &["secret"],
        "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
    ),
];

/// What fsm-sidecar's dump adds to a secret for operators (parsed certificates): not part of
/// the resource.
const SIDECAR_ADDITIONS: [(&str, &str); 2] = [
    ("tlsCertificate", "leaf"),
    ("validationContext", "trustedRoots"),
];

fn resource_name(resource: &Value) -> Option<String> {
    resource["name"]
        .as_str()
        .or_else(|| resource["cluster_name"].as_str())
        .or_else(|| resource["clusterName"].as_str())
        .map(str::to_string)
}

/// The dynamic resources a proxy holds, from its `/config_dump` (Envoy's `configs` sections, or
/// fsm-sidecar's `types`), in the form the controller serves them.
pub fn held(dump: &Value) -> Result<ByType> {
    let mut held = ByType::new();
    if let Some(types) = dump["types"].as_object() {
        for (type_url, state) in types {
            let entry = held.entry(type_url.clone()).or_default();
            for r in state["resources"].as_array().into_iter().flatten() {
                let mut resource = r["resource"].clone();
                for (parent, added) in SIDECAR_ADDITIONS {
                    if let Some(obj) = resource.get_mut(parent).and_then(Value::as_object_mut) {
                        obj.remove(added);
                    }
                }
                let name = r["name"].as_str().unwrap_or_default().to_string();
                entry.insert(name, resource);
            }
        }
        return Ok(held);
    }
    let sections = dump["configs"]
        .as_array()
        .context("the dump is neither Envoy's (configs) nor fsm-sidecar's (types)")?;
    // Secrets the bootstrap reads from files (the sidecar's own credentials) are the pod's, not
    // the controller's.
    let mut from_files = Vec::new();
    for section in sections {
        if section["@type"].as_str() == Some(BOOTSTRAP_DUMP) {
            file_sourced_secrets(&section["bootstrap"], &mut from_files);
        }
    }
    for section in sections {
        let Some((_, list, path, type_url)) = ENVOY_SECTIONS
            .iter()
            .find(|(t, ..)| section["@type"].as_str() == Some(t))
        else {
            continue;
        };
        let entry = held.entry(type_url.to_string()).or_default();
        for item in section[list].as_array().into_iter().flatten() {
            let mut resource = item;
            for step in *path {
                resource = &resource[step];
            }
            if resource.is_null() {
                continue; // a listener still warming: not held yet
            }
            let mut resource = resource.clone();
            // Envoy omits the @type of a resource inside its section.
            if resource.get("@type").is_none()
                && let Some(obj) = resource.as_object_mut()
            {
                obj.insert("@type".into(), Value::from(*type_url));
            }
            let mut normalized = fsm_adapter_envoy::json::normalize(&resource)
                .map_err(|e| anyhow::anyhow!("{type_url} in the proxy's dump: {e}"))?;
            let name = resource_name(&normalized).unwrap_or_default();
            if *type_url == ENVOY_SECRET && from_files.contains(&name) {
                continue;
            }
            if *type_url == ENVOY_ENDPOINTS {
                without_envoy_endpoint_state(&mut normalized);
            }
            entry.insert(name, normalized);
        }
    }
    // Envoy dumps the endpoints of every cluster; only EDS clusters' come from the controller.
    let eds_clusters: Vec<String> = held
        .get(ENVOY_CLUSTER)
        .map(|clusters| {
            clusters
                .iter()
                .filter(|(_, c)| c["type"].as_str() == Some("EDS"))
                .map(|(name, _)| name.clone())
                .collect()
        })
        .unwrap_or_default();
    if let Some(endpoints) = held.get_mut(ENVOY_ENDPOINTS) {
        endpoints.retain(|name, _| eds_clusters.contains(name));
    }
    Ok(held)
}

const BOOTSTRAP_DUMP: &str = "type.googleapis.com/envoy.admin.v3.BootstrapConfigDump";
const ENVOY_CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const ENVOY_ENDPOINTS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
const ENVOY_SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// Names of the SDS secrets the bootstrap reads from files (`sds_config` with a path).
fn file_sourced_secrets(value: &Value, names: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            if let (Some(name), Some(sds)) = (map.get("name"), map.get("sds_config"))
                && (sds.get("path_config_source").is_some() || sds.get("path").is_some())
                && let Some(name) = name.as_str()
            {
                names.push(name.to_string());
            }
            map.values().for_each(|v| file_sourced_secrets(v, names));
        }
        Value::Array(items) => items.iter().for_each(|v| file_sourced_secrets(v, names)),
        _ => {}
    }
}

/// Envoy dumps a load assignment as it applies it: each host's current health (runtime state,
/// not configuration) and the defaults it filled in. Without those it compares with what the
/// controller sent.
pub fn without_envoy_endpoint_state(assignment: &mut Value) {
    for locality in assignment["endpoints"].as_array_mut().into_iter().flatten() {
        let Some(locality) = locality.as_object_mut() else {
            continue;
        };
        if locality.get("locality") == Some(&serde_json::json!({})) {
            locality.remove("locality");
        }
        if locality.get("load_balancing_weight") == Some(&Value::from(0)) {
            locality.remove("load_balancing_weight");
        }
        for host in locality
            .get_mut("lb_endpoints")
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
        {
            let Some(host) = host.as_object_mut() else {
                continue;
            };
            host.remove("health_status");
            if host.get("load_balancing_weight") == Some(&Value::from(1)) {
                host.remove("load_balancing_weight");
            }
            if let Some(endpoint) = host.get_mut("endpoint").and_then(Value::as_object_mut)
                && endpoint.get("health_check_config") == Some(&serde_json::json!({}))
            {
                endpoint.remove("health_check_config");
            }
        }
    }
    if let Some(policy) = assignment.get_mut("policy").and_then(Value::as_object_mut) {
        // Envoy's default overprovisioning factor.
        if policy.get("overprovisioning_factor") == Some(&Value::from(140)) {
            policy.remove("overprovisioning_factor");
        }
    }
    if assignment.get("policy") == Some(&serde_json::json!({}))
        && let Some(obj) = assignment.as_object_mut()
    {
        obj.remove("policy");
    }
}

/// Resource by resource, what differs; "" when the proxy holds exactly what was computed.
pub fn compare(computed: &Computed, held: &ByType) -> String {
    let mut rows = vec![
        [
            "TYPE",
            "COMPUTED",
            "MATCH",
            "DIFFER",
            "NOT HELD",
            "NOT COMPUTED",
        ]
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>(),
    ];
    let mut details = String::new();
    let empty = BTreeMap::new();
    let mut type_urls: Vec<&String> = computed.types.keys().chain(held.keys()).collect();
    type_urls.sort();
    type_urls.dedup();
    for type_url in type_urls {
        let short = type_url.rsplit('.').next().unwrap_or(type_url);
        let computed_here: BTreeMap<&str, Value> = computed
            .types
            .get(type_url)
            .map(|t| {
                t.resources
                    .iter()
                    .map(|r| {
                        let mut resource = r.resource.clone();
                        if type_url == ENVOY_ENDPOINTS {
                            without_envoy_endpoint_state(&mut resource);
                        }
                        (r.name.as_str(), resource)
                    })
                    .collect()
            })
            .unwrap_or_default();
        let held_here = held.get(type_url).unwrap_or(&empty);
        let (mut matching, mut differ, mut not_held) = (0, 0, 0);
        for (name, want) in &computed_here {
            match held_here.get(*name) {
                Some(have) if have == want => matching += 1,
                Some(have) => {
                    differ += 1;
                    details.push_str(&format!(
                        "{short} {name:?} differs:\n{}",
                        unified_diff(want, have)
                    ));
                }
                None => {
                    not_held += 1;
                    details.push_str(&format!(
                        "{short} {name:?}: computed, not held by the proxy\n"
                    ));
                }
            }
        }
        let extra: Vec<&String> = held_here
            .keys()
            .filter(|n| !computed_here.contains_key(n.as_str()))
            .collect();
        for name in &extra {
            details.push_str(&format!(
                "{short} {name:?}: held by the proxy, not computed for it now\n"
            ));
        }
        rows.push(vec![
            short.to_string(),
            computed_here.len().to_string(),
            matching.to_string(),
            differ.to_string(),
            not_held.to_string(),
            extra.len().to_string(),
        ]);
    }
    let mut out = crate::table::columns(&rows);
    if details.is_empty() {
        out.push_str("The proxy holds exactly what the controller computed.\n");
    } else {
        out.push_str(&details);
    }
    out
}

fn unified_diff(computed: &Value, held: &Value) -> String {
    let pretty = |v: &Value| serde_json::to_string_pretty(v).unwrap_or_default() + "\n";
    let (a, b) = (pretty(computed), pretty(held));
    similar::TextDiff::from_lines(&a, &b)
        .unified_diff()
        .context_radius(3)
        .header("controller", "proxy")
        .to_string()
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use fsm_adapter_envoy::json::{Sensitive, message_to_json};
    use serde_json::json;

    use super::*;

    const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";

    fn cluster(name: &str, timeout_secs: i64) -> Value {
        let cluster = Cluster {
            name: name.into(),
            connect_timeout: Some(envoy_types::pb::google::protobuf::Duration {
                seconds: timeout_secs,
                nanos: 0,
            }),
            ..Default::default()
        };
        message_to_json(&cluster, Sensitive::Redact).expect("json")
    }

    fn computed(resources: &[Value]) -> Computed {
        Computed {
            types: BTreeMap::from([(
                CLUSTER.to_string(),
                ComputedType {
                    resources: resources
                        .iter()
                        .map(|r| NamedResource {
                            name: r["name"].as_str().expect("name").into(),
                            resource: r.clone(),
                        })
                        .collect(),
                },
            )]),
        }
    }

    fn envoy_dump(clusters: &[Value]) -> Value {
        let entries: Vec<Value> = clusters
            .iter()
            .map(|c| {
                let mut c = c.clone();
                c.as_object_mut().expect("object").remove("@type");
                json!({"version_info": "v1", "cluster": c})
            })
            .collect();
        json!({"configs": [
            {"@type": "type.googleapis.com/envoy.admin.v3.BootstrapConfigDump", "bootstrap": {}},
            {"@type": "type.googleapis.com/envoy.admin.v3.ClustersConfigDump",
             "static_clusters": [], "dynamic_active_clusters": entries},
        ]})
    }

    #[test]
    fn equal_envoy_resources_match() {
        let a = cluster("demo/httpbin|14001", 1);
        let held = held(&envoy_dump(std::slice::from_ref(&a))).expect("held");
        let out = compare(&computed(&[a]), &held);
        assert!(
            out.contains("exactly what the controller computed"),
            "{out}"
        );
    }

    #[test]
    fn a_changed_missing_and_extra_resource_are_each_named() {
        let (a, b, c) = (
            cluster("demo/a|80", 1),
            cluster("demo/b|80", 1),
            cluster("demo/c|80", 1),
        );
        let a_old = cluster("demo/a|80", 5);
        let held = held(&envoy_dump(&[a_old, c])).expect("held");
        let out = compare(&computed(&[a, b]), &held);
        assert!(out.contains("Cluster \"demo/a|80\" differs:"), "{out}");
        assert!(
            out.contains("--- controller") && out.contains("+++ proxy"),
            "{out}"
        );
        assert!(
            out.contains("-  \"connect_timeout\": \"1s\"") || out.contains("\"1s\""),
            "{out}"
        );
        assert!(out.contains("\"demo/b|80\": computed, not held"), "{out}");
        assert!(
            out.contains("\"demo/c|80\": held by the proxy, not computed"),
            "{out}"
        );
    }

    #[test]
    fn envoys_endpoint_state_and_file_secrets_are_not_differences() {
        use envoy_types::pb::envoy::config::core::v3::{
            Address, SocketAddress, address, socket_address,
        };
        use envoy_types::pb::envoy::config::endpoint::v3::{
            ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
        };
        let sent = ClusterLoadAssignment {
            cluster_name: "demo/httpbin|14001".into(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: vec![LbEndpoint {
                    host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                        address: Some(Address {
                            address: Some(address::Address::SocketAddress(SocketAddress {
                                address: "10.0.0.1".into(),
                                port_specifier: Some(socket_address::PortSpecifier::PortValue(
                                    14001,
                                )),
                                ..Default::default()
                            })),
                        }),
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let sent = message_to_json(&sent, Sensitive::Redact).expect("json");
        // As Envoy 1.40 dumps it.
        let mut dumped = sent.clone();
        dumped.as_object_mut().expect("object").remove("@type");
        let host = &mut dumped["endpoints"][0]["lb_endpoints"][0];
        host["health_status"] = json!("HEALTHY");
        host["load_balancing_weight"] = json!(1);
        host["endpoint"]["health_check_config"] = json!({});
        dumped["endpoints"][0]["locality"] = json!({});
        dumped["endpoints"][0]["load_balancing_weight"] = json!(0);
        dumped["policy"] = json!({"overprovisioning_factor": 140});
        let mut eds_cluster = cluster("demo/httpbin|14001", 1);
        eds_cluster["type"] = json!("EDS");
        eds_cluster.as_object_mut().expect("object").remove("@type");
        let dump = json!({"configs": [
            {"@type": BOOTSTRAP_DUMP, "bootstrap": {"static_resources": {"clusters": [{"transport_socket": {
                "typed_config": {"common_tls_context": {"tls_certificate_sds_secret_configs": [
                    {"name": "fsm-bootstrap-cert", "sds_config": {"path_config_source": {"path": "/tmp/cert.yaml"}}}]}}}}]}}},
            {"@type": "type.googleapis.com/envoy.admin.v3.ClustersConfigDump",
             "dynamic_active_clusters": [{"cluster": eds_cluster}, {"cluster": {"name": "passthrough-outbound", "type": "ORIGINAL_DST"}}]},
            {"@type": "type.googleapis.com/envoy.admin.v3.EndpointsConfigDump",
             "dynamic_endpoint_configs": [{"endpoint_config": dumped},
                                          {"endpoint_config": {"cluster_name": "passthrough-outbound"}}]},
            {"@type": "type.googleapis.com/envoy.admin.v3.SecretsConfigDump",
             "dynamic_active_secrets": [{"name": "fsm-bootstrap-cert", "secret": {"name": "fsm-bootstrap-cert"}}]},
        ]});
        let held = held(&dump).expect("held");
        assert!(
            held[ENVOY_ENDPOINTS].keys().eq(["demo/httpbin|14001"]),
            "{held:?}"
        );
        assert!(held[ENVOY_SECRET].is_empty(), "{held:?}");
        let computed = Computed {
            types: BTreeMap::from([(
                ENVOY_ENDPOINTS.to_string(),
                ComputedType {
                    resources: vec![NamedResource {
                        name: "demo/httpbin|14001".into(),
                        resource: sent,
                    }],
                },
            )]),
        };
        let mut held = held;
        held.remove(ENVOY_CLUSTER);
        let out = compare(&computed, &held);
        assert!(
            out.contains("exactly what the controller computed"),
            "{out}"
        );
    }

    #[test]
    fn fsm_sidecar_dumps_compare_without_their_additions() {
        let secret = json!({"name": "service-cert",
            "tlsCertificate": {"certificateChain": "Y2hhaW4=", "privateKey": "[redacted]"}});
        let mut dumped = secret.clone();
        dumped["tlsCertificate"]["leaf"] = json!({"subject_cn": "curl"});
        let url = "type.googleapis.com/fsm.dataplane.v1.Secret";
        let dump = json!({"types": {url: {"resources": [{"name": "service-cert", "version": "v", "resource": dumped}]}}});
        let computed = Computed {
            types: BTreeMap::from([(
                url.to_string(),
                ComputedType {
                    resources: vec![NamedResource {
                        name: "service-cert".into(),
                        resource: secret,
                    }],
                },
            )]),
        };
        let out = compare(&computed, &held(&dump).expect("held"));
        assert!(
            out.contains("exactly what the controller computed"),
            "{out}"
        );
    }
}
