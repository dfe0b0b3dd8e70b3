//! The control loop: applies source events to the catalog, and recomputes and publishes the
//! snapshots of connected proxies.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use fsm_cache::{ProxyKey, SnapshotCache};
use fsm_catalog::{Catalog, CatalogEvent, CatalogSettings, ChangeSet, Kind, SidecarProxy};
use fsm_certs::{CertKey, CertManager, IssuedCertificate};
use fsm_compiler::{ProxyRef, TRUST_DOMAIN, compile_with_view};
use fsm_errcode::{ErrCode, HasErrCode};
use fsm_injector::logging::LogControl;
use fsm_ir::{ProxyCredentials, ServiceIdentity};
use fsm_xds_server::{ConnectionLimit, DataPlane, ProxyEvent, StreamId};
use parking_lot::RwLock;
use serde::Serialize;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc::{Receiver, UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio::sync::watch;

use crate::metrics::{Work, metrics};
use crate::publish::{Own, Publisher, SharedKey};

/// Bursts of source events (an editor saving several files, a relist) are applied together:
/// recompute once the stream has been quiet this long… A burst's events arrive back to back (a
/// relist, one rescan's batch), and a recompute costs only what the change touches, so the wait
/// can be short: it is added to every change's latency.
const QUIET: Duration = Duration::from_millis(5);
/// …but never later than this after the first event of the burst.
const MAX_DELAY: Duration = Duration::from_millis(200);
/// A failed service-certificate issuance (Vault or cert-manager.io unreachable…) is retried after
/// this long, while the proxy keeps its last configuration.
const CERT_RETRY: Duration = Duration::from_secs(5);

/// Certificate work coming back to the control loop.
pub enum CertUpdate {
    /// The outcome of issuing one identity's service certificate.
    Issued {
        identity: ServiceIdentity,
        result: Result<Arc<IssuedCertificate>, (ErrCode, String)>,
        /// The identity's rotation count when the certificate was asked for: a result older
        /// than a rotation announced meanwhile is stale and dropped.
        epoch: u64,
    },
    /// Time to try a failed issuance again.
    Retry(ServiceIdentity),
}

/// What the HTTP endpoints show about the control loop.
#[derive(Default)]
pub struct State {
    ready: AtomicBool,
    /// MeshConfig `spec.observability.enableDebugServer` (FSM's default: off).
    debug_server: AtomicBool,
    proxies: RwLock<BTreeMap<ProxyKey, ProxyState>>,
    /// Objects the catalog refused, and pods refused a proxy UUID another pod holds, as
    /// `<code>: <object and field>: <why>`.
    rejected: RwLock<Vec<String>>,
    /// What the last batch of catalog changes cost.
    last_change: RwLock<Option<ChangeReport>>,
}

/// The cost of one batch of catalog changes, for `/debug/recompute` and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ChangeReport {
    /// Batches applied so far, this one included.
    pub batch: u64,
    /// Catalog objects the batch changed.
    pub objects: usize,
    #[serde(flatten)]
    pub work: Work,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyState {
    pub node_id: String,
    pub identity: String,
    /// The data planes its open streams are served.
    pub data_planes: Vec<DataPlane>,
    pub pod: Option<String>,
    /// Why the proxy has no (or a stale) configuration, with its FSM error code.
    pub error: Option<String>,
    pub warnings: Vec<String>,
}

impl State {
    /// The first full sync of the source is applied to the catalog.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub(crate) fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    /// Whether MeshConfig turns the debug endpoints on.
    pub fn debug_server(&self) -> bool {
        self.debug_server.load(Ordering::Acquire)
    }

    /// Turns the debug endpoints on or off; whether that changed anything.
    pub(crate) fn set_debug_server(&self, on: bool) -> bool {
        self.debug_server.swap(on, Ordering::AcqRel) != on
    }

    pub fn proxies(&self) -> BTreeMap<ProxyKey, ProxyState> {
        self.proxies.read().clone()
    }

    pub fn rejected(&self) -> Vec<String> {
        self.rejected.read().clone()
    }

    /// What the last batch of catalog changes cost (`None` before the first).
    pub fn last_change(&self) -> Option<ChangeReport> {
        *self.last_change.read()
    }
}

pub struct Runner {
    catalog: Catalog,
    cache: Arc<SnapshotCache>,
    state: Arc<State>,
    /// Connected proxies, by whole identity, with their open streams.
    nodes: BTreeMap<ProxyKey, ConnectedProxy>,
    /// Connected proxies by service identity: whom a certificate change concerns.
    by_identity: HashMap<ServiceIdentity, HashSet<ProxyKey>>,
    catalog_ready: bool,
    certs: CertManager,
    /// The service certificate of each identity with a connected proxy.
    credentials: HashMap<ServiceIdentity, Arc<ProxyCredentials>>,
    /// The shared parts of proxies' configurations and the interned per-proxy sets.
    publisher: Publisher,
    /// Whether the publisher's view has been built from the loaded catalog.
    view_loaded: bool,
    /// Trust bundles in use, each held once however many proxies carry it.
    bundles: HashSet<Arc<str>>,
    /// Identities whose certificate is being issued.
    pending: HashSet<ServiceIdentity>,
    /// Rotations announced per identity. A certificate fetched before a rotation (a trust-bundle
    /// change during a root rotation, say) can come back after it; applying it would give the
    /// proxy a bundle without the new root while its peers already present new-root leaves.
    cert_epochs: HashMap<ServiceIdentity, u64>,
    /// MeshConfig `spec.certificate.serviceCertValidityDuration`, as last applied.
    validity: Duration,
    cert_tx: UnboundedSender<CertUpdate>,
    cert_rx: UnboundedReceiver<CertUpdate>,
    /// Pods that need bootstrap credentials, for the bootstrap writer.
    sidecars: watch::Sender<Vec<SidecarProxy>>,
    /// The ADS server's limit, MeshConfig `spec.sidecar.maxDataPlaneConnections`.
    connection_limit: ConnectionLimit,
    /// The process's log level, MeshConfig `spec.observability.fsmLogLevel` (none in tests).
    logs: Option<Arc<LogControl>>,
    /// A `serviceCertValidityDuration` already reported as unusable (reported once, not at
    /// every catalog change).
    bad_validity: Option<String>,
}

/// One proxy with at least one open stream.
struct ConnectedProxy {
    /// The node id of its latest stream, for `/debug/proxies`.
    node_id: String,
    /// Each open stream and the data plane it is served: the snapshot carries the resources of
    /// every data plane in use, and each stream takes only its own.
    streams: BTreeMap<StreamId, DataPlane>,
    /// Its own part, as last compiled.
    own: Option<OwnPart>,
}

/// A proxy's own part and what it was built from: a change to any of these recompiles it.
struct OwnPart {
    own: Own,
    data_planes: Vec<DataPlane>,
    credentials: Arc<ProxyCredentials>,
    trust_bundle: Arc<str>,
}

impl OwnPart {
    fn shared_keys(&self) -> impl Iterator<Item = SharedKey> + '_ {
        self.data_planes.iter().map(|data_plane| SharedKey {
            data_plane: *data_plane,
            trust_bundle: self.trust_bundle.clone(),
            egress: self.own.egress,
        })
    }
}

