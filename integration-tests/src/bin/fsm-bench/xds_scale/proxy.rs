//! One simulated Envoy: its own TCP + mTLS connection with its pod's bootstrap credentials, one
//! ADS stream (SotW or delta), CDS and LDS wildcard, then EDS, RDS and SDS for the names the
//! clusters and listeners reference, every response ACKed. Each proxy is one tokio task; what it
//! keeps per type is a version, a nonce and shared (memoized) name sets, so ten thousand of them
//! stay cheap beside the controller on the same cores.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use envoy_types::pb::envoy::config::core::v3::Node;
use fsm_integration_tests::controller::ADS_SERVER_NAME;
use parking_lot::Mutex;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::grpc_stream;
use super::xds::{
    LiteDeltaRequest, LiteDeltaResponse, LiteRequest, LiteResponse, Memo, ResponseInfo, XdsType,
    is_subset,
};

const SOTW_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
const DELTA_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";
/// Envoy's first reconnect back-off.
const RECONNECT: Duration = Duration::from_secs(1);
/// Error messages kept for the report (the count is exact; the text is a sample).
const ERROR_SAMPLES: usize = 10;

/// State of the world or incremental (delta) xDS.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Sotw,
    Delta,
}

/// Who a simulated proxy is: its pod and where the controller wrote its credentials.
#[derive(Clone, Debug)]
pub struct ProxySpec {
    pub uuid: String,
    pub namespace: String,
    pub service_account: String,
    pub credentials: PathBuf,
}

impl ProxySpec {
    /// The node Envoy announces with FSM's bootstrap: `<uuid>.sidecar.<sa>.<ns>`.
    fn node(&self) -> Node {
        Node {
            id: format!(
                "{}.sidecar.{}.{}",
                self.uuid, self.service_account, self.namespace
            ),
            cluster: format!("{}.{}", self.service_account, self.namespace),
            user_agent_name: "envoy".into(),
            ..Default::default()
        }
    }
}

/// What one proxy has seen, in microseconds since [`Fleet::now_us`]'s origin (0 = not yet).
#[derive(Debug, Default)]
pub struct ProxyStats {
    /// Responses received, per [`XdsType::index`].
    pub responses: [AtomicU32; 5],
    /// When the proxy started connecting (its first attempt).
    pub started: AtomicU64,
    /// When it first held a full configuration: every type ACKed, every referenced name present.
    pub warm: AtomicU64,
    /// When it ACKed the first ClusterLoadAssignment carrying the watched marker.
    pub marker_acked: AtomicU64,
}

/// Everything the simulated proxies share.
pub struct Fleet {
    pub memo: Memo,
    pub protocol: Protocol,
    pub ads: SocketAddr,
    origin: Instant,
    /// Limits concurrent TCP + TLS handshakes, so connecting thousands comes in waves instead of
    /// a burst of handshakes that time out.
    connecting: Semaphore,
    pub errors: AtomicU64,
    /// Streams the server refused (permission denied, unauthenticated).
    pub refused: AtomicU64,
    pub error_samples: Mutex<Vec<String>>,
    /// The last response received by any proxy.
    pub last_response: AtomicU64,
}

impl Fleet {
    pub fn new(protocol: Protocol, ads: SocketAddr, connect_concurrency: usize) -> Fleet {
        Fleet {
            memo: Memo::default(),
            protocol,
            ads,
            origin: Instant::now(),
            connecting: Semaphore::new(connect_concurrency.max(1)),
            errors: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            error_samples: Mutex::new(Vec::new()),
            last_response: AtomicU64::new(0),
        }
    }

    /// Microseconds since the fleet was created, never 0 (0 means "not yet" in the stats).
    pub fn now_us(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_micros()).unwrap_or(u64::MAX) + 1
    }

    fn record_error(&self, proxy: &ProxySpec, error: &anyhow::Error) {
        let refused = error.chain().any(|cause| {
            cause.downcast_ref::<tonic::Status>().is_some_and(|s| {
                matches!(
                    s.code(),
                    tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
                )
            })
        });
        if refused {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut samples = self.error_samples.lock();
        if samples.len() < ERROR_SAMPLES {
            samples.push(format!("{} ({}): {error:#}", proxy.uuid, proxy.namespace));
        }
    }
}

