//! Watch streams: newline-delimited `{"type":…,"object":…}` events over a chunked response.
//!
//! Each watch is a task that pulls from the store's event history (after its cursor), so a slow
//! client never blocks writers; a client that falls behind the bounded history gets the same
//! 410 `Expired` error event a real server sends, and kube-rs relists.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use crate::meta;
use crate::registry::ResourceType;
use crate::status::ApiError;
use crate::store::{Event, EventKind, Filter, Store};

/// Flush buffered events once this many bytes are pending (keeps big initial lists fast).
const FLUSH_BYTES: usize = 64 * 1024;
/// Events read from the history per lock acquisition.
const BATCH: usize = 1000;

/// What one watch request asked for.
pub(crate) struct WatchRequest {
    pub rt: Arc<ResourceType>,
    pub filter: Filter,
    /// Send the current state as ADDED events first.
    pub initial_events: bool,
    /// Mark the end of the initial events with a `k8s.io/initial-events-end` bookmark.
    pub initial_events_end: bool,
    /// Resume after this resourceVersion (ignored when `initial_events`).
    pub start: Option<u64>,
    pub bookmarks: bool,
    pub bookmark_interval: Duration,
    pub timeout: Duration,
    pub metadata_only: bool,
}

/// Starts the watch task and returns the streaming response.
pub(crate) fn serve(
    store: Store,
    req: WatchRequest,
    epoch: watch::Receiver<u64>,
    shutdown: watch::Receiver<bool>,
) -> Response {
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    tokio::spawn(run(store, req, tx, epoch, shutdown));
    let body = Body::from_stream(ReceiverStream::new(rx).map(Ok::<_, Infallible>));
    Response::builder()
        .status(200)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::CACHE_CONTROL, "no-cache, private")
        .body(body)
        .unwrap_or_else(|_| Response::new(Body::empty()))
}

struct Sink {
    tx: mpsc::Sender<Bytes>,
    buf: Vec<u8>,
}

impl Sink {
    /// Buffers one event line; `false` once the client has gone.
    async fn push(&mut self, kind: &str, object: &Value) -> bool {
        self.buf.extend_from_slice(b"{\"type\":\"");
        self.buf.extend_from_slice(kind.as_bytes());
        self.buf.extend_from_slice(b"\",\"object\":");
        if serde_json::to_writer(&mut self.buf, object).is_err() {
            return false;
        }
        self.buf.extend_from_slice(b"}\n");
        if self.buf.len() >= FLUSH_BYTES {
            return self.flush().await;
        }
        true
    }

    async fn flush(&mut self) -> bool {
        if self.buf.is_empty() {
            return true;
        }
        let chunk = Bytes::from(std::mem::take(&mut self.buf));
        self.tx.send(chunk).await.is_ok()
    }
}

async fn run(
    store: Store,
    req: WatchRequest,
    tx: mpsc::Sender<Bytes>,
    mut epoch: watch::Receiver<u64>,
    mut shutdown: watch::Receiver<bool>,
) {
    let gr = req.rt.group_resource();
    // A client can re-watch in the moment between the stop signal and its connection closing;
    // such a watch must end at once or it would hold the graceful shutdown open.
    if *shutdown.borrow_and_update() {
        return;
    }
    // Only `close_watches` calls from now on end this watch.
    epoch.borrow_and_update();
    // Subscribe before reading any state so no write between the two is missed.
    let mut rv_rx = store.subscribe();
    rv_rx.borrow_and_update();
    let mut sink = Sink {
        tx,
        buf: Vec::new(),
    };

    let mut cursor = if req.initial_events {
        let (objects, rv) = store.watch_snapshot(&req.rt, &req.filter);
        for obj in &objects {
            if !sink.push("ADDED", &render(&req, obj)).await {
                return;
            }
        }
        if req.initial_events_end && !sink.push("BOOKMARK", &bookmark(&req, rv, true)).await {
            return;
        }
        rv
    } else {
        match req.start {
            Some(start) => {
                if let Err(oldest) = store.check_resume(start) {
                    let status =
                        ApiError::gone(format!("too old resource version: {start} ({oldest})"));
                    sink.push("ERROR", &status.to_status()).await;
                    sink.flush().await;
                    return;
                }
                start
            }
            None => store.resource_version(),
        }
    };

    let deadline = Instant::now() + req.timeout;
    let mut ticker = tokio::time::interval_at(
        Instant::now() + req.bookmark_interval,
        req.bookmark_interval,
    );
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        loop {
            match store.events_after(&gr, cursor, BATCH) {
                Err(oldest) => {
                    let status = ApiError::gone(format!(
                        "too old resource version: {cursor} ({})",
                        oldest + 1
                    ));
                    sink.push("ERROR", &status.to_status()).await;
                    sink.flush().await;
                    return;
                }
                Ok((events, next)) => {
                    let full = events.len() == BATCH;
                    for e in &events {
                        if let Some((kind, obj)) = translate(&req, e)
                            && !sink.push(kind, &obj).await
                        {
                            return;
                        }
                    }
                    cursor = next;
                    if !full {
                        break;
                    }
                }
            }
        }
        if !sink.flush().await {
            return;
        }
        tokio::select! {
            changed = rv_rx.changed() => {
                if changed.is_err() {
                    return;
                }
                rv_rx.borrow_and_update();
            }
            _ = ticker.tick(), if req.bookmarks => {
                if !sink.push("BOOKMARK", &bookmark(&req, cursor, false)).await {
                    return;
                }
            }
            _ = tokio::time::sleep_until(deadline) => return,
            _ = epoch.changed() => return,
            _ = shutdown.changed() => return,
            _ = sink.tx.closed() => return,
        }
    }
}

/// An event as this watcher sees it. With selectors, an object that stops matching is
/// DELETED (its previous state at the event's resourceVersion) and one that starts matching is
/// ADDED, exactly as the real watch cache does.
fn translate(req: &WatchRequest, e: &Event) -> Option<(&'static str, Value)> {
    let now = req.filter.matches(&e.object);
    let before = e.prev.as_ref().is_some_and(|p| req.filter.matches(p));
    match e.kind {
        EventKind::Added => now.then(|| ("ADDED", render(req, &e.object))),
        EventKind::Deleted => now.then(|| ("DELETED", render(req, &e.object))),
        EventKind::Modified => match (before, now) {
            (true, true) => Some(("MODIFIED", render(req, &e.object))),
            (false, true) => Some(("ADDED", render(req, &e.object))),
            (true, false) => {
                let prev = e.prev.as_deref()?;
                let mut gone = render(req, prev);
                meta::set(&mut gone, "resourceVersion", json!(e.rv.to_string()));
                Some(("DELETED", gone))
            }
            (false, false) => None,
        },
    }
}

/// The object as this watch serves it.
fn render(req: &WatchRequest, obj: &Value) -> Value {
    req.rt.render(obj, req.metadata_only)
}

fn bookmark(req: &WatchRequest, rv: u64, initial_end: bool) -> Value {
    let (api_version, kind) = if req.metadata_only {
        (
            "meta.k8s.io/v1".to_string(),
            "PartialObjectMetadata".to_string(),
        )
    } else {
        (req.rt.api_version(), req.rt.kind.clone())
    };
    let mut metadata = json!({"resourceVersion": rv.to_string(), "creationTimestamp": null});
    if initial_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    json!({"kind": kind, "apiVersion": api_version, "metadata": metadata})
}
