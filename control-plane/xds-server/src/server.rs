//! The ADS gRPC service: one task per stream drives a [`protocol`](crate::protocol) state machine
//! from the proxy's requests and its snapshot in the cache.
//!
//! Both flavours (state of the world and delta) run the same loop; [`Wire`] is the only part that
//! knows their message types.

use std::collections::{HashSet, VecDeque};
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use envoy_types::pb::google::rpc;
use fsm_cache::{
    Observed, ProxyKey, Published, Snapshot, SnapshotCache, SyncEvent, TypeSnapshot, TypeUrl,
};
use fsm_errcode::{ErrCode, HasErrCode};
use parking_lot::Mutex;
use tokio::sync::{mpsc, watch};
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::{Request, Status};
use tracing::Instrument;

use crate::convergence::Convergence;
use crate::frame::Frames;
use crate::grpc::{self, Outgoing, Requests, ResponseBody};
use crate::metrics::{ProxySeries, metrics};
use crate::node::{DataPlane, NodeError, ProxyNode, XdsCertIdentity, stream_data_plane};
use crate::peer;
use crate::protocol::{
    DeltaRequest, DeltaStream, ENVOY_TYPES, Event, Output, RESOURCE_NAMES_FIELD, ResourceNames,
    Response, SotwRequest, SotwStream, XdsStream, short_name,
};

/// Generous on purpose: a large mesh's CDS or EDS response can be tens of MiB, and a refused
/// message would leave the proxy without configuration. Applies to requests and responses.
const MAX_MESSAGE_SIZE: usize = 64 << 20;

/// Responses queued per stream before the stream's task waits for the proxy to read; keeps a slow
/// proxy from holding many snapshots' worth of responses in memory. A queued response holds only
/// its small head and references to shared resource bytes.
const RESPONSE_QUEUE: usize = 8;

/// Proxy UUIDs remembered for `fsm_proxy_reconnect_count`: the most recent this many, so pods
/// replaced by the thousand do not grow the set (a few dozen bytes each).
const SEEN_CAPACITY: usize = 65_536;

/// Identifies one stream for the lifetime of the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamId(pub u64);

/// What the controller learns about streams coming and going, so it can compute a snapshot for a
/// new proxy (in the data planes its streams speak) and forget a gone one. Every stream is
/// announced on its own: a proxy may hold several (a reconnect racing the old stream's teardown,
/// or a debugging client), and none of them changes what another is served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProxyEvent {
    Connected {
        stream: StreamId,
        node: ProxyNode,
        data_plane: DataPlane,
    },
    Disconnected {
        stream: StreamId,
        proxy: ProxyKey,
    },
}

/// The Aggregated Discovery Service over the snapshot cache.
#[derive(Clone)]
pub struct AdsServer {
    inner: Arc<Inner>,
    extra_types: &'static [TypeUrl],
    require_client_certificates: bool,
}

struct Inner {
    cache: Arc<SnapshotCache>,
    events: mpsc::UnboundedSender<ProxyEvent>,
    /// Proxy UUIDs that have connected before, for `fsm_proxy_reconnect_count`.
    seen: Mutex<Seen>,
    next_stream: AtomicU64,
    /// The per-proxy metric series and the streams using them.
    series: ProxySeries,
    /// MeshConfig `spec.sidecar.maxDataPlaneConnections`.
    limit: ConnectionLimit,
    /// Streams admitted and not ended, counted against `limit`.
    open: AtomicUsize,
}

/// The most recent [`SEEN_CAPACITY`] proxy UUIDs seen connecting.
#[derive(Default)]
struct Seen {
    uuids: HashSet<Arc<str>>,
    order: VecDeque<Arc<str>>,
}

impl Seen {
    /// Remembers `uuid`; false when it was already known (a reconnect).
    fn insert(&mut self, uuid: &Arc<str>) -> bool {
        if self.uuids.contains(uuid) {
            return false;
        }
        self.uuids.insert(uuid.clone());
        self.order.push_back(uuid.clone());
        if self.order.len() > SEEN_CAPACITY
            && let Some(oldest) = self.order.pop_front()
        {
            self.uuids.remove(&oldest);
        }
        true
    }
}

