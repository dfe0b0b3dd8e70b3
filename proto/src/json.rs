//! fsm.dataplane.v1 resources in the proto3 JSON mapping, as fsm-sidecar's `/config_dump` shows
//! them and fsm-controller's `/debug/proxies/resources` serves them, so the two compare equal
//! exactly when the resources are equal (`fsm proxy status <pod>` diffs them).

use std::sync::LazyLock;

use prost_reflect::{DescriptorPool, DynamicMessage};
use serde_json::Value;

use crate::FILE_DESCRIPTOR_SET;

/// What stands in for a private key: never served, never dumped.
pub const REDACTED: &str = "[redacted]";

static POOL: LazyLock<Result<DescriptorPool, String>> =
    LazyLock::new(|| DescriptorPool::decode(FILE_DESCRIPTOR_SET).map_err(|e| e.to_string()));

/// The descriptors of every fsm.dataplane.v1 message, decoded once.
pub fn descriptor_pool() -> Result<&'static DescriptorPool, String> {
    POOL.as_ref().map_err(Clone::clone)
}

/// One resource of type `type_url`, given encoded, as JSON (lowerCamelCase names, defaults left
/// out), its private key replaced by [`REDACTED`].
pub fn resource_json(type_url: &str, body: &[u8]) -> Result<Value, String> {
    let name = type_url.rsplit('/').next().unwrap_or(type_url);
    let descriptor = descriptor_pool()?
        .get_message_by_name(name)
        .ok_or_else(|| format!("no descriptor for {name}"))?;
    let message = DynamicMessage::decode(descriptor, body).map_err(|e| format!("{name}: {e}"))?;
    let mut value = serde_json::to_value(&message).map_err(|e| format!("{name}: {e}"))?;
    if let Some(certificate) = value
        .get_mut("tlsCertificate")
        .and_then(Value::as_object_mut)
        && certificate.contains_key("privateKey")
    {
        certificate.insert("privateKey".into(), Value::from(REDACTED));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::{type_url, v1};

    #[test]
    fn resources_show_in_json_with_the_private_key_redacted() {
        let secret = v1::Secret {
            name: "service-cert".into(),
            kind: Some(v1::secret::Kind::TlsCertificate(v1::TlsCertificate {
                certificate_chain: b"chain".to_vec(),
                private_key: b"-----BEGIN PRIVATE KEY----- secret".to_vec(),
            })),
        };
        let json = resource_json(type_url::SECRET, &secret.encode_to_vec()).expect("decodes");
        assert_eq!(json["name"], "service-cert");
        assert_eq!(json["tlsCertificate"]["privateKey"], REDACTED);
        assert!(!json.to_string().contains("PRIVATE"), "{json}");
        let cluster = v1::Cluster {
            name: "demo/httpbin|14001".into(),
            ..Default::default()
        };
        assert_eq!(
            resource_json(type_url::CLUSTER, &cluster.encode_to_vec()).expect("decodes")["name"],
            "demo/httpbin|14001"
        );
        assert!(resource_json("type.googleapis.com/fsm.dataplane.v1.Nope", b"").is_err());
        assert!(resource_json(type_url::CLUSTER, b"\xff\xff").is_err());
    }
}
