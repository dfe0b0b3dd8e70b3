//! The xDS stream rules as synchronous state machines: no sockets, no tokio.
//!
//! [`SotwStream`] (state of the world) and [`DeltaStream`] (incremental) each take the proxy's
//! requests, with its current snapshot, and "snapshot changed" notifications, and return the
//! [`Response`]s to send plus [`Event`]s (ACK, NACK, stale) for the server to record. The rules
//! they share:
//!
//! - A type is only ever sent after the proxy requested it, and only on change: versions are
//!   content hashes, so "changed" is a string comparison.
//! - Nonces are unique per stream; a request whose nonce is not the last one sent for its type is
//!   stale: its ACK or NACK is ignored (a newer response is already on its way). State of the
//!   world ignores it entirely; delta still applies its subscription changes, as the incremental
//!   protocol requires (see the `delta` module).
//! - A NACKed version is parked, never resent: only a snapshot with a different version goes out.
//!   Resending a rejected configuration in a loop is what go-control-plane does and what we avoid.
//! - When one snapshot change touches several types, responses go out CDS, EDS, LDS, RDS, SDS
//!   (Envoy's make-before-break order), then other types alphabetically.

use bytes::Bytes;
use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use fsm_cache::{Resource, Snapshot, SyncEvent, TypeUrl};
use fsm_errcode::{ErrCode, HasErrCode};

mod delta;
mod held;
mod ids;
mod sotw;

pub use delta::DeltaStream;
pub use sotw::SotwStream;

pub const CLUSTER: TypeUrl = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINT: TypeUrl = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const LISTENER: TypeUrl = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ROUTE: TypeUrl = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
pub const SECRET: TypeUrl = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// The Envoy types in the order their responses must go out.
pub const ENVOY_TYPES: [TypeUrl; 5] = [CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET];

/// The short name used in logs and metric labels: `CDS`, `EDS`, `LDS`, `RDS`, `SDS`, or for any
/// other type the part of its URL after the last `/`.
pub fn short_name(type_url: &str) -> &str {
    match type_url {
        CLUSTER => "CDS",
        ENDPOINT => "EDS",
        LISTENER => "LDS",
        ROUTE => "RDS",
        SECRET => "SDS",
        other => other.rsplit('/').next().unwrap_or(other),
    }
}

/// A state-of-the-world request, converted from the wire `DiscoveryRequest`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SotwRequest {
    pub type_url: String,
    pub version_info: String,
    pub resource_names: ResourceNames,
    pub response_nonce: String,
    /// The message of `error_detail`: present means NACK.
    pub error_detail: Option<String>,
}

/// A request's resource names as received: runs of the request message's `resource_names`
/// entries, read as names only when the list changed. Envoy repeats every subscribed name with
/// each ACK (a thousand names for a thousand clusters), and an unchanged list is recognised by
/// its [`digest`](Self::digest), one hash of the entries' bytes, without a string, a slice or
/// even a range per name.
#[derive(Clone, Default)]
pub struct ResourceNames {
    message: Bytes,
    /// Start and end of each run of consecutive entries (key, length and name) in `message`;
    /// encoders write a repeated field's entries together, so there is one run, or none.
    runs: Vec<(u32, u32)>,
}

/// `resource_names` in `DiscoveryRequest`.
pub(crate) const RESOURCE_NAMES_FIELD: u32 = 3;

impl ResourceNames {
    /// The length-delimited fields numbered `field` of the protobuf `message` (the
    /// `resource_names` of a `DiscoveryRequest` are field 3), found without decoding the rest.
    pub fn of_field(message: Bytes, field: u32) -> Result<Self, String> {
        use prost::encoding::{WireType, decode_key, decode_varint};
        let mut rest: &[u8] = &message;
        let mut runs: Vec<(u32, u32)> = Vec::new();
        let offset = |rest: &[u8]| (message.len() - rest.len()) as u32;
        while !rest.is_empty() {
            let entry_start = offset(rest);
            let (tag, wire_type) = decode_key(&mut rest).map_err(|e| e.to_string())?;
            let skip = match wire_type {
                WireType::LengthDelimited => {
                    let len = decode_varint(&mut rest).map_err(|e| e.to_string())?;
                    usize::try_from(len)
                        .ok()
                        .filter(|len| *len <= rest.len())
                        .ok_or("buffer underflow")?
                }
                _ if tag == field => {
                    return Err(format!("field {field}: invalid wire type {wire_type:?}"));
                }
                WireType::Varint => {
                    decode_varint(&mut rest).map_err(|e| e.to_string())?;
                    0
                }
                WireType::SixtyFourBit => 8,
                WireType::ThirtyTwoBit => 4,
                WireType::StartGroup | WireType::EndGroup => {
                    return Err(format!("field {tag}: groups are not accepted"));
                }
            };
            rest = rest.get(skip..).ok_or("buffer underflow")?;
            if tag == field {
                let entry_end = offset(rest);
                match runs.last_mut() {
                    Some((_, end)) if *end == entry_start => *end = entry_end,
                    _ => runs.push((entry_start, entry_end)),
                }
            }
        }
        Ok(ResourceNames { message, runs })
    }

