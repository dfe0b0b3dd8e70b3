//! Reads: lists with selectors and consistent pages, rebuilt from the history when a page is
//! older than the current state.

use std::ops::Bound;

use serde::{Deserialize, Serialize};

use super::{EventKind, Filter, ListPage, ListRequest, ObjKey, Objects, State, key_of};
use crate::registry::{GroupResource, ResourceType};
use crate::status::ApiError;

/// What a `continue` token carries: the snapshot's resourceVersion and the last key served.
#[derive(Serialize, Deserialize)]
struct ContinueToken {
    v: String,
    rv: u64,
    ns: String,
    name: String,
}

impl State {
    /// The objects of `gr` as they were at `rv`, rebuilt by undoing later events.
    fn objects_at(&self, gr: &GroupResource, rv: u64) -> Objects {
        let mut map = self.current(gr).clone();
        for e in self.history.iter().rev().take_while(|e| e.rv > rv) {
            if e.gr != *gr {
                continue;
            }
            let key = key_of(&e.object);
            match (e.kind, &e.prev) {
                (EventKind::Added, _) | (_, None) => {
                    map.remove(&key);
                }
                (_, Some(prev)) => {
                    map.insert(key, prev.clone());
                }
            }
        }
        map
    }

    pub(super) fn list(
        &self,
        rt: &ResourceType,
        filter: &Filter,
        req: &ListRequest,
    ) -> Result<ListPage, ApiError> {
        let (rv, start) = self.list_start(req)?;
        let gr = rt.group_resource();
        let owned;
        let objects = if rv == self.rv {
            self.current(&gr)
        } else {
            owned = self.objects_at(&gr, rv);
            &owned
        };
        let lower = match (&start, &filter.namespace) {
            (Some(key), _) => Bound::Excluded(key.clone()),
            (None, Some(ns)) => Bound::Included((ns.clone(), String::new())),
            (None, None) => Bound::Unbounded,
        };
        let mut matching = objects
            .range((lower, Bound::Unbounded))
            .take_while(|(k, _)| filter.namespace.as_ref().is_none_or(|ns| &k.0 == ns))
            .filter(|(_, o)| filter.matches(o));
        let limit = req.limit.filter(|l| *l > 0).unwrap_or(usize::MAX);
        let mut items = Vec::new();
        let mut last = None;
        for (k, o) in matching.by_ref() {
            items.push(o.clone());
            last = Some(k.clone());
            if items.len() == limit {
                break;
            }
        }
        let mut continue_token = None;
        let mut remaining = None;
        if items.len() == limit {
            let rest = matching.count();
            if rest > 0
                && let Some((ns, name)) = last
            {
                continue_token = Some(encode_token(&ContinueToken {
                    v: "meta.k8s.io/v1".into(),
                    rv,
                    ns,
                    name,
                }));
                if !filter.has_selectors() {
                    remaining = Some(rest);
                }
            }
        }
        Ok(ListPage {
            items,
            resource_version: rv,
            continue_token,
            remaining,
        })
    }

    /// The resourceVersion a list reads at, and the key to start after.
    fn list_start(&self, req: &ListRequest) -> Result<(u64, Option<ObjKey>), ApiError> {
        if let Some(token) = &req.continue_token {
            let t = decode_token(token).ok_or_else(|| {
                ApiError::bad_request("continue key is not valid: illegal base64 data")
            })?;
            if t.rv < self.oldest_valid_rv {
                return Err(ApiError::gone(CONTINUE_EXPIRED));
            }
            return Ok((t.rv, Some((t.ns, t.name))));
        }
        let requested = match req.resource_version.as_deref() {
            None | Some("") | Some("0") => return Ok((self.rv, None)),
            Some(s) => s
                .parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("invalid resource version: {s}")))?,
        };
        let exact = match req.resource_version_match.as_deref() {
            Some("Exact") => true,
            Some(_) => false,
            // Legacy semantics: a paged list at a given version is an exact read.
            None => req.limit.is_some(),
        };
        if requested > self.rv {
            return Err(ApiError::timeout(format!(
                "Too large resource version: {requested}, current: {}",
                self.rv
            )));
        }
        if !exact {
            return Ok((self.rv, None));
        }
        if requested < self.oldest_valid_rv {
            return Err(ApiError::gone(format!(
                "too old resource version: {requested} ({})",
                self.oldest_valid_rv
            )));
        }
        Ok((requested, None))
    }
}

fn encode_token(t: &ContinueToken) -> String {
    let json = serde_json::to_vec(t).unwrap_or_default();
    json.iter().map(|b| format!("{b:02x}")).collect()
}

fn decode_token(s: &str) -> Option<ContinueToken> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect();
    serde_json::from_slice(&bytes?).ok()
}

const CONTINUE_EXPIRED: &str = "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list.";
