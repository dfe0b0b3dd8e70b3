//! What a delta client holds, as a shared type snapshot plus the few ways it differs from it.
//!
//! After a response that leaves the client with exactly the resources of the type snapshot at
//! hand (the usual case: a wildcard subscriber, or names covering the whole type, with nothing
//! rejected), the stream keeps just a reference to that snapshot, shared with every other
//! stream and with the cache. Only differences are stored per stream: names it holds in
//! another version (or that the snapshot lacks) and names of the snapshot it does not hold. So
//! per-stream memory does not grow with the size of the configuration, and a snapshot change
//! that left a type's shared set untouched costs that type nothing to check.

use std::sync::Arc;

use fsm_cache::{NameId, Names, Resource, TypeSnapshot};

use super::ids::{IdSet, VersionMap};

#[derive(Debug, Default)]
pub(super) struct Held {
    /// Every resource of this snapshot is held in its version, except `gone` and `over`.
    base: Option<Arc<TypeSnapshot>>,
    /// Held versions differing from `base` (or for names `base` lacks).
    over: VersionMap,
    /// Names of `base` not held. Disjoint from `over`.
    gone: IdSet,
}

impl Held {
    /// What a client resumed with (`initial_resource_versions`).
    pub fn from_versions(versions: VersionMap) -> Self {
        Held {
            over: versions,
            ..Held::default()
        }
    }

    fn base_get(&self, name: &str) -> Option<&Arc<Resource>> {
        self.base.as_ref().and_then(|b| b.get(name))
    }

    /// The version the client holds of `resource`'s name, if any.
    pub fn version_of(&self, resource: &Resource) -> Option<u64> {
        let id = resource.id();
        if let Some(version) = self.over.get(id) {
            return Some(version);
        }
        if self.gone.contains(id) {
            return None;
        }
        self.base_get(&resource.name).map(|held| {
            if std::ptr::eq(&**held, resource) {
                resource.version_key()
            } else {
                held.version_key()
            }
        })
    }

    pub fn contains(&self, id: NameId) -> bool {
        self.over.contains(id)
            || (!self.gone.contains(id)
                && self.base.is_some()
                && NameId::with_names(|names| self.base_get(names.str(id)).is_some()))
    }

    /// Forgets the name; returns whether it was held.
    pub fn remove(&mut self, id: NameId) -> bool {
        let in_base = self.base.is_some()
            && NameId::with_names(|names| self.base_get(names.str(id)).is_some());
        let in_over = self.over.remove(id).is_some();
        if in_base {
            return self.gone.insert(id) || in_over;
        }
        in_over
    }

    /// Keeps only the names `keep` accepts.
    pub fn retain(&mut self, keep: impl Fn(NameId) -> bool) {
        self.over.retain(|id, _| keep(id));
        if let Some(base) = &self.base {
            for r in base.resources() {
                if !keep(r.id()) {
                    self.gone.insert(r.id());
                }
            }
        }
    }

    /// Records that the client was sent these resources.
    pub fn set(&mut self, sent: &[Arc<Resource>]) {
        let mut differ = Vec::new();
        for r in sent {
            let id = r.id();
            self.gone.remove(id);
            match self.base_get(&r.name) {
                Some(held) if held.version == r.version => {
                    self.over.remove(id);
                }
                _ => differ.push((id, r.version_key())),
            }
        }
        self.over.extend(differ);
    }

    /// The client holds exactly `types`: keep a reference instead of the differences.
    pub fn rebase(&mut self, types: &Arc<TypeSnapshot>) {
        self.base = Some(types.clone());
        self.over = VersionMap::default();
        self.gone = IdSet::default();
    }

    /// Whether the client holds exactly `types` without a stored difference.
    pub fn is_exactly(&self, types: &Arc<TypeSnapshot>) -> bool {
        self.over.is_empty()
            && self.gone.len() == 0
            && self.base.as_ref().is_some_and(|b| Arc::ptr_eq(b, types))
    }

    /// The type snapshot the client holds exactly, when it holds one without a difference.
    pub fn exact(&self) -> Option<&Arc<TypeSnapshot>> {
        self.base
            .as_ref()
            .filter(|_| self.over.is_empty() && self.gone.len() == 0)
    }

    pub fn is_empty(&self) -> bool {
        self.over.is_empty()
            && self
                .base
                .as_ref()
                .is_none_or(|b| b.len() == self.gone.len())
    }

    /// Calls `f` for every held name that `types` lacks. Names held as part of `types` itself
    /// are not looked at.
    pub fn absent_from(
        &self,
        types: Option<&Arc<TypeSnapshot>>,
        names: &Names<'_>,
        mut f: impl FnMut(NameId, Arc<str>),
    ) {
        let lacks = |name: &str| types.and_then(|t| t.get(name)).is_none();
        for id in self.over.ids() {
            if lacks(names.str(id)) {
                f(id, names.get(id));
            }
        }
        if let Some(base) = &self.base
            && !types.is_some_and(|t| Arc::ptr_eq(t, base))
        {
            for r in base.resources() {
                let id = r.id();
                if !self.gone.contains(id) && !self.over.contains(id) && lacks(&r.name) {
                    f(id, r.name.clone());
                }
            }
        }
    }
}
