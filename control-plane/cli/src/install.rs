//! `fsm install`: renders the embedded chart (charts/fsm) and installs it as `helm install`
//! would (CRDs first and never replaced, objects in Helm's install order with Helm's ownership
//! annotations, a Helm release record so `helm list`/`helm get manifest` see it), one mesh per
//! cluster, then waits for the control plane's Deployments with a progress display.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use kube::api::{Api, DynamicObject, ListParams, PostParams};
use kube::core::GroupVersionKind;
use kube::discovery::{Discovery, Scope};

use crate::chart::{self, Chart, Manifest, Release};

/// What `fsm install` was asked to do.
pub struct Install {
    pub mesh_name: String,
    pub fsm_namespace: String,
    /// `-f` files: (path, contents).
    pub values_files: Vec<(String, String)>,
    pub sets: Vec<String>,
    pub timeout: Duration,
}

/// The field manager of every object `fsm install` writes.
const FIELD_MANAGER: &str = "fsm";

/// FSM's rule for mesh names (an RFC 1123 DNS label), checked before anything is rendered.
pub fn validate_mesh_name(name: &str) -> Result<()> {
    let label = regex::Regex::new("^[a-z0-9]([-a-z0-9]*[a-z0-9])?$").expect("a valid pattern");
    if name.len() > 63 || !label.is_match(name) {
        bail!(
            "Invalid mesh-name {name:?} (fsm.meshName): a mesh name must be an RFC 1123 DNS label: at most 63 characters, lowercase letters, digits and '-', starting and ending with a letter or digit"
        );
    }
    Ok(())
}

impl Install {
    fn release(&self) -> Release {
        Release {
            name: self.mesh_name.clone(),
            namespace: self.fsm_namespace.clone(),
        }
    }

    /// The user's values (`-f`, then `--set`, then the flags, which win as in FSM) and the
    /// values the chart is rendered with (the user's over values.yaml).
    fn values(&self, chart: &Chart) -> Result<(serde_json::Value, serde_json::Value)> {
        let mut sets = self.sets.clone();
        sets.push(format!("fsm.meshName={}", self.mesh_name));
        let user = chart::user_values(&self.values_files, &sets)?;
        let merged = chart::coalesce(chart, &user)?;
        Ok((user, merged))
    }

    /// The objects `fsm install` would create, CRDs first, as one YAML stream.
    pub fn dry_run(&self) -> Result<String> {
        validate_mesh_name(&self.mesh_name)?;
        let chart = Chart::embedded();
        let (_, values) = self.values(&chart)?;
        let rendered = chart.render(&self.release(), &values)?;
        let mut all = chart.crds()?;
        all.extend(rendered.manifests);
        chart::to_yaml_stream(&all)
    }

    pub async fn run(&self, client: &kube::Client) -> Result<String> {
        validate_mesh_name(&self.mesh_name)?;
        let chart = Chart::embedded();
        let (user_values, values) = self.values(&chart)?;
        let rendered = chart.render(&self.release(), &values)?;
        check_kube_version(client, &chart).await?;
        ensure_no_mesh(client).await?;
        ensure_namespace(client, &self.fsm_namespace).await?;

        let crds = chart.crds()?;
        for crd in &crds {
            create_crd(client, crd).await?;
        }
        let discovery = served_discovery(client, &crds).await?;
        for manifest in &rendered.manifests {
            self.create(client, &discovery, manifest).await?;
        }
        self.record_release(client, &chart, &user_values, &rendered)
            .await?;

        let deployments: Vec<&str> = rendered
            .manifests
            .iter()
            .filter(|m| m.kind() == "Deployment")
            .map(Manifest::name)
            .collect();
        let deadline = Instant::now() + self.timeout;
        // FSM reports the injector before the controller.
        let mut order = deployments.clone();
        order.sort_by_key(|name| (*name != "fsm-injector", *name != "fsm-controller", *name));
        for name in order {
            let pod = wait_ready(client, &self.fsm_namespace, name, deadline, self.timeout).await?;
            println!("{name}[{pod}] Done");
            let _ = std::io::stdout().flush();
        }
        Ok(format!(
            "FSM installed successfully in namespace [{}] with mesh name [{}]\n",
            self.fsm_namespace, self.mesh_name
        ))
    }

