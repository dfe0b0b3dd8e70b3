//! Request counters, so tests can assert how a client used the API (e.g. "relisted once").

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use parking_lot::Mutex;

/// The verb of a request, as the real server's audit log and metrics name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verb {
    Get,
    List,
    Watch,
    Create,
    Update,
    Patch,
    Delete,
    DeleteCollection,
    /// `/api`, `/apis`, `/version` and friends.
    Discovery,
}

/// Counts per (verb, resource plural); discovery counts under the resource "".
#[derive(Debug, Default)]
pub struct Counters {
    counts: Mutex<HashMap<(Verb, String), u64>>,
}

impl Counters {
    pub fn record(&self, verb: Verb, resource: &str) {
        *self
            .counts
            .lock()
            .entry((verb, resource.to_string()))
            .or_default() += 1;
    }

    /// Requests with `verb`, over all resources.
    pub fn count(&self, verb: Verb) -> u64 {
        self.counts
            .lock()
            .iter()
            .filter(|((v, _), _)| *v == verb)
            .map(|(_, n)| n)
            .sum()
    }

    /// Requests with `verb` on one resource (plural, e.g. `"services"`).
    pub fn count_for(&self, verb: Verb, resource: &str) -> u64 {
        self.counts
            .lock()
            .get(&(verb, resource.to_string()))
            .copied()
            .unwrap_or(0)
    }

    pub fn snapshot(&self) -> BTreeMap<Verb, u64> {
        let mut out = BTreeMap::new();
        for ((verb, _), n) in self.counts.lock().iter() {
            *out.entry(*verb).or_default() += n;
        }
        out
    }

    pub fn reset(&self) {
        self.counts.lock().clear();
    }
}

impl fmt::Display for Verb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Verb::Get => "get",
            Verb::List => "list",
            Verb::Watch => "watch",
            Verb::Create => "create",
            Verb::Update => "update",
            Verb::Patch => "patch",
            Verb::Delete => "delete",
            Verb::DeleteCollection => "deletecollection",
            Verb::Discovery => "discovery",
        };
        f.write_str(s)
    }
}
