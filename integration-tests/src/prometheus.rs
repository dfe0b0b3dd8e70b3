//! The real Prometheus server (Debian's `prometheus` package, `make prometheus`) on a free
//! loopback port, and a small client of its HTTP API: for tests that scrape the mesh's processes
//! and evaluate queries, recording rules and dashboards the way a user's Prometheus does.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde::Deserialize;

use crate::{ManagedProcess, free_port};

/// Overrides the Prometheus server binary (by default `prometheus` on `PATH`).
pub const PROMETHEUS_BIN_ENV: &str = "FSM_PROMETHEUS_BIN";

/// Labels of one series, `__name__` included when Prometheus keeps it.
pub type Labels = BTreeMap<String, String>;

/// A running Prometheus; killed on drop.
#[derive(Debug)]
pub struct Prometheus {
    pub process: ManagedProcess,
    pub addr: SocketAddr,
    /// Holds `prometheus.yml`, the files it names and the TSDB (`data/`).
    pub dir: PathBuf,
}

/// One series of an instant query.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub labels: Labels,
    pub value: f64,
}

/// One series of a range query: `(unix seconds, value)` points.
#[derive(Clone, Debug, PartialEq)]
pub struct RangeSeries {
    pub labels: Labels,
    pub points: Vec<(f64, f64)>,
}

/// A scrape target as `/api/v1/targets` reports it.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Target {
    pub labels: Labels,
    pub scrape_url: String,
    pub health: String,
    pub last_error: String,
}

#[derive(Deserialize)]
struct Envelope<T> {
    status: String,
    data: Option<T>,
    error: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct QueryData {
    result_type: String,
    result: serde_json::Value,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TargetsData {
    active_targets: Vec<Target>,
}

// === Prometheus ===

impl Prometheus {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn api<T: for<'de> Deserialize<'de>>(
        &self,
        path: &str,
        form: &[(&str, String)],
    ) -> Result<T> {
        let url = self.url(path);
        let response = crate::client::plain_client()?
            .post(&url)
            .form(form)
            .send()
            .await
            .with_context(|| format!("POST {url}"))?;
        let status = response.status();
        let body = response
            .text()
            .await
            .with_context(|| format!("reading POST {url}"))?;
        let envelope: Envelope<T> = serde_json::from_str(&body)
            .with_context(|| format!("POST {url} {form:?}: {status}: {body}"))?;
        match (envelope.status.as_str(), envelope.data) {
            ("success", Some(data)) => Ok(data),
            _ => bail!(
                "POST {url} {form:?}: {status}: {}",
                envelope.error.unwrap_or(body)
            ),
        }
    }

    /// An instant query at `time` (unix seconds; now when `None`). A scalar result is one sample
    /// without labels.
    pub async fn query(&self, expr: &str, time: Option<f64>) -> Result<Vec<Sample>> {
        let mut form = vec![("query", expr.to_string())];
        if let Some(time) = time {
            form.push(("time", format!("{time:.3}")));
        }
        let data: QueryData = self.api("/api/v1/query", &form).await?;
        match data.result_type.as_str() {
            "vector" => {
                let series: Vec<RawSample> = serde_json::from_value(data.result)?;
                series
                    .into_iter()
                    .map(|s| {
                        Ok(Sample {
                            labels: s.metric,
                            value: value(&s.value.1)?,
                        })
                    })
                    .collect()
            }
            "scalar" => {
                let point: (f64, String) = serde_json::from_value(data.result)?;
                Ok(vec![Sample {
                    labels: Labels::new(),
                    value: value(&point.1)?,
                }])
            }
            other => bail!("{expr}: unexpected result type {other}"),
        }
    }

    /// A range query from `start` to `end` (unix seconds) every `step`.
    pub async fn query_range(
        &self,
        expr: &str,
        start: f64,
        end: f64,
        step: Duration,
    ) -> Result<Vec<RangeSeries>> {
        let form = [
            ("query", expr.to_string()),
            ("start", format!("{start:.3}")),
            ("end", format!("{end:.3}")),
            ("step", format!("{}", step.as_secs_f64())),
        ];
        let data: QueryData = self.api("/api/v1/query_range", &form).await?;
        if data.result_type != "matrix" {
            bail!("{expr}: range query gave a {}", data.result_type);
        }
        let series: Vec<RawRange> = serde_json::from_value(data.result)?;
        series
            .into_iter()
            .map(|s| {
                Ok(RangeSeries {
                    labels: s.metric,
                    points: s
                        .values
                        .iter()
                        .map(|(t, v)| Ok((*t, value(v)?)))
                        .collect::<Result<_>>()?,
                })
            })
            .collect()
    }

    /// The label sets of every series `selector` matches in the TSDB (`/api/v1/series`).
    pub async fn series(&self, selector: &str) -> Result<Vec<Labels>> {
        self.api("/api/v1/series", &[("match[]", selector.to_string())])
            .await
    }

    /// The active scrape targets.
    pub async fn targets(&self) -> Result<Vec<Target>> {
        let url = self.url("/api/v1/targets?state=active");
        let body = crate::client::get_text(&url).await?;
        let envelope: Envelope<TargetsData> =
            serde_json::from_str(&body).with_context(|| format!("GET {url}: {body}"))?;
        envelope
            .data
            .map(|d| d.active_targets)
            .ok_or_else(|| anyhow!("GET {url}: {}", envelope.error.unwrap_or(body)))
    }
}

#[derive(Deserialize)]
struct RawSample {
    metric: Labels,
    value: (f64, String),
}

#[derive(Deserialize)]
struct RawRange {
    metric: Labels,
    values: Vec<(f64, String)>,
}

/// Prometheus's sample values are strings: `"1.5"`, `"NaN"`, `"+Inf"`.
fn value(text: &str) -> Result<f64> {
    text.parse()
        .with_context(|| format!("sample value {text:?} is not a number"))
}

// === free functions ===

/// The Prometheus server binary, failing with a hint when it is not installed.
pub fn prometheus_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(PROMETHEUS_BIN_ENV) {
        return Ok(PathBuf::from(path));
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("prometheus"))
        .find(|path| path.is_file())
        .ok_or_else(|| {
            anyhow!(
                "prometheus not found on PATH: run `make prometheus` (Debian's prometheus package) or set {PROMETHEUS_BIN_ENV}"
            )
        })
}

/// Starts Prometheus on `dir/prometheus.yml` (rule files relative to it), keeping its TSDB in
/// `dir/data`, on a free loopback port; returns once `/-/ready` answers.
pub async fn start_prometheus(dir: &Path, log_dir: &Path) -> Result<Prometheus> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
    let mut command = Command::new(prometheus_binary()?);
    command
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={addr}"))
        .arg("--storage.tsdb.retention.time=1h")
        .arg("--log.level=warn");
    let mut process = ManagedProcess::spawn("prometheus", command, log_dir)?;
    process
        .wait_for_http_ok(&format!("http://{addr}/-/ready"), Duration::from_secs(30))
        .await?;
    Ok(Prometheus {
        process,
        addr,
        dir: dir.to_path_buf(),
    })
}