    /// Creates one rendered object (Helm's ownership annotations added); one that exists
    /// already stops the install, as in Helm, naming it.
    async fn create(
        &self,
        client: &kube::Client,
        discovery: &Discovery,
        manifest: &Manifest,
    ) -> Result<()> {
        let mut object: DynamicObject = serde_json::from_value(manifest.object.clone())
            .with_context(|| format!("{}: not a Kubernetes object", manifest.source))?;
        let gvk = gvk_of(manifest)?;
        let (resource, capabilities) = discovery.resolve_gvk(&gvk).ok_or_else(|| {
            anyhow!(
                "{} {:?} ({}): the cluster does not serve {}/{}",
                manifest.kind(),
                manifest.name(),
                manifest.source,
                manifest.object["apiVersion"].as_str().unwrap_or_default(),
                manifest.kind()
            )
        })?;
        let annotations = object.metadata.annotations.get_or_insert_default();
        annotations.insert("meta.helm.sh/release-name".into(), self.mesh_name.clone());
        annotations.insert(
            "meta.helm.sh/release-namespace".into(),
            self.fsm_namespace.clone(),
        );
        let api: Api<DynamicObject> = match capabilities.scope {
            Scope::Namespaced => {
                let ns = object
                    .metadata
                    .namespace
                    .get_or_insert_with(|| self.fsm_namespace.clone())
                    .clone();
                Api::namespaced_with(client.clone(), &ns, &resource)
            }
            Scope::Cluster => Api::all_with(client.clone(), &resource),
        };
        let params = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        match api.create(&params, &object).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => bail!(
                "rendered manifests contain a resource that already exists: {} {:?}{} (remove the old mesh with `fsm uninstall mesh`)",
                manifest.kind(),
                manifest.name(),
                object
                    .metadata
                    .namespace
                    .as_deref()
                    .map(|ns| format!(" in namespace {ns:?}"))
                    .unwrap_or_default()
            ),
            Err(e) => Err(e).with_context(|| {
                format!(
                    "creating {} {:?} ({})",
                    manifest.kind(),
                    manifest.name(),
                    manifest.source
                )
            }),
        }
    }

    /// Helm's release record (Secret `sh.helm.release.v1.<mesh>.v1`, gzip+base64 JSON), so
    /// `helm list -n <ns>` and `helm get manifest <mesh>` see the mesh.
    async fn record_release(
        &self,
        client: &kube::Client,
        chart: &Chart,
        user_values: &serde_json::Value,
        rendered: &chart::Rendered,
    ) -> Result<()> {
        let now = jiff::Timestamp::now();
        let templates: Vec<serde_json::Value> = chart
            .templates()
            .map(|(name, data)| {
                serde_json::json!({"name": name, "data": base64::engine::general_purpose::STANDARD.encode(data)})
            })
            .collect();
        let release = serde_json::json!({
            "name": self.mesh_name,
            "namespace": self.fsm_namespace,
            "version": 1,
            "info": {
                "first_deployed": now.to_string(),
                "last_deployed": now.to_string(),
                "deleted": "",
                "description": "Install complete",
                "status": "deployed",
                "notes": rendered.notes,
            },
            "chart": {
                "metadata": chart.metadata()?,
                "templates": templates,
                "values": chart.default_values()?,
            },
            "config": user_values,
            "manifest": chart::to_yaml_stream(&rendered.manifests)?,
        });
        let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gzip.write_all(serde_json::to_string(&release)?.as_bytes())?;
        let encoded = base64::engine::general_purpose::STANDARD.encode(gzip.finish()?);
        let secret: Secret = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": format!("sh.helm.release.v1.{}.v1", self.mesh_name),
                "namespace": self.fsm_namespace,
                "labels": {
                    "name": self.mesh_name,
                    "owner": "helm",
                    "status": "deployed",
                    "version": "1",
                    "modifiedAt": now.as_second().to_string(),
                },
            },
            "type": "helm.sh/release.v1",
            "data": {"release": base64::engine::general_purpose::STANDARD.encode(encoded)},
        }))?;
        Api::<Secret>::namespaced(client.clone(), &self.fsm_namespace)
            .create(
                &PostParams {
                    field_manager: Some(FIELD_MANAGER.into()),
                    ..Default::default()
                },
                &secret,
            )
            .await
            .context("recording the Helm release")?;
        Ok(())
    }
}

fn gvk_of(manifest: &Manifest) -> Result<GroupVersionKind> {
    let api_version = manifest.object["apiVersion"].as_str().unwrap_or_default();
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    Ok(GroupVersionKind::gvk(group, version, manifest.kind()))
}

/// The chart's `kubeVersion` constraint against the API server's version, as Helm checks it.
async fn check_kube_version(client: &kube::Client, chart: &Chart) -> Result<()> {
    let Some(constraint) = chart.metadata()?["kubeVersion"]
        .as_str()
        .map(str::to_string)
    else {
        return Ok(());
    };
    let info = client
        .apiserver_version()
        .await
        .context("asking the API server for its version")?;
    let number = |s: &str| s.trim_end_matches('+').parse::<u64>().ok();
    let (Some(major), Some(minor)) = (number(&info.major), number(&info.minor)) else {
        return Ok(());
    };
    let requirement = semver::VersionReq::parse(&constraint)
        .with_context(|| format!("chart kubeVersion {constraint:?}"))?;
    if !requirement.matches(&semver::Version::new(major, minor, 0)) {
        bail!(
            "chart requires kubeVersion: {constraint} which is incompatible with Kubernetes {}",
            info.git_version
        );
    }
    Ok(())
}

