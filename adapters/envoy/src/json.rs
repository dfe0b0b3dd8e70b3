//! Envoy's resources in Envoy's own JSON form: the proto3 JSON mapping as Envoy's admin
//! `/config_dump` prints it, for golden files, `fsm translate -o json|yaml`, and comparing what
//! the controller would send with what a proxy holds.
//!
//! That form is: each resource an `Any` (`{"@type": "type.googleapis.com/…", …fields}`, and so
//! every packed `Any` inside, recursively), the .proto field names (`connect_timeout`: Envoy
//! prints them, not the lowerCamelCase names, though it reads both), enums by name, durations as
//! `"0.250s"`, wrappers as plain values, 64-bit integers as strings, fields at their default
//! value left out, and every field Envoy marks `(udpa.annotations.sensitive)` (private keys)
//! replaced by `"[redacted]"` as Envoy's `redact` does (strings and bytes; other sensitive
//! scalars are cleared). Object keys are sorted ([`serde_json::Map`] without `preserve_order`),
//! which also makes maps such as `typed_per_filter_config` deterministic (prost-reflect writes
//! them in hash order: with `preserve_order` on, goldens would change from run to run);
//! resources keep the adapter's order.
//!
//! The conversion is by reflection over Envoy's descriptors (`build.rs`), from each resource's
//! encoded bytes, so it shows exactly what goes on the wire. It refuses rather than drop data: a
//! field or an `Any` type the descriptors do not know is an error.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use prost::{Message, Name};
use prost_reflect::{
    DescriptorPool, DynamicMessage, ExtensionDescriptor, FieldDescriptor, Kind, MessageDescriptor,
    ReflectMessage, SerializeOptions, Value,
};

use crate::EnvoyResources;

/// The descriptors of the Envoy types the adapter emits (see `build.rs`), encoded.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/envoy_descriptors.bin"));

const TYPE_URL_PREFIX: &str = "type.googleapis.com/";
const ANY: &str = "google.protobuf.Any";
/// What Envoy writes in place of a sensitive string or bytes field.
const REDACTED: &str = "[redacted]";

static POOL: LazyLock<DescriptorPool> = LazyLock::new(|| {
    DescriptorPool::decode(FILE_DESCRIPTOR_SET)
        .expect("build.rs writes a complete descriptor set (tested)")
});

/// `udpa.annotations.sensitive`, the field option Envoy redacts by.
static SENSITIVE: LazyLock<Option<ExtensionDescriptor>> =
    LazyLock::new(|| POOL.get_extension_by_name("udpa.annotations.sensitive"));

/// Why a resource cannot be shown in, or read from, Envoy's JSON form.
#[derive(Debug, thiserror::Error)]
pub enum JsonError {
    #[error(
        "type {0} is not among the Envoy types the descriptors hold (ROOTS in adapters/envoy/build.rs)"
    )]
    UnknownType(String),
    #[error(
        "{message} has field {number}, which the descriptors do not define: they and envoy-types disagree"
    )]
    UnknownField { message: String, number: u32 },
    #[error("cannot decode {type_name}: {source}")]
    Decode {
        type_name: String,
        #[source]
        source: prost::DecodeError,
    },
    #[error("the JSON resource has no \"@type\"")]
    NoType,
    #[error("not a valid {type_name} in the proto3 JSON mapping: {source}")]
    Parse {
        type_name: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot show {type_name} as JSON: {source}")]
    Serialize {
        type_name: String,
        #[source]
        source: serde_json::Error,
    },
}

/// Whether sensitive fields (private keys) are shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sensitive {
    /// As Envoy's `/config_dump` shows them: `"[redacted]"`.
    Redact,
    /// As they are.
    Keep,
}

/// The descriptors of the Envoy types the adapter emits, decoded once.
pub fn descriptor_pool() -> &'static DescriptorPool {
    &POOL
}

/// One resource (or any message the descriptors hold, such as a static bootstrap) in Envoy's
/// JSON form, with its `@type`. Sensitive fields are redacted unless `sensitive` is
/// [`Sensitive::Keep`] (a bootstrap meant for `envoy -c` needs its keys).
pub fn message_to_json<M: Message + Name>(
    message: &M,
    sensitive: Sensitive,
) -> Result<serde_json::Value, JsonError> {
    encoded_to_json(&M::full_name(), &message.encode_to_vec(), sensitive)
}

