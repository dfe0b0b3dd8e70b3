//! The ADS client protocol as a synchronous state machine: responses in, ACK/NACK requests out.
//!
//! No sockets and no tokio here, so every rule is table-tested: a response is decoded, merged into
//! a *candidate* resource set (SotW replaces the type wholesale, delta applies upserts and
//! removals), and offered to a [`ConfigSink`]. Accepted: the candidate becomes current and the
//! response is ACKed with its version. Rejected: the current set stays (the sidecar keeps serving
//! it), the response is NACKed with the sink's error and the *previous* version, and the NACK is
//! remembered for `/config_dump`. On reconnect the client resumes from the versions it holds.

use std::collections::BTreeMap;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::google::rpc::Status;
use fsm_dataplane_proto::{ALL_TYPE_URLS, type_url, v1};
use prost::Message;

/// gRPC `INVALID_ARGUMENT`, the code Envoy puts in a NACK's `error_detail`.
const INVALID_ARGUMENT: i32 = 3;

/// Which flavour of ADS the stream speaks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AdsMode {
    #[default]
    Sotw,
    Delta,
}

/// One resource as received: its name, its version and its encoded message.
#[derive(Clone, Debug, PartialEq)]
pub struct RawResource {
    pub name: Arc<str>,
    pub version: Arc<str>,
    /// The encoded `fsm.dataplane.v1` message (the `Any`'s value).
    pub body: Arc<[u8]>,
}

/// Why a response was refused, kept for `/config_dump` and logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Nack {
    /// The version that was refused (SotW `version_info`, delta `system_version_info`).
    pub version: String,
    pub error: String,
}

/// What the client holds for one resource type.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TypeState {
    /// The last accepted version of the type ("" before any).
    pub version: String,
    /// Accepted at least once on any stream: readiness needs the first CDS and LDS.
    pub received: bool,
    pub resources: BTreeMap<Arc<str>, RawResource>,
    pub last_nack: Option<Nack>,
    /// Nonce of the last response on the current stream; "" on a fresh stream.
    nonce: String,
}

/// Every type's accepted resources: what a [`ConfigSink`] validates and builds its config from.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ResourceSet {
    pub types: BTreeMap<&'static str, TypeState>,
}

impl ResourceSet {
    pub fn get(&self, type_url: &str) -> Option<&TypeState> {
        self.types.get(type_url)
    }

    /// The resources of one type, by name.
    pub fn resources(&self, type_url: &str) -> impl Iterator<Item = &RawResource> {
        self.types
            .get(type_url)
            .into_iter()
            .flat_map(|t| t.resources.values())
    }
}

/// Validates a candidate resource set and, when it is good, makes it the running config.
pub trait ConfigSink {
    /// `changed` is the type the response carried: references *from* it to other types are
    /// checked strictly (a route naming an unknown cluster is an error), references *to* it are
    /// not, so removing a cluster before the route that used it is not refused.
    fn try_apply(&mut self, candidate: &ResourceSet, changed: &'static str) -> Result<(), String>;

    /// The response was refused; the current config stays. For status pages.
    fn on_nack(&mut self, _candidate_state: &ResourceSet) {}
}

/// A request to send on the stream.
#[derive(Clone, Debug, PartialEq)]
pub enum Request {
    Sotw(DiscoveryRequest),
    Delta(DeltaDiscoveryRequest),
}

/// The outcome of one response, for logs and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ack { type_url: String, version: String },
    Nack { type_url: String, error: String },
}

/// The client side of one ADS session, kept across streams.
#[derive(Clone, Debug)]
pub struct AdsState {
    mode: AdsMode,
    node: Node,
    /// The node goes only on a stream's first request (Envoy's `set_node_on_first_message_only`).
    node_sent: bool,
    set: ResourceSet,
}

// === AdsState ===

impl AdsState {
    pub fn new(mode: AdsMode, node: Node) -> Self {
        let types = ALL_TYPE_URLS
            .iter()
            .map(|url| (*url, TypeState::default()))
            .collect();
        AdsState {
            mode,
            node,
            node_sent: false,
            set: ResourceSet { types },
        }
    }

    pub fn mode(&self) -> AdsMode {
        self.mode
    }

    pub fn resources(&self) -> &ResourceSet {
        &self.set
    }

    /// Ready once the first clusters and listeners are applied (Envoy's rule for `/ready`).
    pub fn is_ready(&self) -> bool {
        [type_url::CLUSTER, type_url::LISTENER]
            .iter()
            .all(|t| self.set.types.get(t).is_some_and(|s| s.received))
    }

