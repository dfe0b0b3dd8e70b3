//! Service defaulting and ClusterIP allocation, the one piece of built-in defaulting that
//! controllers observably depend on (they route to `spec.clusterIP`), and the resolution of a
//! Service port to a ready endpoint address, which admission webhook calls and the
//! `services/proxy` subresource share.
//!
//! Allocation is sequential from `10.96.1.0` upward: like a real server with the static
//! subrange feature, dynamic allocation stays out of the low band (`10.96.0.0/24`) that
//! manifests pick fixed addresses from. Explicit addresses are accepted from any range (tests
//! put services on loopback subnets) but must be unique.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use serde_json::{Value, json};

use crate::status::FieldError;
use crate::store::{ObjKey, Store};

/// First dynamically allocated address: 10.96.1.0.
const DYNAMIC_START: u32 = u32::from_be_bytes([10, 96, 1, 0]);
/// One past the last address of 10.96.0.0/12.
const RANGE_END: u32 = u32::from_be_bytes([10, 112, 0, 0]);

/// Which service holds which ClusterIP.
#[derive(Debug, Default, Clone)]
pub struct IpAllocator {
    used: HashMap<String, ObjKey>,
    next: u32,
}

impl IpAllocator {
    /// Applies defaults to a service about to be written and picks its ClusterIP (kept from
    /// `old` on updates). Reserving happens in [`IpAllocator::record`] once the write commits.
    pub fn prepare(
        &mut self,
        svc: &mut Value,
        old: Option<&Value>,
        key: &ObjKey,
    ) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if !svc.get("spec").is_some_and(Value::is_object) {
            svc["spec"] = json!({});
        }
        let spec = &mut svc["spec"];
        default_str(spec, "type", "ClusterIP");
        default_str(spec, "sessionAffinity", "None");
        if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
            for port in ports {
                default_str(port, "protocol", "TCP");
                if port.get("targetPort").is_none()
                    && let Some(p) = port.get("port").cloned()
                {
                    port["targetPort"] = p;
                }
            }
        }
        if spec.get("type").and_then(Value::as_str) == Some("ExternalName") {
            return errors;
        }

        let given = cluster_ip(spec).to_string();
        let previous = old
            .map(|o| cluster_ip(&o["spec"]).to_string())
            .unwrap_or_default();
        let ip = match (given.is_empty(), previous.is_empty()) {
            (true, false) => previous,
            (false, false) if given != previous => {
                errors.push(FieldError::invalid(
                    "spec.clusterIPs[0]",
                    json!([given]),
                    "may not change once set",
                ));
                return errors;
            }
            (true, true) => match self.allocate() {
                Some(ip) => ip,
                None => {
                    errors.push(FieldError::invalid(
                        "spec.clusterIPs",
                        json!([]),
                        "failed to allocate IP: range is full",
                    ));
                    return errors;
                }
            },
            (false, _) => {
                if given != "None" && given.parse::<std::net::IpAddr>().is_err() {
                    errors.push(FieldError::invalid(
                        "spec.clusterIPs[0]",
                        json!(given),
                        "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)",
                    ));
                    return errors;
                }
                if given != "None" && self.used.get(&given).is_some_and(|holder| holder != key) {
                    errors.push(FieldError::invalid(
                        "spec.clusterIPs",
                        json!([given]),
                        format!("failed to allocate IP {given}: provided IP is already allocated"),
                    ));
                    return errors;
                }
                given
            }
        };
        spec["clusterIP"] = json!(ip);
        if spec.get("clusterIPs").is_none() {
            spec["clusterIPs"] = json!([ip]);
        }
        if spec.get("ipFamilies").is_none() {
            spec["ipFamilies"] = json!(["IPv4"]);
        }
        default_str(spec, "ipFamilyPolicy", "SingleStack");
        errors
    }

    /// Tracks a committed write (`new` is `None` for a deletion).
    pub fn record(&mut self, key: &ObjKey, old: Option<&Value>, new: Option<&Value>) {
        if let Some(old) = old {
            let ip = cluster_ip(&old["spec"]);
            if self.used.get(ip) == Some(key) {
                self.used.remove(ip);
            }
        }
        if let Some(new) = new {
            let ip = cluster_ip(&new["spec"]);
            if !ip.is_empty() && ip != "None" {
                self.used.insert(ip.to_string(), key.clone());
            }
        }
    }

    fn allocate(&mut self) -> Option<String> {
        let span = RANGE_END - DYNAMIC_START;
        for _ in 0..span {
            let offset = self.next % span;
            self.next = self.next.wrapping_add(1);
            let ip = Ipv4Addr::from(DYNAMIC_START + offset).to_string();
            if !self.used.contains_key(&ip) {
                return Some(ip);
            }
        }
        None
    }
}