/// A running simulated proxy; aborting the task closes its connection (the pod went away).
pub struct Proxy {
    pub stats: Arc<ProxyStats>,
    pub task: JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts a proxy: it connects (through the fleet's handshake gate), streams, and reconnects
/// after [`RECONNECT`] when the stream fails, as Envoy does, counting each failure.
pub fn spawn(fleet: &Arc<Fleet>, spec: ProxySpec) -> Proxy {
    let stats = Arc::new(ProxyStats::default());
    let task = tokio::spawn({
        let fleet = fleet.clone();
        let stats = stats.clone();
        async move {
            stats.started.store(fleet.now_us(), Ordering::Relaxed);
            loop {
                let result = match fleet.protocol {
                    Protocol::Sotw => run_sotw(&fleet, &spec, &stats).await,
                    Protocol::Delta => run_delta(&fleet, &spec, &stats).await,
                };
                let error = match result {
                    Ok(()) => anyhow::anyhow!("the server closed the stream"),
                    Err(e) => e,
                };
                fleet.record_error(&spec, &error);
                tokio::time::sleep(RECONNECT).await;
            }
        }
    });
    Proxy { stats, task }
}

/// One TCP + TLS connection with the pod's bootstrap credentials (a tonic channel is one HTTP/2
/// connection; nothing is shared between proxies).
async fn connect(ads: SocketAddr, credentials: &Path) -> Result<Channel> {
    let read = |name: &str| {
        std::fs::read(credentials.join(name))
            .with_context(|| format!("reading {}", credentials.join(name).display()))
    };
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.crt")?))
        .identity(Identity::from_pem(read("tls.crt")?, read("tls.key")?))
        .domain_name(ADS_SERVER_NAME);
    let channel = Endpoint::from_shared(format!("https://{ads}"))?
        .tls_config(tls)?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(30))
        .connect()
        .await
        .with_context(|| format!("connecting to the ADS server at {ads}"))?;
    Ok(channel)
}

/// Names as strings, for a request.
fn names(memo: &Memo, ids: &[u32]) -> Vec<String> {
    ids.iter().map(|id| memo.name(*id).to_string()).collect()
}

/// The sorted union of two id lists (a proxy's thousand held names and a response's few).
fn merged(a: &[u32], b: &[u32]) -> Vec<u32> {
    let mut b = b.to_vec();
    b.sort_unstable();
    if !a.is_sorted() {
        let mut all: Vec<u32> = a.iter().chain(&b).copied().collect();
        all.sort_unstable();
        all.dedup();
        return all;
    }
    let mut all = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        let next = match (a.get(i), b.get(j)) {
            (Some(x), Some(y)) if x <= y => {
                i += 1;
                *x
            }
            (Some(x), None) => {
                i += 1;
                *x
            }
            (_, Some(y)) => {
                j += 1;
                *y
            }
            (None, None) => break,
        };
        if all.last() != Some(&next) {
            all.push(next);
        }
    }
    all
}

/// Adds the sorted `new` ids to the sorted, repeat-free `held`, keeping it so.
fn insert_sorted(held: &mut Vec<u32>, new: &[u32]) {
    for id in new {
        if let Err(at) = held.binary_search(id) {
            held.insert(at, *id);
        }
    }
}

// === state of the world ===

#[derive(Default)]
struct SotwType {
    version: String,
    nonce: String,
    /// What the last response held.
    info: Option<Arc<ResponseInfo>>,
    /// The names held. As Envoy: a response of CDS or LDS replaces the set; one of EDS, RDS or
    /// SDS updates just the resources it carries (of those still subscribed).
    held: Vec<u32>,
    /// The subscription changed since `held` was last pruned to it.
    unsubscribed_held: bool,
    acked: bool,
    /// Subscribed names (EDS, RDS, SDS); `None` until first requested.
    subscribed: Option<Vec<u32>>,
    /// The subscribed names as every request of the type repeats them, encoded.
    request_names: bytes::Bytes,
}

