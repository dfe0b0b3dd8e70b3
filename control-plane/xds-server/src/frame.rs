//! ADS responses as gRPC messages written from shared bytes.
//!
//! A response is a small per-stream head (the gRPC length prefix, version, type URL, nonce,
//! removed names) followed by its `resources` field, whose bytes were encoded once per resource
//! or once per type ([`fsm_cache::TypeSnapshot::section`]) and are shared by every stream:
//! protobuf accepts fields in any order and a repeated field spread over the message, so the
//! client decodes exactly the message a single encoder would have written. Nothing of a
//! resource is copied per stream.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryResponse, DiscoveryResponse};
use fsm_cache::{Flavor, TypeSnapshot};
use prost::Message;

use crate::protocol::Response;

/// Length of the gRPC message prefix: a compression flag and a big-endian `u32` length.
const PREFIX: usize = 5;

/// Holders a type snapshot needs (the controller's copy, one per proxy snapshot) before its
/// whole-type section is built and kept.
const SHARED_BY: usize = 2;

/// One response as the chunks of one gRPC message.
#[derive(Clone, Debug)]
pub struct Frames {
    /// The gRPC prefix and the stream's own fields.
    pub head: Bytes,
    pub section: Section,
}

/// The `resources` field of a response.
#[derive(Clone, Debug)]
pub enum Section {
    /// The whole type's section (its groups of entries), shared by every stream sending that
    /// type snapshot.
    Shared(fsm_cache::Section),
    /// Per-resource entries (each shared), for a response carrying part of a type.
    Parts(Vec<Bytes>),
}

impl Frames {
    /// The state-of-the-world `DiscoveryResponse` for `response`; `types` is the type snapshot
    /// the response was computed from, whose shared section is used when the response carries
    /// all of it.
    pub fn sotw(response: &Response, types: Option<&Arc<TypeSnapshot>>) -> Self {
        let head = DiscoveryResponse {
            version_info: response.version.to_string(),
            type_url: response.type_url.to_owned(),
            nonce: response.nonce.to_string(),
            ..DiscoveryResponse::default()
        };
        Self::build(&head, Flavor::Sotw, response, types)
    }

    /// The `DeltaDiscoveryResponse` for `response`.
    pub fn delta(response: &Response, types: Option<&Arc<TypeSnapshot>>) -> Self {
        let head = DeltaDiscoveryResponse {
            system_version_info: response.version.to_string(),
            type_url: response.type_url.to_owned(),
            removed_resources: response.removed.iter().map(|n| n.to_string()).collect(),
            nonce: response.nonce.to_string(),
            ..DeltaDiscoveryResponse::default()
        };
        Self::build(&head, Flavor::Delta, response, types)
    }

    fn build(
        head: &impl Message,
        flavor: Flavor,
        response: &Response,
        types: Option<&Arc<TypeSnapshot>>,
    ) -> Self {
        let type_url = response.type_url;
        // A set held by one proxy's snapshot keeps no section of its own: a layered one (the
        // mesh's shared set plus the proxy's own resources) builds one for this response, which
        // points into the shared set's groups; a flat one goes out as per-resource entries (each
        // shared, joined by the response body). Only sets shared by several snapshots keep one.
        let whole_type = types.filter(|t| {
            !t.is_empty()
                && t.len() == response.resources.len()
                && t.resources()
                    .zip(&response.resources)
                    .all(|(a, b)| Arc::ptr_eq(a, b))
        });
        let section = match whole_type {
            Some(types) if Arc::strong_count(types) > SHARED_BY => {
                Section::Shared(types.section(flavor, type_url))
            }
            Some(types) if types.is_layered() => {
                Section::Shared(types.section_once(flavor, type_url))
            }
            _ => Section::Parts(
                response
                    .resources
                    .iter()
                    .map(|r| r.entry(flavor, type_url))
                    .collect(),
            ),
        };
        let len = head.encoded_len() + section.len();
        let mut out = BytesMut::with_capacity(PREFIX + head.encoded_len());
        out.put_u8(0);
        // Saturating: a message over 4 GiB is refused by the caller's size limit before it is
        // sent ([`Frames::message_len`]).
        out.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
        head.encode_raw(&mut out);
        Frames {
            head: out.freeze(),
            section,
        }
    }

    /// The size of the gRPC message, without its prefix.
    pub fn message_len(&self) -> usize {
        self.head.len() - PREFIX + self.section.len()
    }

    /// The chunks to write, in order.
    pub fn into_chunks(self) -> impl Iterator<Item = Bytes> {
        let section = match self.section {
            Section::Shared(groups) => groups.to_vec(),
            Section::Parts(parts) => parts,
        };
        std::iter::once(self.head)
            .chain(section)
            .filter(|b| !b.is_empty())
    }
}

