//! Discovery documents: `/version`, `/api`, `/api/v1`, `/apis`, `/apis/<g>`, `/apis/<g>/<v>`,
//! and the aggregated (`apidiscovery.k8s.io/v2`) forms of `/api` and `/apis`.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use serde_json::{Value, json};

use crate::registry::{Registry, ResourceType};

const VERBS: [&str; 8] = [
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];
const STATUS_VERBS: [&str; 3] = ["get", "patch", "update"];

/// The Kubernetes version this server claims to be (the k8s-openapi feature it is built with).
pub const MAJOR: &str = "1";
pub const MINOR: &str = "33";

/// Whether an `Accept` header asks for aggregated discovery.
pub fn wants_aggregated(accept: &str) -> bool {
    accept
        .split(',')
        .next()
        .is_some_and(|first| first.contains("as=APIGroupDiscoveryList"))
}

pub const AGGREGATED_CONTENT_TYPE: &str =
    "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";

pub fn version() -> Value {
    json!({
        "major": MAJOR,
        "minor": MINOR,
        "gitVersion": format!("v{MAJOR}.{MINOR}.0-fsm-test-apiserver"),
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z",
        "goVersion": "go1.24.0",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

pub fn core_versions(addr: SocketAddr) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": addr.to_string()}],
    })
}

/// The `APIResourceList` of one group version, or `None` when nothing is served there.
pub fn resource_list(registry: &Registry, group: &str, version: &str) -> Option<Value> {
    let types: Vec<&Arc<ResourceType>> = registry
        .all()
        .filter(|rt| rt.group == group && rt.version == version)
        .collect();
    if types.is_empty() {
        return None;
    }
    let mut resources = Vec::new();
    for rt in types {
        let mut main = json!({
            "name": rt.plural,
            "singularName": rt.singular,
            "namespaced": rt.namespaced,
            "kind": rt.kind,
            "verbs": VERBS,
        });
        if !rt.short_names.is_empty() {
            main["shortNames"] = json!(rt.short_names);
        }
        if !rt.categories.is_empty() {
            main["categories"] = json!(rt.categories);
        }
        resources.push(main);
        if rt.status_subresource {
            resources.push(json!({
                "name": format!("{}/status", rt.plural),
                "singularName": "",
                "namespaced": rt.namespaced,
                "kind": rt.kind,
                "verbs": STATUS_VERBS,
            }));
        }
    }
    let group_version = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": resources,
    }))
}

/// Group name → served versions, most preferred first.
fn groups(registry: &Registry) -> BTreeMap<String, Vec<String>> {
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for rt in registry.all() {
        if rt.group.is_empty() {
            continue;
        }
        let versions = groups.entry(rt.group.clone()).or_default();
        if !versions.contains(&rt.version) {
            versions.push(rt.version.clone());
        }
    }
    for versions in groups.values_mut() {
        versions.sort_by(|a, b| compare_versions(b, a));
    }
    groups
}

fn group_doc(name: &str, versions: &[String]) -> Value {
    let gv = |v: &String| json!({"groupVersion": format!("{name}/{v}"), "version": v});
    json!({
        "name": name,
        "versions": versions.iter().map(gv).collect::<Vec<_>>(),
        "preferredVersion": versions.first().map(gv).unwrap_or(Value::Null),
    })
}