fn cluster_ip(spec: &Value) -> &str {
    spec.get("clusterIP")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

fn default_str(obj: &mut Value, key: &str, value: &str) {
    if obj
        .get(key)
        .is_none_or(|v| v.as_str().is_some_and(str::is_empty))
    {
        obj[key] = json!(value);
    }
}

// === Endpoint resolution ===

/// Which port of a Service a caller asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ServicePort {
    /// `spec.ports[].port`.
    Number(u16),
    /// `spec.ports[].name`.
    Name(String),
    /// None named: the Service's only port.
    Only,
}

impl ServicePort {
    /// The `{port}` of `name:port` in a proxy path: a number, a name, or empty.
    pub(crate) fn parse(port: &str) -> ServicePort {
        if port.is_empty() {
            ServicePort::Only
        } else if let Ok(n) = port.parse::<u16>() {
            ServicePort::Number(n)
        } else {
            ServicePort::Name(port.to_string())
        }
    }
}

/// Why a Service resolves to no address; `Display` is the real resolver's wording.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ResolveError {
    NotFound(String),
    UnsupportedType(String),
    NoPort { port: String, service: String },
    NoEndpoints(String),
}

impl fmt::Display for ResolveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResolveError::NotFound(name) => write!(f, "service {name:?} not found"),
            ResolveError::UnsupportedType(t) => write!(f, "unsupported service type {t:?}"),
            ResolveError::NoPort { port, service } => {
                write!(f, "no service port {port} found for service {service:?}")
            }
            ResolveError::NoEndpoints(name) => {
                write!(f, "no endpoints available for service {name:?}")
            }
        }
    }
}

/// The address a connection to `port` of Service `ns/name` reaches: the first ready endpoint
/// address of its Endpoints (`subsets[].addresses`), else of its EndpointSlices (label
/// `kubernetes.io/service-name`, endpoints not `ready: false`), with the endpoint port that
/// serves that Service port. The Service must exist and be of a routable type, as
/// kube-apiserver's endpoint resolver requires.
pub(crate) fn endpoint(
    store: &Store,
    ns: &str,
    name: &str,
    port: &ServicePort,
) -> Result<SocketAddr, ResolveError> {
    let svc = store
        .get("v1", "Service", Some(ns), name)
        .ok_or_else(|| ResolveError::NotFound(name.to_string()))?;
    let svc_type = svc
        .pointer("/spec/type")
        .and_then(Value::as_str)
        .unwrap_or("ClusterIP");
    if !matches!(svc_type, "ClusterIP" | "LoadBalancer" | "NodePort") {
        return Err(ResolveError::UnsupportedType(svc_type.to_string()));
    }
    let ports = array(Some(&svc), "/spec/ports");
    let svc_port = match port {
        ServicePort::Number(n) => ports
            .iter()
            .find(|p| p.get("port").and_then(Value::as_u64) == Some(u64::from(*n))),
        ServicePort::Name(wanted) => ports
            .iter()
            .find(|p| p.get("name").and_then(Value::as_str) == Some(wanted.as_str())),
        ServicePort::Only => match ports {
            [only] => Some(only),
            _ => None,
        },
    }
    .ok_or_else(|| ResolveError::NoPort {
        port: match port {
            ServicePort::Number(n) => n.to_string(),
            ServicePort::Name(n) => format!("{n:?}"),
            ServicePort::Only => "\"\"".to_string(),
        },
        service: name.to_string(),
    })?;

    let endpoints = store.get("v1", "Endpoints", Some(ns), name);
    for subset in array(endpoints.as_ref(), "/subsets") {
        let addresses: Vec<&str> = array(Some(subset), "/addresses")
            .iter()
            .filter_map(|a| a.get("ip").and_then(Value::as_str))
            .collect();
        if let Some(addr) = pick(&addresses, array(Some(subset), "/ports"), svc_port) {
            return Ok(addr);
        }
    }
    let slices = store.list("discovery.k8s.io/v1", "EndpointSlice", Some(ns));
    for slice in &slices {
        if slice
            .pointer("/metadata/labels/kubernetes.io~1service-name")
            .and_then(Value::as_str)
            != Some(name)
        {
            continue;
        }
        let addresses: Vec<&str> = array(Some(slice), "/endpoints")
            .iter()
            .filter(|e| e.pointer("/conditions/ready").and_then(Value::as_bool) != Some(false))
            .filter_map(|e| e.pointer("/addresses/0").and_then(Value::as_str))
            .collect();
        if let Some(addr) = pick(&addresses, array(Some(slice), "/ports"), svc_port) {
            return Ok(addr);
        }
    }
    Err(ResolveError::NoEndpoints(name.to_string()))
}

