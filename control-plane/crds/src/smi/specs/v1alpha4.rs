//! `specs.smi-spec.io/v1alpha4` `HTTPRouteGroup` and `TCPRoute`: the routes TrafficTargets
//! (and TrafficSplit matches) refer to by name.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::validate::{Errors, FieldError, Validate};

// === HTTPRouteGroup ===

/// Named HTTP matches (path regex, methods, headers).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "specs.smi-spec.io",
    version = "v1alpha4",
    kind = "HTTPRouteGroup",
    plural = "httproutegroups",
    shortname = "htr",
    namespaced,
    derive = "PartialEq",
    label("app.kubernetes.io/name", "flomesh.io"),
    label("flomesh.io/reconcile", "true"),
    doc = "HTTPRouteGroup is a set of named HTTP matches that TrafficTargets grant access to."
)]
#[serde(rename_all = "camelCase")]
pub struct HTTPRouteGroupSpec {
    /// Match conditions of this route group.
    pub matches: Vec<HttpMatch>,
}

/// One named HTTP match. All given conditions must hold; an absent condition matches anything.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpMatch {
    /// Name that TrafficTarget rules use to select this match.
    pub name: String,
    /// Regex the request path must match.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub path_regex: String,
    /// Allowed methods; empty (or `*`) allows all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<HttpMethod>,
    // The list form is what SMI's CRD schema and FSM's docs use; `header_map` merges it.
    /// Header conditions, header name to value regex, as a list of single-entry maps
    /// (`- user-agent: ".*"`). All must match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<BTreeMap<String, String>>,
}

impl HttpMatch {
    /// All header conditions as one map, which is how SMI's Go SDK reads them (later entries
    /// win on duplicate names).
    pub fn header_map(&self) -> BTreeMap<&str, &str> {
        self.headers
            .iter()
            .flatten()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }

    /// Whether the match allows every method.
    pub fn any_method(&self) -> bool {
        self.methods.is_empty() || self.methods.contains(&HttpMethod::Any)
    }
}

/// HTTP methods, as the SMI CRD enumerates them.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, JsonSchema,
)]
pub enum HttpMethod {
    #[serde(rename = "*")]
    Any,
    #[serde(rename = "GET")]
    Get,
    #[serde(rename = "HEAD")]
    Head,
    #[serde(rename = "PUT")]
    Put,
    #[serde(rename = "POST")]
    Post,
    #[serde(rename = "DELETE")]
    Delete,
    #[serde(rename = "CONNECT")]
    Connect,
    #[serde(rename = "OPTIONS")]
    Options,
    #[serde(rename = "TRACE")]
    Trace,
    #[serde(rename = "PATCH")]
    Patch,
}

impl HttpMethod {
    /// The method as it appears on the wire (`*` for [`HttpMethod::Any`]).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Any => "*",
            Self::Get => "GET",
            Self::Head => "HEAD",
            Self::Put => "PUT",
            Self::Post => "POST",
            Self::Delete => "DELETE",
            Self::Connect => "CONNECT",
            Self::Options => "OPTIONS",
            Self::Trace => "TRACE",
            Self::Patch => "PATCH",
        }
    }
}

impl Validate for HTTPRouteGroup {
    fn validate(&self) -> Vec<FieldError> {
        let mut errs = Errors::new();
        let mut seen = std::collections::BTreeSet::new();
        for (i, m) in self.spec.matches.iter().enumerate() {
            let base = format!("spec.matches[{i}]");
            errs.non_empty(format!("{base}.name"), &m.name);
            // TrafficTarget rules select matches by name, so a duplicate is ambiguous.
            if !m.name.is_empty() && !seen.insert(m.name.as_str()) {
                errs.push(
                    format!("{base}.name"),
                    format!("duplicate match name {:?}", m.name),
                );
            }
            if !m.path_regex.is_empty() {
                errs.regex(format!("{base}.pathRegex"), &m.path_regex);
            }
            for (j, header) in m.headers.iter().enumerate() {
                if header.is_empty() {
                    errs.push(format!("{base}.headers[{j}]"), "header condition is empty");
                }
                for (name, value) in header {
                    let path = format!("{base}.headers[{j}].{name}");
                    if name.trim().is_empty() {
                        errs.push(path, "header name must not be empty");
                    } else {
                        errs.regex(path, value);
                    }
                }
            }
        }
        errs.into_vec()
    }
}