impl ConnectedProxy {
    fn data_planes(&self) -> Vec<DataPlane> {
        let mut planes: Vec<DataPlane> = self.streams.values().copied().collect();
        planes.sort();
        planes.dedup();
        planes
    }
}

impl Runner {
    pub fn new(
        settings: CatalogSettings,
        cache: Arc<SnapshotCache>,
        state: Arc<State>,
        certs: CertManager,
    ) -> Self {
        let (cert_tx, cert_rx) = unbounded_channel();
        Runner {
            catalog: Catalog::new(settings),
            cache,
            state,
            nodes: BTreeMap::new(),
            by_identity: HashMap::new(),
            catalog_ready: false,
            certs,
            credentials: HashMap::new(),
            publisher: Publisher::default(),
            view_loaded: false,
            bundles: HashSet::new(),
            pending: HashSet::new(),
            cert_epochs: HashMap::new(),
            validity: fsm_certs::DEFAULT_SERVICE_CERT_VALIDITY,
            cert_tx,
            cert_rx,
            sidecars: watch::Sender::new(Vec::new()),
            connection_limit: ConnectionLimit::default(),
            logs: None,
            bad_validity: None,
        }
    }

    /// Keeps the process's log level at MeshConfig `spec.observability.fsmLogLevel` (the
    /// `--log-level` filter while there is no MeshConfig).
    pub fn with_log_control(mut self, logs: Arc<LogControl>) -> Self {
        self.logs = Some(logs);
        self
    }

    /// Keeps `limit` (the ADS server's) at MeshConfig `spec.sidecar.maxDataPlaneConnections`.
    pub fn with_connection_limit(mut self, limit: ConnectionLimit) -> Self {
        self.connection_limit = limit;
        self
    }

    /// The sidecar pods of the mesh, updated as the catalog changes.
    pub fn sidecars(&self) -> watch::Receiver<Vec<SidecarProxy>> {
        self.sidecars.subscribe()
    }

    pub async fn run(
        mut self,
        mut catalog_rx: Receiver<CatalogEvent>,
        // Unbounded, and bounded all the same: each stream announces itself once and its end
        // once (from `Drop`, which cannot wait).
        mut proxy_rx: UnboundedReceiver<ProxyEvent>,
        // The validating webhook's questions (none when it does not run).
        mut admission_rx: Receiver<crate::admission::AdmissionCheck>,
    ) {
        let mut rotations = self.certs.subscribe();
        loop {
            tokio::select! {
                Some(check) = admission_rx.recv() => {
                    if self.catalog_ready {
                        // Only the copy is made here: compiling the proxies the object touches
                        // would hold up every configuration push behind `kubectl apply`.
                        let what_if = self.catalog.clone();
                        tokio::task::spawn_blocking(move || {
                            let _ = check.reply.send(crate::admission::check(what_if, check.object));
                        });
                    } else {
                        let _ = check.reply.send(crate::admission::Verdict {
                            refusal: None,
                            warnings: vec!["not compiled before admission: the controller has not loaded the mesh yet".into()],
                        });
                    }
                }
                Some(event) = catalog_rx.recv() => {
                    // When the batch's first change was observed: how long it takes to reach
                    // each proxy is measured from here (fsm_proxy_convergence_seconds).
                    let observed = Instant::now();
                    let mut received = 1;
                    let mut changed = self.apply(event);
                    let deadline = tokio::time::Instant::now() + MAX_DELAY;
                    while let Ok(Some(event)) =
                        tokio::time::timeout_at(deadline.min(tokio::time::Instant::now() + QUIET), catalog_rx.recv()).await
                    {
                        received += 1;
                        changed |= self.apply(event);
                    }
                    *self.state.rejected.write() = self
                        .catalog
                        .rejected()
                        .values()
                        .map(|r| format!("{}: {}", r.code, r.message))
                        .chain(
                            self.catalog
                                .uuid_conflicts()
                                .iter()
                                .map(|c| format!("{}: {c}", ErrCode::E5004)),
                        )
                        .collect();
                    if changed && self.catalog_ready {
                        let changes = self.catalog.take_changes();
                        self.apply_certificate_settings();
                        if !self.view_loaded
                            || changes.objects.iter().any(|o| o.kind == Kind::MeshConfig)
                        {
                            self.apply_mesh_settings();
                        }
                        // Which pods run sidecars depends on pods and namespaces only: an
                        // endpoint change does not walk every pod of the mesh.
                        if changes
                            .objects
                            .iter()
                            .any(|o| matches!(o.kind, Kind::Pod | Kind::Namespace))
                        {
                            self.sidecars.send_if_modified(|current| {
                                let now = self.catalog.sidecar_proxies();
                                let modified = *current != now;
                                *current = now;
                                modified
                            });
                        }
                        self.on_catalog_changed(changes, observed);
                    }
                    // The batch's events are applied, and the proxies they concern have their
                    // new snapshots.
                    fsm_sources::metrics::processed(received);
                }
                Some(event) = proxy_rx.recv() => self.on_proxy(event),
                Some(update) = self.cert_rx.recv() => self.on_certificate(update),
                rotation = rotations.recv() => match rotation {
                    Ok(event) => {
                        if let CertKey::Service { identity, .. } = event.key {
                            tracing::info!(%identity, reason = ?event.reason, serial = %event.cert.serial, "service certificate rotated");
                            let epoch = self.cert_epochs.entry(identity.clone()).or_default();
                            *epoch += 1;
                            let epoch = *epoch;
                            self.on_certificate(CertUpdate::Issued { identity, result: Ok(event.cert), epoch });
                        }
                    }
                    Err(RecvError::Lagged(missed)) => {
                        // Some rotations were missed: fetch every identity's current certificate
                        // (nothing is lost, so not an error).
                        tracing::info!(missed, "certificate rotations lagged; re-reading every certificate");
                        let identities: Vec<ServiceIdentity> = self.credentials.keys().cloned().collect();
                        for identity in identities {
                            self.request_certificate(identity);
                        }
                    }
                    Err(RecvError::Closed) => return,
                },
                else => return,
            }
        }
    }