/// The most ADS streams the server keeps open at once, 0 for no limit: MeshConfig
/// `spec.sidecar.maxDataPlaneConnections`, which the controller sets here as MeshConfig changes.
/// A stream beyond it is refused with `RESOURCE_EXHAUSTED` (and counted in
/// `fsm_proxy_max_connections_rejected`); streams already open are kept when it is lowered.
#[derive(Clone, Debug, Default)]
pub struct ConnectionLimit(Arc<AtomicUsize>);

impl ConnectionLimit {
    pub fn set(&self, max: usize) {
        let before = self.0.swap(max, Ordering::Relaxed);
        if before != max {
            tracing::info!(
                max,
                "ADS connection limit (maxDataPlaneConnections; 0: none)"
            );
        }
    }

    pub fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

/// An admitted stream's place under the connection limit, given back when the stream ends.
struct Slot(Arc<Inner>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

// === AdsServer ===

impl AdsServer {
    pub fn new(cache: Arc<SnapshotCache>, events: mpsc::UnboundedSender<ProxyEvent>) -> Self {
        let inner = Inner {
            cache,
            events,
            seen: Mutex::new(Seen::default()),
            next_stream: AtomicU64::new(1),
            series: ProxySeries::default(),
            limit: ConnectionLimit::default(),
            open: AtomicUsize::new(0),
        };
        AdsServer {
            inner: Arc::new(inner),
            extra_types: &[],
            require_client_certificates: false,
        }
    }

    /// The native data plane's type URLs: a stream whose first request asks for one of them is
    /// served fsm-sidecar resources, and only those.
    pub fn with_type_urls(mut self, extra: &'static [TypeUrl]) -> Self {
        self.extra_types = extra;
        self
    }

    /// Authenticates every stream by its client certificate, as FSM does: the certificate's CN
    /// (`<proxy-UUID>.<kind>.<sa>.<ns>`) must parse (E5001, `Unauthenticated`, also when there is
    /// no certificate) and the node id of the first request must name the same proxy (E5010 when
    /// it names another service account, E5004 another proxy UUID or kind; `PermissionDenied`), so a proxy can neither fetch another proxy's configuration and keys
    /// nor announce itself under another identity. A refused stream gets nothing from the cache
    /// and the controller never hears of it.
    ///
    /// Needs a TLS listener whose IO is `tokio_rustls::server::TlsStream<TcpStream>` (as
    /// [`AdsTls::incoming`](crate::tls::AdsTls::incoming)), which tonic reports through
    /// `Request::peer_certs`; over plaintext every stream is refused.
    pub fn require_client_certificates(mut self) -> Self {
        self.require_client_certificates = true;
        self
    }

    /// Limits the streams open at once to what `limit` says when each one opens.
    pub fn with_connection_limit(mut self, limit: ConnectionLimit) -> Self {
        let inner = Arc::get_mut(&mut self.inner).expect("configured before it serves");
        inner.limit = limit;
        self
    }

    /// Streams open now (admitted under the connection limit).
    pub fn open_streams(&self) -> usize {
        self.inner.open.load(Ordering::Acquire)
    }

    /// Proxies whose per-proxy metric series exist (those with a stream open).
    pub fn proxies_with_series(&self) -> usize {
        self.inner.series.len()
    }

    /// The service, ready for [`crate::listen::serve`] (or `tonic::transport::Server::add_service`).
    pub fn into_service(self) -> AdsService {
        AdsService(self)
    }

    /// The peer's identity when client certificates are required (`None` otherwise); refuses
    /// the stream before reading any request when it has none.
    fn authenticate(&self, request: &Request<()>) -> Result<Option<XdsCertIdentity>, Status> {
        if !self.require_client_certificates {
            return Ok(None);
        }
        match peer::identity_from_chain(request.peer_certs().as_deref().map(Vec::as_slice)) {
            Ok(identity) => Ok(Some(identity)),
            Err(error) => {
                let code = error.err_code();
                let remote = request.remote_addr();
                fsm_errcode::warn!(code, ?remote, %error, "refusing ADS stream");
                Err(Status::unauthenticated(format!("{code}: {error}")))
            }
        }
    }

    /// Starts serving one ADS call: authenticates it, admits it under the connection limit,
    /// then spawns its stream's task.
    fn call<W: Wire>(&self, request: http::Request<Body>) -> Result<ResponseBody, Status> {
        let call = grpc::accept::<W::Req>(request, MAX_MESSAGE_SIZE)?;
        let peer = self.authenticate(&call.request)?;
        let slot = self.admit(&call.request)?;
        Ok(self.spawn::<W>(peer, call.incoming, slot))
    }

    /// A place for one more stream, or `RESOURCE_EXHAUSTED` when the limit's streams are open.
    fn admit(&self, request: &Request<()>) -> Result<Slot, Status> {
        let inner = &self.inner;
        let mut open = inner.open.load(Ordering::Acquire);
        loop {
            let max = inner.limit.get();
            if max != 0 && open >= max {
                metrics().proxy_max_connections_rejected.inc();
                let remote = request.remote_addr();
                // The proxy is not set up: FSM's E5004 (FSM's table names no code for the limit).
                let code = ErrCode::E5004;
                fsm_errcode::warn!(
                    code,
                    ?remote,
                    max,
                    "refusing ADS stream: too many proxy connections"
                );
                return Err(Status::resource_exhausted(format!(
                    "{code}: too many proxy connections: this control plane serves at most {max} at once (MeshConfig spec.sidecar.maxDataPlaneConnections)"
                )));
            }
            match inner.open.compare_exchange_weak(
                open,
                open + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(Slot(inner.clone())),
                Err(now) => open = now,
            }
        }
    }

    fn spawn<W: Wire>(
        &self,
        peer: Option<XdsCertIdentity>,
        incoming: Requests<W::Req>,
        slot: Slot,
    ) -> ResponseBody {
        let (tx, rx) = mpsc::channel(RESPONSE_QUEUE);
        let machine = W::machine(self.extra_types);
        tokio::spawn(serve_stream::<W>(
            self.inner.clone(),
            machine,
            self.extra_types,
            peer,
            incoming,
            tx,
            slot,
        ));
        ResponseBody::new(rx)
    }
}

// === AdsService ===

/// The ADS gRPC service for tonic's router. It answers the two ADS methods itself: requests are
/// decoded by tonic, responses are written from shared bytes (see [`crate::grpc`]).
#[derive(Clone)]
pub struct AdsService(AdsServer);

impl NamedService for AdsService {
    const NAME: &'static str = grpc::ADS;
}

impl tonic::codegen::Service<http::Request<Body>> for AdsService {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let method = request
            .uri()
            .path()
            .strip_prefix('/')
            .and_then(|p| p.strip_prefix(grpc::ADS))
            .and_then(|p| p.strip_prefix('/'));
        let result = match method {
            Some("StreamAggregatedResources") => self.0.call::<Sotw>(request),
            Some("DeltaAggregatedResources") => self.0.call::<Delta>(request),
            _ => Err(Status::unimplemented("")),
        };
        std::future::ready(Ok(grpc::respond(result)))
    }
}

// === Wire ===

/// One ADS flavour's messages and state machine.
trait Wire: 'static {
    const NAME: &'static str;
    type Req: grpc::Decode + Send + 'static;
    type Machine: XdsStream;

