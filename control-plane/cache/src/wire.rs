//! The gRPC wire form of resources, built once and shared by every stream that sends them.
//!
//! Protobuf lets a message's fields come in any order and a repeated field's elements be spread
//! over the message, so an xDS response can be written as a small per-stream part (version, type
//! URL, nonce, removed names) followed by its `resources` field, already encoded. That field is
//! what this module builds: per resource, and per type for "every resource of the type" (a
//! wildcard subscriber's whole response), each once, as `Bytes` every stream shares.
//!
//! A type's section is a list of groups of consecutive entries, not one buffer: a proxy's set
//! of a type is often the mesh's shared set plus a few resources of its own (merged per proxy
//! or per service), and one buffer per merged set would copy the whole shared set each time.
//! Groups end where a resource's name hashes to a boundary (content-defined, as in rsync), so
//! sets differing by a few resources share every group but the few holding the difference. A
//! group's bytes are cached on its first resource (shared by every set holding it), keyed by
//! the content of its members.

use std::fmt;
use std::ops::Range;
use std::sync::{Arc, OnceLock};

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
    /// The version's [`crate::version_key`] ([`crate::Resource::version_key`]).
    pub(crate) version_key: OnceLock<u64>,
    /// The group of entries starting at this resource, per flavor: (type URL, members' content
    /// key, bytes).
    sotw_group: OnceLock<(TypeUrl, u64, Bytes)>,
    delta_group: OnceLock<(TypeUrl, u64, Bytes)>,
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

/// Resources per group at most, the name hashes that end a group (about one in 64), and the
/// bytes a group holds before a name may end it: large enough that a group goes out as its own
/// data frame without being copied (the server's response body joins chunks under 8 KiB),
/// small enough that a set differing from another by one resource copies little.
const GROUP_MAX: usize = 256;
const GROUP_BOUNDARY: u64 = 63;
const GROUP_MIN_BYTES: usize = 16 << 10;

/// The `resources` field of every resource of a type, in the type's order, as groups.
pub type Section = Arc<[Bytes]>;

/// A type's cached sections, per flavor.
#[derive(Clone, Default)]
pub(crate) struct Sections {
    sotw: OnceLock<(TypeUrl, Built)>,
    delta: OnceLock<(TypeUrl, Built)>,
}

/// A built section, with how many resources each of its groups holds (a flat set's, read by the
/// sets layered over it; empty for a layered set, over which nothing is layered).
#[derive(Clone)]
struct Built {
    section: Section,
    members: Arc<[u32]>,
}

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

impl Entries {
    fn group_slot(&self, flavor: Flavor) -> &OnceLock<(TypeUrl, u64, Bytes)> {
        match flavor {
            Flavor::Sotw => &self.sotw_group,
            Flavor::Delta => &self.delta_group,
        }
    }
}

fn ends_group(resource: &crate::Resource) -> bool {
    xxhash_rust::xxh3::xxh3_64(resource.name.as_bytes()) & GROUP_BOUNDARY == 0
}

/// The concatenated entries of `members`, from the first member's cache when it holds this
/// very group. Members whose own entry was not built yet get a slice of the group as their
/// entry, so the bytes exist once.
fn group(members: &[&Arc<crate::Resource>], flavor: Flavor, type_url: TypeUrl) -> Bytes {
    let mut key = xxhash_rust::xxh3::Xxh3::new();
    for r in members {
        key.update(&(r.name.len() as u64).to_le_bytes());
        key.update(r.name.as_bytes());
        key.update(r.version.as_bytes());
    }
    let key = key.digest();
    let slot = members[0].wire.group_slot(flavor);
    if let Some((t, k, bytes)) = slot.get()
        && *t == type_url
        && *k == key
    {
        return bytes.clone();
    }
    let len: usize = members
        .iter()
        .map(|r| match r.wire.cached(flavor, type_url) {
            Some(entry) => entry.len(),
            None => r.entry_len(flavor, type_url),
        })
        .sum();
    let mut out = BytesMut::with_capacity(len);
    let mut fresh: Vec<Range<usize>> = Vec::with_capacity(members.len());
    for r in members {
        let start = out.len();
        match r.wire.cached(flavor, type_url) {
            Some(entry) => out.extend_from_slice(&entry),
            None => r.encode_entry(flavor, type_url, &mut out),
        }
        fresh.push(start..out.len());
    }
    let bytes = out.freeze();
    for (r, range) in members.iter().zip(fresh) {
        if r.wire.cached(flavor, type_url).is_none() {
            r.wire.remember(flavor, type_url, bytes.slice(range));
        }
    }
    // Another set may have claimed the first member's slot with a different group; then this
    // group lives only in the sets that hold it.
    let _ = slot.set((type_url, key, bytes.clone()));
    bytes
}