    /// The message without these names' entries: a copy of the other fields when the names
    /// are one run (the other fields of a request are short), else the whole message, whose
    /// decoder skips them.
    pub fn other_fields(&self) -> Bytes {
        match self.runs[..] {
            [] => self.message.clone(),
            [(start, end)] => {
                let (start, end) = (start as usize, end as usize);
                let mut rest = Vec::with_capacity(self.message.len() - (end - start));
                rest.extend_from_slice(&self.message[..start]);
                rest.extend_from_slice(&self.message[end..]);
                rest.into()
            }
            _ => self.message.clone(),
        }
    }

    fn runs(&self) -> impl Iterator<Item = &[u8]> {
        self.runs
            .iter()
            .map(|(start, end)| &self.message[*start as usize..*end as usize])
    }

    fn slices(&self) -> impl Iterator<Item = &[u8]> {
        self.runs().flat_map(|mut run| {
            std::iter::from_fn(move || {
                if run.is_empty() {
                    return None;
                }
                // Validated by `of_field` (or written by `From`): a key, a length, the name.
                prost::encoding::decode_key(&mut run).ok()?;
                let len = prost::encoding::decode_varint(&mut run).ok()? as usize;
                let (name, rest) = run.split_at_checked(len)?;
                run = rest;
                Some(name)
            })
        })
    }

    /// A hash of the names in their order: of their entries as encoded, which say each name's
    /// length. Two encodings of the same names (a length written in more bytes than needed)
    /// differ, which only costs reading the names again.
    pub fn digest(&self) -> u64 {
        match self.runs[..] {
            [(start, end)] => {
                xxhash_rust::xxh3::xxh3_64(&self.message[start as usize..end as usize])
            }
            _ => {
                let mut hasher = xxhash_rust::xxh3::Xxh3::new();
                for run in self.runs() {
                    hasher.update(run);
                }
                hasher.digest()
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// The names as strings. A name that is not UTF-8 (which protobuf strings must be) is read
    /// with replacement characters: no resource has such a name, so it is simply not found.
    pub fn strs(&self) -> impl Iterator<Item = std::borrow::Cow<'_, str>> {
        self.slices().map(String::from_utf8_lossy)
    }
}

/// The names encoded as `resource_names` entries of a `DiscoveryRequest`.
impl<S: AsRef<[u8]>> From<Vec<S>> for ResourceNames {
    fn from(names: Vec<S>) -> Self {
        let mut message = Vec::new();
        for name in &names {
            let name = name.as_ref();
            prost::encoding::encode_key(
                RESOURCE_NAMES_FIELD,
                prost::encoding::WireType::LengthDelimited,
                &mut message,
            );
            prost::encoding::encode_varint(name.len() as u64, &mut message);
            message.extend_from_slice(name);
        }
        let runs = if message.is_empty() {
            Vec::new()
        } else {
            vec![(0, message.len() as u32)]
        };
        ResourceNames {
            message: message.into(),
            runs,
        }
    }
}

/// The same names in the same order, wherever they were read from.
impl PartialEq for ResourceNames {
    fn eq(&self, other: &Self) -> bool {
        self.slices().eq(other.slices())
    }
}

impl Eq for ResourceNames {}

impl std::fmt::Debug for ResourceNames {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.strs()).finish()
    }
}

/// An incremental request, converted from the wire `DeltaDiscoveryRequest`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeltaRequest {
    pub type_url: String,
    pub subscribe: Vec<String>,
    pub unsubscribe: Vec<String>,
    pub initial_resource_versions: BTreeMap<String, String>,
    pub response_nonce: String,
    pub error_detail: Option<String>,
}

/// One response to send. For state of the world `version` labels the whole response and
/// `removed` is empty; for delta `version` is the type's snapshot version
/// (`system_version_info`) and each resource carries its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub type_url: TypeUrl,
    pub version: Arc<str>,
    pub nonce: Arc<str>,
    pub resources: Vec<Arc<Resource>>,
    pub removed: Vec<Arc<str>>,
}