    fn machine(extra_types: &'static [TypeUrl]) -> Self::Machine;
    fn node(request: &Self::Req) -> Option<&Node>;
    fn type_url(request: &Self::Req) -> &str;
    fn convert(request: Self::Req) -> <Self::Machine as XdsStream>::Request;
    /// The response as a gRPC message; `types` is the snapshot of its type it was computed from.
    fn frame(response: &Response, types: Option<&Arc<TypeSnapshot>>) -> Frames;
}

struct Sotw;
struct Delta;

/// `DiscoveryRequest` as the server reads it: the same fields, but resource names as ranges of
/// the received message rather than a string each, since Envoy repeats every subscribed name
/// with each ACK ([`ResourceNames`]).
struct SotwWireRequest {
    fields: SotwWireFields,
    resource_names: ResourceNames,
}

/// The fields of a `DiscoveryRequest` but `resource_names` (field 3, skipped when decoding).
#[derive(Clone, PartialEq, prost::Message)]
struct SotwWireFields {
    #[prost(string, tag = "1")]
    version_info: String,
    #[prost(message, optional, tag = "2")]
    node: Option<Node>,
    #[prost(string, tag = "4")]
    type_url: String,
    #[prost(string, tag = "5")]
    response_nonce: String,
    #[prost(message, optional, tag = "6")]
    error_detail: Option<rpc::Status>,
}

impl grpc::Decode for SotwWireRequest {
    fn decode_message(message: bytes::Bytes) -> Result<Self, Status> {
        let resource_names =
            ResourceNames::of_field(message, RESOURCE_NAMES_FIELD).map_err(|error| {
                Status::internal(format!("failed to decode DiscoveryRequest: {error}"))
            })?;
        let fields = grpc::prost_decode(resource_names.other_fields())?;
        Ok(SotwWireRequest {
            fields,
            resource_names,
        })
    }
}

impl Wire for Sotw {
    const NAME: &'static str = "sotw";
    type Req = SotwWireRequest;
    type Machine = SotwStream;

