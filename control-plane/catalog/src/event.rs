use crate::{Kind, MeshObject, ObjectKey};

/// What every source emits, whatever it watches (kube-runtime's watcher vocabulary).
///
/// A (re)list is `Init(scope)`, any number of `InitApply`, then `InitDone(scope)`: the catalog
/// swaps the listed set in atomically at `InitDone`, so a relist never shows a half-empty mesh,
/// and objects of the scope missing from the new list are deleted. Kubernetes watchers relist one
/// kind each, independently; the manifest directory relists everything at once.
#[derive(Clone, Debug, PartialEq)]
pub enum CatalogEvent {
    Init(Scope),
    InitApply(MeshObject),
    InitDone(Scope),
    Apply(MeshObject),
    Delete(ObjectKey),
    /// The source has delivered its initial state of every kind it watches: from now on the
    /// catalog is complete enough to serve proxies.
    Synced,
}

/// Which kinds a relist covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    All,
    Kind(Kind),
}

impl Scope {
    pub fn covers(self, kind: Kind) -> bool {
        match self {
            Scope::All => true,
            Scope::Kind(k) => k == kind,
        }
    }
}
