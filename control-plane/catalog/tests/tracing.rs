//! MeshConfig `observability.tracing` as the catalog takes it: a valid change is in force at
//! once; an invalid address, port, endpoint or `sampledFraction` (as the API server would hand it over,
//! past the manifest decoder that refuses it already) is refused with the field named and FSM's
//! code, and the last valid MeshConfig stays in force.

use fsm_catalog::{Catalog, CatalogSettings, MeshObject, decode_manifests};

fn mesh_config(tracing: &str) -> MeshObject {
    let (mut objects, errors) = decode_manifests(
        "mesh.yaml",
        &format!(
            "apiVersion: config.flomesh.io/v1alpha3\nkind: MeshConfig\nmetadata: {{name: fsm-mesh-config, namespace: fsm-system}}\nspec:\n  observability:\n    tracing: {tracing}\n"
        ),
    );
    assert!(errors.is_empty(), "{errors:?}");
    objects.remove(0)
}

#[test]
fn an_invalid_tracing_setting_leaves_the_last_valid_one() {
    let mut catalog = Catalog::new(CatalogSettings::default());
    let good = mesh_config(
        "{enable: true, address: jaeger.tracing, port: 9411, endpoint: /api/v2/spans, sampledFraction: \"0.5\"}",
    );
    assert!(catalog.apply(good.clone()));
    let tracing = catalog.mesh_config().spec.observability.tracing;
    assert!(tracing.enable && tracing.sampled_fraction.as_deref() == Some("0.5"));

    for (field, change) in [
        (
            "spec.observability.tracing.sampledFraction",
            &(|t: &mut fsm_crds::config::v1alpha3::TracingSpec| {
                t.sampled_fraction = Some("1.5".into())
            }) as &dyn Fn(&mut fsm_crds::config::v1alpha3::TracingSpec),
        ),
        ("spec.observability.tracing.sampledFraction", &|t| {
            t.sampled_fraction = Some("10%".into())
        }),
        ("spec.observability.tracing.port", &|t| t.port = 0),
        ("spec.observability.tracing.address", &|t| {
            t.address = "http://jaeger.tracing:9411".into()
        }),
        ("spec.observability.tracing.endpoint", &|t| {
            t.endpoint = "api/v2/spans".into()
        }),
    ] {
        let MeshObject::MeshConfig(mut bad) = good.clone() else {
            panic!("not a MeshConfig")
        };
        change(&mut bad.spec.observability.tracing);
        assert!(
            !catalog.apply(MeshObject::MeshConfig(bad)),
            "{field}: refused"
        );
        let rejection = &catalog.rejected()[&good.key()];
        assert!(rejection.message.contains(field), "{field}: {rejection:?}");
        assert_eq!(rejection.code.to_string(), "E3002", "{rejection:?}");
        assert_eq!(
            catalog.mesh_config().spec.observability.tracing,
            tracing,
            "{field}: the last valid setting stays"
        );
    }

    // Off again: valid, and whatever the other fields say.
    assert!(catalog.apply(mesh_config("{enable: false, port: 0}")));
    assert!(catalog.rejected().is_empty());
    assert!(!catalog.mesh_config().spec.observability.tracing.enable);
}
