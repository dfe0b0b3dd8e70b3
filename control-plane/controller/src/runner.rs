//! The control loop: applies source events to the catalog, and recomputes and publishes the
//! snapshots of connected proxies.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fsm_cache::{ProxyKey, Snapshot, SnapshotCache};
use fsm_catalog::{Catalog, CatalogEvent, CatalogSettings};
use fsm_compiler::{ProxyRef, compile};
use fsm_errcode::{ErrCode, HasErrCode};
use fsm_xds_server::{DataPlane, ProxyEvent, ProxyNode};
use parking_lot::RwLock;
use serde::Serialize;
use tokio::sync::mpsc::UnboundedReceiver;

/// Bursts of source events (an editor saving several files, a relist) are applied together:
/// recompute once the stream has been quiet this long…
const QUIET: Duration = Duration::from_millis(20);
/// …but never later than this after the first event of the burst.
const MAX_DELAY: Duration = Duration::from_millis(200);

/// What the HTTP endpoints show about the control loop.
#[derive(Default)]
pub struct State {
    ready: AtomicBool,
    proxies: RwLock<BTreeMap<ProxyKey, ProxyState>>,
    /// Objects the catalog refused, as `<code>: <object and field>: <why>`.
    rejected: RwLock<Vec<String>>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyState {
    pub node_id: String,
    pub identity: String,
    pub pod: Option<String>,
    /// Why the proxy has no (or a stale) configuration, with its FSM error code.
    pub error: Option<String>,
    pub warnings: Vec<String>,
}

impl State {
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn proxies(&self) -> BTreeMap<ProxyKey, ProxyState> {
        self.proxies.read().clone()
    }

    pub fn rejected(&self) -> Vec<String> {
        self.rejected.read().clone()
    }
}

pub struct Runner {
    catalog: Catalog,
    cache: Arc<SnapshotCache>,
    state: Arc<State>,
    /// Connected proxies, by UUID, with the node they announced.
    nodes: BTreeMap<ProxyKey, ProxyNode>,
    catalog_ready: bool,
}

impl Runner {
    pub fn new(settings: CatalogSettings, cache: Arc<SnapshotCache>, state: Arc<State>) -> Self {
        Runner {
            catalog: Catalog::new(settings),
            cache,
            state,
            nodes: BTreeMap::new(),
            catalog_ready: false,
        }
    }

    pub async fn run(
        mut self,
        mut catalog_rx: UnboundedReceiver<CatalogEvent>,
        mut proxy_rx: UnboundedReceiver<ProxyEvent>,
    ) {
        loop {
            tokio::select! {
                Some(event) = catalog_rx.recv() => {
                    let mut changed = self.apply(event);
                    let deadline = tokio::time::Instant::now() + MAX_DELAY;
                    while let Ok(Some(event)) =
                        tokio::time::timeout_at(deadline.min(tokio::time::Instant::now() + QUIET), catalog_rx.recv()).await
                    {
                        changed |= self.apply(event);
                    }
                    *self.state.rejected.write() = self
                        .catalog
                        .rejected()
                        .values()
                        .map(|r| format!("{}: {}", r.code, r.message))
                        .collect();
                    if changed && self.catalog_ready {
                        self.publish_all();
                    }
                }
                Some(event) = proxy_rx.recv() => self.on_proxy(event),
                else => return,
            }
        }
    }

    fn apply(&mut self, event: CatalogEvent) -> bool {
        let synced = matches!(event, CatalogEvent::Synced);
        let changed = self.catalog.handle(event);
        if synced && !self.catalog_ready {
            self.catalog_ready = true;
            self.state.ready.store(true, Ordering::Release);
            tracing::info!(objects = ?self.catalog.counts(), "catalog loaded");
            return true;
        }
        changed
    }

    fn on_proxy(&mut self, event: ProxyEvent) {
        match event {
            ProxyEvent::Connected(node) => {
                let key = node.key();
                self.nodes.insert(key.clone(), node);
                if self.catalog_ready {
                    self.publish(&key);
                }
            }
            ProxyEvent::Disconnected(key) => {
                // Another stream of the same proxy may still be open (a reconnect racing the
                // old stream's teardown): keep computing for it while the cache knows it.
                if !self.cache.connected().contains(&key) {
                    self.nodes.remove(&key);
                    self.state.proxies.write().remove(&key);
                }
            }
        }
    }

    /// Every connected proxy may route to every meshed service (permissive mode), so a catalog
    /// change can affect all of them; the cache wakes only the proxies whose resources changed.
    fn publish_all(&mut self) {
        let keys: Vec<ProxyKey> = self.nodes.keys().cloned().collect();
        let started = std::time::Instant::now();
        for key in &keys {
            self.publish(key);
        }
        tracing::debug!(
            proxies = keys.len(),
            elapsed_us = started.elapsed().as_micros() as u64,
            "recomputed snapshots"
        );
    }

    fn publish(&mut self, key: &ProxyKey) {
        let Some(node) = self.nodes.get(key) else {
            return;
        };
        let mut proxy_state = ProxyState {
            node_id: node.node_id.clone(),
            identity: node.identity(),
            pod: None,
            error: None,
            warnings: vec![],
        };
        let result = self.snapshot_for(node, &mut proxy_state);
        match result {
            Ok(snapshot) => {
                let versions = snapshot.versions();
                if self.cache.set(key, snapshot) {
                    tracing::info!(proxy = %key, identity = %proxy_state.identity, ?versions, "published snapshot");
                }
            }
            Err((code, message)) => {
                // Keep whatever the proxy had: the last good configuration keeps serving.
                tracing::warn!(code = %code, proxy = %key, "{message}");
                fsm_errcode::count(code);
                proxy_state.error = Some(format!("{code}: {message}"));
            }
        }
        self.state.proxies.write().insert(key.clone(), proxy_state);
    }

    fn snapshot_for(
        &self,
        node: &ProxyNode,
        proxy_state: &mut ProxyState,
    ) -> Result<Snapshot, (ErrCode, String)> {
        let proxy = ProxyRef {
            uuid: node.uuid.clone(),
            service_account: node.service_account.clone(),
            namespace: node.namespace.clone(),
        };
        let compiled = compile(&self.catalog, &proxy).map_err(|e| (e.err_code(), e.to_string()))?;
        proxy_state.pod = Some(format!(
            "{}/{}",
            compiled.ir.proxy.namespace, compiled.ir.proxy.pod
        ));
        for warning in &compiled.warnings {
            proxy_state
                .warnings
                .push(format!("{}: {}", warning.code, warning.message));
        }
        let adapter_error = |e: &dyn std::fmt::Display| (ErrCode::E5007, e.to_string());
        let (encoded, warnings) = match &node.data_plane {
            DataPlane::Envoy => {
                let resources =
                    fsm_adapter_envoy::translate(&compiled.ir).map_err(|e| adapter_error(&e))?;
                (resources.encode(), resources.warnings)
            }
            DataPlane::FsmSidecar => {
                let resources =
                    fsm_adapter_native::translate(&compiled.ir).map_err(|e| adapter_error(&e))?;
                (resources.encode(), resources.warnings)
            }
            DataPlane::Other(agent) => {
                return Err((
                    ErrCode::E5013,
                    format!(
                        "data plane {agent:?} of proxy {} is not supported; Envoy and fsm-sidecar are",
                        node.node_id
                    ),
                ));
            }
        };
        proxy_state.warnings.extend(warnings);
        Ok(Snapshot::from_encoded(encoded))
    }
}
