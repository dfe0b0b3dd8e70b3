//! charts/fsm, embedded in the binary and rendered as Helm renders it: Go templates with Helm's
//! and Sprig's functions, `.Values` coalesced from values.yaml, `-f` files and `--set`, partials
//! (`_*.tpl`) shared by every template, `NOTES.txt` apart, manifests split and sorted in Helm's
//! install order. A test renders the same values with the real Helm engine and compares.

mod funcs;
pub mod strvals;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock, OnceLock, Weak};

use anyhow::{Context, Result, anyhow, bail};
use gotmpl::{Template, TemplateError, Value};

include!(concat!(env!("OUT_DIR"), "/chart_files.rs"));

/// The chart's name, the prefix of its template names (`fsm/templates/…`).
const CHART_NAME: &str = "fsm";

/// Helm's install order (pkg/release/util/kind_sorter.go); other kinds come after these.
const INSTALL_ORDER: &[&str] = &[
    "PriorityClass",
    "Namespace",
    "NetworkPolicy",
    "ResourceQuota",
    "LimitRange",
    "PodSecurityPolicy",
    "PodDisruptionBudget",
    "ServiceAccount",
    "Secret",
    "SecretList",
    "ConfigMap",
    "StorageClass",
    "PersistentVolume",
    "PersistentVolumeClaim",
    "CustomResourceDefinition",
    "ClusterRole",
    "ClusterRoleList",
    "ClusterRoleBinding",
    "ClusterRoleBindingList",
    "Role",
    "RoleList",
    "RoleBinding",
    "RoleBindingList",
    "Service",
    "DaemonSet",
    "Pod",
    "ReplicationController",
    "ReplicaSet",
    "Deployment",
    "HorizontalPodAutoscaler",
    "StatefulSet",
    "Job",
    "CronJob",
    "IngressClass",
    "Ingress",
    "APIService",
    "MutatingWebhookConfiguration",
    "ValidatingWebhookConfiguration",
];

/// Helm stops an `include` chain this deep (a template that includes itself).
const MAX_INCLUDE_DEPTH: u32 = 1000;

thread_local! {
    static INCLUDE_DEPTH: Cell<u32> = const { Cell::new(0) };
}

/// The release being rendered: Helm's `.Release` (FSM names the release after the mesh).
#[derive(Debug, Clone)]
pub struct Release {
    pub name: String,
    pub namespace: String,
}

/// One object the chart renders, with the template it came from.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// `fsm/templates/<file>`, as Helm's `# Source:` comment names it.
    pub source: String,
    pub object: serde_json::Value,
}

impl Manifest {
    pub fn kind(&self) -> &str {
        self.object["kind"].as_str().unwrap_or_default()
    }
    pub fn name(&self) -> &str {
        self.object["metadata"]["name"].as_str().unwrap_or_default()
    }
}

#[derive(Debug)]
pub struct Rendered {
    /// In Helm's install order.
    pub manifests: Vec<Manifest>,
    /// NOTES.txt, rendered.
    pub notes: String,
}

/// charts/fsm as embedded at build time.
pub struct Chart {
    files: BTreeMap<&'static str, &'static str>,
}

fn yaml_file(path: &str, text: &str) -> Result<serde_json::Value> {
    serde_yaml_ng::from_str(text).with_context(|| format!("chart {CHART_NAME}: {path}"))
}

impl Chart {
    pub fn embedded() -> Self {
        Chart {
            files: CHART_FILES.iter().copied().collect(),
        }
    }