    fn machine(extra_types: &'static [TypeUrl]) -> SotwStream {
        SotwStream::new().with_type_urls(extra_types)
    }

    fn node(request: &SotwWireRequest) -> Option<&Node> {
        request.fields.node.as_ref()
    }

    fn type_url(request: &SotwWireRequest) -> &str {
        &request.fields.type_url
    }

    fn convert(request: SotwWireRequest) -> SotwRequest {
        let fields = request.fields;
        SotwRequest {
            type_url: fields.type_url,
            version_info: fields.version_info,
            resource_names: request.resource_names,
            response_nonce: fields.response_nonce,
            error_detail: fields.error_detail.map(nack_message),
        }
    }

    fn frame(response: &Response, types: Option<&Arc<TypeSnapshot>>) -> Frames {
        Frames::sotw(response, types)
    }
}

impl Wire for Delta {
    const NAME: &'static str = "delta";
    type Req = DeltaDiscoveryRequest;
    type Machine = DeltaStream;

    fn machine(extra_types: &'static [TypeUrl]) -> DeltaStream {
        DeltaStream::new().with_type_urls(extra_types)
    }

    fn node(request: &DeltaDiscoveryRequest) -> Option<&Node> {
        request.node.as_ref()
    }

    fn type_url(request: &DeltaDiscoveryRequest) -> &str {
        &request.type_url
    }

    fn convert(request: DeltaDiscoveryRequest) -> DeltaRequest {
        DeltaRequest {
            type_url: request.type_url,
            subscribe: request.resource_names_subscribe,
            unsubscribe: request.resource_names_unsubscribe,
            initial_resource_versions: request.initial_resource_versions.into_iter().collect(),
            response_nonce: request.response_nonce,
            error_detail: request.error_detail.map(nack_message),
        }
    }

