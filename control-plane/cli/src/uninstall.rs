//! `fsm uninstall mesh`: removes what installing a mesh created (charts/fsm's objects), keeping
//! the CRDs, the namespace and the mesh's Secrets unless asked (FSM: CRDs are shared by every
//! mesh, and deleting one deletes every object of its kind).

use std::io::BufRead;

use anyhow::{Context, Result, bail};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams};
use kube::core::{ApiResource, GroupVersionKind};

/// What `fsm uninstall mesh` was asked to do.
pub struct Uninstall<'a> {
    pub mesh_name: &'a str,
    pub fsm_namespace: &'a str,
    pub delete_namespace: bool,
    pub delete_cluster_wide_resources: bool,
}

fn resource(group: &str, version: &str, kind: &str) -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind))
}

/// Deletes `name` of `kind` (in `namespace`, or cluster-wide); gone already is fine. Returns
/// whether something was deleted.
async fn delete_one(
    client: &kube::Client,
    resource: &ApiResource,
    namespace: Option<&str>,
    name: &str,
) -> Result<bool> {
    let api: Api<DynamicObject> = match namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, resource),
        None => Api::all_with(client.clone(), resource),
    };
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(false),
        Err(e) => Err(e).with_context(|| format!("deleting {} {name}", resource.kind)),
    }
}

/// Asks the question FSM asks on standard input; anything but y/yes is no.
pub fn confirm(mesh_name: &str, input: &mut impl BufRead) -> Result<bool> {
    eprint!("Uninstall FSM [mesh name: {mesh_name}] ? [y/n]: ");
    let mut answer = String::new();
    input.read_line(&mut answer)?;
    Ok(matches!(
        answer.trim().to_ascii_lowercase().as_str(),
        "y" | "yes"
    ))
}

