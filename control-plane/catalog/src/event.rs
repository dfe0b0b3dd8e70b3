use crate::{MeshObject, ObjectKey};

/// What every source emits, whatever it watches (kube-runtime's watcher vocabulary).
///
/// A (re)list is `Init`, any number of `InitApply`, then `InitDone`: the catalog swaps the listed
/// set in atomically at `InitDone`, so a relist never shows a half-empty mesh and objects missing
/// from the new list are deleted.
#[derive(Clone, Debug, PartialEq)]
pub enum CatalogEvent {
    Init,
    InitApply(MeshObject),
    InitDone,
    Apply(MeshObject),
    Delete(ObjectKey),
}