    fn apply(&mut self, event: CatalogEvent) -> bool {
        let synced = matches!(event, CatalogEvent::Synced);
        let changed = self.catalog.handle(event);
        if synced && !self.catalog_ready {
            self.catalog_ready = true;
            self.state.set_ready();
            tracing::info!(objects = ?self.catalog.counts(), "catalog loaded");
            return true;
        }
        changed
    }

    fn on_proxy(&mut self, event: ProxyEvent) {
        match event {
            ProxyEvent::Connected {
                stream,
                node,
                data_plane,
            } => {
                let key = node.key();
                let proxy = self
                    .nodes
                    .entry(key.clone())
                    .or_insert_with(|| ConnectedProxy {
                        node_id: String::new(),
                        streams: BTreeMap::new(),
                        own: None,
                    });
                proxy.node_id = node.node_id;
                proxy.streams.insert(stream, data_plane);
                self.by_identity
                    .entry(identity_of(&key))
                    .or_default()
                    .insert(key.clone());
                if self.catalog_ready {
                    self.publish(&key, false, None);
                    self.record_work();
                }
            }
            ProxyEvent::Disconnected { stream, proxy: key } => {
                let Some(proxy) = self.nodes.get_mut(&key) else {
                    return;
                };
                let before = proxy.data_planes();
                proxy.streams.remove(&stream);
                if proxy.streams.is_empty() {
                    // Its last stream is gone: nothing of it is kept.
                    self.nodes.remove(&key);
                    self.state.proxies.write().remove(&key);
                    let identity = identity_of(&key);
                    if let Some(keys) = self.by_identity.get_mut(&identity) {
                        keys.remove(&key);
                        if keys.is_empty() {
                            self.by_identity.remove(&identity);
                            self.credentials.remove(&identity);
                            self.certs.release(&service_cert_key(&identity));
                        }
                    }
                } else if proxy.data_planes() != before && self.catalog_ready {
                    // A data plane no stream speaks any more: stop computing its resources.
                    self.publish(&key, false, None);
                    self.record_work();
                }
            }
        }
    }

    /// What MeshConfig sets outside the proxies' configurations: the ADS connection limit, the
    /// feature flags' gauges, the debug endpoints and the process's log level.
    fn apply_mesh_settings(&mut self) {
        let mesh_config = self.catalog.mesh_config();
        let spec = &mesh_config.spec;
        self.connection_limit
            .set(spec.sidecar.max_data_plane_connections as usize);
        crate::metrics::set_feature_flags(&spec.feature_flags);
        let debug_server = spec.observability.enable_debug_server;
        if self.state.set_debug_server(debug_server) {
            tracing::info!(
                enabled = debug_server,
                "debug endpoints (/debug/*) switched by MeshConfig spec.observability.enableDebugServer"
            );
        }
        if let Some(logs) = &self.logs {
            // FSM's defaults stand in for an absent MeshConfig, whose level is `--log-level`'s.
            let present = mesh_config.metadata.name.is_some();
            logs.set(
                present.then(|| fsm_injector::logging::from_crd(spec.observability.fsm_log_level)),
            );
        }
    }

    /// Re-issues every held certificate when MeshConfig changes its validity.
    fn apply_certificate_settings(&mut self) {
        let configured = self
            .catalog
            .mesh_config()
            .spec
            .certificate
            .service_cert_validity_duration;
        let validity = match fsm_catalog::parse_duration(&configured).filter(|d| !d.is_zero()) {
            Some(validity) => {
                self.bad_validity = None;
                validity
            }
            None => {
                // A value that does not read as a duration could not be unmarshalled (FSM's
                // E3002; E4013 is a failed issuance). Reported when it appears, not at every
                // change.
                if self.bad_validity.as_deref() != Some(configured.as_str()) {
                    fsm_errcode::warn!(ErrCode::E3002, value = %configured, "MeshConfig spec.certificate.serviceCertValidityDuration is not a positive duration; using 24h");
                    self.bad_validity = Some(configured.clone());
                }
                fsm_certs::DEFAULT_SERVICE_CERT_VALIDITY
            }
        };
        if validity != self.validity {
            tracing::info!(
                ?validity,
                "service certificate validity changed; re-issuing"
            );
            self.validity = validity;
            let identities: Vec<ServiceIdentity> = self.credentials.keys().cloned().collect();
            for identity in identities {
                self.request_certificate(identity);
            }
        }
    }

    /// Issues `identity`'s service certificate in the background (a provider may take seconds);
    /// the result comes back as a [`CertUpdate`].
    fn request_certificate(&mut self, identity: ServiceIdentity) {
        if !self.pending.insert(identity.clone()) {
            return;
        }
        let certs = self.certs.clone();
        let tx = self.cert_tx.clone();
        let validity = self.validity;
        let epoch = self.cert_epochs.get(&identity).copied().unwrap_or_default();
        tokio::spawn(async move {
            let result = certs
                .issue_service_certificate(
                    &identity.service_account,
                    &identity.namespace,
                    TRUST_DOMAIN,
                    validity,
                )
                .await
                .map_err(|e| (e.err_code(), e.to_string()));
            let _ = tx.send(CertUpdate::Issued {
                identity,
                result,
                epoch,
            });
        });
    }

