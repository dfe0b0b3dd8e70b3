//! The Kubernetes source: kube-runtime watchers, one per kind, feeding the catalog.
//!
//! Each kind is watched cluster-wide with [`kube::runtime::watcher`] (paged initial list, then a
//! watch from the list's resourceVersion) and its default exponential backoff. The watcher's
//! vocabulary maps one-to-one onto [`CatalogEvent`]: a (re)list of one kind is `Init(kind)`,
//! `InitApply`…, `InitDone(kind)`, which the catalog swaps in atomically and compares with what it
//! holds, so a relist after `410 Gone` changes nothing unless the cluster did. Once every kind has
//! delivered its first list the source sends `Synced`.
//!
//! # Rules
//!
//! * **The API server going away does not stop config serving.** A failed list or watch is logged,
//!   counted and retried with backoff; the catalog keeps what it has, so proxies keep their last
//!   configuration.
//! * **Namespaces are watched whole.** Whether a namespace is meshed is a label the catalog reads,
//!   so a namespace joining or leaving the mesh (`fsm namespace add/remove`) is a label change seen
//!   live, without restarting any watcher.
//! * **Unserved kinds are not fatal.** If a CRD is not installed the watch for its kind fails with
//!   404 and keeps retrying in the background; the source still becomes `Synced` without it, after
//!   [`OPTIONAL_SYNC_GRACE`], so a cluster without, say, the SMI CRDs still gets a mesh.
//! * **Every event is counted** as FSM's informers count them (`fsm_k8s_api_event_count`, see
//!   [`crate::metrics`]), and queued for the control loop (`fsm_events_queued`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use fsm_catalog::{CatalogEvent, Kind, MeshKind, Scope};
use fsm_errcode::ErrCode;
use futures::StreamExt;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::mpsc::{Sender, UnboundedSender};
use tokio::task::JoinHandle;

use crate::kinds::SpawnWatch;

/// How long `Synced` waits for kinds whose CRD may not be installed.
pub const OPTIONAL_SYNC_GRACE: Duration = Duration::from_secs(10);

/// What the debug endpoint shows about one watched kind.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WatchStatus {
    /// Whether the kind has completed at least one list.
    pub synced: bool,
    /// Completed lists (the first one plus relists after errors or `410 Gone`).
    pub lists: u64,
    pub errors: u64,
    pub last_error: Option<String>,
}

type Statuses = Arc<Mutex<BTreeMap<Kind, WatchStatus>>>;

/// Watches a Kubernetes cluster; stops watching when dropped.
pub struct KubeSource {
    tasks: Vec<JoinHandle<()>>,
    statuses: Statuses,
}

impl KubeSource {
    /// Starts one watcher per mesh kind. Returns at once; the catalog learns the cluster through
    /// `events` and becomes complete with `Synced`.
    pub fn spawn(client: Client, events: Sender<CatalogEvent>) -> KubeSource {
        let statuses: Statuses = Arc::default();
        let (synced_tx, synced_rx) = tokio::sync::mpsc::unbounded_channel();
        let ctx = WatchContext {
            events: events.clone(),
            statuses: statuses.clone(),
            synced: synced_tx,
        };
        let mut tasks: Vec<JoinHandle<()>> = Kind::ALL
            .iter()
            .map(|kind| {
                kind.visit(SpawnWatch {
                    client: client.clone(),
                    ctx: ctx.clone(),
                })
            })
            .collect();
        tasks.push(tokio::spawn(announce_synced(synced_rx, events)));
        KubeSource { tasks, statuses }
    }

