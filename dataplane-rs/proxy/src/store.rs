//! The config store: the validated [`Config`] and the raw resources it came from, each swapped
//! atomically, plus a change signal for the listener manager.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;
use fsm_sidecar_xds::{ConfigSink, ResourceSet};
use tokio::sync::watch;

use crate::config::Config;

#[derive(Debug)]
pub struct Store {
    config: ArcSwap<Config>,
    resources: ArcSwap<ResourceSet>,
    ready: AtomicBool,
    generation: watch::Sender<u64>,
}

impl Default for Store {
    fn default() -> Self {
        Store {
            config: ArcSwap::from_pointee(Config::default()),
            resources: ArcSwap::from_pointee(ResourceSet::default()),
            ready: AtomicBool::new(false),
            generation: watch::channel(0).0,
        }
    }
}

impl Store {
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    /// The accepted resources with their versions and each type's last NACK.
    pub fn resources(&self) -> Arc<ResourceSet> {
        self.resources.load_full()
    }

    /// The first clusters and listeners are applied.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Wakes on every applied config.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Installs an already validated config (also used by tests that bypass xDS).
    pub fn install(&self, config: Config, resources: ResourceSet) {
        let ready = [
            fsm_dataplane_proto::type_url::CLUSTER,
            fsm_dataplane_proto::type_url::LISTENER,
        ]
        .iter()
        .all(|t| resources.get(t).is_some_and(|s| s.received));
        self.config.store(Arc::new(config));
        self.resources.store(Arc::new(resources));
        if ready {
            self.ready.store(true, Ordering::Release);
        }
        self.generation.send_modify(|g| *g += 1);
    }
}

/// The xDS client's view of the store: validate, then install.
#[derive(Clone, Debug)]
pub struct StoreSink(pub Arc<Store>);

impl ConfigSink for StoreSink {
    fn try_apply(&mut self, candidate: &ResourceSet, changed: &'static str) -> Result<(), String> {
        let config = Config::build(candidate, changed).map_err(|e| e.0)?;
        self.0.install(config, candidate.clone());
        Ok(())
    }

    fn on_nack(&mut self, current: &ResourceSet) {
        // Only the NACK bookkeeping changed; the running config stays as it is.
        self.0.resources.store(Arc::new(current.clone()));
    }
}
