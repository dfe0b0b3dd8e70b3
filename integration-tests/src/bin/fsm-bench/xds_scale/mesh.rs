//! The generated mesh: S HTTP services in 10 monitored namespaces (permissive mode, so every
//! proxy may reach every service) and N sidecar pods spread over them, each with its own proxy
//! UUID, with the Endpoints that list them. Addresses are in 10.0.0.0/8 and never dialled.
//!
//! In manifest mode every service has its own files, so one change rewrites one small file:
//! `services/svc-<s>.yaml` (ServiceAccount, Service), `endpoints/svc-<s>.yaml`, `pods/svc-<s>.yaml`.

use std::net::Ipv4Addr;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{Value, json};

use super::proxy::ProxySpec;

/// Namespaces the services are spread over.
const NAMESPACES: usize = 10;

/// One sidecar pod.
#[derive(Clone, Debug)]
pub struct Pod {
    pub name: String,
    pub namespace: String,
    pub service: usize,
    pub uuid: String,
    pub ip: Ipv4Addr,
}

impl Pod {
    pub fn service_account(&self) -> String {
        service_name(self.service)
    }

    pub fn proxy(&self, bootstrap_root: &Path) -> ProxySpec {
        ProxySpec {
            uuid: self.uuid.clone(),
            namespace: self.namespace.clone(),
            service_account: self.service_account(),
            credentials: bootstrap_root.join(&self.namespace).join(&self.name),
        }
    }
}

pub struct Mesh {
    pub services: usize,
    /// The current pods, by slot: a restarted pod takes its predecessor's slot.
    pub pods: Vec<Pod>,
    /// Addresses added to a service's Endpoints beside its pods (the endpoint change).
    extra: Vec<Vec<Ipv4Addr>>,
    next_address: u32,
    generation: u32,
}

pub fn service_name(s: usize) -> String {
    format!("svc-{s}")
}

pub fn namespace_of(s: usize) -> String {
    format!("bench-{}", s % NAMESPACES)
}

impl Mesh {
    /// `proxies` pods, pod `i` in service `i % services`.
    pub fn new(services: usize, proxies: usize) -> Mesh {
        let mut mesh = Mesh {
            services: services.max(1),
            pods: Vec::with_capacity(proxies),
            extra: vec![Vec::new(); services.max(1)],
            // 10.0.0.1 on.
            next_address: 0x0a00_0001,
            generation: 0,
        };
        for i in 0..proxies {
            let pod = mesh.new_pod(
                i % mesh.services,
                &format!("{}-{i}", service_name(i % mesh.services)),
            );
            mesh.pods.push(pod);
        }
        mesh
    }

    fn new_pod(&mut self, service: usize, name: &str) -> Pod {
        let ip = Ipv4Addr::from(self.next_address);
        self.next_address += 1;
        Pod {
            name: name.to_string(),
            namespace: namespace_of(service),
            service,
            uuid: uuid::Uuid::new_v4().to_string(),
            ip,
        }
    }

    /// Replaces the pod in `slot` by a new pod of the same service (new name, UUID and
    /// address), as a rolling restart does; returns the old one.
    pub fn restart(&mut self, slot: usize) -> Pod {
        self.generation += 1;
        let old = self.pods[slot].clone();
        let name = format!("{}-r{}", old.name, self.generation);
        let new = self.new_pod(old.service, &name);
        std::mem::replace(&mut self.pods[slot], new)
    }

    /// Adds an address never used in the mesh to `service`'s Endpoints; returns it.
    pub fn add_endpoint(&mut self, service: usize) -> Ipv4Addr {
        // 172.31.x.y: outside the pods' range, so its bytes mark the change.
        let ip = Ipv4Addr::new(
            172,
            31,
            (self.extra[service].len() / 250) as u8,
            1 + (self.extra[service].len() % 250) as u8,
        );
        self.extra[service].push(ip);
        ip
    }

