//! The gRPC wire form of resources, built once and shared by every stream that sends them.
//!
//! Protobuf lets a message's fields come in any order and a repeated field's elements be spread
//! over the message, so an xDS response can be written as a small per-stream part (version, type
//! URL, nonce, removed names) followed by its `resources` field, already encoded. That field is
//! what this module builds: per resource, and per type for "every resource of the type" (a
//! wildcard subscriber's whole response), each once, as `Bytes` every stream shares.

use std::fmt;
use std::ops::Range;
use std::sync::OnceLock;

use bytes::{Bytes, BytesMut};
use prost::Message;
use prost::encoding::message;

use crate::TypeUrl;

/// Field number of `resources` in both `DiscoveryResponse` and `DeltaDiscoveryResponse`.
const RESOURCES_FIELD: u32 = 2;

/// `google.protobuf.Any`, with its value borrowed from the resource's `Bytes`.
#[derive(Clone, PartialEq, Message)]
struct Any {
    #[prost(string, tag = "1")]
    type_url: String,
    #[prost(bytes = "bytes", tag = "2")]
    value: Bytes,
}

/// `envoy.service.discovery.v3.Resource`, the fields a delta response uses.
#[derive(Clone, PartialEq, Message)]
struct DeltaResource {
    #[prost(string, tag = "1")]
    version: String,
    #[prost(message, optional, tag = "2")]
    resource: Option<Any>,
    #[prost(string, tag = "3")]
    name: String,
}

/// Which response flavour an entry is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// `DiscoveryResponse.resources`: `Any { type_url, value }`.
    Sotw,
    /// `DeltaDiscoveryResponse.resources`: `Resource { name, version, resource: Any }`.
    Delta,
}

/// One lazily built entry per flavour, remembered with the type URL it was built for (a
/// resource belongs to one type; another URL is encoded afresh rather than served wrongly).
#[derive(Clone, Default)]
pub(crate) struct Entries {
    sotw: OnceLock<(TypeUrl, Bytes)>,
    delta: OnceLock<(TypeUrl, Bytes)>,
    /// The resource's interned name ([`crate::Resource::id`]).
    pub(crate) id: OnceLock<crate::NameId>,
}

impl Entries {
    fn slot(&self, flavor: Flavor) -> &OnceLock<(TypeUrl, Bytes)> {
        match flavor {
            Flavor::Sotw => &self.sotw,
            Flavor::Delta => &self.delta,
        }
    }

    /// The cached entry, if one was built for `type_url`.
    fn cached(&self, flavor: Flavor, type_url: TypeUrl) -> Option<Bytes> {
        self.slot(flavor)
            .get()
            .filter(|(t, _)| *t == type_url)
            .map(|(_, b)| b.clone())
    }

    /// Remembers `entry` unless one is already cached; returns the cached one.
    fn remember(&self, flavor: Flavor, type_url: TypeUrl, entry: Bytes) -> Bytes {
        let (t, cached) = self.slot(flavor).get_or_init(|| (type_url, entry.clone()));
        if *t == type_url {
            cached.clone()
        } else {
            entry
        }
    }
}

// A cache of derived bytes: never part of a resource's identity.
impl PartialEq for Entries {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Entries {}

impl fmt::Debug for Entries {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Entries")
    }
}

/// The encoded `resources` field (tag, length, message) of one resource.
fn encode_entry(
    flavor: Flavor,
    type_url: TypeUrl,
    name: &str,
    version: &str,
    body: &Bytes,
    out: &mut BytesMut,
) {
    let any = Any {
        type_url: type_url.to_owned(),
        value: body.clone(),
    };
    match flavor {
        Flavor::Sotw => message::encode(RESOURCES_FIELD, &any, out),
        Flavor::Delta => message::encode(
            RESOURCES_FIELD,
            &DeltaResource {
                version: version.to_owned(),
                resource: Some(any),
                name: name.to_owned(),
            },
            out,
        ),
    }
}

fn entry_len(flavor: Flavor, type_url: TypeUrl, name: &str, version: &str, len: usize) -> usize {
    let any = Any {
        type_url: type_url.to_owned(),
        value: Bytes::new(),
    };
    // The value's length only adds its own length prefix, not counted for an empty value.
    let any_len = any.encoded_len() + if len > 0 { field_len(2, len) } else { 0 };
    let len = match flavor {
        Flavor::Sotw => any_len,
        Flavor::Delta => {
            let rest = DeltaResource {
                version: version.to_owned(),
                resource: None,
                name: name.to_owned(),
            };
            rest.encoded_len() + field_len(2, any_len)
        }
    };
    field_len(RESOURCES_FIELD, len)
}

/// Encoded size of a length-delimited field whose content is `len` bytes.
fn field_len(tag: u32, len: usize) -> usize {
    prost::encoding::key_len(tag) + prost::encoding::encoded_len_varint(len as u64) + len
}

