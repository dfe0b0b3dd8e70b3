//! Resource names interned as small ids, so per-stream state holds 4 bytes per name instead of
//! a string.
//!
//! One interner for the process: the same name gets the same id in every stream and every
//! snapshot. Names are never forgotten; they are the resource names of the mesh's configuration
//! and those its proxies ask for, a few tens of bytes each, so the table grows with the number
//! of distinct names ever seen, not with the number of streams.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, LazyLock};

use parking_lot::RwLock;

/// An interned resource name.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NameId(u32);

#[derive(Default)]
struct Interner {
    ids: HashMap<Arc<str>, NameId>,
    names: Vec<Arc<str>>,
}

static INTERNER: LazyLock<RwLock<Interner>> = LazyLock::new(Default::default);

impl NameId {
    /// The id of `name`, interning it on first sight.
    pub fn of(name: &str) -> NameId {
        if let Some(id) = INTERNER.read().ids.get(name) {
            return *id;
        }
        let mut interner = INTERNER.write();
        if let Some(id) = interner.ids.get(name) {
            return *id;
        }
        // More distinct names than u32 ids would take hundreds of GiB of names first.
        let id = NameId(u32::try_from(interner.names.len()).unwrap_or(u32::MAX));
        let name: Arc<str> = Arc::from(name);
        interner.names.push(name.clone());
        interner.ids.insert(name, id);
        id
    }

    /// The id of `name` if it was ever interned, without interning it.
    pub fn find(name: &str) -> Option<NameId> {
        INTERNER.read().ids.get(name).copied()
    }

    /// The name this id stands for.
    pub fn name(self) -> Arc<str> {
        Self::with_names(|names| names.get(self))
    }

    /// Runs `f` with a resolver of ids to names, under one lock for a batch of look-ups.
    pub fn with_names<T>(f: impl FnOnce(&Names<'_>) -> T) -> T {
        let interner = INTERNER.read();
        f(&Names(&interner.names))
    }
}

impl fmt::Debug for NameId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}#{}", self.name(), self.0)
    }
}

/// Resolves ids to names; see [`NameId::with_names`].
pub struct Names<'a>(&'a [Arc<str>]);

impl Names<'_> {
    pub fn get(&self, id: NameId) -> Arc<str> {
        self.str(id).into()
    }

    pub fn str(&self, id: NameId) -> &str {
        // Every id was made by `NameId::of`, which pushed its name first.
        self.0.get(id.0 as usize).map_or("", |n| n)
    }
}

impl crate::Resource {
    /// The resource's interned name, looked up once.
    pub fn id(&self) -> NameId {
        *self.wire.id.get_or_init(|| NameId::of(&self.name))
    }

    /// [`version_key`] of the resource's version, computed once: streams compare it for every
    /// resource they hold on every snapshot.
    pub fn version_key(&self) -> u64 {
        *self
            .wire
            .version_key
            .get_or_init(|| version_key(&self.version))
    }
}

/// A version as 8 bytes: the 16 hex digits of a content version (what this cache makes) read as
/// a number, and any other string (a client's) hashed. Two versions compare equal as keys
/// exactly when they are equal as strings, but for a 64-bit hash collision.
pub fn version_key(version: &str) -> u64 {
    if version.len() == 16
        && version
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        && let Ok(v) = u64::from_str_radix(version, 16)
    {
        return v;
    }
    xxhash_rust::xxh3::xxh3_64(version.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_intern_to_stable_ids() {
        let a = NameId::of("ns/a|80");
        assert_eq!(NameId::of("ns/a|80"), a);
        assert_ne!(NameId::of("ns/b|80"), a);
        assert_eq!(&*a.name(), "ns/a|80");
    }

    #[test]
    fn version_keys_distinguish_versions() {
        let v = crate::content_version(&[b"x"]);
        assert_eq!(version_key(&v), u64::from_str_radix(&v, 16).expect("hex"));
        assert_ne!(version_key(&v), version_key(&v.to_uppercase()));
        assert_ne!(version_key("1"), version_key("2"));
        assert_eq!(version_key("client"), version_key("client"));
    }
}