/// One mesh per cluster: any fsm-controller Deployment, in any namespace, is a mesh.
async fn ensure_no_mesh(client: &kube::Client) -> Result<()> {
    let existing = Api::<Deployment>::all(client.clone())
        .list(&ListParams::default().labels("app=fsm-controller"))
        .await
        .context("looking for an installed mesh")?;
    if !existing.items.is_empty() {
        let meshes: Vec<String> = existing
            .items
            .iter()
            .map(|d| {
                let labels = d.metadata.labels.clone().unwrap_or_default();
                format!(
                    "[{}] in namespace [{}]",
                    labels.get("meshName").map(String::as_str).unwrap_or("?"),
                    d.metadata.namespace.as_deref().unwrap_or_default()
                )
            })
            .collect();
        bail!(
            "Mesh {} already exists in the cluster: only one mesh can be installed in a cluster (remove it first with `fsm uninstall mesh`)",
            meshes.join(", ")
        );
    }
    Ok(())
}

async fn ensure_namespace(client: &kube::Client, name: &str) -> Result<()> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    if namespaces.get_opt(name).await?.is_some() {
        return Ok(());
    }
    let namespace: Namespace = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name},
    }))?;
    match namespaces.create(&PostParams::default(), &namespace).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e).with_context(|| format!("creating namespace {name}")),
    }
}

/// A CRD is created when missing and left alone when present (Helm never updates crds/).
async fn create_crd(client: &kube::Client, crd: &Manifest) -> Result<()> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let object: CustomResourceDefinition = serde_json::from_value(crd.object.clone())
        .with_context(|| format!("{}: not a CustomResourceDefinition", crd.source))?;
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    match api
        .create(
            &PostParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..Default::default()
            },
            &object,
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e).with_context(|| format!("creating CRD {}", crd.name())),
    }
}

