//! Starting one watcher per kind of the catalog's kind table.

use fsm_catalog::{KindVisitor, MeshKind};
use kube::Client;
use tokio::task::JoinHandle;

use crate::kube::{WatchContext, spawn_watch};

/// Starts the watcher of the visited kind.
pub(crate) struct SpawnWatch {
    pub client: Client,
    pub ctx: WatchContext,
}

impl KindVisitor for SpawnWatch {
    type Output = JoinHandle<()>;
    fn visit<K: MeshKind>(self) -> JoinHandle<()> {
        spawn_watch::<K>(self.client, self.ctx)
    }
}