/// The message of type `type_name` (a full name or a type URL), given encoded, in Envoy's JSON
/// form.
pub fn encoded_to_json(
    type_name: &str,
    bytes: &[u8],
    sensitive: Sensitive,
) -> Result<serde_json::Value, JsonError> {
    let mut message = decode(&descriptor(type_name)?, bytes)?;
    check_complete(&message)?;
    if sensitive == Sensitive::Redact {
        redact(&mut message, false)?;
    }
    to_value(&message)
}

/// A proxy's resources as one JSON document, the shape of fsm-sidecar's `fsm translate -o json`:
/// `{"clusters": [...], "endpoints": [...], "listeners": [...], "routes": [...], "secrets":
/// [...]}`, each resource as [`message_to_json`] shows it (private keys redacted), in the
/// adapter's order.
pub fn to_json(resources: &EnvoyResources) -> Result<serde_json::Value, JsonError> {
    let mut out = serde_json::Map::new();
    for (key, items) in by_type(resources)? {
        out.insert(key.to_string(), serde_json::Value::Array(items));
    }
    Ok(serde_json::Value::Object(out))
}

/// One resource's JSON, in whatever form a proto3 JSON printer wrote it (Envoy's
/// `/config_dump`, e.g. `dynamic_active_clusters[].cluster`, or another control plane), in the
/// form [`to_json`] writes: parsed through the descriptors by its `"@type"` and written again,
/// sensitive fields redacted. Two resources are equal exactly when their normalized JSON is.
pub fn normalize(resource: &serde_json::Value) -> Result<serde_json::Value, JsonError> {
    let type_url = resource
        .get("@type")
        .and_then(serde_json::Value::as_str)
        .ok_or(JsonError::NoType)?;
    let descriptor = descriptor(type_url)?;
    let any = descriptor_by_name(ANY)?;
    let mut message =
        DynamicMessage::deserialize(any, resource).map_err(|source| JsonError::Parse {
            type_name: descriptor.full_name().to_owned(),
            source,
        })?;
    redact(&mut message, false)?;
    to_value(&message)
}

/// The golden files of one case: `out.<type>.yaml` per resource type (the resources of
/// [`to_json`] as YAML; private keys are never shown, being redacted as Envoy redacts them), and
/// `out.warnings.yaml` when there are warnings.
pub fn render(resources: &EnvoyResources) -> Result<BTreeMap<String, String>, JsonError> {
    let mut out = BTreeMap::new();
    for (key, items) in by_type(resources)? {
        out.insert(format!("out.{key}.yaml"), yaml(&items));
    }
    if !resources.warnings.is_empty() {
        out.insert("out.warnings.yaml".to_string(), yaml(&resources.warnings));
    }
    Ok(out)
}

/// Plain data (JSON values, strings) as YAML, which cannot fail.
fn yaml<T: serde::Serialize>(data: &T) -> String {
    serde_yaml_ng::to_string(data).unwrap_or_else(|e| format!("<not YAML: {e}>\n"))
}