/// The metric families and their label names in a Prometheus text exposition (`# HELP`/`# TYPE`
/// lines skipped; a histogram shows as its `_bucket`, `_sum` and `_count` series).
pub fn exposition_names(text: &str) -> BTreeMap<String, std::collections::BTreeSet<String>> {
    let mut names: BTreeMap<String, std::collections::BTreeSet<String>> = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let end = line.find(['{', ' ']).unwrap_or(line.len());
        let labels = names.entry(line[..end].to_string()).or_default();
        if line[end..].starts_with('{') {
            labels.extend(label_names(&line[end + 1..]));
        }
    }
    names
}

/// The label names of `a="x",b="y\"z"} 1` (the text after a series' `{`).
fn label_names(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        let name: String =
            std::iter::from_fn(|| chars.next_if(|c| *c != '=' && *c != '}')).collect();
        if chars.next() != Some('=') {
            break;
        }
        names.push(name.trim().trim_start_matches(',').trim().to_string());
        if chars.next() != Some('"') {
            break;
        }
        let mut escaped = false;
        for c in chars.by_ref() {
            match (escaped, c) {
                (false, '\\') => escaped = true,
                (false, '"') => break,
                _ => escaped = false,
            }
        }
        if chars.next_if_eq(&',').is_none() {
            break;
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_reads_families_and_label_names() {
        let text = "# HELP x_total X\n# TYPE x_total counter\n\
            x_total{a=\"1\",b=\"q\\\"u,o}te\"} 3\nx_total{c=\"\"} 1\nup 1\n\
            envoy_server_live{} 1\nh_bucket{le=\"+Inf\"} 2\n";
        let names = exposition_names(text);
        let labels = |n: &str| names[n].iter().cloned().collect::<Vec<_>>();
        assert_eq!(labels("x_total"), ["a", "b", "c"]);
        assert!(labels("up").is_empty() && labels("envoy_server_live").is_empty());
        assert_eq!(labels("h_bucket"), ["le"]);
    }

    #[test]
    fn sample_values_include_prometheus_specials() {
        assert!(value("NaN").expect("NaN").is_nan());
        assert_eq!(value("+Inf").expect("+Inf"), f64::INFINITY);
        assert_eq!(value("1.5").expect("1.5"), 1.5);
        assert!(value("x").is_err());
    }
}