    fn file(&self, path: &str) -> Result<&'static str> {
        self.files
            .get(path)
            .copied()
            .ok_or_else(|| anyhow!("chart {CHART_NAME} has no {path}"))
    }

    /// The templates (`templates/…`) and their sources, as Helm's release record keeps them.
    pub fn templates(&self) -> impl Iterator<Item = (&'static str, &'static str)> + '_ {
        self.files
            .iter()
            .filter(|(path, _)| path.starts_with("templates/"))
            .map(|(path, text)| (*path, *text))
    }

    /// Chart.yaml.
    pub fn metadata(&self) -> Result<serde_json::Value> {
        yaml_file("Chart.yaml", self.file("Chart.yaml")?)
    }

    /// values.yaml: the defaults user values are merged over.
    pub fn default_values(&self) -> Result<serde_json::Value> {
        let values = yaml_file("values.yaml", self.file("values.yaml")?)?;
        Ok(if values.is_null() {
            serde_json::json!({})
        } else {
            values
        })
    }

    /// The CRDs (crds/*.yaml), which Helm installs before the templates and never updates.
    pub fn crds(&self) -> Result<Vec<Manifest>> {
        let mut crds = Vec::new();
        for (path, text) in &self.files {
            if path.starts_with("crds/") && (path.ends_with(".yaml") || path.ends_with(".yml")) {
                crds.extend(split_manifests(&format!("{CHART_NAME}/{path}"), text)?);
            }
        }
        Ok(crds)
    }

    /// Helm's `.Chart`: Chart.yaml's fields under Helm's Go names (`appVersion` → `AppVersion`).
    fn chart_object(&self) -> Result<serde_json::Value> {
        let metadata = self.metadata()?;
        let fields = metadata
            .as_object()
            .ok_or_else(|| anyhow!("chart {CHART_NAME}: Chart.yaml is not a map"))?;
        Ok(fields
            .iter()
            .map(|(key, value)| {
                let go_name = match key.as_str() {
                    "apiVersion" => "APIVersion".to_string(),
                    other => {
                        let mut chars = other.chars();
                        chars
                            .next()
                            .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
                            .unwrap_or_default()
                    }
                };
                (go_name, value.clone())
            })
            .collect())
    }

    /// Renders every template with `values` (already merged over the defaults).
    pub fn render(&self, release: &Release, values: &serde_json::Value) -> Result<Rendered> {
        let slot: Arc<OnceLock<Weak<Template>>> = Arc::new(OnceLock::new());
        let mut funcs = funcs::funcs();
        funcs.insert("include".to_string(), include(slot.clone()));

        let templates: Vec<(String, &str)> = self
            .files
            .iter()
            .filter(|(path, _)| path.starts_with("templates/"))
            .map(|(path, text)| (format!("{CHART_NAME}/{path}"), *text))
            .collect();
        // Helm parses every file into one set, so a `define` anywhere is visible everywhere.
        let mut set = Template::new(CHART_NAME).funcs(funcs.clone());
        for (name, text) in &templates {
            let parsed = Template::new(name)
                .funcs(funcs.clone())
                .parse(text)
                .map_err(|e| anyhow!("chart {CHART_NAME}: parse error in {name}: {e}"))?;
            for defined in parsed.templates() {
                let tree = parsed
                    .lookup(defined)
                    .expect("listed by templates()")
                    .clone();
                set = set.add_parse_tree(defined, tree);
            }
        }
        let set = Arc::new(set);
        let _ = slot.set(Arc::downgrade(&set));

        let mut data = serde_json::json!({
            "Values": values,
            "Release": {
                "Name": release.name,
                "Namespace": release.namespace,
                "IsInstall": true,
                "IsUpgrade": false,
                "Revision": 1,
                "Service": "Helm",
            },
            "Chart": self.chart_object()?,
            "Capabilities": {"KubeVersion": {"Version": "v1.33.0", "Major": "1", "Minor": "33"}},
            "Template": {"BasePath": format!("{CHART_NAME}/templates")},
        });
        let (mut manifests, mut notes) = (Vec::new(), String::new());
        for (name, _) in &templates {
            let file = name.rsplit('/').next().unwrap_or_default();
            if file.starts_with('_') {
                continue;
            }
            data["Template"]["Name"] = name.as_str().into();
            let dot =
                gotmpl::to_value(&data).map_err(|e| anyhow!("chart {CHART_NAME}: values: {e}"))?;
            let out = set
                .execute_template_to_string(name, &dot)
                .map_err(|e| render_error(name, e))?
                // Helm renders with missingkey=zero and blanks what Go prints for a nil.
                .replace("<no value>", "");
            if file == "NOTES.txt" {
                notes = out;
            } else if [".yaml", ".yml", ".json"]
                .iter()
                .any(|ext| file.ends_with(ext))
            {
                manifests.extend(split_manifests(name, &out)?);
            }
        }
        sort_for_install(&mut manifests);
        Ok(Rendered { manifests, notes })
    }
}