impl crate::Resource {
    /// This resource's element of a response's `resources` field, encoded on first use and
    /// shared by every stream after.
    pub fn entry(&self, flavor: Flavor, type_url: TypeUrl) -> Bytes {
        if let Some(entry) = self.wire.cached(flavor, type_url) {
            return entry;
        }
        let mut out = BytesMut::with_capacity(self.entry_len(flavor, type_url));
        self.encode_entry(flavor, type_url, &mut out);
        self.wire.remember(flavor, type_url, out.freeze())
    }

    fn entry_len(&self, flavor: Flavor, type_url: TypeUrl) -> usize {
        entry_len(flavor, type_url, &self.name, &self.version, self.body.len())
    }

    fn encode_entry(&self, flavor: Flavor, type_url: TypeUrl, out: &mut BytesMut) {
        encode_entry(flavor, type_url, &self.name, &self.version, &self.body, out);
    }
}

/// The `resources` field of every resource of a type, in the type's order.
#[derive(Clone, Default)]
pub(crate) struct Sections(Entries);

impl PartialEq for Sections {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Sections {}

impl fmt::Debug for Sections {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Sections")
    }
}

impl crate::TypeSnapshot {
    /// Every resource's entry, concatenated: the resource section of a response carrying the
    /// whole type, built once and shared by every stream sending it. Resources whose own entry
    /// was not built yet get a slice of this section as their entry, so the bytes exist once.
    pub fn section(&self, flavor: Flavor, type_url: TypeUrl) -> Bytes {
        if let Some(section) = self.sections.0.cached(flavor, type_url) {
            return section;
        }
        let len: usize = self
            .resources()
            .map(|r| match r.wire.cached(flavor, type_url) {
                Some(entry) => entry.len(),
                None => r.entry_len(flavor, type_url),
            })
            .sum();
        let mut out = BytesMut::with_capacity(len);
        let mut fresh: Vec<Range<usize>> = Vec::new();
        for r in self.resources() {
            let start = out.len();
            match r.wire.cached(flavor, type_url) {
                Some(entry) => out.extend_from_slice(&entry),
                None => r.encode_entry(flavor, type_url, &mut out),
            }
            fresh.push(start..out.len());
        }
        let section = out.freeze();
        for (r, range) in self.resources().zip(fresh) {
            if r.wire.cached(flavor, type_url).is_none() {
                r.wire.remember(flavor, type_url, section.slice(range));
            }
        }
        self.sections.0.remember(flavor, type_url, section)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Resource, TypeSnapshot};

    const T: TypeUrl = "type.example/T";

    #[test]
    fn entries_are_built_once_and_lengths_are_exact() {
        for body in [&b""[..], b"x", &[7u8; 300]] {
            let r = Resource::new("name", Bytes::copy_from_slice(body));
            for flavor in [Flavor::Sotw, Flavor::Delta] {
                let a = r.entry(flavor, T);
                assert_eq!(a.len(), r.entry_len(flavor, T));
                let b = r.entry(flavor, T);
                assert_eq!(
                    a.as_ptr(),
                    b.as_ptr(),
                    "the second call shares the first's bytes"
                );
                let decoded = Any::decode(skip_key_and_len(&a)).expect("sotw entry");
                if flavor == Flavor::Sotw {
                    assert_eq!(decoded.type_url, T);
                    assert_eq!(&decoded.value[..], body);
                }
            }
        }
    }

    #[test]
    fn a_type_section_is_its_entries_and_they_share_its_bytes() {
        let types = TypeSnapshot::new([
            Resource::new("a", &b"1"[..]),
            Resource::new("b", &b"22"[..]),
            Resource::new("c", &b"333"[..]),
        ]);
        // One entry built before the section: copied in, and kept as it was.
        let b_entry = types.get("b").expect("b").entry(Flavor::Delta, T);
        let section = types.section(Flavor::Delta, T);
        let entries: Vec<Bytes> = types
            .resources()
            .map(|r| r.entry(Flavor::Delta, T))
            .collect();
        assert_eq!(section, entries.concat());
        assert_eq!(entries[1].as_ptr(), b_entry.as_ptr());
        let within = |e: &Bytes| section.as_ptr_range().contains(&e.as_ptr());
        assert!(within(&entries[0]) && within(&entries[2]));
        assert_eq!(
            types.section(Flavor::Delta, T).as_ptr(),
            section.as_ptr(),
            "built once"
        );
        assert_eq!(types, types.clone(), "caches are not part of equality");
    }

    fn skip_key_and_len(mut entry: &[u8]) -> &[u8] {
        prost::encoding::decode_varint(&mut entry).expect("key");
        prost::encoding::decode_varint(&mut entry).expect("length");
        entry
    }
}