pub fn group_list(registry: &Registry) -> Value {
    let groups: Vec<Value> = groups(registry)
        .iter()
        .map(|(name, versions)| group_doc(name, versions))
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

pub fn group(registry: &Registry, name: &str) -> Option<Value> {
    groups(registry).get(name).map(|versions| {
        let mut doc = group_doc(name, versions);
        doc["kind"] = json!("APIGroup");
        doc["apiVersion"] = json!("v1");
        doc
    })
}

/// `APIGroupDiscoveryList` for the core group (`core == true`) or for all named groups.
pub fn aggregated(registry: &Registry, core: bool) -> Value {
    let mut by_group: BTreeMap<String, Vec<String>> = groups(registry);
    if core {
        by_group = BTreeMap::from([(String::new(), vec!["v1".to_string()])]);
    }
    let items: Vec<Value> = by_group
        .iter()
        .map(|(group, versions)| {
            let versions: Vec<Value> = versions
                .iter()
                .map(|v| {
                    let resources: Vec<Value> = registry
                        .all()
                        .filter(|rt| rt.group == *group && rt.version == *v)
                        .map(|rt| aggregated_resource(rt))
                        .collect();
                    json!({"version": v, "resources": resources, "freshness": "Current"})
                })
                .collect();
            json!({"metadata": {"name": group}, "versions": versions})
        })
        .collect();
    json!({
        "apiVersion": "apidiscovery.k8s.io/v2",
        "kind": "APIGroupDiscoveryList",
        "metadata": {},
        "items": items,
    })
}

fn aggregated_resource(rt: &ResourceType) -> Value {
    let gvk = json!({"group": rt.group, "version": rt.version, "kind": rt.kind});
    let mut r = json!({
        "resource": rt.plural,
        "responseKind": gvk,
        "scope": if rt.namespaced { "Namespaced" } else { "Cluster" },
        "singularResource": rt.singular,
        "verbs": VERBS,
    });
    if !rt.short_names.is_empty() {
        r["shortNames"] = json!(rt.short_names);
    }
    if !rt.categories.is_empty() {
        r["categories"] = json!(rt.categories);
    }
    if rt.status_subresource {
        r["subresources"] =
            json!([{"subresource": "status", "responseKind": gvk, "verbs": STATUS_VERBS}]);
    }
    r
}

/// Kubernetes version priority: GA > beta > alpha > other, then higher numbers first; others
/// alphabetically.
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    match (parse_version(a), parse_version(b)) {
        (Some(x), Some(y)) => x.cmp(&y),
        (Some(_), None) => Ordering::Greater,
        (None, Some(_)) => Ordering::Less,
        (None, None) => b.cmp(a),
    }
}

/// (stability: 2 GA, 1 beta, 0 alpha; major; minor) for `v<major>[(alpha|beta)<minor>]`.
fn parse_version(v: &str) -> Option<(u8, u64, u64)> {
    let rest = v.strip_prefix('v')?;
    let digits = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    let major: u64 = rest[..digits].parse().ok()?;
    let tail = &rest[digits..];
    if tail.is_empty() {
        return Some((2, major, 0));
    }
    let (stability, minor) = if let Some(m) = tail.strip_prefix("beta") {
        (1, m)
    } else if let Some(m) = tail.strip_prefix("alpha") {
        (0, m)
    } else {
        return None;
    };
    Some((stability, major, minor.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_priority() {
        let mut v = vec!["v1alpha1", "v2", "v1beta2", "foo", "v1", "v1beta1", "v10"];
        v.sort_by(|a, b| compare_versions(b, a));
        assert_eq!(
            v,
            vec!["v10", "v2", "v1", "v1beta2", "v1beta1", "v1alpha1", "foo"]
        );
    }

    #[test]
    fn documents() {
        let r = Registry::with_builtins();
        let core = resource_list(&r, "", "v1").unwrap_or_default();
        let names: Vec<&str> = core["resources"]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x["name"].as_str()).collect())
            .unwrap_or_default();
        assert!(
            names.contains(&"pods")
                && names.contains(&"pods/status")
                && names.contains(&"namespaces")
        );
        assert!(group(&r, "discovery.k8s.io").is_some());
        let apps = resource_list(&r, "apps", "v1").unwrap_or_default();
        let deployments = apps["resources"]
            .as_array()
            .and_then(|a| a.iter().find(|x| x["name"] == "deployments"))
            .cloned()
            .unwrap_or_default();
        assert_eq!(deployments["shortNames"], json!(["deploy"]));
        assert_eq!(deployments["singularName"], "deployment");
        for (g, plural) in [
            ("apps", "deployments/status"),
            ("batch", "jobs/status"),
            ("rbac.authorization.k8s.io", "clusterrolebindings"),
        ] {
            let list = resource_list(&r, g, "v1").unwrap_or_default();
            assert!(
                list["resources"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|x| x["name"] == plural)),
                "{g} {plural}"
            );
        }
        let rbac = resource_list(&r, "rbac.authorization.k8s.io", "v1").unwrap_or_default();
        assert!(
            rbac["resources"].as_array().is_some_and(|a| a
                .iter()
                .all(|x| !x["name"].as_str().is_some_and(|n| n.ends_with("/status")))),
            "RBAC has no status subresource"
        );
        assert!(resource_list(&r, "nope", "v1").is_none());
        assert!(wants_aggregated(
            kube::core::discovery::v2::ACCEPT_AGGREGATED_DISCOVERY_V2
        ));
        assert!(!wants_aggregated("application/json"));
    }
}