    /// The first requests of a new stream: one wildcard subscription per type, carrying the
    /// versions already held so the server resends only what changed while we were away.
    pub fn on_connect(&mut self) -> Vec<Request> {
        self.node_sent = false;
        for state in self.set.types.values_mut() {
            state.nonce.clear();
        }
        let mut out = Vec::new();
        for url in ALL_TYPE_URLS {
            let state = self.set.types.get(url).cloned().unwrap_or_default();
            let node = self.take_node();
            out.push(match self.mode {
                AdsMode::Sotw => Request::Sotw(DiscoveryRequest {
                    version_info: state.version.clone(),
                    node,
                    type_url: url.to_string(),
                    ..Default::default()
                }),
                AdsMode::Delta => Request::Delta(DeltaDiscoveryRequest {
                    node,
                    type_url: url.to_string(),
                    resource_names_subscribe: vec!["*".to_string()],
                    initial_resource_versions: state
                        .resources
                        .values()
                        .map(|r| (r.name.to_string(), r.version.to_string()))
                        .collect(),
                    ..Default::default()
                }),
            });
        }
        out
    }

    fn take_node(&mut self) -> Option<Node> {
        if self.node_sent {
            None
        } else {
            self.node_sent = true;
            Some(self.node.clone())
        }
    }

    /// Handles a state-of-the-world response and returns the ACK or NACK to send.
    pub fn on_sotw(
        &mut self,
        response: DiscoveryResponse,
        sink: &mut dyn ConfigSink,
    ) -> (Request, Outcome) {
        let type_url = response.type_url.clone();
        let result = match known_type(&type_url) {
            Some(url) => decode_all(url, &response.resources, &response.version_info)
                .map(|resources| (url, resources)),
            None => Err(format!("unknown type URL {type_url:?}")),
        };
        let result = result.and_then(|(url, resources)| {
            let mut candidate = self.set.clone();
            let state = candidate.types.entry(url).or_default();
            state.resources = resources;
            state.version = response.version_info.clone();
            state.received = true;
            sink.try_apply(&candidate, url).map(|()| (url, candidate))
        });
        let outcome = self.settle(
            &type_url,
            &response.version_info,
            &response.nonce,
            result,
            sink,
        );
        let node = self.take_node();
        let accepted = self
            .set
            .types
            .get(type_url.as_str())
            .map(|s| s.version.clone())
            .unwrap_or_default();
        let request = DiscoveryRequest {
            version_info: accepted,
            node,
            type_url,
            response_nonce: response.nonce,
            error_detail: nack_status(&outcome),
            ..Default::default()
        };
        (Request::Sotw(request), outcome)
    }

    /// Handles a delta response and returns the ACK or NACK to send.
    pub fn on_delta(
        &mut self,
        response: DeltaDiscoveryResponse,
        sink: &mut dyn ConfigSink,
    ) -> (Request, Outcome) {
        let type_url = response.type_url.clone();
        let result = match known_type(&type_url) {
            Some(url) => {
                let mut candidate = self.set.clone();
                let state = candidate.types.entry(url).or_default();
                let mut error = None;
                for removed in &response.removed_resources {
                    state.resources.remove(removed.as_str());
                }
                for (index, resource) in response.resources.iter().enumerate() {
                    let decoded = resource
                        .resource
                        .as_ref()
                        .ok_or_else(|| {
                            format!(
                                "{} resource {:?} (#{index}): no body",
                                short(url),
                                resource.name
                            )
                        })
                        .and_then(|any| decode_one(url, any, index, &resource.version));
                    match decoded {
                        Ok(raw) => {
                            if !resource.name.is_empty() && *resource.name != *raw.name {
                                error = Some(format!(
                                    "{} resource #{index}: named {:?} in the response but {:?} in its body",
                                    short(url),
                                    resource.name,
                                    raw.name
                                ));
                                break;
                            }
                            state.resources.insert(raw.name.clone(), raw);
                        }
                        Err(e) => {
                            error = Some(e);
                            break;
                        }
                    }
                }
                state.version = response.system_version_info.clone();
                state.received = true;
                match error {
                    Some(e) => Err(e),
                    None => sink.try_apply(&candidate, url).map(|()| (url, candidate)),
                }
            }
            None => Err(format!("unknown type URL {type_url:?}")),
        };
        let outcome = self.settle(
            &type_url,
            &response.system_version_info,
            &response.nonce,
            result,
            sink,
        );
        let request = DeltaDiscoveryRequest {
            node: self.take_node(),
            type_url,
            response_nonce: response.nonce,
            error_detail: nack_status(&outcome),
            ..Default::default()
        };
        (Request::Delta(request), outcome)
    }