    fn frame(response: &Response, types: Option<&Arc<TypeSnapshot>>) -> Frames {
        Frames::delta(response, types)
    }
}

/// A NACK's reason; Envoy always sets a message, but the status alone still means NACK.
fn nack_message(status: rpc::Status) -> String {
    if status.message.is_empty() {
        format!("rejected with status code {}", status.code)
    } else {
        status.message
    }
}

// === The stream ===

async fn serve_stream<W: Wire>(
    inner: Arc<Inner>,
    machine: W::Machine,
    native_types: &'static [TypeUrl],
    peer: Option<XdsCertIdentity>,
    mut incoming: Requests<W::Req>,
    tx: mpsc::Sender<Outgoing>,
    slot: Slot,
) {
    // Boxed: a request is large, and the task keeps room for what it holds across an await.
    let first = match incoming.message().await {
        Ok(Some(request)) => Box::new(request),
        Ok(None) => return,
        Err(status) => {
            tracing::debug!(flavor = W::NAME, %status, "ADS stream failed before its first request");
            return;
        }
    };
    let node = match W::node(&first)
        .ok_or(NodeError::MissingNode)
        .and_then(ProxyNode::from_node)
    {
        Ok(node) => node,
        Err(error) => {
            let code = error.err_code();
            fsm_errcode::warn!(code, flavor = W::NAME, %error, "refusing ADS stream");
            // The proxy may already be gone; there is nobody else to tell.
            let _ = tx
                .send(Outgoing::Error(Status::invalid_argument(format!(
                    "{code}: {error}"
                ))))
                .await;
            return;
        }
    };
    // Before the session opens: a refused stream must not subscribe to the cache (nothing of
    // another proxy's may go out) nor announce a proxy to the controller.
    if let Some(mismatch) = peer.and_then(|cert| cert.check_node(&node).err()) {
        let code = mismatch.err_code();
        fsm_errcode::warn!(code, flavor = W::NAME, error = %mismatch, "refusing ADS stream");
        let _ = tx
            .send(Outgoing::Error(Status::permission_denied(format!(
                "{code}: {mismatch}"
            ))))
            .await;
        return;
    }
    let data_plane = stream_data_plane(W::type_url(&first), native_types, &node.user_agent);
    let types = match data_plane {
        DataPlane::Envoy => &ENVOY_TYPES[..],
        DataPlane::FsmSidecar => native_types,
    };
    let span = tracing::info_span!("ads", proxy = %node.identity, flavor = W::NAME, %data_plane);
    let session = Session::<W>::open(inner, machine, node, data_plane, types, tx, slot);
    session.run(first, incoming).instrument(span).await;
}

/// One proxy's stream, from its parsed first request until it ends; dropping it unregisters the
/// proxy, so cleanup also happens when the task is cancelled.
struct Session<W: Wire> {
    inner: Arc<Inner>,
    stream: StreamId,
    key: ProxyKey,
    /// Metric labels: the proxy UUID and its service identity `<sa>.<ns>`.
    uuid: Arc<str>,
    identity: Arc<str>,
    /// The types of this stream's data plane; requests for others are refused (E5013).
    types: &'static [TypeUrl],
    tx: mpsc::Sender<Outgoing>,
    machine: W::Machine,
    watch: watch::Receiver<Published>,
    snapshot: Option<Arc<Snapshot>>,
    /// This stream's per-type counters, labelled once rather than on every request and
    /// response, and removed when the stream ends: the labels carry the proxy UUID, so series
    /// of proxies long gone would otherwise pile up with every pod ever replaced.
    counters: Vec<TypeCounters>,
    /// Where the controller leaves the times it observed the changes of the proxy's snapshots.
    observed: Option<Observed>,
    convergence: Convergence,
    /// Its place under the connection limit.
    _slot: Slot,
}

struct TypeCounters {
    type_url: TypeUrl,
    requests: prometheus::IntCounter,
    sent: prometheus::IntCounter,
}

/// The proxy is gone; the stream ends.
struct Closed;

impl<W: Wire> Session<W> {
    fn open(
        inner: Arc<Inner>,
        machine: W::Machine,
        node: ProxyNode,
        data_plane: DataPlane,
        types: &'static [TypeUrl],
        tx: mpsc::Sender<Outgoing>,
        slot: Slot,
    ) -> Self {
        let m = metrics();
        m.proxy_connect_count.inc();
        if !inner.seen.lock().insert(&node.identity.uuid) {
            m.proxy_reconnect_count.inc();
        }
        let stream = StreamId(inner.next_stream.fetch_add(1, Ordering::Relaxed));
        let key = node.key();
        // Subscribed before the controller hears of the stream, so its first publish (or
        // refusal) for this proxy cannot be missed.
        let watch = inner.cache.subscribe(&key);
        let observed = inner.cache.observed(&key);
        tracing::info!(
            proxy = %node.identity,
            user_agent = %node.user_agent,
            %data_plane,
            flavor = W::NAME,
            stream = stream.0,
            "proxy connected"
        );
        let (uuid, identity): (Arc<str>, Arc<str>) =
            (key.uuid.clone(), key.service_identity().into());
        inner.series.opened(&uuid, &identity);
        // The controller may have shut down; the stream still serves what the cache holds.
        let _ = inner.events.send(ProxyEvent::Connected {
            stream,
            node,
            data_plane,
        });
        Session {
            inner,
            stream,
            key,
            uuid,
            identity,
            types,
            tx,
            machine,
            watch,
            snapshot: None,
            counters: Vec::new(),
            observed,
            convergence: Convergence::default(),
            _slot: slot,
        }
    }

