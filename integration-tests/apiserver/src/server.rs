//! Starting, stopping and restarting the server, and what tests get to drive it.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use parking_lot::Mutex;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::admission::Admission;
use crate::counters::{Counters, Verb};
use crate::http::{AppState, router};
use crate::store::Store;

/// Namespaces every real cluster starts with.
const SYSTEM_NAMESPACES: [&str; 4] = ["default", "kube-system", "kube-public", "kube-node-lease"];
/// How long `stop` waits for open connections to finish before dropping them.
const STOP_GRACE: Duration = Duration::from_secs(5);

// === Types ===

/// Configuration of a test API server; see [`ApiServer::builder`].
#[derive(Debug, Clone)]
pub struct ApiServer {
    bind: SocketAddr,
    crd_dir: Option<PathBuf>,
    bookmark_interval: Duration,
    history_limit: usize,
    system_namespaces: bool,
}

/// Builder for [`ApiServer`].
#[derive(Debug, Clone)]
pub struct ApiServerBuilder {
    server: ApiServer,
}

/// A started server. Dropping it stops serving.
pub struct RunningApiServer {
    addr: SocketAddr,
    store: Store,
    counters: Arc<Counters>,
    admission: Arc<Admission>,
    bookmark_interval: Duration,
    /// Bumped by [`RunningApiServer::close_watches`] to end every open watch.
    watch_epoch: watch::Sender<u64>,
    serving: Mutex<Option<Serving>>,
}

struct Serving {
    shutdown: oneshot::Sender<()>,
    /// Tells this generation's watches to end (and any that start during shutdown).
    watches_shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
}

// === ApiServer ===

impl Default for ApiServer {
    fn default() -> Self {
        ApiServer {
            bind: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            crd_dir: None,
            bookmark_interval: Duration::from_secs(60),
            history_limit: 50_000,
            system_namespaces: true,
        }
    }
}

impl ApiServer {
    pub fn builder() -> ApiServerBuilder {
        ApiServerBuilder {
            server: ApiServer::default(),
        }
    }

    /// Loads CRDs, creates the system namespaces and starts serving.
    pub async fn start(self) -> anyhow::Result<RunningApiServer> {
        let store = Store::new(self.history_limit);
        if self.system_namespaces {
            for ns in SYSTEM_NAMESPACES {
                store
                    .create(
                        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
                    )
                    .with_context(|| format!("creating namespace {ns}"))?;
            }
        }
        if let Some(dir) = &self.crd_dir {
            let n = store.load_crd_dir(dir)?;
            tracing::info!(dir = %dir.display(), crds = n, "loaded CRDs");
        }
        let listener = TcpListener::bind(self.bind)
            .await
            .with_context(|| format!("binding {}", self.bind))?;
        let addr = listener.local_addr()?;
        let (watch_epoch, _) = watch::channel(0);
        let server = RunningApiServer {
            addr,
            admission: Arc::new(Admission::new(store.clone())),
            store,
            counters: Arc::new(Counters::default()),
            bookmark_interval: self.bookmark_interval,
            watch_epoch,
            serving: Mutex::new(None),
        };
        server.serve(listener);
        tracing::info!(url = %server.url(), "test API server listening");
        Ok(server)
    }
}

impl ApiServerBuilder {
    /// Listen address; default `127.0.0.1:0` (a free port).
    pub fn bind(mut self, addr: SocketAddr) -> Self {
        self.server.bind = addr;
        self
    }

    /// Load every CustomResourceDefinition under this directory at start.
    pub fn crd_dir(mut self, dir: impl AsRef<Path>) -> Self {
        self.server.crd_dir = Some(dir.as_ref().to_path_buf());
        self
    }

    /// How often watches with `allowWatchBookmarks=true` get a BOOKMARK; default 60s.
    pub fn bookmark_interval(mut self, interval: Duration) -> Self {
        self.server.bookmark_interval = interval.max(Duration::from_millis(10));
        self
    }

    /// How many events are kept for watches to resume from; default 50 000. Older
    /// resourceVersions get 410 Gone.
    pub fn history_limit(mut self, events: usize) -> Self {
        self.server.history_limit = events;
        self
    }

    /// Whether to create `default`, `kube-system`, `kube-public` and `kube-node-lease` at
    /// start, as a real cluster has them; default true.
    pub fn system_namespaces(mut self, create: bool) -> Self {
        self.server.system_namespaces = create;
        self
    }

    pub fn build(self) -> ApiServer {
        self.server
    }

    pub async fn start(self) -> anyhow::Result<RunningApiServer> {
        self.server.start().await
    }
}

// === RunningApiServer ===