pub async fn uninstall(client: &kube::Client, u: &Uninstall<'_>) -> Result<String> {
    let (mesh, ns) = (u.mesh_name, u.fsm_namespace);
    let mesh_config = resource("config.flomesh.io", "v1alpha3", "MeshConfig");
    let configs: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &mesh_config);
    let mutating = resource(
        "admissionregistration.k8s.io",
        "v1",
        "MutatingWebhookConfiguration",
    );
    let webhook: Api<DynamicObject> = Api::all_with(client.clone(), &mutating);
    let installed = configs
        .get_opt(fsm_catalog::MESH_CONFIG_NAME)
        .await
        .ok()
        .flatten()
        .is_some()
        || webhook
            .get_opt(&format!("fsm-webhook-{mesh}"))
            .await
            .ok()
            .flatten()
            .is_some();
    if !installed {
        bail!(
            "No mesh [{mesh}] found in namespace [{ns}] (no MeshConfig {} and no webhook fsm-webhook-{mesh}); check --mesh-name and --fsm-namespace",
            fsm_catalog::MESH_CONFIG_NAME
        );
    }
    let mut gone = Vec::new();
    // The control plane and what it answers for.
    let namespaced: [(ApiResource, &[&str]); 7] = [
        (
            resource("apps", "v1", "Deployment"),
            &["fsm-controller", "fsm-injector"],
        ),
        (
            resource("", "v1", "Service"),
            &["fsm-controller", "fsm-injector"],
        ),
        (
            resource("", "v1", "ServiceAccount"),
            &["fsm-controller", "fsm-injector"],
        ),
        (
            resource("rbac.authorization.k8s.io", "v1", "Role"),
            &["fsm-controller", "fsm-injector"],
        ),
        (
            resource("rbac.authorization.k8s.io", "v1", "RoleBinding"),
            &["fsm-controller", "fsm-injector"],
        ),
        (
            resource("coordination.k8s.io", "v1", "Lease"),
            &["fsm-controller"],
        ),
        (mesh_config.clone(), &[fsm_catalog::MESH_CONFIG_NAME]),
    ];
    for (kind, names) in &namespaced {
        for name in *names {
            if delete_one(client, kind, Some(ns), name).await? {
                gone.push(format!("{} {ns}/{name}", kind.kind));
            }
        }
    }
    // What `fsm install` (or `helm install`) recorded: the release Secrets, and the chart's
    // Vault token Secret.
    let secret = resource("", "v1", "Secret");
    let secrets_here: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &secret);
    let releases = secrets_here
        .list(&ListParams::default().labels(&format!("owner=helm,name={mesh}")))
        .await
        .context("listing the Helm release records")?;
    let release_names = releases.items.into_iter().filter_map(|s| s.metadata.name);
    for name in release_names.chain(["fsm-vault-token".to_string()]) {
        if delete_one(client, &secret, Some(ns), &name).await? {
            gone.push(format!("Secret {ns}/{name}"));
        }
    }
    let cluster_wide = [
        (mutating, format!("fsm-webhook-{mesh}")),
        (
            resource(
                "admissionregistration.k8s.io",
                "v1",
                "ValidatingWebhookConfiguration",
            ),
            format!("fsm-validator-mesh-{mesh}"),
        ),
        (
            resource("rbac.authorization.k8s.io", "v1", "ClusterRole"),
            format!("fsm-controller-{mesh}"),
        ),
        (
            resource("rbac.authorization.k8s.io", "v1", "ClusterRole"),
            format!("fsm-injector-{mesh}"),
        ),
        (
            resource("rbac.authorization.k8s.io", "v1", "ClusterRoleBinding"),
            format!("fsm-controller-{mesh}"),
        ),
        (
            resource("rbac.authorization.k8s.io", "v1", "ClusterRoleBinding"),
            format!("fsm-injector-{mesh}"),
        ),
    ];
    for (kind, name) in &cluster_wide {
        if delete_one(client, kind, None, name).await? {
            gone.push(format!("{} {name}", kind.kind));
        }
    }
    if u.delete_cluster_wide_resources {
        // The mesh's root, the sidecars' bootstrap Secrets, and FSM's CRDs.
        if delete_one(client, &secret, Some(ns), "fsm-ca-bundle").await? {
            gone.push(format!("Secret {ns}/fsm-ca-bundle"));
        }
        let secrets: Api<DynamicObject> = Api::all_with(client.clone(), &secret);
        let bootstrap = secrets
            .list(&ListParams::default().labels("app.kubernetes.io/component=sidecar-bootstrap"))
            .await
            .context("listing sidecar bootstrap Secrets")?;
        for s in bootstrap.items {
            let (Some(name), Some(sns)) = (s.metadata.name, s.metadata.namespace) else {
                continue;
            };
            if delete_one(client, &secret, Some(&sns), &name).await? {
                gone.push(format!("Secret {sns}/{name}"));
            }
        }
        let crd = resource("apiextensions.k8s.io", "v1", "CustomResourceDefinition");
        let crds: Api<DynamicObject> = Api::all_with(client.clone(), &crd);
        for c in crds
            .list(&ListParams::default())
            .await
            .context("listing CRDs")?
            .items
        {
            let Some(name) = c.metadata.name else {
                continue;
            };
            let ours = [
                ".flomesh.io",
                "specs.smi-spec.io",
                "access.smi-spec.io",
                "split.smi-spec.io",
            ]
            .iter()
            .any(|group| name.ends_with(group));
            if ours && delete_one(client, &crd, None, &name).await? {
                gone.push(format!("CustomResourceDefinition {name}"));
            }
        }
    }
    if u.delete_namespace {
        let namespace = resource("", "v1", "Namespace");
        if delete_one(client, &namespace, None, ns).await? {
            gone.push(format!("Namespace {ns}"));
        }
    }
    // What went, on stderr; stdout says what FSM says.
    for g in &gone {
        eprintln!("deleted {g}");
    }
    Ok(format!("FSM [mesh name: {mesh}] uninstalled\n"))
}
