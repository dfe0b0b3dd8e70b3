//! Envoy's JSON form (`fsm_adapter_envoy::json`): every golden case's resources, and its static
//! bootstrap, go to JSON and back without losing anything; what the descriptors cannot show is an
//! error, never a silent omission; private keys are redacted as Envoy redacts them; and
//! [`normalize`] maps another printer's JSON of a resource to the same form.

use std::path::Path;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source};
use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChain, Listener, filter};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    Secret, TlsCertificate, secret,
};
use envoy_types::pb::google::protobuf::Any;
use fsm_adapter_envoy::json::{
    JsonError, Sensitive, descriptor_pool, encoded_to_json, message_to_json, normalize, to_json,
};
use fsm_adapter_envoy::{EnvoyResources, bootstrap::static_bootstrap};
use prost::{Message, Name};
use prost_reflect::{DynamicMessage, ReflectMessage, Value};
use serde_json::json;

/// Every golden case's resources: (case, resources).
fn golden_cases() -> Vec<(String, EnvoyResources)> {
    let testdata = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata");
    let mut cases: Vec<_> = std::fs::read_dir(&testdata)
        .expect("testdata")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.join("in.yaml").exists())
        .collect();
    cases.sort();
    assert!(cases.len() >= 10, "only {} cases", cases.len());
    cases
        .into_iter()
        .filter_map(|case| {
            let input = std::fs::read_to_string(case.join("in.yaml")).expect("in.yaml");
            let ir: fsm_ir::ProxyIr = serde_yaml_ng::from_str(&input).expect("ProxyIr");
            let resources =
                fsm_adapter_envoy::translate(&ir, &fsm_golden::placeholder_credentials()).ok()?;
            Some((case.display().to_string(), resources))
        })
        .collect()
}

/// `message` decoded by reflection from its prost encoding: all it holds (a field the
/// descriptors lack would fail `message_to_json`, tested below).
fn reflect<M: Message + Name>(message: &M) -> DynamicMessage {
    let descriptor = descriptor_pool()
        .get_message_by_name(&M::full_name())
        .expect("descriptor");
    DynamicMessage::decode(descriptor, message.encode_to_vec().as_slice()).expect("decodes")
}

/// A resource's JSON read back through the descriptors.
fn parse(json: &serde_json::Value) -> DynamicMessage {
    let any = descriptor_pool()
        .get_message_by_name("google.protobuf.Any")
        .expect("Any");
    unpacked(&DynamicMessage::deserialize(any, json).expect("the JSON parses back"))
}

fn unpacked(any: &DynamicMessage) -> DynamicMessage {
    let url = any
        .get_field_by_name("type_url")
        .and_then(|v| v.as_str().map(str::to_owned))
        .expect("type_url");
    let value = any
        .get_field_by_name("value")
        .and_then(|v| v.as_bytes().cloned())
        .expect("value");
    let descriptor = descriptor_pool()
        .get_message_by_name(url.trim_start_matches("type.googleapis.com/"))
        .unwrap_or_else(|| panic!("no descriptor for {url}"));
    DynamicMessage::decode(descriptor, value).expect("payload decodes")
}

/// Equality of two messages' contents, with each `Any` compared by its decoded payload (the
/// payload's bytes differ between encoders: prost writes oneofs after the other fields and maps
/// in hash order, prost-reflect by field number).
fn same(a: &DynamicMessage, b: &DynamicMessage) -> Result<(), String> {
    let name = a.descriptor().full_name().to_owned();
    if name != b.descriptor().full_name() {
        return Err(format!("{name} vs {}", b.descriptor().full_name()));
    }
    if name == "google.protobuf.Any" {
        return same(&unpacked(a), &unpacked(b)).map_err(|e| format!("{name}: {e}"));
    }
    let fields_a: Vec<_> = a.fields().collect();
    let fields_b: Vec<_> = b.fields().collect();
    let names = |f: &[(prost_reflect::FieldDescriptor, &Value)]| -> Vec<String> {
        f.iter().map(|(d, _)| d.name().to_owned()).collect()
    };
    if names(&fields_a) != names(&fields_b) {
        return Err(format!(
            "{name}: fields {:?} vs {:?}",
            names(&fields_a),
            names(&fields_b)
        ));
    }
    for ((field, va), (_, vb)) in fields_a.iter().zip(&fields_b) {
        same_value(va, vb).map_err(|e| format!("{name}.{}: {e}", field.name()))?;
    }
    Ok(())
}

fn same_value(a: &Value, b: &Value) -> Result<(), String> {
    match (a, b) {
        (Value::Message(a), Value::Message(b)) => same(a, b),
        (Value::List(a), Value::List(b)) if a.len() == b.len() => a
            .iter()
            .zip(b)
            .enumerate()
            .try_for_each(|(i, (a, b))| same_value(a, b).map_err(|e| format!("[{i}] {e}"))),
        (Value::Map(a), Value::Map(b)) if a.len() == b.len() => a.iter().try_for_each(|(k, va)| {
            let vb = b.get(k).ok_or_else(|| format!("key {k:?} missing"))?;
            same_value(va, vb).map_err(|e| format!("[{k:?}] {e}"))
        }),
        _ if a == b => Ok(()),
        _ => Err(format!("{a:?} vs {b:?}")),
    }
}

