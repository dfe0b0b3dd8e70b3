//! Golden tests: testdata/<case>/in.yaml (manifests) → one out.<namespace>.<pod>.yaml per proxy.

use std::collections::BTreeMap;
use std::path::Path;

use fsm_catalog::{Catalog, CatalogSettings, MeshObject, PROXY_UUID_LABEL, decode_manifests};
use fsm_compiler::{ProxyRef, compile};
use fsm_errcode::HasErrCode;

#[derive(serde::Serialize)]
struct Output<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    warnings: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ir: Option<&'a fsm_ir::ProxyIr>,
}

fn render(input: &str) -> Result<BTreeMap<String, String>, String> {
    let (objects, errors) = decode_manifests("in.yaml", input);
    if !errors.is_empty() {
        return Err(errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n"));
    }
    let mut catalog = Catalog::new(CatalogSettings::default());
    let mut proxies = Vec::new();
    for object in objects {
        if let MeshObject::Pod(pod) = &object
            && let Some(uuid) = pod
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(PROXY_UUID_LABEL))
        {
            let namespace = pod.metadata.namespace.clone().unwrap_or_default();
            let file = format!(
                "out.{namespace}.{}.yaml",
                pod.metadata.name.clone().unwrap_or_default()
            );
            let service_account = pod
                .spec
                .as_ref()
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or("default".into());
            proxies.push((
                file,
                ProxyRef {
                    uuid: uuid.clone(),
                    service_account,
                    namespace,
                },
            ));
        }
        catalog.apply(object);
    }
    let mut outputs = BTreeMap::new();
    for (file, proxy) in proxies {
        let compiled = compile(&catalog, &proxy);
        let output = match &compiled {
            Ok(c) => {
                c.ir.validate()
                    .map_err(|e| format!("{file}: compiler produced invalid IR: {e}"))?;
                let warnings = c
                    .warnings
                    .iter()
                    .map(|w| format!("{}: {}", w.code, w.message))
                    .collect();
                Output {
                    error: None,
                    warnings,
                    ir: Some(&c.ir),
                }
            }
            Err(e) => Output {
                error: Some(format!("{}: {e}", e.err_code())),
                warnings: vec![],
                ir: None,
            },
        };
        let again = compile(&catalog, &proxy);
        assert_eq!(compiled, again, "compile must be deterministic");
        outputs.insert(
            file,
            serde_yaml_ng::to_string(&output).map_err(|e| e.to_string())?,
        );
    }
    Ok(outputs)
}

#[test]
fn golden_cases() {
    fsm_golden::run(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata"),
        render,
    );
}
