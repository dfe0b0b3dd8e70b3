//! Application probes under interception (FSM, spec/observability-security.md §4.1): the kubelet's
//! probes would reach the sidecar's inbound port, which takes mesh mTLS only, so the injector
//! points them at the sidecar's probe ports instead, and the sidecar forwards each to where it
//! was going:
//!
//! | probe | HTTP `httpGet` | HTTPS `httpGet` | `tcpSocket` |
//! |---|---|---|---|
//! | liveness | `15901` `/fsm-liveness-probe` | `15901`, path kept | `15904` `/fsm-healthcheck` |
//! | readiness | `15902` `/fsm-readiness-probe` | `15902`, path kept | same |
//! | startup | `15903` `/fsm-startup-probe` | `15903`, path kept | same |
//!
//! A `tcpSocket` probe becomes an HTTP probe of `fsm-healthcheck` (its own container, port 15904,
//! which the interception rules never redirect) carrying the port in header `Original-Tcp-Port`.
//! `exec` and `grpc` probes are left alone. When several containers have a probe of one kind, the
//! first keeps FSM's path and the others get `<path>/<container>` on the same port (an HTTPS probe
//! cannot share its port and is left alone).

use k8s_openapi::api::core::v1::{Container, HTTPGetAction, HTTPHeader, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;

pub const HEALTHCHECK_CONTAINER_NAME: &str = "fsm-healthcheck";
pub const HEALTHCHECK_PORT: u16 = 15904;
pub const HEALTHCHECK_PATH: &str = "/fsm-healthcheck";
pub const ORIGINAL_TCP_PORT_HEADER: &str = "Original-Tcp-Port";

/// The three probe kinds, their sidecar port and path.
const KINDS: [(&str, u16, &str); 3] = [
    ("livenessProbe", 15901, "/fsm-liveness-probe"),
    ("readinessProbe", 15902, "/fsm-readiness-probe"),
    ("startupProbe", 15903, "/fsm-startup-probe"),
];

/// One probe the sidecar serves and forwards (the `--probes` entries of fsm-sidecar, the static
/// probe listeners of Envoy's bootstrap).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProbeForward {
    pub listen_port: u16,
    /// The path the kubelet asks for (HTTP only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// `HTTP` or `HTTPS` (forwarded as TCP, the TLS untouched).
    pub scheme: String,
    pub target_port: u16,
    /// The application's own path (HTTP only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_path: Option<String>,
    pub timeout_seconds: i32,
}

/// What the rewritten probes need from the sidecar.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Probes {
    pub forwards: Vec<ProbeForward>,
    /// Some `tcpSocket` probe became a `fsm-healthcheck` probe.
    pub tcp: bool,
}

impl Probes {
    pub fn needs_healthcheck(&self) -> bool {
        self.tcp
    }

    /// The sidecar ports the kubelet probes, each once.
    pub fn listen_ports(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self.forwards.iter().map(|f| f.listen_port).collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    }

    /// fsm-sidecar's `--probes` value.
    pub fn to_json(&self) -> String {
        serde_json::to_string(&self.forwards).unwrap_or_else(|_| "[]".into())
    }
}