fn round_trip<M: Message + Name>(case: &str, message: &M) {
    let json = message_to_json(message, Sensitive::Keep)
        .unwrap_or_else(|e| panic!("{case}: {}: {e}", M::full_name()));
    assert_eq!(json["@type"], M::type_url(), "{case}");
    if let Err(e) = same(&reflect(message), &parse(&json)) {
        panic!("{case}: {} changed through JSON: {e}", M::full_name());
    }
    // Envoy's form is a fixed point of normalize.
    let shown = message_to_json(message, Sensitive::Redact).expect("redacted JSON");
    assert_eq!(normalize(&shown).expect("normalizes"), shown, "{case}");
}

#[test]
fn every_golden_case_and_its_bootstrap_round_trip_through_json() {
    for (case, resources) in golden_cases() {
        resources.clusters.iter().for_each(|m| round_trip(&case, m));
        resources
            .endpoints
            .iter()
            .for_each(|m| round_trip(&case, m));
        resources
            .listeners
            .iter()
            .for_each(|m| round_trip(&case, m));
        resources.routes.iter().for_each(|m| round_trip(&case, m));
        resources.secrets.iter().for_each(|m| round_trip(&case, m));
        let bootstrap = static_bootstrap("node", "cluster", &resources).expect("bootstrap");
        round_trip(&case, &bootstrap);

        let all = to_json(&resources).expect("to_json");
        let golden = fsm_adapter_envoy::render(&resources).expect("render");
        for (key, count) in [
            ("clusters", resources.clusters.len()),
            ("endpoints", resources.endpoints.len()),
            ("listeners", resources.listeners.len()),
            ("routes", resources.routes.len()),
            ("secrets", resources.secrets.len()),
        ] {
            assert_eq!(
                all[key].as_array().map(Vec::len),
                Some(count),
                "{case} {key}"
            );
            // The golden YAML reads back as the same JSON.
            let yaml = &golden[&format!("out.{key}.yaml")];
            let back: serde_json::Value = serde_yaml_ng::from_str(yaml).expect("YAML");
            assert_eq!(back, all[key], "{case} {key}");
        }
    }
}