impl RunningApiServer {
    fn serve(&self, listener: TcpListener) {
        let (watches_shutdown, watches_shutdown_rx) = watch::channel(false);
        let state = AppState {
            store: self.store.clone(),
            counters: self.counters.clone(),
            admission: self.admission.clone(),
            bookmark_interval: self.bookmark_interval,
            addr: self.addr,
            epoch: self.watch_epoch.subscribe(),
            shutdown: watches_shutdown_rx,
        };
        let (shutdown, shutdown_rx) = oneshot::channel::<()>();
        let app = router(state);
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = shutdown_rx.await;
                })
                .await;
            if let Err(e) = served {
                tracing::warn!(error = %e, "test API server stopped with an error");
            }
        });
        *self.serving.lock() = Some(Serving {
            shutdown,
            watches_shutdown,
            task,
        });
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The state, for in-process loads and checks. It outlives [`RunningApiServer::stop`].
    pub fn store(&self) -> Store {
        self.store.clone()
    }

    /// A kube client for this server (plain HTTP, no auth, default namespace `default`).
    ///
    /// # Panics
    /// If kube-rs cannot build a client for a plain-HTTP loopback URL, which would be a bug.
    pub fn client(&self) -> kube::Client {
        self.try_client()
            .expect("a plain-HTTP loopback kube config always builds a client")
    }

    pub fn try_client(&self) -> anyhow::Result<kube::Client> {
        let uri: http::Uri = self.url().parse()?;
        Ok(kube::Client::try_from(kube::Config::new(uri))?)
    }

    /// A kubeconfig document for this server (one cluster, context and user; no auth).
    pub fn kubeconfig_yaml(&self) -> String {
        let doc = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fsm-test", "cluster": {"server": self.url()}}],
            "users": [{"name": "fsm-test", "user": {}}],
            "contexts": [{"name": "fsm-test", "context": {"cluster": "fsm-test", "user": "fsm-test", "namespace": "default"}}],
            "current-context": "fsm-test",
            "preferences": {},
        });
        serde_yaml_ng::to_string(&doc).unwrap_or_default()
    }

    /// Writes [`RunningApiServer::kubeconfig_yaml`] to `path` (for `KUBECONFIG` or
    /// `kube::Config::from_custom_kubeconfig`).
    pub fn write_kubeconfig(&self, path: impl AsRef<Path>) -> anyhow::Result<()> {
        let path = path.as_ref();
        std::fs::write(path, self.kubeconfig_yaml())
            .with_context(|| format!("writing {}", path.display()))
    }

    /// See [`Store::compact`]: watches and list continuations from before now get 410 Gone.
    pub fn compact(&self) -> u64 {
        self.store.compact()
    }

    /// Ends every open watch stream (clients see a clean end of stream and re-watch from their
    /// last resourceVersion), without stopping the server.
    pub fn close_watches(&self) {
        self.watch_epoch.send_modify(|e| *e += 1);
    }

    pub fn is_running(&self) -> bool {
        self.serving.lock().is_some()
    }

    /// Stops accepting connections and ends every open watch and connection. The state is kept
    /// for [`RunningApiServer::restart`].
    pub async fn stop(&self) {
        let serving = self.serving.lock().take();
        let Some(serving) = serving else {
            return;
        };
        serving.watches_shutdown.send_replace(true);
        let _ = serving.shutdown.send(());
        let abort = serving.task.abort_handle();
        if tokio::time::timeout(STOP_GRACE, serving.task)
            .await
            .is_err()
        {
            tracing::warn!("connections still open after {STOP_GRACE:?}; dropping them");
            abort.abort();
        }
    }

    /// Serves again on the same address with the same state (stopping first if running).
    pub async fn restart(&self) -> anyhow::Result<()> {
        self.stop().await;
        let mut last_err = None;
        // The port can take a moment to become bindable after the old listener closed.
        for _ in 0..50 {
            match TcpListener::bind(self.addr).await {
                Ok(listener) => {
                    self.serve(listener);
                    return Ok(());
                }
                Err(e) => {
                    last_err = Some(e);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        Err(anyhow::anyhow!(
            "rebinding {}: {}",
            self.addr,
            last_err.map(|e| e.to_string()).unwrap_or_default()
        ))
    }

    /// Requests seen with `verb`, over all resources.
    pub fn request_count(&self, verb: Verb) -> u64 {
        self.counters.count(verb)
    }

    /// Requests seen with `verb` on one resource (plural, e.g. `"services"`).
    pub fn request_count_for(&self, verb: Verb, resource: &str) -> u64 {
        self.counters.count_for(verb, resource)
    }

    pub fn request_counts(&self) -> BTreeMap<Verb, u64> {
        self.counters.snapshot()
    }

    pub fn reset_request_counts(&self) {
        self.counters.reset();
    }

    /// How many times the admission webhook named `name` (`webhooks[].name` of a
    /// Mutating/ValidatingWebhookConfiguration) has been called, failed calls included.
    pub fn admission_calls(&self, name: &str) -> u64 {
        self.admission.calls(name)
    }
}

impl Drop for RunningApiServer {
    fn drop(&mut self) {
        if let Some(serving) = self.serving.lock().take() {
            serving.watches_shutdown.send_replace(true);
            let _ = serving.shutdown.send(());
        }
    }
}