    fn settle(
        &mut self,
        type_url: &str,
        version: &str,
        nonce: &str,
        result: Result<(&'static str, ResourceSet), String>,
        sink: &mut dyn ConfigSink,
    ) -> Outcome {
        match result {
            Ok((url, mut candidate)) => {
                if let Some(state) = candidate.types.get_mut(url) {
                    state.nonce = nonce.to_string();
                    // The dump shows the *last* NACK even after a newer version is accepted;
                    // its version tells whether it is still current.
                    if let Some(old) = self.set.types.get(url) {
                        state.last_nack = old.last_nack.clone();
                    }
                }
                self.set = candidate;
                Outcome::Ack {
                    type_url: url.to_string(),
                    version: version.to_string(),
                }
            }
            Err(error) => {
                if let Some(state) = self.set.types.get_mut(type_url) {
                    state.nonce = nonce.to_string();
                    state.last_nack = Some(Nack {
                        version: version.to_string(),
                        error: error.clone(),
                    });
                }
                sink.on_nack(&self.set);
                Outcome::Nack {
                    type_url: type_url.to_string(),
                    error,
                }
            }
        }
    }
}

// === free functions ===

fn known_type(type_url: &str) -> Option<&'static str> {
    ALL_TYPE_URLS.iter().copied().find(|u| *u == type_url)
}

/// `Cluster`, `Listener`…: the message name, for error messages.
pub fn short(type_url: &str) -> &str {
    type_url.rsplit('.').next().unwrap_or(type_url)
}

fn nack_status(outcome: &Outcome) -> Option<Status> {
    match outcome {
        Outcome::Ack { .. } => None,
        Outcome::Nack { error, .. } => Some(Status {
            code: INVALID_ARGUMENT,
            message: error.clone(),
            details: Vec::new(),
        }),
    }
}

fn decode_all(
    url: &'static str,
    resources: &[Any],
    version: &str,
) -> Result<BTreeMap<Arc<str>, RawResource>, String> {
    let mut out = BTreeMap::new();
    for (index, any) in resources.iter().enumerate() {
        let raw = decode_one(url, any, index, version)?;
        if out.contains_key(&raw.name) {
            return Err(format!(
                "{} {:?} (#{index}): the name appears twice in one response",
                short(url),
                raw.name
            ));
        }
        out.insert(raw.name.clone(), raw);
    }
    Ok(out)
}

