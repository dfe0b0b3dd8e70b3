//! `fsm translate`: a directory of manifests to one proxy's data-plane configuration, with no
//! cluster and no controller, through the code the controller runs (the manifest source's
//! reading rules, the catalog, the compiler, the adapters). Envoy Gateway's `egctl x translate`
//! is the model.
//!
//! `-o json` (or `yaml`) prints the resources the controller would send the proxy, as one
//! document `{"clusters": [...], "endpoints": [...], "listeners": [...], "routes": [...],
//! "secrets": [...]}` in the proto3 JSON mapping, private keys left out. For Envoy each resource
//! is as Envoy's admin `/config_dump` prints it (`fsm_adapter_envoy::json`: `@type`, the .proto
//! field names, the private key `[redacted]`), so it can be diffed with what a proxy holds;
//! `-o bootstrap` prints the same resources as a static Envoy bootstrap for `envoy -c`.
//!
//! The certificates in the output are issued by a throwaway root made for the run: real PEM (so
//! Envoy accepts the bootstrap) that no mesh trusts.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use fsm_catalog::{Catalog, CatalogSettings, SidecarProxy};
use fsm_certs::tresor::CertificateAuthority;
use fsm_compiler::{ProxyRef, compile};
use fsm_errcode::HasErrCode;
use prost::Message;

/// The data plane to translate for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DataPlane {
    Envoy,
    FsmSidecar,
}

/// The output form.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// The proxy's resources in the proto3 JSON mapping; Envoy's as its /config_dump prints them.
    Json,
    /// The same as YAML.
    Yaml,
    /// Envoy only: a static bootstrap, binary protobuf (`envoy -c proxy.pb`).
    Bootstrap,
}

/// What a run produced: the output, and the compiler's warnings (for stderr).
pub struct Translated {
    pub output: Vec<u8>,
    pub warnings: Vec<String>,
}

pub fn translate(
    dir: &Path,
    proxy: Option<&str>,
    data_plane: DataPlane,
    output: Output,
    settings: CatalogSettings,
) -> Result<Translated> {
    if data_plane == DataPlane::FsmSidecar && output == Output::Bootstrap {
        bail!("-o bootstrap is Envoy's; fsm-sidecar's resources print as -o json or -o yaml");
    }
    let (objects, problems) = fsm_sources::read_manifest_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?;
    let mut catalog = Catalog::new(settings);
    for object in objects {
        catalog.apply(object);
    }
    let mut errors: Vec<String> = problems
        .iter()
        .map(|p| format!("{}: {p}", p.err_code()))
        .collect();
    errors.extend(
        catalog
            .rejected()
            .values()
            .map(|r| format!("{}: {}", r.code, r.message)),
    );
    if !errors.is_empty() {
        bail!(
            "{} problem(s) in {}:\n{}",
            errors.len(),
            dir.display(),
            errors.join("\n")
        );
    }
    let proxies = catalog.sidecar_proxies();
    let chosen: SidecarProxy = match proxy {
        Some(wanted) => {
            let (namespace, pod) = wanted
                .split_once('/')
                .with_context(|| format!("--proxy {wanted:?} is not <namespace>/<pod>"))?;
            proxies
                .iter()
                .find(|p| p.namespace == namespace && p.pod == pod)
                .cloned()
                .with_context(|| {
                    format!(
                        "no pod {wanted} with a sidecar (label fsm-proxy-uuid, in a monitored namespace) in {}; pods with one: {}",
                        dir.display(),
                        names(&proxies)
                    )
                })?
        }
        None => match proxies.as_slice() {
            [only] => only.clone(),
            [] => bail!(
                "no pod with a sidecar (label fsm-proxy-uuid, in a monitored namespace) in {}",
                dir.display()
            ),
            _ => bail!(
                "{} pods have sidecars; choose one with --proxy <namespace>/<pod>: {}",
                proxies.len(),
                names(&proxies)
            ),
        },
    };
    let compiled = compile(
        &catalog,
        &ProxyRef {
            uuid: chosen.uuid.clone(),
            service_account: chosen.service_account.clone(),
            namespace: chosen.namespace.clone(),
        },
    )
    .map_err(|e| anyhow::anyhow!("{}: {e}", e.err_code()))?;
    let warnings = compiled
        .warnings
        .iter()
        .map(|w| format!("{}: {}", w.code, w.message))
        .collect();
    let credentials = throwaway_credentials(&format!(
        "{}.{}.cluster.local",
        chosen.service_account, chosen.namespace
    ))?;
    let json = match data_plane {
        DataPlane::Envoy => {
            let resources = fsm_adapter_envoy::translate(&compiled.ir, &credentials)?;
            if output == Output::Bootstrap {
                let node_id = format!(
                    "{}.sidecar.{}.{}",
                    chosen.uuid, chosen.service_account, chosen.namespace
                );
                let cluster = format!("{}.{}", chosen.service_account, chosen.namespace);
                let bootstrap =
                    fsm_adapter_envoy::bootstrap::static_bootstrap(&node_id, &cluster, &resources)?;
                return Ok(Translated {
                    output: bootstrap.encode_to_vec(),
                    warnings,
                });
            }
            fsm_adapter_envoy::to_json(&resources)?
        }
        DataPlane::FsmSidecar => {
            let resources = fsm_adapter_native::translate(&compiled.ir, &credentials)?;
            fsm_adapter_native::to_json(&resources).map_err(anyhow::Error::msg)?
        }
    };
    let output = match output {
        Output::Yaml => serde_yaml_ng::to_string(&json)?.into_bytes(),
        _ => {
            let mut text = serde_json::to_string_pretty(&json)?;
            text.push('\n');
            text.into_bytes()
        }
    };
    Ok(Translated { output, warnings })
}

fn names(proxies: &[SidecarProxy]) -> String {
    proxies
        .iter()
        .map(|p| format!("{}/{}", p.namespace, p.pod))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A service certificate of `common_name` from a root made for this run.
fn throwaway_credentials(common_name: &str) -> Result<fsm_ir::ProxyCredentials> {
    let ca = CertificateAuthority::generate_root("fsm-translate", Duration::from_secs(24 * 3600))?;
    let cert = ca.issue(&fsm_certs::CertificateRequest::new(
        common_name,
        Duration::from_secs(24 * 3600),
    ))?;
    Ok(fsm_ir::ProxyCredentials {
        cert_chain_pem: cert.cert_chain_pem.clone(),
        private_key_pem: cert.private_key.expose_pem().to_owned(),
        trust_bundle_pem: cert.trust_bundle_pem.clone(),
    })
}