    /// Takes in what the cache now says for the proxy. Fails when the proxy was refused: the
    /// stream is closed with the reason (its FSM code first) and nothing more is sent.
    async fn refresh(&mut self) -> Result<(), Closed> {
        let (published, stamps) = {
            let current = self.watch.borrow_and_update();
            // Taken with the snapshot they were stamped on (see `SnapshotCache::observed`).
            let stamps = self
                .observed
                .as_ref()
                .map(|o| o.take(self.types))
                .unwrap_or_default();
            (current.clone(), stamps)
        };
        for (type_url, at) in stamps {
            self.convergence.observed(type_url, at);
        }
        match published {
            Published::Pending => {
                self.snapshot = None;
                Ok(())
            }
            Published::Snapshot(snapshot) => {
                // The proxy's snapshot carries the resources of every data plane its streams
                // speak; until the controller has computed this stream's (it just connected), a
                // type missing from it would read as "no resources" and wipe the client's
                // configuration. Adapters always produce every type of their data plane.
                let carries_ours = self.types.iter().any(|t| snapshot.get(t).is_some());
                self.snapshot = carries_ours.then_some(snapshot);
                Ok(())
            }
            Published::Refused(reason) => {
                // The refusal was logged and counted, with its code, where it was decided.
                tracing::info!(proxy = %self.key, %reason, "closing the stream: its identity matches no pod");
                self.snapshot = None;
                let _ = self
                    .tx
                    .send(Outgoing::Error(Status::permission_denied(
                        reason.to_string(),
                    )))
                    .await;
                Err(Closed)
            }
        }
    }

