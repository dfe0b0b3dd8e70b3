//! `fsm namespace add|remove|list|ignore` and `fsm metrics enable|disable`: the labels and
//! annotations that put a namespace in a mesh, as FSM sets them (spec/mesh-core.md §8.4). The
//! controller and the injector read them the same whether this tool or `kubectl` wrote them.

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};
use fsm_catalog::{MONITORED_BY_LABEL, SIDECAR_INJECTION_ANNOTATION};
use fsm_injector::decision::IGNORE_LABEL;
use fsm_injector::pod::METRICS_ANNOTATION;
use k8s_openapi::api::core::v1::Namespace;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams};
use serde_json::{Value, json};

/// Reads namespace `name`, or says it does not exist.
async fn get(api: &Api<Namespace>, name: &str) -> Result<Namespace> {
    api.get_opt(name)
        .await
        .with_context(|| format!("reading namespace [{name}]"))?
        .with_context(|| format!("Namespace [{name}] does not exist; create it first (kubectl create namespace {name})"))
}

fn labels(ns: &Namespace) -> BTreeMap<String, String> {
    ns.metadata.labels.clone().unwrap_or_default()
}

fn annotations(ns: &Namespace) -> BTreeMap<String, String> {
    ns.metadata.annotations.clone().unwrap_or_default()
}

/// A JSON merge patch of the namespace's labels and annotations (`null` removes one).
async fn patch(api: &Api<Namespace>, name: &str, labels: Value, annotations: Value) -> Result<()> {
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": labels, "annotations": annotations}})),
    )
    .await
    .with_context(|| format!("updating namespace [{name}]"))?;
    Ok(())
}

/// `fsm namespace add`: monitored by `mesh`, injection enabled (or disabled).
pub async fn add(
    api: &Api<Namespace>,
    names: &[String],
    mesh: &str,
    fsm_namespace: &str,
    disable_injection: bool,
) -> Result<String> {
    let mut out = String::new();
    for name in names {
        if name == fsm_namespace {
            bail!(
                "Namespace [{name}] is the control plane's namespace and cannot be part of a mesh"
            );
        }
        let ns = get(api, name).await?;
        if let Some(other) = labels(&ns).get(MONITORED_BY_LABEL).filter(|m| *m != mesh) {
            bail!(
                "Namespace [{name}] already belongs to mesh [{other}]; remove it from that mesh first (fsm namespace remove {name} --mesh-name={other})"
            );
        }
        let injection = if disable_injection {
            "disabled"
        } else {
            "enabled"
        };
        patch(
            api,
            name,
            json!({MONITORED_BY_LABEL: mesh, IGNORE_LABEL: null}),
            json!({SIDECAR_INJECTION_ANNOTATION: injection}),
        )
        .await?;
        if disable_injection {
            out.push_str(&format!(
                "Namespace [{name}] successfully added to mesh [{mesh}] without sidecar injection\n"
            ));
        } else {
            out.push_str(&format!(
                "Namespace [{name}] successfully added to mesh [{mesh}]\n"
            ));
        }
    }
    Ok(out)
}

/// `fsm namespace remove`: no longer monitored, injection annotation gone.
pub async fn remove(api: &Api<Namespace>, names: &[String], mesh: &str) -> Result<String> {
    let mut out = String::new();
    for name in names {
        let ns = get(api, name).await?;
        match labels(&ns).get(MONITORED_BY_LABEL) {
            Some(m) if m == mesh => {}
            Some(other) => bail!(
                "Namespace [{name}] belongs to mesh [{other}], not [{mesh}]; use --mesh-name={other}"
            ),
            None => bail!("Namespace [{name}] is not a part of any mesh"),
        }
        patch(
            api,
            name,
            json!({MONITORED_BY_LABEL: null}),
            json!({SIDECAR_INJECTION_ANNOTATION: null}),
        )
        .await?;
        out.push_str(&format!(
            "Namespace [{name}] successfully removed from mesh [{mesh}]\n"
        ));
    }
    Ok(out)
}

/// `fsm namespace ignore`: no mesh may inject or serve it.
pub async fn ignore(api: &Api<Namespace>, names: &[String]) -> Result<String> {
    let mut out = String::new();
    for name in names {
        get(api, name).await?;
        patch(api, name, json!({IGNORE_LABEL: "true"}), json!({})).await?;
        out.push_str(&format!(
            "Successfully configured namespace [{name}] to be ignored\n"
        ));
    }
    Ok(out)
}

/// `fsm namespace list`: FSM's table of the namespaces of `mesh` (every mesh when `None`).
pub async fn list(api: &Api<Namespace>, mesh: Option<&str>) -> Result<String> {
    let selector = match mesh {
        Some(mesh) => format!("{MONITORED_BY_LABEL}={mesh}"),
        None => MONITORED_BY_LABEL.to_string(),
    };
    let namespaces = api
        .list(&ListParams::default().labels(&selector))
        .await
        .context("listing namespaces")?;
    if namespaces.items.is_empty() {
        return Ok(match mesh {
            Some(mesh) => format!("No namespaces in mesh [{mesh}]\n"),
            None => "No namespaces in any mesh\n".to_string(),
        });
    }
    let mut rows = vec![vec![
        "NAMESPACE".to_string(),
        "MESH".to_string(),
        "SIDECAR-INJECTION".to_string(),
    ]];
    for ns in &namespaces.items {
        let injection = annotations(ns)
            .get(SIDECAR_INJECTION_ANNOTATION)
            .filter(|v| v.eq_ignore_ascii_case("enabled"))
            .map_or("disabled", |_| "enabled");
        rows.push(vec![
            ns.metadata.name.clone().unwrap_or_default(),
            labels(ns)
                .get(MONITORED_BY_LABEL)
                .cloned()
                .unwrap_or_default(),
            injection.to_string(),
        ]);
    }
    Ok(crate::table::columns(&rows))
}

/// `fsm metrics enable|disable --namespace "a, b"`: Prometheus scraping of the namespace's pods.
pub async fn metrics(api: &Api<Namespace>, names: &str, enable: bool) -> Result<String> {
    let mut out = String::new();
    for name in names.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let ns = get(api, name).await?;
        if !labels(&ns).contains_key(MONITORED_BY_LABEL) {
            bail!(
                "Namespace [{name}] is not a part of any mesh; add it first (fsm namespace add {name})"
            );
        }
        let value = if enable {
            json!("enabled")
        } else {
            Value::Null
        };
        patch(api, name, json!({}), json!({METRICS_ANNOTATION: value})).await?;
        let verb = if enable { "enabled" } else { "disabled" };
        out.push_str(&format!(
            "Metrics successfully {verb} in namespace [{name}]\n"
        ));
    }
    if out.is_empty() {
        bail!("--namespace names no namespace");
    }
    Ok(out)
}