fn render_error(template: &str, error: TemplateError) -> anyhow::Error {
    match error {
        TemplateError::Exec(message) => anyhow!("execution error at ({template}): {message}"),
        TemplateError::FuncPanic { .. } | TemplateError::UndefinedTemplate(_) => {
            anyhow!("execution error at ({template}): {error}")
        }
        other => anyhow!("chart {CHART_NAME}: {template}: {other}"),
    }
}

/// Helm's `include`: runs a named template and returns its output as a string (unlike
/// `template`, it can be piped).
fn include(slot: Arc<OnceLock<Weak<Template>>>) -> gotmpl::ValueFunc {
    Arc::new(move |args: &[Value]| {
        let name = match args.first() {
            Some(Value::String(name)) => name.to_string(),
            _ => {
                return Err(TemplateError::Exec(
                    "include: the first argument must be a template name".into(),
                ));
            }
        };
        let set = slot
            .get()
            .and_then(Weak::upgrade)
            .ok_or_else(|| TemplateError::Exec("include: no template set".into()))?;
        if set.lookup(&name).is_none() {
            return Err(TemplateError::Exec(format!(
                "include: no template {name:?}"
            )));
        }
        let depth = INCLUDE_DEPTH.with(|d| {
            d.set(d.get() + 1);
            d.get()
        });
        let result = if depth > MAX_INCLUDE_DEPTH {
            Err(TemplateError::Exec(format!(
                "rendering template has a nested reference name: {name}: unable to execute template"
            )))
        } else {
            let dot = args.get(1).cloned().unwrap_or(Value::Nil);
            set.execute_template_to_string(&name, &dot)
                .map(|out| Value::String(out.into()))
        };
        INCLUDE_DEPTH.with(|d| d.set(d.get() - 1));
        result
    })
}

/// Splits a template's output into its YAML documents (Helm: at lines starting with `---`),
/// dropping empty ones; each must be a Kubernetes object.
fn split_manifests(source: &str, text: &str) -> Result<Vec<Manifest>> {
    let mut manifests = Vec::new();
    let mut document = String::new();
    let mut flush = |document: &mut String| -> Result<()> {
        let text = std::mem::take(document);
        if text.trim().is_empty() {
            return Ok(());
        }
        let object: serde_json::Value = serde_yaml_ng::from_str(&text)
            .with_context(|| format!("chart {CHART_NAME}: {source} is not valid YAML"))?;
        if object.is_null() {
            return Ok(());
        }
        if object["kind"].as_str().is_none_or(str::is_empty)
            || object["apiVersion"].as_str().is_none_or(str::is_empty)
        {
            bail!("chart {CHART_NAME}: {source}: an object without apiVersion and kind");
        }
        manifests.push(Manifest {
            source: source.to_string(),
            object,
        });
        Ok(())
    };
    for line in text.lines() {
        if line.starts_with("---") {
            flush(&mut document)?;
        } else {
            document.push_str(line);
            document.push('\n');
        }
    }
    flush(&mut document)?;
    Ok(manifests)
}

fn install_rank(kind: &str) -> usize {
    INSTALL_ORDER
        .iter()
        .position(|k| *k == kind)
        .unwrap_or(INSTALL_ORDER.len())
}

/// Helm's install order: by kind, unknown kinds last in alphabetical order, otherwise as
/// rendered (template file order).
fn sort_for_install(manifests: &mut [Manifest]) {
    manifests.sort_by(|a, b| {
        let (ra, rb) = (install_rank(a.kind()), install_rank(b.kind()));
        ra.cmp(&rb).then_with(|| {
            if ra == INSTALL_ORDER.len() {
                a.kind().cmp(b.kind())
            } else {
                std::cmp::Ordering::Equal
            }
        })
    });
}