fn listener_with(typed_config: Any) -> Listener {
    Listener {
        name: "l".into(),
        filter_chains: vec![FilterChain {
            filters: vec![Filter {
                name: "f".into(),
                config_type: Some(filter::ConfigType::TypedConfig(typed_config)),
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[test]
fn what_the_descriptors_cannot_show_is_an_error() {
    // An Any of a type the descriptors do not hold.
    let unknown = listener_with(Any {
        type_url: "type.googleapis.com/example.v1.Unknown".into(),
        value: vec![10, 1, b'x'],
    });
    let err = message_to_json(&unknown, Sensitive::Redact).expect_err("unknown Any");
    assert!(
        matches!(&err, JsonError::UnknownType(t) if t == "example.v1.Unknown"),
        "{err}"
    );
    // A field the descriptors do not define (a newer Envoy API than theirs), inside an Any.
    let mut payload = Cluster {
        name: "c".into(),
        ..Default::default()
    }
    .encode_to_vec();
    prost::encoding::string::encode(9999, &"new".to_string(), &mut payload);
    let newer = listener_with(Any {
        type_url: Cluster::type_url(),
        value: payload,
    });
    let err = message_to_json(&newer, Sensitive::Redact).expect_err("unknown field");
    assert!(
        matches!(&err, JsonError::UnknownField { message, number: 9999 } if message == "envoy.config.cluster.v3.Cluster"),
        "{err}"
    );
    // A type that is not Envoy's at all.
    let err = encoded_to_json("example.v1.Unknown", &[], Sensitive::Redact).expect_err("type");
    assert!(err.to_string().contains("example.v1.Unknown"), "{err}");
    // And reading: an unknown @type, an unknown field name, a missing @type.
    let err = normalize(&json!({
        "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
        "filter_chains": [{"filters": [{"name": "f", "typed_config": {"@type": "type.googleapis.com/example.v1.Unknown"}}]}],
    }))
    .expect_err("unknown nested @type");
    assert!(err.to_string().contains("example.v1.Unknown"), "{err}");
    let err = normalize(&json!({
        "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        "name": "c",
        "no_such_field": 1,
    }))
    .expect_err("unknown field");
    assert!(err.to_string().contains("no_such_field"), "{err}");
    assert!(matches!(
        normalize(&json!({"name": "c"})),
        Err(JsonError::NoType)
    ));
}

#[test]
fn private_keys_are_redacted_as_envoy_redacts_them() {
    let secret = |key: data_source::Specifier| Secret {
        name: "s".into(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: Some(DataSource {
                specifier: Some(data_source::Specifier::InlineString("CERT".into())),
                ..Default::default()
            }),
            private_key: Some(DataSource {
                specifier: Some(key),
                ..Default::default()
            }),
            ..Default::default()
        })),
    };
    // What Envoy 1.40's /config_dump shows for these two static secrets.
    let as_string = secret(data_source::Specifier::InlineString("KEY".into()));
    assert_eq!(
        message_to_json(&as_string, Sensitive::Redact).expect("json"),
        json!({
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
            "name": "s",
            "tls_certificate": {
                "certificate_chain": {"inline_string": "CERT"},
                "private_key": {"inline_string": "[redacted]"},
            },
        })
    );
    let as_bytes = secret(data_source::Specifier::InlineBytes(b"KEY".to_vec()));
    let shown = message_to_json(&as_bytes, Sensitive::Redact).expect("json");
    assert_eq!(
        shown["tls_certificate"]["private_key"],
        json!({"inline_bytes": "W3JlZGFjdGVkXQ=="})
    );
    let kept = message_to_json(&as_bytes, Sensitive::Keep).expect("json");
    assert_eq!(
        kept["tls_certificate"]["private_key"],
        json!({"inline_bytes": "S0VZ"})
    );
    // Reading a key back redacts it too, so a dump and our view compare equal.
    assert_eq!(normalize(&kept).expect("normalizes"), shown);
}

/// A cluster as Envoy 1.40 printed it in `/config_dump` (`static_clusters[].cluster`), given
/// the static bootstrap of the `retry` case: the same as our view of that cluster.
#[test]
fn a_config_dump_fragment_normalizes_to_our_view_of_the_same_cluster() {
    let from_envoy = json!({
        "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        "name": "demo/tcp-echo|9000",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": "demo/tcp-echo|9000",
            "endpoints": [{"lb_endpoints": [{
                "endpoint": {"address": {"socket_address": {"address": "127.0.10.3", "port_value": 15003}}},
                "metadata": {"filter_metadata": {"envoy.transport_socket_match": {"fsm.meshed": true}}}
            }]}]
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}
            }
        },
        "transport_socket_matches": [{
            "name": "fsm-mtls",
            "match": {"fsm.meshed": true},
            "transport_socket": {
                "name": "envoy.transport_sockets.tls",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                    "common_tls_context": {
                        "alpn_protocols": ["h2"],
                        "tls_certificate_sds_secret_configs": [{"name": "service-cert"}],
                        "combined_validation_context": {
                            "default_validation_context": {
                                "match_typed_subject_alt_names": [{
                                    "san_type": "URI",
                                    "matcher": {"exact": "spiffe://cluster.local/ns/demo/sa/tcp-echo"}
                                }]
                            },
                            "validation_context_sds_secret_config": {"name": "root-cert-for-mtls-outbound"}
                        }
                    },
                    "sni": "tcp-echo.demo.svc.cluster.local"
                }
            }
        }]
    });
    let (_, resources) = golden_cases()
        .into_iter()
        .find(|(case, _)| case.ends_with("/retry"))
        .expect("the retry case");
    let bootstrap = static_bootstrap("node", "cluster", &resources).expect("bootstrap");
    let cluster = bootstrap
        .static_resources
        .iter()
        .flat_map(|r| &r.clusters)
        .find(|c| c.name == "demo/tcp-echo|9000")
        .expect("the cluster");
    let ours = message_to_json(cluster, Sensitive::Redact).expect("json");
    assert_eq!(normalize(&from_envoy).expect("Envoy's JSON parses"), ours);
    // Envoy's printer and ours write the same JSON (up to key order).
    assert_eq!(from_envoy, ours);
    let mut changed = from_envoy.clone();
    changed["connect_timeout"] = json!("2s");
    assert_ne!(normalize(&changed).expect("parses"), ours);
}

/// Other printers' forms of the same cluster: lowerCamelCase names, a duration with a fraction,
/// an enum at its default, a wrapper.
#[test]
fn normalize_reads_other_printers_forms() {
    let snake = json!({
        "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        "name": "c",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": "c", "endpoints": [{"lb_endpoints": [{
            "endpoint": {"address": {"socket_address": {"address": "10.1.0.2", "port_value": 15003}}},
            "load_balancing_weight": 1
        }]}]}
    });
    let camel = json!({
        "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        "name": "c",
        "connectTimeout": "1.000s",
        "loadAssignment": {"clusterName": "c", "endpoints": [{"lbEndpoints": [{
            "endpoint": {"address": {"socketAddress": {"address": "10.1.0.2", "portValue": 15003, "protocol": "TCP"}}},
            "loadBalancingWeight": 1
        }]}]}
    });
    let normalized = normalize(&snake).expect("parses");
    assert_eq!(normalized, snake);
    assert_eq!(normalize(&camel).expect("camelCase parses"), normalized);
}

/// The comparison the round-trip test rests on sees a difference inside an `Any`.
#[test]
fn same_sees_a_difference_inside_an_any() {
    let with = |cluster: &str| {
        listener_with(Any {
            type_url: Cluster::type_url(),
            value: Cluster {
                name: cluster.into(),
                ..Default::default()
            }
            .encode_to_vec(),
        })
    };
    assert!(same(&reflect(&with("a")), &reflect(&with("a"))).is_ok());
    assert!(same(&reflect(&with("a")), &reflect(&with("b"))).is_err());
}