    /// The mesh-wide objects: namespaces and the permissive MeshConfig.
    pub fn base_objects(&self) -> Vec<Value> {
        let mut objects = vec![
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "fsm-system"}}),
            json!({"apiVersion": "config.flomesh.io/v1alpha3", "kind": "MeshConfig",
                   "metadata": {"name": "fsm-mesh-config", "namespace": "fsm-system"},
                   "spec": {"traffic": {"enablePermissiveTrafficPolicyMode": true}}}),
        ];
        for n in 0..NAMESPACES.min(self.services) {
            objects.push(json!({"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": format!("bench-{n}"), "labels": {"flomesh.io/monitored-by": "fsm"}}}));
        }
        objects
    }

    pub fn service_objects(&self, s: usize) -> Vec<Value> {
        let name = service_name(s);
        let namespace = namespace_of(s);
        vec![
            json!({"apiVersion": "v1", "kind": "ServiceAccount",
                "metadata": {"name": name, "namespace": namespace}}),
            json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": name, "namespace": namespace},
                "spec": {"selector": {"app": name},
                         "ports": [{"name": "http", "port": 8080, "appProtocol": "http"}]}}),
        ]
    }

    pub fn pods_of(&self, s: usize) -> impl Iterator<Item = &Pod> {
        self.pods.iter().filter(move |p| p.service == s)
    }

    pub fn pod_object(pod: &Pod) -> Value {
        let app = service_name(pod.service);
        json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod.name, "namespace": pod.namespace,
                         "labels": {"app": app, "fsm-proxy-uuid": pod.uuid}},
            "spec": {"serviceAccountName": app,
                     "containers": [{"name": "app", "image": "bench/app:1",
                                     "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"phase": "Running", "podIP": pod.ip.to_string(),
                       "podIPs": [{"ip": pod.ip.to_string()}]}})
    }

    /// The service's Endpoints: its pods, the added addresses, and, for a service without pods,
    /// one unmeshed backend so that every cluster has an endpoint.
    pub fn endpoints_object(&self, s: usize) -> Value {
        let name = service_name(s);
        let namespace = namespace_of(s);
        let mut addresses: Vec<Value> = self
            .pods_of(s)
            .map(|p| {
                json!({"ip": p.ip.to_string(),
                "targetRef": {"kind": "Pod", "name": p.name, "namespace": p.namespace}})
            })
            .collect();
        if addresses.is_empty() {
            let backend = Ipv4Addr::from(0x0aff_0000 + s as u32);
            addresses.push(json!({"ip": backend.to_string()}));
        }
        addresses.extend(self.extra[s].iter().map(|ip| json!({"ip": ip.to_string()})));
        json!({"apiVersion": "v1", "kind": "Endpoints",
            "metadata": {"name": name, "namespace": namespace},
            "subsets": [{"addresses": addresses, "ports": [{"name": "http", "port": 8080}]}]})
    }

    /// Every object, namespaces first (for the API server).
    pub fn all_objects(&self) -> Vec<Value> {
        let mut objects = self.base_objects();
        for s in 0..self.services {
            objects.extend(self.service_objects(s));
            objects.extend(self.pods_of(s).map(Self::pod_object));
            objects.push(self.endpoints_object(s));
        }
        objects
    }

    /// Writes the whole manifest directory.
    pub fn write_all(&self, dir: &Path) -> Result<()> {
        for sub in ["services", "endpoints", "pods"] {
            std::fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("creating {}", dir.join(sub).display()))?;
        }
        write_docs(&dir.join("00-mesh.yaml"), &self.base_objects())?;
        for s in 0..self.services {
            write_docs(
                &dir.join("services")
                    .join(format!("{}.yaml", service_name(s))),
                &self.service_objects(s),
            )?;
            self.write_pods(dir, s)?;
            self.write_endpoints(dir, s)?;
        }
        Ok(())
    }

    pub fn write_pods(&self, dir: &Path, s: usize) -> Result<()> {
        let pods: Vec<Value> = self.pods_of(s).map(Self::pod_object).collect();
        write_docs(
            &dir.join("pods").join(format!("{}.yaml", service_name(s))),
            &pods,
        )
    }

    pub fn write_endpoints(&self, dir: &Path, s: usize) -> Result<()> {
        write_docs(
            &dir.join("endpoints")
                .join(format!("{}.yaml", service_name(s))),
            &[self.endpoints_object(s)],
        )
    }
}

/// Writes YAML documents (JSON is YAML) through a hidden temporary file and a rename, so the
/// watching controller never reads half a file (it skips hidden files).
fn write_docs(path: &Path, objects: &[Value]) -> Result<()> {
    let text = objects
        .iter()
        .map(Value::to_string)
        .collect::<Vec<_>>()
        .join("\n---\n");
    let file_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .context("manifest path without a file name")?;
    let tmp = path.with_file_name(format!(".{file_name}.tmp"));
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_gives_a_new_identity_and_endpoints_follow() {
        let mut mesh = Mesh::new(3, 7);
        assert_eq!(mesh.pods_of(0).count(), 3);
        let before = mesh.endpoints_object(0).to_string();
        let old = mesh.restart(0);
        let new = &mesh.pods[0];
        assert_ne!(old.uuid, new.uuid);
        assert_ne!(old.name, new.name);
        assert_eq!(old.service, new.service);
        let after = mesh.endpoints_object(0).to_string();
        assert!(before.contains(&old.ip.to_string()) && !after.contains(&old.ip.to_string()));
        assert!(after.contains(&new.ip.to_string()));
        let ip = mesh.add_endpoint(1);
        assert!(
            mesh.endpoints_object(1)
                .to_string()
                .contains(&ip.to_string())
        );
        // A service without pods still has one endpoint.
        let lonely = Mesh::new(3, 1);
        assert_eq!(
            lonely.endpoints_object(2)["subsets"][0]["addresses"]
                .as_array()
                .map(Vec::len),
            Some(1)
        );
    }
}