/// What the proxy told us about a response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Ack {
        type_url: TypeUrl,
        version: Arc<str>,
    },
    Nack {
        type_url: TypeUrl,
        version: Arc<str>,
        error: String,
    },
    /// A request answering an older response: its ACK or NACK is ignored.
    Stale { type_url: TypeUrl, nonce: String },
}

/// The result of one step.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Output {
    /// The type a request was resolved to (`None` for a snapshot change).
    pub type_url: Option<TypeUrl>,
    pub responses: Vec<Response>,
    pub events: Vec<Event>,
}

/// A request the stream cannot serve; the stream goes on.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("unknown type URL {0:?} in request")]
    UnknownType(String),
}

/// One input of a stream state machine.
#[derive(Clone, Debug)]
pub enum Input<'a, R> {
    /// A request, with the proxy's snapshot at the time (`None` before the controller made one).
    Request(R, Option<&'a Snapshot>),
    /// The proxy's snapshot changed.
    SnapshotChanged(&'a Snapshot),
}

/// The per-stream protocol, so the server runs both flavours with one loop.
pub trait XdsStream: Default + Send + 'static {
    type Request;

    fn on_request(
        &mut self,
        request: Self::Request,
        snapshot: Option<&Snapshot>,
    ) -> Result<Output, ProtocolError>;

    fn on_snapshot(&mut self, snapshot: &Snapshot) -> Output;

    fn step(&mut self, input: Input<'_, Self::Request>) -> Result<Output, ProtocolError> {
        match input {
            Input::Request(request, snapshot) => self.on_request(request, snapshot),
            Input::SnapshotChanged(snapshot) => Ok(self.on_snapshot(snapshot)),
        }
    }
}

// === Event ===

impl Event {
    pub fn type_url(&self) -> TypeUrl {
        match self {
            Event::Ack { type_url, .. }
            | Event::Nack { type_url, .. }
            | Event::Stale { type_url, .. } => type_url,
        }
    }

    /// What the snapshot cache records for this event, if anything.
    pub fn sync_event(&self) -> Option<SyncEvent> {
        match self {
            Event::Ack { version, .. } => Some(SyncEvent::Acked {
                version: version.clone(),
            }),
            Event::Nack { version, error, .. } => Some(SyncEvent::Nacked {
                version: version.clone(),
                error: error.clone(),
            }),
            Event::Stale { .. } => None,
        }
    }
}

// === ProtocolError ===

impl HasErrCode for ProtocolError {
    fn err_code(&self) -> ErrCode {
        match self {
            ProtocolError::UnknownType(_) => ErrCode::E5013,
        }
    }
}

// === Shared machinery ===

/// The resource kinds in make-before-break order, by message name: any data plane whose types
/// are named like xDS's (Envoy's, `fsm.dataplane.v1`) goes out clusters first, secrets last.
const KIND_ORDER: [&str; 5] = [
    "Cluster",
    "ClusterLoadAssignment",
    "Listener",
    "RouteConfiguration",
    "Secret",
];

/// A type URL ordered for sending: by resource kind ([`KIND_ORDER`], from the message name after
/// the last `.`), then alphabetically, so types of other kinds come last. Keying the per-type
/// state by it makes every iteration come out in send order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Ordered(TypeUrl);

impl Ordered {
    fn rank(self) -> usize {
        let message = self.0.rsplit(['.', '/']).next().unwrap_or(self.0);
        KIND_ORDER
            .iter()
            .position(|kind| *kind == message)
            .unwrap_or(KIND_ORDER.len())
    }
}

impl Ord for Ordered {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.rank(), self.0).cmp(&(other.rank(), other.0))
    }
}

impl PartialOrd for Ordered {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Per-stream nonce counter. Plain decimal: nonces only need to be unique within a stream.
#[derive(Debug, Default)]
struct Nonces(u64);

impl Nonces {
    fn next(&mut self) -> Arc<str> {
        self.0 += 1;
        Arc::from(self.0.to_string())
    }
}

impl fmt::Display for Ordered {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(short_name(self.0))
    }
}

/// Maps a requested type URL onto the `'static` one the snapshot uses: an Envoy type, one of the
/// stream's extra types, one already requested on the stream, or one the snapshot carries.
fn resolve<S>(
    type_url: &str,
    extra: &'static [TypeUrl],
    requested: &BTreeMap<Ordered, S>,
    snapshot: Option<&Snapshot>,
) -> Result<TypeUrl, ProtocolError> {
    ENVOY_TYPES
        .iter()
        .chain(extra)
        .copied()
        .chain(requested.keys().map(|t| t.0))
        .find(|t| *t == type_url)
        .or_else(|| snapshot.and_then(|s| s.versions().into_keys().find(|t| *t == type_url)))
        .ok_or_else(|| ProtocolError::UnknownType(type_url.to_owned()))
}