    fn on_certificate(&mut self, update: CertUpdate) {
        let (identity, result) = match update {
            CertUpdate::Issued {
                identity,
                result,
                epoch,
            } => {
                if epoch < self.cert_epochs.get(&identity).copied().unwrap_or_default() {
                    // A rotation announced since carried a newer certificate or bundle.
                    self.pending.remove(&identity);
                    tracing::debug!(%identity, "dropping a certificate fetched before the latest rotation");
                    return;
                }
                (identity, result)
            }
            CertUpdate::Retry(identity) => {
                if self.by_identity.contains_key(&identity) {
                    self.request_certificate(identity);
                }
                return;
            }
        };
        self.pending.remove(&identity);
        let affected: Vec<ProxyKey> = self
            .by_identity
            .get(&identity)
            .map(|keys| keys.iter().cloned().collect())
            .unwrap_or_default();
        if affected.is_empty() {
            return;
        }
        match result {
            Ok(cert) => {
                let observed = Instant::now();
                self.credentials.insert(
                    identity,
                    Arc::new(ProxyCredentials {
                        cert_chain_pem: cert.cert_chain_pem.clone(),
                        private_key_pem: cert.private_key.expose_pem().to_owned(),
                        trust_bundle_pem: cert.trust_bundle_pem.clone(),
                    }),
                );
                if self.catalog_ready {
                    for key in &affected {
                        self.publish(key, false, Some(observed));
                    }
                    self.retain_shared();
                    self.record_work();
                }
            }
            Err((code, message)) => {
                let mut proxies = self.state.proxies.write();
                for key in &affected {
                    if let Some(p) = proxies.get_mut(key) {
                        p.error = Some(format!(
                            "{code}: cannot issue the service certificate of {identity}: {message}"
                        ));
                    }
                }
                drop(proxies);
                let tx = self.cert_tx.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(CERT_RETRY).await;
                    let _ = tx.send(CertUpdate::Retry(identity));
                });
            }
        }
    }

    /// Applies the catalog's pending changes: the view and the shared parts are refreshed for
    /// what changed, the proxies whose own part a change touches are recompiled, and every proxy
    /// whose shared or own sets changed gets its new snapshot. Nothing else is looked at.
    fn on_catalog_changed(&mut self, changes: ChangeSet, observed: Instant) {
        let started = std::time::Instant::now();
        // Mesh-wide: the first load, a change every proxy's own part reads (MeshConfig, a
        // namespace, a policy), or one in the shared part every proxy of a data plane holds.
        let mut broadcast = !self.view_loaded;
        let targets: Vec<(ProxyKey, bool)> = if !self.view_loaded {
            self.publisher.load(&self.catalog);
            self.view_loaded = true;
            self.nodes.keys().map(|key| (key.clone(), true)).collect()
        } else {
            let refreshed = self.publisher.refresh(&self.catalog, &changes);
            broadcast = matches!(refreshed.scope, fsm_compiler::ProxyScope::All)
                || !refreshed.changed.is_empty();
            self.nodes
                .iter()
                .filter_map(|(key, proxy)| {
                    // What of the mesh its own part was compiled with (all of it before the
                    // first compile).
                    let detail = proxy
                        .own
                        .as_ref()
                        .map_or(fsm_ir::OutboundDetail::All, |own| {
                            if own.own.reads_every_port {
                                fsm_ir::OutboundDetail::All
                            } else {
                                crate::publish::outbound_detail(&own.data_planes)
                            }
                        });
                    let recompile = refreshed.scope.covers(
                        &key.uuid,
                        &key.namespace,
                        &key.service_account,
                        detail,
                    );
                    let shared_changed = proxy.own.as_ref().is_some_and(|own| {
                        own.shared_keys().any(|k| refreshed.changed.contains(&k))
                    });
                    (recompile || shared_changed).then(|| (key.clone(), recompile))
                })
                .collect()
        };
        for (key, recompile) in &targets {
            self.publish(key, *recompile, Some(observed));
        }
        if broadcast {
            fsm_xds_server::metrics::metrics()
                .proxy_broadcast_event_count
                .inc();
        }
        self.retain_shared();
        let work = self.record_work();
        metrics().changes.inc();
        metrics()
            .recompute_seconds
            .observe(started.elapsed().as_secs_f64());
        let mut last = self.state.last_change.write();
        *last = Some(ChangeReport {
            batch: last.map_or(1, |l| l.batch + 1),
            objects: changes.objects.len(),
            work,
        });
        drop(last);
        tracing::debug!(
            objects = changes.objects.len(),
            proxies = targets.len(),
            recompiled = work.proxies_recompiled,
            encoded = work.resources_encoded,
            published = work.snapshots_published,
            elapsed_us = started.elapsed().as_micros() as u64,
            "applied catalog changes"
        );
    }

    /// The trust bundle `pem`, shared with every proxy that carries the same one.
    fn bundle(&mut self, pem: &str) -> Arc<str> {
        if let Some(bundle) = self.bundles.get(pem) {
            return bundle.clone();
        }
        let bundle: Arc<str> = Arc::from(pem);
        self.bundles.insert(bundle.clone());
        bundle
    }

    /// Forgets shared parts (and trust bundles) no connected proxy uses.
    fn retain_shared(&mut self) {
        self.bundles.retain(|b| Arc::strong_count(b) > 1);
        let in_use: std::collections::BTreeSet<SharedKey> = self
            .nodes
            .values()
            .filter_map(|p| p.own.as_ref())
            .flat_map(OwnPart::shared_keys)
            .collect();
        self.publisher.retain_shared(&in_use);
    }

    /// Adds the publisher's work since the last call to the metrics and returns it.
    fn record_work(&mut self) -> Work {
        let work = self.publisher.take_work();
        work.record();
        work
    }

    /// Hands a proxy its snapshot: its own part, recompiled when `recompile` says a change
    /// touched it (or what it was built from changed: data planes, certificate), joined with
    /// the shared parts. Nothing goes out before the proxy is matched to the pod that owns its
    /// UUID with the identity its certificate proves; a proxy that matches no pod (any more) has
    /// its streams closed with the code.
    ///
    /// `observed` is when the change that calls for the new snapshot was seen, stamped on the
    /// types it changes for the streams to measure until the proxy ACKs. The time spent goes
    /// into `fsm_proxy_config_update_time`, per type the new snapshot changed (or, on failure,
    /// per type the proxy is served).
    fn publish(&mut self, key: &ProxyKey, recompile: bool, observed: Option<Instant>) {
        let started = Instant::now();
        let Some(proxy) = self.nodes.get(key) else {
            return;
        };
        let data_planes = proxy.data_planes();
        let identity = identity_of(key);
        let credentials = self.credentials.get(&identity).cloned();
        let stale = match (&proxy.own, &credentials) {
            (Some(own), Some(credentials)) => {
                own.data_planes != data_planes || !Arc::ptr_eq(&own.credentials, credentials)
            }
            _ => true,
        };
        if recompile || stale {
            let mut proxy_state = ProxyState {
                node_id: proxy.node_id.clone(),
                identity: key.service_identity(),
                data_planes: data_planes.clone(),
                pod: None,
                error: None,
                warnings: vec![],
            };
            let compiled = match self.compile_for(key, &data_planes, &mut proxy_state) {
                Ok(compiled) => compiled,
                Err((code, message, refuse)) => {
                    fsm_errcode::warn!(code, proxy = %key, "{message}");
                    config_update_failed(&data_planes, started);
                    let reason = format!("{code}: {message}");
                    if refuse {
                        self.cache.refuse(key, reason.clone());
                        if let Some(proxy) = self.nodes.get_mut(key) {
                            proxy.own = None;
                        }
                    }
                    // Otherwise the last good configuration keeps serving.
                    proxy_state.error = Some(reason);
                    self.state.proxies.write().insert(key.clone(), proxy_state);
                    return;
                }
            };
            let Some(credentials) = credentials else {
                // No configuration before the proxy can authenticate its peers: it is sent,
                // with the certificate, as soon as the certificate exists.
                proxy_state.error =
                    Some(format!("waiting for the service certificate of {identity}"));
                self.state.proxies.write().insert(key.clone(), proxy_state);
                self.request_certificate(identity);
                return;
            };
            match self.publisher.own(&compiled, &credentials, &data_planes) {
                Ok(own) => {
                    proxy_state.warnings.extend(own.warnings.iter().cloned());
                    let trust_bundle = self.bundle(&credentials.trust_bundle_pem);
                    if let Some(proxy) = self.nodes.get_mut(key) {
                        proxy.own = Some(OwnPart {
                            own,
                            data_planes: data_planes.clone(),
                            credentials,
                            trust_bundle,
                        });
                    }
                    self.state.proxies.write().insert(key.clone(), proxy_state);
                }
                Err((code, message)) => {
                    // Keep whatever the proxy had: the last good configuration keeps serving.
                    fsm_errcode::warn!(code, proxy = %key, "{message}");
                    config_update_failed(&data_planes, started);
                    proxy_state.error = Some(format!("{code}: {message}"));
                    self.state.proxies.write().insert(key.clone(), proxy_state);
                    return;
                }
            }
        }
        let Some(own) = self.nodes.get(key).and_then(|p| p.own.as_ref()) else {
            return;
        };
        match self
            .publisher
            .assemble(&own.own, &own.trust_bundle, &own.data_planes)
        {
            Ok(snapshot) => {
                let before = self.cache.get(key);
                let changed: Vec<fsm_cache::TypeUrl> = snapshot
                    .types()
                    .filter(|(type_url, set)| {
                        before
                            .as_ref()
                            .and_then(|b| b.get(type_url))
                            .map(|b| b.version())
                            != Some(set.version())
                    })
                    .map(|(type_url, _)| type_url)
                    .collect();
                if self.cache.set_observed(key, snapshot, observed) {
                    self.publisher.published();
                    let elapsed = started.elapsed().as_secs_f64();
                    let histogram = &fsm_xds_server::metrics::metrics().proxy_config_update_time;
                    for type_url in changed {
                        histogram
                            .with_label_values(&[type_url, "true"])
                            .observe(elapsed);
                    }
                    tracing::debug!(proxy = %key, "published snapshot");
                }
            }
            Err((code, message)) => {
                fsm_errcode::warn!(code, proxy = %key, "{message}");
                let data_planes = own.data_planes.clone();
                config_update_failed(&data_planes, started);
                if let Some(p) = self.state.proxies.write().get_mut(key) {
                    p.error = Some(format!("{code}: {message}"));
                }
            }
        }
    }

    /// Matches the proxy to its pod and compiles its IR. The error says whether the proxy's
    /// identity matches no pod (its streams are then refused).
    fn compile_for(
        &self,
        key: &ProxyKey,
        data_planes: &[DataPlane],
        proxy_state: &mut ProxyState,
    ) -> Result<fsm_compiler::Compiled, (ErrCode, String, bool)> {
        let proxy = ProxyRef {
            uuid: key.uuid.to_string(),
            service_account: key.service_account.to_string(),
            namespace: key.namespace.to_string(),
        };
        let detail = crate::publish::outbound_detail(data_planes);
        let compiled = compile_with_view(&self.catalog, &proxy, self.publisher.view(), detail)
            .map_err(|e| (e.err_code(), e.to_string(), e.is_identity_refusal()))?;
        proxy_state.pod = Some(format!(
            "{}/{}",
            compiled.ir.proxy.namespace, compiled.ir.proxy.pod
        ));
        for warning in &compiled.warnings {
            proxy_state
                .warnings
                .push(format!("{}: {}", warning.code, warning.message));
        }
        Ok(compiled)
    }
}

