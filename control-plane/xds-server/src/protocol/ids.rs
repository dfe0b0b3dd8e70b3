//! Compact per-stream sets and maps over interned resource names: sorted vectors, 4 bytes per
//! name in a set and 12 per name → version entry (a B-tree of strings took ~100).

use fsm_cache::NameId;

/// A set of names, sorted by id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct IdSet(Vec<NameId>);

impl IdSet {
    pub fn contains(&self, id: NameId) -> bool {
        self.0.binary_search(&id).is_ok()
    }

    pub fn insert(&mut self, id: NameId) -> bool {
        match self.0.binary_search(&id) {
            Ok(_) => false,
            Err(at) => {
                self.0.insert(at, id);
                true
            }
        }
    }

    pub fn remove(&mut self, id: NameId) -> bool {
        match self.0.binary_search(&id) {
            Ok(at) => {
                self.0.remove(at);
                true
            }
            Err(_) => false,
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = NameId> + '_ {
        self.0.iter().copied()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn shrink(&mut self) {
        self.0.shrink_to_fit();
    }
}

/// One name → version entry; the version split in two so an entry takes 12 bytes, not 16.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Slot {
    id: NameId,
    version: [u32; 2],
}

impl Slot {
    fn new(id: NameId, version: u64) -> Self {
        Slot {
            id,
            version: [(version >> 32) as u32, version as u32],
        }
    }

    fn version(&self) -> u64 {
        (u64::from(self.version[0]) << 32) | u64::from(self.version[1])
    }
}

/// Names → [`fsm_cache::version_key`]s, sorted by id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct VersionMap(Vec<Slot>);

impl VersionMap {
    fn find(&self, id: NameId) -> Result<usize, usize> {
        self.0.binary_search_by_key(&id, |s| s.id)
    }

    pub fn get(&self, id: NameId) -> Option<u64> {
        self.find(id).ok().map(|at| self.0[at].version())
    }

    pub fn contains(&self, id: NameId) -> bool {
        self.find(id).is_ok()
    }

    pub fn remove(&mut self, id: NameId) -> Option<u64> {
        self.find(id).ok().map(|at| self.0.remove(at).version())
    }

    pub fn retain(&mut self, mut keep: impl FnMut(NameId, u64) -> bool) {
        self.0.retain(|s| keep(s.id, s.version()));
    }

    pub fn ids(&self) -> impl Iterator<Item = NameId> + '_ {
        self.0.iter().map(|s| s.id)
    }

    pub fn iter(&self) -> impl Iterator<Item = (NameId, u64)> + '_ {
        self.0.iter().map(|s| (s.id, s.version()))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Sets every entry of `entries`, the last one winning for a repeated name.
    pub fn extend(&mut self, entries: impl IntoIterator<Item = (NameId, u64)>) {
        let mut added: Vec<Slot> = Vec::new();
        for (id, version) in entries {
            match self.find(id) {
                Ok(at) => self.0[at] = Slot::new(id, version),
                Err(_) => added.push(Slot::new(id, version)),
            }
        }
        if added.is_empty() {
            return;
        }
        // Stable sort of the reversed list, then keep each name's first: its last setting.
        added.reverse();
        added.sort_by_key(|s| s.id);
        added.dedup_by_key(|s| s.id);
        self.0.extend(added);
        self.0.sort_unstable_by_key(|s| s.id);
        self.0.shrink_to_fit();
    }
}

impl FromIterator<(NameId, u64)> for VersionMap {
    fn from_iter<I: IntoIterator<Item = (NameId, u64)>>(entries: I) -> Self {
        let mut map = VersionMap::default();
        map.extend(entries);
        map
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use proptest::prelude::*;

    use super::*;

    #[derive(Clone, Debug)]
    enum Op {
        Insert(u8),
        Remove(u8),
        Set(Vec<(u8, u64)>),
        Retain(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            any::<u8>().prop_map(Op::Insert),
            any::<u8>().prop_map(Op::Remove),
            proptest::collection::vec((any::<u8>(), 0u64..4), 0..8).prop_map(Op::Set),
            (0u64..4).prop_map(Op::Retain),
        ]
    }

    fn id(n: u8) -> NameId {
        static IDS: std::sync::LazyLock<Vec<NameId>> = std::sync::LazyLock::new(|| {
            (0..=255u8)
                .map(|n| NameId::of(&format!("ids-test-{n}")))
                .collect()
        });
        IDS[usize::from(n)]
    }

    proptest! {
        /// The sorted vectors behave as the B-tree set and map they replace.
        #[test]
        fn behave_as_btrees(ops in proptest::collection::vec(op(), 0..60)) {
            let (mut set, mut model_set) = (IdSet::default(), BTreeSet::new());
            let (mut map, mut model_map) = (VersionMap::default(), BTreeMap::new());
            for op in ops {
                match op {
                    Op::Insert(n) => {
                        prop_assert_eq!(set.insert(id(n)), model_set.insert(id(n)));
                        map.extend([(id(n), u64::MAX - u64::from(n))]);
                        model_map.insert(id(n), u64::MAX - u64::from(n));
                    }
                    Op::Remove(n) => {
                        prop_assert_eq!(set.remove(id(n)), model_set.remove(&id(n)));
                        prop_assert_eq!(map.remove(id(n)), model_map.remove(&id(n)));
                    }
                    Op::Set(entries) => {
                        let entries: Vec<(NameId, u64)> =
                            entries.into_iter().map(|(n, v)| (id(n), v)).collect();
                        map.extend(entries.clone());
                        model_map.extend(entries);
                    }
                    Op::Retain(v) => {
                        map.retain(|_, version| version != v);
                        model_map.retain(|_, version| *version != v);
                    }
                }
                prop_assert_eq!(set.iter().collect::<Vec<_>>(), model_set.iter().copied().collect::<Vec<_>>());
                prop_assert_eq!(set.len(), model_set.len());
                prop_assert_eq!(map.iter().collect::<Vec<_>>(), model_map.iter().map(|(k, v)| (*k, *v)).collect::<Vec<_>>());
                for n in 0..=255u8 {
                    prop_assert_eq!(set.contains(id(n)), model_set.contains(&id(n)));
                    prop_assert_eq!(map.get(id(n)), model_map.get(&id(n)).copied());
                }
            }
        }
    }
}