/// Decodes a resource far enough to know its name; the sink checks the rest.
fn decode_one(url: &str, any: &Any, index: usize, version: &str) -> Result<RawResource, String> {
    if any.type_url != url {
        return Err(format!(
            "{} resource #{index}: type URL {:?} in a {} response",
            short(url),
            any.type_url,
            short(url)
        ));
    }
    let bytes = any.value.as_slice();
    let err =
        |e: prost::DecodeError| format!("{} resource #{index}: cannot decode: {e}", short(url));
    let name = match url {
        type_url::CLUSTER => v1::Cluster::decode(bytes).map_err(err)?.name,
        type_url::CLUSTER_LOAD_ASSIGNMENT => {
            v1::ClusterLoadAssignment::decode(bytes)
                .map_err(err)?
                .cluster_name
        }
        type_url::LISTENER => v1::Listener::decode(bytes).map_err(err)?.name,
        type_url::ROUTE_CONFIGURATION => v1::RouteConfiguration::decode(bytes).map_err(err)?.name,
        type_url::SECRET => v1::Secret::decode(bytes).map_err(err)?.name,
        type_url::RUNTIME => v1::Runtime::decode(bytes).map_err(err)?.name,
        other => return Err(format!("unknown type URL {other:?}")),
    };
    if name.is_empty() {
        return Err(format!("{} resource #{index}: empty name", short(url)));
    }
    Ok(RawResource {
        name: Arc::from(name),
        version: Arc::from(version),
        body: Arc::from(bytes),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::service::discovery::v3::Resource;
    use test_case::test_case;

    /// Accepts everything except resources whose name starts with `bad`.
    #[derive(Default)]
    struct Sink {
        applied: Vec<&'static str>,
        nacks: usize,
    }

    impl ConfigSink for Sink {
        fn try_apply(
            &mut self,
            candidate: &ResourceSet,
            changed: &'static str,
        ) -> Result<(), String> {
            if let Some(bad) = candidate
                .resources(changed)
                .find(|r| r.name.starts_with("bad"))
            {
                return Err(format!("{} {:?}: bad", short(changed), bad.name));
            }
            self.applied.push(changed);
            Ok(())
        }
        fn on_nack(&mut self, _: &ResourceSet) {
            self.nacks += 1;
        }
    }

    fn cluster(name: &str) -> Any {
        Any {
            type_url: type_url::CLUSTER.into(),
            value: v1::Cluster {
                name: name.into(),
                ..Default::default()
            }
            .encode_to_vec(),
        }
    }

    fn sotw(version: &str, nonce: &str, resources: Vec<Any>) -> DiscoveryResponse {
        DiscoveryResponse {
            version_info: version.into(),
            resources,
            type_url: type_url::CLUSTER.into(),
            nonce: nonce.into(),
            ..Default::default()
        }
    }

    fn node() -> Node {
        Node {
            id: "6a1f3c2e-1b7d-4c1e-9a3f-0c5d2e8b7a10.sidecar.curl.demo".into(),
            ..Default::default()
        }
    }

    fn sotw_request(r: Request) -> DiscoveryRequest {
        match r {
            Request::Sotw(r) => r,
            Request::Delta(_) => panic!("delta request on a SotW stream"),
        }
    }

    fn names(state: &AdsState) -> Vec<String> {
        state
            .resources()
            .resources(type_url::CLUSTER)
            .map(|r| r.name.to_string())
            .collect()
    }

    /// (response version, resources, expected ACKed version in the request, NACK error part,
    /// names held afterwards).
    type Step<'a> = (&'a str, Vec<Any>, &'a str, Option<&'a str>, Vec<&'a str>);

    #[test_case(vec![("v1", vec![cluster("a")], "v1", None, vec!["a"])] ; "first response is acked")]
    #[test_case(vec![
        ("v1", vec![cluster("a")], "v1", None, vec!["a"]),
        ("v2", vec![cluster("a"), cluster("b")], "v2", None, vec!["a", "b"]),
        ("v3", vec![], "v3", None, vec![]),
    ] ; "sotw replaces the whole type")]
    #[test_case(vec![
        ("v1", vec![cluster("a")], "v1", None, vec!["a"]),
        ("v2", vec![cluster("bad-one")], "v1", Some("Cluster \"bad-one\": bad"), vec!["a"]),
        ("v3", vec![cluster("c")], "v3", None, vec!["c"]),
    ] ; "invalid config is nacked with the previous version and kept out")]
    #[test_case(vec![
        ("v1", vec![Any { type_url: type_url::CLUSTER.into(), value: vec![0xff, 0xff] }], "", Some("Cluster resource #0: cannot decode"), vec![]),
    ] ; "undecodable resource is nacked")]
    #[test_case(vec![
        ("v1", vec![Any { type_url: type_url::LISTENER.into(), value: vec![] }], "", Some("type URL \"type.googleapis.com/fsm.dataplane.v1.Listener\" in a Cluster response"), vec![]),
    ] ; "wrong any type is nacked")]
    #[test_case(vec![
        ("v1", vec![cluster("a"), cluster("a")], "", Some("appears twice"), vec![]),
    ] ; "duplicate names are nacked")]
    #[test_case(vec![
        ("v1", vec![cluster("")], "", Some("empty name"), vec![]),
    ] ; "empty name is nacked")]
    fn sotw_table(steps: Vec<Step<'_>>) {
        let mut state = AdsState::new(AdsMode::Sotw, node());
        let mut sink = Sink::default();
        let first = state.on_connect();
        assert_eq!(first.len(), ALL_TYPE_URLS.len());
        for (i, (version, resources, acked, nack, held)) in steps.into_iter().enumerate() {
            let nonce = format!("n{i}");
            let (req, outcome) = state.on_sotw(sotw(version, &nonce, resources), &mut sink);
            let req = sotw_request(req);
            assert_eq!(req.version_info, acked, "step {i}");
            assert_eq!(req.response_nonce, nonce, "step {i}");
            assert!(req.node.is_none(), "node only on the first request");
            match nack {
                None => {
                    assert!(req.error_detail.is_none(), "step {i}: {outcome:?}");
                    assert!(matches!(outcome, Outcome::Ack { .. }));
                }
                Some(part) => {
                    let detail = req.error_detail.expect("nack carries error_detail");
                    assert!(
                        detail.message.contains(part),
                        "step {i}: {}",
                        detail.message
                    );
                    assert_eq!(detail.code, INVALID_ARGUMENT);
                    let last = state
                        .resources()
                        .get(type_url::CLUSTER)
                        .and_then(|t| t.last_nack.clone());
                    assert_eq!(last.map(|n| n.version), Some(version.to_string()));
                }
            }
            assert_eq!(names(&state), held, "step {i}");
        }
    }

    #[test]
    fn sotw_reconnect_resends_held_versions_and_node_once() {
        let mut state = AdsState::new(AdsMode::Sotw, node());
        let mut sink = Sink::default();
        let first = state.on_connect();
        let first: Vec<DiscoveryRequest> = first.into_iter().map(sotw_request).collect();
        assert!(first[0].node.is_some());
        assert!(first[1..].iter().all(|r| r.node.is_none()));
        assert!(first.iter().all(|r| r.version_info.is_empty()));
        state.on_sotw(sotw("v7", "n1", vec![cluster("a")]), &mut sink);
        let again: Vec<DiscoveryRequest> =
            state.on_connect().into_iter().map(sotw_request).collect();
        assert_eq!(again[0].type_url, type_url::CLUSTER);
        assert_eq!(again[0].version_info, "v7");
        assert!(again[0].node.is_some(), "a new stream names the node again");
        assert!(again[0].response_nonce.is_empty());
        assert_eq!(names(&state), vec!["a"], "config is kept across streams");
    }

    #[test]
    fn readiness_needs_clusters_and_listeners() {
        let mut state = AdsState::new(AdsMode::Sotw, node());
        let mut sink = Sink::default();
        state.on_connect();
        assert!(!state.is_ready());
        state.on_sotw(sotw("v1", "n1", vec![]), &mut sink);
        assert!(!state.is_ready());
        let mut lds = sotw("v1", "n2", vec![]);
        lds.type_url = type_url::LISTENER.into();
        state.on_sotw(lds, &mut sink);
        assert!(state.is_ready());
    }

    #[test]
    fn unknown_type_is_nacked() {
        let mut state = AdsState::new(AdsMode::Sotw, node());
        let mut sink = Sink::default();
        let mut response = sotw("v1", "n1", vec![]);
        response.type_url = "type.googleapis.com/envoy.config.cluster.v3.Cluster".into();
        let (req, _) = state.on_sotw(response, &mut sink);
        let req = sotw_request(req);
        assert!(
            req.error_detail
                .expect("nack")
                .message
                .contains("unknown type URL")
        );
        assert_eq!(sink.nacks, 1);
    }

    fn delta(
        version: &str,
        nonce: &str,
        upserts: &[(&str, &str)],
        removed: &[&str],
    ) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse {
            system_version_info: version.into(),
            type_url: type_url::CLUSTER.into(),
            nonce: nonce.into(),
            resources: upserts
                .iter()
                .map(|(name, v)| Resource {
                    name: (*name).into(),
                    version: (*v).into(),
                    resource: Some(cluster(name)),
                    ..Default::default()
                })
                .collect(),
            removed_resources: removed.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn delta_merges_upserts_and_removals_and_resumes_with_versions() {
        let mut state = AdsState::new(AdsMode::Delta, node());
        let mut sink = Sink::default();
        let first = state.on_connect();
        let Request::Delta(first) = &first[0] else {
            panic!("delta")
        };
        assert_eq!(first.resource_names_subscribe, vec!["*"]);
        assert!(first.initial_resource_versions.is_empty());

        let (req, outcome) =
            state.on_delta(delta("s1", "n1", &[("a", "1"), ("b", "1")], &[]), &mut sink);
        assert!(matches!(outcome, Outcome::Ack { .. }));
        let Request::Delta(req) = req else {
            panic!("delta")
        };
        assert_eq!(req.response_nonce, "n1");
        assert!(req.error_detail.is_none());
        assert_eq!(names(&state), vec!["a", "b"]);

        state.on_delta(delta("s2", "n2", &[("b", "2")], &["a"]), &mut sink);
        assert_eq!(names(&state), vec!["b"]);

        let (req, outcome) = state.on_delta(delta("s3", "n3", &[("bad", "3")], &["b"]), &mut sink);
        assert!(matches!(outcome, Outcome::Nack { .. }));
        let Request::Delta(req) = req else {
            panic!("delta")
        };
        assert!(req.error_detail.expect("nack").message.contains("\"bad\""));
        assert_eq!(names(&state), vec!["b"], "a rejected delta changes nothing");
        assert_eq!(
            state
                .resources()
                .get(type_url::CLUSTER)
                .map(|t| t.version.as_str()),
            Some("s2")
        );

        let again = state.on_connect();
        let Request::Delta(again) = &again[0] else {
            panic!("delta")
        };
        assert_eq!(
            again.initial_resource_versions,
            [("b".to_string(), "2".to_string())].into_iter().collect()
        );
    }
}