/// The version of an empty set, for a type the snapshot does not carry.
fn empty_version() -> Arc<str> {
    fsm_cache::TypeSnapshot::version_of(std::iter::empty())
}

#[cfg(test)]
mod test_support {
    use super::*;

    /// A snapshot from `(type, [(name, body)])`; equal bodies give equal resource versions.
    pub fn snap(types: &[(TypeUrl, &[(&str, &'static str)])]) -> Snapshot {
        Snapshot::new(types.iter().map(|(type_url, resources)| {
            (
                *type_url,
                resources
                    .iter()
                    .map(|(name, body)| Resource::new(*name, body.as_bytes()))
                    .collect(),
            )
        }))
    }

    /// `ack CDS; nack EDS; stale LDS; CDS[a,b]; EDS[c] -[d]`: events first, then responses with
    /// their resource names and, when any, removed names.
    pub fn render(out: &Output) -> String {
        let events = out.events.iter().map(|e| {
            let kind = match e {
                Event::Ack { .. } => "ack",
                Event::Nack { .. } => "nack",
                Event::Stale { .. } => "stale",
            };
            format!("{kind} {}", short_name(e.type_url()))
        });
        let responses = out.responses.iter().map(|r| {
            let names: Vec<&str> = r.resources.iter().map(|r| &*r.name).collect();
            let mut line = format!("{}[{}]", short_name(r.type_url), names.join(","));
            if !r.removed.is_empty() {
                let removed: Vec<&str> = r.removed.iter().map(|n| &**n).collect();
                line.push_str(&format!(" -[{}]", removed.join(",")));
            }
            line
        });
        events.chain(responses).collect::<Vec<_>>().join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names() {
        for (url, short) in [
            (CLUSTER, "CDS"),
            (ENDPOINT, "EDS"),
            (LISTENER, "LDS"),
            (ROUTE, "RDS"),
            (SECRET, "SDS"),
            (
                "type.googleapis.com/fsm.dataplane.v1.Inbound",
                "fsm.dataplane.v1.Inbound",
            ),
            ("no-slash", "no-slash"),
        ] {
            assert_eq!(short_name(url), short);
        }
    }

    #[test]
    fn envoy_types_sort_first_in_fixed_order_then_alphabetically() {
        let mut types: Vec<Ordered> = [
            "type.example/b",
            SECRET,
            ROUTE,
            "type.example/a",
            LISTENER,
            ENDPOINT,
            CLUSTER,
        ]
        .map(Ordered)
        .to_vec();
        types.sort();
        let sorted: Vec<TypeUrl> = types.into_iter().map(|t| t.0).collect();
        assert_eq!(
            sorted,
            vec![
                CLUSTER,
                ENDPOINT,
                LISTENER,
                ROUTE,
                SECRET,
                "type.example/a",
                "type.example/b"
            ]
        );
    }

    #[test]
    fn any_data_planes_types_go_out_in_kind_order_not_alphabetically() {
        // Package names chosen so that alphabetical order would be wrong.
        let mut types: Vec<Ordered> = [
            "type.example/a.v1.Secret",
            "type.example/b.v1.RouteConfiguration",
            "type.example/c.v1.Listener",
            "type.example/d.v1.ClusterLoadAssignment",
            "type.example/e.v1.Cluster",
        ]
        .map(Ordered)
        .to_vec();
        types.sort();
        let kinds: Vec<&str> = types
            .iter()
            .map(|t| t.0.rsplit('.').next().unwrap_or_default())
            .collect();
        assert_eq!(kinds, KIND_ORDER);
    }

    #[test]
    fn unknown_type_is_e5013() {
        let err =
            resolve::<()>("type.example/nope", &[], &BTreeMap::new(), None).expect_err("unknown");
        assert_eq!(err.err_code(), ErrCode::E5013);
        assert!(err.to_string().contains("type.example/nope"));
        let snapshot = Snapshot::new([("type.example/yes", vec![])]);
        assert_eq!(
            resolve::<()>("type.example/yes", &[], &BTreeMap::new(), Some(&snapshot)),
            Ok("type.example/yes")
        );
        assert_eq!(
            resolve::<()>(
                "type.example/x",
                &["type.example/x"],
                &BTreeMap::new(),
                None
            ),
            Ok("type.example/x")
        );
    }
}