/// The manifests as one YAML stream with Helm's `# Source:` comments (`helm template`'s form).
pub fn to_yaml_stream(manifests: &[Manifest]) -> Result<String> {
    let mut out = String::new();
    for manifest in manifests {
        out.push_str("---\n# Source: ");
        out.push_str(&manifest.source);
        out.push('\n');
        out.push_str(&yaml_1_1_safe(&serde_yaml_ng::to_string(&manifest.object)?));
    }
    Ok(out)
}

/// The words YAML 1.1 reads as booleans, which YAML 1.2 (and so serde_yaml_ng) leaves plain.
/// serde_yaml_ng's YAML with every plain scalar YAML 1.1 would read as a boolean double-quoted:
/// kubectl and Helm (go-yaml) and PyYAML read `label: yes` as `true`, so `fsm install --dry-run |
/// kubectl apply -f -` would turn the string into a boolean. Lines inside block scalars (`|`,
/// `>`) are content and stay as they are.
fn yaml_1_1_safe(text: &str) -> String {
    // Compiled once: the stream is made of one call per manifest.
    static SCALAR: LazyLock<regex::Regex> = LazyLock::new(|| {
        regex::Regex::new(
            r#"^(?P<lead>\s*(?:- )*(?:(?:[^\s'"\-][^:]*|'[^']*'|"[^"]*"): )?)(?P<word>y|Y|yes|Yes|YES|n|N|no|No|NO|on|On|ON|off|Off|OFF)$"#,
        )
        .expect("a valid pattern")
    });
    static KEY: LazyLock<regex::Regex> = LazyLock::new(|| {
        regex::Regex::new(
            r"^(?P<lead>\s*(?:- )*)(?P<word>y|Y|yes|Yes|YES|n|N|no|No|NO|on|On|ON|off|Off|OFF):(?P<rest> .*|)$",
        )
        .expect("a valid pattern")
    });
    static BLOCK_START: LazyLock<regex::Regex> = LazyLock::new(|| {
        regex::Regex::new(r"(?:^|: |- )[|>][0-9]*[-+]?$").expect("a valid pattern")
    });
    let (scalar, key, block_start) = (&*SCALAR, &*KEY, &*BLOCK_START);
    let indent = |line: &str| line.len() - line.trim_start().len();
    let mut out = String::with_capacity(text.len() + 16);
    let mut block: Option<usize> = None;
    for line in text.split_inclusive('\n') {
        let body = line.trim_end_matches('\n');
        if let Some(parent) = block {
            if body.trim().is_empty() || indent(body) > parent {
                out.push_str(line);
                continue;
            }
            block = None;
        }
        let keyed = match key.captures(body) {
            Some(c) => format!("{}\"{}\":{}", &c["lead"], &c["word"], &c["rest"]),
            None => body.to_string(),
        };
        let fixed = match scalar.captures(&keyed) {
            Some(c) => format!("{}\"{}\"", &c["lead"], &c["word"]),
            None => keyed.clone(),
        };
        if block_start.is_match(body) {
            block = Some(indent(body));
        }
        out.push_str(&fixed);
        if line.ends_with('\n') {
            out.push('\n');
        }
    }
    out
}

/// The user's values: each `-f` file, then each `--set`, later ones winning. Nulls are kept:
/// they delete the chart's default when coalesced.
pub fn user_values(files: &[(String, String)], sets: &[String]) -> Result<serde_json::Value> {
    let mut values = serde_json::json!({});
    for (path, text) in files {
        let overrides: serde_json::Value =
            serde_yaml_ng::from_str(text).with_context(|| format!("values file {path}"))?;
        if overrides.is_null() {
            continue;
        }
        if !overrides.is_object() {
            bail!("values file {path}: not a map of values");
        }
        strvals::merge(&mut values, overrides, false);
    }
    let mut overrides = serde_json::json!({});
    for set in sets {
        strvals::apply_set(&mut overrides, set)?;
    }
    strvals::merge(&mut values, overrides, false);
    Ok(values)
}

