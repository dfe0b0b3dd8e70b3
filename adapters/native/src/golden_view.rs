//! A readable, deterministic YAML view of native resources for golden files and debugging.
//!
//! Each resource is shown in the canonical proto3 JSON mapping (snake_case field names as in the
//! .proto files, enums by name, durations as `"1.500s"`, fields at their default value left out),
//! decoded by reflection from its *encoded* bytes, so the view shows exactly what goes on the wire.
//! Private keys are never shown.

use std::collections::BTreeMap;

use fsm_dataplane_proto::{FILE_DESCRIPTOR_SET, type_url, v1};
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};
use serde::{Serialize, Serializer};

use crate::NativeResources;

/// One golden file per resource type: `out.clusters.yaml`, `out.endpoints.yaml`,
/// `out.listeners.yaml`, `out.routes.yaml`, `out.runtime.yaml`, plus `out.secrets.yaml` and `out.warnings.yaml` when
/// there are any. A type whose resources cannot be shown (never expected) is shown as the error.
pub fn render(resources: &NativeResources) -> BTreeMap<String, String> {
    let encoded = resources.encode();
    let pool = DescriptorPool::decode(FILE_DESCRIPTOR_SET);
    let view = |url: &str| -> String {
        let items = encoded.get(url).map(Vec::as_slice).unwrap_or_default();
        match yaml(pool.as_ref().map_err(|e| e.to_string()), url, items) {
            Ok(text) => text,
            Err(e) => format!("<cannot render {url}: {e}>\n"),
        }
    };
    let mut out = BTreeMap::from([
        ("out.clusters.yaml".to_string(), view(type_url::CLUSTER)),
        (
            "out.endpoints.yaml".to_string(),
            view(type_url::CLUSTER_LOAD_ASSIGNMENT),
        ),
        ("out.listeners.yaml".to_string(), view(type_url::LISTENER)),
        (
            "out.routes.yaml".to_string(),
            view(type_url::ROUTE_CONFIGURATION),
        ),
        ("out.runtime.yaml".to_string(), view(type_url::RUNTIME)),
    ]);
    if !resources.secrets.is_empty() {
        out.insert("out.secrets.yaml".to_string(), view(type_url::SECRET));
    }
    if !resources.warnings.is_empty() {
        let text = serde_yaml_ng::to_string(&resources.warnings)
            .unwrap_or_else(|e| format!("<cannot render warnings: {e}>\n"));
        out.insert("out.warnings.yaml".to_string(), text);
    }
    out
}

/// The resources as one JSON document in the proto3 JSON mapping (`fsm translate -o json`):
/// `{"clusters": [...], "endpoints": [...], "listeners": [...], "routes": [...], "secrets":
/// [...], "runtime": [...]}`, private keys left out.
pub fn to_json(resources: &NativeResources) -> Result<serde_json::Value, String> {
    let encoded = resources.encode();
    let pool = DescriptorPool::decode(FILE_DESCRIPTOR_SET).map_err(|e| e.to_string())?;
    let mut out = serde_json::Map::new();
    for (key, url) in [
        ("clusters", type_url::CLUSTER),
        ("endpoints", type_url::CLUSTER_LOAD_ASSIGNMENT),
        ("listeners", type_url::LISTENER),
        ("routes", type_url::ROUTE_CONFIGURATION),
        ("secrets", type_url::SECRET),
        ("runtime", type_url::RUNTIME),
    ] {
        let items = encoded.get(url).map(Vec::as_slice).unwrap_or_default();
        let messages = messages(&pool, url, items)?;
        out.insert(
            key.to_string(),
            serde_json::to_value(&messages).map_err(|e| e.to_string())?,
        );
    }
    Ok(serde_json::Value::Object(out))
}

/// The YAML list of the resources of type `url`, given encoded.
fn yaml(
    pool: Result<&DescriptorPool, String>,
    url: &str,
    items: &[(String, Vec<u8>)],
) -> Result<String, String> {
    serde_yaml_ng::to_string(&messages(pool?, url, items)?).map_err(|e| e.to_string())
}

/// The resources of type `url`, given encoded, decoded by reflection (private keys left out).
fn messages(
    pool: &DescriptorPool,
    url: &str,
    items: &[(String, Vec<u8>)],
) -> Result<Vec<Json>, String> {
    let name = url.trim_start_matches("type.googleapis.com/");
    let descriptor = pool
        .get_message_by_name(name)
        .ok_or_else(|| format!("no descriptor for {name}"))?;
    let mut messages = Vec::with_capacity(items.len());
    for (_, bytes) in items {
        let bytes = if url == type_url::SECRET {
            without_private_key(bytes)?
        } else {
            bytes.clone()
        };
        let message = DynamicMessage::decode(descriptor.clone(), bytes.as_slice())
            .map_err(|e| e.to_string())?;
        messages.push(Json(message));
    }
    Ok(messages)
}

/// A secret with its private key left out.
fn without_private_key(bytes: &[u8]) -> Result<Vec<u8>, String> {
    let mut secret = v1::Secret::decode(bytes).map_err(|e| e.to_string())?;
    if let Some(v1::secret::Kind::TlsCertificate(cert)) = &mut secret.kind {
        cert.private_key.clear();
    }
    Ok(secret.encode_to_vec())
}

/// Serializes a message in the proto3 JSON mapping with the .proto field names.
struct Json(DynamicMessage);

impl Serialize for Json {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let options = SerializeOptions::new()
            .use_proto_field_name(true)
            .skip_default_fields(true);
        self.0.serialize_with_options(serializer, &options)
    }
}
