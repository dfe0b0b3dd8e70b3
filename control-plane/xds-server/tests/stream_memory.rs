//! What one stream costs in memory, measured with a counting allocator: the bytes allocated to
//! send a 1,000-cluster state-of-the-world CDS response, and the per-stream protocol state kept
//! for 1,000-resource types. One test function, so no other test allocates meanwhile.

use std::alloc::System;
use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
use envoy_types::pb::google::protobuf::Any;
use fsm_cache::{Flavor, Resource, Snapshot};
use fsm_xds_server::frame::{Frames, Section};
use fsm_xds_server::protocol::{CLUSTER, ENDPOINT};
use fsm_xds_server::{DeltaRequest, DeltaStream, Response, SotwRequest, SotwStream, XdsStream};
use prost::Message;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const N: usize = 1000;

/// Bytes still allocated at the end of `f` that were allocated during it (what `f` keeps).
fn live_after<T>(f: impl FnOnce() -> T) -> (T, isize) {
    let region = Region::new(GLOBAL);
    let value = f();
    let stats = region.change();
    // Growth by `realloc` is counted in `bytes_allocated`, shrinking in `bytes_deallocated`.
    let live = stats.bytes_allocated as isize - stats.bytes_deallocated as isize;
    (value, live)
}

/// Total bytes allocated during `f`, freed or not.
fn allocated_by<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let region = Region::new(GLOBAL);
    let value = f();
    let stats = region.change();
    (value, stats.bytes_allocated)
}

fn snapshot() -> Snapshot {
    // Roughly a real cluster: ~200 bytes of body under an FSM cluster name.
    let resources = |kind: u8| {
        (0..N)
            .map(|i| Resource::new(format!("bookstore/svc-{i:04}|14001"), vec![kind; 200]))
            .collect()
    };
    Snapshot::new([(CLUSTER, resources(1)), (ENDPOINT, resources(2))])
}

fn names() -> Vec<String> {
    (0..N)
        .map(|i| format!("bookstore/svc-{i:04}|14001"))
        .collect()
}

/// The server's send path before responses were framed from shared bytes: a prost message with
/// a copy of every body, encoded by tonic into the stream's buffer (8 KiB, grown to fit; tonic
/// keeps it for the stream's lifetime).
fn tonic_path(response: &Response) -> BytesMut {
    let message = DiscoveryResponse {
        version_info: response.version.to_string(),
        resources: response
            .resources
            .iter()
            .map(|r| Any {
                type_url: response.type_url.to_owned(),
                value: r.body.to_vec(),
            })
            .collect(),
        type_url: response.type_url.to_owned(),
        nonce: response.nonce.to_string(),
        ..DiscoveryResponse::default()
    };
    let mut buffer = BytesMut::with_capacity(8 << 10);
    buffer.reserve(5 + message.encoded_len());
    buffer.put_u8(0);
    buffer.put_u32(message.encoded_len() as u32);
    message.encode(&mut buffer).expect("reserved");
    buffer
}

fn sotw_request(type_url: &str, names: Vec<String>, nonce: &str, version: &str) -> SotwRequest {
    SotwRequest {
        type_url: type_url.into(),
        version_info: version.into(),
        resource_names: names.into(),
        response_nonce: nonce.into(),
        error_detail: None,
    }
}

fn delta_request(type_url: &str, subscribe: Vec<String>, nonce: &str) -> DeltaRequest {
    DeltaRequest {
        type_url: type_url.into(),
        subscribe,
        response_nonce: nonce.into(),
        ..DeltaRequest::default()
    }
}

/// A SotW stream after CDS (wildcard) and EDS (all names) were sent and ACKed.
fn sotw_stream(snapshot: &Snapshot) -> SotwStream {
    let mut stream = SotwStream::new();
    for (type_url, names) in [(CLUSTER, Vec::new()), (ENDPOINT, names())] {
        let out = stream
            .on_request(
                sotw_request(type_url, names.clone(), "", ""),
                Some(snapshot),
            )
            .expect("known type");
        let sent = &out.responses[0];
        let ack = sotw_request(type_url, names, &sent.nonce, &sent.version);
        stream.on_request(ack, Some(snapshot)).expect("known type");
    }
    stream
}

/// A delta stream after CDS (wildcard) and EDS (all names) were sent and ACKed.
fn delta_stream(snapshot: &Snapshot) -> DeltaStream {
    let mut stream = DeltaStream::new();
    for (type_url, names) in [(CLUSTER, Vec::new()), (ENDPOINT, names())] {
        let out = stream
            .on_request(delta_request(type_url, names, ""), Some(snapshot))
            .expect("known type");
        assert_eq!(out.responses[0].resources.len(), N);
        let nonce = out.responses[0].nonce.to_string();
        stream
            .on_request(delta_request(type_url, Vec::new(), &nonce), Some(snapshot))
            .expect("known type");
    }
    stream
}

#[test]
fn per_stream_memory() {
    let snapshot = snapshot();
    let types = snapshot.get_shared(CLUSTER).expect("CDS");
    // Held by many proxies' snapshots, as the controller shares the mesh's sets.
    let _proxies = [snapshot.clone(), snapshot.clone()];
    let response = |nonce: &str| Response {
        type_url: CLUSTER,
        version: types.version().clone(),
        nonce: Arc::from(nonce),
        resources: types.resources().cloned().collect(),
        removed: Vec::new(),
    };
    let (first, second) = (response("1"), response("2"));

    let (buffer, before) = allocated_by(|| tonic_path(&first));
    let retained_before = buffer.capacity();
    // The first stream to send the type builds its section; every other stream shares it.
    let (_, section) = allocated_by(|| types.section(Flavor::Sotw, CLUSTER));
    let (frames, after) = allocated_by(|| Frames::sotw(&second, Some(types)));
    let (shared, head) = match &frames.section {
        Section::Shared(_) => (frames.section.len(), frames.head.len()),
        Section::Parts(_) => panic!("a whole type goes out as its shared section"),
    };
    println!(
        "SotW CDS, {N} clusters, {shared} bytes of resources: per stream and send, tonic path \
         allocated {before} bytes and kept a {retained_before}-byte encode buffer; framed from \
         shared bytes: {after} bytes allocated ({head}-byte head), nothing kept after the send; \
         the shared section cost {section} bytes once"
    );
    assert!(before > shared, "the old path copies every body");
    assert!(
        after < 1024,
        "a send allocates only its head, not the resources: {after} bytes"
    );

    // The first streams intern the names for the whole process; what another stream costs is
    // what the next ones keep.
    let first = (sotw_stream(&snapshot), delta_stream(&snapshot));
    let (sotw, sotw_live) = live_after(|| sotw_stream(&snapshot));
    let (delta, delta_live) = live_after(|| delta_stream(&snapshot));
    println!(
        "per-stream protocol state after CDS (wildcard) and EDS ({N} names) sent and ACKed: \
         SotW {sotw_live} bytes, delta {delta_live} bytes"
    );
    // Interned ids: 4 bytes per name subscribed by name (1,000 EDS names), plus a little per
    // type; delta keeps what the client holds as a reference to the shared type snapshot.
    // Names and versions as strings took 52 KB (SotW) and 204 KB (delta).
    assert!(sotw_live < 8 << 10, "SotW state {sotw_live} bytes");
    assert!(delta_live < 10 << 10, "delta state {delta_live} bytes");
    drop((first, sotw, delta));
}