impl crate::TypeSnapshot {
    /// Every resource's entry, in groups: the resource section of a response carrying the
    /// whole type, built once and shared by every stream sending it (and its groups by every
    /// type snapshot holding the same runs of resources).
    pub fn section(&self, flavor: Flavor, type_url: TypeUrl) -> Section {
        self.built(flavor, type_url).section
    }

    /// The section, built for one response and not kept: for a layered set held by a single
    /// proxy, whose kept section would be memory only that proxy uses. A layered set's section
    /// copies nothing (it points into its base's groups), so building it per send costs a walk
    /// of the names, not of the bytes.
    pub fn section_once(&self, flavor: Flavor, type_url: TypeUrl) -> Section {
        match self.slot(flavor).get() {
            Some((t, built)) if *t == type_url => built.section.clone(),
            _ => self.build(flavor, type_url).section,
        }
    }

    fn slot(&self, flavor: Flavor) -> &OnceLock<(TypeUrl, Built)> {
        match flavor {
            Flavor::Sotw => &self.sections.sotw,
            Flavor::Delta => &self.sections.delta,
        }
    }

    fn built(&self, flavor: Flavor, type_url: TypeUrl) -> Built {
        let slot = self.slot(flavor);
        if let Some((t, built)) = slot.get()
            && *t == type_url
        {
            return built.clone();
        }
        let built = self.build(flavor, type_url);
        let (t, cached) = slot.get_or_init(|| (type_url, built.clone()));
        if *t == type_url {
            cached.clone()
        } else {
            built
        }
    }

    fn build(&self, flavor: Flavor, type_url: TypeUrl) -> Built {
        match &self.base {
            Some(base) => Built {
                section: self.layered_section(base, flavor, type_url),
                members: Arc::new([]),
            },
            None => self.flat_section(flavor, type_url),
        }
    }

    /// Groups cut where a name hashes to a boundary, each from its first member's cache when
    /// another set built the same group.
    fn flat_section(&self, flavor: Flavor, type_url: TypeUrl) -> Built {
        let resources: Vec<&Arc<crate::Resource>> = self.resources().collect();
        let mut groups = Vec::new();
        let mut members = Vec::new();
        let mut start = 0;
        let mut bytes = 0;
        for (i, r) in resources.iter().enumerate() {
            bytes += r.entry_len(flavor, type_url);
            if i + 1 == resources.len()
                || i + 1 - start >= GROUP_MAX
                || (bytes >= GROUP_MIN_BYTES && ends_group(r))
            {
                groups.push(group(&resources[start..=i], flavor, type_url));
                // At most GROUP_MAX.
                members.push((i + 1 - start) as u32);
                start = i + 1;
                bytes = 0;
            }
        }
        Built {
            section: groups.into(),
            members: members.into(),
        }
    }

    /// The base's groups where the layer has nothing among their names, and per-resource
    /// entries (slices of the base's groups, or the layer's own) where it has: every proxy's
    /// set layered over one shared set costs pointers, not a copy of the groups its few own
    /// resources fall into.
    fn layered_section(
        &self,
        base: &crate::TypeSnapshot,
        flavor: Flavor,
        type_url: TypeUrl,
    ) -> Section {
        let shared = base.built(flavor, type_url);
        let mut out: Vec<Bytes> = Vec::with_capacity(shared.section.len() + self.resources.len());
        let mut layer = self.resources.values().peekable();
        let mut rest = base.resources.values();
        for (group, &count) in shared.section.iter().zip(shared.members.iter()) {
            let members = rest.clone().take(count as usize);
            let mut run = rest.by_ref().take(count as usize);
            let Some(first) = run.next() else { break };
            let last = run.last().unwrap_or(first);
            while let Some(own) = layer.next_if(|r| r.name < first.name) {
                out.push(own.entry(flavor, type_url));
            }
            if layer.peek().is_none_or(|r| r.name > last.name) {
                out.push(group.clone());
                continue;
            }
            // The layer's resources among this group's, in name order, between slices of the
            // group's bytes (a group is its members' entries, each `entry_len` long); the
            // layer's wins on a name both have.
            let (mut from, mut offset) = (0, 0);
            for member in members {
                let mut replaced = false;
                while let Some(own) = layer.next_if(|r| r.name <= member.name) {
                    if from < offset {
                        out.push(group.slice(from..offset));
                    }
                    from = offset;
                    replaced |= own.name == member.name;
                    out.push(own.entry(flavor, type_url));
                }
                offset += member.entry_len(flavor, type_url);
                if replaced {
                    from = offset;
                }
            }
            debug_assert_eq!(offset, group.len(), "a group is its members' entries");
            if from < offset {
                out.push(group.slice(from..offset));
            }
        }
        out.extend(layer.map(|r| r.entry(flavor, type_url)));
        out.into()
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
        assert_eq!(section.concat(), entries.concat());
        assert_eq!(entries[1].as_ptr(), b_entry.as_ptr());
        let within = |e: &Bytes| {
            section
                .iter()
                .any(|g| g.as_ptr_range().contains(&e.as_ptr()))
        };
        assert!(within(&entries[0]) && within(&entries[2]));
        assert!(
            Arc::ptr_eq(&types.section(Flavor::Delta, T), &section),
            "built once"
        );
        assert_eq!(types, types.clone(), "caches are not part of equality");
    }