    /// Handling a request or a snapshot is boxed: the task of each of thousands of streams
    /// waits in `select!` most of its life, and is as large as its largest state.
    async fn run(mut self, first: Box<W::Req>, mut incoming: Requests<W::Req>) {
        if self.refresh().await.is_err() || Box::pin(self.on_request(*first)).await.is_err() {
            return;
        }
        loop {
            tokio::select! {
                request = incoming.message() => match request {
                    Ok(Some(request)) => {
                        if Box::pin(self.on_request(request)).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => {
                        tracing::debug!(proxy = %self.uuid, "proxy closed the stream");
                        return;
                    }
                    Err(status) => {
                        fsm_errcode::info!(ErrCode::E5011, proxy = %self.uuid, %status, "ADS stream ended with an error");
                        return;
                    }
                },
                changed = self.watch.changed() => {
                    if changed.is_err() {
                        // Only happens if the cache dropped the proxy's entry under us; ending the
                        // stream makes the proxy reconnect and subscribe afresh.
                        fsm_errcode::warn!(ErrCode::E5008, proxy = %self.uuid, "snapshot cache entry vanished; closing the stream");
                        return;
                    }
                    if self.refresh().await.is_err() {
                        return;
                    }
                    if let Some(snapshot) = self.snapshot.clone() {
                        let output = self.machine.on_snapshot(&snapshot);
                        let unchanged: Vec<TypeUrl> = self
                            .convergence
                            .pending()
                            .filter(|t| !output.responses.iter().any(|r| r.type_url == *t))
                            .collect();
                        for type_url in unchanged {
                            self.convergence.unchanged(type_url);
                        }
                        if Box::pin(self.apply(output)).await.is_err() {
                            return;
                        }
                    }
                }
                () = self.tx.closed() => {
                    tracing::debug!(proxy = %self.uuid, "proxy stopped reading responses");
                    return;
                }
            }
        }
    }

    async fn on_request(&mut self, request: W::Req) -> Result<(), Closed> {
        if !self.types.iter().any(|t| *t == W::type_url(&request)) {
            // Each stream is served one data plane's resources, decided by its first request.
            fsm_errcode::warn!(ErrCode::E5013, proxy = %self.key, type_url = %W::type_url(&request), "ignoring a request for a type outside this stream's data plane");
            return Ok(());
        }
        let output = self
            .machine
            .on_request(W::convert(request), self.snapshot.as_deref());
        match output {
            Ok(output) => {
                // Labelled only once resolved: an unknown type is an arbitrary client string.
                if let Some(type_url) = output.type_url {
                    self.counters(type_url).requests.inc();
                    self.convergence.requested(type_url);
                }
                self.apply(output).await
            }
            Err(error) => {
                fsm_errcode::warn!(error.err_code(), proxy = %self.uuid, %error, "ignoring request");
                Ok(())
            }
        }
    }

    async fn apply(&mut self, output: Output) -> Result<(), Closed> {
        for event in &output.events {
            let type_url = event.type_url();
            let short = short_name(type_url);
            match event {
                Event::Ack { version, .. } => {
                    tracing::debug!(proxy = %self.uuid, r#type = short, %version, "ACK");
                    if let Some(elapsed) = self.convergence.acked(type_url, version, Instant::now())
                    {
                        metrics()
                            .convergence(type_url)
                            .observe(elapsed.as_secs_f64());
                    }
                }
                Event::Nack { version, error, .. } => {
                    // What was generated for the proxy is not usable by it.
                    fsm_errcode::warn!(ErrCode::E5007, proxy = %self.uuid, r#type = short, %version, %error, "NACK; version parked");
                    self.convergence.nacked(type_url, version);
                }
                Event::Stale { nonce, .. } => {
                    tracing::debug!(proxy = %self.uuid, r#type = short, %nonce, "ignoring request for an old nonce");
                }
            }
            if let Some(sync) = event.sync_event() {
                self.inner.cache.record(&self.key, type_url, sync);
            }
        }
        for response in output.responses {
            self.send(response).await?;
        }
        Ok(())
    }

    /// The counters of `type_url` on this stream, labelled on first use.
    fn counters(&mut self, type_url: TypeUrl) -> &TypeCounters {
        let at = match self.counters.iter().position(|c| c.type_url == type_url) {
            Some(at) => at,
            None => {
                let m = metrics();
                self.inner
                    .series
                    .labelled(&self.uuid, &self.identity, type_url);
                let labels = [&*self.uuid, &*self.identity, short_name(type_url)];
                self.counters.push(TypeCounters {
                    type_url,
                    requests: m.proxy_xds_request_count.with_label_values(&labels),
                    sent: m
                        .proxy_response_send_success_count
                        .with_label_values(&labels),
                });
                self.counters.len() - 1
            }
        };
        &self.counters[at]
    }

    /// The one place a response leaves for the proxy.
    async fn send(&mut self, response: Response) -> Result<(), Closed> {
        let sent = self.counters(response.type_url).sent.clone();
        let short = short_name(response.type_url);
        let labels = [&*self.uuid, &*self.identity, short];
        let types = self
            .snapshot
            .as_deref()
            .and_then(|s| s.get_shared(response.type_url));
        let frames = W::frame(&response, types);
        if frames.message_len() > MAX_MESSAGE_SIZE {
            // As tonic did: the stream ends with the error rather than sending a message the
            // proxy would refuse.
            let status = Status::out_of_range(format!(
                "Error, encoded message length too large: found {} bytes, the limit is: {MAX_MESSAGE_SIZE} bytes",
                frames.message_len()
            ));
            fsm_errcode::warn!(ErrCode::E5006, proxy = %self.uuid, r#type = short, %status, "response too large");
            metrics()
                .proxy_response_send_error_count
                .with_label_values(&labels)
                .inc();
            let _ = self.tx.send(Outgoing::Error(status)).await;
            return Err(Closed);
        }
        let m = metrics();
        if self.tx.send(Outgoing::Message(frames)).await.is_err() {
            m.proxy_response_send_error_count
                .with_label_values(&labels)
                .inc();
            fsm_errcode::info!(ErrCode::E5006, proxy = %self.uuid, r#type = short, version = %response.version, "proxy gone before a response could be sent");
            return Err(Closed);
        }
        sent.inc();
        self.convergence.sent(response.type_url, &response.version);
        tracing::debug!(
            proxy = %self.uuid,
            r#type = short,
            version = %response.version,
            nonce = %response.nonce,
            resources = response.resources.len(),
            removed = response.removed.len(),
            "sent"
        );
        let Response {
            type_url,
            version,
            nonce,
            ..
        } = response;
        self.inner
            .cache
            .record(&self.key, type_url, SyncEvent::Sent { version, nonce });
        Ok(())
    }
}

impl<W: Wire> Drop for Session<W> {
    fn drop(&mut self) {
        metrics().proxy_connect_count.dec();
        // The proxy's series go with its last stream.
        self.inner.series.closed(&self.uuid, &self.identity);
        self.inner.cache.unsubscribe(&self.key);
        tracing::info!(proxy = %self.uuid, "proxy disconnected");
        let _ = self.inner.events.send(ProxyEvent::Disconnected {
            stream: self.stream,
            proxy: self.key.clone(),
        });
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
    use grpc::Decode;
    use proptest::prelude::*;
    use prost::Message;

    use super::*;

    fn request() -> impl Strategy<Value = DiscoveryRequest> {
        (
            "[a-z0-9]{0,8}",
            proptest::option::of("[a-z0-9.-]{1,20}"),
            proptest::collection::vec("\\PC{0,12}", 0..40),
            "[a-z./]{0,30}",
            "[0-9]{0,4}",
            proptest::option::of("\\PC{0,20}"),
        )
            .prop_map(
                |(version, node, names, type_url, nonce, nack)| DiscoveryRequest {
                    version_info: version,
                    node: node.map(|id| Node {
                        id,
                        ..Node::default()
                    }),
                    resource_names: names,
                    type_url,
                    response_nonce: nonce,
                    error_detail: nack.map(|message| rpc::Status {
                        code: 3,
                        message,
                        details: Vec::new(),
                    }),
                    ..DiscoveryRequest::default()
                },
            )
    }

    proptest! {
        /// The server's reading of a `DiscoveryRequest` has exactly its fields: the names in
        /// their order (empty and repeated ones too), and everything else as prost decodes it.
        #[test]
        fn a_sotw_request_reads_as_prost_decodes_it(request in request()) {
            let read = SotwWireRequest::decode_message(request.encode_to_vec().into())
                .expect("decodes");
            let names: Vec<String> = read.resource_names.strs().map(String::from).collect();
            prop_assert_eq!(&names, &request.resource_names);
            let listed = ResourceNames::from(request.resource_names.clone());
            prop_assert_eq!(read.resource_names.digest(), listed.digest());
            prop_assert_eq!(read.resource_names.clone(), listed);
            prop_assert_eq!(read.fields.version_info, request.version_info);
            prop_assert_eq!(read.fields.node, request.node);
            prop_assert_eq!(read.fields.type_url, request.type_url);
            prop_assert_eq!(read.fields.response_nonce, request.response_nonce);
            prop_assert_eq!(read.fields.error_detail, request.error_detail);
        }

        /// Any bytes: an error or a reading, never a panic; what prost reads as a
        /// `DiscoveryRequest` is read with the same names. (A name that is not UTF-8, which
        /// prost refuses, is read lossily: see `ResourceNames::strs`.)
        #[test]
        fn any_bytes_are_read_or_refused(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let read = SotwWireRequest::decode_message(bytes.clone().into());
            if let Ok(request) = DiscoveryRequest::decode(&bytes[..]) {
                let read = read.expect("read as prost reads it");
                prop_assert_eq!(read.resource_names, ResourceNames::from(request.resource_names));
            }
        }
    }

    /// Names written apart, other fields between them, are read in their order, and the
    /// other fields as prost reads them.
    #[test]
    fn names_apart_are_read_in_order() {
        let type_url = DiscoveryRequest {
            type_url: crate::protocol::CLUSTER.into(),
            ..DiscoveryRequest::default()
        };
        let bytes = [
            DiscoveryRequest {
                resource_names: vec!["a".into()],
                ..DiscoveryRequest::default()
            }
            .encode_to_vec(),
            type_url.encode_to_vec(),
            DiscoveryRequest {
                resource_names: vec!["b".into(), "c".into()],
                ..DiscoveryRequest::default()
            }
            .encode_to_vec(),
        ]
        .concat();
        let read = SotwWireRequest::decode_message(bytes.into()).expect("decodes");
        assert_eq!(read.fields.type_url, type_url.type_url);
        let listed = ResourceNames::from(vec!["a", "b", "c"]);
        assert_eq!(read.resource_names, listed);
        assert_eq!(read.resource_names.digest(), listed.digest());
    }

    /// The digest tells names apart by where each ends, not only by their bytes.
    #[test]
    fn names_split_elsewhere_have_another_digest() {
        let (joined, split) = (
            ResourceNames::from(vec!["ab", "c"]),
            ResourceNames::from(vec!["a", "bc"]),
        );
        assert_ne!(joined.digest(), split.digest());
        assert_ne!(joined, split);
        assert_eq!(
            ResourceNames::from(Vec::<&str>::new()).digest(),
            ResourceNames::default().digest()
        );
    }

    #[test]
    fn names_of_the_wrong_wire_type_are_refused() {
        // Field 3 as a varint, then a truncated name.
        for bytes in [&[0x18, 0x01][..], &[0x1a, 0x05, b'a']] {
            let error = SotwWireRequest::decode_message(bytes.to_vec().into())
                .err()
                .expect("refused");
            assert_eq!(error.code(), tonic::Code::Internal, "{error:?}");
        }
    }
}