/// The first usable address with the endpoint port serving `svc_port`: the one whose number
/// is the Service port's numeric `targetPort`, else the one named like the Service port (the
/// real resolver's rule).
fn pick(addresses: &[&str], ports: &[Value], svc_port: &Value) -> Option<SocketAddr> {
    let ip = addresses.iter().find_map(|a| a.parse::<IpAddr>().ok())?;
    let number = |p: &Value| {
        p.get("port")
            .and_then(Value::as_u64)
            .and_then(|n| u16::try_from(n).ok())
    };
    let name = |p: &Value| {
        p.get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let target = svc_port.get("targetPort").and_then(Value::as_u64);
    let by_number = ports
        .iter()
        .find(|p| target.is_some() && number(p).map(u64::from) == target);
    let by_name = || ports.iter().find(|p| name(p) == name(svc_port));
    let port = by_number.or_else(by_name).and_then(number)?;
    Some(SocketAddr::new(ip, port))
}

fn array<'a>(v: Option<&'a Value>, pointer: &str) -> &'a [Value] {
    v.and_then(|v| v.pointer(pointer))
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> ObjKey {
        ("default".into(), name.into())
    }

    #[test]
    fn allocates_defaults_and_keeps_ips_unique() {
        let mut a = IpAllocator::default();
        let mut svc = json!({"spec": {"ports": [{"port": 80}]}});
        assert!(a.prepare(&mut svc, None, &key("a")).is_empty());
        assert_eq!(svc["spec"]["clusterIP"], "10.96.1.0");
        assert_eq!(svc["spec"]["clusterIPs"], json!(["10.96.1.0"]));
        assert_eq!(svc["spec"]["type"], "ClusterIP");
        assert_eq!(svc["spec"]["ports"][0]["protocol"], "TCP");
        assert_eq!(svc["spec"]["ports"][0]["targetPort"], 80);
        a.record(&key("a"), None, Some(&svc));

        let mut dup = json!({"spec": {"clusterIP": "10.96.1.0"}});
        let errs = a.prepare(&mut dup, None, &key("b"));
        assert_eq!(errs.len(), 1);
        assert!(
            errs[0]
                .to_string()
                .contains("provided IP is already allocated")
        );

        // Updates keep the address and may not change it.
        let mut update = json!({"spec": {}});
        assert!(a.prepare(&mut update, Some(&svc), &key("a")).is_empty());
        assert_eq!(update["spec"]["clusterIP"], "10.96.1.0");
        let mut change = json!({"spec": {"clusterIP": "10.96.9.9"}});
        assert_eq!(a.prepare(&mut change, Some(&svc), &key("a")).len(), 1);

        // The next allocation skips what is taken; deletion frees.
        let mut next = json!({"spec": {}});
        assert!(a.prepare(&mut next, None, &key("c")).is_empty());
        assert_eq!(next["spec"]["clusterIP"], "10.96.1.1");
        a.record(&key("a"), Some(&svc), None);
        let mut reuse = json!({"spec": {"clusterIP": "10.96.1.0"}});
        assert!(a.prepare(&mut reuse, None, &key("d")).is_empty());

        let mut headless = json!({"spec": {"clusterIP": "None"}});
        assert!(a.prepare(&mut headless, None, &key("h")).is_empty());
        assert_eq!(headless["spec"]["clusterIPs"], json!(["None"]));
    }
    fn resolve_store() -> Store {
        let s = Store::new(100);
        s.apply_yaml(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: sys}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {name: hook, namespace: sys}\n\
             spec: {ports: [{name: https, port: 443, targetPort: 9443}]}\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        s
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn services_resolve_through_endpoints_then_slices() {
        let s = resolve_store();
        let https = ServicePort::Number(443);
        let err = |r: Result<SocketAddr, ResolveError>| r.map_err(|e| e.to_string());
        assert_eq!(
            err(endpoint(&s, "sys", "hook", &https)),
            Err("no endpoints available for service \"hook\"".into())
        );
        assert_eq!(
            err(endpoint(&s, "sys", "hook", &ServicePort::Number(8443))),
            Err("no service port 8443 found for service \"hook\"".into())
        );
        assert_eq!(
            err(endpoint(&s, "sys", "nope", &https)),
            Err("service \"nope\" not found".into())
        );
        s.apply(&json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "hook-abc", "namespace": "sys", "labels": {"kubernetes.io/service-name": "hook"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["127.0.0.9"], "conditions": {"ready": false}},
                          {"addresses": ["127.0.0.8"], "conditions": {"ready": true}}],
            "ports": [{"name": "https", "port": 9443}],
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            endpoint(&s, "sys", "hook", &https),
            Ok(addr("127.0.0.8:9443"))
        );
        // By name, and the only port when none is named.
        for port in [ServicePort::parse("https"), ServicePort::parse("")] {
            assert_eq!(
                endpoint(&s, "sys", "hook", &port),
                Ok(addr("127.0.0.8:9443"))
            );
        }
        assert_eq!(
            err(endpoint(&s, "sys", "hook", &ServicePort::parse("http"))),
            Err("no service port \"http\" found for service \"hook\"".into())
        );
        // Endpoints win; an unnamed port matches the numeric targetPort.
        s.apply(&json!({
            "apiVersion": "v1", "kind": "Endpoints",
            "metadata": {"name": "hook", "namespace": "sys"},
            "subsets": [{"addresses": [{"ip": "127.0.0.7"}], "notReadyAddresses": [{"ip": "127.0.0.6"}],
                         "ports": [{"port": 9443}]}],
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            endpoint(&s, "sys", "hook", &https),
            Ok(addr("127.0.0.7:9443"))
        );
    }
}
