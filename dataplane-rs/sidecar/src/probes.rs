//! `--probes`: the application probes FSM's injector rewrote, as JSON, parsed and checked into
//! [`fsm_sidecar_proxy::probes::Probe`]s (served by that module).

use std::fmt;
use std::time::Duration;

use fsm_sidecar_proxy::probes::{PathAndQuery, Probe, ProbeKind};
use serde_json::{Map, Value};

/// The kubelet's default probe timeout, used when `timeoutSeconds` is absent.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);

/// A `--probes` value that cannot be served, naming the entry and field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeError {
    /// Where, e.g. `--probes[1].targetPort`.
    pub at: String,
    pub message: String,
}

impl fmt::Display for ProbeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.at, self.message)
    }
}

impl std::error::Error for ProbeError {}

fn error(at: impl Into<String>, message: impl Into<String>) -> ProbeError {
    ProbeError {
        at: at.into(),
        message: message.into(),
    }
}

/// Parses and validates the probes: a JSON array of
/// `{"listenPort", "path", "scheme", "targetPort", "targetPath", "timeoutSeconds"}`. `source`
/// names the value in errors (`--probes`). Blank text is no probes. `scheme` defaults to `HTTP`
/// and `timeoutSeconds` to 1, as in Kubernetes; an absent or empty `targetPath` is `/`, and one
/// without a leading `/` gets one, as the kubelet builds its URL. HTTPS entries ignore `path` and
/// `targetPath`. Unknown fields are ignored.
pub fn parse(json: &str, source: &str) -> Result<Vec<Probe>, ProbeError> {
    if json.trim().is_empty() {
        return Ok(Vec::new());
    }
    let value: Value =
        serde_json::from_str(json).map_err(|e| error(source, format!("not valid JSON: {e}")))?;
    let Value::Array(entries) = value else {
        return Err(error(
            source,
            format!("expected a JSON array of probes, found {}", kind_of(&value)),
        ));
    };
    let probes = entries
        .iter()
        .enumerate()
        .map(|(i, entry)| parse_entry(entry, &format!("{source}[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    check_ports(&probes, source)?;
    Ok(probes)
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A field's value; `null` counts as absent.
fn field<'a>(fields: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    fields.get(name).filter(|v| !v.is_null())
}

fn parse_entry(entry: &Value, at: &str) -> Result<Probe, ProbeError> {
    let Value::Object(fields) = entry else {
        return Err(error(
            at,
            format!("expected an object, found {}", kind_of(entry)),
        ));
    };
    let port = |name: &str| -> Result<u16, ProbeError> {
        let at = format!("{at}.{name}");
        let value = field(fields, name).ok_or_else(|| error(&at, "missing"))?;
        value
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
            .ok_or_else(|| error(&at, format!("{value} is not a port")))
    };
    let listen_port = port("listenPort")?;
    let target_port = port("targetPort")?;
    let timeout = match field(fields, "timeoutSeconds") {
        None => DEFAULT_TIMEOUT,
        Some(value) => value
            .as_u64()
            .filter(|s| *s >= 1)
            .map(Duration::from_secs)
            .ok_or_else(|| {
                error(
                    format!("{at}.timeoutSeconds"),
                    format!("{value} is not a whole number of seconds, at least 1"),
                )
            })?,
    };
    let scheme = match field(fields, "scheme") {
        None => "HTTP",
        Some(value) => value
            .as_str()
            .filter(|s| matches!(*s, "HTTP" | "HTTPS"))
            .ok_or_else(|| {
                error(
                    format!("{at}.scheme"),
                    format!("{value} is not \"HTTP\" or \"HTTPS\""),
                )
            })?,
    };
    let kind = if scheme == "HTTPS" {
        ProbeKind::Https
    } else {
        ProbeKind::Http {
            path: listen_path(fields, at)?,
            target_path: target_path(fields, at)?,
        }
    };
    Ok(Probe {
        listen_port,
        target_port,
        timeout,
        kind,
    })
}

/// The path an HTTP probe is served at: required, absolute, without a query.
fn listen_path(fields: &Map<String, Value>, at: &str) -> Result<String, ProbeError> {
    let at = format!("{at}.path");
    let value = field(fields, "path")
        .ok_or_else(|| error(&at, "missing (an HTTP probe is served at a path)"))?;
    value
        .as_str()
        .filter(|p| p.starts_with('/'))
        .and_then(|p| p.parse::<PathAndQuery>().ok())
        .filter(|p| p.query().is_none())
        .map(|p| p.path().to_string())
        .ok_or_else(|| error(&at, format!("{value} is not a path (/…, no query)")))
}

/// The application's path: as the kubelet would have asked for it.
fn target_path(fields: &Map<String, Value>, at: &str) -> Result<PathAndQuery, ProbeError> {
    let at = format!("{at}.targetPath");
    let Some(value) = field(fields, "targetPath") else {
        return Ok(PathAndQuery::from_static("/"));
    };
    let Some(path) = value.as_str() else {
        return Err(error(&at, format!("{value} is not a path")));
    };
    let path = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/{path}")
    };
    path.parse::<PathAndQuery>()
        .map_err(|e| error(&at, format!("{value} is not a path: {e}")))
}

/// Entries may share a listen port only as HTTP probes at different paths, and no probe may
/// forward to a probe port (it would ask itself).
fn check_ports(probes: &[Probe], source: &str) -> Result<(), ProbeError> {
    for (i, probe) in probes.iter().enumerate() {
        for (j, earlier) in probes[..i].iter().enumerate() {
            if earlier.listen_port != probe.listen_port {
                continue;
            }
            match (&earlier.kind, &probe.kind) {
                (ProbeKind::Http { path: a, .. }, ProbeKind::Http { path: b, .. }) => {
                    if a == b {
                        return Err(error(
                            format!("{source}[{i}].path"),
                            format!(
                                "{b:?} on port {} is already served by {source}[{j}]",
                                probe.listen_port
                            ),
                        ));
                    }
                }
                _ => {
                    return Err(error(
                        format!("{source}[{i}].listenPort"),
                        format!(
                            "{} is already {source}[{j}]'s, and an HTTPS probe takes its whole port",
                            probe.listen_port
                        ),
                    ));
                }
            }
        }
        if let Some(j) = probes
            .iter()
            .position(|p| p.listen_port == probe.target_port)
        {
            return Err(error(
                format!("{source}[{i}].targetPort"),
                format!(
                    "{} is the listen port of {source}[{j}]: the probe would ask itself",
                    probe.target_port
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(listen_port: u16, path: &str, target_port: u16, target_path: &str) -> Probe {
        Probe {
            listen_port,
            target_port,
            timeout: Duration::from_secs(1),
            kind: ProbeKind::Http {
                path: path.to_string(),
                target_path: target_path.parse().expect("path"),
            },
        }
    }

    fn parse_err(json: &str) -> String {
        parse(json, "--probes")
            .expect_err("should be refused")
            .to_string()
    }

    #[test]
    fn parses_fsm_probes_with_kubernetes_defaults() {
        let probes = parse(
            r#"[
              {"listenPort": 15901, "path": "/fsm-liveness-probe", "scheme": "HTTP",
               "targetPort": 14001, "targetPath": "/healthz", "timeoutSeconds": 3},
              {"listenPort": 15902, "path": "/fsm-readiness-probe", "targetPort": 14001},
              {"listenPort": 15903, "scheme": "HTTPS", "targetPort": 8443, "path": "/ignored"},
              {"listenPort": 15901, "path": "/other", "targetPort": 14002,
               "targetPath": "ready?full=1", "periodSeconds": 10}
            ]"#,
            "--probes",
        )
        .expect("valid");
        assert_eq!(
            probes,
            vec![
                Probe {
                    timeout: Duration::from_secs(3),
                    ..http(15901, "/fsm-liveness-probe", 14001, "/healthz")
                },
                http(15902, "/fsm-readiness-probe", 14001, "/"),
                Probe {
                    listen_port: 15903,
                    target_port: 8443,
                    timeout: Duration::from_secs(1),
                    kind: ProbeKind::Https,
                },
                http(15901, "/other", 14002, "/ready?full=1"),
            ]
        );
        assert_eq!(parse("", "--probes"), Ok(vec![]));
        assert_eq!(parse(" [] ", "--probes"), Ok(vec![]));
    }

    #[test]
    fn errors_name_the_entry_and_field() {
        let ok = r#"{"listenPort": 15901, "path": "/fsm-liveness-probe", "targetPort": 14001}"#;
        let cases = [
            ("[", "--probes: not valid JSON"),
            (
                "{}",
                "--probes: expected a JSON array of probes, found an object",
            ),
            ("[1]", "--probes[0]: expected an object, found a number"),
            (
                r#"[{"path": "/a", "targetPort": 1}]"#,
                "--probes[0].listenPort: missing",
            ),
            (
                &format!(r#"[{ok}, {{"listenPort": 15902, "path": "/a", "targetPort": 0}}]"#),
                "--probes[1].targetPort: 0 is not a port",
            ),
            (
                r#"[{"listenPort": 70000, "path": "/a", "targetPort": 1}]"#,
                "--probes[0].listenPort: 70000 is not a port",
            ),
            (
                r#"[{"listenPort": "15901", "path": "/a", "targetPort": 1}]"#,
                "--probes[0].listenPort: \"15901\" is not a port",
            ),
            (
                r#"[{"listenPort": 15901, "path": "/a", "targetPort": 1, "scheme": "http"}]"#,
                "--probes[0].scheme: \"http\" is not \"HTTP\" or \"HTTPS\"",
            ),
            (
                r#"[{"listenPort": 15901, "targetPort": 1}]"#,
                "--probes[0].path: missing",
            ),
            (
                r#"[{"listenPort": 15901, "path": "live", "targetPort": 1}]"#,
                "--probes[0].path: \"live\" is not a path",
            ),
            (
                r#"[{"listenPort": 15901, "path": "/a?b", "targetPort": 1}]"#,
                "--probes[0].path: \"/a?b\" is not a path",
            ),
            (
                r#"[{"listenPort": 15901, "path": "/a", "targetPort": 1, "targetPath": 3}]"#,
                "--probes[0].targetPath: 3 is not a path",
            ),
            (
                r#"[{"listenPort": 15901, "path": "/a", "targetPort": 1, "targetPath": "/a b"}]"#,
                "--probes[0].targetPath: \"/a b\" is not a path",
            ),
            (
                r#"[{"listenPort": 15901, "path": "/a", "targetPort": 1, "timeoutSeconds": 0}]"#,
                "--probes[0].timeoutSeconds: 0 is not a whole number of seconds",
            ),
            (
                &format!(r#"[{ok}, {ok}]"#),
                "--probes[1].path: \"/fsm-liveness-probe\" on port 15901 is already served by --probes[0]",
            ),
            (
                &format!(
                    r#"[{ok}, {{"listenPort": 15901, "scheme": "HTTPS", "targetPort": 8443}}]"#
                ),
                "--probes[1].listenPort: 15901 is already --probes[0]'s",
            ),
            (
                &format!(
                    r#"[{{"listenPort": 15901, "scheme": "HTTPS", "targetPort": 8443}}, {ok}]"#
                ),
                "--probes[1].listenPort: 15901 is already --probes[0]'s",
            ),
            (
                &format!(r#"[{ok}, {{"listenPort": 15902, "path": "/b", "targetPort": 15901}}]"#),
                "--probes[1].targetPort: 15901 is the listen port of --probes[0]",
            ),
        ];
        for (json, want) in cases {
            let got = parse_err(json);
            assert!(got.starts_with(want), "{json}: got {got:?}, want {want:?}…");
        }
    }
}