/// Rewrites the probes of `containers` in place; returns what the sidecar must serve. A probe
/// naming a port the container does not declare is an error naming the field.
pub fn rewrite_probes(containers: &mut [Container]) -> Result<Probes, String> {
    let mut probes = Probes::default();
    for (index, container) in containers.iter_mut().enumerate() {
        let declared = container.ports.clone().unwrap_or_default();
        let name = container.name.clone();
        for (field, listen_port, fsm_path) in KINDS {
            let slot = match field {
                "livenessProbe" => &mut container.liveness_probe,
                "readinessProbe" => &mut container.readiness_probe,
                _ => &mut container.startup_probe,
            };
            let Some(probe) = slot.as_mut() else { continue };
            let at = format!("spec.containers[{index}].{field}");
            let port_of = |port: &IntOrString, at: &str| -> Result<u16, String> {
                match port {
                    IntOrString::Int(n) => u16::try_from(*n)
                        .ok()
                        .filter(|p| *p != 0)
                        .ok_or_else(|| format!("{at}.port: {n} is not a port")),
                    IntOrString::String(named) => declared
                        .iter()
                        .find(|p| p.name.as_deref() == Some(named.as_str()))
                        .and_then(|p| u16::try_from(p.container_port).ok())
                        .ok_or_else(|| {
                            format!(
                                "{at}.port: container {name:?} declares no port named {named:?}"
                            )
                        }),
                }
            };
            let timeout = probe.timeout_seconds.unwrap_or(1);
            let taken = |probes: &Probes, path: &Option<String>| {
                probes
                    .forwards
                    .iter()
                    .any(|f| f.listen_port == listen_port && (f.path == *path || f.path.is_none()))
            };
            if let Some(get) = probe.http_get.as_mut() {
                let target_port = port_of(&get.port, &format!("{at}.httpGet"))?;
                let https = get
                    .scheme
                    .as_deref()
                    .is_some_and(|s| s.eq_ignore_ascii_case("HTTPS"));
                if https {
                    if probes.forwards.iter().any(|f| f.listen_port == listen_port) {
                        continue;
                    }
                    probes.forwards.push(ProbeForward {
                        listen_port,
                        path: None,
                        scheme: "HTTPS".into(),
                        target_port,
                        target_path: None,
                        timeout_seconds: timeout,
                    });
                    get.port = IntOrString::Int(i32::from(listen_port));
                    continue;
                }
                let mut path = Some(fsm_path.to_string());
                if taken(&probes, &path) {
                    path = Some(format!("{fsm_path}/{name}"));
                    if taken(&probes, &path) {
                        continue;
                    }
                }
                probes.forwards.push(ProbeForward {
                    listen_port,
                    path: path.clone(),
                    scheme: "HTTP".into(),
                    target_port,
                    target_path: Some(get.path.clone().unwrap_or_else(|| "/".into())),
                    timeout_seconds: timeout,
                });
                get.port = IntOrString::Int(i32::from(listen_port));
                get.path = path;
                get.scheme = Some("HTTP".into());
            } else if let Some(tcp) = probe.tcp_socket.take() {
                let target_port = port_of(&tcp.port, &format!("{at}.tcpSocket"))?;
                probes.tcp = true;
                *probe = Probe {
                    tcp_socket: None,
                    http_get: Some(HTTPGetAction {
                        path: Some(HEALTHCHECK_PATH.into()),
                        port: IntOrString::Int(i32::from(HEALTHCHECK_PORT)),
                        scheme: Some("HTTP".into()),
                        http_headers: Some(vec![HTTPHeader {
                            name: ORIGINAL_TCP_PORT_HEADER.into(),
                            value: target_port.to_string(),
                        }]),
                        host: None,
                    }),
                    ..probe.clone()
                };
            }
        }
    }
    Ok(probes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn containers(json: serde_json::Value) -> Vec<Container> {
        serde_json::from_value(json).expect("containers")
    }

    #[test]
    fn http_probes_move_to_the_sidecar_ports_and_paths() {
        let mut c = containers(serde_json::json!([{
            "name": "app",
            "ports": [{"name": "http", "containerPort": 14001}],
            "livenessProbe": {"httpGet": {"path": "/liveness", "port": 14001, "scheme": "HTTP"}, "periodSeconds": 10, "timeoutSeconds": 2},
            "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}},
            "startupProbe": {"exec": {"command": ["true"]}},
        }]));
        let probes = rewrite_probes(&mut c).expect("rewrites");
        let live = c[0].liveness_probe.as_ref().expect("liveness");
        let get = live.http_get.as_ref().expect("httpGet");
        assert_eq!(get.path.as_deref(), Some("/fsm-liveness-probe"));
        assert_eq!(get.port, IntOrString::Int(15901));
        // Timing is kept.
        assert_eq!(live.period_seconds, Some(10));
        let ready = c[0]
            .readiness_probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref());
        assert_eq!(ready.map(|g| g.port.clone()), Some(IntOrString::Int(15902)));
        // exec probes are left alone.
        assert!(
            c[0].startup_probe
                .as_ref()
                .is_some_and(|p| p.exec.is_some())
        );
        assert_eq!(
            probes.forwards,
            vec![
                ProbeForward {
                    listen_port: 15901,
                    path: Some("/fsm-liveness-probe".into()),
                    scheme: "HTTP".into(),
                    target_port: 14001,
                    target_path: Some("/liveness".into()),
                    timeout_seconds: 2,
                },
                ProbeForward {
                    listen_port: 15902,
                    path: Some("/fsm-readiness-probe".into()),
                    scheme: "HTTP".into(),
                    target_port: 14001,
                    target_path: Some("/ready".into()),
                    timeout_seconds: 1,
                },
            ]
        );
        assert!(!probes.needs_healthcheck());
        assert_eq!(
            probes.to_json(),
            r#"[{"listenPort":15901,"path":"/fsm-liveness-probe","scheme":"HTTP","targetPort":14001,"targetPath":"/liveness","timeoutSeconds":2},{"listenPort":15902,"path":"/fsm-readiness-probe","scheme":"HTTP","targetPort":14001,"targetPath":"/ready","timeoutSeconds":1}]"#
        );
    }

    #[test]
    fn https_keeps_its_path_and_tcp_goes_to_the_healthcheck() {
        let mut c = containers(serde_json::json!([{
            "name": "app",
            "livenessProbe": {"httpGet": {"path": "/secure", "port": 8443, "scheme": "HTTPS"}},
            "readinessProbe": {"tcpSocket": {"port": 14001}, "failureThreshold": 3},
        }]));
        let probes = rewrite_probes(&mut c).expect("rewrites");
        let live = c[0]
            .liveness_probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .expect("get");
        assert_eq!(
            (live.path.as_deref(), live.port.clone()),
            (Some("/secure"), IntOrString::Int(15901))
        );
        let ready = c[0].readiness_probe.as_ref().expect("readiness");
        assert!(ready.tcp_socket.is_none());
        assert_eq!(ready.failure_threshold, Some(3));
        let get = ready.http_get.as_ref().expect("became httpGet");
        assert_eq!(get.path.as_deref(), Some(HEALTHCHECK_PATH));
        assert_eq!(get.port, IntOrString::Int(15904));
        assert_eq!(
            get.http_headers
                .as_ref()
                .map(|h| (h[0].name.as_str(), h[0].value.as_str())),
            Some((ORIGINAL_TCP_PORT_HEADER, "14001"))
        );
        assert!(probes.needs_healthcheck());
        assert_eq!(probes.forwards[0].scheme, "HTTPS");
        assert_eq!(probes.forwards[0].target_port, 8443);
    }

    #[test]
    fn a_second_container_gets_its_own_path_and_bad_ports_are_named() {
        let mut c = containers(serde_json::json!([
            {"name": "a", "livenessProbe": {"httpGet": {"path": "/a", "port": 8080}}},
            {"name": "b", "livenessProbe": {"httpGet": {"path": "/b", "port": 9090}}},
        ]));
        let probes = rewrite_probes(&mut c).expect("rewrites");
        let paths: Vec<_> = probes
            .forwards
            .iter()
            .map(|f| f.path.clone().unwrap_or_default())
            .collect();
        assert_eq!(paths, ["/fsm-liveness-probe", "/fsm-liveness-probe/b"]);
        let mut bad = containers(serde_json::json!([
            {"name": "a", "livenessProbe": {"httpGet": {"path": "/", "port": "web"}}},
        ]));
        assert_eq!(
            rewrite_probes(&mut bad),
            Err("spec.containers[0].livenessProbe.httpGet.port: container \"a\" declares no port named \"web\"".into())
        );
    }
}