/// Discovery once every CRD's kinds are served (the API server establishes CRDs
/// asynchronously); gives up after a minute, as Helm does.
async fn served_discovery(client: &kube::Client, crds: &[Manifest]) -> Result<Discovery> {
    let wanted: Vec<GroupVersionKind> = crds
        .iter()
        .filter_map(|crd| {
            let spec = &crd.object["spec"];
            let group = spec["group"].as_str()?;
            let kind = spec["names"]["kind"].as_str()?;
            let version = spec["versions"]
                .as_array()?
                .iter()
                .find(|v| v["served"].as_bool() == Some(true))?["name"]
                .as_str()?;
            Some(GroupVersionKind::gvk(group, version, kind))
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let discovery = Discovery::new(client.clone())
            .run()
            .await
            .context("discovering the API server's resources")?;
        let missing: Vec<&GroupVersionKind> = wanted
            .iter()
            .filter(|gvk| discovery.resolve_gvk(gvk).is_none())
            .collect();
        if missing.is_empty() {
            return Ok(discovery);
        }
        if Instant::now() > deadline {
            bail!("the API server does not serve the mesh's CRDs after a minute: {missing:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `kubectl rollout status`'s rule: the latest spec observed, every replica updated and available.
fn deployment_ready(d: &Deployment) -> bool {
    let (Some(spec), Some(status)) = (&d.spec, &d.status) else {
        return false;
    };
    let wanted = spec.replicas.unwrap_or(1);
    status.observed_generation.unwrap_or(0) >= d.metadata.generation.unwrap_or(0)
        && status.updated_replicas.unwrap_or(0) >= wanted
        && status.available_replicas.unwrap_or(0) >= wanted
}

fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Why a pod is not ready, from its containers' waiting/terminated states.
fn pod_problem(pod: &Pod) -> String {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let statuses = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.clone())
        .unwrap_or_default();
    let problems: Vec<String> = statuses
        .iter()
        .filter_map(|c| {
            let state = c.state.as_ref()?;
            if let Some(w) = &state.waiting {
                return Some(format!(
                    "{}: {} {}",
                    c.name,
                    w.reason.clone().unwrap_or_default(),
                    w.message.clone().unwrap_or_default()
                ));
            }
            state.terminated.as_ref().map(|t| {
                format!(
                    "{}: terminated ({})",
                    c.name,
                    t.reason.clone().unwrap_or_default()
                )
            })
        })
        .collect();
    let phase = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_else(|| "Pending".into());
    if problems.is_empty() {
        format!("pod {name}: {phase}")
    } else {
        format!("pod {name}: {}", problems.join("; "))
    }
}

/// Waits for Deployment `name` to be ready; returns one of its ready pods' names (the
/// Deployment's when its pods cannot be listed).
async fn wait_ready(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    deadline: Instant,
    timeout: Duration,
) -> Result<String> {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let progress = indicatif::ProgressBar::new_spinner();
    progress.enable_steady_tick(Duration::from_millis(120));
    loop {
        let deployment = deployments
            .get(name)
            .await
            .with_context(|| format!("reading Deployment {name}"))?;
        let selector = deployment
            .spec
            .as_ref()
            .and_then(|s| s.selector.match_labels.clone())
            .unwrap_or_default()
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        let its_pods = pods
            .list(&ListParams::default().labels(&selector))
            .await
            .map(|l| l.items)
            .unwrap_or_default();
        let available = deployment
            .status
            .as_ref()
            .and_then(|s| s.available_replicas)
            .unwrap_or(0);
        let wanted = deployment
            .spec
            .as_ref()
            .and_then(|s| s.replicas)
            .unwrap_or(1);
        if deployment_ready(&deployment) {
            progress.finish_and_clear();
            return Ok(its_pods
                .iter()
                .find(|p| pod_ready(p))
                .and_then(|p| p.metadata.name.clone())
                .unwrap_or_else(|| name.to_string()));
        }
        progress.set_message(format!(
            "Waiting for {name}: {available} of {wanted} replicas available"
        ));
        if Instant::now() >= deadline {
            progress.finish_and_clear();
            let problems: Vec<String> = its_pods
                .iter()
                .filter(|p| !pod_ready(p))
                .map(pod_problem)
                .collect();
            bail!(
                "timed out after {} waiting for Deployment {namespace}/{name}: {available} of {wanted} replicas available{}",
                humanize(timeout),
                if problems.is_empty() {
                    " (no pods: is the Deployment's ReplicaSet being created?)".to_string()
                } else {
                    format!("; {}", problems.join("; "))
                }
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Go's Duration form, as FSM prints `--timeout` (5m0s).
fn humanize(d: Duration) -> String {
    let secs = d.as_secs();
    let (h, m, s) = (secs / 3600, secs % 3600 / 60, secs % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s}s"),
        _ => format!("{h}h{m}m{s}s"),
    }
}

/// Go-style durations for `--timeout`: `900s`, `5m`, `1h30m`, `2m30s`.
pub fn parse_timeout(text: &str) -> Result<Duration, String> {
    let mut total = 0f64;
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err("an empty duration".into());
    }
    if let Ok(secs) = rest.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("{text:?}: a number needs a unit (s, m, h)"))?;
        let number: f64 = rest[..digits]
            .parse()
            .map_err(|_| format!("{text:?} is not a duration like 5m or 900s"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            unit => {
                return Err(format!(
                    "{text:?}: unknown unit {unit:?} (use ms, s, m or h)"
                ));
            }
        };
        total += number * scale;
        rest = &rest[unit_len..];
    }
    Ok(Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mesh_names_follow_fsm() {
        for good in ["fsm", "mesh-1", "a"] {
            validate_mesh_name(good).expect("must succeed");
        }
        for bad in ["", "Mesh", "-a", "a-", "a_b", &"a".repeat(64)] {
            assert!(validate_mesh_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn timeouts_parse_like_go() {
        assert_eq!(
            parse_timeout("900s").expect("must succeed"),
            Duration::from_secs(900)
        );
        assert_eq!(
            parse_timeout("5m").expect("must succeed"),
            Duration::from_secs(300)
        );
        assert_eq!(
            parse_timeout("1h30m").expect("must succeed"),
            Duration::from_secs(5400)
        );
        assert_eq!(
            parse_timeout("120").expect("must succeed"),
            Duration::from_secs(120)
        );
        assert!(parse_timeout("5x").is_err());
        assert!(parse_timeout("m").is_err());
        assert_eq!(humanize(Duration::from_secs(300)), "5m0s");
        assert_eq!(humanize(Duration::from_secs(900)), "15m0s");
    }

    #[test]
    fn dry_run_holds_crds_then_the_chart() {
        let install = Install {
            mesh_name: "fsm".into(),
            fsm_namespace: "fsm-system".into(),
            values_files: vec![],
            sets: vec!["fsm.sidecarClass=fsm-sidecar".into()],
            timeout: Duration::from_secs(1),
        };
        let stream = install.dry_run().expect("must succeed");
        let first_deployment = stream.find("kind: Deployment").expect("must succeed");
        let last_crd = stream
            .rfind("kind: CustomResourceDefinition")
            .expect("must succeed");
        assert!(last_crd < first_deployment);
        assert!(stream.contains("# Source: fsm/templates/fsm-controller-deployment.yaml"));
        let bad = Install {
            mesh_name: "Bad_Name".into(),
            ..install
        };
        assert!(
            bad.dry_run()
                .expect_err("must fail")
                .to_string()
                .contains("Invalid mesh-name")
        );
    }
}