// === TCPRoute ===

/// TCP traffic to a set of ports.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "specs.smi-spec.io",
    version = "v1alpha4",
    kind = "TCPRoute",
    plural = "tcproutes",
    shortname = "tr",
    namespaced,
    derive = "PartialEq",
    label("app.kubernetes.io/name", "flomesh.io"),
    label("flomesh.io/reconcile", "true"),
    doc = "TCPRoute describes TCP traffic to a set of ports that TrafficTargets grant access to."
)]
#[serde(rename_all = "camelCase")]
pub struct TCPRouteSpec {
    /// Match conditions of this route.
    pub matches: TcpMatch,
}

/// TCP match conditions.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct TcpMatch {
    /// Destination ports; empty matches every port.
    #[schemars(inner(range(min = 1)))]
    pub ports: Vec<u16>,
}

impl Validate for TCPRoute {
    fn validate(&self) -> Vec<FieldError> {
        let mut errs = Errors::new();
        for (i, port) in self.spec.matches.ports.iter().enumerate() {
            errs.port(format!("spec.matches.ports[{i}]"), *port);
        }
        errs.into_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::test_support::fields;

    fn http_match(name: &str) -> HttpMatch {
        HttpMatch {
            name: name.into(),
            path_regex: "/version".into(),
            methods: vec![HttpMethod::Get],
            headers: Vec::new(),
        }
    }

    fn group(matches: Vec<HttpMatch>) -> HTTPRouteGroup {
        HTTPRouteGroup::new("http-route", HTTPRouteGroupSpec { matches })
    }

    #[test]
    fn headers_use_the_list_form() {
        let json = serde_json::json!({
            "name": "books-bought",
            "pathRegex": "/books-bought",
            "methods": ["GET"],
            "headers": [{"user-agent": ".*-http-client/*.*"}, {"client-app": "bookbuyer"}],
        });
        let m: HttpMatch = serde_json::from_value(json.clone()).expect("match");
        assert_eq!(
            m.header_map(),
            BTreeMap::from([
                ("client-app", "bookbuyer"),
                ("user-agent", ".*-http-client/*.*")
            ])
        );
        assert_eq!(serde_json::to_value(&m).expect("serialize"), json);
    }

    #[test]
    fn name_only_match_allows_everything() {
        let m: HttpMatch = serde_json::from_str(r#"{"name":"new-order"}"#).expect("match");
        assert!(m.any_method() && m.path_regex.is_empty() && m.header_map().is_empty());
        assert!(group(vec![m]).validate().is_empty());
    }

    #[test]
    fn methods_are_a_closed_set() {
        let ok: HttpMatch =
            serde_json::from_str(r#"{"name":"a","methods":["*","PATCH"]}"#).expect("match");
        assert!(ok.any_method());
        assert_eq!(ok.methods[1].as_str(), "PATCH");
        assert!(serde_json::from_str::<HttpMatch>(r#"{"name":"a","methods":["get"]}"#).is_err());
    }

    #[test]
    fn http_route_group_rules() {
        assert!(group(vec![http_match("version")]).validate().is_empty());

        let mut bad_regex = http_match("a");
        bad_regex.path_regex = "/books(".into();
        let mut bad_header = http_match("b");
        bad_header.headers = vec![
            BTreeMap::from([("client-app".to_string(), "[".to_string())]),
            BTreeMap::new(),
        ];
        let errs = group(vec![bad_regex, bad_header, http_match(""), http_match("a")]).validate();
        assert_eq!(
            fields(&errs),
            [
                "spec.matches[0].pathRegex",
                "spec.matches[1].headers[0].client-app",
                "spec.matches[1].headers[1]",
                "spec.matches[2].name",
                "spec.matches[3].name",
            ]
        );
        assert!(errs[4].message.contains("duplicate"));
    }

    #[test]
    fn tcp_route_ports() {
        let ok = TCPRoute::new(
            "tcp-route",
            TCPRouteSpec {
                matches: TcpMatch { ports: vec![8080] },
            },
        );
        assert!(ok.validate().is_empty());

        let mut bad = ok.clone();
        bad.spec.matches.ports = vec![8080, 0];
        assert_eq!(fields(&bad.validate()), ["spec.matches.ports[1]"]);

        assert!(serde_json::from_str::<TCPRouteSpec>(r#"{"matches":{"ports":[70000]}}"#).is_err());
    }
}