    #[test]
    fn sets_differing_by_a_few_resources_share_all_other_groups() {
        let shared: Vec<Arc<Resource>> = (0..1000)
            .map(|i| Arc::new(Resource::new(format!("ns/svc-{i:04}|80"), vec![1u8; 200])))
            .collect();
        let mesh = TypeSnapshot::from_shared(shared.clone());
        // A proxy's set: the mesh's plus its own inbound cluster.
        let own = Arc::new(Resource::new("ns/svc-0500|80|local", vec![2u8; 200]));
        let merged = TypeSnapshot::from_shared(shared.into_iter().chain([own]));
        let (a, b) = (
            mesh.section(Flavor::Sotw, T),
            merged.section(Flavor::Sotw, T),
        );
        assert!(a.len() > 5, "{} groups", a.len());
        let entries: Vec<Bytes> = merged
            .resources()
            .map(|r| r.entry(Flavor::Sotw, T))
            .collect();
        assert_eq!(b.concat(), entries.concat());
        let ptrs = |s: &Section| s.iter().map(|g| g.as_ptr()).collect::<Vec<_>>();
        let shared_groups = ptrs(&b).iter().filter(|p| ptrs(&a).contains(p)).count();
        assert!(
            shared_groups + 2 >= b.len(),
            "{shared_groups} of {} groups shared",
            b.len()
        );
    }

    #[test]
    fn a_layered_set_points_into_its_shared_sets_groups() {
        let shared = Arc::new(TypeSnapshot::from_shared((0..1000).map(|i| {
            Arc::new(Resource::new(format!("ns/svc-{i:04}|80"), vec![1u8; 200]))
        })));
        // Its own: one before every shared name, one in place of a shared one, one among them,
        // one after all.
        let own = TypeSnapshot::new([
            Resource::new("a", vec![2u8; 10]),
            Resource::new("ns/svc-0300|80", vec![3u8; 10]),
            Resource::new("ns/svc-0500|80|local", vec![4u8; 10]),
            Resource::new("z", vec![5u8; 10]),
        ]);
        let layered = TypeSnapshot::merged(&shared, &own);
        let groups = shared.section(Flavor::Sotw, T);
        let section = layered.section(Flavor::Sotw, T);
        let entries: Vec<Bytes> = layered
            .resources()
            .map(|r| r.entry(Flavor::Sotw, T))
            .collect();
        assert_eq!(section.concat(), entries.concat());
        let in_groups = |c: &Bytes| {
            groups
                .iter()
                .any(|g| g.as_ptr_range().contains(&c.as_ptr()))
        };
        let copied: usize = section
            .iter()
            .filter(|c| !in_groups(c))
            .map(Bytes::len)
            .sum();
        let own_len: usize = own
            .resources()
            .map(|r| r.entry(Flavor::Sotw, T).len())
            .sum();
        assert_eq!(copied, own_len, "nothing of the shared set is copied");
        let whole = section
            .iter()
            .filter(|c| {
                groups
                    .iter()
                    .any(|g| g.as_ptr() == c.as_ptr() && g.len() == c.len())
            })
            .count();
        assert!(
            whole + 2 >= groups.len(),
            "{whole} of {} groups whole",
            groups.len()
        );
    }

    proptest::proptest! {
        /// A layered set's section is its resources' entries in name order, whatever falls
        /// where: the layer before, among, in place of and after the shared set's names.
        #[test]
        fn a_layered_sections_bytes_are_its_entries(
            shared in proptest::collection::btree_set("[a-h]{1,4}", 0..400),
            own in proptest::collection::btree_set("[a-h]{1,4}", 0..12),
            flavor in proptest::bool::ANY,
        ) {
            let flavor = if flavor { Flavor::Sotw } else { Flavor::Delta };
            let shared = Arc::new(TypeSnapshot::new(shared.iter().map(|n| Resource::new(n.as_str(), n.as_bytes().repeat(40)))));
            let own = TypeSnapshot::new(own.iter().map(|n| Resource::new(n.as_str(), b"own".to_vec())));
            let layered = TypeSnapshot::merged(&shared, &own);
            let entries: Vec<Bytes> = layered.resources().map(|r| r.entry(flavor, T)).collect();
            proptest::prop_assert_eq!(layered.section(flavor, T).concat(), entries.concat());
            proptest::prop_assert_eq!(layered.section_once(flavor, T).concat(), entries.concat());
        }
    }

    fn skip_key_and_len(mut entry: &[u8]) -> &[u8] {
        prost::encoding::decode_varint(&mut entry).expect("key");
        prost::encoding::decode_varint(&mut entry).expect("length");
        entry
    }
}