/// The resources of each type in Envoy's JSON form, keyed as in [`to_json`].
fn by_type(
    resources: &EnvoyResources,
) -> Result<[(&'static str, Vec<serde_json::Value>); 5], JsonError> {
    fn all<M: Message + Name>(items: &[M]) -> Result<Vec<serde_json::Value>, JsonError> {
        items
            .iter()
            .map(|m| message_to_json(m, Sensitive::Redact))
            .collect()
    }
    Ok([
        ("clusters", all(&resources.clusters)?),
        ("endpoints", all(&resources.endpoints)?),
        ("listeners", all(&resources.listeners)?),
        ("routes", all(&resources.routes)?),
        ("secrets", all(&resources.secrets)?),
    ])
}

fn descriptor(type_name: &str) -> Result<MessageDescriptor, JsonError> {
    descriptor_by_name(type_name.strip_prefix(TYPE_URL_PREFIX).unwrap_or(type_name))
}

fn descriptor_by_name(name: &str) -> Result<MessageDescriptor, JsonError> {
    POOL.get_message_by_name(name)
        .ok_or_else(|| JsonError::UnknownType(name.to_owned()))
}

fn decode(descriptor: &MessageDescriptor, bytes: &[u8]) -> Result<DynamicMessage, JsonError> {
    DynamicMessage::decode(descriptor.clone(), bytes).map_err(|source| JsonError::Decode {
        type_name: descriptor.full_name().to_owned(),
        source,
    })
}

/// The message as an `Any` in the proto3 JSON mapping with Envoy's options.
fn to_value(message: &DynamicMessage) -> Result<serde_json::Value, JsonError> {
    let type_name = message.descriptor().full_name().to_owned();
    let packed = if type_name == ANY {
        message.clone()
    } else {
        let mut any = DynamicMessage::new(descriptor_by_name(ANY)?);
        any.set_field_by_name(
            "type_url",
            Value::String(format!("{TYPE_URL_PREFIX}{type_name}")),
        );
        any.set_field_by_name("value", Value::Bytes(message.encode_to_vec().into()));
        any
    };
    let options = SerializeOptions::new()
        .use_proto_field_name(true)
        .skip_default_fields(true);
    packed
        .serialize_with_options(serde_json::value::Serializer, &options)
        .map_err(|source| JsonError::Serialize { type_name, source })
}

/// The payload of an `Any`, decoded; `None` for any other message.
fn unpack(message: &DynamicMessage) -> Result<Option<DynamicMessage>, JsonError> {
    if message.descriptor().full_name() != ANY {
        return Ok(None);
    }
    let type_url = message
        .get_field_by_name("type_url")
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    let value = message
        .get_field_by_name("value")
        .and_then(|v| v.as_bytes().cloned())
        .unwrap_or_default();
    decode(&descriptor(&type_url)?, &value).map(Some)
}

/// Fails on a field the descriptors do not define, anywhere in the message (inside `Any`s too):
/// the JSON printer would leave it out silently.
fn check_complete(message: &DynamicMessage) -> Result<(), JsonError> {
    if let Some(field) = message.unknown_fields().next() {
        return Err(JsonError::UnknownField {
            message: message.descriptor().full_name().to_owned(),
            number: field.number(),
        });
    }
    if let Some(payload) = unpack(message)? {
        return check_complete(&payload);
    }
    fn value(v: &Value) -> Result<(), JsonError> {
        match v {
            Value::Message(m) => check_complete(m),
            Value::List(items) => items.iter().try_for_each(value),
            Value::Map(entries) => entries.values().try_for_each(value),
            _ => Ok(()),
        }
    }
    message.fields().try_for_each(|(_, v)| value(v))
}

/// Envoy's `MessageUtil::redact`: below a field marked sensitive, every string and bytes field
/// becomes `"[redacted]"` and every other scalar is cleared; `Any` payloads are redacted in
/// place; of a map, only the values.
fn redact(message: &mut DynamicMessage, ancestor_sensitive: bool) -> Result<(), JsonError> {
    if let Some(mut payload) = unpack(message)? {
        redact(&mut payload, ancestor_sensitive)?;
        message.set_field_by_name("value", Value::Bytes(payload.encode_to_vec().into()));
        return Ok(());
    }
    fn value(v: &mut Value, sensitive: bool) -> Result<(), JsonError> {
        match v {
            Value::Message(m) => redact(m, sensitive),
            Value::List(items) => items.iter_mut().try_for_each(|i| value(i, sensitive)),
            Value::Map(entries) => entries.values_mut().try_for_each(|i| value(i, sensitive)),
            Value::String(s) if sensitive => {
                *s = REDACTED.to_owned();
                Ok(())
            }
            Value::Bytes(b) if sensitive => {
                *b = REDACTED.as_bytes().to_vec().into();
                Ok(())
            }
            _ => Ok(()),
        }
    }
    let mut cleared = Vec::new();
    for (field, v) in message.fields_mut() {
        let sensitive = ancestor_sensitive || is_sensitive(&field);
        let kind = field.kind();
        if sensitive && kind.as_message().is_none() && !matches!(kind, Kind::String | Kind::Bytes) {
            cleared.push(field);
        } else {
            value(v, sensitive)?;
        }
    }
    for field in cleared {
        message.clear_field(&field);
    }
    Ok(())
}

fn is_sensitive(field: &FieldDescriptor) -> bool {
    SENSITIVE.as_ref().is_some_and(|ext| {
        field
            .options()
            .get_extension(ext)
            .as_bool()
            .unwrap_or(false)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_holds_the_sensitive_option() {
        assert!(SENSITIVE.is_some());
    }
}