/// The values a release is rendered with: the user's coalesced over values.yaml.
pub fn coalesce(chart: &Chart, user: &serde_json::Value) -> Result<serde_json::Value> {
    let mut values = chart.default_values()?;
    strvals::merge(&mut values, user.clone(), true);
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release() -> Release {
        Release {
            name: "fsm".into(),
            namespace: "fsm-system".into(),
        }
    }

    fn render(sets: &[&str]) -> Result<Rendered> {
        let chart = Chart::embedded();
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        chart.render(&release(), &coalesce(&chart, &user_values(&[], &sets)?)?)
    }

    #[test]
    fn renders_the_chart_in_install_order() {
        let rendered = render(&[]).expect("must succeed");
        let kinds: Vec<&str> = rendered.manifests.iter().map(Manifest::kind).collect();
        for kind in [
            "ServiceAccount",
            "ClusterRole",
            "Service",
            "Deployment",
            "MeshConfig",
        ] {
            assert!(kinds.contains(&kind), "{kind} missing from {kinds:?}");
        }
        let ranks: Vec<usize> = kinds.iter().map(|k| install_rank(k)).collect();
        assert!(ranks.is_sorted(), "{kinds:?}");
        assert!(rendered.notes.contains("fsm-system"), "{}", rendered.notes);
        let controller = rendered
            .manifests
            .iter()
            .find(|m| m.kind() == "Deployment" && m.name() == "fsm-controller")
            .expect("the controller's Deployment");
        assert_eq!(controller.object["metadata"]["namespace"], "fsm-system");
        assert!(
            !to_yaml_stream(&rendered.manifests)
                .expect("must succeed")
                .contains("<no value>")
        );
    }

    #[test]
    fn set_values_reach_the_objects() {
        let rendered = render(&["fsm.meshName=blue", "fsm.fsmController.replicaCount=3"])
            .expect("must succeed");
        let controller = rendered
            .manifests
            .iter()
            .find(|m| m.kind() == "Deployment" && m.name() == "fsm-controller")
            .expect("must succeed");
        assert_eq!(controller.object["spec"]["replicas"], 3);
        assert_eq!(
            controller.object["metadata"]["labels"]["app.kubernetes.io/instance"],
            "blue"
        );
    }

    #[test]
    fn the_charts_checks_fail_with_their_message() {
        let error = render(&["fsm.certificateProvider.kind=bogus"]).expect_err("must fail");
        let text = format!("{error:#}");
        assert!(
            text.contains("fsm.certificateProvider.kind must be one of tresor, vault, cert-manager (got \"bogus\")"),
            "{text}"
        );
        assert!(
            text.contains("fsm/templates/"),
            "names the template: {text}"
        );
    }

    #[test]
    fn yaml_output_quotes_what_yaml_1_1_reads_as_booleans() {
        let object = serde_json::json!({
            "metadata": {"labels": {"grafana_dashboard": "yes", "on": "off", "plain": "text"}},
            "list": ["y", "no", "x"],
            "data": {"config.yml": "rules:\n- on\n  yes: no\n", "n": "N"},
        });
        let text = yaml_1_1_safe(&serde_yaml_ng::to_string(&object).expect("yaml"));
        for quoted in [
            "grafana_dashboard: \"yes\"",
            "\"on\": \"off\"",
            "- \"y\"",
            "- \"no\"",
            "\"n\": \"N\"",
        ] {
            assert!(text.contains(quoted), "{quoted} in\n{text}");
        }
        assert!(
            text.contains("    - on\n      yes: no\n"),
            "a block scalar's content is kept:\n{text}"
        );
        let back: serde_json::Value = serde_yaml_ng::from_str(&text).expect("reads back");
        assert_eq!(back, object);
    }

    #[test]
    fn crds_are_embedded() {
        let crds = Chart::embedded().crds().expect("must succeed");
        assert!(crds.len() >= 13, "{}", crds.len());
        assert!(crds.iter().all(|c| c.kind() == "CustomResourceDefinition"));
    }
}