async fn run_sotw(fleet: &Fleet, spec: &ProxySpec, stats: &ProxyStats) -> Result<()> {
    let permit = fleet.connecting.acquire().await?;
    let mut channel = connect(fleet.ads, &spec.credentials).await?;
    let (tx, rx) = mpsc::channel::<LiteRequest>(8);
    // Envoy: node on the first request only; CDS and LDS as wildcards (no names).
    for (i, kind) in [XdsType::Cds, XdsType::Lds].into_iter().enumerate() {
        tx.send(LiteRequest {
            node: (i == 0).then(|| spec.node()),
            type_url: kind.url().into(),
            ..Default::default()
        })
        .await?;
    }
    let mut responses = grpc_stream::open::<_, LiteResponse>(&mut channel, SOTW_PATH, rx)
        .await
        .context("opening the SotW ADS stream")?;
    drop(permit);
    let mut types: [SotwType; 5] = Default::default();
    while let Some(response) = responses.message().await.context("SotW ADS stream")? {
        let Some(kind) = XdsType::from_url(&response.type_url) else {
            bail!("response of unexpected type {}", response.type_url);
        };
        let now = fleet.now_us();
        stats.responses[kind.index()].fetch_add(1, Ordering::Relaxed);
        fleet.last_response.fetch_max(now, Ordering::Relaxed);
        let info = fleet.memo.response(kind, &response.resources)?;
        let state = &mut types[kind.index()];
        state.version = response.version_info;
        state.nonce = response.nonce;
        match (kind, &state.subscribed) {
            (XdsType::Cds | XdsType::Lds, _) | (_, None) => state.held = info.names.clone(),
            (_, Some(subscribed)) => {
                // An update of one resource costs the proxy that resource, not a pass over the
                // thousand it holds: names unsubscribed since are dropped once.
                if std::mem::take(&mut state.unsubscribed_held) {
                    state.held.retain(|id| subscribed.binary_search(id).is_ok());
                }
                insert_sorted(&mut state.held, &info.names);
            }
        }
        state.info = Some(info.clone());
        // As Envoy: new clusters and listeners subscribe to what they reference first, then the
        // update is ACKed.
        if matches!(kind, XdsType::Cds | XdsType::Lds) {
            let empty = Vec::new();
            let of = |t: XdsType| -> &[u32] {
                types[t.index()]
                    .info
                    .as_deref()
                    .map_or(&empty[..], |i| match t {
                        XdsType::Cds => &i.eds,
                        _ => &i.rds,
                    })
            };
            let sds_of = |t: XdsType| -> &[u32] {
                types[t.index()].info.as_deref().map_or(&[][..], |i| &i.sds)
            };
            let wanted = [
                (XdsType::Eds, of(XdsType::Cds).to_vec()),
                (XdsType::Rds, of(XdsType::Lds).to_vec()),
                (
                    XdsType::Sds,
                    merged(sds_of(XdsType::Cds), sds_of(XdsType::Lds)),
                ),
            ];
            for (t, wanted) in wanted {
                let state = &mut types[t.index()];
                if state.subscribed.as_ref() == Some(&wanted)
                    || (state.subscribed.is_none() && wanted.is_empty())
                {
                    continue;
                }
                state.request_names = fleet.memo.request_names(&wanted);
                tx.send(LiteRequest {
                    type_url: t.url().into(),
                    resource_names: state.request_names.clone(),
                    version_info: state.version.clone(),
                    response_nonce: state.nonce.clone(),
                    ..Default::default()
                })
                .await?;
                state.subscribed = Some(wanted);
                state.unsubscribed_held = true;
            }
        }
        let state = &mut types[kind.index()];
        tx.send(LiteRequest {
            type_url: kind.url().into(),
            version_info: state.version.clone(),
            response_nonce: state.nonce.clone(),
            resource_names: state.request_names.clone(),
            ..Default::default()
        })
        .await?;
        state.acked = true;
        if info.marker {
            let _ = stats.marker_acked.compare_exchange(
                0,
                fleet.now_us(),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
        if stats.warm.load(Ordering::Relaxed) == 0 && sotw_warm(&types) {
            stats.warm.store(fleet.now_us(), Ordering::Relaxed);
        }
    }
    Ok(())
}

/// Every type ACKed and every subscribed name present in the last response of its type.
fn sotw_warm(types: &[SotwType; 5]) -> bool {
    let wildcard_ok = [XdsType::Cds, XdsType::Lds]
        .iter()
        .all(|t| types[t.index()].acked);
    wildcard_ok
        && [XdsType::Eds, XdsType::Rds, XdsType::Sds].iter().all(|t| {
            let state = &types[t.index()];
            match &state.subscribed {
                None => true,
                Some(wanted) if wanted.is_empty() => true,
                Some(wanted) => state.acked && is_subset(wanted, &state.held),
            }
        })
}

// === delta ===

async fn run_delta(fleet: &Fleet, spec: &ProxySpec, stats: &ProxyStats) -> Result<()> {
    let permit = fleet.connecting.acquire().await?;
    let mut channel = connect(fleet.ads, &spec.credentials).await?;
    let (tx, rx) = mpsc::channel::<LiteDeltaRequest>(8);
    for (i, kind) in [XdsType::Cds, XdsType::Lds].into_iter().enumerate() {
        tx.send(LiteDeltaRequest {
            node: (i == 0).then(|| spec.node()),
            type_url: kind.url().into(),
            ..Default::default()
        })
        .await?;
    }
    let mut responses = grpc_stream::open::<_, LiteDeltaResponse>(&mut channel, DELTA_PATH, rx)
        .await
        .context("opening the delta ADS stream")?;
    drop(permit);
    // Clusters and listeners by name id, with what each references.
    let mut held: [HashMap<u32, Arc<super::xds::ResourceInfo>>; 2] = Default::default();
    // EDS, RDS, SDS: names held and names subscribed.
    let mut have: [HashSet<u32>; 3] = Default::default();
    let mut subscribed: [HashSet<u32>; 3] = Default::default();
    let mut acked = [false; 5];
    while let Some(response) = responses.message().await.context("delta ADS stream")? {
        let Some(kind) = XdsType::from_url(&response.type_url) else {
            bail!("response of unexpected type {}", response.type_url);
        };
        let now = fleet.now_us();
        stats.responses[kind.index()].fetch_add(1, Ordering::Relaxed);
        fleet.last_response.fetch_max(now, Ordering::Relaxed);
        let mut marker = false;
        let removed: Vec<u32> = response
            .removed_resources
            .iter()
            .map(|n| fleet.memo.intern(n))
            .collect();
        match kind {
            XdsType::Cds | XdsType::Lds => {
                let map = &mut held[kind.index()];
                for resource in &response.resources {
                    let Some(any) = &resource.resource else {
                        continue;
                    };
                    let info = fleet.memo.resource(kind, &any.value)?;
                    map.insert(info.name, info);
                }
                for id in &removed {
                    map.remove(id);
                }
                let mut wanted: [HashSet<u32>; 3] = Default::default();
                for info in held[0].values().chain(held[1].values()) {
                    wanted[0].extend(&info.eds);
                    wanted[1].extend(&info.rds);
                    wanted[2].extend(&info.sds);
                }
                for (slot, t) in [XdsType::Eds, XdsType::Rds, XdsType::Sds]
                    .into_iter()
                    .enumerate()
                {
                    let add: Vec<u32> = wanted[slot]
                        .difference(&subscribed[slot])
                        .copied()
                        .collect();
                    let drop: Vec<u32> = subscribed[slot]
                        .difference(&wanted[slot])
                        .copied()
                        .collect();
                    if add.is_empty() && drop.is_empty() {
                        continue;
                    }
                    tx.send(LiteDeltaRequest {
                        type_url: t.url().into(),
                        subscribe: fleet.memo.request_names(&add),
                        unsubscribe: names(&fleet.memo, &drop),
                        ..Default::default()
                    })
                    .await?;
                    for id in &drop {
                        have[slot].remove(id);
                    }
                    subscribed[slot] = std::mem::take(&mut wanted[slot]);
                }
            }
            XdsType::Eds | XdsType::Rds | XdsType::Sds => {
                let slot = kind.index() - 2;
                for resource in &response.resources {
                    let Some(any) = &resource.resource else {
                        continue;
                    };
                    let info = fleet.memo.resource(kind, &any.value)?;
                    marker |= info.marker;
                    have[slot].insert(info.name);
                }
                for id in &removed {
                    have[slot].remove(id);
                }
            }
        }
        tx.send(LiteDeltaRequest {
            type_url: kind.url().into(),
            response_nonce: response.nonce,
            ..Default::default()
        })
        .await?;
        acked[kind.index()] = true;
        if marker {
            let _ = stats.marker_acked.compare_exchange(
                0,
                fleet.now_us(),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
        if stats.warm.load(Ordering::Relaxed) == 0
            && acked[0]
            && acked[1]
            && (0..3).all(|slot| subscribed[slot].is_subset(&have[slot]))
        {
            stats.warm.store(fleet.now_us(), Ordering::Relaxed);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{insert_sorted, merged};

    #[test]
    fn inserted_ids_keep_the_list_sorted_without_repeats() {
        let mut held = vec![1, 3, 5];
        insert_sorted(&mut held, &[0, 3, 4, 9]);
        assert_eq!(held, vec![0, 1, 3, 4, 5, 9]);
        insert_sorted(&mut held, &[]);
        assert_eq!(held, vec![0, 1, 3, 4, 5, 9]);
    }

    #[test]
    fn merged_is_the_sorted_union_without_repeats() {
        assert_eq!(
            merged(&[1, 3, 5, 7], &[6, 3, 0, 9]),
            vec![0, 1, 3, 5, 6, 7, 9]
        );
        assert_eq!(merged(&[], &[2, 1, 2]), vec![1, 2]);
        assert_eq!(merged(&[4, 2], &[3]), vec![2, 3, 4], "unsorted input");
        assert_eq!(merged(&[1, 2], &[]), vec![1, 2]);
    }
}