    pub fn status(&self) -> BTreeMap<Kind, WatchStatus> {
        self.statuses.lock().clone()
    }
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Sends `Synced` once every required kind has listed, and the optional ones have listed or had
/// their grace period.
async fn announce_synced(
    mut synced: tokio::sync::mpsc::UnboundedReceiver<Kind>,
    events: Sender<CatalogEvent>,
) {
    let all: Vec<Kind> = Kind::ALL.to_vec();
    let required: Vec<Kind> = all.iter().copied().filter(|k| k.is_required()).collect();
    let mut done = Vec::new();
    let grace = tokio::time::sleep(OPTIONAL_SYNC_GRACE);
    tokio::pin!(grace);
    let mut grace_over = false;
    loop {
        let complete = if grace_over { &required } else { &all };
        if complete.iter().all(|k| done.contains(k)) {
            break;
        }
        tokio::select! {
            kind = synced.recv() => match kind {
                Some(kind) => done.push(kind),
                None => return,
            },
            () = &mut grace, if !grace_over => {
                grace_over = true;
                let missing: Vec<String> = all.iter().filter(|k| !done.contains(k)).map(ToString::to_string).collect();
                if !missing.is_empty() {
                    // Their informers failed their initial sync (a CRD not installed, or not
                    // readable): FSM's E4150, here for any kind.
                    fsm_errcode::warn!(ErrCode::E4150, kinds = ?missing, "kinds not listed yet (CRD not installed?); serving without them until they are");
                }
            }
        }
    }
    tracing::info!("initial lists complete");
    let _ = crate::metrics::send(&events, CatalogEvent::Synced).await;
}

#[derive(Clone)]
pub(crate) struct WatchContext {
    events: Sender<CatalogEvent>,
    statuses: Statuses,
    synced: UnboundedSender<Kind>,
}

/// Watches every object of `K` in the cluster.
pub(crate) fn spawn_watch<K: MeshKind>(client: Client, ctx: WatchContext) -> JoinHandle<()> {
    let kind = K::KIND;
    let wrap = K::into_object;
    tokio::spawn(async move {
        let api: Api<K> = Api::all(client);
        let scope = Scope::Kind(kind);
        let mut stream = watcher::watcher(api, watcher::Config::default())
            .default_backoff()
            .boxed();
        let mut first_list = true;
        let mut event_types = crate::metrics::EventTypes::default();
        while let Some(item) = stream.next().await {
            let event = match item {
                Ok(Event::Init) => CatalogEvent::Init(scope),
                Ok(Event::InitApply(object)) => CatalogEvent::InitApply(wrap(object)),
                Ok(Event::InitDone) => {
                    {
                        let mut statuses = ctx.statuses.lock();
                        let status = statuses.entry(kind).or_default();
                        status.synced = true;
                        status.lists += 1;
                    }
                    if first_list {
                        first_list = false;
                        tracing::debug!(%kind, "initial list complete");
                        let _ = ctx.synced.send(kind);
                    } else {
                        tracing::info!(%kind, "relisted");
                    }
                    CatalogEvent::InitDone(scope)
                }
                Ok(Event::Apply(object)) => CatalogEvent::Apply(wrap(object)),
                Ok(Event::Delete(object)) => CatalogEvent::Delete(wrap(object).key()),
                Err(err) => {
                    report_error(kind, &err, &ctx.statuses);
                    continue;
                }
            };
            for (event_type, key) in event_types.classify(&event) {
                crate::metrics::count_k8s_event(event_type, &key);
            }
            // Waits while the control loop is behind: back-pressure instead of a growing queue.
            if crate::metrics::send(&ctx.events, event).await.is_err() {
                return;
            }
        }
    })
}

/// E3002 when the objects listed or watched could not be decoded, E4150 (the informer's sync
/// failed: FSM's code for its config.flomesh.io informer, used here for every kind) otherwise.
fn watch_error_code(err: &watcher::Error) -> ErrCode {
    let kube_error = match err {
        watcher::Error::InitialListFailed(e)
        | watcher::Error::WatchStartFailed(e)
        | watcher::Error::WatchFailed(e) => Some(e),
        _ => None,
    };
    match kube_error {
        Some(kube::Error::SerdeError(_)) => ErrCode::E3002,
        _ => ErrCode::E4150,
    }
}

fn report_error(kind: Kind, err: &watcher::Error, statuses: &Statuses) {
    let message = err.to_string();
    let mut statuses = statuses.lock();
    let status = statuses.entry(kind).or_default();
    status.errors += 1;
    // The backoff retries every few seconds while the API server is away; log each distinct
    // failure once rather than flooding the log with the same line.
    if status.last_error.as_deref() != Some(message.as_str()) {
        fsm_errcode::warn!(watch_error_code(err), %kind, error = %message, "watch failed; retrying with backoff, the last configuration keeps serving");
    }
    status.last_error = Some(message);
}
