//! Service defaulting and ClusterIP allocation, the one piece of built-in defaulting that
//! controllers observably depend on (they route to `spec.clusterIP`).
//!
//! Allocation is sequential from `10.96.1.0` upward: like a real server with the static
//! subrange feature, dynamic allocation stays out of the low band (`10.96.0.0/24`) that
//! manifests pick fixed addresses from. Explicit addresses are accepted from any range (tests
//! put services on loopback subnets) but must be unique.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use serde_json::{Value, json};

use crate::status::FieldError;
use crate::store::ObjKey;

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
}