/// A proxy's configuration could not be updated: `fsm_proxy_config_update_time` with
/// `success="false"` for every type its data planes are served.
fn config_update_failed(data_planes: &[DataPlane], started: Instant) {
    let elapsed = started.elapsed().as_secs_f64();
    let histogram = &fsm_xds_server::metrics::metrics().proxy_config_update_time;
    for data_plane in data_planes {
        for type_url in crate::publish::type_urls(*data_plane) {
            histogram
                .with_label_values(&[type_url, "false"])
                .observe(elapsed);
        }
    }
}

/// The service identity a proxy runs as (one `fsm_identity::ServiceIdentity` everywhere).
fn identity_of(key: &ProxyKey) -> ServiceIdentity {
    ServiceIdentity::from(key)
}

fn service_cert_key(identity: &ServiceIdentity) -> CertKey {
    CertKey::Service {
        identity: identity.clone(),
        trust_domain: TRUST_DOMAIN.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use fsm_cache::Published;
    use fsm_catalog::{Kind, MeshObject, ObjectKey, decode_manifests};
    use fsm_certs::tresor::TresorProvider;
    use fsm_certs::{CertManager, CertManagerConfig};
    use fsm_xds_server::ProxyNode;
    use tokio::sync::mpsc::{Sender, UnboundedSender, channel, unbounded_channel};

    use super::*;

    const CURL_UUID: &str = "6a1f3c2e-1b7d-4c1e-9a3f-0c5d2e8b7a10";
    const ENVOY_CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";

    fn demo() -> Vec<MeshObject> {
        let mut objects = Vec::new();
        for (file, text) in [
            (
                "00-mesh.yaml",
                include_str!("../../../examples/demo/00-mesh.yaml"),
            ),
            (
                "10-curl.yaml",
                include_str!("../../../examples/demo/10-curl.yaml"),
            ),
            (
                "20-httpbin.yaml",
                include_str!("../../../examples/demo/20-httpbin.yaml"),
            ),
        ] {
            let (decoded, errors) = decode_manifests(file, text);
            assert!(errors.is_empty(), "{errors:?}");
            objects.extend(decoded);
        }
        objects
    }

    fn pod(name: &str, service_account: &str) -> MeshObject {
        let yaml = format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: demo, labels: {{fsm-proxy-uuid: {CURL_UUID}}}}}\nspec: {{serviceAccountName: {service_account}, containers: [{{name: c}}]}}\nstatus: {{podIP: 127.0.10.99}}\n"
        );
        decode_manifests("pod.yaml", &yaml).0.remove(0)
    }

    struct Harness {
        cache: Arc<SnapshotCache>,
        state: Arc<State>,
        catalog: Sender<CatalogEvent>,
        proxies: UnboundedSender<ProxyEvent>,
    }

    impl Harness {
        async fn start() -> Harness {
            let cache = Arc::new(SnapshotCache::new());
            let state = Arc::new(State::default());
            let provider = Arc::new(TresorProvider::generate().expect("CA"));
            let certs = CertManager::new(provider, CertManagerConfig::default());
            let runner = Runner::new(
                CatalogSettings::default(),
                cache.clone(),
                state.clone(),
                certs,
            );
            let (catalog, catalog_rx) = channel(fsm_sources::EVENT_QUEUE);
            let (proxies, proxy_rx) = unbounded_channel();
            let (_, admission_rx) = channel(1);
            tokio::spawn(runner.run(catalog_rx, proxy_rx, admission_rx));
            for object in demo() {
                catalog
                    .send(CatalogEvent::Apply(object))
                    .await
                    .expect("runner");
            }
            catalog.send(CatalogEvent::Synced).await.expect("runner");
            Harness {
                cache,
                state,
                catalog,
                proxies,
            }
        }

        /// Opens a stream as the ADS server does: subscribe, then announce it.
        fn connect(
            &self,
            stream: u64,
            service_account: &str,
            data_plane: DataPlane,
        ) -> (ProxyKey, watch::Receiver<Published>) {
            self.connect_as(stream, CURL_UUID, service_account, data_plane)
        }

        fn connect_as(
            &self,
            stream: u64,
            uuid: &str,
            service_account: &str,
            data_plane: DataPlane,
        ) -> (ProxyKey, watch::Receiver<Published>) {
            let node_id = format!("{uuid}.sidecar.{service_account}.demo");
            let node = ProxyNode::parse(&node_id, "").expect("node id");
            let key = node.key();
            let rx = self.cache.subscribe(&key);
            self.proxies
                .send(ProxyEvent::Connected {
                    stream: StreamId(stream),
                    node,
                    data_plane,
                })
                .expect("runner");
            (key, rx)
        }

        fn disconnect(&self, stream: u64, key: &ProxyKey) {
            self.cache.unsubscribe(key);
            self.proxies
                .send(ProxyEvent::Disconnected {
                    stream: StreamId(stream),
                    proxy: key.clone(),
                })
                .expect("runner");
        }
    }

    /// A harness with curl's and httpbin-v1's Envoy streams, each holding its first snapshot
    /// (with EDS) when this returns.
    async fn curl_and_httpbin() -> (
        Harness,
        watch::Receiver<Published>,
        watch::Receiver<Published>,
    ) {
        let h = Harness::start().await;
        let (_, mut curl) = h.connect(1, "curl", DataPlane::Envoy);
        let (_, mut httpbin) = h.connect_as(2, HTTPBIN_V1_UUID, "httpbin", DataPlane::Envoy);
        until(&mut curl, "curl", |p| has_type(p, ENVOY_EDS)).await;
        until(&mut httpbin, "httpbin", |p| has_type(p, ENVOY_EDS)).await;
        (h, curl, httpbin)
    }

    async fn until(
        rx: &mut watch::Receiver<Published>,
        what: &str,
        done: impl Fn(&Published) -> bool,
    ) -> Published {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let now = rx.borrow_and_update().clone();
                if done(&now) {
                    return now;
                }
                rx.changed().await.expect("cache entry");
            }
        })
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}: {:?}", *rx.borrow()))
    }

    /// Applies `objects` as one batch and returns what it cost, once the runner has applied it.
    async fn change(h: &Harness, objects: Vec<MeshObject>) -> ChangeReport {
        let before = h.state.last_change().map_or(0, |r| r.batch);
        for object in objects {
            h.catalog
                .send(CatalogEvent::Apply(object))
                .await
                .expect("runner");
        }
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Some(report) = h.state.last_change().filter(|r| r.batch > before) {
                    return report;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the runner applies the change")
    }

    fn versions(published: &Published) -> BTreeMap<fsm_cache::TypeUrl, Arc<str>> {
        published.snapshot().expect("a snapshot").versions()
    }

    fn manifest(yaml: &str) -> MeshObject {
        let (mut objects, errors) = decode_manifests("change.yaml", yaml);
        assert!(errors.is_empty(), "{errors:?}");
        objects.remove(0)
    }

    const HTTPBIN_V1_UUID: &str = "0f7b0e6c-3a52-4d7e-8f1b-2a9c4d6e8f01";
    const ENVOY_EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

    #[tokio::test]
    async fn an_endpoint_change_recompiles_no_proxy_and_pushes_one_load_assignment() {
        let (h, mut curl, mut httpbin) = curl_and_httpbin().await;
        let curl_before = versions(&curl.borrow_and_update());
        let httpbin_before = versions(&httpbin.borrow_and_update());
        let curl_key = ProxyNode::parse(&format!("{CURL_UUID}.sidecar.curl.demo"), "")
            .expect("node id")
            .key();
        let stamps = h.cache.observed(&curl_key).expect("connected");
        let every_type = fsm_xds_server::protocol::ENVOY_TYPES;
        stamps.take(&every_type);
        let m = fsm_xds_server::metrics::metrics();
        let eds_updates = || {
            m.proxy_config_update_time
                .with_label_values(&[ENVOY_EDS, "true"])
                .get_sample_count()
        };
        let (updates_before, broadcasts_before) =
            (eds_updates(), m.proxy_broadcast_event_count.get());

        // httpbin-v2 leaves the Endpoints.
        let report = change(
            &h,
            vec![manifest(
                "apiVersion: v1\nkind: Endpoints\nmetadata: {name: httpbin, namespace: demo}\nsubsets:\n- addresses:\n  - ip: 127.0.10.1\n    targetRef: {kind: Pod, name: httpbin-v1, namespace: demo}\n  ports:\n  - {name: http, port: 14001}\n",
            )],
        )
        .await;
        assert_eq!(
            report.work,
            Work {
                proxies_recompiled: 0,
                resources_encoded: 1,
                snapshots_published: 2,
            },
            "one ClusterLoadAssignment, encoded once, handed to both proxies"
        );
        for (rx, before) in [(&mut curl, curl_before), (&mut httpbin, httpbin_before)] {
            let after = versions(&rx.borrow_and_update());
            let changed: Vec<&str> = after
                .iter()
                .filter(|(t, v)| before.get(*t) != Some(*v))
                .map(|(t, _)| *t)
                .collect();
            assert_eq!(changed, vec![ENVOY_EDS], "only EDS changes");
        }
        // Both proxies hold the very same EDS set.
        let curl_eds = curl
            .borrow()
            .snapshot()
            .expect("snapshot")
            .get_shared(ENVOY_EDS)
            .cloned();
        let httpbin_eds = httpbin
            .borrow()
            .snapshot()
            .expect("snapshot")
            .get_shared(ENVOY_EDS)
            .cloned();
        assert!(Arc::ptr_eq(
            &curl_eds.expect("EDS"),
            &httpbin_eds.expect("EDS")
        ));
        // Each proxy's EDS update timed, the shared change counted as a broadcast, and the time
        // it was observed stamped on EDS alone, for the stream to measure until the ACK.
        assert!(eds_updates() >= updates_before + 2);
        assert!(m.proxy_broadcast_event_count.get() > broadcasts_before);
        let stamped: Vec<&str> = stamps.take(&every_type).iter().map(|(t, _)| *t).collect();
        assert_eq!(stamped, [ENVOY_EDS]);
    }

    #[tokio::test]
    async fn a_new_pod_recompiles_only_the_proxies_it_concerns() {
        let (h, _curl, mut httpbin) = curl_and_httpbin().await;
        let before = versions(&httpbin.borrow_and_update());

        // A third httpbin pod joins: nobody's configuration depends on it until it is an
        // endpoint (its own proxy is not connected yet).
        let new_uuid = "0f7b0e6c-3a52-4d7e-8f1b-2a9c4d6e8f03";
        let report = change(
            &h,
            vec![manifest(&format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: httpbin-v3, namespace: demo, labels: {{app: httpbin, version: v3, fsm-proxy-uuid: {new_uuid}}}}}\nspec: {{serviceAccountName: httpbin, containers: [{{name: httpbin, ports: [{{name: http, containerPort: 14001}}]}}]}}\nstatus: {{podIP: 127.0.10.3}}\n"
            ))],
        )
        .await;
        assert_eq!(report.work, Work::default(), "{report:?}");

        // Its proxy connects: only it is compiled; its own resources are encoded, the shared
        // ones are reused.
        let (_, mut third) = h.connect_as(3, new_uuid, "httpbin", DataPlane::Envoy);
        until(&mut third, "the new pod's snapshot", |p| {
            has_type(p, ENVOY_EDS)
        })
        .await;
        assert_eq!(versions(&httpbin.borrow_and_update()), before);

        // A change to one pod recompiles that pod's proxy only.
        let report = change(
            &h,
            vec![manifest(&format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: httpbin-v3, namespace: demo, labels: {{app: httpbin, version: v3b, fsm-proxy-uuid: {new_uuid}}}}}\nspec: {{serviceAccountName: httpbin, containers: [{{name: httpbin, ports: [{{name: http, containerPort: 14001}}]}}]}}\nstatus: {{podIP: 127.0.10.3}}\n"
            ))],
        )
        .await;
        assert_eq!(report.work.proxies_recompiled, 1, "{report:?}");
    }

    /// A TrafficTarget recompiles the proxies of its destination's service account only, and
    /// encodes nothing shared.
    #[tokio::test]
    async fn a_traffic_target_recompiles_only_its_destination() {
        let (h, _curl, _httpbin) = curl_and_httpbin().await;
        let report = change(
            &h,
            vec![manifest(
                "apiVersion: access.smi-spec.io/v1alpha3\nkind: TrafficTarget\nmetadata: {name: curl-to-httpbin, namespace: demo}\nspec:\n  destination: {kind: ServiceAccount, name: httpbin, namespace: demo}\n  sources: [{kind: ServiceAccount, name: curl, namespace: demo}]\n  rules: [{kind: HTTPRouteGroup, name: routes}]\n",
            )],
        )
        .await;
        assert_eq!(report.work.proxies_recompiled, 1, "{report:?}");
    }

    /// A split of an HTTP service changes the shared routes only: no Envoy proxy's own part
    /// (which reads the TCP services) is recompiled.
    #[tokio::test]
    async fn an_http_traffic_split_recompiles_no_envoy_proxy() {
        let (h, _curl, _httpbin) = curl_and_httpbin().await;
        let report = change(
            &h,
            vec![manifest(
                "apiVersion: split.smi-spec.io/v1alpha4\nkind: TrafficSplit\nmetadata: {name: split, namespace: demo}\nspec:\n  service: httpbin\n  backends: [{service: httpbin, weight: 3}]\n",
            )],
        )
        .await;
        assert_eq!(report.work.proxies_recompiled, 0, "{report:?}");
        // The outbound routes are built again (one backend's route names its cluster whatever
        // its weight, so the bytes, and what the proxies hold, are the same).
        assert_eq!(report.work.resources_encoded, 1, "{report:?}");
    }

    /// A Retry recompiles its source's proxies only, which then hold their own outbound routes
    /// (with the retry); other proxies keep the shared ones.
    #[tokio::test]
    async fn a_retry_recompiles_its_source_and_gives_it_its_own_routes() {
        const ENVOY_RDS: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
        let (h, mut curl, mut httpbin) = curl_and_httpbin().await;
        change(
            &h,
            vec![manifest(
                "apiVersion: config.flomesh.io/v1alpha3\nkind: MeshConfig\nmetadata: {name: fsm-mesh-config, namespace: fsm-system}\nspec:\n  traffic: {enablePermissiveTrafficPolicyMode: true}\n  sidecar: {localProxyMode: PodIP}\n  featureFlags: {enableRetryPolicy: true}\n",
            )],
        )
        .await;
        let routes = |rx: &mut watch::Receiver<Published>| {
            rx.borrow_and_update()
                .snapshot()
                .and_then(|s| s.get(ENVOY_RDS).cloned())
                .expect("RDS")
        };
        let (curl_before, httpbin_before) = (routes(&mut curl), routes(&mut httpbin));
        let report = change(
            &h,
            vec![manifest(
                "apiVersion: policy.flomesh.io/v1alpha1\nkind: Retry\nmetadata: {name: retry, namespace: demo}\nspec:\n  source: {kind: ServiceAccount, name: curl, namespace: demo}\n  destinations: [{kind: Service, name: httpbin, namespace: demo}]\n  retryPolicy: {retryOn: 5xx, numRetries: 3}\n",
            )],
        )
        .await;
        assert_eq!(report.work.proxies_recompiled, 1, "{report:?}");
        let (curl_after, httpbin_after) = (routes(&mut curl), routes(&mut httpbin));
        assert_ne!(
            curl_after.version(),
            curl_before.version(),
            "curl's routes retry"
        );
        assert_eq!(httpbin_after.version(), httpbin_before.version());
    }

    fn has_type(published: &Published, type_url: &str) -> bool {
        published
            .snapshot()
            .is_some_and(|s| s.get(type_url).is_some())
    }

    #[tokio::test]
    async fn each_data_plane_in_use_is_computed_and_dropped_with_its_last_stream() {
        let h = Harness::start().await;
        let (key, mut envoy) = h.connect(1, "curl", DataPlane::Envoy);
        let first = until(&mut envoy, "curl's Envoy snapshot", |p| {
            has_type(p, ENVOY_CDS)
        })
        .await;
        let native = fsm_dataplane_proto::ALL_TYPE_URLS[0];
        assert!(
            !has_type(&first, native),
            "no stream asked for native types"
        );

        let (_, mut sidecar) = h.connect(2, "curl", DataPlane::FsmSidecar);
        let both = until(&mut sidecar, "native types", |p| has_type(p, native)).await;
        let envoy_cds = |p: &Published| p.snapshot().and_then(|s| s.get(ENVOY_CDS).cloned());
        assert_eq!(
            envoy_cds(&both),
            envoy_cds(&first),
            "another stream's data plane leaves this one's resources alone"
        );

        h.disconnect(2, &key);
        until(&mut envoy, "native types dropped", |p| {
            has_type(p, ENVOY_CDS) && !has_type(p, native)
        })
        .await;
        assert_eq!(h.state.proxies()[&key].data_planes, [DataPlane::Envoy]);

        // The last stream gone, nothing of the proxy is kept, and a later change leaves no entry.
        h.disconnect(1, &key);
        h.catalog
            .send(CatalogEvent::Apply(pod("other", "other")))
            .await
            .expect("runner");
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(h.state.proxies().is_empty(), "{:?}", h.state.proxies());
        assert!(h.cache.status().is_empty());
    }

    #[tokio::test]
    async fn a_copied_uuid_is_refused_and_the_owner_keeps_its_snapshot() {
        let h = Harness::start().await;
        let (curl, mut curl_rx) = h.connect(1, "curl", DataPlane::Envoy);
        let before = until(&mut curl_rx, "curl's snapshot", |p| has_type(p, ENVOY_CDS)).await;

        h.catalog
            .send(CatalogEvent::Apply(pod("evil", "evil")))
            .await
            .expect("runner");
        // The catalog and the streams are separate inputs: connect once the pod is known, as a
        // sidecar can only start after its pod exists.
        tokio::time::timeout(Duration::from_secs(10), async {
            while !h
                .state
                .rejected()
                .iter()
                .any(|p| p.starts_with("E5004") && p.contains("demo/evil"))
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the impostor pod reported with E5004");
        let failed = || {
            fsm_xds_server::metrics::metrics()
                .proxy_config_update_time
                .with_label_values(&[ENVOY_CDS, "false"])
                .get_sample_count()
        };
        let failed_before = failed();
        let (evil, mut evil_rx) = h.connect(2, "evil", DataPlane::Envoy);
        assert_ne!(
            evil, curl,
            "the same UUID under another identity is another proxy"
        );
        let refused = until(&mut evil_rx, "the impostor refused", |p| {
            matches!(p, Published::Refused(_))
        })
        .await;
        let Published::Refused(reason) = refused else {
            unreachable!()
        };
        assert!(reason.starts_with("E5004"), "{reason}");
        assert!(
            failed() > failed_before,
            "a refused update is timed as failed"
        );
        assert!(
            reason.contains("demo/evil") && reason.contains("demo/curl"),
            "{reason}"
        );
        assert!(
            h.state
                .rejected()
                .iter()
                .any(|p| p.starts_with("E5004") && p.contains("demo/evil")),
            "{:?}",
            h.state.rejected()
        );
        assert_eq!(
            *curl_rx.borrow(),
            before,
            "the owner's snapshot is untouched"
        );

        // The owner's pod goes: its stream is closed with the code instead of serving on.
        let curl_pod = ObjectKey {
            kind: Kind::Pod,
            namespace: "demo".into(),
            name: "curl".into(),
        };
        h.catalog
            .send(CatalogEvent::Delete(curl_pod))
            .await
            .expect("runner");
        let gone = until(&mut curl_rx, "curl refused", |p| {
            matches!(p, Published::Refused(_))
        })
        .await;
        let Published::Refused(reason) = gone else {
            unreachable!()
        };
        assert!(
            reason.starts_with("E5010") || reason.starts_with("E5002"),
            "{reason}"
        );
    }

    #[tokio::test]
    async fn a_certificate_fetched_before_a_rotation_does_not_overwrite_it() {
        let cache = Arc::new(SnapshotCache::new());
        let provider = Arc::new(TresorProvider::generate().expect("CA"));
        let certs = CertManager::new(provider, CertManagerConfig::default());
        let mut runner = Runner::new(
            CatalogSettings::default(),
            cache,
            Arc::new(State::default()),
            certs.clone(),
        );
        let identity = ServiceIdentity {
            service_account: "curl".into(),
            namespace: "demo".into(),
        };
        let key = ProxyKey::new(
            CURL_UUID,
            fsm_xds_server::ProxyKind::Sidecar,
            "curl",
            "demo",
        );
        runner
            .by_identity
            .entry(identity.clone())
            .or_default()
            .insert(key);
        let ca = TresorProvider::generate().expect("CA");
        let issue = || {
            let request = fsm_certs::CertificateRequest::new(
                "curl.demo.cluster.local",
                Duration::from_secs(3600),
            )
            .with_uri_san("spiffe://cluster.local/ns/demo/sa/curl");
            Arc::new(ca.ca().issue(&request).expect("issue"))
        };
        let fetched_before = issue();
        let rotated = issue();
        assert_ne!(fetched_before.cert_chain_pem, rotated.cert_chain_pem);
        // The rotation is announced (epoch 1) before the earlier fetch (epoch 0) comes back.
        runner.cert_epochs.insert(identity.clone(), 1);
        runner.on_certificate(CertUpdate::Issued {
            identity: identity.clone(),
            result: Ok(rotated.clone()),
            epoch: 1,
        });
        runner.on_certificate(CertUpdate::Issued {
            identity: identity.clone(),
            result: Ok(fetched_before),
            epoch: 0,
        });
        assert_eq!(
            runner.credentials[&identity].cert_chain_pem, rotated.cert_chain_pem,
            "the stale certificate replaced the rotated one"
        );
    }
}