impl Section {
    pub fn len(&self) -> usize {
        match self {
            Section::Shared(groups) => groups.iter().map(Bytes::len).sum(),
            Section::Parts(parts) => parts.iter().map(Bytes::len).sum(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::service::discovery::v3::Resource as WireResource;
    use envoy_types::pb::google::protobuf::Any;
    use fsm_cache::Resource;
    use proptest::prelude::*;

    use super::*;

    /// What the server sent before responses were framed from shared bytes: the prost messages
    /// tonic encoded, one copy of every body per stream and send.
    fn old_sotw(response: &Response) -> DiscoveryResponse {
        DiscoveryResponse {
            version_info: response.version.to_string(),
            resources: response
                .resources
                .iter()
                .map(|r| to_any(response.type_url, r))
                .collect(),
            type_url: response.type_url.to_owned(),
            nonce: response.nonce.to_string(),
            ..DiscoveryResponse::default()
        }
    }

    fn old_delta(response: &Response) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse {
            system_version_info: response.version.to_string(),
            resources: response
                .resources
                .iter()
                .map(|r| WireResource {
                    name: r.name.to_string(),
                    version: r.version.to_string(),
                    resource: Some(to_any(response.type_url, r)),
                    ..WireResource::default()
                })
                .collect(),
            type_url: response.type_url.to_owned(),
            removed_resources: response.removed.iter().map(|n| n.to_string()).collect(),
            nonce: response.nonce.to_string(),
            ..DeltaDiscoveryResponse::default()
        }
    }

    fn to_any(type_url: &str, resource: &Resource) -> Any {
        Any {
            type_url: type_url.to_owned(),
            value: resource.body.to_vec(),
        }
    }

    /// The gRPC message the frames make, checked against their prefix.
    fn message(frames: Frames) -> Vec<u8> {
        let len = frames.message_len();
        let bytes: Vec<u8> = frames.into_chunks().flat_map(|b| b.to_vec()).collect();
        assert_eq!(bytes[0], 0, "uncompressed");
        let prefixed = u32::from_be_bytes(bytes[1..5].try_into().expect("4 bytes")) as usize;
        assert_eq!(prefixed, len);
        assert_eq!(bytes.len(), PREFIX + len);
        bytes[PREFIX..].to_vec()
    }

    const TYPES: [&str; 2] = [
        crate::protocol::CLUSTER,
        "type.googleapis.com/fsm.dataplane.v1.Inbound",
    ];

    fn case() -> impl Strategy<Value = (TypeSnapshot, Vec<bool>, usize, String, String, Vec<String>)>
    {
        (
            proptest::collection::btree_map(
                "[a-z/|.]{0,12}",
                proptest::collection::vec(any::<u8>(), 0..200),
                0..12,
            ),
            proptest::collection::vec(any::<bool>(), 12),
            0..TYPES.len(),
            "[0-9a-f]{0,16}",
            "[0-9]{0,5}",
            proptest::collection::vec("[a-z]{0,8}", 0..4),
            proptest::option::of(proptest::collection::vec(0..3u8, 12)),
        )
            .prop_map(|(resources, pick, ty, version, nonce, removed, layering)| {
                let types = match layering {
                    None => TypeSnapshot::new(
                        resources
                            .into_iter()
                            .map(|(name, body)| Resource::new(name, body)),
                    ),
                    // A set as a proxy holds it: a shared set with resources of its own,
                    // some only its own, some in place of the shared set's.
                    Some(layering) => {
                        let (mut shared, mut own) = (Vec::new(), Vec::new());
                        for ((name, body), place) in resources.into_iter().zip(layering) {
                            if place != 1 {
                                shared.push(Resource::new(name.clone(), body.clone()));
                            }
                            if place != 0 {
                                let body: Vec<u8> =
                                    body.iter().rev().copied().chain([place]).collect();
                                own.push(Resource::new(name, body));
                            }
                        }
                        TypeSnapshot::merged(
                            &Arc::new(TypeSnapshot::new(shared)),
                            &TypeSnapshot::new(own),
                        )
                    }
                };
                (types, pick, ty, version, nonce, removed)
            })
    }

    proptest! {
        /// Decoding the framed bytes gives exactly the message the old path built, whether the
        /// response carries a subset of the type (per-resource entries) or all of it (the
        /// type's shared section).
        #[test]
        fn frames_decode_to_the_message_prost_would_send(
            (types, pick, ty, version, nonce, removed) in case()
        ) {
            let subset: Vec<Arc<Resource>> = types
                .resources()
                .zip(&pick)
                .filter(|(_, keep)| **keep)
                .map(|(r, _)| r.clone())
                .collect();
            let all: Vec<Arc<Resource>> = types.resources().cloned().collect();
            for resources in [subset, all] {
                let response = Response {
                    type_url: TYPES[ty],
                    version: Arc::from(version.as_str()),
                    nonce: Arc::from(nonce.as_str()),
                    resources,
                    removed: removed.iter().map(|n| Arc::from(n.as_str())).collect(),
                };
                let sotw = Response { removed: Vec::new(), ..response.clone() };
                // Held by one snapshot (per-resource entries), then by several (shared section).
                let types = Arc::new(types.clone());
                for holders in [vec![], vec![types.clone(), types.clone()]] {
                    let bytes = message(Frames::sotw(&sotw, Some(&types)));
                    prop_assert_eq!(DiscoveryResponse::decode(&bytes[..]).expect("decodes"), old_sotw(&sotw));
                    let bytes = message(Frames::delta(&response, Some(&types)));
                    prop_assert_eq!(DeltaDiscoveryResponse::decode(&bytes[..]).expect("decodes"), old_delta(&response));
                    drop(holders);
                }
                let bytes = message(Frames::delta(&response, None));
                prop_assert_eq!(DeltaDiscoveryResponse::decode(&bytes[..]).expect("decodes"), old_delta(&response));
            }
        }
    }

    /// A type set as the controller shares it: held by several proxies' snapshots.
    fn clusters(n: usize) -> (Arc<TypeSnapshot>, [Arc<TypeSnapshot>; 2]) {
        let types =
            Arc::new(TypeSnapshot::new((0..n).map(|i| {
                Resource::new(format!("ns/svc-{i}|80"), vec![7u8; 100])
            })));
        (types.clone(), [types.clone(), types])
    }

    fn response(types: &TypeSnapshot, nonce: &str, resources: Vec<Arc<Resource>>) -> Response {
        Response {
            type_url: crate::protocol::CLUSTER,
            version: types.version().clone(),
            nonce: Arc::from(nonce),
            resources,
            removed: Vec::new(),
        }
    }

    #[test]
    fn streams_sending_a_whole_type_share_one_section() {
        let (types, _holders) = clusters(1000);
        let all: Vec<Arc<Resource>> = types.resources().cloned().collect();
        let a = Frames::sotw(&response(&types, "1", all.clone()), Some(&types));
        let b = Frames::sotw(&response(&types, "7", all), Some(&types));
        let (Section::Shared(sa), Section::Shared(sb)) = (&a.section, &b.section) else {
            panic!("a whole type goes out as its shared section");
        };
        assert!(Arc::ptr_eq(sa, sb), "the same bytes, not a copy");
        assert!(
            a.head.len() < 128,
            "only the head is per stream: {}",
            a.head.len()
        );
        assert_ne!(a.head, b.head, "nonces differ");
    }

    #[test]
    fn a_set_only_one_snapshot_holds_keeps_no_section() {
        let (types, holders) = clusters(100);
        drop(holders);
        let all: Vec<Arc<Resource>> = types.resources().cloned().collect();
        let frames = Frames::sotw(&response(&types, "1", all), Some(&types));
        assert!(matches!(frames.section, Section::Parts(ref p) if p.len() == 100));
    }

    #[test]
    fn a_proxys_own_layered_set_goes_out_as_the_shared_sets_groups() {
        let (shared, _holders) = clusters(1000);
        let own = TypeSnapshot::new([Resource::new("ns/svc-500|80|local", vec![9u8; 100])]);
        let types = Arc::new(TypeSnapshot::merged(&shared, &own));
        let all: Vec<Arc<Resource>> = types.resources().cloned().collect();
        let frames = Frames::delta(&response(&types, "1", all.clone()), Some(&types));
        let Section::Shared(section) = &frames.section else {
            panic!("a whole layered type goes out as a section");
        };
        let groups = shared.section(Flavor::Delta, crate::protocol::CLUSTER);
        let from_shared = section
            .iter()
            .filter(|c| groups.iter().any(|g| g.as_ptr() == c.as_ptr()))
            .count();
        assert!(
            from_shared + 1 >= groups.len() && section.len() < all.len() / 2,
            "{from_shared} of {} chunks are the shared set's {} groups",
            section.len(),
            groups.len()
        );
        let again = Frames::delta(&response(&types, "2", all), Some(&types));
        let Section::Shared(again) = &again.section else {
            panic!("a section again");
        };
        assert!(
            !Arc::ptr_eq(section, again),
            "a one-holder set keeps no section"
        );
    }

    #[test]
    fn streams_sending_part_of_a_type_share_each_entry() {
        let (types, _holders) = clusters(10);
        let some: Vec<Arc<Resource>> = types.resources().take(3).cloned().collect();
        let a = Frames::delta(&response(&types, "1", some.clone()), Some(&types));
        let b = Frames::delta(&response(&types, "2", some), Some(&types));
        let (Section::Parts(pa), Section::Parts(pb)) = (&a.section, &b.section) else {
            panic!("part of a type goes out as per-resource entries");
        };
        assert_eq!(pa.len(), 3);
        for (x, y) in pa.iter().zip(pb) {
            assert_eq!(x.as_ptr(), y.as_ptr());
        }
    }
}
